"""GPU-side sampling (generation/gpu_sampling.py) picks exactly sample_next's tokens.

Same logits, same per-row parameters, same seeds: the tokens must be identical, greedy rows,
top-k, top-p and plain temperature rows mixed in one batch. On the CPU the pinned copies are
plain copies; the GPU test checks the asynchronous path (event, pinned host buffer).
"""

from __future__ import annotations

import pytest
import torch

from infscaled.generation.gpu_sampling import sample_async
from infscaled.generation.sampling import SamplingParams, make_generator, sample_next

PARAMS = [SamplingParams(8, temperature=0.0), SamplingParams(8, temperature=0.7, top_k=5, seed=1),
          SamplingParams(8, temperature=1.3, top_p=0.6, seed=2), SamplingParams(8, temperature=1.0, seed=3),
          SamplingParams(8, temperature=0.9, top_k=40, top_p=0.9, seed=4)]


def _draw(device: str, fn: str) -> list[list[int]]:
    gens = [make_generator(p.seed, device) for p in PARAMS]
    logits_gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(6):
        logits = (3 * torch.randn(len(PARAMS), 300, generator=logits_gen)).to(device)
        if fn == "async":
            pending = sample_async(logits, PARAMS, gens)
            assert pending.device.device == logits.device
            out.append(pending.tokens())
        else:
            out.append(sample_next(logits, PARAMS, gens).tolist())
    return out


def test_sample_async_picks_sample_next_tokens_on_cpu() -> None:
    assert _draw("cpu", "async") == _draw("cpu", "reference")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_async_picks_sample_next_tokens_on_cuda() -> None:
    assert _draw("cuda", "async") == _draw("cuda", "reference")
