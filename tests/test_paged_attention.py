"""Decode attention over the paged KV pools equals attention over each sequence's contiguous keys.

The reference is plain sdpa over one sequence's keys and values laid end to end (what a model
without pages computes). The backends of generation/paged_attention.py read the same pools
through page tables with scattered pages, padding rows and scratch entries: "torch" (gather +
mask, the CPU and CI path), "flex" (flex_attention's block mask; uncompiled on the CPU, the
compiled kernel in the GPU test) and "triton" (generation/triton_decode.py, GPU tests only). GQA
and a sliding window included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infscaled.generation.kv import PAGE_TOKENS
from infscaled.generation.paged_attention import check_backend, flex_decode, torch_decode


def _case(device: str, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """Pools of 12 pages + scratch; 3 real rows (lengths 5, 16, 37 incl. the new token) and a padding row."""
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, dh, pages = 4, 2, 16, 12  # flex's compiled kernels need head sizes >= 16
    pool_k = torch.randn(pages + 1, PAGE_TOKENS, hkv, dh, generator=gen).to(device, dtype)
    pool_v = torch.randn(pages + 1, PAGE_TOKENS, hkv, dh, generator=gen).to(device, dtype)
    scratch = pages
    # Rows' pages out of order and interleaved, as after frees; unused entries point at scratch.
    table = torch.tensor([[7, scratch, scratch], [2, scratch, scratch], [11, 0, 5], [scratch] * 3], device=device)
    positions = torch.tensor([4, 15, 36, 0], device=device)  # each row's new token (last visible position)
    query = torch.randn(4, hq, 1, dh, generator=gen).to(device, dtype)
    page_index = torch.zeros(pages + 1, dtype=torch.int64)  # page -> its index in its row (StageKV.page_index)
    for row in table[:3].tolist():
        for j, page in enumerate(row):
            if page != scratch:
                page_index[page] = j
    return query, pool_k, pool_v, table, positions, page_index.to(device)


def _reference(query: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, table: torch.Tensor,
               positions: torch.Tensor, window: int) -> torch.Tensor:
    rows = []
    for b in range(3):  # the real rows
        n = int(positions[b]) + 1
        pages = table[b, : -(-n // PAGE_TOKENS)]
        k = pool_k[pages].reshape(-1, *pool_k.shape[2:])[:n]  # [n, Hkv, Dh]
        v = pool_v[pages].reshape(-1, *pool_v.shape[2:])[:n]
        if window:
            k, v = k[-window:], v[-window:]
        rows.append(F.scaled_dot_product_attention(query[b:b + 1].float(), k.transpose(0, 1)[None].float(),
                                                   v.transpose(0, 1)[None].float(), enable_gqa=True))
    return torch.cat(rows)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_paged_decode_attention_equals_contiguous_attention(backend: str, window: int) -> None:
    query, pool_k, pool_v, table, positions, page_index = _case("cpu", torch.float32, seed=window)
    if backend == "torch":
        out = torch_decode(query, pool_k, pool_v, table, positions, 16 ** -0.5, window)
    else:
        out = flex_decode(query, pool_k, pool_v, table, positions, page_index, 16 ** -0.5, window)
    assert out.shape == query.shape
    want = _reference(query, pool_k, pool_v, table, positions, window)
    torch.testing.assert_close(out[:3], want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out[3]).all()  # the padding row attends to the scratch page: harmless


def test_unknown_backend_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError,
                       match="unknown paged attention backend 'flash'; one of torch, flex, triton$"):
        check_backend("flash")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [0, 6])
def test_compiled_flex_on_cuda_equals_the_torch_path(window: int) -> None:
    from infscaled.generation.paged_attention import _flex_compiled

    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        query, pool_k, pool_v, table, positions, page_index = _case("cuda", dtype, seed=3 + window)
        fast = _flex_compiled()(query, pool_k, pool_v, table, positions, page_index, 16 ** -0.5, window)
        plain = torch_decode(query, pool_k, pool_v, table, positions, 16 ** -0.5, window)
        err = float((fast[:3].float() - plain[:3].float()).norm() / plain[:3].float().norm())
        assert err < tol, (dtype, err)


def _triton_case(device: str, dtype: torch.dtype, seed: int, group: int) -> tuple[torch.Tensor, ...]:
    """Like _case, with llama-3b's head size (128), `group` query heads per kv head, longer rows."""
    gen = torch.Generator().manual_seed(seed)
    hkv, dh, pages, width = 2, 128, 40, 12
    pool_k = torch.randn(pages + 1, PAGE_TOKENS, hkv, dh, generator=gen).to(device, dtype)
    pool_v = torch.randn(pages + 1, PAGE_TOKENS, hkv, dh, generator=gen).to(device, dtype)
    perm = torch.randperm(pages, generator=gen)
    lengths = [1, 16, 17, 150, 191]  # incl. the new token: page edges, several 64-token blocks
    table = torch.full((len(lengths) + 1, width), pages, dtype=torch.int64)
    used = 0
    for r, n in enumerate(lengths):
        k = -(-n // PAGE_TOKENS)
        table[r, :k] = perm[used:used + k]
        used += k
    positions = torch.tensor([n - 1 for n in lengths] + [0])  # the last row is padding
    query = torch.randn(len(lengths) + 1, hkv * group, 1, dh, generator=gen).to(device, dtype)
    return query, pool_k, pool_v, table.to(device), positions.to(device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [0, 40])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_triton_paged_decode_equals_the_torch_path(window: int, group: int) -> None:
    """The "triton" backend (generation/triton_decode.py) on scattered pages, GQA groups that are
    and are not powers of two, a sliding window; float32 exactly as the plain path, bf16 within its rounding."""
    from infscaled.generation.paged_attention import attend_pages

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        query, pool_k, pool_v, table, positions = _triton_case("cuda", dtype, 5 + group + window, group)
        fast = attend_pages("triton", query, pool_k, pool_v, table, positions, positions, 128 ** -0.5, window)
        plain = torch_decode(query, pool_k, pool_v, table, positions, 128 ** -0.5, window).transpose(1, 2)
        assert fast.shape == plain.shape
        err = float((fast[:-1].float() - plain[:-1].float()).norm() / plain[:-1].float().norm())
        assert err < tol, (dtype, err)
        assert torch.isfinite(fast).all()


def _kernel_device() -> str:
    """Where the decode kernel runs in a test: "cuda", or "cpu" under Triton's interpreter
    (TRITON_INTERPRET=1; Triton >= 3.9 there: 3.6's interpreter cannot loop over a range read
    from memory, which compiled kernels do on any version); else the test skips."""
    import os

    from infscaled.generation import triton_decode

    if not triton_decode.available():
        pytest.skip("needs triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA (or TRITON_INTERPRET=1)")
    import triton

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"Triton {triton.__version__}'s interpreter: the decode kernel needs >= 3.9 there")
    return "cpu"


