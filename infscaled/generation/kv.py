"""KV caches of one stage for generation: pages of a preallocated pool, gathered per micro-batch.

Each stage keeps, for every sequence it serves, the keys and values of its own layers only, in
fixed-size pages: per layer one pool K (and one V) [pages + 1, PAGE_TOKENS, kv_heads, head_dim],
allocated once, on the first prefill, for the whole budget. A sequence owns the pages of its
reservation (prompt + max_new_tokens, rounded up to pages) from admission to free; its position
p lives in page `table[p // PAGE_TOKENS]` at offset `p % PAGE_TOKENS`. The last page of the pool
is a scratch page: padding rows of a micro-batch and unused table entries point at it.

A micro-batch of sequences gets a `PagedBatch`, the object transformers' attention layers call
`update` on (it duck-types `Cache.update`):

- prefill (prompts right-padded to the batch's longest): each row's real positions are written
  to its pages. Without past (every row starts at position 0) the layer's keys and values
  [B, H, T, Dh] are used as they are. A chunk of a longer prompt (chunked prefill, row b starting
  at `starts[b]` > 0, its earlier chunks already cached) attends to its past too: `update`
  returns each row's pages gathered [B, H, P * PAGE, Dh] (past and the chunk just written), and
  `past_mask` is the matching causal mask (models/families/common.py `causal_mask` uses it).
- decode (one new token per sequence, at position `positions[b]`): the new key and value are
  written to their page and `update` returns the layer's pools themselves; the attention
  (generation/paged_attention.py) reads each row's pages through its page table `table`, row b
  seeing positions <= positions[b] (and, for a sliding-window layer, only the window), so stale
  or scratch slots beyond a row's length are never attended to. `attention` names the backend.

Why pages rather than per-sequence tensors: every address a decode step touches is
fixed (the pools) or lives in small index tensors (`positions`, `table`), so a decode step of a
given shape can be captured once as a CUDA graph and replayed for any sequences
(generation/graphs.py). Nothing is copied between steps, nothing grows, and memory is bounded by
the budget from the first step.

The budget is in tokens: a sequence reserves prompt + max_new_tokens positions when admitted,
rounded up to whole pages (`reserved_span`), from a pool of ceil(budget / PAGE_TOKENS) pages, so
a stage never holds more cache than that, whatever the sequences do, and a sequence within the
budget always fits when alone. The dispatcher admits by the same rounded count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

KV = tuple[torch.Tensor, torch.Tensor]
PAGE_TOKENS = 16


def pages_for(tokens: int) -> int:
    return -(-tokens // PAGE_TOKENS)


def reserved_span(tokens: int) -> int:
    """The positions a reservation of `tokens` occupies: whole pages. Admission counts these (the
    dispatcher and stage 0 alike), so a stage's pool of pages_for(budget) pages never runs out."""
    return pages_for(tokens) * PAGE_TOKENS


def pinned(host: torch.Tensor) -> torch.Tensor:
    """`host` in page-locked memory when CUDA is there, so a copy to the device can be
    non-blocking: a copy from pageable memory synchronises the stream (a host sync per step).
    The caching host allocator keeps the block until the copy that reads it has run."""
    return host.pin_memory() if torch.cuda.is_available() else host


