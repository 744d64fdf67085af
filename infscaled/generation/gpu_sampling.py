"""Next-token sampling that never blocks the host: tokens made on the logits' device, copied back
asynchronously into pinned memory.

`sample_async(logits, params, generators)` computes exactly what `sampling.sample_next` computes
(greedy rows by argmax; sampled rows scaled by 1 / temperature, cut by top-k then top-p, drawn by
the exponential race with each row's own generator: same seed, same tokens, whatever the batch),
but every per-row parameter goes to the device from pinned memory with a non-blocking copy (a
`torch.tensor(list, device=cuda)` copies from pageable memory, which synchronises the stream),
and the tokens come back the same way, followed by an event. It returns at once with a
`PendingTokens`: `device` (the tokens, for a next step's input on the GPU) and `tokens()`, which
waits for that event only and returns the host list. A caller that prepares its next step before
calling `tokens()` overlaps that work with the GPU's; nothing here calls `.item()`, `.tolist()`
on a device tensor or a blocking copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from infscaled.generation.kv import pinned
from infscaled.generation.sampling import SamplingParams

_TINY = 1e-20  # as sampling.py: noise clamped away from 0 so p / E stays finite


@dataclass
class PendingTokens:
    """Tokens on their way to the host: `device` [n] now, `tokens()` once the copy has landed."""

    device: torch.Tensor
    host: torch.Tensor  # pinned [n] int64, written by the asynchronous copy
    event: Any  # torch.cuda.Event recorded after the copy; None on the CPU

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())

    def tokens(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()  # this copy only, not the device
        out: list[int] = self.host.tolist()
        return out


def sample_async(logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None]) -> PendingTokens:
    """One next token per row of logits [n, V] (see the module docstring)."""
    tokens = sample_on_device(logits, params, generators)
    if tokens.device.type != "cuda":
        return PendingTokens(tokens, tokens, None)
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(tokens.device))
    return PendingTokens(tokens, host, event)


def sample_on_device(logits: torch.Tensor, params: Sequence[SamplingParams],
                     generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """sample_next's tokens [n] on the logits' device, with no host sync."""
    n, vocab = logits.shape
    assert len(params) == n == len(generators), (logits.shape, len(params), len(generators))
    greedy = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return greedy
    device = logits.device
    chosen = [params[i] for i in rows]

    def to_device(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
        host = pinned(torch.tensor(values, dtype=dtype))
        return host.to(device, non_blocking=True)

    index = to_device(rows, torch.int64)
    temps = to_device([p.temperature for p in chosen], torch.float32)
    x = logits.index_select(0, index).float() / temps[:, None]  # [m, V]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in chosen]
    top_ps = [p.top_p for p in chosen]
    probs = filtered_probs(x, to_device(ks, torch.int64) if min(ks) < vocab else None,
                           to_device(top_ps, torch.float32) if min(top_ps) < 1.0 else None)
    noise = torch.empty_like(probs)
    for j, i in enumerate(rows):
        noise[j].exponential_(generator=generators[i])  # each row's own stream of randomness
    drawn = (probs / noise.clamp_min_(_TINY)).argmax(dim=-1)
    return greedy.index_copy(0, index, drawn)


def filtered_probs(x: torch.Tensor, ks: torch.Tensor | None, top_ps: torch.Tensor | None) -> torch.Tensor:
    """Softmax of x [m, V] after per-row top-k (ks [m], vocab = no cut) and top-p (top_ps [m])
    cuts, cut tokens getting probability 0: sampling.py's rule, from device tensors."""
    if ks is None and top_ps is None:
        return torch.softmax(x, dim=-1)
    vocab = x.shape[-1]
    sorted_x, order = x.sort(dim=-1, descending=True)  # both [m, V]
    ranks = torch.arange(vocab, device=x.device)[None, :]
    drop = torch.zeros_like(sorted_x, dtype=torch.bool)
    if ks is not None:
        drop |= ranks >= ks[:, None]
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    if top_ps is not None:
        sorted_probs = torch.softmax(sorted_x, dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass ahead of each token
        drop |= before >= top_ps[:, None]
        drop[:, 0] = False  # the most likely token always stays
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.softmax(torch.full_like(x, float("-inf")).scatter_(-1, order, sorted_x), dim=-1)
