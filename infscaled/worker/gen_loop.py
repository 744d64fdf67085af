"""One stage replica of a generation job: KV caches here, the decode loop inside the pipeline.

A replica chain r is stage replicas (0, r) -> (1, r) -> ... -> (p-1, r), closed by an edge from
(p-1, r) back to (0, r). Every sequence lives on one chain. Messages (all carry the request
table `requests` [n, 2] = (sequence id, 1), and may carry `free` [m]: sequences to drop):

    dispatcher -> stage 0   prefill: input_ids, attention_mask [n, T] (right-padded), lengths [n],
                            reserve [n], gen_params [n, 4], stop_ids [n, S]; or free only
    stage i -> i+1          prefill: hidden + the same metadata; decode: hidden [n, 1, D]
    last -> dispatcher      tokens [n], done [n]   (streamed to clients)
    last -> stage 0         tokens [n], done [n]   (the next decode step; not with one stage)

Stage 0 is the chain's scheduler. It admits a prefill only when its KV budget has room for every
row's reservation (prompt + max_new_tokens), else holds it until sequences free their caches,
so no stage runs out of memory: all stages see the same sequences in the same order, and the
`free` lists travel down the chain in order, ahead of any later allocation. Sequences whose next
token came back wait in `ready`; stage 0 starts a decode micro-batch of up to
max_batch_sequences of them whenever fewer than micro_batches_in_flight micro-batches are in
the loop, so sequences join and leave at every step and every stage has work. The last stage
samples (generation.sampling.sample_next, each sequence with its own seeded generator),
decides `done` (max_new_tokens or a stop id), and frees its own cache of finished sequences.

Threads: one receiver per in-edge and one ack reader per out-edge (as in stage_loop), a sender
per out-edge, and the compute thread (the caller of `run`) that owns every table here. The
queues are unbounded: what can be in the loop is bounded by stage 0's in-flight cap and the
dispatcher's, and a bounded queue inside a cycle could deadlock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from infscaled.generation.graphs import DecodeStep
from infscaled.generation.kv import PagedBatch, StageKV
from infscaled.generation.gpu_sampling import sample_async
from infscaled.generation.sampling import SamplingParams, make_generator
from infscaled.protocol.control import EdgeRate, StageStats
from infscaled.protocol.plan import GenerationPlan, Node
from infscaled.protocol.window import EventWindow, mean, rate, span
from infscaled.protocol.wire import DATA, STOP
from infscaled.worker.transport import ACK, STOP_ACK, Ack, Edge, Message

log = logging.getLogger(__name__)

REQUESTS_KEY = "requests"
# Rows of a prefill message, in this order: what a row selection must keep together.
PREFILL_ROW_KEYS = ("requests", "input_ids", "hidden", "attention_mask", "lengths", "reserve", "gen_params",
                    "stop_ids")


def gen_params_row(p: SamplingParams) -> list[float]:
    """A sequence's sampling parameters as one float64 row (temperature, top_p, top_k, seed or -1)."""
    return [p.temperature, p.top_p, float(p.top_k), float(-1 if p.seed is None else p.seed)]


def params_from_row(row: list[float], stop_ids: list[int], max_new: int) -> SamplingParams:
    seed = int(row[3])
    return SamplingParams(max_new_tokens=max_new, temperature=row[0], top_p=row[1], top_k=int(row[2]),
                          seed=None if seed < 0 else seed, stop_token_ids=tuple(i for i in stop_ids if i >= 0))


@dataclass
class _Sampler:
    """The last stage's state of one sequence."""

    params: SamplingParams
    generator: torch.Generator
    produced: int = 0


@dataclass
class _Inbound:
    edge: int
    msg: Message | None  # None: STOP
    error: BaseException | None = None


