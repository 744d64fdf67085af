"""The dispatcher core: a front end is the dispatcher node's engine program (engine/core.py).

Work enters through thread-safe calls (an HTTP handler, a workload thread): they validate what
can be validated at once, then post the item to the engine's compute thread, which alone
admits, batches, routes, collects and answers. Everything in flight is in the `Journal`: what
was sent, on which route, with its inputs, until it is answered exactly once.

Two front ends share this core: forward batching (dispatch/batching.py) and generation
sequences (dispatch/sequences.py).

Recovery (issue 12; `recovery` on): a broken edge is that edge only. The journal is what makes
a lost node survivable: when the supervisor declares a node dead (TopologyUpdate.dead), or one
of the dispatcher's own edges breaks, the front end replays what may have crossed it on the
surviving paths (`replay_due`: after REPLAY_GRACE_S, so that the neighbours of a dead node have
dropped their edges to it first); an answer that arrives late for work already answered is
dropped (counted as a duplicate), so every caller gets exactly one answer. While
`complete` is False (a stage, or every chain, has no live replica) nothing is sent: work waits
in the queue (bounded by its timeout) and is replayed once a replacement joins. With recovery
off, a broken edge fails everything as before.

Life cycle: `start` runs the engine in its own thread; `close` stops admitting, lets the front
end drain (it closes its outputs once nothing is in flight: STOP flows down the pipeline and
comes back from the last stage), and waits for the engine to end; `fail` answers everything
queued or in flight with the reason and stops the engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from infscaled.engine.edges import EdgeEnd
from infscaled.engine.program import Program
from infscaled.protocol.plan import Node
from infscaled.worker.router import Router

log = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT_CHECK_S = 0.5  # how often deadlines of queued and in-flight work are checked
# A dead node's neighbours see their sockets fail within milliseconds of its death, before its
# supervisor has reaped it and told the dispatcher; replaying this much later keeps the replay
# off the dead node's edges without relying on that race.
REPLAY_GRACE_S = 0.1


@dataclass
class Entry(Generic[T]):
    """One unit of work in flight: what was sent (with the inputs to send again), where, when."""

    key: int  # micro-batch id or sequence id
    work: T
    route: str  # the out-edge it went on
    sent_at: float


class Journal(Generic[T]):
    """What is in flight, by key (compute thread only)."""

    def __init__(self) -> None:
        self._entries: dict[int, Entry[T]] = {}

    def add(self, key: int, work: T, route: str) -> Entry[T]:
        entry = Entry(key, work, route, time.monotonic())
        self._entries[key] = entry
        return entry

    def pop(self, key: int) -> Entry[T] | None:
        return self._entries.pop(key, None)

    def get(self, key: int) -> Entry[T] | None:
        return self._entries.get(key)

    def on_route(self, route: str) -> list[Entry[T]]:
        return [e for e in self._entries.values() if e.route == route]

    def clear(self) -> list[Entry[T]]:
        entries = list(self._entries.values())
        self._entries.clear()
        return entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(list(self._entries.values()))


@dataclass
class _Close:
    pass


@dataclass
class _Fail:
    reason: str


class FrontEnd(Program):
    """The shared part of both front ends: failure, closing, the engine thread."""

    def __init__(self, router: Router | None, on_broken: Callable[[str], None] | None = None,
                 recovery: bool = False) -> None:
        super().__init__(router)
        self.recovery = recovery
        self.complete = True  # every stage (generation: a chain) has a live replica (compute thread)
        self.replay_due: float | None = None  # when to replay what is in flight (compute thread)
        self.replayed = 0  # requests (sequences) sent again after a failure
        self.duplicates = 0  # answers dropped because their work had been answered already
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._closing = False  # no new work (any thread reads it)
        self._draining = False  # compute thread: close requested, finish what is in flight
        self._outputs_closed = False
        self._ended = threading.Event()
        self._stopped = threading.Event()  # the engine's loop is over: nothing posted is handled any more
        self._thread: threading.Thread | None = None
        self.engine_error: BaseException | None = None
        # Called (in its own thread) when an edge breaks. The supervisor usually knows the first
        # cause (which worker died, and how) a moment later, so it may wait for that before failing.
        self._on_broken = on_broken or self.fail

    # -- any thread ------------------------------------------------------------------------------

    def run_engine(self) -> None:
        """Run the engine (already connected) in a thread of its own."""
        def run() -> None:
            try:
                self.engine.run()
            except BaseException as exc:  # noqa: BLE001 - thread boundary: kept for close()/failure
                self.engine_error = exc
                if self._failure is None:
                    self._set_failure(f"dispatcher failed: {type(exc).__name__}: {exc}")
            finally:
                self._ended.set()

        self._thread = threading.Thread(target=run, name="dispatcher-engine", daemon=True)
        self._thread.start()

    @property
    def failure(self) -> str | None:
        return self._failure

    def finish(self) -> None:
        """The engine's loop is over, or ends now (a failure aborts it): see fail_unprocessed."""
        self._stopped.set()
        self.fail_unprocessed()

    def posted(self) -> None:
        """A submitter posted work: if the loop is over already, fail it (see fail_unprocessed)."""
        if self._stopped.is_set():
            self.fail_unprocessed()

    def fail_unprocessed(self) -> None:
        """Fail work posted to an engine whose loop is over (it stops at a failure or after a
        close; its threads are joined for up to the edge timeout after that): its submitter would
        wait for it forever. Called as the loop ends (`finish`) and by a submitter that finds it
        over after posting (`posted`); each item is taken by one of them only."""
        reason = f"pipeline failed: {self._failure or 'the dispatcher has stopped'}"
        for item in self.engine.unprocessed():
            self.abandoned(item, reason)

    def abandoned(self, item: object, reason: str) -> None:
        """A posted item the engine never handled (see fail_unprocessed)."""

    def fail(self, reason: str) -> None:
        """Fail everything queued and in flight (a worker died, an edge broke)."""
        if self._set_failure(reason):
            log.error("dispatcher: pipeline failed: %s", reason)
        self.engine.post(_Fail(reason))

    def _set_failure(self, reason: str) -> bool:
        with self._lock:
            if self._failure is not None:
                return False
            self._failure = reason
            return True

    def close(self, timeout_s: float = 30.0) -> None:
        """Drain: refuse new work, finish what is queued and in flight, then STOP the data plane."""
        self._closing = True
        self.engine.post(_Close())
        if not self._ended.wait(timeout_s) and self._failure is None:
            self.fail("shutdown timed out")
            self._ended.wait(5.0)

    def inflight(self) -> int:
        """Work in the pipeline now (micro-batches, or live sequences)."""
        raise NotImplementedError

    def wait_ended(self, timeout_s: float) -> bool:
        return self._ended.wait(timeout_s)

    # -- compute thread --------------------------------------------------------------------------

    def on_local(self, item: object) -> None:
        if isinstance(item, _Close):
            self._draining = True
            self.on_drain()
        elif isinstance(item, _Fail):
            self.fail_all(f"pipeline failed: {item.reason}")
            self.engine.abort()
        else:
            self.on_work(item)

    def on_work(self, item: object) -> None:
        raise NotImplementedError

    def on_drain(self) -> None:
        """close() was called: nothing new comes; what is in flight may finish."""

    def fail_all(self, reason: str) -> None:
        """Answer everything queued and in flight with `reason` (compute thread)."""
        raise NotImplementedError

    def close_when_drained(self, drained: bool) -> None:
        if self._draining and drained and not self._outputs_closed:
            self._outputs_closed = True
            self.engine.close_outputs()

    def on_input_stopped(self, end: EdgeEnd) -> None:
        self.engine.ack_stop(end)

    def on_broken(self, end: EdgeEnd, error: BaseException) -> None:
        if self._failure is not None or self._outputs_closed:
            return
        if self.recovery:
            super().on_broken(end, error)  # that edge only: the supervisor will say who died
            self.schedule_replay()
            return
        what = "sending to" if end.outgoing else "receiving from"
        detail = f"{what} {end.peer} failed: {error}"
        threading.Thread(target=self._on_broken, args=(detail,), name="dispatcher-broken", daemon=True).start()

    def on_nodes_dead(self, nodes: frozenset[Node]) -> None:
        log.warning("dispatcher: %s declared dead; replaying what may have crossed %s",
                    ", ".join(map(str, sorted(nodes, key=lambda n: (n.stage, n.replica)))),
                    "them" if len(nodes) > 1 else "it")
        self.schedule_replay()

    def on_complete(self, complete: bool) -> None:
        was, self.complete = self.complete, complete
        if complete and not was:
            log.warning("dispatcher: every stage is served again; replaying what was held")
            self.schedule_replay(0.0)
        elif not complete:
            log.warning("dispatcher: a stage has no live replica; holding new work until a replacement joins")

    def schedule_replay(self, after_s: float = REPLAY_GRACE_S) -> None:
        due = time.monotonic() + after_s
        self.replay_due = due if self.replay_due is None else min(self.replay_due, due)
        self.engine.wake()

    def replay_if_due(self, now: float) -> float | None:
        """From the front end's poll: replay once the grace passed; the seconds until then, if any."""
        if self.replay_due is None:
            return None
        if now < self.replay_due:
            return self.replay_due - now
        self.replay_due = None
        self.replay()
        return None

    def replay(self) -> None:
        """Send again what is in flight (front end specific; compute thread)."""
        raise NotImplementedError
