"""A fused decoder layer's small operations as Triton kernels: RMSNorm (with the residual add
before it), rotary embedding with the key and value write into the pages (a decode step's one
token per row: `rotary_kv`; a prompt's tokens: `rotary_qkv_pages`, or `rotary_qkv` for a forward
job's micro-batch, which has no pages), and the SiLU-gated product of the MLP.

Why: a decode step of llama-3b at 16 rows replayed from a CUDA graph was 4.5 ms of GPU time, of
which ~1.75 ms were the matrix products and ~2.5 ms some 1,100 small elementwise, reduction,
index and copy kernels (~40 per layer: an RMSNorm alone is eight: cast, pow, mean, add, rsqrt,
two products, cast back), each ~1-8 µs for a few kilobytes (BENCHMARKS.md section 23). Each
kernel here does in one launch what those did in eight or ten, reading and writing each element
once. A prompt's rotary kernel replaced about fourteen: rotary of q and k as torch operations,
the keys' and values' gather and index-put into the pages, the key / value heads repeated for
their query heads; it also lays q, k and v out [B, T, H, Dh] so the attention's output needs no
copy (a 4 x 128 prefill of llama-3b: 6.98 -> 4.87 ms of GPU time, BENCHMARKS.md section 26).

Same numbers as the torch path (models/families/fused_decode.py, itself transformers' operations
in transformers' order): every intermediate that torch rounds to the activation dtype is rounded
here too (a product in bfloat16 is made in float32 and rounded, as torch's kernels do), only the
order of a row's sum of squares differs (a tree in both, of another shape). float32 jobs are
tested against HF `generate` on the GPU; bfloat16 agreement is reported (BENCHMARKS.md).

Registered as custom ops (`infscaled::rms_norm`, `add_rms_norm`, `silu_mul`, `rotary_kv`,
`rotary_qkv`, `rotary_qkv_pages`) so a
compiled layer calls them as opaque kernels, and a CUDA graph captures them like any kernel.
CUDA only (`available`); `TRITON_INTERPRET=1` runs them on CPU tensors (tests/test_triton_layer.py).
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: fused_decode.py keeps the torch operations there
    triton = None


def available() -> bool:
    return triton is not None


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests only)


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels serve this activation: on CUDA with Triton (or under TRITON_INTERPRET)."""
    return triton is not None and (x.is_cuda or _INTERPRET)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_r, stride_o, stride_s, n, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:  # hidden = residual + x, rounded to the dtype as torch's add rounds it
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
        h = x.to(tl.float32)
        variance = tl.sum(h * h, axis=0) / n
        h = h * tl.rsqrt(variance + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = w.to(tl.float32) * h.to(x.dtype).to(tl.float32)  # weight * h.to(dtype), as transformers' norm
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_o, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        a = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)  # F.silu, rounded, then the product
        tl.store(out_ptr + row * stride_o + cols, (a * u).to(dtype), mask=mask)

    @triton.jit
    def _rotate(base, cos_row, sin_row, r, mask, HALF: tl.constexpr):
        """One head's rotary embedding, in the activation dtype as transformers computes it:
        (x * cos) + (rotate_half(x) * sin), each product rounded (rotate_half(x) = cat(-x2, x1))."""
        x = tl.load(base + r, mask=mask, other=0.0)
        partner = tl.load(base + tl.where(r < HALF, r + HALF, r - HALF), mask=mask, other=0.0).to(tl.float32)
        rotated = tl.where(r < HALF, -partner, partner)  # (negation exact)
        c = tl.load(cos_row + r, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_row + r, mask=mask, other=0.0).to(tl.float32)
        dtype = x.dtype
        return ((x.to(tl.float32) * c).to(dtype).to(tl.float32) + (rotated * s).to(dtype).to(tl.float32)).to(dtype)

    @triton.jit
    def _rotary_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr,
                          stride_qkv, stride_cos, stride_sin, stride_qb, stride_qh, stride_tb,
                          stride_kp, stride_kt, stride_kh,
                          HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                          PAGE: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)  # query heads 0..HQ-1, then key/value heads
        r = tl.arange(0, BLOCK_D)
        mask = r < D
        base = qkv_ptr + b * stride_qkv + h * D
        y = _rotate(base, cos_ptr + b * stride_cos, sin_ptr + b * stride_sin, r, mask, D // 2)
        if h < HQ:
            tl.store(q_ptr + b * stride_qb + h * stride_qh + r, y, mask=mask)
        else:
            pos = tl.load(pos_ptr + b)
            page = tl.load(table_ptr + b * stride_tb + pos // PAGE)
            offs = page * stride_kp + (pos % PAGE) * stride_kt + (h - HQ) * stride_kh + r
            tl.store(k_ptr + offs, y, mask=mask)
            v = tl.load(base + HKV * D + r, mask=mask, other=0.0)  # this kv head's value: HKV heads further on
            tl.store(v_ptr + offs, v, mask=mask)

    # A prompt's width and its rows' rotary strides vary with every prefill: compiled once for all
    # of them (Triton would otherwise specialise on each value's divisibility, and compile anew
    # in front of running sequences the first time a width is seen).
    @triton.jit(do_not_specialize=["T", "stride_cb", "stride_sb"])
    def _rotary_qkv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, pool_k_ptr, pool_v_ptr, slot_ptr, T,
                           stride_qkv, stride_cb, stride_ct, stride_sb, stride_st, stride_slot, stride_ph,
                           HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                           WRITE: tl.constexpr):
        row = tl.program_id(0)  # token (b, t) of the [B, T] prompt tokens: every head of it
        b = row // T
        t = row % T
        h = tl.arange(0, BLOCK_H)[:, None]  # query heads 0..HQ-1, then key heads
        r = tl.arange(0, BLOCK_D)[None, :]
        in_d = r < D
        base = qkv_ptr + row * stride_qkv
        y = _rotate(base + h * D, cos_ptr + b * stride_cb + t * stride_ct, sin_ptr + b * stride_sb + t * stride_st,
                    r, (h < HQ + HKV) & in_d, D // 2)
        tl.store(q_ptr + (row * HQ + h) * D + r, y, mask=(h < HQ) & in_d)
        hk = h - HQ
        is_k = (h >= HQ) & (h < HQ + HKV) & in_d
        hv = tl.arange(0, BLOCK_V)[:, None]
        is_v = (hv < HKV) & in_d
        v = tl.load(base + (HQ + HKV + hv) * D + r, mask=is_v, other=0.0)
        for g in tl.static_range(GROUP):  # each key / value head as the GROUP query heads that read it
            tl.store(k_ptr + (row * HKV * GROUP + hk * GROUP + g) * D + r, y, mask=is_k)
            tl.store(v_ptr + (row * HKV * GROUP + hv * GROUP + g) * D + r, v, mask=is_v)
        if WRITE:
            slot = tl.load(slot_ptr + row)
            tl.store(pool_k_ptr + slot * stride_slot + hk * stride_ph + r, y, mask=is_k)
            tl.store(pool_v_ptr + slot * stride_slot + hv * stride_ph + r, v, mask=is_v)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] as rows [R, n] with unit stride along n (a view when it can be one)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _norm_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


@torch.library.custom_op("infscaled::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm of x [..., n] with `weight` [n]."""
    assert triton is not None
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(rows.shape[1])
    grid: Any = (rows.shape[0],)
    _rms_norm_kernel[grid](rows, rows, weight, out, out, rows.stride(0), rows.stride(0), out.stride(0),
                           out.stride(0), rows.shape[1], eps, HAS_RES=False, BLOCK=block, num_warps=_norm_warps(block))
    return out.view(x.shape)


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("infscaled::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, RMSNorm of that sum), both shaped like x."""
    assert triton is not None
    rows, res = _rows(x), _rows(residual)
    total = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(rows.shape[1])
    grid: Any = (rows.shape[0],)
    _rms_norm_kernel[grid](rows, res, weight, out, total, rows.stride(0), res.stride(0), out.stride(0),
                           total.stride(0), rows.shape[1], eps, HAS_RES=True, BLOCK=block,
                           num_warps=_norm_warps(block))
    return total.view(x.shape), out.view(x.shape)


@add_rms_norm.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


SILU_BLOCK = 1024


@torch.library.custom_op("infscaled::silu_mul", mutates_args=())
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] (gate, then up) -> F.silu(gate) * up [..., I]."""
    assert triton is not None
    rows = _rows(gate_up)
    inter = rows.shape[1] // 2
    out = torch.empty((rows.shape[0], inter), dtype=gate_up.dtype, device=gate_up.device)
    grid: Any = (rows.shape[0], triton.cdiv(inter, SILU_BLOCK))
    _silu_mul_kernel[grid](rows, out, rows.stride(0), out.stride(0), inter, BLOCK=SILU_BLOCK, num_warps=4)
    return out.view(*gate_up.shape[:-1], inter)


@silu_mul.register_fake
def _(gate_up: torch.Tensor) -> torch.Tensor:
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("infscaled::rotary_kv", mutates_args=("pool_k", "pool_v"))
def rotary_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
              table: torch.Tensor, positions: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """A decode step's q/k/v product qkv [B, 1, (Hq + 2 Hkv) Dh] with cos / sin [B, 1, Dh]: the
    rotated queries [B, Hq, 1, Dh]; the rotated key and the value of each row written into its
    page (table [B, P]) at its position (positions [B]) of pools [pages + 1, PAGE, Hkv, Dh]."""
    assert triton is not None
    b = qkv.shape[0]
    rows = _rows(qkv)
    c, s = _rows(cos), _rows(sin)
    q = torch.empty((b, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    grid: Any = (b, heads + kv_heads)
    _rotary_kv_kernel[grid](rows, c, s, q, pool_k, pool_v, table, positions,
                            rows.stride(0), c.stride(0), s.stride(0), q.stride(0), q.stride(1), table.stride(0),
                            pool_k.stride(0), pool_k.stride(1), pool_k.stride(2),
                            HQ=heads, HKV=kv_heads, D=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
                            PAGE=pool_k.shape[1], num_warps=1)
    return q.unsqueeze(2)


@rotary_kv.register_fake
def _(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
      table: torch.Tensor, positions: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    return qkv.new_empty((qkv.shape[0], heads, 1, head_dim))


def _rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                group: int, pools: tuple[torch.Tensor, torch.Tensor] | None,
                slots: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    assert triton is not None
    b, t = qkv.shape[:2]
    rows = _rows(qkv)
    c, s = (x if x.stride(-1) == 1 else x.contiguous() for x in (cos, sin))
    # Stored [B, T, H, Dh] and returned as [B, H, T, Dh] views: the attention's output then comes
    # back in the same layout, and the layer's [B, T, H * Dh] of it is a view, not a copy.
    q = torch.empty((b, t, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((b, t, kv_heads * group, head_dim), dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    pool_k, pool_v = pools if pools is not None else (k, v)
    if pools is not None:
        assert slots is not None and slots.numel() == b * t, f"slots for {b} x {t} tokens needed"
        assert pool_k.stride() == pool_v.stride() and pool_k.stride(0) == pool_k.shape[1] * pool_k.stride(1)
    block_h = triton.next_power_of_2(heads + kv_heads)
    grid: Any = (b * t,)
    _rotary_qkv_kernel[grid](rows, c, s, q, k, v, pool_k, pool_v, slots if slots is not None else rows, t,
                             rows.stride(0), c.stride(0) if c.shape[0] > 1 else 0, c.stride(1),
                             s.stride(0) if s.shape[0] > 1 else 0, s.stride(1), pool_k.stride(1), pool_k.stride(2),
                             HQ=heads, HKV=kv_heads, D=head_dim, GROUP=group, BLOCK_H=block_h,
                             BLOCK_V=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
                             WRITE=pools is not None, num_warps=4 if block_h * head_dim >= 2048 else 1)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


@torch.library.custom_op("infscaled::rotary_qkv", mutates_args=())
def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
               group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A prompt's q/k/v product qkv [B, T, (Hq + 2 Hkv) Dh] with cos / sin [B or 1, T, Dh]: the
    rotated queries [B, Hq, T, Dh], the rotated keys and the values [B, Hkv * group, T, Dh], each
    key / value head repeated `group` times (as transformers' repeat_kv: query head h reads kv
    head h // group; 1: not repeated). Views of [B, T, H, Dh] tensors."""
    return _rotary_qkv(qkv, cos, sin, heads, kv_heads, head_dim, group, None, None)


@torch.library.custom_op("infscaled::rotary_qkv_pages", mutates_args=("pool_k", "pool_v"))
def rotary_qkv_pages(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool_k: torch.Tensor,
                     pool_v: torch.Tensor, slots: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                     group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rotary_qkv`, and each token's key and value (once per kv head) written into pools
    [pages + 1, PAGE, Hkv, Dh] at its slot: `slots` [B * T], token (b, t)'s place in a pool seen as
    [slots, Hkv, Dh] (page * PAGE + offset; PagedBatch.slots)."""
    return _rotary_qkv(qkv, cos, sin, heads, kv_heads, head_dim, group, (pool_k, pool_v), slots)


def _rotary_qkv_fake(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                     group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t = qkv.shape[:2]
    kv = qkv.new_empty((b, t, kv_heads * group, head_dim))
    q = qkv.new_empty((b, t, heads, head_dim))
    return q.transpose(1, 2), kv.transpose(1, 2), torch.empty_like(kv).transpose(1, 2)


@rotary_qkv.register_fake
def _(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
      group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rotary_qkv_fake(qkv, heads, kv_heads, head_dim, group)


@rotary_qkv_pages.register_fake
def _(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
      slots: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
      group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rotary_qkv_fake(qkv, heads, kv_heads, head_dim, group)
