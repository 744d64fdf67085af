"""Stage 0's prefill scheduling (engine/programs/generation.py `_admit`, `_next_prefill`): held
prefills join the queue first come first served within the KV budget; a prefill micro-batch
takes prompts from the queue's front within max_batch_sequences rows and prefill_chunk_tokens
tokens, splitting a longer prompt into chunks, right-padded."""

from __future__ import annotations

import pytest
import torch

from infscaled.engine import genwire as gw
from infscaled.engine.programs.generation import (
    NO_CHUNKS,
    PREFILL_GATHER_S,
    _admit,
    _Chain,
    _hold_prefills,
    _next_prefill,
)
from infscaled.errors import WireError
from infscaled.generation.kv import StageKV
from infscaled.generation.params import SamplingParams
from infscaled.protocol.generation import SequenceSpec


def _prefill(first_seq: int, lengths: list[int], reserve: int = 64, **sampling: object) -> gw.Prefill:
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(1, n + 1) + 100 * (first_seq + i)
        mask[i, :n] = 1
    specs = [SequenceSpec(first_seq + i, n, reserve, SamplingParams(max_new_tokens=8, **sampling))  # type: ignore[arg-type]
             for i, n in enumerate(lengths)]
    return gw.Prefill(specs, ids, mask)


def _queued(*held: gw.Prefill, kv: StageKV | None = None) -> _Chain:
    chain = _Chain(held=list(held))
    _admit(chain, kv or StageKV(4096))
    return chain


def test_held_prefills_become_one_padded_micro_batch() -> None:
    held = [_prefill(0, [3]), _prefill(1, [5, 2]), _prefill(3, [4])]
    chain = _queued(*held)
    assert not chain.held and chain.prefilling == {0, 1, 2, 3}
    msg = _next_prefill(chain.queue, rows=8, tokens=NO_CHUNKS)
    assert msg.seqs == [0, 1, 2, 3] and msg.starts == [] and msg.finals() == [True] * 4
    assert msg.x.shape == msg.attention_mask.shape == (4, 5)
    assert msg.lengths == [3, 5, 2, 4]
    for row, part, i in ((0, held[0], 0), (1, held[1], 0), (2, held[1], 1), (3, held[2], 0)):
        n = int(part.attention_mask[i].sum())
        assert torch.equal(msg.x[row, :n], part.x[i, :n])
        assert not msg.x[row, n:].any()  # right-padded
    assert all(p.left == 0 for p in chain.queue)


def test_rows_cap_a_micro_batch_and_the_budget_holds_prefills_back() -> None:
    chain = _queued(_prefill(0, [3, 3]), _prefill(2, [4, 4]), _prefill(4, [2]))
    assert _next_prefill(chain.queue, rows=3, tokens=NO_CHUNKS).seqs == [0, 1, 2]
    chain.queue = [p for p in chain.queue if p.left]
    assert _next_prefill(chain.queue, rows=3, tokens=NO_CHUNKS).seqs == [3, 4]
    # A budget of 3 sequences of 64 positions: the second message's two do not both fit yet.
    chain = _queued(_prefill(0, [3, 3]), _prefill(2, [4, 4]), kv=StageKV(3 * 64))
    assert [p.spec.seq for p in chain.queue] == [0, 1] and len(chain.held) == 1
    kv = StageKV(64)
    chain = _queued(_prefill(0, [3, 3]), kv=kv)  # the first does not fit: it waits, held
    assert not chain.queue and len(chain.held) == 1


def test_prefills_are_held_for_a_busy_inbox_only_until_a_micro_batch_is_queued() -> None:
    # Two prompts of 100 with room for 8 rows and 512 tokens: held while the inbox is busy, for at
    # most PREFILL_GATHER_S from the first hold.
    chain = _queued(_prefill(0, [100, 100], reserve=1024))
    assert _hold_prefills(chain, True, rows=8, tokens=512, now=0.0)
    assert _hold_prefills(chain, True, rows=8, tokens=512, now=PREFILL_GATHER_S / 2)
    assert not _hold_prefills(chain, True, rows=8, tokens=512, now=PREFILL_GATHER_S)
    idle_inbox = False
    assert not _hold_prefills(_queued(_prefill(0, [100, 100], reserve=1024)), idle_inbox, rows=8, tokens=512, now=0.0)
    # A micro-batch's worth of rows, or of prompt tokens (the closed loop of 128-token prompts
    # that was held 20 ms behind every 4 prompts: BENCHMARKS.md section 25), goes at once.
    assert not _hold_prefills(_queued(_prefill(0, [100, 100], reserve=1024)), True, rows=2, tokens=512, now=0.0)
    assert not _hold_prefills(_queued(_prefill(0, [100, 100], reserve=1024)), True, rows=8, tokens=200, now=0.0)
    assert not _hold_prefills(_queued(_prefill(0, [600], reserve=1024)), True, rows=8, tokens=512, now=0.0)
    assert _hold_prefills(_queued(_prefill(0, [100, 99], reserve=1024)), True, rows=8, tokens=200, now=0.0)
    assert _hold_prefills(_queued(_prefill(0, [600], reserve=1024)), True, rows=8, tokens=NO_CHUNKS, now=0.0)
    # A prompt under way continues at once.
    chain = _queued(_prefill(0, [10]))
    _next_prefill(chain.queue, rows=8, tokens=4)
    assert not _hold_prefills(chain, True, rows=8, tokens=512, now=0.0)


