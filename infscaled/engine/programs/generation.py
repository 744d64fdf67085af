"""A generation stage: KV caches of its own layers, the decode loop inside its replica chain.

Messages and edges are in protocol/generation.py. Stage 0 is the chain's scheduler: it admits
a prefill only when its KV budget has room for every row's reservation (prompt + tokens still
to generate), else holds it until sequences free their caches, so no stage runs out of memory:
all stages see the same sequences in the same order, and frees travel down the chain in order,
ahead of any later allocation. Sequences whose next token came back wait in `ready`; stage 0
starts a decode micro-batch of up to max_batch_sequences of them whenever fewer than
micro_batches_in_flight are in the loop, so sequences join and leave at every step and every
stage has work (a one-stage chain launches its next step before the host has this one's tokens:
`_run_ahead`). The last stage samples (generation.sampling.sample_next, each sequence with its
own seeded generator), decides `done` (max_new_tokens or a stop id), frees its own cache of
finished sequences, and sends the tokens to the dispatcher and round the loop.

CUDA stages follow the stream contract of engine/cuda.py: a stage's activations (the only tensor
that is not host data) go to the next stage device to device over an NCCL edge (stages on two GPUs
or hosts), or through pinned host memory copied on the engine's sender thread (two stages on one
GPU); either way the compute thread never waits for the GPU to hand them on. It sends a copy of
them (a replayed step's outputs are its graph's static buffers, which the bucket's next step
overwrites) with the event after it, which the sender waits for; a received activation arrives in a
pool buffer with its `ready` event, which the stage's stream waits on before the step reads it, and
goes back to the pool with an event after the step. Tokens and everything else (sequence specs,
masks, frees) are host data: the host decides when a sequence is done and streams its tokens.

Ending: the dispatcher's STOP reaches stage 0, which drops what it holds and closes its output;
STOP flows down the chain, the last stage passes it to the dispatcher and round the loop, and
stage 0 ends once the loop's STOP arrived too.

Failures (issue 12): every edge of a chain is on the path of every one of its sequences, so one
broken edge between two stages (a dead neighbour, a malformed message) loses the whole chain. The
stage says why in its log, frees every cache and from then on drops what still arrives: it
neither computes nor sends anything more, and never raises for it. The dispatcher continues the
chain's sequences on another chain (dispatch/sequences.py) and the supervisor retires the
survivors; a survivor that receives the dispatcher's STOP ends as usual. A replayed sequence's
prefill carries its tokens so far, and its sampling state is rebuilt from the spec
(generation.sampling.resume_sampling).

The dispatcher's death is not the chain's: every sequence on the chain was that dispatcher's, and
their state died with it, so stage 0 (told by its broken dispatcher edge or by
TopologyUpdate.dead, whichever comes first) frees them all and sends the FREE down the chain
behind whatever is already on its way, as any free (so each stage frees them after their last
message and before any sequence of the next dispatcher); the stages further down just drop the
tokens meant for the dead dispatcher. The chain serves on and joins the restarted dispatcher's
edges (TopologyUpdate.add, controller/recovery.py). Tokens still in the loop come back to stage 0
for sequences it no longer holds and are dropped there; the new dispatcher numbers its sequences
past every id of the old one (dispatch/sequences.py), so nothing is mistaken for its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from infscaled.engine import genwire as gw
from infscaled.engine.core import REQUESTS_KEY
from infscaled.engine.edges import EdgeEnd, EdgeState
from infscaled.engine.profile import StepTrace
from infscaled.engine.program import Program
from infscaled.generation.gpu_sampling import PendingTokens, sample_async
from infscaled.generation.graphs import DecodeStep, PrefillStep, past_pages
from infscaled.generation.kv import PagedBatch, StageKV, to_device_no_sync
from infscaled.generation.params import PromptLogprobs, Sampled
from infscaled.generation.sampling import SequenceSampling, plain, prompt_logprobs, resume_sampling, sample_step
from infscaled.models.stage import fuse_stage
from infscaled.protocol.control import StageStats
from infscaled.protocol.generation import SequenceSpec
from infscaled.protocol.plan import DISPATCHER, GenerationPlan, Node
from infscaled.worker.transport import ACK, Ack, Message

log = logging.getLogger(__name__)

PREFILL_GATHER_S = 0.02  # the longest stage 0 holds a prefill back to merge it with later ones
NO_CHUNKS = 1 << 62  # prefill_chunk_tokens = 0: a micro-batch's prompts are not split
TIMING_POLL_S = 0.005  # CUDA stages but the last: how soon to look again for a step's end event


@dataclass
class _Prompt:
    """A prompt admitted at stage 0 (its reservation counted), prefilled chunk by chunk."""

    spec: SequenceSpec
    ids: torch.Tensor  # [prompt_len] int64
    done: int = 0  # positions sent into the chain so far; 0: no chunk yet (no pages taken)

    @property
    def left(self) -> int:
        return self.spec.prompt_len - self.done


@dataclass(frozen=True)
class _OnDevice:
    """A next input token still on the device: row `row` of a step's sampled `tokens` [n] (a
    one-stage chain launches the next step before the host has the token; see `_run_ahead`)."""

    tokens: torch.Tensor
    row: int


@dataclass
class _Chain:
    """Stage 0's view of its chain (its live sequences are those its KV cache holds).

    A sequence is held (its prefill waits for KV room), then queued (admitted: its reservation
    counted; prefilled a chunk at a time), then prefilling until its first token comes back
    (`prefilling` holds it from admission to then), then decoding (`ready` while its next input
    token waits for a decode micro-batch), until its last token or a free."""

    ready: dict[int, int | _OnDevice] = field(default_factory=dict)  # sequence -> next input token
    held: list[gw.Prefill] = field(default_factory=list)  # prefills waiting for KV room
    queue: list[_Prompt] = field(default_factory=list)  # admitted prompts not wholly sent, in order
    prefilling: set[int] = field(default_factory=set)  # admitted sequences whose first token is not back
    inflight: int = 0  # micro-batches sent into the loop whose tokens have not come back
    pending_free: list[int] = field(default_factory=list)  # to send down the chain
    held_since: float | None = None  # when stage 0 first held prefills back to merge them
    prefill_turn: bool = True  # a decode micro-batch was launched since the last prefill one


class GenerationStage(Program):
    cuda_streams = True  # activations device to device (see the module's docstring)

    def __init__(self, stage: torch.nn.Module, device: str, plan: GenerationPlan, stages: int,
                 cuda_graphs: bool = True) -> None:
        super().__init__()
        fuse_stage(stage)  # decode steps with fused projections (models/families/fused_decode.py)
        self.stage = stage
        self.device = torch.device(device)
        self.plan = plan
        self.stages = stages
        self.kv = StageKV(plan.kv_budget_tokens, self.device)
        self.decoder: DecodeStep
        self.cuda_graphs = cuda_graphs
        self.chain = _Chain()
        self.samplers: dict[int, SequenceSampling] = {}
        self._mb_ids = 0
        self._stopped = False
        self.lost: str | None = None  # why this chain is lost (a broken edge); None while it serves
        # Last stage on CUDA: sampled micro-batches whose tokens are being copied back, oldest first.
        # The host goes on (stage 0 of a one-stage chain prepares and launches the next micro-batch)
        # and completes them in `poll` once their copy has landed: no blocking sync per step.
        self._pending: list[_Pending] = []
        self._began: Any = None  # the current step's start event (CUDA, last stage)
        # CUDA, not the last stage: (rows, start, end event) of steps whose activations are on their
        # way, oldest first; counted in the stage's stats once their end event has passed (`poll`).
        self._timings: list[tuple[int, Any, Any]] = []
        self._trace = StepTrace(300, 40)  # INFSCALED_PROFILE_DIR: engine/profile.py

    def attach(self, engine: object) -> None:
        super().attach(engine)  # type: ignore[arg-type]
        node = self.engine.node
        self.first = node.stage == 0
        self.last = node.stage == self.stages - 1
        self.next_node = Node(node.stage + 1, node.replica) if not self.last else None
        # A one-stage chain runs one step ahead of the host: see `_run_ahead`.
        self.ahead = 1 if self.first and self.last else 0
        key = "input_ids" if self.first else "hidden"
        self.decoder = DecodeStep(self.stage, self.kv, self.device, key, self.plan.max_batch_sequences,
                                  graphs=self.cuda_graphs)
        self.prefills = PrefillStep(self.stage, self.kv, self.device, key, self.plan.max_batch_sequences,
                                    graphs=self.cuda_graphs)

    # -- engine hooks ----------------------------------------------------------------------------

    def start(self) -> None:
        torch.set_grad_enabled(False)

    def staged(self, end: EdgeEnd, name: str) -> bool:
        """Only activations from the stage before go onto the device (stage 0's prompts and every
        table, mask and token stay host data; see the module's docstring)."""
        return name == gw.X_KEY and not self.first  # (stage 0's in-edges: the dispatcher's, the loop's)

    def on_message(self, end: EdgeEnd, wire: Message) -> None:
        if self.lost is not None or (end.peer.is_dispatcher and end.state is EdgeState.BROKEN):
            self.engine.dropped += 1  # in flight when the chain broke: nobody can use it now
            self.engine.passed_on()
            self.engine.ack(end, Ack(ACK, wire.mb_id, int(wire.tensors[REQUESTS_KEY].shape[0]), 0))
            return
        msg = gw.decode(wire)
        stream = None
        if wire.ready is not None:  # activations in pool buffers (engine/cuda.py): read after they landed
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(wire.ready)
            for buf in wire.buffers:
                buf.record_stream(stream)
        with torch.inference_mode():
            if isinstance(msg, gw.Tokens):  # stage 0: the loop brought the next tokens
                self.chain.inflight -= 1
                self._tokens_back(msg)
            else:
                if msg.free:
                    self._free(msg.free)
                if isinstance(msg, gw.Prefill):
                    if self.first:
                        self.chain.held.append(msg)  # admitted by _schedule when the budget has room
                    else:
                        self._prefill(msg)
                elif isinstance(msg, gw.Decode):
                    self._decode(msg.seqs, msg.x)
                elif self.chain.pending_free and not self.first:
                    self._send_next(gw.Free([]))  # a free list only: pass it down
        if stream is not None and wire.buffers:
            read = torch.cuda.Event()  # the step that read them is queued: the buffers go back after it
            read.record(stream)
            for buf in wire.buffers:
                self.engine.cuda.pool.give(buf, read)
        self.engine.passed_on()
        self.engine.ack(end, Ack(ACK, wire.mb_id, int(wire.tensors[REQUESTS_KEY].shape[0]), 0))

    def on_input_stopped(self, end: EdgeEnd) -> None:
        self.engine.ack_stop(end)
        if self.first and not end.peer.is_dispatcher:
            return  # the loop's STOP only closes that edge
        # STOP flows down from the dispatcher, which drained its sequences first: anything still
        # live is abandoned; tokens still in the loop go nowhere.
        self.kv.free(list(self.kv.seqs))
        self.chain = _Chain()
        self.samplers.clear()
        self._stopped = True
        self.engine.close_outputs()

    def on_broken(self, end: EdgeEnd, error: BaseException) -> None:
        super().on_broken(end, error)
        if self.lost is not None or self._stopped:
            return
        if end.peer.is_dispatcher:
            self._dispatcher_gone(f"edge {end.key} broke ({type(error).__name__}: {error})")
            return
        self.lost = f"edge {end.key} broke ({type(error).__name__}: {error})"
        log.warning("%s: replica chain %d lost: %s; its %d sequence(s) dropped here (the dispatcher continues "
                    "them on another chain)", self.engine.node, self.engine.node.replica, self.lost, len(self.kv.seqs))
        self.kv.free(list(self.kv.seqs))
        self.chain = _Chain()
        self.samplers.clear()

    def on_nodes_dead(self, nodes: frozenset[Node]) -> None:
        if DISPATCHER in nodes and not self._stopped and self.lost is None:
            self._dispatcher_gone("the dispatcher was declared dead")

    def _dispatcher_gone(self, why: str) -> None:
        """Every sequence here was the dead dispatcher's: stage 0 frees them all, down the chain in
        order (see the module's docstring); the chain serves on for the next dispatcher. `inflight`
        stays: those micro-batches still come back round the loop, and are dropped then."""
        if not self.first:
            log.info("%s: dispatcher gone (%s); stage 0 frees its sequences down the chain", self.engine.node, why)
            return
        seqs = list(self.kv.seqs)
        held = sum(len(m.specs) for m in self.chain.held) + sum(1 for p in self.chain.queue if not p.done)
        self.chain.held.clear()
        self.chain.queue.clear()
        self.chain.prefilling.clear()
        self.chain.ready.clear()
        if seqs:
            self._free(seqs)
            if self.chain.pending_free and not self.last:
                self._send_next(gw.Free([]))
        if seqs or held:
            log.warning("%s: dispatcher gone (%s): %d sequence(s) freed down the chain, %d waiting prefill(s) "
                        "dropped; serving on for the next dispatcher", self.engine.node, why, len(seqs), held)

    def poll(self, now: float) -> float | None:
        self._count_sent()
        if self._stopped or self.lost is not None:
            self._pending.clear()
            return None
        with torch.inference_mode():
            if not self.ahead:
                while self._pending and self._pending[0].tokens.ready():
                    self._complete(self._pending.pop(0))
            if self.first:
                self._schedule()
            # Finish the oldest sampled micro-batch once nothing can be launched before it (waiting
            # for its copy only; the GPU meanwhile runs the younger ones), or, running ahead, once a
            # younger one is launched behind it: the host finishes step N while the GPU runs N + 1.
            if self._pending and (not self._runnable() or self.ahead and len(self._pending) > 1):
                self._complete(self._pending.pop(0))
                if self.first:
                    self._schedule()
        if self._runnable() or self._pending:
            return 0.0
        return TIMING_POLL_S if self._timings else None

    def _count_sent(self) -> None:
        """Count the steps (not the last stage, CUDA) whose activations have been computed."""
        while self._timings and self._timings[0][2].query():
            rows, began, ended = self._timings.pop(0)
            self.engine.computed(rows, began.elapsed_time(ended) / 1e3)

    def _runnable(self) -> bool:
        chain = self.chain
        return self.first and (bool(chain.ready) and chain.inflight < self.plan.micro_batches_in_flight + self.ahead
                               or bool(chain.queue) and self._prefill_turn())

    def _prefill_turn(self) -> bool:
        """A prefill micro-batch may run now: while sequences decode, one per decode micro-batch
        launched (so an arrival's prompt delays each decode step by at most one micro-batch of
        prefill_chunk_tokens); when none decodes, back to back."""
        chain = self.chain
        return chain.prefill_turn or all(s in chain.prefilling for s in self.kv.seqs)

    def stats(self, base: StageStats) -> StageStats:
        return replace(base, inflight=self.chain.inflight, kv_tokens=self.kv.held_tokens,
                       kv_reserved_tokens=self.kv.reserved_tokens, kv_budget_tokens=self.kv.budget_tokens,
                       kv_sequences=len(self.kv.seqs), graph_replays=self.decoder.replays)

    # -- sequences -------------------------------------------------------------------------------

    def _free(self, seqs: list[int]) -> None:
        live = set(self.kv.seqs)  # on stage 0: admitted, so the stages down the chain have it too
        self.kv.free(seqs)
        for s in seqs:
            self.samplers.pop(s, None)
            if self.first:
                if s in live and not self.last:
                    self.chain.pending_free.append(s)
                self.chain.ready.pop(s, None)
                self.chain.prefilling.discard(s)
                self.chain.held = [m for m in (_drop_row(h, s) for h in self.chain.held) if m is not None]
            elif not self.last:
                self.chain.pending_free.append(s)
        if self.first:
            gone = set(seqs)
            self.chain.queue = [p for p in self.chain.queue if p.spec.seq not in gone]

    def _schedule(self) -> None:
        chain = self.chain
        _admit(chain, self.kv)
        # One prefill micro-batch per call: up to prefill_chunk_tokens prompt tokens (prompts
        # split into chunks across micro-batches) from the queue's front. Prefills wait while more
        # messages are queued (they may be prefills too), so they run together: a prefill's forward
        # costs about the same at 1 row as at 8 (launches, weight reads), and a closed loop sends
        # one sequence per finished one (BENCHMARKS.md section 20).
        if chain.queue and self._prefill_turn() and not self._gathering():
            msg = _next_prefill(chain.queue, self.plan.max_batch_sequences,
                                self.plan.prefill_chunk_tokens or NO_CHUNKS)
            chain.queue = [p for p in chain.queue if p.left]
            chain.held_since = None
            chain.prefill_turn = False
            if any(msg.finals()):
                chain.inflight += 1  # its first tokens come back round the loop
            self._prefill(msg)
        # At most one round of launches per call, so new messages (prefills, frees) get read in
        # between even when the loop is this process (one stage: tokens are back at once).
        for _ in range(self.plan.micro_batches_in_flight):
            if not chain.ready or chain.inflight >= self.plan.micro_batches_in_flight + self.ahead:
                break
            seqs = list(chain.ready)[:self.plan.max_batch_sequences]
            tokens = _inputs([chain.ready.pop(s) for s in seqs], self.device)  # [n, 1]
            chain.inflight += 1
            chain.prefill_turn = True
            self._decode(seqs, tokens)
        if chain.pending_free and not self.last:
            self._send_next(gw.Free([]))  # frees no compute carried down

    def _gathering(self) -> bool:
        return _hold_prefills(self.chain, self.engine.queued(), self.plan.max_batch_sequences,
                              self.plan.prefill_chunk_tokens or NO_CHUNKS, time.monotonic())

    def _tokens_back(self, msg: gw.Tokens, readied: bool = False) -> None:
        """Stage 0: a micro-batch's tokens are back; with `readied` the sequences that go on are
        in `ready` already (on the device, `_run_ahead`), and only the finished ones matter."""
        for s, tok, done in zip(msg.seqs, msg.tokens, msg.done, strict=True):
            if s not in self.kv.seqs:
                continue  # freed (cancelled; or finished, with one stage) while its token was on the way
            self.chain.prefilling.discard(s)
            if done:
                self._free([s])
            elif not readied:
                self.chain.ready[s] = tok

    # -- compute ---------------------------------------------------------------------------------

    def _prefill(self, msg: gw.Prefill) -> None:
        """A prefill micro-batch: whole prompts, or chunks of them (rows with `starts`)."""
        seqs, lengths, starts = msg.seqs, msg.lengths, msg.row_starts()
        reserves = [s.reserve for s in msg.specs]
        # Prompt log-probabilities need every position's logits; otherwise the head computes each
        # row's next-token logits only (a long prompt's [T, V] logits are large).
        last_logits = not any(s.sampling.prompt_logprobs is not None for s in msg.specs)
        key = self.prefills.key(len(seqs), msg.x.shape[1], last_logits, past_pages(starts, lengths))
        if key is not None:  # replayed from a CUDA graph (generation/graphs.py PrefillStep)
            out = self._timed(seqs, lambda: self.prefills.step(key, msg.x, seqs, lengths, reserves, starts))
        else:
            kv = self.kv.prefill(seqs, lengths, reserves, starts)
            kv.last_logits = last_logits
            act = {"input_ids" if self.first else "hidden": msg.x, "attention_mask": msg.attention_mask}
            if any(starts):
                act["position_ids"] = torch.tensor(starts).unsqueeze(1) + torch.arange(msg.x.shape[1])  # [n, T]
            out = self._run(act, kv, seqs)
        if not self.last:
            self._send_next(gw.Prefill(msg.specs, out["hidden"], msg.attention_mask, starts=msg.starts),
                            self._computed())
            return
        final = [i for i, f in enumerate(msg.finals()) if f]  # rows whose prompt this chunk ends
        if not final:
            return
        output = out["output"]  # [n, T, V], or [n, V] (next-token logits)
        logits = output
        if logits.dim() == 3:
            index = to_device_no_sync(torch.tensor(lengths) - 1, logits.device)
            logits = logits[torch.arange(len(seqs), device=logits.device), index]  # [n, V]
        if len(final) < len(seqs):
            logits = logits[to_device_no_sync(torch.tensor(final), logits.device)]  # (no host sync)
        prompt_lps: list[PromptLogprobs | None] = []
        for i in final:
            spec = msg.specs[i]
            p = spec.sampling
            self.samplers[spec.seq] = resume_sampling(spec, logits.shape[-1], self.device)
            # (a row asking for them is never chunked: stage 0's _next_prefill sends it whole)
            prompt_lps.append(prompt_logprobs(output[i, :lengths[i]], spec.prompt, p.prompt_logprobs)
                              if p.prompt_logprobs is not None and output.dim() == 3 and spec.prompt
                              else None)
        self._sampled([seqs[i] for i in final], logits, prompt_lps)

    def _decode(self, seqs: list[int], x: torch.Tensor) -> None:
        out = self._timed(seqs, lambda: self.decoder.step(x, seqs))
        if not self.last:
            self._send_next(gw.Decode(seqs, out["hidden"]), self._computed())
            return
        logits = out["output"]
        self._sampled(seqs, logits[:, -1] if logits.dim() == 3 else logits)

    def _run(self, act: dict[str, torch.Tensor], kv: PagedBatch, seqs: list[int]) -> dict[str, torch.Tensor]:
        """A prefill's forward (eager: its shapes vary)."""
        def forward() -> dict[str, torch.Tensor]:
            # The padding mask stays on the host: the units decide there whether anything is padded
            # (models/families/common.py device_mask), without a device sync.
            out: dict[str, torch.Tensor] = self.stage(
                {k: v if k == "attention_mask" else v.to(self.device, non_blocking=True) for k, v in act.items()}, kv)
            self.kv.store(seqs, kv)
            return out
        return self._timed(seqs, forward)

    def _timed(self, seqs: list[int], forward: object) -> dict[str, torch.Tensor]:
        self._trace.step(self.engine.node, self.device)
        if self.device.type == "cuda":
            # No sync here: the step's GPU time is read from events later (the last stage's when its
            # tokens are back, `_complete`; the others' once their activations exist, `poll`), so the
            # host launches the next micro-batch meanwhile.
            stream = torch.cuda.current_stream(self.device)
            began = torch.cuda.Event(enable_timing=True)
            began.record(stream)
            out: dict[str, torch.Tensor] = forward()  # type: ignore[operator]
            if self.last:
                self._began = began
                return out
            # A copy: a replayed step's outputs are its graph's static buffers (generation/graphs.py).
            hidden = out["hidden"].clone()
            # blocking: the sender thread sleeps on it rather than spinning (engine/cuda.py before_send)
            ended = torch.cuda.Event(enable_timing=True, blocking=True)
            ended.record(stream)
            self._timings.append((len(seqs), began, ended))
            return {"hidden": hidden}
        started = time.perf_counter()
        out = forward()  # type: ignore[operator]
        self.engine.computed(len(seqs), time.perf_counter() - started)
        return out

    def _computed(self) -> Any:
        """The event after which the step just launched has written its activations (CUDA), else None."""
        return self._timings[-1][2] if self.device.type == "cuda" else None

    def _sampled(self, seqs: list[int], logits: torch.Tensor,
                 prompt_lps: list[PromptLogprobs | None] | None = None) -> None:
        """The last stage: pick each sequence's next token (generation.sampling.sample_step:
        penalties, logit bias, min_p, min_tokens, log-probabilities for the rows that asked),
        decide whether it is done, and send the tokens to the dispatcher and round the loop."""
        states = [self.samplers[s] for s in seqs]
        params = [st.params for st in states]
        began, self._began = self._began, None
        if plain(params) and not (prompt_lps and any(prompt_lps)):
            # The common case: no host sync while the tokens come back (generation/gpu_sampling.py).
            tokens_on_the_way = sample_async(logits, params, [st.generator for st in states])
            pending = _Pending(seqs, states, tokens_on_the_way, began, self._mark(began))
            if self.ahead:
                self._run_ahead(pending)
            if pending.tokens.event is not None or self.ahead:
                self._pending.append(pending)  # completed by `poll`, in order
                return
            self._complete(pending)
            return
        # penalties, logit bias, min_p, min_tokens or log-probabilities (generation/sampling.py):
        # the host needs every earlier token of these rows first, so tokens stay in order.
        while self._pending:
            self._complete(self._pending.pop(0))
        tokens, sampled = sample_step(logits, states)
        self._count(seqs, began, self._mark(began))
        self._finish(seqs, states, tokens, sampled, prompt_lps)

    def _run_ahead(self, pending: _Pending) -> None:
        """One-stage chain: the sampled rows' next step may start before their tokens reach the host
        (its input is read on the device), so the host finishes step N while the GPU runs step N + 1
        instead of the GPU waiting for the host between steps. A row ready now is one that cannot
        end by length with this token; one that ends by a stop token is found when its tokens are
        back: it is freed then, and its row in the step already launched is dropped (`_finish`).
        The stages' stream order makes that step's write into its freed pages land before any
        later use of them."""
        for i, (s, st) in enumerate(zip(pending.seqs, pending.states, strict=True)):
            st.ahead += 1
            if st.produced + st.ahead < st.params.max_new_tokens:
                self.chain.ready[s] = _OnDevice(pending.tokens.device, i)

    def _mark(self, began: Any) -> Any:
        """A timing event recorded now, if the step began with one (the last stage on CUDA)."""
        if began is None:
            return None
        ended = torch.cuda.Event(enable_timing=True)
        ended.record(torch.cuda.current_stream(self.device))
        return ended

    def _count(self, seqs: list[int], began: Any, ended: Any) -> None:
        """The micro-batch's compute time for the stage's stats: GPU time between its events."""
        if began is None:
            return  # counted by _timed (CPU, or a stage that is not last)
        ended.synchronize()
        self.engine.computed(len(seqs), began.elapsed_time(ended) / 1e3)

    def _complete(self, pending: _Pending) -> None:
        """A micro-batch's tokens are (or are about to be) on the host: finish its step."""
        tokens = pending.tokens.tokens()
        self._count(pending.seqs, pending.began, pending.ended)
        for st, tok in zip(pending.states, tokens, strict=True):
            st.outputs.append(tok)
            st.ahead -= self.ahead  # (running ahead, `_run_ahead` counted this token)
        self._finish(pending.seqs, pending.states, tokens, [None] * len(tokens), None, bool(self.ahead))

    def _finish(self, seqs: list[int], states: list[SequenceSampling], tokens: list[int],
                sampled: list[Sampled | None], prompt_lps: list[PromptLogprobs | None] | None,
                readied: bool = False) -> None:
        """Done or not per sequence; the tokens to the dispatcher and round the loop. Rows of
        sequences freed meanwhile (cancelled, or ended while a step ran ahead) are not sent to the
        dispatcher; round the loop every micro-batch goes back whole (stage 0 counts it back in,
        and skips the sequences it no longer holds)."""
        every = seqs, tokens  # the micro-batch's rows, for the loop
        live = [i for i, (s, st) in enumerate(zip(seqs, states, strict=True)) if self.samplers.get(s) is st]
        if len(live) < len(seqs):
            seqs, states, tokens, sampled = ([xs[i] for i in live] for xs in (seqs, states, tokens, sampled))
            prompt_lps = [prompt_lps[i] for i in live] if prompt_lps is not None else None
        reported: list[list[Sampled | PromptLogprobs]] = []
        if prompt_lps is not None and any(prompt_lps) or any(sampled):
            lps = prompt_lps or [None] * len(seqs)
            reported = [[x for x in (p, r) if x is not None] for p, r in zip(lps, sampled, strict=True)]
        done = []
        for s, st, tok in zip(seqs, states, tokens, strict=True):
            finished = st.produced >= st.params.max_new_tokens or tok in st.params.stop_token_ids
            done.append(finished)
            if finished:
                self._free([s])  # (one stage: also out of `ready`, where running ahead put it)
        out = gw.Tokens(seqs, tokens, done, reported)
        if seqs:
            self._send_to(DISPATCHER, out)
        if self.first:  # one stage: the loop is this process
            self.chain.inflight -= 1
            self._tokens_back(out, readied)
            return
        ended = dict(zip(seqs, done, strict=True))  # a dropped row: stage 0 freed it already
        self._send_to(Node(0, self.engine.node.replica),
                      gw.Tokens(every[0], every[1], [ended.get(s, True) for s in every[0]]))  # no log-probs

    # -- sending ---------------------------------------------------------------------------------

    def _send_next(self, msg: gw.GenMessage, ready: Any = None) -> None:
        """`msg` down the chain (with the frees pending here); `ready`: the event after which its
        device tensors exist (the engine's sender waits for it, engine/cuda.py)."""
        assert self.next_node is not None
        if self.chain.pending_free and isinstance(msg, gw.Prefill | gw.Decode | gw.Free):
            msg.free = self.chain.pending_free
            self.chain.pending_free = []
        self._send_to(self.next_node, msg, ready)

    def _send_to(self, peer: Node, msg: gw.GenMessage, ready: Any = None) -> None:
        if self._stopped or self.lost is not None:
            return  # STOP went down this edge already, or the chain is lost (on_broken said why)
        end = self.engine.output_to(peer)
        if end is None and peer.is_dispatcher and any(e.peer.is_dispatcher for e in self.engine.outputs()):
            self.engine.dropped += 1  # tokens of a dead dispatcher's sequence: nobody waits for them
            return
        if end is None:
            raise RuntimeError(f"{self.engine.node}: no edge to {peer} in this job's plan")
        self._mb_ids += 1
        wire = gw.encode(msg, self._mb_ids)
        wire.ready = ready
        self.engine.send(end, wire)


@dataclass
class _Pending:
    """A last stage's sampled micro-batch whose tokens are still on their way to the host."""

    seqs: list[int]
    states: list[SequenceSampling]
    tokens: PendingTokens
    began: Any  # torch.cuda.Event (timing) recorded before the step
    ended: Any  # and after its sampling: the step's GPU time, for the stage's stats


def _inputs(values: list[int | _OnDevice], device: torch.device) -> torch.Tensor:
    """A decode micro-batch's input ids [n, 1] from the ready tokens: on the host when all of them
    are there, else on the device, the host ones copied in and the others read from the steps
    that sampled them (no host sync)."""
    if all(isinstance(v, int) for v in values):
        return torch.tensor(values, dtype=torch.int64).unsqueeze(1)
    first = values[0]
    if isinstance(first, _OnDevice) and len(values) == first.tokens.shape[0] and all(
            isinstance(v, _OnDevice) and v.tokens is first.tokens and v.row == i for i, v in enumerate(values)):
        return first.tokens.unsqueeze(1)  # the common case: the whole of one step's rows, in order
    x = to_device_no_sync(torch.tensor([v if isinstance(v, int) else 0 for v in values], dtype=torch.int64), device)
    sources: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}
    for i, v in enumerate(values):
        if isinstance(v, _OnDevice):
            _, rows, picks = sources.setdefault(id(v.tokens), (v.tokens, [], []))
            rows.append(i)
            picks.append(v.row)
    for tokens, rows, picks in sources.values():
        x.index_copy_(0, to_device_no_sync(torch.tensor(rows), device),
                      tokens.index_select(0, to_device_no_sync(torch.tensor(picks), device)))
    return x.unsqueeze(1)


