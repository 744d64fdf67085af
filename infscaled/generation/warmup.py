"""A generation stage's decode and prefill buckets, run and captured before the stage says READY.

Why: a CUDA stage captures its decode step once per bucket (generation/graphs.py: a bucket's first
step runs eagerly, the second captures) and, with `[pipeline] compile = true`, compiles it for
that shape first, seconds each. Done on first use, the first requests wait for it: on an H200
(BENCHMARKS.md section 20, llama-3b compiled) the captures happened 8-17 s after the stage was
built, and a closed loop's TTFT p99 was 12-17 s. The worker (worker/entry.py) calls `warm_up`
after building the stage and before joining its edges, so this work is done before READY and
before any sequence can reach the stage: a chain added while the job serves takes no sequence
while it warms up.

Which buckets (`plan_buckets`), most useful first:
- rows: every row count DecodeStep forms (1, 2, 4, ..., max_batch_sequences), largest first. A
  missing bucket stalls every sequence of the step that needs it, and under load nearly every step
  is a max-rows step; the small buckets of a light load, left to first use when the budget runs
  out, have few sequences waiting behind them.
- page-table widths: those of reservations (prompt + max_new_tokens) up to WARMUP_TOKENS, the KV
  budget and the model's positions, narrowest first within a row count (short requests are the
  common ones, and the cheapest to warm).
- at most GRAPH_SHARE of DecodeStep.max_graphs: the rest is kept for shapes the workload finds
  (a longer reservation), which would otherwise run eagerly for good.
- within `budget_s`: a bucket starts only while the last one's time still fits in what is left
  (with compile a bucket costs seconds; without, two launch-bound steps and a capture).

Then the prefill buckets (`warm_prefill`, with the time left): generation/graphs.py PrefillStep
replays whole prompts (and first chunks) of up to PREFILL_GRAPH_TOKENS padded tokens from graphs,
one per (rows, columns) bucket; there are few of them (36 at 128 rows), all planned, rows then
columns ascending. Met first while serving, each would cost an eager prefill and a capture in
front of every running sequence (on an H200, llama-3b: all 36 take 4.4 s before READY;
BENCHMARKS.md section 25).

Leaving nothing behind: one warm-up sequence (WARMUP_SEQ, an id no dispatcher uses) is admitted
through a real 1-token prefill forward of the stage (then prefills of 1 and 2 rows of a page, so
a compiled prefill has compiled its dynamic-shape graphs, and a second chunk of a prompt, which
attends to its first: its own kernels), so the KV pools are allocated from real keys
(heads, head size, dtype) exactly as the first real prefill would; then, per bucket, it is admitted
again with a reservation of exactly `width` pages and stepped twice with every one of the bucket's
`rows` rows pointing at its pages (input: token 0 on stage 0, zero hidden states on later stages).
It is freed after each bucket, so the StageKV ends exactly as empty as it began (every page free,
in the same order; no reservation): the dispatcher's admission counts and the stage's KV stats are
unaffected. What the steps wrote into the pools is never read: a sequence attends only to the
positions it wrote itself. `DecodeStep.replays` is restored, so the stage's `graph_replays` counts
the steps of real sequences only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING

import torch

from infscaled.generation.graphs import DecodeStep, PrefillStep, bucket
from infscaled.generation.kv import PAGE_TOKENS, PagedBatch, pages_for

if TYPE_CHECKING:
    from infscaled.models.base import Family

log = logging.getLogger(__name__)

WARMUP_TOKENS = 4096  # the longest reservation whose page-table width is warmed up
WARMUP_SEQ = -1  # the warm-up sequence's id: dispatchers number their sequences from 0
GRAPH_SHARE = 0.75  # of DecodeStep.max_graphs, the most the warm-up takes
STEPS_PER_BUCKET = 2  # an eager step (lazy initialisations, compilation), then the capture


class Warm(Enum):
    """What a warm-up ran: decode steps (buckets of rows x pages) or prefills (rows x tokens)."""

    DECODE = "decode"
    PREFILL = "prefill"

    @property
    def unit(self) -> str:
        return "pages" if self is Warm.DECODE else "tokens"


@dataclass(frozen=True)
class Warmed:
    """What a warm-up did: the buckets it stepped (rows, pages; for prefills rows, tokens), in
    order, those of them that now replay a CUDA graph, how many it planned, and how long it took;
    `prefill`: the prefill warm-up that followed a decode warm-up, if any."""

    stepped: tuple[tuple[int, int], ...]
    captured: tuple[tuple[int, int], ...]
    planned: int
    seconds: float
    budget_s: float
    kind: Warm = Warm.DECODE
    prefill: Warmed | None = None

    def describe(self) -> str:
        shapes = " ".join(f"{r}x{w}" for r, w in self.stepped) or "none"
        left = self.planned - len(self.stepped)
        tail = f"; {left} more are captured on first use (time budget)" if left else ""
        return (f"{self.kind.value} warm-up: {len(self.stepped)} of {self.planned} buckets run, "
                f"{len(self.captured)} captured as CUDA graphs, in {self.seconds:.1f} s (budget {self.budget_s:g} s; "
                f"rows x {self.kind.unit}: {shapes}){tail}")


def sizes(limit: int, cap: int) -> list[int]:
    """Every `bucket(n, cap)` for n in 1..limit, ascending: the powers of two, then the cap."""
    out: list[int] = []
    size = 1
    while True:
        out.append(min(size, cap))
        if size >= limit or size >= cap:
            return out
        size *= 2


def plan_buckets(max_rows: int, page_count: int, widest_tokens: int, max_buckets: int) -> list[tuple[int, int]]:
    """The (rows, pages) buckets to warm, most useful first (see the module docstring): rows
    largest first, then page-table widths narrowest first for reservations up to
    `widest_tokens`; at most `max_buckets`."""
    rows = sorted(sizes(max_rows, max_rows), reverse=True)
    widths = sizes(pages_for(max(1, widest_tokens)), page_count)
    assert all(bucket(w, page_count) == w for w in widths)  # a width-w reservation forms this bucket
    return [(r, w) for r in rows for w in widths][:max(0, max_buckets)]


def widest_tokens(budget_tokens: int, max_positions: int) -> int:
    """The longest reservation a sequence of this job can have, up to WARMUP_TOKENS."""
    return min(WARMUP_TOKENS, budget_tokens, max_positions if max_positions > 0 else budget_tokens)


def warm_decode(decoder: DecodeStep, budget_s: float, hidden_size: int, dtype: torch.dtype,
                max_positions: int = 0) -> Warmed:
    """Run (and, where graphs are on, capture) `decoder`'s planned buckets within `budget_s`.
    `hidden_size` and `dtype`: the hidden states a stage after the first receives. The stage's
    KV cache must be empty; it is again afterwards, whatever happens."""
    kv = decoder.kv
    assert not kv.seqs, "warm-up runs before the stage serves"
    plan = plan_buckets(decoder.max_rows, kv.page_count, widest_tokens(kv.budget_tokens, max_positions),
                        int(decoder.max_graphs * GRAPH_SHARE))
    first = decoder.input_key == "input_ids"

    def zeros(rows: int, tokens: int = 1) -> torch.Tensor:  # a micro-batch's host input, as the edges deliver it
        if first:
            return torch.zeros((rows, tokens), dtype=torch.int64)  # [rows, T] token ids
        return torch.zeros((rows, tokens, hidden_size), dtype=dtype)  # [rows, T, D] hidden states

    def run(act: dict[str, torch.Tensor], batch: PagedBatch) -> None:  # a prefill, its inputs on the stage's device
        decoder.stage({k: v.to(decoder.device) for k, v in act.items()}, batch)

    started = time.monotonic()
    replays = decoder.replays
    stepped: list[tuple[int, int]] = []
    try:
        with torch.inference_mode():
            # The pools: allocated by the stage's attention layers on a real prefill (generation/kv.py).
            batch = kv.prefill([WARMUP_SEQ], [1], [PAGE_TOKENS])
            run({decoder.input_key: zeros(1), "attention_mask": torch.ones(1, 1, dtype=torch.int64)}, batch)
            kv.free([WARMUP_SEQ])
            # Prefills of 1 and 2 rows of PAGE_TOKENS: with compile, the fused prefill's parts
            # compile for dynamic shapes here (sizes 1 are specialised), not on the first request.
            for rows in (1, 2):
                seqs = [WARMUP_SEQ - i for i in range(rows)]
                batch = kv.prefill(seqs, [PAGE_TOKENS] * rows, [PAGE_TOKENS] * rows)
                run({decoder.input_key: zeros(rows, PAGE_TOKENS),
                     "attention_mask": torch.ones(rows, PAGE_TOKENS, dtype=torch.int64)}, batch)
                for s in reversed(seqs):  # (last taken, first given back: the pool's order as before)
                    kv.free([s])
            # A prompt's second chunk (a prefill with past: on CUDA its own variant of the rotary
            # kernel, generation/triton_layer.py), so the first long prompt does not compile it.
            kv.store([WARMUP_SEQ], kv.prefill([WARMUP_SEQ], [PAGE_TOKENS], [2 * PAGE_TOKENS]))
            batch = kv.prefill([WARMUP_SEQ], [PAGE_TOKENS], [2 * PAGE_TOKENS], [PAGE_TOKENS])
            run({decoder.input_key: zeros(1, PAGE_TOKENS),
                 "attention_mask": torch.ones(1, PAGE_TOKENS, dtype=torch.int64),
                 "position_ids": torch.arange(PAGE_TOKENS, 2 * PAGE_TOKENS).unsqueeze(0)}, batch)
            kv.free([WARMUP_SEQ])
            _sync(decoder.device)
            last = 0.0
            for rows, width in plan:
                now = time.monotonic()
                if now - started + last > budget_s:
                    break
                kv.store([WARMUP_SEQ], kv.prefill([WARMUP_SEQ], [1], [width * PAGE_TOKENS]))  # at position 1
                x = zeros(rows)
                for _ in range(STEPS_PER_BUCKET):
                    decoder.step(x, [WARMUP_SEQ] * rows)  # every row on the warm-up sequence's pages
                kv.free([WARMUP_SEQ])
                _sync(decoder.device)
                stepped.append((rows, width))
                last = time.monotonic() - now
    finally:
        kv.free([WARMUP_SEQ, WARMUP_SEQ - 1])
        decoder.replays = replays
    planned = set(plan)
    return Warmed(tuple(stepped), tuple(k for k in decoder.captured() if k in planned), len(plan),
                  time.monotonic() - started, budget_s)


def warm_prefill(prefills: PrefillStep, budget_s: float, hidden_size: int, dtype: torch.dtype,
                 max_positions: int = 0) -> Warmed:
    """Run (and capture) every prefill bucket of `prefills` (PrefillStep.buckets: rows, then
    columns ascending) within `budget_s`, as the decode warm-up does its buckets: a bucket's
    rows are warm-up sequences (WARMUP_SEQ, WARMUP_SEQ - 1, ...) admitted with prompts of exactly
    its columns, prefilled twice (eager, then the capture) and freed, last taken first given
    back, so the StageKV ends as it began. A bucket whose tokens the KV budget cannot hold is
    left to first use; one wider than the model's positions (`max_positions`, 0: no limit) is
    never used. Why: a bucket first met while serving costs an eager prefill and a capture
    in front of every running sequence."""
    kv = prefills.kv
    assert not kv.seqs, "warm-up runs before the stage serves"
    widest = bucket(max_positions, 1 << 40) if max_positions > 0 else 1 << 40
    plan = [k for k in prefills.buckets() if k[1] <= widest and kv.fits_all([k[1]] * k[0])][:prefills.max_graphs]
    first = prefills.input_key == "input_ids"
    started = time.monotonic()
    replays = prefills.replays
    stepped: list[tuple[int, int]] = []
    last = 0.0
    with torch.inference_mode():
        for rows, columns in plan:
            now = time.monotonic()
            if now - started + last > budget_s:
                break
            seqs = [WARMUP_SEQ - i for i in range(rows)]
            x = (torch.zeros((rows, columns), dtype=torch.int64) if first
                 else torch.zeros((rows, columns, hidden_size), dtype=dtype))
            for _ in range(STEPS_PER_BUCKET):
                try:
                    prefills.step((rows, columns), x, seqs, [columns] * rows, [columns] * rows)
                finally:
                    for s in reversed(seqs):  # (last taken, first given back: the pool's order as before)
                        kv.free([s])
            _sync(prefills.device)
            stepped.append((rows, columns))
            last = time.monotonic() - now
    prefills.replays = replays
    planned = set(plan)
    return Warmed(tuple(stepped), tuple(k for k in prefills.captured() if k in planned), len(plan),
                  time.monotonic() - started, budget_s, kind=Warm.PREFILL)


def warm_up(decoder: DecodeStep, warmup_s: float, ready_left_s: float, family: Family,
            dtype: torch.dtype, prefills: PrefillStep | None = None) -> Warmed | None:
    """The worker's call (worker/entry.py), before its edges join: warm the decode buckets of a
    stage whose decode steps replay CUDA graphs, then (given `prefills`, with what is left of the
    time) its prefill buckets, for at most `warmup_s` (generation.warmup_s) in all and at most half
    the `ready_left_s` seconds left before the supervisor's READY timeout; an INFO line for each
    says what was done. A warm-up that fails logs a warning and leaves the rest to first
    use: like graphs themselves, it is a speed-up, never a reason for a stage to fail (a real
    fault shows again, with its real error, on the first request)."""
    if warmup_s <= 0 or not decoder.graphs:
        log.debug("no decode warm-up (generation.warmup_s = %g; CUDA graphs %s)", warmup_s,
                  "on" if decoder.graphs else "off")
        return None
    budget = min(warmup_s, max(0.0, ready_left_s / 2))
    if budget < warmup_s:
        log.info("decode warm-up capped at %.0f s: half the time left before the READY timeout", budget)
    hidden = int(getattr(getattr(family, "config", None), "hidden_size", 0) or 0)
    if decoder.input_key != "input_ids" and hidden <= 0:
        log.info("no decode warm-up: the model's config says no hidden_size for this stage's input")
        return None
    try:
        warmed = warm_decode(decoder, budget, hidden, dtype, family.input_spec().max_positions)
    except Exception:  # noqa: BLE001 - an optimisation: the stage serves without it (see above)
        log.warning("decode warm-up failed; its buckets are captured on first use", exc_info=True)
        return None
    log.info("%s", warmed.describe())
    if prefills is None or not prefills.graphs:
        return warmed
    try:
        prefill = warm_prefill(prefills, max(0.0, budget - warmed.seconds), hidden, dtype,
                               family.input_spec().max_positions)
    except Exception:  # noqa: BLE001 - as above
        log.warning("prefill warm-up failed; its buckets are captured on first use", exc_info=True)
        return warmed
    log.info("%s", prefill.describe())
    return replace(warmed, prefill=prefill)


def _sync(device: torch.device) -> None:
    """Wait for the device: a bucket's time (the budget) is its GPU time too, and an error of its
    asynchronous work surfaces inside the warm-up."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
