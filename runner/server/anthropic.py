"""`POST /v1/messages` and `/v1/messages/count_tokens`: Anthropic's Messages API (what Claude Code speaks).

One conversion layer: an Anthropic request becomes the chat messages and function tools that the
OpenAI endpoints read (`params.Turn`), rendered by the same harmony renderer and parsed by the same
tool-call parser; only the shapes differ. The request side is anthropic_in.py; harmony events become
content blocks and stream events in anthropic_out.py; this module has the routes.

- `system` (a string or text blocks) is the developer message's instructions; `thinking` blocks sent
  back are the assistant's reasoning (analysis channel); `tool_use` blocks its tool calls; a user
  message's `tool_result` blocks are tool messages (`is_error` results start with "error: ", as the
  chat loop's own answers do, since harmony has no error flag); `redacted_thinking` (Claude's
  encrypted reasoning) is left out.
- `thinking: {"type": "enabled", "budget_tokens": N}` picks gpt-oss's reasoning effort: under 4,096
  low, under 16,384 medium, else high (Claude Code's "think" 4,000, "think hard" 10,000 and
  "ultrathink" 31,999 land on low, medium, high); `disabled` is low (gpt-oss always reasons a
  little); `output_config.effort` (Anthropic's effort parameter) is taken as it stands.
- Any `model` is served by the loaded model (Claude Code asks for its own names) unless the server
  runs with `--strict-model`.
- Errors have Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`, the field named
  at the start of the message (`messages.1.content.0: ...`), as Anthropic's API names it.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import re

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ossgguf.errors import OssggufError
from ossgguf.runner.server.anthropic_in import AnthropicError, bad, container_key, parse_messages, requested
from ossgguf.runner.server.anthropic_out import MessageBuilder, with_pings
from ossgguf.runner.server.app import ServerState, built_reply
from ossgguf.runner.server.builtin import Rounds
from ossgguf.runner.server.errors import APIError, read_json_object
from ossgguf.runner.server.params import sse_events

log = logging.getLogger(__name__)


def anthropic_errors(handler):
    """Whatever a handler raises leaves it in Anthropic's shape."""

    @functools.wraps(handler)
    async def wrapped(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except AnthropicError:
            raise
        except APIError as exc:
            raise AnthropicError.of(exc) from None
        except Exception as exc:
            log.exception("the Messages API request failed")
            raise AnthropicError(f"{type(exc).__name__}: {exc}", 500) from None

    return wrapped


_TOO_LONG = re.compile(r"maximum context length is (\d+) tokens\. However, your messages resulted in (\d+) tokens")


def too_long(exc: APIError) -> APIError:
    """Anthropic's wording for a prompt over the context ("prompt is too long: N tokens > M maximum"),
    which Claude Code recognises as such (and reads the counts from); `context_too_small` keeps its own,
    on which agents stop."""
    match = _TOO_LONG.search(exc.message) if exc.code == "context_length_exceeded" else None
    if match is None:
        return exc
    n_ctx, n_prompt = match.groups()
    return AnthropicError(f"prompt is too long: {n_prompt} tokens > {n_ctx} maximum (this server's --ctx): "
                          "shorten the conversation (/compact), or restart `ossgguf serve` with a larger --ctx.", 400)


def router(state: ServerState, strict_model: bool = False) -> APIRouter:
    """The Messages API routes for the app of `state` (create_app includes them)."""
    logged = False  # the warning that any model name is served, once

    async def check_key(request: Request) -> None:
        """Anthropic's `x-api-key` header, or `Authorization: Bearer` (Claude Code's ANTHROPIC_AUTH_TOKEN)."""
        if state.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = request.headers.get("x-api-key") or (auth[7:].strip() if auth.lower().startswith("bearer ") else "")
        if not hmac.compare_digest(given.encode(), state.api_key.encode()):
            raise AnthropicError("invalid x-api-key" if given else
                                 "no API key: send x-api-key or Authorization: Bearer (the server's --api-key)", 401)

    def model_name(body: dict) -> str:
        """The model that answers: a name the server knows (an adapter's too: runner/lora.py) picks it."""
        nonlocal logged
        if strict_model or body["model"] in state.aliases or body["model"] in state.lora_models:
            return state.check_model(body)
        if not logged:
            logged = True
            log.warning("Messages API requests name their own models (%r): %r serves them all "
                        "(--strict-model refuses other names)", body["model"], state.model_name)
        return state.model_name

    def builtin_names() -> list[str]:
        """gpt-oss's tools this server runs (--tools-builtin): their Anthropic server tools are ours."""
        return state.tools.names if state.tools is not None else []

    api = APIRouter(dependencies=[Depends(check_key)])

    @api.post("/v1/messages")
    @api.post("/messages")
    @anthropic_errors
    async def messages(request: Request) -> Response:
        body = await read_json_object(request)
        runs = builtin_names()
        turn = parse_messages(body, state.default_effort, runs=runs)
        model = model_name(body)
        names = requested(body.get("tools"), runs)  # built-in tools run here (anthropic_tools.py)
        try:
            job = await Rounds.start(state, turn, model, names, container_key(body) if names else None)
        except APIError as exc:
            raise too_long(exc) from None
        events = job.events(request.is_disconnected)
        req = job.job.request
        out = MessageBuilder(model, len(req.tokens) if req.tokens is not None else 0, names,
                             job.session.key if job.session else None,
                             state.tools.idle_seconds if state.tools is not None else 0.0)
        return await built_reply(job, with_pings(events) if turn.stream else events, out, turn.stream,
                                 lambda msg: sse_events([AnthropicError(msg, 500).body()]))

    @api.post("/v1/messages/count_tokens")
    @api.post("/messages/count_tokens")
    @anthropic_errors
    async def count_tokens(request: Request) -> dict:
        body = await read_json_object(request)
        runs = builtin_names()
        turn = parse_messages(body, state.default_effort, count_only=True, runs=runs)
        turn.builtin_tools = requested(body.get("tools"), runs)  # their descriptions are in the prompt
        model_name(body)
        if state.backend.tokenize is None:
            raise AnthropicError("this server cannot count tokens: its model has no tokenizer", 501)

        def count() -> int:
            try:
                return len(state.backend.tokenize(turn.segments(state.date)))
            except OssggufError as exc:
                raise bad("messages", str(exc)) from None

        return {"input_tokens": await asyncio.to_thread(count)}

    return api
