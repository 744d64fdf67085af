"""The GPU data plane: NCCL edges, CUDA-stream stages, CUDA graphs, bf16 end to end, edge-failure isolation.

Tests marked `gpu` need CUDA and at least two GPUs; they are skipped cleanly elsewhere (CI is
CPU only). The transport choice itself is checked on any machine.

Tolerances: float32 pipelines must match the monolithic float32 reference (run on the CPU)
with allclose(atol=rtol=1e-4) (TF32 is off for float32 jobs). Half-precision pipelines are
compared with the same float32 reference by relative error ||out - ref|| / ||ref|| per request:
below 5e-2 for bfloat16 and 1e-2 for float16. Those bounds come from the monolith itself: the
bf16 monolith (CPU) is 2.4e-2 (median) and 3.1e-2 (worst) away from the float32 one on these
random-weight inputs (bf16 keeps 8 mantissa bits; the fp16 monolith: 2.9e-3 and 4.1e-3), so
the pipeline must be no worse than the model's own precision allows; the test prints the
worst error it saw.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from infscaled.config import parse_job
from infscaled.errors import TransportError
from infscaled.protocol.plan import EdgePlan, GenerationPlan, JobPlan, Node, StagePlan, WorkerPlan
from infscaled.protocol.wire import DATA, STOP, STOP_ACK
from infscaled.runner.launcher import LocalJob, prepare
from infscaled.runner.run import verify_outcomes
from infscaled.runner.workload import drive, requests_for
from infscaled.worker import nccl
from infscaled.worker.transport import ACK, Ack, Edge, Message, connect_all

HOST = "127.0.0.1"
SECRET = b"gpu-test-secret"
CTX = mp.get_context("spawn")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
two_gpus = pytest.mark.skipif(GPUS < 2, reason="needs CUDA with at least 2 GPUs")
one_gpu = pytest.mark.skipif(GPUS < 1, reason="needs CUDA")


def _port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- transport choice (any machine) ---------------------------------------------------------------


def _plan(devices: list[str]) -> JobPlan:
    d = Node(-1, 0)
    nodes = [Node(i, 0) for i in range(len(devices))]
    chain = [d, *nodes, d]
    edges = tuple(EdgePlan(a, b, HOST, 1000 + i) for i, (a, b) in enumerate(zip(chain, chain[1:], strict=False)))
    return JobPlan("j", "builtin:llama-tiny", "float32", 0,
                   tuple(StagePlan(i, i, i, 1) for i in range(len(devices))),
                   tuple(WorkerPlan(n, dev) for n, dev in zip(nodes, devices, strict=True)), edges,
                   "round_robin", 8, 4, 1.0, 30.0)


def test_transport_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nccl, "nccl_available", lambda: True)
    plan = _plan(["cuda:0", "cuda:1", "cuda:1", "cpu"])
    got = {e.key: nccl.edge_backend(plan, e) for e in plan.edges}
    assert got == {"dispatcher->0.0": "tcp",  # the dispatcher is a CPU process
                   "0.0->1.0": "nccl", "1.0->2.0": "tcp",  # one GPU cannot hold both ranks
                   "2.0->3.0": "tcp", "3.0->dispatcher": "tcp"}
    # A generation job's edges the same way, the loop's last -> first edge too: its stages follow
    # the stream contract of engine/cuda.py (activations device to device, tokens on the host).
    gen = replace(_plan(["cuda:0", "cuda:1"]), generation=GenerationPlan(1000, 4, 2))
    gen = replace(gen, edges=(*gen.edges, EdgePlan(Node(1, 0), Node(0, 0), HOST, 2000)))
    assert {e.key: nccl.edge_backend(gen, e) for e in gen.edges} == {
        "dispatcher->0.0": "tcp", "0.0->1.0": "nccl", "1.0->dispatcher": "tcp", "1.0->0.0": "nccl"}
    monkeypatch.setenv(nccl.TRANSPORT_ENV, "tcp")
    assert {nccl.edge_backend(plan, e) for e in plan.edges} == {"tcp"}
    monkeypatch.delenv(nccl.TRANSPORT_ENV)
    monkeypatch.setattr(nccl, "nccl_available", lambda: False)
    assert {nccl.edge_backend(plan, e) for e in plan.edges} == {"tcp"}
    connector = nccl.transport_chooser(plan, Node(0, 0))(plan.edges[0])
    assert callable(connector) and not isinstance(connector, type)  # TCP, keyed with the plan's secret


# -- pipelines on 2 GPUs ----------------------------------------------------------------------------


def _job(tmp_path: Path, name: str, source: str, dtype: str, stages: int, devices: list[str]) -> Any:
    data = {"name": name, "model": {"source": source, "dtype": dtype},
            "pipeline": {"stages": stages, "micro_batch_size": 8, "max_inflight": 6},
            "placement": {"devices": devices},
            "workload": {"samples": [1, 3], "seq_len": [1, 40]}}  # padded micro-batches too
    return parse_job(data, str(tmp_path / f"{name}.toml"), base_dir=tmp_path)


def _run(cfg: Any, requests: int) -> tuple[Any, Any, Any]:
    prepared = prepare(cfg)
    backends = {e.key: nccl.edge_backend(prepared.plan, e) for e in prepared.plan.edges}
    with LocalJob(prepared) as job:
        run = drive(job.submit, requests_for(cfg.workload, prepared.spec, requests), requests, 0.0, 24)
        job.stop()
    assert not run.failed, run.failed[0].error
    assert len(run.completed) == requests
    for h in job.state.workers.values():
        assert h.done and h.process.exitcode == 0, f"{h.node} exit {h.process.exitcode}"
        assert h.stats is not None and h.stats.micro_batches > 0
    return prepared, run, backends


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("source", ["builtin:llama-tiny", "builtin:llama-tiny-last"])
def test_nccl_pipeline_matches_monolith_fp32(tmp_path: Path, source: str) -> None:
    prepared, run, backends = _run(_job(tmp_path, "gpu-fp32", source, "float32", 2, ["cuda:0", "cuda:1"]), 40)
    assert backends["0.0->1.0"] == "nccl"
    v = verify_outcomes(prepared, run.completed)
    assert v.checked == 40 and v.mismatched == 0, f"max abs err {v.max_abs_err}"


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_nccl_pipeline_half_precision(tmp_path: Path, dtype: str) -> None:
    from infscaled.models import inputs
    from infscaled.models.stage import Monolith

    prepared, run, backends = _run(_job(tmp_path, f"gpu-{dtype}", "builtin:llama-tiny", dtype, 2,
                                        ["cuda:0", "cuda:1"]), 24)
    assert backends["0.0->1.0"] == "nccl"
    mono = Monolith(prepared.resolved, "cpu", "float32", prepared.plan.seed)
    worst = 0.0
    for o in run.completed:
        assert o.result.dtype == getattr(torch, dtype)  # half precision end to end
        ref = mono.forward(inputs.collate(prepared.spec, [o.request], torch.float32))
        got = o.result.float()
        assert got.shape == ref.shape and torch.isfinite(got).all()
        worst = max(worst, float((got - ref).norm() / ref.norm()))
    print(f"{dtype}: worst relative error {worst:.2e}")
    assert worst < {"bfloat16": 5e-2, "float16": 1e-2}[dtype]


# -- the engine's CUDA path on one GPU ----------------------------------------------------------------


@pytest.mark.gpu
@one_gpu
@pytest.mark.parametrize(("source", "graphs"), [("builtin:llama-tiny", True), ("builtin:llama-tiny-last", True),
                                                 ("builtin:llama-tiny", False)])
def test_cuda_stages_on_one_gpu_match_monolith(tmp_path: Path, source: str, graphs: bool) -> None:
    """Two CUDA stages on one GPU (engine/cuda.py streams, programs/forward.py's enqueue-only compute
    and completion thread, pool buffers, graphs on and off), joined by a TCP edge (one GPU cannot
    hold both NCCL ranks): every result equals the float32 monolith's."""
    data = {"name": "gpu-one", "model": {"source": source, "dtype": "float32"},
            "pipeline": {"stages": 2, "micro_batch_size": 8, "max_inflight": 6, "cuda_graphs": graphs},
            "placement": {"devices": ["cuda:0", "cuda:0"]},
            "workload": {"samples": [1, 3], "seq_len": [1, 40]}}  # padded micro-batches too
    prepared, run, backends = _run(parse_job(data, str(tmp_path / "gpu-one.toml"), base_dir=tmp_path), 40)
    assert backends["0.0->1.0"] == "tcp"
    v = verify_outcomes(prepared, run.completed)
    assert v.checked == 40 and v.mismatched == 0, f"max abs err {v.max_abs_err}"


