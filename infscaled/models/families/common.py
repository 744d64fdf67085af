"""Per-micro-batch attention inputs shared by the decoder families: positions and causal masks.

Masks come from transformers' own builders, so they match the monolithic model exactly
(same attention implementation, same skip-the-mask shortcuts). Right padding keeps every
real token's positions and outputs identical to an unpadded run; padded query rows still
see the real tokens before them, so no row of a full causal mask is empty.
"""

from __future__ import annotations

from typing import Any

import torch

from infscaled.models.base import Activation, Context

# Per-layer attention kind (transformers' `layer_types` vocabulary) -> masking_utils builder.
_MASK_BUILDERS = {
    "full_attention": "create_causal_mask",
    "sliding_attention": "create_sliding_window_causal_mask",
}


def position_ids(act: Activation, ctx: Context) -> torch.Tensor:
    """Positions 0..T-1 shared by every row (right padding), computed once per stage and micro-batch."""
    if "position_ids" not in ctx and "position_ids" in act:
        ctx["position_ids"] = act["position_ids"]  # decode steps: each row's own position [B, 1]
    if "position_ids" not in ctx:
        hidden = act["hidden"]  # [B, T, D]
        ctx["position_ids"] = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # [1, T]
    positions: torch.Tensor = ctx["position_ids"]
    return positions


def device_mask(act: Activation) -> torch.Tensor | None:
    """The padding mask [B, T] for the hidden states' device, without a device sync.

    On a CUDA stage the mask stays in (pinned) host memory (engine/program.py HOST_KEYS): if
    nothing is padded this returns None, decided on the host, which lets transformers skip the
    mask (sdpa's `is_causal` fast path) exactly as it does after its own `mask.all()` check;
    otherwise a non-blocking copy to the device. Where mask and hidden share a device (CPU
    stages, tests) the mask is returned unchanged.
    """
    mask = act["attention_mask"]
    hidden = act["hidden"]
    if mask.device == hidden.device:
        return mask
    if mask.device.type == "cpu" and bool(mask.all()):
        return None
    return mask.to(hidden.device, non_blocking=True)


def causal_mask(config: Any, act: Activation, ctx: Context, kind: str = "full_attention") -> Any:
    """The causal+padding mask of one attention kind, once per stage and micro-batch.

    May be None: with sdpa and no padding, transformers relies on `is_causal` instead.
    """
    masks: dict[str, Any] = ctx.setdefault("masks", {})
    kv = ctx.get("kv")
    if kind not in masks and kv is not None and kv.decoding:
        # A decode step's attention reads the paged cache and masks it itself (paged_kv_kwargs).
        masks[kind] = None
        position_ids(act, ctx)  # what the builder below would have filled in ctx
    if kind not in masks and kv is not None and not kv.decoding and kv.past:
        # A later chunk of a prompt (chunked prefill) attends to its cached earlier chunks: the
        # cache's `update` returns each row's pages, and this mask matches them (generation/kv.py).
        window = int(getattr(config, "sliding_window", None) or 0) if kind == "sliding_attention" else 0
        hidden = act["hidden"]
        masks[kind] = kv.past_mask(hidden.shape[1], window, hidden.dtype)
        position_ids(act, ctx)
    if kind not in masks:
        from transformers import masking_utils

        build = getattr(masking_utils, _MASK_BUILDERS[kind])
        # Positions given by the micro-batch (generation) go to the builder; the stage's own 0..T-1
        # do not: the builders use them only to detect packed sequences, which 0..T-1 never are,
        # and that detection reads a device value on the host when no mask is given (a sync per
        # micro-batch; under CUDA graph capture it is skipped and the mask materialised instead).
        given = act.get("position_ids")
        position_ids(act, ctx)  # fills ctx for the layers either way
        masks[kind] = build(config=config, inputs_embeds=act["hidden"], attention_mask=device_mask(act),
                            cache=None, position_ids=given)
    return masks[kind]


