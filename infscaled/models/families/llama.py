"""Decoders of Llama's model structure: Llama, Mistral, Qwen2, and Qwen3, Phi-3, OLMo-2,
StarCoder2, SmolLM3, Gemma 1-3 (text), Granite, OLMo, GLM, GLM-4, Helium, Arcee, Seed-OSS,
Hunyuan (dense), Apertus, Ministral, EXAONE 4, Cohere 1-2 and the mixture-of-experts Mixtral,
Qwen2-MoE, Qwen3-MoE and OLMoE, whose transformers models differ from Llama's only inside their
modules (q/k norms, fused or biased projections, LayerNorm, no-rope layers, a scaled embedding,
soft-capped attention, routed experts), which run as transformers' own, and in what the embed
and head units apply (Granite's multipliers, Gemma 2's logits soft-cap, Cohere's logit scale)
and the rotary frequencies per layer type (Gemma 3); `_TYPES` says which type does what:
units = [embed (embed_tokens), decoder layer 0..n-1, head (norm + lm_head)].

Rotary embeddings are parameter-free and needed by every layer, so the model's rotary
module is a shared module; each stage computes (cos, sin) once per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from infscaled.generation.paged_attention import route_attention
from infscaled.models.base import Activation, Context, Family, InputSpec, Unit
from infscaled.models.families import fused_decode
from infscaled.models.families.common import (
    CompilableLayer,
    causal_mask,
    next_token_hidden,
    next_token_only,
    paged_kv_kwargs,
    position_ids,
)


class _Mask(Enum):
    """How a model's forward picks a layer's attention mask."""

    LAYER_TYPES = "layer_types"  # from `config.layer_types`
    ONE = "one"  # one mask for every layer: sliding when `config.sliding_window` is set (any layer_types ignored)
    FULL = "full"  # always the full causal mask


@dataclass(frozen=True)
class _Type:
    """What one model type does outside its decoder layers (inside them transformers' code runs)."""

    causal_lm: str  # the transformers class
    mask: _Mask
    rope_per_layer_type: bool = False  # Gemma 3: an inverse frequency per layer type (local, global)
    # Granite: its forward multiplies the embeddings by `embedding_multiplier` and divides the
    # logits by `logits_scaling`, outside any module.
    multipliers: bool = False
    logits_softcap: bool = False  # Gemma 2 / 3: logits soft-capped by `final_logit_softcapping`
    logit_scale: bool = False  # Cohere 1 / 2: logits multiplied by `logit_scale`, outside any module


_TYPES = {
    "llama": _Type("LlamaForCausalLM", _Mask.FULL),
    "mistral": _Type("MistralForCausalLM", _Mask.ONE),
    "qwen2": _Type("Qwen2ForCausalLM", _Mask.LAYER_TYPES),
    "qwen3": _Type("Qwen3ForCausalLM", _Mask.LAYER_TYPES),
    "phi3": _Type("Phi3ForCausalLM", _Mask.ONE),
    "olmo2": _Type("Olmo2ForCausalLM", _Mask.FULL),
    "starcoder2": _Type("Starcoder2ForCausalLM", _Mask.ONE),
    "smollm3": _Type("SmolLM3ForCausalLM", _Mask.LAYER_TYPES),
    "gemma": _Type("GemmaForCausalLM", _Mask.FULL),
    "gemma2": _Type("Gemma2ForCausalLM", _Mask.LAYER_TYPES, logits_softcap=True),
    "gemma3_text": _Type("Gemma3ForCausalLM", _Mask.LAYER_TYPES, rope_per_layer_type=True, logits_softcap=True),
    "granite": _Type("GraniteForCausalLM", _Mask.FULL, multipliers=True),
    "olmo": _Type("OlmoForCausalLM", _Mask.FULL),
    "glm": _Type("GlmForCausalLM", _Mask.FULL),
    "glm4": _Type("Glm4ForCausalLM", _Mask.FULL),
    "helium": _Type("HeliumForCausalLM", _Mask.FULL),
    "arcee": _Type("ArceeForCausalLM", _Mask.FULL),
    "seed_oss": _Type("SeedOssForCausalLM", _Mask.FULL),
    "hunyuan_v1_dense": _Type("HunYuanDenseV1ForCausalLM", _Mask.FULL),
    "apertus": _Type("ApertusForCausalLM", _Mask.FULL),
    "ministral": _Type("MinistralForCausalLM", _Mask.LAYER_TYPES),
    "exaone4": _Type("Exaone4ForCausalLM", _Mask.LAYER_TYPES),
    "cohere": _Type("CohereForCausalLM", _Mask.FULL, logit_scale=True),
    "cohere2": _Type("Cohere2ForCausalLM", _Mask.LAYER_TYPES, logit_scale=True),
    # Mixture-of-experts MLPs (their checkpoints keep one tensor per expert: models/weights.py
    # stacks them into transformers' fused experts tensors).
    "mixtral": _Type("MixtralForCausalLM", _Mask.ONE),
    "qwen2_moe": _Type("Qwen2MoeForCausalLM", _Mask.LAYER_TYPES),
    "qwen3_moe": _Type("Qwen3MoeForCausalLM", _Mask.ONE),
    "olmoe": _Type("OlmoeForCausalLM", _Mask.FULL),
}


def layer_attention_kinds(config: Any) -> list[str]:
    """Each layer's attention kind, chosen exactly as the transformers model's own forward chooses it."""
    n = config.num_hidden_layers
    rule = _TYPES[config.model_type].mask
    if rule is _Mask.LAYER_TYPES:
        return list(config.layer_types[:n])
    if rule is _Mask.ONE:
        return ["full_attention" if config.sliding_window is None else "sliding_attention"] * n
    return ["full_attention"] * n


def position_embeddings(act: Activation, ctx: Context,
                        layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary (cos, sin), each [1, T, head_dim] in the hidden dtype; once per stage and micro-batch
    (and per layer type, for a rotary module that has one frequency per type)."""
    key = "position_embeddings" if layer_type is None else f"position_embeddings:{layer_type}"
    if key not in ctx:
        rotary = ctx["shared"]["rotary"]
        args = (act["hidden"], position_ids(act, ctx)) + ((layer_type,) if layer_type is not None else ())
        ctx[key] = rotary(*args)
    cos_sin: tuple[torch.Tensor, torch.Tensor] = ctx[key]
    return cos_sin


def carry(act: Activation, hidden: torch.Tensor) -> Activation:
    """A unit's output: the new hidden states, plus what every later layer needs again (the
    padding mask, and during generation each row's position, which rotary needs at every stage)."""
    out = {"hidden": hidden, "attention_mask": act["attention_mask"]}
    if "position_ids" in act:
        out["position_ids"] = act["position_ids"]
    return out


class LlamaEmbed(Unit):
    def __init__(self, embed_tokens: nn.Module, multiplier: float = 1.0) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.multiplier = multiplier

    def forward(self, act: Activation, ctx: Context) -> Activation:
        hidden = self.embed_tokens(act["input_ids"])  # [B, T, D]
        if self.multiplier != 1.0:
            hidden = hidden * self.multiplier
        return carry(act, hidden)


class LlamaBlock(CompilableLayer, Unit):
    def __init__(self, layer: nn.Module, config: Any, attention_kind: str) -> None:
        super().__init__()
        route_attention(layer.self_attn)  # decode steps attend over the paged KV cache in place
        self.layer = layer
        self.config = config
        self.attention_kind = attention_kind
        self.rope_type = attention_kind if _TYPES[config.model_type].rope_per_layer_type else None

    def fuse_projections(self) -> bool:
        """Generation stages: q/k/v and gate/up as one weight each, for decode steps
        (models/families/fused_decode.py). False when the layer does not have that shape."""
        if "_fused" in self.__dict__:
            return True
        if not fused_decode.can_fuse(self.layer):
            return False
        window = int(self.config.sliding_window or 0) if self.attention_kind == "sliding_attention" else 0
        self.__dict__["_fused"] = fused_decode.fuse(self.layer, window)
        return True

    def forward(self, act: Activation, ctx: Context) -> Activation:
        kv = ctx.get("kv")
        fused: fused_decode.FusedLayer | None = self.__dict__.get("_fused")
        if fused is not None and kv is not None and kv.decoding:
            pools = kv.kv.pools_of(self.layer.self_attn.layer_idx)
            if pools is not None:  # (allocated by the prefill that admitted these sequences)
                # Compiled like the layer (pipeline.compile), on static batches only (as layer_for).
                options = self.__dict__.get("_compile_options") if "_compiled_layer" in self.__dict__ else None
                hidden = fused_decode.run(fused, act["hidden"], position_embeddings(act, ctx), pools, kv,
                                          options if kv.static else None)
                return carry(act, hidden)
        if fused is not None and (kv is None or not kv.decoding):
            # A prompt: a generation prefill (or a chunk of one) writing its keys and values into the
            # pages, or a forward job's micro-batch (no cache): the fused layer (models/families/fused_decode.py).
            mask = causal_mask(self.config, act, ctx, self.attention_kind)
            options = self.__dict__.get("_compile_options") if "_compiled_layer" in self.__dict__ else None
            hidden = fused_decode.prefill_step(fused, act["hidden"], position_embeddings(act, ctx), kv,
                                               self.layer.self_attn.layer_idx, mask, options)
            return carry(act, hidden)
        hidden = self.layer_for(ctx, act["hidden"])(
            act["hidden"],
            attention_mask=causal_mask(self.config, act, ctx, self.attention_kind),
            position_ids=position_ids(act, ctx),
            position_embeddings=position_embeddings(act, ctx, self.rope_type),
            cache=ctx.get("kv"),  # generation: this stage's KV cache of the micro-batch's sequences
            use_cache=False,
            **paged_kv_kwargs(ctx, self.layer.self_attn.layer_idx),
        )
        return carry(act, hidden)


class LlamaHead(Unit):
    """norm + lm_head: logits of every position [B, T, V], or with `last` only of each row's last
    real token [B, V] (next-token logits: what prompt processing returns; the lm_head then runs
    on B rows instead of B * T)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, last: bool = False, divisor: float = 1.0,
                 softcap: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        self.norm, self.lm_head = norm, lm_head
        self.last = last
        self.divisor = divisor
        self.softcap = softcap
        self.scale = scale

    def forward(self, act: Activation, ctx: Context) -> Activation:
        hidden = act["hidden"]  # [B, T, D]
        if self.last or next_token_only(ctx):
            hidden = next_token_hidden(hidden, act, ctx)  # [B, D]
        logits = self.lm_head(self.norm(hidden))  # [B, T, V] or [B, V]
        if self.divisor != 1.0:
            logits = logits / self.divisor
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return {"output": logits}


class LlamaFamily(Family):
    name = "llama"

    def __init__(self, config: Any) -> None:
        self.config = config
        # Builtins such as llama-3b-last set this: the head returns next-token logits only.
        self.last = getattr(config, "infscaled_logits", "all") == "last"

    def build(self) -> nn.Module:
        import transformers

        # The concrete class rather than AutoModelForCausalLM.from_config: from_config also sets
        # torch's default dtype from config.dtype while constructing, which we do not want.
        cls = getattr(transformers, _TYPES[self.config.model_type].causal_lm)
        return cls(self.config)

    def units(self, model: nn.Module) -> list[Unit]:
        causal_lm: Any = model  # transformers modules are untyped attribute bags to mypy
        base = causal_lm.model
        kinds = layer_attention_kinds(self.config)
        config, spec = self.config, _TYPES[self.config.model_type]
        return [
            LlamaEmbed(base.embed_tokens, float(config.embedding_multiplier) if spec.multipliers else 1.0),
            *(LlamaBlock(layer, config, kind) for layer, kind in zip(base.layers, kinds, strict=True)),
            LlamaHead(base.norm, causal_lm.lm_head, last=self.last,
                      divisor=float(config.logits_scaling) if spec.multipliers else 1.0,
                      softcap=float(config.final_logit_softcapping or 0.0) if spec.logits_softcap else 0.0,
                      scale=float(config.logit_scale) if spec.logit_scale else 1.0),
        ]

    def shared(self, model: nn.Module) -> dict[str, nn.Module]:
        causal_lm: Any = model
        return {"rotary": causal_lm.model.rotary_emb}

    def input_spec(self) -> InputSpec:
        return InputSpec("tokens", vocab_size=self.config.vocab_size,
                         max_positions=self.config.max_position_embeddings, per_token_output=not self.last)

    def reference_forward(self, model: nn.Module, inputs: Activation) -> torch.Tensor:
        logits: torch.Tensor = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        if self.last:  # [B, T, V] -> [B, V] at each row's last real token
            last = inputs["attention_mask"].sum(dim=1) - 1
            return logits[torch.arange(logits.shape[0], device=logits.device), last]
        return logits
