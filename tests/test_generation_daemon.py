"""Generation end to end through the daemons: a controller and an agent as subprocesses, a
generation job of real worker processes, the official `openai` client pointed at the controller."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from cluster import TOKEN, Cluster, free_port_block, local_cluster

from infscaled.generation.tokenizer import load_tokenizer
from infscaled.models.sources import resolve
from infscaled.models.stage import Monolith

GEN_JOB = """
name = "chat"
[model]
source = "builtin:llama-tiny"
[pipeline]
stages = 2
[generation]
kv_budget_tokens = 160
max_batch_sequences = 4
"""

FORWARD_JOB = """
name = "fwd"
[model]
source = "builtin:gpt2-tiny"
[pipeline]
stages = 1
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    with local_cluster(tmp_path_factory.mktemp("state"), {"a1": "cpu:4"}) as c:
        detail = c.run_job(GEN_JOB)
        yield c, detail["id"]


def client(c: Cluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{c.url}/v1", api_key=TOKEN, max_retries=0, timeout=120)


def expected_text(prompt: str, new: int) -> tuple[str, int]:
    """What greedy decoding of the monolithic model produces (HF generate), as text."""
    tok = load_tokenizer("builtin:llama-tiny")
    mono = Monolith(resolve("builtin:llama-tiny"), "cpu", "float32", 0)
    ids = torch.tensor([tok.encode(prompt)])
    with torch.inference_mode():
        out = mono.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
    return tok.decode(out[0, ids.shape[1]:].tolist()), ids.shape[1]


def kv_in_use(c: Cluster, job_id: str) -> list[tuple[int, int]]:
    stages = c.call("GET", f"/v1/jobs/{job_id}/metrics")[1]["stages"]
    return [(s["kv_sequences"], s["kv_reserved_tokens"]) for s in stages]


def test_completions_and_chat_through_the_controller_equal_hf_generate(cluster: tuple[Cluster, str]) -> None:
    c, job_id = cluster
    text, prompt_tokens = expected_text("Hello pipeline", 12)

    async def scenario() -> None:
        async with client(c) as api:
            models = await api.models.list()
            assert [m.id for m in models.data] == [job_id]
            done = await api.completions.create(model="chat", prompt="Hello pipeline", max_tokens=12, temperature=0,
                                                extra_body={"ignore_eos": True})
            assert done.choices[0].text == text and done.choices[0].finish_reason == "length"
            assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (prompt_tokens, 12)
            stream = await api.completions.create(model=job_id, prompt="Hello pipeline", max_tokens=12, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
            assert "".join([ch.choices[0].text async for ch in stream if ch.choices]) == text
            chat = await api.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=5, temperature=0.7, seed=3, stream=True)
            pieces = [ch async for ch in chat]
            assert pieces[-1].choices[0].finish_reason in ("stop", "length")
            with pytest.raises(openai.NotFoundError, match="The model 'nope' does not exist"):
                await api.completions.create(model="nope", prompt="x", max_tokens=1)
            with pytest.raises(openai.BadRequestError, match="temperature"):
                await api.completions.create(model="chat", prompt="x", max_tokens=1, temperature=5)
            with pytest.raises(openai.BadRequestError, match="the model has 256"):
                await api.completions.create(model="chat", prompt="x" * 300, max_tokens=1)

    asyncio.run(scenario())
    # The dispatcher counts sequences (tokens as samples) with time to first token / per token.
    disp = c.wait_for("generation stats", lambda: (d := c.call("GET", f"/v1/jobs/{job_id}/metrics")[1]["dispatcher"])
                      and d["requests"] >= 3 and d["ttft_p50_s"] > 0 and d["tpot_p50_s"] > 0 and d, 15)
    assert disp["samples"] >= 24 and disp["inflight_requests"] == 0
    assert disp["rejected"] >= 0 and disp["ttft_p50_s"] <= disp["ttft_p99_s"]


def test_more_sequences_than_the_kv_budget_wait_and_all_finish(cluster: tuple[Cluster, str]) -> None:
    c, _ = cluster
    # 160 KV positions per stage; each request reserves 10 + 30: at most 4 at once, 10 are sent.
    text, _ = expected_text("0123456789", 30)

    async def scenario() -> list[str]:
        async with client(c) as api:
            answers = await asyncio.gather(*(api.completions.create(
                model="chat", prompt="0123456789", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
                for _ in range(10)))
            return [a.choices[0].text for a in answers]

    assert asyncio.run(scenario()) == [text] * 10


def test_client_disconnect_mid_stream_frees_the_caches(cluster: tuple[Cluster, str]) -> None:
    c, job_id = cluster

    async def scenario() -> None:
        async with client(c) as api:
            stream = await api.completions.create(model="chat", prompt="go", max_tokens=150, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
            got = 0
            async for _ in stream:
                got += 1
                if got == 3:
                    c.wait_for(f"the sequence's caches in use (now {kv_in_use(c, job_id)})",
                               lambda: kv_in_use(c, job_id) == [(1, 152)] * 2, 30)
                    break
            await stream.close()  # the client goes away mid-stream

    asyncio.run(scenario())
    c.wait_for("every stage to free the caches", lambda: kv_in_use(c, job_id) == [(0, 0)] * 2, 30)


def test_a_forward_job_is_not_a_model(cluster: tuple[Cluster, str], tmp_path: Path) -> None:
    c, _ = cluster
    status, err = c.call("POST", "/v1/completions", {"model": "nope-job", "prompt": "x"})
    assert status == 404 and err["error"]["code"] == "model_not_found"
    fwd = c.run_job(FORWARD_JOB)
    status, err = c.call("POST", "/v1/completions", {"model": "fwd", "prompt": "x"})
    assert status == 400
    assert err["error"]["message"] == (f"job {fwd['id']} serves forward passes (POST /v1/jobs/{fwd['id']}/infer), "
                                       "not text generation: its job file has no [generation] table")
    c.call("DELETE", f"/v1/jobs/{fwd['id']}")
    c.wait_for("stopped", lambda: c.job(fwd["id"])["state"] == "stopped", 60)



PHOENIX_JOB = """
name = "phoenix"
[model]
source = "builtin:llama-tiny"
[pipeline]
stages = 2
[generation]
[recovery]
heartbeat_timeout_s = 120.0  # stage 0.0 is stopped on purpose below: not declared dead meanwhile
"""


def stage_stats(c: Cluster, job_id: str) -> dict[str, dict[str, Any]]:
    return {s["node"]: s for s in c.call("GET", f"/v1/jobs/{job_id}/metrics")[1]["stages"]}


def test_a_dead_dispatcher_is_restarted_its_streams_end_with_an_error_and_the_job_serves_on(
        cluster: tuple[Cluster, str]) -> None:
    """kill -9 of a generation job's dispatcher mid-answer (controller/recovery.py): a stream under
    way ends with an error event saying the dispatcher died (the official client raises it; no
    [DONE]); a non-streaming request in flight is asked again of the restarted dispatcher and
    answered in full; the chain frees the dead dispatcher's sequences at once (no cache leak, no
    compute spent on them) and joins the new dispatcher, which serves new streams equal to HF
    generate; the job goes degraded -> recovering -> running (the events /v1/watch and the TUI
    show)."""
    import os
    import signal

    import aiohttp

    from infscaled.protocol import watch

    c, _ = cluster
    status, submitted = c.submit(PHOENIX_JOB)
    assert status == 201, submitted
    job_id = submitted["id"]
    short_text, _ = expected_text("Hello again", 16)  # while the job deploys
    job = c.wait_for("the job to run", lambda: (d := c.job(job_id))["state"] == "running" and d, 180)
    pids = {n["node"]: n["pid"] for n in job["nodes"]}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    long_ask = {"model": "phoenix", "prompt": "go", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    computed: list[int] = []  # stage 0.0's rows computed: when the dispatcher died, once it is back

    async def scenario() -> None:
        async with client(c) as api, aiohttp.ClientSession(headers=auth) as raw:
            stream, sse = await asyncio.gather(
                api.completions.create(model="phoenix", prompt="go", max_tokens=200, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True}),
                raw.post(f"{c.url}/v1/completions", json={**long_ask, "stream": True}))
            async with sse:
                # Both streams under way (the headers go out with a stream's first token) ...
                first, _ = await asyncio.gather(sse.content.readuntil(b"\n\n"), anext(aiter(stream)))
                os.kill(pids["1.0"], signal.SIGSTOP)  # ... then the loop stalls, so no answer can finish
                try:
                    plain = asyncio.create_task(raw.post(f"{c.url}/v1/completions", json={
                        "model": "phoenix", "prompt": "Hello again", "max_tokens": 16, "temperature": 0,
                        "ignore_eos": True}))
                    held = await asyncio.to_thread(c.wait_for, "stage 0.0 to hold three sequences", lambda: (
                        st := stage_stats(c, job_id).get("0.0", {})).get("kv_sequences") == 3 and st, 30)
                    computed.append(held["samples"])
                    await asyncio.to_thread(c.wait_for, "the dispatcher to hold them", lambda: (d := c.call(
                        "GET", f"/v1/jobs/{job_id}/metrics")[1]["dispatcher"]) and d["inflight_requests"] == 3, 20)
                    os.kill(pids["dispatcher"], signal.SIGKILL)  # ... before the dispatcher dies
                    rest = await sse.read()
                    with pytest.raises(openai.APIError, match="the job's dispatcher at .* died mid-answer .*; the "
                                                              "dispatcher is being restarted: send the request again; "
                                                              "the answer is incomplete"):
                        async for _ in stream:
                            pass
                finally:
                    os.kill(pids["1.0"], signal.SIGCONT)
            answer = await plain  # asked again of the new dispatcher: a whole answer
            status, body = answer.status, await answer.json()
            assert status == 200, body
            assert body["choices"][0]["text"] == short_text
            await asyncio.to_thread(c.wait_for, "running again", lambda: c.job(job_id)["state"] == "running", 60)
            # The dead dispatcher's three sequences were freed down the chain at once: no stage
            # holds a cache, and the chain spent nothing on their ~190 tokens each that nobody
            # would read (only the plain request's 16 again, and what was on its way).
            freed = await asyncio.to_thread(c.wait_for, f"every stage to free the caches ({kv_in_use(c, job_id)})",
                                            lambda: kv_in_use(c, job_id) == [(0, 0)] * 2 and stage_stats(c, job_id), 30)
            computed.append(freed["0.0"]["samples"])  # kv_in_use listed both stages
            again = await api.completions.create(model="phoenix", prompt="Hello again", max_tokens=16, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
            assert "".join([ch.choices[0].text async for ch in again if ch.choices]) == short_text
            async with raw.get(f"{c.url}/metrics") as metrics:
                text = await metrics.text()
            async with raw.ws_connect(f"{c.url}/v1/watch") as ws:  # the event history comes first
                states: list[str] = []
                async for frame in ws:
                    msg = watch.decode(frame.data)
                    if not isinstance(msg, watch.Event):
                        break
                    if msg.kind == "job_state" and msg.job == job_id:
                        states.append(msg.state)
        assert first.startswith(b"data: {")
        events = [e for e in (first + rest).decode().split("\n\n") if e]
        assert "data: [DONE]" not in events and all(e.startswith("data: ") for e in events)
        assert '"error"' in events[-1] and "died mid-answer" in events[-1]
        assert all('"error"' not in e for e in events[:-1])
        assert computed[1] - computed[0] < 100, computed
        assert states[-4:] == ["running", "degraded", "recovering", "running"], states
        assert f'infscaled_dispatcher_replayed_requests_total{{job="{job_id}",agent="a1"}} 0' in text

    try:
        asyncio.run(scenario())
        new = {n["node"]: n for n in c.job(job_id)["nodes"]}["dispatcher"]
        assert new["pid"] != pids["dispatcher"] and new["state"] == "ready"
    finally:
        c.call("DELETE", f"/v1/jobs/{job_id}")
    c.wait_for("the job to stop", lambda: c.job(job_id)["state"] in ("stopped", "failed"), 60)


def test_infscaled_up_drives_a_generation_job_through_the_api(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "up.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFSCALED_STATE_DIR": str(tmp_path / "state")}
    job = Path(__file__).resolve().parents[1] / "configs" / "jobs" / "llama-generate.toml"
    # Edge ports of its own (`infscaled serve` in test_serve may run beside it on the default range).
    first = free_port_block()
    proc = subprocess.run([sys.executable, "-m", "infscaled.cli", "up", str(job), "--requests", "6", "--verify",
                           "--json", str(out), "--port-range", f"{first}-{first + 40}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert (doc["completed"], doc["failed"], doc["verify"]) == (6, 0, {"checked": 6, "mismatched": 0})
    assert doc["tokens_per_s"] > 0 and doc["latency_ms"]["ttft_p50"] > 0 and doc["latency_ms"]["tpot_p50"] > 0
    assert "time per output token" in proc.stdout


def test_up_and_serve_refuse_a_bad_port_range_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    from infscaled.cli import main

    job = str(Path(__file__).resolve().parents[1] / "configs" / "jobs" / "llama-generate.toml")
    for command in (["up", job], ["serve", job]):
        for bad, want in (("29500-x", "expected FIRST-LAST"), ("30000-29000", "expected 1 <= FIRST <= LAST <= 65535")):
            assert main([*command, "--port-range", bad]) == 2
            err = capsys.readouterr().err
            assert f"--port-range {bad!r}: {want}" in err, err
