"""Cost of the agents' websocket codec per message: encode and decode (type-checked) of the
frames a fleet sends most: Heartbeat, HostMetrics with 8 GPUs, and a watch AgentView-heavy frame.

    PYTHONPATH=. python -m benchmarks.fleet_codec [--seconds 1]

Prints microseconds per call (best of 5 runs) and the frame sizes; nothing else runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from infscaled.protocol import messages, watch
from infscaled.protocol.messages import DeviceUsage, Heartbeat, HostMetrics


def per_call_us(fn: Callable[[], object], seconds: float) -> float:
    """Best of five timed batches, in microseconds per call."""
    n = 1
    while True:  # size a batch to ~seconds/5
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        took = time.perf_counter() - t0
        if took > seconds / 5:
            break
        n *= 2
    best = took / n
    for _ in range(4):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.0, help="time spent per measurement")
    args = ap.parse_args()
    beat = Heartbeat("agent-00042", workers=3)
    usage = HostMetrics("agent-00042", 0.4321, 123_456_789_012,
                        [DeviceUsage(f"cuda:{i}", 0.87, 70_000_000_000 + i) for i in range(8)])
    agent = watch.AgentView("agent-00042", "host-42", "connected", advertise="10.0.0.42", cpu_cores=64,
                            ram_bytes=1 << 40, cpu_ratio=0.4, ram_used_bytes=1 << 38, workers=8,
                            devices=[watch.DeviceView(f"cuda:{i}", "cuda", "NVIDIA H100", 80 << 30, "job-1", 0.9,
                                                      70 << 30) for i in range(8)])
    snap = watch.Snapshot(time.time(), 1.0, [agent] * 100)
    cases: list[tuple[str, Callable[[], object], int]] = []
    for name, msg, enc, dec in (("heartbeat", beat, messages.encode, messages.decode),
                                ("host_metrics (8 GPUs)", usage, messages.encode, messages.decode),
                                ("watch snapshot (100 agents x 8 GPUs)", snap, watch.encode, watch.decode)):
        text = enc(msg)  # type: ignore[arg-type]
        assert dec(text) == msg
        cases.append((f"encode {name}", lambda m=msg, e=enc: e(m), len(text)))
        cases.append((f"decode {name}", lambda t=text, d=dec: d(t), len(text)))
    for label, fn, size in cases:
        print(f"{label:<48} {per_call_us(fn, args.seconds):>10.1f} us   ({size} bytes)")


if __name__ == "__main__":
    main()
