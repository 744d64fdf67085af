"""OpenAI-compatible routes on the controller: `model` names a running job, whose dispatcher
serves the same paths; bodies go through unchanged and answers stream back chunk by chunk.

Errors here are in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), which the
official clients show as they are. Nothing here decodes tokens: torch-free.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from infscaled.controller import proxy
from infscaled.controller.api import CONFIG, JOBS, REGISTRY
from infscaled.controller.api import _url_host as url_host
from infscaled.controller.jobs import SERVING, Job
from infscaled.generation import openai_api, openapi, schema
from infscaled.generation.errors import GenerationError, error_body
from infscaled.protocol.plan import DISPATCHER

log = logging.getLogger(__name__)

# The dispatcher's answers are copied with these headers only (hop-by-hop ones stay behind).
_PASSED_HEADERS = ("Content-Type", "Cache-Control")


def add_routes(app: web.Application) -> None:
    app.add_routes([
        web.get("/health", health),
        web.get("/openapi.json", openapi_json),
        web.get("/v1/models", list_models),
        web.get("/v1/models/{model}", get_model),
        web.post("/v1/completions", forward_generation),
        web.post("/v1/chat/completions", forward_generation),
        web.post("/tokenize", forward_tokenizer),
        web.post("/detokenize", forward_tokenizer),
        web.get("/tokenizer_info", forward_tokenizer),
    ])
    app.on_response_prepare.append(_add_request_id)


# Readable without the token (vLLM's convention, which load generators and probes rely on);
# /metrics joins them unless the controller config says public_metrics = false.
PUBLIC_PATHS = frozenset({"/health", "/openapi.json"})
REQUEST_ID = "X-Request-Id"
_REQUEST_ID_KEY = web.RequestKey("request_id", str)
_RAW_BODY_KEY = web.RequestKey("raw_body", bytes)  # the body as read, forwarded unchanged
# The dispatcher's path for each tokenizer route the controller serves at vLLM's paths.
_TOKENIZER_PATHS = {"/tokenize": openai_api.TOKENIZE_PATH, "/detokenize": openai_api.DETOKENIZE_PATH,
                    "/tokenizer_info": openai_api.TOKENIZER_INFO_PATH}


def request_id(request: web.Request) -> str:
    """The client's X-Request-Id if it sent a sane one, else a new one; the same for the whole
    request (the dispatcher is sent it, the answer carries it)."""
    if _REQUEST_ID_KEY not in request:
        given = request.headers.get(REQUEST_ID, "")
        request[_REQUEST_ID_KEY] = given if 0 < len(given) <= 128 and given.isprintable() else secrets.token_hex(16)
    return request[_REQUEST_ID_KEY]


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[REQUEST_ID] = request_id(request)


async def health(request: web.Request) -> web.Response:
    """200 while serving, 503 while shutting down; no token needed (load balancers, guidellm)."""
    draining = request.app[JOBS].draining
    return web.json_response({"status": "draining" if draining else "ok"}, status=503 if draining else 200)


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi.document())


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param, code), status=status)


def _running(request: web.Request) -> list[Job]:
    return [j for j in request.app[JOBS].jobs.values() if j.state in SERVING]


def _model_card(job: Job) -> dict[str, Any]:
    return {"id": job.id, "object": "model", "created": int(job.created), "owned_by": "infscaled", "name": job.name,
            "root": job.cfg.model.source}


async def list_models(request: web.Request) -> web.Response:
    """Every running generation job, as OpenAI models: `id` is the job id; `name` (also accepted as `model`)."""
    data = [_model_card(j) for j in sorted(_running(request), key=lambda j: j.created) if j.cfg.generation is not None]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """One running generation job by id or name; 404 in OpenAI's shape otherwise."""
    job = resolve_model(request, request.match_info["model"])
    if isinstance(job, web.Response):
        if job.status != 404:  # a job of that name that is not running or not a generation job
            return _error(404, f"The model {request.match_info['model']!r} does not exist (not a running generation "
                               "job; GET /v1/models lists them)", param="model", code="model_not_found")
        return job
    return web.json_response(_model_card(job))


def _default_model(request: web.Request, model: Any) -> Any:
    """`model` as given, or the one running generation job's id when the request names none."""
    if model is not None:
        return model
    serving = [j for j in _running(request) if j.cfg.generation is not None]
    if len(serving) == 1:
        return serving[0].id
    names = ", ".join(f"{j.name} ({j.id})" for j in serving) or "none"
    return _error(400, f"model is required: {len(serving)} generation jobs are running ({names})", param="model")


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
                       key=lambda j: (j.state in SERVING, j.created))
        if not named:
            running = ", ".join(f"{j.name} ({j.id})" for j in _running(request)) or "none"
            return _error(404, f"The model {model!r} does not exist; running jobs: {running}", param="model",
                          code="model_not_found")
        job = named[-1]
    if job.state not in SERVING:
        return _error(409, job.describe(), param="model")
    if job.cfg.generation is None:
        return _error(400, f"job {job.id} serves forward passes (POST /v1/jobs/{job.id}/infer), not text "
                           "generation: its job file has no [generation] table", param="model")
    return job


