"""Spawn and supervise the processes of one job on this host (no torch here).

`WorkerGroup` is the one supervisor behind both `infscaled run` (LocalJob, plain threads) and
the agent daemon (asyncio: its callbacks hop onto the loop with `call_soon_threadsafe`).
Every member is a process speaking the control-pipe protocol (`protocol/control.py`):
READY once serving, stats now and then, DONE after a clean drain, FAILED with its reason
before a non-zero exit. Stage workers (`worker.entry.worker_main`) and the dispatcher service
(`worker.service.dispatcher_main`) both qualify.

Members start as forks of this process's warm fork server (worker/start.py: torch and the stage
code imported once; spawned where there is none). Threads: start() runs in the caller's thread
(with spawn, a member's PR_SET_PDEATHSIG is tied to the thread that spawned it, so that thread
must live as long as the group: the main thread or an event loop's thread, never a pool thread).
One *supervisor* thread then waits on every
control pipe and process sentinel and calls the callbacks:

    on_ready(node, WorkerReady)      the member said READY
    on_stats(node, StageStats)       a periodic or final stats report (DispatcherStats from the
                                     dispatcher service)
    on_exit(node, exitcode, reason)  the member is gone; reason is "" for an expected exit
                                     (DONE and code 0, or stopped by stop() without a
                                     complaint), else why, naming node, pid, code, last words

A member that is not READY within `ready_timeout_s` is terminated with that reason. With a
`heartbeat_timeout_s`, a READY member (its heartbeats, control.Heartbeat, come from a thread of
its own) that stays silent that long is declared dead: SIGKILLed (which works on a stopped
process too, and makes its sockets fail at its peers at once) and reported as an unexpected exit
with that reason. `tolerate_exits` (set by a supervisor that recovers) keeps an unexpected exit
from becoming the group's `failure`; the callback still gets the reason. `retire(node)` stops
one member on purpose (its exit is expected). stop()
blocks (run it in a thread from asyncio): ask the `first` members (the dispatcher) to drain,
wait for everyone to finish, then SIGTERM, then SIGKILL; it never returns with a live member.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from infscaled.protocol import control
from infscaled.protocol.plan import Node
from infscaled.worker.start import member_args, member_context, member_main

log = logging.getLogger(__name__)

# After SIGTERM, how long a member gets before SIGKILL; and how long a reap may take after that.
TERM_GRACE_S = 5.0
KILL_WAIT_S = 5.0

OnReady = Callable[[Node, control.WorkerReady], None]
OnStats = Callable[[Node, "control.StageStats | control.DispatcherStats"], None]
OnExit = Callable[[Node, "int | None", str], None]


@dataclass(frozen=True)
class Member:
    """One process to start: `target(spec, conn)` runs in the child (spec and target picklable)."""

    node: Node
    target: Callable[[Any, Connection], None]
    spec: Any


@dataclass
class WorkerHandle:
    """What the supervisor knows about one member."""

    node: Node
    process: BaseProcess
    conn: Connection
    ready: control.WorkerReady | None = None
    stats: control.StageStats | None = None
    done: bool = False
    failure: str | None = None  # the member's own last words (WorkerFailed), or the supervisor's
    exited: bool = False  # reaped by the supervisor; `exitcode` is then final
    exitcode: int | None = None
    ready_deadline: float = float("inf")  # monotonic: terminated if not READY by then
    last_beat: float | None = None  # monotonic: when it last said anything (None: nothing yet)
    retiring: bool = False  # stopped on purpose (retire): its exit is expected
    epoch: int = 0  # the topology epoch of the plan it was started with


def describe(node: Node) -> str:
    return "dispatcher" if node.is_dispatcher else f"worker {node}"


class WorkerGroup:
    def __init__(self, name: str, members: Sequence[Member], ready_timeout_s: float = 300.0, *,
                 on_ready: OnReady | None = None, on_stats: OnStats | None = None,
                 on_exit: OnExit | None = None, heartbeat_timeout_s: float | None = None) -> None:
        self.name = name
        self.members = list(members)
        self.ready_timeout_s = ready_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.tolerate_exits = False
        self.handles: dict[Node, WorkerHandle] = {}
        self.failure: str | None = None  # the first unexpected exit, with its reason
        self._on_ready, self._on_stats, self._on_exit = on_ready, on_stats, on_exit
        self._changed = threading.Condition()
        self._supervisor: threading.Thread | None = None
        self._closing = False
        self._stopped = False
        self._stop_done = threading.Event()
        self._send_lock = threading.Lock()
        self._spawner: threading.Thread | None = None
        self._spawn_q: queue.Queue[tuple[Member, Future[None]] | None] = queue.Queue()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn every member (in this thread: see the module docstring) and start supervising."""
        self._wake_r, self._wake_w = member_context().Pipe(duplex=False)
        try:
            for m in self.members:
                self._spawn(m)
        finally:
            # Even a partial start is supervised, so stop() reaps what did start.
            self._supervisor = threading.Thread(target=self._supervise, name=f"supervisor-{self.name}",
                                                daemon=True)
            self._supervisor.start()

    def add(self, member: Member) -> None:
        """Spawn one more member while the group runs (from any thread: the group's own spawner
        thread, which lives until every member was reaped, starts it, so its PR_SET_PDEATHSIG
        never fires early); its node must be new to the group (replica ids are never reused), or
        have exited (the dispatcher service restarted after its loss)."""
        with self._changed:
            if self._closing:
                raise RuntimeError(f"{self.name}: stopping; no new members")
            if member.node in self.handles and not self.handles[member.node].exited:
                raise ValueError(f"{self.name}: {describe(member.node)} is already a member")
            if self._spawner is None:
                self._spawner = threading.Thread(target=self._spawn_loop, name=f"spawner-{self.name}", daemon=True)
                self._spawner.start()
        self.members.append(member)
        done: Future[None] = Future()
        self._spawn_q.put((member, done))
        done.result()
        self._wake_w.send_bytes(b"+")

    def _spawn_loop(self) -> None:
        while (item := self._spawn_q.get()) is not None:
            member, done = item
            try:
                self._spawn(member)
                done.set_result(None)
            except BaseException as exc:  # noqa: BLE001 - thread boundary: add() raises it
                done.set_exception(exc)

    def _spawn(self, m: Member) -> None:
        ctx = member_context()  # forks of a warm server where there is one (worker/start.py)
        parent, child = ctx.Pipe(duplex=True)
        name = "dispatcher" if m.node.is_dispatcher else str(m.node)
        proc = ctx.Process(target=member_main, args=member_args(m.target, name, m.spec, child),
                           name=f"infscaled-{self.name}-{m.node}", daemon=False)
        proc.start()
        child.close()
        with self._changed:
            plan = getattr(m.spec, "plan", None)  # WorkerSpec and ServiceSpec carry their JobPlan
            self.handles[m.node] = WorkerHandle(m.node, proc, parent,
                                                ready_deadline=time.monotonic() + self.ready_timeout_s,
                                                epoch=getattr(plan, "epoch", 0))
            self._changed.notify_all()

    def retire(self, node: Node, reason: str) -> None:
        """Stop one member on purpose (e.g. the survivors of a generation chain that lost a
        member): StopWorker, and its exit counts as expected."""
        h = self.handles[node]
        with self._changed:
            if h.exited:
                return
            h.retiring = True
        try:
            self.send(node, control.StopWorker(reason))
        except OSError:
            pass  # already gone: its sentinel tells the supervisor

    def send(self, node: Node, msg: control.ControlMessage) -> None:
        """A control message to one member (e.g. a topology update); OSError if it is gone."""
        h = self.handles[node]
        with self._send_lock:
            h.conn.send_bytes(control.encode(msg))

    def wait_nodes_ready(self, nodes: Iterable[Node], timeout_s: float) -> bool:
        """Block until the given members are READY (True), or one of them exited / timeout (False)."""
        wanted = list(nodes)
        with self._changed:
            return self._changed.wait_for(
                lambda: all(self.handles[n].ready for n in wanted) or any(self.handles[n].exited for n in wanted),
                timeout_s) and all(self.handles[n].ready for n in wanted)

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until every member is READY (True), or one failed / the group stops / timeout (False)."""
        deadline = time.monotonic() + (self.ready_timeout_s + TERM_GRACE_S if timeout_s is None else timeout_s)
        with self._changed:
            while self.failure is None and not self._closing:
                if self.handles and all(h.ready for h in self.handles.values()):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return False

    def wait_failure(self, timeout_s: float) -> str | None:
        """The group's failure, waiting up to `timeout_s` for one to be known."""
        with self._changed:
            self._changed.wait_for(lambda: self.failure is not None, timeout=timeout_s)
            return self.failure

    def wait_exited(self, nodes: Iterable[Node] | None = None, timeout_s: float | None = None) -> bool:
        """Block until the given members (default: all) were reaped; False on timeout."""
        handles = list(self.handles.values()) if nodes is None else [self.handles[n] for n in nodes]
        with self._changed:
            return self._changed.wait_for(lambda: all(h.exited for h in handles), timeout_s)

    def alive(self) -> int:
        return sum(1 for h in self.handles.values() if not h.exited)

    @property
    def all_exited(self) -> bool:
        return all(h.exited for h in self.handles.values())

    def stop(self, grace_s: float = 10.0, first: Iterable[Node] = (), reason: str = "") -> None:
        """Stop every member; blocking and idempotent. `first` members get StopWorker (they drain
        and exit 0) and up to `grace_s` to go; then everyone else gets up to `grace_s` to finish
        (stage workers end after STOP on the data plane); then SIGTERM; then SIGKILL."""
        with self._changed:
            if self._stopped:
                already = True
            else:
                already, self._stopped, self._closing = False, True, True
                self._changed.notify_all()
        if not already:
            try:
                self._wake_w.send_bytes(b"stop")
            except (OSError, AttributeError):
                pass
        if already:  # another thread is stopping the group: return once it is done
            self._stop_done.wait()
            return
        try:
            self._stop(grace_s, first, reason)
        finally:
            self._stop_done.set()

    def _stop(self, grace_s: float, first: Iterable[Node], reason: str) -> None:
        # Only the supervisor reaps (waitpid from two threads loses exit codes), so this thread
        # waits on its reports and signals members it has not reaped yet.
        first = [n for n in first if n in self.handles]
        for node in first:
            h = self.handles[node]
            if not h.exited:
                try:
                    h.conn.send_bytes(control.encode(control.StopWorker(reason or "stop")))
                except OSError:
                    pass  # it is already gone; its sentinel tells the supervisor
        self.wait_exited(first, grace_s)
        self.wait_exited(None, grace_s)
        for h in self.handles.values():
            if not h.exited:
                log.warning("%s %s: still running after %g s; SIGTERM", self.name, describe(h.node), grace_s)
                h.process.terminate()
        self.wait_exited(None, TERM_GRACE_S)
        for h in self.handles.values():
            if not h.exited:
                log.warning("%s %s: ignored SIGTERM; SIGKILL", self.name, describe(h.node))
                h.process.kill()
        if not self.wait_exited(None, KILL_WAIT_S):  # pragma: no cover - the supervisor itself is stuck
            for h in self.handles.values():
                h.process.join(KILL_WAIT_S)
        if self._supervisor is not None:
            # Every member was reaped, so the supervisor is delivering its last on_exit calls.
            self._supervisor.join(KILL_WAIT_S)
        for h in self.handles.values():
            h.conn.close()
        if hasattr(self, "_wake_w"):
            self._wake_w.close()
        if self._spawner is not None:  # every member was reaped: its children's parent thread may end
            self._spawn_q.put(None)
            self._spawner.join(KILL_WAIT_S)

    # -- supervision (its own thread) ------------------------------------------------------------

    def _supervise(self) -> None:
        # Handles already watched, by identity (a restarted dispatcher comes back under its old name).
        # The handle is kept, not just its id(): a dead handle freed could lend its id to a new one,
        # which would then never be watched (a restarted dispatcher stuck "starting": found by chaos).
        seen: dict[int, WorkerHandle] = {}
        live_conns: dict[Any, WorkerHandle] = {}
        live_sentinels: dict[Any, WorkerHandle] = {}
        while True:
            with self._changed:
                for h in self.handles.values():  # members added while running
                    if id(h) not in seen:
                        seen[id(h)] = h
                        live_conns[h.conn] = h
                        live_sentinels[h.process.sentinel] = h
            if not live_sentinels and (self._closing or not self.members):
                return
            waiting = [h.ready_deadline for h in live_sentinels.values() if h.ready is None and not self._closing]
            waiting += self._beat_deadlines(live_sentinels.values())
            timeout = max(0.0, min(waiting) - time.monotonic()) if waiting else None
            ready = wait([self._wake_r, *live_conns, *live_sentinels], timeout)
            if not ready:
                self._ready_timed_out()
                self._silent()
            for obj in ready:
                if obj is self._wake_r:
                    try:
                        self._wake_r.recv_bytes()
                    except (EOFError, OSError):
                        pass
                elif obj in live_conns:
                    h = live_conns[obj]
                    try:
                        self._on_message(h, control.decode(h.conn.recv_bytes()))
                    except (EOFError, OSError):
                        live_conns.pop(obj, None)
                elif obj in live_sentinels:
                    h = live_sentinels.pop(obj)
                    self._drain(h)
                    live_conns.pop(h.conn, None)
                    self._exited(h)

    def _ready_timed_out(self) -> None:
        now = time.monotonic()
        for h in list(self.handles.values()):
            if h.ready is None and not h.exited and now >= h.ready_deadline:
                h.ready_deadline = float("inf")
                h.failure = h.failure or f"not ready within {self.ready_timeout_s:g} s"
                log.error("%s %s: %s; terminating it", self.name, describe(h.node), h.failure)
                h.process.terminate()

    def _beat_deadlines(self, handles: Iterable[WorkerHandle]) -> list[float]:
        if self.heartbeat_timeout_s is None:
            return []
        return [h.last_beat + self.heartbeat_timeout_s for h in handles
                if h.last_beat is not None and h.ready is not None and not h.exited and not h.retiring]

    def _silent(self) -> None:
        """Kill members whose heartbeat stopped (a hung or stopped process never exits by itself)."""
        if self.heartbeat_timeout_s is None:
            return
        now = time.monotonic()
        for h in list(self.handles.values()):
            # Only once READY: building a stage may hold the GIL for seconds (importing torch), and a
            # member that hangs before READY meets the ready timeout instead.
            if (h.last_beat is None or h.ready is None or h.exited or h.retiring
                    or now < h.last_beat + self.heartbeat_timeout_s):
                continue
            silent = now - h.last_beat
            h.last_beat = None  # judged once; the kill makes it exit
            h.failure = f"unresponsive: no heartbeat for {silent:.1f} s (hung or stopped); killed"
            log.error("%s %s (pid %s): %s", self.name, describe(h.node), h.process.pid, h.failure)
            h.process.kill()

    def _edge_failed(self, msg: control.EdgeFailed) -> None:
        """A member's edge to another member broke: if that peer is still running (hung: it stopped
        taking messages), kill it, so its loss is handled like any death (replay, replacement)."""
        try:
            peer = self.handles.get(Node.parse(msg.peer))
        except ValueError:
            return
        if peer is None or peer.exited or peer.retiring or self._closing or peer.failure is not None:
            return
        if msg.epoch < peer.epoch:
            return  # an edge to the process this one replaced (a restarted dispatcher keeps its name)
        if not peer.process.is_alive():
            return  # it died by itself: its sentinel reports it
        peer.failure = f"unresponsive on edge {msg.edge} ({msg.reason}); killed"
        log.error("%s %s (pid %s): %s", self.name, describe(peer.node), peer.process.pid, peer.failure)
        peer.process.kill()

    def _drain(self, h: WorkerHandle) -> None:
        """Read what an exited member said last (its failure reason) before judging the exit."""
        try:
            while h.conn.poll():
                self._on_message(h, control.decode(h.conn.recv_bytes()))
        except (EOFError, OSError):
            pass

    def _on_message(self, h: WorkerHandle, msg: control.ControlMessage) -> None:
        if isinstance(msg, control.Heartbeat):
            if h.failure is None:  # a member already judged dead stays dead
                h.last_beat = time.monotonic()
            return
        if isinstance(msg, control.EdgeFailed):
            self._edge_failed(msg)
            return
        with self._changed:
            if isinstance(msg, control.WorkerReady):
                h.ready = msg
            elif isinstance(msg, control.WorkerStatsReport):
                h.stats = msg.stats
            elif isinstance(msg, control.WorkerDone):
                h.stats, h.done = msg.stats, True
            elif isinstance(msg, control.WorkerFailed):
                h.failure = msg.reason
            self._changed.notify_all()
        if isinstance(msg, control.WorkerReady) and self._on_ready is not None:
            self._call(self._on_ready, h.node, msg)
        elif (isinstance(msg, control.WorkerStatsReport | control.WorkerDone | control.DispatcherStatsReport)
              and self._on_stats is not None):
            self._call(self._on_stats, h.node, msg.stats)

    def _exited(self, h: WorkerHandle) -> None:
        h.process.join(KILL_WAIT_S)  # the sentinel fired: reap it so the exit code is known
        code = h.process.exitcode
        reason = ""
        if not (h.done and code == 0) and not (self._closing and h.failure is None) and not h.retiring:
            reason = f"{describe(h.node)} (pid {h.process.pid}) exited with code {code}"
            if h.failure:
                reason += f": {h.failure}"
        with self._changed:
            h.exited, h.exitcode = True, code
            if reason and self.failure is None and not self.tolerate_exits:
                self.failure = reason
            self._changed.notify_all()
        if reason:
            log.error("%s: %s", self.name, reason)
        if self._on_exit is not None:
            self._call(self._on_exit, h.node, code, reason)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        # A failing callback must not end supervision: the remaining members still need reaping.
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - thread boundary: log and keep supervising
            log.exception("%s: callback %s failed", self.name, getattr(callback, "__name__", callback))
