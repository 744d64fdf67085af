"""The JSON frame shared by the agents' websocket and `/v1/watch`: `{"v", "type", "body"}`.

`decode_frame` checks the envelope, the version, the type and every body field's type
(protocol.typed), and raises WireError with a precise message; it never trusts the peer.
"""

from __future__ import annotations

import json
from typing import Any

from infscaled.errors import WireError
from infscaled.protocol.typed import build, to_dict

DEFAULT_MAX_BYTES = 1 << 20


def encode_frame(msg: Any, version: int, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    text = json.dumps({"v": version, "type": msg.type, "body": to_dict(msg)})
    if len(text) > max_bytes:  # json.dumps escapes non-ASCII: characters are bytes
        raise WireError(f"{msg.type} message of {len(text)} bytes exceeds {max_bytes}")
    return text


def decode_frame(data: str | bytes, types: dict[str, type], version: int, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"message is not JSON: {exc}") from None
    if not isinstance(raw, dict) or set(raw) != {"v", "type", "body"}:
        raise WireError("message must be an object with exactly the keys v, type, body")
    if raw["v"] != version:
        raise WireError(f"protocol version {raw['v']!r} not supported; this side speaks {version}")
    cls = types.get(raw["type"]) if isinstance(raw["type"], str) else None
    if cls is None:
        raise WireError(f"unknown message type {raw['type']!r}; known: {', '.join(sorted(types))}")
    body = raw["body"]
    if not isinstance(body, dict):
        raise WireError(f"{raw['type']}: body must be an object")
    return build(cls, body, raw["type"])
