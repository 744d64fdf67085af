"""A decoder layer's decode and prefill steps with fused projections (Llama, Mistral, Qwen2 layers).

Why: a decode step reads every weight once and its matrix products have only the batch's few
rows, so each product costs about its weight's bytes over the memory bandwidth plus a ramp-up
and tail that small products never amortise. Measured on an H200 at 8 rows (BENCHMARKS.md
section 14): k and v (3072 -> 1024) run at 0.85 TB/s alone; q, k, v as one 3072 -> 5120 product
at 2.96 TB/s; gate and up as one 3072 -> 16384 product at 3.85 TB/s instead of 3.45. The
products of a llama-3b step fall from 2.27 to 1.81 ms.

`fuse(layer)` concatenates q/k/v (and their biases) and gate/up into one weight each, then makes
the layer's own projections views of those rows (rows of a row-major [out, in] weight are
contiguous), so memory does not grow and the transformers layer (prefill, the reference) reads
the same numbers. `decode_step` is the layer's decode step written out on tensors only: the same
operations as transformers' layer (RMSNorm, rotary, SiLU-gated MLP) in the same order, with the
attention on the paged pools (generation/paged_attention.py `attend_pages`). Tensors only, so
one `torch.compile`d graph serves every layer of a stage. On CUDA the norms (with the residual add
before the second), the rotary embedding with the key / value write, and the SiLU gating are one
Triton kernel each (generation/triton_layer.py): the same numbers in a tenth of the launches.

`prefill_step` is the same layer over a prompt (or a chunk of one): the same operations on
[B, T, D], the keys and values written into the pages by the micro-batch's `PagedBatch.update`,
and the attention by `scaled_dot_product_attention` with the mask the layer would get
(common.causal_mask: transformers' own, or the past mask of a later chunk). Why not the
transformers layer: a prefill of a few rows is launch-bound, and the layer's Python (decorators,
keyword plumbing, separate q/k/v and gate/up products) costs more than its kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from infscaled.generation import triton_layer
from infscaled.generation.kv import write_decode_kv
from infscaled.generation.paged_attention import attend_pages

_compiled: dict[tuple[str, str | None], Any] = {}  # (backend, mode) -> compiled decode_step
_compiled_parts: dict[tuple[str, str, str | None], Any] = {}  # (function, backend, mode) -> prefill part


@dataclass
class FusedLayer:
    """One layer's fused weights (views of them are the layer's own projections) and constants."""

    qkv: torch.Tensor  # [Hq*Dh + 2*Hkv*Dh, D]
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor  # [2*I, D]
    o: torch.Tensor
    down: torch.Tensor
    norm1: torch.Tensor
    norm2: torch.Tensor
    eps1: float
    eps2: float
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    window: int


# The layers whose operations decode_step and prefill_step write out: any other layer (q/k
# norms, post-norms, LayerNorm) runs as transformers' own, even where its projections look alike.
FUSABLE_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})


def can_fuse(layer: nn.Module) -> bool:
    if type(layer).__name__ not in FUSABLE_LAYERS:
        return False  # (these three always have q/k/v/o and gate/up/down projections)
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(attn.o_proj, "bias", None) is not None or getattr(mlp.down_proj, "bias", None) is not None:
        return False
    if getattr(mlp.gate_proj, "bias", None) is not None:
        return False
    if getattr(attn.config, "hidden_act", None) not in ("silu", "swish"):  # decode_step's MLP is SiLU-gated
        return False
    return not any(p.is_meta for p in layer.parameters())


def fuse(layer: nn.Module, window: int) -> FusedLayer:
    """Concatenate the layer's projections in place (see the module docstring)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv_mods = (attn.q_proj, attn.k_proj, attn.v_proj)
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: prefill may run outside it
        qkv = torch.cat([m.weight for m in qkv_mods])
        bias = torch.cat([m.bias for m in qkv_mods]) if attn.q_proj.bias is not None else None
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        row = 0
        for m in qkv_mods:
            n = m.weight.shape[0]
            m.weight = nn.Parameter(qkv[row:row + n], requires_grad=False)
            if bias is not None:
                m.bias = nn.Parameter(bias[row:row + n], requires_grad=False)
            row += n
        inter = mlp.gate_proj.weight.shape[0]
        mlp.gate_proj.weight = nn.Parameter(gate_up[:inter], requires_grad=False)
        mlp.up_proj.weight = nn.Parameter(gate_up[inter:], requires_grad=False)
    cfg = attn.config
    head_dim = attn.head_dim
    return FusedLayer(qkv, bias, gate_up, attn.o_proj.weight, mlp.down_proj.weight,
                      layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                      float(layer.input_layernorm.variance_epsilon),
                      float(layer.post_attention_layernorm.variance_epsilon),
                      cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, float(attn.scaling), window)


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' LlamaRMSNorm / Qwen2RMSNorm / MistralRMSNorm, operation for operation (on
    # CUDA one kernel: generation/triton_layer.py).
    if triton_layer.usable(hidden):
        return torch.ops.infscaled.rms_norm(hidden, weight, eps)  # type: ignore[no-any-return]
    dtype = hidden.dtype
    h = hidden.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decode_step(hidden: torch.Tensor, qkv: torch.Tensor, qkv_bias: torch.Tensor | None, o: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor, norm1: torch.Tensor, norm2: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
                table: torch.Tensor, positions: torch.Tensor, page_index: torch.Tensor, backend: str,
                eps1: float, eps2: float, heads: int, kv_heads: int, head_dim: int, scale: float,
                window: int) -> torch.Tensor:
    """hidden [B, 1, D] -> [B, 1, D]; writes the new key and value into the pools."""
    if triton_layer.usable(hidden):  # rotary and the key / value write as one kernel
        qkv_out = F.linear(_rms_norm(hidden, norm1, eps1), qkv, qkv_bias)
        q = torch.ops.infscaled.rotary_kv(qkv_out, cos, sin, pool_k, pool_v, table, positions, heads, kv_heads,
                                          head_dim)
        attn = attend_pages(backend, q, pool_k, pool_v, table, positions, page_index, scale, window)
        return _post_attention(hidden, attn.transpose(1, 2), o, gate_up, down, norm2, eps2)
    q, k, v = _pre_attention(hidden, qkv, qkv_bias, norm1, cos, sin, eps1, heads, kv_heads, head_dim)
    write_decode_kv(pool_k, pool_v, table, positions, k, v)
    attn = attend_pages(backend, q, pool_k, pool_v, table, positions, page_index, scale, window)  # [B, 1, Hq, Dh]
    return _post_attention(hidden, attn.transpose(1, 2), o, gate_up, down, norm2, eps2)


