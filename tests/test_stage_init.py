"""A stage's weights are made in a pool of threads (models/stage.py): the values must not depend on
the pool, and INFSCALED_INIT_THREADS must be a whole number >= 1."""

from __future__ import annotations

import pytest
import torch

from infscaled.errors import ModelError
from infscaled.models.sources import resolve
from infscaled.models.stage import INIT_THREADS_ENV, init_threads, materialize, skeleton
from infscaled.models.weights import seeded_tensor


def _state(threads: str, monkeypatch: pytest.MonkeyPatch, dtype: str) -> dict[str, torch.Tensor]:
    monkeypatch.setenv(INIT_THREADS_ENV, threads)
    sk = skeleton(resolve("builtin:llama-tiny"))
    stage = materialize(sk, 0, sk.unit_count - 1, "cpu", dtype, 7, None)
    return {n: p for n, p in zip(stage.param_names, stage.parameters(), strict=True)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_values_do_not_depend_on_the_pool(monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    one, many = _state("1", monkeypatch, dtype), _state("4", monkeypatch, dtype)
    assert list(one) == list(many)
    for name, p in one.items():
        assert p.dtype == getattr(torch, dtype)
        assert torch.equal(p, many[name]), name
        # and they are the seeded values themselves, cast once
        assert torch.equal(p, seeded_tensor(name, p.shape, 7).to(p.dtype)), name


@pytest.mark.parametrize("raw", ["0", "-2", "four", "1.5"])
def test_bad_init_threads_is_an_error(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(INIT_THREADS_ENV, raw)
    with pytest.raises(ModelError, match=INIT_THREADS_ENV):
        init_threads(10)


def test_init_threads_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INIT_THREADS_ENV, "8")
    assert init_threads(3) == 3  # never more threads than parameters
    assert init_threads(100) == 8
    monkeypatch.delenv(INIT_THREADS_ENV)
    assert 1 <= init_threads(100) <= 16
