"""Device-to-device edges: a two-rank ProcessGroupNCCL per edge, beside the edge's TCP connection.

An NCCL edge is the authenticated TCP edge of `transport.py` plus a `ProcessGroupNCCL` built
directly, two ranks, no `init_process_group`. Its rendezvous (the NCCL unique id) goes over
the edge's own connection, after the handshake proved the job's secret (`PeerStore`), so no
unauthenticated store is ever opened. What goes where:

    TCP   (host)    header, receipts, acks, tensors flagged HOST (the request table, masks)
    NCCL  (device)  every other tensor, device to device, in header order

The header goes first, over TCP, so the receiver learns every size on the host and posts its
NCCL receive into a pool buffer without any device synchronisation.

Streams and events (no host sync on the data path):
- send: `send_stream.wait_event(msg.ready)` (the sender's compute finished writing), then the
  NCCL send is issued with `send_stream` current, so ProcessGroupNCCL's own stream waits on it;
  `work.wait()` makes `send_stream` wait for the transfer; `record_stream(send_stream)` keeps
  the caching allocator from reusing the tensor before then.
- receive: a buffer from the stage's `BufferPool` (its previous reader's event is waited on by
  `recv_stream`, GPU side), the NCCL receive issued with `recv_stream` current, `work.wait()`,
  then an event recorded on `recv_stream`: the message's `ready`, which compute waits on.

Dead peers: NCCL does not report them (a send to a dead peer can "complete"). The edge's TCP
connection does, at once: the receiver always has a thread in `recv_header()` and the sender one
in `recv_ack()`, so a peer's death breaks the edge on both ends within milliseconds, and
`Edge._broke` calls `abort()`, which aborts this edge's NCCL communicator only: other edges
(other communicators) keep working. A supervisor that learns of a death first (process exit,
heartbeats) may call `Edge.close()`, which aborts too. TORCH_NCCL_ASYNC_ERROR_HANDLING defaults
to 0 here (set before the first group is built, unless the environment says otherwise), so an
aborted or timed-out operation on one edge never tears down the whole process.

NCCL initialises its communicator lazily at the first operation: `connect` does a warm-up
exchange bounded by the connect timeout, so the first micro-batch does not pay for it, and the
rendezvous is over before the connection carries data.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
from torch.distributed import PrefixStore, Store

from infscaled.errors import TransportError
from infscaled.protocol.plan import EdgePlan, JobPlan, Node
from infscaled.protocol.wire import TensorMeta
from infscaled.worker.transport import TORCH_DTYPES, Connector, Transport, _first_line, secret_bytes

log = logging.getLogger(__name__)

__all__ = ["BufferPool", "NcclTransport", "PeerStore", "nccl_available", "transport_chooser"]

NCCL_TAG = 2

# INFSCALED_TRANSPORT=tcp forces every edge onto TCP (host copies), e.g. to compare ("gloo", the
# transport's name before it was TCP, still means the same).
TRANSPORT_ENV = "INFSCALED_TRANSPORT"


def nccl_available() -> bool:
    return torch.cuda.is_available() and torch.distributed.is_nccl_available()


def _device_of(plan: JobPlan, node: Node) -> tuple[str, torch.device]:
    if node.is_dispatcher:
        return plan.dispatcher_host, torch.device("cpu")  # the dispatcher is a CPU process
    w = plan.worker(node)
    dev = torch.device(w.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    return w.host, dev


def edge_backend(plan: JobPlan, edge: EdgePlan) -> str:
    """"nccl" when both ends are CUDA devices (on different GPUs, or on different hosts), else "tcp"."""
    if os.environ.get(TRANSPORT_ENV, "").lower() in ("tcp", "gloo") or not nccl_available():
        return "tcp"
    (src_host, src), (dst_host, dst) = _device_of(plan, edge.src), _device_of(plan, edge.dst)
    if src.type != "cuda" or dst.type != "cuda":
        return "tcp"
    if src_host == dst_host and src == dst:
        return "tcp"  # NCCL cannot put two ranks of one communicator on one GPU
    return "nccl"


def transport_chooser(plan: JobPlan, me: Node) -> Callable[[EdgePlan], type[Transport] | Connector]:
    """Per-edge transport for `me`'s edges (both ends compute the same answer from the plan)."""
    _, mine = _device_of(plan, me)
    host = Transport.keyed(plan.secret)

    def choose(edge: EdgePlan) -> type[Transport] | Connector:
        return NcclTransport.on(mine, plan.secret) if edge_backend(plan, edge) == "nccl" else host

    return choose


