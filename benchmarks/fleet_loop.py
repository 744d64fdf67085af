"""What the controller's event loop spends on a fleet of N agents, measured in one process with
no simulator beside it: the controller's own objects (Registry, JobStore, the aiohttp app) hold
N registered agents with usage, and each piece of per-agent or per-request work is timed.

    PYTHONPATH=. python -m benchmarks.fleet_loop [--agents 10000] [--devices 8] [--changed 350]

- our share of one agent frame (`Registry._handle`: decode + apply) for a heartbeat and for
  host metrics with 8 GPUs (aiohttp's read and the syscalls come on top: fleet_bench measures
  the whole);
- one liveness sweep over the fleet;
- one /v1/watch tick (`Stream.advance`) when nothing changed and when --changed agents
  reported new usage, the delta's size, and the whole snapshot's encoding (once per tick for
  joining watchers);
- over HTTP on 127.0.0.1 (the real app, token and all): GET /v1/agents?limit=100 (first page
  and a page deep in the fleet), GET /v1/jobs, GET /v1/health, GET /metrics and the agents'
  series (/metrics/agents: one agent, one of 20 shards, the whole fleet), p50 / p99, and for
  each scrape the longest the loop went without running a 1 ms ticker;
- a submission's placement (fit check + pick) with no device and half the devices busy,
  against the scan over every agent it replaced.

The agents have no websocket: only what does not need one is measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from benchmarks.fleet_bench import JOB
from infscaled.controller import api
from infscaled.controller.app import make_app
from infscaled.controller.config import ControllerConfig
from infscaled.controller.job import Job, JobSource
from infscaled.controller.jobs import JobStore
from infscaled.controller.registry import Agent, Registry
from infscaled.controller.run import GC_GEN0_THRESHOLD
from infscaled.controller.watch import Stream
from infscaled.planning.assign import AgentOffer, assign
from infscaled.protocol.messages import Device, DeviceUsage, Heartbeat, HostMetrics, Register, encode
from infscaled.protocol.plan import Node

TOKEN = "fleet-loop-token"


def usage(agent_id: str, devices: int, rng: random.Random) -> HostMetrics:
    return HostMetrics(agent_id, rng.random(), 1 << 38,
                       [DeviceUsage(f"cuda:{i}", round(rng.random(), 3), 60 << 30) for i in range(devices)])


def fleet(cfg: ControllerConfig, n: int, devices: int) -> tuple[Registry, JobStore]:
    registry = Registry(cfg)
    jobs = JobStore(cfg, registry)
    rng = random.Random(0)
    for i in range(n):
        agent_id = f"agent-{i:05d}"
        info = Register(agent_id, f"host-{i}", "127.0.0.1",
                        [Device(f"cuda:{d}", "cuda", "H100", 80 << 30) for d in range(devices)], 64, 1 << 40,
                        [29500, 29999])
        registry.admit(Agent(info, None, usage=usage(agent_id, devices, rng)))
    return registry, jobs




def placement(registry: Registry, jobs: JobStore, n_busy: int) -> dict[str, float]:
    """A submission's placement work (the fit check over every known agent's devices, then the
    pick among free ones) with `n_busy` devices held by jobs, against the scan it replaced."""
    source = JobSource(JOB, "probe.toml")
    cfg = source.parse(None)
    job = Job("probe-1", cfg, (1,) * 6, ((0, 2), (3, 5)), time.time(), source)
    ids = list(registry.agents)
    busy = {(ids[i // 8], f"cuda:{i % 8}") for i in range(n_busy)}
    wants = [(Node(0, 0), "cuda"), (Node(1, 0), "cuda")]

    def indexed() -> None:
        jobs._check_fits_cluster(job)  # noqa: SLF001 - the submission's own steps, without an agent's Inspect
        registry.offers.set_busy(busy)
        jobs._place(job, registry.offers, {})  # noqa: SLF001

    def scan() -> None:  # what submit did before the index: every agent's devices, twice
        assign(wants, [AgentOffer(a.id, a.device_ids) for a in registry], "pack")
        assign(wants, [AgentOffer(a.id, tuple(d for d in a.device_ids if (a.id, d) not in busy))
                       for a in registry.connected()], "pack")

    return {"busy_devices": n_busy, "indexed_us": round(us_per_call(indexed, 200), 1),
            "scan_us": round(us_per_call(scan, 5), 1)}


async def loop_stall(fn: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """(wall ms of fn, the longest the event loop went without running a 1 ms ticker meanwhile)."""
    loop = asyncio.get_running_loop()
    longest = 0.0

    async def ticker() -> None:
        nonlocal longest
        last = loop.time()
        while True:
            await asyncio.sleep(0.001)
            longest = max(longest, loop.time() - last)
            last = loop.time()

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    await fn()
    wall = time.perf_counter() - t0
    await asyncio.sleep(0.01)  # the ticker's next run measures a stall that ended with fn
    task.cancel()
    return round(wall * 1000, 1), round(longest * 1000, 1)


def us_per_call(fn: Callable[[], Any], repeat: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e6


async def timed(fn: Callable[[], Awaitable[Any]], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)  # as the controller's run() does
    cfg = ControllerConfig(port=0, token=TOKEN, state_dir=tempfile.mkdtemp(prefix="fleet-loop-"))
    registry, jobs = fleet(cfg, args.agents, args.devices)
    result: dict[str, Any] = {"agents": args.agents, "devices_per_agent": args.devices}
    agent = registry.agents["agent-00042"]
    beat = encode(Heartbeat(agent.id, 0))
    metrics = encode(usage(agent.id, args.devices, random.Random(1)))
    t0 = time.perf_counter()
    for _ in range(5000):
        await registry._handle(agent, beat)  # noqa: SLF001 - the frame path itself, without a socket
    result["handle_heartbeat_us"] = round((time.perf_counter() - t0) / 5000 * 1e6, 1)
    t0 = time.perf_counter()
    for _ in range(2000):
        await registry._handle(agent, metrics)  # noqa: SLF001
    result["handle_host_metrics_us"] = round((time.perf_counter() - t0) / 2000 * 1e6, 1)

    now = time.monotonic()
    result["liveness_sweep_ms"] = round(us_per_call(
        lambda: [a for a in registry.agents.values() if a.state == "connected" and now - a.last_seen > 10], 20)
        / 1000, 2)

    result["placement"] = [placement(registry, jobs, n) for n in (0, min(8 * args.agents - 8, 8 * args.agents // 2))]

    app = make_app(cfg, TOKEN, registry, jobs)
    watchers = app[api.WATCHERS]
    t0 = time.perf_counter()
    stream = Stream(watchers.views, 1.0, True)  # the first tick builds all N views
    result["first_tick_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    quiet = [stream.advance() for _ in range(3)][-1]
    result["quiet_tick_ms"] = round(us_per_call(stream.advance, 20) / 1000, 2)
    result["quiet_delta_bytes"] = len(quiet)
    rng = random.Random(2)
    ids = list(registry.agents)

    reports = [[usage(agent_id, args.devices, rng) for agent_id in rng.sample(ids, args.changed)] for _ in range(11)]

    def busy_tick() -> str:
        for report in reports.pop():
            registry.agents[report.agent_id].usage = report
            registry.usage_changed.add(report.agent_id)  # what Registry._handle does for a HostMetrics
        return stream.advance()

    busy = busy_tick()
    result["changed_per_tick"] = args.changed
    result["busy_tick_ms"] = round(us_per_call(busy_tick, 10) / 1000, 1)
    result["busy_delta_kb"] = len(busy) >> 10
    t0 = time.perf_counter()
    snapshot = stream.snapshot_text()
    result["snapshot_encode_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    result["snapshot_mb"] = round(len(snapshot) / 1e6, 1)

    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    latency: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession(headers=auth) as http:
        for path, repeat in (("/v1/agents?limit=100", 50), (f"/v1/agents?limit=100&after=agent-{args.agents - 500:05d}", 50),
                             ("/v1/jobs", 50), ("/v1/health", 50), ("/metrics", 20),
                             ("/metrics/agents?agent=agent-00042", 50), ("/metrics/agents?shard=0&shards=20", 20),
                             ("/metrics/agents", 3)):
            async def get(path: str = path) -> None:
                async with http.get(url + path) as r:
                    assert r.status == 200, (path, r.status, await r.text())
                    await r.read()
            ms = await timed(get, repeat)
            latency[path] = {"p50": round(statistics.median(ms), 1), "p99": round(max(ms) if repeat < 100 else
                                                                                   sorted(ms)[int(0.99 * repeat)], 1)}
        sizes = {}
        for path in ("/metrics", "/metrics/agents?shard=0&shards=20", "/metrics/agents"):
            async def scrape(path: str = path) -> None:
                async with http.get(url + path) as r:
                    sizes[path] = len(await r.read()) >> 10
            wall, stall = await loop_stall(scrape)
            latency[path].update(wall_ms=wall, longest_loop_stall_ms=stall, kb=sizes[path])
    result["http_ms"] = latency
    result["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    result["loadavg_1m"] = os.getloadavg()[0]  # other work on the machine: all times above stretch with it
    await runner.cleanup()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=10_000)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--changed", type=int, default=350, help="agents with new usage per tick (busy fleet)")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=1))


if __name__ == "__main__":
    main()
