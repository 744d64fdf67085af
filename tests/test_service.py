"""The dispatcher service process: real stage workers over TCP edges, real HTTP on 127.0.0.1.

One job (builtin:gpt2-tiny, 2 stages) is started through `WorkerGroup` and serves every test
of this module; results are checked against the monolithic model. The last test stops it with
SIGTERM and checks the drain and that no process is left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from infscaled.config import parse_job
from infscaled.models import inputs
from infscaled.models.sources import resolve
from infscaled.models.stage import Monolith, skeleton
from infscaled.planning.job import plan_job, ports_needed
from infscaled.planning.ports import free_ports
from infscaled.protocol import tensors
from infscaled.protocol.plan import DISPATCHER, JobPlan, Node
from infscaled.worker.entry import WorkerSpec, worker_main
from infscaled.worker.group import Member, WorkerGroup
from infscaled.worker.service import ServiceSpec, dispatcher_main, nested_shape, tensor_from_body, tensor_to_body

TOKEN = "s3cret-token"
SOURCE = "builtin:gpt2-tiny"


@dataclass
class Served:
    plan: JobPlan
    group: WorkerGroup
    url: str
    mono: Monolith
    spec: Any
    exits: list[tuple[Node, int | None, str]] = field(default_factory=list)


def make_plan(tmp: Path, name: str, stages: int = 2) -> JobPlan:
    cfg = parse_job({"name": name, "model": {"source": SOURCE},
                     "pipeline": {"stages": stages, "micro_batch_size": 8, "max_inflight": 4, "max_wait_ms": 1.0}},
                    str(tmp / f"{name}.toml"), base_dir=tmp)
    sk = skeleton(resolve(SOURCE))
    return plan_job(cfg, sk.unit_weights(), ["cpu"] * stages, free_ports(ports_needed(cfg)), "127.0.0.1")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    plan = make_plan(tmp_path_factory.mktemp("svc"), "svc")
    port = free_ports(1)[0]
    members = [Member(w.node, worker_main, WorkerSpec(plan, w.node, connect_timeout_s=60)) for w in plan.workers]
    members.append(Member(DISPATCHER, dispatcher_main,
                          ServiceSpec(plan, port, TOKEN, request_timeout_s=30, connect_timeout_s=60)))
    exits: list[tuple[Node, int | None, str]] = []
    group = WorkerGroup(plan.job, members, 90, on_exit=lambda n, c, r: exits.append((n, c, r)))
    group.start()
    try:
        assert group.wait_ready(120), group.failure
        resolved = resolve(SOURCE)
        yield Served(plan, group, f"http://127.0.0.1:{port}", Monolith(resolved, "cpu", "float32", plan.seed),
                     skeleton(resolved).family.input_spec(), exits)
    finally:
        group.stop(5.0, first=[DISPATCHER])


def post(url: str, body: bytes, content_type: str = "application/json", token: str | None = TOKEN,
         path: str = "/infer") -> tuple[int, str, bytes]:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers.get_content_type(), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get_content_type(), exc.read()


def post_json(url: str, doc: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
    status, _, body = post(url, json.dumps(doc).encode(), **kw)
    return status, json.loads(body)


def expected(s: Served, x: torch.Tensor) -> torch.Tensor:
    return s.mono.forward(inputs.collate(s.spec, [x], torch.float32))


def test_json_inference_matches_the_monolith(served: Served) -> None:
    x = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    status, doc = post_json(served.url, {"inputs": x.tolist()})
    assert status == 200, doc
    assert doc["shape"] == [2, 7, 512] and doc["dtype"] == "float32"
    got = torch.tensor(doc["output"])
    assert torch.allclose(got, expected(served, x), atol=1e-4, rtol=1e-4)


def test_binary_inference_matches_the_monolith_under_concurrency(served: Served) -> None:
    gen = torch.Generator().manual_seed(2)
    requests = [torch.randint(0, 512, (1 + i % 3, 3 + 5 * i), generator=gen) for i in range(10)]
    results: dict[int, tuple[int, str, bytes]] = {}

    def one(i: int) -> None:
        results[i] = post(served.url, tensor_to_body(requests[i]), tensors.CONTENT_TYPE)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, x in enumerate(requests):
        status, ctype, body = results[i]
        assert status == 200 and ctype == tensors.CONTENT_TYPE, body[:200]
        y = tensor_from_body(*tensors.decode(body))
        assert y.dtype == torch.float32 and y.shape == (*x.shape, 512)
        assert torch.allclose(y, expected(served, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_bad_or_missing_token_is_401(served: Served, token: str | None) -> None:
    status, doc = post_json(served.url, {"inputs": [[1, 2]]}, token=token)
    assert status == 401 and "bearer token" in doc["error"]


@pytest.mark.parametrize(("doc", "message"), [
    ({"inputs": [[1, 2], [3]]}, "inputs must be a non-empty rectangular list of numbers; inputs[1] has 1 items"),
    ({"inputs": []}, "inputs must be a non-empty rectangular list of numbers; inputs is empty"),
    ({"inputs": [[]]}, "inputs[0] is empty"),
    ({"inputs": "hello"}, "inputs must be a non-empty rectangular list of numbers, got str"),
    ({"inputs": [[1, "2"]]}, "inputs[0][1] is str, not a number"),
    ({"inputs": [[1, True]]}, "inputs[0][1] is bool, not a number"),
    ({"inputs": [[1.5, 2]]}, "token ids must be integers"),
    ({"inputs": [[600]]}, "token ids must be in 0..511"),
    ({"inputs": [[1 << 70]]}, "token ids must be in 0..511"),
    ({"inputs": [[1]] * 9}, "more than micro_batch_size (8)"),
    ({"inputs": [1, 2, 3]}, "token request must be int64 [samples, tokens]"),
    ({"input": [[1]]}, 'body must be a JSON object {"inputs": nested list}'),
    ({"inputs": [[1]], "extra": 1}, "unknown field(s) ['extra']"),
])
def test_malformed_json_inputs_are_400_with_a_clear_message(served: Served, doc: Any, message: str) -> None:
    status, body = post_json(served.url, doc)
    assert status == 400
    assert message in body["error"]


def test_malformed_bodies_are_400(served: Served) -> None:
    status, _, body = post(served.url, b"{not json")
    assert status == 400 and "body must be JSON" in json.loads(body)["error"]
    status, _, body = post(served.url, b"XXXX" + bytes(40), tensors.CONTENT_TYPE)
    assert status == 400 and "bad tensor magic" in json.loads(body)["error"]
    status, _, body = post(served.url, tensor_to_body(torch.ones(1, 4)), tensors.CONTENT_TYPE)
    assert status == 400 and "int64" in json.loads(body)["error"]


def test_nested_shape_is_pure_and_row_major() -> None:
    assert nested_shape([[1, 2, 3], [4, 5, 6]]) == ([2, 3], [1, 2, 3, 4, 5, 6])
    assert nested_shape([[[0.5]]]) == ([1, 1, 1], [0.5])


def test_request_json_is_strict_and_bounded_and_answers_are_strict_json() -> None:
    from infscaled.errors import RequestError
    from infscaled.models.base import InputSpec
    from infscaled.worker.service import parse_request, render_response

    spec = InputSpec("image", (3, 4, 4))
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(RequestError, match="nests more than 7 levels deep"):
        parse_request(deep, False, spec)
    with pytest.raises(RequestError, match="NaN is not JSON"):
        parse_request(b'{"inputs": [[NaN, 1.0]]}', False, spec)
    body, ctype = render_response(torch.tensor([[1.0, float("nan"), float("inf")]]), False)
    assert ctype == "application/json"
    assert json.loads(body, parse_constant=lambda c: pytest.fail(f"bare {c} in the answer")) == {
        "output": [[1.0, None, None]], "shape": [1, 3], "dtype": "float32"}


def test_a_connection_flood_is_capped_and_the_service_keeps_answering(served: Served) -> None:
    """A stranger at another address (127.0.0.2) opens more connections than one client may
    hold: the ones past the cap are closed as they are accepted, the dispatcher's descriptors
    stay bounded, and the controller's address keeps getting verified answers meanwhile."""
    from infscaled.worker import service

    host, port = served.url.removeprefix("http://").split(":")
    proc = psutil.Process(served.group.handles[DISPATCHER].process.pid)
    before = proc.num_fds()
    flood: list[socket.socket] = []
    try:
        for _ in range(service.MAX_CONNECTIONS_PER_CLIENT + 200):
            flood.append(socket.create_connection((host, int(port)), timeout=5, source_address=("127.0.0.2", 0)))
        x = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(3))
        status, doc = post_json(served.url, {"inputs": x.tolist()})  # from 127.0.0.1, during the flood
        assert status == 200, doc
        assert torch.allclose(torch.tensor(doc["output"]), expected(served, x), atol=1e-4, rtol=1e-4)
        held = proc.num_fds() - before
        assert held <= service.MAX_CONNECTIONS_PER_CLIENT + 16, held
        closed = 0
        for s in flood:  # the server aborted the ones past the cap: they read EOF or a reset
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        assert closed >= 150, closed
    finally:
        for s in flood:
            s.close()


def test_sigterm_drains_then_every_process_exits_cleanly(served: Served) -> None:
    pids = [h.process.pid for h in served.group.handles.values()]
    dispatcher = served.group.handles[DISPATCHER].process
    assert dispatcher.pid is not None
    outcomes: list[int] = []
    first = threading.Event()

    def client(i: int) -> None:
        try:
            status, _ = post_json(served.url, {"inputs": [[i % 500 + 1] * (4 + i)]})
        except OSError:  # connection refused once the service stopped listening
            status = -1
        outcomes.append(status)
        first.set()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    assert first.wait(30)
    os.kill(dispatcher.pid, signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert len(outcomes) == 12 and set(outcomes) <= {200, 503, -1}, outcomes
    assert served.group.wait_exited([DISPATCHER], 30)
    assert served.group.handles[DISPATCHER].exitcode == 0
    served.group.stop(10.0, first=[DISPATCHER])
    assert sorted(str(n) for n, _, _ in served.exits) == ["0.0", "1.0", "dispatcher"]
    assert all(code == 0 and reason == "" for _, code, reason in served.exits), served.exits
    assert all(h.done for h in served.group.handles.values())
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
