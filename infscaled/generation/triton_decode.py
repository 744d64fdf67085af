"""Paged decode attention as one Triton kernel: the "triton" backend of generation/paged_attention.py.

One program per (sequence, kv head): it loads the group of query heads that share the kv head
(GQA), walks the sequence's positions in blocks of BLOCK_T (pages looked up in its page table,
so no gather and no copy of the cache), keeps an online softmax in registers, and writes the
group's outputs. It reads each visible key and value once and nothing else: no block mask to
build, no per-shape compilation (Triton compiles once per head size and group, not per batch
shape), so a new decode bucket costs no compile time.

With few rows (fewer sequence x kv-head programs than `split_threshold`, two per
multiprocessor) each row's blocks are split across programs (flash-decoding, `split_plan`):
each split keeps its own softmax statistics, and the last of a row's splits to finish merges
them in the same launch (an atomic counter per row and kv head), so there is no second kernel.

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
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr, out_ptr, part_ptr, ml_ptr, count_ptr,
                             stride_qb, stride_qh, stride_tb, stride_kp, stride_kt, stride_kh,
                             stride_ob, stride_oh, scale_log2, window, per_split,
                             GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                             BLOCK_T: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr):
        b = tl.program_id(0)
        hk = tl.program_id(1)
        rh = tl.arange(0, BLOCK_H)
        rd = tl.arange(0, D)
        rt = tl.arange(0, BLOCK_T)
        hmask = rh < GROUP
        heads = hk * GROUP + rh
        last = tl.load(pos_ptr + b)  # the new token's position: the last one this row sees
        first = tl.maximum(last - window + 1, 0)  # no window: `window` is larger than any position
        lo = first // BLOCK_T
        hi = last // BLOCK_T + 1
        sp = tl.program_id(2)  # (0 when not split: a grid of one split)
        n_split = tl.cdiv(hi - lo, per_split)
        if SPLIT:  # this program's share of the row's blocks: `per_split` of them, from split `sp`
            lo = lo + sp * per_split
            hi = tl.minimum(hi, lo + per_split)
        if lo < hi:  # a split past the row's last block has nothing to do
            q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + rd[None, :], mask=hmask[:, None],
                        other=0.0)
            m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_H, D), dtype=tl.float32)
            for blk in range(lo, hi):
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
            out_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + rd[None, :]
            # (Two branches, not `not SPLIT or ...`: SPLIT is a compile-time constant, so the
            # unsplit kernel has no scratch and no atomics compiled in.)
            if not SPLIT:  # noqa: SIM114
                tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=hmask[:, None])
            elif n_split == 1:
                tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=hmask[:, None])
            else:
                # Flash-decoding: the split's unnormalised sum and its softmax statistics go to a
                # scratch slot; the row's last split to finish (counted by an atomic that it
                # then resets, so the counters are zero again for the next launch or replay)
                # merges every slot and writes the output.
                row = b * tl.num_programs(1) + hk
                slot = row * tl.num_programs(2) + sp
                tl.store(part_ptr + (slot * BLOCK_H + rh[:, None]) * D + rd[None, :], acc, mask=hmask[:, None])
                tl.store(ml_ptr + (slot * 2) * BLOCK_H + rh, m_i, mask=hmask)
                tl.store(ml_ptr + (slot * 2 + 1) * BLOCK_H + rh, l_i, mask=hmask)
                tl.debug_barrier()  # every thread's stores before the release below
                done = tl.atomic_add(count_ptr + row, 1, sem="acq_rel")
                if done == n_split - 1:
                    tl.atomic_xchg(count_ptr + row, 0, sem="relaxed")
                    m_all = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
                    l_all = tl.zeros((BLOCK_H,), dtype=tl.float32)
                    o_all = tl.zeros((BLOCK_H, D), dtype=tl.float32)
                    for j in range(0, n_split):
                        other = row * tl.num_programs(2) + j
                        m_j = tl.load(ml_ptr + (other * 2) * BLOCK_H + rh, mask=hmask, other=0.0,
                                      cache_modifier=".cg")
                        l_j = tl.load(ml_ptr + (other * 2 + 1) * BLOCK_H + rh, mask=hmask, other=0.0,
                                      cache_modifier=".cg")
                        o_j = tl.load(part_ptr + (other * BLOCK_H + rh[:, None]) * D + rd[None, :],
                                      mask=hmask[:, None], other=0.0, cache_modifier=".cg")
                        m_new = tl.maximum(m_all, m_j)
                        a_old = tl.exp2(m_all - m_new)
                        a_j = tl.exp2(m_j - m_new)
                        l_all = l_all * a_old + l_j * a_j
                        o_all = o_all * a_old[:, None] + o_j * a_j[:, None]
                        m_all = m_new
                    l_all = tl.where(hmask, l_all, 1.0)
                    tl.store(out_ptrs, (o_all / l_all[:, None]).to(out_ptr.dtype.element_ty), mask=hmask[:, None])


# The launch's tile and schedule (benchmarks/paged_decode_tune.py measures the alternatives;
# BENCHMARKS.md section 27: these were the least total time over 8 / 64 / 128 rows of 192 and
# 1,024 positions on an H200).
BLOCK_T = 64
NUM_WARPS = 4
NUM_STAGES: int | None = 2  # None: Triton's default (3)
# Split a row's positions across programs (flash-decoding) while the batch alone gives fewer
# than `split_threshold(device)` programs (sequences x kv heads): few rows of long contexts are
# otherwise one program per (row, kv head) walking every block in turn, most multiprocessors
# idle. SPLITS_PER_SM per multiprocessor (on an H200, 132 of them: 264; 4 per multiprocessor
# split 64 rows in two, which was slower); SPLIT_PROGRAMS, when set, overrides it (0: never).
SPLITS_PER_SM = 2
SPLIT_PROGRAMS: int | None = None
_SMS_OFF_CUDA = 132  # Triton's interpreter (tests): as an H200


def split_threshold(device: torch.device) -> int:
    """The program count below which a launch on `device` splits its rows' positions."""
    if SPLIT_PROGRAMS is not None:
        return SPLIT_PROGRAMS
    sms = _sms.get(device)
    if sms is None:
        sms = _sms[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                              if device.type == "cuda" else _SMS_OFF_CUDA)
    return SPLITS_PER_SM * sms


