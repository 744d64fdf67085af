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

`Transport` moves raw buffers over gloo (host memory). `NcclTransport` (worker/nccl.py) adds a
two-rank ProcessGroupNCCL on the same store for device tensors, while headers, acks and the
small host-side tensors (descriptor flag HOST, e.g. the request table) keep going over gloo.
The per-edge choice is made by the worker (`worker/entry.py`): NCCL when both ends are CUDA
devices, gloo otherwise (the dispatcher is a CPU process).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, Store, TCPStore, Work

from infscaled.errors import TransportError, WireError
from infscaled.protocol.plan import EdgePlan, Node
from infscaled.protocol.wire import (
    ACK,
    ACK_BYTES,
    HEADER_BYTES,
    STOP,
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

__all__ = ["ACK", "STOP_ACK", "Ack", "Connector", "Edge", "Message", "Transport", "connect_all", "until_stop"]

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
    # CUDA only: the event after which the device tensors are valid (a sender records it on its
    # compute stream; a receiver on its receive stream), and the receive buffers of a buffer
    # pool in `tensors`, which the consumer hands back once its reads are ordered by an event.
    ready: Any = None  # torch.cuda.Event | None
    buffers: list[torch.Tensor] = field(default_factory=list)


def _meta(name: str, t: torch.Tensor, device_channel: bool) -> TensorMeta:
    dtype = DTYPE_NAMES.get(t.dtype)
    if dtype is None:
        raise WireError(f"tensor {name!r}: dtype {t.dtype} cannot go on the wire, "
                        f"allowed: {sorted(TORCH_DTYPES)}")
    # Only an edge with a device channel distinguishes host tensors; gloo-only headers stay as before.
    return TensorMeta(name, dtype, tuple(t.shape), host=device_channel and t.device.type == "cpu")


@functools.cache
def _gloo_device(bind_host: str) -> ProcessGroupGloo.Device:
    # One device (listening socket + event loop) per bind address, shared by all edges, as
    # torch shares the default group's devices with its subgroups.
    return ProcessGroupGloo.create_device(hostname=bind_host, lazy_init=False)


Connector = Callable[[EdgePlan, int, str, float], "Transport"]


class Transport:
    """Raw buffers over one edge's two-rank gloo group; errors become TransportError."""

    # True where device tensors travel device to device (NcclTransport); False: host memory only.
    device_channel = False

    def __init__(self, key: str, rank: int, store: Store, pg: ProcessGroupGloo, timeout_s: float):
        self.key = key
        self.rank = rank
        self.peer = 1 - rank
        self.store: Store | None = store  # a CUDA subclass builds its NCCL group on this store
        self.timeout = timedelta(seconds=timeout_s)
        self._pg: ProcessGroupGloo | None = pg
        self._header_buf = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        self._ack_buf = torch.empty(ACK_BYTES, dtype=torch.uint8)
        # Receive host tensors into pinned memory (a CUDA stage then copies them to its device
        # with non-blocking copies); the stage loop sets it.
        self.pin = False

    @classmethod
    def connect(cls, plan: EdgePlan, rank: int, bind_host: str, timeout_s: float) -> Transport:
        """Host (rank 0) or reach (rank 1) the edge's store, then build its group; blocks until
        the peer does the same, or raises TransportError after about `timeout_s`."""
        store, pg = cls._connect_gloo(plan, rank, bind_host, timeout_s)
        return cls(plan.key, rank, store, pg, timeout_s)

    @staticmethod
    def _connect_gloo(plan: EdgePlan, rank: int, bind_host: str, timeout_s: float) -> tuple[TCPStore, ProcessGroupGloo]:
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
        return store, pg

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

    def send(self, header: bytes, tensors: Sequence[torch.Tensor], ready: Any = None) -> None:
        """Send one header and its tensors (those with bytes), in order. `ready` (a CUDA event
        ordering device tensors) matters only to transports with a device channel."""
        if ready is not None and any(t.device.type != "cpu" for t in tensors):
            ready.synchronize()  # the copies below run on another stream than the one that wrote them
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
        """Allocate the (host) buffer a received tensor lands in."""
        return torch.empty(meta.shape, dtype=TORCH_DTYPES[meta.dtype], pin_memory=self.pin)

    def recv_tensors(self, metas: Sequence[TensorMeta]) -> tuple[dict[str, torch.Tensor], Any, list[torch.Tensor]]:
        """Receive the tensors a header announced: (tensors by name, ready event or None, pool
        buffers among them). Host memory only here; NcclTransport overrides it."""
        tensors = {m.name: self.empty(m) for m in metas}
        self.recv_into([t for t in tensors.values() if t.numel() > 0])
        return tensors, None, []

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

    def abort(self) -> None:
        """The edge broke (its peer died, or a message was malformed): release what could hang.
        Gloo fails on its own; a device channel must be aborted (NCCL does not notice dead peers)."""

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
                transport_cls: type[Transport] | Connector = Transport) -> Edge:
        """Join `plan` as its src (rank 0) or dst (rank 1); blocks until the peer joins, or
        raises TransportError naming the edge after about `timeout_s`. `transport_cls` is a
        Transport class or any connector (plan, rank, bind_host, timeout_s) -> Transport."""
        if me not in (plan.src, plan.dst):
            raise ValueError(f"node {me} is not an end of edge {plan.key}")
        connect = transport_cls.connect if isinstance(transport_cls, type) else transport_cls
        transport = connect(plan, 0 if me == plan.src else 1, bind_host, timeout_s)
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

    @property
    def device_channel(self) -> bool:
        """Whether device tensors go device to device on this edge (NCCL)."""
        return self.transport.device_channel

    def _broke(self, e: Exception) -> None:
        if self._broken is None:
            self._broken = str(e)
            self.transport.abort()

    def send(self, msg: Message) -> None:
        """Send a message. Gloo: tensors are sent as contiguous CPU copies. NCCL: device tensors
        go device to device once `msg.ready` has fired, host tensors over gloo."""
        self._check("send", sender=True)
        dc = self.transport.device_channel
        header = Header(msg.kind, msg.mb_id, msg.route_key,
                        tuple(_meta(name, t, dc) for name, t in msg.tensors.items()))  # WireError: caller's bug
        try:
            self.transport.send(encode_header(header), [t for t in msg.tensors.values() if t.numel() > 0],
                                ready=msg.ready)
        except TransportError as e:
            self._broke(e)
            raise

    def recv(self) -> Message:
        """Wait for the next message; its tensors are allocated from the header (NCCL: device
        tensors in pool buffers, valid once the message's `ready` event has fired)."""
        self._check("recv", sender=False)
        try:
            header = decode_header(self.transport.recv_header())
            tensors, ready, buffers = self.transport.recv_tensors(header.tensors)
        except WireError as e:
            self._broke(e)
            raise WireError(f"edge {self.key}: {e}") from None
        except TransportError as e:
            self._broke(e)
            raise
        return Message(header.kind, header.mb_id, header.route_key, tensors, ready, buffers)

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


