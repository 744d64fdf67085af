"""Generation under chain failures (issue 12): streams keep going while stage-1 workers are killed.

    python -m benchmarks.gen_recovery --out benchmarks/results/gen_recovery_cpu.json

A 2-stage generation job with 2 replica chains (builtin gpt2-tiny by default, float32, CPU,
[recovery] on) serves --streams concurrent greedy sequences of --new tokens in a closed loop
for --seconds; every --every seconds a stage-1 worker of a serving chain is killed (SIGKILL).
The supervisor replaces the lost chain (a new chain, new replica ids) while the dispatcher
continues the lost chain's sequences on the surviving one.

Reported: sequences completed / failed, tokens checked against the single-process reference
(greedy: every token of every sequence), replays and late duplicates dropped, and per kill: the
longest and median stall of the streams running at the kill (`stall`) and the replacement's
time to READY (spawn + imports, weight load, edge joining).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class Stream:
    """One sequence's consumer: token times, the tokens, and how it ended."""

    def __init__(self, prompt: list[int]) -> None:
        self.prompt = prompt
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.error: str | None = None
        self.done = threading.Event()

    def __call__(self, token: Any, done: bool, error: str | None) -> None:
        if error is not None:
            self.error = error
        else:
            self.tokens.append(int(token))
            self.times.append(time.monotonic())
        if done:
            self.done.set()


def stall(times: list[float], at: float) -> float:
    """The longest wait between two tokens of a stream around a kill at `at` (the pair's second
    token after the kill, its first one before at + 60 s): a stream of the killed chain waits
    for its fresh prefill on another chain (or for a chain to join); the others barely notice."""
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b > at and a < at + 60]
    return max(gaps, default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:gpt2-tiny")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--every", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    from infscaled.config import parse_job
    from infscaled.generation.params import SamplingParams
    from infscaled.generation.reference import ReferenceBackend
    from infscaled.protocol.plan import Node
    from infscaled.runner.launcher import LocalJob, prepare

    cfg = parse_job({"name": "gen-recovery", "model": {"source": args.model},
                     "pipeline": {"stages": 2, "replicas": [2, 2], "graph": "parallel"},
                     "generation": {"max_batch_sequences": 8, "kv_budget_tokens": 4096},
                     "workload": {"request_timeout_s": 120}, "recovery": {"enabled": True}})
    rng = random.Random(args.seed)
    params = SamplingParams(max_new_tokens=args.new, temperature=0.0)
    streams: list[Stream] = []
    kills: list[dict[str, Any]] = []
    with LocalJob(prepare(cfg)) as job:
        seqs = job.generator
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds

        def client() -> None:
            while time.monotonic() < stop_at:
                s = Stream([rng.randrange(1, 500) for _ in range(rng.randint(4, 24))])
                with lock:
                    streams.append(s)
                seqs.submit(s.prompt, params, s)
                s.done.wait(180)

        clients = [threading.Thread(target=client, daemon=True) for _ in range(args.streams)]
        for t in clients:
            t.start()
        next_kill = time.monotonic() + args.every / 2
        while time.monotonic() < stop_at:
            time.sleep(0.05)
            if time.monotonic() < next_kill:
                continue
            next_kill += args.every
            serving = sorted({c.replica for c in seqs.chains.values() if not c.lost})
            if not serving:
                continue
            victim = Node(1, rng.choice(serving))
            pid = job.group.handles[victim].process.pid
            assert pid is not None
            with lock:
                running = [s for s in streams if not s.done.is_set()]
            at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            kills.append({"node": str(victim), "at": at, "running": running})
            print(f"killed {victim} with {len(running)} streams running", flush=True)
        for t in clients:
            t.join(200)
        history = list(job.recoverer.history) if job.recoverer is not None else []
        replayed, duplicates = seqs.replayed, seqs.duplicates

    reference = ReferenceBackend.from_source(args.model)

    async def expected(prompt: list[int]) -> list[int]:
        return [int(t) async for t in reference.generate(prompt, params)]

    finished = [s for s in streams if s.done.is_set()]
    ok = [s for s in finished if s.error is None]
    mismatched = sum(1 for s in ok if s.tokens != asyncio.run(expected(s.prompt)))
    per_kill = []
    for k in kills:
        waits = [stall(s.times, k["at"]) for s in k["running"]]
        rep = next((r for r in history if str(r.dead[0]) == k["node"]), None)
        per_kill.append({"node": k["node"], "streams_running": len(k["running"]),
                         "stall_max_s": round(max(waits), 3) if waits else None,
                         "stall_p50_s": round(statistics.median(waits), 3) if waits else None,
                         "replaced_by": [str(n) for n in rep.added] if rep else [],
                         "replacement_ready_s": round(rep.ready_s, 2) if rep else None,
                         "replacement_load_s": round(rep.load_s, 2) if rep else None,
                         "replacement_connect_s": round(rep.connect_s, 2) if rep else None})
    doc = {"model": args.model, "streams": args.streams, "new_tokens": args.new, "seconds": args.seconds,
           "sequences": len(streams), "completed": len(ok), "failed": len(finished) - len(ok),
           "unfinished": len(streams) - len(finished), "checked": len(ok), "mismatched": mismatched,
           "tokens": sum(len(s.tokens) for s in ok), "replayed": replayed, "duplicates_dropped": duplicates,
           "kills": per_kill, "errors": sorted({s.error for s in finished if s.error})[:5],
           "load_average": os.getloadavg(), "torch": torch.__version__}
    print(json.dumps(doc, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
