"""Typed reads from one TOML table, each failure raised as a ConfigError naming file and key."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from infscaled.config.messages import MISSING, config_error, did_you_mean
from infscaled.errors import ConfigError


def int_range_text(lo: int | None, hi: int | None) -> str:
    """Human text for an integer range, e.g. "an integer in 1..4096"."""
    if lo is not None and hi is not None:
        return f"an integer in {lo}..{hi}"
    if lo is not None:
        return f"an integer >= {lo}"
    return "an integer"


def float_range_text(lo: float | None, hi: float | None, lo_open: bool) -> str:
    """Human text for a number range, e.g. "a number > 0" or "a number in 0..60000"."""
    if lo is not None and hi is not None and not lo_open:
        return f"a number in {lo:g}..{hi:g}"
    if lo is not None:
        return f"a number {'>' if lo_open else '>='} {lo:g}"
    return "a number"


def check_int(path: str, key: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int within lo..hi (inclusive); bools are rejected although Python calls them ints."""
    allowed = int_range_text(lo, hi)
    if not isinstance(value, int) or isinstance(value, bool):
        raise config_error(path, key, value, allowed, "expected an integer")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise config_error(path, key, value, allowed, "out of range")
    return value


def check_float(
    path: str,
    key: str,
    value: object,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float:
    """`value` (int or float, finite) as a float within the range; `lo_open` makes lo exclusive."""
    allowed = float_range_text(lo, hi, lo_open)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise config_error(path, key, value, allowed, "expected a number")
    number = float(value)
    too_low = lo is not None and (number <= lo if lo_open else number < lo)
    if not math.isfinite(number) or too_low or (hi is not None and number > hi):
        raise config_error(path, key, value, allowed, "out of range")
    return number


def check_bool(path: str, key: str, value: object) -> bool:
    """`value` as a bool (TOML true / false); strings and numbers are rejected, not coerced."""
    if not isinstance(value, bool):
        raise config_error(path, key, value, "true or false (TOML booleans, unquoted)", "expected a boolean")
    return value


def check_str(path: str, key: str, value: object, allowed: str) -> str:
    """`value` as a non-empty string."""
    if not isinstance(value, str):
        raise config_error(path, key, value, allowed, "expected a string")
    if not value.strip():
        raise config_error(path, key, value, allowed, "must not be empty")
    return value


def check_list(path: str, key: str, value: object, allowed: str) -> list[Any]:
    """`value` as a list (TOML array)."""
    if not isinstance(value, list):
        raise config_error(path, key, value, allowed, "expected a list")
    return value


@dataclass(frozen=True)
class Section:
    """One TOML table being read; knows its file and dotted prefix so every error names both."""

    path: str
    """The file, as shown in messages."""
    prefix: str
    """Dotted name of this table ("" for the top level)."""
    data: Mapping[str, Any]
    """The table's raw values."""

    def key(self, name: str) -> str:
        """Dotted key of `name` in this table, e.g. "pipeline.replicas"."""
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, value: object, allowed: str, problem: str) -> ConfigError:
        """A ConfigError about key `name` of this table."""
        return config_error(self.path, self.key(name), value, allowed, problem)

    def has(self, name: str) -> bool:
        """Whether the key is present."""
        return name in self.data

    def raw(self, name: str) -> Any:
        """The raw value, or MISSING."""
        return self.data.get(name, MISSING)

    def check_keys(self, known: Sequence[str]) -> None:
        """Reject the first key (in file order) not in `known`, suggesting the closest one."""
        for name, value in self.data.items():
            if name not in known:
                hint = did_you_mean(name, known)
                raise self.error(name, value, ", ".join(known), f"unknown key{hint}")

    def table(self, name: str) -> Section:
        """Sub-table `name` (empty when absent)."""
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, value, f"a table: [{self.key(name)}]", "expected a table")
        return Section(self.path, self.key(name), value)

    def get_int(self, name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        """Integer key within lo..hi, or `default` when absent."""
        if name not in self.data:
            return default
        return check_int(self.path, self.key(name), self.data[name], lo, hi)

    def get_float(
        self,
        name: str,
        default: float,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
    ) -> float:
        """Number key within the range, or `default` when absent."""
        if name not in self.data:
            return default
        return check_float(self.path, self.key(name), self.data[name], lo, hi, lo_open)

    def get_bool(self, name: str, default: bool) -> bool:
        """Boolean key, or `default` when absent."""
        if name not in self.data:
            return default
        return check_bool(self.path, self.key(name), self.data[name])

    def get_str(self, name: str, default: str | None, allowed: str) -> str:
        """Non-empty string key; absent -> `default`, or an error when default is None (required)."""
        if name not in self.data:
            if default is None:
                raise self.error(name, MISSING, allowed, "missing required key")
            return default
        return check_str(self.path, self.key(name), self.data[name], allowed)

    def get_choice(self, name: str, default: str, choices: Sequence[str], what: str) -> str:
        """String key that must be one of `choices`; `what` names it in the message ("policy")."""
        allowed = ", ".join(choices)
        value = self.get_str(name, default, allowed)
        if value not in choices:
            hint = did_you_mean(value, choices)
            raise self.error(name, value, allowed, f"unknown {what}{hint}")
        return value
