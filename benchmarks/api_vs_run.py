"""The daemon path against the direct path, same job, same workload, same machine, one run.

- `infscaled up JOB` (controller + local agent; requests through POST /v1/jobs/{id}/infer,
  binary tensors): requests/s, latency, and the time from `job submit` to the first result;
- `infscaled run JOB` (dispatcher inside the launcher, no HTTP): requests/s and latency.

Runs alternate (run, up, run, up, ...) so drift in the machine's load hits both alike.
Usage: python -m benchmarks.api_vs_run [--job configs/jobs/quickstart.toml] [--requests 400]
       [--repeats 3] [--out out/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(kind: str, job: str, requests: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "infscaled.cli", kind, job, "--requests", str(requests), "--json", str(out),
               "--no-progress"]
        started = time.monotonic()
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
        doc = json.loads(out.read_text())
    assert doc["failed"] == 0, doc
    return {"throughput_rps": doc["throughput_rps"], "p50_ms": doc["latency_ms"]["p50"],
            "p99_ms": doc["latency_ms"]["p99"], "command_s": time.monotonic() - started,
            "submit_to_first_result_s": doc.get("submit_to_first_result_s", float("nan"))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--job", default="configs/jobs/quickstart.toml")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="out/bench")
    args = p.parse_args()
    results: dict[str, list[dict[str, float]]] = {"run": [], "up": []}
    for _ in range(args.repeats):
        for kind in ("run", "up"):
            results[kind].append(one(kind, args.job, args.requests))
    med = {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for k, rs in results.items()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "api_vs_run.json").write_text(json.dumps({"runs": results, "median": med}, indent=2))
    print(f"{'path':<28}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for kind, label in (("run", "infscaled run (direct)"), ("up", "infscaled up (REST API)")):
        m = med[kind]
        print(f"{label:<28}{m['throughput_rps']:>10.1f}{m['p50_ms']:>10.1f}{m['p99_ms']:>10.1f}")
    print(f"API / direct throughput: {med['up']['throughput_rps'] / med['run']['throughput_rps']:.2f}")
    firsts = ", ".join(f"{r['submit_to_first_result_s']:.2f}" for r in results["up"])
    print(f"job submit -> first result (up): {med['up']['submit_to_first_result_s']:.2f} s (runs: {firsts})")


if __name__ == "__main__":
    main()
