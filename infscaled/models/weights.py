"""Where a stage's tensor values come from: a safetensors checkpoint, or a seeded init.

Both read or create one tensor at a time by full-model name, so a worker only ever
holds its own stage's weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch

from infscaled.errors import ModelError


def seeded_tensor(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """Deterministic float32 values for the parameter called `name`.

    Keyed by (seed, name) alone, so every stage that builds a parameter, and the
    monolithic reference, get identical values no matter which other units exist.
    He-scaled normals (std sqrt(2 / fan_in)) keep activations O(1) through deep random
    ReLU nets; a fixed small std would make deep CNN outputs vanish and comparisons
    between pipeline and monolith meaningless.
    """
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) < 2:  # norm scales
        return torch.ones(shape)
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen).mul_(math.sqrt(2.0 / fan_in))


class Checkpoint:
    """Lazy reader of a local safetensors checkpoint (single file or sharded index)."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self._open = safe_open
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self._file_of = {k: directory / f for k, f in weight_map.items()}
        elif single.exists():
            with safe_open(str(single), framework="pt") as f:
                self._file_of = {k: single for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
        else:
            raise ModelError(f"{directory}: no model.safetensors or model.safetensors.index.json")

    def has(self, key: str) -> bool:
        return key in self._file_of

    def find(self, names: list[str], prefix: str) -> str | None:
        """First checkpoint key among `names`, also trying them without the base-model prefix
        (a checkpoint saved from the base model lacks e.g. "bert.")."""
        for n in names:
            for candidate in (n, n.removeprefix(prefix + ".") if prefix else n):
                if candidate in self._file_of:
                    return candidate
        return None

    def load(self, key: str, device: torch.device | str) -> torch.Tensor:
        with self._open(str(self._file_of[key]), framework="pt", device=str(device)) as f:
            return f.get_tensor(key)

    def assembled(self, name: str, experts: int, prefix: str, device: torch.device | str) -> torch.Tensor | None:
        """The parameter `name` built from the tensors a checkpoint keeps in its place
        (`CHECKPOINT_LAYOUTS`: a mixture-of-experts layer's experts one by one), or None when no
        layout matches. `experts`: the parameter's first dimension (its experts' count)."""
        for pattern, sources in CHECKPOINT_LAYOUTS:
            match = re.match(pattern, name)
            if match is None:
                continue
            per_expert = "{e}" in sources[0]
            first = [match.expand(src).format(e=0) for src in sources]
            if any(self.find([key], prefix) is None for key in first):
                continue
            if not per_expert:
                return self.load(self.find(first, prefix) or "", device)
            parts = []
            for src in sources:
                keys = [self.find([match.expand(src).format(e=e)], prefix) for e in range(experts)]
                missing = [match.expand(src).format(e=e) for e, k in enumerate(keys) if k is None]
                if missing:
                    raise ModelError(f"{self.directory}: checkpoint has no tensor {missing[0]} for parameter {name} "
                                     f"({experts} experts)")
                parts.append(torch.stack([self.load(k or "", device) for k in keys]))
            return torch.cat(parts, dim=1)
        return None


# Where a checkpoint keeps what transformers 5 holds as one tensor (its checkpoint conversion
# mapping, applied here a parameter at a time): (the parameter's name, what the checkpoint has
# instead). "{e}" numbers experts: their tensors are stacked (dim 0), then the sources are
# concatenated (dim 1: gate, then up). Without "{e}": a renamed tensor.
CHECKPOINT_LAYOUTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Qwen2-MoE, Qwen3-MoE, OLMoE
    (r"^(.*)\.mlp\.experts\.gate_up_proj$",
     (r"\1.mlp.experts.{e}.gate_proj.weight", r"\1.mlp.experts.{e}.up_proj.weight")),
    (r"^(.*)\.mlp\.experts\.down_proj$", (r"\1.mlp.experts.{e}.down_proj.weight",)),
    # Mixtral: w1 = gate, w3 = up, w2 = down, under `block_sparse_moe`
    (r"^(.*)\.mlp\.experts\.gate_up_proj$",
     (r"\1.block_sparse_moe.experts.{e}.w1.weight", r"\1.block_sparse_moe.experts.{e}.w3.weight")),
    (r"^(.*)\.mlp\.experts\.down_proj$", (r"\1.block_sparse_moe.experts.{e}.w2.weight",)),
    (r"^(.*)\.mlp\.gate\.weight$", (r"\1.block_sparse_moe.gate.weight",)),
)
