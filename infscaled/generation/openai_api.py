"""The OpenAI-compatible API: request parsing, response and SSE formatting, aiohttp handlers.

Torch-free. `make_handlers` serves `POST /v1/completions` and `POST /v1/chat/completions` over
any `GenerationBackend` (the pipeline dispatcher, or `reference.ReferenceBackend`): the handler
tokenizes, validates, streams text deltas (stop strings and UTF-8 boundaries through
`StreamDecoder`), counts usage and cancels the backend's sequence when the client goes away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

from aiohttp import web

from infscaled.generation import schema
from infscaled.generation.errors import GenerationError, RequestError
from infscaled.generation.metrics import RequestTimes, ServingMetrics
from infscaled.generation.params import (
    SEED_MAX,
    SEED_MIN,
    Admitted,
    PromptLogprobs,
    Sampled,
    SamplingParams,
    features_needed,
    parse_sampling,
)
from infscaled.generation.responses import (
    DONE,
    Alternative,
    Envelope,
    Kind,
    LogprobEntry,
    Outcome,
    Piece,
    counts,
    sse,
)
from infscaled.generation.tokenizer import CHAT_ROLES, StreamDecoder, Tokenizer, describe_tokenizer

log = logging.getLogger(__name__)

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
MAX_SEQUENCES = 128  # choices of one request: prompts x n


class GenerationBackend(Protocol):
    """What runs sequences: the pipeline dispatcher, or ReferenceBackend in one process.

    A backend may have a `features` attribute: the names in params.FEATURES it implements
    (penalties, logit_bias, ...); a request that needs one it lacks is refused with a 400."""

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[
            int | Sampled | PromptLogprobs | Admitted]:
        """Token ids as they are produced (as `Sampled` when params.logprobs is set, after one
        `PromptLogprobs` when params.prompt_logprobs is, and after one `Admitted` from a backend
        that queues sequences); ends after max_new_tokens ids or after
        yielding an id in params.stop_token_ids (which holds the tokenizer's eos unless
        ignore_eos). Closing the iterator early (aclose) cancels the sequence and frees its
        caches. Raises GenerationError(status, message) if it cannot run."""
        ...


@dataclass(frozen=True)
class GenerationRequest:
    """A parsed, validated completion or chat request: one or more prompts, `n` choices each."""

    kind: Kind
    model: str
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    n: int = 1
    echo: bool = False
    skip_special_tokens: bool = True  # the text leaves special tokens out (vLLM's extension and default)
    # stream_options.continuous_usage_stats (vLLM's extension): every chunk carries its choice's usage so far.
    chunk_usage: bool = False

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompts[0]

    def choices(self) -> list[tuple[list[int], SamplingParams]]:
        """(prompt, params) of each choice, in the order of their indices (prompt-major). With a
        seed, choice j of a prompt draws with seed + j, so the n choices differ but repeat."""
        out = []
        for prompt in self.prompts:
            for j in range(self.n):
                params = self.params
                if j and params.seed is not None:
                    params = replace(params, seed=(params.seed + j - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN)
                out.append((prompt, params))
        return out


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


def _completion_prompts(prompt: Any, tokenizer: Tokenizer, vocab_size: int) -> list[list[int]]:
    """prompt: a string, token ids, or a list of strings / of token-id lists (one choice set each)."""
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if (ids := _token_list(prompt, vocab_size)) is not None:
        return [ids]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        out = []
        for i, p in enumerate(prompt):
            ids = tokenizer.encode(p) if isinstance(p, str) else _token_list(p, vocab_size)
            if ids is None:
                raise RequestError(400, f"prompt[{i}] = {_shown(p)}: must be a string or a non-empty list of token "
                                        f"ids from 0 to {vocab_size - 1}", param="prompt")
            out.append(ids)
        return out
    raise RequestError(400, f"prompt = {_shown(prompt)}: must be a string, a list of strings, or a list of token ids "
                            f"from 0 to {vocab_size - 1} (or a list of such lists)", param="prompt")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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


def parse_request(kind: Kind, body: Any, tokenizer: Tokenizer, info: ModelInfo,
                  features: frozenset[str] = frozenset()) -> GenerationRequest:
    """A completion or chat body -> GenerationRequest; RequestError(400) for anything invalid.

    Every field is type-checked against its declaration in `schema`; unknown fields are ignored
    (OpenAI clients send extras), known ones this server does not implement are refused, and so
    are those the backend lacks (`features`).
    """
    echo = False
    if kind == "completion":
        creq = schema.validate(schema.CompletionRequest, body)
        req: schema.CompletionRequest | schema.ChatCompletionRequest = creq
        prompts = _completion_prompts(creq.prompt, tokenizer, info.vocab_size)
        echo = bool(creq.echo)
        if creq.best_of not in (None, creq.n or 1):
            raise RequestError(400, f"best_of = {creq.best_of}: only best_of = n is supported (no ranking of "
                                    "extra choices)", param="best_of")
    else:
        chat = schema.validate(schema.ChatCompletionRequest, body)
        req = chat
        prompts = [tokenizer.apply_chat(chat_messages(chat.messages))]
    n = req.n or 1
    if n * len(prompts) > MAX_SEQUENCES:
        raise RequestError(400, f"{len(prompts)} prompts x n = {n} is {n * len(prompts)} choices: at most "
                                f"{MAX_SEQUENCES} per request", param="n")
    params = [parse_sampling(body, prompt_tokens=len(p), context_length=info.context_length,
                             vocab_size=info.vocab_size, default_max_new_tokens=info.default_max_tokens,
                             eos_token_ids=tokenizer.eos_token_ids) for p in prompts]
    # One SamplingParams for all prompts: the shortest room decides the default max_tokens.
    shared = min(params, key=lambda p: p.max_new_tokens)
    if echo and shared.logprobs is not None and shared.prompt_logprobs is None:
        shared = replace(shared, prompt_logprobs=shared.logprobs)  # echoed tokens come with theirs
    for feature, field_name in features_needed(shared).items():
        if feature not in features:
            raise RequestError(400, f"{field_name} is not supported by this job's engine yet", param=field_name)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunk_usage = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    return GenerationRequest(kind, req.model or info.name, prompts, shared, bool(req.stream), include_usage, n, echo,
                             req.skip_special_tokens is not False, chunk_usage)


def error_response(exc: GenerationError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


# -- handlers ------------------------------------------------------------------------------------


class _Entries:
    """Turns a backend's token ids and log-probabilities into LogprobEntry (token text decoded one id at a time)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def text(self, token: int) -> str:
        # Every token shows as its own text, a special one too ("<|im_end|>", as vLLM shows it):
        # skipped, a generated eos or chat marker became "", and a client comparing tokens saw a
        # different token where the model had chosen exactly the reference's.
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def top(self, alternatives: tuple[tuple[int, float], ...]) -> tuple[Alternative, ...]:
        return tuple(Alternative(self.text(t), lp) for t, lp in alternatives)

    def prompt(self, prompt_ids: list[int], got: PromptLogprobs) -> tuple[LogprobEntry, ...]:
        first = LogprobEntry(self.text(prompt_ids[0]), None)
        return (first, *(LogprobEntry(self.text(t), lp, self.top(top))
                         for t, lp, top in zip(prompt_ids[1:], got.logprobs, got.top, strict=True)))


