"""A job's execution plan: plain, immutable data shared by every role (no torch here).

The launcher (and later the controller) turns a validated job config into a `JobPlan`;
each worker receives the whole plan and picks out its own node, its edges and its units.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

DISPATCHER_STAGE = -1


@dataclass(frozen=True, order=True)
class Node:
    """One endpoint of the data plane: a stage replica, or the dispatcher (stage -1)."""

    stage: int
    replica: int

    @property
    def is_dispatcher(self) -> bool:
        return self.stage == DISPATCHER_STAGE

    def __str__(self) -> str:
        return "dispatcher" if self.is_dispatcher else f"{self.stage}.{self.replica}"

    @staticmethod
    def parse(text: str) -> Node:
        """Parse "dispatcher" or "STAGE.REPLICA" (e.g. "1.0"); raises ValueError otherwise."""
        if text == "dispatcher":
            return DISPATCHER
        stage_s, dot, replica_s = text.partition(".")
        if not dot or not stage_s.isdigit() or not replica_s.isdigit():
            raise ValueError(f"not a node name: {text!r} (expected 'dispatcher' or 'STAGE.REPLICA')")
        return Node(int(stage_s), int(replica_s))


DISPATCHER = Node(DISPATCHER_STAGE, 0)


@dataclass(frozen=True)
class EdgePlan:
    """A directed data-plane edge with its own two-rank process group.

    The sender (rank 0) listens at host:port while the edge is joined; the receiver (rank 1)
    connects to it (worker/transport.py). Data flows src -> dst; acknowledgements flow back.
    """

    src: Node
    dst: Node
    host: str
    port: int

    @property
    def key(self) -> str:
        return f"{self.src}->{self.dst}"


@dataclass(frozen=True)
class StagePlan:
    """Stage `index` runs units first_unit..last_unit (inclusive) on `replicas` workers."""

    index: int
    first_unit: int
    last_unit: int
    replicas: int

    @property
    def units(self) -> range:
        return range(self.first_unit, self.last_unit + 1)


@dataclass(frozen=True)
class WorkerPlan:
    """Where one stage replica runs: its device ("cpu", "cuda:1") and the host it binds to."""

    node: Node
    device: str
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class GenerationPlan:
    """A generation job's decode loop: edges last stage -> first stage close each replica chain."""

    kv_budget_tokens: int  # per stage replica
    max_batch_sequences: int
    micro_batches_in_flight: int  # per chain, >= 1
    default_max_new_tokens: int = 16  # when a request does not say
    prefill_chunk_tokens: int = 0  # most prompt tokens per prefill micro-batch; 0: whole prompts
    # Seconds a CUDA stage may spend before READY running and capturing the decode buckets it will
    # use (generation/warmup.py); 0 = none. A plan without it (an older writer) warms by default.
    warmup_s: float = 30.0


@dataclass(frozen=True)
class Recovery:
    """[recovery]: what the supervisors do when a replica (or the dispatcher) dies or hangs."""

    enabled: bool = True
    """Replace lost replicas and replay their work; false: the first loss fails the job (clean)."""
    attempts: int = 3
    """Replacements of one replica tried in a row that die before they serve (with backoff), then
    the job fails; one that came to serve starts its line afresh (planning.recovery.Ledger)."""
    backoff_s: float = 1.0
    """Wait before a replacement attempt after a failed one; doubles each time."""
    heartbeat_timeout_s: float = 2.0
    """A member silent this long (no heartbeat: hung, stopped) is declared dead and killed."""


@dataclass(frozen=True)
class JobPlan:
    """Everything a worker or the dispatcher needs to join a job's data plane."""

    job: str
    model_source: str
    dtype: str
    seed: int
    stages: tuple[StagePlan, ...]
    workers: tuple[WorkerPlan, ...]
    edges: tuple[EdgePlan, ...]
    policy: str
    micro_batch_size: int
    max_inflight: int
    max_wait_ms: float
    edge_timeout_s: float
    dispatcher_host: str = "127.0.0.1"
    # Directory the job file lives in; relative model paths were already resolved against it.
    base_dir: str = field(default=".")
    generation: GenerationPlan | None = None
    # CUDA stages replay their forward as CUDA graphs (worker/graphs.py); no effect on CPU stages.
    cuda_graphs: bool = True
    # CUDA stages torch.compile their decoder layers (models/stage.py compile_stage).
    compile_layers: bool = False
    # The job's data-plane secret: every edge connection proves it (worker/edgeauth.py). Made
    # fresh with each plan (the controller's, `infscaled run`'s), kept by every epoch after it;
    # it travels only inside Deploy / ChangeTopology and the controller's database.
    secret: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)
    # Bumped by every live topology change (protocol/topology.py says what an epoch guarantees).
    epoch: int = 0
    # How stages are linked (planning/graph.py): only "mesh" jobs can scale a stage while serving.
    graph: str = "mesh"
    # Per stage, the lowest replica id never used yet (empty: one past the highest in `workers`):
    # live scaling never reuses an id, so an edge key always names one edge.
    next_replica: tuple[int, ...] = ()
    recovery: Recovery = field(default_factory=Recovery)

    def fresh_replica(self, stage: int) -> int:
        """The id a replica added to `stage` gets."""
        if stage < len(self.next_replica):
            return self.next_replica[stage]
        return max(w.node.replica for w in self.workers if w.node.stage == stage) + 1

    def in_edges(self, node: Node) -> tuple[EdgePlan, ...]:
        return tuple(e for e in self.edges if e.dst == node)

    def out_edges(self, node: Node) -> tuple[EdgePlan, ...]:
        return tuple(e for e in self.edges if e.src == node)

    def worker(self, node: Node) -> WorkerPlan:
        for w in self.workers:
            if w.node == node:
                return w
        raise KeyError(f"no worker {node} in job {self.job}")

    @property
    def last_stage(self) -> int:
        return len(self.stages) - 1

    def nodes(self, stage: int) -> tuple[Node, ...]:
        """The replicas of `stage` in this epoch, by replica number."""
        return tuple(sorted(w.node for w in self.workers if w.node.stage == stage))


