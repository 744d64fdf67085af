"""A fleet on one controller: CPU, memory, API latency, registration time and lost agents per N.

A real controller (`infscaled --role controller`, its own process) on 127.0.0.1 and N simulated
agents (benchmarks/fleet_sim.py: the agent's own link and usage loop, fake GPUs) in a few
processes. For each N:

1. registration: start the simulators (connects spread over --ramp-s) and time until the
   controller counts N connected agents;
2. the no-loss window (--window-s, default 300: the issue's 5 minutes), in two parts:
   quiet (--quiet-s): only agent traffic; controller CPU (utime + stime from /proc) and RSS;
   loaded (the rest): + --watchers `/v1/watch` subscribers (bytes each receives per second
   after its snapshot, over --watch-s with nothing else going on), then one API client probing GET /v1/jobs,
   GET /v1/agents?limit=100 and a job submission (then its stop) in turn, and a Prometheus-like
   scraper (GET /metrics and one shard of GET /metrics/agents every --scrape-s); latency p50 /
   p99 of each, bytes a watcher received per second, and the longest event-loop delay the
   controller reports (`infscaled_controller_loop_lag_seconds`);
3. restart: SIGTERM the controller, start it again on the same port, time until N are back.

Agents wrongly lost = `agent_lost` events a watcher saw during the window, plus sessions the
simulators saw end there (neither should happen: every agent stays up). Bounded: each phase has a
deadline, every process is killed at the end, loopback only. The last lines compare each result
with the issue's target (PASS / FAIL).

    PYTHONPATH=. python -m benchmarks.fleet_bench --agents 1000 [--agents 10000 ...] [--sims 4]
        [--window-s 300] [--quiet-s 30] [--controller-cpus 0 --sim-cpus 1] [--json out.json]

With --controller-cpus / --sim-cpus the controller and the simulators are pinned (taskset), and
this process (watchers, probes) runs on the simulators' CPUs: the controller gets its core alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "fleet-bench-token"
JOB = """name = "probe"
[model]
source = "builtin:gpt2-tiny"
[pipeline]
stages = 2
replicas = [1, 1]
[placement]
devices = ["cuda", "cuda"]
"""
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pinned(cpus: str | None, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


@dataclass
class Fleet:
    """The controller and simulator processes of one N."""

    args: argparse.Namespace
    n: int
    port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fleet-bench-")))
    controller: subprocess.Popen[bytes] | None = None
    sims: list[subprocess.Popen[str]] = field(default_factory=list)
    sim_reports: list[dict[str, int]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_controller(self) -> None:
        cfg = self.workdir / "controller.toml"
        cfg.write_text(f'[controller]\nport = {self.port}\ntoken = "{TOKEN}"\nstate_dir = "{self.workdir}"\n'
                       f"heartbeat_interval_s = 3.0\nheartbeat_timeout_s = 10.0\n"
                       f"host_metrics_interval_s = {self.args.host_metrics_s}\n"
                       # Every simulated agent comes from 127.0.0.1, and a fleet needs more than the
                       # default 4,096 connections: the caps against a flood would refuse the fleet.
                       f"max_connections = {self.n + 1000}\nmax_connections_per_client = {self.n + 1000}\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = (self.workdir / "controller.log").open("ab")
        self.controller = subprocess.Popen(
            pinned(self.args.controller_cpus, [sys.executable, "-m", "infscaled.cli", "--role", "controller",
                                               "--config", str(cfg), "--log-level", "WARNING"]),
            env=env, stdout=log, stderr=subprocess.STDOUT)

    def start_sims(self) -> None:
        per = -(-self.n // self.args.sims)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for first in range(0, self.n, per):
            count = min(per, self.n - first)
            self.sims.append(subprocess.Popen(
                pinned(self.args.sim_cpus, [sys.executable, "-m", "benchmarks.fleet_sim", "--controller", self.url,
                                            "--token", TOKEN, "--first", str(first), "--agents", str(count),
                                            "--devices", str(self.args.devices), "--busy", str(self.args.busy),
                                            "--ramp-s", str(self.args.ramp_s), "--report-s", "1"]),
                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        self.sim_reports = [{} for _ in self.sims]
        for i, proc in enumerate(self.sims):
            asyncio.get_running_loop().add_reader(proc.stdout.fileno(), self._read_sim, i)  # type: ignore[union-attr]

    def _read_sim(self, i: int) -> None:
        line = self.sims[i].stdout.readline()  # type: ignore[union-attr]
        if not line:
            asyncio.get_running_loop().remove_reader(self.sims[i].stdout.fileno())  # type: ignore[union-attr]
            return
        self.sim_reports[i] = json.loads(line)

    def sim_total(self, key: str) -> int:
        return sum(r.get(key, 0) for r in self.sim_reports)

    def stop(self) -> None:
        for proc in [*self.sims, self.controller]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.sims, self.controller]:
            if proc is None:
                continue
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def connected_agents(http: aiohttp.ClientSession, url: str) -> int:
    try:
        async with http.get(url + "/v1/health", headers={"Authorization": f"Bearer {TOKEN}"},
                            timeout=aiohttp.ClientTimeout(total=5)) as r:
            return int((await r.json())["agents"]) if r.status == 200 else -1
    except (aiohttp.ClientError, OSError, TimeoutError):
        return -1


async def wait_registered(http: aiohttp.ClientSession, fleet: Fleet, deadline_s: float) -> float | None:
    """Seconds until the controller counts N connected agents, or None past the deadline."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if await connected_agents(http, fleet.url) >= fleet.n:
            return time.monotonic() - t0
        await asyncio.sleep(0.25)
    return None


