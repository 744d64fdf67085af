"""`infscaled serve JOB.toml`: a controller and a local agent in one process, the job submitted and
kept running until Ctrl-C, for any client to use (the `openai` client, curl, lm-eval, guidellm).

Unlike `up`, nothing drives a workload and nothing is temporary: the controller listens on the
usual port (8470) with the host's usual token (the state directory's token file, where
`infscaled token` and every local CLI command find it), and the job stays up. What a client
needs (the URL, the model name, how to read the token) is printed once the job runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infscaled.client import Client
from infscaled.config import JobConfig
from infscaled.config.state import STATE_DIR_ENV
from infscaled.controller.auth import token_path
from infscaled.controller.config import TOKEN_ENV, ControllerConfig
from infscaled.errors import InfscaledError
from infscaled.runner.up import READY_TIMEOUT_S, _has_agent, _is_gone, _is_running, _wait_for, embedded_cluster

log = logging.getLogger(__name__)

AGENT_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Served:
    """What `serve` tells the user once the job runs."""

    url: str
    job_id: str
    model: str
    generation: bool
    token_hint: str

    def lines(self) -> list[str]:
        out = [f"serving job {self.job_id} at {self.url} (Ctrl-C stops it)"]
        if self.generation:
            out += [f"  model:    {self.model}   (OpenAI API: {self.url}/v1, e.g. POST /v1/chat/completions)"]
        else:
            out += [f"  infer:    POST {self.url}/v1/jobs/{self.job_id}/infer"]
        out += [f"  token:    {self.token_hint}",
                f"  metrics:  {self.url}/metrics   health: {self.url}/health"]
        return out


def default_devices(cfg: JobConfig) -> str:
    """The local agent's devices: the host's GPUs if it has any, else as many CPU slots as the
    job has stage replicas (at least one per core; CPU slots time-share the cores)."""
    from infscaled.agent.devices import discover

    found = discover("auto")
    if any(d.kind == "cuda" for d in found):
        return "auto"
    return f"cpu:{max(len(found), cfg.pipeline.replica_total)}"


def token_hint(ccfg: ControllerConfig) -> str:
    """How a client reads the token this controller accepts (never the token itself)."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return f"${TOKEN_ENV} (as set for this process)"
    if ccfg.token:
        return "the controller config's token"
    return (f"export {TOKEN_ENV}=$(infscaled token)   (the file {token_path(ccfg.state_dir)}; "
            f"${STATE_DIR_ENV} moves it)")


async def serve(job_path: Path, cfg: JobConfig, ccfg: ControllerConfig, devices: str, *,
                log_level: int = logging.WARNING, on_ready: Callable[[Served], None] = lambda s: None,
                port_range: tuple[int, int] | None = None) -> None:
    """Run the job on an embedded cluster until cancelled (Ctrl-C), then stop the job, the agent
    and the controller in that order. `on_ready` gets what to tell the user once the job runs;
    `port_range` is the local agent's for edges (None: the agent's default)."""
    async with embedded_cluster(devices, log_level, ccfg, port_range) as (url, token), Client(url, token) as client:
        await _wait_for(lambda: _has_agent(client), "the local agent to register", AGENT_TIMEOUT_S)
        job = await client.submit(job_path)
        job_id = str(job["id"])
        try:
            await _wait_for(lambda: _is_running(client, job_id), f"job {job_id} to run", READY_TIMEOUT_S)
            on_ready(Served(url, job_id, cfg.name, cfg.generation is not None, token_hint(ccfg)))
            while True:  # until Ctrl-C; a job that fails meanwhile ends `serve` with its reason
                await asyncio.sleep(1.0)
                state = await client.job(job_id)
                if state["state"] in ("failed", "stopped"):
                    raise InfscaledError(f"job {job_id} {state['state']}: {state.get('reason')}")
        finally:
            with contextlib.suppress(InfscaledError):
                await client.stop(job_id)
                await _wait_for(lambda: _is_gone(client, job_id), f"job {job_id} to stop", STOP_TIMEOUT_S)
