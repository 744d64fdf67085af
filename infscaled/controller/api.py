"""REST handlers and the agents' websocket endpoint (reference: docs/controller-api.md).

Job errors are JSON `{"error": message}`; 401, the router's 404 and 405, and 500 are in OpenAI's
shape `{"error": {"message", "type", "param", "code"}}` like the OpenAI routes'; job-file errors carry exactly the text `infscaled run`
prints for the same file (name it with the `X-Infscaled-Job-File` header).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from infscaled.config import JobConfig
from infscaled.config.limits import MAX_JOB_FILE_BYTES
from infscaled.config.messages import config_error
from infscaled.controller import agent_metrics, export, proxy, views, watch
from infscaled.controller.config import ControllerConfig
from infscaled.controller.guard import PARSED_JSON
from infscaled.controller.job import SERVING, SUBMITTED, JobSource, Rejected
from infscaled.controller.jobs import JobStore
from infscaled.controller.looplag import LoopLag
from infscaled.controller.registry import CONNECTED, LOST, Registry
from infscaled.errors import ConfigError
from infscaled.generation.errors import error_body
from infscaled.protocol import jsonsafe
from infscaled.protocol.messages import MAX_MESSAGE_BYTES
from infscaled.protocol.typed import to_dict

log = logging.getLogger(__name__)
# Strict JSON in every answer: a non-finite float (a NaN statistic) is written as null.
json_response = functools.partial(web.json_response, dumps=jsonsafe.dumps)

CONFIG = web.AppKey("config", ControllerConfig)
REGISTRY = web.AppKey("registry", Registry)
JOBS = web.AppKey("jobs", JobStore)
WATCHERS = web.AppKey("watchers", watch.Watchers)
AGENT_SERIES = web.AppKey("agent_series", agent_metrics.AgentSeries)
LOOP_LAG = web.AppKey("loop_lag", LoopLag)

JOB_FILE_HEADER: Final = "X-Infscaled-Job-File"
TOML_TYPES: Final = ("text/plain", "application/toml", "text/x-toml")
# GET /v1/agents: page size by default (a cluster this small comes in one page) and at most.
AGENTS_PAGE: Final = 500
AGENTS_PAGE_MAX: Final = 1000
# How long closing an agent's websocket waits for its close frame.
WS_CLOSE_TIMEOUT_S: Final = 2.0


def add_routes(app: web.Application) -> None:
    app.add_routes([
        web.get("/v1/health", health),
        web.get("/v1/agents", list_agents),
        web.get("/v1/agents/ws", agent_socket),
        web.delete("/v1/agents/{id}", forget_agent),
        web.get("/v1/jobs", list_jobs),
        web.post("/v1/jobs", submit_job),
        web.get("/v1/jobs/{id}", get_job),
        web.delete("/v1/jobs/{id}", stop_job),
        web.patch("/v1/jobs/{id}", scale_job),
        web.post("/v1/jobs/{id}/infer", infer),
        web.get("/v1/jobs/{id}/metrics", job_metrics),
        web.get("/metrics", prometheus_metrics),
        web.get("/metrics/agents", agent_series),
        web.get("/v1/watch", watch_socket),
    ])


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Rejected and aiohttp's own HTTP errors (404, 405, 413, ...) as JSON; a bug as a logged 500."""
    try:
        return await handler(request)
    except Rejected as exc:
        return json_response({"error": str(exc)}, status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status not in (404, 405):
            return json_response({"error": exc.text or exc.reason}, status=exc.status)
        # The router's own (no such route, method not allowed): OpenAI's error shape, which every
        # OpenAI client parses; a 405 keeps its Allow header.
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = f"{request.method} {request.path}: {exc.reason}"
        if exc.status == 405 and allow:
            message += f" (allowed: {allow['Allow']})"
        elif exc.status == 404:
            message += " (the API is described at GET /openapi.json and docs/controller-api.md)"
        return json_response(error_body(exc.status, message), status=exc.status, headers=allow)
    except Exception:  # noqa: BLE001 - request boundary: answer, log, keep serving
        log.exception("%s %s failed", request.method, request.path)
        return json_response(error_body(500, "internal error; see the controller's log"), status=500)


async def health(request: web.Request) -> web.Response:
    jobs = request.app[JOBS]
    return json_response({
        "status": "draining" if jobs.draining else "ok",
        "agents": request.app[REGISTRY].connected_count,
        "jobs": sum(1 for j in jobs.jobs.values() if j.state in SERVING),
    })


# -- agents ----------------------------------------------------------------------------------------


async def list_agents(request: web.Request) -> web.Response:
    """One page of agents in registration order (`limit`, `after`), optionally only those in a
    `state` or holding a device of a `job`; a `Link: <...>; rel="next"` header when more may
    follow. Costs the page, not the fleet: positions come from a cached index."""
    q = AgentQuery.parse(request)
    registry, jobs = request.app[REGISTRY], request.app[JOBS]
    held = {s.agent for s in jobs.get(q.job).nodes.values()} if q.job else set()  # 404 for an unknown job
    ids, position = request.app[WATCHERS].views.ordered_ids()
    if q.after and q.after not in position:
        raise Rejected(400, f"after={q.after!r}: no such agent; pass the id of the last agent of the previous page")
    start = position[q.after] + 1 if q.after else 0
    # A job's agents are few: walk their positions, not the fleet's.
    walk = sorted(p for a in held if (p := position.get(a)) is not None and p >= start) if q.job else None
    users = jobs.device_users()
    now = time.monotonic()
    page: list[dict[str, Any]] = []
    last = start
    for last in (walk if walk is not None else range(start, len(ids))):
        agent = registry.agents.get(ids[last])
        if agent is None or (q.state and agent.state != q.state):
            continue
        page.append({**to_dict(views.agent_view(agent, users)), "version": agent.info.version,
                     "port_range": agent.info.port_range,
                     "last_heartbeat_age_s": round(now - agent.last_seen, 3)})
        if len(page) == q.limit:
            break
    headers = {}
    if len(page) == q.limit and last + 1 < len(ids):
        headers["Link"] = f'<{q.next_url(request, page[-1]["id"])}>; rel="next"'
    return json_response(page, headers=headers)


@dataclass(frozen=True)
class AgentQuery:
    """`GET /v1/agents` parameters, checked: a bad one is a 400 saying what is allowed."""

    limit: int = AGENTS_PAGE
    after: str = ""
    state: str = ""
    job: str = ""

    @classmethod
    def parse(cls, request: web.Request) -> AgentQuery:
        unknown = set(request.query) - {"limit", "after", "state", "job"}
        if unknown:
            raise Rejected(400, f"unknown parameter(s) {sorted(unknown)}; allowed: limit, after, state, job")
        raw = request.query.get("limit", str(AGENTS_PAGE))
        if not raw.isdigit() or not 1 <= int(raw) <= AGENTS_PAGE_MAX:
            raise Rejected(400, f"limit={raw!r}: expected an integer from 1 to {AGENTS_PAGE_MAX}")
        state = request.query.get("state", "")
        if state not in ("", CONNECTED, LOST):
            raise Rejected(400, f"state={state!r}: expected {CONNECTED} or {LOST}")
        return cls(int(raw), request.query.get("after", ""), state, request.query.get("job", ""))

    def next_url(self, request: web.Request, last_id: str) -> str:
        return str(request.rel_url.update_query(after=last_id, limit=str(self.limit)))


async def forget_agent(request: web.Request) -> web.Response:
    """DELETE: forget a disconnected agent and its credential, so its id may register anew."""
    agent_id = request.match_info["id"]
    registry = request.app[REGISTRY]
    agent = registry.agents.get(agent_id)
    if agent is None:
        raise Rejected(404, f"no agent {agent_id!r}")
    if agent.state == "connected":
        raise Rejected(409, f"agent {agent_id} is connected; stop it first (only a disconnected agent is forgotten)")
    registry.forget(agent_id)
    return json_response({"id": agent_id, "forgotten": True})


async def agent_socket(request: web.Request) -> web.StreamResponse:
    # Oversized frames make aiohttp close the connection (1009); the session then loses the agent.
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, timeout=WS_CLOSE_TIMEOUT_S, heartbeat=None)
    try:
        await ws.prepare(request)
    except ConnectionError as exc:  # the agent gave up before the upgrade (its connect timeout): it retries
        log.info("agent connection from %s closed before the upgrade: %s", request.remote, exc)
        return web.Response(status=499)  # to nobody: aiohttp drops it quietly on the closed transport
    await request.app[REGISTRY].serve(ws, request.remote or "?")
    return ws


