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
    if "position_ids" not in ctx:
        hidden = act["hidden"]  # [B, T, D]
        ctx["position_ids"] = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # [1, T]
    positions: torch.Tensor = ctx["position_ids"]
    return positions


def causal_mask(config: Any, act: Activation, ctx: Context, kind: str = "full_attention") -> Any:
    """The causal+padding mask of one attention kind, once per stage and micro-batch.

    May be None: with sdpa and no padding, transformers relies on `is_causal` instead.
    """
    masks: dict[str, Any] = ctx.setdefault("masks", {})
    if kind not in masks:
        from transformers import masking_utils

        build = getattr(masking_utils, _MASK_BUILDERS[kind])
        masks[kind] = build(config=config, inputs_embeds=act["hidden"], attention_mask=act["attention_mask"],
                            cache=None, position_ids=position_ids(act, ctx))
    return masks[kind]


def causal_context(config: Any, act: Activation, ctx: Context) -> None:
    """Fill ctx["position_ids"] and ctx["mask"] (the full causal mask) for a block."""
    if "mask" not in ctx:
        ctx["mask"] = causal_mask(config, act, ctx)
