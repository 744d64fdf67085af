"""Plain torch chains from "python:module:factory" sources.

The factory returns an nn.Module whose forward applies its children in order (an
nn.Sequential, or anything that behaves like one). Units are its leaf children after
flattening nested nn.Sequential containers; any other child is one indivisible unit.
The module must carry `input_shape`: one sample's shape without the batch dimension.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from infscaled.errors import ModelError
from infscaled.models.base import Activation, Context, Family, InputSpec, Unit
from infscaled.models.meta import params_on_meta


def leaf_children(module: nn.Module) -> list[nn.Module]:
    """Children in order, nested nn.Sequential containers flattened; a childless module is its own leaf."""
    # _modules, not children(): children() drops repeats of one instance (a shared ReLU used twice).
    children = [m for m in module._modules.values() if m is not None]
    if not children:
        return [module]
    out: list[nn.Module] = []
    for child in children:
        out.extend(leaf_children(child) if isinstance(child, nn.Sequential) else [child])
    return out


class ChainUnit(Unit):
    def __init__(self, module: nn.Module, first: bool, last: bool) -> None:
        super().__init__()
        self.module = module
        self.in_key = "input" if first else "hidden"
        self.out_key = "output" if last else "hidden"

    def forward(self, act: Activation, ctx: Context) -> Activation:
        return {self.out_key: self.module(act[self.in_key])}


class ChainFamily(Family):
    name = "chain"

    def __init__(self, factory: Callable[[], nn.Module], source: str) -> None:
        self.factory = factory
        self.source = source
        self._input_shape: tuple[int, ...] | None = None

    def build(self) -> nn.Module:
        model = self.factory()
        if not isinstance(model, nn.Module):
            raise ModelError(f"model.source {self.source!r}: the factory returned {type(model).__name__}, "
                             "not a torch.nn.Module")
        shape = getattr(model, "input_shape", None)
        if shape is None:
            raise ModelError(
                f"model.source {self.source!r}: the module has no `input_shape`; set it in the factory to "
                "one sample's shape without the batch dimension, e.g. `model.input_shape = (3, 224, 224)`"
            )
        try:
            self._input_shape = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise ModelError(f"model.source {self.source!r}: `input_shape` must be a tuple of ints, "
                             f"got {shape!r}") from None
        return model

    def units(self, model: nn.Module) -> list[Unit]:
        leaves = leaf_children(model)
        last = len(leaves) - 1
        return [ChainUnit(m, i == 0, i == last) for i, m in enumerate(leaves)]

    def input_spec(self) -> InputSpec:
        if self._input_shape is None:
            with params_on_meta():  # only to read input_shape; costs no weight memory
                self.build()
        assert self._input_shape is not None
        return InputSpec("tensor", sample_shape=self._input_shape)

    def reference_forward(self, model: nn.Module, inputs: Activation) -> torch.Tensor:
        out: torch.Tensor = model(inputs["input"])
        return out
