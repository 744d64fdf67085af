"""A GenerationBackend that runs a transformers causal LM in this process, one sequence at a time.

It is the single-process baseline (tests, and the benchmark against the pipeline): the model's
own forward with its KV cache (`cache`), the next token picked by `sample_next` (with the
sequence's tokens so far, for penalties and min_tokens), so it honours SamplingParams exactly as
the pipeline's last stage does; it also reports log-probabilities (`token_logprobs`) of the
chosen tokens and, from the prompt's forward, of the prompt's. The forward passes run in a
thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import torch

from infscaled.generation.params import FEATURES, PromptLogprobs, Sampled, SamplingParams
from infscaled.generation.sampling import SequenceSampling, make_generator, prompt_logprobs, sample_step


def model_limits(config: Any) -> tuple[int, int]:
    """(context length, vocab size) of a transformers decoder config."""
    for name in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name), int(config.vocab_size)
    raise ValueError(f"{type(config).__name__} says no context length (max_position_embeddings / n_positions)")


class ReferenceBackend:
    """Runs `model` (a transformers *ForCausalLM, in eval mode) for one sequence at a time.

    Counts what happened to its sequences for tests: `started`, `finished` (ran to
    max_new_tokens or a stop id) and `cancelled` (closed early: the client went away);
    `cancelled_event` is set at each cancellation.
    """

    features = frozenset(FEATURES)  # every sampling feature: the reference for the pipeline's

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self._lock = asyncio.Lock()  # one sequence at a time: the reference, not the engine
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self.cancelled_event = asyncio.Event()

    @classmethod
    def from_source(cls, source: str, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> ReferenceBackend:
        """The monolithic model of a job's `model.source`, with the weights the pipeline's stages get."""
        from infscaled.models.sources import resolve
        from infscaled.models.stage import Monolith

        return cls(Monolith(resolve(source), device, dtype, seed).model)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int | Sampled | PromptLogprobs]:
        async with self._lock:
            self.started += 1
            state = SequenceSampling(params, make_generator(params.seed, self.device), prompt_ids)
            stop = set(params.stop_token_ids)
            ids = torch.tensor([prompt_ids], device=self.device)  # ids: [1, T], then [1, 1]
            past: Any = None
            ended = False
            try:
                for step in range(params.max_new_tokens):
                    logits, past = await asyncio.to_thread(self._forward, ids, past)  # logits: [T, V]
                    if step == 0 and params.prompt_logprobs is not None:
                        yield prompt_logprobs(logits, prompt_ids, params.prompt_logprobs)
                    [token], [reported] = sample_step(logits[-1:], [state])
                    yield token if reported is None else reported
                    if token in stop:
                        break
                    ids = torch.tensor([[token]], device=self.device)
                ended = True
            finally:
                if ended:
                    self.finished += 1
                else:
                    self.cancelled += 1
                    self.cancelled_event.set()

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=ids, cache=past, use_cache=True)
        return out.logits[0].float(), out.cache
