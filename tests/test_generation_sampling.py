"""Sampling: validation of OpenAI fields (every bad value gets a message naming it) and sample_next."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from infscaled.generation.errors import RequestError
from infscaled.generation.sampling import (
    SamplingParams,
    make_generator,
    parse_sampling,
    process_logits,
    sample_next,
    token_logprobs,
)

LIMITS = dict(prompt_tokens=10, context_length=256, vocab_size=512)


def parse(**body: Any) -> SamplingParams:
    return parse_sampling(body, **LIMITS)  # type: ignore[arg-type]


def test_defaults_and_accepted_values() -> None:
    assert parse() == SamplingParams(max_new_tokens=16)
    p = parse(max_tokens=5, temperature=0, top_p=0.5, top_k=3, seed=-7, stop="x", stop_token_ids=[1, 2, 1],
              n=1, ignore_eos=True, user="ignored", frequency_penalty=0)
    assert p == SamplingParams(5, 0.0, 3, 0.5, -7, (1, 2), ("x",), True)
    assert parse(max_completion_tokens=4, max_tokens=9).max_new_tokens == 4
    assert parse(stop=["a", "bb", "a"]).stop == ("a", "bb")
    # Without max_tokens the default is clipped to the room the context leaves.
    assert parse_sampling({}, prompt_tokens=250, context_length=256, vocab_size=512).max_new_tokens == 6


def test_eos_joins_stop_ids_unless_ignore_eos() -> None:
    assert parse_sampling({"stop_token_ids": [3]}, **LIMITS, eos_token_ids=(256,)).stop_token_ids == (3, 256)
    assert parse_sampling({"ignore_eos": True}, **LIMITS, eos_token_ids=(256,)).stop_token_ids == ()
    # The model's own eos ids (a chat model's end-of-turn marker) join too, each once.
    both = parse_sampling({"stop_token_ids": [7]}, **LIMITS, eos_token_ids=(256, 7, 256, 9))
    assert both.stop_token_ids == (7, 256, 9)


BAD = [
    ("max_tokens", 0, "max_tokens = 0: must be an integer >= 1"),
    ("max_tokens", 2.5, "max_tokens = 2.5: must be an integer >= 1"),
    ("max_tokens", "8", "max_tokens = '8': must be an integer >= 1"),
    ("max_completion_tokens", -1, "max_completion_tokens = -1: must be an integer >= 1"),
    ("temperature", 2.5, "temperature = 2.5: must be a number from 0 to 2"),
    ("temperature", -0.1, "temperature = -0.1: must be a number from 0 to 2"),
    ("temperature", "hot", "temperature = 'hot': must be a number from 0 to 2"),
    ("temperature", True, "temperature = True: must be a number from 0 to 2"),
    ("temperature", float("nan"), "temperature = nan: must be a number from 0 to 2"),
    ("top_p", 0, "top_p = 0: must be a number greater than 0 and at most 1"),
    ("top_p", 1.5, "top_p = 1.5: must be a number greater than 0 and at most 1"),
    ("top_k", -1, "top_k = -1: must be an integer >= 0 (0 = off)"),
    ("top_k", 2.0, "top_k = 2.0: must be an integer >= 0 (0 = off)"),
    ("seed", "42", "seed = '42': must be an integer from"),
    ("seed", 2**64, f"seed = {2**64}: must be an integer from"),
    ("stop", "", "stop = '': must be a non-empty string or a list of at most 64 non-empty strings"),
    ("stop", ["a", ""], "stop = ['a', '']: must be a non-empty string or a list"),
    ("stop", [f"s{i}" for i in range(65)], "stop = ['s0', 's1', 's2', 's3', 's4', 's5', 's6', 's7', 's8', 's9', "),
    ("stop", 5, "stop = 5: must be"),
    ("stop_token_ids", [1, 512], "stop_token_ids = [1, 512]: must be a list of token ids from 0 to 511"),
    ("stop_token_ids", [-1], "stop_token_ids = [-1]: must be a list of token ids from 0 to 511"),
    ("stop_token_ids", 3, "stop_token_ids = 3: must be a list of token ids"),
    ("ignore_eos", "yes", "ignore_eos = 'yes': must be true or false"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_values_name_the_field_the_value_and_what_is_allowed(field: str, value: Any, message: str) -> None:
    with pytest.raises(RequestError) as err:
        parse(**{field: value})
    assert err.value.status == 400 and err.value.param == field
    assert str(err.value).startswith(message), str(err.value)


def test_prompt_and_context_limits() -> None:
    with pytest.raises(RequestError, match="prompt has 300 tokens, the model has 256 positions") as err:
        parse_sampling({}, prompt_tokens=300, context_length=256, vocab_size=512)
    assert err.value.param == "prompt"
    msg = "prompt has 240 tokens; with max_tokens 17 it needs 257 positions, the model has 256"
    with pytest.raises(RequestError, match=msg) as err:
        parse_sampling({"max_tokens": 17}, prompt_tokens=240, context_length=256, vocab_size=512)
    assert err.value.param == "max_tokens"
    with pytest.raises(RequestError, match="the prompt is empty"):
        parse_sampling({}, prompt_tokens=0, context_length=256, vocab_size=512)


# -- sample_next ---------------------------------------------------------------------------------

V = 64


def logits(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    x = logits(5, dtype=dtype)
    out = sample_next(x, [SamplingParams(4, temperature=0.0)] * 5, [None] * 5)
    assert out.dtype == torch.long and torch.equal(out, x.argmax(-1))


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    x = logits(6, seed=1)
    params = [SamplingParams(4, temperature=1.5, top_k=1)] * 3 + [SamplingParams(4, temperature=1.5, top_p=1e-6)] * 3
    gens = [make_generator(i, "cpu") for i in range(6)]
    for _ in range(5):
        assert torch.equal(sample_next(x, params, gens), x.argmax(-1))


def test_a_seed_gives_the_same_tokens_in_any_batch() -> None:
    target = SamplingParams(4, temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    row = logits(1, seed=7)

    def draw(batch: list[tuple[torch.Tensor, SamplingParams]], steps: int = 8) -> list[list[int]]:
        gens = [make_generator(p.seed, "cpu") if p.seed is not None else None for _, p in batch]
        x = torch.cat([r for r, _ in batch])
        return [sample_next(x, [p for _, p in batch], gens).tolist() for _ in range(steps)]

    alone = [step[0] for step in draw([(row, target)])]
    others = [(logits(1, seed=s), SamplingParams(4, temperature=t, seed=s or None)) for s, t in
              [(0, 1.0), (3, 0.0), (5, 2.0)]]
    mixed = [step[2] for step in draw([others[0], others[1], (row, target), others[2]])]
    assert alone == mixed
    assert len(set(alone)) > 1  # it does sample
    assert alone != [step[0] for step in draw([(row, SamplingParams(4, temperature=0.9, top_k=20, top_p=0.9,
                                                                    seed=99))])]


def test_filters_keep_only_allowed_tokens() -> None:
    x = logits(1, seed=3)
    top5 = set(x[0].topk(5).indices.tolist())
    gen = make_generator(0, "cpu")
    seen = {int(sample_next(x, [SamplingParams(4, temperature=2.0, top_k=5)], [gen])[0]) for _ in range(200)}
    assert seen <= top5 and len(seen) > 1
    probs = torch.softmax(x[0], -1)
    order = probs.argsort(descending=True)
    # The nucleus of top_p = mass of the 3 most likely minus a little is exactly those 3 tokens.
    p3 = float(probs[order[:3]].sum()) - 1e-4
    seen = {int(sample_next(x, [SamplingParams(4, top_p=p3)], [gen])[0]) for _ in range(200)}
    assert seen == set(order[:3].tolist())


def test_penalties_bias_min_tokens_and_logprobs_parse() -> None:
    p = parse(presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2, logit_bias={"7": 100, "3": -5.5},
              min_p=0.1, min_tokens=2, logprobs=3, prompt_logprobs=0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -1.0, 1.2)
    assert p.logit_bias == ((3, -5.5), (7, 100.0)) and (p.min_p, p.min_tokens) == (0.1, 2)
    assert (p.logprobs, p.prompt_logprobs) == (3, 0) and p.needs_history
    assert parse(messages=[], logprobs=True, top_logprobs=2).logprobs == 2  # chat's spelling
    assert parse(messages=[], logprobs=True).logprobs == 0
    assert parse(messages=[], logprobs=False).logprobs is None and parse().logprobs is None
    assert not parse().needs_history


@pytest.mark.parametrize(("body", "message"), [
    ({"presence_penalty": 3}, "presence_penalty = 3: must be a number from -2 to 2"),
    ({"repetition_penalty": 0}, "repetition_penalty = 0: must be a number > 0"),
    ({"logit_bias": {"x": 1}}, "logit_bias = {'x': 1}: must be an object mapping token ids (0 to 511"),
    ({"logit_bias": {"600": 1}}, "logit_bias = {'600': 1}: must be an object mapping token ids"),
    ({"logit_bias": {"5": 101}}, "biases from -100 to 100"),
    ({"min_p": 1.5}, "min_p = 1.5: must be a number from 0 to 1"),
    ({"min_tokens": 20, "max_tokens": 5}, "min_tokens = 20: must be at most max_tokens (5)"),
    ({"logprobs": 21}, "logprobs = 21: must be an integer from 0 to 20"),
    ({"messages": [], "top_logprobs": 2}, "top_logprobs = 2: needs logprobs = true"),
    ({"messages": [], "logprobs": 2}, "logprobs = 2: must be true or false"),
])
def test_bad_penalties_bias_and_logprobs(body: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError) as err:
        parse(**body)
    assert message in err.value.message and err.value.status == 400


def test_process_logits_matches_the_definitions() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0], [2.0, -1.0, 0.5, 1.0]])
    p = SamplingParams(4, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    out = process_logits(logits, [p, SamplingParams(4)], outputs=[[0, 0, 3], [0]], prompts=[[1], [1]])
    # Token 0: 2 / 2 - 0.5 * 2 - 0.25; token 1 (prompt only): -1 * 2; token 2 untouched; token 3: 1 / 2 - 0.5 - 0.25.
    assert out[0].tolist() == [-0.25, -2.0, 0.5, -0.25]
    assert out[1].tolist() == logits[1].tolist()  # a row without any of them is left alone
    plain = [SamplingParams(4), SamplingParams(4)]
    assert process_logits(logits, plain) is logits  # nothing asked: no copy, no work


def test_logit_bias_min_tokens_and_min_p_change_what_is_sampled() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    biased = SamplingParams(4, temperature=0.0, logit_bias=((2, 100.0),))
    assert sample_next(logits, [biased], [None]).tolist() == [2]
    eos_first = SamplingParams(4, temperature=0.0, stop_token_ids=(1,), min_tokens=2)
    assert sample_next(logits, [eos_first], [None], outputs=[[3]]).tolist() == [3]  # 1 generated < 2: no eos
    assert sample_next(logits, [eos_first], [None], outputs=[[3, 3]]).tolist() == [1]
    # min_p 0.5: only tokens at least half as likely as the best (1 and 3) can be drawn.
    p = SamplingParams(4, temperature=1.0, min_p=0.5)
    drawn = {int(sample_next(logits, [p], [make_generator(seed, "cpu")])[0]) for seed in range(200)}
    assert drawn == {1, 3}


def test_token_logprobs_are_the_models_log_softmax() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    got = token_logprobs(logits, [0, 2], k=2)
    expected = torch.log_softmax(logits, dim=-1)
    assert got.chosen == pytest.approx([expected[0, 0].item(), expected[1, 2].item()])
    assert got.top_ids[0] == [2, 1] and got.top_logprobs[0] == pytest.approx(expected[0, [2, 1]].tolist())
    assert token_logprobs(logits, [1, 1], k=0).top_ids == [[], []]


def test_sampling_params_and_logprobs_survive_the_wire() -> None:
    from infscaled.engine import genwire as gw
    from infscaled.generation.params import PromptLogprobs, Sampled
    from infscaled.protocol import generation as g
    from infscaled.protocol.wire import MAX_TENSORS

    rich = SamplingParams(9, 0.7, 5, 0.9, 42, (3, 0), (), False, 0.5, -0.25, 1.3, ((7, 100.0), (2, -3.5)), 0.05, 2, 3, 1)
    specs = [g.SequenceSpec(1, 3, 12, rich, prompt=(5, 6, 7)), g.SequenceSpec(2, 1, 5, SamplingParams(4))]
    prefill = gw.decode(gw.encode(gw.Prefill(specs, torch.zeros(2, 3, dtype=torch.long),
                                             torch.tensor([[1, 1, 1], [1, 0, 0]])), 1))
    assert isinstance(prefill, gw.Prefill) and prefill.specs == specs  # every sampling field, and the prompt
    reported = [[PromptLogprobs((-1.0, -2.0), (((6, -1.0),), ((9, -0.1),))), Sampled(11, -0.5, ((11, -0.5), (4, -1.5)))],
                []]
    wire = gw.encode(gw.Tokens([1, 2], [11, 12], [False, True], reported), 2)
    assert len(wire.tensors) <= MAX_TENSORS
    tokens = gw.decode(wire)
    assert isinstance(tokens, gw.Tokens) and tokens.reported == reported
    plain = gw.encode(gw.Tokens([1], [3], [False]), 3)
    assert len(plain.tensors) == 3 and gw.decode(plain).reported == []  # nobody asked: nothing more
