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
import logging
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
from infscaled.runner.genload import GenSummary
from infscaled.runner.summary import Summary

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
async def embedded_cluster(devices: str, log_level: int = logging.WARNING, ccfg: ControllerConfig | None = None,
                           port_range: tuple[int, int] | None = None) -> AsyncIterator[tuple[str, str]]:
    """A controller and one local agent (id "local", `devices`, edge ports from `port_range`, else
    the agent's default) in this process; yields (url, token).
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
            ports = {"port_range": port_range} if port_range else {}
            acfg = AgentConfig(controller=url, token=token, agent_id="local", devices=devices,
                               worker_log_level=log_level, state_dir=ccfg.state_dir, allow_python_sources=True,
                               **ports)
            agent = tg.create_task(agent_run(acfg, stop_agent, handle_signals=False), name="agent")
            try:
                yield url, token
            finally:
                stop_agent.set()
                await agent
                controller.cancel()


async def up(job_path: Path, cfg: JobConfig, *, progress: bool, verify: bool,
             log_level: int = logging.WARNING, tui: bool = False,
             port_range: tuple[int, int] | None = None) -> UpResult | None:
    """Run the job on an embedded cluster; with `tui`, under the TUI until the user quits it
    (None when they quit before the workload finished)."""
    devices = f"cpu:{cfg.pipeline.replica_total}"
    async with embedded_cluster(devices, log_level, port_range=port_range) as (url, token), \
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
    """Submit the job, wait for it to run, send its workload (what a request is and how it is
    checked is the job kind's `Traffic`), summarise, verify; the job is stopped whatever happens."""
    from infscaled.runner.traffic import traffic_for

    await _wait_for(lambda: _has_agent(client), "the local agent to register", 30)
    submitted = time.monotonic()
    job = await client.submit(job_path)
    job_id = str(job["id"])
    try:
        await _wait_for(lambda: _is_running(client, job_id), f"job {job_id} to run", READY_TIMEOUT_S)
        traffic = traffic_for(client, token, job_id, cfg)
        work = await traffic.items()
        bar = _Progress(job_id, len(work)) if progress else None

        async def one(i: int, item: Any) -> Any:
            outcome = await traffic.one(i, item)
            if bar is not None:
                bar.advance()
            return outcome

        start = time.monotonic()
        async with traffic.session():
            with bar or contextlib.nullcontext():
                if cfg.workload.rate > 0:
                    outcomes = await _open_loop(one, work, cfg.workload.rate)
                else:
                    outcomes = await _closed_loop(one, work, traffic.concurrency())
        wall_s = time.monotonic() - start
        job_state = await client.job(job_id)
        summary = traffic.summarize(outcomes, wall_s, job_state.get("reason") if job_state["state"] == "failed"
                                    else None)
        if verify:
            await traffic.verify(summary)
        return UpResult(summary, job_id, traffic.first_result_at - submitted)
    finally:
        with contextlib.suppress(InfscaledError):
            await client.stop(job_id)
            await _wait_for(lambda: _is_gone(client, job_id), f"job {job_id} to stop", 60)


async def _closed_loop(one, stream, concurrency: int) -> list[Any]:  # type: ignore[no-untyped-def]
    sem = asyncio.Semaphore(concurrency)

    async def gated(i, x):  # type: ignore[no-untyped-def]
        async with sem:
            return await one(i, x)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(gated(i, x)) for i, x in enumerate(stream)]
    return [t.result() for t in tasks]


async def _open_loop(one, stream, rate: float) -> list[Any]:  # type: ignore[no-untyped-def]
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
           log_level: int, tui: bool = False, port_range: tuple[int, int] | None = None) -> UpResult | None:
    path = Path(job) if job else DEFAULT_JOB
    cfg = load_job(path)
    if requests is not None or rate is not None:
        wl = cfg.workload
        cfg = replace(cfg, workload=replace(wl, requests=requests if requests is not None else wl.requests,
                                            rate=rate if rate is not None else wl.rate))
    return asyncio.run(up(path, cfg, progress=progress, verify=verify, log_level=log_level, tui=tui,
                          port_range=port_range))
