"""Strangers on the data plane (issue 13): edge listeners prove the job's secret before reading
anything else, bound what an unproven connection can hold, and close once the edge is joined.

One scenario in-process (the listener and a real peer in threads, real sockets), one with real
worker processes: a stranger attacks every data port of a job from before it starts, while it
serves, and while a stage scales up (new edges open listeners on a serving worker): no secret,
a wrong secret, garbage, a well-formed wire header, floods. The job serves every request, each
result checked against the monolithic model, and each refusal is logged once and counted.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
from test_scaling import ClosedLoop, _until

from benchmarks.stranger import Stranger
from infscaled.config import parse_job
from infscaled.errors import TransportError
from infscaled.models import inputs
from infscaled.models.stage import Monolith
from infscaled.planning.ports import PORTS_ENV
from infscaled.protocol.plan import EdgePlan, JobPlan, Node, StagePlan, WorkerPlan, plan_from_dict, plan_to_dict
from infscaled.protocol.wire import DATA
from infscaled.runner.launcher import LocalJob, prepare
from infscaled.runner.workload import requests_for
from infscaled.worker import edgeauth
from infscaled.worker.transport import Edge, Message

HOST = "127.0.0.1"
SECRET = b"the-job-secret"


def _port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def test_listener_refuses_strangers_and_still_admits_the_peer(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Silent, wrong-secret, garbage and wire-header connections and a flood hit an edge's listener
    before its peer joins: each is refused with its reason (logged once per reason, counted), the
    listener never holds more than MAX_PENDING of them, and the real peer still joins; a proof
    made for another edge key is refused too; afterwards nothing listens."""
    monkeypatch.setattr(edgeauth, "HANDSHAKE_S", 0.5)
    plan = EdgePlan(Node(-1, 0), Node(0, 0), HOST, _port())
    before = edgeauth.refused()
    box: dict[str, object] = {}

    def listen() -> None:
        try:
            box["edge"] = Edge.connect(plan, plan.src, HOST, 30.0, secret=SECRET)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            box["error"] = exc

    caplog.set_level(logging.WARNING, logger="infscaled.worker.edgeauth")
    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    with Stranger(burst=300) as stranger:
        stranger.aim([plan.port])
        _until(lambda: stranger.seen["flood connections"] > 0 and stranger.seen["listener reached"] > 8,
               "the stranger to reach the listener", 30.0)
        # A proof made for another edge of the same job is no proof for this one.
        with socket.create_connection((HOST, plan.port), timeout=5) as s:
            hello = s.recv(edgeauth.HELLO_BYTES)
            mine = os.urandom(32)
            s.sendall(edgeauth.MAGIC + mine + edgeauth._mac(SECRET, b"dst", "dispatcher->0.1", hello[8:], mine))
            assert s.recv(64) == b""
        peer = Edge.connect(plan, plan.dst, HOST, 30.0, secret=SECRET)
        listener.join(30)
    assert "error" not in box, box.get("error")
    sender = box["edge"]
    assert isinstance(sender, Edge)
    try:
        sender.send(Message(DATA, 7, 0, {"x": torch.arange(5)}))
        got = peer.recv()
        assert got.mb_id == 7 and torch.equal(got.tensors["x"], torch.arange(5))
        with pytest.raises(ConnectionRefusedError):  # joined: the listener is gone
            socket.create_connection((HOST, plan.port), timeout=2)
    finally:
        sender.close()
        peer.close()
    after = edgeauth.refused()
    new = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert new.get(edgeauth.WRONG_SECRET, 0) >= 2, new  # the stranger's guesses + the other edge's proof
    assert new.get(edgeauth.GARBAGE, 0) >= 2, new  # random bytes and a wire header alike
    assert new.get(edgeauth.TOO_SLOW, 0) + new.get(edgeauth.EVICTED, 0) >= 1, new  # the silent ones
    assert stranger.seen["listener reached"] > 4, stranger.seen
    assert stranger.seen["wrong_secret closed by the listener"] >= 1, stranger.seen
    assert stranger.seen["garbage closed by the listener"] + stranger.seen["garbage reset"] >= 1, stranger.seen
    log_text = "\n".join(r.getMessage() for r in caplog.records)
    reasons = Counter(re.findall(r"refused a data-plane connection from \S+: ([^(]+?) \(", log_text))
    assert len(reasons) >= 3 and all(n == 1 for n in reasons.values()), log_text  # once per reason
    assert any(f"edge {plan.key}: refused" in r.getMessage() and "while joining" in r.getMessage()
               for r in caplog.records), "no summary line"


