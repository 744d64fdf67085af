"""Surviving lost workers with real processes (runner/recovery.py, dispatch/core.py replay).

Under steady closed-loop load on the quickstart shape (stage 1 has two replicas), with no
request failing, lost or answered twice and every result equal to the monolithic model's:
- kill -9 of replica 1.1: a replacement (a fresh id) joins and carries traffic;
- SIGSTOP of a replica (a hung worker): its heartbeat stops, the supervisor kills it and it is
  replaced the same way;
- kill -9 of stage 0's only replica: requests wait (the dispatcher holds them) and are all
  answered once the replacement is up.
Recovery off: a loss fails the job cleanly with the reason (tests/test_pipeline.py).
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
                     "workload": {"samples": [1, 2], "seq_len": [16, 16], "request_timeout_s": 180},
                     "recovery": {"heartbeat_timeout_s": 2.0, **recovery}}, str(tmp_path / "chaos.toml"))
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


def _replaced(job: LocalJob, count: int) -> bool:
    r = job.recoverer
    return (r is not None and r.state == JobState.RUNNING and len(r.history) == count
            and r.history[-1].ready_s > 0)


def test_lost_replicas_are_replaced_under_load(tmp_path: Path) -> None:
    """Three faults in a row on one job: kill -9 of 1.1 (its twin serves on), SIGSTOP of its
    replacement 1.2 (a hung worker: declared dead by its silent heartbeat; with `attempts = 1`,
    allowed because 1.2 had come to serve: its line starts afresh), kill -9 of 0.0 (stage 0's
    only replica: requests wait and are replayed once its replacement joins)."""
    cfg, prepared = _job(tmp_path, [1, 2], attempts=1)
    requests = requests_for(cfg.workload, prepared.spec, 50_000)
    faults = [(Node(1, 1), signal.SIGKILL, Node(1, 2)), (Node(1, 2), signal.SIGSTOP, Node(1, 3)),
              (Node(0, 0), signal.SIGKILL, Node(0, 1))]
    with LocalJob(prepared) as job, ClosedLoop(job.submit, requests, 50_000, 4, think_s=0.01) as load:
        _until(lambda: load.done() >= 30, "traffic before the first fault")
        for i, (victim, sig, replacement) in enumerate(faults, 1):
            os.kill(_pid(job, victim), sig)
            faulted = time.monotonic()
            _until(lambda v=victim: job.group.handles[v].exited, f"{victim} to be declared dead", 30)
            declared = time.monotonic() - faulted
            _until(lambda n=i: _replaced(job, n), f"the replacement of {victim} to be up", 120)
            assert job.recoverer is not None
            assert job.recoverer.history[-1].added == (replacement,)  # a fresh id, never the dead one's
            _until(lambda n=replacement: (s := job.group.handles[n].stats) is not None and s.micro_batches > 0,
                   f"{replacement} to carry traffic", 60)
            before = load.done()
            _until(lambda b=before: load.done() >= b + 20, f"traffic after replacing {victim}")
            if sig == signal.SIGSTOP:
                assert "no heartbeat" in job.recoverer.history[-1].reasons[0]
                assert declared < 10, f"a stopped worker took {declared:.1f} s to be declared dead"
        assert job.group.failure is None and job.dispatcher is not None and job.dispatcher.failure is None
        replayed = job.dispatcher.replayed
    _verify(prepared, load)
    assert [n.replica for n in job.plan.nodes(1)] == [0, 3] and job.plan.nodes(0) == (Node(0, 1),)
    assert replayed > 0


def test_fault_at_parses_and_refuses_bad_steps() -> None:
    from infscaled.errors import InfscaledError
    from infscaled.runner.scaling import FaultStep, parse_fault_at

    assert parse_fault_at("3:1.1") == FaultStep(3.0, "1.1", False)
    assert parse_fault_at(" 0.5:0.0:stop ") == FaultStep(0.5, "0.0", True)
    for bad in ("3", "3:1", "x:1.1", "3:1.1:pause", "3:dispatcher", ""):
        with pytest.raises(InfscaledError, match=r"expected T:STAGE.REPLICA"):
            parse_fault_at(bad)


def test_replacement_plans_inherit_edges_and_replace_whole_chains(tmp_path: Path) -> None:
    """Pure planning (planning/recovery.py): a forward replacement takes exactly the dead node's
    edges; two dead neighbours are linked to each other's replacements; a generation chain that
    lost a member is replaced as a whole; `complete` and each running node's update."""
    from infscaled.planning.recovery import complete, devices_for, dispatcher_restart, replacement_shape, with_failure
    from infscaled.planning.scale import apply_scale
    from infscaled.protocol.plan import DISPATCHER

    _, prepared = _job(tmp_path, [1, 2])
    plan = prepared.plan
    shape = replacement_shape(plan, [Node(1, 1)])
    assert shape.added == (Node(1, 2),) and shape.removed == (Node(1, 1),)
    assert sorted(shape.new_edges) == sorted([(Node(0, 0), Node(1, 2)), (Node(1, 2), DISPATCHER)])
    change = apply_scale(plan, shape, devices_for(plan, shape), [20001, 20002])
    updates = with_failure(change, plan, [Node(1, 1)], complete(plan, [Node(0, 0), Node(1, 0)]))
    assert set(updates) == {Node(0, 0), Node(1, 0), DISPATCHER}
    assert all(u.dead == (Node(1, 1),) for u in updates.values())
    assert updates[DISPATCHER].complete is True and updates[Node(0, 0)].complete is None
    assert [e.key for e in updates[Node(0, 0)].add] == ["0.0->1.2"] and updates[Node(0, 0)].remove == ("0.0->1.1",)
    assert change.plan.epoch == plan.epoch + 1 and [n.replica for n in change.plan.nodes(1)] == [0, 2]
    both = replacement_shape(plan, [Node(0, 0), Node(1, 0)])
    assert both.added == (Node(0, 1), Node(1, 2))
    assert (Node(0, 1), Node(1, 2)) in both.new_edges and (Node(0, 1), Node(1, 1)) in both.new_edges
    assert not complete(plan, [Node(1, 0), Node(1, 1)])  # stage 0 has no serving replica
    restarted, ups = dispatcher_restart(plan, [30001, 30002, 30003])
    assert sorted(e.port for e in restarted.edges if DISPATCHER in (e.src, e.dst)) == [30001, 30002, 30003]
    assert all(u.dead == (DISPATCHER,) for u in ups.values()) and len(ups[Node(1, 0)].add) == 1

    gen = prepare(parse_job({"name": "g", "model": {"source": "builtin:llama-tiny"},
                             "pipeline": {"stages": 2, "replicas": [2, 2], "graph": "parallel"},
                             "generation": {}})).plan
    chain = replacement_shape(gen, [Node(1, 0)])
    assert chain.removed == (Node(0, 0), Node(1, 0)) and chain.added == (Node(0, 2), Node(1, 2))
    assert (Node(1, 2), Node(0, 2)) in chain.new_edges  # the decode loop of the fresh chain
    assert complete(gen, [Node(0, 1), Node(1, 1)]) and not complete(gen, [Node(0, 0), Node(1, 1)])
    from infscaled.planning.recovery import backoff
    from infscaled.protocol.plan import Recovery

    assert [backoff(Recovery(backoff_s=1.5), n) for n in (1, 2, 3, 4)] == [0.0, 1.5, 3.0, 6.0]


