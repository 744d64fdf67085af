"""The model contract every family adapter fulfils.

A model is an ordered list of *units* (embedding, blocks, head). A stage runs a
contiguous range of units. Units pass one another an `Activation`: a dict of named
tensors (e.g. {"hidden": [B, T, D], "attention_mask": [B, T]}), which is also exactly
what travels over an edge between stages, so a unit never needs anything that is not
on the wire. Per-micro-batch values derived from the activation (causal masks, rotary
tables) live in a stage-local `ctx` dict that the first unit needing them fills.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

Activation = dict[str, torch.Tensor]
Context = dict[str, Any]
InputKind = Literal["tokens", "image", "tensor"]


class Unit(nn.Module):
    """One indivisible piece of a model. Subclasses wrap submodules of the full model
    (so parameters are shared with it, and their full-model names stay known)."""

    def forward(self, act: Activation, ctx: Context) -> Activation:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class InputSpec:
    """What a request carries for this model: token ids [S, T] (int64), or float samples [S, *shape]."""

    kind: InputKind
    # Shape of one sample without the batch dimension, for "image" / "tensor" inputs.
    sample_shape: tuple[int, ...] = ()
    # Token models: vocabulary size and longest sequence the model accepts.
    vocab_size: int = 0
    max_positions: int = 0
    # Token models: is the output per position ([S, T, ...]) or per sample ([S, ...])?
    per_token_output: bool = False


class Family(ABC):
    """Adapter for one model family: builds the full model skeleton and cuts it into units."""

    name: ClassVar[str]

    @abstractmethod
    def build(self) -> nn.Module:
        """Construct the full model. Called under `params_on_meta()`, so it allocates no weights."""

    @abstractmethod
    def units(self, model: nn.Module) -> list[Unit]:
        """Ordered units wrapping `model`'s submodules; every parameter belongs to one unit
        (tied parameters may appear in two)."""

    def shared(self, model: nn.Module) -> dict[str, nn.Module]:
        """Parameter-free modules every stage needs (e.g. rotary embeddings)."""
        return {}

    @abstractmethod
    def input_spec(self) -> InputSpec:
        """What requests to this model look like."""

    @abstractmethod
    def reference_forward(self, model: nn.Module, inputs: Activation) -> torch.Tensor:
        """The monolithic model's own forward on stage-0 inputs; the pipeline must match it."""
