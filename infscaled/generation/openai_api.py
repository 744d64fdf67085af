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
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

from aiohttp import web

from infscaled.generation import schema
from infscaled.generation.errors import GenerationError, RequestError
from infscaled.generation.metrics import RequestTimes, ServingMetrics
from infscaled.generation.params import SamplingParams, parse_sampling
from infscaled.generation.tokenizer import CHAT_ROLES, StreamDecoder, Tokenizer, describe_tokenizer

log = logging.getLogger(__name__)

Kind = Literal["completion", "chat"]
FinishReason = Literal["stop", "length"]
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


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


def _token_list(value: Any, vocab_size: int) -> list[int] | None:
    if (isinstance(value, list) and value
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in value)):
        return list(value)
    return None


def _completion_prompt(prompt: Any, tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    """prompt: a string, a list of one string, token ids, or a list of one list of token ids."""
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


def chat_messages(messages: list[schema.ChatMessage]) -> list[dict[str, str]]:
    """Validated messages -> [{role, content}] for the chat template. A `developer` message is the
    newer name of a system one; tool and function messages need tools, which are refused."""
    out = []
    for i, msg in enumerate(messages):
        if msg.role not in CHAT_ROLES:
            raise RequestError(400, f"messages[{i}].role = {msg.role!r}: must be one of {', '.join(CHAT_ROLES)} "
                                    "(tools are not supported by this server)", param=f"messages[{i}].role")
        content = msg.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise RequestError(400, f"messages[{i}].content[{j}].type = {part.type!r}: only text parts "
                                            "are supported by this server", param=f"messages[{i}].content")
            content = "".join(p.text or "" for p in content)
        if content is None and msg.role != "assistant":
            raise RequestError(400, f"messages[{i}].content = None: must be a string (or a list of text parts)",
                               param=f"messages[{i}].content")
        out.append({"role": msg.role, "content": content or ""})
    return out


def parse_request(kind: Kind, body: Any, tokenizer: Tokenizer, info: ModelInfo) -> GenerationRequest:
    """A completion or chat body -> GenerationRequest; RequestError(400) for anything invalid.

    Every field is type-checked against its declaration in `schema`; unknown fields are ignored
    (OpenAI clients send extras), known ones this server does not implement are refused.
    """
    if kind == "completion":
        creq = schema.validate(schema.CompletionRequest, body)
        req: schema.CompletionRequest | schema.ChatCompletionRequest = creq
        prompt_ids = _completion_prompt(creq.prompt, tokenizer, info.vocab_size)
    else:
        chat = schema.validate(schema.ChatCompletionRequest, body)
        req = chat
        prompt_ids = tokenizer.apply_chat(chat_messages(chat.messages))
    params = parse_sampling(body, prompt_tokens=len(prompt_ids), context_length=info.context_length,
                            vocab_size=info.vocab_size, default_max_new_tokens=info.default_max_tokens,
                            eos_token_id=tokenizer.eos_token_id)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return GenerationRequest(kind, req.model or info.name, prompt_ids, params, bool(req.stream), include_usage)


# -- responses -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one sequence produced so far: counts for usage, and how it ended."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    times: RequestTimes = field(default_factory=lambda: RequestTimes(time.monotonic()))

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
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": outcome.finish_reason}
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
            outcome.times.token()
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


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
METRICS_PATH = "/v1/metrics"  # a dispatcher's serving metrics, scraped by the controller
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _load_of(backend: GenerationBackend, active: list[int]) -> Callable[[], tuple[int, int]]:
    """(running, waiting) requests: from the pipeline dispatcher's own counts where the backend
    has one (it knows which sequences still wait for KV room), else every active one runs."""
    dispatcher = getattr(backend, "dispatcher", None)
    if dispatcher is not None and callable(getattr(dispatcher, "waiting", None)):
        def load() -> tuple[int, int]:
            waiting = int(dispatcher.waiting())
            return max(0, int(dispatcher.inflight()) - waiting), waiting

        return load
    return lambda: (active[0], 0)


class Handlers(NamedTuple):
    """The route handlers; `routes()` gives them at their paths on a dispatcher (the controller
    serves the tokenizer's at vLLM's /tokenize, /detokenize and /tokenizer_info)."""

    completions: Handler
    chat_completions: Handler
    tokenize: Handler
    detokenize: Handler
    tokenizer_info: Handler
    metrics: Handler

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
                web.post(TOKENIZE_PATH, self.tokenize),
                web.post(DETOKENIZE_PATH, self.detokenize),
                web.get(TOKENIZER_INFO_PATH, self.tokenizer_info),
                web.get(METRICS_PATH, self.metrics)]


