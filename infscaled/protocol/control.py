"""Control messages between a worker process and its supervisor (no torch).

They travel over the worker's control pipe as versioned JSON, never pickle, so the same
types can later cross a websocket between an agent and the controller unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from infscaled.errors import WireError
from infscaled.protocol.plan import EdgePlan, Node
from infscaled.protocol.topology import TopologyUpdate
from infscaled.protocol.typed import build

CONTROL_VERSION = 1


@dataclass(frozen=True)
class EdgeRate:
    """Samples per second that arrived over one in-edge, in the stats window."""

    src: str  # the sending node ("dispatcher", "0.1", ...)
    samples_per_s: float = 0.0


@dataclass(frozen=True)
class StageStats:
    """Counters of one stage replica since it became ready (monotonic seconds)."""

    node: str
    micro_batches: int = 0
    samples: int = 0
    busy_s: float = 0.0  # time spent computing
    wall_s: float = 0.0  # time since the first micro-batch arrived
    queue_depth: int = 0  # micro-batches received and not yet computed
    # Over the last `window_s` (protocol/window.py), so a dashboard sees now, not the job's average.
    window_s: float = 0.0
    occupancy: float = 0.0  # compute seconds / wall seconds in the window
    inflight: int = 0  # micro-batches received here and not yet sent on
    recv_wait_s: float = 0.0  # mean time a receiver waited for each micro-batch
    compute_s: float = 0.0  # mean compute time per micro-batch
    send_s: float = 0.0  # mean time sending each micro-batch downstream took
    samples_per_s: float = 0.0
    inputs: list[EdgeRate] = field(default_factory=list)  # one per in-edge: the edges' throughput
    graph_replays: int = 0  # micro-batches (decode steps) computed by replaying a CUDA graph (worker/graphs.py,
    # generation/graphs.py)
    # Generation jobs: this replica's KV cache (positions held, reserved, budget) and live sequences.
    kv_tokens: int = 0
    kv_reserved_tokens: int = 0
    kv_budget_tokens: int = 0
    kv_sequences: int = 0
    epoch: int = 0  # the topology epoch this replica has applied (protocol/topology.py)

    @property
    def busy(self) -> float:
        """Fraction of wall time spent computing (occupancy)."""
        return self.busy_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(frozen=True)
class DispatcherStats:
    """The dispatcher service's view of requests: counters since start, rates and latency
    quantiles over the last `window_s`."""

    requests: int = 0  # completed
    samples: int = 0
    rejected: int = 0  # refused before entering the pipeline (bad input, queue full, draining, failed)
    timed_out: int = 0
    inflight_requests: int = 0  # accepted HTTP requests waiting for their result
    inflight_micro_batches: int = 0
    window_s: float = 0.0
    requests_per_s: float = 0.0
    samples_per_s: float = 0.0
    latency_p50_s: float = 0.0
    latency_p90_s: float = 0.0
    latency_p99_s: float = 0.0
    latency_sum_s: float = 0.0  # over every completed request: a Prometheus summary's _sum
    # Generation jobs (requests are sequences, samples are generated tokens), over the window:
    ttft_p50_s: float = 0.0  # time to first token
    ttft_p99_s: float = 0.0
    tpot_p50_s: float = 0.0  # time per output token after the first
    tpot_p99_s: float = 0.0
    # Recovery (issue 12), counters since this dispatcher started (a restarted one counts afresh):
    replayed: int = 0  # requests sent again after a loss (generation: sequences continued on another chain)
    duplicates: int = 0  # late answers dropped: their work had been answered or moved on already


@dataclass(frozen=True)
class WorkerReady:
    type: ClassVar[str] = "ready"
    node: str
    pid: int
    device: str
    # Full-model names of the parameters this worker materialised, and their element count.
    params: list[str] = field(default_factory=list)
    param_numel: int = 0
    load_s: float = 0.0  # building the stage: its weights materialised
    connect_s: float = 0.0  # joining its edges (waits for peers that are still building)


@dataclass(frozen=True)
class WorkerStatsReport:
    type: ClassVar[str] = "stats"
    stats: StageStats


@dataclass(frozen=True)
class DispatcherStatsReport:
    type: ClassVar[str] = "dispatcher_stats"
    stats: DispatcherStats


@dataclass(frozen=True)
class WorkerDone:
    """The worker drained and stopped cleanly after a STOP on all its in-edges."""

    type: ClassVar[str] = "done"
    stats: StageStats


@dataclass(frozen=True)
class WorkerFailed:
    type: ClassVar[str] = "failed"
    node: str
    reason: str


@dataclass(frozen=True)
class StopWorker:
    """Supervisor -> worker: abort now (the clean path is a STOP on the data plane)."""

    type: ClassVar[str] = "stop"
    reason: str = ""


@dataclass(frozen=True)
class EdgeRef:
    """An edge as the control pipe carries it (protocol.plan.EdgePlan, nodes as names)."""

    src: str
    dst: str
    host: str
    port: int

    @staticmethod
    def of(edge: EdgePlan) -> EdgeRef:
        return EdgeRef(str(edge.src), str(edge.dst), edge.host, edge.port)

    def plan(self) -> EdgePlan:
        return EdgePlan(Node.parse(self.src), Node.parse(self.dst), self.host, self.port)


@dataclass(frozen=True)
class UpdateTopology:
    """Supervisor -> worker (stage replica or dispatcher): this node's edges of a new epoch."""

    type: ClassVar[str] = "topology"
    epoch: int
    add: list[EdgeRef] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)  # node names ("1.1", "dispatcher")
    complete: bool | None = None

    @staticmethod
    def of(update: TopologyUpdate) -> UpdateTopology:
        return UpdateTopology(update.epoch, [EdgeRef.of(e) for e in update.add], list(update.remove),
                              [str(n) for n in update.dead], update.complete)

    def update(self) -> TopologyUpdate:
        """The typed update; ValueError if an edge or a dead node names no node."""
        return TopologyUpdate(self.epoch, tuple(e.plan() for e in self.add), tuple(self.remove),
                              tuple(Node.parse(n) for n in self.dead), self.complete)


