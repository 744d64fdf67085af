"""Decode attention read straight from the paged KV pools (generation/kv.py), no per-step gather.

How it plugs into transformers: every decoder attention module of a stage gets its own copy of
the config whose `_attn_implementation` is `PAGED` (`route_attention`, called by the family
adapters). transformers then calls `paged_attention_forward` instead of sdpa/eager. On a decode
step the family unit passes the micro-batch's `PagedBatch` as the keyword `paged_kv`; the cache's
`update` has written the new token's key and value into the pools and returned the pools
themselves, and this module attends over them. Anything else (prefill, the monolith's own HF
forward, encoder models) has no `paged_kv` and goes to the implementation the config named
before, unchanged.

Backends (`BACKENDS`, chosen per `DecodeStep`, default `default_backend`):
- "torch": gathers each row's pages into [B, H, P * PAGE, Dh] and runs sdpa with a mask. Plain
  PyTorch on any device: CPU stages and CI use it, and it is the reference the others are
  tested against.
- "flex": PyTorch's own `flex_attention`, compiled, reading the pools in place. The pool of a
  layer is one long sequence [1, Hkv, (pages + 1) * PAGE, Dh]; a block mask with one block per
  page lists each row's pages (its page table) and a mask_mod keeps each row to its own
  positions 0..p_b (and the sliding window): no gather, no copy of the cache, and the kernel
  reads only the pages a row owns. Needs CUDA (Triton) and head sizes >= 16; CPU runs it
  uncompiled (tests only). It compiles once per decode shape, so `DecodeStep` uses it for its
  fixed-shape buckets (those CUDA graphs replay); exact-size eager batches take "torch".
- "triton": one hand-written Triton kernel (generation/triton_decode.py) reading the pools
  through the page table, online softmax, one program per (row, kv head). No per-shape
  compilation, so every batch (bucketed or exact) can use it; the CUDA default where Triton is
  installed. Head sizes it does not take (not a power of two >= 16) fall back to "torch".
Soft-capped attention scores (Gemma 2) only "torch" implements; such layers take it on any backend.
Measured on an H200: BENCHMARKS.md sections 10 and 14.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from infscaled.generation.kv import gather_pages

if TYPE_CHECKING:
    from infscaled.generation.kv import PagedBatch

PAGED = "infscaled_paged"
BACKENDS = ("torch", "flex", "triton")
FLEX_MIN_HEAD_DIM = 16  # flex_attention's kernels need head sizes >= 16; smaller heads use "torch"
_registered = False
_compiled: dict[str, Callable[..., torch.Tensor]] = {}


def default_backend(device: torch.device) -> str:
    from infscaled.generation import triton_decode

    if device.type != "cuda":
        return "torch"
    return "triton" if triton_decode.available() else "flex"


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown paged attention backend {name!r}; one of {', '.join(BACKENDS)}")
    return name


def route_attention(attention: torch.nn.Module) -> None:
    """Send this attention module's calls through `paged_attention_forward` (see the module
    docstring). Idempotent; the model's other modules keep the shared config."""
    _register()
    config = attention.config
    if getattr(config, "_attn_implementation", None) == PAGED:
        return
    own = copy.copy(config)
    own.infscaled_fallback_attention = config._attn_implementation or "eager"
    own._attn_implementation = PAGED
    attention.config = own


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(PAGED, paged_attention_forward)
        _registered = True


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any, scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-interface signature. query [B, Hq, T, Dh]; on a decode step
    (`paged_kv` given) key/value are the layer's pools [pages + 1, PAGE, Hkv, Dh]."""
    paged: PagedBatch | None = kwargs.pop("paged_kv", None)
    kwargs.pop("kv_pools", None)  # for the cache's update (PagedBatch.update); key/value are the pools
    if paged is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        name = module.config.infscaled_fallback_attention
        # "eager" is not in the registry: each transformers model module has its own.
        fallback = (ALL_ATTENTION_FUNCTIONS[name] if name in ALL_ATTENTION_FUNCTIONS
                    else sys.modules[type(module).__module__].eager_attention_forward)
        result: tuple[Any, Any] = fallback(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        return result
    window = kwargs.get("sliding_window") or 0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(paged, query, key, value, float(scale), int(window), float(kwargs.get("softcap") or 0.0))
    return out, None


def attend(paged: PagedBatch, query: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, scale: float,
           window: int, softcap: float = 0.0) -> torch.Tensor:
    """One decode step's attention: query [B, Hq, 1, Dh] over each row's pages -> [B, 1, Hq, Dh]."""
    assert paged.table is not None and paged.positions is not None
    return attend_pages(paged.attention, query, pool_k, pool_v, paged.table, paged.positions, paged.kv.page_index,
                        scale, window, softcap)


def attend_pages(backend: str, query: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, table: torch.Tensor,
                 positions: torch.Tensor, page_index: torch.Tensor, scale: float, window: int,
                 softcap: float = 0.0) -> torch.Tensor:
    """`attend` on the batch's tensors (what a compiled decoder layer passes): -> [B, 1, Hq, Dh].
    `softcap` (Gemma 2's attention logit soft-capping, cap * tanh(score / cap)) only the plain
    path implements: such a layer's decode attention takes it whatever the backend."""
    dim = query.shape[-1]
    if backend == "triton" and not softcap and query.is_cuda and _triton_ok(dim):
        out = torch.ops.infscaled.paged_decode(query.squeeze(2), pool_k, pool_v, table, positions, scale, window)
        return out.unsqueeze(1)  # [B, Hq, Dh] -> [B, 1, Hq, Dh]
    # "triton" with a head size its kernel does not take (or off CUDA) takes the plain path, not
    # flex: flex would compile for every exact-size batch (generation/graphs.py's eager steps).
    if backend == "flex" and not softcap and dim >= FLEX_MIN_HEAD_DIM:
        # Inside a compiled layer dynamo traces flex_decode itself; eager CUDA calls its compiled twin.
        run = _flex_compiled() if query.is_cuda and not torch.compiler.is_compiling() else flex_decode
        out = run(query, pool_k, pool_v, table, positions, page_index, scale, window)
    else:
        out = torch_decode(query, pool_k, pool_v, table, positions, scale, window, softcap)
    return out.transpose(1, 2).contiguous()


def _triton_ok(head_dim: int) -> bool:
    from infscaled.generation import triton_decode

    return triton_decode.available() and triton_decode.supports(head_dim)


def torch_decode(query: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, table: torch.Tensor,
                 positions: torch.Tensor, scale: float, window: int, softcap: float = 0.0) -> torch.Tensor:
    """The plain path: gather [B, Hkv, P * PAGE, Dh], mask, sdpa (or, with `softcap`, the
    scores capped before the softmax, as transformers' eager attention does). -> [B, Hq, 1, Dh]."""
    keys, values = gather_pages(pool_k, table), gather_pages(pool_v, table)  # [B, Hkv, P * PAGE, Dh]
    j = torch.arange(keys.shape[2], device=table.device).unsqueeze(0)
    last = positions.unsqueeze(1)  # [B, 1]
    allowed = j <= last
    if window:
        allowed &= j > last - window
    gqa = query.shape[1] != keys.shape[1]
    if softcap:
        groups = query.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, keys.transpose(2, 3)) * scale  # [B, Hq, 1, P * PAGE]
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(weights, values)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed[:, None, None, :], scale=scale,
                                          enable_gqa=gqa)


