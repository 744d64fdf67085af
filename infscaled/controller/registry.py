"""Agents: one websocket each, registration, liveness, sends and the Inspect round trip.

An agent's session: the first frame must be Register (else ErrorMsg and close); the controller
answers Welcome. Every later frame is decoded with `protocol.messages.decode`; a malformed,
unknown or unexpected one is answered with ErrorMsg and logged, and the session goes on. An
agent silent for heartbeat_timeout_s, or whose websocket closes, is lost; the same id may
register again later and is taken back. Job consequences go through `AgentEvents` (the job store).

Identity: an agent id is bound to a credential at its first registration (the agent brings one
from its state directory, or the controller issues one in Welcome). Later registrations of that
id must present it, and only while no other connection holds the id: a second connection is
refused, never a takeover. The database keeps the credential's SHA-256, never the credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

from aiohttp import WSCloseCode, WSMsgType, web

from infscaled.controller.config import ControllerConfig
from infscaled.controller.events import EventLog
from infscaled.controller.store import AgentRecord, Store
from infscaled.errors import InfscaledError, WireError
from infscaled.planning.offers import Offers
from infscaled.protocol.messages import (
    ErrorMsg,
    Heartbeat,
    HostMetrics,
    Inspect,
    InspectResult,
    Message,
    Metrics,
    Register,
    RunningWorker,
    Welcome,
    WorkerState,
    decode,
    encode,
)
from infscaled.protocol.typed import build as build_message

log = logging.getLogger(__name__)

CONNECTED, LOST = "connected", "lost"
CLOSED_BY_AGENT = "connection closed"
_AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DEVICE_ID = re.compile(r"^(cpu|cuda):\d+$")


class SendError(InfscaledError):
    """A message could not be delivered to an agent (not connected, closed, timed out)."""


class InspectError(InfscaledError):
    """No agent could inspect a model: none connected (status 503) or no answer in time (504)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class AgentEvents(Protocol):
    """What the job store hears from the agents' sessions."""

    async def agent_lost(self, agent_id: str, reason: str) -> None: ...

    def agent_joined(self, agent_id: str, workers: list[RunningWorker]) -> None:
        """The agent registered, listing the processes it runs (to adopt or to stop)."""
        ...

    async def worker_state(self, agent_id: str, msg: WorkerState) -> str | None:
        """Apply a worker report; returns an error text for the agent when the report is wrong."""
        ...

    def metrics(self, agent_id: str, msg: Metrics) -> str | None:
        """Keep a job's latest stats from this agent; an error text when the report is wrong."""
        ...


@dataclass
class Agent:
    info: Register
    ws: web.WebSocketResponse | None
    state: str = CONNECTED
    last_seen: float = field(default_factory=time.monotonic)
    workers: int = 0
    lost_reason: str = ""
    usage: HostMetrics | None = None  # the latest host and device usage it reported
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def id(self) -> str:
        return self.info.agent_id

    @property
    def device_ids(self) -> tuple[str, ...]:
        return tuple(d.id for d in self.info.devices)


def register_problem(msg: Register) -> str | None:
    """Why a Register cannot be accepted, or None."""
    if not _AGENT_ID.match(msg.agent_id):
        return f"agent_id {msg.agent_id!r}: 1-64 letters, digits, '_', '.', '-', starting with a letter or digit"
    if not msg.advertise.strip():
        return "advertise: the address other hosts reach this agent's workers at must not be empty"
    if len(msg.port_range) != 2 or not 1 <= msg.port_range[0] <= msg.port_range[1] <= 65535:
        return f"port_range {msg.port_range}: expected [first, last] with 1 <= first <= last <= 65535"
    ids = [d.id for d in msg.devices]
    if len(set(ids)) != len(ids):
        return f"devices: ids must be distinct, got {ids}"
    for d in msg.devices:
        if not _DEVICE_ID.match(d.id) or d.id.partition(":")[0] != d.kind:
            return f"device {d.id!r} of kind {d.kind!r}: expected 'cpu:N' of kind 'cpu' or 'cuda:N' of kind 'cuda'"
    if msg.cpu_cores < 0 or msg.ram_bytes < 0:
        return "cpu_cores and ram_bytes must be >= 0"
    return None


