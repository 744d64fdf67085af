"""BERT for sequence classification: units = [embeddings, encoder layer 0..n-1, head].

The head is pooler (first token -> dense -> tanh) + dropout + classifier, so the last
stage outputs logits [B, num_labels]. Requests carry token ids only: token_type_ids are
all zero (the model's own default when none are given), i.e. every request is a single
segment; sentence pairs would need a segment tensor on the wire, which we do not carry.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from infscaled.errors import ModelError
from infscaled.models.base import Activation, Context, Family, InputSpec, Unit
from infscaled.models.families.common import device_mask


def padding_context(config: Any, act: Activation, ctx: Context) -> None:
    """Fill ctx["mask"] with the bidirectional padding mask, once per stage and micro-batch.

    Built by the same transformers helper BertModel.forward calls, from the config the model
    was built with (its `_attn_implementation`, e.g. "sdpa", decides the mask's form: a bool
    [B, 1, T, T], an additive float mask for "eager", or None when nothing is padded).
    Padded query rows still see the real keys, so no softmax row is fully masked.
    """
    if "mask" in ctx:
        return
    from transformers.masking_utils import create_bidirectional_mask

    ctx["mask"] = create_bidirectional_mask(config=config, inputs_embeds=act["hidden"],
                                            attention_mask=device_mask(act))


class BertEmbed(Unit):
    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, act: Activation, ctx: Context) -> Activation:
        # token_type_ids=None -> the module's all-zero buffer, exactly as in the HF forward.
        hidden = self.embeddings(input_ids=act["input_ids"])  # [B, T, D]
        return {"hidden": hidden, "attention_mask": act["attention_mask"]}


class BertLayerUnit(Unit):
    def __init__(self, layer: nn.Module, config: Any) -> None:
        super().__init__()
        self.layer = layer
        self.config = config

    def forward(self, act: Activation, ctx: Context) -> Activation:
        padding_context(self.config, act, ctx)
        hidden = self.layer(act["hidden"], ctx["mask"])  # [B, T, D]
        return {"hidden": hidden, "attention_mask": act["attention_mask"]}


class BertHead(Unit):
    def __init__(self, pooler: nn.Module, dropout: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pooler, self.dropout, self.classifier = pooler, dropout, classifier

    def forward(self, act: Activation, ctx: Context) -> Activation:
        pooled = self.pooler(act["hidden"])  # [B, D], from the first token
        return {"output": self.classifier(self.dropout(pooled))}  # [B, num_labels]


class BertFamily(Family):
    name = "bert"

    def __init__(self, config: Any) -> None:
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ModelError("BERT configs with is_decoder or add_cross_attention are not supported; "
                             "only bidirectional encoders (BertForSequenceClassification) are served")
        self.config = config

    def build(self) -> nn.Module:
        from transformers import BertForSequenceClassification

        return BertForSequenceClassification(self.config)

    def units(self, model: nn.Module) -> list[Unit]:
        hf: Any = model  # transformers' submodule attributes are untyped
        bert = hf.bert
        if bert.pooler is None:
            raise ModelError("BERT model without a pooler cannot classify sequences")
        # model.config, not self.config: building the model fills in `_attn_implementation`.
        layers = [BertLayerUnit(layer, hf.config) for layer in bert.encoder.layer]
        return [BertEmbed(bert.embeddings), *layers, BertHead(bert.pooler, hf.dropout, hf.classifier)]

    def input_spec(self) -> InputSpec:
        return InputSpec("tokens", vocab_size=self.config.vocab_size,
                         max_positions=self.config.max_position_embeddings, per_token_output=False)

    def reference_forward(self, model: nn.Module, inputs: Activation) -> torch.Tensor:
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