class BufferPool:
    """Receive buffers on one device, reused by (shape, dtype): allocated once, then recycled.

    `take` returns a buffer for a receive that will run on `stream`; when the buffer was read
    before, `stream` first waits (GPU side) on the event its last reader recorded, so the next
    receive cannot overwrite data compute still reads. `give` hands a buffer back with that
    event. At most `per_key` free buffers are kept per shape; extra ones go back to the caching
    allocator (their readers' streams recorded by the caller). Thread-safe.
    """

    def __init__(self, device: torch.device, per_key: int = 4) -> None:
        self.device = device
        self.per_key = per_key
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[tuple[torch.Tensor, Any]]] = {}
        self._lock = threading.Lock()
        self.allocated = 0  # buffers ever allocated (tests and stats)

    def take(self, shape: Sequence[int], dtype: torch.dtype, stream: Any) -> torch.Tensor:
        key = (tuple(shape), dtype)
        with self._lock:
            free = self._free.get(key)
            item = free.pop() if free else None
        if item is not None:
            buf, event = item
            if event is not None:
                stream.wait_event(event)
            return buf
        self.allocated += 1
        with torch.cuda.stream(stream):
            return torch.empty(tuple(shape), dtype=dtype, device=self.device)

    def give(self, buf: torch.Tensor, event: Any) -> None:
        key = (tuple(buf.shape), buf.dtype)
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) < self.per_key:
                free.append((buf, event))


class PeerStore(Store):
    """A two-rank torch Store over an edge's authenticated connection, for NCCL's rendezvous.

    Open (`finish` not called yet): `set` keeps the value and sends it to the peer; `get` /
    `wait` read the peer's sets off the connection until the key is there (bounded by the
    connect timeout). `finish` tells the peer "no more sets" and reads until the peer said so
    too, so no rendezvous bytes are left in the stream when data starts. After that the store
    is local only (NCCL may still write keys of its own, e.g. on errors; they stay here).
    Only the connecting thread (and the NCCL init it drives) uses it while it is open.
    """

    _SET, _DONE = b"S", b"D"
    _LEN = struct.Struct("<II")

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = time.monotonic() + timeout_s
        self._data: dict[str, bytes] = {}
        self._open = True
        self._peer_done = False
        self._lock = threading.Lock()

    def set(self, key: str, value: Any) -> None:
        data = bytes(value.encode() if isinstance(value, str) else value)
        with self._lock:
            self._data[key] = data
            if self._open:
                k = key.encode()
                self._sock.sendall(self._SET + self._LEN.pack(len(k), len(data)) + k + data)

    def get(self, key: str) -> bytes:
        with self._lock:
            while key not in self._data:
                if not self._open or self._peer_done:
                    raise KeyError(f"rendezvous key {key!r}: the peer never set it")
                self._read_one()
            return self._data[key]

    def wait(self, keys: Sequence[str], timeout: timedelta | None = None) -> None:  # type: ignore[override]
        for k in keys:
            self.get(k)

    def check(self, keys: Sequence[str]) -> bool:
        with self._lock:
            return all(k in self._data for k in keys)

    def add(self, key: str, amount: int) -> int:
        with self._lock:
            value = int(self._data.get(key, b"0")) + amount
            self._data[key] = str(value).encode()
            return value

    def delete_key(self, key: str) -> bool:
        with self._lock:
            return self._data.pop(key, None) is not None

    def num_keys(self) -> int:
        with self._lock:
            return len(self._data)

    def finish(self) -> None:
        """End the rendezvous on both ends (see the class docstring)."""
        with self._lock:
            if not self._open:
                return
            self._sock.sendall(self._DONE)
            while not self._peer_done:
                self._read_one()
            self._open = False

    def _read_one(self) -> None:
        kind = self._exact(1)
        if kind == self._DONE:
            self._peer_done = True
        elif kind == self._SET:
            klen, vlen = self._LEN.unpack(self._exact(self._LEN.size))
            if klen > 4096 or vlen > 1 << 20:
                raise TransportError(f"NCCL rendezvous: a {klen}-byte key / {vlen}-byte value is out of bounds")
            key = self._exact(klen).decode()
            self._data[key] = self._exact(vlen)
        else:
            raise TransportError(f"NCCL rendezvous: malformed frame {kind!r}")

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise TransportError("NCCL rendezvous: the peer did not answer within the connect timeout")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(n - len(buf))
            except OSError as e:
                raise TransportError(f"NCCL rendezvous: {_first_line(e)}") from e
            if not chunk:
                raise TransportError("NCCL rendezvous: the peer closed the connection")
            buf += chunk
        return bytes(buf)