@dataclass
class WatchCounter:
    frames: int = 0
    bytes: int = 0
    lost: int = 0
    since: float = field(default_factory=time.time)  # wall clock: events before it are replays
    errors: list[str] = field(default_factory=list)
    snapshot_at: float | None = None  # monotonic: when its snapshot (not steady state) arrived


async def watch(http: aiohttp.ClientSession, url: str, query: str, counter: WatchCounter, live: list[bool]) -> None:
    try:
        async with http.ws_connect(f"{url}/v1/watch{query}", headers={"Authorization": f"Bearer {TOKEN}"},
                                   max_msg_size=0) as ws:
            async for frame in ws:
                if counter.snapshot_at is None and frame.data.startswith('{"v": 2, "type": "snapshot"'):
                    counter.snapshot_at = time.monotonic()  # bytes count from after the snapshot
                    continue
                if live[0] and counter.snapshot_at is not None:
                    counter.frames += 1
                    counter.bytes += len(frame.data)
                    if '"agent_lost"' in frame.data:  # counted only when it happened in the window
                        event = json.loads(frame.data)
                        if event["type"] == "event" and event["body"]["time"] >= counter.since:
                            counter.lost += 1
    except (aiohttp.ClientError, OSError) as exc:
        counter.errors.append(str(exc))


