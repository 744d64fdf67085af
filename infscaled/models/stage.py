"""Materialise a stage (a contiguous range of units) and only its weights.

The full model is built as a skeleton with parameters on the meta device; the stage's
units are then given real tensors one parameter at a time, read from the checkpoint or
drawn from the seeded init. Other units' parameters are never allocated, so a worker's
peak memory grows with its stage, not with the model.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from infscaled.errors import ModelError
from infscaled.models.base import Activation, Context, Family, Unit
from infscaled.models.meta import buffer_names, dtype_of, numel, param_aliases, params_on_meta
from infscaled.models.sources import ResolvedModel
from infscaled.models.weights import Checkpoint, seeded_tensor

INIT_THREADS_ENV = "INFSCALED_INIT_THREADS"


@dataclass(frozen=True)
class Skeleton:
    """A model built on meta and cut into units; costs no weight memory."""

    family: Family
    model: nn.Module
    units: list[Unit]

    @property
    def unit_count(self) -> int:
        return len(self.units)

    def unit_weights(self) -> list[int]:
        """Parameter count per unit (tied weights count in each unit that uses them)."""
        return [numel(u) for u in self.units]


def skeleton(resolved: ResolvedModel) -> Skeleton:
    with params_on_meta():
        model = resolved.family.build()
    model.eval()
    units = resolved.family.units(model)
    if not units:
        raise ModelError(f"{resolved.source}: the model has no units")
    _check_units_cover(model, units, resolved.source)
    return Skeleton(resolved.family, model, units)


def _check_units_cover(model: nn.Module, units: list[Unit], source: str) -> None:
    """Every parameter must belong to some unit, or a split would silently drop it."""
    in_units = {id(p) for u in units for p in u.parameters()}
    missing = [n for n, p in model.named_parameters() if id(p) not in in_units]
    if missing:
        raise ModelError(f"{source}: adapter bug: parameters in no unit: {missing[:5]}")


class Stage(nn.Module):
    """Units first..last of a model, on one device, ready to run micro-batches."""

    def __init__(self, units: list[Unit], shared: dict[str, nn.Module], first: int, last: int,
                 param_names: list[str]) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.shared = nn.ModuleDict(shared)
        self.first, self.last = first, last
        # Full-model (canonical) names of the parameters this stage holds.
        self.param_names = param_names

    def forward(self, act: Activation, kv: Any = None) -> Activation:  # type: ignore[override]
        """Run the units; `kv` (generation.kv.BatchKV) gives the attention layers the KV cache of
        the micro-batch's sequences and collects their new keys and values."""
        ctx: Context = {"shared": self.shared}
        if kv is not None:
            ctx["kv"] = kv
        for unit in self.units:
            act = unit(act, ctx)
        return act


def materialize(sk: Skeleton, first: int, last: int, device: str, dtype: str, seed: int,
                checkpoint_dir: str | None) -> Stage:
    """Give units first..last real tensors on `device`; the rest of the skeleton stays meta.

    The values are made (drawn or read) in a pool of threads, one parameter per task, each cast
    to the stage's dtype before it is copied to `device`: a 3B model's seeded init drawn on one
    thread, in float32, then copied took ~70 s before the first decode step (BENCHMARKS.md
    section 14). The values do not depend on the pool (each parameter has its own generator,
    keyed by its name), so stages, the monolith and `--verify` still agree bit for bit."""
    if not 0 <= first <= last < sk.unit_count:
        raise ModelError(f"unit range {first}..{last} outside 0..{sk.unit_count - 1}")
    torch_dtype = dtype_of(dtype)
    aliases = param_aliases(sk.model)
    buffers = buffer_names(sk.model)
    ckpt = Checkpoint(Path(checkpoint_dir)) if checkpoint_dir else None
    prefix = getattr(sk.model, "base_model_prefix", "")
    units = sk.units[first:last + 1]
    todo: dict[int, tuple[list[str], torch.Size]] = {}  # id(param) -> its names and shape, once per tied group
    for unit in units:
        for module in unit.modules():
            for pname, p in module._parameters.items():
                if p is not None and id(p) not in todo:
                    todo[id(p)] = (aliases.get(id(p), [pname]), p.shape)

    def make(names: list[str], shape: torch.Size) -> nn.Parameter:
        value = _value(names, shape, seed, ckpt, prefix, device, sk)
        if value.device.type == "cpu":
            value = value.to(torch_dtype)  # cast on the host: half the bytes to copy for 16-bit stages
        return nn.Parameter(value.to(device=device, dtype=torch_dtype), requires_grad=False)

    with ThreadPoolExecutor(max_workers=init_threads(len(todo))) as pool:
        futures = {key: pool.submit(make, names, shape) for key, (names, shape) in todo.items()}
        made = {key: f.result() for key, f in futures.items()}  # keeps tied parameters tied inside the stage
    names: list[str] = [todo[key][0][0] for key in todo]
    for unit in units:
        for module in unit.modules():
            for pname, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[pname] = made[id(p)]
            for bname, b in list(module._buffers.items()):
                if b is None:
                    continue
                key = buffers.get(id(b))
                if ckpt is not None and key is not None and (found := ckpt.find([key], prefix)):
                    b = ckpt.load(found, "cpu")
                b = b.to(device)
                module._buffers[bname] = b.to(torch_dtype) if b.is_floating_point() else b
    shared = {k: m.to(device) for k, m in sk.family.shared(sk.model).items()}
    stage = Stage(list(units), shared, first, last, names)
    stage.eval()
    return stage


