"""What `infscaled up` sends through the controller's API: the one part of its driver that
differs between a forward job and a generation job.

The driver (`runner/up.py`) submits the job, waits for it to run, paces the work (closed or open
loop), counts progress, stops the job; a `Traffic` only turns one work item into one outcome
over HTTP, summarises the outcomes and checks them against the monolithic model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from infscaled.client import Client
from infscaled.config import JobConfig
from infscaled.errors import InfscaledError
from infscaled.runner.genload import GenSummary, SeqOutcome
from infscaled.runner.summary import Summary, summarize
from infscaled.runner.workload import Outcome, RunResult


class Traffic:
    """One job kind's requests through the API. `first_result_at` is when the first answer
    arrived (monotonic clock): the driver reports the time from submission to it."""

    def __init__(self, client: Client, job_id: str, cfg: JobConfig) -> None:
        self.client, self.job_id, self.cfg = client, job_id, cfg
        self.first_result_at = math.inf

    def answered(self) -> None:
        self.first_result_at = min(self.first_result_at, time.monotonic())

    async def items(self) -> list[Any]:
        """The work items, built off the event loop (which also runs the daemons)."""
        raise NotImplementedError

    def concurrency(self) -> int:
        """Closed loop: work items outstanding at once."""
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        """Held while the work runs (a connection pool, for instance)."""
        yield

    async def one(self, i: int, item: Any) -> Any:
        """Send one work item and return its outcome; a failure is recorded in it, never raised."""
        raise NotImplementedError

    def summarize(self, outcomes: list[Any], wall_s: float, failure: str | None) -> Summary | GenSummary:
        raise NotImplementedError

    async def verify(self, summary: Any) -> None:
        """Check the completed outcomes against the monolithic model; the counts go into `summary`."""
        raise NotImplementedError


class ForwardTraffic(Traffic):
    """Tensors to /v1/jobs/{id}/infer in the binary tensor format, one request per item."""

    async def items(self) -> list[Any]:
        def build() -> list[Any]:
            from infscaled.models.sources import resolve
            from infscaled.models.stage import skeleton
            from infscaled.runner.workload import requests_for

            self._resolved = resolve(self.cfg.model.source)
            self._spec = skeleton(self._resolved).family.input_spec()
            return list(requests_for(self.cfg.workload, self._spec, self.cfg.workload.requests))

        return await asyncio.to_thread(build)

    def concurrency(self) -> int:
        pipe = self.cfg.pipeline
        return self.cfg.workload.concurrency or pipe.micro_batch_size * pipe.max_inflight

    async def one(self, i: int, item: Any) -> Outcome:
        from infscaled.protocol import tensors
        from infscaled.worker.service import tensor_from_body, tensor_to_body

        outcome = Outcome(i, item)
        began = time.monotonic()
        try:
            body = await self.client.infer_bytes(self.job_id, tensor_to_body(item))
            outcome.result = tensor_from_body(*tensors.decode(body))
            self.answered()
        except InfscaledError as exc:
            outcome.error = str(exc)
        outcome.latency_s = time.monotonic() - began
        return outcome

    def summarize(self, outcomes: list[Any], wall_s: float, failure: str | None) -> Summary:
        self._run = RunResult(outcomes=outcomes, wall_s=wall_s)
        return summarize(self.cfg.name, self._run, [], failure)

    async def verify(self, summary: Any) -> None:
        from infscaled.runner.run import verify_results

        summary.verify = await asyncio.to_thread(verify_results, self._resolved, self._spec, self.cfg.model.dtype,
                                                 self.cfg.model.seed, self._run.completed)


class GenerationTraffic(Traffic):
    """Streamed completions through the controller's OpenAI-compatible API: the response headers
    come with the first token (time to first token), `[DONE]` after the last; the usage chunk
    gives the token count. Prompts go as token ids, greedy, fixed lengths."""

    def __init__(self, client: Client, job_id: str, cfg: JobConfig, token: str) -> None:
        super().__init__(client, job_id, cfg)
        self._headers = {"Authorization": f"Bearer {token}"}

    async def items(self) -> list[Any]:
        from infscaled.runner.genload import check_lengths, gen_requests

        vocab, positions = await asyncio.to_thread(_token_limits, self.cfg.model.source)
        check_lengths(self.cfg, positions)
        return list(gen_requests(self.cfg, vocab, self.cfg.workload.requests))

    def concurrency(self) -> int:
        from infscaled.runner.genload import default_concurrency

        return default_concurrency(self.cfg)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        import aiohttp

        async with aiohttp.ClientSession() as self._http:
            yield

    async def one(self, i: int, item: Any) -> SeqOutcome:
        import aiohttp

        prompt, new = item
        o = SeqOutcome(i, prompt, new, submitted=time.monotonic())
        body = {"model": self.job_id, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        try:
            async with self._http.post(f"{self.client.url}/v1/completions", json=body, headers=self._headers,
                                       timeout=aiohttp.ClientTimeout(total=self.cfg.workload.request_timeout_s)
                                       ) as resp:
                o.first_at = time.monotonic()
                self.answered()
                if resp.status != 200:
                    o.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                    return o
                async for line in resp.content:
                    text = line.decode().strip()
                    if not text.startswith("data: ") or text == "data: [DONE]":
                        continue
                    chunk = json.loads(text[6:])
                    if "error" in chunk:
                        o.error = chunk["error"].get("message", str(chunk["error"]))
                    for choice in chunk.get("choices") or []:
                        o.text += choice.get("text") or ""
                    if chunk.get("usage"):
                        o.count = int(chunk["usage"]["completion_tokens"])
                o.last_at = time.monotonic()
        except (aiohttp.ClientError, TimeoutError) as exc:
            o.error = f"{type(exc).__name__}: {exc}"
        return o

    def summarize(self, outcomes: list[Any], wall_s: float, failure: str | None) -> GenSummary:
        return GenSummary(self.cfg.name, outcomes, wall_s, [], failure)

    async def verify(self, summary: Any) -> None:
        expected = await asyncio.to_thread(_greedy_texts, self.cfg, [(o.prompt, o.max_new) for o in summary.completed])
        summary.verified = len(expected)
        summary.mismatched = sum(o.text != e for o, e in zip(summary.completed, expected, strict=True))


def _token_limits(source: str) -> tuple[int, int]:
    """(vocabulary size, context length) of a token model."""
    from infscaled.models.sources import resolve
    from infscaled.models.stage import skeleton

    spec = skeleton(resolve(source)).family.input_spec()
    return spec.vocab_size, spec.max_positions


def _greedy_texts(cfg: JobConfig, work: list[tuple[list[int], int]]) -> list[str]:
    """What Hugging Face `generate` makes of each prompt, as the API would answer it: text."""
    from infscaled.generation.tokenizer import load_tokenizer
    from infscaled.runner.genload import greedy_reference

    tokenizer = load_tokenizer(cfg.model.source)
    return [tokenizer.decode(tokens) for tokens in greedy_reference(cfg, work)]


def traffic_for(client: Client, token: str, job_id: str, cfg: JobConfig) -> Traffic:
    if cfg.generation is not None:
        return GenerationTraffic(client, job_id, cfg, token)
    return ForwardTraffic(client, job_id, cfg)
