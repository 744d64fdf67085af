"""Next-token sampling on the last stage: greedy, temperature, top-k, top-p, per-sequence seeds.

`sample_next` is on the decode hot path: it filters every row at once with per-row parameter
tensors and draws with the exponential race (argmax of p_i / E_i with E_i ~ Exp(1) picks i with
probability p_i), the noise of each row coming from that row's own generator. So a seeded
sequence gets the same tokens whatever else is in its batch, and there is no `.item()` or other
host sync: the result stays on the logits' device.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from infscaled.generation.params import SamplingParams, parse_sampling

__all__ = ["SamplingParams", "make_generator", "parse_sampling", "sample_next"]

# Noise is clamped away from 0 so p / E stays finite (exponential_ is > 0 in theory, not in floats).
_TINY = 1e-20


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator for one sequence on `device`: seeded with `seed`, or from the OS when None."""
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63) if seed is None else seed)
    return gen


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One next token per row. logits: [n, V] (any float dtype) -> LongTensor [n], same device.

    Rows with temperature 0 take the argmax; the others are scaled by 1 / temperature, cut to
    the top_k most likely tokens (0 = no cut), then to the smallest set whose probability reaches
    top_p (at least one token), and drawn with the row's generator (None: the global RNG).
    """
    n, vocab = logits.shape
    assert len(params) == n == len(generators), (logits.shape, len(params), len(generators))
    greedy = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled_rows:
        return greedy
    device = logits.device
    rows = torch.tensor(sampled_rows, device=device)
    chosen = [params[i] for i in sampled_rows]
    temps = torch.tensor([p.temperature for p in chosen], device=device, dtype=torch.float32)
    x = logits.index_select(0, rows).float() / temps[:, None]  # x: [m, V]
    probs = _filtered_probs(x, chosen, vocab)
    noise = torch.empty_like(probs)
    for j, i in enumerate(sampled_rows):
        gen = generators[i]
        noise[j].exponential_(generator=gen)
    drawn = (probs / noise.clamp_min_(_TINY)).argmax(dim=-1)
    return greedy.index_copy(0, rows, drawn)


def _filtered_probs(x: torch.Tensor, params: Sequence[SamplingParams], vocab: int) -> torch.Tensor:
    """Softmax of x [m, V] after each row's top-k and top-p cuts (cut tokens get probability 0)."""
    need_k = any(0 < p.top_k < vocab for p in params)
    need_p = any(p.top_p < 1.0 for p in params)
    if not (need_k or need_p):
        return torch.softmax(x, dim=-1)
    device = x.device
    sorted_x, order = x.sort(dim=-1, descending=True)  # both [m, V]
    ranks = torch.arange(vocab, device=device)[None, :]
    drop = torch.zeros_like(sorted_x, dtype=torch.bool)
    if need_k:
        ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
        drop |= ranks >= ks[:, None]
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    if need_p:
        top_ps = torch.tensor([p.top_p for p in params], device=device, dtype=torch.float32)
        sorted_probs = torch.softmax(sorted_x, dim=-1)
        # A token is kept while the mass before it is below top_p: the first one always is.
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= before >= top_ps[:, None]
        drop[:, 0] = False
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(x, float("-inf")).scatter_(-1, order, sorted_x)
    return torch.softmax(filtered, dim=-1)
