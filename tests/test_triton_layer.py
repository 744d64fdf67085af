"""The fused layer's Triton kernels (generation/triton_layer.py) compute what the torch operations
of models/families/fused_decode.py compute: RMSNorm (and the residual add before it), SiLU-gated
product, rotary embedding with the key / value write into the pages.

Marked `gpu`: they run on CUDA; on a CPU they run only under Triton's interpreter
(`TRITON_INTERPRET=1` with triton installed), and skip otherwise (CI has neither).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infscaled.generation import triton_layer
from infscaled.generation.kv import PAGE_TOKENS, write_decode_kv

pytestmark = pytest.mark.gpu


@pytest.fixture
def device() -> str:
    if not triton_layer.available():
        pytest.skip("needs triton")
    if torch.cuda.is_available():
        return "cuda"
    if triton_layer._INTERPRET:
        return "cpu"
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)")


def torch_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def torch_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    else:  # two bfloat16 rounding steps apart at most (Triton's interpreter rounds by truncation)
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [64, 200])
def test_rms_norm_and_the_residual_add_before_it(device: str, dtype: torch.dtype, width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    x = (torch.randn(3, 2, width, generator=gen) * 3).to(device, dtype)
    residual = torch.randn(3, 2, width, generator=gen).to(device, dtype)
    w = (torch.rand(width, generator=gen) + 0.5).to(device, dtype)
    check(torch.ops.infscaled.rms_norm(x, w, 1e-5), torch_rms_norm(x, w, 1e-5), dtype)
    total, normed = torch.ops.infscaled.add_rms_norm(x, residual, w, 1e-6)
    check(total, residual + x, dtype)
    check(normed, torch_rms_norm(residual + x, w, 1e-6), dtype)
    # a view with a row stride (the last column of a wider tensor) is read as its rows
    wide = torch.randn(4, width + 8, generator=gen).to(device, dtype)
    check(torch.ops.infscaled.rms_norm(wide[:, :width], w, 1e-5), torch_rms_norm(wide[:, :width], w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_is_the_gated_product(device: str, dtype: torch.dtype) -> None:
    inter = 1500  # not a multiple of the kernel's block
    gu = (torch.randn(2, 1, 2 * inter, generator=torch.Generator().manual_seed(1)) * 4).to(device, dtype)
    got = torch.ops.infscaled.silu_mul(gu)
    want = F.silu(gu[..., :inter]) * gu[..., inter:]
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    else:
        check(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 12])
def test_rotary_kv_rotates_q_and_writes_k_and_v_into_their_pages(device: str, dtype: torch.dtype,
                                                                 head_dim: int) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    heads, kv_heads, pages, rows = 4, 2, 6, 3
    qkv = torch.randn(rows, 1, (heads + 2 * kv_heads) * head_dim, generator=gen).to(device, dtype)
    angle = torch.rand(rows, 1, head_dim // 2, generator=gen) * 6
    cos = torch.cat([angle.cos(), angle.cos()], -1).to(device, dtype)
    sin = torch.cat([angle.sin(), angle.sin()], -1).to(device, dtype)
    pools = [torch.randn(pages + 1, PAGE_TOKENS, kv_heads, head_dim, generator=gen).to(device, dtype)
             for _ in range(2)]
    table = torch.tensor([[3, 6, 6], [0, 5, 6], [6, 6, 6]], device=device)  # row 2: padding (scratch page 6)
    positions = torch.tensor([7, 20, 0], device=device)
    want_k, want_v = (p.clone() for p in pools)
    nq, nkv = heads * head_dim, kv_heads * head_dim
    q = qkv[..., :nq].view(rows, 1, heads, head_dim).transpose(1, 2)
    k = qkv[..., nq:nq + nkv].view(rows, 1, kv_heads, head_dim).transpose(1, 2)
    v = qkv[..., nq + nkv:].view(rows, 1, kv_heads, head_dim).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    write_decode_kv(want_k, want_v, table, positions, torch_rotate(k, c, s), v)
    got_q = torch.ops.infscaled.rotary_kv(qkv, cos, sin, pools[0], pools[1], table, positions, heads, kv_heads,
                                          head_dim)
    check(got_q, torch_rotate(q, c, s), dtype)
    check(pools[0], want_k, dtype)
    assert torch.equal(pools[1], want_v)  # values are copied, not computed
    assert not torch.equal(pools[0], want_k.new_zeros(want_k.shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shared_angles", "group"), [(True, 3), (False, 1)])
def test_rotary_qkv_rotates_a_prefill_and_writes_its_keys_and_values_into_their_slots(
        device: str, dtype: torch.dtype, shared_angles: bool, group: int) -> None:
    """The prefill kernel: q, k (rotated) and v [B, H, T, Dh] as the torch path makes them (k and
    v repeated for each query head with `group` 3, as repeat_kv), with cos / sin per row or shared
    by the rows ([1, T, Dh]), and each token's key and value written once to its pool slot
    (page * PAGE + offset; padding to the scratch page); without pools, nothing written."""
    from infscaled.generation.kv import StageKV

    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim, rows, t = 6, 2, 12, 2, 21
    qkv = torch.randn(rows, t, (heads + 2 * kv_heads) * head_dim, generator=gen).to(device, dtype)
    angle = torch.rand(1 if shared_angles else rows, t, head_dim // 2, generator=gen) * 6
    cos = torch.cat([angle.cos(), angle.cos()], -1).to(device, dtype)
    sin = torch.cat([angle.sin(), angle.sin()], -1).to(device, dtype)
    kv = StageKV(256, device)
    batch = kv.prefill([1, 2], [21, 9], [40, 30])  # row 1: 12 columns of padding
    pools = kv.pools_for(0, kv_heads, head_dim, dtype, torch.device(device))
    want = [p.clone() for p in pools]
    nq, nkv = heads * head_dim, kv_heads * head_dim
    q = qkv[..., :nq].view(rows, t, heads, head_dim).transpose(1, 2)
    k = qkv[..., nq:nq + nkv].view(rows, t, kv_heads, head_dim).transpose(1, 2)
    v = qkv[..., nq + nkv:].view(rows, t, kv_heads, head_dim).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    want_k = torch_rotate(k, c, s)
    slots = batch.slots(t)
    for pool, x in zip(want, (want_k, v), strict=True):
        pool.view(-1, kv_heads, head_dim)[slots] = x.transpose(1, 2).reshape(rows * t, kv_heads, head_dim)
    got_q, got_k, got_v = torch.ops.infscaled.rotary_qkv_pages(qkv, cos, sin, *pools, slots, heads, kv_heads,
                                                               head_dim, group)
    check(got_q, torch_rotate(q, c, s), dtype)
    check(got_k, want_k.repeat_interleave(group, dim=1), dtype)
    assert torch.equal(got_v, v.repeat_interleave(group, dim=1))
    # [B, T, H, Dh] underneath: the attention's output [B, H, T, Dh] then flattens to [B, T, H * Dh] as a view
    assert got_q.transpose(1, 2).is_contiguous() and got_k.transpose(1, 2).is_contiguous()
    scratch = kv.scratch_page
    for got, expected in zip(pools, want, strict=True):  # the real positions; padding only touched scratch
        check(got[:scratch], expected[:scratch], dtype)
    for s_, n in ((1, 21), (2, 9)):  # every real position is where decode steps will read it
        for pos in range(n):
            page, off = kv.pages[s_][pos // PAGE_TOKENS], pos % PAGE_TOKENS
            row = [1, 2].index(s_)
            check(pools[0][page, off], want_k[row, :, pos], dtype)
    before = [p.clone() for p in pools]
    again = torch.ops.infscaled.rotary_qkv(qkv, cos, sin, heads, kv_heads, head_dim, group)  # a forward job's
    for got, expected in zip(again, (got_q, got_k, got_v), strict=True):
        assert torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(pools, before, strict=True))  # no pages: nothing written