def prefill_step(f: FusedLayer, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], paged: Any,
                 layer_idx: int, mask: torch.Tensor | None,
                 compile_options: tuple[str, str | None] | None = None) -> torch.Tensor:
    """hidden [B, T, D] -> [B, T, D] for a prefill micro-batch (or chunk), writing the real
    positions' keys and values into the pages of `paged`, or for a forward job's micro-batch
    (`paged` None: nothing cached). `mask`: None means causal (right padding keeps
    every real query away from padded keys), else a boolean or additive mask [B, 1, T, S].
    `compile_options` (backend, mode): the parts before and after the attention run as
    `torch.compile`d twins with dynamic shapes (one graph each for every layer and prompt length),
    which fuses the norms, rotary and gating into a few kernels: an eager prefill is launch-bound
    (BENCHMARKS.md section 22: ~41 kernels per layer, ~1.2 ms of host time per layer on the H200's host)."""
    group = f.heads // f.kv_heads  # query heads per key / value head
    if triton_layer.usable(hidden):
        # The norm, the product, then rotary with the keys' and values' write into the pages as one
        # kernel (generation/triton_layer.py rotary_qkv): no part left for a compiler to fuse. Without
        # past the kernel also repeats each key / value head for its query heads (no copy after).
        qkv_out = F.linear(_rms_norm(hidden, f.norm1, f.eps1), f.qkv, f.qkv_bias)
        past = paged is not None and paged.past
        if paged is None:
            q, keys, values = torch.ops.infscaled.rotary_qkv(qkv_out, cos_sin[0], cos_sin[1], f.heads, f.kv_heads,
                                                             f.head_dim, group)
        else:
            pools = paged.kv.pools_for(layer_idx, f.kv_heads, f.head_dim, hidden.dtype, hidden.device)
            q, keys, values = torch.ops.infscaled.rotary_qkv_pages(
                qkv_out, cos_sin[0], cos_sin[1], *pools, paged.slots(hidden.shape[1]), f.heads, f.kv_heads,
                f.head_dim, 1 if past else group)
            keys, values = paged.attended(keys, values, pools)
        repeat = past
    else:
        pre = _compiled_part(_pre_attention, *compile_options) if compile_options is not None else _pre_attention
        q, keys, values = pre(hidden, f.qkv, f.qkv_bias, f.norm1, cos_sin[0], cos_sin[1], f.eps1, f.heads,
                              f.kv_heads, f.head_dim)
        if paged is not None:
            keys, values = paged.update(keys, values, layer_idx)  # [B, Hkv, S, Dh]: the chunk, or past + chunk
        repeat = True
    post = _compiled_part(_post_attention, *compile_options) if compile_options is not None else _post_attention
    if group > 1 and repeat:  # as transformers' repeat_kv: query head h reads kv head h // group
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None, scale=f.scale)
    return post(hidden, attn, f.o, f.gate_up, f.down, f.norm2, f.eps2)  # type: ignore[no-any-return]


