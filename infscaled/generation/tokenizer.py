"""Tokenizers (transformers': the model directory's own, or the byte-level BPE shipped for builtin
models) and the incremental detokenizer that turns streamed token ids into text deltas and
applies stop strings.

Torch-free; transformers is imported only when an HFTokenizer is built.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from infscaled.errors import ModelError
from infscaled.generation.errors import GenerationError, RequestError

CHAT_ROLES = ("system", "developer", "user", "assistant")
# Any of these in a directory means it holds a transformers tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_REPLACEMENT = "\ufffd"
# The builtin models' tokenizer (trained by infscaled/models/train_tokenizer.py): any HF client loads it.
BUILTIN_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "models" / "builtin_tokenizer"


@runtime_checkable
class Tokenizer(Protocol):
    """What the front end needs from a tokenizer."""

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a sequence (unless ignore_eos): the tokenizer's eos and the model's."""
        ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; an incomplete UTF-8 sequence at the end decodes to U+FFFD. Special
        tokens (eos, chat markers) are left out unless `skip_special_tokens` is False."""
        ...

    def apply_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids for chat `messages` ([{role, content}]) ending with the assistant's turn."""
        ...


class HFTokenizer:
    """A transformers tokenizer from a local model directory (or the local hub cache); never downloads.

    `encode` adds the tokenizer's special tokens (a BOS where the model expects one); `decode`
    skips special tokens unless asked not to. Chat uses the tokenizer's own chat template;
    without one a chat request is a 400. `eos_token_ids`: the tokenizer's eos, then the model's
    own (`generation_config.json`, else `config.json`, as transformers' `generate` reads them).
    """

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.source = str(path)
        try:
            self.tok: Any = AutoTokenizer.from_pretrained(self.source, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model.source {self.source!r}: cannot load its tokenizer: {exc}") from exc
        self._model_eos = model_eos_ids(path)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tok.eos_token_id
        return eos if isinstance(eos, int) else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        first = () if self.eos_token_id is None else (self.eos_token_id,)
        return first + tuple(i for i in self._model_eos if i not in first)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            raise RequestError(400, f"the model's tokenizer ({self.source}) has no chat template: "
                                    "use /v1/completions with a prompt", param="messages")
        # `developer` is OpenAI's newer name for `system`, which is what templates know.
        messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
        from jinja2 import TemplateError, TemplateSyntaxError

        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateSyntaxError as exc:  # the model's fault, not the request's
            raise GenerationError(500, f"the chat template of {self.source} cannot be used: {exc}") from exc
        except TemplateError as exc:
            # The template's own raise_exception: e.g. Gemma's "System role not supported", or
            # Mistral's roles that must alternate user / assistant.
            raise RequestError(400, f"the model's chat template refused these messages: {exc}",
                               param="messages") from exc
        # The template writes the special tokens itself (BOS included): do not add them again.
        return list(self.tok.encode(text, add_special_tokens=False))


def model_eos_ids(path: str | Path) -> tuple[int, ...]:
    """The end-of-sequence ids a model directory declares: `eos_token_id` (an id or a list) of its
    `generation_config.json`, or of its `config.json` when it has none. transformers' `generate`
    stops at each of them, and so does vLLM; a chat model often lists its end-of-turn marker
    there and not as the tokenizer's eos. () for anything that is not such a directory."""
    for name in ("generation_config.json", "config.json"):
        file = Path(path) / name
        if not file.is_file():
            continue
        try:
            value = json.loads(file.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelError(f"model.source {str(path)!r}: cannot read {name}: {exc}") from exc
        ids = value if isinstance(value, list) else [value]
        return tuple(i for i in ids if isinstance(i, int) and not isinstance(i, bool))
    return ()


def describe_tokenizer(tokenizer: Tokenizer, context_length: int, vocab_size: int) -> dict[str, Any]:
    """GET /tokenizer_info (vLLM's shape): what a client needs to tokenize as the server does."""
    tok = getattr(tokenizer, "tok", None)
    if tok is None:
        return {"tokenizer_class": type(tokenizer).__name__, "eos_token": None,
                "eos_token_id": tokenizer.eos_token_id, "bos_token": None, "pad_token": None, "chat_template": None,
                "model_max_length": context_length, "vocab_size": vocab_size}
    template = getattr(tok, "chat_template", None)
    return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "eos_token_id": tokenizer.eos_token_id,
            "bos_token": tok.bos_token, "pad_token": tok.pad_token,
            "chat_template": template if isinstance(template, str) else None,
            "model_max_length": context_length, "vocab_size": vocab_size}


def load_tokenizer(source: str) -> Tokenizer:
    """The tokenizer for a job's `model.source`: builtin -> the byte-level BPE the package ships
    (models/builtin_tokenizer, see models/train_tokenizer.py); a directory or a cached Hugging
    Face id with tokenizer files -> its own; anything else raises ModelError. Always HFTokenizer."""
    if source.startswith("builtin:"):
        return HFTokenizer(BUILTIN_TOKENIZER_DIR)
    if source.startswith("python:"):
        raise ModelError(f"model.source {source!r}: python: models have no tokenizer; generation needs a "
                         "builtin model or a transformers directory with tokenizer files")
    path = Path(source)
    if path.is_dir():
        if not any((path / name).exists() for name in TOKENIZER_FILES):
            raise ModelError(f"model.source {source!r}: no tokenizer files in the directory "
                             f"(looked for {', '.join(TOKENIZER_FILES)})")
        return HFTokenizer(path)
    return HFTokenizer(source)  # a hub id: only the local cache is read


class StreamDecoder:
    """Turns token ids, fed one at a time, into text deltas that are safe to send.

    - Never emits a partial UTF-8 character: text whose decoding ends in U+FFFD waits for the
      next ids (vLLM / TGI's prefix-offset method, which also keeps tokenizers that merge spaces
      across tokens right).
    - Stop strings: once the text contains one, `stopped` is set, `stop_string` says which, and
      the text before it is the last delta. Text that could be the start of a stop string is held
      back until decided. `flush()` returns what is held when the sequence ends otherwise.
    - Special tokens the model generates are left out of the text unless `skip_special_tokens`
      is False (vLLM's default and its request field of that name).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(s for s in stop if s)
        self.stopped = False
        self.stop_string: str | None = None
        self.text = ""  # everything emitted so far
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] decode to text already taken
        self._read = 0
        self._held = ""  # decoded, not emitted: might begin a stop string

    def feed(self, token_id: int) -> str:
        """The text this id completes (possibly ""); "" once stopped."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if new_text.endswith(_REPLACEMENT) or len(new_text) <= len(prefix_text):
            return ""  # an incomplete character, or nothing new yet
        self._prefix, self._read = self._read, len(self._ids)
        return self._emit(self._held + new_text[len(prefix_text):])

    def flush(self) -> str:
        """At the end of the sequence: the held text and any undecodable tail (as U+FFFD)."""
        if self.stopped:
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        tail = self._decode(self._ids[self._prefix:])[len(prefix_text):]
        self._prefix = self._read = len(self._ids)
        out, self._held = self._held + tail, ""
        self.text += out
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, pending: str) -> str:
        hits = [(i, s) for s in self.stop if (i := pending.find(s)) >= 0]
        if hits:
            index, self.stop_string = min(hits)
            self.stopped = True
            self._held = ""
            self.text += pending[:index]
            return pending[:index]
        keep = self._stop_prefix_len(pending)
        out, self._held = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self.text += out
        return out

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of `text` that some stop string starts with."""
        longest = min(len(text), max((len(s) - 1 for s in self.stop), default=0))
        for k in range(longest, 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                return k
        return 0
