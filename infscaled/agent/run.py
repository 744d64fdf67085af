"""`run(cfg)`: the agent daemon's life, one asyncio.TaskGroup.

Start-up: discover devices and the address to advertise (in threads: NVML / nvidia-smi /
DNS may block), start the warm fork server every worker is forked from (worker/start.py: torch
and the stage code imported once, in a thread, before registering: a deploy then starts its
processes in ~0.05 s each without blocking the loop) -> keep the controller link up (its own
task, reconnecting) -> handle the controller's messages. Shutdown (SIGINT / SIGTERM, the `stop`
event, or cancellation) is the reverse: stop every job's processes FIRST (dispatchers drain, then
workers; SIGTERM / SIGKILL after the grace), report their exits, then close the websocket. No process outlives it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from dataclasses import replace

from infscaled import __version__
from infscaled.agent.client import ControllerLink
from infscaled.agent.config import AgentConfig, load_credential, resolve_advertise, save_credential
from infscaled.agent.devices import UsageSampler, discover, host_resources, usage_changed
from infscaled.agent.jobs import JobManager
from infscaled.errors import ConfigError
from infscaled.protocol.messages import Device, HostMetrics, Message, Register, Welcome
from infscaled.worker.start import prestart

log = logging.getLogger(__name__)


async def run(cfg: AgentConfig, stop: asyncio.Event | None = None, *, handle_signals: bool = True) -> None:
    """Run the agent until `stop` is set (or SIGINT / SIGTERM when `handle_signals`, which needs
    the main thread), or until cancelled. Raises ConfigError for devices this host lacks."""
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError) as exc:
                log.info("no handler for %s here (%s); stop the agent with its stop event", sig.name, exc)
    try:
        await _run(cfg, stop)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _run(cfg: AgentConfig, stop: asyncio.Event) -> None:
    try:
        devices = await asyncio.to_thread(discover, cfg.devices)
    except ValueError as exc:
        raise ConfigError(f"agent: devices = {cfg.devices!r}: {exc}") from None
    advertise = await asyncio.to_thread(resolve_advertise, cfg)
    cores, ram = host_resources()
    credential = await asyncio.to_thread(load_credential, cfg)
    await asyncio.to_thread(prestart)
    register = Register(agent_id=cfg.agent_id, host=socket.gethostname(), advertise=advertise, devices=devices,
                        cpu_cores=cores, ram_bytes=ram, port_range=list(cfg.port_range), version=__version__)
    log.info("agent %s: %d device(s) (%s), advertising %s", cfg.agent_id, len(devices),
                ", ".join(d.id for d in devices), advertise)
    async with asyncio.TaskGroup() as tg:
        link: ControllerLink | None = None

        def post(msg: Message) -> None:
            assert link is not None
            link.post(msg)

        jobs = JobManager(cfg, tg, post)

        def current_register() -> Register:
            # The credential once issued, and what runs here: a restarted controller adopts it.
            return replace(register, credential=credential, workers=jobs.running())

        def welcomed(welcome: Welcome) -> None:
            nonlocal credential
            if welcome.credential and welcome.credential != credential:
                credential = welcome.credential
                tg.create_task(_keep_credential(cfg, credential), name="keep-credential")

        link = ControllerLink(cfg, current_register, jobs.handle, jobs.snapshot, jobs.workers_alive, welcomed)
        link_task = tg.create_task(link.run(), name="controller-link")
        orphan_task = tg.create_task(_orphan_watch(cfg, link, jobs), name="orphan-watch")
        metrics_task = tg.create_task(jobs.metrics_forever(), name="metrics")
        usage_task = tg.create_task(_usage_forever(cfg, devices, link), name="host-usage")
        try:
            await stop.wait()
            log.info("agent %s: stopping: workers first, then the controller link", cfg.agent_id)
        finally:
            # Whatever ended the wait (stop, cancellation, a failed task), no process outlives us.
            await jobs.stop_all()
            await link.flush(cfg.send_timeout_s)
            metrics_task.cancel()
            usage_task.cancel()
            orphan_task.cancel()
            await link.close()
            link_task.cancel()


async def _keep_credential(cfg: AgentConfig, credential: str) -> None:
    try:
        await asyncio.to_thread(save_credential, cfg, credential)
    except OSError as exc:  # task boundary: the agent keeps serving; a restart would be refused
        log.error("cannot keep the credential for agent %s in %s: %s; after a restart this agent's id will be "
                  "refused", cfg.agent_id, cfg.credential_path, exc)


async def _orphan_watch(cfg: AgentConfig, link: ControllerLink, jobs: JobManager) -> None:
    """Jobs outlive a controller restart, not a controller gone for good: once the link has been
    down for orphan_grace_s, stop them (a controller that comes back later finds none to adopt)."""
    period = min(1.0, cfg.orphan_grace_s / 4)
    down_since: float | None = None
    while True:
        await asyncio.sleep(period)
        if link.connected:
            down_since = None
            continue
        now = time.monotonic()
        down_since = now if down_since is None else down_since
        if jobs.jobs and now - down_since >= cfg.orphan_grace_s:
            await jobs.orphaned(f"the controller has been unreachable for {cfg.orphan_grace_s:g} s "
                                "(orphan_grace_s)")


async def _usage_forever(cfg: AgentConfig, devices: list[Device], link: ControllerLink) -> None:
    """Sample the host's CPU/RAM and the devices' usage every Welcome.host_metrics_interval_s (the
    controller sets the fleet's rate; metrics_interval_s until the first Welcome) and post it as
    HostMetrics when it changed (usage_changed) or the link is a new session (the controller
    knows nothing of this host then)."""
    sampler = await asyncio.to_thread(UsageSampler, devices)
    sent: HostMetrics | None = None
    session = -1
    try:
        while True:
            welcome = link.welcome
            await asyncio.sleep(welcome.host_metrics_interval_s if welcome else cfg.metrics_interval_s)
            sample = await asyncio.to_thread(sampler.sample, cfg.agent_id)
            if link.sessions != session:
                session, sent = link.sessions, None
            if usage_changed(sent, sample):
                link.post(sample)
                sent = sample
    finally:
        await asyncio.to_thread(sampler.close)
