"""The inference proxy: forward a request to a job's dispatcher and its answer back, bytes unchanged.

The controller never decodes tensors: the body and content type (JSON `{"inputs": ...}` or
`application/x-infscaled-tensor`) pass through as they are. One shared ClientSession, with
named connect and request timeouts, serves every job.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from infscaled.controller.config import ControllerConfig

log = logging.getLogger(__name__)

SESSION = web.AppKey("proxy_session", aiohttp.ClientSession)
# Concurrent connections to dispatchers, all jobs together (aiohttp's default is 100).
MAX_CONNECTIONS = 1024


def session_context(cfg: ControllerConfig) -> Callable[[web.Application], AsyncIterator[None]]:
    """An aiohttp cleanup context owning the shared client session (closed at runner cleanup)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s, sock_connect=cfg.connect_timeout_s)
        connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            app[SESSION] = session
            yield

    return context


async def forward(session: aiohttp.ClientSession, url: str, service_token: str, body: bytes,
                  content_type: str | None, timeout_s: float) -> web.Response:
    """POST `body` to a dispatcher; its status, content type and body come back, or 502 / 504 JSON."""
    headers = {"Authorization": f"Bearer {service_token}"}
    if content_type:
        headers["Content-Type"] = content_type
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            payload = await resp.read()
            return web.Response(status=resp.status, body=payload, headers={
                "Content-Type": resp.headers.get("Content-Type", "application/octet-stream")})
    except TimeoutError:
        return web.json_response({"error": f"dispatcher at {url} did not answer within {timeout_s:g} s "
                                           "(request_timeout_s)"}, status=504)
    except aiohttp.ClientError as exc:
        log.warning("dispatcher at %s unreachable: %s", url, exc)
        return web.json_response({"error": f"dispatcher at {url} unreachable: {exc}"}, status=502)
