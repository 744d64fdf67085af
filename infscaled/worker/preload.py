"""Imported once by each supervisor's fork server (worker/start.py), so its members start warm.

Everything here is what a stage worker or the dispatcher service would import anyway before it
could build its stage; nothing touches CUDA, starts a thread or holds job state, since every
member is a fork of this process. A family whose extra is not installed (torchvision for CNNs)
is skipped: its workers import it themselves, as they did before.
"""

from __future__ import annotations

import importlib

_MODULES = (
    "torch",
    "aiohttp",
    "transformers",
    "transformers.masking_utils",
    "transformers.models.auto.configuration_auto",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.llama.modeling_llama",
    "transformers.models.mistral.modeling_mistral",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.bert.modeling_bert",
    "transformers.models.resnet.modeling_resnet",
    "infscaled.models.stage",
    "infscaled.models.sources",
    "infscaled.models.families.gpt2",
    "infscaled.models.families.llama",
    "infscaled.models.families.bert",
    "infscaled.models.families.resnet",
    "infscaled.models.families.chain",
    "infscaled.engine.core",
    "infscaled.engine.programs.forward",
    "infscaled.engine.programs.generation",
    "infscaled.worker.entry",
    "infscaled.worker.service",
    "infscaled.worker.nccl",
    "infscaled.dispatch.core",
    "infscaled.dispatch.batching",
    "infscaled.dispatch.sequences",
)

for _name in _MODULES:
    try:
        importlib.import_module(_name)
    except ImportError:
        pass