@dataclass
class _Chain:
    """Stage 0's view of its chain (its live sequences are those its KV cache holds)."""

    ready: dict[int, int] = field(default_factory=dict)  # sequence -> next input token
    held: list[Message] = field(default_factory=list)  # prefills waiting for KV room
    inflight: int = 0  # micro-batches sent into the loop whose tokens have not come back
    pending_free: list[int] = field(default_factory=list)  # to send down the chain


class GenStageLoop:
    def __init__(self, node: Node, stage: torch.nn.Module, device: str, in_edges: list[Edge],
                 out_edges: list[Edge], plan: GenerationPlan, stages: int,
                 on_stats: Callable[[StageStats], None] | None = None, stats_interval_s: float = 1.0,
                 cuda_graphs: bool = True) -> None:
        self.node = node
        self.stage = stage
        self.device = torch.device(device)
        self.plan = plan
        self.first = node.stage == 0
        self.last = node.stage == stages - 1
        self.in_edges, self.out_edges = in_edges, out_edges
        self.kv = StageKV(plan.kv_budget_tokens, self.device)
        self.decoder = DecodeStep(stage, self.kv, self.device, "input_ids" if self.first else "hidden",
                                  plan.max_batch_sequences, graphs=cuda_graphs)
        self.inbox: queue.Queue[_Inbound] = queue.Queue()
        self.outboxes: list[queue.Queue[Message | None]] = [queue.Queue() for _ in out_edges]
        self.on_stats, self.stats_interval_s = on_stats, stats_interval_s
        self.chain = _Chain()
        self.samplers: dict[int, _Sampler] = {}
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        self._mb_ids = 0
        self._stopped = False
        self._micro_batches = self._samples = 0
        self._busy_s = 0.0
        self._first_at: float | None = None
        self._computed = EventWindow()  # (t, rows, compute_s)
        self._received = EventWindow()  # (t, in-edge index, rows): the edges' throughput
        # Which edge is which: the dispatcher's, the loop's (stage 0 in, last stage out), the next stage's.
        self.from_dispatcher = self._index(in_edges, lambda peer: peer.is_dispatcher)
        self.from_loop = self._index(in_edges, lambda peer: not peer.is_dispatcher) if self.first else None
        self.to_dispatcher = self._index(out_edges, lambda peer: peer.is_dispatcher)
        self.to_loop = self._index(out_edges, lambda peer: peer.stage == 0) if self.last and not self.first else None
        self.to_next = self._index(out_edges, lambda peer: peer.stage == node.stage + 1)

    @staticmethod
    def _index(edges: list[Edge], match: Callable[[Node], bool]) -> int | None:
        found = [i for i, e in enumerate(edges) if match(e.peer)]
        return found[0] if found else None

    # -- threads ---------------------------------------------------------------------------------

    def _receiver(self, index: int) -> None:
        edge = self.in_edges[index]
        try:
            while True:
                msg = edge.recv()
                if msg.kind == STOP:
                    self.inbox.put(_Inbound(index, None))
                    return
                self._received.add(time.monotonic(), index, int(msg.tensors[REQUESTS_KEY].shape[0]))
                self.inbox.put(_Inbound(index, msg))
        except BaseException as exc:  # noqa: BLE001 - thread boundary: hand the failure to compute
            self.inbox.put(_Inbound(index, None, exc))

    def _sender(self, index: int) -> None:
        edge, box = self.out_edges[index], self.outboxes[index]
        try:
            while True:
                msg = box.get()
                if msg is None:
                    edge.send(Message(STOP, 0, 0, {}))
                    return
                edge.send(msg)
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            self._fail(exc)

    def _acks(self, index: int) -> None:
        try:
            drain_acks(self.out_edges[index])
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self.inbox.put(_Inbound(-1, None, exc))

    def _start(self, target: Callable[..., None], *args: object, name: str) -> None:
        t = threading.Thread(target=target, args=args, name=f"{self.node}-{name}", daemon=True)
        self._threads.append(t)
        t.start()

    # -- the compute thread ----------------------------------------------------------------------

    def run(self) -> StageStats:
        """Serve until the dispatcher's STOP has passed through (and, on stage 0, the loop's)."""
        for i in range(len(self.in_edges)):
            self._start(self._receiver, i, name=f"recv{i}")
        for i in range(len(self.out_edges)):
            self._start(self._sender, i, name=f"send{i}")
            self._start(self._acks, i, name=f"ack{i}")
        open_edges = len(self.in_edges)
        next_stats = time.monotonic() + self.stats_interval_s
        with torch.inference_mode():
            while open_edges:
                try:
                    # Stage 0 with sequences ready for their next step only looks at what arrived.
                    item = self.inbox.get(timeout=0 if self._runnable() else self.stats_interval_s)
                except queue.Empty:
                    item = None
                if item is not None:
                    if item.error is not None:
                        raise item.error
                    if item.msg is None:
                        open_edges -= 1
                        self.in_edges[item.edge].send_ack(Ack(STOP_ACK, 0, 0, 0))
                        self._on_stop(item.edge)
                    else:
                        self._on_message(item.edge, item.msg)
                        rows = int(item.msg.tensors[REQUESTS_KEY].shape[0])
                        self.in_edges[item.edge].send_ack(Ack(ACK, item.msg.mb_id, rows, 0))
                if self.first:
                    self._schedule()
                if self.on_stats is not None and time.monotonic() >= next_stats:
                    self.on_stats(self.stats())
                    next_stats = time.monotonic() + self.stats_interval_s
        for t in self._threads:
            t.join()
        if self._error is not None:
            raise self._error
        return self.stats()

    def _on_stop(self, edge: int) -> None:
        # STOP flows down from the dispatcher, which drained its sequences first. Stage 0 passes
        # it on at once; anything still live is abandoned. The loop edge's STOP (the last stage
        # passing it on) only closes that edge.
        if edge == self.from_loop:
            return
        self.kv.free(list(self.kv.seqs))
        self.chain = _Chain()
        self.samplers.clear()
        self._stopped = True
        for box in self.outboxes:
            box.put(None)  # after everything queued before it: the senders send in order

    def _on_message(self, edge: int, msg: Message) -> None:
        t = msg.tensors
        if "free" in t:
            self._free([int(s) for s in t["free"].tolist()])
        if "tokens" in t:  # stage 0: the loop brought the next tokens
            self.chain.inflight -= 1
            self._tokens_back(t)
        elif "lengths" in t:
            if self.first:
                self.chain.held.append(msg)  # admitted by _schedule when the budget has room
            else:
                self._prefill(msg)
        elif "hidden" in t:  # a decode step (prefills carry lengths)
            self._decode(t)
        elif self.chain.pending_free and self.to_next is not None and not self.first:
            self._send(self.to_next, {REQUESTS_KEY: _table([])})  # a free list only: pass it down

    def _free(self, seqs: list[int]) -> None:
        live = set(self.kv.seqs)  # on stage 0: admitted, so the stages down the chain have it too
        self.kv.free(seqs)
        for s in seqs:
            self.samplers.pop(s, None)
            if self.first:
                if s in live and self.to_next is not None:
                    self.chain.pending_free.append(s)
                self.chain.ready.pop(s, None)
                self.chain.held = [m for m in (_drop_rows(h, s) for h in self.chain.held) if m is not None]
            elif self.to_next is not None:
                self.chain.pending_free.append(s)

    # -- stage 0: scheduling ---------------------------------------------------------------------

    def _runnable(self) -> bool:
        chain = self.chain
        return self.first and bool(chain.ready) and chain.inflight < self.plan.micro_batches_in_flight

    def _schedule(self) -> None:
        chain = self.chain
        while chain.held:
            msg = chain.held[0]
            if not self.kv.fits_all(msg.tensors["reserve"].tolist()):
                break
            chain.held.pop(0)
            chain.inflight += 1
            self._prefill(msg)
        # At most one round of launches per call, so new messages (prefills, frees) get read in
        # between even when the loop is this process (one stage: tokens are back at once).
        for _ in range(self.plan.micro_batches_in_flight):
            if not chain.ready or chain.inflight >= self.plan.micro_batches_in_flight:
                break
            seqs = list(chain.ready)[:self.plan.max_batch_sequences]
            tokens = torch.tensor([[chain.ready.pop(s)] for s in seqs], dtype=torch.int64)  # [n, 1]
            chain.inflight += 1
            self._decode({REQUESTS_KEY: _table(seqs), "input_ids": tokens})
        if chain.pending_free and self.to_next is not None:
            self._send(self.to_next, {REQUESTS_KEY: _table([])})  # frees no compute carried down

    def _tokens_back(self, t: dict[str, torch.Tensor]) -> None:
        for s, tok, done in zip(t[REQUESTS_KEY][:, 0].tolist(), t["tokens"].tolist(), t["done"].tolist(),
                                strict=True):
            if s not in self.kv.seqs:
                continue  # freed (cancelled; or finished, with one stage) while its token was on the way
            if done:
                self._free([s])
            else:
                self.chain.ready[s] = tok

    # -- compute ---------------------------------------------------------------------------------

    def _prefill(self, msg: Message) -> None:
        t = msg.tensors
        seqs = t[REQUESTS_KEY][:, 0].tolist()
        lengths = t["lengths"].tolist()
        kv = self.kv.prefill(seqs, lengths, t["reserve"].tolist())
        act = {"input_ids" if self.first else "hidden": t["input_ids" if self.first else "hidden"],
               "attention_mask": t["attention_mask"]}
        out = self._run(act, kv, seqs)
        meta = {k: t[k] for k in ("lengths", "reserve", "gen_params", "stop_ids")}
        if not self.last:
            self._send(self.to_next, {REQUESTS_KEY: t[REQUESTS_KEY], "hidden": out["hidden"],
                                      "attention_mask": t["attention_mask"], **meta})
            return
        logits = out["output"]  # [n, T, V], or [n, V] for a next-token head
        if logits.dim() == 3:
            index = torch.tensor(lengths, device=logits.device) - 1
            logits = logits[torch.arange(len(seqs), device=logits.device), index]  # [n, V]
        for i, s in enumerate(seqs):
            max_new = int(t["reserve"][i]) - lengths[i]
            params = params_from_row(t["gen_params"][i].tolist(), t["stop_ids"][i].tolist(), max_new)
            self.samplers[s] = _Sampler(params, make_generator(params.seed, self.device))
        self._sampled(seqs, logits)

    def _decode(self, t: dict[str, torch.Tensor]) -> None:
        seqs = t[REQUESTS_KEY][:, 0].tolist()
        x = t["input_ids" if self.first else "hidden"]
        out = self._timed(seqs, lambda: self.decoder.step(x, seqs))
        if not self.last:
            self._send(self.to_next, {REQUESTS_KEY: t[REQUESTS_KEY], "hidden": out["hidden"]})
            return
        logits = out["output"]
        self._sampled(seqs, logits[:, -1] if logits.dim() == 3 else logits)

    def _run(self, act: dict[str, torch.Tensor], kv: PagedBatch, seqs: list[int]) -> dict[str, torch.Tensor]:
        """A prefill's forward (eager: its shapes vary)."""
        def forward() -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = self.stage({k: v.to(self.device, non_blocking=True) for k, v in act.items()},
                                                      kv)
            self.kv.store(seqs, kv)
            return out
        return self._timed(seqs, forward)

    def _timed(self, seqs: list[int], forward: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if self._first_at is None:
            self._first_at = time.monotonic()
        started = time.perf_counter()
        out = forward()
        if not self.last:
            out = {"hidden": out["hidden"].cpu()}  # the gloo edges carry host tensors
        elif self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # so compute time is GPU time
        elapsed = time.perf_counter() - started
        self._busy_s += elapsed
        self._micro_batches += 1
        self._samples += len(seqs)
        self._computed.add(time.monotonic(), len(seqs), elapsed)
        return out

    def _sampled(self, seqs: list[int], logits: torch.Tensor) -> None:
        """The last stage: pick each sequence's next token, decide whether it is done, and send
        the tokens to the dispatcher and round the loop."""
        states = [self.samplers[s] for s in seqs]
        tokens = sample_async(logits, [st.params for st in states], [st.generator for st in states]).tokens()
        done = []
        for s, st, tok in zip(seqs, states, tokens, strict=True):
            st.produced += 1
            finished = st.produced >= st.params.max_new_tokens or tok in st.params.stop_token_ids
            done.append(int(finished))
            if finished:
                self.kv.free([s])
                self.samplers.pop(s)
        out = {REQUESTS_KEY: _table(seqs), "tokens": torch.tensor(tokens, dtype=torch.int64),
               "done": torch.tensor(done, dtype=torch.int64)}
        self._send(self.to_dispatcher, out)
        if self.first:  # one stage: the loop is this process
            self.chain.inflight -= 1
            self._tokens_back(out)
        else:
            self._send(self.to_loop, dict(out))

    def _send(self, index: int | None, tensors: dict[str, torch.Tensor]) -> None:
        assert index is not None, f"{self.node}: no such out-edge"
        if self._stopped:
            return  # STOP went down this edge already: tokens still in the loop go nowhere
        if self.chain.pending_free and index == self.to_next:
            tensors["free"] = torch.tensor(self.chain.pending_free, dtype=torch.int64)
            self.chain.pending_free = []
        self._mb_ids += 1
        self.outboxes[index].put(Message(DATA, self._mb_ids, 0, tensors))

    # -- stats -----------------------------------------------------------------------------------

    def stats(self) -> StageStats:
        now = time.monotonic()
        window_s = self._computed.window_s
        covered = span(now, self._first_at, window_s)
        count, (rows, compute_s) = self._computed.sums(now, 2)
        per_edge = [0.0] * len(self.in_edges)
        for _, index, n in self._received.snapshot(now):
            per_edge[int(index)] += n
        return StageStats(
            str(self.node), self._micro_batches, self._samples, self._busy_s,
            now - self._first_at if self._first_at is not None else 0.0, self.inbox.qsize(),
            window_s=window_s, occupancy=min(1.0, rate(compute_s, covered)), inflight=self.chain.inflight,
            compute_s=mean(compute_s, count), samples_per_s=rate(rows, covered),
            kv_tokens=self.kv.held_tokens, kv_reserved_tokens=self.kv.reserved_tokens,
            kv_budget_tokens=self.kv.budget_tokens, kv_sequences=len(self.kv.seqs), graph_replays=self.decoder.replays,
            inputs=[EdgeRate(str(e.peer), rate(n, covered)) for e, n in zip(self.in_edges, per_edge, strict=True)])


def drain_acks(edge: Edge) -> None:
    """Read a sending edge's acks until its STOP_ACK. A generation chain routes by sequence, not
    by acks, but every ack must still be received: a gloo send completes only once it is."""
    while edge.recv_ack().kind != STOP_ACK:
        pass


def _table(seqs: list[int]) -> torch.Tensor:
    """The request table of a micro-batch of sequences: [n, 2] (sequence id, one row each)."""
    return torch.tensor([[s, 1] for s in seqs], dtype=torch.int64).reshape(-1, 2)


def _drop_rows(msg: Message, seq: int) -> Message | None:
    """A held prefill without `seq`'s row, or None when nothing is left of it."""
    ids = msg.tensors[REQUESTS_KEY][:, 0]
    keep = ids != seq
    if bool(keep.all()):
        return msg
    if not bool(keep.any()):
        return None
    tensors = {k: (v[keep] if k in PREFILL_ROW_KEYS else v) for k, v in msg.tensors.items()}
    return Message(msg.kind, msg.mb_id, msg.route_key, tensors)
