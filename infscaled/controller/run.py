"""`run(cfg)`: the controller daemon, from start-up to an ordered shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

from infscaled.controller.app import Controller, start_controller
from infscaled.controller.config import ControllerConfig

log = logging.getLogger(__name__)

SHUTDOWN_REASON = "controller shutting down"
GC_GEN0_THRESHOLD = 50_000  # Python's default is 700


async def run(cfg: ControllerConfig, *, on_ready: Callable[[Controller], None] | None = None) -> None:
    """Serve until cancelled, then shut down in the reverse order of start-up.

    Shutdown: announce draining (new jobs get 503), stop accepting connections, stop every job
    (StopJob to its agents, wait up to shutdown_grace_s for their workers' exits), close the
    agents' websockets, then the watchers' (they saw the jobs stop), cancel and await the
    reconciler, then clean up the aiohttp runner (in-flight requests get shutdown_grace_s; the
    proxy's client session closes last).
    `on_ready` is called once the controller listens (tests read the port from it).
    """
    # A fleet's controller holds ~100 objects per agent (registration, views) for its whole life;
    # the default thresholds run a full collection over all of them every few thousand new
    # objects, which at 10,000 agents cost more than the work itself. Collect young objects
    # less often; nothing here relies on prompt cycle collection.
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
    ctl = await start_controller(cfg)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(ctl.jobs.reconcile_forever(), name="job-reconciler")
            tg.create_task(ctl.loop_lag.run(), name="loop-lag")
            try:
                if on_ready is not None:
                    on_ready(ctl)
                await asyncio.Event().wait()  # until cancelled
            finally:
                await _drain(ctl)
    finally:
        await ctl.runner.cleanup()
        await asyncio.to_thread(ctl.store.close)  # commits what the shutdown changed
        log.info("controller stopped")


async def _drain(ctl: Controller) -> None:
    live = [j.id for j in ctl.jobs.jobs.values() if j.state in ("pending", "deploying", "running")]
    log.info("controller draining: no new jobs; stopping %d job(s)", len(live))
    ctl.jobs.draining = True
    for site in list(ctl.runner.sites):
        await site.stop()
    await ctl.jobs.stop_all(SHUTDOWN_REASON, ctl.cfg.shutdown_grace_s)
    await ctl.registry.close_all(SHUTDOWN_REASON)
    await ctl.watchers.close_all(SHUTDOWN_REASON)
