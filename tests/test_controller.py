"""The controller daemon over real sockets on 127.0.0.1: run() in-process, agents simulated by
websocket clients speaking infscaled.protocol.messages (the real agent is tested elsewhere)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager, suppress
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from infscaled.config import ConfigError, load_job
from infscaled.controller import (
    ControllerConfig,
    find_token,
    load_controller_config,
    load_or_create_token,
    parse_controller_config,
    run,
)
from infscaled.controller.app import Controller
from infscaled.controller.events import SUBSCRIBER_QUEUE, EventLog
from infscaled.errors import WireError
from infscaled.protocol import watch
from infscaled.protocol.control import DispatcherStats, EdgeRate, StageStats
from infscaled.protocol.messages import (
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    Deploy,
    Device,
    DeviceUsage,
    ErrorMsg,
    Heartbeat,
    HostMetrics,
    Inspect,
    InspectResult,
    Message,
    Metrics,
    Register,
    StopJob,
    Welcome,
    WorkerState,
    decode,
    encode,
)
from infscaled.protocol.plan import plan_from_dict

TOKEN = "test-token-0123456789"
T = TypeVar("T")

QUICKSTART = """
name = "quick"

[model]
source = "builtin:gpt2-tiny"

[pipeline]
stages = 2
replicas = [1, 2]
"""


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFSCALED_TOKEN", raising=False)


def make_cfg(tmp_path: Path, **overrides: Any) -> ControllerConfig:
    base: dict[str, Any] = dict(
        host="127.0.0.1", port=0, token=TOKEN, state_dir=str(tmp_path / "state"), heartbeat_interval_s=0.5,
        heartbeat_timeout_s=5.0, inspect_timeout_s=5.0, send_timeout_s=2.0, stop_grace_s=2.0,
        shutdown_grace_s=0.5, request_timeout_s=5.0,
    )
    return ControllerConfig(**{**base, **overrides})


@asynccontextmanager
async def controller(cfg: ControllerConfig) -> AsyncIterator[Controller]:
    """run(cfg) as a task; cancelled (ordered shutdown) on exit."""
    ready: asyncio.Future[Controller] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run(cfg, on_ready=ready.set_result))
    waiting: list[asyncio.Future[Any]] = [ready, task]
    done, _ = await asyncio.wait(waiting, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # start-up failed: raise its error
    assert ready in done, "controller did not start"
    try:
        yield ready.result()
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


class Api:
    """A REST client for one controller."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str | None = TOKEN) -> None:
        self.http, self.url = http, url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {**self.headers, **kw.pop("headers", {})}
        async with self.http.request(method, self.url + path, headers=headers, **kw) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    async def submit(self, toml: str, **headers: str) -> tuple[int, Any]:
        return await self.call("POST", "/v1/jobs", data=toml.encode(),
                               headers={"Content-Type": "application/toml", **headers})


class FakeAgent:
    """What an agent says on its websocket, scripted by the test."""

    def __init__(self, http: aiohttp.ClientSession, url: str, agent_id: str = "a1", devices: int = 3,
                 port_range: tuple[int, int] = (20000, 20099), advertise: str = "127.0.0.1") -> None:
        self.http, self.url, self.id = http, url, agent_id
        self.register = Register(agent_id, f"host-{agent_id}", advertise,
                                 [Device(f"cpu:{i}", "cpu") for i in range(devices)], 4, 8 << 30, list(port_range))
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._beats: asyncio.Task[None] | None = None

    def start_beating(self, every_s: float = 0.5) -> None:
        """Send heartbeats from a task of its own until `close`, as a live agent does (for a test
        whose scenario may leave the socket quiet longer than the controller's heartbeat timeout)."""
        async def beat() -> None:
            while self.ws is not None and not self.ws.closed:
                try:
                    await self.send(Heartbeat(self.id))
                except (ConnectionError, RuntimeError):  # the socket closed under us: the test is over
                    return
                await asyncio.sleep(every_s)

        self._beats = asyncio.create_task(beat(), name=f"heartbeats-{self.id}")

    async def connect(self) -> Welcome:
        self.ws = await self.http.ws_connect(self.url + "/v1/agents/ws", headers={"Authorization": f"Bearer {TOKEN}"})
        await self.send(self.register)
        welcome = await self.recv()
        assert isinstance(welcome, Welcome), welcome
        if welcome.credential:  # issued at the first registration: sent again on every later one
            self.register = replace(self.register, credential=welcome.credential)
        return welcome

    async def send(self, msg: Message) -> None:
        assert self.ws is not None
        await self.ws.send_str(encode(msg))

    async def recv(self, timeout: float = 5.0) -> Message:
        assert self.ws is not None
        frame = await self.ws.receive(timeout=timeout)
        assert frame.type == WSMsgType.TEXT, f"expected a message, got {frame.type} {frame.data!r}"
        return decode(frame.data)

    async def expect(self, cls: type[T], timeout: float = 5.0) -> T:
        msg = await self.recv(timeout)
        assert isinstance(msg, cls), f"expected {cls.__name__}, got {msg}"
        return msg

    async def sync(self) -> None:
        """Wait until the controller processed everything sent before (it answers a second Register)."""
        await self.send(self.register)
        reply = await self.expect(ErrorMsg)
        assert "already registered" in reply.message, reply

    async def report(self, job_id: str, nodes: list[str], state: str, reason: str = "") -> None:
        for i, node in enumerate(nodes):
            await self.send(WorkerState(job_id, node, state, pid=1000 + i, reason=reason))

    async def close(self) -> None:
        if self._beats is not None:
            self._beats.cancel()
        if self.ws is not None:
            await self.ws.close()


