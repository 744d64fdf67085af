"""Turn a job's shape (stage ranges, replicas, graph, devices, ports) into a `JobPlan`.

Everything here is pure except `ports.free_ports`. `job.make_plan` assembles the plan from the
job's config: the caller allocates `job.ports_needed(cfg)` ports and passes them in, and they are
assigned to edges in edge order.
"""

from __future__ import annotations

from infscaled.planning.graph import GRAPHS, build_edges, check_paths, downstream, upstream
from infscaled.planning.partition import balance, check_cover, stage_weights
from infscaled.planning.placement import place

__all__ = [
    "GRAPHS",
    "balance",
    "build_edges",
    "check_cover",
    "check_paths",
    "downstream",
    "place",
    "stage_weights",
    "upstream",
]
