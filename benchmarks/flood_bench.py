"""Slowloris and connection flood against a controller, with a healthy client measuring the API.

A controller subprocess on 127.0.0.1 (no agents needed: the attack is on its HTTP listener).
A healthy client (this process, one thread) calls `GET /v1/jobs` with the token every 50 ms
and records the latency (or the failure, 2 s timeout); a sampler records the controller's open
file descriptors, TCP connections and RSS every 200 ms. Phases of `--seconds` each:

- baseline: no attack;
- slowloris: an attacker subprocess opens `--slow` connections from 127.0.0.2..127.0.0.11 and
  sends one header line per connection every second, never finishing the request;
- flood: an attacker subprocess opens `--flood` connections from 127.0.0.12..127.0.0.51, as
  fast as it can, and holds them without sending anything.

`--code DIR` runs the controller from another checkout (e.g. the main branch before the
connection guard) for a before / after comparison; the attacker and client are this file's.

Usage: python -m benchmarks.flood_bench [--seconds 15] [--slow 3000] [--flood 15000]
       [--code DIR] [--label NAME] [--out out/bench]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

TOKEN = "flood-token-" + "z" * 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the attacker (its own process) --------------------------------------------------------------


async def _connect(port: int, src: str, gate: asyncio.Semaphore) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with gate:  # bounded connects in flight; the connections themselves stay open
        return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0)), 10)


async def _slow_one(port: int, src: str, held: list[int], stop: float, gate: asyncio.Semaphore) -> None:
    try:
        reader, writer = await _connect(port, src, gate)
    except (OSError, TimeoutError):
        return
    held[0] += 1
    try:
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        i = 0
        while time.monotonic() < stop:
            await asyncio.sleep(1.0)
            writer.write(b"X-Slow-%d: y\r\n" % i)
            await writer.drain()
            if reader.at_eof():
                break
            i += 1
    except OSError:
        pass
    finally:
        held[0] -= 1
        writer.close()


async def _flood_one(port: int, src: str, held: list[int], stop: float, conns: list[Any],
                     gate: asyncio.Semaphore) -> None:
    try:
        reader, writer = await _connect(port, src, gate)
    except (OSError, TimeoutError):
        return
    held[0] += 1
    conns.append(writer)
    try:
        await asyncio.wait_for(reader.read(1), max(0.0, stop - time.monotonic()))
    except (OSError, TimeoutError):
        pass
    held[0] -= 1


async def attack(mode: str, port: int, count: int, seconds: float) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stop = time.monotonic() + seconds
    held = [0]
    conns: list[Any] = []
    first, count_src = (2, 10) if mode == "slowloris" else (12, 40)
    sources = [f"127.0.0.{first + i}" for i in range(count_src)]
    tasks = []
    gate = asyncio.Semaphore(500)  # connects in flight at once

    async def one(i: int) -> None:
        src = sources[i % len(sources)]
        if mode == "slowloris":
            await _slow_one(port, src, held, stop, gate)
        else:
            await _flood_one(port, src, held, stop, conns, gate)

    for i in range(count):
        tasks.append(asyncio.create_task(one(i)))
        if i % 200 == 0:
            await asyncio.sleep(0)
            print(json.dumps({"t": time.monotonic(), "attacker_held": held[0]}), flush=True)
    while time.monotonic() < stop:
        print(json.dumps({"t": time.monotonic(), "attacker_held": held[0]}), flush=True)
        await asyncio.sleep(0.5)
    for w in conns:
        w.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- the measuring side ------------------------------------------------------------------------


def healthy_client(url: str, halt: threading.Event, out: list[tuple[float, float | None]]) -> None:
    while not halt.is_set():
        req = urllib.request.Request(url + "/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                resp.read()
            out.append((t0, time.monotonic() - t0))
        except (OSError, urllib.error.URLError):
            out.append((t0, None))
        time.sleep(max(0.0, 0.05 - (time.monotonic() - t0)))


def sampler(pid: int, halt: threading.Event, out: list[dict[str, float]]) -> None:
    proc = psutil.Process(pid)
    while not halt.is_set():
        try:
            out.append({"t": time.monotonic(), "fds": proc.num_fds(), "tcp": len(proc.net_connections("tcp")),
                        "rss_mb": proc.memory_info().rss / 2**20})
        except psutil.Error:
            out.append({"t": time.monotonic(), "fds": -1, "tcp": -1, "rss_mb": -1})
        time.sleep(0.2)


def summarise(lat: list[tuple[float, float | None]], samples: list[dict[str, float]], t0: float,
              t1: float) -> dict[str, Any]:
    window = [v for t, v in lat if t0 <= t < t1]
    ok = sorted(v * 1e3 for v in window if v is not None)
    snaps = [s for s in samples if t0 <= s["t"] < t1]
    def q(p: float) -> float:
        return ok[min(len(ok) - 1, int(p * len(ok)))] if ok else float("nan")

    return {"requests": len(window), "failed": sum(v is None for v in window),
            "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": ok[-1] if ok else float("nan"),
            "controller_fds_max": max((s["fds"] for s in snaps), default=-1),
            "controller_tcp_max": max((s["tcp"] for s in snaps), default=-1),
            "controller_rss_mb_max": round(max((s["rss_mb"] for s in snaps), default=-1), 1),
            "controller_fds_end": snaps[-1]["fds"] if snaps else -1}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--slow", type=int, default=3000)
    p.add_argument("--flood", type=int, default=15000)
    p.add_argument("--code", default=str(Path(__file__).parents[1]))
    p.add_argument("--label", default="this branch")
    p.add_argument("--out", default="out/bench")
    p.add_argument("--attacker", choices=["slowloris", "flood"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.attacker:
        asyncio.run(attack(args.attacker, args.port, args.slow if args.attacker == "slowloris" else args.flood,
                           args.seconds))
        return

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    phases: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="infscaled-flood-") as state:
        env = {**os.environ, "INFSCALED_TOKEN": TOKEN, "INFSCALED_STATE_DIR": state, "PYTHONPATH": args.code}
        log = Path(state) / "controller.log"
        with log.open("wb") as err:
            ctl = subprocess.Popen([sys.executable, "-m", "infscaled.cli", "--role", "controller", "--port",
                                    str(port)], env=env, stderr=err, cwd=args.code)
        lat: list[tuple[float, float | None]] = []
        samples: list[dict[str, float]] = []
        halt = threading.Event()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(urllib.request.Request(url + "/v1/health", headers={
                        "Authorization": f"Bearer {TOKEN}"}), timeout=1).read()
                    break
                except OSError:
                    time.sleep(0.2)
            threads = [threading.Thread(target=healthy_client, args=(url, halt, lat), daemon=True),
                       threading.Thread(target=sampler, args=(ctl.pid, halt, samples), daemon=True)]
            for t in threads:
                t.start()
            t0 = time.monotonic()
            time.sleep(args.seconds)
            phases["baseline"] = summarise(lat, samples, t0, time.monotonic())
            for mode in ("slowloris", "flood"):
                t0 = time.monotonic()
                attacker = subprocess.Popen([sys.executable, "-m", "benchmarks.flood_bench", "--attacker", mode,
                                             "--port", str(port), "--seconds", str(args.seconds), "--slow",
                                             str(args.slow), "--flood", str(args.flood)],
                                            stdout=subprocess.PIPE, text=True,
                                            cwd=str(Path(__file__).parents[1]))
                out, _ = attacker.communicate(timeout=args.seconds + 120)
                held = [json.loads(line)["attacker_held"] for line in out.splitlines() if line.startswith("{")]
                phases[mode] = {**summarise(lat, samples, t0, time.monotonic()),
                                "attacker_held_max": max(held, default=0),
                                "attacker_held_at_end": held[-1] if held else 0}
                time.sleep(3)  # let the listener settle between phases
            phases["controller_alive"] = {"alive": ctl.poll() is None}
        finally:
            halt.set()
            ctl.terminate()
            try:
                ctl.wait(30)
            except subprocess.TimeoutExpired:
                ctl.kill()
        log_bytes = log.stat().st_size
        log_tail = log.read_text(errors="replace").splitlines()[-12:]
    result = {"label": args.label, "code": args.code, "seconds": args.seconds, "slow": args.slow,
              "flood": args.flood, "phases": phases, "controller_log_bytes": log_bytes,
              "controller_log_tail": log_tail}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "flood_" + "".join(c if c.isalnum() else "_" for c in args.label) + ".json"
    Path(args.out, name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
