"""Bounded work per connection and per request on the controller's HTTP listener.

Connections: `protocol/connguard.py` (caps per client and in all, the idle / slow-headers
deadline, `busy_middleware`), with the controller's config as its limits.

Requests (`busy_middleware` outermost, `body_middleware` after the token check):
- a body is read whole within `body_timeout_s` (else 408 and the connection closes), after the
  declared Content-Length was checked against the limit (413 before reading anything);
- a JSON body the controller itself parses (everything but the inference proxy, which passes
  bytes through unchanged) is checked for size, nesting depth and strictness before parsing
  (protocol/jsonsafe.py), so a 100k-deep document is a 400, never a RecursionError.

Every rejection is logged through `Throttle`: the first of a kind at once, then at most one
line per interval saying how many were suppressed, so a flood cannot flood the log too.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from infscaled.controller.config import ControllerConfig
from infscaled.generation.errors import error_body
from infscaled.protocol import jsonsafe
from infscaled.protocol.connguard import ConnectionGuard

log = logging.getLogger(__name__)

GUARD = web.AppKey("guard", "ConnectionGuard")
PARSED_JSON = web.RequestKey("json", object)  # a JSON body, parsed within limits by body_middleware
_BODY_METHODS: Final = ("POST", "PUT", "PATCH")
# Bodies the controller forwards without parsing (the dispatcher checks them).
_PASS_THROUGH: Final = "/infer"
_OPENAI_PATHS: Final = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")  # OpenAI error shape
_PARSE_INLINE_BYTES: Final = 256 << 10  # ~2 ms of scanning and parsing at most on the loop


def body_middleware(cfg: ControllerConfig, guard: ConnectionGuard) -> Any:
    """After the token check: read the body within its limits; check a JSON body before parsing."""

    @web.middleware
    async def body(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in _BODY_METHODS and request.can_read_body:
            problem = await _read_body(request, cfg, guard)
            if problem is not None:
                return problem
        return await handler(request)

    return body


async def _read_body(request: web.Request, cfg: ControllerConfig, guard: ConnectionGuard) -> web.Response | None:
    declared = request.content_length
    parsed_here = request.content_type == "application/json" and not request.path.endswith(_PASS_THROUGH)
    limit, name = (cfg.max_json_bytes, "max_json_bytes") if parsed_here else (cfg.max_body_bytes, "max_body_bytes")
    if declared is not None and declared > limit:
        return _reject(guard, 413, f"request body of {declared} bytes exceeds {name} = {limit}", request, close=True)
    try:
        async with asyncio.timeout(cfg.body_timeout_s):
            body = await request.read()  # cached: the handler's read() returns it at once
    except TimeoutError:
        return _reject(guard, 408, f"request body not received within body_timeout_s = {cfg.body_timeout_s:g} s",
                       request, close=True)
    except web.HTTPRequestEntityTooLarge:
        return _reject(guard, 413, f"request body exceeds max_body_bytes = {cfg.max_body_bytes}", request,
                       close=True)
    if parsed_here:
        try:
            if len(body) > _PARSE_INLINE_BYTES:  # a large body is scanned and parsed off the event loop
                request[PARSED_JSON] = await asyncio.to_thread(
                    jsonsafe.loads, body, max_bytes=cfg.max_json_bytes, max_depth_allowed=cfg.max_json_depth)
            else:
                request[PARSED_JSON] = jsonsafe.loads(body, max_bytes=cfg.max_json_bytes,
                                                      max_depth_allowed=cfg.max_json_depth)
        except jsonsafe.JsonLimitError as exc:
            return _reject(guard, exc.status, str(exc), request)
    return None


def _reject(guard: ConnectionGuard, status: int, message: str, request: web.Request,
            close: bool = False) -> web.Response:
    guard.throttle.warning(f"reject:{status}", "%s %s from %s: %d %s", request.method, request.path, request.remote,
                           status, message)
    headers = {"Connection": "close"} if close else None
    # The OpenAI routes answer in OpenAI's error shape, which its clients display.
    body = error_body(status, message) if request.path in _OPENAI_PATHS else {"error": message}
    return web.Response(text=jsonsafe.dumps(body), status=status, content_type="application/json", headers=headers)
