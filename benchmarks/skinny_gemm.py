"""A candidate for the decode step's matrix products with few rows (M <= 64), in Triton:
out = x @ weight.T. Measured against cuBLAS by benchmarks/gemm_shapes.py (BENCHMARKS.md
section 14): within a few percent of cuBLAS at every llama-3b shape, so the product stays
cuBLAS's and this kernel stays here, a benchmark baseline, not part of the package.

It streams the weight once, a [BLOCK_N, BLOCK_K] tile per iteration, with the few rows of x
in registers, and splits K across programs when N alone gives too few programs to keep every
multiprocessor's loads in flight (partial sums added in float32 by atomics).

CUDA only (Triton); `TRITON_INTERPRET=1` runs it on the CPU for tests.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain matmul path is used
    triton = None


if triton is not None:

    @triton.jit
    def _skinny_kernel(x_ptr, w_ptr, out_ptr, M, N, K, K_PER, stride_xm, stride_wn, stride_om,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * K_PER
        for k0 in range(0, K_PER, BLOCK_K):
            ks = k_start + k0 + rk
            x = tl.load(x_ptr + rm[:, None] * stride_xm + ks[None, :],
                        mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + ks[None, :],
                        mask=(rn[:, None] < N) & (ks[None, :] < K), other=0.0)
            acc += tl.dot(x, tl.trans(w))
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
        if SPLIT_K == 1:
            tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(ptrs, acc, mask=mask)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, block_n: int = 32, block_k: int = 256, split_k: int = 1,
                  num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """x [M, K] (M <= 64) @ weight[N, K].T -> [M, N] in x's dtype."""
    assert triton is not None, "skinny_linear needs Triton"
    m, k = x.shape
    n = weight.shape[0]
    assert m <= 64 and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    if split_k == 1:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    grid: Any = (triton.cdiv(n, block_n), split_k)
    k_per = triton.cdiv(k, split_k * block_k) * block_k  # K columns per split, whole tiles
    _skinny_kernel[grid](x, weight, out, m, n, k, k_per, x.stride(0), weight.stride(0), out.stride(0),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                         num_warps=num_warps, num_stages=num_stages)
    return out if split_k == 1 else out.to(x.dtype)
