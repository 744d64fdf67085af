"""`infscaled run`'s steady generation rate (runner/genload.py): tokens/s over the middle half."""

from __future__ import annotations

import pytest

from infscaled.runner.genload import GenSummary, SeqOutcome


def _seq(i: int, submitted: float, first: float, last: float, produced: int) -> SeqOutcome:
    return SeqOutcome(i, [1], produced, submitted=submitted, first_at=first, last_at=last, tokens=[5] * produced)


def test_middle_half_rate_leaves_out_warm_up_and_drain() -> None:
    # 0..10 s: a slow start (one token in the first 2.5 s), then 101 tokens evenly over 2..12 s.
    slow = _seq(0, 0.0, 2.0, 2.0, 1)
    steady = _seq(1, 0.0, 2.0, 12.0, 101)  # 100 tokens after the first, one every 0.1 s
    summary = GenSummary("j", [slow, steady], wall_s=12.0, stages=[])
    # Window 3..9 s: 60 of steady's later tokens, nothing else.
    assert summary.middle_tokens_per_s() == pytest.approx(60 / 6)
    assert summary.tokens_per_s == pytest.approx(102 / 12)
    assert summary.to_json()["tokens_per_s_middle"] == pytest.approx(10.0)


def test_failed_and_empty_runs_have_no_rate() -> None:
    assert GenSummary("j", [], wall_s=0.0, stages=[]).middle_tokens_per_s() == 0.0
    failed = _seq(0, 0.0, 1.0, 2.0, 3)
    failed.error = "refused"
    assert GenSummary("j", [failed], wall_s=4.0, stages=[]).middle_tokens_per_s() == 0.0
