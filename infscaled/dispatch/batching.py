"""The forward front end: requests in, micro-batches out, each request's own slice back.

It queues requests (bounded), forms micro-batches of up to `micro_batch_size` samples once
that many wait or the oldest waited `max_wait_ms`, keeps at most `max_inflight` micro-batches
inside the pipeline, routes each to a stage-0 replica with the forwarding policy, and hands
every request exactly its own slice of the last stage's output. A request past its timeout
(queued or in flight) is answered with a RequestError; a result that comes back after that is
dropped. Callers get a `concurrent.futures.Future` per request (asyncio code awaits it through
`asyncio.wrap_future`). Routing keys on the first request's id, so `static` is sticky.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from infscaled.dispatch.core import TIMEOUT_CHECK_S, FrontEnd, Journal
from infscaled.engine.core import REQUESTS_KEY
from infscaled.engine.edges import EdgeEnd
from infscaled.errors import PipelineFailedError, RequestError
from infscaled.models import inputs
from infscaled.models.base import InputSpec
from infscaled.protocol.plan import JobPlan
from infscaled.protocol.wire import DATA
from infscaled.worker.router import Router
from infscaled.worker.transport import ACK, Ack, Message

log = logging.getLogger(__name__)


@dataclass
class _Request:
    id: int
    x: torch.Tensor
    future: Future[torch.Tensor]
    deadline: float
    submitted: float = field(default_factory=time.monotonic)


class Batching(FrontEnd):
    def __init__(self, spec: InputSpec, dtype: torch.dtype, plan: JobPlan, request_timeout_s: float = 120.0,
                 max_queued: int = 4096, on_broken: Callable[[str], None] | None = None,
                 recovery: bool = False) -> None:
        super().__init__(Router(plan.policy, seed=plan.seed), on_broken, recovery)
        self.spec = spec
        self.dtype = dtype
        self.micro_batch_size = plan.micro_batch_size
        self.max_inflight = plan.max_inflight
        self.max_wait_s = plan.max_wait_ms / 1000.0
        self.request_timeout_s = request_timeout_s
        self.max_queued = max_queued
        self.journal: Journal[list[_Request]] = Journal()
        self._queue: deque[_Request] = deque()
        self._queued = 0  # submitted, not yet in a micro-batch (any thread reads it)
        self._ids = itertools.count()
        self._mb_ids = itertools.count()
        self._next_check = 0.0

    # -- any thread ------------------------------------------------------------------------------

    def submit(self, x: torch.Tensor) -> Future[torch.Tensor]:
        """Queue one request; its future resolves to exactly its own output (or a RequestError)."""
        if self._failure is not None:
            raise PipelineFailedError(f"pipeline failed: {self._failure}")
        if self._closing:
            raise RequestError("dispatcher is shutting down; no new requests")
        inputs.check_request(self.spec, x, self.micro_batch_size)
        with self._lock:
            if self._queued >= self.max_queued:
                raise RequestError(f"request queue full ({self.max_queued} waiting); retry later")
            self._queued += 1
            req = _Request(next(self._ids), x, Future(), time.monotonic() + self.request_timeout_s)
        self.engine.post(req)
        self.posted()  # (a failure that raced this submit may have stopped the engine's loop)
        return req.future

    def abandoned(self, item: object, reason: str) -> None:
        if isinstance(item, _Request):
            self._dequeued(1)
            _resolve(item.future, exc=PipelineFailedError(reason))

    def inflight(self) -> int:
        """Micro-batches in the pipeline now."""
        return len(self.journal)

    # -- compute thread --------------------------------------------------------------------------

    def on_work(self, item: object) -> None:
        assert isinstance(item, _Request)
        if self._failure is not None:
            self._dequeued(1)
            _resolve(item.future, exc=PipelineFailedError(f"pipeline failed: {self._failure}"))
            return
        self._queue.append(item)

    def poll(self, now: float) -> float | None:
        if self._failure is not None:
            return None
        if now >= self._next_check:
            self._expire(now)
            self._next_check = now + TIMEOUT_CHECK_S
        wait = self.replay_if_due(now)
        while (self._queue and self.complete and len(self.journal) < self.max_inflight and self.router is not None
               and len(self.router)):
            due = self._queue[0].submitted + self.max_wait_s
            if self._queued_samples() < self.micro_batch_size and now < due and not self._draining:
                wait = due - now if wait is None else min(wait, due - now)
                break
            self._send_batch()
        self.close_when_drained(not self._queue and not self.journal)
        check = max(0.0, self._next_check - now) if (self._queue or self.journal) else None
        return wait if check is None else check if wait is None else min(wait, check)

    def _queued_samples(self) -> int:
        total = 0
        for r in self._queue:
            total += r.x.shape[0]
            if total >= self.micro_batch_size:
                break
        return total

    def _send_batch(self) -> None:
        batch, samples = [], 0
        while self._queue and samples + self._queue[0].x.shape[0] <= self.micro_batch_size:
            req = self._queue.popleft()
            batch.append(req)
            samples += req.x.shape[0]
        self._dequeued(len(batch))
        mb_id = next(self._mb_ids)
        act = inputs.collate(self.spec, [r.x for r in batch], self.dtype)
        table = torch.tensor([[r.id, r.x.shape[0]] for r in batch], dtype=torch.int64)  # [n, 2]
        end = self.pick(batch[0].id)  # the first request's id keys sticky ("static") routing
        self.journal.add(mb_id, batch, end.key)
        self.engine.send(end, Message(DATA, mb_id, batch[0].id, {REQUESTS_KEY: table, **act}))

    def replay(self) -> None:
        """Every micro-batch in flight goes back to the head of the queue, in order, as its requests
        (they are batched again under new ids): any of them may have crossed the dead node. The old
        ids leave the journal, so a copy that still comes back is dropped as a duplicate."""
        entries = sorted(self.journal.clear(), key=lambda e: e.key)
        again = [r for e in entries for r in e.work if not r.future.done()]
        if not again:
            return
        self.replayed += len(again)
        with self._lock:
            self._queued += len(again)
        self._queue.extendleft(reversed(again))
        log.warning("dispatcher: replaying %d request(s) of %d micro-batch(es)", len(again), len(entries))

    def on_message(self, end: EdgeEnd, msg: Message) -> None:
        entry = self.journal.pop(msg.mb_id)
        if entry is None:
            self.duplicates += 1  # replayed (or timed out) meanwhile: its requests were answered already
        else:
            outputs = inputs.split(self.spec, msg.tensors["output"], [r.x for r in entry.work])
            for r, out in zip(entry.work, outputs, strict=True):
                _resolve(r.future, result=out)
        self.engine.passed_on()
        # Acked after the results are out: the blocking ack never delays a caller.
        self.engine.ack(end, Ack(ACK, msg.mb_id, int(msg.tensors[REQUESTS_KEY][:, 1].sum()), 0))

    def _expire(self, now: float) -> None:
        late = [e for e in self.journal if any(now > r.deadline for r in e.work)]
        for e in late:
            self.journal.pop(e.key)
            for r in e.work:
                _resolve(r.future, exc=RequestError(f"request timed out after {self.request_timeout_s:g} s"))
        if self._queue and now > self._queue[0].deadline:
            keep = deque(r for r in self._queue if now <= r.deadline)
            for r in self._queue:
                if now > r.deadline:
                    _resolve(r.future, exc=RequestError(f"request timed out after {self.request_timeout_s:g} s"))
            self._dequeued(len(self._queue) - len(keep))
            self._queue = keep

    def fail_all(self, reason: str) -> None:
        lost = [r for e in self.journal.clear() for r in e.work] + list(self._queue)
        self._dequeued(len(self._queue))
        self._queue.clear()
        for r in lost:
            _resolve(r.future, exc=PipelineFailedError(reason))

    def _dequeued(self, n: int) -> None:
        with self._lock:
            self._queued -= n


def _resolve(future: Future[torch.Tensor], *, result: torch.Tensor | None = None,
             exc: BaseException | None = None) -> None:
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        pass  # already answered (timed out, then the result came): the first outcome stands