class NcclTransport(Transport):
    """TCP for headers, acks and host tensors; a two-rank ProcessGroupNCCL for device tensors."""

    device_channel = True

    def __init__(self, key: str, rank: int, sock: socket.socket, timeout_s: float, device: torch.device,
                 nccl: Any, store: PeerStore) -> None:
        super().__init__(key, rank, sock, timeout_s)
        self.store = store
        self.device = device
        self._nccl: Any = nccl
        # The stage replaces these with its own named streams and pool (engine/cuda.py); the defaults
        # let an edge be used on its own (tests, benchmarks).
        self.recv_stream: Any = torch.cuda.Stream(device)
        self.send_stream: Any = torch.cuda.Stream(device)
        self.pool: BufferPool | None = None
        self._nccl_lock = threading.Lock()

    @classmethod
    def on(cls, device: str | torch.device, secret: str | bytes) -> Connector:
        """A connector for `Edge.connect` / `connect_all` building NCCL edges on `device`."""
        dev = torch.device(device)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        key = secret_bytes(secret)

        def connect(plan: EdgePlan, rank: int, bind_host: str, timeout_s: float) -> Transport:
            return cls.connect_nccl(plan, rank, bind_host, timeout_s, dev, key)

        return connect

    @classmethod
    def connect_nccl(cls, plan: EdgePlan, rank: int, bind_host: str, timeout_s: float,
                     device: torch.device, secret: bytes) -> NcclTransport:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        started = time.monotonic()
        sock = cls._join(plan, rank, bind_host, timeout_s, secret)
        store = PeerStore(sock, max(timeout_s - (time.monotonic() - started), 1.0))
        try:
            from torch.distributed import ProcessGroupNCCL

            opts = ProcessGroupNCCL.Options()
            opts._timeout = timedelta(seconds=timeout_s)
            nccl = ProcessGroupNCCL(PrefixStore(f"nccl/{plan.key}", store), rank, 2, opts)
        except RuntimeError as e:
            sock.close()
            raise TransportError(f"edge {plan.key}: cannot build its NCCL group: {_first_line(e)}") from e
        transport = cls(plan.key, rank, sock, timeout_s, device, nccl, store)
        transport._warm_up(timeout_s)
        try:
            store.finish()
        except (OSError, TransportError) as e:
            transport.close()
            raise TransportError(f"edge {plan.key}: NCCL rendezvous failed: {_first_line(e)}") from e
        sock.settimeout(timeout_s)  # the store set its own deadlines on it
        return transport

    def _warm_up(self, timeout_s: float) -> None:
        """One tiny exchange, so NCCL creates its communicator now, bounded by `timeout_s`."""
        failure: list[BaseException] = []

        def exchange() -> None:
            try:
                with torch.cuda.device(self.device):
                    t = torch.full((1,), 7.0 if self.rank == 0 else 0.0, device=self.device)
                    stream = torch.cuda.Stream(self.device)
                    with torch.cuda.stream(stream):
                        op = self._nccl.send if self.rank == 0 else self._nccl.recv
                        op([t], self.peer, NCCL_TAG).wait()
                    stream.synchronize()
                    if self.rank == 1 and float(t.item()) != 7.0:  # connect time: a host read is fine
                        raise TransportError(f"edge {self.key}: NCCL warm-up received {t.item()}, expected 7")
            except BaseException as e:  # noqa: BLE001 - thread boundary
                failure.append(e)

        th = threading.Thread(target=exchange, name=f"nccl-warmup-{self.key}", daemon=True)
        th.start()
        th.join(timeout_s)
        if th.is_alive() or failure:
            self.abort()
            self.close()
            why = f"{_first_line(failure[0])}" if failure else f"no answer within {timeout_s:g}s"
            raise TransportError(f"edge {self.key}: NCCL warm-up failed: {why}")

    # -- data -------------------------------------------------------------------------------------

    def _nccl_group(self, what: str) -> Any:
        if self._nccl is None:
            raise TransportError(f"edge {self.key}: cannot {what}, the NCCL group was aborted")
        return self._nccl

    def send(self, header: bytes, tensors: Sequence[torch.Tensor], ready: Any = None) -> None:
        self._unreceipted.append(time.monotonic())
        self._sendall(header, "send header")
        host = [t for t in tensors if t.device.type == "cpu"]
        dev = [t for t in tensors if t.device.type != "cpu"]
        if host:
            self.send_tensors(host)
        if dev:
            self._send_device(dev, ready)

    def _send_device(self, tensors: Sequence[torch.Tensor], ready: Any) -> None:
        nccl = self._nccl_group("send tensors")
        stream = self.send_stream
        try:
            caller = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(stream):
                if ready is not None:
                    stream.wait_event(ready)
                else:  # no event: order after whatever the caller's current stream wrote
                    stream.wait_stream(caller)
                for t in tensors:
                    t = t.contiguous()
                    nccl.send([t], self.peer, NCCL_TAG).wait()  # GPU-side: send_stream waits for it
                    t.record_stream(stream)
        except RuntimeError as e:
            raise TransportError(f"edge {self.key}: NCCL send failed: {_first_line(e)}") from e

    def recv_tensors(self, metas: Sequence[TensorMeta]) -> tuple[dict[str, torch.Tensor], Any, list[torch.Tensor]]:
        tensors: dict[str, torch.Tensor] = {}
        buffers: list[torch.Tensor] = []
        stream = self.recv_stream
        for m in metas:
            if m.host:
                tensors[m.name] = self.empty(m)
            elif self.pool is not None:
                tensors[m.name] = buf = self.pool.take(m.shape, TORCH_DTYPES[m.dtype], stream)
                buffers.append(buf)
            else:
                with torch.cuda.stream(stream):
                    tensors[m.name] = torch.empty(m.shape, dtype=TORCH_DTYPES[m.dtype], device=self.device)
        host = [t for m, t in zip(metas, tensors.values(), strict=True) if m.host and t.numel() > 0]
        dev = [t for m, t in zip(metas, tensors.values(), strict=True) if not m.host and t.numel() > 0]
        if host:
            self.recv_into(host)
        ready = None
        if dev:
            nccl = self._nccl_group("receive tensors")
            try:
                with torch.cuda.stream(stream):
                    for t in dev:
                        nccl.recv([t], self.peer, NCCL_TAG).wait()  # GPU-side: recv_stream waits
                    ready = torch.cuda.Event()
                    ready.record(stream)
            except RuntimeError as e:
                raise TransportError(f"edge {self.key}: NCCL receive failed: {_first_line(e)}") from e
        return tensors, ready, buffers

    # -- failure and shutdown ---------------------------------------------------------------------

    def abort(self) -> None:
        """Abort this edge's NCCL communicator (idempotent): its pending operations end, other
        edges' communicators are untouched."""
        with self._nccl_lock:
            nccl, self._nccl = self._nccl, None
        if nccl is not None:
            try:
                nccl.abort()
            except RuntimeError as e:
                log.debug("edge %s: NCCL abort: %s", self.key, e)

    def close(self) -> None:
        # Abort rather than a collective shutdown: the peer may be gone, and a finalize that
        # waits for it would hang. Everything this edge sent was already waited on by streams.
        self.abort()
        super().close()

