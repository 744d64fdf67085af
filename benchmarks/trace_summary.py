"""Summarise a stage's Chrome trace (torch profiler): where GPU time goes, and whether the NCCL
kernels overlap compute.

    python -m benchmarks.trace_summary out/gpu/stage-0.0.json [...]

For each trace: the window from the first to the last GPU kernel; per CUDA stream, the number of
kernels and their busy time; NCCL kernels (name contains "nccl"): total time and the fraction of
it during which a non-NCCL kernel ran on another stream (overlap); the compute stream's idle
gaps (the GPU time the stage was not computing).
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _overlap(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            total += b - a
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarise(path: str) -> dict[str, Any]:
    with open(path) as f:
        events = json.load(f).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return {"trace": path, "kernels": 0}
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    streams: dict[str, list[tuple[float, float]]] = {}
    nccl: list[tuple[float, float]] = []
    compute: list[tuple[float, float]] = []
    names: dict[str, float] = {}
    for e in kernels:
        iv = (float(e["ts"]), float(e["ts"] + e["dur"]))
        stream = str(e.get("args", {}).get("stream", e.get("tid")))
        streams.setdefault(stream, []).append(iv)
        if "nccl" in e["name"].lower():
            nccl.append(iv)
        else:
            compute.append(iv)
            short = e["name"].split("<")[0][:60]
            names[short] = names.get(short, 0.0) + e["dur"]
    window = end - start
    nccl_m, compute_m = _merge(nccl), _merge(compute)
    nccl_total = sum(b - a for a, b in nccl_m)
    compute_busy = sum(b - a for a, b in compute_m)
    per_stream = {s: {"kernels": len(v), "busy_ms": sum(b - a for a, b in _merge(v)) / 1e3}
                  for s, v in sorted(streams.items(), key=lambda kv: -len(kv[1]))}
    top = sorted(names.items(), key=lambda kv: -kv[1])[:6]
    return {
        "trace": path, "kernels": len(kernels), "window_ms": window / 1e3,
        "compute_busy_ms": compute_busy / 1e3, "compute_busy_frac": compute_busy / window,
        "nccl_kernels": len(nccl), "nccl_ms": nccl_total / 1e3,
        "nccl_overlapped_frac": _overlap(nccl_m, compute_m) / nccl_total if nccl_total else None,
        "streams": per_stream, "top_compute_kernels_ms": {k: v / 1e3 for k, v in top},
    }


def main() -> None:
    for path in sys.argv[1:]:
        s = summarise(path)
        print(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
