"""Queue and prefill time histograms (vLLM's `request_queue_time_seconds`,
`request_prefill_time_seconds`) from a real generation pipeline, through the official `openai`
client: a KV budget that holds two sequences at a time makes the others wait for admission.
The dispatcher's handlers serve the series (GET /v1/metrics, what the controller scrapes); the
controller's relabelling (export.serving_text) publishes them under the job's name."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from cluster import loopback
from prometheus_client.parser import text_string_to_metric_families

from infscaled.config import parse_job
from infscaled.controller import export
from infscaled.controller.jobs import Job, JobState
from infscaled.generation.openai_api import METRICS_PATH
from infscaled.runner.launcher import LocalJob, prepare

MODEL = "queued"
REQUESTS = 4
NEW_TOKENS = 6


def _series(text: str, name: str) -> dict[str, Any]:
    """A histogram's count, sum and cumulative buckets (le -> value) from exposition text."""
    out: dict[str, Any] = {"buckets": {}}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for s in family.samples:
            if s.name.endswith("_count"):
                out["count"] = s.value
            elif s.name.endswith("_sum"):
                out["sum"] = s.value
            elif s.name.endswith("_bucket"):
                out["buckets"][float(s.labels["le"])] = s.value
    return out


async def _serve_and_ask(job: LocalJob, waiting_seen: list[int]) -> str:
    import openai
    from aiohttp import ClientSession, web

    from infscaled.dispatch.sequences import PipelineBackend
    from infscaled.generation.openai_api import make_handlers
    from infscaled.generation.tokenizer import load_tokenizer

    handlers = make_handlers(PipelineBackend(job.generator), load_tokenizer(job.plan.model_source), MODEL, 256, 512)
    app = web.Application()
    app.add_routes(handlers.routes())
    async with loopback(app) as url:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as api:
            async def one(i: int) -> int:
                done = await api.completions.create(model=MODEL, prompt=str(i), max_tokens=NEW_TOKENS,
                                                    temperature=0, extra_body={"ignore_eos": True})
                assert done.usage is not None
                return done.usage.completion_tokens

            asks = [asyncio.create_task(one(i)) for i in range(REQUESTS)]
            while not all(a.done() for a in asks):
                waiting_seen.append(job.generator.waiting())
                await asyncio.sleep(0.005)
            assert [a.result() for a in asks] == [NEW_TOKENS] * REQUESTS
        async with ClientSession() as http, http.get(url + METRICS_PATH) as resp:
            assert resp.status == 200
            return await resp.text()


def test_queue_and_prefill_time_split_the_time_to_first_token() -> None:
    # Each sequence reserves its prompt (a digit) + 6 positions, rounded up to a whole 16-token
    # page. A budget of 32 admits two at a time; the other two wait for a finished one's room.
    cfg = parse_job({"name": MODEL, "model": {"source": "builtin:llama-tiny"},
                     "pipeline": {"stages": 1},
                     "generation": {"kv_budget_tokens": 32, "max_batch_sequences": 2}})
    waiting_seen: list[int] = []
    with LocalJob(prepare(cfg)) as job:
        text = asyncio.run(_serve_and_ask(job, waiting_seen))
    assert max(waiting_seen) >= 2, "requests were expected to wait for KV room"
    ttft = _series(text, "infscaled:time_to_first_token_seconds")
    queue = _series(text, "infscaled:request_queue_time_seconds")
    prefill = _series(text, "infscaled:request_prefill_time_seconds")
    e2e = _series(text, "infscaled:e2e_request_latency_seconds")
    for h in (ttft, queue, prefill, e2e):
        assert h["count"] == REQUESTS, h
        values = [h["buckets"][le] for le in sorted(h["buckets"])]
        assert values == sorted(values) and values[-1] == h["count"], h  # cumulative, +Inf = count
    # Same clock readings per request: arrival -> admission -> first token.
    assert abs(queue["sum"] + prefill["sum"] - ttft["sum"]) < 1e-6, (queue, prefill, ttft)
    # Two of four waited for a whole earlier sequence: in the ideal schedule a third of all
    # end-to-end time is queueing; half of that is far from noise.
    assert queue["sum"] > e2e["sum"] / 6, (queue["sum"], e2e["sum"])
    assert prefill["sum"] > 0
    # The controller publishes them under the job's name, next to the other serving series.
    job_row = Job("queued-aaaaaa", cfg, (1, 1), ((0, 1),), time.time(), state=JobState.RUNNING)
    published = export.serving_text([job_row], {job_row.id: text})
    for name in ("infscaled:request_queue_time_seconds", "infscaled:request_prefill_time_seconds"):
        [family] = [f for f in text_string_to_metric_families(published) if f.name == name]
        assert {s.labels["model_name"] for s in family.samples} == {MODEL}
