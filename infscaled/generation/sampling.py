"""Next-token sampling on the last stage: greedy, temperature, top-k, top-p, min-p, penalties,
logit bias, min_tokens, per-sequence seeds, and the log-probabilities clients ask for.

`sample_next` is on the decode hot path: it filters every row at once with per-row parameter
tensors and draws with the exponential race (argmax of p_i / E_i with E_i ~ Exp(1) picks i with
probability p_i), the noise of each row coming from that row's own generator. So a seeded
sequence gets the same tokens whatever else is in its batch, and there is no `.item()` or other
host sync: the result stays on the logits' device.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from infscaled.generation.params import PromptLogprobs, Sampled, SamplingParams, parse_sampling
from infscaled.protocol.generation import SequenceSpec

__all__ = ["SamplingParams", "SequenceSampling", "TokenLogprobs", "make_generator", "parse_sampling", "plain",
           "process_logits", "prompt_logprobs", "resume_sampling", "sample_next", "sample_step", "skip_draws",
           "token_logprobs"]

# Noise is clamped away from 0 so p / E stays finite (exponential_ is > 0 in theory, not in floats).
_TINY = 1e-20


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator for one sequence on `device`: seeded with `seed`, or from the OS when None."""
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63) if seed is None else seed)
    return gen


def skip_draws(generator: torch.Generator, draws: int, vocab: int) -> None:
    """Advance `generator` past the noise of `draws` earlier sampling steps over a vocabulary of
    `vocab`: a seeded sequence continued elsewhere (replayed after its chain died) then draws
    exactly what it would have drawn had it never moved. Every step of a sampled row draws one
    float32 row of `vocab` exponentials from its generator (sample_next, gpu_sampling), and
    nothing else does, so the state after k steps is a pure function of (seed, k, vocab); the
    draws are repeated one row at a time, as they were made (a CUDA generator's offset grows
    per call, not per element)."""
    row = torch.empty(vocab, dtype=torch.float32, device=generator.device)
    for _ in range(draws):
        row.exponential_(generator=generator)


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams],
                   outputs: Sequence[Sequence[int]] | None = None,
                   prompts: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """The logits each row's parameters ask for, before temperature: logit_bias added, the stop
    ids (eos included) masked while fewer than min_tokens were generated, then the repetition
    penalty (prompt and output tokens: positive logits divided by it, negative multiplied) and
    the presence / frequency penalties (output tokens: minus presence once, minus frequency per
    occurrence). logits: [n, V] -> float32 [n, V]; the input is returned as it is when no row
    asks for anything. `outputs[i]` / `prompts[i]`: row i's generated / prompt ids so far."""
    rows = [i for i, p in enumerate(params) if p.logit_bias or p.needs_history]
    if not rows:
        return logits
    x = logits.float().clone()
    device, vocab = x.device, x.shape[-1]
    for i in rows:
        p = params[i]
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias, strict=True)
            x[i, torch.tensor(ids, device=device)] += torch.tensor(bias, device=device)
        if not p.needs_history:
            continue
        out_ids = list(outputs[i]) if outputs is not None else []
        if len(out_ids) < p.min_tokens and p.stop_token_ids:
            x[i, torch.tensor(p.stop_token_ids, device=device)] = float("-inf")
        counts = torch.zeros(vocab, device=device)
        if out_ids:
            counts.index_add_(0, torch.tensor(out_ids, device=device), torch.ones(len(out_ids), device=device))
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            if prompts is not None and len(prompts[i]):
                seen[torch.tensor(list(prompts[i]), device=device)] = True
            row = x[i]
            x[i] = torch.where(seen, torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty), row)
        if p.frequency_penalty or p.presence_penalty:
            x[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return x


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None], *, outputs: Sequence[Sequence[int]] | None = None,
                prompts: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """One next token per row. logits: [n, V] (any float dtype) -> LongTensor [n], same device.

    The logits first go through `process_logits` (logit_bias, min_tokens, penalties; `outputs`
    and `prompts` are the rows' tokens so far, needed only by rows with penalties or
    min_tokens). Rows with temperature 0 then take the argmax; the others are scaled by
    1 / temperature, cut to the top_k most likely tokens (0 = no cut), to the tokens at least
    min_p times as likely as the most likely one, to the smallest set whose probability reaches
    top_p (at least one token), and drawn with the row's generator (None: the global RNG).
    """
    n, vocab = logits.shape
    assert len(params) == n == len(generators), (logits.shape, len(params), len(generators))
    logits = process_logits(logits, params, outputs, prompts)
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


