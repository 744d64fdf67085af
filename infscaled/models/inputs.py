"""Requests in, micro-batches through, each request's own result out.

A request is one tensor: token ids [S, T] (int64) for token models, or samples
[S, *sample_shape] (float) for image and tensor models. A micro-batch concatenates
requests along the batch dimension; token requests of different lengths are right-padded
with an attention mask (right padding leaves every real position's output unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from infscaled.errors import RequestError
from infscaled.models.base import Activation, InputSpec

PAD_ID = 0
# Activation key that carries stage-0 inputs, by input kind.
INPUT_KEY = {"tokens": "input_ids", "image": "pixel_values", "tensor": "input"}


def check_request(spec: InputSpec, x: torch.Tensor, max_samples: int) -> None:
    """Reject a malformed request before it is batched (it would poison the whole micro-batch)."""
    if x.ndim < 1 or x.shape[0] < 1:
        raise RequestError(f"request must have at least one sample, got shape {tuple(x.shape)}")
    if x.shape[0] > max_samples:
        raise RequestError(f"request has {x.shape[0]} samples, more than micro_batch_size ({max_samples})")
    if spec.kind == "tokens":
        if x.ndim != 2 or x.dtype != torch.int64:
            raise RequestError(f"token request must be int64 [samples, tokens], got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] < 1 or x.shape[1] > spec.max_positions:
            raise RequestError(f"sequence length {x.shape[1]} outside 1..{spec.max_positions}")
        if int(x.min()) < 0 or int(x.max()) >= spec.vocab_size:
            raise RequestError(f"token ids must be in 0..{spec.vocab_size - 1}")
    elif tuple(x.shape[1:]) != spec.sample_shape or not x.is_floating_point():
        raise RequestError(f"request must be float [samples, {', '.join(map(str, spec.sample_shape))}], "
                           f"got {x.dtype} {tuple(x.shape)}")


def collate(spec: InputSpec, requests: Sequence[torch.Tensor], dtype: torch.dtype) -> Activation:
    """Stack requests into one stage-0 activation."""
    if spec.kind == "tokens":
        longest = max(r.shape[1] for r in requests)
        rows = sum(r.shape[0] for r in requests)
        ids = torch.full((rows, longest), PAD_ID, dtype=torch.int64)  # [B, T]
        mask = torch.zeros((rows, longest), dtype=torch.int64)  # [B, T]
        row = 0
        for r in requests:
            s, t = r.shape
            ids[row:row + s, :t] = r
            mask[row:row + s, :t] = 1
            row += s
        return {"input_ids": ids, "attention_mask": mask}
    return {INPUT_KEY[spec.kind]: torch.cat([r.to(dtype) for r in requests])}


def split(spec: InputSpec, output: torch.Tensor, requests: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Cut the last stage's output back into one tensor per request (padding removed)."""
    results = []
    row = 0
    for r in requests:
        s = r.shape[0]
        part = output[row:row + s]
        if spec.kind == "tokens" and spec.per_token_output:
            part = part[:, : r.shape[1]]
        results.append(part)
        row += s
    return results


def example_request(spec: InputSpec, samples: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """A random request of the right kind (workloads and tests)."""
    if spec.kind == "tokens":
        return torch.randint(0, spec.vocab_size, (samples, seq_len), generator=gen, dtype=torch.int64)
    return torch.randn((samples, *spec.sample_shape), generator=gen)
