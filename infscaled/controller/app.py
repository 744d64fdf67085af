"""The aiohttp application and the running controller's parts, started and stopped in order."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aiohttp import web

from infscaled.controller import api, openai_proxy, proxy
from infscaled.controller.auth import auth_middleware, controller_token
from infscaled.controller.config import ControllerConfig
from infscaled.controller.jobs import JobStore
from infscaled.controller.registry import Registry
from infscaled.controller.watch import Watchers

log = logging.getLogger(__name__)

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def make_app(cfg: ControllerConfig, token: str, registry: Registry, jobs: JobStore) -> web.Application:
    """Routes, JSON errors outside the token check (so a 401 is JSON too), typed state."""
    public = openai_proxy.PUBLIC_PATHS | ({"/metrics"} if cfg.public_metrics else set())
    app = web.Application(client_max_size=cfg.max_body_bytes,
                          middlewares=[api.json_errors, auth_middleware(token, frozenset(public))])
    app[api.CONFIG] = cfg
    app[api.REGISTRY] = registry
    app[api.JOBS] = jobs
    app[api.WATCHERS] = Watchers(registry, jobs, cfg.send_timeout_s)
    app.cleanup_ctx.append(proxy.session_context(cfg))
    api.add_routes(app)
    openai_proxy.add_routes(app)
    return app


@dataclass
class Controller:
    """A started controller: what tests and `run` hold on to."""

    cfg: ControllerConfig
    registry: Registry
    jobs: JobStore
    runner: web.AppRunner
    token: str = field(repr=False)
    port: int = 0

    @property
    def watchers(self) -> Watchers:
        return self.runner.app[api.WATCHERS]

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in WILDCARD_HOSTS else self.cfg.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"


async def start_controller(cfg: ControllerConfig) -> Controller:
    """Set up the app and listen on cfg.host:cfg.port (port 0: any free port)."""
    token = controller_token(cfg)
    registry = Registry(cfg)
    jobs = JobStore(cfg, registry)
    runner = web.AppRunner(make_app(cfg, token, registry, jobs), shutdown_timeout=cfg.shutdown_grace_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    if cfg.host in WILDCARD_HOSTS:
        log.warning("controller listening on every interface (%s:%d): anyone who can reach this port and "
                    "holds the token controls the cluster", cfg.host or "*", port)
    else:
        log.info("controller listening on %s:%d", cfg.host, port)
    return Controller(cfg, registry, jobs, runner, token, port)
