"""Builtin models: transformers configs built with random weights (fixed seed), no files needed.

The tiny ones exist for demos and tests (they run in milliseconds on a CPU); the large
ones have real architectures and sizes for GPU benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from infscaled.errors import ModelError
from infscaled.models.base import Family


def _gpt2_tiny() -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=512, n_positions=256, n_embd=64, n_layer=4, n_head=4,
                      bos_token_id=0, eos_token_id=0)


def _llama(logits: str = "all", **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        from transformers import LlamaConfig

        config = LlamaConfig(**kw)
        if logits != "all":
            config.infscaled_logits = logits  # read by the llama adapter (families/llama.py)
        return config

    return make


_LLAMA_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
_LLAMA_3B = dict(vocab_size=32000, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                 num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=4096)


def _mistral_tiny() -> Any:
    from transformers import MistralConfig

    return MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _qwen2_tiny() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=True)


def _bert_tiny() -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=256, num_labels=3,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _resnet_tiny() -> Any:
    from transformers import ResNetConfig

    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                          layer_type="bottleneck", num_labels=10)
    # ResNetConfig has no image size; the adapter reads this one (default 224). 32 -> 1x1 before the pool.
    config.image_size = 32
    return config


_CONFIGS: dict[str, Callable[[], Any]] = {
    "gpt2-tiny": _gpt2_tiny,
    "llama-tiny": _llama(**_LLAMA_TINY),
    "mistral-tiny": _mistral_tiny,
    "qwen2-tiny": _qwen2_tiny,
    "bert-tiny": _bert_tiny,
    "resnet-tiny": _resnet_tiny,
    # ~3.0B parameters: the GPU benchmark model (hidden 3072, 28 layers, 32k vocab).
    "llama-3b": _llama(**_LLAMA_3B),
    # The same models returning next-token logits [B, V] (each row's last real position) instead
    # of [B, T, V]: prompt processing as a server answers it (benchmarks/gpu_bench.py).
    "llama-tiny-last": _llama("last", **_LLAMA_TINY),
    "llama-3b-last": _llama("last", **_LLAMA_3B),
}

BUILTIN_NAMES: tuple[str, ...] = tuple(_CONFIGS)


def builtin_config(name: str) -> Any:
    if name not in _CONFIGS:
        raise ModelError(f"unknown builtin model {name!r}; available: {', '.join(BUILTIN_NAMES)}")
    return _CONFIGS[name]()


def builtin_family(name: str) -> Family:
    from infscaled.models.sources import family_for_config

    return family_for_config(builtin_config(name))