def until_stop(edge: Edge) -> Iterator[Message]:
    """The receiving end's messages up to STOP, which it acknowledges (a collector's loop)."""
    while True:
        msg = edge.recv()
        if msg.kind == STOP:
            edge.send_ack(Ack(STOP_ACK, 0, 0, 0))
            return
        yield msg


def connect_all(plans: Sequence[EdgePlan], me: Node, bind_host: str, timeout_s: float,
                transport_cls: type[Transport] | Connector = Transport,
                transport_for: Callable[[EdgePlan], type[Transport] | Connector] | None = None) -> dict[str, Edge]:
    """Connect all of `me`'s edges concurrently, keyed by edge key.

    `transport_for(plan)`, if given, picks each edge's transport (class or connector);
    otherwise every edge uses `transport_cls`.

    Concurrent because building a group blocks until the peer builds it: connecting one edge at
    a time deadlocks when two nodes wait on each other's edges in opposite orders. On any failure
    the edges that did connect are closed and TransportError names every failed edge.
    """
    if not plans:
        return {}
    with ThreadPoolExecutor(max_workers=len(plans), thread_name_prefix=f"connect-{me}") as pool:
        futures = {p.key: pool.submit(Edge.connect, p, me, bind_host, timeout_s,
                                      transport_for(p) if transport_for is not None else transport_cls)
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
