"""The data-plane graph: which node sends micro-batches to which.

Nodes are stage replicas plus the dispatcher, which both feeds stage 0 and collects from the
last stage. Edges are directed (src, dst) pairs, always returned sorted so every role that
derives them from the same inputs agrees on their order (and hence on their ports).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from infscaled.protocol.plan import DISPATCHER, Node

GRAPHS = ("mesh", "parallel", "explicit")

Edge = tuple[Node, Node]


def stage_nodes(replicas: Sequence[int]) -> tuple[Node, ...]:
    """Every stage replica, stage-major (0.0, 0.1, 1.0, ...)."""
    return tuple(Node(stage, r) for stage, count in enumerate(replicas) for r in range(count))


def build_edges(
    replicas: Sequence[int],
    graph: str,
    explicit: Sequence[Edge] = (),
    extra: Sequence[Edge] = (),
) -> tuple[Edge, ...]:
    """The directed edges of the data plane, dispatcher edges included, sorted by (src, dst).

    DISPATCHER -> every stage-0 replica and every last-stage replica -> DISPATCHER always.
    Between stage i and i+1: "mesh" links every pair, "parallel" links replica k to replica k
    (equal replica counts required), "explicit" uses exactly the `explicit` pairs (which must
    join consecutive stages; dispatcher edges in it are accepted and deduplicated).
    `extra` edges are added as given, for shapes beyond a forward chain (e.g. a decode loop from
    the last stage back to the first); only their endpoints are checked.

    Raises ValueError on an unknown graph, bad replica counts or edges naming absent nodes.
    """
    _check_replicas(replicas)
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph {graph!r}; allowed: {', '.join(GRAPHS)}")
    if explicit and graph != "explicit":
        raise ValueError(f"explicit edges were given but graph is {graph!r}; set graph = 'explicit'")
    last = len(replicas) - 1
    edges: set[Edge] = {(DISPATCHER, Node(0, r)) for r in range(replicas[0])}
    edges |= {(Node(last, r), DISPATCHER) for r in range(replicas[last])}

    for stage in range(last):
        here, there = replicas[stage], replicas[stage + 1]
        if graph == "mesh":
            edges |= {(Node(stage, a), Node(stage + 1, b)) for a in range(here) for b in range(there)}
        elif graph == "parallel":
            if here != there:
                raise ValueError(
                    f"graph 'parallel' needs equal replica counts, but stage {stage} has {here} "
                    f"and stage {stage + 1} has {there}; use 'mesh' or 'explicit'"
                )
            edges |= {(Node(stage, k), Node(stage + 1, k)) for k in range(here)}

    if graph == "explicit":
        for src, dst in explicit:
            _check_explicit(src, dst, replicas)
            edges.add((src, dst))
    for src, dst in extra:
        _check_nodes(src, dst, replicas)
        edges.add((src, dst))
    return tuple(sorted(edges))


def downstream(edges: Iterable[Edge], node: Node) -> tuple[Node, ...]:
    """Nodes that `node` sends to, sorted."""
    return tuple(sorted({dst for src, dst in edges if src == node}))


def upstream(edges: Iterable[Edge], node: Node) -> tuple[Node, ...]:
    """Nodes that send to `node`, sorted."""
    return tuple(sorted({src for src, dst in edges if dst == node}))


def check_paths(edges: Sequence[Edge], replicas: Sequence[int]) -> None:
    """Raise ValueError naming a stage replica that lies on no path dispatcher -> ... -> dispatcher.

    A replica is on such a path iff the dispatcher reaches it and it reaches the dispatcher.
    """
    _check_replicas(replicas)
    nodes = stage_nodes(replicas)
    known = set(nodes) | {DISPATCHER}
    for src, dst in edges:
        for n in (src, dst):
            if n not in known:
                raise ValueError(f"edge {src}->{dst} names {n}, which is not a node of this job")
    fed = _reachable(edges, forward=True)
    drains = _reachable(edges, forward=False)
    for n in nodes:
        if n not in fed:
            raise ValueError(f"replica {n} is stranded: no path from the dispatcher reaches it")
        if n not in drains:
            raise ValueError(f"replica {n} is stranded: no path leads from it back to the dispatcher")


def _reachable(edges: Sequence[Edge], *, forward: bool) -> set[Node]:
    """Nodes reachable from the dispatcher following edges forwards (or backwards)."""
    step: dict[Node, list[Node]] = {}
    for src, dst in edges:
        a, b = (src, dst) if forward else (dst, src)
        step.setdefault(a, []).append(b)
    seen = {DISPATCHER}
    todo = [DISPATCHER]
    while todo:
        for nxt in step.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _check_replicas(replicas: Sequence[int]) -> None:
    if not replicas:
        raise ValueError("a job needs at least one stage")
    for stage, count in enumerate(replicas):
        if count < 1:
            raise ValueError(f"stage {stage} has {count} replicas; each stage needs at least 1")


def _check_nodes(src: Node, dst: Node, replicas: Sequence[int]) -> None:
    for n in (src, dst):
        if not n.is_dispatcher and not (0 <= n.stage < len(replicas) and 0 <= n.replica < replicas[n.stage]):
            raise ValueError(f"edge {src}->{dst} names {n}, which is not a node of this job")
    if src == dst:
        raise ValueError(f"edge {src}->{dst} is a self-loop")


def _check_explicit(src: Node, dst: Node, replicas: Sequence[int]) -> None:
    _check_nodes(src, dst, replicas)
    last = len(replicas) - 1
    if src.is_dispatcher and dst.stage == 0:
        return
    if dst.is_dispatcher and src.stage == last:
        return
    if not src.is_dispatcher and not dst.is_dispatcher and dst.stage == src.stage + 1:
        return
    raise ValueError(
        f"explicit edge {src}->{dst} must join consecutive stages (i -> i+1), "
        f"the dispatcher to stage 0, or stage {last} to the dispatcher"
    )
