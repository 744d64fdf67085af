"""Checks of `pipeline.graph` and `pipeline.edges` against the stage replica counts."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from infscaled.config.messages import MISSING
from infscaled.config.values import Section, check_list

Edge = tuple[str, str]

_NODE = re.compile(r"^(\d+)\.(\d+)$")
_EDGES_ALLOWED = (
    'a list of ["STAGE.REPLICA", "STAGE.REPLICA"] pairs from stage i to stage i+1, '
    'e.g. [["0.0", "1.0"], ["0.1", "1.1"]]'
)
_COVER_ALLOWED = (
    "edges that give every replica of stages 1..n-1 an incoming edge "
    "and every replica of stages 0..n-2 an outgoing edge"
)


def _layout(replicas: Sequence[int]) -> str:
    return f"the pipeline has stages 0..{len(replicas) - 1} with replicas {list(replicas)}"


def _parse_node(sec: Section, key: str, pair: Any, text: Any, replicas: Sequence[int]) -> tuple[int, int]:
    match = _NODE.match(text) if isinstance(text, str) else None
    if match is None:
        raise sec.error(key, pair, _EDGES_ALLOWED, f"{text!r} is not a node name 'STAGE.REPLICA'")
    stage, replica = int(match[1]), int(match[2])
    if stage >= len(replicas) or replica >= replicas[stage]:
        raise sec.error(
            key, pair, _EDGES_ALLOWED, f"node {stage}.{replica} does not exist; {_layout(replicas)}"
        )
    return stage, replica


def check_topology(sec: Section, graph: str, replicas: Sequence[int]) -> tuple[Edge, ...]:
    """Validate graph against replicas and return the canonical explicit edges (empty otherwise)."""
    raw = sec.raw("edges")
    if graph == "parallel" and len(set(replicas)) > 1:
        raise sec.error(
            "graph",
            graph,
            "'parallel' with equal replica counts, or 'mesh' / 'explicit'",
            f"needs the same replica count in every stage, got replicas = {list(replicas)}",
        )
    if graph != "explicit":
        if raw is not MISSING:
            raise sec.error(
                "edges",
                raw,
                "no edges unless graph = 'explicit'",
                f"edges are only used with graph = 'explicit' (graph is {graph!r})",
            )
        return ()
    if len(replicas) < 2:
        raise sec.error(
            "graph",
            graph,
            "'mesh' or 'parallel' for a single stage",
            "a single stage has no stage-to-stage edges to list",
        )
    if raw is MISSING:
        raise sec.error("edges", MISSING, _EDGES_ALLOWED, "graph = 'explicit' needs edges")
    items = check_list(sec.path, sec.key("edges"), raw, _EDGES_ALLOWED)
    if not items:
        raise sec.error("edges", raw, _EDGES_ALLOWED, "graph = 'explicit' needs at least one edge")

    edges: list[Edge] = []
    for i, pair in enumerate(items):
        key = f"edges[{i}]"
        if not isinstance(pair, list) or len(pair) != 2:
            raise sec.error(key, pair, _EDGES_ALLOWED, "expected a [source, destination] pair")
        src = _parse_node(sec, key, pair, pair[0], replicas)
        dst = _parse_node(sec, key, pair, pair[1], replicas)
        if dst[0] != src[0] + 1:
            raise sec.error(
                key,
                pair,
                _EDGES_ALLOWED,
                f"edges must go from stage i to stage i+1, this one goes {src[0]} -> {dst[0]}",
            )
        edge = (f"{src[0]}.{src[1]}", f"{dst[0]}.{dst[1]}")
        if edge in edges:
            raise sec.error(key, pair, _EDGES_ALLOWED, "duplicate edge")
        edges.append(edge)

    sources = {src for src, _ in edges}
    targets = {dst for _, dst in edges}
    last = len(replicas) - 1
    for stage, count in enumerate(replicas):
        for replica in range(count):
            node = f"{stage}.{replica}"
            if stage > 0 and node not in targets:
                raise sec.error("edges", raw, _COVER_ALLOWED, f"replica {node} has no incoming edge")
            if stage < last and node not in sources:
                raise sec.error("edges", raw, _COVER_ALLOWED, f"replica {node} has no outgoing edge")
    return tuple(edges)
