"""The engine: one node of the data plane (a stage replica or the dispatcher) over live edges.

Every node runs the same engine; what it computes is its `Program` (engine/program.py):
forward micro-batches, generation prefill and decode (engine/programs/), or a dispatcher front
end (dispatch/). The engine owns the edges and the threads; the program owns the work.

Threads (one engine):
- the *compute* thread (the caller of `run`): the only one that calls the program (except
  `Program.acked`, see below) and changes edge states. It takes events from one unbounded
  inbox: messages that arrived, inputs that stopped, outputs that closed, edges that connected
  or broke, topology updates and local items (a dispatcher's submissions), and calls
  `Program.poll` between events for timed work (batching deadlines, decode scheduling,
  timeouts).
- per in-edge, a *receiver*: blocks in `Edge.recv`, stages the message (CUDA: onto the device)
  and posts it; a STOP ends it.
- per out-edge, a *sender* draining that edge's own FIFO outbox (so one slow peer never holds
  another edge's messages), and an *ack reader* that keeps the router's view of the peer true
  (`Program.acked`, thread-safe by contract) until STOP_ACK.
- per edge being added, a *connector* (joining an edge blocks until the peer joins too).
Queues are unbounded: what can be in flight is capped where work enters (the dispatcher's
max_inflight, a generation chain's micro_batches_in_flight), and a bounded queue inside a
generation loop could deadlock.

Acks: a receiver's program acknowledges each message after computing it (`ack`), from any
thread, one at a time per edge; STOP is acknowledged after everything before it (`ack_stop`).

Ending: a program calls `close_outputs()` when it will send nothing more (a stage: once all
its inputs stopped; a dispatcher: once drained); the engine queues STOP behind each output's
last message, and `run` returns once every edge, in and out, is closed. Topology updates follow
protocol/topology.py. A broken edge is handed to `Program.on_broken`: by default it breaks that edge only (its
peer died, or sent garbage); the node keeps serving on its other edges, and what was queued on
the broken one is lost here and replayed by the dispatcher (dispatch/core.py).

CUDA stages (Program.cuda_streams): the engine owns the data-plane streams (engine/cuda.py):
receivers stage gloo inputs (the tensors `Program.staged` picks) into device buffers on their own
stream, NCCL inputs land in pool buffers; senders wait for a message's `ready` event on the host
(the peer's receive kernel must not spin for a whole compute time) and copy to pinned host memory
for gloo outputs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from infscaled.engine.edges import STOP_MARK, EdgeEnd, EdgeState, StopMarker
from infscaled.errors import InfscaledError, TransportError
from infscaled.protocol.control import EdgeRate, StageStats
from infscaled.protocol.plan import EdgePlan, Node
from infscaled.protocol.topology import TopologyUpdate
from infscaled.protocol.window import EventWindow, NullWindow, mean, rate, span
from infscaled.protocol.wire import STOP

if TYPE_CHECKING:
    from infscaled.engine.program import Program
    from infscaled.worker.transport import Ack, Connector, Edge, Message, Transport

log = logging.getLogger(__name__)

REQUESTS_KEY = "requests"  # every message's request table [n, 2] (id, rows): what stats count
LINGER_S = 5.0  # an in-edge stays open this long after acknowledging STOP (see ack_stop)


@dataclass(frozen=True)
class EngineSettings:
    """How a node joins and keeps its edges."""

    bind_host: str
    """The address this node's edge stores and gloo sockets bind to."""
    connect_timeout_s: float = 300.0
    """Joining an edge waits for the peer, which may still be building its stage."""
    edge_timeout_s: float = 60.0
    """A send on an open edge fails when the peer has not taken it within this time."""
    stats_interval_s: float = 1.0
    measure: bool = True
    """False: no live-metrics bookkeeping (INFSCALED_METRICS=off)."""


# -- inbox events ----------------------------------------------------------------------------------


@dataclass
class _Inbound:
    end: EdgeEnd
    msg: Message


@dataclass
class _InputStopped:
    end: EdgeEnd


@dataclass
class _OutputClosed:
    end: EdgeEnd


@dataclass
class _Connected:
    end: EdgeEnd
    edge: Edge


@dataclass
class _Broken:
    end: EdgeEnd
    error: BaseException


@dataclass
class _Local:
    item: object


@dataclass
class _Topology:
    update: TopologyUpdate


class _Wake:
    pass


Event = _Inbound | _InputStopped | _OutputClosed | _Connected | _Broken | _Local | _Topology | _Wake

