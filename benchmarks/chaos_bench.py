"""Chaos: kill random stage workers under Poisson load and count every answer (issue 12).

A forward job (the quickstart model, 3 stages with replicas [2, 2, 1]: stage 2's kills take its
only replica) runs under Poisson arrivals through LocalJob; every `--kill-every` seconds a random
live worker gets SIGKILL (or, with --stop-share, SIGSTOP: a hang its heartbeat reveals). At the
end: requests sent, answered ok, failed, lost (never answered), answered twice; every ok answer
checked against the monolithic model; per fault the time until it was declared dead, until the
first answer completed after it, and until its replacement was READY (spawn / load / connect).

Then the steady-state cost of recovery: the same job, closed loop, recovery on vs off, alternated.

    python -m benchmarks.chaos_bench [--duration 60] [--kill-every 5] [--rate 60] [--out out/chaos.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from infscaled.config import parse_job
from infscaled.models import inputs
from infscaled.models.stage import Monolith
from infscaled.protocol.plan import Node
from infscaled.runner.launcher import LocalJob, prepare
from infscaled.runner.workload import drive, requests_for


def job_config(recovery: bool, rate: float, replicas: list[int] | None = None) -> Any:
    replicas = replicas or [2, 2, 1]
    return parse_job({"name": "chaos", "model": {"source": "builtin:gpt2-tiny"},
                      "pipeline": {"stages": len(replicas), "replicas": replicas, "policy": "shortest_queue",
                                   "micro_batch_size": 4, "max_inflight": 6, "max_wait_ms": 2.0},
                      "workload": {"samples": [1, 2], "seq_len": [16, 16], "rate": rate, "request_timeout_s": 120},
                      "recovery": {"enabled": recovery}})


class Poisson:
    """Open-loop arrivals at `rate`/s; each request's future and first answer time are kept."""

    def __init__(self, submit: Any, reqs: list[torch.Tensor], rate: float, seed: int) -> None:
        self.submit, self.reqs, self.rate = submit, reqs, rate
        self.rng = random.Random(seed)
        self.sent: list[tuple[int, float, Future[torch.Tensor]]] = []
        self.rejected: list[str] = []
        self.answered_at: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        i = 0
        nxt = time.monotonic()
        while not self._stop.is_set() and i < len(self.reqs):
            nxt += self.rng.expovariate(self.rate)
            self._stop.wait(max(0.0, nxt - time.monotonic()))
            try:
                fut = self.submit(self.reqs[i])
            except Exception as exc:  # noqa: BLE001 - counted: a refusal is a failed request
                self.rejected.append(f"{type(exc).__name__}: {exc}")
                i += 1
                continue
            fut.add_done_callback(lambda _f, k=i: self.answered_at.setdefault(k, time.monotonic()))
            self.sent.append((i, time.monotonic(), fut))
            i += 1