async def probe(http: aiohttp.ClientSession, url: str, until: float, lat: dict[str, list[float]]) -> None:
    """One API client: each request in turn, 5 rounds a second."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    timeout = aiohttp.ClientTimeout(total=30)
    while time.monotonic() < until:
        for name, method, path, body in (("GET /v1/jobs", "GET", "/v1/jobs", None),
                                         ("GET /v1/agents?limit=100", "GET", "/v1/agents?limit=100", None),
                                         ("POST /v1/jobs", "POST", "/v1/jobs", JOB)):
            t0 = time.perf_counter()
            try:
                async with http.request(method, url + path, data=body, timeout=timeout,
                                        headers={**headers, "Content-Type": "application/toml"}) as r:
                    answer = await r.read()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                lat.setdefault(f"{name} failed", []).append(time.perf_counter() - t0)
                print(f"  {name}: {type(exc).__name__} {exc}", flush=True)
                continue
            lat.setdefault(name, []).append(time.perf_counter() - t0)
            if method == "POST":
                if r.status != 201:
                    lat.setdefault("POST errors", []).append(0.0)
                    print(f"  submit: {r.status} {answer[:200]!r}", flush=True)
                else:
                    async with http.delete(f"{url}/v1/jobs/{json.loads(answer)['id']}", headers=headers) as d:
                        await d.read()
        await asyncio.sleep(0.2)


async def scrape(http: aiohttp.ClientSession, url: str, until: float, every_s: float,
                 lat: dict[str, list[float]], shards: int = 20) -> None:
    """What Prometheus does: every `every_s`, GET /metrics and the next of `shards` shards of
    GET /metrics/agents (no token: public_metrics)."""
    timeout = aiohttp.ClientTimeout(total=60)
    shard = 0
    while time.monotonic() + every_s < until:
        await asyncio.sleep(every_s)
        sharded = f"/metrics/agents?shard={shard}&shards={shards}"
        for name, path in (("GET /metrics", "/metrics"), (f"GET /metrics/agents (1 of {shards} shards)", sharded)):
            t0 = time.perf_counter()
            try:
                async with http.get(url + path, timeout=timeout) as r:
                    body = await r.read()
                    ok = r.status == 200
                if ok and path == "/metrics":
                    lat.setdefault("loop lag", []).append(loop_lag(body))
            except (aiohttp.ClientError, OSError, TimeoutError):
                ok = False
            lat.setdefault(name if ok else f"{name} failed", []).append(time.perf_counter() - t0)
        shard = (shard + 1) % shards


def loop_lag(metrics: bytes) -> float:
    """The controller's own longest event-loop delay of the last minute, from its /metrics."""
    for line in metrics.decode().splitlines():
        if line.startswith("infscaled_controller_loop_lag_seconds "):
            return float(line.split()[1])
    return float("nan")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_n(args: argparse.Namespace, n: int) -> dict[str, Any]:
    fleet = Fleet(args, n)
    result: dict[str, Any] = {"agents": n, "devices_per_agent": args.devices, "busy": args.busy,
                              "host_metrics_interval_s": args.host_metrics_s}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        try:
            fleet.start_controller()
            assert fleet.controller is not None
            while await connected_agents(http, fleet.url) < 0:
                await asyncio.sleep(0.2)
            t0 = time.monotonic()
            fleet.start_sims()
            took = await wait_registered(http, fleet, args.register_deadline_s)
            result["register_s"] = None if took is None else round(time.monotonic() - t0, 2)
            print(f"N={n}: registered in {result['register_s']} s", flush=True)
            await asyncio.sleep(args.settle_s)
            pid = fleet.controller.pid
            # -- quiet window: agent traffic only
            live = [True]
            watchers = [WatchCounter()]
            tasks = [asyncio.create_task(watch(http, fleet.url, "?agents=none", watchers[0], live))]
            drops0, cpu0, t_q = fleet.sim_total("drops"), cpu_seconds(pid), time.monotonic()
            sims0 = sum(cpu_seconds(p.pid) for p in fleet.sims)
            rss = [rss_bytes(pid)]
            while time.monotonic() - t_q < args.quiet_s:
                await asyncio.sleep(1)
                rss.append(rss_bytes(pid))
            result["cpu_agents_only_pct"] = round(100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t_q), 1)
            result["cpu_simulators_pct"] = round(100 * (sum(cpu_seconds(p.pid) for p in fleet.sims) - sims0)
                                                 / (time.monotonic() - t_q), 1)
            result["loadavg_1m"] = os.getloadavg()[0]
            result["host_metrics_per_s"] = None
            print(f"  quiet: controller CPU {result['cpu_agents_only_pct']} %, simulators "
                  f"{result['cpu_simulators_pct']} %, RSS {max(rss) >> 20} MiB", flush=True)
            # -- loaded window: watchers and API probes
            counters = [WatchCounter() for _ in range(args.watchers)]
            tasks += [asyncio.create_task(watch(http, fleet.url, args.watch_query, c, live)) for c in counters]
            # Steady state with watchers and nothing else: what a watcher receives when little
            # changes (the probe's job churn below is change), counted from after each snapshot.
            deadline = time.monotonic() + args.register_deadline_s
            while any(c.snapshot_at is None for c in counters) and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            await asyncio.sleep(2)
            for c in counters:
                c.bytes = c.frames = 0
            t_w = time.monotonic()
            await asyncio.sleep(args.watch_s)
            result["watcher_kb_per_s"] = round(statistics.mean(c.bytes for c in counters) / (time.monotonic() - t_w)
                                               / 1024, 2) if counters else None
            for c in counters:
                c.bytes = c.frames = 0
            sent0 = fleet.sim_total("host_metrics_sent")
            lat: dict[str, list[float]] = {}
            cpu1, t_l = cpu_seconds(pid), time.monotonic()
            loaded_s = max(5.0, args.window_s - (time.monotonic() - t_q))
            scraper = asyncio.create_task(scrape(http, fleet.url, t_l + loaded_s, args.scrape_s, lat))
            await probe(http, fleet.url, t_l + loaded_s, lat)
            await scraper
            span = time.monotonic() - t_l
            result["cpu_loaded_pct"] = round(100 * (cpu_seconds(pid) - cpu1) / span, 1)
            result["host_metrics_per_s"] = round((fleet.sim_total("host_metrics_sent") - sent0) / span, 1)
            rss.append(rss_bytes(pid))
            result["rss_mib"] = max(rss) >> 20
            lags = lat.pop("loop lag", [])
            result["controller_loop_lag_max_ms"] = round(1000 * max(lags), 1) if lags else None
            result["latency_ms"] = {k: {"p50": round(1000 * pct(v, 0.5), 1), "p99": round(1000 * pct(v, 0.99), 1),
                                        "n": len(v)} for k, v in lat.items()}
            result["watchers"] = args.watchers
            result["watcher_kb_per_s_with_probe"] = round(statistics.mean(c.bytes for c in counters) / span / 1024, 2) \
                if counters else None
            await asyncio.sleep(1.5)  # the simulators' reports of the window's end
            live[0] = False
            for t in tasks:
                t.cancel()
            result["window_s"] = round(time.monotonic() - t_q, 1)
            result["lost_watch_events"] = sum(c.lost for c in [*watchers, *counters])
            result["lost_sim_drops"] = fleet.sim_total("drops") - drops0
            # The whole fleet's per-agent series in one scrape (what a single Prometheus target
            # without shards gets), after the window: its cost and whether any agent dropped.
            t_m = time.perf_counter()
            async with http.get(fleet.url + "/metrics/agents", timeout=aiohttp.ClientTimeout(total=120)) as r:
                body = await r.read()
            result["metrics_agents_whole_ms"] = round(1000 * (time.perf_counter() - t_m), 1)
            result["metrics_agents_whole_kb"] = len(body) >> 10
            await asyncio.sleep(4)
            result["sim_drops_after_whole_scrape"] = fleet.sim_total("drops") - drops0 - result["lost_sim_drops"]
            print(f"  loaded: {json.dumps(result)}", flush=True)
            # -- restart
            fleet.controller.send_signal(signal.SIGTERM)
            fleet.controller.wait(60)
            t_r = time.monotonic()
            fleet.start_controller()
            took = await wait_registered(http, fleet, args.register_deadline_s)
            result["reregister_s"] = None if took is None else round(time.monotonic() - t_r, 2)
            print(f"  restart: all {n} back in {result['reregister_s']} s", flush=True)
        finally:
            fleet.stop()
    return result


