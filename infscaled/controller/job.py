"""A job as the controller holds it: its states, its nodes, its submitted source, and the row
the database keeps of it (plain data; the state machine is in jobs.py)."""

from __future__ import annotations

import enum
import secrets
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from infscaled.config import JobConfig, parse_job
from infscaled.config.messages import config_error
from infscaled.controller.store import JobRecord
from infscaled.errors import InfscaledError
from infscaled.protocol.messages import Metrics
from infscaled.protocol.plan import JobPlan, plan_to_dict

if TYPE_CHECKING:
    from infscaled.controller.recovery import Recovery

WORKER_STATES = ("starting", "ready", "exited", "failed")
SUBMITTED = "<submitted>"  # the file name of a job submitted without X-Infscaled-Job-File
GONE = ("exited", "failed", "lost")  # a node in one of these holds no process any more


class JobState(enum.StrEnum):
    PENDING = "pending"
    DEPLOYING = "deploying"
    RUNNING = "running"
    DEGRADED = "degraded"  # a replica (or the dispatcher) was lost; the job serves on what is left
    RECOVERING = "recovering"  # its replacement is starting and joining
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


SERVING = (JobState.RUNNING, JobState.DEGRADED, JobState.RECOVERING)  # takes requests
LIVE = (JobState.DEPLOYING, *SERVING, JobState.STOPPING)


def _recovery() -> Any:
    from infscaled.controller.recovery import Recovery  # it imports this module

    return Recovery()


class Rejected(InfscaledError):
    """A request the API answers with `status` and this message as {"error": ...}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class JobSource:
    """A job file as submitted: kept in the database, parsed again when the controller restarts."""

    text: str
    file_name: str  # as shown in messages
    name_override: str | None = None  # the JSON body's "name"

    def parse(self, model_roots: Sequence[str] | None = None) -> JobConfig:
        """The JobConfig of this source (ConfigError with `infscaled run`'s text for the same file)."""
        try:
            data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            raise config_error(self.file_name, "", None, "TOML syntax (https://toml.io)",
                               f"invalid TOML: {exc}") from None
        except RecursionError:  # tomllib recurses per nesting level: a clear 400, never a 500
            raise config_error(self.file_name, "", None, "TOML syntax (https://toml.io)",
                               "arrays or tables nested too deeply to parse") from None
        if self.name_override is not None:
            data["name"] = self.name_override
        elif "name" not in data and self.file_name == SUBMITTED:
            data["name"] = "job"  # no file stem to name it after
        return parse_job(data, self.file_name, model_roots=model_roots)


@dataclass
class NodeStatus:
    """One node of a placed job: where it runs and what its agent last reported."""

    agent: str
    device: str  # the agent's device id ("cpu:0", "cuda:1"); "" for the dispatcher
    state: str = "assigned"  # then one of WORKER_STATES, or "lost" with its agent
    pid: int = 0
    reason: str = ""
    retiring: bool = False  # removed by scaling: it drains and exits 0, which retires it (controller/scaling.py)


@dataclass
class Job:
    id: str
    cfg: JobConfig
    unit_weights: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]  # each stage's (first_unit, last_unit)
    created: float  # wall clock, for people
    source: JobSource = JobSource("", SUBMITTED)  # the text the database keeps ("" in unit tests)
    state: JobState = JobState.PENDING
    reason: str = ""
    plan: JobPlan | None = None
    nodes: dict[str, NodeStatus] = field(default_factory=dict)  # "0.0", ..., "dispatcher"
    ports: dict[str, tuple[int, ...]] = field(default_factory=dict)  # agent id -> ports held there
    dispatcher_agent: str = ""
    dispatcher_port: int = 0
    service_token: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    # Monotonic: deploying -> ready deadline; stopping -> grace end; failed -> when resources free.
    deadline: float = float("inf")
    # The latest Metrics per agent and when it arrived (monotonic): bounded by the job's agents.
    metrics: dict[str, tuple[float, Metrics]] = field(default_factory=dict)
    # Loaded after a controller restart: agents of this job that have not registered again yet.
    awaiting: set[str] = field(default_factory=set)
    adopt_deadline: float = float("inf")  # monotonic
    recovery: Recovery = field(default_factory=lambda: _recovery())  # controller/recovery.py

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def agents(self) -> list[str]:
        return sorted({s.agent for s in self.nodes.values()})

    @property
    def drained(self) -> bool:
        return all(s.state in GONE for s in self.nodes.values())

    def holds_resources(self, now: float) -> bool:
        """Devices and ports stay taken while processes may still run on them."""
        if self.state in LIVE:
            return True
        return self.state in (JobState.FAILED, JobState.STOPPED) and not self.drained and now < self.deadline

    def record(self) -> JobRecord:
        """The database row of this job (controller/store.py)."""
        return JobRecord(
            self.id, self.name, self.created, self.source.file_name, self.source.text, self.source.name_override,
            len(self.unit_weights), list(self.unit_weights), str(self.state), self.reason,
            plan_to_dict(self.plan) if self.plan is not None else None,
            {n: {"agent": s.agent, "device": s.device, "state": s.state, "pid": s.pid, "reason": s.reason,
                 "retiring": s.retiring} for n, s in self.nodes.items()},
            {a: list(p) for a, p in self.ports.items()}, self.dispatcher_agent, self.dispatcher_port,
            self.service_token)

    def describe(self) -> str:
        return f"job {self.id} is {self.state}" + (f": {self.reason}" if self.reason else "")

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "state": str(self.state), "reason": self.reason,
                "created": self.created}

    def detail(self) -> dict[str, Any]:
        # After live scaling the plan, not the submitted file, says how many replicas a stage has.
        counts = ([s.replicas for s in self.plan.stages] if self.plan is not None
                  else list(self.cfg.pipeline.replicas))
        stages = [{"index": i, "first_unit": a, "last_unit": b, "replicas": counts[i]}
                  for i, (a, b) in enumerate(self.ranges)]
        nodes = [{"node": name, "agent": s.agent, "device": s.device, "state": s.state, "pid": s.pid,
                  "reason": s.reason} for name, s in self.nodes.items()]
        return {**self.summary(), "model": self.cfg.model.source, "placement": self.cfg.placement.policy,
                "epoch": self.plan.epoch if self.plan is not None else 0, "stages": stages, "nodes": nodes,
                "dispatcher": {"agent": self.dispatcher_agent, "port": self.dispatcher_port}
                if self.dispatcher_agent else None,
                "edges": [{"src": str(e.src), "dst": str(e.dst), "host": e.host, "port": e.port}
                          for e in self.plan.edges] if self.plan is not None else []}
