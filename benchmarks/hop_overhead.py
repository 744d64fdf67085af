"""Per-hop cost of the stage loop against raw gloo send/recv of the same bytes, in one run.

For a pipeline of k stages (k+1 hops: dispatcher -> 0 -> ... -> k-1 -> dispatcher) and a
payload of N bytes, three tiers move the same N bytes between the same k+1 processes:

- raw:      one two-rank ProcessGroupGloo per hop; relays forward one N-byte buffer with
            their next recv always posted (double-buffered): the transport's floor;
- edge:     `Edge.send` / `Edge.recv` (header + request table + payload, as the pipeline
            sends them) in a plain forwarding loop: the wire protocol without the stage loop;
- pipeline: `LocalJob` serving `benchmarks.identity` (k no-op stages, micro_batch_size 1,
            max_wait_ms 0): dispatcher, stage-loop threads, queues, acks, router included.

Latency: one request in flight, median round trip / (k+1). Throughput: WINDOW requests in
flight, messages per second through the chain. Overhead per hop = (pipeline - raw) / (k+1).

    python -m benchmarks.hop_overhead [--quick] [--out out/bench]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

from benchmarks.identity import FACTORIES, UNITS
from infscaled.config.load import parse_job
from infscaled.engine.core import REQUESTS_KEY
from infscaled.planning.ports import free_ports
from infscaled.protocol.plan import DISPATCHER, EdgePlan, Node
from infscaled.protocol.wire import DATA
from infscaled.runner.launcher import LocalJob, prepare
from infscaled.runner.workload import drive
from infscaled.worker.transport import Message, connect_all

HOST = "127.0.0.1"
SECRET = b"bench-secret"  # the edges' handshake key (a job's plan carries its own)
SIZES = tuple(sorted(FACTORIES))
QUICK_SIZES = (SIZES[0], SIZES[-1])  # --quick skips the middle size: each (k, size) starts 2k processes
DEPTHS = (1, 2, 4)
WINDOW = 8  # micro-batches in flight for throughput (the pipeline's max_inflight)
TIMEOUT = timedelta(seconds=120)
TAG = 7


@dataclass(frozen=True)
class Counts:
    """Messages per phase for one payload size."""

    warmup: int
    latency: int
    throughput: int

    @property
    def total(self) -> int:
        return self.warmup + self.latency + self.throughput


ROUNDS, ROUNDS_QUICK = 3, 2


def counts_for(size: int, quick: bool) -> Counts:
    """Messages per tier and round."""
    big = size >= 1 << 20
    if quick:
        return Counts(5, 15, 30) if big else Counts(10, 30, 120)
    return Counts(10, 50, 120) if big else Counts(20, 100, 400)


@dataclass
class Row:
    tier: str  # raw | edge | pipeline
    stages: int
    bytes: int
    rtt_p50_us: float
    rtt_p90_us: float
    hop_us: float  # median round trip / (stages + 1)
    msgs_per_s: float  # WINDOW in flight, median over rounds
    msgs_per_s_min: float
    msgs_per_s_max: float
    mb_per_s: float  # payload, 10^6 bytes / s
    cpu_us_per_msg_hop: float  # CPU time of every process in the run / messages / hops (throughput phase)
    gloo_loop_cpu_share: float  # part of that CPU spent in gloo's event-loop threads


def _row(tier: str, k: int, size: int, rtts: list[float], rates: list[float], cpu: list[float]) -> Row:
    """Latency over every round's round trips; throughput: median, min and max over rounds.
    `cpu` = [messages, loop seconds, other seconds] summed over the throughput phases."""
    p50 = statistics.median(rtts)
    p90 = sorted(rtts)[int(0.9 * (len(rtts) - 1))]
    rate = statistics.median(rates)
    n, loop_s, other_s = cpu
    return Row(tier, k, size, p50 * 1e6, p90 * 1e6, p50 / (k + 1) * 1e6, rate, min(rates), max(rates),
               rate * size / 1e6, (loop_s + other_s) / n / (k + 1) * 1e6,
               loop_s / (loop_s + other_s) if loop_s + other_s else 0.0)


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _cpu_s(pids: list[int]) -> tuple[float, dict[tuple[int, str], float]]:
    """CPU seconds used so far by these processes (the process total keeps the time of threads
    that ended), and by each of their gloo event-loop threads, keyed by (pid, thread id)."""
    total, loops = 0.0, {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) * _TICK_S  # utime + stime
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                if (task / "comm").read_text().startswith("gloo"):
                    f = (task / "stat").read_text().rpartition(")")[2].split()
                    loops[(pid, task.name)] = (int(f[11]) + int(f[12])) * _TICK_S
            except OSError:
                continue  # the thread ended meanwhile
    return total, loops


def _cpu_delta(before: tuple[float, dict[tuple[int, str], float]],
               after: tuple[float, dict[tuple[int, str], float]]) -> tuple[float, float]:
    """(loop seconds, other seconds) between two `_cpu_s` snapshots; loop threads that came or
    went in between are left out of the loop share (they stay in the total)."""
    loop = sum(v - before[1][k] for k, v in after[1].items() if k in before[1])
    return loop, max(0.0, after[0] - before[0] - loop)


# -- dispatcher side of the raw and edge chains ----------------------------------------------------

def _pump(send: Callable[[int], None], recv: Callable[[int], None], n: int, window: int) -> tuple[list[float], float]:
    """Send n messages with at most `window` in flight; a thread receives them.
    Returns each message's round trip (s) and the wall time of all n."""
    sent_at = [0.0] * n
    rtts: list[float] = []
    slots = threading.Semaphore(window)
    error: list[BaseException] = []

    def receiver() -> None:
        try:
            for i in range(n):
                recv(i)
                rtts.append(time.perf_counter() - sent_at[i])
                slots.release()
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            error.append(exc)
            for _ in range(window):
                slots.release()

    t = threading.Thread(target=receiver, name="bench-recv", daemon=True)
    started = time.perf_counter()
    t.start()
    for i in range(n):
        slots.acquire()
        if error:
            break
        sent_at[i] = time.perf_counter()
        send(i)
    t.join()
    wall = time.perf_counter() - started
    if error:
        raise error[0]
    return rtts, wall


