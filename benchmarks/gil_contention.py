"""Diagnostic: an Edge message's latency when the receiving process has a thread holding the GIL.

    python -m benchmarks.gil_contention

A ping-pong of one decode step's message (request table, hidden [8, 1, 3072] bf16, positions)
between two processes; the echoing process optionally runs a pure-Python busy thread, which
holds the GIL as a launch-bound CUDA stage's compute thread does. Printed for several GIL
switch intervals: the one-way latency (round trip / 2). BENCHMARKS.md section 5 uses it to
explain the decode loop's per-hop cost on GPUs.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import threading
import time

import torch

from benchmarks.transport_bench import HOST, SECRET, A, B, _port
from infscaled.protocol.plan import EdgePlan, Node
from infscaled.protocol.wire import DATA
from infscaled.worker.transport import Message, connect_all

ROUND_TRIPS = 200


def _spin(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        for i in range(1000):
            x += i  # pure Python bytecode: the GIL is held between forced switches


def ping_pong(me: Node, ports: tuple[int, int], busy: bool, interval_s: float) -> float:
    sys.setswitchinterval(interval_s)
    there, back = EdgePlan(A, B, HOST, ports[0]), EdgePlan(B, A, HOST, ports[1])
    edges = connect_all([there, back], me, HOST, 60, secret=SECRET)
    out, inp = (edges[there.key], edges[back.key]) if me == A else (edges[back.key], edges[there.key])
    stop = threading.Event()
    if busy:
        threading.Thread(target=_spin, args=(stop,), daemon=True).start()
    payload = {"requests": torch.zeros(8, 2, dtype=torch.int64),
               "hidden": torch.zeros(8, 1, 3072, dtype=torch.bfloat16), "positions": torch.zeros(8, dtype=torch.int64)}
    started = 0.0
    try:
        for it in range(ROUND_TRIPS + 10):
            if it == 10:
                started = time.perf_counter()
            if me == A:
                out.send(Message(DATA, it, 0, payload))
                inp.recv()
            else:
                out.send(inp.recv())
    finally:
        stop.set()
        for e in edges.values():
            e.close()
    return (time.perf_counter() - started) / ROUND_TRIPS / 2


def main() -> None:
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    for busy, interval in ((False, 0.005), (True, 0.005), (True, 0.0002)):
        ports = (_port(), _port())
        peer = ctx.Process(target=ping_pong, args=(B, ports, busy, interval))
        peer.start()
        one_way = ping_pong(A, ports, False, interval)
        peer.join(30)
        print(f"echoing process busy: {busy!s:5}  switch interval {interval * 1000:4.1f} ms  "
              f"one-way {one_way * 1000:6.2f} ms", flush=True)


if __name__ == "__main__":
    main()