class TokenLogprobs(NamedTuple):
    """Log-probabilities of chosen tokens under the model (log-softmax of its raw logits), and
    the k most likely alternatives of each, best first."""

    chosen: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], k: int) -> TokenLogprobs:
    """logits: [n, V] (row i predicts tokens[i]) -> TokenLogprobs of n rows with k alternatives.
    The model's own distribution, before temperature and penalties (what lm-eval scores). Syncs
    with the host: call it only for rows that asked for log-probabilities."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    index = torch.tensor(list(tokens), device=logits.device)
    chosen = logp.gather(1, index[:, None])[:, 0].tolist()
    if k <= 0:
        return TokenLogprobs(chosen, [[] for _ in tokens], [[] for _ in tokens])
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return TokenLogprobs(chosen, top.indices.tolist(), top.values.tolist())


def _filtered_probs(x: torch.Tensor, params: Sequence[SamplingParams], vocab: int) -> torch.Tensor:
    """Softmax of x [m, V] after each row's top-k and top-p cuts (cut tokens get probability 0)."""
    need_k = any(0 < p.top_k < vocab for p in params)
    need_p = any(p.top_p < 1.0 for p in params)
    if any(p.min_p > 0 for p in params):
        # Relative to the most likely token: log p_i < log p_max + log min_p, on the scaled logits.
        min_ps = torch.tensor([p.min_p for p in params], device=x.device, dtype=torch.float32)
        floor = x.max(dim=-1, keepdim=True).values + torch.log(min_ps)[:, None]  # -inf where min_p = 0
        x = x.masked_fill(x < floor, float("-inf"))
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


@dataclass
class SequenceSampling:
    """What the last stage keeps to sample one sequence: its parameters, its own generator, and
    (for penalties and min_tokens) its prompt and the tokens generated so far."""

    params: SamplingParams
    generator: torch.Generator
    prompt: Sequence[int] = ()
    outputs: list[int] = field(default_factory=list)
    earlier: int = 0
    """Tokens generated before this state existed whose ids it was not given (a replayed sequence
    that no penalty reads): counted towards max_new_tokens only. A replayed sequence whose
    sampling reads its history gets those tokens in `outputs` instead."""
    ahead: int = 0
    """Tokens sampled on the device whose values are not in `outputs` yet (a one-stage chain runs
    a step ahead of the host: engine/programs/generation.py `_run_ahead`)."""

    @property
    def produced(self) -> int:
        return self.earlier + len(self.outputs)


def resume_sampling(spec: SequenceSpec, vocab: int, device: torch.device | str) -> SequenceSampling:
    """A sequence's sampling state at its prefill, from its spec alone. A replayed sequence
    (produced > 0, its chain died) gets the state it had: its seeded generator advanced past the
    draws of the tokens it produced (`skip_draws`; only sampled rows draw), and those tokens in
    `outputs` when its penalties or min_tokens read them, so it continues as if it never moved."""
    p = spec.sampling
    generator = make_generator(p.seed, device)
    if spec.produced and p.temperature > 0 and p.seed is not None:  # unseeded: any continuation will do
        skip_draws(generator, spec.produced, vocab)
    return SequenceSampling(p, generator, spec.prompt, list(spec.generated),
                            earlier=spec.produced - len(spec.generated))


def plain(params: Sequence[SamplingParams]) -> bool:
    """Whether every row needs only temperature / top-k / top-p / seed: what
    gpu_sampling.sample_async computes without a host sync; the others go through sample_step."""
    return not any(p.logit_bias or p.needs_history or p.min_p > 0 or p.logprobs is not None for p in params)


def sample_step(logits: torch.Tensor, states: Sequence[SequenceSampling]) -> tuple[list[int], list[Sampled | None]]:
    """The last stage's step for rows `states` (logits [n, V]): the next tokens, appended to each
    state's outputs, and for each row that asked for log-probabilities a `Sampled` (else None).
    Syncs with the host once (the tokens go back over the wire anyway)."""
    params = [s.params for s in states]
    history = any(p.needs_history for p in params)
    tokens = sample_next(logits, params, [s.generator for s in states],
                         outputs=[s.outputs for s in states] if history else None,
                         prompts=[s.prompt for s in states] if history else None).tolist()
    reported: list[Sampled | None] = [None] * len(states)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if rows:
        k = max(params[i].logprobs or 0 for i in rows)
        got = token_logprobs(logits[rows], [tokens[i] for i in rows], k)
        for j, i in enumerate(rows):
            keep = params[i].logprobs or 0
            reported[i] = Sampled(tokens[i], got.chosen[j],
                                  tuple(zip(got.top_ids[j][:keep], got.top_logprobs[j][:keep], strict=True)))
    for s, token in zip(states, tokens, strict=True):
        s.outputs.append(token)
    return tokens, reported


def prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int], k: int) -> PromptLogprobs:
    """A prefill's logits [T, V] (row t predicts prompt[t + 1]) -> PromptLogprobs of prompt[1:]."""
    got = token_logprobs(logits[:len(prompt) - 1], list(prompt[1:]), k)
    return PromptLogprobs(tuple(got.chosen), tuple(tuple(zip(ids, lps, strict=True))
                                                   for ids, lps in zip(got.top_ids, got.top_logprobs, strict=True)))
