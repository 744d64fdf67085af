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
  and a page deep in the fleet), GET /v1/jobs, GET /v1/health and GET /metrics, p50 / p99.

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

from infscaled.controller import api
from infscaled.controller.app import make_app
from infscaled.controller.config import ControllerConfig
from infscaled.controller.jobs import JobStore
from infscaled.controller.registry import Agent, Registry
from infscaled.controller.run import GC_GEN0_THRESHOLD
from infscaled.controller.watch import Stream
from infscaled.protocol.messages import Device, DeviceUsage, Heartbeat, HostMetrics, Register, encode

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
        registry.agents[agent_id] = Agent(info, None, usage=usage(agent_id, devices, rng))
        registry.changed.add(agent_id)
    return registry, jobs


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
                             ("/v1/jobs", 50), ("/v1/health", 50), ("/metrics", 5)):
            async def get(path: str = path) -> None:
                async with http.get(url + path) as r:
                    assert r.status == 200, (path, r.status, await r.text())
                    await r.read()
            ms = await timed(get, repeat)
            latency[path] = {"p50": round(statistics.median(ms), 1), "p99": round(max(ms) if repeat < 100 else
                                                                                   sorted(ms)[int(0.99 * repeat)], 1)}
        async with http.get(url + "/metrics") as r:
            result["metrics_kb"] = len(await r.read()) >> 10
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
