"""Run every benchmark; write JSON and a markdown summary under --out (`make bench` runs this).

    python -m benchmarks.run_all [--quick] [--out out/bench]

Writes machine.json (CPU, cores, torch, date, load), quickstart.json, hop_overhead.json,
metrics_overhead.json and results.md (the tables BENCHMARKS.md quotes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import hop_overhead, metrics_overhead, quickstart_bench


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": fields.get("Model name", "").strip(),
        "hypervisor": fields.get("Hypervisor vendor", "").strip(),
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
        "argv": sys.argv,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and messages (about 3 minutes)")
    parser.add_argument("--out", default="out/bench", help="output directory")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    started = time.monotonic()
    print(f"quickstart ({'quick' if args.quick else 'full'})", flush=True)
    qs = quickstart_bench.run(args.quick, out)
    print("hop overhead", flush=True)
    hop = hop_overhead.run(args.quick, out)
    print("metrics on vs off", flush=True)
    metrics_overhead.run(2 if args.quick else 4, 300 if args.quick else 600, out)
    info["loadavg_at_end"] = os.getloadavg()
    info["elapsed_s"] = time.monotonic() - started
    (out / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    report = (
        f"# infscaled benchmarks ({'quick' if args.quick else 'full'})\n\n"
        f"{info['date']} · {info['cpu_model']} · {info['nproc']} CPUs · torch {info['torch']} · "
        f"load average (1 min) {info['loadavg_at_start'][0]:.2f} at start, "
        f"{info['loadavg_at_end'][0]:.2f} at end · {info['elapsed_s']:.0f} s\n\n"
        f"## Quickstart ({qs['job']}, {qs['warmup']} warm-up + {qs['requests']} requests, "
        f"{len(qs['repeats'])} repeats)\n\n{quickstart_bench.markdown(qs)}\n\n"
        f"## Per-hop overhead (window {hop['window']}, {hop['rounds']} interleaved rounds)\n\n"
        f"{hop_overhead.markdown(hop['comparison'])}\n"
    )
    (out / "results.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
