"""Chaos through the daemons: random stage workers AND the dispatcher killed under Poisson load.

The forward half of issue 12's 60 s chaos run, as a user deploys it: a controller and two agents
(`cpu:3` and `cpu:3`) as subprocesses on 127.0.0.1, a 3-stage job (builtin gpt2-tiny, replicas
[2, 2, 1], recovery on) submitted through the API, Poisson arrivals through the controller's
proxy (`POST /v1/jobs/ID/infer`, aiohttp, one task per request, each with its own deadline).
Every `--kill-every` seconds one live process of the job is picked at random (the dispatcher
service with probability `--dispatcher-share`, else a stage worker) and gets SIGKILL (or, for a
`--stop-share` of stage workers, SIGSTOP: a hang). At the end: requests sent, answered 200,
failed (any other status, or a broken connection), lost (no answer by the deadline); every 200
checked against the monolith. Per fault: the job's states until `running` again, when the
replacement (or restarted dispatcher) was ready, and the first 200 after it. The dispatcher's
replayed / duplicate counters come from the job's metrics.

    python -m benchmarks.chaos_daemon [--duration 60] [--kill-every 5] [--rate 30] [--out out/chaos_daemon.json]

The kinds of fault are drawn from `--seed`; the figures go to BENCHMARKS.md (section 21). The
daemons' own logs go to the `--out` path with a `.log` suffix (for reading, not for the repository).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import torch

from benchmarks.restart_bench import TOKEN, Api, free_port
from infscaled.models import inputs
from infscaled.models.sources import resolve
from infscaled.models.stage import Monolith
from infscaled.runner.summary import percentile

CLI = [sys.executable, "-m", "infscaled.cli"]
SOURCE = "builtin:gpt2-tiny"
JOB = f"""
name = "chaos"
[model]
source = "{SOURCE}"
[pipeline]
stages = 3
replicas = [2, 2, 1]
policy = "shortest_queue"
micro_batch_size = 4
max_inflight = 6
max_wait_ms = 2.0
[recovery]
heartbeat_timeout_s = 2.0
"""
VOCAB = 512  # gpt2-tiny's


class Timeline(threading.Thread):
    """Polls the job every 50 ms: (time, state, {node: (state, pid)})."""

    def __init__(self, api: Api, job_id: str) -> None:
        super().__init__(daemon=True)
        self.api, self.job_id = api, job_id
        self.samples: list[tuple[float, str, dict[str, tuple[str, int]]]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                _, d = self.api.call("GET", f"/v1/jobs/{self.job_id}", timeout=5)
                self.samples.append((time.monotonic(), d["state"],
                                     {n["node"]: (n["state"], n["pid"]) for n in d["nodes"]}))
            except (OSError, KeyError, TypeError):
                pass
            self.halt.wait(0.05)

    def latest(self) -> dict[str, tuple[str, int]]:
        return self.samples[-1][2] if self.samples else {}


async def poisson(url: str, job_id: str, rate: float, duration_s: float, seed: int, timeout_s: float,
                  results: list[dict[str, Any]]) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(url, headers=headers, connector=conn) as session:
        async def one(x: torch.Tensor) -> None:
            rec: dict[str, Any] = {"x": x, "sent": time.monotonic()}
            results.append(rec)
            try:
                async with session.post(f"/v1/jobs/{job_id}/infer", json={"inputs": x.tolist()},
                                        timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                    body = await resp.json(content_type=None)
                    rec["status"] = resp.status
                    rec["body"] = body
            except TimeoutError:
                rec["status"] = "lost"
            except aiohttp.ClientError as exc:
                rec["status"] = f"{type(exc).__name__}"
            rec["done"] = time.monotonic()

        tasks = []
        t0 = time.monotonic()
        nxt = t0
        while time.monotonic() - t0 < duration_s:
            nxt += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))
            x = torch.randint(0, VOCAB, (rng.choice((1, 2)), 16), generator=gen)
            tasks.append(asyncio.create_task(one(x)))
        await asyncio.gather(*tasks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--kill-every", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=30.0)
    ap.add_argument("--stop-share", type=float, default=0.2, help="share of stage-worker faults that are SIGSTOP")
    ap.add_argument("--dispatcher-share", type=float, default=0.25, help="share of faults that kill the dispatcher")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out/chaos_daemon.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = Api(url)
    load_before = os.getloadavg()
    faults: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="infscaled-chaos-") as state:
        env = {**os.environ, "INFSCALED_TOKEN": TOKEN, "INFSCALED_STATE_DIR": state, "HF_HUB_OFFLINE": "1"}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        logs = open(args.out.with_suffix(".log"), "wb")  # noqa: SIM115 - closed in finally
        procs = [subprocess.Popen([*CLI, "--role", "controller", "--port", str(port)], env=env, stderr=logs)]
        for i, name in enumerate(("a1", "a2")):
            procs.append(subprocess.Popen([*CLI, "--role", "agent", "--controller", url, "--id", name, "--devices",
                                           "cpu:3", "--port-range", f"{22000 + 100 * i}-{22099 + 100 * i}"],
                                          env=env, stderr=logs))
        timeline: Timeline | None = None
        try:
            api.until("two agents", lambda: len(api.call("GET", "/v1/agents")[1]) == 2, 120, 0.1)
            status, job = api.call("POST", "/v1/jobs", JOB.encode(), "application/toml", 300)
            assert status == 201, job
            job_id = job["id"]
            api.until("running", lambda: api.call("GET", f"/v1/jobs/{job_id}")[1]["state"] == "running", 300, 0.1)
            timeline = Timeline(api, job_id)
            timeline.start()
            load = threading.Thread(target=lambda: asyncio.run(poisson(
                url, job_id, args.rate, args.duration, args.seed, args.request_timeout, results)), daemon=True)
            t0 = time.monotonic()
            load.start()
            time.sleep(args.kill_every)
            while time.monotonic() - t0 < args.duration - 0.5:
                live = {n: pid for n, (st, pid) in timeline.latest().items() if st == "ready" and pid}
                workers = sorted(n for n in live if n != "dispatcher")
                victim = ("dispatcher" if "dispatcher" in live and rng.random() < args.dispatcher_share
                          else rng.choice(workers))
                sig = (signal.SIGSTOP if victim != "dispatcher" and rng.random() < args.stop_share
                       else signal.SIGKILL)
                os.kill(live[victim], sig)
                faults.append({"node": victim, "pid": live[victim], "signal": sig.name, "_at": time.monotonic(),
                               "at_s": time.monotonic() - t0})
                print(f"{time.monotonic() - t0:6.1f} s: {sig.name} {victim} (pid {live[victim]})", flush=True)
                time.sleep(args.kill_every)
            load.join()
            try:
                api.until("running after the last fault",
                          lambda: api.call("GET", f"/v1/jobs/{job_id}")[1]["state"] == "running", 180, 0.1)
            except RuntimeError:
                print(json.dumps(api.call("GET", f"/v1/jobs/{job_id}")[1], indent=1)[:6000], flush=True)
                raise
            time.sleep(0.5)
            timeline.halt.set()
            _, metrics = api.call("GET", f"/v1/jobs/{job_id}/metrics")
            _, detail = api.call("GET", f"/v1/jobs/{job_id}")
        finally:
            if timeline is not None:
                timeline.halt.set()
            for p in procs[::-1]:
                p.send_signal(signal.SIGTERM)
            for p in procs[::-1]:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
            logs.close()
    assert timeline is not None
    # Correctness: every 200 against the monolith, batched per input shape.
    mono = Monolith(resolve(SOURCE), "cpu", "float32", 0)
    spec = mono.family.input_spec()
    wrong = 0
    ok = [r for r in results if r.get("status") == 200]
    for rows in (1, 2):
        group = [r for r in ok if r["x"].shape[0] == rows]
        for at in range(0, len(group), 128):
            chunk = group[at:at + 128]
            expected = mono.forward(inputs.collate(spec, [torch.cat([r["x"] for r in chunk])], torch.float32))
            got = torch.cat([torch.tensor(r["body"]["output"]) for r in chunk])
            bad = (got - expected).abs().reshape(got.shape[0], -1).amax(dim=1) > 1e-4
            wrong += int(bad.reshape(len(chunk), rows).any(dim=1).sum())
    failed = [r for r in results if r.get("status") not in (200, "lost")]
    lost = [r for r in results if r.get("status") == "lost"]
    answers = sorted(r["done"] for r in ok)
    for f in faults:
        at = f.pop("_at")
        after = [t for t in answers if t > at]
        f["first_200_after_s"] = round(after[0] - at, 3) if after else None
        states, seen_lost, back = [], None, None
        for t, st, nodes in timeline.samples:
            if t < at:
                continue
            if not states or states[-1] != st:
                states.append(st)
            if seen_lost is None and nodes.get(f["node"], ("", 0)) != ("ready", f["pid"]):
                seen_lost = t - at  # its node left `ready` (or the dispatcher got a new pid)
            if seen_lost is not None and st == "running" and len(states) > 1:
                back = t - at
                break
        f.update(job_states=states, declared_s=None if seen_lost is None else round(seen_lost, 2),
                 running_again_s=None if back is None else round(back, 2))
    disp = (metrics or {}).get("dispatcher") or {}
    summary = {
        "duration_s": args.duration, "kill_every_s": args.kill_every, "rate": args.rate,
        "sent": len(results), "ok": len(ok), "failed": len(failed), "lost": len(lost), "wrong": wrong,
        "failures": sorted({str(r.get("status")) + " " + json.dumps(r.get("body"))[:160] for r in failed})[:5],
        "latency_p50_s": round(percentile([r["done"] - r["sent"] for r in ok], 50), 3),
        "latency_p99_s": round(percentile([r["done"] - r["sent"] for r in ok], 99), 3),
        "final_state": detail.get("state"), "epoch": detail.get("epoch"),
        "dispatcher_counters": {k: disp.get(k) for k in ("requests", "replayed", "duplicates", "timed_out")},
        "faults": faults, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