def test_an_edge_without_a_secret_or_with_another_jobs_secret_does_not_join() -> None:
    plan = EdgePlan(Node(-1, 0), Node(0, 0), HOST, _port())
    with pytest.raises(TransportError, match="carries no data-plane secret"):
        Edge.connect(plan, plan.src, HOST, 1.0, secret=b"")
    box: dict[str, BaseException] = {}

    def other_job() -> None:
        try:
            Edge.connect(plan, plan.dst, HOST, 1.0, secret=b"another job's secret")
        except BaseException as exc:  # noqa: BLE001 - asserted below
            box["peer"] = exc

    th = threading.Thread(target=other_job, daemon=True)
    th.start()
    with pytest.raises(TransportError, match=r"no receiver joined at 127\.0\.0\.1:\d+ within 1\.0s"):
        Edge.connect(plan, plan.src, HOST, 1.0, secret=SECRET)
    th.join(10)
    assert isinstance(box.get("peer"), TransportError), box
    # The secret travels with the plan (to agents and the database), never in its repr.
    prepared_plan = JobPlan("j", "builtin:gpt2-tiny", "float32", 0, (StagePlan(0, 0, 1, 1),),
                            (WorkerPlan(Node(0, 0), "cpu"),), (plan,), "round_robin", 4, 4, 1.0, 30.0)
    again = JobPlan("j", "builtin:gpt2-tiny", "float32", 0, (StagePlan(0, 0, 1, 1),),
                    (WorkerPlan(Node(0, 0), "cpu"),), (plan,), "round_robin", 4, 4, 1.0, 30.0)
    assert again.secret != prepared_plan.secret  # fresh per plan
    assert len(prepared_plan.secret) == 64 and prepared_plan.secret not in repr(prepared_plan)
    assert plan_from_dict(plan_to_dict(prepared_plan)).secret == prepared_plan.secret


def test_a_serving_job_under_attack_on_its_data_ports(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Real workers: the stranger aims at every port the job may take (its edge ports come from a
    small range of its own), from before start-up to the end, so also at the new edges of a
    scale-up while serving the moment they open (the serving worker 0.0 listens for its new peer
    only while that peer starts: a fraction of a second with a warm start, which a stranger aimed
    only once the new plan was seen could miss). Nothing is lost, every result is the monolith's,
    the worker's descriptors stay bounded, refusals are logged once per (edge, reason)."""
    first = 20100  # above the default pick range (10000-19999): no other test's edges land here
    monkeypatch.setenv(PORTS_ENV, f"{first}-{first + 39}")
    cfg = parse_job({"name": "hostile-dp", "model": {"source": "builtin:gpt2-tiny"},
                     "pipeline": {"stages": 2, "replicas": [1, 1], "micro_batch_size": 4, "max_inflight": 6,
                                  "max_wait_ms": 1.0},
                     "workload": {"samples": [1, 2], "seq_len": [16, 16]}}, str(tmp_path / "hostile.toml"))
    prepared = prepare(cfg)
    before = edgeauth.refused()
    requests = requests_for(cfg.workload, prepared.spec, 10_000)
    assert all(first <= e.port < first + 40 for e in prepared.plan.edges)
    with Stranger() as stranger:
        stranger.aim(range(first, first + 40))
        with LocalJob(prepared) as job, ClosedLoop(job.submit, requests, 10_000, 4) as load:
            _until(lambda: load.done() >= 20, "traffic under attack")
            for e in prepared.plan.edges:  # joined: a serving job's data ports are closed
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection((HOST, e.port), timeout=2)
            w00 = psutil.Process(job.group.handles[Node(0, 0)].process.pid)
            fds_serving = w00.num_fds()
            # Scale up: 0.0 listens for 1.1 while 1.1 starts, and the stranger aims there.
            scaling = threading.Thread(target=job.scale, args=(1, 2), daemon=True)
            scaling.start()
            _until(lambda: job.plan.epoch == 1, "the new epoch's plan")
            assert all(first <= e.port < first + 40 for e in job.plan.edges)
            peak = fds_serving
            while scaling.is_alive():
                peak = max(peak, w00.num_fds())
                time.sleep(0.02)
            assert job.group.handles[Node(1, 1)].ready is not None, job.group.failure
            _until(lambda: (s := job.group.handles[Node(1, 1)].stats) is not None and s.micro_batches > 0,
                   "the new replica to carry traffic")
            done = load.done()
            _until(lambda: load.done() >= done + 20, "traffic after scaling under attack")
            assert job.group.failure is None
        assert job.dispatcher is not None and job.dispatcher.failure is None
    assert stranger.seen["listener reached"] > 0, stranger.seen
    failed = [o for o in load.outcomes if o.error is not None]
    assert not failed, failed[0].error
    assert all(n <= 1 for n in load.answers) and sum(load.answers) == len(load.outcomes)
    mono = Monolith(prepared.resolved, "cpu", "float32", cfg.model.seed)
    for at in range(0, len(load.outcomes), 256):
        chunk = load.outcomes[at:at + 256]
        expected = mono.forward(inputs.collate(prepared.spec, [torch.cat([o.request for o in chunk])], torch.float32))
        got = torch.cat([o.result for o in chunk if o.result is not None])
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), f"requests {at}..: results differ"
    # The serving worker held at most MAX_PENDING unproven connections at a time (+ the new edge).
    assert peak - fds_serving <= edgeauth.MAX_PENDING + 8, (fds_serving, peak)
    # Refusals: the dispatcher (this process) counted its own; the workers logged theirs.
    after = edgeauth.refused()
    assert sum(after.values()) > sum(before.values()), after
    err = capfd.readouterr().err
    lines = re.findall(r"edge (\S+): refused a data-plane connection from \S+: ([^(]+?) \(", err)
    assert any(edge == "0.0->1.1" for edge, _ in lines), err[-3000:]  # the serving worker's new edge
    per = Counter(lines)
    assert all(n == 1 for n in per.values()), per  # once per (edge, reason), however many came
    assert re.search(r"edge 0\.0->1\.1: refused \d+ data-plane connection\(s\) while joining", err), err[-3000:]