async def _json_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        return _error(413, exc.text or "request body too large")
    try:
        parsed = schema.loads(body)
    except GenerationError as exc:
        return _error(exc.status, exc.message)
    if not isinstance(parsed, dict):
        return _error(400, f"the request body must be a JSON object, not {type(parsed).__name__}")
    request[_RAW_BODY_KEY] = body
    return parsed


def _dispatcher_url(request: web.Request, job: Job, path: str) -> str:
    agent = request.app[REGISTRY].agents[job.dispatcher_agent]
    return f"http://{url_host(agent.info.advertise)}:{job.dispatcher_port}{path}"


SCRAPE_TIMEOUT_S = 2.0  # one dispatcher's serving metrics; a slow one is left out of this scrape


async def scrape_serving(request: web.Request) -> dict[str, str]:
    """Job id -> the serving metrics text of each running generation job's dispatcher, fetched
    concurrently; a dispatcher that does not answer in SCRAPE_TIMEOUT_S is left out (logged)."""
    jobs = [j for j in _running(request) if j.cfg.generation is not None and j.dispatcher_agent
            and j.dispatcher_agent in request.app[REGISTRY].agents]
    timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)

    async def one(job: Job) -> tuple[str, str]:
        url = _dispatcher_url(request, job, openai_api.METRICS_PATH)
        try:
            async with request.app[proxy.SESSION].get(url, timeout=timeout, headers={
                    "Authorization": f"Bearer {job.service_token}"}) as resp:
                if resp.status == 200:
                    return job.id, await resp.text()
                log.info("serving metrics of %s: HTTP %d", job.id, resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("serving metrics of %s not scraped: %s", job.id, exc)
        return job.id, ""

    return dict(await asyncio.gather(*(one(j) for j in jobs)))


async def forward_generation(request: web.Request) -> web.StreamResponse:
    parsed = await _json_body(request)
    if isinstance(parsed, web.Response):
        return parsed
    job = resolve_model(request, parsed.get("model"))
    if isinstance(job, web.Response):
        return job
    # The dispatcher died, or is being restarted (controller/recovery.py): an answer that had not
    # started (a non-streaming one in flight, or any one refused while it restarts) is asked again
    # until the new one answers. The client saw nothing of it and generation has no side effect,
    # so it gets one whole answer (for greedy or seeded sampling the very one it would have had).
    # A stream already under way cannot be continued (its sequence died with the dispatcher): it
    # ends with an error event instead.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + request.app[CONFIG].request_timeout_s
    retrying = False
    while True:
        resp = await stream_through(request, _dispatcher_url(request, job, request.path), job.service_token,
                                    request[_RAW_BODY_KEY], job=job)
        if (resp.prepared or resp.status != 502 or job.state not in SERVING or job.plan is None
                or not job.plan.recovery.enabled or loop.time() + RETRY_S >= deadline):
            return resp
        if not retrying:
            retrying = True
            log.warning("job %s: its dispatcher did not answer request %s; asking again until it does (for up to "
                        "%.0f s)", job.id, request_id(request), deadline - loop.time())
        await asyncio.sleep(RETRY_S)


async def forward_tokenizer(request: web.Request) -> web.StreamResponse:
    """/tokenize, /detokenize (JSON body) and /tokenizer_info (`?model=`) on the job's dispatcher;
    `model` may be left out while one generation job runs."""
    if request.method == "GET":
        model: Any = request.query.get("model")
        body = b""
    else:
        parsed = await _json_body(request)
        if isinstance(parsed, web.Response):
            return parsed
        model, body = parsed.get("model"), request[_RAW_BODY_KEY]
    model = _default_model(request, model)
    if isinstance(model, web.Response):
        return model
    job = resolve_model(request, model)
    if isinstance(job, web.Response):
        return job
    url = _dispatcher_url(request, job, _TOKENIZER_PATHS[request.path])
    return await stream_through(request, url, job.service_token, body, method=request.method)


async def stream_through(request: web.Request, url: str, service_token: str, body: bytes,
                         method: str = "POST", job: Job | None = None) -> web.StreamResponse:
    """Send `body` to the dispatcher and give its answer to the client.

    An event stream is copied as it arrives, whole events at a time; any other answer is read
    in full first. So when the dispatcher dies or goes silent mid-answer, the client always
    learns it: a stream ends with an `error` event that says why (and no `[DONE]`: the answer is
    incomplete, and the official clients raise on that event), any other answer becomes a 502
    or 504 with the reason; never a clean-looking truncated answer.

    `request_timeout_s` bounds the wait for the answer to start and every silence within it
    (a long generation may stream for longer). A client that goes away closes the upstream
    connection, which cancels the sequence there. With `job`, a stream cut short says whether
    the dispatcher died (and is being restarted), once the controller heard of it.
    """
    cfg = request.app[CONFIG]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.request_timeout_s)
    headers = {"Authorization": f"Bearer {service_token}", "Content-Type": "application/json",
               REQUEST_ID: request_id(request)}
    resp: web.StreamResponse | None = None
    life = _DispatcherLife.of(job)
    try:
        async with request.app[proxy.SESSION].request(method, url, data=body, headers=headers,
                                                      timeout=timeout) as upstream:
            passed = {h: upstream.headers[h] for h in _PASSED_HEADERS if h in upstream.headers}
            if not upstream.headers.get("Content-Type", "").startswith(SSE_TYPE):
                answer = await upstream.read()
                return web.Response(status=upstream.status, body=answer, headers=passed)
            resp = web.StreamResponse(status=upstream.status, headers=passed)
            await resp.prepare(request)
            try:
                return await _copy_events(request, resp, upstream, url)
            except ConnectionResetError:
                # The client left: closing (not reusing) the upstream connection cancels the sequence.
                upstream.close()
                log.info("client of %s left mid-answer; upstream closed", url)
                return resp
    except TimeoutError:
        why = f"the job's dispatcher at {url} went silent for {cfg.request_timeout_s:g} s (request_timeout_s)"
        if resp is not None:
            return await _end_stream(resp, 504, why)
        return _error(504, f"dispatcher at {url} did not answer within {cfg.request_timeout_s:g} s "
                           "(request_timeout_s)")
    except aiohttp.ClientError as exc:
        why = f"the job's dispatcher at {url} broke off its answer ({type(exc).__name__}: {exc})"
        if resp is not None:
            if life is not None:
                why = await life.explain(request, url) or why
            return await _end_stream(resp, 502, why)
        if isinstance(exc, aiohttp.ClientConnectorError):
            log.info("dispatcher at %s unreachable: %s", url, exc)  # the answer says so; a restart retries it
            return _error(502, f"dispatcher at {url} unreachable: {exc}")
        log.warning("%s", why)
        return _error(502, f"{why}; the request was not answered")


