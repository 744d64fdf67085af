"""The dispatcher of a generation job: admission onto replica chains, prefills, token streams.

It never touches the decode loop: it sends each admitted sequence's prompt (a prefill
micro-batch) to stage 0 of one replica chain and receives the tokens the last stage streams
out; the next steps run inside the chain (worker/gen_loop.py).

Admission: a sequence reserves prompt + max_new_tokens KV positions on every stage of its chain.
It is admitted, first come first served, to the chain with the most room once that room covers
it; otherwise it waits (never an out-of-memory error), and it is refused at once only when it
could never fit (more than kv_budget_tokens). The reservation is released when the sequence
finishes, is cancelled (its consumer went away) or times out; a cancel also sends its id in a
`free` list to stage 0, which frees the caches down the chain.

Threads: the scheduler (admission and prefills), a sender and an ack reader per chain, a
collector per last-stage replica, and a watchdog for timeouts. Consumers are called from the
collector thread: `PipelineBackend` moves their tokens onto an asyncio loop.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch

from infscaled.generation.errors import GenerationError
from infscaled.generation.kv import reserved_span
from infscaled.generation.params import FEATURES, PromptLogprobs, Sampled, SamplingParams
from infscaled.generation.sampling_wire import LOGPROB_KEYS, prefill_tensors, reported_at
from infscaled.protocol.plan import GenerationPlan
from infscaled.protocol.wire import DATA, STOP
from infscaled.worker.gen_loop import REQUESTS_KEY, drain_acks
from infscaled.worker.request_stats import RequestStats
from infscaled.worker.transport import ACK, Ack, Edge, Message, until_stop

log = logging.getLogger(__name__)

# Called with (token, done, error): a token with done=False, the last token with done=True,
# or (-1, True, reason) when the sequence failed. A sequence that asked for log-probabilities
# gets its tokens as Sampled, after one PromptLogprobs (done=False) if it asked for those.
Consumer = Callable[[int | Sampled | PromptLogprobs, bool, str | None], None]
TIMED_OUT = "timed out"  # how the watchdog's reason starts


@dataclass
class _Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    consume: Consumer
    reserve: int
    deadline: float
    chain: int = -1  # -1: waiting for admission
    produced: int = 0


@dataclass
class _ChainState:
    reserved: int = 0
    live: set[int] = field(default_factory=set)


class GenDispatcher:
    def __init__(self, out_edges: list[Edge], in_edges: list[Edge], plan: GenerationPlan,
                 request_timeout_s: float = 120.0, max_waiting: int = 4096,
                 on_broken: Callable[[str], None] | None = None) -> None:
        # Chain r starts at stage replica (0, r): the out-edges in replica order.
        self.out_edges = sorted(out_edges, key=lambda e: e.peer.replica)
        self.in_edges = in_edges
        self.plan = plan
        self.request_timeout_s = request_timeout_s
        self.max_waiting = max_waiting
        self.chains = [_ChainState() for _ in self.out_edges]
        self._seqs: dict[int, _Sequence] = {}
        self._waiting: deque[_Sequence] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._outboxes: list[queue.Queue[Message | None]] = [queue.Queue() for _ in self.out_edges]
        self._ids = itertools.count(1)
        self._mb_ids = itertools.count(1)
        self._closing = False
        self._failure: str | None = None
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()
        self._on_broken = on_broken or self.fail
        self.finished = 0  # sequences that ran to their end (for stats and tests)

    # -- public API ------------------------------------------------------------------------------

    def start(self) -> None:
        self._spawn(self._scheduler, "gen-scheduler")
        for i in range(len(self.out_edges)):
            self._spawn(functools.partial(self._sender, i), f"gen-send{i}")
            self._spawn(functools.partial(self._acks, i), f"gen-ack{i}")
        for i in range(len(self.in_edges)):
            self._spawn(functools.partial(self._collector, i), f"gen-collect{i}")
        self._spawn(self._watchdog, "gen-watchdog")

    def submit(self, prompt: list[int], params: SamplingParams, consume: Consumer) -> int:
        """Queue one sequence; returns its id. GenerationError when it can never run or we are
        closing, failed or full."""
        if self._failure is not None:
            raise GenerationError(503, f"pipeline failed: {self._failure}")
        if self._closing:
            raise GenerationError(503, "the job is shutting down; no new sequences")
        if not prompt:
            raise GenerationError(400, "the prompt is empty", param="prompt")
        reserve = len(prompt) + params.max_new_tokens
        budget = self.plan.kv_budget_tokens
        if reserve > budget:
            raise GenerationError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_new_tokens}) needs "
                                       f"{reserve} KV positions; each stage of this job holds at most {budget} "
                                       f"(generation.kv_budget_tokens)", param="max_tokens")
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise GenerationError(429, f"{len(self._waiting)} sequences are waiting for KV room; retry later")
            seq = _Sequence(next(self._ids), list(prompt), params, consume, reserve,
                            time.monotonic() + self.request_timeout_s)
            self._seqs[seq.id] = seq
            self._waiting.append(seq)
            self._wake.notify_all()
        return seq.id

    def cancel(self, seq_id: int) -> None:
        """Drop a sequence (its consumer went away): its reservation and caches are freed."""
        with self._lock:
            seq = self._seqs.pop(seq_id, None)
            if seq is None:
                return
            self._release(seq)
        if seq.chain >= 0:
            self._outboxes[seq.chain].put(Message(DATA, next(self._mb_ids), 0, {
                REQUESTS_KEY: torch.zeros(0, 2, dtype=torch.int64), "free": torch.tensor([seq_id])}))

    def fail(self, reason: str) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = reason
                log.error("generation dispatcher: pipeline failed: %s", reason)
            lost = list(self._seqs.values())
            self._seqs.clear()
            self._waiting.clear()
            for c in self.chains:
                c.reserved, c.live = 0, set()
            self._wake.notify_all()
        for seq in lost:
            seq.consume(-1, True, f"pipeline failed: {reason}")
        self._stopped.set()

    def close(self, timeout_s: float = 30.0) -> None:
        """Drain: refuse new sequences, let live ones finish (up to timeout_s), then STOP."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._closing = True
            self._wake.notify_all()
            self._wake.wait_for(lambda: not self._seqs or self._failure is not None,
                                max(0.0, deadline - time.monotonic()))
            left = list(self._seqs)
        for seq_id in left:
            seq = self._seqs.get(seq_id)
            if seq is not None:
                seq.consume(-1, True, "the job is shutting down")
            self.cancel(seq_id)
        if self._failure is None:
            for box in self._outboxes:
                box.put(None)
        for t in self._threads:
            if t.name != "gen-watchdog":
                t.join(max(0.0, deadline + 5.0 - time.monotonic()))
        self._stopped.set()

    @property
    def failure(self) -> str | None:
        return self._failure

    def inflight(self) -> int:
        """Sequences admitted or waiting (the service's health and stats call it this)."""
        return self.live()

    def live(self) -> int:
        with self._lock:
            return len(self._seqs)

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    # -- admission -------------------------------------------------------------------------------

    def _release(self, seq: _Sequence) -> None:
        """Under the lock: give back a sequence's reservation and wake the scheduler."""
        if seq.chain >= 0:
            chain = self.chains[seq.chain]
            if seq.id in chain.live:
                chain.live.discard(seq.id)
                chain.reserved -= reserved_span(seq.reserve)
        else:
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass
        self._wake.notify_all()  # room for waiting sequences; close() may wait for the last one

    def _admissible(self) -> tuple[int, list[_Sequence]] | None:
        """Under the lock: the chain for the head of the queue and the waiting sequences that go
        with it in one prefill, or None while nothing fits."""
        if not self._waiting:
            return None
        # Counted as the stages count it: whole KV pages (generation/kv.py), so whatever this
        # admits, stage 0 finds room for.
        capacity = reserved_span(self.plan.kv_budget_tokens)
        head = self._waiting[0]
        room = [capacity - c.reserved for c in self.chains]
        best = max(range(len(room)), key=lambda r: room[r])
        if room[best] < reserved_span(head.reserve):
            return None
        batch: list[_Sequence] = []
        left = room[best]
        for seq in list(self._waiting):
            if len(batch) == self.plan.max_batch_sequences or reserved_span(seq.reserve) > left:
                break  # first come, first served: nobody overtakes the one that does not fit
            batch.append(seq)
            left -= reserved_span(seq.reserve)
        return best, batch

    def _scheduler(self) -> None:
        try:
            while True:
                with self._lock:
                    self._wake.wait_for(lambda: self._failure is not None or self._admissible() is not None
                                        or (self._closing and not self._seqs))
                    if self._failure is not None or (self._closing and not self._seqs):
                        return
                    picked = self._admissible()
                    assert picked is not None
                    r, batch = picked
                    for seq in batch:
                        self._waiting.popleft()
                        seq.chain = r
                        self.chains[r].live.add(seq.id)
                        self.chains[r].reserved += reserved_span(seq.reserve)
                self._outboxes[r].put(self._prefill(batch))
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            self._on_broken(f"generation scheduler failed: {exc}")

    def _prefill(self, batch: list[_Sequence]) -> Message:
        longest = max(len(s.prompt) for s in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.int64)  # [n, T], right-padded
        mask = torch.zeros(len(batch), longest, dtype=torch.int64)
        for i, s in enumerate(batch):
            ids[i, :len(s.prompt)] = torch.tensor(s.prompt)
            mask[i, :len(s.prompt)] = 1
        return Message(DATA, next(self._mb_ids), batch[0].id, {
            REQUESTS_KEY: torch.tensor([[s.id, 1] for s in batch], dtype=torch.int64),
            "input_ids": ids, "attention_mask": mask,
            "lengths": torch.tensor([len(s.prompt) for s in batch], dtype=torch.int64),
            "reserve": torch.tensor([s.reserve for s in batch], dtype=torch.int64),
            **prefill_tensors([s.params for s in batch], [s.prompt for s in batch]),
        })

    # -- edges -----------------------------------------------------------------------------------

    def _sender(self, index: int) -> None:
        edge, box = self.out_edges[index], self._outboxes[index]
        try:
            while True:
                msg = box.get()
                edge.send(Message(STOP, 0, 0, {}) if msg is None else msg)
                if msg is None:
                    return
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            if self._failure is None:
                self._on_broken(f"sending to stage 0 replica {index} failed: {exc}")

    def _acks(self, index: int) -> None:
        try:
            drain_acks(self.out_edges[index])
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            if self._failure is None:
                self._on_broken(f"stage-0 acknowledgements failed: {exc}")

    def _collector(self, index: int) -> None:
        edge = self.in_edges[index]
        try:
            for msg in until_stop(edge):
                t = msg.tensors
                logprobs = any(k in t for k in LOGPROB_KEYS)
                for i, (s, tok, done) in enumerate(zip(t[REQUESTS_KEY][:, 0].tolist(), t["tokens"].tolist(),
                                                       t["done"].tolist(), strict=True)):
                    self._deliver(s, tok, bool(done), reported_at(t, i, tok) if logprobs else ())
                edge.send_ack(Ack(ACK, msg.mb_id, int(t[REQUESTS_KEY].shape[0]), 0))
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            if self._failure is None:
                self._on_broken(f"receiving tokens failed: {exc}")

    def _deliver(self, seq_id: int, token: int, done: bool,
                 reported: Sequence[Sampled | PromptLogprobs] = ()) -> None:
        with self._lock:
            seq = self._seqs.get(seq_id)
            if seq is None:
                return  # cancelled or timed out while the token was on its way
            seq.produced += 1
            if done:
                self._seqs.pop(seq_id)
                self._release(seq)
                self.finished += 1
        for item in reported:
            if isinstance(item, PromptLogprobs):
                seq.consume(item, False, None)
        seq.consume(next((x for x in reported if isinstance(x, Sampled)), token), done, None)

    def _watchdog(self) -> None:
        while not self._stopped.wait(0.5):
            now = time.monotonic()
            with self._lock:
                late = [s for s in self._seqs.values() if now > s.deadline]
            for seq in late:
                seq.consume(-1, True, f"{TIMED_OUT} after {self.request_timeout_s:g} s")
                self.cancel(seq.id)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()


