"""Live scaling with real worker processes (protocol/topology.py, planning/scale.py).

Under steady closed-loop load, stage 1 of the quickstart shape goes 2 -> 4 -> 1 -> 3 replicas:
no request fails, is lost or is answered twice, every result equals the monolithic model's,
each new replica carries traffic, each removed one drains and exits 0. A generation job's
replica chains go 1 -> 2 -> 1 while 32 greedy streams run, every stream equal to HF generate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from cluster import ClientThreads

from infscaled.config import parse_job
from infscaled.generation.sampling import SamplingParams
from infscaled.models import inputs
from infscaled.models.sources import resolve
from infscaled.models.stage import Monolith
from infscaled.planning.scale import ScaleError, scale_shape
from infscaled.protocol.plan import Node
from infscaled.runner.launcher import LocalJob, prepare
from infscaled.runner.workload import Outcome, requests_for

WAIT_S = 120.0


def _until(check: Any, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class ClosedLoop(ClientThreads):
    """`concurrency` clients, each submitting the next request as soon as its last one answered."""

    join_s = WAIT_S

    def __init__(self, submit: Any, requests: Iterator[torch.Tensor], limit: int, concurrency: int,
                 think_s: float = 0.0) -> None:
        self.submit = submit
        self.think_s = think_s
        self.requests = requests
        self.limit = limit
        self.outcomes: list[Outcome] = []
        self.answers = [0] * limit
        self._next = 0
        self._lock = threading.Lock()
        super().__init__(self._client, [()] * concurrency)

    def done(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def _client(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._next == self.limit:
                    return
                i, self._next = self._next, self._next + 1
                x = next(self.requests)
            outcome = Outcome(i, x)
            try:
                fut: Future[torch.Tensor] = self.submit(x)
                outcome.result = fut.result(WAIT_S)
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on by the test
                outcome.error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.answers[i] += 1
                self.outcomes.append(outcome)
            self._stop.wait(self.think_s)


def test_forward_stage_scales_2_4_1_3_under_load(tmp_path: Path) -> None:
    cfg = parse_job({"name": "scale", "model": {"source": "builtin:gpt2-tiny"},
                     "pipeline": {"stages": 2, "replicas": [1, 2], "policy": "shortest_queue",
                                  "micro_batch_size": 4, "max_inflight": 6, "max_wait_ms": 1.0},
                     "workload": {"samples": [1, 2], "seq_len": [16, 16]}}, str(tmp_path / "scale.toml"))
    prepared = prepare(cfg)
    requests = requests_for(cfg.workload, prepared.spec, 50_000)
    with LocalJob(prepared) as job, ClosedLoop(job.submit, requests, 50_000, 4, think_s=0.01) as load:
        _until(lambda: load.done() >= 20, "traffic before scaling")
        for replicas in (4, 1, 3):
            result = job.scale(1, replicas)
            assert len(job.plan.nodes(1)) == replicas and job.plan.epoch == result.plan.epoch
            for node in result.added:  # each new replica carries traffic within seconds
                _until(lambda n=node: (s := job.group.handles[n].stats) is not None and s.micro_batches > 0,
                       f"{node} to carry traffic (ready: {job.group.handles[node].ready is not None})")
            for node in result.removed:  # each removed one drains and exits cleanly
                _until(lambda n=node: job.group.handles[n].exited, f"{node} to exit")
                assert job.group.handles[node].exitcode == 0, job.group.handles[node].failure
            before = load.done()
            _until(lambda b=before: load.done() >= b + 10, f"traffic after scaling to {replicas}")
        assert job.group.failure is None
    assert job.dispatcher is not None and job.dispatcher.failure is None
    failed = [o for o in load.outcomes if o.error is not None]
    assert not failed, failed[0].error
    assert all(n <= 1 for n in load.answers), "a request was answered twice"
    assert sum(load.answers) == len(load.outcomes) >= 80
    assert [n.replica for n in job.plan.nodes(1)] == [0, 4, 5]  # ids are never reused
    # Every result against the monolith: requests share one length, so they are checked 256 at a time.
    mono = Monolith(prepared.resolved, "cpu", "float32", cfg.model.seed)
    for at in range(0, len(load.outcomes), 256):
        chunk = load.outcomes[at:at + 256]
        xs = torch.cat([o.request for o in chunk])
        expected = mono.forward(inputs.collate(prepared.spec, [xs], torch.float32))
        got = torch.cat([o.result for o in chunk if o.result is not None])
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=1e-4), \
            f"requests {at}..{at + len(chunk) - 1}: max |err| {float((got - expected).abs().max())}"


def test_generation_chains_scale_1_2_1_while_streaming() -> None:
    cfg = parse_job({"name": "gen-scale", "model": {"source": "builtin:llama-tiny"},
                     "pipeline": {"stages": 2, "replicas": [1, 1]},
                     "generation": {"max_batch_sequences": 4}})
    mono = Monolith(resolve(cfg.model.source), "cpu", "float32", 0)
    gen = torch.Generator().manual_seed(11)
    work = [(torch.randint(1, 500, (int(torch.randint(2, 12, (1,), generator=gen)),), generator=gen).tolist(),
             int(torch.randint(8, 24, (1,), generator=gen))) for _ in range(32)]
    expected = []
    for prompt, new in work:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = mono.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                      do_sample=False, pad_token_id=0, eos_token_id=None)
        expected.append(out[0, len(prompt):].tolist())
    got: list[list[int]] = [[] for _ in work]
    errors: list[str] = []
    finished = [threading.Event() for _ in work]

    def consumer(i: int) -> Any:
        def consume(token: int, done: bool, error: str | None) -> None:
            if error is not None:
                errors.append(error)
            else:
                got[i].append(token)
            if done:
                finished[i].set()
        return consume

    with LocalJob(prepare(cfg)) as job:
        seqs = job.generator
        for i, (prompt, new) in enumerate(work[:16]):
            seqs.submit(prompt, SamplingParams(max_new_tokens=new, temperature=0.0), consumer(i))
        up = job.scale(None, 2)
        assert [n.replica for n in up.added] == [1, 1]
        for i, (prompt, new) in enumerate(work[16:], start=16):
            seqs.submit(prompt, SamplingParams(max_new_tokens=new, temperature=0.0), consumer(i))
        _until(lambda: (s := job.group.handles[Node(0, 1)].stats) is not None and s.micro_batches > 0,
               "the new chain to carry sequences")
        down = job.scale(None, 1)
        assert set(down.removed) == {Node(0, 1), Node(1, 1)}
        for f in finished:
            assert f.wait(WAIT_S), "a stream never finished"
        for node in down.removed:  # the removed chain finished its sequences, then drained
            _until(lambda n=node: job.group.handles[n].exited, f"{node} to exit")
            assert job.group.handles[node].exitcode == 0, job.group.handles[node].failure
        assert seqs.live() == 0
    assert errors == []
    assert got == expected


def test_scale_requests_that_cannot_be_carried_out_say_why() -> None:
    cfg = parse_job({"name": "bad-scale", "model": {"source": "builtin:gpt2-tiny"},
                     "pipeline": {"stages": 2, "replicas": [2, 2], "graph": "parallel"}})
    plan = prepare(cfg).plan
    with pytest.raises(ScaleError, match="only 'mesh' graphs"):
        scale_shape(plan, 1, 3)
    with pytest.raises(ScaleError, match="stage 5 does not exist"):
        scale_shape(plan, 5, 3)
    with pytest.raises(ScaleError, match=r"replicas = 0: allowed 1\.\.256"):
        scale_shape(plan, 1, 0)
    with pytest.raises(ScaleError, match="name the stage"):
        scale_shape(plan, None, 2)


def test_scale_plans_edges_and_per_node_updates() -> None:
    cfg = parse_job({"name": "pure", "model": {"source": "builtin:gpt2-tiny"},
                     "pipeline": {"stages": 3, "replicas": [1, 2, 1]}})
    plan = prepare(cfg).plan
    from infscaled.planning.scale import apply_scale

    up = scale_shape(plan, 1, 3)
    assert up.added == (Node(1, 2),) and up.removed == ()
    assert set(up.new_edges) == {(Node(0, 0), Node(1, 2)), (Node(1, 2), Node(2, 0))}
    change = apply_scale(plan, up, {Node(1, 2): "cpu"}, [31001, 31002])
    assert change.plan.epoch == plan.epoch + 1 and change.plan.stages[1].replicas == 3
    assert {n: [e.key for e in u.add] for n, u in change.updates.items()} == {
        Node(0, 0): ["0.0->1.2"], Node(2, 0): ["1.2->2.0"]}
    down = scale_shape(change.plan, 1, 1)
    assert down.removed == (Node(1, 2), Node(1, 1))
    gone = apply_scale(change.plan, down, {}, [])
    # Only the senders into removed replicas act: they drain those edges; the rest follows by STOP.
    assert {n: sorted(u.remove) for n, u in gone.updates.items()} == {Node(0, 0): ["0.0->1.1", "0.0->1.2"]}
    assert [w.node for w in gone.plan.workers if w.node.stage == 1] == [Node(1, 0)]
    assert all(Node(1, 1) not in (e.src, e.dst) for e in gone.plan.edges)


def test_scale_at_schedule_parses_and_refuses_bad_steps() -> None:
    from infscaled.errors import InfscaledError
    from infscaled.runner.scaling import ScaleStep, parse_scale_at

    assert parse_scale_at("2:1=4") == ScaleStep(2.0, 1, 4)
    assert parse_scale_at(" 0.5:chains=2 ") == ScaleStep(0.5, None, 2)
    for bad in ("2:1", "x:1=2", "2:-1=3", "2:one=3", "2:1=two", ""):
        with pytest.raises(InfscaledError, match=r"expected T:STAGE=N"):
            parse_scale_at(bad)
