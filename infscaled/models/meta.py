"""Build a full model without allocating its weights.

Every parameter is moved to the meta device the moment it is registered, before the
module's own `reset_parameters()` runs, so construction costs no memory and no init
time. Buffers (rotary tables, BatchNorm statistics, position-id ranges) stay real:
they are small, and several are non-persistent values computed in constructors that
could not be recovered from a meta tensor afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    original = nn.Module.register_parameter

    def register_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def param_aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every full-model name it has (tied weights have several).

    The first name is canonical: it keys the seeded initialisation, so a tied weight
    gets the same values on every stage that holds it.
    """
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    return aliases


def buffer_names(model: nn.Module) -> dict[int, str]:
    """id(buffer) -> its full-model name, for persistent buffers only (the checkpointed ones)."""
    names: dict[int, str] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for b_name, b in mod._buffers.items():
            if b is not None and b_name not in mod._non_persistent_buffers_set:
                names.setdefault(id(b), f"{mod_name}.{b_name}" if mod_name else b_name)
    return names


def is_meta(module: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module.parameters())


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def dtype_of(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; allowed: float32, bfloat16, float16") from None
