"""Chaos for a generation job in daemon mode: random stage or dispatcher kills under Poisson load.

A controller and one agent (subprocesses, the `infscaled` CLI) run builtin llama-tiny as 2 stages x
2 replica chains (`--stages`) with `[recovery]` on (attempts raised so that a minute of kills does not spend
them). Requests arrive as a Poisson process through the controller's OpenAI routes: greedy
completions (`ignore_eos`) of a few fixed prompts and lengths, streaming or not. Every
`--kill-every` seconds a random ready stage replica, or (with `--dispatcher-share`) the dispatcher
service, gets SIGKILL (a stage replica, with `--stop-share`, SIGSTOP instead: a hang).

Every answer is classified (nothing is allowed to look like success unless it is one):
- `exact`: finished, text equal to HF generate on the monolithic model (a fault-free run's tokens);
- `wrong`: finished with other text (must be 0);
- `error_event`: a stream that ended with an error event (its dispatcher died under it);
- `error_status`: a non-200 answer (non-streaming, or refused before the stream started);
- `clean_truncated`: a stream that ended without `[DONE]` and without an error event (must be 0);
- `transport`: the client's own connection failed (must be 0).
Per fault: when it happened, how long until the job was `running` again, and until the next exact
answer. At the end, once idle: every stage's KV sequences (must be 0: no cache leaked).

    python -m benchmarks.gen_chaos_daemon [--duration 60] [--kill-every 5] [--rate 4] \
        [--dispatcher-share 0.3] [--out benchmarks/results/gen_chaos_daemon.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

TOKEN = "chaos-token"
JOB = """
name = "chaos-gen"
[model]
source = "builtin:llama-tiny"
[pipeline]
stages = {stages}
replicas = {replicas}
{graph}
[generation]
kv_budget_tokens = 2048
max_batch_sequences = 8
[recovery]
attempts = 100
"""
PROMPTS = ["Hello pipeline", "go", "0123456789", "The quick brown fox", "once upon a time", "abc abc abc"]
LENGTHS = (16, 32, 48)


def job_file(stages: int) -> str:
    """Two replica chains of `stages` stages (one stage: each chain is one process, whose decode
    runs a step ahead of its host)."""
    return JOB.format(stages=stages, replicas=[2] * stages, graph='graph = "parallel"' if stages > 1 else "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"gave up after {timeout_s:g} s waiting for {what}")


def agents(url: str) -> dict[str, str]:
    import urllib.request

    req = urllib.request.Request(f"{url}/v1/agents", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return {a["id"]: a["state"] for a in json.loads(resp.read())}


def expected_texts() -> dict[tuple[str, int], str]:
    """HF generate (greedy, float32) on the monolithic model for every prompt and length."""
    import torch

    from infscaled.generation.tokenizer import load_tokenizer
    from infscaled.models.sources import resolve
    from infscaled.models.stage import Monolith

    tok = load_tokenizer("builtin:llama-tiny")
    mono = Monolith(resolve("builtin:llama-tiny"), "cpu", "float32", 0)
    out: dict[tuple[str, int], str] = {}
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.inference_mode():
            gen = mono.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max(LENGTHS),
                                      do_sample=False, pad_token_id=0, eos_token_id=None)
        for n in LENGTHS:  # greedy: a shorter answer is a prefix of the longest one
            out[(prompt, n)] = tok.decode(gen[0, ids.shape[1]:ids.shape[1] + n].tolist())
    return out


async def one(http: aiohttp.ClientSession, url: str, prompt: str, n: int, stream: bool) -> dict[str, Any]:
    body = {"model": "chaos-gen", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    o: dict[str, Any] = {"prompt": prompt, "n": n, "stream": stream, "text": "", "kind": "", "error": ""}
    try:
        async with http.post(f"{url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=300)) as resp:
            if resp.status != 200:
                o["kind"], o["error"] = "error_status", f"{resp.status}: {(await resp.text())[:300]}"
                return o
            if not stream:
                o["text"], o["kind"] = (await resp.json())["choices"][0]["text"], "finished"
                return o
            done = False
            async for line in resp.content:
                text = line.decode().strip()
                if text == "data: [DONE]":
                    done = True
                elif text.startswith("data: "):
                    chunk = json.loads(text[6:])
                    if "error" in chunk:
                        o["kind"], o["error"] = "error_event", chunk["error"].get("message", "")
                    for choice in chunk.get("choices") or []:
                        o["text"] += choice.get("text") or ""
            o["kind"] = o["kind"] or ("finished" if done else "clean_truncated")
    except (aiohttp.ClientError, TimeoutError) as exc:
        o["kind"], o["error"] = "transport", f"{type(exc).__name__}: {exc}"
    return o


async def chaos(args: argparse.Namespace, url: str, expected: dict[tuple[str, int], str]) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    rng = random.Random(args.seed)
    async with aiohttp.ClientSession(headers=auth) as http:
        job = job_file(args.stages)
        async with http.post(f"{url}/v1/jobs", data=job, headers={"Content-Type": "application/toml"}) as r:
            job_id = (await r.json())["id"]

        async def job() -> dict[str, Any]:
            async with http.get(f"{url}/v1/jobs/{job_id}") as r:
                return dict(await r.json())

        while (await job())["state"] != "running":
            await asyncio.sleep(0.5)
        states: list[tuple[float, str]] = []
        outcomes: list[tuple[float, dict[str, Any]]] = []
        tasks: list[asyncio.Task[None]] = []
        t0 = time.monotonic()
        stop = asyncio.Event()

        async def watch_state() -> None:
            while not stop.is_set():
                state = (await job())["state"]
                if not states or states[-1][1] != state:
                    states.append((time.monotonic() - t0, state))
                await asyncio.sleep(0.1)

        async def send(prompt: str, n: int, stream: bool) -> None:
            o = await one(http, url, prompt, n, stream)
            if o["kind"] == "finished":
                o["kind"] = "exact" if o["text"] == expected[(prompt, n)] else "wrong"
            outcomes.append((time.monotonic() - t0, o))

        async def load() -> None:
            nxt = time.monotonic()
            while not stop.is_set():
                nxt += rng.expovariate(args.rate)
                await asyncio.sleep(max(0.0, nxt - time.monotonic()))
                tasks.append(asyncio.create_task(send(rng.choice(PROMPTS), rng.choice(LENGTHS),
                                                      rng.random() < args.stream_share)))

        watcher, loader = asyncio.create_task(watch_state()), asyncio.create_task(load())
        faults: list[dict[str, Any]] = []
        while time.monotonic() - t0 < args.duration:
            await asyncio.sleep(args.kill_every)
            nodes = [n for n in (await job())["nodes"] if n["state"] == "ready" and n.get("pid")]
            stages = [n for n in nodes if n["node"] != "dispatcher"]
            disp = [n for n in nodes if n["node"] == "dispatcher"]
            pool = disp if disp and (rng.random() < args.dispatcher_share or not stages) else stages
            if not pool:
                continue
            victim = rng.choice(pool)
            sig = (signal.SIGSTOP if victim["node"] != "dispatcher" and rng.random() < args.stop_share
                   else signal.SIGKILL)
            os.kill(victim["pid"], sig)
            faults.append({"node": victim["node"], "signal": sig.name, "at_s": round(time.monotonic() - t0, 2)})
        # Load goes on until the last fault is healed (or --heal-timeout passed), then stops.
        healed = time.monotonic() + args.heal_timeout
        await asyncio.sleep(1.0)
        while time.monotonic() < healed and (state := (await job())["state"]) != "running":
            await asyncio.sleep(0.5)
        if states[-1][1] != state:
            states.append((time.monotonic() - t0, state))
        stop.set()
        await loader
        await asyncio.gather(*tasks)
        await watcher
        kinds = [o["kind"] for _, o in outcomes]
        for f in faults:
            back = [t for t, s in states if t > f["at_s"] and s == "running"]
            f["running_again_after_s"] = round(back[0] - f["at_s"], 2) if back else None
            nxt = [t for t, o in outcomes if t > f["at_s"] and o["kind"] == "exact"]
            f["next_exact_answer_after_s"] = round(nxt[0] - f["at_s"], 2) if nxt else None
        leak: list[Any] = []
        for _ in range(60):  # idle now: every stage replica's caches must come back to zero
            async with http.get(f"{url}/v1/jobs/{job_id}/metrics") as r:
                leak = [(s["node"], s["kv_sequences"]) for s in (await r.json())["stages"]]
            # (a replacement started by the last fault is listed once it has sent its first stats)
            if len(leak) == 2 * args.stages and all(n == 0 for _, n in leak):
                break
            await asyncio.sleep(0.5)
        final = await job()
        async with http.get(f"{url}/v1/jobs/{job_id}/metrics") as r:
            dispatcher = (await r.json())["dispatcher"] or {}
    return {"stages": args.stages, "stop_share": args.stop_share, "duration_s": args.duration,
            "kill_every_s": args.kill_every, "rate": args.rate,
            "stream_share": args.stream_share, "sent": len(outcomes),
            "counts": {k: kinds.count(k) for k in ("exact", "wrong", "error_event", "error_status",
                                                   "clean_truncated", "transport")},
            "errors": sorted({o["error"][:200] for _, o in outcomes if o["error"]})[:8],
            "faults": faults, "states": states, "final_state": final["state"], "final_reason": final["reason"],
            "kv_sequences_when_idle": leak, "dispatcher_counters_now": {
                k: dispatcher.get(k) for k in ("replayed", "duplicates")}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--stages", type=int, default=2, help="stages per replica chain (2 chains)")
    ap.add_argument("--kill-every", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    ap.add_argument("--stream-share", type=float, default=0.75)
    ap.add_argument("--dispatcher-share", type=float, default=0.3, help="share of kills aimed at the dispatcher")
    ap.add_argument("--stop-share", type=float, default=0.0,
                    help="share of stage-replica faults that are SIGSTOP (a hang its heartbeat reveals), not SIGKILL")
    ap.add_argument("--heal-timeout", type=float, default=240.0, help="after the last fault: wait for `running`")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gen_chaos_daemon.json"))
    args = ap.parse_args()
    expected = expected_texts()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cli = [sys.executable, "-m", "infscaled.cli"]
    with tempfile.TemporaryDirectory() as state:
        env = {**os.environ, "INFSCALED_TOKEN": TOKEN, "INFSCALED_STATE_DIR": state, "HF_HUB_OFFLINE": "1"}
        first = 20000 + random.Random().randrange(0, 9000, 200)
        procs = [subprocess.Popen([*cli, "--role", "controller", "--port", str(port)], env=env)]
        try:
            wait_for("the controller", lambda: agents(url) is not None, 60)
            procs.append(subprocess.Popen([*cli, "--role", "agent", "--controller", url, "--id", "a1", "--devices",
                                           "cpu:8", "--port-range", f"{first}-{first + 199}"], env=env))
            wait_for("the agent", lambda: agents(url).get("a1") == "connected", 60)
            result = {"loadavg_before": os.getloadavg(), "chaos": asyncio.run(chaos(args, url, expected)),
                      "loadavg_after": os.getloadavg()}
        finally:
            for p in reversed(procs):
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
