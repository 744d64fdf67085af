"""`infscaled run --scale-at T:STAGE=N`: scale a running job on a schedule and time each change.

Each step scales stage STAGE (a forward job) or the replica chains (`T:chains=N`, a generation
job) to N replicas T seconds after the workload started, through `LocalJob.scale`, and records
when every added replica was ready (spawned, weights loaded, edges joined) and when the first of
them computed its first micro-batch.
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

    def __init__(self, job: LocalJob, steps: list[ScaleStep]) -> None:
        self.job = job
        self.steps = sorted(steps, key=lambda s: s.at_s)
        self.events: list[ScaleEvent] = []
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

    def _run(self) -> None:
        for step in self.steps:
            if self._stop.wait(max(0.0, self._started + step.at_s - time.monotonic())):
                return
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


def render_events(events: list[ScaleEvent]) -> str:
    lines = []
    for e in events:
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
    return "scaling:\n" + "\n".join(lines) if lines else ""
