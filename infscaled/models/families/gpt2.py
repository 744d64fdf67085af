"""GPT-2: units = [embed (wte + wpe), block 0..n-1, head (ln_f + lm_head)]."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from infscaled.generation.paged_attention import route_attention
from infscaled.models.base import Activation, Context, Family, InputSpec, Unit
from infscaled.models.families.common import (
    CompilableLayer,
    causal_context,
    next_token_hidden,
    next_token_only,
    paged_kv_kwargs,
)


class GPT2Embed(Unit):
    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = transformer.wte, transformer.wpe, transformer.drop

    def forward(self, act: Activation, ctx: Context) -> Activation:
        ids = act["input_ids"]  # [B, T]
        positions = act.get("position_ids")  # decode steps: each row's own position [B, 1]
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        hidden = self.drop(self.wte(ids) + self.wpe(positions))
        return {"hidden": hidden, "attention_mask": act["attention_mask"]}


class GPT2Block(CompilableLayer, Unit):
    def __init__(self, block: nn.Module, config: Any) -> None:
        super().__init__()
        route_attention(block.attn)  # decode steps attend over the paged KV cache in place
        self.layer = block
        self.config = config

    def forward(self, act: Activation, ctx: Context) -> Activation:
        causal_context(self.config, act, ctx)
        # ctx["kv"]: generation's KV cache of the micro-batch's sequences, None otherwise.
        hidden = self.layer_for(ctx, act["hidden"])(act["hidden"], ctx.get("kv"), ctx["mask"], use_cache=False,
                                     position_ids=ctx["position_ids"],
                                     **paged_kv_kwargs(ctx, self.layer.attn.layer_idx))
        return {"hidden": hidden, "attention_mask": act["attention_mask"]}


class GPT2Head(Unit):
    def __init__(self, ln_f: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.ln_f, self.lm_head = ln_f, lm_head

    def forward(self, act: Activation, ctx: Context) -> Activation:
        hidden = act["hidden"]
        if next_token_only(ctx):
            hidden = next_token_hidden(hidden, act, ctx)  # [B, D]: next-token logits [B, V]
        return {"output": self.lm_head(self.ln_f(hidden))}  # [B, T, V]


class GPT2Family(Family):
    name = "gpt2"

    def __init__(self, config: Any) -> None:
        self.config = config

    def build(self) -> nn.Module:
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel(self.config)

    def units(self, model: nn.Module) -> list[Unit]:
        t = model.transformer
        return [GPT2Embed(t), *(GPT2Block(b, self.config) for b in t.h), GPT2Head(t.ln_f, model.lm_head)]

    def input_spec(self) -> InputSpec:
        return InputSpec("tokens", vocab_size=self.config.vocab_size, max_positions=self.config.n_positions,
                         per_token_output=True)

    def reference_forward(self, model: nn.Module, inputs: Activation) -> torch.Tensor:
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
