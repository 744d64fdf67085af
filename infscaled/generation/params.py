"""Sampling parameters and their validation from OpenAI request fields (torch-free).

`sampling.py` re-exports both names next to the torch code that applies them; this module
stays importable without torch so the HTTP front end and the controller can use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from infscaled.generation.errors import RequestError

MAX_STOP_STRINGS = 4  # OpenAI's limit
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


def parse_sampling(body: Mapping[str, Any], *, prompt_tokens: int, context_length: int, vocab_size: int,
                   default_max_new_tokens: int = 16, eos_token_id: int | None = None) -> SamplingParams:
    """SamplingParams from an OpenAI request body; every invalid value raises RequestError(400).

    Fields: max_tokens / max_completion_tokens, temperature (0..2), top_p (0 < p <= 1), top_k
    (extension, >= 0), seed, stop, stop_token_ids (extension), n (only 1), ignore_eos
    (extension). Without max_tokens the default is clipped to the room the context leaves; an
    explicit one must fit. `eos_token_id` (the tokenizer's) joins stop_token_ids unless ignore_eos.
    """
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise _bad("n", n, "only n = 1 is supported (one choice per request)")
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
    stop_ids = _stop_token_ids(body, vocab_size)
    if eos_token_id is not None and not ignore_eos and eos_token_id not in stop_ids:
        stop_ids = (*stop_ids, eos_token_id)

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
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          stop_token_ids=stop_ids, stop=_stop(body), ignore_eos=ignore_eos)
