"""A healthy job's throughput while a stranger and a careless token holder send hostile requests.

A controller and one agent (cpu:4) as subprocesses, the quickstart job, `--clients` closed-loop
inference clients through the controller's proxy. Phases of `--seconds` alternate, `--rounds`
times: quiet, then hostile, where another process sends, at `--rate` per second (default 20:
an attacker elsewhere spends its own CPU, not this host's), 100k-deep JSON and TOML,
`replicas = [1, 12000000]`, NaN in JSON, a 9 MB JSON body, a model directory outside the
roots, bad tokens, and every 20th request a slow body that never completes (cut by
body_timeout_s). Reports the job's requests/s in each phase, the controller's CPU, the ratio
hostile / quiet, what the hostile requests were answered, and the controller's RSS.

Usage: python -m benchmarks.hostile_bench [--seconds 10] [--rounds 3] [--clients 4] [--out out/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

TOKEN = "hostile-token-" + "q" * 24
CLI = [sys.executable, "-m", "infscaled.cli"]
JOB = Path(__file__).parents[1] / "configs" / "jobs" / "quickstart.toml"
DEEP = 100_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(url: str, path: str, body: bytes | None, ctype: str, token: str = TOKEN, timeout: float = 30) -> int:
    req = urllib.request.Request(url + path, data=body, method="POST" if body is not None else "GET",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


def hostile_requests() -> list[tuple[str, str, bytes, str, str]]:
    """(name, path, body, content type, token)."""
    quick = JOB.read_text()
    deep_json = b"[" * DEEP + b"]" * DEEP
    return [
        ("deep_json", "/v1/jobs", deep_json, "application/json", TOKEN),
        ("deep_json_openai", "/v1/completions", deep_json, "application/json", TOKEN),
        ("deep_toml", "/v1/jobs", ("x = " + "[" * DEEP + "]" * DEEP).encode(), "application/toml", TOKEN),
        ("replicas_12M", "/v1/jobs", quick.replace("replicas = [1, 2]", "replicas = [1, 12000000]").encode(),
         "application/toml", TOKEN),
        ("nan", "/v1/chat/completions", b'{"model": "x", "temperature": NaN}', "application/json", TOKEN),
        ("json_9MB", "/v1/jobs", b'{"toml": "' + b"x" * (9 << 20) + b'"}', "application/json", TOKEN),
        ("dir_outside_roots", "/v1/jobs", quick.replace('"builtin:gpt2-tiny"', '"/etc"').encode(),
         "application/toml", TOKEN),
        ("bad_token", "/v1/jobs", quick.encode(), "application/toml", "wrong-token"),
    ]


def hostile(url: str, port: int, seconds: float, rate: float, answers: Counter[str]) -> None:
    """Send hostile requests at `rate` per second (or as fast as answered, when slower) until
    `seconds` passed. Its own process: see main."""
    reqs = hostile_requests()
    stop = time.monotonic() + seconds
    i = 0
    slow: list[socket.socket] = []
    while time.monotonic() < stop:
        time.sleep(max(0.0, i / rate - (time.monotonic() - (stop - seconds))))
        if i % 20 == 19:  # a slow body that never completes
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                      + b"\r\nContent-Type: application/toml\r\nContent-Length: 100000\r\n\r\nname = ")
            slow.append(s)
            answers["slow_body_sent"] += 1
        else:
            name, path, body, ctype, token = reqs[i % len(reqs)]
            try:
                answers[f"{name}:{call(url, path, body, ctype, token)}"] += 1
            except OSError as exc:
                answers[f"{name}:{type(exc).__name__}"] += 1
        i += 1
    for s in slow:
        s.close()


def load(url: str, job_id: str, halt: threading.Event, done: list[float]) -> None:
    body = json.dumps({"inputs": [[1, 2, 3, 4, 5, 6, 7, 8]]}).encode()
    while not halt.is_set():
        if call(url, f"/v1/jobs/{job_id}/infer", body, "application/json") == 200:
            done.append(time.monotonic())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rate", type=float, default=20.0, help="hostile requests per second")
    p.add_argument("--out", default="out/bench")
    p.add_argument("--hostile-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hostile_port:
        answers: Counter[str] = Counter()
        hostile(f"http://127.0.0.1:{args.hostile_port}", args.hostile_port, args.seconds, args.rate, answers)
        usage = resource.getrusage(resource.RUSAGE_SELF)  # the attacker's own CPU, start-up included
        print(json.dumps({"answers": answers, "cpu_s": usage.ru_utime + usage.ru_stime}))
        return

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    phases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="infscaled-hostile-") as state:
        env = {**os.environ, "INFSCALED_TOKEN": TOKEN, "INFSCALED_STATE_DIR": state, "HF_HUB_OFFLINE": "1"}
        quiet = subprocess.DEVNULL
        ctl = subprocess.Popen([*CLI, "--role", "controller", "--port", str(port)], env=env, stderr=quiet)
        agent = subprocess.Popen([*CLI, "--role", "agent", "--controller", url, "--id", "a1", "--devices", "cpu:4",
                                  "--port-range", "21100-21140"], env=env, stderr=quiet)
        halt = threading.Event()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    req = urllib.request.Request(url + "/v1/agents", headers={"Authorization": f"Bearer {TOKEN}"})
                    with urllib.request.urlopen(req, timeout=2) as resp:
                        if json.loads(resp.read()):
                            break
                except OSError:
                    pass
                time.sleep(0.2)
            req = urllib.request.Request(url + "/v1/jobs", data=JOB.read_bytes(), method="POST", headers={
                "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/toml"})
            with urllib.request.urlopen(req, timeout=300) as resp:
                job_id = json.loads(resp.read())["id"]
            while True:
                req = urllib.request.Request(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"})
                with urllib.request.urlopen(req, timeout=10) as resp:
                    if json.loads(resp.read())["state"] == "running":
                        break
                time.sleep(0.3)
            done: list[float] = []
            clients = [threading.Thread(target=load, args=(url, job_id, halt, done), daemon=True)
                       for _ in range(args.clients)]
            for t in clients:
                t.start()
            time.sleep(3)  # warm-up
            rss = psutil.Process(ctl.pid)
            for _ in range(args.rounds):
                for kind in ("quiet", "hostile"):
                    t0 = time.monotonic()
                    cpu0 = sum(rss.cpu_times()[:2])
                    answers: dict[str, int] = {}
                    attacker_cpu = 0.0
                    if kind == "hostile":
                        out = subprocess.run([sys.executable, "-m", "benchmarks.hostile_bench", "--hostile-port",
                                              str(port), "--seconds", str(args.seconds), "--rate",
                                              str(args.rate)], capture_output=True,
                                             text=True, timeout=args.seconds + 120,
                                             cwd=str(Path(__file__).parents[1])).stdout
                        report = json.loads(out.strip().splitlines()[-1])
                        answers, attacker_cpu = report["answers"], report["cpu_s"]
                    else:
                        time.sleep(args.seconds)
                    t1 = time.monotonic()
                    rate = sum(t0 <= t < t1 for t in done) / (t1 - t0)
                    cpu = (sum(rss.cpu_times()[:2]) - cpu0) / (t1 - t0)
                    phases.append({"kind": kind, "req_per_s": rate, "controller_rss_mb": rss.memory_info().rss / 2**20,
                                   "controller_cpu_ratio": cpu, "attacker_cpu_ratio": attacker_cpu / (t1 - t0),
                                   "hostile_answers": answers})
                    print(f"{kind:<8} {rate:8.1f} req/s  controller CPU {cpu:4.0%}  "
                          f"attacker CPU {attacker_cpu / (t1 - t0):4.0%}  "
                          f"RSS {phases[-1]['controller_rss_mb']:.0f} MB"
                          + (f"  {sum(answers.values())} hostile requests" if answers else ""), flush=True)
        finally:
            halt.set()
            for proc in (agent, ctl):
                proc.terminate()
            for proc in (agent, ctl):
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    quiet_rates = [ph["req_per_s"] for ph in phases if ph["kind"] == "quiet"]
    hostile_rates = [ph["req_per_s"] for ph in phases if ph["kind"] == "hostile"]
    pairs = [h / q for q, h in zip(quiet_rates, hostile_rates, strict=True)]
    summary = {"quiet_median": statistics.median(quiet_rates), "hostile_median": statistics.median(hostile_rates),
               "ratio_per_round": pairs, "ratio_median": statistics.median(pairs),
               "controller_rss_mb_max": max(ph["controller_rss_mb"] for ph in phases)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "hostile.json").write_text(json.dumps({"phases": phases, "summary": summary}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
