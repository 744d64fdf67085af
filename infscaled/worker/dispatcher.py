"""The dispatcher: the job's entry and exit on the data plane.

It accepts requests, forms micro-batches (up to `micro_batch_size` samples, waiting at
most `max_wait_ms` for more), keeps at most `max_inflight` micro-batches inside the
pipeline, routes each to a stage-0 replica with the forwarding policy, and hands every
request exactly its own slice of the last stage's output.

Threads: a *batcher* (forms and sends micro-batches), one *collector* per in-edge from
the last stage (receives results, acks them), one *ack* thread per out-edge (keeps the
router's view of stage 0 true), and a *watchdog* failing requests past their timeout.
Callers get a `concurrent.futures.Future` per request, which asyncio code can await
through `asyncio.wrap_future`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from infscaled.errors import PipelineFailedError, RequestError
from infscaled.models import inputs
from infscaled.models.base import InputSpec
from infscaled.protocol.wire import DATA, STOP
from infscaled.worker.router import Router
from infscaled.worker.stage_loop import REQUESTS_KEY
from infscaled.worker.transport import ACK, STOP_ACK, Ack, Edge, Message, until_stop

log = logging.getLogger(__name__)


@dataclass
class _Request:
    id: int
    x: torch.Tensor
    future: Future[torch.Tensor]
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class _InFlight:
    requests: list[_Request]
    sent_at: float


class Dispatcher:
    def __init__(self, spec: InputSpec, dtype: torch.dtype, out_edges: list[Edge], in_edges: list[Edge],
                 policy: str, micro_batch_size: int, max_inflight: int, max_wait_ms: float,
                 request_timeout_s: float = 120.0, max_queued: int = 4096, seed: int = 0,
                 on_broken: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self.dtype = dtype
        self.out_edges = out_edges
        self.in_edges = in_edges
        self.router = Router(policy, len(out_edges), seed=seed)
        self.micro_batch_size = micro_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.request_timeout_s = request_timeout_s
        self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=max_queued)
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._inflight: dict[int, _InFlight] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when nothing is in flight
        self._ids = itertools.count()
        self._mb_ids = itertools.count()
        self._closing = False
        self._failure: str | None = None
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()
        # Called when an edge breaks. The supervisor usually knows the first cause (which
        # worker died, and how) a moment later, so it may wait for that before failing.
        self._on_broken = on_broken or self.fail

    # -- public API ------------------------------------------------------------------------------

    def start(self) -> None:
        self._spawn(self._batcher, "dispatch-batcher")
        for i in range(len(self.in_edges)):
            self._spawn(lambda i=i: self._collector(i), f"dispatch-collect{i}")
        for i in range(len(self.out_edges)):
            self._spawn(lambda i=i: self._acks(i), f"dispatch-ack{i}")
        self._spawn(self._watchdog, "dispatch-watchdog")

    def submit(self, x: torch.Tensor) -> Future[torch.Tensor]:
        """Queue one request; its future resolves to exactly its own output (or a RequestError)."""
        if self._failure is not None:
            raise PipelineFailedError(f"pipeline failed: {self._failure}")
        if self._closing:
            raise RequestError("dispatcher is shutting down; no new requests")
        inputs.check_request(self.spec, x, self.micro_batch_size)
        req = _Request(next(self._ids), x, Future())
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            raise RequestError(f"request queue full ({self._queue.maxsize} waiting); retry later") from None
        if self._failure is not None:  # failed while we queued: nobody will take it now
            _resolve(req.future, exc=PipelineFailedError(f"pipeline failed: {self._failure}"))
        return req.future

    def fail(self, reason: str) -> None:
        """Fail every queued and in-flight request (a worker died, an edge broke)."""
        with self._lock:
            if self._failure is None:
                self._failure = reason
                log.error("dispatcher: pipeline failed: %s", reason)
            lost = [r for f in self._inflight.values() for r in f.requests]
            freed = len(self._inflight)
            self._inflight.clear()
            self._idle.notify_all()
        for _ in range(freed):
            self._slots.release()  # wakes a batcher waiting for a slot: it fails its batch
        for r in lost + self._take_queued():
            _resolve(r.future, exc=PipelineFailedError(f"pipeline failed: {self._failure}"))
        self._stopped.set()

    def _take_queued(self) -> list[_Request]:
        taken: list[_Request] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return taken
            if item is not None:
                taken.append(item)

    def close(self, timeout_s: float = 30.0) -> None:
        """Drain: finish queued and in-flight requests, then STOP the data plane in order."""
        self._closing = True
        self._queue.put(None)
        deadline = time.monotonic() + timeout_s
        data_threads = [t for t in self._threads if t.name != "dispatch-watchdog"]
        for t in data_threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in data_threads):
            self.fail("shutdown timed out")
        self._stopped.set()

    @property
    def failure(self) -> str | None:
        return self._failure

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    # -- threads ---------------------------------------------------------------------------------

    def _batcher(self) -> None:
        carry: _Request | None = None
        try:
            while self._failure is None:
                first = carry if carry is not None else self._queue.get()
                carry = None
                if first is None:
                    break
                batch, carry, end = self._fill(first)
                self._send(batch)
                if end:
                    break
            if carry is not None:
                self._send([carry])
            self._drain_then_stop()
            # A request may have slipped in while fail() emptied the queue: fail it too.
            for r in self._take_queued() if self._failure is not None else []:
                _resolve(r.future, exc=PipelineFailedError(f"pipeline failed: {self._failure}"))
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            self._on_broken(f"dispatcher send failed: {exc}")

    def _fill(self, first: _Request) -> tuple[list[_Request], _Request | None, bool]:
        """Add queued requests to `first` until the micro-batch is full or max_wait passes.
        Returns (batch, a request that did not fit, whether shutdown was requested)."""
        batch, samples = [first], first.x.shape[0]
        deadline = time.monotonic() + self.max_wait_s
        while samples < self.micro_batch_size:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is None:
                return batch, None, True
            if samples + nxt.x.shape[0] > self.micro_batch_size:
                return batch, nxt, False
            batch.append(nxt)
            samples += nxt.x.shape[0]
        return batch, None, False

    def _send(self, batch: list[_Request]) -> None:
        self._slots.acquire()  # back-pressure: at most max_inflight micro-batches in the pipeline
        mb_id = next(self._mb_ids)
        act = inputs.collate(self.spec, [r.x for r in batch], self.dtype)
        table = torch.tensor([[r.id, r.x.shape[0]] for r in batch], dtype=torch.int64)  # [n, 2]
        # Registering under the lock that fail() takes means a batch is either failed by
        # fail() or sees the failure here: never stranded in between.
        with self._lock:
            failure = self._failure
            if failure is None:
                self._inflight[mb_id] = _InFlight(batch, time.monotonic())
        if failure is not None:
            self._slots.release()
            for r in batch:
                _resolve(r.future, exc=PipelineFailedError(f"pipeline failed: {failure}"))
            return
        # The first request's id keys sticky ("static") routing.
        index = self.router.pick(batch[0].id)
        self.out_edges[index].send(Message(DATA, mb_id, batch[0].id, {REQUESTS_KEY: table, **act}))

    def _drain_then_stop(self) -> None:
        # Wait until every micro-batch came back, then STOP flows down the pipeline.
        with self._idle:
            self._idle.wait_for(lambda: self._failure is not None or not self._inflight)
        if self._failure is None:
            for edge in self.out_edges:
                edge.send(Message(STOP, 0, 0, {}))

    def _collector(self, index: int) -> None:
        edge = self.in_edges[index]
        try:
            for msg in until_stop(edge):
                with self._idle:
                    flight = self._inflight.pop(msg.mb_id, None)
                    self._idle.notify_all()
                if flight is not None:  # else it timed out meanwhile; its requests were already failed
                    self._slots.release()
                    outputs = inputs.split(self.spec, msg.tensors["output"], [r.x for r in flight.requests])
                    for r, out in zip(flight.requests, outputs, strict=True):
                        _resolve(r.future, result=out)
                # Acked after the results are out: the blocking ack never delays a caller.
                edge.send_ack(Ack(ACK, msg.mb_id, int(msg.tensors[REQUESTS_KEY][:, 1].sum()), 0))
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            if self._failure is None:
                self._on_broken(f"receiving results failed: {exc}")

    def _acks(self, index: int) -> None:
        edge = self.out_edges[index]
        try:
            while True:
                ack = edge.recv_ack()
                if ack.kind == STOP_ACK:
                    return
                self.router.acked(index, ack.samples, ack.compute_us / 1e6)
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            if self._failure is None:
                self._on_broken(f"stage-0 acknowledgements failed: {exc}")

    def _watchdog(self) -> None:
        while not self._stopped.wait(0.5):
            now = time.monotonic()
            with self._lock:
                late = [mb for mb, f in self._inflight.items() if now - f.sent_at > self.request_timeout_s]
                expired = [self._inflight.pop(mb) for mb in late]
                self._idle.notify_all()
            for f in expired:
                self._slots.release()
                for r in f.requests:
                    _resolve(r.future, exc=RequestError(f"request timed out after {self.request_timeout_s:g} s"))

    def _spawn(self, target: object, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()


def _resolve(future: Future[torch.Tensor], *, result: torch.Tensor | None = None,
             exc: BaseException | None = None) -> None:
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        pass  # already resolved by a racing failure path: the first outcome stands
