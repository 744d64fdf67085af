"""Live metrics on vs off: the quickstart job's throughput with the stage workers' measuring
switched on (the default) and off (INFSCALED_METRICS=off: no windows, no stats reports), in one
run, alternating on / off / off / on ... so load drift on a shared machine hits both alike.

    python -m benchmarks.metrics_overhead [--pairs 4] [--requests 600] [--out out/bench]

Each run is a fresh LocalJob (start-up not timed), a warm-up, then the measured requests in the
job's closed loop. Reports each mode's median requests/s, the difference, and the noise: the
spread (max - min) of each mode's own runs. "Within noise" means the difference between the
medians is smaller than that spread.
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
from infscaled.runner.workload import drive, requests_for
from infscaled.worker.entry import METRICS_ENV

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "configs" / "jobs" / "quickstart.toml"


def one_run(metrics: str, warmup: int, requests: int) -> float:
    os.environ[METRICS_ENV] = metrics  # the workers inherit it at spawn
    cfg = load_job(JOB)
    prepared = prepare(cfg)
    wl = cfg.workload
    concurrency = wl.concurrency or cfg.pipeline.micro_batch_size * cfg.pipeline.max_inflight
    reqs = list(requests_for(wl, prepared.spec, warmup + requests))
    with LocalJob(prepared) as job:
        drive(job.submit, iter(reqs[:warmup]), warmup, wl.rate, concurrency)
        run = drive(job.submit, iter(reqs[warmup:]), requests, wl.rate, concurrency)
    # After the stop every worker reported its final stats: windowed rates only when measured.
    final = [h.stats for h in job.state.workers.values() if h.stats is not None]
    assert not run.failed, run.failed[0].error
    assert len(final) == len(job.state.workers) and all(s.samples > 0 for s in final)
    measured = any(s.samples_per_s > 0 for s in final)
    assert measured == (metrics == "on"), f"metrics {metrics} but windowed rates measured: {measured}"
    return len(run.completed) / run.wall_s


def run(pairs: int, requests: int, out: Path) -> dict[str, Any]:
    order = [m for i in range(pairs) for m in (("on", "off") if i % 2 == 0 else ("off", "on"))]
    results: dict[str, list[float]] = {"on": [], "off": []}
    for metrics in order:
        rps = one_run(metrics, warmup=100, requests=requests)
        results[metrics].append(rps)
        print(f"  metrics {metrics:3s}: {rps:7.1f} req/s", flush=True)
    os.environ.pop(METRICS_ENV, None)
    med = {m: statistics.median(v) for m, v in results.items()}
    spread = {m: max(v) - min(v) for m, v in results.items()}
    doc = {
        "job": str(JOB.relative_to(ROOT)), "requests": requests, "order": order, "runs_rps": results,
        "median_rps": med, "spread_rps": spread,
        "difference_pct": 100 * (med["on"] - med["off"]) / med["off"],
        "within_noise": abs(med["on"] - med["off"]) <= max(spread.values()),
        "loadavg_at_end": os.getloadavg(),
    }
    (out / "metrics_overhead.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--out", default="out/bench")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = run(args.pairs, args.requests, out)
    print(f"median: on {doc['median_rps']['on']:.1f} req/s, off {doc['median_rps']['off']:.1f} req/s "
          f"({doc['difference_pct']:+.1f} %); spread on {doc['spread_rps']['on']:.1f}, "
          f"off {doc['spread_rps']['off']:.1f}; within noise: {doc['within_noise']}")


if __name__ == "__main__":
    main()
