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

Recovery (issue 12; `recovery` on). A chain is lost when the supervisor declares one of its
nodes dead (TopologyUpdate.dead: a node (i, r) belongs to chain r) or one of the dispatcher's
own edges to it breaks. A lost chain takes nothing more; after the core's replay grace its live
sequences go back to the head of the queue (oldest first) and its edge is closed (STOP: its
surviving stage 0 drops what it holds and the STOP flows on to whatever survives). A sequence's
recoverable state is what this front end keeps anyway: its prompt, the tokens it streamed and its
SamplingParams. Re-admitted on another chain, it is prefilled again with prompt + those tokens
(its reservation is the same prompt + max_new_tokens, so KV accounting counts the generated
tokens as prompt), and the last stage rebuilds its sampler from the prefill's SequenceSpec alone
(`produced`, the tokens when a penalty reads them, the seeded generator advanced past their
draws: engine/programs/generation.py), so the stream goes on with no gap, no repeated token, and
the tokens a seeded sequence would have had without the fault. Prompt log-probabilities, already
sent with its first token, are not asked again. A token from a lost chain that arrives after its
sequence left it is dropped (counted in `duplicates`): every sequence listens to one chain at a
time. While no chain can take sequences (`complete` False, or no open chain) they wait, bounded by
their timeout, whose error then says what they waited for. With recovery off a broken edge fails
every sequence (the core's `fail`), and a dead node ends its chain's sequences with the reason.

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
from dataclasses import dataclass, field, replace

import torch

from infscaled.dispatch.core import TIMEOUT_CHECK_S, FrontEnd
from infscaled.engine import genwire as gw
from infscaled.engine.core import REQUESTS_KEY
from infscaled.engine.edges import EdgeEnd
from infscaled.generation.errors import GenerationError
from infscaled.generation.kv import reserved_span
from infscaled.generation.params import FEATURES, Admitted, PromptLogprobs, Sampled, SamplingParams
from infscaled.protocol.generation import SequenceSpec
from infscaled.protocol.plan import GenerationPlan, Node
from infscaled.worker.request_stats import RequestStats
from infscaled.worker.transport import ACK, Ack, Message

log = logging.getLogger(__name__)

# Called with (token, done, error): a token with done=False, the last token with done=True,
# or (-1, True, reason) when the sequence failed.
# A sequence that asked for log-probabilities gets its tokens as Sampled, after one
# PromptLogprobs (done=False) if it asked for its prompt's.
Consumer = Callable[[int | Sampled | PromptLogprobs, bool, str | None], None]
TIMED_OUT = "timed out"  # how the timeout's reason starts
EPOCH_ID_SHIFT = 32  # a dispatcher started at topology epoch E numbers its sequences from E << 32


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
    replica: int | None = None  # its chain's replica id: tokens from any other chain are stale
    generated: list[int] = field(default_factory=list)  # tokens streamed to the consumer so far
    waited_for: str = ""  # why it is back in the queue (its chain was lost): said if it times out

    @property
    def produced(self) -> int:
        return len(self.generated)


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
    lost: str = ""  # why the chain is lost (recovery); "": it serves

    @property
    def replica(self) -> int:
        return self.end.peer.replica


class Sequences(FrontEnd):
    def __init__(self, plan: GenerationPlan, request_timeout_s: float = 120.0, max_waiting: int = 4096,
                 on_broken: Callable[[str], None] | None = None, recovery: bool = False, epoch: int = 0) -> None:
        super().__init__(None, on_broken, recovery)
        self.plan = plan
        self.request_timeout_s = request_timeout_s
        self.max_waiting = max_waiting
        self.chains: dict[str, _Chain] = {}
        self._seqs: dict[int, _Sequence] = {}  # compute thread
        self._waiting: deque[_Sequence] = deque()
        self._live_ids: set[int] = set()  # any thread, under the lock: submitted and not ended
        self._waiting_count = 0
        self._idle = threading.Condition(self._lock)
        # Sequence ids start past every id of an earlier dispatcher of the job (one restarted after
        # a death starts at a later epoch): tokens of the dead one's sequences, still in a chain's
        # loop, are never taken for this one's.
        self._ids = itertools.count((epoch << EPOCH_ID_SHIFT) + 1)
        self._mb_ids = itertools.count(1)
        self._next_check = 0.0
        self.finished = 0  # sequences that ran to their end (for stats and tests)
        self._lost_last = ""  # why the last chain was lost (said to sequences that time out waiting)
        self._lost_replicas: set[int] = set()  # replica ids are never reused: a lost one never serves again

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
        self.posted()  # (a failure that raced this submit may have stopped the engine's loop)
        return seq.id

    def abandoned(self, item: object, reason: str) -> None:
        if isinstance(item, _Sequence):
            self._end(item, fail=reason)

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
        if end.peer.replica in self._lost_replicas:
            # Lost while its edge was connecting (a chain being added): it never takes a sequence.
            log.warning("dispatcher: chain %d opened after it was lost; closing it", end.peer.replica)
            self.engine.close_output(end)
            return
        self.chains[end.key] = _Chain(end)
        if self._waiting:
            log.info("dispatcher: chain %d is open; %d sequence(s) waiting", end.peer.replica, len(self._waiting))

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
        if chain is not None and not chain.lost and chain.end.live:
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
                self._cancel(_Cancel(seq.id, f"{TIMED_OUT} after {self.request_timeout_s:g} s{self._waited_for(seq)}"))
        wait = self.replay_if_due(now)
        while (picked := self._admissible()) is not None:
            chain, batch = picked
            for seq in batch:
                self._waiting.popleft()
                seq.chain = chain.end.key
                seq.replica = chain.replica
                seq.waited_for = ""
                chain.live.add(seq.id)
                chain.reserved += reserved_span(seq.reserve)
                if seq.on_admitted is not None:
                    seq.on_admitted(time.monotonic())
            with self._lock:
                self._waiting_count -= len(batch)
            self.engine.send(chain.end, gw.encode(self._prefill(batch), next(self._mb_ids)))
        self.close_when_drained(not self._seqs)
        check = max(0.0, self._next_check - now) if self._seqs else None
        return wait if check is None else check if wait is None else min(wait, check)

    def _admissible(self) -> tuple[_Chain, list[_Sequence]] | None:
        """The chain for the head of the queue and the waiting sequences that go with it in one
        prefill, or None while nothing fits."""
        if not self._waiting or not self.complete:
            return None
        # Counted as the stages count it: whole KV pages (generation/kv.py), so whatever this
        # admits, stage 0 finds room for.
        capacity = reserved_span(self.plan.kv_budget_tokens)
        open_chains = [c for c in self.chains.values() if not c.draining and not c.lost]
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
        # A replayed sequence is prefilled with the tokens it already streamed after its prompt.
        rows = [s.prompt + s.generated for s in batch]
        longest = max(len(r) for r in rows)
        ids = torch.zeros(len(batch), longest, dtype=torch.int64)  # [n, T], right-padded
        mask = torch.zeros(len(batch), longest, dtype=torch.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return gw.Prefill([_spec(s) for s in batch], ids, mask)

    def on_message(self, end: EdgeEnd, wire: Message) -> None:
        msg = gw.decode(wire)
        if isinstance(msg, gw.Tokens):
            reported = msg.reported or [[] for _ in msg.seqs]
            for s, tok, done, extra in zip(msg.seqs, msg.tokens, msg.done, reported, strict=True):
                self._deliver(end.peer.replica, s, tok, done, extra)
        self.engine.passed_on()
        self.engine.ack(end, Ack(ACK, wire.mb_id, len(wire.tensors[REQUESTS_KEY]), 0))

    def _deliver(self, replica: int, seq_id: int, token: int, done: bool,
                 reported: list[Sampled | PromptLogprobs]) -> None:
        seq = self._seqs.get(seq_id)
        if seq is None:
            return  # cancelled or timed out while the token was on its way
        if seq.replica != replica:
            self.duplicates += 1  # from a lost chain it has left: continued (or waiting) elsewhere
            return
        seq.generated.append(token)
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

    # -- compute thread: recovery ----------------------------------------------------------------

    def on_nodes_dead(self, nodes: frozenset[Node]) -> None:
        for node in sorted(nodes, key=lambda n: (n.replica, n.stage)):
            if not node.is_dispatcher:
                self._lose(node.replica, f"{node} died", precise=True)
        if self.recovery:
            super().on_nodes_dead(nodes)  # replay after the grace

    def on_broken(self, end: EdgeEnd, error: BaseException) -> None:
        if self.recovery and self._failure is None and not self._outputs_closed:
            self._lose(end.peer.replica, f"its edge {end.key} broke ({_short(error)})")
        super().on_broken(end, error)  # recovery: log and replay after the grace; else fail everything

    def _lose(self, replica: int, why: str, precise: bool = False) -> None:
        """Chain `replica` is lost: it takes nothing more. Its sequences are continued elsewhere
        by `replay` (recovery on) or end now with the reason (recovery off). A `precise` reason
        (the supervisor named the dead node) replaces a broken edge's, which usually came first."""
        self._lost_replicas.add(replica)
        for chain in list(self.chains.values()):
            if chain.replica != replica:
                continue
            if chain.lost:
                if precise:
                    chain.lost = self._lost_last = f"replica chain {replica} lost: {why}"
                continue
            chain.lost = self._lost_last = f"replica chain {replica} lost: {why}"
            log.warning("dispatcher: %s; its %d live sequence(s) %s", chain.lost, len(chain.live),
                        "will continue on another chain" if self.recovery else "fail (recovery is off)")
            if not self.recovery:
                for seq_id in sorted(chain.live):
                    self._end(self._seqs[seq_id], fail=f"{chain.lost}; the job's recovery is off, so its "
                                                       "sequences cannot be continued")

    def _waited_for(self, seq: _Sequence) -> str:
        """What a sequence that timed out was waiting for, when a fault made it wait."""
        if seq.waited_for or seq.chain or not self._lost_last:
            return seq.waited_for
        if any(not c.lost and not c.draining for c in self.chains.values()) and self.complete:
            return ""  # chains serve: it waited for KV room, as any sequence may
        return f" waiting for a live replica chain ({self._lost_last})"

    def replay(self) -> None:
        """Every lost chain's live sequences go back to the head of the queue, oldest first, to be
        prefilled again (prompt + tokens so far) on a chain that serves; the lost chain's edge is
        closed, which makes its surviving stage 0 drop what it holds."""
        again: list[_Sequence] = []
        for chain in [c for c in self.chains.values() if c.lost]:
            for seq_id in sorted(chain.live):
                seq = self._seqs[seq_id]
                seq.chain, seq.replica = "", None
                seq.waited_for = f" waiting to be continued on a live replica chain ({chain.lost})"
                again.append(seq)
            chain.live.clear()
            chain.reserved = 0
            del self.chains[chain.end.key]
            self.engine.close_output(chain.end)
        if not again:
            return
        again.sort(key=lambda s: s.id)
        self.replayed += len(again)
        with self._lock:
            self._waiting_count += len(again)
        self._waiting.extendleft(reversed(again))
        open_chains = sum(1 for c in self.chains.values() if not c.lost and not c.draining)
        log.warning("dispatcher: continuing %d sequence(s) (%d tokens streamed so far) on %s", len(again),
                    sum(s.produced for s in again),
                    f"{open_chains} live chain(s)" if open_chains and self.complete
                    else "the next chain to join (none serves now)")


def _short(error: BaseException, limit: int = 160) -> str:
    """An edge error for a client's message: gloo's run on with advice meant for its own users."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _spec(seq: _Sequence) -> SequenceSpec:
    """What every stage needs of `seq` for its prefill. The last stage sees hidden states, not ids:
    the prompt travels when its sampling reads it (repetition penalty, prompt log-probabilities),
    and a replayed sequence's tokens so far when its penalties or min_tokens read them."""
    params = seq.params
    if seq.generated and params.prompt_logprobs is not None:
        params = replace(params, prompt_logprobs=None)  # sent with its first token already
    needs_prompt = params.repetition_penalty != 1.0 or params.prompt_logprobs is not None
    return SequenceSpec(seq.id, len(seq.prompt) + seq.produced, seq.reserve, params, seq.produced,
                        tuple(seq.prompt) if needs_prompt else (),
                        tuple(seq.generated) if params.needs_history else ())


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