# -- jobs ------------------------------------------------------------------------------------------


async def list_jobs(request: web.Request) -> web.Response:
    jobs = sorted(request.app[JOBS].jobs.values(), key=lambda j: j.created)
    return json_response([j.summary() for j in jobs])


async def get_job(request: web.Request) -> web.Response:
    return json_response(request.app[JOBS].get(request.match_info["id"]).detail())


async def submit_job(request: web.Request) -> web.Response:
    try:
        cfg, source = await job_config(request)
    except ConfigError as exc:
        raise Rejected(400, str(exc)) from None
    job = await request.app[JOBS].submit(cfg, source)
    return json_response(job.summary(), status=201, headers={"Location": f"/v1/jobs/{job.id}"})


async def stop_job(request: web.Request) -> web.Response:
    job = await request.app[JOBS].stop(request.match_info["id"])
    return json_response(job.summary(), status=202)


SCALE_SHAPE = 'JSON {"stage": <stage index; omit for a generation job\'s replica chains>, "replicas": <count>}'


async def scale_job(request: web.Request) -> web.Response:
    """PATCH: scale a running job's stage (or a generation job's chains) while it serves."""
    if request.content_type != "application/json":
        raise Rejected(415, f"content type {request.content_type!r} not accepted; send {SCALE_SHAPE}")
    body = request.get(PARSED_JSON)
    if not isinstance(body, dict) or set(body) - {"stage", "replicas"} or "replicas" not in body:
        raise Rejected(400, f"expected {SCALE_SHAPE}")
    stage, replicas = body.get("stage"), body["replicas"]
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise Rejected(400, f"replicas = {replicas!r}: expected an integer; send {SCALE_SHAPE}")
    if stage is not None and (isinstance(stage, bool) or not isinstance(stage, int)):
        raise Rejected(400, f"stage = {stage!r}: expected an integer or null; send {SCALE_SHAPE}")
    job = await request.app[JOBS].scale(request.match_info["id"], stage, replicas)
    return json_response(job.detail(), status=202)


