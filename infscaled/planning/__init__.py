"""Turn a job's shape (stage ranges, replicas, graph, devices, ports) into a `JobPlan`.

Everything here is pure except `ports.free_ports`: the caller allocates `edge_count(...)` ports
and passes them to `make_plan`, which assigns them to edges in edge order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from infscaled.planning.graph import GRAPHS, build_edges, check_paths, downstream, upstream
from infscaled.planning.partition import balance, check_cover, stage_weights
from infscaled.planning.placement import normalise_device, place
from infscaled.protocol.plan import DISPATCHER, EdgePlan, GenerationPlan, JobPlan, Node, StagePlan, WorkerPlan
from infscaled.routing.policies import POLICIES

__all__ = [
    "GRAPHS",
    "balance",
    "build_edges",
    "check_cover",
    "check_paths",
    "downstream",
    "edge_count",
    "make_plan",
    "place",
    "stage_weights",
    "upstream",
]


def edge_count(
    replicas: Sequence[int],
    graph: str,
    explicit_edges: Sequence[tuple[Node, Node]] = (),
    extra_edges: Sequence[tuple[Node, Node]] = (),
) -> int:
    """How many edges (hence ports) `make_plan` will need for this shape."""
    return len(build_edges(replicas, graph, explicit_edges, extra_edges))


def make_plan(
    *,
    job: str,
    model_source: str,
    dtype: str,
    seed: int,
    ranges: Sequence[tuple[int, int]],
    replicas: Sequence[int],
    graph: str,
    explicit_edges: Sequence[tuple[Node, Node]],
    devices: Sequence[str],
    policy: str,
    micro_batch_size: int,
    max_inflight: int,
    max_wait_ms: float,
    edge_timeout_s: float,
    host: str,
    ports: Sequence[int],
    base_dir: str = ".",
    extra_edges: Sequence[tuple[Node, Node]] = (),
    hosts: Mapping[Node, str] | None = None,
    generation: GenerationPlan | None = None,
    cuda_graphs: bool = True,
    compile_layers: bool = False,
) -> JobPlan:
    """Assemble a JobPlan. `devices` has one entry per replica, stage-major (see `place`);
    `ports` has one per edge in `build_edges` order (see `edge_count`). `hosts` places nodes
    (the dispatcher included) on hosts' addresses; a node missing from it gets `host`. An edge's
    store lives with its sender, so it takes the sender's address.

    Raises ValueError if the shape is inconsistent (ranges vs replicas, stranded replicas,
    unknown policy, wrong device count, a port repeated on one host).
    """
    if len(ranges) != len(replicas):
        raise ValueError(f"{len(ranges)} stage ranges but {len(replicas)} replica counts; give one per stage")
    if ranges:
        check_cover(ranges, ranges[-1][1] + 1)
    if policy not in POLICIES:
        raise ValueError(f"unknown routing policy {policy!r}; allowed: {', '.join(POLICIES)}")
    edges = build_edges(replicas, graph, explicit_edges, extra_edges)
    check_paths(edges, replicas)
    assert len(ports) == len(edges), f"make_plan: {len(ports)} ports for {len(edges)} edges (use edge_count)"
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
        job=job,
        model_source=model_source,
        dtype=dtype,
        seed=seed,
        stages=stages,
        workers=workers,
        edges=edge_plans,
        policy=policy,
        micro_batch_size=micro_batch_size,
        max_inflight=max_inflight,
        max_wait_ms=max_wait_ms,
        edge_timeout_s=edge_timeout_s,
        dispatcher_host=where.get(DISPATCHER, host),
        base_dir=base_dir,
        generation=generation,
        cuda_graphs=cuda_graphs,
        compile_layers=compile_layers,
        graph=graph,
    )
