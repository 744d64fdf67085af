"""OpenAI-compatible routes on the controller: `model` names a running job, whose dispatcher
serves the same paths; bodies go through unchanged and answers stream back chunk by chunk.

Errors here are in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), which the
official clients show as they are. Nothing here decodes tokens: torch-free.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
from aiohttp import web

from infscaled.controller import proxy
from infscaled.controller.api import CONFIG, JOBS, REGISTRY
from infscaled.controller.api import _url_host as url_host
from infscaled.controller.jobs import Job, JobState
from infscaled.generation.errors import error_body

log = logging.getLogger(__name__)

# The dispatcher's answers are copied with these headers only (hop-by-hop ones stay behind).
_PASSED_HEADERS = ("Content-Type", "Cache-Control")


def add_routes(app: web.Application) -> None:
    app.add_routes([
        web.get("/v1/models", list_models),
        web.post("/v1/completions", forward_generation),
        web.post("/v1/chat/completions", forward_generation),
    ])


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param, code), status=status)


def _running(request: web.Request) -> list[Job]:
    return [j for j in request.app[JOBS].jobs.values() if j.state is JobState.RUNNING]


async def list_models(request: web.Request) -> web.Response:
    """Every running generation job, as OpenAI models: `id` is the job id; `name` (also accepted as `model`)."""
    data = [{"id": j.id, "object": "model", "created": int(j.created), "owned_by": "infscaled", "name": j.name,
             "root": j.cfg.model.source} for j in sorted(_running(request), key=lambda j: j.created)
            if j.cfg.generation is not None]
    return web.json_response({"object": "list", "data": data})


def resolve_model(request: web.Request, model: Any) -> Job | web.Response:
    """The job `model` names: a job id, or a job name (the newest running job of that name)."""
    jobs = request.app[JOBS].jobs
    if not isinstance(model, str) or not model:
        return _error(400, f"model = {model!r}: must be the id or name of a running job (GET /v1/models)",
                      param="model")
    job = jobs.get(model)
    if job is None:
        # By name: the newest running job, else the newest of any state (which then says its state).
        named = sorted((j for j in jobs.values() if j.name == model),
                       key=lambda j: (j.state is JobState.RUNNING, j.created))
        if not named:
            running = ", ".join(f"{j.name} ({j.id})" for j in _running(request)) or "none"
            return _error(404, f"The model {model!r} does not exist; running jobs: {running}", param="model",
                          code="model_not_found")
        job = named[-1]
    if job.state is not JobState.RUNNING:
        return _error(409, job.describe(), param="model")
    if job.cfg.generation is None:
        return _error(400, f"job {job.id} serves forward passes (POST /v1/jobs/{job.id}/infer), not text "
                           "generation: its job file has no [generation] table", param="model")
    return job


async def forward_generation(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        return _error(413, exc.text or "request body too large")
    try:
        parsed = json.loads(body)
    except ValueError as exc:
        return _error(400, f"the request body is not valid JSON: {exc}")
    if not isinstance(parsed, dict):
        return _error(400, "the request body must be a JSON object")
    job = resolve_model(request, parsed.get("model"))
    if isinstance(job, web.Response):
        return job
    agent = request.app[REGISTRY].agents[job.dispatcher_agent]
    url = f"http://{url_host(agent.info.advertise)}:{job.dispatcher_port}{request.path}"
    return await stream_through(request, url, job.service_token, body)


async def stream_through(request: web.Request, url: str, service_token: str, body: bytes) -> web.StreamResponse:
    """POST `body` to the dispatcher and copy its answer to the client as it arrives.

    `request_timeout_s` bounds the wait for the answer to start and every silence within it
    (a long generation may stream for longer). A client that goes away closes the upstream
    connection, which cancels the sequence there.
    """
    cfg = request.app[CONFIG]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.request_timeout_s)
    headers = {"Authorization": f"Bearer {service_token}", "Content-Type": "application/json"}
    resp: web.StreamResponse | None = None
    try:
        async with request.app[proxy.SESSION].post(url, data=body, headers=headers, timeout=timeout) as upstream:
            resp = web.StreamResponse(status=upstream.status, headers={
                h: upstream.headers[h] for h in _PASSED_HEADERS if h in upstream.headers})
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                try:
                    await resp.write(chunk)
                except ConnectionResetError:
                    # The client left: closing (not reusing) the upstream connection cancels the sequence.
                    upstream.close()
                    log.info("client of %s left mid-answer; upstream closed", url)
                    return resp
            await resp.write_eof()
            return resp
    except TimeoutError:
        if resp is not None:
            log.warning("dispatcher at %s went silent for %g s mid-answer", url, cfg.request_timeout_s)
            return resp
        return _error(504, f"dispatcher at {url} did not answer within {cfg.request_timeout_s:g} s "
                           "(request_timeout_s)")
    except aiohttp.ClientError as exc:
        if resp is not None:
            log.warning("dispatcher at %s broke off its answer: %s", url, exc)
            return resp
        log.warning("dispatcher at %s unreachable: %s", url, exc)
        return _error(502, f"dispatcher at {url} unreachable: {exc}")
