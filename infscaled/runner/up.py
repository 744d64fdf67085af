"""`infscaled up [JOB.toml]`: a controller and a local agent in one process, the job submitted
through the REST API, its workload driven through the inference API, a summary, then an
ordered stop of everything (job, agent, controller). With --tui the TUI watches the embedded
controller from this same event loop, and quitting it starts that ordered stop.

This process also builds the model's skeleton (torch) to generate the workload's inputs and,
with --verify, the monolithic reference: it is the client here, not the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from infscaled.client import Client, Timeouts
from infscaled.config import JobConfig, load_job
from infscaled.controller.config import ControllerConfig
from infscaled.errors import InfscaledError
from infscaled.runner.genload import GenSummary, SeqOutcome
from infscaled.runner.summary import Summary, summarize
from infscaled.runner.workload import Outcome, RunResult

log = logging.getLogger(__name__)

DEFAULT_JOB = Path(__file__).resolve().parents[2] / "configs" / "jobs" / "quickstart.toml"
READY_TIMEOUT_S = 300.0
POLL_S = 0.1  # status polling period while waiting for the job to run or stop


@dataclass
class UpResult:
    summary: Summary | GenSummary
    job_id: str
    submit_to_first_result_s: float


async def _wait_for(check: Callable[[], object], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise InfscaledError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(POLL_S)


@contextlib.asynccontextmanager
async def embedded_cluster(devices: str, log_level: int = logging.WARNING,
                           ccfg: ControllerConfig | None = None) -> AsyncIterator[tuple[str, str]]:
    """A controller and one local agent (id "local", `devices`) in this process; yields (url, token).
    Without `ccfg`: on 127.0.0.1, a free port and a token of their own (`serve` passes its own
    config). On exit the agent stops first (its workers with it), then the controller: the
    reverse of start-up."""
    from infscaled.agent.config import AgentConfig
    from infscaled.agent.run import run as agent_run
    from infscaled.controller.auth import controller_token
    from infscaled.controller.run import run as controller_run

    with tempfile.TemporaryDirectory(prefix="infscaled-up-") as state_dir:
        if ccfg is None:  # this run's own token: nothing else may talk to these daemons
            # One user's own files on one host: any model directory, python: sources allowed.
            ccfg = ControllerConfig(host="127.0.0.1", port=0, token=secrets.token_urlsafe(32), state_dir=state_dir,
                                    model_roots=None)
        token = controller_token(ccfg)
        started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        stop_agent = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            controller = tg.create_task(controller_run(ccfg, on_ready=lambda c: started.set_result(c.url)),
                                        name="controller")
            url = await asyncio.wait_for(started, timeout=30)
            # The agent's credential lives beside the controller's store: `serve` keeps both in its
            # state directory, so a restarted serve's agent presents what its controller remembers
            # (in a temporary directory it was lost, and the restart was refused: "id 'local' is taken").
            acfg = AgentConfig(controller=url, token=token, agent_id="local", devices=devices,
                               worker_log_level=log_level, state_dir=ccfg.state_dir, allow_python_sources=True)
            agent = tg.create_task(agent_run(acfg, stop_agent, handle_signals=False), name="agent")
            try:
                yield url, token
            finally:
                stop_agent.set()
                await agent
                controller.cancel()


async def up(job_path: Path, cfg: JobConfig, *, progress: bool, verify: bool,
             log_level: int = logging.WARNING, tui: bool = False) -> UpResult | None:
    """Run the job on an embedded cluster; with `tui`, under the TUI until the user quits it
    (None when they quit before the workload finished)."""
    async with embedded_cluster(f"cpu:{cfg.pipeline.replica_total}", log_level) as (url, token), \
            Client(url, token, Timeouts(infer_s=cfg.workload.request_timeout_s)) as client:
        if tui:
            return await _drive_under_tui(client, token, job_path, cfg, verify=verify)
        return await _drive(client, token, job_path, cfg, progress=progress, verify=verify)
    raise AssertionError("unreachable")  # pragma: no cover


async def _drive_under_tui(client: Client, token: str, job_path: Path, cfg: JobConfig, *,
                           verify: bool) -> UpResult | None:
    """The workload runs as a task beside the TUI, on this event loop. Quitting the TUI cancels
    what is left of the workload; `_drive`'s cleanup then stops the job, and only then does
    `up` stop the agent and the controller."""
    from multiprocessing import resource_tracker

    from infscaled.tui.app import TuiApp

    # While Textual runs, sys.stderr is its capture object, whose fileno() is -1; multiprocessing
    # passes sys.stderr's fd to the resource tracker it starts with the first spawned process,
    # so the agent's first worker would fail to spawn ("bad value(s) in fds_to_keep"). Started
    # now, the tracker is reused by every later spawn.
    resource_tracker.ensure_running()
    drive = asyncio.create_task(_drive(client, token, job_path, cfg, progress=False, verify=verify), name="workload")
    try:
        await TuiApp(client.url, token).run_async()
    finally:
        drive.cancel()  # a no-op once the workload is done
        await asyncio.wait([drive])
    return None if drive.cancelled() else drive.result()  # a failed job raises its error here


async def _drive(client: Client, token: str, job_path: Path, cfg: JobConfig, *, progress: bool,
                 verify: bool) -> UpResult:
    import torch

    from infscaled.models.sources import resolve
    from infscaled.models.stage import skeleton
    from infscaled.protocol import tensors
    from infscaled.runner.run import verify_results
    from infscaled.runner.workload import requests_for
    from infscaled.worker.service import tensor_from_body, tensor_to_body

    await _wait_for(lambda: _has_agent(client), "the local agent to register", 30)
    submitted = time.monotonic()
    job = await client.submit(job_path)
    job_id = str(job["id"])
    try:
        await _wait_for(lambda: _is_running(client, job_id), f"job {job_id} to run", READY_TIMEOUT_S)
        if cfg.generation is not None:
            return await _drive_generation(client, token, job_id, cfg, submitted, verify=verify)
        wl = cfg.workload

        def build_workload() -> tuple[Any, Any, list[torch.Tensor]]:
            resolved = resolve(cfg.model.source)
            spec = skeleton(resolved).family.input_spec()
            return resolved, spec, list(requests_for(wl, spec, wl.requests))

        # Model building and input generation are torch work: off the event loop, which also
        # runs the controller, the agent and (with --tui) the TUI.
        resolved, spec, stream = await asyncio.to_thread(build_workload)
        first_result = [math.inf]
        concurrency = wl.concurrency or cfg.pipeline.micro_batch_size * cfg.pipeline.max_inflight
        bar = _Progress(job_id, len(stream)) if progress else None

        async def one(i: int, x: torch.Tensor) -> Outcome:
            outcome = Outcome(i, x)
            began = time.monotonic()
            try:
                body = await client.infer_bytes(job_id, tensor_to_body(x))
                outcome.result = tensor_from_body(*tensors.decode(body))
                first_result[0] = min(first_result[0], time.monotonic())
            except InfscaledError as exc:
                outcome.error = str(exc)
            outcome.latency_s = time.monotonic() - began
            if bar is not None:
                bar.advance()
            return outcome

        run = RunResult()
        start = time.monotonic()
        with bar or contextlib.nullcontext():
            if wl.rate > 0:
                run.outcomes = await _open_loop(one, stream, wl.rate)
            else:
                run.outcomes = await _closed_loop(one, stream, concurrency)
        run.wall_s = time.monotonic() - start
        job_state = await client.job(job_id)
        summary = summarize(cfg.name, run, [], job_state.get("reason") if job_state["state"] == "failed" else None)
        if verify:
            summary.verify = await asyncio.to_thread(verify_results, resolved, spec, cfg.model.dtype, cfg.model.seed,
                                                     run.completed)
        return UpResult(summary, job_id, first_result[0] - submitted)
    finally:
        with contextlib.suppress(InfscaledError):
            await client.stop(job_id)
            await _wait_for(lambda: _is_gone(client, job_id), f"job {job_id} to stop", 60)


async def _drive_generation(client: Client, token: str, job_id: str, cfg: JobConfig, submitted: float, *,
                            verify: bool) -> UpResult:
    """A generation job's workload through the controller's OpenAI-compatible API, streamed: the
    response headers come with the first token (time to first token), `[DONE]` after the last;
    the usage chunk gives the token count. Prompts go as token ids, greedy, fixed lengths."""
    import aiohttp

    from infscaled.runner.genload import check_lengths, default_concurrency, gen_requests

    assert cfg.generation is not None
    wl = cfg.workload
    vocab, positions = await asyncio.to_thread(_token_limits, cfg.model.source)
    check_lengths(cfg, positions)
    work = list(gen_requests(cfg, vocab, wl.requests))
    first_result = [math.inf]
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=wl.request_timeout_s)

    async def one(i: int, item: tuple[list[int], int]) -> SeqOutcome:
        prompt, new = item
        o = SeqOutcome(i, prompt, new, submitted=time.monotonic())
        body = {"model": job_id, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        try:
            async with session.post(f"{client.url}/v1/completions", json=body, headers=headers,
                                    timeout=timeout) as resp:
                o.first_at = time.monotonic()
                first_result[0] = min(first_result[0], o.first_at)
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

    concurrency = default_concurrency(cfg)
    start = time.monotonic()
    async with aiohttp.ClientSession() as session:
        if wl.rate > 0:
            outcomes = await _open_loop(one, work, wl.rate)
        else:
            outcomes = await _closed_loop(one, work, concurrency)
    wall = time.monotonic() - start
    job_state = await client.job(job_id)
    summary = GenSummary(cfg.name, outcomes, wall, [],  # type: ignore[arg-type] # the loops return what `one` does
                         job_state.get("reason") if job_state["state"] == "failed" else None)
    if verify:
        expected = await asyncio.to_thread(_greedy_texts, cfg, [(o.prompt, o.max_new) for o in summary.completed])
        summary.verified = len(expected)
        summary.mismatched = sum(o.text != e for o, e in zip(summary.completed, expected, strict=True))
    return UpResult(summary, job_id, first_result[0] - submitted)


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


async def _closed_loop(one, stream, concurrency: int) -> list[Outcome]:  # type: ignore[no-untyped-def]
    sem = asyncio.Semaphore(concurrency)

    async def gated(i, x):  # type: ignore[no-untyped-def]
        async with sem:
            return await one(i, x)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(gated(i, x)) for i, x in enumerate(stream)]
    return [t.result() for t in tasks]


async def _open_loop(one, stream, rate: float) -> list[Outcome]:  # type: ignore[no-untyped-def]
    import random

    arrivals = random.Random(len(stream))
    async with asyncio.TaskGroup() as tg:
        tasks = []
        for i, x in enumerate(stream):
            tasks.append(tg.create_task(one(i, x)))
            await asyncio.sleep(arrivals.expovariate(rate))  # Poisson pacing
    return [t.result() for t in tasks]


async def _has_agent(client: Client) -> bool:
    return any(a.get("state") == "connected" for a in await client.agents())


async def _is_running(client: Client, job_id: str) -> bool:
    job = await client.job(job_id)
    if job["state"] in ("failed", "stopped"):
        raise InfscaledError(f"job {job_id} {job['state']}: {job.get('reason')}")
    return bool(job["state"] == "running")


async def _is_gone(client: Client, job_id: str) -> bool:
    return (await client.job(job_id))["state"] in ("stopped", "failed")


class _Progress:
    def __init__(self, label: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), transient=True)
        self._task = self._progress.add_task(label, total=total)

    def __enter__(self) -> _Progress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def advance(self) -> None:
        self._progress.advance(self._task)


def run_up(job: str | None, *, requests: int | None, rate: float | None, verify: bool, progress: bool,
           log_level: int, tui: bool = False) -> UpResult | None:
    path = Path(job) if job else DEFAULT_JOB
    cfg = load_job(path)
    if requests is not None or rate is not None:
        wl = cfg.workload
        cfg = replace(cfg, workload=replace(wl, requests=requests if requests is not None else wl.requests,
                                            rate=rate if rate is not None else wl.rate))
    return asyncio.run(up(path, cfg, progress=progress, verify=verify, log_level=log_level, tui=tui))
