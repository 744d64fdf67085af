"""Decode steps on static, padded batches (what CUDA graphs replay) compute what exact batches do.

CUDA graphs themselves need a GPU (tests/test_gpu_generation.py, run on the device); here the
bucket logic runs on the CPU: `DecodeStep` with graphs forced on and capture replaced by a
recorder, so every step runs eagerly on its bucket's static batch, padding rows included. Its
outputs for the real rows must equal those of a second cache stepped with exact batches.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from infscaled.generation.graphs import DecodeStep, bucket
from infscaled.generation.kv import StageKV
from infscaled.models.sources import resolve
from infscaled.models.stage import build_stage


def test_bucket_rounds_up_to_powers_of_two_within_the_cap() -> None:
    assert [bucket(n, 8) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert [bucket(n, 6) for n in (3, 5, 6)] == [4, 6, 6]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize(("model", "attention"), [("llama-tiny", "torch"), ("gpt2-tiny", "torch"),
                                                  ("llama-tiny", "flex")])
def test_padded_static_batches_compute_what_exact_batches_do(model: str, attention: str, monkeypatch: Any) -> None:
    """`attention`: the padded stepper's paged attention backend (the exact one's is "torch"):
    flex reads the pools through the block mask and StageKV.page_index (uncompiled on the CPU)."""
    torch.manual_seed(0)
    resolved = resolve(f"builtin:{model}")
    stage = build_stage(resolved, 0, 2, "cpu", "float32", 0).eval()  # embed + 2 blocks
    kvs = [StageKV(1024), StageKV(1024)]
    exact = DecodeStep(stage, kvs[0], torch.device("cpu"), "input_ids", max_rows=8, graphs=False)
    padded = DecodeStep(stage, kvs[1], torch.device("cpu"), "input_ids", max_rows=8, graphs=False,
                        attention=attention)
    padded.graphs = True  # as on a GPU, but capture is recorded instead of done
    captured: list[tuple[int, int]] = []

    def fake_capture(b: Any, key: tuple[int, int]) -> None:
        captured.append(key)
        b.eager = True  # as after a failed capture: the bucket keeps running eagerly, static batch

    monkeypatch.setattr(padded, "_capture", fake_capture)
    prompts = {1: [5, 6, 7], 2: [9] * 20, 3: [4, 2], 4: [8, 8, 8, 8, 8]}
    reserve = {1: 10, 2: 40, 3: 12, 4: 14}
    with torch.inference_mode():
        for kv in kvs:
            for s, p in prompts.items():
                batch = kv.prefill([s], [len(p)], [reserve[s]])
                stage({"input_ids": torch.tensor([p]), "attention_mask": torch.ones(1, len(p), dtype=torch.int64)},
                      batch)
                kv.store([s], batch)
        groups = [[1, 3, 4], [2, 1, 3, 4], [4], [1, 3, 4], [3, 2], [1, 3, 4]]
        for step, seqs in enumerate(groups):
            x = torch.tensor([[step + s] for s in seqs])
            want = exact.step(x, seqs)["hidden"]
            got = padded.step(x, seqs)["hidden"]
            assert got.shape == want.shape == (len(seqs), 1, stage_width(resolved))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert kvs[0].length == kvs[1].length
    # Buckets: (rows, pages) rounded up to powers of two; [1, 3, 4] ran three times, so it was
    # offered for capture on its second step only (never again once it stayed eager).
    assert captured == [(4, 1)]


def stage_width(resolved: Any) -> int:
    config = resolved.family.config
    return int(getattr(config, "hidden_size", None) or config.n_embd)
