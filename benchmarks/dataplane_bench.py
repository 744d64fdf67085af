"""A serving job's data plane while a stranger attacks it (issue 13): throughput, a scale-up's
time to ready, the serving worker's file descriptors, and what the stranger got.

The quickstart job (`infscaled run`'s LocalJob: real worker processes, the dispatcher in this
process), `--clients` closed-loop clients. Two parts:

1. Serving: `--rounds` alternations of quiet / attacked phases of `--requests` requests each. In
   an attacked phase `python -m benchmarks.stranger` (its own process, so its CPU is not the
   dispatcher's GIL) aims at every edge port of the plan: a joined edge's port is closed, so
   every attempt is refused by the kernel.
2. Scale-ups of stage 1 (+1 replica, then back), quiet and attacked: in the attacked one the
   stranger floods the new edges' ports (bursts of 150 connections, silent ones, wrong secrets,
   garbage) as soon as the new epoch's plan exists, while worker 0.0 serves and listens for
   its new peer. Reports ready / connect seconds, worker 0.0's peak descriptors and what the
   stranger saw.

Usage: python -m benchmarks.dataplane_bench [--rounds 3] [--requests 600] [--clients 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from infscaled.config import load_job
from infscaled.protocol.plan import Node
from infscaled.runner.launcher import LocalJob, prepare
from infscaled.runner.workload import drive, requests_for

JOB = Path(__file__).parents[1] / "configs" / "jobs" / "quickstart.toml"


def stranger(ports: list[int], seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.stranger", "--ports", ",".join(map(str, ports)),
                             "--seconds", str(seconds)], stdout=subprocess.PIPE, text=True)


def seen(proc: subprocess.Popen[str]) -> dict[str, int]:
    out, _ = proc.communicate(timeout=120)
    return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


def serve_phase(job: LocalJob, requests: Any, n: int, clients: int) -> float:
    started = time.monotonic()
    run = drive(job.submit, requests, n, 0.0, clients)
    assert not run.failed, run.failed[0].error
    return len(run.completed) / (time.monotonic() - started)


def scale_up(job: LocalJob, attacked: bool) -> dict[str, Any]:
    """Stage 1 +1 replica; with `attacked`, the stranger floods the new edges' ports meanwhile."""
    before = {e.port for e in job.plan.edges}
    epoch = job.plan.epoch
    w00 = psutil.Process(job.group.handles[Node(0, 0)].process.pid)
    fds_before = w00.num_fds()
    box: dict[str, Any] = {}
    th = threading.Thread(target=lambda: box.setdefault("result", job.scale(1, len(job.plan.nodes(1)) + 1)))
    th.start()
    while job.plan.epoch == epoch:
        time.sleep(0.005)
    attacker = stranger(sorted({e.port for e in job.plan.edges} - before), 600) if attacked else None
    peak = fds_before
    while th.is_alive():
        peak = max(peak, w00.num_fds())
        time.sleep(0.01)
    got: dict[str, int] = {}
    if attacker is not None:
        attacker.terminate()
        got = seen(attacker) if attacker.stdout else {}
    result = box["result"]
    return {"attacked": attacked, "ready_s": round(result.ready_s, 2), "connect_s": round(result.connect_s, 2),
            "w00_fds_before": fds_before, "w00_fds_peak": peak, "stranger": got}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=600, help="requests per serving phase")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    prepared = prepare(load_job(str(JOB)))
    requests = requests_for(prepared.cfg.workload, prepared.spec, 10**9)
    quiet: list[float] = []
    attacked: list[float] = []
    attacks: list[dict[str, int]] = []
    scales: list[dict[str, Any]] = []
    with LocalJob(prepared) as job:
        serve_phase(job, requests, 100, args.clients)  # warm-up
        for _ in range(args.rounds):
            quiet.append(serve_phase(job, requests, args.requests, args.clients))
            proc = stranger([e.port for e in job.plan.edges], 600)
            time.sleep(0.5)
            started = time.monotonic()
            attacked.append(serve_phase(job, requests, args.requests, args.clients))
            cpu = psutil.Process(proc.pid).cpu_times()
            share = (cpu.user + cpu.system) / (time.monotonic() - started + 0.5)
            proc.terminate()
            attacks.append({**seen(proc), "stranger_cpu_share_of_a_core": round(share, 2)})
        for hostile in (False, True):
            scales.append(scale_up(job, hostile))
            job.scale(1, len(job.plan.nodes(1)) - 1)
        assert job.group.failure is None, job.group.failure
    ratios = [a / q for q, a in zip(quiet, attacked, strict=True)]
    report = {"job": JOB.name, "clients": args.clients, "requests_per_phase": args.requests,
              "quiet_req_s": [round(x, 1) for x in quiet], "attacked_req_s": [round(x, 1) for x in attacked],
              "ratio_median": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
              "serving_attacks": attacks, "scale_ups": scales}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "dataplane_bench.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