def init_threads(tasks: int) -> int:
    """Threads that make a stage's weights: INFSCALED_INIT_THREADS, else the host's cores (at most
    16; a worker's compute runs on INFSCALED_WORKER_THREADS, but building happens once, before it)."""
    raw = os.environ.get(INIT_THREADS_ENV, "")
    if raw:
        try:
            wanted = int(raw)
        except ValueError:
            raise ModelError(f"{INIT_THREADS_ENV}={raw!r}: expected a whole number of threads >= 1") from None
        if wanted < 1:
            raise ModelError(f"{INIT_THREADS_ENV}={raw!r}: expected a whole number of threads >= 1")
    else:
        wanted = min(16, os.cpu_count() or 1)
    return max(1, min(wanted, tasks))


def _value(full: list[str], shape: torch.Size, seed: int, ckpt: Checkpoint | None, prefix: str,
           device: str, sk: Skeleton) -> torch.Tensor:
    if ckpt is None:
        return seeded_tensor(full[0], shape, seed)
    key = ckpt.find(full, prefix)
    if key is not None:
        value = ckpt.load(key, device)
    elif (built := ckpt.assembled(full[0], shape[0] if len(shape) else 0, prefix, device)) is not None:
        value, key = built, f"(assembled for {full[0]})"
    else:
        raise ModelError(f"{ckpt.directory}: checkpoint has no tensor for parameter {full[0]}")
    if value.shape != shape:
        raise ModelError(f"{ckpt.directory}: tensor {key} has shape {tuple(value.shape)}, "
                         f"the model expects {tuple(shape)}")
    return value


def build_stage(resolved: ResolvedModel, first: int, last: int, device: str, dtype: str, seed: int,
                compile_layers: bool = False) -> Stage:
    """A worker's stage: skeleton, then only units first..last materialised; `compile_layers`
    (job option pipeline.compile) compiles its decoder layers (`compile_stage`)."""
    ckpt = str(resolved.checkpoint_dir) if resolved.checkpoint_dir else None
    stage = materialize(skeleton(resolved), first, last, device, dtype, seed, ckpt)
    if compile_layers:
        compile_stage(stage)
    return stage


def compile_stage(stage: Stage, backend: str = "inductor", mode: str | None = None) -> int:
    """torch.compile the stage's decoder layers (units that support it: CompilableLayer in
    models/families/common.py); returns how many. Why layers and not the whole stage: the units
    pass dicts and a per-micro-batch context around, while a layer is a plain tensor function
    whose compiled graph every layer of the stage shares. Compilation happens on the first
    micro-batch of each shape (seconds per shape); CUDA graphs then capture the compiled
    kernels as they captured the eager ones."""
    count = 0
    for unit in stage.units:
        compile_layer = getattr(unit, "compile_layer", None)
        if compile_layer is not None:
            compile_layer(backend, mode)
            count += 1
    return count


def fuse_stage(stage: Stage) -> int:
    """Fuse the decoder layers' projections for decode steps (units that support it: LlamaBlock,
    models/families/fused_decode.py); returns how many. Generation stages call it once."""
    return sum(1 for unit in stage.units if getattr(unit, "fuse_projections", lambda: False)())


class Monolith:
    """The whole model materialised in one process: the reference a pipeline must match."""

    def __init__(self, resolved: ResolvedModel, device: str, dtype: str, seed: int) -> None:
        sk = skeleton(resolved)
        ckpt = str(resolved.checkpoint_dir) if resolved.checkpoint_dir else None
        self.stage = materialize(sk, 0, sk.unit_count - 1, device, dtype, seed, ckpt)
        self.family = sk.family
        self.model = sk.model
        self.device = device

    @torch.inference_mode()
    def forward(self, inputs: Activation) -> torch.Tensor:
        """The family's own (Hugging Face) forward on the full model, not our unit chain."""
        return self.family.reference_forward(self.model, {k: v.to(self.device) for k, v in inputs.items()})
