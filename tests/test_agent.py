"""The agent daemon end to end: a real `python -m infscaled.agent` process against a minimal fake
controller (an aiohttp websocket server speaking protocol.messages) on 127.0.0.1, with real
worker and dispatcher processes. Tests of this module share one agent and run in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import WSMsgType, web

from infscaled.agent.client import ControllerLink
from infscaled.agent.config import AgentConfig, resolve_advertise
from infscaled.agent.devices import discover, parse_devices, parse_nvidia_smi
from infscaled.config import parse_job
from infscaled.errors import ConfigError
from infscaled.models.builtins import BUILTIN_NAMES
from infscaled.planning.job import plan_job, ports_needed
from infscaled.planning.ports import free_ports
from infscaled.protocol.messages import (
    Deploy,
    ErrorMsg,
    Heartbeat,
    Inspect,
    InspectResult,
    Message,
    Register,
    StopJob,
    Welcome,
    WorkerState,
    decode,
    encode,
)
from infscaled.protocol.plan import JobPlan, plan_to_dict
from infscaled.runner.launcher import prepare

REPO = Path(__file__).resolve().parents[1]
AGENT_TOKEN = "agent-token"
SERVICE_TOKEN = "service-token"
CLOSED = "<closed>"  # recorded when a websocket to the agent ends


class FakeController:
    """A websocket endpoint on its own loop thread; the test thread waits on what it received."""

    def __init__(self) -> None:
        self.received: list[Message | str] = []
        self.connections = 0
        self._cond = threading.Condition()
        self._ws: web.WebSocketResponse | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = free_ports(1)[0]
        self._runner = self._call(self._start())

    def _call(self, coro: Any, timeout_s: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/v1/agents/ws", self._agent_ws)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        return runner

    async def _agent_ws(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {AGENT_TOKEN}":
            return web.json_response({"error": "bad agent token"}, status=401)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        with self._cond:
            self.connections += 1
        async for frame in ws:
            if frame.type != WSMsgType.TEXT:
                continue
            msg = decode(frame.data)
            if isinstance(msg, Register):
                await ws.send_str(encode(Welcome(msg.agent_id, heartbeat_interval_s=0.2, heartbeat_timeout_s=2.0)))
            with self._cond:
                self.received.append(msg)
                self._cond.notify_all()
        with self._cond:
            self.received.append(CLOSED)
            self._cond.notify_all()
        return ws

    def send(self, msg: Message | str) -> None:
        ws = self._ws
        assert ws is not None
        self._call(ws.send_str(msg if isinstance(msg, str) else encode(msg)))

    def drop(self) -> None:
        ws = self._ws
        assert ws is not None
        self._call(ws.close())

    def mark(self) -> int:
        with self._cond:
            return len(self.received)

    def expect(self, pred: Callable[[Any], bool], timeout_s: float, since: int = 0) -> Any:
        """The first message at index >= since matching pred, waiting up to timeout_s."""
        found: list[Any] = []

        def match() -> bool:
            found[:] = [m for m in self.received[since:] if pred(m)][:1]
            return bool(found)

        with self._cond:
            if not self._cond.wait_for(match, timeout_s):
                tail = [m if isinstance(m, str) else m.type for m in self.received[-20:]]
                pytest.fail(f"nothing matching within {timeout_s} s; last received: {tail}")
        return found[0]

    def wait_for(self, cond: Callable[[], bool], timeout_s: float) -> None:
        with self._cond:
            if not self._cond.wait_for(cond, timeout_s):
                tail = [m if isinstance(m, str) else m.type for m in self.received[-20:]]
                pytest.fail(f"condition not met within {timeout_s} s; last received: {tail}")

    def errors(self, since: int) -> list[str]:
        return [m.message for m in self.received[since:] if isinstance(m, ErrorMsg)]

    def states(self, job: str, state: str, since: int = 0) -> dict[str, WorkerState]:
        with self._cond:
            return {m.node: m for m in self.received[since:]
                    if isinstance(m, WorkerState) and m.job_id == job and m.state == state}

    def close(self) -> None:
        self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class Agent:
    def __init__(self, controller_port: int, log: Path) -> None:
        self.log = log
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "infscaled.agent", "--controller", f"http://127.0.0.1:{controller_port}",
                 "--token", AGENT_TOKEN, "--id", "agent-test", "--devices", "cpu:2", "--log-level", "INFO"],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def kill_all(self) -> None:
        procs = [self.ps]
        try:
            procs += self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(10)


@pytest.fixture(scope="module")
def ctl() -> Iterator[FakeController]:
    c = FakeController()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def agent(ctl: FakeController, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = Agent(ctl.port, tmp_path_factory.mktemp("agent") / "agent.log")
    try:
        yield a
    finally:
        a.kill_all()


def _gone(pids: list[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        tick.wait(0.05)
    return False


def make_plan(tmp: Path, name: str, stages: int) -> JobPlan:
    cfg = parse_job({"name": name, "model": {"source": "builtin:gpt2-tiny"},
                     "pipeline": {"stages": stages, "micro_batch_size": 8, "max_wait_ms": 1.0}},
                    str(tmp / f"{name}.toml"), base_dir=tmp)
    weights = [1] * 6  # gpt2-tiny: 6 units; balance only needs relative weights
    return plan_job(cfg, weights, ["cpu"] * stages, free_ports(ports_needed(cfg)), "127.0.0.1")


def deploy(ctl: FakeController, plan: JobPlan, job: str) -> tuple[int, list[str]]:
    port = free_ports(1)[0]
    nodes = ["dispatcher", *(str(w.node) for w in plan.workers)]
    ctl.send(Deploy(job, plan_to_dict(plan), nodes, dispatcher_port=port, service_token=SERVICE_TOKEN,
                    request_timeout_s=30, ready_timeout_s=90))
    return port, nodes


def wait_ready(ctl: FakeController, job: str, nodes: list[str], since: int, timeout_s: float = 90) -> dict[str, int]:
    ctl.wait_for(lambda: set(ctl.states(job, "ready", since)) >= set(nodes) or bool(ctl.states(job, "failed", since)),
                 timeout_s)
    failed = ctl.states(job, "failed", since)
    assert not failed, failed
    return {n: s.pid for n, s in ctl.states(job, "ready", since).items()}


# -- the tests, in order -------------------------------------------------------------------------


def test_registers_its_devices_and_heartbeats(ctl: FakeController, agent: Agent) -> None:
    reg = ctl.expect(lambda m: isinstance(m, Register), 20)
    assert reg.agent_id == "agent-test" and reg.advertise == "127.0.0.1"
    assert [d.id for d in reg.devices] == ["cpu:0", "cpu:1"] and all(d.kind == "cpu" for d in reg.devices)
    assert reg.cpu_cores >= 1 and reg.ram_bytes > 0 and reg.port_range == [29500, 29999]
    since = ctl.mark()
    ctl.expect(lambda m: isinstance(m, Heartbeat) and m.agent_id == "agent-test", 5, since)
    ctl.expect(lambda m: isinstance(m, Heartbeat), 5, ctl.mark())  # and again: it is periodic


def test_inspect_reports_units_or_the_run_error(ctl: FakeController, agent: Agent, tmp_path: Path) -> None:
    ctl.send(Inspect("r1", "builtin:gpt2-tiny"))
    ctl.send(Inspect("r2", "builtin:gpt2-small"))
    ok = ctl.expect(lambda m: isinstance(m, InspectResult) and m.request_id == "r1", 60)
    assert ok.ok and ok.unit_count == 6 and len(ok.unit_weights) == 6 and all(w > 0 for w in ok.unit_weights)
    bad = ctl.expect(lambda m: isinstance(m, InspectResult) and m.request_id == "r2", 60)
    assert not bad.ok and all(f"builtin:{n}" in bad.error for n in BUILTIN_NAMES)
    # The same text `infscaled run` prints, less its "JOB_FILE: " prefix.
    path = tmp_path / "job.toml"
    cfg = parse_job({"model": {"source": "builtin:gpt2-small"}, "pipeline": {"stages": 2}}, str(path),
                    base_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        prepare(cfg)
    assert str(err.value) == f"{path}: {bad.error}"


def test_malformed_messages_get_an_error_reply_and_the_agent_keeps_working(ctl: FakeController,
                                                                           agent: Agent) -> None:
    since = ctl.mark()
    ctl.send("this is not json")
    ctl.send(json.dumps({"v": 1, "type": "launch_missiles", "body": {}}))
    ctl.send(json.dumps({"v": 1, "type": "deploy", "body": {"job_id": 5}}))
    ctl.send(Register("x", "h", "127.0.0.1", [], 1, 1, [1, 2]))  # an agent -> controller type
    ctl.send(Deploy("broken", {"job": "x"}, ["0.0"]))
    ctl.wait_for(lambda: len(ctl.errors(since)) >= 5, 10)
    texts = ctl.errors(since)
    assert len(texts) == 5, texts
    assert "not JSON" in texts[0]
    assert "unknown message type 'launch_missiles'" in texts[1]
    assert "deploy.job_id: expected str" in texts[2]
    assert "unexpected message type 'register'" in texts[3]
    assert "deploy broken: malformed plan" in texts[4]
    ctl.expect(lambda m: isinstance(m, Heartbeat), 5, ctl.mark())
    assert agent.proc.poll() is None


def test_deploy_serves_survives_a_reconnect_and_stop_job_ends_every_process(
        ctl: FakeController, agent: Agent, tmp_path: Path) -> None:
    plan = make_plan(tmp_path, "job-a", 2)
    since = ctl.mark()
    port, nodes = deploy(ctl, plan, "job-a")
    starting = ctl.expect(lambda m: isinstance(m, WorkerState) and m.state == "starting", 10, since)
    assert starting.job_id == "job-a" and starting.pid > 0
    pids = wait_ready(ctl, "job-a", nodes, since)
    assert set(pids) == {"dispatcher", "0.0", "1.0"}
    # Members are forks of the agent's fork server (worker/start.py): its descendants, not its children.
    assert {p.pid for p in agent.ps.children(recursive=True)} >= set(pids.values())
    # The agent itself never loaded torch; its children did.
    maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
    assert "libtorch" not in maps
    assert "libtorch" in Path(f"/proc/{pids['0.0']}/maps").read_text()

    req = urllib.request.Request(f"http://127.0.0.1:{port}/infer", data=json.dumps({"inputs": [[1, 2, 3]]}).encode(),
                                 headers={"Authorization": f"Bearer {SERVICE_TOKEN}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200 and json.loads(resp.read())["shape"] == [1, 3, 512]

    # The controller drops the link: the agent registers again and resends its workers' states.
    since = ctl.mark()
    ctl.drop()
    ctl.expect(lambda m: m == CLOSED, 5, since)
    started = time.monotonic()
    ctl.expect(lambda m: isinstance(m, Register), 10, since)
    assert time.monotonic() - started < 5
    assert wait_ready(ctl, "job-a", nodes, since, 10) == pids  # the snapshot after Welcome
    assert all(psutil.pid_exists(p) for p in pids.values()), "a reconnect leaves workers alone"

    since = ctl.mark()
    ctl.send(StopJob("job-a", "test"))
    ctl.wait_for(lambda: len(ctl.states("job-a", "exited", since)) == 3, 40)
    assert not ctl.states("job-a", "failed", since)
    assert _gone(list(pids.values()), 10)


def test_sigterm_stops_workers_before_closing_the_link(ctl: FakeController, agent: Agent, tmp_path: Path) -> None:
    plan = make_plan(tmp_path, "job-b", 1)
    since = ctl.mark()
    _, nodes = deploy(ctl, plan, "job-b")
    pids = wait_ready(ctl, "job-b", nodes, since)
    since = ctl.mark()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(40) == 0, agent.output()
    closed = ctl.expect(lambda m: m == CLOSED, 5, since)
    assert closed == CLOSED
    order = ctl.received[since:]
    exited = [i for i, m in enumerate(order) if isinstance(m, WorkerState) and m.state == "exited"]
    assert {order[i].node for i in exited} == set(nodes) and max(exited) < order.index(CLOSED), order
    assert _gone(list(pids.values()), 5)


def test_a_killed_agent_leaves_no_orphans(ctl: FakeController, tmp_path: Path) -> None:
    since = ctl.mark()
    agent = Agent(ctl.port, tmp_path / "agent.log")
    try:
        ctl.expect(lambda m: isinstance(m, Register), 20, since)
        plan = make_plan(tmp_path, "job-c", 1)
        _, nodes = deploy(ctl, plan, "job-c")
        pids = wait_ready(ctl, "job-c", nodes, since)
        agent.proc.kill()
        assert agent.proc.wait(10) == -signal.SIGKILL
        assert _gone(list(pids.values()), 15), "workers outlived their agent"
    finally:
        agent.kill_all()


# -- units: config and devices -------------------------------------------------------------------


def test_config_rejects_bad_values_with_the_key_and_value() -> None:
    with pytest.raises(ConfigError, match="controller = 'ftp://x'"):
        AgentConfig(controller="ftp://x", token="t")
    with pytest.raises(ConfigError, match="token"):
        AgentConfig(controller="http://127.0.0.1:1", token="")
    with pytest.raises(ConfigError, match="devices = 'gpu:0'"):
        AgentConfig(controller="http://127.0.0.1:1", token="t", devices="gpu:0")
    with pytest.raises(ConfigError, match="port_range"):
        AgentConfig(controller="http://127.0.0.1:1", token="t", port_range=(30000, 29000))
    cfg = AgentConfig(controller="http://localhost:8400/", token="t")
    assert cfg.ws_url == "http://localhost:8400/v1/agents/ws" and resolve_advertise(cfg) == "127.0.0.1"
    assert cfg.port_range == (29500, 29999) and cfg.agent_id


def test_devices() -> None:
    assert parse_devices("cuda:0, cuda:3") == ("cuda", [0, 3])
    assert [d.id for d in discover("cpu:3")] == ["cpu:0", "cpu:1", "cpu:2"]
    assert discover("auto")  # NVML, nvidia-smi or CPU slots: never empty
    gpus = parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA H100 80GB HBM3, 81559\nbogus\n")
    assert [(d.id, d.name, d.memory_bytes) for d in gpus] == [
        ("cuda:0", "NVIDIA H100 80GB HBM3", 81559 << 20), ("cuda:1", "NVIDIA H100 80GB HBM3", 81559 << 20)]


def test_the_agent_modules_do_not_import_torch() -> None:
    code = ("import sys, infscaled.agent, infscaled.agent.__main__, infscaled.agent.jobs; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr


def test_link_backs_off_when_no_controller_listens() -> None:
    """No controller: attempts are retried with growing delays and the link never raises."""
    port = free_ports(1)[0]
    cfg = AgentConfig(controller=f"http://127.0.0.1:{port}", token="t", backoff_initial_s=0.05, backoff_max_s=0.2)

    async def main() -> int:
        link = ControllerLink(cfg, lambda: Register("a", "h", "127.0.0.1", [], 1, 1, [1, 2]),
                              lambda m: None, list, lambda: 0)
        task = asyncio.create_task(link.run())
        await asyncio.sleep(1.0)
        assert not task.done()
        await link.close()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return link.sessions

    assert asyncio.run(main()) == 0
