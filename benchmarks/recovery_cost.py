"""Steady-state cost of recovery (issue 12): the chaos job of chaos_bench.py (gpt2-tiny, 3 stages,
replicas [2, 2, 1]) under a closed loop of 24 clients through LocalJob, `[recovery] enabled` on vs
off. One warm-up job is discarded, then REPEATS pairs, alternating which mode goes first; each
job serves 500 requests unmeasured, then REQUESTS measured.

    python -m benchmarks.recovery_cost REPEATS REQUESTS OUT.json [REPLICAS]

REPLICAS (e.g. `1,1`: 2 stages, one replica each) replaces the chaos job's [2, 2, 1] shape: a job
with fewer processes than the host has cores measures with less scheduling noise.
"""

import json
import os
import statistics
import sys

from benchmarks.chaos_bench import job_config
from infscaled.runner.launcher import LocalJob, prepare
from infscaled.runner.workload import drive, requests_for


def main() -> None:
    repeats, n = int(sys.argv[1]), int(sys.argv[2])
    shape = [int(r) for r in sys.argv[4].split(",")] if len(sys.argv) > 4 else None
    out: dict[str, list[float]] = {"on": [], "off": []}
    def one(mode: str) -> float:
        cfg = job_config(mode == "on", 0.0, shape)
        prepared = prepare(cfg)
        reqs = list(requests_for(cfg.workload, prepared.spec, n + 500))
        with LocalJob(prepared) as job:
            drive(job.submit, iter(reqs[:500]), 500, 0.0, 24)
            run = drive(job.submit, iter(reqs[500:]), n, 0.0, 24)
        return len(run.completed) / run.wall_s
    one("on")  # warm-up: page cache, the fork server
    for i in range(repeats):
        for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
            out[mode].append(one(mode))
            print(mode, round(out[mode][-1], 1), flush=True)
    on, off = statistics.median(out["on"]), statistics.median(out["off"])
    res = {"requests_per_s": out, "median_on": on, "median_off": off, "cost": 1 - on / off,
           "spread_on": (max(out["on"]) - min(out["on"])) / on, "spread_off": (max(out["off"]) - min(out["off"])) / off,
           "requests_per_run": n, "loadavg": os.getloadavg(),
           "command": " ".join(["python -m benchmarks.recovery_cost", *sys.argv[1:]])}
    print(json.dumps(res, indent=2))
    with open(sys.argv[3], "w") as f:
        f.write(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