def _admit(chain: _Chain, kv: StageKV) -> None:
    """Held prefills, first come first served, join the queue while the KV budget has room for
    every queued prompt not yet started (started ones hold their pages already) and theirs."""
    waiting = [p.spec.reserve for p in chain.queue if not p.done]
    while chain.held:
        msg = chain.held[0]
        more = [s.reserve for s in msg.specs]
        if not kv.fits_all(waiting + more):
            return
        chain.held.pop(0)
        waiting += more
        for i, spec in enumerate(msg.specs):
            chain.queue.append(_Prompt(spec, msg.x[i, :spec.prompt_len]))
            chain.prefilling.add(spec.seq)


def _hold_prefills(chain: _Chain, inbox_busy: bool, rows: int, tokens: int, now: float) -> bool:
    """Whether stage 0 holds its queued prefills back a little, to merge them with the ones a busy
    inbox may bring: not when a prompt is under way (its chunks go on at once), nor once a
    micro-batch's worth is queued (`rows` prompts, or `tokens` prompt tokens: more would wait
    for the next micro-batch anyway), nor after the oldest has waited PREFILL_GATHER_S (so a busy
    inbox never starves them). Records in the chain when the hold began."""
    queue = chain.queue
    if queue[0].done or not inbox_busy or len(queue) >= rows or sum(p.left for p in queue) >= tokens:
        return False
    if chain.held_since is None:
        chain.held_since = now
    return now - chain.held_since < PREFILL_GATHER_S


