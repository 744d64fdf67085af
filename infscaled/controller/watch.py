"""`GET /v1/watch`: a websocket streaming a snapshot, then deltas and events (protocol/watch.py).

Watchers with the same query (`interval_s`, `agents`) share one `Stream`: every interval it
refreshes the agents' views that changed (controller/views.py), compares the jobs' views with
the previous tick's, encodes ONE delta and hands the same text to each of its watchers. A
watcher that joins gets the stream's snapshot of the current tick (encoded at most once per
tick, however many join; encoded in a thread, and reused with the deltas since while those are
kept), then the deltas that follow it. So the controller's cost per tick is
what changed plus one encoding per query, not per watcher, and not the fleet's size.

Each watcher has a bounded outbox; a watcher too slow to drain it (or a send that times out) is
disconnected: deltas cannot be skipped, and a reconnect starts from a fresh snapshot. Events go
out as they happen. Watchers send nothing; the socket only carries the server's frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from aiohttp import WSCloseCode, web

from infscaled.controller.jobs import JobStore
from infscaled.controller.registry import Registry
from infscaled.controller.views import FleetViews, job_view
from infscaled.errors import WireError
from infscaled.protocol.messages import HostMetrics
from infscaled.protocol.watch import AgentView, Delta, Event, FleetSummary, JobView, Snapshot, apply_usage, encode

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 1.0
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.1, 60.0
AGENT_FILTERS: Final = ("all", "none")
# Frames a watcher may have waiting; past that it is dropped (it reconnects to a fresh snapshot).
OUTBOX_FRAMES: Final = 64
# Deltas a stream keeps: a watcher joins with the latest snapshot encoded and the deltas since.
RECENT_DELTAS: Final = 16


@dataclass(eq=False)  # hashed by identity: a set member
class _Subscriber:
    ws: web.WebSocketResponse
    outbox: asyncio.Queue[str] = field(default_factory=lambda: asyncio.Queue(maxsize=OUTBOX_FRAMES))
    too_slow: bool = False

    def offer(self, text: str) -> None:
        if self.too_slow:
            return
        try:
            self.outbox.put_nowait(text)
        except asyncio.QueueFull:
            self.too_slow = True  # its sender sees it after the frame it is stuck on


class Stream:
    """The watchers of one query: one state, one delta a tick, encoded once."""

    def __init__(self, views: FleetViews, interval_s: float, agents_listed: bool) -> None:
        self.views = views
        self.interval_s = interval_s
        self.agents_listed = agents_listed
        self.subscribers: set[_Subscriber] = set()
        self.tick = 0
        self._version = 0  # FleetViews.version this stream's agents reflect
        self._agents: dict[str, AgentView] = {}
        self._usage: dict[str, HostMetrics] = {}  # newer than the view in _agents: applied for snapshots
        self._jobs: dict[str, JobView] = {}
        self._fleet = FleetSummary()
        self._snapshot: tuple[int, str] | None = None  # (tick, encoded snapshot)
        self._encoding: asyncio.Task[tuple[int, str]] | None = None  # a snapshot being encoded
        self.recent: deque[tuple[int, str]] = deque(maxlen=RECENT_DELTAS)  # (tick, encoded delta)
        self.task: asyncio.Task[None] | None = None
        self.advance(encoded=False)  # tick 1: the stream holds the whole picture before its first watcher joins

    def advance(self, encoded: bool = True) -> str:
        """One tick: what changed since the last, applied to this stream's state and encoded
        (unless nobody is there to get it: the first tick's delta is the whole fleet, and at
        10,000 agents encoding it held the loop as long as the snapshot that follows, 0.6 s)."""
        self.views.refresh()
        agents, gone, usage = self.views.changed_since(self._version) if self.agents_listed else ([], [], [])
        self._version = self.views.version
        for agent_id in gone:
            self._agents.pop(agent_id, None)
            self._usage.pop(agent_id, None)
        for view in agents:
            self._agents[view.id] = view
            self._usage.pop(view.id, None)  # built from the agent's latest usage
        self._usage.update((u.agent_id, u) for u in usage)
        now = time.monotonic()
        current = {j.id: job_view(j, now) for j in sorted(self.views.jobs.jobs.values(), key=lambda j: j.created)}
        jobs = [view for job_id, view in current.items() if self._jobs.get(job_id) != view]
        jobs_gone = [job_id for job_id in self._jobs if job_id not in current]
        self._jobs = current
        self._fleet = self.views.summary()
        self.tick += 1
        if not encoded:
            return ""
        return encode(Delta(time.time(), self.tick, self.tick - 1, self._fleet, agents, gone, jobs, jobs_gone, usage))

    def snapshot_text(self) -> str:
        """This tick's whole picture, encoded once for every watcher that joins during the tick."""
        if self._snapshot is None or self._snapshot[0] != self.tick:
            self._snapshot = (self.tick, encode(self._whole()))
        return self._snapshot[1]

    async def join_frames(self) -> list[str]:
        """A joining watcher's first frames: the latest snapshot encoded, then the deltas since.
        A new snapshot is encoded in a thread (at 10,000 agents 14 MB, 0.6 s that would otherwise
        hold the loop and the agents' pongs), shared by the watchers joining meanwhile; it serves
        joins as long as the deltas since its tick are kept. Call without awaiting in between
        the frames' delivery and joining `subscribers`, so that the next delta follows them."""
        while True:
            kept = self._snapshot
            if kept is not None and (kept[0] == self.tick or (self.recent and self.recent[0][0] <= kept[0] + 1)):
                return [kept[1], *(text for tick, text in self.recent if tick > kept[0])]
            if self._encoding is None or self._encoding.done():
                self._encoding = asyncio.create_task(self._encode_whole(), name="watch-snapshot")
            self._snapshot = await asyncio.shield(self._encoding)

    async def _encode_whole(self) -> tuple[int, str]:
        tick, snap = self.tick, self._whole()  # views are immutable: the thread reads a fixed picture
        return tick, await asyncio.to_thread(encode, snap)

    def _whole(self) -> Snapshot:
        agents = [apply_usage(view, u) if (u := self._usage.get(agent_id)) is not None else view
                  for agent_id, view in self._agents.items()]
        return Snapshot(time.time(), self.interval_s, agents, list(self._jobs.values()), self._fleet,
                        self.agents_listed, self.tick)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.interval_s
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += self.interval_s
            if loop.time() > next_at:  # fell behind (a busy loop): skip ticks rather than bunch them
                next_at = loop.time() + self.interval_s
            text = self.advance()
            self.recent.append((self.tick, text))
            for sub in self.subscribers:
                sub.offer(text)


