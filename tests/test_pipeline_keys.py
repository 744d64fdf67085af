"""A test per documented [pipeline] key that shows its effect on a running job (docs/job-file.md).

Elsewhere: stages / layers / replicas / graph / edges / policy (tests/test_pipeline.py, every
family, graph kind and policy against the monolith; tests/test_planning.py), compile and
cuda_graphs (CUDA only: tests/test_gpu.py, tests/test_graphs.py; their values reach the plan:
tests/test_planning.py). Here, with real worker processes: micro_batch_size, max_wait_ms and
max_inflight shape the dispatcher's micro-batches, and edge_timeout_s bounds a send to a peer
that has stopped reading (a hung worker), so a job fails with the edge's name in seconds.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from infscaled.config import parse_job
from infscaled.errors import RequestError
from infscaled.protocol.plan import Node
from infscaled.runner.launcher import LocalJob, prepare


def test_edge_timeout_s_bounds_a_send_to_a_hung_peer(tmp_path: Path) -> None:
    cfg = parse_job({"name": "hang", "model": {"source": "builtin:gpt2-tiny"},
                     "pipeline": {"stages": 2, "micro_batch_size": 1, "max_inflight": 8, "edge_timeout_s": 2.0},
                     "workload": {"request_timeout_s": 60},
                     # The edge timeout, not the heartbeat, finds the hung peer here; recovery off: the job fails.
                     "recovery": {"enabled": False, "heartbeat_timeout_s": 600}}, str(tmp_path / "hang.toml"))
    with LocalJob(prepare(cfg)) as job:
        hung = job.group.handles[Node(1, 0)].process
        assert job.submit(torch.tensor([[1, 2, 3]])).result(60) is not None
        os.kill(hung.pid, signal.SIGSTOP)  # alive, but reads nothing any more
        try:
            started = time.monotonic()
            futures = [job.submit(torch.tensor([[1, 2, 3]])) for _ in range(8)]
            failure = job.group.wait_failure(30.0)
            took = time.monotonic() - started
        finally:
            if hung.is_alive():
                os.kill(hung.pid, signal.SIGCONT)
        assert failure is not None and "0.0->1.0" in failure, failure
        assert took < 20.0, f"the stalled send failed only after {took:.1f} s (edge_timeout_s = 2)"
        for f in futures:
            assert f.exception(30) is not None


def _until(check: object, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_micro_batch_size_max_wait_ms_and_max_inflight_shape_the_micro_batches(tmp_path: Path) -> None:
    cfg = parse_job({"name": "batching", "model": {"source": "builtin:gpt2-tiny"},
                     "pipeline": {"stages": 1, "micro_batch_size": 3, "max_inflight": 2, "max_wait_ms": 1500.0}},
                     str(tmp_path / "batching.toml"))
    one = torch.tensor([[1, 2, 3, 4]])
    with LocalJob(prepare(cfg)) as job:
        stage = job.group.handles[Node(0, 0)]

        def stats() -> tuple[int, int]:
            s = stage.stats
            return (s.micro_batches, s.samples) if s is not None else (0, 0)

        # max_wait_ms: a lone request waits that long for company before it goes part-full.
        started = time.monotonic()
        assert job.submit(one).result(60) is not None
        assert time.monotonic() - started >= 1.4
        # micro_batch_size: six single-sample requests go as two full micro-batches at once,
        # long before max_wait_ms; a request larger than a micro-batch is refused.
        for f in [job.submit(one) for _ in range(6)]:
            assert f.result(60) is not None
        _until(lambda: stats()[1] == 7, "the stage's stats")
        assert stats() == (3, 7)
        with pytest.raises(RequestError, match="more than micro_batch_size"):
            job.submit(torch.ones((4, 4), dtype=torch.int64))
        # max_inflight: with the stage stopped, two micro-batches enter the pipeline, never more.
        os.kill(stage.process.pid, signal.SIGSTOP)
        try:
            futures = [job.submit(one) for _ in range(12)]
            assert job.dispatcher is not None
            _until(lambda: job.dispatcher.inflight() == 2, "two micro-batches in flight")  # type: ignore[union-attr]
            seen = set()
            for _ in range(25):
                seen.add(job.dispatcher.inflight())
                time.sleep(0.02)
            assert seen == {2}, seen
        finally:
            os.kill(stage.process.pid, signal.SIGCONT)
        for f in futures:
            assert f.result(60) is not None
        _until(lambda: stats()[1] == 19, "the stage's stats")
        assert stats() == (7, 19)
