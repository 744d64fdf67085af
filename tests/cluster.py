"""Real daemons for tests: a controller and agents as subprocesses on 127.0.0.1, driven over the
REST API, and the cleanup that proves no process outlives them (test_daemon, test_tui, test_netns)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

INFSCALED = [sys.executable, "-m", "infscaled.cli"]
TOKEN = "test-token-" + "x" * 20
_clusters = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_block() -> int:
    """The first of 100 edge ports for a test's agents: distinct per test process (the two xdist
    workers of `make test` apart for sure) and per block handed out at once (4 in turn). Below
    Linux's ephemeral range (32768+), where any outgoing connection may hold a port, and never
    in 29500-29999, the default range of `infscaled serve` / `up`, which may run beside."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    block = ((os.getpid() % 15) * 2 + worker % 2) * 4 + next(_clusters) % 4  # 0..119
    return 20000 + (block + 5 if block >= 95 else block) * 100


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:120]
    except psutil.NoSuchProcess:
        return "?"


def wait_for(what: str, check: Callable[[], Any], timeout: float, poll_s: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy (and return that); the daemons' APIs are
    the only view a client has, so tests poll them rather than sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def descendants(procs: Iterable[subprocess.Popen[bytes]]) -> set[int]:
    pids = set()
    for p in procs:
        try:
            pids |= {c.pid for c in psutil.Process(p.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    return pids


@asynccontextmanager
async def loopback(app: web.Application, port: int = 0) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1:`port` (0: a free one) for the block; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def is_member(p: psutil.Process) -> bool:
    """A worker or dispatcher process: forked from the supervisor's fork server, it names itself
    `infscaled-NODE` (worker/start.py); spawned, its command line says multiprocessing's spawn."""
    try:
        return p.name().startswith("infscaled-") or "spawn_main" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def fork_server() -> psutil.Process | None:
    """This process's fork server (worker/start.py), None where members are spawned: a test can
    suspend it to hold every new member's start."""
    for child in psutil.Process().children():
        try:
            if "multiprocessing.forkserver" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def spawned(pids: Iterable[int]) -> set[int]:
    """Worker and dispatcher processes among `pids`."""
    out = set()
    for pid in pids:
        try:
            if is_member(psutil.Process(pid)):
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def stop_all(procs: Iterable[subprocess.Popen[bytes]], everything: set[int],
             still_there: Callable[[], bool] = lambda: False) -> dict[int, str]:
    """SIGTERM the daemons, wait for them (SIGKILL after 30 s), give their children a moment
    (multiprocessing's resource tracker exits once its agent's pipes close), then SIGKILL and
    return whatever of `everything` is still alive: a test asserts that this is empty."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    deadline = time.monotonic() + 15
    while (any(alive(pid) for pid in everything) or still_there()) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = {pid: cmdline(pid) for pid in everything if alive(pid)}
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)  # only processes this test started
    return leftovers


@dataclass
class Cluster:
    """Daemons started by a test; `call` talks to the controller over HTTP with the test token."""

    url: str
    env: dict[str, str]
    port: int = 0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def call(self, method: str, path: str, body: Any = None, token: str | None = TOKEN,
             headers: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, Any]:
        data = body.encode() if isinstance(body, str) else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        if body is not None and not isinstance(body, str):
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 120) -> Any:
        return wait_for(what, check, timeout)

    def start_controller(self) -> None:
        self.procs["controller"] = subprocess.Popen([*INFSCALED, "--role", "controller", "--port", str(self.port)],
                                                    env=self.env)
        self.wait_for("the controller", self.reachable, 30)

    def kill_controller(self) -> None:
        proc = self.procs.pop("controller")
        proc.kill()
        proc.wait(10)

    def reachable(self) -> bool:
        try:
            return self.call("GET", "/v1/agents", timeout=2)[0] == 200
        except OSError:
            return False

    def start_agent(self, name: str, first_port: int, devices: str = "cpu:2", *extra: str) -> None:
        """An agent daemon; `extra` are more CLI flags."""
        self.procs[name] = subprocess.Popen(
            [*INFSCALED, "--role", "agent", "--controller", self.url, "--id", name, "--devices", devices,
             "--port-range", f"{first_port}-{first_port + 40}", *extra], env=self.env)

    def agent_states(self) -> dict[str, str]:
        status, agents = self.call("GET", "/v1/agents")
        return {a["id"]: a["state"] for a in agents} if status == 200 else {}

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/jobs/{job_id}")[1]

    def submit(self, toml: str, name: str = "job.toml") -> tuple[int, Any]:
        return self.call("POST", "/v1/jobs", toml, headers={"Content-Type": "application/toml",
                                                             "X-Infscaled-Job-File": name}, timeout=180)

    def run_job(self, toml: str, timeout: float = 180) -> dict[str, Any]:
        """Submit and wait until running; returns the job's detail."""
        status, job = self.submit(toml)
        assert status == 201, job
        return self.wait_for("the job to run", lambda: (d := self.job(job["id"]))["state"] == "running" and d,
                             timeout)

    def worker_pids(self) -> set[int]:
        """Worker and dispatcher processes (multiprocessing's resource tracker lives with its agent)."""
        return spawned(descendants(self.procs.values()))


@contextmanager
def local_cluster(state_dir: Path, agents: dict[str, str], *agent_flags: str) -> Iterator[Cluster]:
    """A controller and the named agents (name -> devices, registered in that order), each with
    its own range of edge ports; on exit, everything they started must be gone."""
    port = free_port()
    env = {**os.environ, "INFSCALED_TOKEN": TOKEN, "INFSCALED_STATE_DIR": str(state_dir), "HF_HUB_OFFLINE": "1"}
    c = Cluster(f"http://127.0.0.1:{port}", env, port)
    base = free_port_block()
    try:
        c.start_controller()
        for i, (name, devices) in enumerate(agents.items()):
            c.start_agent(name, base + 50 * i, devices, *agent_flags)
        c.wait_for("the agents", lambda: c.agent_states() == dict.fromkeys(agents, "connected"), 120)
        yield c
    finally:
        everything = c.worker_pids() | descendants(c.procs.values()) | {p.pid for p in c.procs.values()}
        leftovers = stop_all(c.procs.values(), everything)
        assert not leftovers, f"processes outlived the cluster: {leftovers}"


class ClientThreads:
    """Client threads that run from the start of a with-block until its end (they watch `_stop`)."""

    join_s = 60.0

    def __init__(self, target: Callable[..., None], args: Iterable[tuple[Any, ...]]) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=target, args=a, daemon=True) for a in args]

    def __enter__(self) -> Any:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.join_s)


