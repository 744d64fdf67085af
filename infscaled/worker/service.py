"""The dispatcher as its own process, serving the job's HTTP inference API.

`dispatcher_main(spec, conn)` is spawned like a stage worker and speaks the same control-pipe
protocol (READY / failed / done; see `worker.group`). Life cycle: build the model skeleton
(meta device: the InputSpec, no weights) -> start the Dispatcher and join its edges (waits for
the stage workers to build; topology updates that arrive meanwhile are applied, so a restarted
dispatcher is not held up by a peer that died while it started) -> listen on
(plan.dispatcher_host, port) ->
READY -> serve until STOP -> stop listening, drain (dispatcher.close(): in-flight requests
finish, then STOP flows down the pipeline) -> DONE -> exit 0.

STOP is the control pipe's StopWorker or SIGTERM. Before serving there is nothing to drain,
so either exits at once. Like a stage worker it ignores SIGINT, dies with its supervisor
(PR_SET_PDEATHSIG) and exits on end-of-file of its control pipe.

HTTP API (aiohttp, in this process's asyncio loop; torch work runs in threads):

    POST /infer   Authorization: Bearer <service_token>   (401 otherwise)
      JSON    {"inputs": nested list}: token ids -> int64 [S, T]; other models -> float32 [S, ...]
              -> {"output": nested list, "shape": [...], "dtype": "float32"}
      binary  Content-Type: application/x-infscaled-tensor (protocol/tensors.py), same back
      errors  JSON {"error": message}: 400 bad request, 503 pipeline failed or shutting down,
              504 timed out, 413 body above max_body_bytes
    GET /health   same auth -> {"status": "serving" | "draining" | "failed", "failure": ...}

torch is imported only inside functions, so a supervisor (the agent) can name `dispatcher_main`
as a spawn target without importing torch itself.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from infscaled.errors import PipelineFailedError, RequestError, WireError
from infscaled.protocol import control, jsonsafe, tensors
from infscaled.protocol.connguard import (
    ConnectionGuard,
    GuardedSite,
    ListenerLimits,
    busy_middleware,
    connection_budget,
)
from infscaled.protocol.plan import DISPATCHER, JobPlan
from infscaled.protocol.wire import MAX_NDIM
from infscaled.worker.entry import _die_with_parent, start_heartbeat
from infscaled.worker.request_stats import RequestStats

if TYPE_CHECKING:
    import torch

    from infscaled.dispatch.batching import Batching
    from infscaled.dispatch.core import FrontEnd
    from infscaled.engine.core import Engine
    from infscaled.models.base import InputSpec

log = logging.getLogger(__name__)

NODE = str(DISPATCHER)
# The dispatcher's own watchdog fires this much after the HTTP timeout, so a slow request is
# always answered 504 by the handler; the watchdog only frees its pipeline slot afterwards.
WATCHDOG_SLACK_S = 5.0
JSON_SHAPE_HINT = "inputs must be a non-empty rectangular list of numbers"
# The inference port is reachable by strangers (only the controller holds the service token), so
# its connections are bounded like the controller's own (protocol/connguard.py). The controller's
# proxy opens up to 1024 connections from one address; its idle pooled ones close after aiohttp's
# 15 s keep-alive, well before the idle deadline here.
MAX_CONNECTIONS = 2048
MAX_CONNECTIONS_PER_CLIENT = 1024
IDLE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ServiceSpec:
    """What the dispatcher process is told at spawn time."""

    plan: JobPlan
    port: int  # listens on (plan.dispatcher_host, port)
    token: str  # clients send `Authorization: Bearer <token>`; empty rejects everyone
    request_timeout_s: float = 120.0  # per request, from submit to result (504 past it)
    log_level: int = logging.WARNING
    connect_timeout_s: float = 300.0  # connecting edges waits for the slowest stage build
    body_timeout_s: float = 30.0  # reading one request body
    drain_timeout_s: float = 30.0  # finishing in-flight work on STOP
    max_body_bytes: int = 64 << 20
    stats_interval_s: float = 1.0  # DispatcherStats reports on the control pipe


# -- the process -----------------------------------------------------------------------------------


class _ControlLink:
    """The control pipe: sends READY / DONE / FAILED; a watcher thread turns StopWorker into a
    drain once serving (an exit before), and the supervisor's disappearance into an exit."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.engine: Engine | None = None  # set by attach(): topology updates go to it
        self._early: list[control.UpdateTopology] = []  # updates that came before the engine existed

    def send(self, msg: control.ControlMessage) -> None:
        with self._lock:
            self.conn.send_bytes(control.encode(msg))

    def serving(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        with self._lock:
            self._loop, self._stop = loop, stop

    def start(self) -> None:
        threading.Thread(target=self._watch, name="control", daemon=True).start()

    def attach(self, engine: Engine) -> None:
        """Topology updates go to `engine` from now on, those that came earlier first, in order (a
        restarted dispatcher can hear of a later epoch while it starts: a node that died or an
        edge removed meanwhile; the engine skips epochs it is past)."""
        with self._lock:
            self.engine = engine
            early, self._early = self._early, []
        for msg in early:
            self._update(engine, msg)

    @staticmethod
    def _update(engine: Engine, msg: control.UpdateTopology) -> None:
        try:
            engine.update(msg.update())
        except ValueError as exc:
            log.warning("ignoring a malformed topology update: %s", exc)

    def _watch(self) -> None:
        try:
            while True:
                try:
                    msg = control.decode(self.conn.recv_bytes())
                except WireError as exc:
                    log.warning("ignoring a malformed control message: %s", exc)
                    continue
                if isinstance(msg, control.UpdateTopology):
                    with self._lock:
                        engine = self.engine
                        if engine is None:
                            self._early.append(msg)  # applied once the engine exists (attach)
                    if engine is not None:
                        self._update(engine, msg)
                    continue
                if not isinstance(msg, control.StopWorker):
                    continue
                with self._lock:
                    loop, stop = self._loop, self._stop
                if loop is None or stop is None:
                    log.warning("stop requested before serving (%s)", msg.reason)
                    os._exit(3)
                try:
                    loop.call_soon_threadsafe(stop.set)
                except RuntimeError:
                    pass  # the loop already ended: the process is exiting anyway
        except (EOFError, OSError):
            os._exit(4)


def dispatcher_main(spec: ServiceSpec, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Until the service runs there is nothing to drain; serving installs a draining handler.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    _die_with_parent()
    logging.basicConfig(level=spec.log_level,
                        format=f"%(asctime)s dispatcher {spec.plan.job} %(levelname)s %(message)s")
    link = _ControlLink(conn)
    link.start()
    start_heartbeat(NODE, link.send)
    try:
        stats = _run(spec, link)
        link.send(control.WorkerDone(stats))
    except BaseException as exc:  # noqa: BLE001 - process boundary: report why, then exit non-zero
        log.exception("dispatcher failed")
        try:
            link.send(control.WorkerFailed(NODE, f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        os._exit(1)
    os._exit(0)


def _run(spec: ServiceSpec, link: _ControlLink) -> control.StageStats:
    import torch

    from infscaled.dispatch.batching import Batching
    from infscaled.dispatch.sequences import Sequences
    from infscaled.models.meta import dtype_of
    from infscaled.models.sources import resolve
    from infscaled.models.stage import skeleton

    torch.set_num_threads(max(1, int(os.environ.get("INFSCALED_WORKER_THREADS", "1"))))
    plan = spec.plan
    started = time.monotonic()
    input_spec = skeleton(resolve(plan.model_source)).family.input_spec()
    front: FrontEnd
    if plan.generation is not None:
        front = Sequences(plan.generation, request_timeout_s=spec.request_timeout_s, recovery=plan.recovery.enabled,
                          epoch=plan.epoch)
    else:
        front = Batching(input_spec, dtype_of(plan.dtype), plan,
                         request_timeout_s=spec.request_timeout_s + WATCHDOG_SLACK_S, recovery=plan.recovery.enabled)
    _join(plan, front, link, spec.connect_timeout_s)
    return asyncio.run(_serve(spec, front, input_spec, link, time.monotonic() - started))


def _join(plan: JobPlan, front: FrontEnd, link: _ControlLink, timeout_s: float) -> None:
    """Run the dispatcher's engine and join its edges in the background (they wait for the stage
    workers to build), applying topology updates meanwhile: a restarted dispatcher's peer that
    dies, or an edge removed, while it joins no longer holds it up (Engine.join). Returns once
    every remaining edge is open; raises when one failed to connect or `timeout_s` passed."""
    from infscaled.errors import InfscaledError

    engine = _engine(plan, front, timeout_s)
    joined = threading.Event()
    engine.join(list(plan.out_edges(DISPATCHER)) + list(plan.in_edges(DISPATCHER)), joined.set)
    link.attach(engine)  # after join: an update that removes or kills one of these edges finds it
    front.run_engine()
    deadline = time.monotonic() + timeout_s
    while not joined.wait(0.1):
        if front.wait_ended(0):
            raise InfscaledError(front.failure or "the dispatcher's engine ended while joining its edges")
        if time.monotonic() > deadline:
            raise InfscaledError(f"the dispatcher's edges did not all connect within {timeout_s:g} s")


def dispatcher_engine(plan: JobPlan, front: FrontEnd, connect_timeout_s: float) -> Engine:
    """The dispatcher's engine with `front` as its program, its edges connected (blocks until
    the stage workers joined: they build their stages first)."""
    engine = _engine(plan, front, connect_timeout_s)
    engine.connect(list(plan.out_edges(DISPATCHER)) + list(plan.in_edges(DISPATCHER)))
    return engine


def _engine(plan: JobPlan, front: FrontEnd, connect_timeout_s: float) -> Engine:
    from infscaled.engine.core import Engine, EngineSettings
    from infscaled.worker.transport import Transport

    connector = Transport.keyed(plan.secret)
    engine = Engine(DISPATCHER, front, EngineSettings(plan.dispatcher_host, connect_timeout_s, plan.edge_timeout_s),
                    lambda _edge: connector)
    engine.epoch = plan.epoch
    return engine


# -- HTTP ------------------------------------------------------------------------------------------


@dataclass
class _Service:
    spec: ServiceSpec
    dispatcher: FrontEnd
    input_spec: InputSpec
    draining: bool = False
    stats: RequestStats = field(default_factory=RequestStats)
    started: float = field(default_factory=time.monotonic)

    def authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return (bool(self.spec.token) and scheme.lower() == "bearer"
                and hmac.compare_digest(token.strip().encode(), self.spec.token.encode()))


SERVICE = web.AppKey("service", _Service)


async def _serve(spec: ServiceSpec, dispatcher: FrontEnd, input_spec: InputSpec,
                 link: _ControlLink, load_s: float) -> control.StageStats:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    svc = _Service(spec, dispatcher, input_spec)
    budget = connection_budget(MAX_CONNECTIONS)
    guard = ConnectionGuard(ListenerLimits(budget, min(MAX_CONNECTIONS_PER_CLIENT, budget), IDLE_TIMEOUT_S))
    app = web.Application(client_max_size=spec.max_body_bytes, middlewares=[busy_middleware(guard), _generation_auth])
    app[SERVICE] = svc
    app.router.add_get("/health", _health)
    if spec.plan.generation is not None:
        app.add_routes(await asyncio.to_thread(_generation_routes, spec, dispatcher, input_spec, svc.stats))
    else:
        app.router.add_post("/infer", _infer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = GuardedSite(runner, guard, spec.plan.dispatcher_host, spec.port)
        await site.start()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        link.serving(loop, stop)
        link.send(control.WorkerReady(NODE, os.getpid(), "cpu", [], 0, load_s))
        log.info("serving on %s:%d", spec.plan.dispatcher_host, spec.port)
        reporter = asyncio.create_task(_report_stats(svc, link), name="dispatcher-stats")
        try:
            await stop.wait()
        finally:
            reporter.cancel()
            # The reporter's own CancelledError comes back as a value; ours still propagates.
            await asyncio.gather(reporter, return_exceptions=True)
        log.info("stopping: no new requests, draining in-flight work")
        svc.draining = True
        await site.stop()  # stop listening; requests already read still get their answers
        if dispatcher.failure is None:
            await asyncio.to_thread(dispatcher.close, spec.drain_timeout_s)
    finally:
        await runner.cleanup()
    wall = time.monotonic() - svc.started
    return control.StageStats(NODE, micro_batches=svc.stats.requests, samples=svc.stats.samples, wall_s=wall)


def _generation_routes(spec: ServiceSpec, dispatcher: Any, input_spec: InputSpec,
                       stats: RequestStats) -> list[web.RouteDef]:
    """The OpenAI-compatible endpoints over the pipeline (the tokenizer loads from local files)."""
    from infscaled.dispatch.sequences import PipelineBackend
    from infscaled.generation.openai_api import make_handlers
    from infscaled.generation.tokenizer import load_tokenizer

    plan = spec.plan
    assert plan.generation is not None
    handlers = make_handlers(PipelineBackend(dispatcher, stats), load_tokenizer(plan.model_source), plan.job,
                             input_spec.max_positions, input_spec.vocab_size,
                             default_max_tokens=plan.generation.default_max_new_tokens)
    routes: list[web.RouteDef] = handlers.routes()
    return routes


@web.middleware
async def _generation_auth(request: web.Request, handler: Any) -> web.StreamResponse:
    """The generation routes answer in OpenAI's error shape; /infer and /health check for themselves."""
    authorized = request.app[SERVICE].authorized(request.headers.get("Authorization", ""))
    if request.path.startswith("/v1/") and not authorized:
        from infscaled.generation.errors import error_body

        return web.json_response(error_body(401, "missing or invalid bearer token"), status=401)
    result: web.StreamResponse = await handler(request)
    return result


async def _report_stats(svc: _Service, link: _ControlLink) -> None:
    """Every stats_interval_s, the request view on the control pipe (the agent forwards it)."""
    while True:
        await asyncio.sleep(svc.spec.stats_interval_s)
        front = svc.dispatcher
        stats = svc.stats.snapshot(front.inflight(), replayed=front.replayed, duplicates=front.duplicates)
        try:
            link.send(control.DispatcherStatsReport(stats))  # a few hundred bytes: does not block the loop
        except OSError as exc:
            log.info("stats not reported: %s", exc)
            return


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


async def _health(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    if not svc.authorized(request.headers.get("Authorization", "")):
        return _error(401, "missing or invalid bearer token", **{"WWW-Authenticate": "Bearer"})
    failure = svc.dispatcher.failure
    status = "failed" if failure else "draining" if svc.draining else "serving"
    return web.json_response({"status": status, "failure": failure or "", "inflight": svc.dispatcher.inflight()})


async def _infer(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    if not svc.authorized(request.headers.get("Authorization", "")):
        return _error(401, "missing or invalid bearer token", **{"WWW-Authenticate": "Bearer"})
    if svc.draining:
        svc.stats.rejected += 1
        return _error(503, "the service is shutting down; no new requests")
    binary = request.content_type == tensors.CONTENT_TYPE
    try:
        async with asyncio.timeout(svc.spec.body_timeout_s):
            body = await request.read()
    except TimeoutError:
        return _error(408, f"request body not received within {svc.spec.body_timeout_s:g} s")
    try:
        x = await asyncio.to_thread(parse_request, body, binary, svc.input_spec)
    except (RequestError, WireError) as exc:
        svc.stats.rejected += 1
        return _error(400, str(exc))
    timeout_s = svc.spec.request_timeout_s
    started = time.monotonic()
    svc.stats.inflight += 1
    try:
        future = cast("Batching", svc.dispatcher).submit(x)  # /infer is mounted for forward jobs only
        async with asyncio.timeout(timeout_s):
            y = await asyncio.wrap_future(future)
    except PipelineFailedError as exc:
        svc.stats.rejected += 1
        return _error(503, str(exc))
    except RequestError as exc:
        svc.stats.rejected += 1
        # The service began draining while this request was read: refused as above, 503 (seen
        # as a 400 when SIGTERM arrived mid-parse on a busy machine).
        return _error(503 if svc.draining else 400, str(exc))
    except TimeoutError:
        svc.stats.timed_out += 1
        return _error(504, f"request timed out after {timeout_s:g} s")
    finally:
        svc.stats.inflight -= 1
    svc.stats.finished(int(x.shape[0]), time.monotonic() - started)
    out, content_type = await asyncio.to_thread(render_response, y, binary)
    return web.Response(body=out, content_type=content_type)


# -- request and response bodies -------------------------------------------------------------------


def nested_shape(value: Any) -> tuple[list[int], list[Any]]:
    """Shape and row-major leaves of a non-empty rectangular nested list of numbers (pure Python).
    Raises RequestError naming the first offending position, e.g. `inputs[1]`."""
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):
        if not probe:
            where = "inputs" + "[0]" * len(shape)
            raise RequestError(f"{JSON_SHAPE_HINT}; {where} is empty")
        shape.append(len(probe))
        probe = probe[0]
    if not shape:
        raise RequestError(f"{JSON_SHAPE_HINT}, got {type(value).__name__}")
    if len(shape) > MAX_NDIM:
        raise RequestError(f"{JSON_SHAPE_HINT} of at most {MAX_NDIM} dimensions, got {len(shape)}")
    leaves: list[Any] = []

    def walk(v: Any, depth: int, where: str) -> None:
        if depth == len(shape):
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise RequestError(f"{JSON_SHAPE_HINT}; {where} is {type(v).__name__}, not a number")
            leaves.append(v)
            return
        if not isinstance(v, list) or len(v) != shape[depth]:
            got = f"{len(v)} items" if isinstance(v, list) else f"a {type(v).__name__}"
            raise RequestError(f"{JSON_SHAPE_HINT}; {where} has {got}, expected {shape[depth]} items "
                               f"like inputs{'[0]' * depth}")
        for i, item in enumerate(v):
            walk(item, depth + 1, f"{where}[{i}]")

    walk(value, 0, "inputs")
    return shape, leaves


def parse_request(body: bytes, binary: bool, spec: InputSpec) -> torch.Tensor:
    """A request body as the tensor to submit: RequestError / WireError say what is wrong."""
    import torch

    if binary:
        header, data = tensors.decode(body)
        return tensor_from_body(header, data)
    try:
        # Strict and bounded before parsing: {"inputs": ...} nests at most MAX_NDIM + 1 levels.
        doc = jsonsafe.loads(body, max_bytes=len(body), max_depth_allowed=MAX_NDIM + 1)
    except jsonsafe.JsonLimitError as exc:
        raise RequestError(f'body must be JSON {{"inputs": [...]}} or {tensors.CONTENT_TYPE}: {exc}') from None
    except UnicodeDecodeError:
        raise RequestError(f'body must be JSON {{"inputs": [...]}} or {tensors.CONTENT_TYPE}') from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise RequestError('body must be a JSON object {"inputs": nested list}')
    if set(doc) != {"inputs"}:
        raise RequestError(f"unknown field(s) {sorted(set(doc) - {'inputs'})}; allowed: inputs")
    shape, leaves = nested_shape(doc["inputs"])
    if spec.kind == "tokens":
        if not all(isinstance(v, int) for v in leaves):
            raise RequestError("token ids must be integers")
        if not all(-(1 << 63) <= v < (1 << 63) for v in leaves):
            raise RequestError(f"token ids must be in 0..{spec.vocab_size - 1}")
        return torch.tensor(leaves, dtype=torch.int64).reshape(shape)
    return torch.tensor(leaves, dtype=torch.float32).reshape(shape)


def render_response(y: torch.Tensor, binary: bool) -> tuple[bytes, str]:
    """(body, content type) of a result, in the request's kind."""
    import torch

    y = y.detach().cpu()
    if binary:
        return tensor_to_body(y), tensors.CONTENT_TYPE
    if y.is_floating_point():
        y = y.to(torch.float32)
    from infscaled.worker.transport import DTYPE_NAMES

    doc = {"output": y.tolist(), "shape": list(y.shape), "dtype": DTYPE_NAMES[y.dtype]}
    # Strict JSON: a non-finite output value is written as null (docs/controller-api.md).
    return jsonsafe.dumps(doc).encode(), "application/json"


def tensor_to_body(t: torch.Tensor) -> bytes:
    """A tensor in the binary format (header + raw little-endian bytes)."""
    import torch

    from infscaled.worker.transport import DTYPE_NAMES

    assert sys.byteorder == "little", "the tensor body format is little-endian"
    t = t.detach().cpu().contiguous()
    header = tensors.TensorHeader(DTYPE_NAMES[t.dtype], tuple(t.shape))
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return tensors.encode(header, raw)


def tensor_from_body(header: tensors.TensorHeader, data: memoryview) -> torch.Tensor:
    """The tensor a decoded binary body holds (a copy: the body buffer is not kept)."""
    import torch

    from infscaled.worker.transport import TORCH_DTYPES

    assert sys.byteorder == "little", "the tensor body format is little-endian"
    dtype = TORCH_DTYPES[header.dtype]
    if header.nbytes == 0:
        return torch.empty(header.shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(header.shape)
