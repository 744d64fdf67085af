"""KV caches of one stage for generation: one cache per live sequence, batched per micro-batch.

Each stage keeps, for every sequence it serves, the keys and values of its own layers only:
`SequenceCache.layers[layer_idx] = (K, V)`, each [kv_heads, length, head_dim]. A micro-batch
of sequences gets a `BatchKV`, the object transformers' attention layers call `update` on:

- prefill (a new sequence's prompt, right-padded to the batch's longest): no past; the layers'
  keys and values [B, H, T, Dh] are kept, and each row's first `length` positions stored.
- decode (one new token per sequence): each row's past is left-padded to the batch's longest
  past Lmax, so every row's new token sits at index Lmax; `decode_mask` hides the padding.
  After the step each row keeps its last length + 1 positions.

Assembling and splitting copies each row's cache once per step. That is simple and exact;
a slot-based paged cache would avoid the copies (see docs/generation.md).

The budget is in tokens: a sequence reserves prompt + max_new_tokens positions when admitted,
so a stage never holds more than `budget_tokens` positions of cache, whatever the sequences do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Block:
    """The caches of some sequences as one batch: row i of every layer's (K, V) [B, H, width, Dh]
    holds sequence seqs[i]'s lengths[i] positions, right-aligned (left padding before them)."""

    seqs: list[int]
    lengths: list[int]
    layers: dict[int, KV] = field(default_factory=dict)

    def row(self, i: int) -> Block:
        """Row i alone, copied out (its own memory, no padding)."""
        n = self.lengths[i]
        return Block([self.seqs[i]], [n], {layer: (k[i:i + 1, :, k.shape[2] - n:].clone(),
                                                   v[i:i + 1, :, v.shape[2] - n:].clone())
                                           for layer, (k, v) in self.layers.items()})


