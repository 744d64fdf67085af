"""Edges over authenticated per-edge TCP connections, with real spawned processes on 127.0.0.1.

The pytest process is always one end, so each scenario spawns as few processes as it can
(importing torch costs ~3 s per process). Every spawned process is killed by the fixture.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from infscaled.errors import TransportError, WireError
from infscaled.protocol.plan import EdgePlan, Node
from infscaled.protocol.wire import ACK, DATA, HEADER_BYTES, STOP, STOP_ACK, Ack
from infscaled.worker.transport import Edge, Message, connect_all

HOST = "127.0.0.1"
SECRET = b"test-secret"
CONNECT_S = 30.0  # generous: a spawned child needs a few seconds to import torch
DISPATCHER, B, C = Node(-1, 0), Node(0, 0), Node(0, 1)
CTX = mp.get_context("spawn")


def _port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _tensors(i: int) -> dict[str, torch.Tensor]:
    """Deterministic content for micro-batch i; both ends rebuild it to compare."""
    g = torch.Generator().manual_seed(i)
    rows = i % 4  # rows == 0 gives 0-size dimensions
    return {
        "hidden": torch.randn(rows, 5, 3, generator=g).transpose(1, 2),  # non-contiguous on purpose
        "attention_mask": torch.rand(rows, 7, generator=g) > 0.5,
        "input_ids": torch.randint(0, 50_000, (rows, 7), generator=g),
        "bf": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(i),
    }


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    pairs = zip(got.values(), want.values(), strict=True)
    return list(got) == list(want) and all(
        g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w) for g, w in pairs
    )


def _receiver(plan: EdgePlan, me: Node, results: Any) -> None:
    """Child: receive until STOP and check every message's content; another thread sends the acks,
    so data and acks cross on the one connection concurrently."""
    edge = Edge.connect(plan, me, HOST, CONNECT_S, secret=SECRET)
    to_ack: queue.Queue[Ack] = queue.Queue()

    def acker() -> None:
        while (ack := to_ack.get()).kind != STOP_ACK:
            edge.send_ack(ack)
        edge.send_ack(ack)

    th = threading.Thread(target=acker, daemon=True)
    th.start()
    bad = n = 0
    try:
        while True:
            msg = edge.recv()
            if msg.kind == STOP:
                to_ack.put(Ack(STOP_ACK, msg.mb_id))
                break
            n += 1
            bad += not _same(msg.tensors, _tensors(msg.mb_id))
            to_ack.put(Ack(ACK, msg.mb_id, samples=msg.mb_id % 4, compute_us=msg.mb_id * 10))
        th.join(10)
        results.put((str(me), n, bad))
    finally:
        edge.close()


def _garbage_sender(plan: EdgePlan) -> None:
    """Child: send HEADER_BYTES of garbage where a header belongs, then wait for the edge to close."""
    edge = Edge.connect(plan, plan.src, HOST, CONNECT_S, secret=SECRET)
    edge.transport.send(bytes(range(256)) * (HEADER_BYTES // 256), [])
    try:
        edge.recv_ack()  # returns when the receiver closes its end
    except TransportError:
        pass


@pytest.fixture
def spawn() -> Iterator[Callable[..., Any]]:
    procs: list[Any] = []

    def start(target: Callable[..., None], *args: object) -> Any:
        p = CTX.Process(target=target, args=args, daemon=True)
        p.start()
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(10)


def _collect_acks(edge: Edge, out: list[Ack]) -> threading.Thread:
    def run() -> None:
        while True:
            ack = edge.recv_ack()
            out.append(ack)
            if ack.kind == STOP_ACK:
                return

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def test_messages_and_concurrent_acks(spawn: Callable[..., Any]) -> None:
    plan = EdgePlan(DISPATCHER, B, HOST, _port())
    results = CTX.Queue()
    spawn(_receiver, plan, B, results)
    edge = Edge.connect(plan, DISPATCHER, HOST, CONNECT_S, secret=SECRET)
    try:
        acks: list[Ack] = []
        th = _collect_acks(edge, acks)  # acks flow back while this thread keeps sending
        for i in range(200):
            edge.send(Message(DATA, i, route_key=i * 7, tensors=_tensors(i)))
        edge.send(Message(STOP, 200, 0, {}))
        th.join(20)
        assert not th.is_alive()
        assert results.get(timeout=20) == (str(B), 200, 0)
        assert [a.mb_id for a in acks] == list(range(201))
        assert acks[5] == Ack(ACK, 5, samples=1, compute_us=50)
        assert acks[-1].kind == STOP_ACK
    finally:
        edge.close()
    edge.close()  # idempotent
    with pytest.raises(TransportError, match="closed"):
        edge.send(Message(DATA, 0, 0, {}))


def test_killed_peer_fails_only_its_edge(spawn: Callable[..., Any]) -> None:
    to_b, to_c = EdgePlan(DISPATCHER, B, HOST, _port()), EdgePlan(DISPATCHER, C, HOST, _port())
    results = CTX.Queue()
    spawn(_receiver, to_b, B, results)
    c = spawn(_receiver, to_c, C, results)
    edges = connect_all([to_b, to_c], DISPATCHER, HOST, CONNECT_S, secret=SECRET)
    eb, ec = edges[to_b.key], edges[to_c.key]
    try:
        for i in range(3):
            for e in (eb, ec):
                e.send(Message(DATA, i, 0, _tensors(i)))
                assert e.recv_ack().mb_id == i
        os.kill(c.pid, signal.SIGKILL)
        c.join(10)
        started = time.monotonic()
        with pytest.raises(TransportError, match=r"edge dispatcher->0\.1: send"):
            while time.monotonic() - started < 5:  # the first send may race the kernel's RST
                ec.send(Message(DATA, 99, 0, _tensors(99)))
        assert time.monotonic() - started < 2, "a dead peer must fail the send long before the 30 s timeout"
        with pytest.raises(TransportError, match="broken"):
            ec.send(Message(DATA, 100, 0, {}))
        for i in range(3, 13):  # the other edge is unaffected
            eb.send(Message(DATA, i, 0, _tensors(i)))
            assert eb.recv_ack().mb_id == i
        eb.send(Message(STOP, 0, 0, {}))
        assert eb.recv_ack().kind == STOP_ACK
        assert results.get(timeout=10) == (str(B), 13, 0)
    finally:
        for e in edges.values():
            e.close()


def test_malformed_header_raises_wire_error(spawn: Callable[..., Any]) -> None:
    plan = EdgePlan(DISPATCHER, B, HOST, _port())
    spawn(_garbage_sender, plan)
    edge = Edge.connect(plan, B, HOST, CONNECT_S, secret=SECRET)
    try:
        with pytest.raises(WireError, match=r"edge dispatcher->0\.0: bad header magic"):
            edge.recv()
        with pytest.raises(TransportError, match="broken: bad header magic"):
            edge.recv()  # the stream is desynchronised: the edge stays unusable
    finally:
        edge.close()


@pytest.mark.parametrize("me", [DISPATCHER, B], ids=["sender-without-receiver", "receiver-without-sender"])
def test_connect_without_peer_times_out(me: Node) -> None:
    plan = EdgePlan(DISPATCHER, B, HOST, _port())
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"edge dispatcher->0\.0: .*within 1\.0s"):
        Edge.connect(plan, me, HOST, 1.0, secret=SECRET)
    # The store client retries once after a back-off, so it may overshoot a tiny timeout.
    assert 0.9 < time.monotonic() - started < 6


def test_connect_all_closes_what_it_opened() -> None:
    """One edge connects (its peer is a thread here), the other has no peer: the opened one is closed."""
    to_b, to_c = EdgePlan(DISPATCHER, B, HOST, _port()), EdgePlan(DISPATCHER, C, HOST, _port())
    seen: list[BaseException] = []

    def b_side() -> None:
        edge = Edge.connect(to_b, B, HOST, 10.0, secret=SECRET)
        try:
            edge.recv()
        except TransportError as e:
            seen.append(e)
        finally:
            edge.close()

    th = threading.Thread(target=b_side, daemon=True)
    th.start()
    with pytest.raises(TransportError, match=r"1 of 2 edges failed to connect: edge dispatcher->0\.1"):
        connect_all([to_b, to_c], DISPATCHER, HOST, 1.5, secret=SECRET)
    th.join(5)
    assert len(seen) == 1 and "receive header failed" in str(seen[0])


def test_wrong_end_and_bad_dtype_are_rejected() -> None:
    plan = EdgePlan(DISPATCHER, B, HOST, _port())
    box: dict[str, Edge] = {}
    th = threading.Thread(target=lambda: box.setdefault("b", Edge.connect(plan, B, HOST, 10.0, secret=SECRET)))
    th.start()
    sender = Edge.connect(plan, DISPATCHER, HOST, 10.0, secret=SECRET)
    th.join()
    try:
        with pytest.raises(TransportError, match="belongs to the receiver"):
            sender.recv()
        with pytest.raises(WireError, match="complex64"):
            sender.send(Message(DATA, 0, 0, {"z": torch.zeros(2, dtype=torch.complex64)}))
        with pytest.raises(ValueError, match="not an end of edge"):
            Edge.connect(plan, C, HOST, 1.0, secret=SECRET)
    finally:
        sender.close()
        box["b"].close()


def test_peer_store_rendezvous_then_leaves_the_connection_clean() -> None:
    """NCCL edges rendezvous over their proven connection (worker/nccl.PeerStore). Here a real
    C++ consumer of the Store API, a two-rank ProcessGroupGloo, rendezvouses through two
    PeerStores over a socket pair; after finish() the stream holds no rendezvous bytes."""
    from torch.distributed import PrefixStore, ProcessGroupGloo

    from infscaled.worker.nccl import PeerStore

    left, right = socket.socketpair()
    stores = [PeerStore(left, 20.0), PeerStore(right, 20.0)]
    sums: dict[int, float] = {}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            opts = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            opts._devices = [ProcessGroupGloo.create_device(hostname=HOST)]
            pg = ProcessGroupGloo(PrefixStore("nccl/dispatcher->0.0", stores[r]), r, 2, opts)
            t = torch.tensor([float(r + 1)])
            pg.allreduce([t]).wait()
            sums[r] = float(t.item())
            stores[r].finish()
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sums == {0: 3.0, 1: 3.0}
    left.sendall(b"data after the rendezvous")
    right.settimeout(5)
    assert right.recv(64) == b"data after the rendezvous"
    stores[0].set("late", b"1")  # after finish(): local only, nothing crosses the connection
    assert stores[0].get("late") == b"1"
    with pytest.raises(KeyError, match="never set"):
        stores[1].get("late")
    left.close()
    right.close()