_sms: dict[torch.device, int] = {}

_counters: dict[torch.device, torch.Tensor] = {}
_retired: list[torch.Tensor] = []  # outgrown counters: a captured graph may still use them


def _counts(device: torch.device, rows: int) -> torch.Tensor | None:
    """The split kernel's per-(row, kv head) arrival counters on `device`: zero between launches
    (each launch's last split resets its own), so one buffer serves every launch and graph
    replay on the device as long as they run one after another, as a stage's decode steps do
    (one compute stream); grown by replacement (4,096 rows x kv heads at first), never freed.
    None while a CUDA graph is being captured and no buffer fits: one made inside a capture
    would come from (and could later be reused through) that graph's private memory pool."""
    have = _counters.get(device)
    if have is None or have.numel() < rows:
        if _capturing(device):
            return None
        if have is not None:
            _retired.append(have)
        have = _counters[device] = torch.zeros(max(rows, 4096), dtype=torch.int32, device=device)
    return have


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def split_plan(rows: int, kv_heads: int, positions: int, block_t: int, programs: int) -> tuple[int, int]:
    """(blocks per split, splits) for rows of up to `positions` positions: as many splits as
    bring rows x kv_heads x splits to `programs`, each split whole blocks; (blocks, 1) when the
    batch alone has enough programs (or `programs` is 0)."""
    blocks = max(1, -(-positions // block_t))
    want = min(blocks, -(-programs // max(1, rows * kv_heads))) if programs > 0 else 1
    per_split = -(-blocks // max(1, want))
    return per_split, -(-blocks // per_split)


def _launch(query: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, table: torch.Tensor,
            positions: torch.Tensor, scale: float, window: int, block_t: int | None = None,
            num_warps: int | None = None, num_stages: int | None = None,
            split_programs: int | None = None) -> torch.Tensor:
    """query [B, Hq, Dh] (contiguous), pools [pages + 1, PAGE, Hkv, Dh] -> [B, Hq, Dh]. The
    split (blocks per program) follows from the page table's width, not the rows' lengths, so a
    graph-captured launch has one grid for every replay."""
    assert triton is not None
    b, hq, dh = query.shape
    page, hkv = pool_k.shape[1], pool_k.shape[2]
    group = hq // hkv
    block_t = block_t or BLOCK_T
    block_h = max(16, triton.next_power_of_2(group))
    per_split, splits = split_plan(b, hkv, table.shape[1] * page, block_t,
                                   split_threshold(query.device) if split_programs is None else split_programs)
    out = torch.empty_like(query)
    counts = _counts(query.device, b * hkv) if splits > 1 else None
    if counts is None:  # not split (or no counters inside a capture: that graph runs unsplit)
        per_split, splits = per_split * splits, 1
        part = ml = counts = out  # not read: the kernel's SPLIT branch is compiled out
    else:
        part = torch.empty(b * hkv * splits * block_h * dh, dtype=torch.float32, device=query.device)
        ml = torch.empty(b * hkv * splits * 2 * block_h, dtype=torch.float32, device=query.device)
    grid: Any = (b, hkv, splits)
    _paged_decode_kernel[grid](
        query, pool_k, pool_v, table, positions, out, part, ml, counts,
        query.stride(0), query.stride(1), table.stride(0), pool_k.stride(0), pool_k.stride(1), pool_k.stride(2),
        out.stride(0), out.stride(1), scale * 1.4426950408889634, window if window > 0 else 1 << 40, per_split,
        GROUP=group, BLOCK_H=block_h, D=dh, PAGE=page, BLOCK_T=block_t,
        # float32 jobs promise greedy = HF: no TF32 there.
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", SPLIT=splits > 1,
        num_warps=num_warps or NUM_WARPS,
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