def parse_cpus(text: str) -> set[int]:
    """taskset's list syntax: "1", "1-3", "0,2-3"."""
    out: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


def verdict(r: dict[str, Any]) -> list[str]:
    """Each of the issue's targets against this result."""
    lat = r.get("latency_ms", {})
    api = {k: v["p99"] for k, v in lat.items() if k in ("GET /v1/jobs", "GET /v1/agents?limit=100", "POST /v1/jobs")}
    checks = [
        ("registered within 30 s", r.get("register_s"), lambda v: v is not None and v <= 30),
        ("back within 30 s after a restart", r.get("reregister_s"), lambda v: v is not None and v <= 30),
        ("controller CPU <= 50 % (agent traffic)", r.get("cpu_agents_only_pct"), lambda v: v is not None and v <= 50),
        ("RSS <= 1 GB", r.get("rss_mib"), lambda v: v is not None and v <= 1024),
        (f"0 agents wrongly lost over {r.get('window_s')} s",
         (r.get("lost_watch_events"), r.get("lost_sim_drops")), lambda v: v == (0, 0)),
        ("API p99 <= 100 ms with watchers", api, lambda v: len(v) == 3 and max(v.values()) <= 100),
    ]
    little = r.get("busy") == 0  # the target is for a fleet where little changes: --busy 0
    kb = r.get("watcher_kb_per_s")
    lines_after = [f"  {'PASS' if kb is not None and kb <= 10 else 'FAIL' if little else 'INFO'}  "
                   f"watcher <= 10 KB/s when little changes (--busy {r.get('busy')}): {r.get('watcher_kb_per_s')}",
                   f"  INFO  the controller's longest event-loop delay in the loaded part (its /metrics, per minute): "
                   f"{r.get('controller_loop_lag_max_ms')} ms"]
    lines = [f"N={r['agents']} (load average {r.get('loadavg_1m')}):"]
    for name, value, ok in checks:
        try:
            passed = ok(value)
        except TypeError:
            passed = False
        lines.append(f"  {'PASS' if passed else 'FAIL'}  {name}: {value}")
    return lines + lines_after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, action="append", help="fleet size; repeat for several (default 1000)")
    ap.add_argument("--sims", type=int, default=4, help="simulator processes")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--busy", type=float, default=0.3)
    ap.add_argument("--host-metrics-s", type=float, default=5.0, help="controller's host_metrics_interval_s")
    ap.add_argument("--ramp-s", type=float, default=10.0)
    ap.add_argument("--settle-s", type=float, default=5.0)
    ap.add_argument("--window-s", type=float, default=300.0,
                    help="the no-loss window: quiet part, then loaded (watchers, API probes, scrapes)")
    ap.add_argument("--quiet-s", type=float, default=30.0, help="its first part: agent traffic only")
    ap.add_argument("--scrape-s", type=float, default=15.0, help="Prometheus-like scrape period in the loaded part")
    ap.add_argument("--watch-s", type=float, default=20.0,
                    help="the loaded part's start: watchers only (their KB/s when little changes), then the probes")
    ap.add_argument("--watchers", type=int, default=10)
    ap.add_argument("--watch-query", default="", help="query of the loaded window's watchers, e.g. ?agents=none")
    ap.add_argument("--register-deadline-s", type=float, default=120.0)
    ap.add_argument("--controller-cpus", help="taskset CPU list for the controller (e.g. 0)")
    ap.add_argument("--sim-cpus", help="taskset CPU list for the simulators (e.g. 1-7)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.quiet_s + args.watch_s + 10 > args.window_s:
        ap.error(f"--window-s {args.window_s:g} must leave at least 10 s after --quiet-s {args.quiet_s:g} and "
                 f"--watch-s {args.watch_s:g} for the probes")
    if args.sim_cpus:  # watchers and probes share the simulators' CPUs, not the controller's
        os.sched_setaffinity(0, parse_cpus(args.sim_cpus))
    results = [asyncio.run(one_n(args, n)) for n in args.agents or [1000]]
    print(json.dumps(results, indent=1))
    for r in results:
        print("\n".join(verdict(r)))
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "cpus": os.cpu_count(), "results": results},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
