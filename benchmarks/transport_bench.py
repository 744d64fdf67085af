"""Micro-benchmark: raw gloo send/recv vs Edge.send/recv (header + one tensor) between two processes.

Both measure a ping-pong of N bytes each way and report one-way latency = round trip / 2 and
N / one-way as MB/s (10^6 bytes). The Edge variant uses two edges (A->B and B->A), since an
edge carries data in one direction only.

    .venv/bin/python benchmarks/transport_bench.py [--sizes 4096,65536,1048576,16777216] [--seconds 1]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import time
from datetime import timedelta

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

from infscaled.protocol.plan import EdgePlan, Node
from infscaled.protocol.wire import DATA
from infscaled.worker.transport import Message, connect_all

HOST = "127.0.0.1"
SECRET = b"bench-secret"  # the edges' handshake key (a job's plan carries its own)
A, B = Node(-1, 0), Node(0, 0)
TIMEOUT = timedelta(seconds=60)


def _port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _iters(size: int, seconds: float) -> int:
    # Rough count for ~`seconds` at ~1 GB/s, bounded for tiny and huge sizes.
    return max(20, min(2000, int(seconds * 1e9 / max(size, 1) / 2)))


def _raw(rank: int, port: int, sizes: list[int], seconds: float) -> dict[int, float]:
    store = TCPStore(HOST, port, 2, rank == 0, TIMEOUT, wait_for_workers=False)
    opts = ProcessGroupGloo._Options()
    opts._devices = [ProcessGroupGloo.create_device(hostname=HOST)]
    opts._timeout = TIMEOUT
    pg = ProcessGroupGloo(PrefixStore("bench/raw", store), rank, 2, opts)
    one_way: dict[int, float] = {}
    for size in sizes:
        buf = torch.zeros(size, dtype=torch.uint8)
        n = _iters(size, seconds)
        for it in range(n + 5):  # 5 warm-up round trips
            if it == 5:
                started = time.perf_counter()
            if rank == 0:
                pg.send([buf], 1, 1).wait()
                pg.recv([buf], 1, 2).wait()
            else:
                pg.recv([buf], 0, 1).wait()
                pg.send([buf], 0, 2).wait()
        one_way[size] = (time.perf_counter() - started) / n / 2
    pg.shutdown()
    return one_way


def _edges(me: Node, ports: tuple[int, int], sizes: list[int], seconds: float) -> dict[int, float]:
    there, back = EdgePlan(A, B, HOST, ports[0]), EdgePlan(B, A, HOST, ports[1])
    edges = connect_all([there, back], me, HOST, TIMEOUT.total_seconds(), secret=SECRET)
    out, inp = (edges[there.key], edges[back.key]) if me == A else (edges[back.key], edges[there.key])
    one_way: dict[int, float] = {}
    try:
        for size in sizes:
            payload = {"hidden": torch.zeros(size, dtype=torch.uint8)}
            n = _iters(size, seconds)
            for it in range(n + 5):
                if it == 5:
                    started = time.perf_counter()
                if me == A:
                    out.send(Message(DATA, it, 0, payload))
                    inp.recv()
                else:
                    msg = inp.recv()
                    out.send(msg)
            one_way[size] = (time.perf_counter() - started) / n / 2
    finally:
        for e in edges.values():
            e.close()
    return one_way


def _peer(raw_port: int, edge_ports: tuple[int, int], sizes: list[int], seconds: float) -> None:
    _raw(1, raw_port, sizes, seconds)
    _edges(B, edge_ports, sizes, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,65536,1048576,16777216", help="comma-separated byte counts")
    parser.add_argument("--seconds", type=float, default=1.0, help="rough time per size and variant")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(1)
    raw_port, edge_ports = _port(), (_port(), _port())
    peer = mp.get_context("spawn").Process(target=_peer, args=(raw_port, edge_ports, sizes, args.seconds))
    peer.start()
    try:
        raw = _raw(0, raw_port, sizes, args.seconds)
        edge = _edges(A, edge_ports, sizes, args.seconds)
    finally:
        peer.join(30)
        if peer.is_alive():
            peer.kill()
    print(f"{'bytes':>10} | {'raw gloo us':>11} {'MB/s':>8} | {'Edge us':>9} {'MB/s':>8} | {'Edge/raw':>8}")
    for size in sizes:
        r, e = raw[size], edge[size]
        print(f"{size:>10} | {r * 1e6:>11.1f} {size / r / 1e6:>8.0f} | "
              f"{e * 1e6:>9.1f} {size / e / 1e6:>8.0f} | {e / r:>8.2f}")


if __name__ == "__main__":
    main()
