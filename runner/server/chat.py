"""`POST /v1/chat/completions`: the request read into a `Turn`, the result as a completion or SSE chunks.

Reasoning goes out under both `reasoning_content` (vLLM, DeepSeek, Open WebUI) and `reasoning`
(OpenRouter, Ollama); either comes back in (harmony.normalize_messages).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from ossgguf.harmony import Event, assistant_message
from ossgguf.runner.generation import Usage
from ossgguf.runner.server import params as P
from ossgguf.runner.server.errors import invalid
from ossgguf.runner.turn import TurnEnd


def parse_chat(body: dict, default_effort: str) -> P.Turn:
    messages = body.get("messages")
    if messages is None:
        raise invalid("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list of messages.", "messages")
    P.unsupported(body)
    fns = P.tools(body.get("tools"))
    kw = P.template_kwargs(body)
    reasoning = body.get("reasoning")  # OpenRouter's {"effort": ...}
    effort = body.get("reasoning_effort") or kw.get("reasoning_effort") or (
        reasoning.get("effort") if isinstance(reasoning, dict) else None)
    identity = kw.get("model_identity")
    if identity is not None and not isinstance(identity, str):
        raise invalid("'chat_template_kwargs.model_identity' must be a string.", "chat_template_kwargs")
    return P.read_turn(body, messages, fns, effort, "reasoning_effort", default_effort,
                       ("max_completion_tokens", "max_tokens"), stop=P.stop_strings(body.get("stop")),
                       model_identity=identity)


def include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    return bool(isinstance(opts, dict) and opts.get("include_usage"))


def usage_json(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}


def completion(end: TurnEnd, model: str) -> dict[str, Any]:
    out = assistant_message(end.message)
    if "reasoning_content" in out:  # servers disagree on the field: both
        out["reasoning"] = out["reasoning_content"]
    return {"id": P.new_id("chatcmpl", "-"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": out, "logprobs": None, "finish_reason": end.finish_reason}],
            "usage": usage_json(end.usage), "system_fingerprint": None}


def _delta(ev: Event) -> dict[str, Any]:
    if ev.kind == "reasoning":
        return {"reasoning_content": ev.text, "reasoning": ev.text}
    if ev.kind == "content":
        return {"content": ev.text}
    if ev.kind == "tool_call":
        return {"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                "function": {"name": ev.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]}


async def stream_chunks(turn_events: AsyncIterator, model: str, with_usage: bool) -> AsyncIterator[str]:
    """SSE `chat.completion.chunk`s, as OpenAI sends them: role first, deltas, finish, usage, [DONE]."""
    cid, created = P.new_id("chatcmpl", "-"), int(time.time())

    def chunk(choices: list[dict], **extra) -> str:
        return P.sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                      "system_fingerprint": None, "choices": choices, **extra})

    def delta(delta: dict, finish: str | None = None) -> str:
        usage = {"usage": None} if with_usage else {}
        return chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **usage)

    yield delta({"role": "assistant", "content": ""})
    async for item in turn_events:
        if isinstance(item, TurnEnd):
            yield delta({}, item.finish_reason)
            if with_usage:
                yield chunk([], usage=usage_json(item.usage))
            break
        yield delta(_delta(item))
    yield "data: [DONE]\n\n"