def to_device_no_sync(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return host.to(device)
    return pinned(host).to(device, non_blocking=True)


def gather_pages(pool: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Each row's pages of a pool [pages + 1, PAGE, H, Dh] through its table [B, P], as the
    sequence they hold: [B, H, P * PAGE, Dh]."""
    b, p = table.shape
    return pool[table].reshape(b, p * pool.shape[1], *pool.shape[2:]).transpose(1, 2)


def write_decode_kv(pool_k: torch.Tensor, pool_v: torch.Tensor, table: torch.Tensor, positions: torch.Tensor,
                    key: torch.Tensor, value: torch.Tensor) -> None:
    """A decode step's new key and value [B, H, 1, Dh] into each row's page at its position."""
    page = table.gather(1, (positions // PAGE_TOKENS).unsqueeze(1)).squeeze(1)  # [B]
    offset = positions % PAGE_TOKENS
    pool_k[page, offset] = key[:, :, 0]
    pool_v[page, offset] = value[:, :, 0]


class PagedBatch:
    """The cache transformers' attention sees for one micro-batch (duck-types `Cache.update`).

    Decode batches may be *static* (generation/graphs.py): created once for a shape, `load`-ed
    with each step's sequences, their index tensors updated in place so a captured graph sees them.
    """

    def __init__(self, kv: StageKV, decoding: bool, lengths: Sequence[int], attention: str = "torch",
                 starts: Sequence[int] = ()) -> None:
        self.kv = kv
        self.attention = attention  # decode: the paged attention backend (generation/paged_attention.py)
        self.static = False  # a fixed-shape batch (`static`): compiled layers may run it
        self.decoding = decoding
        self.lengths = list(lengths)  # per row: prefill: the chunk's tokens; decode: cached length
        self.starts = list(starts) or [0] * len(self.lengths)  # prefill: positions cached before the chunk
        self.past = any(self.starts)  # prefill: some row attends to an earlier chunk
        # prefill: the last stage needs next-token logits only (no prompt log-probabilities asked):
        # the head then runs on each row's last real position (models/families/llama.py LlamaHead).
        self.last_logits = False
        # A static prefill batch (generation/graphs.py PrefillStep): each row's last real column on
        # the device, as the head reads it inside a replayed graph (its host mask is all ones).
        self.last_index: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # decode: [B] int64, where each new token goes
        self.table: torch.Tensor | None = None  # decode (and prefill with past): [B, P] int64 page ids
        # prefill: where each (row, column) of the padded chunk [B, T] goes in a layer's pool seen
        # as [slots, H, Dh] (page * PAGE + offset; padding: the scratch page), per width T
        self._slots: dict[int, torch.Tensor] = {}
        self._index: tuple[np.ndarray, ...] | None = None  # prefill: rows, cols, pages, offsets (real positions)
        self._masks: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}  # prefill with past: per window

    # -- what the attention layers call --------------------------------------------------------

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> KV:
        # transformers passes the layer's keyword arguments on as `kwargs`; a decode step's unit
        # puts the layer's pools there (`kv_pools`), so a compiled layer never looks them up by
        # layer index (a constant that would make one compiled graph per layer).
        given = kwargs.get("kwargs", {}).get("kv_pools")
        pool_k, pool_v = given if given is not None else self.kv.pool(layer_idx, key)
        if not self.decoding:
            # key [B, H, T, Dh] -> every (row, column)'s [H, Dh] into its slot (padding: scratch).
            b, h, t, d = key.shape
            slots = self.slots(t)
            pool_k.view(-1, h, d)[slots] = key.transpose(1, 2).reshape(b * t, h, d)
            pool_v.view(-1, h, d)[slots] = value.transpose(1, 2).reshape(b * t, h, d)
            return self.attended(key, value, (pool_k, pool_v))
        assert self.positions is not None and self.table is not None
        write_decode_kv(pool_k, pool_v, self.table, self.positions, key, value)
        return pool_k, pool_v  # the attention reads the pages in place (paged_attention.py)

    def attended(self, key: torch.Tensor, value: torch.Tensor, pools: KV) -> KV:
        """Prefill: the keys and values a chunk's queries attend to once its own are in the pools:
        the chunk's [B, H, T, Dh] without past, else each row's pages gathered [B, H, P * PAGE, Dh]."""
        if not self.past:
            return key, value
        return gather_pages(pools[0], self.table), gather_pages(pools[1], self.table)

    def slots(self, width: int) -> torch.Tensor:
        """Prefill: the pool slot [B * width] of each (row, column) of the chunk padded to `width`
        columns: page * PAGE + offset for a real position, the scratch page for padding."""
        slots = self._slots.get(width)
        if slots is None:
            if self.static or self._index is None:
                raise ValueError(f"no prefill slots for a chunk {width} wide (have {sorted(self._slots)})")
            slots = self._slots[width] = to_device_no_sync(torch.from_numpy(self._slot_array(width)), self.kv.device)
        return slots

    def _slot_array(self, width: int, size: int | None = None) -> np.ndarray:
        assert self._index is not None
        rows, cols, pages, offsets = self._index
        if len(cols) and int(cols.max()) >= width:
            raise ValueError(f"a chunk of {int(cols.max()) + 1} tokens does not fit {width} columns")
        out = np.full(size if size is not None else len(self.lengths) * width, self.kv.scratch_page * PAGE_TOKENS,
                      dtype=np.int64)
        out[rows * width + cols] = pages * PAGE_TOKENS + offsets
        return out

    @classmethod
    def static(cls, kv: StageKV, rows: int, width: int, attention: str = "torch") -> PagedBatch:
        """A decode batch of fixed shape (rows x width pages) whose tensors stay where they are."""
        batch = cls(kv, decoding=True, lengths=[], attention=attention)
        batch.static = True
        batch.table = torch.full((rows, width), kv.scratch_page, dtype=torch.int64, device=kv.device)
        batch.positions = torch.zeros(rows, dtype=torch.int64, device=kv.device)
        return batch

    # -- filling ---------------------------------------------------------------------------------

    def load(self, seq_ids: Sequence[int]) -> None:
        """Decode: point this batch at these sequences (rows beyond them are padding: position 0
        of the scratch page). Static batches keep their tensors; only the values change."""
        kv = self.kv
        kv.check_decode(seq_ids)
        rows = len(seq_ids)
        width = self.table.shape[1] if self.table is not None else max(len(kv.pages[s]) for s in seq_ids)
        size = self.table.shape[0] if self.table is not None else rows
        if rows > size or any(len(kv.pages[s]) > width for s in seq_ids):
            raise ValueError(f"{rows} sequences do not fit a decode batch of {size} x {width} pages")
        self.lengths = [kv.length[s] for s in seq_ids]
        rows_np = kv.page_table([kv.pages[s] for s in seq_ids], size, width)
        lengths_np = np.zeros(size, dtype=np.int64)
        lengths_np[:rows] = self.lengths
        table, positions = torch.from_numpy(rows_np), torch.from_numpy(lengths_np)
        if self.table is None or self.positions is None:
            self.table, self.positions = to_device_no_sync(table, kv.device), to_device_no_sync(positions, kv.device)
        else:
            self.table.copy_(pinned(table), non_blocking=True)
            self.positions.copy_(pinned(positions), non_blocking=True)

    def past_mask(self, width: int, window: int, dtype: torch.dtype) -> torch.Tensor:
        """Prefill with past: the additive mask [B, 1, T, P * PAGE] over `update`'s gathered pages
        (T = `width`, the batch's padded chunk width). Query t of row b is at position starts[b] + t
        and sees positions <= its own (within `window` if set) that are cached or in the chunk; a
        padding query (t >= lengths[b]) is given the row's last real one's, so no row is empty. A
        static batch keeps the tensor and `load_prefill` refills it (a replayed graph reads it)."""
        key = (width, window, dtype)
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = to_device_no_sync(self._past_mask_host(*key), self.kv.device)
        return mask

    def _past_mask_host(self, width: int, window: int, dtype: torch.dtype) -> torch.Tensor:
        assert self.table is not None
        rows = self.table.shape[0]  # a static batch's padding rows: one real position each (0)
        pad = rows - len(self.starts)
        starts = torch.tensor(self.starts + [0] * pad, dtype=torch.int64).unsqueeze(1)  # [B, 1]
        lengths = torch.tensor(self.lengths + [1] * pad, dtype=torch.int64).unsqueeze(1)
        query = starts + torch.minimum(torch.arange(width).unsqueeze(0), lengths - 1)  # [B, T]
        j = torch.arange(self.table.shape[1] * PAGE_TOKENS)
        allowed = j <= query.unsqueeze(2)  # [B, T, L]
        if window:
            allowed &= j > query.unsqueeze(2) - window
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask.unsqueeze(1)

    def _write_arrays(self, seq_ids: Sequence[int]) -> tuple[np.ndarray, ...]:
        """(rows, cols, pages, offsets) of the chunk's real positions, in numpy."""
        kv = self.kv
        lengths = np.asarray(self.lengths, dtype=np.int64)
        rows = np.repeat(np.arange(len(seq_ids), dtype=np.int64), lengths)
        cols = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        pages = np.concatenate([np.asarray(kv.pages[s], dtype=np.int64)[(a + np.arange(n)) // PAGE_TOKENS]
                                for s, a, n in zip(seq_ids, self.starts, self.lengths, strict=True)]
                               or [np.zeros(0, np.int64)])
        offsets = (cols + np.repeat(np.asarray(self.starts, dtype=np.int64), lengths)) % PAGE_TOKENS
        return rows, cols, pages, offsets

    @classmethod
    def static_prefill(cls, kv: StageKV, rows: int, tokens: int, pages: int = 0) -> PagedBatch:
        """A prefill batch of fixed shape (rows x tokens) whose index tensors stay where they are
        (`load_prefill` fills them), for a prefill replayed from a CUDA graph. `pages` > 0: chunks
        with past, each row's page table `pages` wide (its past and the chunk, gathered for the
        attention, under `past_mask`); 0: no past."""
        batch = cls(kv, decoding=False, lengths=[])
        batch.static = True
        batch.last_logits = True
        batch._slots[tokens] = torch.zeros(rows * tokens, dtype=torch.int64, device=kv.device)
        batch.last_index = torch.zeros(rows, dtype=torch.int64, device=kv.device)
        if pages:
            batch.past = True
            batch.table = torch.full((rows, pages), kv.scratch_page, dtype=torch.int64, device=kv.device)
        return batch

    def load_prefill(self, seq_ids: Sequence[int], lengths: Sequence[int], starts: Sequence[int] = ()) -> None:
        """A static prefill batch: point it at these admitted sequences' chunks (from `starts`, a
        batch with past; else from 0). Slots beyond their real positions write the scratch page;
        rows beyond them read column 0 (and, with past, see the scratch page's first position)."""
        assert self.last_index is not None and len(self._slots) == 1
        starts = list(starts) or [0] * len(lengths)
        if any(starts) and not self.past:
            raise ValueError("a chunk with past in a static prefill batch without a page table")
        self.lengths, self.starts = list(lengths), starts
        self._index = self._write_arrays(seq_ids)
        (width, slots), = self._slots.items()
        slots.copy_(pinned(torch.from_numpy(self._slot_array(width, slots.numel()))), non_blocking=True)
        if self.past:
            assert self.table is not None
            table = self._past_table(seq_ids, *self.table.shape)
            self.table.copy_(pinned(torch.from_numpy(table)), non_blocking=True)
            for key, mask in self._masks.items():
                mask.copy_(pinned(self._past_mask_host(*key)), non_blocking=True)
        last = np.zeros(self.last_index.shape[0], dtype=np.int64)
        last[:len(lengths)] = np.asarray(lengths, dtype=np.int64) - 1
        self.last_index.copy_(pinned(torch.from_numpy(last)), non_blocking=True)

    def _prefill_index(self, seq_ids: Sequence[int]) -> None:
        """Where each real position of the chunk goes: (row, column) of the padded batch -> (page,
        offset) of position starts[row] + column (`slots` makes the device index per width). Built in
        numpy: a Python loop per token took tens of ms for 64 prompts of 512. With past, also the
        rows' page tables (for `update`'s gather)."""
        self._index = self._write_arrays(seq_ids)
        if self.past:
            self.table = to_device_no_sync(torch.from_numpy(self._past_table(seq_ids, len(seq_ids))), self.kv.device)

    def _past_table(self, seq_ids: Sequence[int], rows: int, width: int = 0) -> np.ndarray:
        """Prefill with past: each row's pages up to its chunk's end (its past and the chunk), for
        the attention's gather, as a [rows, width] table (width 0: the widest row's)."""
        chunks = zip(seq_ids, self.starts, self.lengths, strict=True)
        owned = [self.kv.pages[s][:pages_for(a + n)] for s, a, n in chunks]
        widest = max(len(o) for o in owned)
        if width and widest > width:
            raise ValueError(f"chunks reaching {widest} pages do not fit a static batch of {width}")
        return self.kv.page_table(owned, rows, width or widest)


class StageKV:
    """Every live sequence's cache at one stage, within a token budget, in pages of a pool."""

    def __init__(self, budget_tokens: int, device: str | torch.device = "cpu") -> None:
        if budget_tokens < 1:
            raise ValueError(f"KV budget must be >= 1 token, got {budget_tokens}")
        self.budget_tokens = budget_tokens
        self.device = torch.device(device)
        self.page_count = pages_for(budget_tokens)
        self.scratch_page = self.page_count  # the pool's extra last page
        self._free_pages = list(range(self.page_count - 1, -1, -1))  # a stack: low ids first
        self.reserved: dict[int, int] = {}  # live sequence -> positions it may grow to
        self.length: dict[int, int] = {}  # live sequence -> positions cached
        self.pages: dict[int, list[int]] = {}  # live sequence -> its pages, in position order
        self._pools: dict[int, KV] = {}  # layer_idx -> (K, V) [page_count + 1, PAGE, H, Dh]
        # page -> its index in its sequence's page list, on the device (flex attention's map from a
        # pool slot to a position; a page keeps its index while owned, so it is written at prefill).
        self.page_index = torch.zeros(self.page_count + 1, dtype=torch.int64, device=self.device)

    # -- accounting --------------------------------------------------------------------------------

    @property
    def seqs(self) -> dict[int, int]:
        """Live sequences (-> cached positions)."""
        return self.length

    @property
    def reserved_tokens(self) -> int:
        return sum(self.reserved.values())

    @property
    def held_tokens(self) -> int:
        return sum(self.length.values())

    def fits(self, reserve: int) -> bool:
        return self.fits_all([reserve])

    def fits_all(self, reserves: Sequence[int]) -> bool:
        return sum(pages_for(r) for r in reserves) <= len(self._free_pages)

    def free(self, seq_ids: Sequence[int]) -> None:
        for s in {int(s) for s in seq_ids} & set(self.length):
            self._free_pages.extend(reversed(self.pages.pop(s)))
            del self.reserved[s], self.length[s]

    def pool(self, layer_idx: int, like: torch.Tensor) -> KV:
        """Layer `layer_idx`'s pools, allocated on first use for the whole budget (a key [B, H, T, Dh]
        gives heads, head size, dtype and device)."""
        return self.pools_for(layer_idx, like.shape[1], like.shape[3], like.dtype, like.device)

    def pools_for(self, layer_idx: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> KV:
        """Layer `layer_idx`'s pools [pages + 1, PAGE, heads, head_dim], allocated on first use."""
        pools = self._pools.get(layer_idx)
        if pools is None:
            shape = (self.page_count + 1, PAGE_TOKENS, heads, head_dim)
            pools = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            self._pools[layer_idx] = pools
        return pools

    def pools_of(self, layer_idx: int) -> KV | None:
        """Layer `layer_idx`'s pools if allocated (they are once a prefill ran)."""
        return self._pools.get(layer_idx)

    # -- micro-batches -----------------------------------------------------------------------------

    def prefill(self, seq_ids: Sequence[int], lengths: Sequence[int], reserves: Sequence[int],
                starts: Sequence[int] = ()) -> PagedBatch:
        """A prefill micro-batch: row i caches `lengths[i]` positions from `starts[i]` (default 0).
        A row starting at 0 is admitted (its reservation's pages taken); a later chunk of a prompt
        continues a live sequence that has exactly `starts[i]` positions cached."""
        starts = list(starts) or [0] * len(seq_ids)
        self.admit(seq_ids, lengths, reserves, starts)
        batch = PagedBatch(self, decoding=False, lengths=lengths, starts=starts)
        batch._prefill_index(seq_ids)
        return batch

    def admit(self, seq_ids: Sequence[int], lengths: Sequence[int], reserves: Sequence[int],
              starts: Sequence[int]) -> None:
        """`prefill`'s checks and page allocation (a static batch is loaded separately)."""
        new = []
        for s, n, r, a in zip(seq_ids, lengths, reserves, starts, strict=True):
            if a == 0 and s in self.length:
                raise ValueError(f"sequence {s} is already cached here")
            if a and self.length.get(s) != a:
                raise ValueError(f"sequence {s}: a chunk from position {a}, but {self.length.get(s, 0)} "
                                 f"positions are cached")
            reserved = r if a == 0 else self.reserved[s]
            if a + n > reserved:
                raise ValueError(f"sequence {s}: prompt of {a + n} tokens exceeds its reservation of {reserved}")
            if a == 0:
                new.append((s, r))
        if not self.fits_all([r for _, r in new]):
            raise MemoryError(f"KV budget exceeded: {len(self._free_pages)} of {self.page_count} pages free, "
                              f"{sum(pages_for(r) for _, r in new)} more asked")
        for s, r in new:
            self.reserved[s], self.length[s] = r, 0
            self.pages[s] = [self._free_pages.pop() for _ in range(pages_for(r))]
        owned = [(p, j) for s, _ in new for j, p in enumerate(self.pages[s])]
        if owned:
            pages, index = to_device_no_sync(torch.tensor(owned, dtype=torch.int64).T.contiguous(), self.device)
            self.page_index[pages] = index

    def page_table(self, owned: Sequence[Sequence[int]], rows: int, width: int) -> np.ndarray:
        """[rows, width] page ids: row i lists `owned[i]`, the rest is the scratch page. Filled in
        numpy, row by row: half the host time of a tensor built from nested lists (64 rows x 16
        pages: 0.11 vs 0.20 ms on the dev VM), paid on every decode step."""
        table = np.full((rows, width), self.scratch_page, dtype=np.int64)
        for i, pages in enumerate(owned):
            table[i, :len(pages)] = pages
        return table

    def check_decode(self, seq_ids: Sequence[int]) -> None:
        """Every one of these sequences has room for one more position (its reservation)."""
        for s in seq_ids:
            if self.length[s] + 1 > self.reserved[s]:
                raise ValueError(f"sequence {s} would grow past its reservation of {self.reserved[s]} tokens")

    def decode(self, seq_ids: Sequence[int], attention: str = "torch") -> PagedBatch:
        """A decode batch of exactly these sequences (width: their longest page list)."""
        batch = PagedBatch(self, decoding=True, lengths=[], attention=attention)
        batch.load(seq_ids)
        return batch

    def store(self, seq_ids: Sequence[int], kv: PagedBatch) -> None:
        """The layers wrote the step's keys and values into the pages; count the positions."""
        if kv.decoding:
            for s, n in zip(seq_ids, kv.lengths, strict=True):
                self.length[s] = n + 1
            return
        for s, n, a in zip(seq_ids, kv.lengths, kv.starts, strict=True):
            self.length[s] = a + n