def test_attempts_bound_a_line_of_replacements_that_never_serve() -> None:
    """planning.recovery.Ledger, the one rule of `infscaled run` and the controller."""
    from infscaled.planning.recovery import Ledger

    led = Ledger()
    assert led.next_try(["1.1"], ["1.1: killed"]) == (1, ["1.1: killed"])
    led.started(["1.2"], 1, ["1.1: killed"], lost=["1.1"])
    # 1.2 dies before READY: attempt 2 of the same line, every reason kept.
    assert led.next_try(["1.2"], ["1.2: crashed"]) == (2, ["1.1: killed", "1.2: crashed"])
    led.started(["1.3"], 2, ["1.1: killed", "1.2: crashed"], lost=["1.2"])
    led.served("1.3")  # it came to serve: a later loss is a new incident
    assert led.next_try(["1.3"], ["1.3: killed"]) == (1, ["1.3: killed"])
    # A chain replaced together takes the worst of its lines; losses never reset.
    led.started(["0.4"], 3, ["0.1: x"], lost=["0.1"])
    assert led.next_try(["0.4", "1.3"], ["0.4: y"])[0] == 4
    assert led.losses == {"1.2": 1, "1.3": 2, "0.4": 1} and led.last["1.3"] == "1.2: crashed"


def test_attempts_zero_fails_the_job_at_the_first_loss(tmp_path: Path) -> None:
    _, prepared = _job(tmp_path, [1, 2], attempts=0)
    with LocalJob(prepared) as job:
        os.kill(_pid(job, Node(1, 1)), signal.SIGKILL)
        _until(lambda: job.state.failure is not None, "the job to fail", 60)
        assert "gave up after 0 replacement attempt(s)" in job.state.failure
        assert "worker 1.1" in job.state.failure and "code -9" in job.state.failure
