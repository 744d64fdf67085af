"""`GET /v1/watch`: a websocket streaming cluster snapshots and events (protocol/watch.py).

The snapshot is built from what the controller already holds (agents' registrations, their
latest host usage, jobs and their latest per-node stats); building one costs a walk over the
nodes, so each watcher gets one every `interval_s`, not one per incoming report. Events go
out as they happen. Watchers send nothing; the socket only carries the server's frames.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from aiohttp import WSCloseCode, web

from infscaled.controller.jobs import LIVE, Job, JobStore
from infscaled.controller.registry import Agent, Registry
from infscaled.errors import WireError
from infscaled.protocol.control import StageStats
from infscaled.protocol.plan import DISPATCHER, Node
from infscaled.protocol.watch import (
    AgentView,
    DeviceView,
    EdgeView,
    Event,
    JobView,
    ReplicaView,
    Snapshot,
    StageView,
    WatchMessage,
    bottleneck_stage,
    encode,
)

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 1.0
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.1, 60.0


def agent_view(agent: Agent, users: dict[tuple[str, str], str], now: float) -> AgentView:
    """One agent as watchers and `GET /v1/agents` show it."""
    info, usage = agent.info, agent.usage
    measured = {d.id: d for d in usage.devices} if usage is not None else {}
    devices = []
    for d in info.devices:
        m = measured.get(d.id)
        devices.append(DeviceView(d.id, d.kind, d.name, d.memory_bytes, users.get((agent.id, d.id), ""),
                                  m.util_ratio if m else -1.0, m.memory_used_bytes if m else -1))
    return AgentView(
        id=agent.id, host=info.host, state=agent.state, reason=agent.lost_reason, advertise=info.advertise,
        cpu_cores=info.cpu_cores, ram_bytes=info.ram_bytes,
        cpu_ratio=usage.cpu_ratio if usage is not None else -1.0,
        ram_used_bytes=usage.ram_used_bytes if usage is not None else -1,
        workers=agent.workers, last_heartbeat_age_s=round(now - agent.last_seen, 3), devices=devices)


def job_view(job: Job, now: float) -> JobView:
    """One job with its latest stats; a job that is not live shows none (they would read as current)."""
    stats: dict[str, tuple[StageStats, float]] = {}
    dispatcher = None
    if job.state in LIVE:
        for at, msg in job.metrics.values():
            age = round(max(0.0, now - at), 3)
            stats.update({s.node: (s, age) for s in msg.stages})
            dispatcher = msg.dispatcher or dispatcher
    replicas = []
    for name, status in job.nodes.items():
        if name == str(DISPATCHER):
            continue
        node = Node.parse(name)
        st, age = stats.get(name, (None, -1.0))
        replicas.append(ReplicaView(name, node.stage, node.replica, status.agent, status.device, status.state,
                                    status.pid, status.reason, st, age))
    replicas.sort(key=lambda r: (r.stage, r.replica))
    stages = [StageView(i, a, b, job.cfg.pipeline.replicas[i]) for i, (a, b) in enumerate(job.ranges)]
    edges = [EdgeView(str(e.src), str(e.dst), _edge_rate(str(e.src), str(e.dst), stats))
             for e in (job.plan.edges if job.plan is not None else ())]
    return JobView(job.id, job.name, str(job.state), job.reason, job.cfg.model.source, job.created, stages,
                   replicas, edges, dispatcher, bottleneck_stage(replicas))


def _edge_rate(src: str, dst: str, stats: dict[str, tuple[StageStats, float]]) -> float:
    """Measured where the data arrives; the dispatcher reports no per-edge rates, so an edge into
    it carries what its (single-output) sender computed."""
    if dst == str(DISPATCHER):
        return stats[src][0].samples_per_s if src in stats else 0.0
    if dst not in stats:
        return 0.0
    return next((r.samples_per_s for r in stats[dst][0].inputs if r.src == src), 0.0)


def snapshot(registry: Registry, jobs: JobStore, interval_s: float) -> Snapshot:
    now = time.monotonic()
    users = jobs.device_users()
    ordered: Iterable[Job] = sorted(jobs.jobs.values(), key=lambda j: j.created)
    return Snapshot(time.time(), interval_s, [agent_view(a, users, now) for a in registry],
                    [job_view(j, now) for j in ordered])


class Watchers:
    """The open `/v1/watch` sockets: served here, closed together at shutdown."""

    def __init__(self, registry: Registry, jobs: JobStore, send_timeout_s: float) -> None:
        self.registry = registry
        self.jobs = jobs
        self.send_timeout_s = send_timeout_s
        self._sockets: set[web.WebSocketResponse] = set()

    def __len__(self) -> int:
        return len(self._sockets)

    async def serve(self, ws: web.WebSocketResponse, interval_s: float) -> None:
        """Recent events, then a snapshot every interval_s and events as they come, until the
        client closes, falls too far behind (a send times out) or the controller shuts down."""
        events = self.registry.event_log
        self._sockets.add(ws)
        try:
            with events.subscribe() as queue:
                for event in list(events.recent):
                    await self._send(ws, event)
                pump = asyncio.create_task(self._pump(ws, queue, interval_s), name="watch-pump")
                try:
                    async for _ in ws:  # watchers send nothing; this loop sees the close frame
                        pass
                finally:
                    pump.cancel()
                    try:
                        await pump
                    except asyncio.CancelledError:
                        if not pump.cancelled():  # we ourselves were cancelled, not only the pump
                            raise
        finally:
            self._sockets.discard(ws)

    async def _pump(self, ws: web.WebSocketResponse, queue: asyncio.Queue[Event], interval_s: float) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
            while not ws.closed:
                if loop.time() >= next_at:
                    await self._send(ws, snapshot(self.registry, self.jobs, interval_s))
                    next_at = loop.time() + interval_s
                try:
                    async with asyncio.timeout(max(0.0, next_at - loop.time())):
                        event = await queue.get()
                except TimeoutError:
                    continue  # time for the next snapshot
                await self._send(ws, event)
        except (TimeoutError, ConnectionError, RuntimeError, WireError) as exc:
            log.info("watcher %s dropped: %s", id(ws), exc or type(exc).__name__)
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"watcher too slow or gone")

    async def _send(self, ws: web.WebSocketResponse, msg: WatchMessage) -> None:
        # A TimeoutError here is a watcher too slow to take its frames: the pump drops it.
        async with asyncio.timeout(self.send_timeout_s):
            await ws.send_str(encode(msg))

    async def close_all(self, why: str) -> None:
        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=why.encode()[:120])
                               for ws in list(self._sockets)), return_exceptions=True)


def interval_from_query(request: web.Request) -> float:
    raw = request.query.get("interval_s")
    if raw is None:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not MIN_INTERVAL_S <= value <= MAX_INTERVAL_S:  # NaN fails too
        raise web.HTTPBadRequest(text=f"interval_s={raw!r}: expected a number of seconds from "
                                      f"{MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g}")
    return value