async def job_config(request: web.Request) -> tuple[JobConfig, JobSource]:
    """The request's job file as `load_job` would read it (ConfigError with the same text), and
    its source as the database keeps it."""
    shown = request.headers.get(JOB_FILE_HEADER, "").strip() or SUBMITTED
    name: str | None = None
    raw = await request.read()
    if request.content_type == "application/json":
        body = _json_body(request.get(PARSED_JSON))
        text = body["toml"]
        name = body.get("name")
    elif request.content_type in TOML_TYPES:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise config_error(shown, "", None, "a readable UTF-8 TOML job file", f"cannot read: {exc}") from None
    else:
        raise Rejected(415, f"content type {request.content_type!r} not accepted; send the job file as "
                            f"{', '.join(TOML_TYPES)}, or JSON {{\"toml\": \"...\", \"name\": \"optional\"}}")
    if len(text.encode()) > MAX_JOB_FILE_BYTES:
        raise Rejected(413, f"{shown}: the job file is {len(text.encode())} bytes; the limit is {MAX_JOB_FILE_BYTES}")
    source = JobSource(text, shown, name)
    # Parsing (TOML, checks, model paths on disk) runs off the event loop.
    return await asyncio.to_thread(source.parse, request.app[CONFIG].model_roots), source


def _json_body(body: Any) -> dict[str, Any]:
    """The JSON submission, already parsed within limits by guard.limits_middleware."""
    shape = 'JSON {"toml": "<job file text>", "name": "<optional job name>"}'
    if not isinstance(body, dict) or not isinstance(body.get("toml"), str) or set(body) - {"toml", "name"}:
        raise Rejected(400, f"expected {shape}")
    if "name" in body and not isinstance(body["name"], str):
        raise Rejected(400, f"name must be a string; expected {shape}")
    return body


# -- metrics ---------------------------------------------------------------------------------------