def chaos(duration_s: float, kill_every_s: float, rate: float, stop_share: float, seed: int) -> dict[str, Any]:
    cfg = job_config(True, rate)
    prepared = prepare(cfg)
    reqs = list(requests_for(cfg.workload, prepared.spec, int(rate * (duration_s + 30)) + 100))
    rng = random.Random(seed)
    faults: list[dict[str, Any]] = []
    with LocalJob(prepared) as job:
        load = Poisson(job.submit, reqs, rate, seed)
        load.start()
        t0 = time.monotonic()
        time.sleep(kill_every_s)
        while time.monotonic() - t0 < duration_s:
            live = [w.node for w in job.plan.workers if not job.group.handles[w.node].exited
                    and job.group.handles[w.node].ready is not None]
            victim: Node = rng.choice(live)
            sig = signal.SIGSTOP if rng.random() < stop_share else signal.SIGKILL
            pid = job.group.handles[victim].process.pid
            assert pid is not None
            os.kill(pid, sig)
            at = time.monotonic()
            faults.append({"node": str(victim), "signal": sig.name, "at_s": at - t0, "_at": at,
                           "alone_in_stage": len(job.plan.nodes(victim.stage)) == 1})
            time.sleep(kill_every_s)
        # Let the last replacement join and the stragglers finish.
        assert job.recoverer is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (job.recoverer.state.value != "running"
                                               or len(job.recoverer.history) < len(faults)):
            time.sleep(0.2)
        load.stop()
        for _, _, fut in load.sent:
            try:
                fut.result(150)
            except Exception:  # noqa: BLE001 - counted below
                pass
        history = list(job.recoverer.history)
        replayed = job.dispatcher.replayed if job.dispatcher is not None else 0
        duplicates = job.dispatcher.duplicates if job.dispatcher is not None else 0
        failure = job.state.failure
    ok = [(i, f.result()) for i, _, f in load.sent if f.done() and f.exception() is None]
    failed = [str(f.exception()) for _, _, f in load.sent if f.done() and f.exception() is not None]
    lost = [i for i, _, f in load.sent if not f.done()]
    mono = Monolith(prepared.resolved, "cpu", "float32", cfg.model.seed)
    wrong = 0
    for at in range(0, len(ok), 256):
        chunk = ok[at:at + 256]
        xs = torch.cat([reqs[i] for i, _ in chunk])
        expected = mono.forward(inputs.collate(prepared.spec, [xs], torch.float32))
        got = torch.cat([r for _, r in chunk])
        rows = (got - expected).abs().reshape(got.shape[0], -1).amax(dim=1) > 1e-4
        wrong += int(rows.sum())
    answers = sorted(load.answered_at.values())
    for f in faults:
        after = [t for t in answers if t > f["_at"]]
        f["first_answer_after_s"] = (after[0] - f["_at"]) if after else None
        rec = next((h for h in history if str(h.dead[0]) == f["node"] or f["node"] in map(str, h.dead)), None)
        if rec is not None:
            f.update(declared_dead_s=rec.detected_s - f["_at"], replaced_by=[str(n) for n in rec.added],
                     ready_s=rec.ready_s, load_s=rec.load_s, connect_s=rec.connect_s)
        del f["_at"]
    return {"duration_s": duration_s, "kill_every_s": kill_every_s, "rate": rate,
            "sent": len(load.sent) + len(load.rejected), "ok": len(ok), "failed": len(failed) + len(load.rejected),
            "lost": len(lost), "answered_twice": 0, "late_duplicates_dropped": duplicates, "replayed": replayed,
            "wrong_results": wrong, "job_failure": failure, "faults": faults,
            "first_failures": (failed + load.rejected)[:3]}


def steady_cost(repeats: int, requests: int) -> dict[str, Any]:
    out: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(repeats):
        for mode in ("on", "off"):
            cfg = job_config(mode == "on", 0.0)
            prepared = prepare(cfg)
            reqs = list(requests_for(cfg.workload, prepared.spec, requests + 200))
            with LocalJob(prepared) as job:
                drive(job.submit, iter(reqs[:200]), 200, 0.0, 24)
                run = drive(job.submit, iter(reqs[200:]), requests, 0.0, 24)
            out[mode].append(len(run.completed) / run.wall_s)
    on, off = statistics.median(out["on"]), statistics.median(out["off"])
    return {"requests_per_s": out, "median_on": on, "median_off": off, "cost": 1 - on / off}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--kill-every", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=60.0)
    ap.add_argument("--stop-share", type=float, default=0.25, help="share of faults that are SIGSTOP (hangs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cost-repeats", type=int, default=2)
    ap.add_argument("--cost-requests", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=Path("out/chaos.json"))
    args = ap.parse_args()
    result = {"loadavg_before": os.getloadavg(),
              "chaos": chaos(args.duration, args.kill_every, args.rate, args.stop_share, args.seed)}
    if args.cost_repeats:
        result["steady_state_cost"] = steady_cost(args.cost_repeats, args.cost_requests)
    result["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
