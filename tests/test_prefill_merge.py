"""Stage 0 merges held prefills into one micro-batch (engine/programs/generation.py `_merge`):
first come first served, within max_batch_sequences rows and the KV budget, prompts right-padded."""

from __future__ import annotations

import torch

from infscaled.engine import genwire as gw
from infscaled.engine.programs.generation import _merge
from infscaled.generation.kv import StageKV
from infscaled.generation.params import SamplingParams
from infscaled.protocol.generation import SequenceSpec


def _prefill(first_seq: int, lengths: list[int], reserve: int = 64) -> gw.Prefill:
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(1, n + 1) + 100 * (first_seq + i)
        mask[i, :n] = 1
    specs = [SequenceSpec(first_seq + i, n, reserve, SamplingParams(max_new_tokens=8)) for i, n in enumerate(lengths)]
    return gw.Prefill(specs, ids, mask)


def test_held_prefills_become_one_padded_micro_batch() -> None:
    held = [_prefill(0, [3]), _prefill(1, [5, 2]), _prefill(3, [4])]
    merged = _merge(held, rows=8, kv=StageKV(4096))
    assert merged is not None
    msg, taken = merged
    assert taken == 3 and msg.seqs == [0, 1, 2, 3]
    assert msg.x.shape == msg.attention_mask.shape == (4, 5)
    assert msg.attention_mask.sum(dim=1).tolist() == [3, 5, 2, 4]
    for row, part, i in ((0, held[0], 0), (1, held[1], 0), (2, held[1], 1), (3, held[2], 0)):
        n = int(part.attention_mask[i].sum())
        assert torch.equal(msg.x[row, :n], part.x[i, :n])
        assert not msg.x[row, n:].any()  # right-padded


def test_merge_stops_at_rows_and_budget_first_one_always() -> None:
    held = [_prefill(0, [3, 3]), _prefill(2, [4, 4]), _prefill(4, [2])]
    msg, taken = _merge(held, rows=3, kv=StageKV(4096))  # type: ignore[misc]
    assert taken == 1 and msg is held[0]  # the next one would make 4 rows
    msg, taken = _merge(held, rows=1, kv=StageKV(4096))  # type: ignore[misc]
    assert taken == 1 and msg is held[0]  # the first runs whatever its rows
    # A budget of 3 sequences of 64 positions: the second message's two do not both fit.
    msg, taken = _merge(held, rows=8, kv=StageKV(3 * 64))  # type: ignore[misc]
    assert taken == 1
    assert _merge(held, rows=8, kv=StageKV(64)) is None  # the first does not fit: wait
