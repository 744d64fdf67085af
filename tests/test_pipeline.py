"""Integration: real worker processes over gloo on 127.0.0.1, every family, graph and policy.

Each job's results are checked against the monolithic model (the family's own Hugging Face /
torch forward) run on each request alone. Processes are expensive (~3 s of imports each), so
one job serves several checks where it can.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from infscaled.config import parse_job
from infscaled.config.schema import RecoveryConfig
from infscaled.errors import RequestError
from infscaled.models.sources import resolve
from infscaled.models.stage import skeleton
from infscaled.protocol.plan import Node
from infscaled.runner.launcher import LocalJob, prepare
from infscaled.runner.run import verify_outcomes
from infscaled.runner.workload import drive, requests_for


def job_config(tmp_path: Path, name: str, model: dict[str, Any], pipeline: dict[str, Any],
               workload: dict[str, Any] | None = None, devices: Any = "auto") -> Any:
    data = {"name": name, "model": model, "pipeline": pipeline, "placement": {"devices": devices},
            "workload": workload or {}}
    return parse_job(data, str(tmp_path / f"{name}.toml"), base_dir=tmp_path)


def run_verified(cfg: Any, requests: int) -> tuple[LocalJob, Any]:
    """Run `requests` requests of the job's workload, check every result against the monolith."""
    prepared = prepare(cfg)
    with LocalJob(prepared) as job:
        run = drive(job.submit, requests_for(cfg.workload, prepared.spec, requests), requests, 0.0, 24)
        job.stop()
    assert not run.failed, run.failed[0].error
    assert len(run.completed) == requests
    verification = verify_outcomes(prepared, run.completed)
    assert verification.checked == requests
    assert verification.mismatched == 0, f"max abs err {verification.max_abs_err}"
    for h in job.state.workers.values():
        assert h.done and h.process.exitcode == 0, f"{h.node} exit {h.process.exitcode}"
    return job, run


# (name, model, pipeline, workload): together they cover every family, 1 to 4 stages,
# replicas, every policy and every graph kind.
JOBS = [
    ("llama-3-linear", {"source": "builtin:llama-tiny"},
     {"layers": [[0, 1], [2, 3], [4, 5]], "policy": "round_robin"}, {"samples": [1, 3], "seq_len": [1, 40]}),
    ("bert-diamond-weighted", {"source": "builtin:bert-tiny"},
     {"stages": 3, "replicas": [1, 2, 1], "graph": "mesh", "policy": "weighted"},
     {"samples": [1, 4], "seq_len": [2, 30]}),
    ("resnet-mesh-random", {"source": "builtin:resnet-tiny"},
     {"stages": 2, "replicas": [2, 2], "graph": "mesh", "policy": "random"}, {"samples": [1, 3]}),
    ("vgg-4-static", {"source": "python:infscaled.models.zoo:vgg_tiny"},
     {"stages": 4, "replicas": [1, 2, 1, 1], "policy": "static"}, {"samples": [1, 4]}),
    ("qwen2-parallel", {"source": "builtin:qwen2-tiny"},
     {"stages": 2, "replicas": [2, 2], "graph": "parallel", "policy": "round_robin"}, {"seq_len": [3, 20]}),
    ("mistral-explicit-shortest", {"source": "builtin:mistral-tiny"},
     {"stages": 2, "replicas": [2, 2], "graph": "explicit", "policy": "shortest_queue",
      "edges": [["0.0", "1.0"], ["0.1", "1.1"], ["0.1", "1.0"]]}, {"seq_len": [3, 20]}),
]


@pytest.mark.parametrize("name,model,pipeline,workload", JOBS, ids=[j[0] for j in JOBS])
def test_pipeline_matches_monolith(tmp_path: Path, name: str, model: dict, pipeline: dict,
                                   workload: dict) -> None:
    pipeline = {"micro_batch_size": 8, "max_inflight": 6, **pipeline}
    job, _ = run_verified(job_config(tmp_path, name, model, pipeline, workload), 48)
    # Every replica did real work (routing reached all of them).
    for h in job.state.workers.values():
        assert h.stats is not None and h.stats.micro_batches > 0, f"{h.node} got no work"


def test_checkpoint_directory_one_stage_replicated(tmp_path: Path) -> None:
    """A local transformers directory (safetensors) served by one stage with two replicas."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "gpt2-dir")
    cfg = job_config(tmp_path, "dir-1-stage", {"source": "./gpt2-dir"},
                     {"stages": 1, "replicas": [2], "policy": "weighted"}, {"seq_len": [2, 30]})
    run_verified(cfg, 24)


@pytest.fixture(scope="module")
def mesh_job(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The quickstart shape: gpt2-tiny, stage 1 replicated, mesh, shortest_queue; kept running."""
    tmp = tmp_path_factory.mktemp("mesh")
    cfg = job_config(tmp, "mesh", {"source": "builtin:gpt2-tiny"},
                     {"stages": 2, "replicas": [1, 2], "policy": "shortest_queue", "micro_batch_size": 8,
                      "max_inflight": 6, "max_wait_ms": 1.0},
                     {"samples": [1, 4], "seq_len": [1, 48], "seed": 11})
    prepared = prepare(cfg)
    job = LocalJob(prepared)
    job.start()
    try:
        yield prepared, job
    finally:
        job.stop()