# -- raw gloo --------------------------------------------------------------------------------------

def _raw_group(port: int, rank: int, device: Any) -> ProcessGroupGloo:
    """One hop's two-rank group; the sender (rank 0) hosts the store, as `Edge` does."""
    store = TCPStore(HOST, port, 2, rank == 0, TIMEOUT, wait_for_workers=False)
    opts = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    opts._devices = [device]
    opts._timeout = TIMEOUT
    return ProcessGroupGloo(PrefixStore("bench/hop", store), rank, 2, opts)


class _RawReceiver:
    """Receives `total` buffers of one size, the next recv always posted (two buffers)."""

    def __init__(self, pg: ProcessGroupGloo, size: int, total: int) -> None:
        self.pg, self.total, self.i = pg, total, 0
        self.bufs = [torch.empty(size, dtype=torch.uint8) for _ in range(2)]
        self.pending = pg.recv([self.bufs[0]], 0, TAG) if total else None

    def recv(self, before_next: Callable[[], None] | None = None) -> torch.Tensor:
        assert self.pending is not None
        self.pending.wait(TIMEOUT)
        buf = self.bufs[self.i % 2]
        self.i += 1
        if before_next is not None:
            before_next()  # frees the other buffer
        if self.i < self.total:
            self.pending = self.pg.recv([self.bufs[self.i % 2]], 0, TAG)
        return buf


class _RawChainEnd:
    """The dispatcher's two raw hops: out to stage 0, in from the last stage."""

    def __init__(self, k: int, ports: list[int]) -> None:
        device = ProcessGroupGloo.create_device(hostname=HOST, lazy_init=False)
        self.out, self.inp = _raw_group(ports[0], 0, device), _raw_group(ports[k], 1, device)

    def phase(self, size: int, n: int, window: int) -> tuple[list[float], float]:
        payload = torch.zeros(size, dtype=torch.uint8)
        rx = _RawReceiver(self.inp, size, n)

        def send(_i: int) -> None:
            self.out.send([payload], 1, TAG).wait(TIMEOUT)

        def recv(_i: int) -> None:
            rx.recv()

        return _pump(send, recv, n, window)

    def close(self) -> None:
        self.out.shutdown()
        self.inp.shutdown()