def test_split_plan_splits_few_rows_into_whole_blocks() -> None:
    from infscaled.generation.triton_decode import split_plan

    assert split_plan(8, 8, 256, 64, 528) == (1, 4)  # 64 programs: every block its own split
    assert split_plan(8, 8, 1024, 64, 528) == (2, 8)  # 16 blocks, 9 splits wanted: 2 blocks each
    assert split_plan(64, 8, 256, 64, 528) == (2, 2)
    assert split_plan(128, 8, 4096, 64, 528) == (64, 1)  # enough programs already: one per row
    assert split_plan(8, 8, 1024, 64, 0) == (16, 1)  # splitting off
    assert split_plan(64, 8, 256, 64, 264) == (4, 1)  # the default: 64 rows are enough
    assert split_plan(1, 1, 1, 64, 528) == (1, 1)


def test_split_threshold_is_two_programs_per_multiprocessor_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from infscaled.generation import triton_decode

    assert triton_decode.SPLIT_PROGRAMS is None
    assert triton_decode.split_threshold(torch.device("cpu")) == 264  # (the interpreter's: as an H200)
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert triton_decode.split_threshold(torch.device("cuda", 0)) == 2 * sms
    monkeypatch.setattr(triton_decode, "SPLIT_PROGRAMS", 0)
    assert triton_decode.split_threshold(torch.device("cpu")) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("window", [0, 40])
@pytest.mark.parametrize(("block_t", "programs"), [(64, 10_000), (16, 48), (16, 0)])
def test_triton_split_decode_equals_the_torch_path(window: int, block_t: int, programs: int) -> None:
    """The kernel with each row's blocks split across programs (flash-decoding, merged by the
    row's last split) equals the plain path: rows of one block (written directly), of several
    splits, split counts that do not divide the blocks, a window; the counters are zero after
    each launch, so a second launch (a graph replay) on the same counters gives the same output.
    On CUDA, or on the CPU under TRITON_INTERPRET=1."""
    from infscaled.generation import triton_decode

    device = _kernel_device()
    # (bf16 on CUDA only: Triton 3.9's interpreter returns garbage for this kernel's bf16 dots,
    # split or not, while the unsplit kernel's bf16 test above passes on an H200.)
    dtypes = ((torch.float32, 1e-5), (torch.bfloat16, 2e-2))[:2 if device == "cuda" else 1]
    for dtype, tol in dtypes:
        query, pool_k, pool_v, table, positions = _triton_case(device, dtype, 11 + window + block_t, 3)
        q = query.squeeze(2).contiguous()
        per_split, splits = triton_decode.split_plan(q.shape[0], pool_k.shape[2], table.shape[1] * PAGE_TOKENS,
                                                     block_t, programs)
        assert (splits > 1) == (programs > 0)
        plain = torch_decode(query, pool_k, pool_v, table, positions, 128 ** -0.5, window).squeeze(2)
        outs = [triton_decode._launch(q, pool_k, pool_v, table, positions, 128 ** -0.5, window, block_t=block_t,
                                      split_programs=programs) for _ in range(2)]
        for out in outs:
            err = float((out[:-1].float() - plain[:-1].float()).norm() / plain[:-1].float().norm())
            assert err < tol, (dtype, err, per_split, splits)
        assert torch.equal(outs[0][:-1], outs[1][:-1])
        counts = triton_decode._counters.get(q.device)
        assert counts is None or int(counts.abs().sum()) == 0


@pytest.mark.gpu
def test_a_capture_without_counters_launches_unsplit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counters are never made inside a CUDA graph capture (they would live in that graph's
    private pool): a capture that finds none runs the row unsplit, correctly, and makes none;
    the next launch outside a capture makes them and splits. On CUDA or TRITON_INTERPRET=1."""
    from infscaled.generation import triton_decode

    device = _kernel_device()
    monkeypatch.setattr(triton_decode, "_counters", {})
    query, pool_k, pool_v, table, positions = _triton_case(device, torch.float32, 5, 3)
    q = query.squeeze(2).contiguous()
    plain = torch_decode(query, pool_k, pool_v, table, positions, 128 ** -0.5, 0).squeeze(2)
    for capturing in (True, False):
        monkeypatch.setattr(triton_decode, "_capturing", lambda _device, c=capturing: c)
        out = triton_decode._launch(q, pool_k, pool_v, table, positions, 128 ** -0.5, 0, split_programs=10_000)
        torch.testing.assert_close(out[:-1], plain[:-1], rtol=1e-5, atol=1e-5)
        assert (q.device in triton_decode._counters) == (not capturing)
