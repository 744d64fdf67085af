"""LLM generation: sampling, tokenizers, the OpenAI-compatible API and the engine.

This package's `__init__` imports nothing: the controller imports the torch-free modules
(`errors`, `params`, `tokenizer`, `openai_api`) and must never pull in torch through here.
"""
