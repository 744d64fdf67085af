"""The OpenAI-compatible API: request parsing, response and SSE formatting, aiohttp handlers.

Torch-free. `make_handlers` serves `POST /v1/completions` and `POST /v1/chat/completions` over
any `GenerationBackend` (the pipeline dispatcher, or `reference.ReferenceBackend`): the handler
tokenizes, validates, streams text deltas (stop strings and UTF-8 boundaries through
`StreamDecoder`), counts usage and cancels the backend's sequence when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

from aiohttp import web

from infscaled.generation.errors import GenerationError, RequestError
from infscaled.generation.params import SamplingParams, parse_sampling
from infscaled.generation.tokenizer import CHAT_ROLES, StreamDecoder, Tokenizer

log = logging.getLogger(__name__)

Kind = Literal["completion", "chat"]
FinishReason = Literal["stop", "length"]
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_UNSUPPORTED_COMPLETION = {"echo": "echo is not supported", "logprobs": "logprobs are not supported",
                           "suffix": "suffix is not supported"}
_UNSUPPORTED_CHAT = {"logprobs": "logprobs are not supported", "top_logprobs": "logprobs are not supported",
                     "tools": "tools are not supported"}


class GenerationBackend(Protocol):
    """What runs sequences: the pipeline dispatcher, or ReferenceBackend in one process."""

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
        """Token ids as they are produced; ends after max_new_tokens ids or after yielding an id in
        params.stop_token_ids (which holds the tokenizer's eos unless ignore_eos). Closing the
        iterator early (aclose) cancels the sequence and frees its caches. Raises
        GenerationError(status, message) if it cannot run."""
        ...


@dataclass(frozen=True)
class GenerationRequest:
    """A parsed, validated completion or chat request."""

    kind: Kind
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ModelInfo:
    """What the handlers need to know about the served model."""

    name: str  # answered as `model` when a request names none
    context_length: int
    vocab_size: int
    default_max_tokens: int = 16


# -- parsing -------------------------------------------------------------------------------------


def _typed(body: Mapping[str, Any], field: str, cls: type, allowed: str) -> Any:
    """body[field] when absent, null or of type `cls` (a bool is no int here); else a 400."""
    value = body.get(field)
    if value is not None and (not isinstance(value, cls) or isinstance(value, bool) and cls is not bool):
        raise RequestError(400, f"{field} = {value!r}: {allowed}", param=field)
    return value


def _token_list(value: Any, vocab_size: int) -> list[int] | None:
    if (isinstance(value, list) and value
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in value)):
        return list(value)
    return None


def _completion_prompt(body: Mapping[str, Any], tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    """prompt: a string, a list of one string, token ids, or a list of one list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if (ids := _token_list(prompt, vocab_size)) is not None:
        return ids
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise RequestError(400, f"prompt is a list of {len(prompt)} prompts: only one prompt per request is "
                                "supported", param="prompt")
    shown = repr(prompt) if len(repr(prompt)) <= 80 else repr(prompt)[:77] + "..."
    raise RequestError(400, f"prompt = {shown}: must be a string, a list of one string, or a list of token ids "
                            f"from 0 to {vocab_size - 1}", param="prompt")


def _message_text(content: Any, where: str) -> str:
    """String content, or a list of {"type": "text", "text": ...} parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(400, f"{where} = {content!r}: must be a string (or a list of text parts)", param=where)


def _chat_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, f"messages = {messages!r}: must be a non-empty list of {{role, content}} objects",
                           param="messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RequestError(400, f"messages[{i}] = {msg!r}: must be an object with role and content",
                               param=f"messages[{i}]")
        role = msg.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(400, f"messages[{i}].role = {role!r}: must be one of {', '.join(CHAT_ROLES)}",
                               param=f"messages[{i}].role")
        out.append({"role": role, "content": _message_text(msg.get("content"), f"messages[{i}].content")})
    return out


def _unsupported(body: Mapping[str, Any], fields: Mapping[str, str]) -> None:
    for field, what in fields.items():
        value = body.get(field)
        if value not in (None, False, 0, []):
            raise RequestError(400, f"{field} = {value!r}: {what} by this server", param=field)


def parse_request(kind: Kind, body: Any, tokenizer: Tokenizer, info: ModelInfo) -> GenerationRequest:
    """A completion or chat body -> GenerationRequest; RequestError(400) for anything invalid.

    Unknown fields are ignored (OpenAI clients send extras); known ones of the wrong type are errors.
    """
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = _typed(body, "model", str, "must be a string") or info.name
    stream = bool(_typed(body, "stream", bool, "must be true or false"))
    options = _typed(body, "stream_options", dict, "must be an object like {\"include_usage\": true}") or {}
    include_usage = bool(_typed(options, "include_usage", bool, "must be true or false"))
    _typed(body, "user", str, "must be a string")
    if kind == "completion":
        _unsupported(body, _UNSUPPORTED_COMPLETION)
        if _typed(body, "best_of", int, "must be an integer") not in (None, 1):
            raise RequestError(400, f"best_of = {body['best_of']!r}: only 1 is supported", param="best_of")
        prompt_ids = _completion_prompt(body, tokenizer, info.vocab_size)
    else:
        _unsupported(body, _UNSUPPORTED_CHAT)
        prompt_ids = tokenizer.apply_chat(_chat_messages(body))
    params = parse_sampling(body, prompt_tokens=len(prompt_ids), context_length=info.context_length,
                            vocab_size=info.vocab_size, default_max_new_tokens=info.default_max_tokens,
                            eos_token_id=tokenizer.eos_token_id)
    return GenerationRequest(kind, model, prompt_ids, params, stream, include_usage)


# -- responses -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one sequence produced so far: counts for usage, and how it ended."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Envelope(NamedTuple):
    """The fields every response and chunk of one request shares."""

    kind: Kind
    id: str
    created: int
    model: str

    @classmethod
    def new(cls, kind: Kind, model: str) -> Envelope:
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        return cls(kind, f"{prefix}-{secrets.token_hex(12)}", int(time.time()), model)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, text: str, outcome: Outcome) -> dict[str, Any]:
        """The non-streaming answer."""
        if self.kind == "completion":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": outcome.finish_reason}
            obj = "text_completion"
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": outcome.finish_reason}
            obj = "chat.completion"
        return {**self._head(obj), "choices": [choice], "usage": outcome.usage()}

    def chunk(self, text: str | None, finish_reason: FinishReason | None = None, *, role: bool = False,
              with_usage: bool = False) -> dict[str, Any]:
        """One streamed chunk; `role` marks chat's first one, `with_usage` adds `"usage": null`."""
        if self.kind == "completion":
            choice: dict[str, Any] = {"index": 0, "text": text or "", "logprobs": None,
                                      "finish_reason": finish_reason}
            obj = "text_completion"
        else:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        out = {**self._head(obj), "choices": [choice]}
        return {**out, "usage": None} if with_usage else out

    def usage_chunk(self, outcome: Outcome) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return {**self._head(obj), "choices": [], "usage": outcome.usage()}


def sse(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def error_response(exc: GenerationError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


# -- handlers ------------------------------------------------------------------------------------


async def run_sequence(backend: GenerationBackend, tokenizer: Tokenizer, req: GenerationRequest,
                       outcome: Outcome) -> AsyncGenerator[str, None]:
    """Text deltas of one sequence, one per token received ("" while text is pending).

    Sets outcome.completion_tokens and finish_reason ("stop": a stop id or stop string, or the
    backend ended early; "length": max_new_tokens). A sequence that ends by the backend's rules
    (max_new_tokens, stop ids) is left to end there; a stop string, a client that goes away or
    this generator being closed closes the backend's iterator, which cancels the sequence.
    """
    decoder = StreamDecoder(tokenizer, req.params.stop)
    stop_ids = frozenset(req.params.stop_token_ids)
    tokens = backend.generate(list(req.prompt_ids), req.params)
    try:
        async for token in tokens:
            if outcome.finish_reason is not None:
                break  # the backend went past the end it was given: stop it
            outcome.completion_tokens += 1
            if token in stop_ids:
                outcome.finish_reason = "stop"  # the backend ends by itself now
                continue
            yield decoder.feed(token)
            if decoder.stopped:
                outcome.finish_reason = "stop"
                break  # only the front end knows stop strings: cancel the rest
            if outcome.completion_tokens >= req.params.max_new_tokens:
                outcome.finish_reason = "length"
        if outcome.finish_reason is None:
            outcome.finish_reason = "stop"  # the backend ended early (its own eos)
        if not decoder.stopped and (tail := decoder.flush()):
            yield tail
    finally:
        aclose: Callable[[], Awaitable[None]] | None = getattr(tokens, "aclose", None)
        if aclose is not None:
            await aclose()


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def _client_left(request: web.Request, resp: web.StreamResponse | None = None) -> web.StreamResponse:
    """What a handler returns once its client is gone (aiohttp drops it quietly); leaving the
    `aclosing` block has cancelled the sequence."""
    log.info("client of %s left; its sequence is cancelled", request.path)
    return resp if resp is not None else web.Response(status=499)


class Handlers(NamedTuple):
    """The two route handlers; `routes()` gives them at their OpenAI paths."""

    completions: Callable[[web.Request], Awaitable[web.StreamResponse]]
    chat_completions: Callable[[web.Request], Awaitable[web.StreamResponse]]

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions)]


def make_handlers(backend: GenerationBackend, tokenizer: Tokenizer, model_name: str, context_length: int,
                  vocab_size: int, *, default_max_tokens: int = 16) -> Handlers:
    """aiohttp handlers for `POST /v1/completions` and `POST /v1/chat/completions` over `backend`."""
    info = ModelInfo(model_name, context_length, vocab_size, default_max_tokens)
    # Tokenizing a long prompt is CPU work: off the event loop, one at a time (transformers' fast
    # tokenizers are not safe to drive from several threads at once).
    tokenizing = asyncio.Lock()

    async def handle(request: web.Request, kind: Kind) -> web.StreamResponse:
        try:
            return await _handle(request, kind)
        except Exception:  # noqa: BLE001 - request boundary: answer in OpenAI's shape, log, keep serving
            log.exception("%s %s failed", request.method, request.path)
            return error_response(GenerationError(500, "internal error; see the dispatcher's log"))

    async def _handle(request: web.Request, kind: Kind) -> web.StreamResponse:
        try:
            try:
                body = await request.json()
            except ValueError as exc:
                raise RequestError(400, f"the request body is not valid JSON: {exc}") from exc
            async with tokenizing:
                req = await asyncio.to_thread(parse_request, kind, body, tokenizer, info)
        except GenerationError as exc:
            return error_response(exc)
        envelope = Envelope.new(kind, req.model)
        outcome = Outcome(len(req.prompt_ids))
        deltas = run_sequence(backend, tokenizer, req, outcome)
        try:
            async with aclosing(deltas):
                if req.stream:
                    return await _stream(request, req, envelope, outcome, deltas)
                text = []
                async for delta in deltas:
                    if _client_gone(request):
                        return _client_left(request)
                    text.append(delta)
                return web.json_response(envelope.response("".join(text), outcome))
        except GenerationError as exc:
            return error_response(exc)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await handle(request, "completion")

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await handle(request, "chat")

    return Handlers(completions, chat_completions)


async def _stream(request: web.Request, req: GenerationRequest, envelope: Envelope, outcome: Outcome,
                  deltas: AsyncIterator[str]) -> web.StreamResponse:
    """Server-sent events. The headers go out with the first token, so a backend that refuses the
    sequence still gets its own status; an error after that is sent as an `error` event."""
    resp = web.StreamResponse(headers=SSE_HEADERS)
    usage = req.include_usage
    try:
        try:
            async for delta in deltas:
                if not resp.prepared:
                    await resp.prepare(request)
                    if envelope.kind == "chat":
                        await resp.write(sse(envelope.chunk("", role=True, with_usage=usage)))
                if delta:
                    await resp.write(sse(envelope.chunk(delta, with_usage=usage)))
        except GenerationError as exc:
            if not resp.prepared:
                raise
            log.warning("%s failed mid-stream: %s", envelope.id, exc)
            await resp.write(sse(exc.body()) + DONE)
            return resp
        if not resp.prepared:
            await resp.prepare(request)
        last = envelope.chunk(None if envelope.kind == "chat" else "", outcome.finish_reason, with_usage=usage)
        await resp.write(sse(last) + (sse(envelope.usage_chunk(outcome)) if usage else b"") + DONE)
        await resp.write_eof()
    except ConnectionResetError:
        return _client_left(request, resp)
    return resp
