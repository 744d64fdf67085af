"""[pipeline] keys that only show under failure: edge_timeout_s bounds a send to a peer that has
stopped reading (a hung worker), so a job fails with the edge's name in seconds, not minutes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from infscaled.config import parse_job
from infscaled.protocol.plan import Node
from infscaled.runner.launcher import LocalJob, prepare


def test_edge_timeout_s_bounds_a_send_to_a_hung_peer(tmp_path: Path) -> None:
    cfg = parse_job({"name": "hang", "model": {"source": "builtin:gpt2-tiny"},
                     "pipeline": {"stages": 2, "micro_batch_size": 1, "max_inflight": 8, "edge_timeout_s": 2.0},
                     "workload": {"request_timeout_s": 60}}, str(tmp_path / "hang.toml"))
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
            os.kill(hung.pid, signal.SIGCONT)
        assert failure is not None and "0.0->1.0" in failure, failure
        assert took < 20.0, f"the stalled send failed only after {took:.1f} s (edge_timeout_s = 2)"
        for f in futures:
            assert f.exception(30) is not None