def _pre_attention(hidden: torch.Tensor, qkv: torch.Tensor, qkv_bias: torch.Tensor | None, norm1: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, eps1: float, heads: int, kv_heads: int,
                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, q/k/v product, rotary: hidden [B, T, D] -> q [B, Hq, T, Dh], k and v [B, Hkv, T, Dh]."""
    b, t = hidden.shape[:2]
    x = _rms_norm(hidden, norm1, eps1)
    qkv_out = F.linear(x, qkv, qkv_bias)  # [B, T, (Hq + 2 Hkv) Dh]
    nq, nkv = heads * head_dim, kv_heads * head_dim
    q = qkv_out[..., :nq].view(b, t, heads, head_dim).transpose(1, 2)
    k = qkv_out[..., nq:nq + nkv].view(b, t, kv_heads, head_dim).transpose(1, 2)
    v = qkv_out[..., nq + nkv:].view(b, t, kv_heads, head_dim).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * c) + (_rotate_half(q) * s), (k * c) + (_rotate_half(k) * s), v


def _post_attention(residual: torch.Tensor, attn: torch.Tensor, o: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, norm2: torch.Tensor, eps2: float) -> torch.Tensor:
    """attn [B, Hq, T, Dh] -> the layer's output [B, T, D]: o product, residual, norm, gated MLP."""
    b, _, t, _ = attn.shape
    out = F.linear(attn.transpose(1, 2).reshape(b, t, -1), o)
    if triton_layer.usable(out):  # the residual add and the norm, then the gating, one kernel each
        hidden, x = torch.ops.infscaled.add_rms_norm(out, residual, norm2, eps2)
        return hidden + F.linear(torch.ops.infscaled.silu_mul(F.linear(x, gate_up)), down)
    hidden = residual + out
    x = _rms_norm(hidden, norm2, eps2)
    gu = F.linear(x, gate_up)
    inter = gate_up.shape[0] // 2
    return hidden + F.linear(F.silu(gu[..., :inter]) * gu[..., inter:], down)


def run(f: FusedLayer, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
        pools: tuple[torch.Tensor, torch.Tensor], paged: Any,
        compile_options: tuple[str, str | None] | None) -> torch.Tensor:
    """One layer's decode step for a micro-batch's `PagedBatch`; `compile_options` (backend, mode):
    through the torch.compile'd twin, shared by every layer compiled with those options."""
    fn = _compiled_step(*compile_options) if compile_options is not None else decode_step
    return fn(hidden, f.qkv, f.qkv_bias, f.o, f.gate_up, f.down, f.norm1, f.norm2, cos_sin[0], cos_sin[1],
              pools[0], pools[1], paged.table, paged.positions, paged.kv.page_index, paged.attention,
              f.eps1, f.eps2, f.heads, f.kv_heads, f.head_dim, f.scale, f.window)


def _compiled_part(fn: Any, backend: str, mode: str | None) -> Any:
    """`fn` compiled with dynamic shapes (prompt lengths and row counts vary), once per options."""
    key = (fn.__name__, backend, mode)
    compiled = _compiled_parts.get(key)
    if compiled is None:
        compiled = _compiled_parts[key] = torch.compile(fn, backend=backend, mode=mode, dynamic=True)
    return compiled


def _compiled_step(backend: str, mode: str | None) -> Any:
    fn = _compiled.get((backend, mode))
    if fn is None:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        fn = _compiled[(backend, mode)] = torch.compile(decode_step, backend=backend, mode=mode, dynamic=False)
    return fn
