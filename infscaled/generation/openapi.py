"""The OpenAPI 3.1 document of the OpenAI-compatible surface, built from `schema`'s models
(served by the controller at /openapi.json). Torch-free."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from infscaled import __version__
from infscaled.generation import schema

_REF = "#/components/schemas/{model}"
_ERRORS = {"400": "Invalid request: the message names the field, the value and what is allowed",
           "401": "Missing or wrong bearer token", "404": "No such model (job)",
           "409": "The job is not running", "413": "Request body too large",
           "502": "The job's dispatcher is unreachable", "503": "The pipeline cannot take the request",
           "504": "The job's dispatcher did not answer in time"}
_PUBLIC: list[dict[str, Any]] = []  # security requirement of routes readable without the token


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _operation(summary: str, ok: dict[str, Any], body: type[BaseModel] | None = None,
               errors: tuple[str, ...] = tuple(_ERRORS), public: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": ok}}
    for status in errors:
        op["responses"][status] = _json(schema.ErrorResponse, _ERRORS[status])
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    if public:
        op["security"] = _PUBLIC
    return op


def _generation(summary: str, body: type[BaseModel], answer: type[BaseModel], chunk: type[BaseModel]) -> dict:
    ok = {"description": f"{answer.__name__}; with stream=true, server-sent events of {chunk.__name__} "
                         "then `data: [DONE]`",
          "content": {"application/json": {"schema": _ref(answer)},
                      "text/event-stream": {"schema": {"type": "string"}}}}
    return {"post": _operation(summary, ok, body)}


@cache
def document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        schema.CompletionRequest, schema.ChatCompletionRequest, schema.TokenizeRequest, schema.DetokenizeRequest,
        schema.CompletionResponse, schema.ChatCompletionResponse, schema.ChatCompletionChunk, schema.ErrorResponse,
        schema.ModelCard, schema.ModelList, schema.TokenizeResponse, schema.DetokenizeResponse,
        schema.TokenizerInfo, schema.Health,
    ]
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    no_model = ("401", "404")
    paths = {
        "/v1/completions": _generation("Text completion", schema.CompletionRequest, schema.CompletionResponse,
                                       schema.CompletionResponse),
        "/v1/chat/completions": _generation("Chat completion", schema.ChatCompletionRequest,
                                            schema.ChatCompletionResponse, schema.ChatCompletionChunk),
        "/v1/models": {"get": _operation("Running generation jobs", _json(schema.ModelList, "The models"),
                                         errors=("401",))},
        "/v1/models/{model}": {"get": {**_operation("One model", _json(schema.ModelCard, "The model"),
                                                    errors=no_model),
                                       "parameters": [{"name": "model", "in": "path", "required": True,
                                                       "schema": {"type": "string"}}]}},
        "/tokenize": {"post": _operation("Token ids of a prompt or of chat messages",
                                         _json(schema.TokenizeResponse, "The tokens"), schema.TokenizeRequest)},
        "/detokenize": {"post": _operation("Text of token ids", _json(schema.DetokenizeResponse, "The text"),
                                           schema.DetokenizeRequest)},
        "/tokenizer_info": {"get": {**_operation("The tokenizer of a model",
                                                 _json(schema.TokenizerInfo, "The tokenizer"),
                                                 errors=("400", "401", "404", "409", "502", "503", "504")),
                                    "parameters": [{"name": "model", "in": "query", "required": False,
                                                    "schema": {"type": "string"}}]}},
        "/health": {"get": _operation("Liveness (no token needed)", _json(schema.Health, "Serving"),
                                      errors=(), public=True)},
    }
    paths["/health"]["get"]["responses"]["503"] = _json(schema.Health, "Draining: shutting down")
    return {
        "openapi": "3.1.0",
        "info": {"title": "infscaled OpenAI-compatible API", "version": __version__},
        "paths": paths,
        "components": {"schemas": defs["$defs"],
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
