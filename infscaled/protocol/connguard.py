"""Bounded connections on an aiohttp listener: a cap per client address and in all, an idle /
slow-headers deadline, and rate-limited warnings. Shared by the controller's API listener
(controller/guard.py adds its body and JSON limits) and a dispatcher's inference service
(worker/service.py), which are both reachable by strangers.

Connections (a protocol wrapper around aiohttp's, installed by `GuardedSite`):
- at most `max_connections_per_client` open connections per client address: one more is
  aborted as it is accepted (its fd closed at once); at most `max_connections` in all: a new
  connection past that evicts the connection idle the longest (outside any request), and is
  refused only when every connection is inside a request. So a flood from many addresses
  cannot lock a healthy client out: its new connection displaces an idle attacker's;
- a connection that is not inside a request handler for `header_timeout_s` is aborted: that
  bounds a request's headers arriving slowly (slowloris), a connection that never sends one,
  and an idle keep-alive. A handler in progress (a long proxied answer, a websocket) is busy,
  not idle (`busy_middleware`, the outermost middleware, says so); so is a response still being
  written to a slow reader.

Every rejection is logged through `Throttle`: the first of a kind at once, then at most one
line per interval saying how many were suppressed, so a flood cannot flood the log too.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger(__name__)


class Limits(Protocol):
    """What a ConnectionGuard reads (the controller's config has these fields; ListenerLimits too)."""

    max_connections: int
    max_connections_per_client: int
    header_timeout_s: float


def connection_budget(wanted: int) -> int:
    """`wanted`, capped so that connections can never exhaust the process's file descriptors
    (the soft limit is raised to the hard one first; 256 stay for the database, agents' pipes
    and outgoing proxy connections). Accepting past the fd limit would make every accept fail."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.info("cannot raise the open-file limit from %d: %s", soft, exc)
    budget = max(16, min(wanted, soft - 256))
    if budget < wanted:
        log.warning("max_connections %d capped to %d by the open-file limit (%d)", wanted, budget, soft)
    return budget


@dataclass(frozen=True)
class ListenerLimits:
    max_connections: int
    max_connections_per_client: int
    header_timeout_s: float


class Throttle:
    """Rate-limited logging per key: one line at once, then one per `interval_s` with a count."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._suppressed[key] += 1
            return
        self._last[key] = now
        if len(self._last) > 10_000:  # keys are bounded by kinds, but an address may be in one
            self._last.clear()
        more = self._suppressed.pop(key, 0)
        self.logger.warning(message + (f" (and {more} more like it since the last such line)" if more else ""),
                            *args)


class ConnectionGuard:
    """Counts and bounds the listener's connections; the middleware marks requests in progress."""

    def __init__(self, cfg: Limits) -> None:
        self.cfg = cfg
        self.per_client: Counter[str] = Counter()
        self.open = 0
        self.refused = 0  # over a connection cap
        self.timed_out = 0  # idle / slow headers past header_timeout_s
        self.throttle = Throttle(log)
        self._by_transport: dict[int, _Guarded] = {}
        self._idle: OrderedDict[int, _Guarded] = OrderedDict()  # outside any request, oldest first
        self.evicted = 0  # idle connections closed to make room

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, inner())

    def busy(self, transport: asyncio.BaseTransport | None, busy: bool) -> None:
        guarded = self._by_transport.get(id(transport)) if transport is not None else None
        if guarded is not None:
            guarded.busy += 1 if busy else -1
            guarded.idle_since = time.monotonic()
            if guarded.busy:
                self._idle.pop(id(transport), None)
            else:
                self._idle[id(transport)] = guarded  # (re)enters at the young end

    def make_room(self) -> bool:
        """Close the connection idle the longest; False when every connection is in a request."""
        while self._idle:
            _, oldest = self._idle.popitem(last=False)
            if oldest.transport is not None and not oldest.busy:
                self.evicted += 1
                oldest.transport.abort()  # connection_lost runs later: count it gone now
                oldest.release()
                return True
        return False

    def stats(self) -> dict[str, int]:
        return {"open": self.open, "refused": self.refused, "timed_out": self.timed_out,
                "evicted": self.evicted, "clients": len(self.per_client)}


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol, behind the caps and the idle / header deadline."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard, self.inner = guard, inner
        self.client = ""
        self.admitted = False
        self.counted = False  # in the guard's counts (an evicted connection leaves them at once)
        self.busy = 0
        self.idle_since = time.monotonic()
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        g, cfg = self.guard, self.guard.cfg
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        full = g.open >= cfg.max_connections and not g.make_room()
        if full or g.per_client[self.client] >= cfg.max_connections_per_client:
            g.refused += 1
            which = "max_connections" if full else "max_connections_per_client"
            g.throttle.warning(f"cap:{which}", "connection from %s refused: %s (%d) reached", self.client, which,
                               getattr(cfg, which))
            cast(asyncio.Transport, transport).abort()
            return
        self.admitted = self.counted = True
        g.open += 1
        g.per_client[self.client] += 1
        self.transport = transport  # type: ignore[assignment]
        g._by_transport[id(transport)] = self
        g._idle[id(transport)] = self
        self.inner.connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        period = self.guard.cfg.header_timeout_s / 2
        self._timer = asyncio.get_running_loop().call_later(period, self._check)

    def _check(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        idle = time.monotonic() - self.idle_since
        if self.busy or t.get_write_buffer_size() > 0 or idle < self.guard.cfg.header_timeout_s:
            self._arm()
            return
        self.guard.timed_out += 1
        self.guard.throttle.warning("header_timeout", "connection from %s closed: no complete request within "
                                    "header_timeout_s = %g s", self.client, self.guard.cfg.header_timeout_s)
        t.abort()

    def data_received(self, data: bytes) -> None:
        if self.admitted:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def pause_writing(self) -> None:
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.inner.resume_writing()

    def release(self) -> None:
        """Stop counting this connection (once: at eviction or when it is lost)."""
        if not self.counted:
            return
        self.counted = False
        g = self.guard
        g.open -= 1
        g.per_client[self.client] -= 1
        if g.per_client[self.client] <= 0:
            del g.per_client[self.client]
        g._by_transport.pop(id(self.transport), None)
        g._idle.pop(id(self.transport), None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        self.admitted = False
        self.release()
        if self._timer is not None:
            self._timer.cancel()
        self.transport = None
        self.inner.connection_lost(exc)


class GuardedSite(web.TCPSite):
    """A TCPSite whose connections go through a ConnectionGuard (aiohttp 3.x TCPSite.start, with
    the protocol factory wrapped)."""

    def __init__(self, runner: web.AppRunner, guard: ConnectionGuard, host: str, port: int) -> None:
        super().__init__(runner, host, port)
        self.guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self.guard.factory(server), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


def busy_middleware(guard: ConnectionGuard) -> Any:
    """The outermost middleware: a connection inside a handler is not idle."""

    @web.middleware
    async def busy(request: web.Request, handler: Handler) -> web.StreamResponse:
        guard.busy(request.transport, True)
        try:
            return await handler(request)
        finally:
            guard.busy(request.transport, False)

    return busy
