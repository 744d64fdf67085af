"""End to end through the daemons: a controller and two agents as real subprocesses on 127.0.0.1,
jobs submitted over REST, inference through the controller, results checked against the model."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from cluster import INFSCALED, TOKEN, Cluster, alive, local_cluster
from prometheus_client.parser import text_string_to_metric_families

from infscaled.models import inputs
from infscaled.models.sources import resolve
from infscaled.models.stage import Monolith
from infscaled.protocol import watch

MESH_JOB = """
name = "mesh2"
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


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with local_cluster(tmp_path / "state", {"a1": "cpu:2", "a2": "cpu:2"}) as c:
        yield c


def test_mesh_job_across_two_agents_serves_correct_results_and_stops_cleanly(cluster: Cluster) -> None:
    status, job = cluster.submit(MESH_JOB)
    assert status == 201, job
    job_id = job["id"]
    detail = cluster.wait_for("running", lambda: (d := cluster.job(job_id))["state"] == "running" and d, 180)
    agents = {n["agent"] for n in detail["nodes"] if n["node"] != "dispatcher"}
    assert agents == {"a1", "a2"}, "a spread placement puts stages on both agents"

    mono = Monolith(resolve("builtin:gpt2-tiny"), "cpu", "float32", 0)
    gen = torch.Generator().manual_seed(5)
    for length in (3, 9, 17):
        x = torch.randint(0, 512, (2, length), generator=gen)
        status, out = cluster.call("POST", f"/v1/jobs/{job_id}/infer", {"inputs": x.tolist()})
        assert status == 200, out
        expected = mono.forward(inputs.collate(mono.family.input_spec(), [x], torch.float32))
        torch.testing.assert_close(torch.tensor(out["output"]), expected, atol=1e-4, rtol=1e-4)

    _check_metrics(cluster, job_id, detail, requests=3)

    workers = cluster.worker_pids()
    assert len(workers) >= 5, "4 stage workers and a dispatcher run under the agents"
    status, _ = cluster.call("DELETE", f"/v1/jobs/{job_id}")
    assert status in (200, 202)
    cluster.wait_for("stopped", lambda: cluster.job(job_id)["state"] == "stopped", 60)
    cluster.wait_for("workers gone", lambda: not any(alive(p) for p in workers), 30)
    status, err = cluster.call("POST", f"/v1/jobs/{job_id}/infer", {"inputs": [[1, 2]]})
    assert status == 409 and "stopped" in err["error"]