class PipelineBackend:
    """The pipeline as a `generation.openai_api.GenerationBackend`: tokens onto the event loop.

    With `stats` (the service's RequestStats, event-loop only) every sequence is counted: a
    finished one with its tokens, latency, time to first token and time per output token."""

    def __init__(self, dispatcher: GenDispatcher, stats: RequestStats | None = None) -> None:
        self.dispatcher = dispatcher
        self.stats = stats

    features = frozenset(FEATURES)  # the last stage samples with generation.sampling.sample_step

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[
            int | Sampled | PromptLogprobs]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int | Sampled | PromptLogprobs, bool, str | None]] = asyncio.Queue()

        def consume(token: int | Sampled | PromptLogprobs, done: bool, error: str | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (token, done, error))

        stats = self.stats
        try:
            seq_id = self.dispatcher.submit(prompt_ids, params, consume)
        except GenerationError:
            if stats is not None:
                stats.rejected += 1
            raise
        submitted, first_at, produced = time.monotonic(), 0.0, 0
        finished = False
        if stats is not None:
            stats.inflight += 1
        try:
            while not finished:
                token, finished, error = await events.get()
                if error is not None:
                    # The watchdog's reason is the one timeout; the others (failed, shutting down) are 503.
                    timed_out = error.startswith(TIMED_OUT)
                    if stats is not None and timed_out:
                        stats.timed_out += 1
                    raise GenerationError(504 if timed_out else 503, error)
                if isinstance(token, PromptLogprobs):
                    yield token
                    continue
                produced += 1
                first_at = first_at or time.monotonic()
                yield token
            if stats is not None:
                now = time.monotonic()
                tpot = (now - first_at) / (produced - 1) if produced > 1 else None
                stats.generated(produced, now - submitted, first_at - submitted, tpot, now)
        finally:
            if stats is not None:
                stats.inflight -= 1
            if not finished:  # the consumer stopped early (client gone) or we failed: free it
                self.dispatcher.cancel(seq_id)