@pytest.mark.gpu
@one_gpu
def test_cuda_stage_bf16_on_one_gpu(tmp_path: Path) -> None:
    """One bf16 CUDA stage with graphs: half precision end to end, within the model's own bf16 error."""
    from infscaled.models import inputs
    from infscaled.models.stage import Monolith

    prepared, run, _ = _run(_job(tmp_path, "gpu-one-bf16", "builtin:llama-tiny", "bfloat16", 1, ["cuda:0"]), 24)
    mono = Monolith(prepared.resolved, "cpu", "float32", prepared.plan.seed)
    worst = 0.0
    for o in run.completed:
        assert o.result.dtype == torch.bfloat16
        ref = mono.forward(inputs.collate(prepared.spec, [o.request], torch.float32))
        got = o.result.float()
        assert got.shape == ref.shape and torch.isfinite(got).all()
        worst = max(worst, float((got - ref).norm() / ref.norm()))
    print(f"one GPU bf16: worst relative error {worst:.2e}")
    assert worst < 5e-2


# -- CUDA graphs ------------------------------------------------------------------------------------


@pytest.mark.gpu
@two_gpus
def test_cuda_graphs_replay_and_match_monolith(tmp_path: Path) -> None:
    """Graphs on (the default), 2 stages over NCCL: micro-batches of two shapes, enough of each to be
    captured and replayed, sent all at once (replays overlap the sends of earlier outputs, so
    returning the static outputs instead of clones would corrupt results), then one padded
    micro-batch of the first shape (eager: the mask is not all ones). Every result must match the
    float32 monolith, and each stage must report exactly the replays the graph rules predict."""
    from infscaled.runner.workload import Outcome
    from infscaled.worker.graphs import WARMUP

    data = {"name": "gpu-graphs", "model": {"source": "builtin:llama-tiny-last", "dtype": "float32"},
            # max_wait_ms: the two padded halves below always meet in one micro-batch.
            "pipeline": {"stages": 2, "micro_batch_size": 4, "max_inflight": 4, "max_wait_ms": 2000.0,
                         "cuda_graphs": True},
            "placement": {"devices": ["cuda:0", "cuda:1"]}}
    prepared = prepare(parse_job(data, str(tmp_path / "gpu-graphs.toml"), base_dir=tmp_path))
    assert prepared.plan.cuda_graphs
    vocab, g = prepared.spec.vocab_size, torch.Generator().manual_seed(0)
    n_a, n_b = WARMUP + 4, WARMUP + 2  # of shape A [4, 16] and B [4, 24], each a full micro-batch
    full = [torch.randint(0, vocab, (4, 16 if i % 2 == 0 or i >= 2 * n_b else 24), generator=g)
            for i in range(n_a + n_b)]  # A and B interleaved, then the rest of A
    padded = [torch.randint(0, vocab, (2, 16), generator=g), torch.randint(0, vocab, (2, 9), generator=g)]
    with LocalJob(prepared) as job:
        futures = [job.submit(x) for x in full]
        results = [f.result(timeout=120) for f in futures]
        futures = [job.submit(x) for x in padded]  # one micro-batch [4, 16] with a padding mask
        results += [f.result(timeout=120) for f in futures]
        job.stop()
    for h in job.state.workers.values():
        assert h.done and h.process.exitcode == 0, f"{h.node} exit {h.process.exitcode}"
        assert h.stats is not None
        assert h.stats.micro_batches == n_a + n_b + 1
        assert h.stats.graph_replays == (n_a - WARMUP) + (n_b - WARMUP), f"{h.node}: {h.stats}"
    outcomes = [Outcome(i, x, result=r) for i, (x, r) in enumerate(zip(full + padded, results, strict=True))]
    v = verify_outcomes(prepared, outcomes)
    assert v.checked == len(outcomes) and v.mismatched == 0, f"max abs err {v.max_abs_err}"


