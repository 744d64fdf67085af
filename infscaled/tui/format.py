"""Pure helpers for the TUI's views: numbers -> short strings, edges -> hops, the job to show,
and the one bit of history the app keeps (throughput per job, for sparklines)."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable

from rich.text import Text

from infscaled.protocol.watch import AgentView, EdgeView, JobView, ReplicaView, Snapshot

NONE = "–"  # a value not measured yet
HISTORY_LEN = 120  # sparkline points: two minutes at the default 1 s interval
# Worker states, for colour classes: anything else (assigned, starting) is "pending".
GOOD_STATES = frozenset({"ready", "running", "connected"})
BAD_STATES = frozenset({"failed", "lost"})
DONE_STATES = frozenset({"exited", "stopped", "stopping"})
SERVING_STATES = frozenset({"running", "degraded", "recovering"})  # a job that takes requests (yellow while healing)
_EIGHTHS = " ▏▎▍▌▋▊▉"


def rate(per_s: float) -> str:
    if per_s >= 10_000:
        return f"{per_s / 1000:.0f}k/s"
    if per_s >= 1000:
        return f"{per_s / 1000:.1f}k/s"
    return f"{per_s:.1f}/s"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds > 0 else NONE


def size(n: int) -> str:
    if n < 0:
        return NONE
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def pct(ratio: float) -> str:
    return NONE if ratio < 0 else f"{ratio * 100:.0f} %"


def level_style(ratio: float) -> str:
    """Green while there is headroom, yellow when busy, red when saturated."""
    return "green" if ratio < 0.5 else "yellow" if ratio < 0.85 else "red"


def state_style(state: str) -> str:
    if state in GOOD_STATES:
        return "green"
    if state in BAD_STATES:
        return "bold red"
    return "dim" if state in DONE_STATES else "yellow"


def bar(ratio: float, width: int) -> Text:
    """A horizontal bar `width` cells wide, filled to `ratio` in eighths of a cell."""
    ratio = min(max(ratio, 0.0), 1.0)
    eighths = round(ratio * width * 8)
    full, part = divmod(eighths, 8)
    filled = "█" * full + (_EIGHTHS[part] if part else "")
    text = Text(filled, style=level_style(ratio))
    text.append("·" * (width - len(filled)), style="grey35")
    return text


def stage_of(node: str) -> int | None:
    """"1.0" -> 1; the dispatcher (or anything else) -> None."""
    head, _, _ = node.partition(".")
    return int(head) if head.isdigit() else None


def hops(job: JobView) -> list[list[EdgeView]]:
    """The job's edges by hop: hop 0 is dispatcher -> stage 0, hop s+1 leaves stage s, so the
    last hop (index len(stages)) returns to the dispatcher. Always len(stages) + 1 lists."""
    out: list[list[EdgeView]] = [[] for _ in range(len(job.stages) + 1)]
    for edge in job.edges:
        src = stage_of(edge.src)
        hop = 0 if src is None else src + 1
        if 0 <= hop < len(out):
            out[hop].append(edge)
    return out


def replicas_by_stage(job: JobView) -> dict[int, list[ReplicaView]]:
    by_stage: dict[int, list[ReplicaView]] = {s.index: [] for s in job.stages}
    for r in sorted(job.replicas, key=lambda r: (r.stage, r.replica)):
        by_stage.setdefault(r.stage, []).append(r)
    return by_stage


def pick_job(snapshot: Snapshot | None, wanted: str | None) -> JobView | None:
    """The job to show: the one asked for while it exists, else the newest running one, else the newest."""
    if snapshot is None or not snapshot.jobs:
        return None
    for job in snapshot.jobs:
        if job.id == wanted:
            return job
    newest = sorted(snapshot.jobs, key=lambda j: j.created)
    running = [j for j in newest if j.state in SERVING_STATES]
    return (running or newest)[-1]


def agents_to_show(agents: list[AgentView], limit: int) -> list[AgentView]:
    """At most `limit` agents: the lost ones first (they need a look), then the rest, each by id;
    a partial sort, so a fleet of 10,000 costs one pass, not a full sort."""
    if len(agents) <= limit:
        return sorted(agents, key=lambda a: (a.state == "connected", a.id))
    return heapq.nsmallest(limit, agents, key=lambda a: (a.state == "connected", a.id))


def cycle(ids: list[str], current: str | None, step: int) -> str | None:
    if not ids:
        return None
    if current not in ids:
        return ids[0]
    return ids[(ids.index(current) + step) % len(ids)]


class History:
    """Samples/s per job, one point per snapshot: the sparklines' data. Jobs that left the
    snapshot are forgotten, so memory stays bounded by the live jobs."""

    def __init__(self, length: int = HISTORY_LEN) -> None:
        self._length = length
        self._series: dict[str, deque[float]] = {}

    def record(self, jobs: Iterable[JobView]) -> None:
        live = {}
        for job in jobs:
            series = self._series.get(job.id) or deque(maxlen=self._length)
            series.append(job.dispatcher.samples_per_s if job.dispatcher else 0.0)
            live[job.id] = series
        self._series = live

    def series(self, job_id: str) -> list[float]:
        return list(self._series.get(job_id, ()))