def _check_metrics(c: Cluster, job_id: str, detail: dict[str, Any], requests: int) -> None:
    """Stats flow worker -> agent -> controller: the JSON snapshot and the Prometheus text agree."""
    placed = {n["node"]: n["agent"] for n in detail["nodes"] if n["node"] != "dispatcher"}

    def complete() -> dict[str, Any] | None:
        snap = c.call("GET", f"/v1/jobs/{job_id}/metrics")[1]
        stages = {s["node"]: s for s in snap["stages"]}
        done = (set(stages) == set(placed) and all(s["samples"] > 0 for s in stages.values())
                and snap["dispatcher"] is not None and snap["dispatcher"]["requests"] >= requests)
        return snap if done else None

    snap = c.wait_for("metrics of every stage", complete, 30)
    assert {s["node"]: s["agent"] for s in snap["stages"]} == placed
    req = urllib.request.Request(c.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    occupancy = {(s.labels["job"], f"{s.labels['stage']}.{s.labels['replica']}", s.labels["agent"])
                 for s in families["infscaled_stage_occupancy_ratio"].samples}
    assert occupancy == {(job_id, node, agent) for node, agent in placed.items()}
    assert families["infscaled_agents_connected"].samples[0].value == 2
    assert any(s.labels == {"job": job_id, "state": "running"} and s.value == 1
               for s in families["infscaled_job_state"].samples)
    with urllib.request.urlopen(c.url + "/metrics", timeout=30) as public:  # no token: vLLM's convention
        assert public.status == 200
    _check_watch(c, job_id, placed)


def _check_watch(c: Cluster, job_id: str, placed: dict[str, str]) -> None:
    """/v1/watch: the history of events, then a snapshot with the agents' host usage and the job's
    replicas, stats and edge rates (fresh: a request just went through every stage)."""
    status, _ = c.call("POST", f"/v1/jobs/{job_id}/infer", {"inputs": [[1, 2, 3]] * 4})
    assert status == 200

    async def watch_once() -> tuple[list[watch.Event], watch.Snapshot]:
        events: list[watch.Event] = []
        state = watch.WatchState()  # the first snapshot, then deltas
        async with aiohttp.ClientSession() as http, http.ws_connect(
                c.url + "/v1/watch", headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            async for frame in ws:
                msg = watch.decode(frame.data)
                if isinstance(msg, watch.Event):
                    events.append(msg)
                    continue
                snap = state.apply(msg)
                assert snap is not None, f"a delta that does not follow: {msg}"
                if any(j.id == job_id and j.dispatcher and j.dispatcher.requests >= 4 for j in snap.jobs) and all(
                        a.cpu_ratio >= 0 for a in snap.agents):
                    return events, snap  # the picture that includes the request above and host usage
        raise AssertionError("watch closed before a snapshot with the request")

    events, snap = asyncio.run(asyncio.wait_for(watch_once(), 30))
    seen = {(e.kind, e.node or e.agent or e.job, e.state) for e in events}
    assert {("agent_joined", "a1", "connected"), ("agent_joined", "a2", "connected"),
            ("job_state", job_id, "running")} <= seen
    assert {("worker_state", node, "ready") for node in [*placed, "dispatcher"]} <= seen
    assert {a.id for a in snap.agents} == {"a1", "a2"}
    for a in snap.agents:  # psutil's numbers from the agents' HostMetrics
        assert 0.0 <= a.cpu_ratio <= 1.0 and 0 < a.ram_used_bytes <= a.ram_bytes, a
    (job,) = [j for j in snap.jobs if j.id == job_id]
    assert {r.node: r.agent for r in job.replicas} == placed
    assert all(r.state == "ready" and r.stats is not None and r.stats.samples > 0 for r in job.replicas)
    assert len(job.edges) == 2 + 4 + 2  # dispatcher -> 2 replicas, 2 x 2 mesh, 2 replicas -> dispatcher
    into_stage0 = sum(e.samples_per_s for e in job.edges if e.src == "dispatcher")
    assert into_stage0 > 0, job.edges
    assert job.bottleneck in (0, 1)


def test_wrong_token_is_refused(cluster: Cluster) -> None:
    assert cluster.call("GET", "/v1/jobs", token="nope")[0] == 401
    assert cluster.call("GET", "/v1/jobs", token=None)[0] == 401


def test_job_file_error_reads_the_same_as_infscaled_run(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(MESH_JOB.replace("stages = 2", "layers = [[0, 2], [3, 9]]"))
    run = subprocess.run([*INFSCALED, "run", str(path)], capture_output=True, text=True, env=cluster.env,
                         timeout=120)
    assert run.returncode == 2
    cli = subprocess.run([*INFSCALED, "job", "--controller", cluster.url, "submit", str(path)],
                         capture_output=True, text=True, env=cluster.env, timeout=180)
    assert cli.returncode == 2
    message = run.stderr.strip().removeprefix("error: ")
    assert "pipeline.layers" in message and "unit 9 does not exist" in message
    assert message in cli.stderr, (run.stderr, cli.stderr)


def test_more_devices_than_the_cluster_has_is_refused(cluster: Cluster) -> None:
    status, err = cluster.submit(MESH_JOB.replace("replicas = [2, 2]", "replicas = [4, 3]"))
    assert status == 409, err
    assert "7" in err["error"] and "cpu" in err["error"]


def test_killed_agent_fails_its_job_with_a_reason_naming_it(cluster: Cluster) -> None:
    # Every device busy: the lost agent's replicas cannot be replaced, so the job fails.
    status, job = cluster.submit(MESH_JOB)
    assert status == 201, job
    job_id = job["id"]
    cluster.wait_for("running", lambda: cluster.job(job_id)["state"] == "running", 180)
    workers = cluster.worker_pids()
    cluster.procs["a2"].send_signal(signal.SIGKILL)
    failed = cluster.wait_for("failed", lambda: (d := cluster.job(job_id))["state"] == "failed" and d, 60)
    assert "a2" in failed["reason"], failed["reason"]
    cluster.wait_for("no orphan workers", lambda: not any(alive(p) for p in workers), 60)
    status, err = cluster.call("POST", f"/v1/jobs/{job_id}/infer", {"inputs": [[1, 2]]})
    assert status == 409 and "failed" in err["error"]
