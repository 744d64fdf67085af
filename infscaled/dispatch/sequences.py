"""The generation front end: admission onto replica chains, prefills, token streams.

It never touches the decode loop: it sends each admitted sequence's prompt (a prefill) to
stage 0 of one replica chain and receives the tokens the last stage streams out; the next steps
run inside the chain (engine/programs/generation.py).

Admission: a sequence reserves prompt + max_new_tokens KV positions on every stage of its chain.
It is admitted, first come first served, to the chain with the most room once that room covers
it; otherwise it waits (never an out-of-memory error), and it is refused at once only when it
could never fit (more than kv_budget_tokens). The reservation is released when the sequence
finishes, is cancelled (its consumer went away) or times out; a cancel also sends a FREE to
stage 0, which frees the caches down the chain.

Chains come and go with the topology (protocol/topology.py): a chain is the out-edge to its
stage-0 replica; an added one takes sequences once open; a removed one takes no new sequence,
and its edge is closed (STOP) once its live sequences finished.

Consumers are called on the engine's compute thread: `PipelineBackend` moves their tokens onto
an asyncio loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from infscaled.dispatch.core import TIMEOUT_CHECK_S, FrontEnd
from infscaled.engine import genwire as gw
from infscaled.engine.core import REQUESTS_KEY
from infscaled.engine.edges import EdgeEnd
from infscaled.generation.errors import GenerationError
from infscaled.generation.kv import reserved_span
from infscaled.generation.params import FEATURES, Admitted, PromptLogprobs, Sampled, SamplingParams
from infscaled.protocol.generation import SequenceSpec
from infscaled.protocol.plan import GenerationPlan
from infscaled.worker.request_stats import RequestStats
from infscaled.worker.transport import ACK, Ack, Message

log = logging.getLogger(__name__)

# Called with (token, done, error): a token with done=False, the last token with done=True,
# or (-1, True, reason) when the sequence failed.
# A sequence that asked for log-probabilities gets its tokens as Sampled, after one
# PromptLogprobs (done=False) if it asked for its prompt's.
Consumer = Callable[[int | Sampled | PromptLogprobs, bool, str | None], None]
TIMED_OUT = "timed out"  # how the timeout's reason starts


@dataclass
class _Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    consume: Consumer
    reserve: int
    deadline: float
    on_admitted: Callable[[float], None] | None = None  # told the admission time (serving metrics)
    chain: str = ""  # the chain's edge key; "": waiting for admission
    produced: int = 0


@dataclass
class _Cancel:
    seq_id: int
    reason: str | None = None  # told to the consumer first (a timeout); None: it went away


@dataclass
class _Chain:
    end: EdgeEnd
    reserved: int = 0
    live: set[int] = field(default_factory=set)
    draining: bool = False


class Sequences(FrontEnd):
    def __init__(self, plan: GenerationPlan, request_timeout_s: float = 120.0, max_waiting: int = 4096,
                 on_broken: Callable[[str], None] | None = None) -> None:
        super().__init__(None, on_broken)
        self.plan = plan
        self.request_timeout_s = request_timeout_s
        self.max_waiting = max_waiting
        self.chains: dict[str, _Chain] = {}
        self._seqs: dict[int, _Sequence] = {}  # compute thread
        self._waiting: deque[_Sequence] = deque()
        self._live_ids: set[int] = set()  # any thread, under the lock: submitted and not ended
        self._waiting_count = 0
        self._idle = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._mb_ids = itertools.count(1)
        self._next_check = 0.0
        self.finished = 0  # sequences that ran to their end (for stats and tests)

    # -- any thread ------------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, consume: Consumer,
               on_admitted: Callable[[float], None] | None = None) -> int:
        """Queue one sequence; returns its id. GenerationError when it can never run or we are
        closing, failed or full. `on_admitted(monotonic time)` is called (compute thread) when
        it is admitted onto a chain, before any of its tokens is consumed."""
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
            if self._waiting_count >= self.max_waiting:
                raise GenerationError(429, f"{self._waiting_count} sequences are waiting for KV room; retry later")
            seq = _Sequence(next(self._ids), list(prompt), params, consume, reserve,
                            time.monotonic() + self.request_timeout_s, on_admitted=on_admitted)
            self._live_ids.add(seq.id)
            self._waiting_count += 1
        self.engine.post(seq)
        return seq.id

    def cancel(self, seq_id: int) -> None:
        """Drop a sequence (its consumer went away): its reservation and caches are freed."""
        self.engine.post(_Cancel(seq_id))

    def live(self) -> int:
        with self._lock:
            return len(self._live_ids)

    def inflight(self) -> int:
        """Sequences admitted or waiting (the service's health and stats call it this)."""
        return self.live()

    def waiting(self) -> int:
        with self._lock:
            return self._waiting_count

    def close(self, timeout_s: float = 30.0) -> None:
        """Drain: refuse new sequences, let live ones finish (up to timeout_s), then STOP."""
        self._closing = True
        with self._idle:
            self._idle.wait_for(lambda: not self._live_ids or self._failure is not None, timeout_s)
        super().close(10.0)

    def on_drain(self) -> None:
        # close() waited for live sequences already: whatever is left will not finish in time.
        for seq in list(self._seqs.values()):
            self._cancel(_Cancel(seq.id, "the job is shutting down"))

    # -- compute thread: chains ------------------------------------------------------------------

    def on_output_open(self, end: EdgeEnd) -> None:
        self.chains[end.key] = _Chain(end)

    def on_output_removed(self, end: EdgeEnd) -> None:
        chain = self.chains.get(end.key)
        if chain is None:
            self.engine.close_output(end)
            return
        chain.draining = True  # closed once its sequences finished (_release)
        self._maybe_close(chain)

    def on_output_closed(self, end: EdgeEnd) -> None:
        self.chains.pop(end.key, None)

    def _maybe_close(self, chain: _Chain) -> None:
        if chain.draining and not chain.live:
            self.chains.pop(chain.end.key, None)
            self.engine.close_output(chain.end)

    # -- compute thread: sequences ---------------------------------------------------------------

    def on_work(self, item: object) -> None:
        if isinstance(item, _Cancel):
            self._cancel(item)
            return
        assert isinstance(item, _Sequence)
        if self._failure is not None:
            self._end(item, fail=f"pipeline failed: {self._failure}")
            return
        self._seqs[item.id] = item
        self._waiting.append(item)

    def _cancel(self, item: _Cancel) -> None:
        seq = self._seqs.get(item.seq_id)
        if seq is None:
            return
        if item.reason is not None:
            seq.consume(-1, True, item.reason)
        chain = self.chains.get(seq.chain)
        self._end(seq)
        if chain is not None:
            self.engine.send(chain.end, gw.encode(gw.Free([seq.id]), next(self._mb_ids)))

    def _end(self, seq: _Sequence, fail: str | None = None) -> None:
        """The sequence is over: release its reservation and forget it."""
        self._seqs.pop(seq.id, None)
        if seq.chain:
            chain = self.chains.get(seq.chain)
            if chain is not None and seq.id in chain.live:
                chain.live.discard(seq.id)
                chain.reserved -= reserved_span(seq.reserve)
                self._maybe_close(chain)
        else:
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass
        with self._idle:
            if not seq.chain:
                self._waiting_count -= 1
            self._live_ids.discard(seq.id)
            self._idle.notify_all()
        if fail is not None:
            seq.consume(-1, True, fail)

    def poll(self, now: float) -> float | None:
        if self._failure is not None:
            return None
        if now >= self._next_check:
            self._next_check = now + TIMEOUT_CHECK_S
            for seq in [s for s in self._seqs.values() if now > s.deadline]:
                self._cancel(_Cancel(seq.id, f"{TIMED_OUT} after {self.request_timeout_s:g} s"))
        while (picked := self._admissible()) is not None:
            chain, batch = picked
            for seq in batch:
                self._waiting.popleft()
                seq.chain = chain.end.key
                chain.live.add(seq.id)
                chain.reserved += reserved_span(seq.reserve)
                if seq.on_admitted is not None:
                    seq.on_admitted(time.monotonic())
            with self._lock:
                self._waiting_count -= len(batch)
            self.engine.send(chain.end, gw.encode(self._prefill(batch), next(self._mb_ids)))
        self.close_when_drained(not self._seqs)
        return max(0.0, self._next_check - now) if self._seqs else None

    def _admissible(self) -> tuple[_Chain, list[_Sequence]] | None:
        """The chain for the head of the queue and the waiting sequences that go with it in one
        prefill, or None while nothing fits."""
        if not self._waiting:
            return None
        # Counted as the stages count it: whole KV pages (generation/kv.py), so whatever this
        # admits, stage 0 finds room for.
        capacity = reserved_span(self.plan.kv_budget_tokens)
        open_chains = [c for c in self.chains.values() if not c.draining]
        if not open_chains:
            return None
        best = max(open_chains, key=lambda c: (capacity - c.reserved, c.end.key))
        head = self._waiting[0]
        left = capacity - best.reserved
        if left < reserved_span(head.reserve):
            return None
        batch: list[_Sequence] = []
        for seq in self._waiting:
            if len(batch) == self.plan.max_batch_sequences or reserved_span(seq.reserve) > left:
                break  # first come, first served: nobody overtakes the one that does not fit
            batch.append(seq)
            left -= reserved_span(seq.reserve)
        return best, batch

    def _prefill(self, batch: list[_Sequence]) -> gw.Prefill:
        longest = max(len(s.prompt) for s in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.int64)  # [n, T], right-padded
        mask = torch.zeros(len(batch), longest, dtype=torch.int64)
        for i, s in enumerate(batch):
            ids[i, :len(s.prompt)] = torch.tensor(s.prompt)
            mask[i, :len(s.prompt)] = 1
        # The last stage sees hidden states, not ids: the prompt travels when its sampling reads it.
        specs = [SequenceSpec(s.id, len(s.prompt), s.reserve, s.params, s.produced,
                              tuple(s.prompt) if s.params.repetition_penalty != 1.0
                              or s.params.prompt_logprobs is not None else ()) for s in batch]
        return gw.Prefill(specs, ids, mask)

    def on_message(self, end: EdgeEnd, wire: Message) -> None:
        msg = gw.decode(wire)
        if isinstance(msg, gw.Tokens):
            reported = msg.reported or [[] for _ in msg.seqs]
            for s, tok, done, extra in zip(msg.seqs, msg.tokens, msg.done, reported, strict=True):
                self._deliver(s, tok, done, extra)
        self.engine.passed_on()
        self.engine.ack(end, Ack(ACK, wire.mb_id, len(wire.tensors[REQUESTS_KEY]), 0))

    def _deliver(self, seq_id: int, token: int, done: bool, reported: list[Sampled | PromptLogprobs]) -> None:
        seq = self._seqs.get(seq_id)
        if seq is None:
            return  # cancelled or timed out while the token was on its way
        seq.produced += 1
        if done:
            self.finished += 1
            self._end(seq)
        for item in reported:
            if isinstance(item, PromptLogprobs):
                seq.consume(item, False, None)
        seq.consume(next((x for x in reported if isinstance(x, Sampled)), token), done, None)

    def fail_all(self, reason: str) -> None:
        for seq in list(self._seqs.values()):
            self._end(seq, fail=reason)


class PipelineBackend:
    """The pipeline as a `generation.openai_api.GenerationBackend`: tokens onto the event loop.

    With `stats` (the service's RequestStats, event-loop only) every sequence is counted: a
    finished one with its tokens, latency, time to first token and time per output token."""

    def __init__(self, sequences: Sequences, stats: RequestStats | None = None) -> None:
        self.sequences = sequences
        self.stats = stats

    features = frozenset(FEATURES)  # the last stage samples with generation.sampling.sample_step

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[
            int | Sampled | PromptLogprobs | Admitted]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int | Sampled | PromptLogprobs | Admitted, bool, str | None]] = asyncio.Queue()

        def consume(token: int | Sampled | PromptLogprobs | Admitted, done: bool, error: str | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (token, done, error))

        stats = self.stats
        try:
            seq_id = self.sequences.submit(prompt_ids, params, consume,
                                           on_admitted=lambda at: consume(Admitted(at), False, None))
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
                    # The timeout's reason is the one timeout; the others (failed, shutting down) are 503.
                    timed_out = error.startswith(TIMED_OUT)
                    if stats is not None and timed_out:
                        stats.timed_out += 1
                    raise GenerationError(504 if timed_out else 503, error)
                if isinstance(token, PromptLogprobs | Admitted):
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
                self.sequences.cancel(seq_id)
