"""Hard limits on what one job file may ask for, checked while parsing, before anything is
computed from the numbers or allocated (a `replicas = [1, 12000000]` is refused at once, not
after building twelve million placement entries). Far above any real cluster, far below
what could stall a controller: planning work grows with workers and edges."""

from __future__ import annotations

from typing import Final

MAX_STAGES: Final = 512
MAX_REPLICAS_PER_STAGE: Final = 1024
MAX_WORKERS: Final = 4096  # stage replicas of one job, all stages together
MAX_EDGES: Final = 65_536  # data-plane edges of one job (mesh: replicas of neighbours multiplied)
MAX_JOB_FILE_BYTES: Final = 1 << 20  # a job file's TOML text
MAX_NESTING: Final = 64  # brackets / braces deep, in a JSON body or a job file
# generation.warmup_s; each worker also caps its warm-up at half the time left before its READY
# timeout (worker/entry.py), which a job file cannot see.
MAX_WARMUP_S: Final = 3600.0


def mesh_edge_count(replicas: tuple[int, ...]) -> int:
    """Edges of a mesh over `replicas` (the densest graph), dispatcher edges included."""
    return replicas[0] + replicas[-1] + sum(a * b for a, b in zip(replicas, replicas[1:], strict=False))