# -- serialisation: a plan crosses the controller -> agent websocket as plain JSON ---------------


def plan_to_dict(plan: JobPlan) -> dict[str, object]:
    """JSON-ready form of a plan (nodes as "STAGE.REPLICA" / "dispatcher" strings)."""
    return {
        "job": plan.job, "model_source": plan.model_source, "dtype": plan.dtype, "seed": plan.seed,
        "stages": [[s.index, s.first_unit, s.last_unit, s.replicas] for s in plan.stages],
        "workers": [[str(w.node), w.device, w.host] for w in plan.workers],
        "edges": [[str(e.src), str(e.dst), e.host, e.port] for e in plan.edges],
        "policy": plan.policy, "micro_batch_size": plan.micro_batch_size, "max_inflight": plan.max_inflight,
        "max_wait_ms": plan.max_wait_ms, "edge_timeout_s": plan.edge_timeout_s,
        "dispatcher_host": plan.dispatcher_host, "base_dir": plan.base_dir, "cuda_graphs": plan.cuda_graphs,
        "compile_layers": plan.compile_layers,
        "epoch": plan.epoch, "graph": plan.graph, "next_replica": list(plan.next_replica),
        "secret": plan.secret,
        "generation": None if plan.generation is None else [
            plan.generation.kv_budget_tokens, plan.generation.max_batch_sequences,
            plan.generation.micro_batches_in_flight, plan.generation.default_max_new_tokens,
            plan.generation.warmup_s, plan.generation.prefill_chunk_tokens],
        "recovery": {"enabled": plan.recovery.enabled, "attempts": plan.recovery.attempts,
                     "backoff_s": plan.recovery.backoff_s, "heartbeat_timeout_s": plan.recovery.heartbeat_timeout_s},
    }


def plan_from_dict(d: dict[str, object]) -> JobPlan:
    """Inverse of plan_to_dict; raises KeyError / ValueError / TypeError on malformed input."""
    stages = tuple(StagePlan(int(i), int(a), int(b), int(r)) for i, a, b, r in d["stages"])  # type: ignore[attr-defined]
    workers = tuple(WorkerPlan(Node.parse(n), str(dev), str(h)) for n, dev, h in d["workers"])  # type: ignore[attr-defined]
    edges = tuple(EdgePlan(Node.parse(s), Node.parse(t), str(h), int(p)) for s, t, h, p in d["edges"])  # type: ignore[attr-defined]
    return JobPlan(
        job=str(d["job"]), model_source=str(d["model_source"]), dtype=str(d["dtype"]), seed=int(d["seed"]),  # type: ignore[call-overload]
        stages=stages, workers=workers, edges=edges, policy=str(d["policy"]),
        micro_batch_size=int(d["micro_batch_size"]), max_inflight=int(d["max_inflight"]),  # type: ignore[call-overload]
        max_wait_ms=float(d["max_wait_ms"]), edge_timeout_s=float(d["edge_timeout_s"]),  # type: ignore[arg-type]
        dispatcher_host=str(d["dispatcher_host"]), base_dir=str(d["base_dir"]), cuda_graphs=_bool(d["cuda_graphs"]),
        compile_layers=_bool(d.get("compile_layers", False)),
        # A plan without one (written before secrets existed) cannot join edges: the transport
        # refuses it with a clear error rather than inventing a secret its peers do not share.
        secret=str(d.get("secret", "")),
        generation=None if d.get("generation") is None else _generation(d["generation"]),
        epoch=int(d.get("epoch", 0)), graph=str(d.get("graph", "mesh")),  # type: ignore[call-overload]
        next_replica=tuple(int(r) for r in d.get("next_replica", ())),  # type: ignore[attr-defined]
        recovery=_recovery(d.get("recovery")),
    )


def _generation(raw: object) -> GenerationPlan:
    """[kv_budget_tokens, max_batch_sequences, micro_batches_in_flight, default_max_new_tokens,
    warmup_s, prefill_chunk_tokens]: each field was appended when it came, so a plan of an older
    writer (a controller's database, an agent of another version) ends earlier, and what it lacks
    takes GenerationPlan's defaults (no warm-up field: 30 s; no chunk field: whole prompts, as
    those writers prefilled)."""
    if not isinstance(raw, list) or not 4 <= len(raw) <= 6:
        raise TypeError(f"generation: expected a list of 4 to 6 numbers, got {raw!r}")
    kv_budget, rows, in_flight, new_tokens = (int(v) for v in raw[:4])
    return GenerationPlan(kv_budget, rows, in_flight, new_tokens,
                          prefill_chunk_tokens=int(raw[5]) if len(raw) > 5 else GenerationPlan.prefill_chunk_tokens,
                          warmup_s=float(raw[4]) if len(raw) > 4 else GenerationPlan.warmup_s)


def _recovery(raw: object) -> Recovery:
    if raw is None:
        return Recovery()
    if not isinstance(raw, dict):
        raise TypeError(f"recovery: expected an object, got {type(raw).__name__}")
    return Recovery(enabled=_bool(raw["enabled"]), attempts=int(raw["attempts"]), backoff_s=float(raw["backoff_s"]),
                    heartbeat_timeout_s=float(raw["heartbeat_timeout_s"]))


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return value