# -- edge-failure isolation -------------------------------------------------------------------------


def _payload(i: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"requests": torch.tensor([[i, 2]]),  # host tensor: travels over TCP
            "hidden": torch.randn(2, 64, 256, generator=g).to(device, torch.bfloat16)}


def _nccl_receiver(plan: EdgePlan, me: Node, device: str, results: Any) -> None:
    """Child: receive on one NCCL edge, check every tensor, ack; report (node, count, errors)."""
    torch.cuda.set_device(device)
    edge = Edge.connect(plan, me, HOST, 60.0, nccl.NcclTransport.on(device, SECRET))
    count = bad = 0
    try:
        while True:
            msg = edge.recv()
            if msg.kind == STOP:
                edge.send_ack(Ack(STOP_ACK, 0))
                break
            if msg.ready is not None:
                msg.ready.synchronize()
            want = _payload(msg.mb_id, device)
            ok = (msg.tensors["requests"].device.type == "cpu"
                  and torch.equal(msg.tensors["requests"], want["requests"])
                  and torch.equal(msg.tensors["hidden"], want["hidden"]))
            count += 1
            bad += not ok
            edge.send_ack(Ack(ACK, msg.mb_id, 2, 0))
    finally:
        results.put((str(me), count, bad))
        edge.close()


