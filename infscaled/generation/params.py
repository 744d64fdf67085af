"""Sampling parameters and their validation from OpenAI request fields (torch-free).

`sampling.py` re-exports both names next to the torch code that applies them; this module
stays importable without torch so the HTTP front end and the controller can use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from infscaled.generation.errors import RequestError

# OpenAI takes 4; vLLM any number, and lm-eval's local-completions sends a task's every `until`
# string plus the eos text (humaneval's: 6). The cap bounds the per-token stop-string scan.
MAX_STOP_STRINGS = 64
MAX_LOGPROBS = 20  # alternatives per token, OpenAI's limit for top_logprobs
MAX_LOGIT_BIAS = 300  # entries; OpenAI's limit
MAX_REPETITION_PENALTY = 10.0
# torch.Generator.manual_seed accepts this range.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its next tokens and when it ends."""

    max_new_tokens: int
    """Tokens to generate at most (the sequence ends with finish_reason "length" there)."""
    temperature: float = 1.0
    """Divides the logits before sampling; 0 means greedy (argmax), no randomness at all."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 = off."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability adds up to top_p; 1 = off."""
    seed: int | None = None
    """Seeds this sequence's own generator: the same seed gives the same tokens on any run and in
    any batch. None: unseeded."""
    stop_token_ids: tuple[int, ...] = ()
    """The sequence ends after producing one of these ids (not part of the returned text). The
    front end puts the tokenizer's eos here unless ignore_eos, so a backend needs no eos of its own."""
    stop: tuple[str, ...] = ()
    """Stop strings: the text ends before the first occurrence of any of them (front end only)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-text token (benchmarks with fixed output lengths)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated (OpenAI's; -2..2)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated (OpenAI's; -2..2)."""
    repetition_penalty: float = 1.0
    """Tokens of the prompt or the output: positive logits divided by it, negative multiplied
    (Hugging Face's / vLLM's; 1 = off)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling (-100..100)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's; 0 = off."""
    min_tokens: int = 0
    """The stop ids (eos included) cannot be sampled before this many tokens were generated."""
    logprobs: int | None = None
    """Report the chosen token's log-probability and this many most likely alternatives (0: the
    chosen one only); None: no log-probabilities."""
    prompt_logprobs: int | None = None
    """Report the log-probability of every prompt token after the first (and this many
    alternatives each); None: none."""

    def __post_init__(self) -> None:
        # From JSON (a prefill's specs) the pairs arrive as lists: keep the value hashable and equal.
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the tokens so far (penalties) or the count generated (min_tokens)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or self.min_tokens > 0)


def _bad(field: str, value: Any, allowed: str) -> RequestError:
    return RequestError(400, f"{field} = {value!r}: {allowed}", param=field)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: Mapping[str, Any], field: str, default: float, lo: float, hi: float,
            allowed: str, lo_open: bool = False) -> float:
    value = body.get(field)
    if value is None:
        return default
    ok = (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
          and (lo < value if lo_open else lo <= value) and value <= hi)
    if not ok:
        raise _bad(field, value, allowed)
    return float(value)


def _max_tokens(body: Mapping[str, Any]) -> tuple[str, int | None]:
    """max_completion_tokens (chat's newer name) wins over max_tokens when both are given."""
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise _bad(field, value, "must be an integer >= 1")
        return field, value
    return "max_tokens", None


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    allowed = f"must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings"
    if (not isinstance(items, list) or len(items) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in items)):
        raise _bad("stop", value, allowed)
    return tuple(dict.fromkeys(items))


def _stop_token_ids(body: Mapping[str, Any], vocab_size: int) -> tuple[int, ...]:
    value = body.get("stop_token_ids")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(_is_int(i) and 0 <= i < vocab_size for i in value):
        raise _bad("stop_token_ids", value, f"must be a list of token ids from 0 to {vocab_size - 1}")
    return tuple(dict.fromkeys(value))


