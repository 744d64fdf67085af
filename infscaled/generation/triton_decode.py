"""Paged decode attention as one Triton kernel: the "triton" backend of generation/paged_attention.py.

One program per (sequence, kv head): it loads the group of query heads that share the kv head
(GQA), walks the sequence's positions in blocks of BLOCK_T (pages looked up in its page table,
so no gather and no copy of the cache), keeps an online softmax in registers, and writes the
group's outputs. It reads each visible key and value once and nothing else: no block mask to
build, no per-shape compilation (Triton compiles once per head size and group, not per batch
shape), so a new decode bucket costs no compile time.

Registered as the custom op `infscaled::paged_decode` so a compiled decoder layer calls it as
one opaque kernel. CUDA only; `TRITON_INTERPRET=1` runs it on the CPU (tests).
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: paged_attention.py never picks this backend there
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr, out_ptr,
                             stride_qb, stride_qh, stride_tb, stride_kp, stride_kt, stride_kh,
                             stride_ob, stride_oh, scale_log2, window,
                             GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                             BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
        b = tl.program_id(0)
        hk = tl.program_id(1)
        rh = tl.arange(0, BLOCK_H)
        rd = tl.arange(0, D)
        rt = tl.arange(0, BLOCK_T)
        hmask = rh < GROUP
        heads = hk * GROUP + rh
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + rd[None, :], mask=hmask[:, None], other=0.0)
        last = tl.load(pos_ptr + b)  # the new token's position: the last one this row sees
        first = tl.maximum(last - window + 1, 0)  # no window: `window` is larger than any position
        m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, D), dtype=tl.float32)
        for blk in range(first // BLOCK_T, last // BLOCK_T + 1):
            t = blk * BLOCK_T + rt
            valid = (t <= last) & (t >= first)
            page = tl.load(table_ptr + b * stride_tb + t // PAGE, mask=valid, other=0)
            offs = page[:, None] * stride_kp + (t % PAGE)[:, None] * stride_kt + hk * stride_kh + rd[None, :]
            k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
            v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_H, BLOCK_T]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + rd[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=hmask[:, None])


# The launch's tile and schedule (benchmarks/paged_decode_tune.py measures the alternatives).
BLOCK_T = 64
NUM_WARPS = 4
NUM_STAGES: int | None = None  # Triton's default


def _launch(query: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, table: torch.Tensor,
            positions: torch.Tensor, scale: float, window: int, block_t: int | None = None,
            num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """query [B, Hq, Dh] (contiguous), pools [pages + 1, PAGE, Hkv, Dh] -> [B, Hq, Dh]."""
    assert triton is not None
    b, hq, dh = query.shape
    page, hkv = pool_k.shape[1], pool_k.shape[2]
    group = hq // hkv
    out = torch.empty_like(query)
    grid: Any = (b, hkv)
    _paged_decode_kernel[grid](
        query, pool_k, pool_v, table, positions, out,
        query.stride(0), query.stride(1), table.stride(0), pool_k.stride(0), pool_k.stride(1), pool_k.stride(2),
        out.stride(0), out.stride(1), scale * 1.4426950408889634, window if window > 0 else 1 << 40,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), D=dh, PAGE=page, BLOCK_T=block_t or BLOCK_T,
        # float32 jobs promise greedy = HF: no TF32 there.
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=num_warps or NUM_WARPS,
        **({} if (stages := num_stages or NUM_STAGES) is None else {"num_stages": stages}))
    return out


@torch.library.custom_op("infscaled::paged_decode", mutates_args=())
def paged_decode(query: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, table: torch.Tensor,
                 positions: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    return _launch(query.contiguous(), pool_k, pool_v, table, positions, scale, window)


@paged_decode.register_fake
def _(query: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, table: torch.Tensor,
      positions: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def supports(head_dim: int) -> bool:
    """Head sizes the kernel takes: a power of two >= 16 (tl.arange and tl.dot need them)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0
