"""Turn a job's `model.source` string into a family adapter and a weight source.

Forms: "builtin:NAME" (tiny random-init configs), "python:module:factory" (a chain of
torch modules), a local directory (transformers config + safetensors), or a Hugging
Face id (resolved from the local cache; there is no download at serve time).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infscaled.errors import ModelError
from infscaled.models.base import Family

# The model types of families/llama.py (its `_TYPES`; test_models_decoders checks), named here
# without importing that module.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "starcoder2", "smollm3", "gemma",
              "gemma2", "gemma3_text", "granite", "olmo", "glm", "glm4", "helium", "arcee", "seed_oss",
              "hunyuan_v1_dense", "apertus", "ministral", "exaone4", "cohere", "cohere2", "mixtral", "qwen2_moe",
              "qwen3_moe", "olmoe")

# transformers model_type -> module under infscaled.models.families and its class.
# Mistral, Qwen2 and the others of families/llama.py share Llama's model structure, so one
# adapter serves them.
_HF_FAMILIES: dict[str, tuple[str, str]] = {
    "gpt2": ("gpt2", "GPT2Family"),
    **{model_type: ("llama", "LlamaFamily") for model_type in LLAMA_LIKE},
    "bert": ("bert", "BertFamily"),
    "resnet": ("resnet", "ResNetFamily"),
}


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to build: its adapter, and where its weights come from."""

    source: str
    family: Family
    # Local directory with safetensors; None means seeded random init.
    checkpoint_dir: Path | None


def family_for_config(config: Any) -> Family:
    """The adapter for a transformers config, by its model_type."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _HF_FAMILIES:
        raise ModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(_HF_FAMILIES))}"
        )
    module_name, cls_name = _HF_FAMILIES[model_type]
    module = importlib.import_module(f"infscaled.models.families.{module_name}")
    family: Family = getattr(module, cls_name)(config)
    return family


def resolve(source: str) -> ResolvedModel:
    """Resolve a validated `model.source`; raises ModelError when it cannot be used."""
    if source.startswith("builtin:"):
        from infscaled.models.builtins import builtin_family

        return ResolvedModel(source, builtin_family(source.removeprefix("builtin:")), None)
    if source.startswith("python:"):
        from infscaled.models.families.chain import ChainFamily

        _, module_name, factory_name = source.split(":", 2)
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError) as exc:
            raise ModelError(f"model.source {source!r}: cannot import {module_name}:{factory_name}: {exc}") from exc
        return ResolvedModel(source, ChainFamily(factory, source), None)
    return _resolve_hf(source)


def _resolve_hf(source: str) -> ResolvedModel:
    from transformers import AutoConfig

    path = Path(source)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as exc:  # noqa: BLE001 - the hub raises many types; all mean "not available"
            raise ModelError(
                f"model.source {source!r}: not a local directory and not in the Hugging Face cache "
                f"(serving never downloads; fetch it first or give a directory): {exc}"
            ) from exc
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.source {source!r}: cannot read a transformers config: {exc}") from exc
    has_weights = (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()
    return ResolvedModel(source, family_for_config(config), path if has_weights else None)
