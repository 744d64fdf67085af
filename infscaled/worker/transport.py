"""Data-plane edges: one two-rank gloo process group per directed edge, and no global world.

Each edge src -> dst is `ProcessGroupGloo(PrefixStore(f"edge/{key}", store), rank, 2, options)`
built directly (no init_process_group), so a dead peer breaks only its own edges. The sender
(rank 0) hosts the edge's TCPStore at EdgePlan.host:port; the receiver (rank 1) connects to it
as a client, which retries until the connect timeout. One group carries both directions:

    src -> dst  TAG_HEADER  one HEADER_BYTES uint8 header (protocol/wire.py)
    src -> dst  TAG_TENSOR  each tensor of the header, in order (0-byte tensors are not sent)
    dst -> src  TAG_ACK     one ACK_BYTES ack record per computed micro-batch

Concurrent data and ack traffic in opposite directions, from different threads, on the one
group works (verified on torch 2.13 with 2000 messages + acks), so there is no second group.

Timeouts, as gloo behaves on torch 2.13 (each point verified with two processes):
- connect: `timeout_s` bounds reaching the store and the group rendezvous.
- send / send_ack: every gloo send, however small, completes only once the peer has posted
  the matching recv, which must happen within `timeout_s`: receivers keep a thread in `recv()`.
  For the same reason a message costs one extra rendezvous (~90 us on loopback): the receiver
  can post its tensor recvs only after the header told it their sizes.
- recv / recv_ack wait for the next header or ack without limit: idle edges are normal, and any
  gloo recv timeout closes the whole group ("Application timeout caused pair closure"). The
  tensors that follow a header are bounded by `timeout_s`.
- A killed peer makes pending and later operations on its edges fail at once.
- close() releases the group, so the peer's pending operations fail at once. It does not wake
  a thread of this process blocked in recv() on the same edge (gloo's abort()/shutdown() don't
  either); that thread wakes when the peer closes or dies, or with its process.

`Transport` moves raw buffers and is the seam for a CUDA variant: a subclass can create a
ProcessGroupNCCL on the same store and override `empty`, `send_tensors` and `recv_into` for
device tensors, while headers and acks keep going over gloo.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, Store, TCPStore, Work

from infscaled.errors import TransportError, WireError
from infscaled.protocol.plan import EdgePlan, Node
from infscaled.protocol.wire import (
    ACK,
    ACK_BYTES,
    HEADER_BYTES,
    STOP_ACK,
    Ack,
    Header,
    MsgKind,
    TensorMeta,
    decode_ack,
    decode_header,
    encode_ack,
    encode_header,
)

__all__ = ["ACK", "STOP_ACK", "Ack", "Edge", "Message", "Transport", "connect_all"]

log = logging.getLogger(__name__)

TAG_HEADER = 1
TAG_TENSOR = 2
TAG_ACK = 3
# "No limit" for idle waits: long enough to never fire, short enough not to overflow gloo's clock.
IDLE_WAIT = timedelta(days=365)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass
class Message:
    """One micro-batch (or a STOP/ERROR) on an edge; the tensors' insertion order is wire order."""

    kind: MsgKind
    mb_id: int
    route_key: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _meta(name: str, t: torch.Tensor) -> TensorMeta:
    dtype = DTYPE_NAMES.get(t.dtype)
    if dtype is None:
        raise WireError(f"tensor {name!r}: dtype {t.dtype} cannot go on the wire, "
                        f"allowed: {sorted(TORCH_DTYPES)}")
    return TensorMeta(name, dtype, tuple(t.shape))


@functools.cache
def _gloo_device(bind_host: str) -> ProcessGroupGloo.Device:
    # One device (listening socket + event loop) per bind address, shared by all edges, as
    # torch shares the default group's devices with its subgroups.
    return ProcessGroupGloo.create_device(hostname=bind_host, lazy_init=False)