def flex_decode(query: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, table: torch.Tensor,
                positions: torch.Tensor, page_index: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """flex_attention over the pools in place. -> [B, Hq, 1, Dh]. Compiled on CUDA: the block
    mask is built from tensor arguments inside the compiled region, so one compiled graph serves
    every batch of the same shape (no closure over per-batch objects)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    pages, page, heads, dim = pool_k.shape
    b, p = table.shape
    length = pages * page
    # page_index (StageKV.page_index): a page belongs to at most one live sequence, at one index
    # of its page list. An input, not computed here: a map built in place inside the compiled
    # region (zeros, then scatter) was read by the compiled kernel before the scatter (torch 2.11).
    def keep(b_idx: torch.Tensor, h_idx: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        # kv_idx is a slot of the pool: visible to row b when its page is row b's page number
        # `index` and index * PAGE + offset is one of row b's positions 0..p_b (in the window).
        phys = kv_idx // page
        index = page_index[phys]
        pos = index * page + kv_idx % page
        last = positions[b_idx]
        # (index < p: a page of a longer sequence in another row; the uncompiled path asks about
        # every slot, the compiled kernel only about row b's listed pages.)
        ok = (index < p) & (table[b_idx, index.clamp(max=p - 1)] == phys) & (pos <= last)
        if window:
            ok = ok & (pos > last - window)
        return ok

    # GQA: the query heads sharing a kv head become that head's queries (query head h uses kv
    # head h // group, as transformers' repeat_kv has it): [B, Hkv, group, Dh]. Then flex runs its
    # decoding kernel, which with enable_gqa needs a power-of-two group (llama-3b's is 3).
    group = query.shape[1] // heads
    grouped = query.reshape(b, heads, group, dim)
    # One block per page, one query block: row b's blocks are its first p_b // PAGE + 1 pages.
    counts = (positions // page + 1).to(torch.int32).view(b, 1, 1)
    indices = table.to(torch.int32).view(b, 1, 1, p)
    mask = BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=(128, page), mask_mod=keep,
                                    seq_lengths=(group, length), compute_q_blocks=False)
    keys = pool_k.view(1, length, heads, dim).transpose(1, 2)  # [1, Hkv, L, Dh], a view
    values = pool_v.view(1, length, heads, dim).transpose(1, 2)
    out = flex_attention(grouped, keys, values, block_mask=mask, scale=scale)
    assert isinstance(out, torch.Tensor)
    return out.reshape(query.shape)


def _flex_compiled() -> Callable[..., torch.Tensor]:
    fn = _compiled.get("flex")
    if fn is None:
        import torch._dynamo

        # One compiled graph per decode shape (rows x pages bucket, per layer kind): allow as many
        # as a stage has buckets (generation/graphs.py max_graphs) times the window kinds.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        fn = _compiled["flex"] = torch.compile(flex_decode, fullgraph=True, dynamic=False)
    return fn