def _logit_bias(body: Mapping[str, Any], vocab_size: int) -> tuple[tuple[int, float], ...]:
    """{"token id": bias}: ids as decimal strings (JSON keys), biases from -100 to 100."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    allowed = f"must be an object mapping token ids (0 to {vocab_size - 1}, as strings) to biases from -100 to 100"
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise _bad("logit_bias", value, allowed + f", at most {MAX_LOGIT_BIAS} of them")
    out = []
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isdecimal() else -1
        if not 0 <= token < vocab_size or not (isinstance(bias, int | float) and not isinstance(bias, bool)
                                                and math.isfinite(bias) and -100 <= bias <= 100):
            raise _bad("logit_bias", value, allowed)
        out.append((token, float(bias)))
    return tuple(sorted(out))


def _top_count(body: Mapping[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
        raise _bad(field, value, f"must be an integer from 0 to {MAX_LOGPROBS}")
    return value


def _logprobs(body: Mapping[str, Any]) -> int | None:
    """Completions: logprobs = N alternatives. Chat: logprobs = true, top_logprobs = N."""
    value = body.get("logprobs")
    if isinstance(value, bool) or "messages" in body:
        top = _top_count(body, "top_logprobs")
        if value is None or value is False:
            if top:
                raise _bad("top_logprobs", top, "needs logprobs = true")
            return None
        if value is not True:
            raise _bad("logprobs", value, "must be true or false")
        return top or 0
    return _top_count(body, "logprobs")


def parse_sampling(body: Mapping[str, Any], *, prompt_tokens: int, context_length: int, vocab_size: int,
                   default_max_new_tokens: int = 16, eos_token_ids: Sequence[int] = ()) -> SamplingParams:
    """SamplingParams from an OpenAI request body; every invalid value raises RequestError(400).

    Fields: max_tokens / max_completion_tokens, temperature (0..2), top_p (0 < p <= 1), top_k
    (extension, >= 0), seed, stop, stop_token_ids (extension), ignore_eos (extension),
    presence / frequency penalties, repetition_penalty, logit_bias, min_p, min_tokens, logprobs
    (completions: N; chat: true + top_logprobs N), prompt_logprobs. `n` is the front end's.
    Without max_tokens the default is clipped to the room the context leaves; an explicit one
    must fit. `eos_token_ids` (the tokenizer's and the model's) join stop_token_ids unless ignore_eos.
    """
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0, "must be a number from 0 to 2")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, "must be a number greater than 0 and at most 1", lo_open=True)
    top_k = body.get("top_k")
    if top_k is None:
        top_k = 0
    elif not _is_int(top_k) or top_k < 0:
        raise _bad("top_k", top_k, "must be an integer >= 0 (0 = off)")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not SEED_MIN <= seed <= SEED_MAX):
        raise _bad("seed", seed, f"must be an integer from {SEED_MIN} to {SEED_MAX}")
    ignore_eos = body.get("ignore_eos", False)
    if ignore_eos is None:
        ignore_eos = False
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", ignore_eos, "must be true or false")
    penalties = {field: _number(body, field, 0.0, -2.0, 2.0, "must be a number from -2 to 2")
                 for field in ("presence_penalty", "frequency_penalty")}
    repetition = _number(body, "repetition_penalty", 1.0, 0.0, MAX_REPETITION_PENALTY,
                         f"must be a number > 0 and at most {MAX_REPETITION_PENALTY:g} (1 = off)", lo_open=True)
    min_p = _number(body, "min_p", 0.0, 0.0, 1.0, "must be a number from 0 to 1 (0 = off)")
    min_tokens = body.get("min_tokens") or 0
    if not _is_int(min_tokens) or min_tokens < 0:
        raise _bad("min_tokens", body.get("min_tokens"), "must be an integer >= 0")
    stop_ids = _stop_token_ids(body, vocab_size)
    if not ignore_eos:
        stop_ids = (*stop_ids, *(i for i in dict.fromkeys(eos_token_ids) if i not in stop_ids))

    if prompt_tokens < 1:
        raise RequestError(400, "the prompt is empty: give at least one token", param="prompt")
    if prompt_tokens >= context_length:
        raise RequestError(400, f"prompt has {prompt_tokens} tokens, the model has {context_length} positions "
                                "(and at least one is needed for the completion)", param="prompt")
    field, max_tokens = _max_tokens(body)
    if max_tokens is None:
        max_tokens = min(default_max_new_tokens, context_length - prompt_tokens)
    elif prompt_tokens + max_tokens > context_length:
        raise RequestError(400, f"prompt has {prompt_tokens} tokens; with {field} {max_tokens} it needs "
                                f"{prompt_tokens + max_tokens} positions, the model has {context_length}",
                           param=field)
    if min_tokens > max_tokens:
        raise _bad("min_tokens", min_tokens, f"must be at most max_tokens ({max_tokens})")
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          stop_token_ids=stop_ids, stop=_stop(body), ignore_eos=ignore_eos,
                          presence_penalty=penalties["presence_penalty"],
                          frequency_penalty=penalties["frequency_penalty"], repetition_penalty=repetition,
                          logit_bias=_logit_bias(body, vocab_size), min_p=min_p, min_tokens=min_tokens,
                          logprobs=_logprobs(body), prompt_logprobs=_top_count(body, "prompt_logprobs"))


class Sampled(NamedTuple):
    """A token as a backend reports it when the sequence asked for log-probabilities
    (params.logprobs): its log-probability and the top alternatives (id, log-probability), best
    first. Without logprobs a backend yields plain ints."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class PromptLogprobs(NamedTuple):
    """Yielded once before the first token when params.prompt_logprobs is set: for each prompt
    token after the first, its log-probability given the ones before, and the top alternatives."""

    logprobs: tuple[float, ...]
    top: tuple[tuple[tuple[int, float], ...], ...]


class Admitted(NamedTuple):
    """Yielded once, before anything else, by a backend that queues sequences (the pipeline's
    dispatcher waits for KV room): when the sequence was admitted (time.monotonic()). The
    serving metrics split the time to first token into queue time and prefill time with it."""

    at: float


# What a backend may say it implements (its `features` attribute); a request asking for one the
# backend lacks is a 400 naming the field. Backends without the attribute implement none.
FEATURES = ("penalties", "logit_bias", "min_p", "min_tokens", "logprobs", "prompt_logprobs")


def features_needed(params: SamplingParams) -> dict[str, str]:
    """Feature -> the request field that asks for it."""
    needed = {}
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
        needed["penalties"] = next(f for f, on in (("presence_penalty", params.presence_penalty),
                                                   ("frequency_penalty", params.frequency_penalty),
                                                   ("repetition_penalty", params.repetition_penalty != 1.0)) if on)
    for feature, on in (("logit_bias", bool(params.logit_bias)), ("min_p", params.min_p > 0),
                        ("min_tokens", params.min_tokens > 0), ("logprobs", params.logprobs is not None),
                        ("prompt_logprobs", params.prompt_logprobs is not None)):
        if on:
            needed[feature] = feature
    return needed