def credential_digest(credential: str) -> str:
    """What the database keeps of an agent's credential (the credential itself is never stored)."""
    return hashlib.sha256(credential.encode()).hexdigest()


class Registry:
    def __init__(self, cfg: ControllerConfig, store: Store | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.agents: dict[str, Agent] = {}  # registration order: placement's "given order"
        self._credentials: dict[str, str] = {}  # agent id -> credential_digest
        self._first_seen: dict[str, float] = {}
        self.events: AgentEvents | None = None
        self.event_log = EventLog()
        self._inspects: dict[str, tuple[str, asyncio.Future[InspectResult]]] = {}
        # Ids of agents whose registration, state or workers changed since the watchers'
        # last tick (controller/watch.py takes and clears it): a tick costs what changed, not the fleet.
        self.changed: set[str] = set()
        self.usage_changed: set[str] = set()  # the same for host usage alone (cheaper to pass on)
        self.forgotten = 0  # agents removed (forget) so far
        # Placement's indexes (planning/offers.py), kept as agents come and go so that placing a
        # job walks the agents it may use, not the fleet: every known agent's devices (does a job
        # fit this cluster at all?) and the connected agents' (jobs set which are busy).
        self.known = Offers()
        self.offers = Offers()
        self._positions: dict[str, int] = {}  # registration order, as numbers the indexes sort by
        self._next_position = 0
        self._last_inspector: str | None = None
        self._sweeper: asyncio.Task[None] | None = None  # runs while any agent is connected

    def restore(self, records: list[AgentRecord]) -> None:
        """Start-up: every agent the database knows, as lost until it registers again."""
        for rec in records:
            try:
                info = build_message(Register, rec.register, "register")
            except WireError as exc:
                log.error("agent %s in the database is unreadable (%s); it registers as new", rec.id, exc)
                continue
            self._credentials[rec.id] = rec.credential_sha256
            self._first_seen[rec.id] = rec.first_seen
            self.admit(Agent(info, None, LOST, lost_reason="not reconnected since the controller started"))

    def forget(self, agent_id: str) -> None:
        """Drop a disconnected agent and its credential (its id may then register anew)."""
        self.agents.pop(agent_id, None)
        self._positions.pop(agent_id, None)
        self.known.remove(agent_id)
        self.offers.remove(agent_id)
        self.changed.add(agent_id)  # watchers see it go
        self.forgotten += 1  # GET /v1/agents' index of positions is stale now
        self._credentials.pop(agent_id, None)
        self._first_seen.pop(agent_id, None)
        if self.store is not None:
            self.store.forget_agent(agent_id)
        log.info("agent %s forgotten: its id may register again with a new credential", agent_id)

    # -- queries ---------------------------------------------------------------------------------

    def admit(self, agent: Agent) -> None:
        """Add or replace an agent (a known id keeps its place in the order) and index its devices."""
        position = self._positions.get(agent.id)
        if position is None:
            position = self._positions[agent.id] = self._next_position
            self._next_position += 1
        self.agents[agent.id] = agent
        self.known.put(agent.id, position, agent.device_ids)
        if agent.state == CONNECTED:
            self.offers.put(agent.id, position, agent.device_ids)
        else:
            self.offers.remove(agent.id)
        self.changed.add(agent.id)

    def connected(self) -> list[Agent]:
        """The connected agents in registration order (walks the fleet: not for per-request paths)."""
        return [a for a in self.agents.values() if a.state == CONNECTED]

    @property
    def connected_count(self) -> int:
        return len(self.offers)

    def __iter__(self) -> Iterator[Agent]:
        return iter(list(self.agents.values()))

    # -- sending ---------------------------------------------------------------------------------

    async def send(self, agent_id: str, msg: Message) -> None:
        """Deliver one message within send_timeout_s, or raise SendError saying why not."""
        agent = self.agents.get(agent_id)
        ws = agent.ws if agent is not None else None
        if agent is None or agent.state != CONNECTED or ws is None or ws.closed:
            raise SendError(f"agent {agent_id} is not connected")
        try:
            text = encode(msg)
        except WireError as exc:
            raise SendError(f"cannot send {msg.type} to agent {agent_id}: {exc}") from None
        try:
            async with agent.send_lock, asyncio.timeout(self.cfg.send_timeout_s):
                await ws.send_str(text)
        except TimeoutError:
            raise SendError(f"sending {msg.type} to agent {agent_id} timed out after "
                            f"{self.cfg.send_timeout_s:g} s") from None
        except (ConnectionError, RuntimeError) as exc:
            raise SendError(f"sending {msg.type} to agent {agent_id} failed: {exc}") from None

    async def inspect(self, source: str) -> tuple[str, InspectResult]:
        """Ask one connected agent (in turn) to inspect `source`; returns (agent_id, result)."""
        agent_id = self.offers.first_after(self._last_inspector)  # in turn, without walking the fleet
        if agent_id is None:
            raise InspectError("no agent is connected; start an agent with this controller's address and token", 503)
        agent = self.agents[agent_id]
        self._last_inspector = agent_id
        request_id = secrets.token_hex(8)
        future: asyncio.Future[InspectResult] = asyncio.get_running_loop().create_future()
        self._inspects[request_id] = (agent.id, future)
        try:
            await self.send(agent.id, Inspect(request_id, source))
            async with asyncio.timeout(self.cfg.inspect_timeout_s):
                return agent.id, await future
        except SendError as exc:
            raise InspectError(str(exc), 503) from None
        except TimeoutError:
            raise InspectError(f"agent {agent.id} did not answer Inspect of {source!r} within "
                               f"{self.cfg.inspect_timeout_s:g} s (inspect_timeout_s)", 504) from None
        finally:
            self._inspects.pop(request_id, None)

    # -- liveness --------------------------------------------------------------------------------

    async def lose(self, agent: Agent, why: str) -> None:
        """Mark `agent` lost and fail what depended on it; its session closes the websocket."""
        if agent.state != CONNECTED:
            return
        reason = f"agent {agent.id} lost ({why})"
        agent.state, agent.lost_reason, agent.ws = LOST, reason, None
        self.offers.remove(agent.id)
        self.changed.add(agent.id)
        # The agent closing its own link is how it stops (or restarts): worth a line, not a warning.
        # Silence (no heartbeat) or a broken socket is. Either way jobs on it fail (below).
        (log.info if why == CLOSED_BY_AGENT else log.warning)("%s", reason)
        self.event_log.emit("agent_lost", reason, agent=agent.id, state=LOST)
        for agent_id, future in self._inspects.values():
            if agent_id == agent.id and not future.done():
                future.set_exception(InspectError(f"{reason} during Inspect", 503))
        if self.events is not None:
            await self.events.agent_lost(agent.id, reason)

    def _watch_liveness(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="agent-liveness")

    async def _sweep_forever(self) -> None:
        """Lose every connected agent silent for heartbeat_timeout_s, checking every tenth of it
        (at most 1 s). One timer for the fleet instead of one per received frame: at 10,000
        agents a frame then costs its read and decode, and a sweep ~1 ms. Ends when no agent is
        connected; the next registration starts it again."""
        timeout = self.cfg.heartbeat_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 10))
            now = time.monotonic()
            connected = [a for a in self.agents.values() if a.state == CONNECTED]
            if not connected:
                return
            silent = [(a, a.ws) for a in connected if now - a.last_seen > timeout]
            for agent, _ in silent:
                try:
                    await self.lose(agent, f"no heartbeat for {timeout:g} s")
                except Exception:  # noqa: BLE001 - task boundary: one failure must not stop liveness checks
                    log.exception("losing agent %s failed", agent.id)
            # Closing ends each one's session (its receive returns); in parallel, each may wait for
            # its close frame.
            await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"no heartbeat")
                                   for _, ws in silent if ws is not None and not ws.closed),
                                 return_exceptions=True)

    async def close_all(self, why: str) -> None:
        """Shutdown: close every agent's websocket without failing jobs (they were stopped first)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        sockets = [a.ws for a in self.connected() if a.ws is not None]
        events, self.events = self.events, None
        try:
            for agent in self.connected():
                await self.lose(agent, why)
        finally:
            self.events = events
        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=why.encode()[:120])
                               for ws in sockets))

    def welcome(self, agent_id: str, credential: str = "") -> Welcome:
        """The rates this controller wants; the reconnect spread grows with the fleet it knows, so
        after a restart the whole fleet registers at about cfg.reconnect_rate_per_s."""
        cfg = self.cfg
        return Welcome(agent_id, cfg.heartbeat_interval_s, cfg.heartbeat_timeout_s, credential,
                       cfg.host_metrics_interval_s, max(1.0, len(self.agents) / cfg.reconnect_rate_per_s))

    # -- one agent's session ---------------------------------------------------------------------

    async def serve(self, ws: web.WebSocketResponse, peer: str) -> None:
        """Run one agent's websocket session until it closes or the agent falls silent."""
        agent = await self._handshake(ws, peer)
        if agent is None:
            return
        why = CLOSED_BY_AGENT
        try:
            while agent.ws is ws:
                # No timeout here: the sweeper loses a silent agent and closes this socket, which
                # ends the wait. Only protocol frames count as signs of life, not websocket pings.
                frame = await ws.receive()
                if frame.type == WSMsgType.ERROR:  # e.g. a frame over max_msg_size: aiohttp closes
                    why = f"websocket error: {ws.exception()}"
                    break
                if frame.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
                if frame.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue
                agent.last_seen = time.monotonic()
                reply = await self._handle(agent, frame.data)
                if reply is not None:
                    log.warning("agent %s: %s", agent.id, reply.message)
                    await self._reply(ws, reply, agent.send_lock)
        finally:
            # Only the session that still owns the agent loses it: a re-registration may own it now.
            if agent.ws is ws:
                await self.lose(agent, why)
            if not ws.closed:
                await ws.close(code=WSCloseCode.GOING_AWAY, message=why.encode()[:120])

    async def _handshake(self, ws: web.WebSocketResponse, peer: str) -> Agent | None:
        try:
            async with asyncio.timeout(self.cfg.heartbeat_timeout_s):
                frame = await ws.receive()
        except TimeoutError:
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"no register message")
            return None
        if frame.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return None
        try:
            msg = decode(frame.data)
            problem = None if isinstance(msg, Register) else f"first message must be register, got {msg.type}"
        except WireError as exc:
            problem = f"first message must be register: {exc}"
        if problem is None:
            assert isinstance(msg, Register)
            problem = register_problem(msg)
        if problem is not None:
            log.warning("agent connection from %s refused: %s", peer, problem)
            await self._reply(ws, ErrorMsg(problem, "register"))
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"register refused")
            return None
        assert isinstance(msg, Register)
        problem = self._identity_problem(msg)
        if problem is not None:
            log.warning("agent connection from %s refused: %s", peer, problem)
            await self._reply(ws, ErrorMsg(problem, "register"))
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"register refused")
            return None
        self._watch_liveness()
        issued = "" if msg.credential else secrets.token_urlsafe(32)
        agent = self._register(msg, ws, peer, msg.credential or issued)
        await self._reply(ws, self.welcome(msg.agent_id, issued))
        self.changed.add(agent.id)
        devices = ", ".join(agent.device_ids) or "no devices"
        self.event_log.emit("agent_joined", f"agent {agent.id} ({msg.host}) joined with {devices}", agent=agent.id,
                            state=CONNECTED)
        if self.events is not None:
            self.events.agent_joined(agent.id, msg.workers)
        return agent

    def _identity_problem(self, msg: Register) -> str | None:
        """Why this Register may not take its agent id: an id bound to a credential belongs to the
        agent holding it, and even that agent gets one connection at a time (never a takeover)."""
        known = self._credentials.get(msg.agent_id)
        if known is None:
            return None  # a new id: bound to the credential it brings, or to one issued now
        if not msg.credential or not hmac.compare_digest(credential_digest(msg.credential), known):
            return (f"agent id {msg.agent_id!r} is taken: it was registered with a credential this agent does not "
                    f"present (kept in the agent's state directory); start this agent with another --id, or, if "
                    f"that agent is gone for good, remove it with DELETE /v1/agents/{msg.agent_id}")
        old = self.agents.get(msg.agent_id)
        if old is not None and old.state == CONNECTED:
            return (f"agent {msg.agent_id!r} is already connected; a second connection with its id is refused "
                    f"(a dead connection is dropped after {self.cfg.heartbeat_timeout_s:g} s without heartbeat)")
        return None

    def _register(self, msg: Register, ws: web.WebSocketResponse, peer: str, credential: str) -> Agent:
        old = self.agents.get(msg.agent_id)
        now = time.time()
        digest = credential_digest(credential)
        self._credentials[msg.agent_id] = digest
        first_seen = self._first_seen.setdefault(msg.agent_id, now)
        if self.store is not None:
            # The credential itself and the worker list are not kept: a digest, and the jobs table.
            kept = asdict(replace(msg, credential="", workers=[]))
            self.store.save_agent(AgentRecord(msg.agent_id, digest, kept, first_seen, now))
        agent = Agent(replace(msg, credential="", workers=[]), ws)
        if old is not None:
            log.info("agent %s (%s) reconnected from %s", msg.agent_id, msg.host, peer)
        else:
            log.info("agent %s (%s) registered from %s: %s", msg.agent_id, msg.host, peer,
                     ", ".join(agent.device_ids) or "no devices")
        self.admit(agent)  # a re-registration keeps the agent's place in the order
        return agent

    async def _handle(self, agent: Agent, data: str | bytes) -> ErrorMsg | None:
        try:
            msg = decode(data)
        except WireError as exc:
            return ErrorMsg(str(exc))
        if isinstance(msg, Heartbeat):
            if msg.agent_id != agent.id:
                return ErrorMsg(f"heartbeat names agent {msg.agent_id!r}, this connection is {agent.id!r}", msg.type)
            if msg.workers != agent.workers:
                agent.workers = msg.workers
                self.changed.add(agent.id)
            return None  # beyond that, a heartbeat is only the timestamp serve() already took
        if isinstance(msg, WorkerState):
            problem = await self.events.worker_state(agent.id, msg) if self.events is not None else None
            return ErrorMsg(problem, msg.type) if problem else None
        if isinstance(msg, Metrics):
            problem = self.events.metrics(agent.id, msg) if self.events is not None else None
            return ErrorMsg(problem, msg.type) if problem else None
        if isinstance(msg, HostMetrics):
            if msg.agent_id != agent.id:
                return ErrorMsg(f"host_metrics names agent {msg.agent_id!r}, this connection is {agent.id!r}",
                                msg.type)
            agent.usage = msg
            self.usage_changed.add(agent.id)
            return None
        if isinstance(msg, InspectResult):
            pending = self._inspects.get(msg.request_id)
            if pending is None or pending[0] != agent.id:
                log.info("agent %s: ignoring InspectResult %s nobody waits for", agent.id, msg.request_id)
            elif not pending[1].done():
                pending[1].set_result(msg)
            return None
        if isinstance(msg, ErrorMsg):
            log.warning("agent %s reports an error (in reply to %r): %s", agent.id, msg.in_reply_to, msg.message)
            return None
        if isinstance(msg, Register):
            return ErrorMsg(f"this connection is already registered as {agent.id!r}", msg.type)
        return ErrorMsg(f"{msg.type} is a controller -> agent message; an agent may send "
                        "heartbeat, worker_state, inspect_result, metrics, host_metrics, error", msg.type)

    async def _reply(self, ws: web.WebSocketResponse, msg: Message, lock: asyncio.Lock | None = None) -> None:
        try:
            async with lock or asyncio.Lock(), asyncio.timeout(self.cfg.send_timeout_s):
                await ws.send_str(encode(msg))
        except (TimeoutError, ConnectionError, RuntimeError) as exc:
            log.info("could not answer an agent (%s): %s", msg.type, exc)
