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
class SequenceCache:
    length: int  # positions cached
    reserved: int  # positions this sequence may grow to (prompt + max_new_tokens)
    layers: dict[int, KV] = field(default_factory=dict)  # layer_idx -> (K, V) [H, length, Dh]


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
    """Every live sequence's cache at one stage, within a token budget."""

    def __init__(self, budget_tokens: int) -> None:
        if budget_tokens < 1:
            raise ValueError(f"KV budget must be >= 1 token, got {budget_tokens}")
        self.budget_tokens = budget_tokens
        self.seqs: dict[int, SequenceCache] = {}

    # -- accounting --------------------------------------------------------------------------------

    @property
    def reserved_tokens(self) -> int:
        return sum(s.reserved for s in self.seqs.values())

    @property
    def held_tokens(self) -> int:
        return sum(s.length for s in self.seqs.values())

    def fits(self, reserve: int) -> bool:
        return self.reserved_tokens + reserve <= self.budget_tokens

    def free(self, seq_ids: Sequence[int]) -> None:
        for s in seq_ids:
            self.seqs.pop(int(s), None)

    # -- micro-batches -----------------------------------------------------------------------------

    def prefill(self, seq_ids: Sequence[int], lengths: Sequence[int], reserves: Sequence[int]) -> BatchKV:
        for s, n, r in zip(seq_ids, lengths, reserves, strict=True):
            if s in self.seqs:
                raise ValueError(f"sequence {s} is already cached here")
            if n > r:
                raise ValueError(f"sequence {s}: prompt of {n} tokens exceeds its reservation of {r}")
        need = sum(reserves)
        if not self.fits(need):
            raise MemoryError(f"KV budget exceeded: {self.reserved_tokens} of {self.budget_tokens} tokens reserved, "
                              f"{need} more asked")
        for s, r in zip(seq_ids, reserves, strict=True):
            self.seqs[s] = SequenceCache(0, r)
        return BatchKV(lengths, None, decoding=False)

    def decode(self, seq_ids: Sequence[int]) -> BatchKV:
        """The left-padded past of these sequences: layer -> (K, V) [B, H, Lmax, Dh]."""
        caches = [self.seqs[s] for s in seq_ids]
        for s, c in zip(seq_ids, caches, strict=True):
            if c.length + 1 > c.reserved:
                raise ValueError(f"sequence {s} would grow past its reservation of {c.reserved} tokens")
        lengths = [c.length for c in caches]
        lmax = max(lengths)
        past: dict[int, KV] = {}
        for layer in caches[0].layers:
            k0, v0 = caches[0].layers[layer]
            heads, dim = k0.shape[0], k0.shape[2]
            keys = k0.new_zeros((len(caches), heads, lmax, dim))
            values = v0.new_zeros((len(caches), heads, lmax, dim))
            for i, c in enumerate(caches):
                k, v = c.layers[layer]
                keys[i, :, lmax - c.length:] = k
                values[i, :, lmax - c.length:] = v
            past[layer] = (keys, values)
        return BatchKV(lengths, past, decoding=True)

    def store(self, seq_ids: Sequence[int], kv: BatchKV) -> None:
        """Keep each row's real positions of what the layers produced."""
        lmax = kv.past_len
        for i, s in enumerate(seq_ids):
            cache = self.seqs[s]
            if kv.decoding:
                first, length = lmax - kv.lengths[i], kv.lengths[i] + 1
            else:
                first, length = 0, kv.lengths[i]
            cache.layers = {layer: (k[i, :, first:first + length].clone(), v[i, :, first:first + length].clone())
                            for layer, (k, v) in kv.out.items()}
            cache.length = length
