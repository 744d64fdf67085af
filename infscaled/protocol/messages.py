"""Messages between agents and the controller over one websocket per agent (no torch).

Every frame is a JSON text message `{"v": 1, "type": NAME, "body": {...}}` of at most
MAX_MESSAGE_BYTES. `decode` checks the envelope, the type and every body field's type and
raises `WireError` with a precise message, so a malformed, unknown or oversized message
is answered with an `ErrorMsg` and logged, and never crashes either side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from infscaled.protocol.control import DispatcherStats, EdgeRef, StageStats, UpdateTopology
from infscaled.protocol.envelope import decode_frame, encode_frame

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20  # a plan for hundreds of workers fits easily


@dataclass(frozen=True)
class Device:
    """One device an agent offers: "cpu:0", "cuda:1"."""

    id: str
    kind: str  # "cpu" | "cuda"
    name: str = ""
    memory_bytes: int = 0


# -- agent -> controller -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunningWorker:
    """A process an agent runs for a job, listed in Register so a restarted controller can adopt
    it (or stop it, when it does not know the job)."""

    job_id: str
    node: str  # "STAGE.REPLICA" or "dispatcher"
    state: str  # "starting" | "ready"
    pid: int = 0


@dataclass(frozen=True)
class Register:
    type: ClassVar[str] = "register"
    agent_id: str
    host: str  # hostname, for people
    advertise: str  # address other hosts use to reach this agent's workers
    devices: list[Device]
    cpu_cores: int
    ram_bytes: int
    port_range: list[int]  # [first, last] ports the controller may assign to edges hosted here
    version: str = ""
    # The secret the controller issued at this agent's first registration ("" the first time):
    # an id registered with a credential is refused to any connection that lacks it.
    credential: str = ""
    workers: list[RunningWorker] = field(default_factory=list)  # what runs here now


@dataclass(frozen=True)
class Heartbeat:
    type: ClassVar[str] = "heartbeat"
    agent_id: str
    workers: int = 0  # worker processes alive on the agent


@dataclass(frozen=True)
class WorkerState:
    """A worker's state changed: starting, ready, exited (cleanly), failed."""

    type: ClassVar[str] = "worker_state"
    job_id: str
    node: str
    state: str
    pid: int = 0
    reason: str = ""


@dataclass(frozen=True)
class InspectResult:
    """Answer to Inspect: the model's unit count and per-unit weights, or the error."""

    type: ClassVar[str] = "inspect_result"
    request_id: str
    ok: bool
    unit_count: int = 0
    unit_weights: list[int] = field(default_factory=list)
    error: str = ""


@dataclass(frozen=True)
class Metrics:
    """The latest stats of a job's processes on this agent, at most once per metrics_interval_s;
    the controller keeps only the newest per (job, agent), so a lost one costs nothing."""

    type: ClassVar[str] = "metrics"
    job_id: str
    stages: list[StageStats] = field(default_factory=list)
    dispatcher: DispatcherStats | None = None


@dataclass(frozen=True)
class DeviceUsage:
    id: str
    util_ratio: float = -1.0  # busy fraction over NVML's last sample period; -1: not measured
    memory_used_bytes: int = -1


@dataclass(frozen=True)
class HostMetrics:
    """The agent's host and devices, sampled every Welcome.host_metrics_interval_s and sent only
    when a value moved past agent.devices.usage_changed's thresholds (latest wins, like Metrics)."""

    type: ClassVar[str] = "host_metrics"
    agent_id: str
    cpu_ratio: float  # whole-host CPU busy fraction since the previous report (psutil)
    ram_used_bytes: int
    devices: list[DeviceUsage] = field(default_factory=list)


# -- controller -> agent -----------------------------------------------------------------------


@dataclass(frozen=True)
class Welcome:
    """The controller's answer to Register, with the rates it wants from this agent: a fleet's
    traffic is set in one place, the controller's config."""

    type: ClassVar[str] = "welcome"
    agent_id: str
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    credential: str = ""  # issued at first registration: the agent keeps it and sends it in Register
    host_metrics_interval_s: float = 5.0  # sample the host this often; send a sample only when it changed
    reconnect_spread_s: float = 1.0  # after a drop, wait uniformly 0..this before the first reconnect


@dataclass(frozen=True)
class Deploy:
    """Start this agent's part of a job: the nodes listed (stage replicas, maybe "dispatcher")."""

    type: ClassVar[str] = "deploy"
    job_id: str
    plan: dict[str, Any]  # protocol.plan.plan_to_dict
    nodes: list[str]
    dispatcher_port: int = 0  # where the dispatcher's inference service listens, if hosted here
    service_token: str = ""  # the controller authenticates to that service with it
    request_timeout_s: float = 120.0
    ready_timeout_s: float = 300.0


@dataclass(frozen=True)
class NodeTopology:
    """One running node's edge changes in a new epoch (protocol/topology.py)."""

    node: str
    add: list[EdgeRef] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)  # nodes declared dead at this epoch
    complete: bool | None = None  # the dispatcher's: every stage has a live replica (None: unchanged)

    def control(self, epoch: int) -> UpdateTopology:
        return UpdateTopology(epoch, list(self.add), list(self.remove), list(self.dead), self.complete)


@dataclass(frozen=True)
class ChangeTopology:
    """A running job's new epoch: start `start` (with the epoch's plan) and hand each running node
    here its edge changes. Replicas that lose all their in-edges drain and exit on their own;
    `stop` ones are retired at once (the survivors of a generation chain that lost a member)."""

    type: ClassVar[str] = "change_topology"
    job_id: str
    epoch: int
    plan: dict[str, Any]  # protocol.plan.plan_to_dict of the new epoch
    start: list[str] = field(default_factory=list)
    updates: list[NodeTopology] = field(default_factory=list)
    ready_timeout_s: float = 300.0
    stop: list[str] = field(default_factory=list)
    # When `start` has "dispatcher" (the service restarted after its loss), as in Deploy:
    dispatcher_port: int = 0
    service_token: str = ""
    request_timeout_s: float = 120.0


@dataclass(frozen=True)
class StopJob:
    type: ClassVar[str] = "stop_job"
    job_id: str
    reason: str = ""


@dataclass(frozen=True)
class Inspect:
    """Build the model's skeleton (meta device) and report its units, before planning."""

    type: ClassVar[str] = "inspect"
    request_id: str
    source: str


# -- both ways ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorMsg:
    type: ClassVar[str] = "error"
    message: str
    in_reply_to: str = ""


Message = (Register | Heartbeat | WorkerState | InspectResult | Metrics | HostMetrics | Welcome | Deploy | StopJob
           | Inspect | ErrorMsg | ChangeTopology)
MESSAGE_TYPES: dict[str, type] = {
    c.type: c for c in (Register, Heartbeat, WorkerState, InspectResult, Metrics, HostMetrics, Welcome, Deploy,
                        StopJob, Inspect, ErrorMsg, ChangeTopology)
}


def encode(msg: Message) -> str:
    return encode_frame(msg, PROTOCOL_VERSION, MAX_MESSAGE_BYTES)


def decode(data: str | bytes) -> Message:
    """Parse and type-check one frame; raises WireError naming what is wrong."""
    msg: Message = decode_frame(data, MESSAGE_TYPES, PROTOCOL_VERSION, MAX_MESSAGE_BYTES)
    return msg
