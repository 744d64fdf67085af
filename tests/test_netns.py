"""Three "hosts" on one machine: the controller and two agents each in its own Linux network
namespace, joined by a bridge in a fourth (hub) namespace on the private 10.213.7.0/24, which
exists only inside those namespaces (no route, NAT or address is added to the host).

A 2-stage mesh job placed with `spread` puts its stages on both agents, so the control plane
(agents -> controller websocket, controller -> dispatcher proxy) and the data plane (the edges'
TCPStores and gloo pairs between the agents) really cross the veth links. The test process
stays in the root namespace; every HTTP call runs in the controller's namespace through
`ip netns exec` and a small Python client.

Needs root and iproute2; skipped otherwise (and where `ip netns add` is not permitted).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from cluster import alive, descendants, spawned, stop_all, wait_for

from infscaled.models import inputs
from infscaled.models.sources import resolve
from infscaled.models.stage import Monolith

TOKEN = "netns-token-" + "y" * 20
SUBNET = "10.213.7"
CONTROLLER_ADDR = f"{SUBNET}.1"
AGENT_ADDRS = {"a1": f"{SUBNET}.2", "a2": f"{SUBNET}.3"}
CONTROLLER_PORT = 8470  # the default: nothing else listens inside a fresh namespace
PORT_RANGE = "29500-29540"  # the same on both agents, as on separate hosts: ports are per host

MESH_JOB = """
name = "netns-mesh"
[model]
source = "builtin:gpt2-tiny"
[pipeline]
stages = 2
replicas = [2, 2]
graph = "mesh"
policy = "shortest_queue"
[placement]
policy = "spread"
"""

# Runs inside the controller's namespace: METHOD URL [CONTENT-TYPE], body on stdin;
# prints {"status": code, "body": parsed JSON}; status 0 when the controller is unreachable.
CLIENT = r"""
import json, os, sys, urllib.error, urllib.request
method, url = sys.argv[1], sys.argv[2]
ctype = sys.argv[3] if len(sys.argv) > 3 else "application/json"
data = sys.stdin.buffer.read() or None
req = urllib.request.Request(url, data=data, method=method,
                             headers={"Authorization": "Bearer " + os.environ["INFSCALED_TOKEN"]})
if data is not None:
    req.add_header("Content-Type", ctype)
try:
    with urllib.request.urlopen(req, timeout=float(os.environ.get("CLIENT_TIMEOUT", "60"))) as r:
        status, raw = r.status, r.read()
except urllib.error.HTTPError as e:
    status, raw = e.code, e.read()
except OSError as e:
    status, raw = 0, json.dumps({"error": str(e)}).encode()
print(json.dumps({"status": status, "body": json.loads(raw or b"null")}))
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class NetnsCluster:
    ns: dict[str, str]  # role -> namespace name ("hub", "controller", "a1", "a2")
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    url: str = f"http://{CONTROLLER_ADDR}:{CONTROLLER_PORT}"

    def exec_in(self, role: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[role], *argv]

    def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
             timeout: float = 60) -> tuple[int, Any]:
        """One HTTP request to the controller, made from inside the controller's namespace."""
        data = body.encode() if isinstance(body, str) else (json.dumps(body).encode() if body is not None else b"")
        proc = subprocess.run(self.exec_in("controller", [sys.executable, "-c", CLIENT, method, self.url + path,
                                                          content_type]),
                              input=data, capture_output=True, env={**self.env, "CLIENT_TIMEOUT": str(timeout)},
                              timeout=timeout + 30)
        assert proc.returncode == 0, proc.stderr.decode()
        answer = json.loads(proc.stdout)
        return answer["status"], answer["body"]

    def wait_for(self, what: str, check: Any, timeout: float) -> Any:
        return wait_for(what, check, timeout, poll_s=0.3)

    def agent_states(self) -> dict[str, str]:
        status, agents = self.call("GET", "/v1/agents", timeout=5)
        return {a["id"]: a["state"] for a in agents} if status == 200 else {}

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/jobs/{job_id}")[1]

    def worker_pids(self) -> set[int]:
        """Worker and dispatcher processes (spawned by multiprocessing) under the agents."""
        return spawned(descendants(self.procs.values()))

    def ns_pids(self) -> dict[str, list[int]]:
        """Every process still inside one of our namespaces."""
        out = {}
        for ns in self.ns.values():
            pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
            if pids:
                out[ns] = pids
        return out


