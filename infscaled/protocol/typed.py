"""Dataclasses <-> decoded JSON, checking every field against its type hint.

Shared by the websocket protocol (messages.py, watch.py) and the worker control pipe
(control.py), so each rejects a malformed message with a WireError that names the offending
field ("heartbeat.agent_id: expected str, got int").

Type hints are resolved once per class: the first `build` / `to_dict` of a class compiles one
checker (or encoder) per field and caches it, so a frame costs a walk over its values and no
reflection (`typing.get_type_hints` alone cost ~30 us per class per call). The path of a bad
value is assembled only on the error path: the happy path formats no strings.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from infscaled.errors import WireError

Check = Callable[[Any], Any]
Encode = Callable[[Any], Any]


class _Mismatch(Exception):
    """A value that does not fit its type; `path` grows as the error climbs out of nested values."""

    def __init__(self, problem: str, path: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.path = path


def build(cls: type, body: dict[str, Any], where: str) -> Any:
    """`cls(**body)` after checking every field; WireError `where.field: problem` otherwise."""
    try:
        return _builder(cls)(body)
    except _Mismatch as exc:
        raise WireError(f"{where}{exc.path}: {exc.problem}") from None


def to_dict(msg: Any) -> dict[str, Any]:
    """The JSON-ready body of a dataclass message (what `dataclasses.asdict` gives, without its
    deep copies: dict and Any fields are passed through as they are, not copied)."""
    result: dict[str, Any] = _encoder(type(msg))(msg)
    return result


# -- decoding -------------------------------------------------------------------------------------

@functools.cache  # once per class: the cache is what makes a frame cheap
def _builder(cls: type) -> Check:
    hints = typing.get_type_hints(cls)
    # (name, checker, required): fields in declaration order, so the first problem reported is the
    # first in the class, whether it is a missing field or a bad value.
    plan = [(f.name, _checker(hints[f.name]), f.default is MISSING and f.default_factory is MISSING)
            for f in fields(cls)]
    known = frozenset(name for name, _, _ in plan)

    def build_one(body: dict[str, Any]) -> Any:
        if not known.issuperset(body):
            raise _Mismatch(f"unknown field(s) {sorted(set(body) - known)}")
        kwargs = {}
        for name, check, required in plan:
            if name in body:
                try:
                    kwargs[name] = check(body[name])
                except _Mismatch as exc:
                    exc.path = f".{name}{exc.path}"
                    raise
            elif required:
                raise _Mismatch(f"missing field {name!r}")
        return cls(**kwargs)

    return build_one


def _checker(tp: Any) -> Check:
    """One function that checks (and converts: int -> float) a value of type `tp`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return _any
    if tp is type(None):
        return _null
    if tp is float:
        return _float
    if tp is bool:
        return _bool
    if tp is int:
        return _int
    if tp is str:
        return _str
    if origin is list:
        (item_type,) = typing.get_args(tp)
        return _list_of(_checker(item_type))
    if origin is dict:
        return _object
    if origin in (typing.Union, types.UnionType):
        return _union_of([_checker(option) for option in typing.get_args(tp)])
    if isinstance(tp, type) and is_dataclass(tp):
        return _nested(tp)
    return _unsupported(tp)


def _unsupported(tp: Any) -> Check:
    def check(value: Any) -> Any:  # a schema bug: said when such a field arrives, as a WireError
        raise _Mismatch(f"unsupported field type {tp!r}")

    return check


def _any(value: Any) -> Any:
    return value


def _null(value: Any) -> None:
    if value is not None:
        raise _Mismatch(f"expected null, got {type(value).__name__}")
    return None


def _float(value: Any) -> float:
    kind = type(value)
    if kind is float:
        return value  # type: ignore[no-any-return]
    if kind is int:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Mismatch(f"expected a number, got {kind.__name__}")
    return float(value)


def _scalar(tp: type) -> Check:
    def check(value: Any) -> Any:
        # type(...) is, not isinstance: a bool is not an int here, and subclasses do not come from JSON.
        if type(value) is not tp and not (isinstance(value, tp) and not isinstance(value, bool)):
            raise _Mismatch(f"expected {tp.__name__}, got {type(value).__name__}")
        return value

    return check


_bool, _int, _str = _scalar(bool), _scalar(int), _scalar(str)


def _object(value: Any) -> Any:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _Mismatch("expected an object")
    return value


def _list_of(item: Check) -> Check:
    def check(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise _Mismatch(f"expected a list, got {type(value).__name__}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except _Mismatch as exc:
                exc.path = f"[{i}]{exc.path}"
                raise
        return out

    return check


def _union_of(options: list[Check]) -> Check:
    def check(value: Any) -> Any:
        for option in options:
            try:
                return option(value)
            except _Mismatch:
                continue
        raise _Mismatch(f"unexpected value {value!r}")

    return check


def _nested(cls: type) -> Check:
    def check(value: Any) -> Any:
        if not isinstance(value, dict):
            raise _Mismatch("expected an object")
        return _builder(cls)(value)  # looked up at call time: a class may nest itself

    return check


# -- encoding -------------------------------------------------------------------------------------

@functools.cache
def _encoder(cls: type) -> Encode:
    hints = typing.get_type_hints(cls)
    plain = []  # fields copied as they are
    nested = []  # fields holding dataclasses somewhere inside
    for f in fields(cls):
        enc = _value_encoder(hints[f.name])
        (plain.append(f.name) if enc is None else nested.append((f.name, enc)))
    if not nested:
        return lambda msg: {name: getattr(msg, name) for name in plain}

    def encode(msg: Any) -> dict[str, Any]:
        out = {name: getattr(msg, name) for name in plain}
        for name, enc in nested:
            out[name] = enc(getattr(msg, name))
        return out

    return encode


def _value_encoder(tp: Any) -> Encode | None:
    """How to make a value of type `tp` JSON-ready, or None when it already is."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        item = _value_encoder(item_type)
        return None if item is None else (lambda value: [item(v) for v in value])
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        if all(_value_encoder(o) is None for o in options):
            return None
        return _encode_any  # e.g. `Stats | None`: the value's own class says how
    if isinstance(tp, type) and is_dataclass(tp):
        return lambda value: _encoder(type(value))(value)
    return None


def _encode_any(value: Any) -> Any:
    if value is None or not is_dataclass(value):
        return value
    return _encoder(type(value))(value)
