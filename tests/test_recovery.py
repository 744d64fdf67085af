"""Surviving lost workers with real processes (runner/recovery.py, dispatch/core.py replay).

Under steady closed-loop load on the quickstart shape (stage 1 has two replicas):
- kill -9 of replica 1.1: no request fails, is lost or is answered twice, every result equals
  the monolithic model's, and a replacement (a fresh id) joins and carries traffic;
- SIGSTOP of a replica (a hung worker): its heartbeat stops, the supervisor kills it and it is
  replaced the same way;
- kill -9 of stage 0's only replica: requests wait (the dispatcher holds them) and are all
  answered once the replacement is up;
- recovery off: a loss fails the job cleanly with the reason (the pre-recovery behaviour).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_scaling import ClosedLoop, _until

from infscaled.config import parse_job
from infscaled.controller.job import JobState
from infscaled.models import inputs
from infscaled.models.stage import Monolith
from infscaled.protocol.plan import Node
from infscaled.runner.launcher import LocalJob, prepare
from infscaled.runner.workload import requests_for


def _job(tmp_path: Path, replicas: list[int], **recovery: Any) -> Any:
    cfg = parse_job({"name": "chaos", "model": {"source": "builtin:gpt2-tiny"},
                     "pipeline": {"stages": 2, "replicas": replicas, "policy": "shortest_queue",
                                  "micro_batch_size": 4, "max_inflight": 6, "max_wait_ms": 1.0},
                     "workload": {"samples": [1, 2], "seq_len": [16, 16], "request_timeout_s": 60},
                     "recovery": {"heartbeat_timeout_s": 1.5, **recovery}}, str(tmp_path / "chaos.toml"))
    return cfg, prepare(cfg)


def _verify(prepared: Any, load: ClosedLoop) -> None:
    failed = [o for o in load.outcomes if o.error is not None]
    assert not failed, f"{len(failed)} failed, first: {failed[0].error}"
    assert all(n <= 1 for n in load.answers), "a request was answered twice"
    assert sum(load.answers) == len(load.outcomes)
    mono = Monolith(prepared.resolved, "cpu", "float32", 0)
    for at in range(0, len(load.outcomes), 256):
        chunk = load.outcomes[at:at + 256]
        xs = torch.cat([o.request for o in chunk])
        expected = mono.forward(inputs.collate(prepared.spec, [xs], torch.float32))
        got = torch.cat([o.result for o in chunk if o.result is not None])
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), f"requests {at}.. differ from the monolith"


def _pid(job: LocalJob, node: Node) -> int:
    pid = job.group.handles[node].process.pid
    assert pid is not None
    return pid


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_lost_replica_is_replaced_under_load(tmp_path: Path, fault: str) -> None:
    cfg, prepared = _job(tmp_path, [1, 2])
    requests = requests_for(cfg.workload, prepared.spec, 50_000)
    victim = Node(1, 1)
    with LocalJob(prepared) as job, ClosedLoop(job.submit, requests, 50_000, 4) as load:
        _until(lambda: load.done() >= 30, "traffic before the fault")
        os.kill(_pid(job, victim), signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        faulted = time.monotonic()
        _until(lambda: job.group.handles[victim].exited, f"{victim} to be declared dead", 30)
        declared = time.monotonic() - faulted
        assert job.recoverer is not None
        _until(lambda: job.recoverer is not None and job.recoverer.state == JobState.RUNNING
               and len(job.recoverer.history) == 1 and job.recoverer.history[0].ready_s > 0,
               "the replacement to be up", 120)
        new = job.recoverer.history[0].added
        assert new == (Node(1, 2),), new  # a fresh id, never the dead one's
        _until(lambda: (s := job.group.handles[new[0]].stats) is not None and s.micro_batches > 0,
               "the replacement to carry traffic", 60)
        before = load.done()
        _until(lambda: load.done() >= before + 20, "traffic after the replacement")
        assert job.group.failure is None and job.dispatcher is not None and job.dispatcher.failure is None
        if fault == "stop":
            assert "no heartbeat" in job.recoverer.history[0].reasons[0]
            assert declared < 10, f"a stopped worker took {declared:.1f} s to be declared dead"
    _verify(prepared, load)
    assert [n.replica for n in job.plan.nodes(1)] == [0, 2]


def test_only_replica_of_a_stage_lost_requests_wait_and_replay(tmp_path: Path) -> None:
    cfg, prepared = _job(tmp_path, [1, 1])
    requests = requests_for(cfg.workload, prepared.spec, 50_000)
    with LocalJob(prepared) as job, ClosedLoop(job.submit, requests, 50_000, 4) as load:
        _until(lambda: load.done() >= 30, "traffic before the fault")
        os.kill(_pid(job, Node(0, 0)), signal.SIGKILL)
        _until(lambda: job.recoverer is not None and len(job.recoverer.history) == 1
               and job.recoverer.history[0].ready_s > 0, "the replacement to be up", 120)
        before = load.done()
        _until(lambda: load.done() >= before + 20, "traffic after the replacement")
        assert job.plan.nodes(0) == (Node(0, 1),)
    _verify(prepared, load)
    assert job.dispatcher is not None and job.dispatcher.replayed > 0


def test_recovery_off_fails_the_job_with_the_reason(tmp_path: Path) -> None:
    cfg, prepared = _job(tmp_path, [1, 2], enabled=False)
    requests = requests_for(cfg.workload, prepared.spec, 50_000)
    with LocalJob(prepared) as job, ClosedLoop(job.submit, requests, 50_000, 2) as load:
        _until(lambda: load.done() >= 10, "traffic before the fault")
        pid = _pid(job, Node(1, 1))
        os.kill(pid, signal.SIGKILL)
        _until(lambda: job.dispatcher is not None and job.dispatcher.failure is not None, "the job to fail", 30)
        assert f"worker 1.1 (pid {pid}) exited with code -9" in job.dispatcher.failure
    errors = [o.error for o in load.outcomes if o.error is not None]
    assert errors and all("1.1" in e for e in errors)