def _raw_forward(inp: ProcessGroupGloo, out: ProcessGroupGloo, size: int, n: int) -> None:
    rx = _RawReceiver(inp, size, n)
    sending: list[Any] = []

    def wait_sent() -> None:
        if sending:
            sending.pop().wait(TIMEOUT)

    for _ in range(n):
        buf = rx.recv(wait_sent)
        sending.append(out.send([buf], 1, TAG))
    wait_sent()


# -- Edge, no stage loop ---------------------------------------------------------------------------

def _node(i: int, k: int) -> Node:
    return DISPATCHER if i < 0 or i >= k else Node(i, 0)


def _edge_plans(k: int, ports: list[int]) -> list[EdgePlan]:
    return [EdgePlan(_node(h - 1, k), _node(h, k), HOST, ports[h]) for h in range(k + 1)]


class _EdgeChainEnd:
    """The dispatcher's two Edges; messages carry a request table and the payload, as the pipeline's do."""

    def __init__(self, k: int, ports: list[int]) -> None:
        plans = _edge_plans(k, ports)
        self.edges = connect_all([plans[0], plans[k]], DISPATCHER, HOST, TIMEOUT.total_seconds(), secret=SECRET)
        self.out, self.inp = self.edges[plans[0].key], self.edges[plans[k].key]
        self.table = torch.tensor([[0, 1]], dtype=torch.int64)  # [1, 2] (request id, rows)

    def phase(self, size: int, n: int, window: int) -> tuple[list[float], float]:
        payload = torch.zeros(1, size // 4, dtype=torch.float32)

        def send(i: int) -> None:
            self.out.send(Message(DATA, i, 0, {REQUESTS_KEY: self.table, "input": payload}))

        def recv(_i: int) -> None:
            self.inp.recv()

        return _pump(send, recv, n, window)

    def close(self) -> None:
        for e in self.edges.values():
            e.close()


def _relay_main(index: int, k: int, raw_ports: list[int], edge_ports: list[int], size: int,
                per_round: int, rounds: int) -> None:
    """Relay `index` of both chains: per round, forward `per_round` raw messages, then as many Edge messages."""
    torch.set_num_threads(1)  # as stage workers run
    device = ProcessGroupGloo.create_device(hostname=HOST, lazy_init=False)
    raw_in, raw_out = _raw_group(raw_ports[index], 1, device), _raw_group(raw_ports[index + 1], 0, device)
    plans = _edge_plans(k, edge_ports)
    edges = connect_all([plans[index], plans[index + 1]], Node(index, 0), HOST, TIMEOUT.total_seconds(), secret=SECRET)
    inp, out = edges[plans[index].key], edges[plans[index + 1].key]
    for _ in range(rounds):
        _raw_forward(raw_in, raw_out, size, per_round)
        for _ in range(per_round):
            out.send(inp.recv())
    for e in edges.values():
        e.close()
    raw_in.shutdown()
    raw_out.shutdown()


# -- the full pipeline -----------------------------------------------------------------------------

def _layers(k: int) -> list[list[int]]:
    per = UNITS // k
    return [[s * per, (s + 1) * per - 1] for s in range(k)]


class _PipelineEnd:
    """LocalJob serving k no-op stages; one request is one micro-batch of one sample."""

    def __init__(self, k: int, size: int) -> None:
        cfg = parse_job({
            "name": f"hop-k{k}-{size}",
            "model": {"source": f"python:benchmarks.identity:{FACTORIES[size]}"},
            "pipeline": {"layers": _layers(k), "micro_batch_size": 1, "max_inflight": WINDOW,
                         "max_wait_ms": 0.0, "policy": "round_robin"},
            "placement": {"devices": "auto"},
            "workload": {"samples": [1, 1]},
        })
        self.job = LocalJob(prepare(cfg))
        self.x = torch.zeros(1, size // 4)

    def phase(self, size: int, n: int, window: int) -> tuple[list[float], float]:
        if window == 1:
            rtts = []
            started = time.perf_counter()
            for _ in range(n):
                t0 = time.perf_counter()
                self.job.submit(self.x).result()
                rtts.append(time.perf_counter() - t0)
            return rtts, time.perf_counter() - started
        run = drive(self.job.submit, iter([self.x] * n), n, 0.0, window)
        if run.failed:
            raise RuntimeError(f"hop benchmark: {len(run.failed)} requests failed: {run.failed[0].error}")
        return [o.latency_s for o in run.outcomes], run.wall_s


def bench_depth_size(k: int, size: int, c: Counts, rounds: int) -> list[Row]:
    """All three tiers for one (k, size), interleaved round by round so that load from anything
    else on the machine hits them alike. Each round: warm-up, latency, throughput per tier."""
    raw_ports, edge_ports = free_ports(k + 1, HOST), free_ports(k + 1, HOST)
    ctx = mp.get_context("spawn")
    relays = [ctx.Process(target=_relay_main, args=(i, k, raw_ports, edge_ports, size, c.total, rounds),
                          daemon=True) for i in range(k)]
    for p in relays:
        p.start()
    tiers = ("raw", "edge", "pipeline")
    samples: dict[str, tuple[list[float], list[float]]] = {t: ([], []) for t in tiers}
    cpu = {t: [0.0, 0.0, 0.0] for t in tiers}
    pipe = _PipelineEnd(k, size)
    try:
        with pipe.job:
            raw, edge = _RawChainEnd(k, raw_ports), _EdgeChainEnd(k, edge_ports)
            # Every process of all three tiers: idle ones add nothing.
            pids = [os.getpid()] + [p.pid for p in relays if p.pid is not None] + \
                [h.process.pid for h in pipe.job.state.workers.values() if h.process.pid is not None]
            for _ in range(rounds):
                for tier, end in (("raw", raw), ("edge", edge), ("pipeline", pipe)):
                    end.phase(size, c.warmup, WINDOW)
                    rtts, _ = end.phase(size, c.latency, 1)
                    before = _cpu_s(pids)
                    _, wall = end.phase(size, c.throughput, WINDOW)
                    after = _cpu_s(pids)
                    cpu[tier][0] += c.throughput
                    loop_s, other_s = _cpu_delta(before, after)
                    cpu[tier][1] += loop_s
                    cpu[tier][2] += other_s
                    samples[tier][0].extend(rtts)
                    samples[tier][1].append(c.throughput / wall)
            raw.close()
            edge.close()
    finally:
        for p in relays:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    return [_row(t, k, size, rtts, rates, cpu[t]) for t, (rtts, rates) in samples.items()]


# -- report ----------------------------------------------------------------------------------------

def compare(rows: list[Row]) -> list[dict[str, Any]]:
    """One line per (size, k): the three tiers and the pipeline's overhead over raw, per hop."""
    by = {(r.tier, r.stages, r.bytes): r for r in rows}
    out = []
    for size in sorted({r.bytes for r in rows}):
        for k in sorted({r.stages for r in rows}):
            raw, edge, pipe = (by[(t, k, size)] for t in ("raw", "edge", "pipeline"))
            hops = k + 1
            raw_msg_us, pipe_msg_us = 1e6 / raw.msgs_per_s, 1e6 / pipe.msgs_per_s
            out.append({
                "bytes": size, "stages": k,
                "raw_hop_us": raw.hop_us, "edge_hop_us": edge.hop_us, "pipeline_hop_us": pipe.hop_us,
                "overhead_hop_us": pipe.hop_us - raw.hop_us,
                "goal_met_latency": pipe.hop_us - raw.hop_us <= raw.hop_us,
                "raw_msgs_per_s": raw.msgs_per_s, "edge_msgs_per_s": edge.msgs_per_s,
                "pipeline_msgs_per_s": pipe.msgs_per_s,
                "msgs_per_s_range": {r.tier: [r.msgs_per_s_min, r.msgs_per_s_max] for r in (raw, edge, pipe)},
                # Inverse throughput spread over the hops: CPU-bound on 2 cores, every hop costs.
                "overhead_per_msg_hop_us": (pipe_msg_us - raw_msg_us) / hops,
                "goal_met_throughput": pipe_msg_us - raw_msg_us <= raw_msg_us,
                "cpu_us_per_msg_hop": {r.tier: r.cpu_us_per_msg_hop for r in (raw, edge, pipe)},
                "gloo_loop_cpu_share": {r.tier: r.gloo_loop_cpu_share for r in (raw, edge, pipe)},
            })
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    """Two tables: latency per hop (one in flight), and throughput (WINDOW in flight)."""
    lat = ["| bytes | k | raw us/hop | Edge us/hop | pipeline us/hop | overhead us/hop | pipeline <= 2x raw |",
           "|---:|---:|---:|---:|---:|---:|:-:|"]
    thr = ["| bytes | k | raw msg/s | Edge msg/s | pipeline msg/s | overhead us/msg/hop | pipeline >= raw/2 |",
           "|---:|---:|---:|---:|---:|---:|:-:|"]
    cpu = ["| bytes | k | raw | Edge | pipeline |", "|---:|---:|---:|---:|---:|"]

    def cost(r: dict[str, Any], tier: str) -> str:
        return f"{r['cpu_us_per_msg_hop'][tier]:.0f} ({100 * r['gloo_loop_cpu_share'][tier]:.0f} %)"


    def rate(r: dict[str, Any], tier: str) -> str:
        lo, hi = r["msgs_per_s_range"][tier]
        return f"{r[tier + '_msgs_per_s']:.0f} ({lo:.0f}–{hi:.0f})"

    for r in table:
        lat.append(f"| {r['bytes']} | {r['stages']} | {r['raw_hop_us']:.0f} | {r['edge_hop_us']:.0f} "
                   f"| {r['pipeline_hop_us']:.0f} | {r['overhead_hop_us']:+.0f} "
                   f"| {'yes' if r['goal_met_latency'] else 'no'} |")
        thr.append(f"| {r['bytes']} | {r['stages']} | {rate(r, 'raw')} | {rate(r, 'edge')} | {rate(r, 'pipeline')} "
                   f"| {r['overhead_per_msg_hop_us']:+.0f} | {'yes' if r['goal_met_throughput'] else 'no'} |")
        cpu.append(f"| {r['bytes']} | {r['stages']} | {cost(r, 'raw')} | {cost(r, 'edge')} | {cost(r, 'pipeline')} |")
    return "Latency (one request in flight; median round trip / (k+1)):\n\n" + "\n".join(lat) + \
        f"\n\nThroughput ({WINDOW} in flight; median (min–max) over rounds):\n\n" + "\n".join(thr) + \
        "\n\nCPU per message per hop, us, all processes (share in gloo's event-loop threads), throughput phase:\n\n" \
        + "\n".join(cpu)


def run(quick: bool, out_dir: Path, depths: tuple[int, ...] = DEPTHS,
        sizes: tuple[int, ...] | None = None) -> dict[str, Any]:
    if sizes is None:
        sizes = QUICK_SIZES if quick else SIZES
    counts = [counts_for(s, quick) for s in sizes]
    rows: list[Row] = []
    rounds = ROUNDS_QUICK if quick else ROUNDS
    load: dict[str, list[float]] = {}
    for k in depths:
        for size, c in zip(sizes, counts, strict=True):
            started, load_before = time.monotonic(), os.getloadavg()[0]
            rows += bench_depth_size(k, size, c, rounds)
            load[f"k={k} bytes={size}"] = [load_before, os.getloadavg()[0]]
            print(f"  hop k={k} bytes={size}: {time.monotonic() - started:.1f} s", flush=True)
    table = compare(rows)
    doc = {"window": WINDOW, "rounds": rounds, "loadavg_1m_before_after": load,
           "counts_per_round": {s: asdict(c) for s, c in zip(sizes, counts, strict=True)},
           "rows": [asdict(r) for r in rows], "comparison": table}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "hop_overhead.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages per phase")
    parser.add_argument("--out", default="out/bench", help="directory for hop_overhead.json")
    parser.add_argument("--depths", default=",".join(map(str, DEPTHS)), help="pipeline depths k")
    parser.add_argument("--sizes", default=None, help=f"payload bytes, from {SIZES} (default: all; --quick: "
                                                      f"{QUICK_SIZES})")
    args = parser.parse_args()
    doc = run(args.quick, Path(args.out), tuple(int(d) for d in args.depths.split(",")),
              tuple(int(s) for s in args.sizes.split(",")) if args.sizes else None)
    print(markdown(doc["comparison"]))


if __name__ == "__main__":
    main()
