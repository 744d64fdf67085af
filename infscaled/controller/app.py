"""The aiohttp application and the running controller's parts, started and stopped in order."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace

from aiohttp import web

from infscaled.controller import api, openai_proxy, proxy
from infscaled.controller.agent_metrics import AgentSeries
from infscaled.controller.auth import auth_middleware, controller_token
from infscaled.controller.config import ControllerConfig
from infscaled.controller.events import RECENT_EVENTS
from infscaled.controller.guard import GUARD, body_middleware
from infscaled.controller.jobs import JobStore
from infscaled.controller.looplag import LoopLag
from infscaled.controller.registry import Registry
from infscaled.controller.store import EventRecord, Store
from infscaled.controller.watch import Watchers
from infscaled.protocol.connguard import ConnectionGuard, GuardedSite, busy_middleware, connection_budget
from infscaled.protocol.watch import Event

log = logging.getLogger(__name__)

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def make_app(cfg: ControllerConfig, token: str, registry: Registry, jobs: JobStore,
             guard: ConnectionGuard | None = None) -> web.Application:
    """Routes, typed state, and middlewares from the outside in: the connection is busy (guard),
    JSON errors (so a 401 is JSON too), the token check, then the body read within its limits
    (only an authenticated client gets its body read)."""
    guard = guard if guard is not None else ConnectionGuard(cfg)
    public = openai_proxy.PUBLIC_PATHS | ({"/metrics", "/metrics/agents"} if cfg.public_metrics else set())
    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[
        busy_middleware(guard), api.json_errors, auth_middleware(token, frozenset(public)), body_middleware(cfg, guard)])
    app[GUARD] = guard
    app[api.CONFIG] = cfg
    app[api.REGISTRY] = registry
    app[api.JOBS] = jobs
    app[api.WATCHERS] = Watchers(registry, jobs, cfg.send_timeout_s)
    app[api.AGENT_SERIES] = AgentSeries()
    app[api.LOOP_LAG] = LoopLag()
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
    store: Store
    token: str = field(repr=False)
    port: int = 0
    restored_in_s: float = 0.0  # opening and loading the database at start-up

    @property
    def loop_lag(self) -> LoopLag:
        return self.runner.app[api.LOOP_LAG]

    @property
    def watchers(self) -> Watchers:
        return self.runner.app[api.WATCHERS]

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in WILDCARD_HOSTS else self.cfg.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"


async def start_controller(cfg: ControllerConfig) -> Controller:
    """Load the database, set up the app and listen on cfg.host:cfg.port (port 0: any free port)."""
    token = controller_token(cfg)
    started = time.perf_counter()
    store = await asyncio.to_thread(Store.open, cfg.state_dir)
    try:
        loaded = await asyncio.to_thread(store.load, RECENT_EVENTS)
        registry = Registry(cfg, store)
        registry.restore(loaded.agents)
        registry.event_log.restore([Event(e.seq, e.at, e.kind, e.message, e.agent, e.job, e.node, e.state)
                                     for e in loaded.events])
        registry.event_log.sink = lambda e: store.add_event(EventRecord(e.seq, e.time, e.kind, e.message, e.agent,
                                                                         e.job, e.node, e.state))
        jobs = JobStore(cfg, registry, store)
        jobs.restore(loaded.jobs)
        restored_in_s = time.perf_counter() - started
        guard = ConnectionGuard(replace(cfg, max_connections=connection_budget(cfg.max_connections)))
        runner = web.AppRunner(make_app(cfg, token, registry, jobs, guard), shutdown_timeout=cfg.shutdown_grace_s)
        await runner.setup()
    except BaseException:
        await asyncio.to_thread(store.close)
        raise
    try:
        site = GuardedSite(runner, guard, cfg.host, cfg.port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        await asyncio.to_thread(store.close)
        raise
    port = runner.addresses[0][1]
    if cfg.host in WILDCARD_HOSTS:
        log.warning("controller listening on every interface (%s:%d): anyone who can reach this port and "
                    "holds the token controls the cluster", cfg.host or "*", port)
    else:
        log.info("controller listening on %s:%d", cfg.host, port)
    log.info("controller state: %s (%d agent(s), %d job(s), loaded in %.0f ms)", store.path, len(loaded.agents),
             len(loaded.jobs), restored_in_s * 1e3)
    return Controller(cfg, registry, jobs, runner, store, token, port, restored_in_s)
