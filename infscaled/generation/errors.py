"""Errors of generation requests, carrying the HTTP status and the OpenAI error shape.

Torch-free and aiohttp-free: the controller's proxy formats its own errors with `error_body`.
"""

from __future__ import annotations

from typing import Any

from infscaled import errors

# HTTP status -> OpenAI error "type" (what the official clients show and switch on).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class GenerationError(errors.RequestError):
    """A generation request failed or was refused; `status` is the HTTP status to answer with.

    Raised by a GenerationBackend that cannot run a sequence (e.g. 503 when the pipeline is
    down) and, through its subclass RequestError, for invalid client input.
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


class RequestError(GenerationError):
    """The client's request is invalid: the message names the field, the bad value and what is allowed."""


def error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}` as OpenAI answers errors."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