def causal_context(config: Any, act: Activation, ctx: Context) -> None:
    """Fill ctx["position_ids"] and ctx["mask"] (the full causal mask) for a block."""
    if "mask" not in ctx:
        ctx["mask"] = causal_mask(config, act, ctx)


def paged_kv_kwargs(ctx: Context, layer_idx: int) -> dict[str, Any]:
    """Keyword arguments for a decoder layer: on a decode step, the micro-batch's paged cache,
    which transformers hands on to the cache's `update` and to the attention function
    (generation/paged_attention.py), and this layer's pools, looked up here rather than inside
    a compiled layer (see `PagedBatch.update`)."""
    kv = ctx.get("kv")
    if kv is None or not kv.decoding:
        return {}
    pools = kv.kv.pools_of(layer_idx)
    return {"paged_kv": kv} if pools is None else {"paged_kv": kv, "kv_pools": pools}


def next_token_only(ctx: Context) -> bool:
    """A generation prefill whose last stage needs each row's next-token logits only (nobody
    asked for prompt log-probabilities): the head runs on B rows, not B * T (generation/kv.py)."""
    kv = ctx.get("kv")
    return kv is not None and not kv.decoding and kv.last_logits


def next_token_hidden(hidden: torch.Tensor, act: Activation, ctx: Context) -> torch.Tensor:
    """hidden [B, T, D] at each row's last real token -> [B, D]: from a static prefill batch's
    device index when there is one (a replayed graph's host mask says nothing), else the mask."""
    kv = ctx.get("kv")
    index = getattr(kv, "last_index", None) if kv is not None and not kv.decoding else None
    if index is not None:
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
    return last_positions(hidden, act["attention_mask"])


def last_positions(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, D] at each row's last real token (right padding) -> [B, D]; decided on the
    host when the mask is there (a CUDA stage keeps it in host memory), so no device sync."""
    if mask.device.type == "cpu" and bool(mask.all()):
        return hidden[:, -1]
    last = mask.to(hidden.device, non_blocking=True).sum(dim=1) - 1  # [B]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


COMPILED_SHAPES = 8  # forward micro-batch shapes a compiled layer compiles for; later ones run eagerly


class CompilableLayer:
    """Mixin for a decoder-layer unit wrapping one transformers layer (`layer`).

    After `compile_layer(backend)`, micro-batches of fixed shapes run a `torch.compile`d twin of
    the layer: generation's decode steps on static (bucketed, CUDA-graph) batches, and forward
    micro-batches of the first `COMPILED_SHAPES` input shapes (a workload of ever new lengths
    would otherwise compile, seconds each, for every one). Generation prefills (a new length
    nearly every time) and exact-size decode batches stay eager. The twin shares the layer's parameters; it
    is kept out of the module tree so it is not a second copy in `parameters()` or state dicts.
    Every layer of a stage shares the compiled graphs (parameters are graph inputs; nothing in
    a layer's trace depends on its index), one graph per input shape.
    """

    layer: torch.nn.Module

    def compile_layer(self, backend: str, mode: str | None = None) -> None:
        import torch._dynamo

        # One graph per shape: decode buckets (rows x pages) x layer kinds, forward micro-batches.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.__dict__["_compiled_layer"] = torch.compile(self.layer, backend=backend, mode=mode, dynamic=False)
        self.__dict__["_compile_options"] = (backend, mode)  # for a fused decode step (fused_decode.py)

    def layer_for(self, ctx: Context, hidden: torch.Tensor) -> torch.nn.Module:
        compiled: torch.nn.Module | None = self.__dict__.get("_compiled_layer")
        if compiled is None:
            return self.layer
        kv = ctx.get("kv")
        if kv is not None:
            return compiled if kv.decoding and kv.static else self.layer
        shapes: set[tuple[int, ...]] = self.__dict__.setdefault("_compiled_shapes", set())
        if tuple(hidden.shape) not in shapes and len(shapes) >= COMPILED_SHAPES:
            return self.layer
        shapes.add(tuple(hidden.shape))
        return compiled