@pytest.mark.gpu
@two_gpus
def test_nccl_dead_peer_fails_only_its_edge() -> None:
    """A (this process, cuda:0) -> B and A -> C (children, both on cuda:1, each its own NCCL
    communicator). Kill B: A's edge to B breaks at once through its TCP connection and its NCCL
    group is aborted, while A -> C keeps moving device tensors."""
    me, b, c = Node(-1, 0), Node(0, 0), Node(0, 1)
    to_b, to_c = EdgePlan(me, b, HOST, _port()), EdgePlan(me, c, HOST, _port())
    results = CTX.Queue()
    pb = CTX.Process(target=_nccl_receiver, args=(to_b, b, "cuda:1", results), daemon=True)
    pc = CTX.Process(target=_nccl_receiver, args=(to_c, c, "cuda:1", results), daemon=True)
    pb.start()
    pc.start()
    torch.cuda.set_device(0)
    edges = connect_all([to_b, to_c], me, HOST, 60.0, nccl.NcclTransport.on("cuda:0", SECRET))
    eb, ec = edges[to_b.key], edges[to_c.key]
    try:
        assert eb.device_channel and ec.device_channel
        for i in range(3):
            for e in (eb, ec):
                e.send(Message(DATA, i, 0, _payload(i, "cuda:0")))
                assert e.recv_ack().mb_id == i
        # A thread blocked in recv_ack on B's edge, as a stage's ack thread would be.
        ack_error: list[BaseException] = []

        def wait_ack() -> None:
            try:
                eb.recv_ack()
            except BaseException as exc:  # noqa: BLE001
                ack_error.append(exc)

        waiter = threading.Thread(target=wait_ack, daemon=True)
        waiter.start()
        os.kill(pb.pid, signal.SIGKILL)
        pb.join(10)
        killed = time.monotonic()
        waiter.join(10)
        assert ack_error and isinstance(ack_error[0], TransportError), ack_error
        assert time.monotonic() - killed < 5, "the dead peer must be noticed through TCP at once"
        assert eb.transport._nccl is None, "the dead peer's NCCL group must be aborted"  # type: ignore[attr-defined]
        with pytest.raises(TransportError, match="broken"):
            eb.send(Message(DATA, 99, 0, _payload(99, "cuda:0")))
        for i in range(3, 23):  # the other edge keeps moving data device to device
            ec.send(Message(DATA, i, 0, _payload(i, "cuda:0")))
            assert ec.recv_ack().mb_id == i
        ec.send(Message(STOP, 0, 0, {}))
        assert ec.recv_ack().kind == STOP_ACK
        assert results.get(timeout=30) == (str(c), 23, 0)
    finally:
        for e in edges.values():
            e.close()
        for p in (pb, pc):
            if p.is_alive():
                p.kill()
            p.join(10)
