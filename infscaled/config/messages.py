"""One shape for every config error: `FILE: KEY = VALUE: PROBLEM; allowed: ALLOWED`.

Every check in this package builds its message here, so users (and tools grepping logs)
always find the file, the dotted key, the offending value and the accepted values in the
same places.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from infscaled.errors import ConfigError

# Long values (a big edge list, a whole mistyped table) are cut so the message stays one line.
_MAX_REPR_CHARS: Final = 200


class _Missing:
    """Marks "no value": a required key that is absent, or an error about a key not a value."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Final = _Missing()


def short_repr(value: object) -> str:
    """repr(value), cut to a readable length."""
    text = repr(value)
    if len(text) > _MAX_REPR_CHARS:
        text = text[: _MAX_REPR_CHARS - 3] + "..."
    return text


def format_error(path: str, key: str, value: object, allowed: str, problem: str = "invalid value") -> str:
    """The one message shape: `path: key = repr(value): problem; allowed: allowed`.

    `key` may be "" for file-level errors, and `value` may be MISSING for absent keys;
    those parts are then left out.
    """
    head = str(path)
    if key:
        head += f": {key}" if value is MISSING else f": {key} = {short_repr(value)}"
    return f"{head}: {problem}; allowed: {allowed}"


def config_error(
    path: str, key: str, value: object, allowed: str, problem: str = "invalid value"
) -> ConfigError:
    """A ConfigError carrying `format_error(...)`, for `raise config_error(...)`."""
    return ConfigError(format_error(path, key, value, allowed, problem))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A hint like " (did you mean 'x'?)" naming the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """Read a TOML file (`what`: "job file", "config file"); a missing, unreadable or invalid
    file is one ConfigError naming it."""
    shown = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise config_error(shown, "", None, f"a path to an existing TOML {what}", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise config_error(shown, "", None, f"a readable UTF-8 TOML {what}", f"cannot read: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise config_error(shown, "", None, "TOML syntax (https://toml.io)", f"invalid TOML: {exc}") from None