def _next_prefill(queue: list[_Prompt], rows: int, tokens: int) -> gw.Prefill:
    """The next prefill micro-batch from the queue's front: at most `rows` rows and `tokens`
    prompt tokens, a prompt longer than what is left of them contributing a chunk (it continues in
    the next micro-batch); prompts right-padded to the longest chunk. A prompt that asked for its
    log-probabilities goes whole (they are computed from one pass's logits), alone if it must.
    Advances each prompt's `done`."""
    taken: list[tuple[_Prompt, int]] = []
    budget = tokens
    for p in queue:
        if len(taken) >= rows or budget <= 0:
            break
        n = min(p.left, budget)
        if n < p.left and p.spec.sampling.prompt_logprobs is not None:
            if taken:
                break
            n = p.left
        taken.append((p, n))
        budget -= n
    width = max(n for _, n in taken)
    x = torch.zeros(len(taken), width, dtype=torch.int64)
    mask = torch.zeros(len(taken), width, dtype=torch.int64)
    starts = []
    for i, (p, n) in enumerate(taken):
        x[i, :n] = p.ids[p.done:p.done + n]
        mask[i, :n] = 1
        starts.append(p.done)
        p.done += n
    return gw.Prefill([p.spec for p, _ in taken], x, mask, starts=starts if any(starts) else [])


def _drop_row(msg: gw.Prefill, seq: int) -> gw.Prefill | None:
    """A held prefill without `seq`'s row, or None when nothing is left of it."""
    keep = [i for i, s in enumerate(msg.specs) if s.seq != seq]
    if len(keep) == len(msg.specs):
        return msg
    if not keep:
        return None
    index = torch.tensor(keep)
    return gw.Prefill([msg.specs[i] for i in keep], msg.x[index], msg.attention_mask[index], msg.free)
