"""ResNet for image classification: units = [embedder, residual layer 0..n-1, head].

Units are the residual layers of every stage in order (finer than the stages, so deep
ResNets split evenly); a layer's shortcut stays inside its unit, so only one tensor
crosses a cut. BatchNorm runs in eval mode on its running statistics, which are
persistent buffers: a checkpoint's values replace the constructor's defaults.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from infscaled.models.base import Activation, Context, Family, InputSpec, Unit

DEFAULT_IMAGE_SIZE = 224


class ResNetStem(Unit):
    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, act: Activation, ctx: Context) -> Activation:
        return {"hidden": self.embedder(act["pixel_values"])}  # [B, C, H/4, W/4]


class ResNetResidual(Unit):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, act: Activation, ctx: Context) -> Activation:
        return {"hidden": self.layer(act["hidden"])}  # [B, C, H, W]


class ResNetHead(Unit):
    def __init__(self, pooler: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pooler, self.classifier = pooler, classifier  # classifier = Flatten + Linear

    def forward(self, act: Activation, ctx: Context) -> Activation:
        return {"output": self.classifier(self.pooler(act["hidden"]))}  # [B, num_labels]


class ResNetFamily(Family):
    name = "resnet"

    def __init__(self, config: Any) -> None:
        self.config = config

    def build(self) -> nn.Module:
        from transformers import ResNetForImageClassification

        return ResNetForImageClassification(self.config)

    def units(self, model: nn.Module) -> list[Unit]:
        hf: Any = model  # transformers' submodule attributes are untyped
        net = hf.resnet
        layers = [ResNetResidual(layer) for stage in net.encoder.stages for layer in stage.layers]
        return [ResNetStem(net.embedder), *layers, ResNetHead(net.pooler, hf.classifier)]

    def input_spec(self) -> InputSpec:
        size = int(getattr(self.config, "image_size", DEFAULT_IMAGE_SIZE))
        return InputSpec("image", sample_shape=(self.config.num_channels, size, size))

    def reference_forward(self, model: nn.Module, inputs: Activation) -> torch.Tensor:
        return model(pixel_values=inputs["pixel_values"]).logits