class Transport:
    """Raw buffers over one edge's two-rank gloo group; errors become TransportError."""

    def __init__(self, key: str, rank: int, store: Store, pg: ProcessGroupGloo, timeout_s: float):
        self.key = key
        self.rank = rank
        self.peer = 1 - rank
        self.store: Store | None = store  # a CUDA subclass builds its NCCL group on this store
        self.timeout = timedelta(seconds=timeout_s)
        self._pg: ProcessGroupGloo | None = pg
        self._header_buf = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        self._ack_buf = torch.empty(ACK_BYTES, dtype=torch.uint8)

    @classmethod
    def connect(cls, plan: EdgePlan, rank: int, bind_host: str, timeout_s: float) -> Transport:
        """Host (rank 0) or reach (rank 1) the edge's store, then build its group; blocks until
        the peer does the same, or raises TransportError after about `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        where = f"{plan.host}:{plan.port}"
        try:
            store = TCPStore(plan.host, plan.port, 2, rank == 0, timedelta(seconds=timeout_s),
                             wait_for_workers=False)
        except RuntimeError as e:
            verb = "host its store at" if rank == 0 else "reach its store at"
            raise TransportError(f"edge {plan.key}: cannot {verb} {where} within {timeout_s}s: "
                                 f"{_first_line(e)}") from e
        options = ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # missing from torch's stubs
        options._devices = [_gloo_device(bind_host)]
        options._timeout = timedelta(seconds=max(deadline - time.monotonic(), 0.1))
        try:
            pg = ProcessGroupGloo(PrefixStore(f"edge/{plan.key}", store), rank, 2, options)
        except RuntimeError as e:
            peer = plan.dst if rank == 0 else plan.src
            raise TransportError(f"edge {plan.key}: peer {peer} did not join via {where} "
                                 f"within {timeout_s}s: {_first_line(e)}") from e
        return cls(plan.key, rank, store, pg, timeout_s)

    def _group(self, what: str) -> ProcessGroupGloo:
        if self._pg is None:
            raise TransportError(f"edge {self.key}: cannot {what}, the edge is closed")
        return self._pg

    def _wait(self, works: Iterable[Work], what: str, timeout: timedelta) -> None:
        try:
            for work in works:
                work.wait(timeout)
        except RuntimeError as e:
            raise TransportError(f"edge {self.key}: {what} failed: {_first_line(e)}") from e

    def _post(self, what: str, op: str, bufs: Sequence[torch.Tensor], tag: int) -> list[Work]:
        pg = self._group(what)
        try:
            # send/recv are missing from torch's stubs for ProcessGroupGloo.
            fn = pg.send if op == "send" else pg.recv  # type: ignore[attr-defined]
            return [fn([b], self.peer, tag) for b in bufs]
        except RuntimeError as e:
            raise TransportError(f"edge {self.key}: {what} failed: {_first_line(e)}") from e

    def send(self, header: bytes, tensors: Sequence[torch.Tensor]) -> None:
        """Send one header and its tensors (those with bytes), in order."""
        hdr = torch.frombuffer(bytearray(header), dtype=torch.uint8)
        works = self._post("send header", "send", [hdr], TAG_HEADER)
        self.send_tensors(tensors)
        self._wait(works, "send header", self.timeout)

    def recv_header(self) -> bytes:
        """Wait, without limit, for the next header."""
        works = self._post("receive header", "recv", [self._header_buf], TAG_HEADER)
        self._wait(works, "receive header", IDLE_WAIT)
        return self._header_buf.numpy().tobytes()

    def empty(self, meta: TensorMeta) -> torch.Tensor:
        """Allocate the buffer a received tensor lands in."""
        return torch.empty(meta.shape, dtype=TORCH_DTYPES[meta.dtype])

    def send_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        bufs = [t.detach().to("cpu").contiguous() for t in tensors]
        self._wait(self._post("send tensors", "send", bufs, TAG_TENSOR), "send tensors", self.timeout)

    def recv_into(self, tensors: Sequence[torch.Tensor]) -> None:
        works = self._post("receive tensors", "recv", tensors, TAG_TENSOR)
        self._wait(works, "receive tensors", self.timeout)

    def send_ack(self, record: bytes) -> None:
        buf = torch.frombuffer(bytearray(record), dtype=torch.uint8)
        self._wait(self._post("send ack", "send", [buf], TAG_ACK), "send ack", self.timeout)

    def recv_ack(self) -> bytes:
        """Wait, without limit, for the next ack record."""
        self._wait(self._post("receive ack", "recv", [self._ack_buf], TAG_ACK), "receive ack", IDLE_WAIT)
        return self._ack_buf.numpy().tobytes()

    def close(self) -> None:
        pg, self._pg, self.store = self._pg, None, None  # the sender's store frees its port
        if pg is not None:
            try:
                pg.shutdown()
            except RuntimeError as e:
                log.debug("edge %s: shutdown: %s", self.key, e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Edge:
    """One end of one edge.

    Thread contract: exactly one thread sends data and one receives data; acks likewise one
    sender and one receiver thread; the data and ack directions may run concurrently in
    different threads. After any error the edge is broken: every later call raises
    TransportError (a bad header desynchronises the stream), and the owner should close it.
    """

    def __init__(self, plan: EdgePlan, me: Node, transport: Transport):
        self.plan = plan
        self.me = me
        self.transport = transport
        self.is_sender = me == plan.src
        self._broken: str | None = None
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def key(self) -> str:
        return self.plan.key

    @property
    def peer(self) -> Node:
        return self.plan.dst if self.is_sender else self.plan.src

    @classmethod
    def connect(cls, plan: EdgePlan, me: Node, bind_host: str, timeout_s: float,
                transport_cls: type[Transport] = Transport) -> Edge:
        """Join `plan` as its src (rank 0) or dst (rank 1); blocks until the peer joins, or
        raises TransportError naming the edge after about `timeout_s`."""
        if me not in (plan.src, plan.dst):
            raise ValueError(f"node {me} is not an end of edge {plan.key}")
        transport = transport_cls.connect(plan, 0 if me == plan.src else 1, bind_host, timeout_s)
        log.debug("edge %s connected as %s", plan.key, "sender" if me == plan.src else "receiver")
        return cls(plan, me, transport)

    def _check(self, op: str, sender: bool) -> None:
        if sender != self.is_sender:
            side = "sender (src)" if sender else "receiver (dst)"
            raise TransportError(f"edge {self.key}: {op}() belongs to the {side} end, this is {self.me}")
        if self._closed:
            raise TransportError(f"edge {self.key}: cannot {op}(), the edge is closed")
        if self._broken is not None:
            raise TransportError(f"edge {self.key}: cannot {op}(), the edge is broken: {self._broken}")

    def _broke(self, e: Exception) -> None:
        if self._broken is None:
            self._broken = str(e)

    def send(self, msg: Message) -> None:
        """Send a message; tensors are sent as contiguous CPU copies (by the gloo transport)."""
        self._check("send", sender=True)
        header = Header(msg.kind, msg.mb_id, msg.route_key,
                        tuple(_meta(name, t) for name, t in msg.tensors.items()))  # WireError: caller's bug
        try:
            self.transport.send(encode_header(header), [t for t in msg.tensors.values() if t.numel() > 0])
        except TransportError as e:
            self._broke(e)
            raise

    def recv(self) -> Message:
        """Wait for the next message; its tensors are allocated from the header."""
        self._check("recv", sender=False)
        try:
            header = decode_header(self.transport.recv_header())
            tensors = {m.name: self.transport.empty(m) for m in header.tensors}
            self.transport.recv_into([t for t in tensors.values() if t.numel() > 0])
        except WireError as e:
            self._broke(e)
            raise WireError(f"edge {self.key}: {e}") from None
        except TransportError as e:
            self._broke(e)
            raise
        return Message(header.kind, header.mb_id, header.route_key, tensors)

    def send_ack(self, ack: Ack) -> None:
        self._check("send_ack", sender=False)
        try:
            self.transport.send_ack(encode_ack(ack))
        except TransportError as e:
            self._broke(e)
            raise

    def recv_ack(self) -> Ack:
        self._check("recv_ack", sender=True)
        try:
            return decode_ack(self.transport.recv_ack())
        except WireError as e:
            self._broke(e)
            raise WireError(f"edge {self.key}: {e}") from None
        except TransportError as e:
            self._broke(e)
            raise

    def close(self) -> None:
        """Release the group (idempotent); the peer's pending and later operations then fail."""
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self.transport.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"broken: {self._broken}" if self._broken else "open"
        return f"Edge({self.key}, me={self.me}, {state})"


