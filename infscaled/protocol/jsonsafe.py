"""Strict, bounded JSON for HTTP bodies (no torch): limits checked before parsing, and answers
that every strict parser accepts.

Requests: `loads` refuses a body over `max_bytes` or nested deeper than `max_depth` before
`json.loads` sees it (the depth scan runs in C: strings stripped by a regex, brackets kept by
`bytes.translate`, the running depth by `itertools.accumulate`), and refuses the non-standard
tokens NaN, Infinity and -Infinity that Python's parser accepts by default.

Answers: `dumps` writes non-finite floats as `null` (the documented choice: a NaN / inf model
output or statistic reads as "no number"), never as bare `NaN`, which JSON does not have.
"""

from __future__ import annotations

import json
import math
import re
from array import array
from itertools import accumulate
from typing import Any, Final

from infscaled.errors import InfscaledError

# A JSON string: quotes around non-quote, non-backslash bytes or escapes (linear, no backtracking).
_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS: Final = b"[]{}"
_DELETE: Final = bytes(b for b in range(256) if b not in _BRACKETS)
# Opening brackets -> +1, closing -> -1 (as signed bytes: 0xff).
_DEPTH_TABLE: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_CHUNK: Final = 4096


class JsonLimitError(InfscaledError):
    """A body that is too large, too deep or not strict JSON; `status` is the HTTP answer (4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def max_depth(body: bytes, stop_above: int | None = None) -> int:
    """How deep brackets and braces nest in a JSON text (brackets inside strings do not count).

    With `stop_above`, the scan stops at the first chunk deeper than that (and returns that
    chunk's depth): a 100k-deep document costs one chunk, not 100k steps."""
    structure = array("b", _STRING.sub(b"", body).translate(_DEPTH_TABLE, _DELETE))
    depth = deepest = 0
    for start in range(0, len(structure), _CHUNK):
        running = list(accumulate(structure[start:start + _CHUNK], initial=depth))
        deepest = max(deepest, max(running))
        depth = running[-1]
        if stop_above is not None and deepest > stop_above:
            break
    return deepest


def _reject_constant(name: str) -> Any:
    raise JsonLimitError(400, f"{name} is not JSON; send finite numbers (null for a missing value)")


def loads(body: bytes | str, *, max_bytes: int, max_depth_allowed: int, what: str = "the request body") -> Any:
    """Parse a strict JSON document within the limits; JsonLimitError (413 or 400) saying which."""
    data = body.encode() if isinstance(body, str) else body
    if len(data) > max_bytes:
        raise JsonLimitError(413, f"{what} is {len(data)} bytes; the limit is {max_bytes}")
    depth = max_depth(data, stop_above=max_depth_allowed)
    if depth > max_depth_allowed:
        raise JsonLimitError(400, f"{what} nests more than {max_depth_allowed} levels deep (at least {depth}); "
                                  f"the limit is {max_depth_allowed}")
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except JsonLimitError:
        raise
    except RecursionError:  # brackets the scan could not see: still a clear 4xx, never a 500
        raise JsonLimitError(400, f"{what} nests too deeply to parse") from None
    except ValueError as exc:
        raise JsonLimitError(400, f"{what} is not valid JSON: {exc}") from None


def finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (lists, tuples and dicts walked)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """Strict JSON text: non-finite floats become null (the fast path pays nothing for the check)."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(finite(value), allow_nan=False)
