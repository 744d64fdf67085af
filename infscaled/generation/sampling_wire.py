"""Sampling parameters and log-probabilities as tensors of the generation data plane's messages.

The dispatcher puts each sequence's SamplingParams (and its prompt, which penalties and prompt
log-probabilities read) into its prefill; the last stage reads them back (`params_at`) and puts
the log-probabilities it computed into its token messages (`token_tensors`), which the
dispatcher turns back into `Sampled` / `PromptLogprobs` (`reported_at`). Rows that asked for
nothing cost nothing: the extra tensors are left out when no row needs them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from infscaled.generation.params import PromptLogprobs, Sampled, SamplingParams

# Columns of a prefill's "gen_params" row (float64; -1 = none for seed / logprobs counts), then
# the logit_bias pairs (token id, bias; id -1 = padding). A message holds at most 8 tensors
# (protocol/wire.py), so the bias shares this one.
PARAM_COLUMNS = ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "min_p", "min_tokens", "logprobs", "prompt_logprobs")
# Per-row tensors of a prefill that travel with it down the chain.
PREFILL_KEYS = ("gen_params", "stop_ids", "prompt_ids")
# Keys of a token message carrying log-probabilities (absent when no row asked): "logprob"
# [n, 1 + K] is the chosen token's then its K alternatives', "top_ids" [n, K] their ids; the
# prompt's are the same per position, [n, L, 1 + K] and [n, L, K].
LOGPROB_KEYS = ("logprob", "top_ids", "prompt_logprob", "prompt_top_ids")


def _none(value: int | None) -> float:
    return -1.0 if value is None else float(value)


def _padded(rows: Sequence[Sequence[float]], width: int, fill: float, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), max(1, width)), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            out[i, :len(row)] = torch.tensor(list(row), dtype=dtype)
    return out


def prefill_tensors(params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """The sampling tensors of a prefill of len(params) sequences: gen_params [n, 11 + 2B] (the
    columns, then B (id, bias) pairs), stop_ids [n, S], prompt_ids [n, T] (-1 = padding; [n, 1]
    of -1 when no row needs its prompt at the last stage)."""
    rows = [[p.temperature, p.top_p, float(p.top_k), _none(p.seed), p.presence_penalty, p.frequency_penalty,
             p.repetition_penalty, p.min_p, float(p.min_tokens), _none(p.logprobs), _none(p.prompt_logprobs),
             *(x for token, b in p.logit_bias for x in (float(token), b))] for p in params]
    wanted = [list(prompt) if p.repetition_penalty != 1.0 or p.prompt_logprobs is not None else []
              for p, prompt in zip(params, prompts, strict=True)]
    return {"gen_params": _padded(rows, max(len(r) for r in rows), -1.0, torch.float64),
            "stop_ids": _padded([p.stop_token_ids for p in params], max(len(p.stop_token_ids) for p in params), -1,
                                torch.int64),
            "prompt_ids": _padded(wanted, max(len(w) for w in wanted), -1, torch.int64)}


def params_at(t: dict[str, torch.Tensor], i: int, max_new_tokens: int) -> tuple[SamplingParams, list[int]]:
    """Row i of a prefill's sampling tensors -> (SamplingParams, prompt ids the last stage needs)."""
    values = t["gen_params"][i].tolist()
    row = dict(zip(PARAM_COLUMNS, values, strict=False))
    seed, logprobs, prompt_lp = int(row["seed"]), int(row["logprobs"]), int(row["prompt_logprobs"])
    pairs = values[len(PARAM_COLUMNS):]
    bias = [(int(pairs[j]), pairs[j + 1]) for j in range(0, len(pairs) - 1, 2) if pairs[j] >= 0]
    prompt = [x for x in t["prompt_ids"][i].tolist() if x >= 0] if "prompt_ids" in t else []
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=row["temperature"], top_p=row["top_p"], top_k=int(row["top_k"]),
        seed=None if seed < 0 else seed, stop_token_ids=tuple(x for x in t["stop_ids"][i].tolist() if x >= 0),
        presence_penalty=row["presence_penalty"], frequency_penalty=row["frequency_penalty"],
        repetition_penalty=row["repetition_penalty"], logit_bias=tuple(bias), min_p=row["min_p"],
        min_tokens=int(row["min_tokens"]), logprobs=None if logprobs < 0 else logprobs,
        prompt_logprobs=None if prompt_lp < 0 else prompt_lp)
    return params, prompt


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