class ProxyLoad(ClientThreads):
    """Closed-loop clients posting to a job's inference endpoint through the controller's proxy,
    one thread per entry of `inputs` (each sends its own), until the block ends; every answer
    (status, body) is kept. Each client waits `think_s` between requests (a zero-think loop takes
    every idle core of a 2-core CI machine from the processes under test) and `pause_s` after an
    answer other than 200 (the job stopped or the controller is away: don't spin). An exception
    ends a client unless `tolerate` (then it is recorded as status 0)."""

    def __init__(self, cluster: Cluster, job_id: str, inputs: list[Any], *, think_s: float = 0.02,
                 pause_s: float = 0.0, tolerate: bool = False, timeout: float = 120) -> None:
        self.cluster, self.job_id = cluster, job_id
        self.results: list[tuple[int, Any]] = []
        self._think_s, self._pause_s, self._tolerate, self._timeout = think_s, pause_s, tolerate, timeout
        super().__init__(self._client, [(x,) for x in inputs])

    def _client(self, x: Any) -> None:
        while not self._stop.is_set():
            try:
                answer = self.cluster.call("POST", f"/v1/jobs/{self.job_id}/infer", {"inputs": x},
                                           timeout=self._timeout)
            except (OSError, ValueError):  # ValueError: a body that is not JSON (the controller went away)
                if not self._tolerate:
                    raise
                answer = (0, None)
            self.results.append(answer)
            self._stop.wait(self._think_s if answer[0] == 200 else max(self._think_s, self._pause_s))

    def more(self, n: int, what: str, timeout: float = 60) -> None:
        """Wait for `n` more answers than there are now."""
        before = len(self.results)
        self.cluster.wait_for(what, lambda: len(self.results) >= before + n, timeout)

    def failed(self) -> list[tuple[int, Any]]:
        return [r for r in self.results if r[0] != 200]
