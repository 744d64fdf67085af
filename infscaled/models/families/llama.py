"""Llama, Mistral and Qwen2 (one layer structure):
units = [embed (embed_tokens), decoder layer 0..n-1, head (norm + lm_head)].

Rotary embeddings are parameter-free and needed by every layer, so the model's rotary
module is a shared module; each stage computes (cos, sin) once per micro-batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from infscaled.models.base import Activation, Context, Family, InputSpec, Unit
from infscaled.models.families.common import causal_mask, position_ids

_CAUSAL_LM_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def layer_attention_kinds(config: Any) -> list[str]:
    """Each layer's attention kind, chosen exactly as the transformers model's own forward chooses it."""
    n = config.num_hidden_layers
    if config.model_type == "qwen2":
        return list(config.layer_types[:n])
    if config.model_type == "mistral":
        # MistralModel applies one mask to every layer and ignores any `layer_types`.
        return ["full_attention" if config.sliding_window is None else "sliding_attention"] * n
    return ["full_attention"] * n


def position_embeddings(act: Activation, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary (cos, sin), each [1, T, head_dim] in the hidden dtype; once per stage and micro-batch."""
    if "position_embeddings" not in ctx:
        rotary = ctx["shared"]["rotary"]
        ctx["position_embeddings"] = rotary(act["hidden"], position_ids(act, ctx))
    cos_sin: tuple[torch.Tensor, torch.Tensor] = ctx["position_embeddings"]
    return cos_sin


class LlamaEmbed(Unit):
    def __init__(self, embed_tokens: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, act: Activation, ctx: Context) -> Activation:
        hidden = self.embed_tokens(act["input_ids"])  # [B, T, D]
        return {"hidden": hidden, "attention_mask": act["attention_mask"]}


class LlamaBlock(Unit):
    def __init__(self, layer: nn.Module, config: Any, attention_kind: str) -> None:
        super().__init__()
        self.layer = layer
        self.config = config
        self.attention_kind = attention_kind

    def forward(self, act: Activation, ctx: Context) -> Activation:
        hidden = self.layer(
            act["hidden"],
            attention_mask=causal_mask(self.config, act, ctx, self.attention_kind),
            position_ids=position_ids(act, ctx),
            position_embeddings=position_embeddings(act, ctx),
            use_cache=False,
        )
        return {"hidden": hidden, "attention_mask": act["attention_mask"]}


class LlamaHead(Unit):
    def __init__(self, norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, act: Activation, ctx: Context) -> Activation:
        return {"output": self.lm_head(self.norm(act["hidden"]))}  # [B, T, V]


class LlamaFamily(Family):
    name = "llama"

    def __init__(self, config: Any) -> None:
        self.config = config

    def build(self) -> nn.Module:
        import transformers

        # The concrete class rather than AutoModelForCausalLM.from_config: from_config also sets
        # torch's default dtype from config.dtype while constructing, which we do not want.
        cls = getattr(transformers, _CAUSAL_LM_CLASSES[self.config.model_type])
        return cls(self.config)

    def units(self, model: nn.Module) -> list[Unit]:
        causal_lm: Any = model  # transformers modules are untyped attribute bags to mypy
        base = causal_lm.model
        kinds = layer_attention_kinds(self.config)
        return [
            LlamaEmbed(base.embed_tokens),
            *(LlamaBlock(layer, self.config, kind) for layer, kind in zip(base.layers, kinds, strict=True)),
            LlamaHead(base.norm, causal_lm.lm_head),
        ]

    def shared(self, model: nn.Module) -> dict[str, nn.Module]:
        causal_lm: Any = model
        return {"rotary": causal_lm.model.rotary_emb}

    def input_spec(self) -> InputSpec:
        return InputSpec("tokens", vocab_size=self.config.vocab_size,
                         max_positions=self.config.max_position_embeddings, per_token_output=True)

    def reference_forward(self, model: nn.Module, inputs: Activation) -> torch.Tensor:
        logits: torch.Tensor = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return logits
