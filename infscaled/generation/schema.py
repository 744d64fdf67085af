"""The OpenAI-compatible API's request and response bodies, declared once with pydantic.

`validate` type-checks a request body against its model (strict: no "1" for 1, no 1 for true)
and turns the first problem into a RequestError naming the field, the value and what is
allowed (each field's description); `openapi` builds the document served at /openapi.json
from the same models. Every field OpenAI (or vLLM, for the extensions clients send) defines is
declared: the ones this server does not implement are in `UNSUPPORTED`, and any value other
than their neutral one is a 400 naming the field, never silently ignored (so is a sampling
feature the job's engine lacks: openai_api checks the backend's `features`). Unknown fields are
ignored, as OpenAI's own API does with extras. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infscaled.generation.errors import RequestError
from infscaled.generation.params import MAX_LOGPROBS, MAX_STOP_STRINGS, SEED_MAX, SEED_MIN

M = TypeVar("M", bound=BaseModel)
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
FinishReason = Literal["stop", "length"]


def _f(allowed: str, **constraints: Any) -> Any:
    """An optional field whose description is also the error text ("must be ...")."""
    return Field(None, description=allowed, **constraints)


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Model):
    include_usage: bool | None = _f("must be true or false")
    continuous_usage_stats: bool | None = _f("must be true or false")
    include_obfuscation: bool | None = _f("must be true or false (true is not supported)")


class TextPart(_Model):
    type: Literal["text", "image_url", "input_audio", "file", "refusal"] = Field(
        description="must be 'text' (the only content part this server reads)")
    text: str | None = _f("must be a string")


class ChatMessage(_Model):
    role: Role = Field(description="must be one of system, developer, user, assistant")
    content: str | list[TextPart] | None = _f("must be a string (or a list of text parts)")
    name: str | None = _f("must be a string (not supported)")
    refusal: str | None = _f("must be a string or null")
    tool_calls: list[Any] | None = _f("must be a list (tool calls are not supported)")
    tool_call_id: str | None = _f("must be a string (tool messages are not supported)")


class _Sampling(_Model):
    """Fields completions and chat share."""

    model: str | None = _f("must be a string: a running job's name or id (GET /v1/models)")
    max_tokens: int | None = _f("must be an integer >= 1", ge=1)
    temperature: float | None = _f("must be a number from 0 to 2", ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = _f("must be a number greater than 0 and at most 1", gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = _f("must be an integer >= 0 (0 = off; an extension)", ge=0)
    min_p: float | None = _f("must be a number from 0 to 1 (an extension)", ge=0, le=1, allow_inf_nan=False)
    n: int | None = _f("must be an integer >= 1", ge=1)
    seed: int | None = _f(f"must be an integer from {SEED_MIN} to {SEED_MAX}", ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = _f(f"must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                                      "non-empty strings")
    stop_token_ids: list[int] | None = _f("must be a list of token ids (an extension)")
    ignore_eos: bool | None = _f("must be true or false (an extension)")
    skip_special_tokens: bool | None = _f("must be true or false (an extension; default true: special tokens "
                                          "are left out of the text)")
    stream: bool | None = _f("must be true or false")
    stream_options: StreamOptions | None = _f('must be an object like {"include_usage": true}')
    user: str | None = _f("must be a string")
    presence_penalty: float | None = _f("must be a number from -2 to 2", ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = _f("must be a number from -2 to 2", ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float | None = _f("must be a number > 0 (an extension; 1 = off)", gt=0,
                                          allow_inf_nan=False)
    logit_bias: dict[str, float] | None = _f("must be an object of token id -> bias from -100 to 100")
    min_tokens: int | None = _f("must be an integer >= 0 (an extension)", ge=0)
    prompt_logprobs: int | None = _f(f"must be an integer from 0 to {MAX_LOGPROBS} (an extension)", ge=0,
                                     le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = _f('must be an object like {"type": "text"}')


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str | list[int]] = Field(
        description="must be a string, a list of strings, or a list of token ids (or a list of such lists)")
    echo: bool | None = _f("must be true or false")
    logprobs: int | None = _f(f"must be an integer from 0 to {MAX_LOGPROBS}", ge=0, le=MAX_LOGPROBS)
    best_of: int | None = _f("must be an integer >= 1", ge=1)
    suffix: str | None = _f("must be a string")


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="must be a non-empty list of {role, content} "
                                                                  "objects")
    max_completion_tokens: int | None = _f("must be an integer >= 1", ge=1)
    logprobs: bool | None = _f("must be true or false")
    top_logprobs: int | None = _f(f"must be an integer from 0 to {MAX_LOGPROBS}", ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = _f("must be a list")
    tool_choice: str | dict[str, Any] | None = _f("must be a string or an object")
    parallel_tool_calls: bool | None = _f("must be true or false")
    functions: list[Any] | None = _f("must be a list")
    function_call: str | dict[str, Any] | None = _f("must be a string or an object")
    audio: dict[str, Any] | None = _f("must be an object")
    modalities: list[str] | None = _f("must be a list of strings")
    prediction: dict[str, Any] | None = _f("must be an object")
    reasoning_effort: str | None = _f("must be a string")
    verbosity: str | None = _f("must be a string")
    web_search_options: dict[str, Any] | None = _f("must be an object")
    store: bool | None = _f("must be true or false")
    metadata: dict[str, str] | None = _f("must be an object of strings")
    service_tier: str | None = _f("must be a string")
    prompt_cache_key: str | None = _f("must be a string")
    safety_identifier: str | None = _f("must be a string")


# Field -> (neutral values, why it is refused otherwise).
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "response_format": ((None, {"type": "text"}), "only {\"type\": \"text\"} is supported"),
    "suffix": ((None, ""), "suffix is not supported"),
    "tools": ((None, []), "tools are not supported"),
    "tool_choice": ((None, "none"), "tools are not supported"),
    # Without tools (any other value of `tools` is refused) it has nothing to act on: agent
    # frameworks send `false` with every request.
    "parallel_tool_calls": ((None, True, False), "tools are not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only the text modality is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "reasoning effort is not supported (no reasoning model)"),
    "verbosity": ((None,), "verbosity is not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "store": ((None, False), "stored completions are not supported"),
    "metadata": ((None, {}), "metadata is only for stored completions, which are not supported"),
    "service_tier": ((None, "auto", "default"), "service tiers are not supported"),
    "prompt_cache_key": ((None,), "prompt caching is not supported"),
    "safety_identifier": ((None,), "safety identifiers are not supported"),
}
_UNSUPPORTED_STREAM_OPTIONS = {"include_obfuscation": "stream obfuscation is not supported"}
_UNSUPPORTED_MESSAGE_FIELDS = {"name": "participant names are not supported",
                               "tool_calls": "tool calls are not supported",
                               "tool_call_id": "tool messages are not supported"}


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(raw: bytes | str) -> Any:
    """Strict JSON: NaN / Infinity (which Python's json accepts) are refused as JSON is."""
    try:
        return json.loads(raw, parse_constant=_json_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from exc


def _where(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'content', 'str') -> 'messages[0].content' (union member tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part in _FIELD_NAMES:
            out += f".{part}" if out else part
        else:
            break
    return out


def _description(model: type[BaseModel], where: str) -> str | None:
    """The description of the field at `where` (nested models followed)."""
    cls: Any = model
    desc = None
    for name in where.replace("]", "").replace("[", ".").split("."):
        if name.isdigit() or cls is None:
            continue
        field = cls.model_fields.get(name)
        if field is None:
            return desc
        desc = field.description
        cls = next((a for a in _args(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return desc


def _args(annotation: Any) -> list[Any]:
    from typing import get_args

    out, todo = [], [annotation]
    while todo:
        a = todo.pop()
        inner = get_args(a)
        out.append(a)
        todo += inner
    return out


def _value_at(body: Any, where: str) -> Any:
    value = body
    for name in where.replace("]", "").replace("[", ".").split("."):
        if isinstance(value, list) and name.isdigit() and int(name) < len(value):
            value = value[int(name)]
        elif isinstance(value, dict) and name in value:
            value = value[name]
        else:
            return value
    return value


def validate(model: type[M], body: Any) -> M:
    """`body` as `model`, or RequestError(400) naming the first bad field, its value and what is
    allowed; then a 400 for any unsupported field given a value other than its neutral one."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _where(err["loc"]) or str(err["loc"][0])
        value = _value_at(body, where)
        if err["type"] == "missing":
            raise RequestError(400, f"{where} is required: {_description(model, where) or err['msg']}",
                               param=where) from None
        allowed = _description(model, where) or err["msg"]
        raise RequestError(400, f"{where} = {_shown(value)}: {allowed}", param=where) from None
    check_supported(body)
    return parsed


def check_supported(body: Mapping[str, Any]) -> None:
    for field, (neutral, why) in UNSUPPORTED.items():
        value = body.get(field)
        if not any(value == n and type(value) is type(n) or value is n for n in neutral):
            raise RequestError(400, f"{field} = {_shown(value)}: {why} by this server", param=field)
    options = body.get("stream_options") or {}
    for field, why in _UNSUPPORTED_STREAM_OPTIONS.items():
        if options.get(field):
            raise RequestError(400, f"stream_options.{field} = true: {why} by this server",
                               param=f"stream_options.{field}")
    for i, msg in enumerate(body.get("messages") or []):
        for field, why in _UNSUPPORTED_MESSAGE_FIELDS.items():
            if msg.get(field) not in (None, []):
                raise RequestError(400, f"messages[{i}].{field} = {_shown(msg[field])}: {why} by this server",
                                   param=f"messages[{i}].{field}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- responses (what the handlers build as dicts; the schema documents them) ----------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: FinishReason | None
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionResponse(BaseModel):
    """The answer of POST /v1/completions, and (with `usage` null or absent) each streamed chunk."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: dict[str, Any] | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    name: str
    root: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeRequest(_Model):
    """POST /tokenize: `prompt` (a completion's) or `messages` (a chat's, with its template)."""

    model: str | None = _f("must be a string: a running job's name or id (GET /v1/models)")
    prompt: str | None = _f("must be a string")
    messages: list[ChatMessage] | None = _f("must be a non-empty list of {role, content} objects", min_length=1)
    add_special_tokens: bool | None = _f("must be true or false")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Model):
    model: str | None = _f("must be a string: a running job's name or id (GET /v1/models)")
    tokens: list[int] = Field(description="must be a list of token ids")


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    eos_token: str | None
    eos_token_id: int | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int
    vocab_size: int


class Health(BaseModel):
    status: Literal["ok", "draining"]


_FIELD_NAMES = frozenset(name for m in (CompletionRequest, ChatCompletionRequest, ChatMessage, StreamOptions,
                                         TextPart, TokenizeRequest, DetokenizeRequest) for name in m.model_fields)
