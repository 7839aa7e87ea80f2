"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with its status codes.

Clients (the openai SDKs, Codex, opencode) branch on the status and on `code`
(`context_length_exceeded`, `model_not_found`, `invalid_api_key`), so both follow OpenAI's API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


@dataclass
class APIError(Exception):
    """An error answered to the client; `status` picks the HTTP status and the default `type`."""

    message: str
    status: int = 400
    param: str | None = None
    code: str | None = None
    type: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        kind = self.type or ("server_error" if self.status in (500, 503) else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, 400, param, code)


def context_exceeded(n_prompt: int, n_ctx: int, param: str = "messages") -> APIError:
    """OpenAI's own error for a prompt over the context: agents (Codex, opencode) compact the
    conversation when they see it (the phrase "maximum context length" or the code) and ask again."""
    return APIError(f"This model's maximum context length is {n_ctx} tokens. However, your messages resulted "
                    f"in {n_prompt} tokens. Shorten the conversation, or restart the server with a larger --ctx.",
                    400, param, "context_length_exceeded")


def conversation_room(n_ctx: int) -> int:
    """The tokens the conversation needs beside the system prompt and tools for compacting it to help
    (a summary, the next message, an answer): 8,192, or a quarter of a smaller context."""
    return min(8192, n_ctx // 4)


def suggested_ctx(n_fixed: int) -> int:
    """The smallest power of two that leaves 8,192 tokens and a quarter of it beside `n_fixed`."""
    ctx = 8192
    while ctx - n_fixed < max(8192, ctx // 4):
        ctx *= 2
    return ctx


def context_too_small(n_fixed: int, n_ctx: int) -> APIError:
    """The system prompt and tools leave the conversation less than `conversation_room`: no compaction
    can help. Deliberately not OpenAI's context error, whose wording and code make agents compact and
    retry forever; a plain 400 makes Codex and opencode stop and show the message."""
    if n_fixed >= n_ctx:
        where = f"more than this server's context (--ctx {n_ctx})"
    else:
        where = (f"which leaves {n_ctx - n_fixed:,} of this server's context (--ctx {n_ctx}) for the conversation, "
                 f"too few to work in")
    return APIError(f"The system prompt and tools alone are {n_fixed:,} tokens, {where}: restart `ossgguf serve` "
                    f"with --ctx {suggested_ctx(n_fixed)} or more.", 400, None, "context_too_small")


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    raw = await request.body()
    if not raw.strip():
        raise invalid("The request body is empty: send a JSON object (Content-Type: application/json).")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"We could not parse the JSON body of your request ({exc}). "
                      "Send a valid JSON object (Content-Type: application/json).") from None
    if not isinstance(body, dict):
        raise invalid(f"The request body must be a JSON object, not {type(body).__name__}.")
    return body


def install_handlers(app) -> None:
    """Every error the app can raise leaves it in OpenAI's shape (FastAPI's own are `{"detail": ...}`)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            msg = f"Unknown request URL: {request.method} {request.url.path}. Please check the URL and method."
            return APIError(msg, 404, code="unknown_url").response()
        if exc.status_code == 405:
            msg = f"Method {request.method} is not allowed on {request.url.path}."
            return APIError(msg, 405, code="method_not_allowed").response()
        return APIError(str(exc.detail), exc.status_code).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return invalid(f"Invalid request: {first.get('msg', 'invalid body')}", param).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return APIError(f"The server had an error while processing your request: {type(exc).__name__}: {exc}",
                        500).response()