# The dispatcher's paths of the tokenizer routes (under /v1/, where its token check applies).
TOKENIZE_PATH = "/v1/tokenize"
DETOKENIZE_PATH = "/v1/detokenize"
TOKENIZER_INFO_PATH = "/v1/tokenizer_info"


def tokenizer_handlers(tokenizer: Tokenizer, info: ModelInfo,
                       tokenizing: asyncio.Lock) -> tuple[Handler, Handler, Handler]:
    """POST tokenize ({prompt} or {messages}) and detokenize ({tokens}), GET tokenizer_info."""

    async def tokenize(request: web.Request) -> web.StreamResponse:
        try:
            req = schema.validate(schema.TokenizeRequest, schema.loads(await request.read()))
            if (req.prompt is None) == (req.messages is None):
                raise RequestError(400, "give exactly one of prompt (a string) or messages (a chat)", param="prompt")
            async with tokenizing:
                if req.messages is not None:
                    ids = await asyncio.to_thread(tokenizer.apply_chat, chat_messages(req.messages))
                else:
                    ids = await asyncio.to_thread(tokenizer.encode, req.prompt or "",
                                                  req.add_special_tokens is not False)
        except GenerationError as exc:
            return error_response(exc)
        return web.json_response({"count": len(ids), "max_model_len": info.context_length, "tokens": ids})

    async def detokenize(request: web.Request) -> web.StreamResponse:
        try:
            req = schema.validate(schema.DetokenizeRequest, schema.loads(await request.read()))
            if any(not 0 <= t < info.vocab_size for t in req.tokens):
                raise RequestError(400, f"tokens = {req.tokens!r}: must be token ids from 0 to {info.vocab_size - 1}",
                                   param="tokens")
        except GenerationError as exc:
            return error_response(exc)
        async with tokenizing:
            text = await asyncio.to_thread(tokenizer.decode, req.tokens)
        return web.json_response({"prompt": text})

    async def tokenizer_info(request: web.Request) -> web.StreamResponse:
        return web.json_response(describe_tokenizer(tokenizer, info.context_length, info.vocab_size))

    return tokenize, detokenize, tokenizer_info


def make_handlers(backend: GenerationBackend, tokenizer: Tokenizer, model_name: str, context_length: int,
                  vocab_size: int, *, default_max_tokens: int = 16) -> Handlers:
    """aiohttp handlers for `POST /v1/completions` and `POST /v1/chat/completions` over `backend`."""
    info = ModelInfo(model_name, context_length, vocab_size, default_max_tokens)
    active = [0]  # sequences in run_sequence, for backends that do not say how many wait
    metrics = ServingMetrics(model_name, _load_of(backend, active))
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
        arrived = time.monotonic()
        try:
            body = schema.loads(await request.read())
            async with tokenizing:
                req = await asyncio.to_thread(parse_request, kind, body, tokenizer, info)
        except GenerationError as exc:
            return error_response(exc)
        envelope = Envelope.new(kind, req.model)
        outcome = Outcome(len(req.prompt_ids), times=RequestTimes(arrived))
        metrics.accepted(outcome.prompt_tokens)
        active[0] += 1
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
        finally:
            # No finish reason: the client left or the backend failed before the end.
            active[0] -= 1
            metrics.finished(outcome.times, outcome.finish_reason or "abort")

    async def serve_metrics(request: web.Request) -> web.StreamResponse:
        return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def completions(request: web.Request) -> web.StreamResponse:
        return await handle(request, "completion")

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await handle(request, "chat")

    return Handlers(completions, chat_completions, *tokenizer_handlers(tokenizer, info, tokenizing), serve_metrics)


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
