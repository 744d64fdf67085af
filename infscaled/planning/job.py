"""From a validated job config and what the model looks like to a JobPlan (pure, no torch).

`infscaled run` (one host) and the controller (many hosts) both plan through here, so a
job file means the same pipeline, and fails with the same message, whichever runs it. The
config travels whole: every plan field is read from it here, in one place, rather than
unpacked by each caller into a long argument list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from infscaled.config import JobConfig, check_against_model, check_builtin
from infscaled.planning.graph import build_edges, check_paths
from infscaled.planning.partition import balance, check_cover
from infscaled.planning.placement import normalise_device
from infscaled.protocol.plan import DISPATCHER, EdgePlan, GenerationPlan, JobPlan, Node, StagePlan, WorkerPlan
from infscaled.routing.policies import POLICIES


def check_model(cfg: JobConfig, unit_count: int, builtin_names: Sequence[str]) -> JobConfig:
    """The model-aware checks (builtin name, unit ranges vs the real unit count): ConfigError."""
    if cfg.model.source.startswith("builtin:"):
        check_builtin(cfg, builtin_names)
    return check_against_model(cfg, unit_count)


def stage_ranges(cfg: JobConfig, unit_weights: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The file's `layers`, or `stages` balanced by parameter count."""
    pipe = cfg.pipeline
    if pipe.layers is not None:
        return tuple(pipe.layers)
    return balance(unit_weights, pipe.stage_count)


def explicit_edges(cfg: JobConfig) -> tuple[tuple[Node, Node], ...]:
    return tuple((Node.parse(a), Node.parse(b)) for a, b in cfg.pipeline.edges)


def loop_edges(cfg: JobConfig) -> tuple[tuple[Node, Node], ...]:
    """A generation job's decode loop: last stage -> first stage of each replica chain (none with
    one stage: that stage feeds its own tokens back)."""
    replicas = cfg.pipeline.replicas
    if cfg.generation is None or len(replicas) < 2:
        return ()
    last = len(replicas) - 1
    return tuple((Node(last, r), Node(0, r)) for r in range(replicas[0]))


def job_edges(cfg: JobConfig) -> tuple[tuple[Node, Node], ...]:
    """The job's data-plane edges in port order (`build_edges` order, decode loop included)."""
    pipe = cfg.pipeline
    return build_edges(pipe.replicas, pipe.graph, explicit_edges(cfg), loop_edges(cfg))


def generation_plan(cfg: JobConfig) -> GenerationPlan | None:
    gen = cfg.generation
    if gen is None:
        return None
    return GenerationPlan(gen.kv_budget_tokens, gen.max_batch_sequences, micro_batches_in_flight(cfg),
                          gen.max_new_tokens, gen.prefill_chunk_tokens, gen.warmup_s)


def micro_batches_in_flight(cfg: JobConfig) -> int:
    """generation.micro_batches_in_flight, else one per stage and at least 2. A one-stage chain
    runs a step ahead of its host either way (engine/programs/generation.py `_run_ahead`); measured
    on an H200 under Poisson arrivals, 2 kept TTFT p50 at 123 ms where 1 let it reach 610 ms, and
    with a closed loop the two were within 5 % (BENCHMARKS.md section 23)."""
    assert cfg.generation is not None
    return cfg.generation.micro_batches_in_flight or max(2, cfg.pipeline.stage_count)


def ports_needed(cfg: JobConfig) -> int:
    """How many edges (hence ports) `make_plan` will need for this job."""
    return len(job_edges(cfg))


def make_plan(cfg: JobConfig, ranges: Sequence[tuple[int, int]], devices: Sequence[str], ports: Sequence[int],
              host: str, hosts: Mapping[Node, str] | None = None) -> JobPlan:
    """Assemble the JobPlan of `cfg` with its stages cut at `ranges` (one per stage, see
    `stage_ranges`). `devices` has one entry per replica, stage-major (see `place`); `ports` one
    per edge in `job_edges` order (see `ports_needed`). `hosts` places nodes (the dispatcher
    included) on hosts' addresses; a node missing from it gets `host`. An edge's store lives
    with its sender, so it takes the sender's address.

    Raises ValueError if the shape is inconsistent (ranges vs replicas, stranded replicas,
    unknown policy, wrong device count, a port repeated on one host).
    """
    pipe = cfg.pipeline
    replicas = pipe.replicas
    if len(ranges) != len(replicas):
        raise ValueError(f"{len(ranges)} stage ranges but {len(replicas)} replica counts; give one per stage")
    if ranges:
        check_cover(ranges, ranges[-1][1] + 1)
    if pipe.policy not in POLICIES:
        raise ValueError(f"unknown routing policy {pipe.policy!r}; allowed: {', '.join(POLICIES)}")
    edges = job_edges(cfg)
    check_paths(edges, replicas)
    assert len(ports) == len(edges), f"make_plan: {len(ports)} ports for {len(edges)} edges (use ports_needed)"
    where = dict(hosts or {})
    # Each edge's store listens on its sender's host: ports need only be distinct per host
    # (agents on different hosts may share a port range).
    endpoints = [(where.get(src, host), port) for (src, _), port in zip(edges, ports, strict=True)]
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"edge ports must be distinct per host, got {[f'{h}:{p}' for h, p in endpoints]}")
    if len(devices) != sum(replicas):
        raise ValueError(f"{len(devices)} devices for {sum(replicas)} stage replicas; give one per replica")

    stages = tuple(
        StagePlan(index=i, first_unit=first, last_unit=last, replicas=count)
        for i, ((first, last), count) in enumerate(zip(ranges, replicas, strict=True))
    )
    nodes = [Node(stage, r) for stage, count in enumerate(replicas) for r in range(count)]
    workers = tuple(
        WorkerPlan(node=node, device=normalise_device(device), host=where.get(node, host))
        for node, device in zip(nodes, devices, strict=True)
    )
    edge_plans = tuple(
        EdgePlan(src=src, dst=dst, host=where.get(src, host), port=port)
        for (src, dst), port in zip(edges, ports, strict=True)
    )
    return JobPlan(
        job=cfg.name,
        model_source=cfg.model.source,
        dtype=cfg.model.dtype,
        seed=cfg.model.seed,
        stages=stages,
        workers=workers,
        edges=edge_plans,
        policy=pipe.policy,
        micro_batch_size=pipe.micro_batch_size,
        max_inflight=pipe.max_inflight,
        max_wait_ms=pipe.max_wait_ms,
        edge_timeout_s=pipe.edge_timeout_s,
        dispatcher_host=where.get(DISPATCHER, host),
        base_dir=cfg.base_dir,
        generation=generation_plan(cfg),
        cuda_graphs=pipe.cuda_graphs,
        compile_layers=pipe.compile,
        graph=pipe.graph,
        recovery=cfg.recovery,
    )


def plan_job(cfg: JobConfig, unit_weights: Sequence[int], devices: Sequence[str], ports: Sequence[int],
             host: str, hosts: Mapping[Node, str] | None = None) -> JobPlan:
    """The plan for a job already checked with `check_model`, its stages balanced over
    `unit_weights` (or cut at the file's `layers`); the rest as `make_plan`."""
    return make_plan(cfg, stage_ranges(cfg, unit_weights), devices, ports, host, hosts)
