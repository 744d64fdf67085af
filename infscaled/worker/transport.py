"""Data-plane edges: one authenticated TCP connection per directed edge, and no global world.

Each edge src -> dst is one TCP connection. The sender (rank 0) listens at its own address
(EdgePlan.host:port, bound to the node's advertised address, never every interface) only while
the edge is being joined; the receiver (rank 1) connects, retrying until the connect timeout.
Before anything else, both ends prove the job's secret (`JobPlan.secret`) in a mutual HMAC
handshake (`worker/edgeauth.py`, which also bounds what strangers can hold); then the listener
closes. The one connection carries both directions:

    src -> dst  one HEADER_BYTES header (protocol/wire.py), then each tensor of the header, in
                order, as raw bytes (0-byte tensors are not sent)
    dst -> src  reply frames: b"R" (a receipt: the next message was taken off the wire) or
                b"A" + one ACK_BYTES ack record (per computed micro-batch)

Timeouts (`timeout`, the engine sets [pipeline] edge_timeout_s on open edges):
- connect: `timeout_s` bounds listening for, or reaching, the peer, handshake included.
- send / send_ack: each must be handed to the kernel within `timeout`. And every message must
  be *taken* by the peer within `timeout` of being sent: the receipts say which were, and the
  sender's ack reader (`recv_ack`) fails the edge when the oldest one is overdue. So a peer that
  is alive but stalled (SIGSTOP, a wedged thread) breaks the edge, like a dead one, instead of
  letting socket buffers hide it.
- recv / recv_ack wait for the next header or ack without limit: idle edges are normal. The
  tensors that follow a header must each arrive within `timeout`.
- A killed peer makes pending and later operations on its edges fail at once (EOF / reset).
- close() shuts the connection down: this process's threads blocked on the edge wake at once,
  and the peer's pending and later operations fail.

`Transport` moves host buffers. `NcclTransport` (worker/nccl.py) adds a two-rank
ProcessGroupNCCL for device tensors, rendezvousing over this same authenticated connection,
while headers, receipts, acks and host-side tensors (descriptor flag HOST, e.g. the request
table) keep going over TCP. The per-edge choice is made by the worker (`worker/entry.py`):
NCCL when both ends are CUDA devices, TCP otherwise (the dispatcher is a CPU process).
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

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
from infscaled.worker import edgeauth

__all__ = ["ACK", "STOP_ACK", "Ack", "Connector", "Edge", "Message", "Transport", "connect_all", "until_stop"]

log = logging.getLogger(__name__)

RECEIPT = b"R"
ACK_FRAME = b"A"
# How often an idle reply reader looks again at whether a receipt became overdue.
IDLE_POLL_S = 0.5
REPLY_CHUNK = 1 << 16

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
    # Only an edge with a device channel distinguishes host tensors; host-only headers stay as before.
    return TensorMeta(name, dtype, tuple(t.shape), host=device_channel and t.device.type == "cpu")


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous host tensor, without a copy (any dtype, 0-d included)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def secret_bytes(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else bytes(secret)


Connector = Callable[[EdgePlan, int, str, float], "Transport"]


class Transport:
    """Host buffers over one edge's authenticated TCP connection; errors become TransportError."""

    # True where device tensors travel device to device (NcclTransport); False: host memory only.
    device_channel = False

    def __init__(self, key: str, rank: int, sock: socket.socket, timeout_s: float):
        self.key = key
        self.rank = rank
        self.peer = 1 - rank
        self._sock = sock
        self._closed = False
        self._timeout = timedelta(seconds=timeout_s)
        sock.settimeout(timeout_s)
        self._header_buf = bytearray(HEADER_BYTES)
        # The receiving end's receipts (its receive thread) and acks (its ack thread) share the
        # reply direction: one writer at a time.
        self._reply_lock = threading.Lock()
        self._unreceipted: deque[float] = deque()  # send times of messages not yet taken (sender)
        self._replies = bytearray()  # reply bytes read but not yet parsed (sender)
        self._poll = select.poll()  # the sender's ack reader waits on it (no FD_SETSIZE limit)
        self._poll.register(sock, select.POLLIN)
        # Receive host tensors into pinned memory (a CUDA stage then copies them to its device
        # with non-blocking copies); the stage loop sets it.
        self.pin = False

    @property
    def timeout(self) -> timedelta:
        return self._timeout

    @timeout.setter
    def timeout(self, value: timedelta) -> None:
        self._timeout = value
        self._sock.settimeout(value.total_seconds())

    @classmethod
    def keyed(cls, secret: str | bytes) -> Connector:
        """A connector for `Edge.connect` / `connect_all` joining edges with the job's secret."""
        key = secret_bytes(secret)

        def connect(plan: EdgePlan, rank: int, bind_host: str, timeout_s: float) -> Transport:
            return cls.connect(plan, rank, bind_host, timeout_s, key)

        return connect

    @classmethod
    def connect(cls, plan: EdgePlan, rank: int, bind_host: str, timeout_s: float, secret: bytes) -> Transport:
        """Listen for (rank 0) or reach (rank 1) the peer and prove `secret` both ways; blocks
        until the peer does the same, or raises TransportError after about `timeout_s`."""
        return cls(plan.key, rank, cls._join(plan, rank, bind_host, timeout_s, secret), timeout_s)

    @staticmethod
    def _join(plan: EdgePlan, rank: int, bind_host: str, timeout_s: float, secret: bytes) -> socket.socket:
        if not secret:
            raise TransportError(f"edge {plan.key}: the plan carries no data-plane secret; "
                                 "refusing an unauthenticated edge")
        if rank == 0:
            return edgeauth.listen(plan.key, bind_host, plan.port, secret, timeout_s)
        return edgeauth.reach(plan.key, plan.host, plan.port, secret, timeout_s)

    # -- low level -------------------------------------------------------------------------------

    def _fail(self, what: str, e: BaseException | str) -> TransportError:
        if self._closed:
            return TransportError(f"edge {self.key}: cannot {what}, the edge is closed")
        why = e if isinstance(e, str) else _first_line(e)
        return TransportError(f"edge {self.key}: {what} failed: {why}")

    def _sendall(self, data: Any, what: str) -> None:
        if self._closed:
            raise self._fail(what, "")
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise self._fail(what, f"the peer took nothing for {self._timeout.total_seconds():g}s") from None
        except OSError as e:
            raise self._fail(what, e) from e

    def _recv_exact(self, buf: Any, what: str, idle: bool) -> None:
        """Fill `buf`. With `idle`, wait without limit for its first byte; the rest (and all of
        it without `idle`) must keep arriving within `timeout`."""
        view = memoryview(buf).cast("B")
        got, n = 0, len(view)
        while got < n:
            if self._closed:
                raise self._fail(what, "")
            try:
                k = self._sock.recv_into(view[got:], n - got)
            except TimeoutError:
                if idle and got == 0:
                    continue
                raise self._fail(what, f"nothing arrived for {self._timeout.total_seconds():g}s") from None
            except OSError as e:
                raise self._fail(what, e) from e
            if k == 0:
                raise self._fail(what, "the peer closed the connection")
            got += k

    # -- data (src -> dst) -----------------------------------------------------------------------

    def send(self, header: bytes, tensors: Sequence[torch.Tensor], ready: Any = None) -> None:
        """Send one header and its tensors (those with bytes), in order. `ready` (a CUDA event
        ordering device tensors) matters only to transports with a device channel."""
        if ready is not None and any(t.device.type != "cpu" for t in tensors):
            ready.synchronize()  # the copies below run on another stream than the one that wrote them
        self._unreceipted.append(time.monotonic())  # before sending: its receipt cannot come first
        self._sendall(header, "send header")
        self.send_tensors(tensors)

    def recv_header(self) -> bytes:
        """Wait, without limit, for the next header."""
        self._recv_exact(self._header_buf, "receive header", idle=True)
        return bytes(self._header_buf)

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
        for t in tensors:
            self._sendall(_raw(t.detach().to("cpu").contiguous()), "send tensors")

    def recv_into(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            self._recv_exact(_raw(t), "receive tensors", idle=False)

    # -- replies (dst -> src) --------------------------------------------------------------------

    def taken(self) -> None:
        """Receiving end: a whole message was read off the wire; tell the sender (a receipt).
        A sender that is gone cannot take it; the message is whole all the same, and the next
        operation on the edge reports the loss."""
        with self._reply_lock:
            try:
                self._sendall(RECEIPT, "send receipt")
            except TransportError as e:
                log.debug("%s", e)

    def send_ack(self, record: bytes) -> None:
        with self._reply_lock:
            self._sendall(ACK_FRAME + record, "send ack")

    def recv_ack(self) -> bytes:
        """Wait, without limit, for the next ack record; receipts on the way are consumed, and a
        message the peer has not taken within `timeout` of its sending fails the edge."""
        while True:
            record = self._next_reply()
            if record is not None:
                return record
            wait = IDLE_POLL_S
            if self._unreceipted:
                timeout_s = self._timeout.total_seconds()
                wait = self._unreceipted[0] + timeout_s - time.monotonic()
                if wait <= 0:
                    raise self._fail("send", f"the peer took no message for {timeout_s:g}s (stalled?)")
                wait = min(wait, IDLE_POLL_S)
            if self._closed:
                raise self._fail("receive ack", "")
            try:
                readable = self._poll.poll(wait * 1000)
                chunk = self._sock.recv(REPLY_CHUNK) if readable else None
            except (OSError, ValueError) as e:  # ValueError: the socket was closed meanwhile
                raise self._fail("receive ack", e) from e
            if chunk == b"":
                raise self._fail("receive ack", "the peer closed the connection")
            if chunk:
                self._replies += chunk

    def _next_reply(self) -> bytes | None:
        buf = self._replies
        while buf:
            kind = buf[:1]
            if kind == RECEIPT:
                del buf[:1]
                if not self._unreceipted:
                    raise self._fail("receive ack", "a receipt for a message never sent")
                self._unreceipted.popleft()
            elif kind == ACK_FRAME:
                if len(buf) < 1 + ACK_BYTES:
                    return None
                record = bytes(buf[1:1 + ACK_BYTES])
                del buf[:1 + ACK_BYTES]
                return record
            else:
                raise self._fail("receive ack", f"malformed reply frame {buf[0]:#04x}")
        return None

    # -- failure and shutdown --------------------------------------------------------------------

    def abort(self) -> None:
        """The edge broke (its peer died, or a message was malformed): release what could hang.
        TCP fails on its own; a device channel must be aborted (NCCL does not notice dead peers)."""

    def close(self) -> None:
        """Shut the connection down (idempotent): blocked threads of this process wake, the peer's
        operations fail."""
        if self._closed:
            return
        self._closed = True
        sock = self._sock
        try:
            # Read what already arrived (receipts nobody waits for any more): a socket closed
            # with unread bytes resets the connection, and the peer's kernel would then drop
            # data it has not handed to the peer yet (e.g. the last message we sent).
            sock.setblocking(False)
            while sock.recv(REPLY_CHUNK):
                pass
        except OSError:
            pass  # nothing more to read, or not connected any more
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


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
                transport_cls: type[Transport] | Connector = Transport, secret: str | bytes = b"") -> Edge:
        """Join `plan` as its src (rank 0) or dst (rank 1); blocks until the peer joins, or
        raises TransportError naming the edge after about `timeout_s`. `transport_cls` is a
        Transport class (then `secret` is the job's data-plane secret) or a connector
        (plan, rank, bind_host, timeout_s) -> Transport that carries it (`Transport.keyed`)."""
        if me not in (plan.src, plan.dst):
            raise ValueError(f"node {me} is not an end of edge {plan.key}")
        connect = transport_cls.keyed(secret) if isinstance(transport_cls, type) else transport_cls
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
        """Send a message. TCP: tensors are sent as contiguous CPU copies. NCCL: device tensors
        go device to device once `msg.ready` has fired, host tensors over TCP."""
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
            self.transport.taken()
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
                transport_for: Callable[[EdgePlan], type[Transport] | Connector] | None = None,
                secret: str | bytes = b"") -> dict[str, Edge]:
    """Connect all of `me`'s edges concurrently, keyed by edge key.

    `transport_for(plan)`, if given, picks each edge's transport (class or connector);
    otherwise every edge uses `transport_cls`. `secret` is for transport classes (a connector
    carries its own).

    Concurrent because building a group blocks until the peer builds it: connecting one edge at
    a time deadlocks when two nodes wait on each other's edges in opposite orders. On any failure
    the edges that did connect are closed and TransportError names every failed edge.
    """
    if not plans:
        return {}
    with ThreadPoolExecutor(max_workers=len(plans), thread_name_prefix=f"connect-{me}") as pool:
        futures = {p.key: pool.submit(Edge.connect, p, me, bind_host, timeout_s,
                                      transport_for(p) if transport_for is not None else transport_cls, secret)
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