class Watchers:
    """The open `/v1/watch` sockets and their streams: served here, closed together at shutdown."""

    def __init__(self, registry: Registry, jobs: JobStore, send_timeout_s: float) -> None:
        self.registry = registry
        self.views = FleetViews(registry, jobs)
        self.send_timeout_s = send_timeout_s
        self._streams: dict[tuple[float, bool], Stream] = {}
        self._sockets: set[web.WebSocketResponse] = set()

    def __len__(self) -> int:
        return len(self._sockets)

    async def serve(self, ws: web.WebSocketResponse, interval_s: float, agents_listed: bool = True) -> None:
        """Recent events, a snapshot, then deltas every interval_s and events as they come, until
        the client closes, falls too far behind or the controller shuts down."""
        events = self.registry.event_log
        sub = _Subscriber(ws)
        self._sockets.add(ws)
        try:
            with events.subscribe() as queue:
                for event in list(events.recent):  # up to RECENT_EVENTS: more than an outbox holds
                    async with asyncio.timeout(self.send_timeout_s):
                        await ws.send_str(encode(event))
                stream = await self._join(sub, interval_s, agents_listed)
                try:
                    async with asyncio.TaskGroup() as tg:
                        sender = tg.create_task(self._sender(sub), name="watch-sender")
                        forwarder = tg.create_task(self._forward(queue, sub), name="watch-events")
                        try:
                            async for _ in ws:  # watchers send nothing; this loop sees the close frame
                                pass
                        finally:
                            sender.cancel()
                            forwarder.cancel()
                finally:
                    self._leave(sub, stream)
        finally:
            self._sockets.discard(ws)

    async def _join(self, sub: _Subscriber, interval_s: float, agents_listed: bool) -> Stream:
        key = (interval_s, agents_listed)
        while True:
            if key not in self._streams:
                await self.views.catch_up()  # may yield: another watcher may have made the stream meanwhile
            stream = self._streams.get(key)
            if stream is None:
                stream = self._streams[key] = Stream(self.views, interval_s, agents_listed)
                stream.task = asyncio.create_task(stream.run(), name=f"watch-stream-{interval_s:g}")
            frames = await stream.join_frames()
            if self._streams.get(key) is not stream:
                continue  # its last watcher left while the snapshot was encoded: the stream ended
            for text in frames:  # no await from here: the stream's next delta follows them
                sub.offer(text)
            stream.subscribers.add(sub)
            return stream

    def _leave(self, sub: _Subscriber, stream: Stream) -> None:
        stream.subscribers.discard(sub)
        if not stream.subscribers and self._streams.get((stream.interval_s, stream.agents_listed)) is stream:
            del self._streams[(stream.interval_s, stream.agents_listed)]
            if stream.task is not None:
                stream.task.cancel()  # nothing awaits its result; it only sleeps and encodes

    async def _forward(self, queue: asyncio.Queue[Event], sub: _Subscriber) -> None:
        while True:
            sub.offer(encode(await queue.get()))

    async def _sender(self, sub: _Subscriber) -> None:
        ws = sub.ws
        try:
            while not ws.closed:
                text = await sub.outbox.get()
                async with asyncio.timeout(self.send_timeout_s):  # a watcher too slow to take its frames
                    await ws.send_str(text)
                if sub.too_slow:
                    raise TimeoutError(f"more than {OUTBOX_FRAMES} frames waiting")
        except (TimeoutError, ConnectionError, RuntimeError, WireError) as exc:
            log.info("watcher %s dropped: %s", id(ws), exc or type(exc).__name__)
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"watcher too slow or gone")

    async def close_all(self, why: str) -> None:
        for stream in list(self._streams.values()):
            if stream.task is not None:
                stream.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stream.task
        self._streams.clear()
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


def agents_listed_from_query(request: web.Request) -> bool:
    """`agents=all` (the default: every agent's view) or `agents=none` (the fleet summary only)."""
    raw = request.query.get("agents", "all")
    if raw not in AGENT_FILTERS:
        raise web.HTTPBadRequest(text=f"agents={raw!r}: expected one of {', '.join(AGENT_FILTERS)}")
    return raw == "all"
