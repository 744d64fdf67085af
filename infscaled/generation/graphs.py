"""One stage's decode step, eager or replayed from CUDA graphs.

Why graphs: a decode step of a few sequences is tiny GPU work (a 3B model's half reads its 3 GB of
weights in under a millisecond) behind hundreds of kernel launches from Python: measured on an
H200, 37-40 ms per step for 14 Llama layers, all launch overhead, and the launching thread holds
the GIL the stage's receiver and sender threads need (BENCHMARKS.md section 5). A graph replays
the whole step with one call.

What makes a step replayable: its shape and every address it touches. The shape is the bucket
(rows, pages): the micro-batch's sequence count rounded up to a power of two (at most
`max_rows`) and the widest page table among them rounded up likewise; rows beyond the real ones
are padding (scratch page, position 0) and their outputs are dropped. The addresses are fixed
by `StageKV` (pools allocated once) and by a static `PagedBatch` and input buffer per bucket, which
each step fills in place before `replay`.

Lifecycle of a bucket: its first step runs eagerly on the static tensors (the warm-up that
capture needs: cuBLAS handles, lazy initialisations), the second captures the graph and replays
it, later ones only replay. At most `max_graphs` buckets get graphs; others, and every step when
graphs are off or the device is not CUDA, run eagerly on a batch of exactly their sequences.
A capture that fails logs one warning and leaves its bucket eager for good: graphs are a speed-up,
never a reason for a stage to fail. Capture uses `capture_error_mode="thread_local"` because the
stage's receiver and sender threads keep running meanwhile (they do host work only; a global
capture would forbid even their harmless CUDA-free calls into the runtime).

Outputs of a replay are views of the graph's static outputs, valid until the next step of the
same bucket: the caller copies them to the host (hidden states) or samples from them (logits)
before it runs another step, which the generation loop's single compute thread guarantees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from infscaled.generation.kv import PAGE_TOKENS, PagedBatch, StageKV, pages_for, pinned
from infscaled.generation.paged_attention import check_backend, default_backend
from infscaled.worker.graphs import capture

log = logging.getLogger(__name__)


def bucket(n: int, cap: int) -> int:
    """The smallest power of two >= n, but at most `cap` (n <= cap)."""
    size = 1
    while size < n:
        size *= 2
    return min(size, cap)


@dataclass
class _Bucket:
    batch: PagedBatch  # static: its table and positions are filled in place
    x: torch.Tensor | None = None  # static input: input_ids [rows, 1] or hidden [rows, 1, D]
    positions: torch.Tensor | None = None  # a prefill with past: static position_ids [rows, columns]
    steps: int = 0
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    out: dict[str, torch.Tensor] | None = None  # the graph's static outputs
    eager: bool = False  # capture failed: never try again

    def run(self, capture: Any, forward: Any) -> tuple[dict[str, torch.Tensor], bool]:
        """One step of this bucket: its first eager, `capture()` on the second, then replays;
        the outputs and whether they came from a replay."""
        self.steps += 1
        if self.graph is None and not self.eager and self.steps >= 2:
            capture()
        if self.graph is not None:
            self.graph.replay()
            assert self.out is not None
            return self.out, True
        out: dict[str, torch.Tensor] = forward()
        return out, False


class DecodeStep:
    """Runs decode steps of one stage: `step(x, seqs)` with x the host input of the micro-batch
    (input_ids [n, 1] on stage 0, hidden states [n, 1, D] later) returns the stage's outputs for
    those n rows (device tensors) and counts the new position in the KV cache."""

    def __init__(self, stage: torch.nn.Module, kv: StageKV, device: torch.device, input_key: str, max_rows: int,
                 graphs: bool, max_graphs: int | None = None, attention: str | None = None) -> None:
        self.stage, self.kv, self.device = stage, kv, device
        # The paged attention backend (generation/paged_attention.py): flex on CUDA, torch elsewhere.
        self.attention = check_backend(attention) if attention else default_backend(device)
        self.input_key = input_key
        self.max_rows = max_rows
        self.graphs = graphs and device.type == "cuda"
        # Buckets are rows (7 sizes up to 64) x page-table widths (powers of two): mixed lengths
        # (a long-tailed workload) use dozens. The Triton kernel compiles once for all of them, so
        # a bucket costs one eager step and a capture: allow 64. flex compiles per shape: 16.
        self.max_graphs = max_graphs if max_graphs is not None else (64 if self.attention == "triton" else 16)
        self.replays = 0  # steps served by a graph (reported in the stage's stats)
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._graphs = _Captures(device)

    def step(self, x: torch.Tensor, seqs: list[int]) -> dict[str, torch.Tensor]:
        n = len(seqs)
        if not self.graphs or n > self.max_rows:
            return self._eager(x, seqs)
        key = (bucket(n, self.max_rows), bucket(max(len(self.kv.pages[s]) for s in seqs), self.kv.page_count))
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.max_graphs:
                return self._eager(x, seqs)
            b = self._buckets[key] = _Bucket(PagedBatch.static(self.kv, *key, attention=self.attention))
        b.batch.load(seqs)
        if b.x is None:
            b.x = torch.zeros((key[0], *x.shape[1:]), dtype=x.dtype, device=self.device)
        b.x[:n].copy_(pinned(x) if x.device.type == "cpu" else x, non_blocking=True)
        if n < key[0]:
            b.x[n:].zero_()
        out, replayed = b.run(lambda: self._capture(b, key), lambda: self.stage(self._act(b.x, b.batch), b.batch))
        self.replays += replayed
        self.kv.store(seqs, b.batch)
        return {k: v[:n] if isinstance(v, torch.Tensor) and v.shape[:1] == (key[0],) else v for k, v in out.items()}

    def captured(self) -> list[tuple[int, int]]:
        """The buckets (rows, pages) whose steps replay a CUDA graph."""
        return [key for key, b in self._buckets.items() if b.graph is not None]

    def _eager(self, x: torch.Tensor, seqs: list[int]) -> dict[str, torch.Tensor]:
        """A step on a batch of exactly these sequences, launched from Python."""
        # Exact batches come in any shape: flex would compile for each one, so they take the plain
        # path; the Triton kernel compiles once for every shape, so it serves them too.
        batch = self.kv.decode(seqs, "torch" if self.attention == "flex" else self.attention)
        if x.device.type == "cpu":
            x = pinned(x)
        out: dict[str, torch.Tensor] = self.stage(self._act(x.to(self.device, non_blocking=True), batch), batch)
        self.kv.store(seqs, batch)
        return out

    def _act(self, x: torch.Tensor, batch: PagedBatch) -> dict[str, torch.Tensor]:
        assert batch.positions is not None
        rows = batch.positions.shape[0]
        # The mask stays on the host, all ones: the units decide "nothing is padded" there without
        # a device sync (models/families/common.py); a decode step's attention masks the pages itself.
        return {self.input_key: x, "attention_mask": torch.ones(rows, 1, dtype=torch.int64),
                "position_ids": batch.positions.unsqueeze(1)}

    def _capture(self, b: _Bucket, key: tuple[int, int]) -> None:
        x = b.x
        assert x is not None
        self._graphs.capture(b, lambda: self.stage(self._act(x, b.batch), b.batch),
                             f"decode step of {key[0]} rows x {key[1]} pages")


MAX_FAILED_CAPTURES = 3  # failed captures, none succeeding, after which a step kind stops trying


class _Captures:
    """A step kind's CUDA graphs: one memory pool and capture stream, made on first use.

    A failed capture leaves its pool unusable for the next (PyTorch's caching allocator then fails
    an internal assertion on the next capture into it: seen on the H200 after transformers' MoE
    layers failed one), so a failure drops the pool and the next capture starts a fresh one. A
    model whose steps cannot be captured at all (an operation that copies from pageable host
    memory, as transformers' grouped expert product does) would otherwise fail, warn and pay an
    extra eager step in every bucket: after MAX_FAILED_CAPTURES failures with no capture
    succeeding, the step kind stops trying (one warning says so) and runs eagerly.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool: Any = None
        self._stream: Any = None
        self.failed = 0  # captures that failed
        self.captured = 0  # and that succeeded

    @property
    def given_up(self) -> bool:
        return self.captured == 0 and self.failed >= MAX_FAILED_CAPTURES

    def capture(self, b: _Bucket, forward: Any, what: str) -> None:
        """Capture `forward()` as `b`'s graph; a failure logs a warning and leaves `b` eager for good."""
        if self.given_up:
            b.eager = True
            return
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(self.device)
        try:
            graph, out = capture(forward, torch.cuda.current_stream(self.device), self._stream, self._pool)
        except Exception:  # noqa: BLE001 - a graph is an optimisation: fall back to eager, loudly
            log.warning("%s: CUDA graph capture failed; this shape runs eagerly", what, exc_info=True)
            b.eager = True
            self._pool = None  # (see the class docstring)
            self.failed += 1
            if self.given_up:
                log.warning("%s: %d CUDA graph captures failed and none succeeded: these steps run eagerly "
                            "from now on, without trying again", what, self.failed)
            return
        b.graph, b.out = graph, out
        self.captured += 1
        log.info("%s captured as a CUDA graph", what)


PREFILL_GRAPH_TOKENS = 2048  # the most padded tokens (rows x columns) of a prefill replayed from a graph
PAST_GRAPHS = 16  # the most prefill buckets with past (later chunks) that get a graph, on first uses


class PrefillStep:
    """One stage's prefill micro-batches (whole prompts, or a prompt's first chunk) replayed from
    CUDA graphs, where that can be done.

    Why: an eager prefill is launch-bound. Measured on the H200 (BENCHMARKS.md section 22) a
    1 x 128-token prefill of llama-3b is 3.5-5.3 ms of kernels behind 33 ms of host time (570 to
    1,240 launches from Python, compiled or not), and every running sequence waits through it.

    What is replayed: a micro-batch whose rows and columns, rounded up to powers of two
    (`bucket`, columns at least a page), stay within PREFILL_GRAPH_TOKENS, on a stage whose
    decoder layers all run the fused prefill (models/families/fused_decode.py): its operations
    depend on the shape alone. A bucket holds a static input buffer and a static `PagedBatch`
    (`static_prefill`: where each real position's keys and values go, padding to the scratch
    page; each row's last real column for the head); its host mask is all ones. Without past
    (every row starts at position 0: whole prompts, first chunks) the attention is causal without
    a mask, which right padding keeps exact for the real positions; a bucket is (rows, columns).
    With past (a prompt's later chunks, possibly beside fresh prompts) a bucket is (rows, columns,
    pages): the rows' page tables, their positions and the additive past mask
    (`PagedBatch.past_mask`) are static tensors too, refilled for each micro-batch; at most
    PAST_GRAPHS such buckets get graphs, met while serving (the warm-up runs only the buckets
    without past: a prompt's chunks can end at any page). Like decode buckets: the first
    micro-batch of a bucket runs eagerly on the static tensors, the second captures, later ones
    replay; a failed capture leaves the bucket eager. Everything else (prompt log-probabilities,
    other families, CPU stages) runs eagerly (the caller's path).
    """

    def __init__(self, stage: torch.nn.Module, kv: StageKV, device: torch.device, input_key: str, max_rows: int,
                 graphs: bool, max_graphs: int | None = None) -> None:
        self.stage, self.kv, self.device, self.input_key = stage, kv, device, input_key
        self.max_rows = max_rows
        # The buckets are few (36 at 128 rows) and share one memory pool: by default every one
        # may have its graph, so no prefill shape runs eagerly for good.
        self.max_graphs = max_graphs if max_graphs is not None else len(self.buckets())
        layers = [u for u in getattr(stage, "units", []) if hasattr(u, "fuse_projections")]
        self.fused = bool(layers) and all("_fused" in u.__dict__ for u in layers)
        self.graphs = graphs and device.type == "cuda" and self.fused
        self.replays = 0
        self._buckets: dict[tuple[int, ...], _Bucket] = {}
        self._graphs = _Captures(device)

    def key(self, rows: int, columns: int, last_logits: bool, pages: int = 0) -> tuple[int, ...] | None:
        """The bucket of a micro-batch of `rows` x `columns` (padded), or None: run it eagerly.
        `pages`: for chunks with past, the widest page table its rows need (their past and the
        chunk; `past_pages`); 0 for a micro-batch without past."""
        if not self.graphs or not last_logits or rows > self.max_rows or columns > PREFILL_GRAPH_TOKENS:
            return None
        key: tuple[int, ...] = (bucket(rows, self.max_rows), max(PAGE_TOKENS, bucket(columns, PREFILL_GRAPH_TOKENS)))
        if key[0] * key[1] > PREFILL_GRAPH_TOKENS:
            return None
        if pages:
            key = (*key, bucket(pages, self.kv.page_count))
        if key not in self._buckets:
            taken = sum(1 for k in self._buckets if len(k) == len(key))
            if taken >= (PAST_GRAPHS if pages else self.max_graphs):
                return None
        return key

    def buckets(self) -> list[tuple[int, int]]:
        """Every bucket without past `key` can give (rows, columns), rows then columns ascending
        (those the warm-up runs)."""
        rows, out = 1, []
        while True:
            r = min(rows, self.max_rows)
            columns = PAGE_TOKENS
            while r * columns <= PREFILL_GRAPH_TOKENS:
                out.append((r, columns))
                columns *= 2
            if r >= self.max_rows:
                return out
            rows *= 2

    def captured(self) -> list[tuple[int, ...]]:
        """The buckets (rows, columns[, pages]) whose prefills replay a CUDA graph."""
        return [key for key, b in self._buckets.items() if b.graph is not None]

    def step(self, key: tuple[int, ...], x: torch.Tensor, seqs: list[int], lengths: list[int],
             reserves: list[int], starts: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Admit `seqs` (kv.admit, as StageKV.prefill does) and run their prompts x (host input
        [n, T] ids or [n, T, D] hidden; chunks from `starts`, in a bucket with pages) in bucket
        `key`; outputs for the real rows (and columns)."""
        n, t = x.shape[:2]
        starts = starts or [0] * n
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(PagedBatch.static_prefill(self.kv, *key))
        self.kv.admit(seqs, lengths, reserves, starts)
        b.batch.load_prefill(seqs, lengths, starts)
        if b.x is None:
            b.x = torch.zeros((key[0], key[1], *x.shape[2:]), dtype=x.dtype, device=self.device)
        b.x.zero_()
        b.x[:n, :t].copy_(pinned(x) if x.device.type == "cpu" else x, non_blocking=True)
        if b.batch.past:  # each row's positions: its start onwards (padding rows: 0, 1, ...)
            positions = torch.arange(key[1]).repeat(key[0], 1)
            positions[:n] += torch.tensor(starts).unsqueeze(1)
            if b.positions is None:
                b.positions = torch.zeros_like(positions, device=self.device)
            b.positions.copy_(pinned(positions), non_blocking=True)
        out, replayed = b.run(lambda: self._capture(b, key), lambda: self.stage(self._act(b), b.batch))
        self.replays += replayed
        self.kv.store(seqs, b.batch)
        return {"hidden": out["hidden"][:n, :t]} if "hidden" in out else {"output": out["output"][:n]}

    def _act(self, b: _Bucket) -> dict[str, torch.Tensor]:
        assert b.x is not None
        # All ones on the host: nothing is padded as far as the units can tell, so the attention
        # is causal without a mask (exact for right padding), or with past under the batch's
        # static past mask; the head reads b.batch.last_index.
        act = {self.input_key: b.x, "attention_mask": torch.ones(b.x.shape[:2], dtype=torch.int64)}
        if b.positions is not None:
            act["position_ids"] = b.positions
        return act

    def _capture(self, b: _Bucket, key: tuple[int, ...]) -> None:
        what = f"prefill of {key[0]} rows x {key[1]} tokens" + (f" after up to {key[2]} pages" if len(key) > 2 else "")
        self._graphs.capture(b, lambda: self.stage(self._act(b), b.batch), what)


def past_pages(starts: list[int], lengths: list[int]) -> int:
    """The widest page table a micro-batch's chunks need (each row's past and its chunk), or 0
    when no row has past (it runs without page tables)."""
    if not any(starts):
        return 0
    return max(pages_for(a + n) for a, n in zip(starts, lengths, strict=True))
