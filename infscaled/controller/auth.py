"""The bearer token: where it comes from, and the middleware that checks it on every route.

The CLI and the agent reuse `find_token` / `load_or_create_token`, so one host's controller,
agent and CLI agree on the token without configuration. The token is never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from infscaled.controller.config import TOKEN_ENV, ControllerConfig
from infscaled.errors import ConfigError
from infscaled.generation.errors import error_body
from infscaled.protocol.connguard import Throttle

log = logging.getLogger(__name__)

TOKEN_FILE = "token"


def token_path(state_dir: str | Path) -> Path:
    return Path(state_dir).expanduser() / TOKEN_FILE


def _read(path: Path) -> str:
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ConfigError(f"{path}: the token file is empty; delete it to have a new token generated")
    return token


def load_or_create_token(state_dir: str | Path) -> str:
    """The token in `<state_dir>/token`, created (32 random bytes, url-safe; file 0600, dir 0700) if absent."""
    path = token_path(state_dir)
    if path.exists():
        return _read(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        # O_EXCL: two processes starting at once must not overwrite each other's token.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(token + "\n")
    log.info("generated a new API token in %s", path)
    return token


def find_token(state_dir: str | Path) -> str | None:
    """$INFSCALED_TOKEN, else the token file in `state_dir`, else None (never creates one)."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    path = token_path(state_dir)
    return _read(path) if path.exists() else None


def controller_token(cfg: ControllerConfig) -> str:
    """What the controller accepts: $INFSCALED_TOKEN, else cfg.token, else the token file."""
    return os.environ.get(TOKEN_ENV, "").strip() or cfg.token or load_or_create_token(cfg.state_dir)


def auth_middleware(token: str, public: frozenset[str] = frozenset()) -> Middleware:
    """Reject every request without `Authorization: Bearer <token>` with a 401 in OpenAI's error
    shape, except GETs of the `public` paths (health, metrics: vLLM's convention).

    Rejections are logged per (problem, route), at most one line per interval with a count of
    the ones suppressed: a stranger hammering the API cannot fill the disk with log lines."""
    expected = token.encode()
    throttle = Throttle(log)

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in public and request.method in ("GET", "HEAD"):
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        problem = None
        if scheme.lower() != "bearer" or not given.strip():
            problem = "missing bearer token"
        elif not hmac.compare_digest(given.strip().encode(), expected):
            problem = "wrong token"
        if problem is not None:
            route = request.path if request.match_info.route.resource is not None else "<unrouted>"
            throttle.warning(f"{problem}:{request.method}:{route}", "rejected %s %s from %s: %s", request.method,
                             request.path, request.remote, problem)
            body = error_body(401, f"unauthorized: {problem}; send 'Authorization: Bearer TOKEN'",
                              code="invalid_api_key")
            return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check_token
