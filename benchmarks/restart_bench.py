"""A controller's restart under load: `kill -9`, start again, time until it serves.

A controller and one agent (cpu:4) as subprocesses on 127.0.0.1, the quickstart job, closed-loop
inference through the controller's proxy (`--clients` threads). Then, `--repeats` times:
SIGKILL the controller, start a new one on the same state directory, and measure
- restart -> first proxied answer (POST /v1/jobs/ID/infer answered 200),
- restart -> the agent registered again, and -> the job adopted (running, the same worker PIDs).
At the end, the dispatcher's own counters: requests it completed, rejected, timed out.

Also the database's cost on the controller's event loop: the time one `save_job` takes on the
caller's thread (serialise + queue) and the writer thread's commits.

Usage: python -m benchmarks.restart_bench [--repeats 5] [--clients 4] [--out out/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

TOKEN = "bench-token-" + "y" * 24
CLI = [sys.executable, "-m", "infscaled.cli"]
JOB = Path(__file__).parents[1] / "configs" / "jobs" / "quickstart.toml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Api:
    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json",
             timeout: float = 30) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": ctype})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def until(self, what: str, check: Any, timeout: float, poll_s: float = 0.01) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = check()
            except OSError:
                value = None
            if value:
                return value
            time.sleep(poll_s)
        raise RuntimeError(f"timed out waiting for {what}")


def load(api: Api, job_id: str, halt: threading.Event, counts: dict[str, int]) -> None:
    body = json.dumps({"inputs": [[1, 2, 3, 4, 5, 6, 7, 8]]}).encode()
    while not halt.is_set():
        try:
            status, _ = api.call("POST", f"/v1/jobs/{job_id}/infer", body)
            counts["ok" if status == 200 else f"http_{status}"] = counts.get("ok" if status == 200 else
                                                                             f"http_{status}", 0) + 1
        except OSError:
            counts["conn_error"] = counts.get("conn_error", 0) + 1
            time.sleep(0.01)


def store_cost(n: int = 5000) -> dict[str, float]:
    """save_job on the caller's thread, then until the writer committed everything."""
    from infscaled.controller.store import JobRecord, Store

    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(tmp)
        nodes = {n: {"agent": "a1", "device": f"cpu:{i}", "state": "ready", "pid": 1000 + i, "reason": ""}
                 for i, n in enumerate(("0.0", "1.0", "1.1", "dispatcher"))}
        rec = JobRecord("quickstart-abc123", "quickstart", time.time(), "quickstart.toml", JOB.read_text(), None,
                        6, [100] * 6, "running", "", {"job": "x", "edges": [["0.0", "1.0", "127.0.0.1", 20001]] * 6},
                        nodes, {"a1": [20000, 20001, 20002, 20003, 20004, 20005]}, "a1", 20000, "t" * 32)
        started = time.perf_counter()
        for _ in range(n):
            store.save_job(rec)
        queued = time.perf_counter() - started
        store.flush_blocking(60)
        done = time.perf_counter() - started
        commits = store.commits
        store.close()
    return {"saves": n, "us_per_save_on_caller": queued / n * 1e6, "all_committed_s": done,
            "commits": commits, "saves_per_s": n / done}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--out", default="out/bench")
    args = p.parse_args()
    port = free_port()
    api = Api(f"http://127.0.0.1:{port}")
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="infscaled-restart-") as state:
        env = {**os.environ, "INFSCALED_TOKEN": TOKEN, "INFSCALED_STATE_DIR": state, "HF_HUB_OFFLINE": "1"}
        devnull = subprocess.DEVNULL
        controller = subprocess.Popen([*CLI, "--role", "controller", "--port", str(port)], env=env, stderr=devnull)
        agent = subprocess.Popen([*CLI, "--role", "agent", "--controller", api.url, "--id", "a1", "--devices",
                                  "cpu:4", "--port-range", "21000-21040"], env=env, stderr=devnull)
        halt = threading.Event()
        counts: dict[str, int] = {}
        clients: list[threading.Thread] = []
        try:
            api.until("the agent", lambda: api.call("GET", "/v1/agents")[1], 60, 0.2)
            status, job = api.call("POST", "/v1/jobs", JOB.read_bytes(), "application/toml", 300)
            assert status == 201, job
            job_id = job["id"]
            first = api.until("running", lambda: (d := api.call("GET", f"/v1/jobs/{job_id}")[1])["state"] == "running"
                              and d, 300, 0.2)
            pids = {n["node"]: n["pid"] for n in first["nodes"]}
            clients = [threading.Thread(target=load, args=(api, job_id, halt, counts), daemon=True)
                       for _ in range(args.clients)]
            for t in clients:
                t.start()
            api.until("load", lambda: counts.get("ok", 0) > 50, 60)
            probe = json.dumps({"inputs": [[9, 9, 9]]}).encode()
            for _ in range(args.repeats):
                time.sleep(1.0)  # under load for a while
                controller.kill()
                controller.wait(10)
                t0 = time.monotonic()
                controller = subprocess.Popen([*CLI, "--role", "controller", "--port", str(port)], env=env,
                                              stderr=devnull)
                api.until("a proxied answer", lambda: api.call("POST", f"/v1/jobs/{job_id}/infer", probe,
                                                               timeout=5)[0] == 200, 60)
                answer_s = time.monotonic() - t0
                api.until("the agent back", lambda: api.call("GET", "/v1/agents")[1][0]["state"] == "connected", 60)
                agent_s = time.monotonic() - t0
                detail = api.until("adopted", lambda: (d := api.call("GET", f"/v1/jobs/{job_id}")[1])["state"]
                                   == "running" and d, 60)
                assert {n["node"]: n["pid"] for n in detail["nodes"]} == pids, "the same workers"
                runs.append({"first_answer_s": answer_s, "agent_back_s": agent_s})
                print(f"restart: first proxied answer {answer_s:.3f} s, agent registered again {agent_s:.2f} s")
            halt.set()
            for t in clients:
                t.join(60)
            def idle() -> Any:
                m = api.call("GET", f"/v1/jobs/{job_id}/metrics")[1]["dispatcher"]
                return m and m["inflight_requests"] == 0 and m

            stats = api.until("dispatcher idle", idle, 30, 0.5)
        finally:
            halt.set()
            for proc in (controller, agent):
                proc.terminate()
            for proc in (agent, controller):
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    cost = store_cost()
    summary = {
        "first_answer_s": {"median": statistics.median(r["first_answer_s"] for r in runs),
                           "max": max(r["first_answer_s"] for r in runs)},
        "agent_back_s": {"median": statistics.median(r["agent_back_s"] for r in runs),
                         "max": max(r["agent_back_s"] for r in runs)},
        "client_counts": counts,
        "dispatcher": {k: stats[k] for k in ("requests", "rejected", "timed_out", "inflight_requests")},
        "store": cost,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "restart.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
