"""Summaries of a run: a rich table for people, a JSON document for tools."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infscaled.protocol.control import StageStats
from infscaled.runner.workload import RunResult


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(round(q / 100 * len(ordered) + 0.5))))
    return ordered[rank - 1]


@dataclass
class Verification:
    checked: int = 0
    mismatched: int = 0
    max_abs_err: float = 0.0


@dataclass
class Summary:
    job: str
    completed: int
    failed: int
    wall_s: float
    samples: int
    latencies_ms: list[float]
    stages: list[StageStats]
    failure: str | None = None
    errors: list[str] = field(default_factory=list)
    verify: Verification | None = None
    scaling: list[Any] = field(default_factory=list)  # runner.scaling.ScaleEvent, from --scale-at
    # The dispatcher's counters (dispatch/core.py); None where the run cannot see them (`up`).
    replayed: int | None = None  # requests sent again after a loss
    duplicates: int | None = None  # late answers dropped

    @property
    def throughput_rps(self) -> float:
        return self.completed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.failure is None and (self.verify is None or self.verify.mismatched == 0)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "job": self.job,
            "completed": self.completed,
            "failed": self.failed,
            "wall_s": self.wall_s,
            "throughput_rps": self.throughput_rps,
            "samples_per_s": self.samples_per_s,
            "latency_ms": {f"p{q}": percentile(self.latencies_ms, q) for q in (50, 90, 99)},
            "stages": [{"stage": int(s.node.split(".")[0]), "replica": int(s.node.split(".")[1]),
                        "busy": s.busy, "micro_batches": s.micro_batches, "samples": s.samples}
                       for s in self.stages],
        }
        if self.failure:
            doc["failure"] = self.failure
        if self.errors:
            doc["errors"] = self.errors[:20]
        if self.verify is not None:
            doc["verify"] = {"checked": self.verify.checked, "mismatched": self.verify.mismatched,
                             "max_abs_err": self.verify.max_abs_err}
        if self.scaling:
            doc["scaling"] = [e.to_json() for e in self.scaling]
        if self.replayed is not None:
            doc["recovery"] = {"replayed": self.replayed, "duplicates_dropped": self.duplicates}
        return doc

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def summarize(job: str, run: RunResult, stages: list[StageStats], failure: str | None) -> Summary:
    done = run.completed
    return Summary(
        job=job, completed=len(done), failed=len(run.failed) + run.unsent, wall_s=run.wall_s,
        samples=sum(o.request.shape[0] for o in done),
        latencies_ms=[o.latency_s * 1000 for o in done], stages=stages, failure=failure,
        errors=sorted({o.error for o in run.failed if o.error} | ({run.unsent_reason} if run.unsent_reason else set())),
    )


def label_table(title: str, rows: list[tuple[str, str]], failure: str | None = None) -> Any:
    """A rich table of (label, value) rows, the failure last if there was one."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value in [*rows, *([("failure", failure)] if failure else [])]:
        table.add_row(label, value)
    return table


def render(summary: Summary) -> Any:
    """A rich renderable: the headline numbers, then per-stage occupancy."""
    from rich.console import Group
    from rich.table import Table

    lat = summary.latencies_ms
    rows = [
        ("requests completed", f"{summary.completed}"),
        ("requests failed", f"{summary.failed}"),
        ("throughput", f"{summary.throughput_rps:.1f} req/s"),
        ("samples/s", f"{summary.samples_per_s:.1f}"),
        ("latency p50 / p90 / p99", " / ".join(f"{percentile(lat, q):.1f}" for q in (50, 90, 99)) + " ms"),
    ]
    if summary.verify is not None:
        ver = summary.verify
        text = f"{ver.checked} checked, {ver.mismatched} mismatched, max |err| {ver.max_abs_err:.2e}"
        rows.append(("verified", text))
    if summary.replayed is not None:
        rows.append(("replayed / late duplicates dropped", f"{summary.replayed} / {summary.duplicates}"))
    head = label_table(f"job {summary.job}", rows, summary.failure)
    stages = Table(title="stages")
    for col in ("stage.replica", "micro-batches", "samples", "busy"):
        stages.add_column(col, justify="right")
    for s in summary.stages:
        stages.add_row(s.node, str(s.micro_batches), str(s.samples), f"{100 * s.busy:.0f} %")
    # Stage counters come from the workers' supervisor: `run` has them, the daemon path not yet.
    parts = [head, stages] if summary.stages else [head]
    if summary.scaling:
        from infscaled.runner.scaling import render_events

        parts.append(render_events(summary.scaling))
    return Group(*parts)
