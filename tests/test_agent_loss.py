"""A lost agent's replicas are re-placed on another agent while the job serves (controller/recovery.py).

A controller and two agents serve a 2-stage forward job; under closed-loop load through the
controller's proxy, the agent that runs stage replicas but not the dispatcher is killed with
SIGKILL (its fork server exits with it, and its workers die with their parent). The controller
hears the websocket close, marks the agent lost, and starts replacements for each of its
replicas on the surviving agent's free devices; no request fails and every answer equals the
monolith's.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import psutil
import torch
from cluster import ProxyLoad, alive, local_cluster

from infscaled.models import inputs
from infscaled.models.sources import resolve
from infscaled.models.stage import Monolith

JOB = """
name = "moving"
[model]
source = "builtin:gpt2-tiny"
[pipeline]
stages = 2
replicas = [1, 2]
graph = "mesh"
policy = "shortest_queue"
[placement]
policy = "spread"
"""


def test_a_lost_agents_replicas_are_placed_on_another_agent(tmp_path: Path) -> None:
    # Spread: one agent runs 0.0 (and so the dispatcher) and one replica of stage 1, the other the
    # other replica; each has a free device left for what the other runs.
    with local_cluster(tmp_path / "state", {"a1": "cpu:3", "a2": "cpu:3"}) as cluster:
        detail = cluster.run_job(JOB)
        job_id = detail["id"]
        nodes = {n["node"]: n for n in detail["nodes"]}
        dispatcher_agent = nodes["dispatcher"]["agent"]
        victims = sorted(n for n, s in nodes.items() if s["agent"] != dispatcher_agent)
        assert victims, f"every node landed on {dispatcher_agent}: {nodes}"
        lost_agent = nodes[victims[0]]["agent"]
        lost_pids = [nodes[n]["pid"] for n in victims]

        mono = Monolith(resolve("builtin:gpt2-tiny"), "cpu", "float32", 0)
        x = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(5))
        expected = mono.forward(inputs.collate(mono.family.input_spec(), [x], torch.float32))
        with ProxyLoad(cluster, job_id, [x.tolist()] * 3) as load:
            load.more(10, "traffic")
            agent = cluster.procs.pop(lost_agent)
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            cluster.wait_for(f"{lost_agent} lost", lambda: cluster.agent_states().get(lost_agent) == "lost", 30)
            cluster.wait_for("its workers gone", lambda: not any(alive(p) for p in lost_pids), 30)

            def moved() -> dict[str, Any] | None:
                d = cluster.job(job_id)
                now = {n["node"]: n for n in d["nodes"]}
                return d if (d["state"] == "running" and not set(victims) & set(now)
                             and all(s["agent"] == dispatcher_agent and s["state"] == "ready"
                                     for s in now.values())) else None

            after = cluster.wait_for("the replicas re-placed and running", moved, 120)
            load.more(10, "traffic on the re-placed replicas")
        assert not load.failed(), load.failed()[:3]
        for _, body in load.results:
            assert torch.allclose(torch.tensor(body["output"]), expected, atol=1e-4, rtol=1e-4)
        assert [s["replicas"] for s in after["stages"]] == [1, 2]
        assert psutil.pid_exists(cluster.procs["controller"].pid)