def connect_all(plans: Sequence[EdgePlan], me: Node, bind_host: str, timeout_s: float,
                transport_cls: type[Transport] = Transport) -> dict[str, Edge]:
    """Connect all of `me`'s edges concurrently, keyed by edge key.

    Concurrent because building a group blocks until the peer builds it: connecting one edge at
    a time deadlocks when two nodes wait on each other's edges in opposite orders. On any failure
    the edges that did connect are closed and TransportError names every failed edge.
    """
    if not plans:
        return {}
    with ThreadPoolExecutor(max_workers=len(plans), thread_name_prefix=f"connect-{me}") as pool:
        futures = {p.key: pool.submit(Edge.connect, p, me, bind_host, timeout_s, transport_cls)
                   for p in plans}
    edges: dict[str, Edge] = {}
    errors: dict[str, BaseException] = {}
    for key, fut in futures.items():
        exc = fut.exception()
        if exc is None:
            edges[key] = fut.result()
        else:
            errors[key] = exc
    if errors:
        for edge in edges.values():
            edge.close()
        first = next(iter(errors.values()))
        detail = "; ".join(str(e) for e in errors.values())
        raise TransportError(f"{me}: {len(errors)} of {len(plans)} edges failed to connect: "
                             f"{detail}") from first
    return edges
