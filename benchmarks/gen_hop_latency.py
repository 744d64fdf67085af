"""Diagnostic: how long one token takes to go round a generation chain when compute is tiny.

    python -m benchmarks.gen_hop_latency [--device cpu|cuda:0] [--new 200]

One sequence of llama-tiny through 1 and 2 stages (both on --device): the time between
consecutive tokens at the dispatcher (median and p90) against the stages' own compute time per
step. With 2 stages, (step time - compute) / 2 is the cost of one hop (two thread hand-offs and
a gloo message), which section 5 of BENCHMARKS.md needs to explain the decode numbers.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from infscaled.config import parse_job
from infscaled.generation.params import SamplingParams
from infscaled.runner.launcher import LocalJob, prepare


def measure(stages: int, device: str, new: int) -> dict[str, float]:
    cfg = parse_job({"name": "hop", "model": {"source": "builtin:llama-tiny"}, "pipeline": {"stages": stages},
                     "placement": {"devices": [device] * stages}, "generation": {"kv_budget_tokens": 4096}})
    with LocalJob(prepare(cfg)) as job:
        for rep in range(2):  # the first warms up
            times: list[float] = []
            done = threading.Event()

            def consume(token: int, finished: bool, error: str | None, times: list[float] = times,
                        done: threading.Event = done) -> None:
                times.append(time.perf_counter())
                if finished or error:
                    done.set()

            job.generator.submit(list(range(1, 9)), SamplingParams(max_new_tokens=new if rep else 8,
                                                                   temperature=0.0), consume)
            done.wait(120)
        time.sleep(1.2)  # one more stats report, covering the measured sequence
        compute = sum(h.stats.compute_s for h in job.state.workers.values() if h.stats is not None)
    gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False))
    step = gaps[len(gaps) // 2]
    return {"stages": stages, "step_ms_p50": 1000 * step, "step_ms_p90": 1000 * gaps[int(0.9 * len(gaps))],
            "compute_ms_per_step": 1000 * compute,
            "hop_ms": 1000 * (step - compute) / stages if stages > 1 else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new", type=int, default=200)
    a = ap.parse_args()
    for stages in (1, 2):
        print(json.dumps({"device": a.device, **measure(stages, a.device, a.new)}), flush=True)


if __name__ == "__main__":
    main()
