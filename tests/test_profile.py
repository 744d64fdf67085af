"""engine/profile.py: which micro-batches a stage traces (INFSCALED_PROFILE_STEPS)."""

from __future__ import annotations

import logging

import pytest

from infscaled.engine.profile import PROFILE_ENV, STEPS_ENV, StepTrace, steps_window


def test_the_window_is_the_programs_own_unless_a_valid_one_is_given() -> None:
    assert steps_window(None, 300, 40) == (300, 40)
    assert steps_window("", 300, 40) == (300, 40)
    assert steps_window("2000:80", 300, 40) == (2000, 80)
    assert steps_window("0:1", 300, 40) == (0, 1)


@pytest.mark.parametrize("value", ["2000", "a:b", "10:0", "-1:5", "1:2:3", ":", "5:"])
def test_a_malformed_window_is_said_and_the_programs_own_kept(value: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="infscaled.engine.profile"):
        assert steps_window(value, 30, 10) == (30, 10)
    assert f"{STEPS_ENV}={value!r} is not FIRST:COUNT" in caplog.text
    assert "tracing micro-batches 30..39" in caplog.text


def test_a_stage_reads_the_window_only_when_tracing(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv(STEPS_ENV, "500:20")
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    trace = StepTrace(300, 40)
    assert (trace.dir, trace.first, trace.count) == (None, 300, 40)
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path))
    trace = StepTrace(300, 40)
    assert (trace.dir, trace.first, trace.count) == (str(tmp_path), 500, 20)