def _build_network(ns: dict[str, str]) -> None:
    """A bridge in the hub namespace; one veth pair per node namespace, `eth0` inside it."""
    hub = ns["hub"]
    _ip("-n", hub, "link", "set", "lo", "up")
    _ip("-n", hub, "link", "add", "br0", "type", "bridge")
    _ip("-n", hub, "link", "set", "br0", "up")
    addrs = {"controller": CONTROLLER_ADDR, **AGENT_ADDRS}
    for i, (role, addr) in enumerate(addrs.items()):
        port = f"port{i}"
        _ip("-n", hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns[role])
        _ip("-n", hub, "link", "set", port, "master", "br0")
        _ip("-n", hub, "link", "set", port, "up")
        _ip("-n", ns[role], "link", "set", "lo", "up")
        _ip("-n", ns[role], "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns[role], "link", "set", "eth0", "up")


@pytest.fixture
def netns_cluster(tmp_path: Path) -> Iterator[NetnsCluster]:
    if sys.platform != "linux":
        pytest.skip("network namespaces are Linux only")
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` command is not installed")
    tag = f"infs{os.getpid()}"
    ns = {role: f"{tag}-{role}" for role in ("hub", "controller", "a1", "a2")}
    created: list[str] = []
    env = {**os.environ, "INFSCALED_TOKEN": TOKEN, "INFSCALED_STATE_DIR": str(tmp_path / "state"),
           "HF_HUB_OFFLINE": "1"}
    c = NetnsCluster(ns, env)
    try:
        for name in ns.values():
            proc = _ip("netns", "add", name, check=False)
            if proc.returncode != 0:
                pytest.skip(f"`ip netns add` is not permitted here: {proc.stderr.strip()}")
            created.append(name)
        try:
            _build_network(ns)
        except RuntimeError as exc:
            pytest.skip(f"cannot build the bridge/veth network inside the namespaces: {exc}")

        infscaled = [sys.executable, "-m", "infscaled.cli"]
        c.procs["controller"] = subprocess.Popen(c.exec_in("controller", [
            *infscaled, "--role", "controller", "--host", CONTROLLER_ADDR, "--port", str(CONTROLLER_PORT)]), env=env)
        c.wait_for("controller", lambda: c.call("GET", "/v1/health", timeout=2)[0] == 200, 30)
        for name, addr in AGENT_ADDRS.items():
            c.procs[name] = subprocess.Popen(c.exec_in(name, [
                *infscaled, "--role", "agent", "--controller", c.url, "--id", name, "--devices", "cpu:2",
                "--advertise", addr, "--port-range", PORT_RANGE]), env=env)
            # Register in order, so `spread` starts on a1 (it goes round-robin in registration order).
            c.wait_for(f"agent {name}", lambda n=name: c.agent_states().get(n) == "connected", 60)
        yield c
    finally:
        everything = descendants(c.procs.values()) | {p.pid for p in c.procs.values()}
        leftovers = stop_all(c.procs.values(), everything, still_there=lambda: bool(c.ns_pids()))
        in_ns = c.ns_pids()
        for pid in {pid for pids in in_ns.values() for pid in pids} - set(leftovers):
            try:
                os.kill(pid, signal.SIGKILL)  # only processes this test started, in its own namespaces
            except ProcessLookupError:
                pass
        for name in reversed(created):
            _ip("netns", "del", name, check=False)  # takes its veth ends and the bridge with it
        assert not leftovers and not in_ns, f"processes outlived the cluster: {leftovers} {in_ns}"


def test_mesh_job_across_three_network_namespaces(netns_cluster: NetnsCluster) -> None:
    c = netns_cluster
    status, agents = c.call("GET", "/v1/agents")
    assert status == 200
    assert {a["id"]: a["advertise"] for a in agents} == AGENT_ADDRS

    status, job = c.call("POST", "/v1/jobs", MESH_JOB, content_type="application/toml", timeout=180)
    assert status == 201, job
    job_id = job["id"]
    detail = c.wait_for("running", lambda: (d := c.job(job_id))["state"] in ("running", "failed") and d, 120)
    assert detail["state"] == "running", detail.get("reason")
    placed = {n["node"]: n["agent"] for n in detail["nodes"]}
    assert {placed[s] for s in ("0.0", "0.1")} == {"a1", "a2"}, placed
    assert {placed[s] for s in ("1.0", "1.1")} == {"a1", "a2"}, placed
    # Edges' stores live at their senders' advertised addresses: both agents host some, and
    # some edge joins the two agents, so tensors cross the veth links.
    assert {e["host"] for e in detail["edges"]} == set(AGENT_ADDRS.values()), detail["edges"]
    assert any(placed[e["src"]] != placed[e["dst"]] for e in detail["edges"]
               if "dispatcher" not in (e["src"], e["dst"])), detail["edges"]

    mono = Monolith(resolve("builtin:gpt2-tiny"), "cpu", "float32", 0)
    gen = torch.Generator().manual_seed(7)
    for batch, length in ((1, 4), (2, 9), (3, 17), (2, 33)):
        x = torch.randint(0, 512, (batch, length), generator=gen)
        status, out = c.call("POST", f"/v1/jobs/{job_id}/infer", {"inputs": x.tolist()})
        assert status == 200, out
        expected = mono.forward(inputs.collate(mono.family.input_spec(), [x], torch.float32))
        torch.testing.assert_close(torch.tensor(out["output"]), expected, atol=1e-4, rtol=1e-4)

    workers = c.worker_pids()
    assert len(workers) >= 5, "4 stage workers and a dispatcher run under the agents"
    status, _ = c.call("DELETE", f"/v1/jobs/{job_id}")
    assert status in (200, 202)
    c.wait_for("stopped", lambda: c.job(job_id)["state"] == "stopped", 60)
    c.wait_for("workers gone", lambda: not any(alive(p) for p in workers), 30)
    status, err = c.call("POST", f"/v1/jobs/{job_id}/infer", {"inputs": [[1, 2]]})
    assert status == 409 and "stopped" in err["error"]
