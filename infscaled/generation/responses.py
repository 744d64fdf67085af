"""OpenAI response bodies and stream chunks, built as plain dicts (their schema is in schema.py):
choices, usage, and log-probabilities in the completions and the chat shapes. Torch-free."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from infscaled.generation.metrics import RequestTimes

Kind = Literal["completion", "chat"]
FinishReason = Literal["stop", "length"]
DONE = b"data: [DONE]\n\n"


class Alternative(NamedTuple):
    token: str
    logprob: float


class LogprobEntry(NamedTuple):
    """One token of a choice with its log-probability (None: the first prompt token, which
    nothing predicts) and the most likely alternatives at its position."""

    token: str
    logprob: float | None
    top: tuple[Alternative, ...] = ()


class Piece(NamedTuple):
    """What one choice adds at a time: text, the log-probabilities of the tokens behind it, and
    how many tokens the choice had generated when it was cut (per-chunk usage)."""

    text: str
    logprobs: tuple[LogprobEntry, ...] = ()
    completion_tokens: int = 0


@dataclass
class Outcome:
    """What one choice produced so far: counts for usage, and how it ended."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    times: RequestTimes = field(default_factory=lambda: RequestTimes(time.monotonic()))
    text: list[str] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's prompt_logprobs, when asked

    def add(self, piece: Piece) -> None:
        self.text.append(piece.text)
        self.logprobs += piece.logprobs


def usage(prompt_tokens: int, outcomes: Sequence[Outcome]) -> dict[str, int]:
    """Each prompt counted once (however many choices it has), every choice's tokens."""
    return counts(prompt_tokens, sum(o.completion_tokens for o in outcomes))


def counts(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries: Sequence[LogprobEntry], offset: int = 0) -> dict[str, Any]:
    """The completions shape: parallel lists; text_offset counts characters from `offset`."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{a.token: a.logprob for a in e.top} if e.logprob is not None else None
                             for e in entries],
            "text_offset": offsets}


def chat_logprobs(entries: Sequence[LogprobEntry]) -> dict[str, Any]:
    """The chat shape: one object per token, with its UTF-8 bytes."""
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode()),
                         "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": list(a.token.encode())}
                                          for a in e.top]}
                        for e in entries],
            "refusal": None}


class Envelope(NamedTuple):
    """The fields every response and chunk of one request shares."""

    kind: Kind
    id: str
    created: int
    model: str
    logprobs: bool  # the client asked for log-probabilities

    @classmethod
    def new(cls, kind: Kind, model: str, logprobs: bool = False) -> Envelope:
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        return cls(kind, f"{prefix}-{secrets.token_hex(12)}", int(time.time()), model, logprobs)

    @property
    def obj(self) -> str:
        return "text_completion" if self.kind == "completion" else "chat.completion.chunk"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, entries: Sequence[LogprobEntry], offset: int = 0) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return completion_logprobs(entries, offset) if self.kind == "completion" else chat_logprobs(entries)

    def response(self, outcomes: Sequence[Outcome], prompt_tokens: int) -> dict[str, Any]:
        """The non-streaming answer: one choice per outcome, in order."""
        choices = []
        for index, o in enumerate(outcomes):
            text = "".join(o.text)
            if self.kind == "completion":
                choice: dict[str, Any] = {"index": index, "text": text, "logprobs": self._logprobs(o.logprobs),
                                          "finish_reason": o.finish_reason}
                if o.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = o.prompt_logprobs
            else:
                message = {"role": "assistant", "content": text, "refusal": None}
                choice = {"index": index, "message": message, "logprobs": self._logprobs(o.logprobs),
                          "finish_reason": o.finish_reason}
            choices.append(choice)
        obj = "text_completion" if self.kind == "completion" else "chat.completion"
        return {**self._head(obj), "choices": choices, "usage": usage(prompt_tokens, outcomes)}

    def chunk(self, index: int, piece: Piece | None, finish_reason: FinishReason | None = None, *,
              role: bool = False, with_usage: bool = False, usage: dict[str, int] | None = None,
              offset: int = 0) -> dict[str, Any]:
        """One streamed chunk of choice `index`; `role` marks chat's first one, `with_usage` adds
        `"usage": usage` (null unless per-chunk usage was asked for: `counts` of that choice so
        far); `offset` is the choice's text length so far (completions' text_offset)."""
        entries = piece.logprobs if piece is not None else ()
        logprobs = self._logprobs(entries, offset) if entries else None
        if self.kind == "completion":
            choice: dict[str, Any] = {"index": index, "text": piece.text if piece else "", "logprobs": logprobs,
                                      "finish_reason": finish_reason}
        else:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if piece is not None:
                delta["content"] = piece.text
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        out = {**self._head(self.obj), "choices": [choice]}
        return {**out, "usage": usage} if with_usage else out

    def usage_chunk(self, outcomes: Sequence[Outcome], prompt_tokens: int) -> dict[str, Any]:
        return {**self._head(self.obj), "choices": [], "usage": usage(prompt_tokens, outcomes)}


def sse(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
