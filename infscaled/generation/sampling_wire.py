"""Log-probabilities as tensors of the generation plane's TOKENS messages (engine/genwire.py).

The sampling parameters travel in a prefill's sequence specs (protocol/generation.py); the last
stage puts the log-probabilities it computed into its token messages (`token_tensors`), which
the dispatcher turns back into `Sampled` / `PromptLogprobs` (`reported_at`). Rows that asked for
nothing cost nothing: the tensors are left out when no row needs them, and a TOKENS message
stays within the wire's 8 tensors (3 of its own, at most 4 of these).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from infscaled.generation.params import PromptLogprobs, Sampled

# Keys of a token message carrying log-probabilities (absent when no row asked): "logprob"
# [n, 1 + K] is the chosen token's then its K alternatives', "top_ids" [n, K] their ids; the
# prompt's are the same per position, [n, L, 1 + K] and [n, L, K].
LOGPROB_KEYS = ("logprob", "top_ids", "prompt_logprob", "prompt_top_ids")


def _padded(rows: Sequence[Sequence[float]], width: int, fill: float, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), max(1, width)), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            out[i, :len(row)] = torch.tensor(list(row), dtype=dtype)
    return out


def token_tensors(reported: Sequence[Sampled | None],
                  prompts: Sequence[PromptLogprobs | None] = ()) -> dict[str, torch.Tensor]:
    """The log-probability tensors of a token message (n rows): {} when no row has any."""
    out: dict[str, torch.Tensor] = {}
    if any(r is not None for r in reported):
        k = max(len(r.top) for r in reported if r is not None)
        out["logprob"] = _padded([[r.logprob, *(lp for _, lp in r.top)] if r else [math.nan] for r in reported],
                                 1 + k, math.nan, torch.float64)
        out["top_ids"] = _padded([[tok for tok, _ in r.top] if r else [] for r in reported], k, -1, torch.int64)
    if any(p is not None for p in prompts):
        length = max(1, max(len(p.logprobs) for p in prompts if p is not None))
        k = max((len(top) for p in prompts if p is not None for top in p.top), default=0)
        lp = torch.full((len(prompts), length, 1 + k), math.nan, dtype=torch.float64)
        ids = torch.full((len(prompts), length, max(1, k)), -1, dtype=torch.int64)
        for i, p in enumerate(prompts):
            for j, (value, top) in enumerate(zip(p.logprobs, p.top, strict=True) if p is not None else ()):
                lp[i, j, 0] = value
                for m, (token, alt) in enumerate(top):
                    ids[i, j, m], lp[i, j, 1 + m] = token, alt
        out.update(prompt_logprob=lp, prompt_top_ids=ids)
    return out


def _top(ids: list[int], values: list[float]) -> tuple[tuple[int, float], ...]:
    return tuple((int(tok), lp) for tok, lp in zip(ids, values, strict=False) if tok >= 0)


def reported_at(t: dict[str, torch.Tensor], i: int, token: int) -> list[Sampled | PromptLogprobs]:
    """What row i of a token message reports beyond its token: its prompt's log-probabilities
    (first token only) and the token's own, in the order a backend yields them."""
    out: list[Sampled | PromptLogprobs] = []
    if "prompt_logprob" in t:
        rows = [r for r in t["prompt_logprob"][i].tolist() if not math.isnan(r[0])]
        if rows:
            ids = t["prompt_top_ids"][i].tolist()
            out.append(PromptLogprobs(tuple(r[0] for r in rows), tuple(_top(ids[j], rows[j][1:])
                                                                       for j in range(len(rows)))))
    if "logprob" in t:
        row = t["logprob"][i].tolist()
        if not math.isnan(row[0]):
            out.append(Sampled(token, row[0], _top(t["top_ids"][i].tolist(), row[1:])))
    return out
