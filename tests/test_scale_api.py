"""Scaling through the controller (PATCH /v1/jobs/{id}, `infscaled job scale`) with real daemons.

A controller and two agents (subprocesses) serve the quickstart shape; under closed-loop load
through the controller's inference proxy, stage 1 goes 2 -> 3 -> 1: every answer equals the
monolith's, no request fails, the added replica is placed on a free device and becomes ready,
removed replicas drain, exit and leave the job. Bad scaling requests get a clear 4xx.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cluster import INFSCALED, TOKEN, Cluster, local_cluster

from infscaled.models import inputs
from infscaled.models.sources import resolve
from infscaled.models.stage import Monolith

JOB = """
name = "scaled"
[model]
source = "builtin:gpt2-tiny"
[pipeline]
stages = 2
replicas = [1, 2]
graph = "mesh"
policy = "shortest_queue"
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with local_cluster(tmp_path / "state", {"a1": "cpu:3", "a2": "cpu:2"}) as c:
        yield c


def _stage_nodes(detail: dict[str, Any], stage: int) -> dict[str, str]:
    return {n["node"]: n["state"] for n in detail["nodes"] if n["node"].startswith(f"{stage}.")}


def test_scale_a_stage_through_the_api_under_load(cluster: Cluster) -> None:
    status, job = cluster.submit(JOB)
    assert status == 201, job
    job_id = job["id"]
    cluster.wait_for("running", lambda: cluster.job(job_id)["state"] == "running", 180)

    mono = Monolith(resolve("builtin:gpt2-tiny"), "cpu", "float32", 0)
    x = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    expected = mono.forward(inputs.collate(mono.family.input_spec(), [x], torch.float32))
    stop = threading.Event()
    results: list[tuple[int, Any]] = []

    def client() -> None:
        while not stop.is_set():
            results.append(cluster.call("POST", f"/v1/jobs/{job_id}/infer", {"inputs": x.tolist()}))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        cluster.wait_for("traffic", lambda: len(results) >= 10, 60)
        status, detail = cluster.call("PATCH", f"/v1/jobs/{job_id}", {"stage": 1, "replicas": 3})
        assert status == 202, detail
        assert detail["epoch"] == 1 and detail["stages"][1]["replicas"] == 3
        cluster.wait_for("1.2 ready", lambda: _stage_nodes(cluster.job(job_id), 1).get("1.2") == "ready", 120)
        # While it is still changing, another change is refused.
        before = len(results)
        cluster.wait_for("traffic after scaling up", lambda: len(results) >= before + 10, 60)

        cli = subprocess.run([*INFSCALED, "job", "--controller", cluster.url, "--token", TOKEN, "scale", job_id,
                              "--stage", "1", "--replicas", "1"], capture_output=True, text=True, timeout=60,
                             env=cluster.env)
        assert cli.returncode == 0, cli.stderr
        assert "epoch 2" in cli.stdout, cli.stdout
        cluster.wait_for("1.1 and 1.2 to retire", lambda: list(_stage_nodes(cluster.job(job_id), 1)) == ["1.0"], 120)
        before = len(results)
        cluster.wait_for("traffic after scaling down", lambda: len(results) >= before + 10, 60)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:3]
    for _, body in results:
        assert torch.allclose(torch.tensor(body["output"]), expected, atol=1e-4, rtol=1e-4)
    assert cluster.job(job_id)["state"] == "running"

    for body, want in (({"stage": 7, "replicas": 2}, "stage 7 does not exist"),
                       ({"stage": 1, "replicas": "two"}, "replicas = 'two'"),
                       ({"stage": 1, "replicas": 0}, "allowed 1..256"),
                       ({"replicas": 2}, "name the stage"),
                       ({"stage": 1}, "expected JSON")):
        status, err = cluster.call("PATCH", f"/v1/jobs/{job_id}", body)
        assert status == 400 and want in err["error"], (body, status, err)
    status, err = cluster.call("PATCH", "/v1/jobs/nope", {"stage": 1, "replicas": 2})
    assert status == 404, err
    status, err = cluster.call("PATCH", f"/v1/jobs/{job_id}", {"stage": 1, "replicas": 9})
    assert status == 409 and "no free device" in err["error"], err
