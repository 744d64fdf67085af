"""Live scaling as pure functions: the next epoch's plan and what each running node must change.

`scale_shape` decides which replicas come and go; the caller then finds a device per new
replica and a port per new edge (on the sender's host) and calls `apply_scale`, which returns
the new plan and one `TopologyUpdate` per running node concerned (protocol/topology.py says
what applying one means). Nothing here starts, stops or connects anything.

- Forward jobs scale one stage. New replicas link to every replica of the neighbouring stages
  (so only `mesh` graphs can be scaled: a `parallel` or `explicit` graph has no rule for where
  a new replica fits), and to the dispatcher when they are in the first or last stage.
- Generation jobs scale whole replica chains (every stage at once, with its decode loop).
- Replica ids are never reused within a job: a new replica takes the stage's highest id + 1, so
  an edge key always names one edge; scaling down removes the highest ids first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from infscaled.protocol.plan import DISPATCHER, EdgePlan, JobPlan, Node, WorkerPlan
from infscaled.protocol.topology import TopologyUpdate

MAX_REPLICAS_PER_STAGE = 256


class ScaleError(ValueError):
    """A scaling request that cannot be carried out; the message says why and what is allowed."""


@dataclass(frozen=True)
class ScaleShape:
    """Which replicas a scaling request adds and removes, and the new edges (no ports yet)."""

    stage: int | None  # None: a generation job's whole chains
    added: tuple[Node, ...]
    removed: tuple[Node, ...]
    new_edges: tuple[tuple[Node, Node], ...]

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


@dataclass(frozen=True)
class ScaleChange:
    plan: JobPlan  # the new epoch's plan: new replicas are started with it
    added: tuple[WorkerPlan, ...]
    removed: tuple[Node, ...]
    updates: Mapping[Node, TopologyUpdate] = field(default_factory=dict)  # running nodes (dispatcher too)


def scale_shape(plan: JobPlan, stage: int | None, replicas: int) -> ScaleShape:
    """What scaling `stage` (forward) or the chains (generation: `stage` None) to `replicas` means."""
    if not 1 <= replicas <= MAX_REPLICAS_PER_STAGE:
        raise ScaleError(f"replicas = {replicas}: allowed 1..{MAX_REPLICAS_PER_STAGE}")
    if plan.generation is not None:
        if stage is not None:
            raise ScaleError("a generation job scales whole replica chains (every stage at once): give no stage")
        return _chains(plan, replicas)
    if stage is None:
        raise ScaleError(f"name the stage to scale: 0..{plan.last_stage}")
    if not 0 <= stage <= plan.last_stage:
        raise ScaleError(f"stage {stage} does not exist: job {plan.job} has stages 0..{plan.last_stage}")
    if plan.graph != "mesh":
        raise ScaleError(f"job {plan.job} has a {plan.graph!r} graph; only 'mesh' graphs can be scaled while "
                         "serving (a new replica links to every replica of the neighbouring stages)")
    now = plan.nodes(stage)
    if replicas < len(now):
        return ScaleShape(stage, (), tuple(sorted(now, reverse=True)[:len(now) - replicas]), ())
    first = plan.fresh_replica(stage)
    added = tuple(Node(stage, first + i) for i in range(replicas - len(now)))
    ups = (DISPATCHER,) if stage == 0 else plan.nodes(stage - 1)
    downs = (DISPATCHER,) if stage == plan.last_stage else plan.nodes(stage + 1)
    edges = [(u, n) for n in added for u in ups] + [(n, d) for n in added for d in downs]
    return ScaleShape(stage, added, (), tuple(edges))


def _chains(plan: JobPlan, chains: int) -> ScaleShape:
    heads = plan.nodes(0)
    if chains < len(heads):
        gone = sorted((n.replica for n in heads), reverse=True)[:len(heads) - chains]
        return ScaleShape(None, (), tuple(Node(s, r) for r in gone for s in range(len(plan.stages))), ())
    first = max(plan.fresh_replica(s) for s in range(len(plan.stages)))  # a chain has one id on every stage
    added, edges = chain_edges(first, chains - len(heads), plan.last_stage)
    return ScaleShape(None, added, (), edges)


def chain_edges(first: int, count: int, last_stage: int) -> tuple[tuple[Node, ...], tuple[tuple[Node, Node], ...]]:
    """`count` new generation chains with ids first.. : their nodes and edges (with the decode loop)."""
    added: list[Node] = []
    edges: list[tuple[Node, Node]] = []
    for r in range(first, first + count):
        chain = [Node(s, r) for s in range(last_stage + 1)]
        added += chain
        edges += [(DISPATCHER, chain[0]), (chain[-1], DISPATCHER)]
        edges += [(a, b) for a, b in zip(chain, chain[1:], strict=False)]
        if last_stage > 0:
            edges.append((chain[-1], chain[0]))  # the decode loop
    return tuple(added), tuple(edges)


def apply_scale(plan: JobPlan, shape: ScaleShape, devices: Mapping[Node, str], ports: Sequence[int],
                hosts: Mapping[Node, str] | None = None) -> ScaleChange:
    """The new epoch: `devices` has one device per added replica, `ports` one per new edge (in
    `shape.new_edges` order), `hosts` the address of each added replica (default: the host of
    the stage's replica with the lowest id, which is where its edges' stores would live too)."""
    if len(ports) != len(shape.new_edges):
        raise ScaleError(f"{len(shape.new_edges)} new edges need as many ports, got {len(ports)}")
    where = dict(hosts or {})
    epoch = plan.epoch + 1

    def host_of(node: Node) -> str:
        if node.is_dispatcher:
            return plan.dispatcher_host
        if node in where:
            return where[node]
        return plan.worker(node).host if any(w.node == node for w in plan.workers) else \
            plan.worker(plan.nodes(node.stage)[0]).host

    added = tuple(WorkerPlan(n, devices[n], host_of(n)) for n in shape.added)
    new_edges = tuple(EdgePlan(src, dst, host_of(src), port) for (src, dst), port in
                      zip(shape.new_edges, ports, strict=True))
    gone = set(shape.removed)
    kept_edges = tuple(e for e in plan.edges if e.src not in gone and e.dst not in gone)
    workers = tuple(w for w in plan.workers if w.node not in gone) + added
    stages = tuple(replace(s, replicas=sum(1 for w in workers if w.node.stage == s.index)) for s in plan.stages)
    fresh = [max([plan.fresh_replica(s.index)] + [n.replica + 1 for n in shape.added if n.stage == s.index])
             for s in plan.stages]
    new_plan = replace(plan, workers=workers, edges=kept_edges + new_edges, stages=stages, epoch=epoch,
                       next_replica=tuple(fresh))

    adds: dict[Node, list[EdgePlan]] = {}
    removes: dict[Node, list[str]] = {}
    running = {w.node for w in plan.workers} | {DISPATCHER}
    for e in new_edges:
        for end in (e.src, e.dst):
            if end in running:
                adds.setdefault(end, []).append(e)
    for e in plan.edges:
        if e.dst in gone and e.src not in gone:
            removes.setdefault(e.src, []).append(e.key)  # the sender drains it; the rest follows
    updates = {n: TopologyUpdate(epoch, tuple(adds.get(n, ())), tuple(removes.get(n, ())))
               for n in sorted(set(adds) | set(removes))}
    return ScaleChange(new_plan, added, tuple(shape.removed), updates)

