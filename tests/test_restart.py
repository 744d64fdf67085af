"""A controller that survives its own restart, with real processes: a controller and an agent as
subprocesses, the quickstart job under load through the controller's proxy, `kill -9` of the
controller, a new controller on the same state directory (controller/store.py)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from cluster import INFSCALED, TOKEN, Cluster, alive, local_cluster

from infscaled.protocol.messages import Device, ErrorMsg, Register, decode, encode

QUICKSTART = (Path(__file__).parents[1] / "configs" / "jobs" / "quickstart.toml").read_text()
SMALL = """
name = "small"
[model]
source = "builtin:gpt2-tiny"
[pipeline]
stages = 1
"""
ORPHAN_GRACE_S = 10.0


class Load(threading.Thread):
    """Closed-loop inference requests through the controller until stopped; counts outcomes."""

    def __init__(self, url: str, job_id: str) -> None:
        super().__init__(daemon=True)
        self.url, self.job_id = url, job_id
        self.ok = 0
        self.refused = 0  # the controller was down: the request never reached a dispatcher
        self.broken = 0  # the connection broke mid-request (the controller was killed)
        self.bad: list[tuple[int, str]] = []  # an HTTP error answer: must not happen
        self.halt = threading.Event()

    def run(self) -> None:
        body = json.dumps({"inputs": [[1, 2, 3, 4, 5, 6]]}).encode()
        while not self.halt.is_set():
            req = urllib.request.Request(f"{self.url}/v1/jobs/{self.job_id}/infer", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {TOKEN}",
                                                  "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    resp.read()
                    self.ok += 1
            except urllib.error.HTTPError as exc:
                self.bad.append((exc.code, exc.read().decode(errors="replace")[:200]))
            except ConnectionRefusedError:
                self.refused += 1
                time.sleep(0.02)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                if isinstance(getattr(exc, "reason", None), ConnectionRefusedError):
                    self.refused += 1
                    time.sleep(0.02)
                else:
                    self.broken += 1


def first_answer_after(c: Cluster, job_id: str, started: float, timeout: float = 60) -> float:
    """Seconds from `started` until the controller proxies a 200 answer for `job_id`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if c.call("POST", f"/v1/jobs/{job_id}/infer", {"inputs": [[7, 8, 9]]}, timeout=5)[0] == 200:
                return time.monotonic() - started
        except OSError:
            time.sleep(0.01)
    raise AssertionError(f"no proxied answer within {timeout:g} s of the restart")


async def register_as(url: str, agent_id: str) -> str:
    """Register over the agents' websocket (with the token, without a credential): the answer's text."""
    register = Register(agent_id, "impostor", "127.0.0.1", [Device("cpu:0", "cpu")], 1, 1 << 30, [29000, 29010])
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{url}/v1/agents/ws", headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        await ws.send_str(encode(register))
        answer = decode((await ws.receive(timeout=30)).data)
        assert isinstance(answer, ErrorMsg), answer
        assert (await ws.receive(timeout=30)).type == aiohttp.WSMsgType.CLOSE
        return answer.message


def pids(detail: dict[str, Any]) -> dict[str, int]:
    return {n["node"]: n["pid"] for n in detail["nodes"]}


def test_kill_9_controller_under_load_restart_adopts_the_job_and_refuses_an_impostor(tmp_path: Path) -> None:
    with local_cluster(tmp_path / "state", {"a1": "cpu:4"}, "--orphan-grace", str(ORPHAN_GRACE_S)) as c:
        before = c.run_job(QUICKSTART)
        job_id, workers = before["id"], pids(before)
        assert len(workers) == 4 and all(alive(p) for p in workers.values())
        listed = c.call("GET", "/v1/jobs")[1]

        load = Load(c.url, job_id)
        load.start()
        c.wait_for("answers under load", lambda: load.ok >= 20, 60)
        c.kill_controller()  # SIGKILL: no shutdown, nothing flushed on purpose
        restarted = time.monotonic()
        c.procs["controller"] = subprocess.Popen([*INFSCALED, "--role", "controller", "--port", str(c.port)],
                                                 env=c.env)
        took = first_answer_after(c, job_id, restarted)
        assert took < 30, f"first proxied answer {took:.2f} s after the restart"

        c.wait_for("a1 back", lambda: c.agent_states() == {"a1": "connected"}, 60)
        after = c.wait_for("the job adopted", lambda: (d := c.job(job_id))["state"] == "running" and d, 30)
        assert pids(after) == workers, "the same processes serve the job"
        assert all(alive(p) for p in workers.values())
        assert c.call("GET", "/v1/jobs")[1] == listed

        ok_before = load.ok
        c.wait_for("answers after the restart", lambda: load.ok >= ok_before + 20, 60)
        load.halt.set()
        load.join(60)
        assert not load.bad, load.bad[:3]
        # Nothing was lost at the dispatcher: every request it accepted was answered (also those
        # whose client connection died with the controller), none refused or timed out.
        stats = c.wait_for("final dispatcher stats", lambda: (
            (m := c.call("GET", f"/v1/jobs/{job_id}/metrics")[1]["dispatcher"]) is not None
            and m["inflight_requests"] == 0 and m["requests"] >= load.ok and m), 30)
        assert stats["rejected"] == 0 and stats["timed_out"] == 0, stats
        assert stats["requests"] <= load.ok + load.broken + 2, (stats, load.ok, load.broken)

        # An impostor with the same id but without a1's credential is refused; a1 keeps its job.
        refusal = asyncio.run(register_as(c.url, "a1"))
        assert "agent id 'a1' is taken" in refusal, refusal
        assert c.agent_states() == {"a1": "connected"}
        assert (d := c.job(job_id))["state"] == "running" and pids(d) == workers

        # A new job deploys next to the adopted one: no device or port taken twice.
        small = c.run_job(SMALL)
        taken = {(n["agent"], n["device"]) for n in after["nodes"] if n["device"]}
        assert not taken & {(n["agent"], n["device"]) for n in small["nodes"] if n["device"]}
        ports = {e["port"] for e in after["edges"]} | {after["dispatcher"]["port"]}
        assert not ports & ({e["port"] for e in small["edges"]} | {small["dispatcher"]["port"]})
        status, out = c.call("POST", f"/v1/jobs/{small['id']}/infer", {"inputs": [[1, 2]]})
        assert status == 200, out

        # The controller gone for good: after orphan_grace_s the agent stops every job's processes.
        everything = set(workers.values()) | set(pids(small).values())
        c.kill_controller()
        gone_by = time.monotonic() + ORPHAN_GRACE_S + 60
        while any(alive(p) for p in everything) and time.monotonic() < gone_by:
            time.sleep(0.5)
        assert not [p for p in everything if alive(p)], "the agent stopped its orphaned jobs"
        assert c.procs["a1"].poll() is None, "the agent itself keeps running (waiting for a controller)"
        assert os.path.exists(tmp_path / "state" / "controller.db")