TransportFor = Callable[[EdgePlan], "type[Transport] | Connector"]


class Engine:
    def __init__(self, node: Node, program: Program, settings: EngineSettings, transport_for: TransportFor,
                 device: str = "cpu", on_stats: Callable[[StageStats], None] | None = None) -> None:
        self.node = node
        self.program = program
        self.settings = settings
        self.transport_for = transport_for
        self.device = device
        self.on_stats = on_stats
        self.epoch = 0
        self.ends: dict[str, EdgeEnd] = {}
        self._inbox: queue.Queue[Event] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._closing_outputs = False
        self._done = False
        # Stats: written by the compute (or a completion) thread and receivers, read by stats().
        window = EventWindow if settings.measure else NullWindow
        self._computed = window()  # (t, samples, compute_s)
        self._received = window()  # (t, recv_wait_s, edge key hash, samples)
        self._sent = window()  # (t, send_s)
        self.micro_batches = 0
        self.samples = 0
        self.broken_edges = 0
        self.dropped = 0  # messages computed with no live out-edge left to carry them (replayed upstream)
        self.busy_s = 0.0
        self.first_at: float | None = None
        self._in_flight = 0  # messages received and not yet passed on (the program may say otherwise)
        self._flight_lock = threading.Lock()
        self._lingering: list[tuple[float, EdgeEnd]] = []  # in-edges acknowledged STOP: closed later
        self._linger_lock = threading.Lock()
        self.cuda: Any = None  # engine.cuda.CudaStreams on a CUDA stage whose program wants them
        self._joining: set[str] = set()  # join(): edge keys still connecting
        self._on_joined: Callable[[], None] | None = None
        self._dead: set[Node] = set()  # declared dead by topology updates
        # Told of each broken edge (a worker tells its supervisor: worker/entry.py).
        self.on_edge_failed: Callable[[EdgeEnd, str], None] | None = None
        program.attach(self)
        if program.cuda_streams and str(device).startswith("cuda"):
            from infscaled.engine.cuda import CudaStreams

            self.cuda = CudaStreams(device, program.pool_per_key)

    # -- edges -----------------------------------------------------------------------------------

    def connect(self, plans: Iterable[EdgePlan], timeout_s: float | None = None) -> None:
        """Join `plans` now, all at once (blocks; start-up, before READY). On any failure the
        edges that did connect are closed and TransportError names every failed one."""
        from infscaled.worker.transport import connect_all

        plans = list(plans)
        edges = connect_all(plans, self.node, self.settings.bind_host,
                            self.settings.connect_timeout_s if timeout_s is None else timeout_s,
                            transport_for=self.transport_for)
        for p in plans:
            end = EdgeEnd(p, self.node, epoch=self.epoch)
            self.ends[p.key] = end
            self._opened(end, edges[p.key])

    def join(self, plans: Iterable[EdgePlan], on_joined: Callable[[], None]) -> None:
        """Join `plans` in the background (each its own connector, as a topology update's edges)
        and call `on_joined` from the compute thread once none is still connecting: a new node says
        READY from it. A peer declared dead meanwhile (TopologyUpdate.dead) no longer holds it up;
        any other failure to connect one of these edges fails the node, naming the edge."""
        self._joining = set()
        self._on_joined = on_joined
        for p in plans:
            end = EdgeEnd(p, self.node, epoch=self.epoch)
            self.ends[p.key] = end
            self._joining.add(p.key)
            self._spawn(self._connector, end, name=f"connect-{p.key}")
            if end.outgoing:
                self.program.on_output_added(end)
        self._inbox.put(_Wake())  # with no edges at all, joined at once

    def _check_joined(self) -> None:
        if self._on_joined is None:
            return
        self._joining = {k for k in self._joining if self.ends[k].state is EdgeState.CONNECTING}
        if not self._joining:
            callback, self._on_joined = self._on_joined, None
            callback()

    def update(self, update: TopologyUpdate) -> None:
        """Apply a topology update (thread-safe: it is queued for the compute thread)."""
        self._inbox.put(_Topology(update))

    def post(self, item: object) -> None:
        """Hand the program a local item (thread-safe): `Program.on_local` gets it on the compute thread."""
        self._inbox.put(_Local(item))

    def unprocessed(self) -> list[object]:
        """Once the compute loop has ended: take the local items posted that it never handled (any
        thread; each item is returned once), so their owner can fail them rather than leave them waiting."""
        items = []
        while True:
            try:
                ev = self._inbox.get_nowait()
            except queue.Empty:
                return items
            if isinstance(ev, _Local):
                items.append(ev.item)

    def wake(self) -> None:
        """Make the compute thread call `Program.poll` soon (thread-safe)."""
        self._inbox.put(_Wake())

    def inputs(self) -> list[EdgeEnd]:
        return [e for e in self.ends.values() if not e.outgoing]

    def outputs(self) -> list[EdgeEnd]:
        return [e for e in self.ends.values() if e.outgoing]

    def output_to(self, peer: Node) -> EdgeEnd | None:
        """The live out-edge to `peer` (open or still connecting), if any."""
        for e in self.ends.values():
            if e.outgoing and e.peer == peer and e.live:
                return e
        return None

    def send(self, end: EdgeEnd, msg: Message) -> None:
        """Queue `msg` on an out-edge (compute thread). An edge still connecting keeps it queued."""
        if end.state not in (EdgeState.OPEN, EdgeState.CONNECTING):
            raise InfscaledError(f"{self.node}: cannot send on edge {end.key}, it is {end.state.value}")
        end.outbox.put(msg)

    def close_output(self, end: EdgeEnd) -> None:
        """STOP behind the last message queued on `end`; the edge closes once the peer acknowledged."""
        if end.state in (EdgeState.OPEN, EdgeState.CONNECTING):
            end.state = EdgeState.CLOSING  # still connecting: the sender starts once connected, STOP is queued
            end.outbox.put(STOP_MARK)

    def close_outputs(self) -> None:
        """This node will send nothing more: close every output (idempotent)."""
        self._closing_outputs = True
        for end in self.outputs():
            self.close_output(end)

    def ack(self, end: EdgeEnd, ack: Ack) -> None:
        """Acknowledge a computed message on its in-edge (any thread; one at a time per edge). An
        ack that cannot go out means the edge broke (its sender died): reported like any break."""
        assert end.edge is not None
        if end.state is EdgeState.BROKEN:
            return  # the sender is gone; nobody waits for this ack
        try:
            with end.ack_lock:
                end.edge.send_ack(ack)
        except Exception as exc:  # noqa: BLE001 - the edge's failure, handled on the compute thread
            self._inbox.put(_Broken(end, exc))

    def ack_stop(self, end: EdgeEnd) -> None:
        """Acknowledge an in-edge's STOP (after the acks of everything before it). The sender
        closes the edge once it read the acknowledgement; this end lingers a while first: closing
        at once could reset the connection before the sender read it."""
        from infscaled.worker.transport import STOP_ACK, Ack

        self.ack(end, Ack(STOP_ACK, 0, 0, 0))
        with self._linger_lock:
            self._lingering.append((time.monotonic() + LINGER_S, end))

    # -- stats -----------------------------------------------------------------------------------

    def queued(self) -> int:
        """Events waiting for the compute thread (messages not handled yet)."""
        return self._inbox.qsize()

    def computed(self, samples: int, seconds: float) -> None:
        """Count one computed micro-batch (the compute thread, or a CUDA completion thread)."""
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.busy_s += seconds
        self.micro_batches += 1
        self.samples += samples
        self._computed.add(time.monotonic(), samples, seconds)

    def passed_on(self, count: int = 1) -> None:
        with self._flight_lock:
            self._in_flight -= count

    def stats(self) -> StageStats:
        now = time.monotonic()
        wall = now - self.first_at if self.first_at is not None else 0.0
        window_s = self._computed.window_s
        covered = span(now, self.first_at, window_s)
        computed, (samples, compute_s) = self._computed.sums(now, 2)
        arrivals = self._received.snapshot(now)
        per_edge: dict[int, float] = {}
        for e in arrivals:
            per_edge[int(e[2])] = per_edge.get(int(e[2]), 0.0) + e[3]
        sent, (send_s,) = self._sent.sums(now, 1)
        inputs = [EdgeRate(str(e.peer), rate(per_edge.get(_edge_id(e.key), 0.0), covered))
                  for e in self.inputs() if e.live]
        base = StageStats(
            str(self.node), self.micro_batches, self.samples, self.busy_s, wall, self._inbox.qsize(),
            window_s=window_s, occupancy=min(1.0, rate(compute_s, covered)), inflight=max(0, self._in_flight),
            recv_wait_s=mean(sum(e[1] for e in arrivals), len(arrivals)), compute_s=mean(compute_s, computed),
            send_s=mean(send_s, sent), samples_per_s=rate(samples, covered), inputs=inputs, epoch=self.epoch)
        return self.program.stats(base)

    # -- the compute thread ----------------------------------------------------------------------

    def run(self) -> StageStats:
        """Serve until every edge is closed; raises what the program raised (edges then close)."""
        next_stats = time.monotonic() + self.settings.stats_interval_s
        try:
            self.program.start()
            while not self._finished():
                now = time.monotonic()
                wait = self.program.poll(now)
                timeout = self.settings.stats_interval_s if wait is None else max(0.0, min(wait, 1.0))
                try:
                    event = self._inbox.get(timeout=timeout)
                except queue.Empty:
                    event = None
                if event is not None:
                    self._handle(event)
                    if self._on_joined is not None:
                        self._check_joined()
                if self._lingering:
                    self._close_lingering(time.monotonic())
                if self.on_stats is not None and time.monotonic() >= next_stats:
                    self.on_stats(self.stats())
                    next_stats = time.monotonic() + self.settings.stats_interval_s
            self.program.finish()
        except BaseException:
            self.abort()
            raise
        for t in self._threads:
            t.join(self.settings.edge_timeout_s)
        self._close_lingering(float("inf"))
        return self.stats()

    def _close_lingering(self, now: float) -> None:
        with self._linger_lock:
            due = [end for at, end in self._lingering if at <= now]
            self._lingering = [(at, end) for at, end in self._lingering if at > now]
        for end in due:
            if end.edge is not None:
                end.edge.close()

    def abort(self) -> None:
        """Close every edge now (a failure): peers' pending operations fail at once."""
        self._done = True
        self.program.finish()
        for end in self.ends.values():
            if end.edge is not None:
                end.edge.close()

    def _finished(self) -> bool:
        if self._done:
            return True
        if not self._closing_outputs:
            return False
        return all(e.state in (EdgeState.CLOSED, EdgeState.BROKEN) for e in self.ends.values())

    def _handle(self, ev: Event) -> None:
        if isinstance(ev, _Inbound):
            self.program.on_message(ev.end, ev.msg)
        elif isinstance(ev, _InputStopped):
            ev.end.state = EdgeState.CLOSED
            self.program.on_input_stopped(ev.end)
        elif isinstance(ev, _OutputClosed):
            ev.end.state = EdgeState.CLOSED
            if ev.end.edge is not None:
                ev.end.edge.close()
            self.program.on_output_closed(ev.end)
        elif isinstance(ev, _Connected):
            self._opened(ev.end, ev.edge)
        elif isinstance(ev, _Broken):
            self._broken(ev.end, ev.error)
        elif isinstance(ev, _Local):
            self.program.on_local(ev.item)
        elif isinstance(ev, _Topology):
            self._apply(ev.update)

    def _apply(self, update: TopologyUpdate) -> None:
        if update.epoch <= self.epoch:
            log.info("%s: topology epoch %d ignored (at %d already)", self.node, update.epoch, self.epoch)
            return
        self.epoch = update.epoch
        dead = frozenset(update.dead)
        self._dead |= dead
        for end in list(self.ends.values()):
            if end.peer in dead and end.state not in (EdgeState.CLOSED, EdgeState.BROKEN):
                # Whatever its socket says yet, nothing more goes to (or is awaited from) a dead node.
                # (Before the additions: a restarted dispatcher comes back under its old name.)
                self._broken(end, TransportError(f"{end.peer} was declared dead"))
        if dead:
            self.program.on_nodes_dead(dead)
        for key in update.remove:
            end = self.ends.get(key)
            if end is None or not end.outgoing:
                continue  # an in-edge goes when its sender's STOP arrives
            if end.live:
                self.program.on_output_removed(end)
        for plan in update.add:
            if plan.key in self.ends and self.ends[plan.key].live:
                continue
            if self.node not in (plan.src, plan.dst):
                raise InfscaledError(f"{self.node}: topology epoch {update.epoch} adds edge {plan.key}, "
                                     "which is not this node's")
            end = EdgeEnd(plan, self.node, epoch=self.epoch)
            self.ends[plan.key] = end
            self._spawn(self._connector, end, name=f"connect-{plan.key}")
            if end.outgoing:
                self.program.on_output_added(end)
        if update.complete is not None:
            self.program.on_complete(update.complete)
        log.info("%s: topology epoch %d applied (+%d, -%d edges, %d dead)", self.node, update.epoch,
                 len(update.add), len(update.remove), len(update.dead))

    def _opened(self, end: EdgeEnd, edge: Edge) -> None:
        edge.transport.timeout = timedelta(seconds=self.settings.edge_timeout_s)
        end.edge = edge
        if self.cuda is not None:
            self.cuda.adopt(end)
        if end.outgoing:
            if end.state is EdgeState.CONNECTING:
                end.state = EdgeState.OPEN
            self._spawn(self._sender, end, name=f"send-{end.key}")
            self._spawn(self._acks, end, name=f"ack-{end.key}")
            if end.state is EdgeState.OPEN:
                self.program.on_output_open(end)
        else:
            end.state = EdgeState.OPEN
            self._spawn(self._receiver, end, name=f"recv-{end.key}")

    def _broken(self, end: EdgeEnd, error: BaseException) -> None:
        if end.state in (EdgeState.CLOSED, EdgeState.BROKEN):
            return
        if end.outgoing and end.state is EdgeState.CLOSING and end.acked == end.sent and end.outbox.empty():
            # STOP went out and everything before it was acknowledged: the peer finished with this
            # edge and closed it before its STOP_ACK was read. Nothing is lost.
            log.info("%s: edge %s closed by its peer after its last acknowledgement (%s)", self.node, end.key, error)
            self._handle(_OutputClosed(end))
            return
        if end.key in self._joining and end.state is EdgeState.CONNECTING and end.peer not in self._dead:
            raise TransportError(f"{self.node}: edge {end.key} failed to connect: {error}") from error
        end.state = EdgeState.BROKEN
        end.error = str(error)
        if end.edge is not None:
            end.edge.close()
        self.broken_edges += 1
        self.program.on_broken(end, error)

    # -- edge threads ----------------------------------------------------------------------------

    def _spawn(self, target: Callable[[EdgeEnd], None], end: EdgeEnd, name: str) -> None:
        t = threading.Thread(target=target, args=(end,), name=f"{self.node}-{name}", daemon=True)
        self._threads.append(t)
        t.start()

    def _connector(self, end: EdgeEnd) -> None:
        from infscaled.worker.transport import Edge

        try:
            edge = Edge.connect(end.plan, self.node, self.settings.bind_host, self.settings.connect_timeout_s,
                                self.transport_for(end.plan))
        except BaseException as exc:  # noqa: BLE001 - thread boundary: the compute thread decides
            self._inbox.put(_Broken(end, exc))
            return
        self._inbox.put(_Connected(end, edge))

    def _receiver(self, end: EdgeEnd) -> None:
        edge = end.edge
        assert edge is not None
        key_id = _edge_id(end.key)
        try:
            while True:
                waited = time.monotonic()
                msg = edge.recv()
                if msg.kind == STOP:
                    self._inbox.put(_InputStopped(end))
                    return
                if self.cuda is not None and not edge.device_channel:
                    msg = self.cuda.to_device(msg, end, self.program.staged)
                now = time.monotonic()
                table = msg.tensors.get(REQUESTS_KEY)
                samples = int(table[:, 1].sum()) if table is not None and table.numel() else 0
                self._received.add(now, now - waited, key_id, samples)
                with self._flight_lock:
                    self._in_flight += 1
                self._inbox.put(_Inbound(end, msg))
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            self._inbox.put(_Broken(end, exc))

    def _sender(self, end: EdgeEnd) -> None:
        from infscaled.worker.transport import Message

        edge = end.edge
        assert edge is not None
        try:
            while True:
                item = end.outbox.get()
                if isinstance(item, StopMarker):
                    edge.send(Message(STOP, 0, 0, {}))
                    return
                started = time.monotonic()
                if self.cuda is not None:
                    item = self.cuda.before_send(item, end)
                edge.send(item)
                end.sent += 1
                self._sent.add(time.monotonic(), time.monotonic() - started)
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            self._inbox.put(_Broken(end, exc))

    def _acks(self, end: EdgeEnd) -> None:
        from infscaled.worker.transport import STOP_ACK

        edge = end.edge
        assert edge is not None
        try:
            while True:
                ack = edge.recv_ack()
                if ack.kind == STOP_ACK:
                    self._inbox.put(_OutputClosed(end))
                    return
                end.acked += 1
                self.program.acked(end, ack)
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            self._inbox.put(_Broken(end, exc))


def _edge_id(key: str) -> int:
    return hash(key) & 0x7FFFFFFF


