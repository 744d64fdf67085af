"""What `/v1/watch` streams to any client (the TUI, scripts): snapshots, deltas, events (no torch).

Frames are JSON text `{"v": 2, "type": "snapshot" | "delta" | "event", "body": {...}}`, the same
envelope as the agents' websocket. A watcher first gets the recent events (oldest first), then
one `Snapshot` (the whole picture at tick T), then every `interval_s` a `Delta` from tick T to
T+1 (agents and jobs that changed, whole; ids that went away; the fleet summary), and each
`Event` as it happens. Apply them in order with `WatchState`; a delta whose `base` is not the
tick the client holds means a frame was lost: reconnect for a fresh snapshot.

The controller builds each tick's delta once and sends the same text to every watcher with the
same query, so ten watchers cost one encoding, and a quiet fleet costs a few hundred bytes a
second. `agents=none` leaves the per-agent views out (the fleet summary stays): what a big
cluster's dashboard needs; page through agents with `GET /v1/agents`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

from infscaled.protocol.control import DispatcherStats, StageStats
from infscaled.protocol.envelope import decode_frame, encode_frame
from infscaled.protocol.messages import HostMetrics

WATCH_VERSION = 2  # 2: deltas after the first snapshot; agents' views without heartbeat ages
MAX_WATCH_BYTES = 64 << 20  # the first snapshot of 10,000 agents with 8 GPUs each is ~15 MB
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
    # No heartbeat age: it would change every tick for every agent and make every delta the whole
    # fleet. `state` says what matters (the controller declares an agent lost); GET /v1/agents has it.
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
    generation: bool = False  # a generation job: it scales whole replica chains, not one stage


@dataclass(frozen=True)
class FleetSummary:
    """Counts over every agent the controller knows, whatever the watch's `agents` filter."""

    agents: int = 0
    connected: int = 0
    lost: int = 0
    devices: int = 0  # of connected agents
    gpus: int = 0  # of connected agents
    devices_in_use: int = 0  # held by a job
    workers: int = 0
    gpu_util_mean: float = -1.0  # over the GPUs that reported; -1 when none did
    cpu_ratio_mean: float = -1.0  # over the connected agents that reported; -1 when none did


@dataclass(frozen=True)
class Snapshot:
    """The whole picture at `tick`: what a watcher gets first, and what WatchState rebuilds."""

    type: ClassVar[str] = "snapshot"
    time: float  # controller wall clock
    interval_s: float
    agents: list[AgentView] = field(default_factory=list)  # empty when agents_listed is false
    jobs: list[JobView] = field(default_factory=list)
    fleet: FleetSummary = field(default_factory=FleetSummary)
    agents_listed: bool = True  # false: the watch asked for agents=none
    tick: int = 0


@dataclass(frozen=True)
class Delta:
    """From tick `base` to tick `tick`: the agents and jobs that changed or appeared (whole), the
    ids that went away, the latest usage report of agents whose usage alone changed (apply it
    with `apply_usage`; the agents' own HostMetrics, smaller than their views and not rebuilt
    by the controller), and the fleet summary now."""

    type: ClassVar[str] = "delta"
    time: float
    tick: int
    base: int
    fleet: FleetSummary
    agents: list[AgentView] = field(default_factory=list)
    agents_gone: list[str] = field(default_factory=list)
    jobs: list[JobView] = field(default_factory=list)
    jobs_gone: list[str] = field(default_factory=list)
    usage: list[HostMetrics] = field(default_factory=list)


def apply_usage(view: AgentView, usage: HostMetrics) -> AgentView:
    """`view` with the host and device numbers of `usage` (devices it does not mention keep theirs)."""
    measured = {d.id: d for d in usage.devices}
    devices = [replace(d, util_ratio=m.util_ratio, memory_used_bytes=m.memory_used_bytes)
               if (m := measured.get(d.id)) is not None else d for d in view.devices]
    return replace(view, cpu_ratio=usage.cpu_ratio, ram_used_bytes=usage.ram_used_bytes, devices=devices)


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


WatchMessage = Snapshot | Delta | Event
_TYPES: dict[str, type] = {Snapshot.type: Snapshot, Delta.type: Delta, Event.type: Event}


class WatchState:
    """A watcher's picture: `apply` each Snapshot and Delta in order, read `snapshot`."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self._agents: dict[str, AgentView] = {}
        self._jobs: dict[str, JobView] = {}

    def apply(self, msg: Snapshot | Delta) -> Snapshot | None:
        """The picture after `msg`; None for a delta that does not follow what this state holds
        (a lost frame, or no snapshot yet): the caller should reconnect for a fresh snapshot."""
        if isinstance(msg, Snapshot):
            self._agents = {a.id: a for a in msg.agents}
            self._jobs = {j.id: j for j in msg.jobs}
            self.snapshot = msg
            return msg
        prev = self.snapshot
        if prev is None or msg.base != prev.tick:
            return None
        for gone in msg.agents_gone:
            self._agents.pop(gone, None)
        self._agents.update((a.id, a) for a in msg.agents)
        for usage in msg.usage:
            view = self._agents.get(usage.agent_id)
            if view is not None:
                self._agents[usage.agent_id] = apply_usage(view, usage)
        for gone in msg.jobs_gone:
            self._jobs.pop(gone, None)
        self._jobs.update((j.id, j) for j in msg.jobs)
        # Lists are rebuilt only when their dict changed: a quiet tick costs nothing per agent.
        agents = list(self._agents.values()) if msg.agents or msg.agents_gone or msg.usage else prev.agents
        jobs = list(self._jobs.values()) if msg.jobs or msg.jobs_gone else prev.jobs
        self.snapshot = Snapshot(msg.time, prev.interval_s, agents, jobs, msg.fleet, prev.agents_listed, msg.tick)
        return self.snapshot


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