def _vllm_prompt_logprobs(prompt_ids: list[int], got: PromptLogprobs, entries: _Entries) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, else {id: {logprob, decoded_token}}."""
    out: list[dict[str, Any] | None] = [None]
    for token, lp, top in zip(prompt_ids[1:], got.logprobs, got.top, strict=True):
        alts = {str(t): {"logprob": a, "decoded_token": entries.text(t)} for t, a in top}
        out.append({str(token): {"logprob": lp, "decoded_token": entries.text(token)}, **alts})
    return out


async def run_sequence(backend: GenerationBackend, tokenizer: Tokenizer, prompt_ids: list[int],
                       params: SamplingParams, outcome: Outcome, echo: bool = False,
                       skip_special_tokens: bool = True) -> AsyncGenerator[Piece, None]:
    """Pieces of one choice, one per token received (text "" while it is pending).

    Sets outcome.completion_tokens and finish_reason ("stop": a stop id or stop string, or the
    backend ended early; "length": max_new_tokens). A sequence that ends by the backend's rules
    (max_new_tokens, stop ids) is left to end there; a stop string, a client that goes away or
    this generator being closed closes the backend's iterator, which cancels the sequence.
    With `echo` the prompt's text (and its tokens' log-probabilities, if asked) comes first.
    Special tokens are left out of the text (prompt and completion) unless `skip_special_tokens`
    is False; log-probability entries always show each token's own text.
    """
    decoder = StreamDecoder(tokenizer, params.stop, skip_special_tokens)
    stop_ids = frozenset(params.stop_token_ids)
    entries = _Entries(tokenizer)
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens) if echo else ""
    if echo and params.prompt_logprobs is None:
        yield Piece(prompt_text)
    echoed = not echo or params.prompt_logprobs is None
    tokens = backend.generate(list(prompt_ids), params)
    try:
        async for item in tokens:
            if isinstance(item, Admitted):
                outcome.times.admitted = item.at
                continue
            if isinstance(item, PromptLogprobs):
                if params.prompt_logprobs is not None and not echo:
                    outcome.prompt_logprobs = _vllm_prompt_logprobs(prompt_ids, item, entries)
                if not echoed:
                    echoed = True
                    yield Piece(prompt_text, entries.prompt(prompt_ids, item))
                continue
            if not echoed:  # a one-token prompt: nothing to score, its token has no log-probability
                echoed = True
                yield Piece(prompt_text, entries.prompt(prompt_ids, PromptLogprobs((), ())))
            if outcome.finish_reason is not None:
                break  # the backend went past the end it was given: stop it
            token = item if isinstance(item, int) else item.token
            outcome.completion_tokens += 1
            outcome.times.token()
            if token in stop_ids:
                outcome.finish_reason = "stop"  # the backend ends by itself now
                continue
            logprobs: tuple[LogprobEntry, ...] = ()
            if isinstance(item, Sampled) and params.logprobs is not None:
                logprobs = (LogprobEntry(entries.text(token), item.logprob, entries.top(item.top)),)
            yield Piece(decoder.feed(token), logprobs, outcome.completion_tokens)
            if decoder.stopped:
                outcome.finish_reason = "stop"
                break  # only the front end knows stop strings: cancel the rest
            if outcome.completion_tokens >= params.max_new_tokens:
                outcome.finish_reason = "length"
        if outcome.finish_reason is None:
            outcome.finish_reason = "stop"  # the backend ended early (its own eos)
        if not decoder.stopped and (tail := decoder.flush()):
            yield Piece(tail, (), outcome.completion_tokens)
    finally:
        aclose: Callable[[], Awaitable[None]] | None = getattr(tokens, "aclose", None)
        if aclose is not None:
            await aclose()


async def merged(sources: list[AsyncGenerator[Piece, None]]) -> AsyncGenerator[tuple[int, Piece | None], None]:
    """The choices' pieces as they come, tagged with the choice index; (i, None) once choice i
    ended. One source is iterated directly; several run as tasks, all cancelled (which closes
    their backends' sequences) when this generator is closed early. A GenerationError of any
    choice ends the whole request."""
    if len(sources) == 1:
        async with aclosing(sources[0]) as only:
            async for piece in only:
                yield 0, piece
        yield 0, None
        return
    queue: asyncio.Queue[tuple[int, Piece | None, GenerationError | None]] = asyncio.Queue()

    async def pump(i: int, source: AsyncGenerator[Piece, None]) -> None:
        try:
            async with aclosing(source):
                async for piece in source:
                    queue.put_nowait((i, piece, None))
            queue.put_nowait((i, None, None))
        except GenerationError as exc:
            queue.put_nowait((i, None, exc))

    tasks = [asyncio.create_task(pump(i, s), name=f"choice-{i}") for i, s in enumerate(sources)]
    try:
        left = len(tasks)
        while left:
            i, piece, error = await queue.get()
            if error is not None:
                raise error
            left -= piece is None
            yield i, piece
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
    dispatcher = getattr(backend, "sequences", None)
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
    features = frozenset(getattr(backend, "features", ()))
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
                req = await asyncio.to_thread(parse_request, kind, body, tokenizer, info, features)
        except GenerationError as exc:
            return error_response(exc)
        envelope = Envelope.new(kind, req.model, logprobs=req.params.logprobs is not None)
        choices = req.choices()
        outcomes = [Outcome(len(p), times=RequestTimes(arrived)) for p, _ in choices]
        prompt_tokens = sum(len(p) for p in req.prompts)
        metrics.accepted(prompt_tokens)
        active[0] += len(choices)
        pieces = merged([run_sequence(backend, tokenizer, p, params, o, req.echo, req.skip_special_tokens)
                         for (p, params), o in zip(choices, outcomes, strict=True)])
        try:
            async with aclosing(pieces):
                if req.stream:
                    return await _stream(request, req, envelope, outcomes, prompt_tokens, pieces)
                async for i, piece in pieces:
                    if _client_gone(request):
                        return _client_left(request)
                    if piece is not None:
                        outcomes[i].add(piece)
                return web.json_response(envelope.response(outcomes, prompt_tokens))
        except GenerationError as exc:
            return error_response(exc)
        finally:
            # No finish reason: the client left or the backend failed before the end.
            active[0] -= len(choices)
            for o in outcomes:
                metrics.finished(o.times, o.finish_reason or "abort")

    async def serve_metrics(request: web.Request) -> web.StreamResponse:
        return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def completions(request: web.Request) -> web.StreamResponse:
        return await handle(request, "completion")

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await handle(request, "chat")

    return Handlers(completions, chat_completions, *tokenizer_handlers(tokenizer, info, tokenizing), serve_metrics)


async def _stream(request: web.Request, req: GenerationRequest, envelope: Envelope, outcomes: list[Outcome],
                  prompt_tokens: int, pieces: AsyncIterator[tuple[int, Piece | None]]) -> web.StreamResponse:
    """Server-sent events, each chunk one choice's piece. The headers go out with the first piece,
    so a backend that refuses the sequence still gets its own status; an error after that is
    sent as an `error` event. Each choice ends with a chunk carrying its finish_reason."""
    resp = web.StreamResponse(headers=SSE_HEADERS)
    usage = req.include_usage or req.chunk_usage  # chunks carry a "usage" key

    def so_far(i: int, completion_tokens: int) -> dict[str, int] | None:
        return counts(outcomes[i].prompt_tokens, completion_tokens) if req.chunk_usage else None

    offsets = [0] * len(outcomes)
    try:
        try:
            async for i, piece in pieces:
                if not resp.prepared:
                    await resp.prepare(request)
                    if envelope.kind == "chat":
                        await resp.write(b"".join(sse(envelope.chunk(j, Piece(""), role=True, with_usage=usage,
                                                                     usage=so_far(j, 0)))
                                                  for j in range(len(outcomes))))
                if piece is None:
                    last = envelope.chunk(i, None if envelope.kind == "chat" else Piece(""),
                                          outcomes[i].finish_reason, with_usage=usage,
                                          usage=so_far(i, outcomes[i].completion_tokens))
                    await resp.write(sse(last))
                elif piece.text or piece.logprobs:
                    await resp.write(sse(envelope.chunk(i, piece, with_usage=usage, offset=offsets[i],
                                                        usage=so_far(i, piece.completion_tokens))))
                    offsets[i] += len(piece.text)
        except GenerationError as exc:
            if not resp.prepared:
                raise
            log.warning("%s failed mid-stream: %s", envelope.id, exc)
            await resp.write(sse(exc.body()) + DONE)
            return resp
        if not resp.prepared:
            await resp.prepare(request)
        await resp.write((sse(envelope.usage_chunk(outcomes, prompt_tokens)) if req.include_usage else b"") + DONE)
        await resp.write_eof()
    except ConnectionResetError:
        return _client_left(request, resp)
    return resp