async def submit_inspected(api: Api, agent: FakeAgent, toml: str, units: int = 6) -> tuple[int, Any]:
    """POST a job while `agent` answers the controller's Inspect."""
    post = asyncio.create_task(api.submit(toml))
    inspect = await agent.expect(Inspect)
    assert inspect.source == "builtin:gpt2-tiny"
    await agent.send(InspectResult(inspect.request_id, True, units, [100] * units))
    return await post


async def wait_state(ctl: Controller, job_id: str, state: str, timeout: float = 5.0) -> None:
    ok = await ctl.jobs.wait_until(lambda: ctl.jobs.jobs[job_id].state == state, timeout)
    assert ok, f"{ctl.jobs.jobs[job_id].describe()}, expected {state}"


# --- token and auth --------------------------------------------------------------------------------


def test_token_file_created_private_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "deep" / "state"
    assert find_token(state) is None
    token = load_or_create_token(state)
    assert len(token) >= 40
    assert stat.S_IMODE(os.stat(state / "token").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert load_or_create_token(state) == token == find_token(state)
    monkeypatch.setenv("INFSCALED_TOKEN", "from-env")
    assert find_token(state) == "from-env"


def test_unauthorized_rest_and_websocket_are_rejected_and_logged(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http:
            for api in (Api(http, ctl.url, None), Api(http, ctl.url, "wrong-token")):
                for method, path in (("GET", "/v1/agents"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs"),
                                     ("DELETE", "/v1/jobs/x"), ("POST", "/v1/jobs/x/infer")):
                    status, body = await api.call(method, path)
                    assert status == 401 and "unauthorized" in body["error"]["message"], (method, path, body)
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(ctl.url + "/v1/agents/ws")
            assert info.value.status == 401
            assert (await Api(http, ctl.url).call("GET", "/v1/agents")) == (200, [])

    with caplog.at_level(logging.WARNING, logger="infscaled.controller"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "infscaled.controller.auth"]
    assert "rejected GET /v1/agents from 127.0.0.1: missing bearer token" in lines
    assert "rejected GET /v1/agents from 127.0.0.1: wrong token" in lines
    assert "rejected GET /v1/agents/ws from 127.0.0.1: missing bearer token" in lines
    assert not any(TOKEN in m or "wrong-token" in m for m in caplog.messages)


def test_env_token_overrides_config_and_file_token_is_the_fallback(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    async def statuses(cfg: ControllerConfig, tokens: list[str]) -> list[int]:
        async with controller(cfg) as ctl, aiohttp.ClientSession() as http:
            return [(await Api(http, ctl.url, t).call("GET", "/v1/health"))[0] for t in tokens]

    file_token = load_or_create_token(tmp_path / "state")
    assert asyncio.run(statuses(make_cfg(tmp_path, token=None), [file_token, TOKEN])) == [200, 401]
    monkeypatch.setenv("INFSCALED_TOKEN", "env-token")
    assert asyncio.run(statuses(make_cfg(tmp_path), ["env-token", TOKEN, file_token])) == [200, 401, 401]


def test_wildcard_bind_logs_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with controller(make_cfg(tmp_path, host="0.0.0.0")):
            pass

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert any(r.levelno == logging.WARNING and "every interface" in r.getMessage() for r in caplog.records)


# --- controller config -----------------------------------------------------------------------------


def test_shipped_config_is_the_defaults() -> None:
    path = Path(__file__).parent.parent / "configs" / "controller.toml"
    cfg = load_controller_config(path)
    assert cfg == ControllerConfig(state_dir=cfg.state_dir)
    assert "token" not in repr(parse_controller_config({"controller": {"token": "secret"}}))


def test_controller_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[controller]\nheartbeat_timeout = 5\n')
    with pytest.raises(ConfigError) as info:
        load_controller_config(path)
    assert str(info.value).startswith(f"{path}: controller.heartbeat_timeout = 5: unknown key (did you mean ")
    with pytest.raises(ConfigError, match=r"controller.heartbeat_timeout_s = 2.0: an agent would be lost"):
        parse_controller_config({"controller": {"heartbeat_interval_s": 3, "heartbeat_timeout_s": 2.0}})
    with pytest.raises(ConfigError, match=r"controller.port = 70000: out of range; allowed: an integer in 0..65535"):
        parse_controller_config({"controller": {"port": 70000}})


# --- the agents' websocket --------------------------------------------------------------------------


def test_register_welcome_and_bad_messages_keep_the_session(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http:
            agent = FakeAgent(http, ctl.url)
            welcome = await agent.connect()
            assert welcome == Welcome("a1", 0.5, 5.0, welcome.credential) and len(welcome.credential) >= 40
            assert agent.ws is not None
            for frame, expected in (
                ("not json", "message is not JSON"),
                (json.dumps({"v": 1, "type": "bogus", "body": {}}), "unknown message type 'bogus'"),
                (json.dumps({"v": 1, "type": "heartbeat", "body": {"agent_id": 5}}),
                 "heartbeat.agent_id: expected str, got int"),
                (encode(Heartbeat("someone-else")), "heartbeat names agent 'someone-else'"),
                (encode(WorkerState("nojob", "0.0", "ready")), "unknown job 'nojob'"),
                (encode(StopJob("x")), "stop_job is a controller -> agent message"),
            ):
                await agent.ws.send_str(frame)
                error = await agent.expect(ErrorMsg)
                assert expected in error.message, error
            await agent.send(Heartbeat("a1", workers=3))
            await agent.sync()
            status, agents = await Api(http, ctl.url).call("GET", "/v1/agents")
            assert status == 200
            got = [(a["id"], a["state"], a["workers"], len(a["devices"])) for a in agents]
            assert got == [("a1", "connected", 3, 3)]
            assert agents[0]["devices"][0] == {"id": "cpu:0", "kind": "cpu", "name": "", "memory_bytes": 0, "job": "",
                                               "util_ratio": -1.0, "memory_used_bytes": -1}

    asyncio.run(scenario())


def test_first_message_must_be_register(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http:
            agent = FakeAgent(http, ctl.url)
            agent.ws = await http.ws_connect(ctl.url + "/v1/agents/ws", headers={"Authorization": f"Bearer {TOKEN}"})
            await agent.send(Heartbeat("a1"))
            error = await agent.expect(ErrorMsg)
            assert "first message must be register, got heartbeat" in error.message
            assert (await agent.ws.receive(timeout=5)).type == WSMsgType.CLOSE
            bad = FakeAgent(http, ctl.url, port_range=(10, 5))
            bad.ws = await http.ws_connect(ctl.url + "/v1/agents/ws", headers={"Authorization": f"Bearer {TOKEN}"})
            await bad.send(bad.register)
            assert "port_range [10, 5]" in (await bad.expect(ErrorMsg)).message
            assert (await Api(http, ctl.url).call("GET", "/v1/agents")) == (200, [])

    asyncio.run(scenario())


def test_oversized_frame_closes_only_that_connection(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http:
            agent = FakeAgent(http, ctl.url)
            await agent.connect()
            assert agent.ws is not None
            await agent.ws.send_str("x" * (MAX_MESSAGE_BYTES + 10))
            frame = await agent.ws.receive(timeout=5)
            assert frame.type == WSMsgType.CLOSE and frame.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            status, agents = await Api(http, ctl.url).call("GET", "/v1/agents")
            assert status == 200 and agents[0]["state"] == "lost" and "websocket error" in agents[0]["reason"]
            back = FakeAgent(http, ctl.url)  # the same id comes back, with its credential
            back.register = agent.register
            await back.connect()
            assert (await Api(http, ctl.url).call("GET", "/v1/agents"))[1][0]["state"] == "connected"

    asyncio.run(scenario())


class LoopThread:
    """An event loop in a thread, so hypothesis (synchronous) can drive one long-lived controller."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


_FIELDS = sorted({f.name for cls in MESSAGE_TYPES.values() for f in fields(cls)})
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_ENVELOPE = st.fixed_dictionaries({
    "v": st.sampled_from([1, 1, 1, 2, "1"]),
    "type": st.sampled_from([*MESSAGE_TYPES, "bogus"]),
    "body": st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6), _JSON, max_size=6),
})
_FRAMES = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),
    _JSON.map(json.dumps),
    _ENVELOPE.map(json.dumps),
    _ENVELOPE.map(lambda d: json.dumps(d).encode()),
)


def test_fuzzed_frames_are_answered_and_the_controller_keeps_serving(tmp_path: Path) -> None:
    lt = LoopThread()
    holder: dict[str, Any] = {}

    async def start() -> None:
        ready: asyncio.Future[Controller] = asyncio.get_running_loop().create_future()
        holder["task"] = asyncio.create_task(run(make_cfg(tmp_path), on_ready=ready.set_result))
        holder["ctl"] = ctl = await asyncio.wait_for(ready, 10)
        holder["http"] = http = aiohttp.ClientSession()
        holder["agent"] = agent = FakeAgent(http, ctl.url, agent_id="fz")
        await agent.connect()

    async def send(frame: str | bytes) -> list[ErrorMsg]:
        """Send one frame, then a sentinel; return the errors the frame itself got."""
        agent: FakeAgent = holder["agent"]
        assert agent.ws is not None
        await (agent.ws.send_bytes(frame) if isinstance(frame, bytes) else agent.ws.send_str(frame))
        await agent.send(agent.register)
        errors: list[ErrorMsg] = []
        while True:
            msg = await agent.expect(ErrorMsg)
            if "already registered" in msg.message:
                return errors
            errors.append(msg)

    async def stop() -> None:
        holder["task"].cancel()
        with suppress(asyncio.CancelledError):
            await holder["task"]
        await holder["http"].close()

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_FRAMES)
    def fuzz(frame: str | bytes) -> None:
        try:
            valid: Message | None = decode(frame)
        except WireError:
            valid = None
        assume(not isinstance(valid, Register))
        errors = lt.call(send(frame))
        # A malformed frame gets exactly one ErrorMsg; a well-formed one at most one (e.g. unknown job).
        assert len(errors) == 1 if valid is None else len(errors) <= 1

    try:
        lt.call(start())
        fuzz()
        status, agents = lt.call(Api(holder["http"], holder["ctl"].url).call("GET", "/v1/agents"))
        assert status == 200 and [(a["id"], a["state"]) for a in agents] == [("fz", "connected")]
    finally:
        if "task" in holder:
            lt.call(stop())
        lt.close()


# --- job submission ---------------------------------------------------------------------------------


def test_job_file_errors_match_infscaled_run(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http:
            api = Api(http, ctl.url)
            for text in (QUICKSTART.replace("replicas", "replica"), QUICKSTART + "[workload\n",
                         QUICKSTART + '[placement]\npolicy = "fastest"\n'):
                path = tmp_path / "bad.toml"
                path.write_text(text)
                with pytest.raises(ConfigError) as info:
                    load_job(path)
                named = await api.submit(text, **{"X-Infscaled-Job-File": str(path)})
                assert named == (400, {"error": str(info.value)})
                status, body = await api.submit(text)
                assert status == 400 and body["error"].startswith("<submitted>: ")
            status, body = await api.submit(QUICKSTART + '[placement]\npolicy = "fastest"\n')
            assert "placement.policy = 'fastest': unknown placement policy" in body["error"]
            assert "allowed: pack, spread, static" in body["error"]
            status, body = await api.call("POST", "/v1/jobs", json={"toml": QUICKSTART, "bogus": 1})
            assert status == 400 and '"toml"' in body["error"]
            status, body = await api.call("POST", "/v1/jobs", data=b"x", headers={"Content-Type": "image/png"})
            assert status == 415

    asyncio.run(scenario())


def test_submit_without_agents_is_503_and_oversubscribed_is_409(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http:
            api = Api(http, ctl.url)
            status, body = await api.submit(QUICKSTART)
            assert status == 503 and "no agent is connected" in body["error"]
            agent = FakeAgent(http, ctl.url, devices=2)
            await agent.connect()
            status, body = await submit_inspected(
                api, agent, QUICKSTART + '[placement]\ndevices = ["cpu", "cpu", "cpu"]\n')
            assert status == 409
            assert body["error"] == ("job quick does not fit this cluster (all devices, busy or not): "
                                     "needs 3 device(s) (3 cpu); offered: a1: cpu:0, cpu:1; a CPU agent offers the slots "
                                     "its --devices says (default: one per core): start it with --devices cpu:3 "
                                     "or more")
            assert (await api.call("GET", "/v1/jobs")) == (200, [])

    asyncio.run(scenario())


def test_model_errors_from_the_agent_and_unit_checks(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http:
            api = Api(http, ctl.url)
            agent = FakeAgent(http, ctl.url)
            await agent.connect()
            post = asyncio.create_task(api.submit(QUICKSTART, **{"X-Infscaled-Job-File": "quick.toml"}))
            inspect = await agent.expect(Inspect)
            await agent.send(InspectResult(inspect.request_id, False, error="unknown builtin model 'gpt2-tiny'"))
            assert await post == (400, {"error": "quick.toml: model.source = 'builtin:gpt2-tiny': "
                                                 "unknown builtin model 'gpt2-tiny'"})
            status, body = await submit_inspected(api, agent, QUICKSTART, units=1)
            assert status == 400 and "pipeline.stages = 2: more stages than the model has units (1)" in body["error"]

    asyncio.run(scenario())


def test_deploy_run_stop_across_two_agents(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http:
            api = Api(http, ctl.url)
            a1 = FakeAgent(http, ctl.url, "a1", port_range=(20000, 20009), advertise="10.0.0.1")
            a2 = FakeAgent(http, ctl.url, "a2", port_range=(21000, 21009), advertise="10.0.0.2")
            await a1.connect()
            await a2.connect()
            status, job = await submit_inspected(api, a1, QUICKSTART + '[placement]\npolicy = "spread"\n')
            assert status == 201 and job["state"] == "deploying" and job["id"].startswith("quick-")
            job_id = job["id"]
            d1, d2 = await a1.expect(Deploy), await a2.expect(Deploy)
            assert (d1.job_id, d1.nodes, d2.nodes) == (job_id, ["0.0", "1.1", "dispatcher"], ["1.0"])
            assert d1.dispatcher_port == 20000 and d2.dispatcher_port == 0
            assert d1.service_token and d1.service_token == d2.service_token and d1.plan == d2.plan
            plan = plan_from_dict(d1.plan)
            assert plan.job == job_id and plan.dispatcher_host == "10.0.0.1"
            assert [(s.first_unit, s.last_unit, s.replicas) for s in plan.stages] == [(0, 2, 1), (3, 5, 2)]
            where = {"0.0": a1, "1.1": a1, "dispatcher": a1, "1.0": a2}
            for w in plan.workers:
                assert (w.host, w.device) == (where[str(w.node)].register.advertise, "cpu")
            ports = [e.port for e in plan.edges]
            assert len(set(ports + [d1.dispatcher_port])) == len(ports) + 1
            for e in plan.edges:  # an edge's listener lives with its sender
                sender = where[str(e.src)].register
                assert e.host == sender.advertise and sender.port_range[0] <= e.port <= sender.port_range[1]

            await a1.report(job_id, d1.nodes, "ready")
            await a1.sync()
            assert ctl.jobs.jobs[job_id].state == "deploying"
            await a2.report(job_id, d2.nodes, "ready")
            await wait_state(ctl, job_id, "running")
            status, detail = await api.call("GET", f"/v1/jobs/{job_id}")
            assert status == 200 and detail["state"] == "running"
            assert detail["stages"] == [{"index": 0, "first_unit": 0, "last_unit": 2, "replicas": 1},
                                        {"index": 1, "first_unit": 3, "last_unit": 5, "replicas": 2}]
            assert {n["node"]: (n["agent"], n["device"], n["state"]) for n in detail["nodes"]} == {
                "0.0": ("a1", "cpu:0", "ready"), "1.0": ("a2", "cpu:0", "ready"),
                "1.1": ("a1", "cpu:1", "ready"), "dispatcher": ("a1", "", "ready")}
            assert "service_token" not in json.dumps(detail) and d1.service_token not in json.dumps(detail)
            # The data-plane secret reaches every agent of the job, and no API answer.
            assert len(plan.secret) == 64 and plan_from_dict(d2.plan).secret == plan.secret
            views = [json.dumps((await api.call("GET", path))[1])
                     for path in (f"/v1/jobs/{job_id}", "/v1/jobs", f"/v1/jobs/{job_id}/metrics", "/v1/agents")]
            assert not any(plan.secret in v for v in views)
            assert (await api.call("GET", "/v1/jobs"))[1][0]["state"] == "running"
            agents = (await api.call("GET", "/v1/agents"))[1]
            assert [d["job"] for d in agents[0]["devices"]] == [job_id, job_id, ""]

            status, body = await api.call("DELETE", f"/v1/jobs/{job_id}")
            assert status == 202 and body["state"] == "stopping"
            assert (await a1.expect(StopJob)).job_id == job_id
            assert (await a2.expect(StopJob)).job_id == job_id
            await a1.report(job_id, d1.nodes, "exited")
            await a2.report(job_id, d2.nodes, "exited")
            await wait_state(ctl, job_id, "stopped")
            assert (await api.call("GET", "/v1/jobs/nope"))[0] == 404

    asyncio.run(scenario())


def test_busy_devices_make_a_job_pending_until_they_free_up(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http:
            api = Api(http, ctl.url)
            agent = FakeAgent(http, ctl.url, devices=3)
            await agent.connect()
            _, first = await submit_inspected(api, agent, QUICKSTART)
            d1 = await agent.expect(Deploy)
            status, second = await submit_inspected(api, agent, QUICKSTART)
            assert status == 201 and second["state"] == "pending"
            assert second["reason"].startswith("waiting for free devices: needs 3 device(s) (3 any device); "
                                               "offered: a1: none")
            status, body = await api.call("POST", f"/v1/jobs/{second['id']}/infer", json={"inputs": [[1]]})
            assert status == 409 and body["error"].startswith(f"job {second['id']} is pending: waiting for")
            await agent.report(first["id"], ["0.0"], "failed", reason="out of memory")
            await wait_state(ctl, first["id"], "failed")
            assert ctl.jobs.jobs[first["id"]].reason == "worker 0.0 on agent a1 failed: out of memory"
            assert (await agent.expect(StopJob)).job_id == first["id"]
            await agent.sync()  # the failed job's other workers still run: their devices stay taken
            assert ctl.jobs.jobs[second["id"]].state == "pending"
            await agent.report(first["id"], d1.nodes[1:], "exited")
            d2 = await agent.expect(Deploy)
            assert d2.job_id == second["id"] and d2.nodes == d1.nodes
            await wait_state(ctl, second["id"], "deploying")

    asyncio.run(scenario())


def test_lost_agent_fails_its_job_and_comes_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        cfg = make_cfg(tmp_path, heartbeat_interval_s=0.1, heartbeat_timeout_s=0.6)
        async with controller(cfg) as ctl, aiohttp.ClientSession() as http:
            api = Api(http, ctl.url)
            a1, a2 = FakeAgent(http, ctl.url, "a1", devices=1), FakeAgent(http, ctl.url, "a2", devices=2)
            await a1.connect()
            await a2.connect()

            async def beat() -> None:
                while True:
                    await a1.send(Heartbeat("a1"))
                    await asyncio.sleep(0.1)

            beating = asyncio.create_task(beat())  # a1 stays alive; a2 falls silent once its job runs
            try:
                _, job = await submit_inspected(api, a1, QUICKSTART)
                deploys = {a.id: await a.expect(Deploy) for a in (a1, a2)}
                for a in (a1, a2):
                    await a.report(job["id"], deploys[a.id].nodes, "ready")
                await wait_state(ctl, job["id"], "running")
                await wait_state(ctl, job["id"], "failed", timeout=5)
                assert ctl.jobs.jobs[job["id"]].reason == "agent a2 lost (no heartbeat for 0.6 s)"
                assert (await a1.expect(StopJob)).reason == "agent a2 lost (no heartbeat for 0.6 s)"
                assert a2.ws is not None and (await a2.ws.receive(timeout=5)).type == WSMsgType.CLOSE
                agents = {a["id"]: a for a in (await api.call("GET", "/v1/agents"))[1]}
                assert (agents["a1"]["state"], agents["a2"]["state"]) == ("connected", "lost")
                detail = (await api.call("GET", f"/v1/jobs/{job['id']}"))[1]
                on_a2 = {n["node"]: n["state"] for n in detail["nodes"] if n["agent"] == "a2"}
                assert on_a2 == {"0.0": "lost", "1.0": "lost", "dispatcher": "lost"}
                back = FakeAgent(http, ctl.url, "a2", devices=2)
                back.register = replace(back.register, credential=a2.register.credential)
                await back.connect()
                # Whatever it still runs of the failed job must go.
                assert (await back.expect(StopJob)).job_id == job["id"]
                agents = {a["id"]: a for a in (await api.call("GET", "/v1/agents"))[1]}
                assert agents["a2"]["state"] == "connected" and agents["a2"]["reason"] == ""
            finally:
                beating.cancel()

    asyncio.run(scenario())


def test_closed_websocket_loses_the_agent_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http:
            api = Api(http, ctl.url)
            agent = FakeAgent(http, ctl.url)
            await agent.connect()
            _, job = await submit_inspected(api, agent, QUICKSTART)
            await agent.expect(Deploy)
            await agent.close()
            await wait_state(ctl, job["id"], "failed")
            assert ctl.jobs.jobs[job["id"]].reason == "agent a1 lost (connection closed)"

    asyncio.run(scenario())


# --- inference proxy and shutdown ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_infer_is_proxied_to_the_dispatcher_unchanged(tmp_path: Path) -> None:
    async def scenario() -> None:
        seen: list[tuple[str, str, bytes]] = []

        async def dispatcher(request: web.Request) -> web.Response:
            body = await request.read()
            seen.append((request.headers["Authorization"], request.content_type, body))
            return web.Response(body=body[::-1], content_type="application/x-infscaled-tensor", status=200)

        async with controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http:
            api = Api(http, ctl.url)
            assert (await api.call("POST", "/v1/jobs/nope/infer", json={"inputs": []}))[0] == 404
            port = _free_port()
            agent = FakeAgent(http, ctl.url, devices=3, port_range=(port, port + 20))
            await agent.connect()
            _, job = await submit_inspected(api, agent, QUICKSTART)
            deploy = await agent.expect(Deploy)
            assert deploy.dispatcher_port == port
            app = web.Application()
            app.router.add_post("/infer", dispatcher)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            try:
                status, body = await api.call("POST", f"/v1/jobs/{job['id']}/infer", json={"inputs": [[1, 2]]})
                assert status == 409 and body["error"] == f"job {job['id']} is deploying"
                await agent.report(job["id"], deploy.nodes, "ready")
                await wait_state(ctl, job["id"], "running")
                payload = bytes(range(256)) * 100
                async with http.post(f"{ctl.url}/v1/jobs/{job['id']}/infer", data=payload, headers={
                        **api.headers, "Content-Type": "application/x-infscaled-tensor"}) as resp:
                    assert resp.status == 200
                    assert resp.content_type == "application/x-infscaled-tensor"
                    assert await resp.read() == payload[::-1]
                assert seen == [(f"Bearer {deploy.service_token}", "application/x-infscaled-tensor", payload)]
            finally:
                await runner.cleanup()
            status, body = await api.call("POST", f"/v1/jobs/{job['id']}/infer", json={"inputs": [[1]]})
            assert status == 502 and f"127.0.0.1:{port}/infer unreachable" in body["error"]

    asyncio.run(scenario())


def test_shutdown_stops_jobs_then_closes_agents(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            async with controller(make_cfg(tmp_path)) as ctl:
                api = Api(http, ctl.url)
                agent = FakeAgent(http, ctl.url)
                await agent.connect()
                _, job = await submit_inspected(api, agent, QUICKSTART)
                deploy = await agent.expect(Deploy)
                await agent.report(job["id"], deploy.nodes, "ready")
                await wait_state(ctl, job["id"], "running")

                async def agent_side() -> list[str]:
                    stop = await agent.expect(StopJob)
                    await agent.report(job["id"], deploy.nodes, "exited")
                    assert agent.ws is not None
                    frame = await agent.ws.receive(timeout=5)
                    return [stop.reason, str(frame.type)]

                answering = asyncio.create_task(agent_side())
            assert await answering == ["controller shutting down", str(WSMsgType.CLOSE)]
            assert ctl.jobs.jobs[job["id"]].state == "stopped"
            with pytest.raises(aiohttp.ClientConnectionError):
                await http.get(ctl.url + "/v1/health")

    asyncio.run(scenario())


def test_controller_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, infscaled.controller, infscaled.controller.app, infscaled.planning.assign; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
            "or m.startswith(('infscaled.models', 'infscaled.worker', 'infscaled.runner'))]; "
            "print(heavy); sys.exit(bool(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr



# --- /v1/watch: snapshots and events ---------------------------------------------------------------


class Watcher:
    """A /v1/watch client that sorts what arrives into events and the latest snapshot."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[watch.Event] = []
        self.snapshot: watch.Snapshot | None = None
        self.state = watch.WatchState()

    async def until(self, predicate: Any, timeout: float = 5.0) -> None:
        """Read frames until predicate(self) holds."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                frame = await self.ws.receive()
                assert frame.type == WSMsgType.TEXT, f"watch closed: {frame.type} {frame.data!r}"
                msg = watch.decode(frame.data)
                if isinstance(msg, watch.Event):
                    self.events.append(msg)
                else:
                    self.snapshot = self.state.apply(msg)
                    assert self.snapshot is not None, f"a delta that does not follow: {msg}"

    def kinds(self) -> list[tuple[str, str, str]]:
        return [(e.kind, e.node or e.agent or e.job, e.state) for e in self.events]

    def job(self) -> watch.JobView:
        assert self.snapshot is not None and self.snapshot.jobs
        return self.snapshot.jobs[-1]


def _stats(node: str, occupancy: float, inputs: list[tuple[str, float]]) -> StageStats:
    return StageStats(node, micro_batches=10, samples=40, occupancy=occupancy, queue_depth=2, samples_per_s=8.0,
                      inputs=[EdgeRate(src, rate) for src, rate in inputs])


def test_watch_streams_events_and_live_snapshots(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http:
            api = Api(http, ctl.url)
            ws = await http.ws_connect(ctl.url + "/v1/watch?interval_s=0.1", headers=api.headers)
            w = Watcher(ws)
            await w.until(lambda w: w.snapshot is not None)
            assert w.snapshot is not None and w.snapshot.agents == [] and w.snapshot.interval_s == 0.1

            agent = FakeAgent(http, ctl.url)
            await agent.connect()
            await w.until(lambda w: ("agent_joined", "a1", "connected") in w.kinds())
            await agent.send(HostMetrics("a1", 0.25, 3 << 30, [DeviceUsage("cpu:0")]))
            await w.until(lambda w: w.snapshot.agents and w.snapshot.agents[0].cpu_ratio == 0.25)
            a = w.snapshot.agents[0]  # type: ignore[union-attr]
            assert (a.host, a.state, a.ram_used_bytes, a.ram_bytes, [d.id for d in a.devices]) == (
                "host-a1", "connected", 3 << 30, 8 << 30, ["cpu:0", "cpu:1", "cpu:2"])
            await agent.send(HostMetrics("a2", 0.5, 0))  # another agent's usage on this connection
            assert "names agent 'a2'" in (await agent.expect(ErrorMsg)).message

            _, job = await submit_inspected(api, agent, QUICKSTART)  # stages 2, replicas [1, 2]
            job_id = job["id"]
            deploy = await agent.expect(Deploy)
            await agent.report(job_id, deploy.nodes, "starting")
            await agent.report(job_id, deploy.nodes, "ready")
            await w.until(lambda w: ("job_state", job_id, "running") in w.kinds())
            for node in ("0.0", "1.0", "1.1", "dispatcher"):
                assert ("worker_state", node, "starting") in w.kinds() and ("worker_state", node, "ready") in w.kinds()
            ready = next(e for e in w.events if e.kind == "worker_state" and e.node == "1.1" and e.state == "ready")
            assert ready.message == f"job {job_id}: 1.1 on a1 ready (pid 1002)" and ready.agent == "a1"
            seqs = [e.seq for e in w.events]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

            # Stage 1's two replicas are busier than stage 0: it is the bottleneck.
            stages = [_stats("0.0", 0.4, [("dispatcher", 16.0)]), _stats("1.0", 0.9, [("0.0", 7.0)]),
                      _stats("1.1", 0.7, [("0.0", 9.0)])]
            dispatcher = DispatcherStats(requests=5, samples=40, requests_per_s=3.5, latency_p99_s=0.25)
            await agent.send(Metrics(job_id, stages, dispatcher))
            await w.until(lambda w: w.snapshot.jobs and w.job().dispatcher is not None)
            view = w.job()
            assert (view.id, view.state, view.model, view.bottleneck) == (job_id, "running", "builtin:gpt2-tiny", 1)
            assert [(s.index, s.first_unit, s.last_unit, s.replicas) for s in view.stages] == [(0, 0, 2, 1),
                                                                                               (1, 3, 5, 2)]
            assert [(r.node, r.agent, r.device, r.state, r.stats and r.stats.occupancy) for r in view.replicas] == [
                ("0.0", "a1", "cpu:0", "ready", 0.4), ("1.0", "a1", "cpu:1", "ready", 0.9),
                ("1.1", "a1", "cpu:2", "ready", 0.7)]
            rates = {(e.src, e.dst): e.samples_per_s for e in view.edges}
            assert rates == {("dispatcher", "0.0"): 16.0, ("0.0", "1.0"): 7.0, ("0.0", "1.1"): 9.0,
                             ("1.0", "dispatcher"): 8.0, ("1.1", "dispatcher"): 8.0}
            assert view.dispatcher == dispatcher
            assert [d.job for d in w.snapshot.agents[0].devices] == [job_id] * 3  # type: ignore[union-attr]

            # A late watcher gets the history first, in order.
            late = Watcher(await http.ws_connect(ctl.url + "/v1/watch", headers=api.headers))
            await late.until(lambda w: w.snapshot is not None)
            assert [e.seq for e in late.events] == [e.seq for e in w.events][:len(late.events)]
            assert late.kinds()[0] == ("agent_joined", "a1", "connected")

            await api.call("DELETE", f"/v1/jobs/{job_id}")
            await agent.report(job_id, deploy.nodes, "exited")
            await w.until(lambda w: ("job_state", job_id, "stopped") in w.kinds())
            await w.until(lambda w: w.job().state == "stopped")
            assert all(r.stats is None for r in w.job().replicas) and w.job().dispatcher is None
            await agent.close()
            await w.until(lambda w: ("agent_lost", "a1", "lost") in w.kinds())
            lost = w.events[-1]
            assert lost.message == "agent a1 lost (connection closed)"
            await late.ws.close()
        # Shutdown closed the remaining watcher.
        frame = await ws.receive(timeout=5)
        assert frame.type in (WSMsgType.CLOSE, WSMsgType.CLOSED), frame

    asyncio.run(scenario())


def test_watch_needs_the_token_and_a_sane_interval(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http:
            api = Api(http, ctl.url)
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(ctl.url + "/v1/watch")
            assert refused.value.status == 401
            for bad in ("0", "abc", "nan", "61"):
                status, body = await api.call("GET", f"/v1/watch?interval_s={bad}")
                assert status == 400, (bad, status, body)
                assert body["error"] == f"interval_s={bad!r}: expected a number of seconds from 0.1 to 60"
            assert len(ctl.watchers) == 0

    asyncio.run(scenario())


def test_a_slow_watcher_loses_its_oldest_events_not_the_controller() -> None:
    async def scenario() -> None:
        log = EventLog(keep=3)
        with log.subscribe() as queue:
            for i in range(SUBSCRIBER_QUEUE + 5):
                log.emit("job_state", f"event {i}")
            assert queue.qsize() == SUBSCRIBER_QUEUE
            assert queue.get_nowait().message == "event 5"
            assert [e.message for e in log.recent] == [f"event {i}" for i in range(SUBSCRIBER_QUEUE + 2,
                                                                                     SUBSCRIBER_QUEUE + 5)]
        assert log.subscribers == 0

    asyncio.run(scenario())


def test_bottleneck_is_the_busiest_stage_on_average() -> None:
    def replica(stage: int, occupancy: float | None) -> watch.ReplicaView:
        stats = None if occupancy is None else StageStats(f"{stage}.0", occupancy=occupancy)
        return watch.ReplicaView(f"{stage}.0", stage, 0, "a", "cpu:0", "ready", stats=stats)

    assert watch.bottleneck_stage([]) == -1
    assert watch.bottleneck_stage([replica(0, None)]) == -1
    # Stage 1 has one busy and one idle replica (mean 0.5): stage 0 at 0.6 is the bottleneck.
    assert watch.bottleneck_stage([replica(0, 0.6), replica(1, 1.0), replica(1, 0.0)]) == 0
    assert watch.bottleneck_stage([replica(0, 0.5), replica(1, 0.5)]) == 1  # ties: the later stage
