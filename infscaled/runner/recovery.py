"""Replace what died while `infscaled run` serves (LocalJob's recovery; the controller's is
controller/recovery.py, the same epochs over agents).

The supervisor thread reports each unexpected exit (a crash, a kill, or a member it killed for
a silent heartbeat: worker/group.py); a thread of its own then, per loss:
1. declares the node dead in the next epoch (planning/recovery.py): every running node drops its
   edges to it, the dispatcher replays what may have crossed it (dispatch/core.py) and, if a
   stage has no replica left, holds work until the replacement joins (state DEGRADED);
2. spawns the replacement on the same device with that epoch's plan (RECOVERING), which joins
   its inherited edges while the pipeline serves on; the thread does not wait for it, so losses
   that overlap are handled as they come;
3. once it is READY (the supervisor's on_ready) and every stage has a serving replica again,
   tells the dispatcher; with nothing pending, the job is RUNNING.
A replacement that fails is itself a loss: replaced again after `backoff_s` (doubling), up to
`attempts` in a row per replica line (a replacement that came to serve starts its line afresh:
planning.recovery.Ledger); then the job fails with every reason on the way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from infscaled.controller.job import JobState
from infscaled.planning.ports import free_ports
from infscaled.planning.recovery import (
    Ledger,
    backoff,
    complete,
    devices_for,
    replacement_shape,
    restored,
    with_failure,
)
from infscaled.planning.scale import apply_scale
from infscaled.protocol.control import UpdateTopology
from infscaled.protocol.plan import DISPATCHER, JobPlan, Node
from infscaled.protocol.topology import TopologyUpdate
from infscaled.worker.group import Member, WorkerGroup

log = logging.getLogger(__name__)

BATCH_S = 0.05  # losses this close together are replaced in one epoch (a host's workers die together)


@dataclass(frozen=True)
class Replacement:
    """One recovery, for the record (`infscaled run` prints it; benchmarks read it)."""

    dead: tuple[Node, ...]
    added: tuple[Node, ...]
    reasons: tuple[str, ...]
    detected_s: float  # monotonic time the loss was reported
    ready_s: float = 0.0  # from the report until every replacement was READY (0: it never was)
    load_s: float = 0.0  # the slowest replacement's weight load (inside ready_s)
    connect_s: float = 0.0  # the slowest replacement's edge joining (inside ready_s)


class Recoverer:
    def __init__(self, job: RecoverableJob, group: WorkerGroup, member_for: Callable[[JobPlan, Node], Member],
                 fail: Callable[[str], None]) -> None:
        self.job = job
        self.group = group
        self.member_for = member_for
        self.fail = fail
        self.policy = job.plan.recovery
        self.state = JobState.RUNNING
        self.history: list[Replacement] = []
        self._lost: queue.Queue[tuple[Node, str, float] | None] = queue.Queue()
        self._ledger = Ledger()  # attempts per replica line (planning/recovery.py)
        self._pending: dict[Node, Replacement] = {}  # replacements not READY yet -> their loss
        self._whole = True  # what the dispatcher was last told: every stage has a serving replica
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="recovery", daemon=True)
        self._thread.start()

    def lost(self, node: Node, reason: str) -> None:
        """Supervisor thread: `node` died unexpectedly."""
        self._lost.put((node, reason, time.monotonic()))

    def close(self) -> None:
        self._lost.put(None)
        self._thread.join(5.0)

    def wait_state(self, state: JobState, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.state == state, timeout_s)

    def _set(self, state: JobState) -> None:
        with self._changed:
            if self.state != state:
                log.warning("job %s: %s", self.job.plan.job, state.value)
            self.state = state
            self._changed.notify_all()

    # -- the recovery thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while (first := self._lost.get()) is not None:
            batch = [first]
            deadline = time.monotonic() + BATCH_S
            while (left := deadline - time.monotonic()) > 0:
                try:
                    more = self._lost.get(timeout=left)
                except queue.Empty:
                    break
                if more is None:
                    return
                batch.append(more)
            try:
                self._replace(batch)
            except Exception as exc:  # noqa: BLE001 - thread boundary: a recovery that cannot go on fails the job
                log.exception("job %s: recovery failed", self.job.plan.job)
                self.fail(f"recovery failed: {type(exc).__name__}: {exc}")
                return

    def _replace(self, batch: list[tuple[Node, str, float]]) -> None:
        dead = tuple(dict.fromkeys(n for n, _, _ in batch))
        reasons = tuple(r for _, r, _ in batch)
        detected = min(t for _, _, t in batch)
        if self.job.closing:
            return
        tries, history = self._ledger.next_try([str(n) for n in dead], reasons)
        if not self.policy.enabled or tries > self.policy.attempts:
            why = "; ".join(history)
            if self.policy.enabled:
                why = f"gave up after {self.policy.attempts} replacement attempt(s): {why}"
            self.fail(why)
            return
        self._set(JobState.DEGRADED)
        time.sleep(backoff(self.policy, tries))
        with self.job.topology_lock:
            old = self.job.plan
            shape = replacement_shape(old, dead)
            gone = set(shape.removed)
            for n in dead:
                self._pending.pop(n, None)  # a replacement that died (or was retired) before READY
            serving = [w.node for w in old.workers if w.node not in gone and self._serving(w.node)]
            self._whole = complete(old, serving)
            ports = free_ports(len(shape.new_edges), old.dispatcher_host)
            change = apply_scale(old, shape, devices_for(old, shape), ports)
            updates = with_failure(change, old, dead, self._whole)
            self.job.plan = change.plan
            for node in shape.removed:
                if node not in dead:  # a dead generation chain's survivors
                    self.group.retire(node, f"its chain lost {', '.join(map(str, dead))}")
            record = Replacement(dead, shape.added, reasons, detected)
            self._ledger.started([str(n) for n in shape.added], tries, history, lost=[str(n) for n in dead])
            for n in shape.added:
                self._pending[n] = record
            self._send(updates)
            self._set(JobState.RECOVERING)
            for w in change.added:
                self.group.add(self.member_for(change.plan, w.node))
        log.warning("job %s: epoch %d: %s dead (%s); replaced by %s", old.job, change.plan.epoch,
                    ", ".join(map(str, dead)), "; ".join(reasons), ", ".join(map(str, shape.added)))

    def _serving(self, node: Node) -> bool:
        h = self.group.handles.get(node)
        return h is not None and h.ready is not None and not h.exited and node not in self._pending

    def ready(self, node: Node) -> None:
        """Supervisor thread: a member said READY; the last replacement of a loss completes it."""
        if node not in self._pending:
            return  # not a replacement (scaling holds the topology lock while it waits for READY)
        with self.job.topology_lock:
            self._ledger.served(str(node))
            record = self._pending.pop(node, None)
            if record is None:
                return
            if not any(r is record for r in self._pending.values()):
                ready = [r for n in record.added if (r := self.group.handles[n].ready) is not None]
                self.history.append(replace(record, ready_s=time.monotonic() - record.detected_s,
                                            load_s=max(r.load_s for r in ready),
                                            connect_s=max(r.connect_s for r in ready)))
            serving = [w.node for w in self.job.plan.workers if self._serving(w.node)]
            if not self._whole and complete(self.job.plan, serving):
                self._whole = True
                self.job.plan, update = restored(self.job.plan)
                self._send({DISPATCHER: update})
            if not self._pending and self._lost.empty():
                self._set(JobState.RUNNING)

    def _send(self, updates: dict[Node, TopologyUpdate]) -> None:
        for node, update in updates.items():
            if node == DISPATCHER:
                self.job.dispatcher_update(update)
                continue
            h = self.group.handles.get(node)
            if h is None or h.exited:
                continue
            try:
                self.group.send(node, UpdateTopology.of(update))
            except OSError:
                pass  # it died meanwhile: its own loss is on the way


class RecoverableJob(Protocol):
    """What the Recoverer needs of a job (LocalJob has it)."""

    plan: JobPlan
    topology_lock: threading.Lock

    @property
    def closing(self) -> bool: ...

    def dispatcher_update(self, update: TopologyUpdate) -> None: ...