RETRY_S = 0.2  # between tries of a generation request whose dispatcher is unreachable or died
# A dispatcher's death reaches the controller from its agent a moment after its connections broke:
# a stream it cut short waits this long, at most, to say so instead of just "broke off".
DEATH_HEARD_S = 2.0


@dataclass(frozen=True)
class _DispatcherLife:
    """Which dispatcher process answers a request: its pid and restart count when it began."""

    job: Job
    pid: int
    restarts: int

    @staticmethod
    def of(job: Job | None) -> _DispatcherLife | None:
        if job is None or (status := job.nodes.get(NAME)) is None:
            return None
        return _DispatcherLife(job, status.pid, job.recovery.ledger.losses.get(NAME, 0))

    async def explain(self, request: web.Request, url: str) -> str | None:
        """Why the dispatcher broke off, once the controller heard: it died and is being restarted,
        or it died and the job failed; None when nothing was heard in DEATH_HEARD_S."""
        job = self.job

        def heard() -> bool:
            status = job.nodes.get(NAME)
            return (job.state not in SERVING or status is None or status.pid != self.pid
                    or status.state != "ready" or job.recovery.ledger.losses.get(NAME, 0) > self.restarts)

        if not await request.app[JOBS].wait_until(heard, DEATH_HEARD_S):
            return None
        if job.state not in SERVING:
            return f"the job's dispatcher at {url} died mid-answer and the job is {job.state}: {job.reason}"
        status = job.nodes.get(NAME)
        last = job.recovery.ledger.last.get(NAME, "")
        died = (last.removeprefix("dispatcher: ") if job.recovery.ledger.losses.get(NAME, 0) > self.restarts
                else status.reason or status.state if status is not None else "gone")
        return (f"the job's dispatcher at {url} died mid-answer ({died}); this sequence died with it and "
                "cannot be continued; the dispatcher is being restarted: send the request again")


NAME = str(DISPATCHER)
SSE_TYPE = "text/event-stream"
_DONE = b"data: [DONE]\n\n"  # a stream's last event (generation/responses.py)


async def _copy_events(request: web.Request, resp: web.StreamResponse, upstream: aiohttp.ClientResponse,
                       url: str) -> web.StreamResponse:
    """Copy server-sent events to the client as they arrive, whole events only (a partial one is
    kept until its end arrives, so an error event never lands inside it). A stream that ends
    without `[DONE]` was cut short (the dispatcher died between two chunks): the client gets an
    error event saying so."""
    pending = b""
    finished = False
    async for chunk in upstream.content.iter_any():
        pending += chunk
        cut = pending.rfind(b"\n\n") + 2
        if cut < 2:
            continue
        events, pending = pending[:cut], pending[cut:]
        finished = events.endswith(_DONE)
        await resp.write(events)
    if not finished:
        return await _end_stream(resp, 502, f"the job's dispatcher at {url} ended the stream before its end")
    await resp.write_eof()
    return resp


async def _end_stream(resp: web.StreamResponse, status: int, why: str) -> web.StreamResponse:
    """End a stream already under way with an error event (no [DONE]: the answer is incomplete)."""
    log.warning("%s; the stream ends with an error event", why)
    try:
        await resp.write(b"data: " + json.dumps(error_body(status, f"{why}; the answer is incomplete")).encode()
                         + b"\n\n")
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client left meanwhile
    return resp