def test_long_prompts_go_in_chunks_within_the_token_budget() -> None:
    chain = _queued(_prefill(0, [10]), _prefill(1, [3]), _prefill(2, [6]))
    batches = []
    while chain.queue:
        msg = _next_prefill(chain.queue, rows=8, tokens=4)
        chain.queue = [p for p in chain.queue if p.left]
        batches.append((msg.seqs, msg.row_starts(), msg.lengths, msg.finals()))
    assert batches == [
        ([0], [0], [4], [False]),
        ([0], [4], [4], [False]),
        ([0, 1], [8, 0], [2, 2], [True, False]),  # seq 1 (3 tokens) is split at the budget too
        ([1, 2], [2, 0], [1, 3], [True, False]),
        ([2], [3], [3], [True]),
    ]
    # The chunks carry the prompt's ids in order.
    chain = _queued(_prefill(0, [10]))
    first = _next_prefill(chain.queue, rows=8, tokens=4)
    second = _next_prefill(chain.queue, rows=8, tokens=4)
    assert first.x[0].tolist() == list(range(1, 5)) and second.x[0].tolist() == list(range(5, 9))


def test_a_prompt_asking_for_its_log_probabilities_is_never_split() -> None:
    chain = _queued(_prefill(0, [3]), _prefill(1, [10], prompt_logprobs=1))
    msg = _next_prefill(chain.queue, rows=8, tokens=4)
    assert msg.seqs == [0]  # the whole 10 do not fit after it: it waits for the next micro-batch
    chain.queue = [p for p in chain.queue if p.left]
    msg = _next_prefill(chain.queue, rows=8, tokens=4)
    assert msg.seqs == [1] and msg.lengths == [10] and msg.finals() == [True]  # alone, whole


def test_chunk_starts_travel_on_the_wire_and_bad_ones_are_refused() -> None:
    chain = _queued(_prefill(0, [10]))
    _next_prefill(chain.queue, rows=8, tokens=4)
    msg = _next_prefill(chain.queue, rows=8, tokens=4)
    back = gw.decode(gw.encode(msg, 1))
    assert isinstance(back, gw.Prefill) and back.starts == [4] and back.finals() == [False]
    wire = gw.encode(msg, 2)
    wire.tensors["starts"] = torch.tensor([8])  # 8 + 4 tokens > a prompt of 10
    with pytest.raises(WireError, match=r"chunk starts \[8\], prompts of \[10\] are inconsistent"):
        gw.decode(wire)
    wire.tensors["starts"] = torch.tensor([4, 0])
    with pytest.raises(WireError, match="inconsistent"):
        gw.decode(wire)


def test_prefill_chunk_tokens_reaches_the_plan_and_rejects_bad_values() -> None:
    from infscaled.config import ConfigError, parse_job
    from infscaled.planning.job import generation_plan
    from infscaled.protocol.plan import plan_from_dict, plan_to_dict
    from infscaled.runner.launcher import prepare

    base = {"name": "g", "model": {"source": "builtin:llama-tiny"}, "pipeline": {"stages": 1}}
    assert parse_job({**base, "generation": {}}).generation.prefill_chunk_tokens == 512  # type: ignore[union-attr]
    cfg = parse_job({**base, "generation": {"prefill_chunk_tokens": 0}})
    assert generation_plan(cfg).prefill_chunk_tokens == 0  # type: ignore[union-attr]
    cfg = parse_job({**base, "generation": {"prefill_chunk_tokens": 64}})
    plan = prepare(cfg).plan
    assert plan_from_dict(plan_to_dict(plan)).generation.prefill_chunk_tokens == 64  # type: ignore[union-attr]
    for bad in (-1, "64", 1.5, True):
        with pytest.raises(ConfigError, match="generation.prefill_chunk_tokens"):
            parse_job({**base, "generation": {"prefill_chunk_tokens": bad}})
