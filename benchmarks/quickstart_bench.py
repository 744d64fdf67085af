"""Quickstart throughput: configs/jobs/quickstart.toml through LocalJob, closed loop, repeated.

Each repeat starts a fresh job (start-up not timed), sends a warm-up, then the measured
requests with the job's closed-loop concurrency (micro_batch_size * max_inflight, as
`infscaled run` uses). Per-stage busy is the stage's own compute time over its wall time
since its first micro-batch, warm-up included, exactly as `infscaled run` reports it.

    python -m benchmarks.quickstart_bench [--quick] [--out out/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from infscaled.config import load_job
from infscaled.runner.launcher import LocalJob, prepare
from infscaled.runner.summary import percentile
from infscaled.runner.workload import drive, requests_for

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "configs" / "jobs" / "quickstart.toml"
REPEATS = 3


def one_repeat(warmup: int, requests: int) -> dict[str, Any]:
    cfg = load_job(JOB)
    prepared = prepare(cfg)
    wl = cfg.workload
    concurrency = wl.concurrency or cfg.pipeline.micro_batch_size * cfg.pipeline.max_inflight
    # Lists, not one shared iterator: drive() reads one element past `count`.
    reqs = list(requests_for(wl, prepared.spec, warmup + requests))
    load_before = os.getloadavg()[0]
    with LocalJob(prepared) as job:
        drive(job.submit, iter(reqs[:warmup]), warmup, wl.rate, concurrency)
        run = drive(job.submit, iter(reqs[warmup:]), requests, wl.rate, concurrency)
        job.stop()
        stages = sorted((h.stats for h in job.state.workers.values() if h.stats is not None), key=lambda s: s.node)
        failure = job.state.failure
    done = run.completed
    lat_ms = [o.latency_s * 1e3 for o in done]
    samples = sum(o.request.shape[0] for o in done)
    return {
        "completed": len(done), "failed": len(run.failed), "failure": failure, "wall_s": run.wall_s,
        "requests_per_s": len(done) / run.wall_s, "samples_per_s": samples / run.wall_s,
        "latency_ms": {"p50": percentile(lat_ms, 50), "p99": percentile(lat_ms, 99)},
        "stages": {s.node: {"busy": s.busy, "micro_batches": s.micro_batches, "samples": s.samples}
                   for s in stages},
        "loadavg_1m": [load_before, os.getloadavg()[0]],
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    warmup, requests = (50, 300) if quick else (100, 1000)
    repeats = []
    for i in range(REPEATS):
        r = one_repeat(warmup, requests)
        print(f"  quickstart repeat {i + 1}/{REPEATS}: {r['requests_per_s']:.1f} req/s", flush=True)
        if r["failed"] or r["failure"]:
            raise RuntimeError(f"quickstart repeat {i + 1}: {r['failed']} failed; {r['failure']}")
        repeats.append(r)
    nodes = sorted(repeats[0]["stages"])
    doc = {
        "job": str(JOB.relative_to(ROOT)), "warmup": warmup, "requests": requests,
        "repeats": repeats,
        "summary": {
            "requests_per_s": _spread([r["requests_per_s"] for r in repeats]),
            "samples_per_s": _spread([r["samples_per_s"] for r in repeats]),
            "latency_p50_ms": _spread([r["latency_ms"]["p50"] for r in repeats]),
            "latency_p99_ms": _spread([r["latency_ms"]["p99"] for r in repeats]),
            "busy": {n: _spread([r["stages"][n]["busy"] for r in repeats]) for n in nodes},
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quickstart.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]

    def cell(d: dict[str, float], fmt: str, scale: float = 1.0) -> str:
        return f"{d['median'] * scale:{fmt}} ({d['min'] * scale:{fmt}} – {d['max'] * scale:{fmt}})"

    lines = ["| metric | median (min – max) over repeats |", "|---|---:|",
             f"| requests/s | {cell(s['requests_per_s'], '.1f')} |",
             f"| samples/s | {cell(s['samples_per_s'], '.1f')} |",
             f"| latency p50 (ms) | {cell(s['latency_p50_ms'], '.1f')} |",
             f"| latency p99 (ms) | {cell(s['latency_p99_ms'], '.1f')} |"]
    lines += [f"| busy, stage {n} (%) | {cell(b, '.0f', 100)} |" for n, b in s["busy"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 + 300 requests instead of 100 + 1000")
    parser.add_argument("--out", default="out/bench", help="directory for quickstart.json")
    args = parser.parse_args()
    print(markdown(run(args.quick, Path(args.out))))


if __name__ == "__main__":
    main()