def test_mixed_requests_each_get_exactly_their_own_result(mesh_job) -> None:  # type: ignore[no-untyped-def]
    prepared, job = mesh_job
    # 300 requests of 1-4 samples x 1-48 tokens, 40 outstanding: hundreds of micro-batches mixing
    # requests of every shape (1000 proved nothing more and took 3x as long to verify).
    n = 300
    resolved: list[int] = []
    run = drive(job.submit, requests_for(prepared.cfg.workload, prepared.spec, n), n, 0.0, 40,
                on_done=lambda o: resolved.append(o.index))
    assert not run.failed
    assert sorted(resolved) == list(range(n)), "every request resolves exactly once"
    shapes = {tuple(o.request.shape) for o in run.outcomes}
    assert len({s[0] for s in shapes}) > 1 and len({s[1] for s in shapes}) > 10, "sizes really were mixed"
    for o in run.outcomes:
        assert o.result is not None and o.result.shape == (*o.request.shape, 512)
    v = verify_outcomes(prepared, run.outcomes)
    assert v.checked == n and v.mismatched == 0, v


def test_each_worker_holds_exactly_its_own_units(mesh_job) -> None:  # type: ignore[no-untyped-def]
    prepared, job = mesh_job
    sk = skeleton(resolve(prepared.cfg.model.source))
    for stage in prepared.plan.stages:
        expected = {n for u in sk.units[stage.first_unit:stage.last_unit + 1]
                    for n in _full_names(sk.model, u)}
        for r in range(stage.replicas):
            ready = job.state.workers[Node(stage.index, r)].ready
            assert ready is not None
            assert set(ready.params) == expected, f"stage {stage.index}"
            assert ready.param_numel == sum(p.numel() for u in sk.units[stage.first_unit:stage.last_unit + 1]
                                            for p in {id(p): p for p in u.parameters()}.values())
    total = {n for n, _ in sk.model.named_parameters()}
    held = set().union(*(set(h.ready.params) for h in job.state.workers.values() if h.ready))
    assert held == total, "together the stages hold the whole model, and nothing else"


def _full_names(model: torch.nn.Module, unit: torch.nn.Module) -> set[str]:
    first_name: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(p), name)
    return {first_name[id(p)] for p in unit.parameters()}


def test_bad_request_is_rejected_with_a_clear_error(mesh_job) -> None:  # type: ignore[no-untyped-def]
    _, job = mesh_job
    with pytest.raises(RequestError, match="more than micro_batch_size"):
        job.submit(torch.zeros((9, 4), dtype=torch.int64))
    with pytest.raises(RequestError, match="token ids must be in 0..511"):
        job.submit(torch.full((1, 4), 600, dtype=torch.int64))
    with pytest.raises(RequestError, match="int64"):
        job.submit(torch.zeros((1, 4)))
    assert job.submit(torch.ones((1, 3), dtype=torch.int64)).result(timeout=30).shape == (1, 3, 512)


def test_worker_death_fails_requests_with_its_name_and_leaves_no_process(tmp_path: Path) -> None:
    """With `[recovery] enabled = false` a loss fails the job cleanly (tests/test_recovery.py: on)."""
    cfg = job_config(tmp_path, "death", {"source": "builtin:gpt2-tiny"},
                     {"stages": 2, "replicas": [1, 1], "max_inflight": 4}, {"seq_len": [4, 8]})
    prepared = prepare(dataclasses.replace(cfg, recovery=RecoveryConfig(enabled=False)))
    job = LocalJob(prepared)
    job.start()
    pids = [h.process.pid for h in job.state.workers.values()]
    try:
        victim = job.state.workers[Node(1, 0)]
        assert job.submit(torch.ones((1, 4), dtype=torch.int64)).result(timeout=30) is not None
        futures = [job.submit(torch.ones((2, 8), dtype=torch.int64)) for _ in range(40)]
        os.kill(victim.process.pid, signal.SIGKILL)
        errors = []
        for f in futures:
            try:
                f.result(timeout=60)
            except RequestError as exc:
                errors.append(str(exc))
        assert errors, "requests queued behind a dead worker must fail, not hang"
        assert any("worker 1.0" in e and "exited" in e for e in errors), errors[:3]
        with pytest.raises(RequestError, match="pipeline failed"):
            job.submit(torch.ones((1, 4), dtype=torch.int64))
    finally:
        job.stop()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_request_posted_as_the_pipeline_fails_is_failed_not_left_waiting(tmp_path: Path) -> None:
    """A submit that passed the failure check just before the failure was set posts its request
    after the dispatcher's engine has stopped: it must fail (PipelineFailedError), not wait forever
    (a closed-loop `infscaled run` then never ended after a worker died). Likewise a sequence."""
    from infscaled.errors import PipelineFailedError
    from infscaled.generation.params import SamplingParams

    cfg = job_config(tmp_path, "late", {"source": "builtin:gpt2-tiny"}, {"stages": 1},
                     {"samples": [1, 1], "seq_len": [4, 4]})
    prepared = prepare(cfg)
    with LocalJob(prepared) as job:
        dispatcher = job.dispatcher
        assert dispatcher is not None
        dispatcher.fail("a worker died (test)")
        assert dispatcher._stopped.wait(30)  # the loop is over (its threads may be joined for a while)
        dispatcher._failure = None  # the failure check passed before the failure was set
        late = job.submit(next(iter(requests_for(cfg.workload, prepared.spec, 1))))
        assert isinstance(late.exception(timeout=5), PipelineFailedError)
        dispatcher._failure = "a worker died (test)"
    gen = parse_job({"name": "late-gen", "model": {"source": "builtin:llama-tiny"}, "pipeline": {"stages": 1},
                     "generation": {}})
    with LocalJob(prepare(gen)) as job:
        seqs = job.generator
        seqs.fail("a worker died (test)")
        assert seqs._stopped.wait(30)
        seqs._failure = None
        got: list[tuple[bool, str | None]] = []
        seqs.submit([1, 2, 3], SamplingParams(max_new_tokens=2), lambda t, done, err: got.append((done, err)))
        assert got == [(True, "pipeline failed: the dispatcher has stopped")] and seqs.live() == 0
        seqs._failure = "a worker died (test)"
