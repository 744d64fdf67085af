"""`infscaled run --scale-at T:STAGE=N` / `--fault-at T:NODE[:stop]`: change a running job on a
schedule and time each change.

A scaling step scales stage STAGE (a forward job) or the replica chains (`T:chains=N`, a
generation job) to N replicas T seconds after the workload started, through `LocalJob.scale`,
and records when every added replica was ready (spawned, weights loaded, edges joined) and when
the first of them computed its first micro-batch. A fault step kills stage replica NODE with
SIGKILL (`:stop`: SIGSTOP, a hang) and records how the job recovered (runner/recovery.py).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from infscaled.errors import InfscaledError

if TYPE_CHECKING:
    from infscaled.runner.launcher import LocalJob

_STEP = re.compile(r"^(?P<at>\d+(\.\d+)?):(?P<what>\d+|chains)=(?P<n>\d+)$")
_FAULT = re.compile(r"^(?P<at>\d+(\.\d+)?):(?P<node>\d+\.\d+)(:(?P<how>kill|stop))?$")
FIRST_WORK_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ScaleStep:
    at_s: float
    stage: int | None  # None: a generation job's replica chains
    replicas: int


def parse_scale_at(text: str) -> ScaleStep:
    """"T:STAGE=N" or "T:chains=N" (T seconds after the workload started); InfscaledError otherwise."""
    m = _STEP.match(text.strip())
    if m is None:
        raise InfscaledError(f"--scale-at {text!r}: expected T:STAGE=N (e.g. 5:1=4: stage 1 to 4 replicas "
                             "5 s in) or T:chains=N for a generation job")
    what = m["what"]
    return ScaleStep(float(m["at"]), None if what == "chains" else int(what), int(m["n"]))


@dataclass(frozen=True)
class FaultStep:
    at_s: float
    node: str  # "STAGE.REPLICA"
    stop: bool  # SIGSTOP (a hang) instead of SIGKILL


def parse_fault_at(text: str) -> FaultStep:
    """"T:NODE" or "T:NODE:stop" (T seconds after the workload started); InfscaledError otherwise."""
    m = _FAULT.match(text.strip())
    if m is None:
        raise InfscaledError(f"--fault-at {text!r}: expected T:STAGE.REPLICA (e.g. 3:1.1: kill -9 replica 1.1 3 s "
                             "in) or T:STAGE.REPLICA:stop (SIGSTOP it: a hung worker)")
    return FaultStep(float(m["at"]), m["node"], m["how"] == "stop")


@dataclass
class FaultEvent:
    at_s: float
    node: str
    signal: str
    error: str = ""
    replaced_by: list[str] = field(default_factory=list)
    declared_dead_s: float = 0.0  # the fault -> the supervisor reported the loss
    ready_s: float = 0.0  # the loss -> every replacement READY (0: not before the workload ended)
    load_s: float = 0.0
    connect_s: float = 0.0
    pid: int = 0
    at: float = field(default=0.0, repr=False)  # monotonic time of the fault

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["at"]
        return doc


@dataclass
class ScaleEvent:
    at_s: float
    stage: int | None
    replicas: int
    epoch: int = 0
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    ready_s: float = 0.0  # call -> every added replica READY (spawn + weight load + edges joined)
    load_s: float = 0.0  # the slowest added replica's weight load, inside ready_s
    connect_s: float = 0.0  # the slowest added replica's edge joining, inside ready_s
    first_micro_batch_s: float = 0.0  # call -> the first added replica computed its first micro-batch
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ScaleSchedule:
    """Runs the steps in a thread of its own while the workload runs."""

    def __init__(self, job: LocalJob, steps: list[ScaleStep | FaultStep]) -> None:
        self.job = job
        self.steps = sorted(steps, key=lambda s: s.at_s)
        self.events: list[ScaleEvent | FaultEvent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scale-schedule", daemon=True)

    def start(self) -> None:
        self._started = time.monotonic()
        if self.steps:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(FIRST_WORK_TIMEOUT_S)
        history = self.job.recoverer.history if self.job.recoverer is not None else []
        for e in self.events:
            if isinstance(e, FaultEvent) and not e.error:
                rec = next((r for r in history if e.node in map(str, r.dead)), None)
                if rec is not None:
                    e.replaced_by = [str(n) for n in rec.added]
                    e.declared_dead_s, e.ready_s = rec.detected_s - e.at, rec.ready_s
                    e.load_s, e.connect_s = rec.load_s, rec.connect_s

    def _fault(self, step: FaultStep) -> None:
        import os
        import signal

        from infscaled.protocol.plan import Node

        event = FaultEvent(step.at_s, step.node, "SIGSTOP" if step.stop else "SIGKILL")
        self.events.append(event)
        h = self.job.group.handles.get(Node.parse(step.node))
        if h is None or h.exited or h.process.pid is None:
            event.error = f"no live replica {step.node} (live: {', '.join(str(w.node) for w in self.job.plan.workers)})"
            return
        event.pid, event.at = h.process.pid, time.monotonic()
        os.kill(h.process.pid, signal.SIGSTOP if step.stop else signal.SIGKILL)

    def _run(self) -> None:
        for step in self.steps:
            if self._stop.wait(max(0.0, self._started + step.at_s - time.monotonic())):
                return
            if isinstance(step, FaultStep):
                self._fault(step)
                continue
            event = ScaleEvent(step.at_s, step.stage, step.replicas)
            self.events.append(event)
            called = time.monotonic()
            try:
                result = self.job.scale(step.stage, step.replicas)
            except (InfscaledError, ValueError) as exc:
                event.error = str(exc)
                continue
            event.epoch, event.ready_s, event.load_s = result.plan.epoch, result.ready_s, result.load_s
            event.connect_s = result.connect_s
            event.added, event.removed = [str(n) for n in result.added], [str(n) for n in result.removed]
            handles = self.job.group.handles
            deadline = called + FIRST_WORK_TIMEOUT_S
            while result.added and not self._stop.is_set() and time.monotonic() < deadline:
                if any((s := handles[n].stats) is not None and s.micro_batches > 0 for n in result.added):
                    event.first_micro_batch_s = time.monotonic() - called
                    break
                time.sleep(0.02)


def render_events(events: list[ScaleEvent | FaultEvent]) -> str:
    lines = []
    for e in events:
        if isinstance(e, FaultEvent):
            if e.error:
                lines.append(f"  at {e.at_s:g} s: {e.signal} {e.node}: not done: {e.error}")
            elif not e.replaced_by or not e.ready_s:
                lines.append(f"  at {e.at_s:g} s: {e.signal} {e.node} (pid {e.pid}): not replaced before the end")
            else:
                lines.append(f"  at {e.at_s:g} s: {e.signal} {e.node} (pid {e.pid}): declared dead after "
                             f"{e.declared_dead_s:.2f} s, replaced by {', '.join(e.replaced_by)}, ready "
                             f"{e.ready_s:.2f} s later (spawn {e.ready_s - e.load_s - e.connect_s:.2f}, load "
                             f"{e.load_s:.2f}, connect {e.connect_s:.2f})")
            continue
        what = f"stage {e.stage}" if e.stage is not None else "chains"
        if e.error:
            lines.append(f"  at {e.at_s:g} s: {what} -> {e.replicas}: refused: {e.error}")
            continue
        change = ", ".join([f"+{n}" for n in e.added] + [f"-{n}" for n in e.removed]) or "no change"
        first = (f"first micro-batch {e.first_micro_batch_s:.2f} s" if e.first_micro_batch_s
                 else "no micro-batch reached them before the workload ended")
        timing = (f"; ready {e.ready_s:.2f} s (spawn {e.ready_s - e.load_s - e.connect_s:.2f}, load {e.load_s:.2f}, "
                  f"connect {e.connect_s:.2f}), {first}" if e.added else "")
        lines.append(f"  at {e.at_s:g} s: {what} -> {e.replicas} (epoch {e.epoch}): {change}{timing}")
    return "changes while serving:\n" + "\n".join(lines) if lines else ""