@dataclass(frozen=True)
class Heartbeat:
    """Worker -> supervisor, every HEARTBEAT_INTERVAL_S from a thread of its own (worker/group.py
    declares a member that stays silent for its heartbeat timeout dead: hung, stopped or wedged)."""

    type: ClassVar[str] = "heartbeat"
    node: str


HEARTBEAT_INTERVAL_S = 0.25


@dataclass(frozen=True)
class EdgeFailed:
    """Worker -> supervisor: an edge to `peer` broke (worker/group.py kills a peer that is one of
    its members and still alive: a peer that stopped taking messages is as good as dead, and its
    death is what makes the dispatcher replay what the broken edge lost)."""

    type: ClassVar[str] = "edge_failed"
    node: str
    peer: str
    edge: str
    reason: str
    # The topology epoch that joined the edge: one older than the peer's own start is an edge to an
    # earlier process of that name (a restarted dispatcher keeps its name), which is left alone.
    epoch: int = 0

ControlMessage = (WorkerReady | WorkerStatsReport | DispatcherStatsReport | WorkerDone | WorkerFailed | StopWorker
                  | UpdateTopology | Heartbeat | EdgeFailed)
_TYPES: dict[str, Any] = {c.type: c for c in (WorkerReady, WorkerStatsReport, DispatcherStatsReport, WorkerDone,
                                              WorkerFailed, StopWorker, UpdateTopology, Heartbeat,
                                              EdgeFailed)}


def encode(msg: ControlMessage) -> bytes:
    return json.dumps({"v": CONTROL_VERSION, "type": msg.type, "body": asdict(msg)}).encode()


def decode(data: bytes) -> ControlMessage:
    try:
        raw = json.loads(data)
        if raw.get("v") != CONTROL_VERSION:
            raise WireError(f"control message version {raw.get('v')!r}, expected {CONTROL_VERSION}")
        cls = _TYPES[raw["type"]]
        body = raw["body"]
        if not isinstance(body, dict):
            raise WireError(f"control message {raw['type']}: body must be an object")
        msg: ControlMessage = build(cls, body, f"control message {raw['type']}")
        return msg
    except WireError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise WireError(f"malformed control message: {exc}") from exc
