"""What `/v1/watch` streams to any client (the TUI, scripts): snapshots and events (no torch).

Frames are JSON text `{"v": 1, "type": "snapshot" | "event", "body": {...}}`, the same envelope
as the agents' websocket. A watcher first gets the recent events (oldest first), then a
`Snapshot` at once and one every `interval_s`, and each `Event` as it happens. A snapshot is
the whole picture, so a client that drops or misses frames only needs the next one: render from
the latest snapshot, never by accumulating deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from infscaled.protocol.control import DispatcherStats, StageStats
from infscaled.protocol.envelope import decode_frame, encode_frame

WATCH_VERSION = 1
MAX_WATCH_BYTES = 16 << 20  # a snapshot of hundreds of workers; far above what 64 need
# Event kinds, for filtering and colouring; `message` always says it in words.
EVENT_KINDS = ("agent_joined", "agent_lost", "worker_state", "job_state", "job_scaled")


@dataclass(frozen=True)
class DeviceView:
    """One device of an agent, with its latest usage (zeros until the agent's first report)."""

    id: str  # "cpu:0", "cuda:1"
    kind: str
    name: str = ""
    memory_bytes: int = 0  # total, as registered
    job: str = ""  # id of the job holding it, "" when free
    util_ratio: float = -1.0  # device busy fraction from NVML; -1 when not measured (CPU slots)
    memory_used_bytes: int = -1  # -1 when not measured


@dataclass(frozen=True)
class AgentView:
    id: str
    host: str
    state: str  # "connected" | "lost"
    reason: str = ""  # why it was lost
    advertise: str = ""
    cpu_cores: int = 0
    ram_bytes: int = 0
    cpu_ratio: float = -1.0  # whole-host CPU busy fraction (psutil); -1 before the first report
    ram_used_bytes: int = -1
    workers: int = 0  # worker processes alive, per its latest heartbeat
    last_heartbeat_age_s: float = 0.0
    devices: list[DeviceView] = field(default_factory=list)


@dataclass(frozen=True)
class ReplicaView:
    """One stage replica: where it runs, its worker's state, and its latest stats (None until the
    first report reaches the controller)."""

    node: str  # "stage.replica"
    stage: int
    replica: int
    agent: str
    device: str
    state: str  # assigned | starting | ready | exited | failed | lost
    pid: int = 0
    reason: str = ""
    stats: StageStats | None = None
    stats_age_s: float = -1.0


@dataclass(frozen=True)
class EdgeView:
    src: str  # node, or "dispatcher"
    dst: str
    samples_per_s: float = 0.0  # measured at the receiver (the dispatcher: at the last stage)


@dataclass(frozen=True)
class StageView:
    index: int
    first_unit: int
    last_unit: int
    replicas: int


@dataclass(frozen=True)
class JobView:
    id: str
    name: str
    state: str  # pending | deploying | running | stopping | stopped | failed
    reason: str = ""
    model: str = ""
    created: float = 0.0  # wall clock
    stages: list[StageView] = field(default_factory=list)
    replicas: list[ReplicaView] = field(default_factory=list)
    edges: list[EdgeView] = field(default_factory=list)
    dispatcher: DispatcherStats | None = None
    bottleneck: int = -1  # stage index with the highest mean occupancy; -1 before any stats


@dataclass(frozen=True)
class Snapshot:
    type: ClassVar[str] = "snapshot"
    time: float  # controller wall clock
    interval_s: float
    agents: list[AgentView] = field(default_factory=list)
    jobs: list[JobView] = field(default_factory=list)


@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = "event"
    seq: int  # increasing per controller run: a client can tell replayed from new
    time: float  # wall clock
    kind: str  # one of EVENT_KINDS
    message: str
    agent: str = ""
    job: str = ""
    node: str = ""
    state: str = ""  # the new state, for worker_state and job_state


WatchMessage = Snapshot | Event
_TYPES: dict[str, type] = {Snapshot.type: Snapshot, Event.type: Event}


def encode(msg: WatchMessage) -> str:
    return encode_frame(msg, WATCH_VERSION, MAX_WATCH_BYTES)


def decode(data: str | bytes) -> WatchMessage:
    """Parse one frame; raises WireError naming what is wrong."""
    msg: WatchMessage = decode_frame(data, _TYPES, WATCH_VERSION, MAX_WATCH_BYTES)
    return msg


def bottleneck_stage(replicas: Sequence[ReplicaView]) -> int:
    """The stage whose replicas are busiest on average (mean occupancy over its replicas with
    stats), or -1 when no replica has reported; ties go to the later stage, which holds the
    work back from the dispatcher longest."""
    per_stage: dict[int, list[float]] = {}
    for r in replicas:
        if r.stats is not None:
            per_stage.setdefault(r.stage, []).append(r.stats.occupancy)
    if not per_stage:
        return -1
    return max(per_stage, key=lambda s: (sum(per_stage[s]) / len(per_stage[s]), s))
