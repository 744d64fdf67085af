"""Build a dataclass from decoded JSON, checking every field against its type hint.

Shared by the websocket protocol (messages.py) and the worker control pipe (control.py), so
both reject a malformed message with a WireError that names the offending field.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, fields
from typing import Any

from infscaled.errors import WireError


def build(cls: type, body: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(body) - known
    if unknown:
        raise WireError(f"{where}: unknown field(s) {sorted(unknown)}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in body:
            if f.default is MISSING and f.default_factory is MISSING:
                raise WireError(f"{where}: missing field {f.name!r}")
            continue
        kwargs[f.name] = _check(hints[f.name], body[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


def _check(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise WireError(f"{where}: expected null, got {type(value).__name__}")
        return None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WireError(f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp in (str, int, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise WireError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise WireError(f"{where}: expected a list, got {type(value).__name__}")
        return [_check(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise WireError(f"{where}: expected an object")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check(option, value, where)
            except WireError:
                continue
        raise WireError(f"{where}: unexpected value {value!r}")
    if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
        if not isinstance(value, dict):
            raise WireError(f"{where}: expected an object")
        return build(tp, value, where)
    raise WireError(f"{where}: unsupported field type {tp!r}")  # pragma: no cover - schema bug