async def prometheus_metrics(request: web.Request) -> web.Response:
    """The controller's, the jobs' and the fleet's series; each agent's too while the fleet is at
    most metrics_agent_series_max agents (beyond: GET /metrics/agents). Costs the jobs and what
    changed in the fleet since the last scrape or watch tick, not the fleet."""
    from infscaled.controller.openai_proxy import scrape_serving  # it imports this module

    registry, views = request.app[REGISTRY], request.app[WATCHERS].views
    await views.catch_up()  # the first call at a large fleet: its views in chunks that yield
    views.refresh()
    jobs = request.app[JOBS].jobs.values()
    families = [request.app[LOOP_LAG].family(asyncio.get_running_loop().time()),
                *agent_metrics.fleet_families(views.summary(), registry.connected_count), *export.collect(jobs)]
    text = export.render(families)
    if registry.connected_count <= request.app[CONFIG].metrics_agent_series_max:
        text += request.app[AGENT_SERIES].render(
            a.usage for a in registry.agents.values() if a.state == CONNECTED and a.usage is not None)
    text += export.process_text() + export.serving_text(jobs, await scrape_serving(request))
    return web.Response(text=text, headers={"Content-Type": export.CONTENT_TYPE})


async def agent_series(request: web.Request) -> web.StreamResponse:
    """GET /metrics/agents: connected agents' host and device series: every agent, `agent=ID`
    (repeatable), a `job`'s agents, or shard `shard` of `shards` (stable slices by id)."""
    q = agent_metrics.AgentMetricsQuery.parse(request)
    registry, views, series = request.app[REGISTRY], request.app[WATCHERS].views, request.app[AGENT_SERIES]
    if q.agents:
        unknown = [a for a in q.agents if a not in registry.agents]
        if unknown:
            raise Rejected(404, f"no agent(s) {', '.join(map(repr, unknown))}; GET /v1/agents lists them")
        ids: list[str] = list(q.agents)
    elif q.job:
        ids = sorted({s.agent for s in request.app[JOBS].get(q.job).nodes.values()})  # 404 for an unknown job
    elif q.shards > 1:
        ids = series.shard_ids(views.order_key(), views.ordered_ids()[0], q.shards, q.shard)
    else:
        ids = views.ordered_ids()[0]
    usage = []
    for agent_id in ids:
        agent = registry.agents.get(agent_id)
        if agent is not None and agent.state == CONNECTED and agent.usage is not None:
            usage.append(agent.usage)
    if len(series) > 2 * len(registry.agents) + agent_metrics.CHUNK:
        series.forget_missing(registry.agents)  # forgotten agents' lines
    resp = web.StreamResponse(headers={"Content-Type": export.CONTENT_TYPE})
    await resp.prepare(request)
    async for piece in series.stream(usage):
        await resp.write(piece.encode())
    await resp.write_eof()
    return resp


async def job_metrics(request: web.Request) -> web.Response:
    return json_response(export.job_snapshot(request.app[JOBS].get(request.match_info["id"])))


async def watch_socket(request: web.Request) -> web.WebSocketResponse:
    interval_s = watch.interval_from_query(request)  # a bad value is a 400 before the upgrade
    agents_listed = watch.agents_listed_from_query(request)
    # Watchers send nothing: a small frame limit; aiohttp's pings notice a vanished client.
    ws = web.WebSocketResponse(max_msg_size=64 << 10, timeout=WS_CLOSE_TIMEOUT_S, heartbeat=30.0)
    await ws.prepare(request)
    await request.app[WATCHERS].serve(ws, interval_s, agents_listed)
    return ws


# -- inference -------------------------------------------------------------------------------------

RETRY_S = 0.2  # between tries of a forward request whose dispatcher is unreachable


async def infer(request: web.Request) -> web.Response:
    job = request.app[JOBS].get(request.match_info["id"])
    if job.state not in SERVING:
        raise Rejected(409, job.describe())
    body = await request.read()
    cfg = request.app[CONFIG]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.request_timeout_s
    while True:
        agent = request.app[REGISTRY].agents[job.dispatcher_agent]
        url = f"http://{_url_host(agent.info.advertise)}:{job.dispatcher_port}/infer"
        resp = await proxy.forward(request.app[proxy.SESSION], url, job.service_token, body,
                                   request.headers.get("Content-Type"), max(0.1, deadline - loop.time()))
        # Unreachable (502): the dispatcher died with it, or is being restarted (controller/recovery.py).
        # A forward request is idempotent, so it is sent again until the new one answers.
        if (resp.status != 502 or job.state not in SERVING or job.plan is None or not job.plan.recovery.enabled
                or loop.time() + RETRY_S >= deadline):
            return resp
        await asyncio.sleep(RETRY_S)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
