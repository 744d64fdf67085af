"""Hostile input against the controller (in-process, real sockets on 127.0.0.1) and the agent's
job manager: every bad request gets a clear 4xx or a closed connection, the daemon keeps
serving, connections and file descriptors return to where they were, the log stays short."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_controller import QUICKSTART, TOKEN, Api, FakeAgent, LoopThread, controller, make_cfg

from infscaled.agent.config import AgentConfig
from infscaled.agent.jobs import JobManager, source_refused
from infscaled.controller.app import Controller
from infscaled.controller.guard import GUARD
from infscaled.protocol import jsonsafe
from infscaled.protocol.messages import Deploy, ErrorMsg, Inspect, InspectResult, Message

DEEP = 100_000


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFSCALED_TOKEN", raising=False)


def guard_stats(ctl: Controller) -> dict[str, int]:
    return ctl.runner.app[GUARD].stats()


async def healthy(api: Api) -> None:
    assert (await api.call("GET", "/v1/health"))[0] == 200


def test_jsonsafe_limits_strictness_and_answers() -> None:
    assert jsonsafe.max_depth(b'{"a": [[1], {"b": "[[[[[[["}]}') == 3
    with pytest.raises(jsonsafe.JsonLimitError, match="nests more than 64 levels deep"):
        jsonsafe.loads(b"[" * DEEP + b"]" * DEEP, max_bytes=1 << 20, max_depth_allowed=64)
    with pytest.raises(jsonsafe.JsonLimitError, match="NaN is not JSON"):
        jsonsafe.loads(b'{"x": NaN}', max_bytes=100, max_depth_allowed=4)
    with pytest.raises(jsonsafe.JsonLimitError) as info:
        jsonsafe.loads(b"[1]" * 100, max_bytes=10, max_depth_allowed=4)
    assert info.value.status == 413
    assert jsonsafe.dumps({"a": [1.5, math.nan, -math.inf], "b": math.inf}) == '{"a": [1.5, null, null], "b": null}'
    assert json.loads(jsonsafe.dumps({"x": 1.0})) == {"x": 1.0}


def test_hostile_bodies_get_clear_4xx_before_anything_is_allocated(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http:
            api = Api(http, ctl.url)
            agent = FakeAgent(http, ctl.url)
            await agent.connect()
            deep_json = b"[" * DEEP + b"]" * DEEP
            status, body = await api.call("POST", "/v1/jobs", data=deep_json,
                                          headers={"Content-Type": "application/json"})
            assert status == 400 and "nests more than 64 levels deep" in body["error"]
            status, body = await api.call("POST", "/v1/completions", data=deep_json,
                                          headers={"Content-Type": "application/json"})
            assert status == 400 and "nests more than 64 levels deep" in body["error"]["message"]  # OpenAI shape
            status, body = await api.call("POST", "/v1/chat/completions", data=b'{"model": NaN}',
                                          headers={"Content-Type": "application/json"})
            assert status == 400 and "NaN is not JSON" in body["error"]["message"]
            deep_toml = "x = " + "[" * DEEP + "]" * DEEP + "\n"
            status, body = await api.submit(deep_toml)
            assert status == 400 and "nested too deeply to parse" in body["error"], body
            started = time.monotonic()
            status, body = await api.submit(QUICKSTART.replace("replicas = [1, 2]", "replicas = [1, 12000000]"))
            assert status == 400 and "pipeline.replicas[1] = 12000000: out of range" in body["error"]
            assert time.monotonic() - started < 5
            status, body = await api.submit("# " + "x" * (1 << 20))
            assert status == 413 and "the limit is 1048576" in body["error"]
            status, body = await api.call("POST", "/v1/jobs", data=b"{}" + b" " * (9 << 20),
                                          headers={"Content-Type": "application/json"})
            assert status == 413 and "exceeds max_json_bytes = 8388608" in body["error"]
            # None of that reached the agent: no inspection was asked for.
            with pytest.raises(TimeoutError):
                await agent.recv(timeout=0.3)
            # A model directory outside the (empty) model roots: one message, whether it exists or not.
            answers = []
            for source in ("/etc", "/root/.ssh", "/no/such/dir"):
                status, body = await api.submit(QUICKSTART.replace('"builtin:gpt2-tiny"', f'"{source}"'))
                assert status == 400, body
                answers.append(body["error"].replace(source, "SOURCE"))
            assert len(set(answers)) == 1 and "its model_roots is empty" in answers[0], answers
            await healthy(api)
            assert guard_stats(ctl)["open"] <= 3  # this session's keep-alive and the agent's websocket

    asyncio.run(scenario())


def test_slow_headers_slow_bodies_and_connection_floods_are_cut(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, header_timeout_s=0.5, body_timeout_s=0.5, max_connections_per_client=8)

    async def scenario() -> None:
        async with controller(cfg) as ctl, aiohttp.ClientSession() as http:
            api = Api(http, ctl.url)
            fds = psutil.Process().num_fds()
            host, port = "127.0.0.1", ctl.port
            # Slowloris: half a request, then silence -> closed by the guard, no answer.
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            assert 0.4 < time.monotonic() - started < 5
            writer.close()
            # A slow body with a valid token: 408 once body_timeout_s passed.
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                         + b"\r\nContent-Type: application/toml\r\nContent-Length: 1000\r\n\r\nname = ")
            answer = await asyncio.wait_for(reader.read(), 10)
            assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in answer
            writer.close()
            # A flood from one address: past the cap, connections close as they are accepted.
            flood = [await asyncio.open_connection(host, port) for _ in range(40)]

            async def answered(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool:
                r, w = conn
                try:
                    w.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                            + b"\r\n\r\n")
                    return (await asyncio.wait_for(r.read(12), 5)).startswith(b"HTTP/1.1 200")
                except (OSError, TimeoutError):
                    return False

            served = sum(await asyncio.gather(*(answered(c) for c in flood)))
            assert served <= 8, served
            # Another client address is still served meanwhile.
            other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
            async with aiohttp.ClientSession(connector=other) as http2:
                assert (await Api(http2, ctl.url).call("GET", "/v1/health"))[0] == 200
            for _, w in flood:
                w.close()
            # Everything returns: connections counted, file descriptors back.
            ok = await ctl.jobs.wait_until(lambda: guard_stats(ctl)["open"] <= 1, 5)
            assert ok or guard_stats(ctl)["open"] <= 1, guard_stats(ctl)
            assert guard_stats(ctl)["refused"] >= 30 and guard_stats(ctl)["timed_out"] >= 1
            await asyncio.sleep(1.0)  # the flood's idle connections time out too
            assert psutil.Process().num_fds() <= fds + 4
            await healthy(api)

    asyncio.run(scenario())


def test_a_full_listener_evicts_idle_connections_for_a_new_client(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, max_connections=16, max_connections_per_client=64)

    async def scenario() -> None:
        async with controller(cfg) as ctl:
            idle = [await asyncio.open_connection("127.0.0.1", ctl.port, local_addr=("127.0.0.2", 0))
                    for _ in range(16)]
            await asyncio.sleep(0.1)
            assert guard_stats(ctl)["open"] == 16
            async with aiohttp.ClientSession() as http:  # a healthy client finds the listener full
                assert (await Api(http, ctl.url).call("GET", "/v1/health"))[0] == 200
            assert guard_stats(ctl)["evicted"] >= 1 and guard_stats(ctl)["open"] <= 16
            closed = [await asyncio.wait_for(r.read(), 5) == b"" for r, _ in idle[:1]]
            assert closed == [True], "the oldest idle connection was the one closed"
            for _, w in idle:
                w.close()

    asyncio.run(scenario())


def test_repeated_rejections_are_rate_limited_in_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http:
            bad = Api(http, ctl.url, "wrong-token")
            for _ in range(300):
                assert (await bad.call("GET", "/v1/jobs"))[0] == 401

    with caplog.at_level(logging.WARNING, logger="infscaled.controller"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if "wrong token" in r.getMessage()]
    assert 1 <= len(lines) <= 2, lines


def test_submissions_beyond_the_inspection_queue_get_429(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, max_inspections=1, max_waiting_submissions=2)

    async def scenario() -> None:
        async with controller(cfg) as ctl, aiohttp.ClientSession() as http:
            api = Api(http, ctl.url)
            agent = FakeAgent(http, ctl.url)
            await agent.connect()
            posts = [asyncio.create_task(api.submit(QUICKSTART)) for _ in range(6)]
            first = await agent.expect(Inspect)  # only one inspection at a time reaches the agent
            with pytest.raises(TimeoutError):
                await agent.recv(timeout=0.3)
            done, _ = await asyncio.wait(posts, timeout=5, return_when=asyncio.FIRST_COMPLETED)
            refused = [t.result() for t in done]
            assert refused and all(s == 429 and "retry later" in b["error"] for s, b in refused)
            await agent.send(InspectResult(first.request_id, False, error="no"))
            for _ in range(2):  # the two that waited get their turn, one after the other
                nxt = await agent.expect(Inspect)
                await agent.send(InspectResult(nxt.request_id, False, error="no"))
            statuses = sorted(s for s, _ in await asyncio.gather(*posts))
            assert statuses == [400, 400, 400, 429, 429, 429]

    asyncio.run(scenario())


_JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                        max_leaves=20)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Any:
    loop = LoopThread()
    cm = controller(make_cfg(tmp_path_factory.mktemp("hostile")))
    ctl = loop.call(cm.__aenter__())
    yield loop, ctl
    loop.call(cm.__aexit__(None, None, None))
    loop.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/jobs", "/v1/completions", "/v1/chat/completions", "/v1/jobs/x/infer"]),
       ctype=st.sampled_from(["application/json", "application/toml", "text/plain", "application/octet-stream"]),
       body=st.one_of(st.binary(max_size=300), _JSONISH.map(lambda v: json.dumps(v).encode()),
                      _JSONISH.map(lambda v: ("[pipeline]\nstages = " + json.dumps(v)).encode())))
def test_fuzzed_bodies_never_get_a_5xx(live: Any, path: str, ctype: str, body: bytes) -> None:
    loop, ctl = live

    async def one() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http:
            return await Api(http, ctl.url).call("POST", path, data=body, headers={"Content-Type": ctype})

    status, answer = loop.call(one())
    assert 400 <= status < 500, (status, answer)


def test_agent_refuses_python_sources_by_default(tmp_path: Path) -> None:
    posted: list[Message] = []

    async def scenario() -> list[Message]:
        cfg = AgentConfig(controller="http://127.0.0.1:1", token="t", state_dir=str(tmp_path))
        async with asyncio.TaskGroup() as tg:
            jobs = JobManager(cfg, tg, posted.append)
            jobs.handle(Inspect("r1", "python:os:getcwd"))
            jobs.handle(Deploy("j1", {"job": "j1", "model_source": "python:os:getcwd", "dtype": "float32", "seed": 0,
                                      "stages": [[0, 0, 0, 1]], "workers": [["0.0", "cpu", "127.0.0.1"]],
                                      "edges": [], "policy": "round_robin", "micro_batch_size": 1,
                                      "max_inflight": 1, "max_wait_ms": 1.0, "edge_timeout_s": 5.0,
                                      "dispatcher_host": "127.0.0.1", "base_dir": ".", "cuda_graphs": False,
                                      "generation": None}, ["0.0"]))
        return list(posted)

    refused = asyncio.run(scenario())
    inspect = next(m for m in refused if isinstance(m, InspectResult))
    assert not inspect.ok and "--allow-python-sources" in inspect.error
    deploy = next(m for m in refused if isinstance(m, ErrorMsg))
    assert "deploy j1: model.source 'python:os:getcwd': this agent does not run python: model sources" in deploy.message
    rooted = AgentConfig(controller="http://127.0.0.1:1", token="t", state_dir=str(tmp_path),
                         model_roots=(str(tmp_path / "models"),))
    assert source_refused(rooted, str(tmp_path / "models" / "gpt2")) is None
    assert "outside the model directories this agent serves" in (source_refused(rooted, "/etc") or "")
    assert source_refused(rooted, str(tmp_path / "models" / ".." / "secret")) is not None
    assert source_refused(rooted, "org/name") is None and source_refused(rooted, "builtin:gpt2-tiny") is None