class BatchKV:
    """The cache transformers' attention sees for one micro-batch (duck-types `Cache.update`)."""

    def __init__(self, lengths: Sequence[int], past: dict[int, KV] | None, decoding: bool) -> None:
        self.lengths = list(lengths)  # per row: prefill: real prompt length; decode: cached length
        self.past = past or {}
        self.decoding = decoding
        self.out: dict[int, KV] = {}  # layer_idx -> the layer's full keys and values after update
        self._masks: dict[str, torch.Tensor] = {}

    @property
    def past_len(self) -> int:
        return max(self.lengths) if self.decoding and self.lengths else 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> KV:
        past = self.past.get(layer_idx)
        if past is not None:
            key = torch.cat([past[0], key], dim=2)  # [B, H, Lmax + 1, Dh]
            value = torch.cat([past[1], value], dim=2)
        self.out[layer_idx] = (key, value)
        return key, value

    def decode_mask(self, kind: str, config: Any, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [B, 1, 1, Lmax + 1] for a decode step: row i sees its own cached positions
        (the last L_i of the Lmax padded ones) and its new token; a sliding-window layer only the
        positions within the window."""
        if kind not in self._masks:
            device = next(iter(self.past.values()))[0].device if self.past else torch.device("cpu")
            lmax = self.past_len
            lengths = torch.tensor(self.lengths, device=device).unsqueeze(1)  # [B, 1]
            j = torch.arange(lmax + 1, device=device).unsqueeze(0)  # [1, Lmax + 1]
            position = j - (lmax - lengths)  # each key's position in its own sequence (< 0: padding)
            allowed = position >= 0
            window = getattr(config, "sliding_window", None)
            if kind == "sliding_attention" and window:
                allowed &= position > lengths - window  # the new token sits at position L_i
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
            self._masks[kind] = mask[:, None, None, :]
        return self._masks[kind]


class StageKV:
    """Every live sequence's cache at one stage, within a token budget.

    Caches live in blocks: after a decode step the micro-batch's keys and values stay together as
    one block, so when the same sequences decode together again (the steady state: stage 0 keeps
    its groups) the block is the next step's past as is, with no copy but transformers' own
    concatenation of the new position. A block is broken into single-sequence blocks (one copy
    per row) only when its group changes: a member finishes, is cancelled, or is batched with
    others.
    """

    def __init__(self, budget_tokens: int) -> None:
        if budget_tokens < 1:
            raise ValueError(f"KV budget must be >= 1 token, got {budget_tokens}")
        self.budget_tokens = budget_tokens
        self.reserved: dict[int, int] = {}  # live sequence -> positions it may grow to
        self.length: dict[int, int] = {}  # live sequence -> positions cached
        self._block: dict[int, Block] = {}  # live sequence -> the block holding its cache

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
        return self.reserved_tokens + reserve <= self.budget_tokens

    def free(self, seq_ids: Sequence[int]) -> None:
        gone = {int(s) for s in seq_ids} & set(self.length)
        for s in gone:
            self._split(s, keep=False)
            del self.reserved[s], self.length[s]

    def _split(self, seq: int, keep: bool = True) -> None:
        """Break the block holding `seq` into single-sequence blocks (a copy of each row that
        stays); `keep=False` drops `seq`'s own row."""
        block = self._block.get(seq)
        if block is None:
            return
        if len(block.seqs) == 1:
            if not keep:
                del self._block[seq]
            return
        for i, other in enumerate(block.seqs):
            if self._block.get(other) is not block:
                continue
            if other == seq and not keep:
                del self._block[other]
            else:
                self._block[other] = block.row(i)

    # -- micro-batches -----------------------------------------------------------------------------

    def prefill(self, seq_ids: Sequence[int], lengths: Sequence[int], reserves: Sequence[int]) -> BatchKV:
        for s, n, r in zip(seq_ids, lengths, reserves, strict=True):
            if s in self.length:
                raise ValueError(f"sequence {s} is already cached here")
            if n > r:
                raise ValueError(f"sequence {s}: prompt of {n} tokens exceeds its reservation of {r}")
        need = sum(reserves)
        if not self.fits(need):
            raise MemoryError(f"KV budget exceeded: {self.reserved_tokens} of {self.budget_tokens} tokens reserved, "
                              f"{need} more asked")
        for s, r in zip(seq_ids, reserves, strict=True):
            self.reserved[s], self.length[s] = r, 0
        return BatchKV(lengths, None, decoding=False)

    def decode(self, seq_ids: Sequence[int]) -> BatchKV:
        """The past of these sequences, left-padded to the longest: layer -> (K, V) [B, H, Lmax, Dh]."""
        seqs = list(seq_ids)
        for s in seqs:
            if self.length[s] + 1 > self.reserved[s]:
                raise ValueError(f"sequence {s} would grow past its reservation of {self.reserved[s]} tokens")
        block = self._block.get(seqs[0])
        if block is not None and block.seqs == seqs:
            return BatchKV(list(block.lengths), block.layers, decoding=True)  # the group as it was
        for s in seqs:
            self._split(s)  # each of them now has a block of its own
        rows = [self._block[s] for s in seqs]
        lengths = [r.lengths[0] for r in rows]
        lmax = max(lengths)
        past: dict[int, KV] = {}
        for layer in rows[0].layers:
            k0, v0 = rows[0].layers[layer]
            keys = k0.new_zeros((len(rows), k0.shape[1], lmax, k0.shape[3]))
            values = v0.new_zeros((len(rows), v0.shape[1], lmax, v0.shape[3]))
            for i, r in enumerate(rows):
                k, v = r.layers[layer]
                keys[i, :, lmax - lengths[i]:] = k[0]
                values[i, :, lmax - lengths[i]:] = v[0]
            past[layer] = (keys, values)
        return BatchKV(lengths, past, decoding=True)

    def store(self, seq_ids: Sequence[int], kv: BatchKV) -> None:
        """Keep what the layers produced: a decode step's batch as one block; a prefill's rows
        (right-padded) each as its own block of its real positions."""
        seqs = list(seq_ids)
        if kv.decoding:
            block = Block(seqs, [n + 1 for n in kv.lengths], kv.out)
            for s, n in zip(seqs, block.lengths, strict=True):
                self._block[s], self.length[s] = block, n
            return
        for i, s in enumerate(seqs):
            n = kv.lengths[i]
            self._block[s] = Block([s], [n], {layer: (k[i:i + 1, :, :n].clone(), v[i:i + 1, :, :n].clone())
                                              for layer, (k, v) in kv.out.items()})
            self.length[s] = n
