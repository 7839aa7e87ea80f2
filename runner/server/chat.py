"""`POST /v1/chat/completions`: the request read into a `Turn`, the result as a completion or SSE chunks.

Reasoning goes out under both `reasoning_content` (vLLM, DeepSeek, Open WebUI) and `reasoning`
(OpenRouter, Ollama); either comes back in (harmony.normalize_messages).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ossgguf.harmony.parse import Event
from ossgguf.harmony.render import assistant_history_message
from ossgguf.runner.chat import Sampling
from ossgguf.runner.server import params as P
from ossgguf.runner.server.errors import APIError, invalid
from ossgguf.runner.server.worker import TurnEnd, Usage


@dataclass
class Turn:
    """One request, ready to render: a conversation in chat form and how to answer it."""

    messages: list[dict]
    tools: list[dict]
    reasoning_effort: str
    params: Sampling
    prefill: str = ""  # the start of the answer the prompt holds (a forced tool call)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    date: str | None = None  # None: the server's date (fixed when it started, so prompts repeat)
    model_identity: str | None = None
    source: str = "messages"  # the request field the conversation came from, for errors
    # Responses: per message, where its parts are in the request ("" -> "input[3]", ".content" -> ...)
    paths: list[dict[str, str]] | None = None

    @property
    def tool_names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def invalid(self, message: str) -> APIError:
        """A 400 for harmony's complaint about `messages[i]...`, naming the field the client sent."""
        match = _MESSAGE_PATH.search(message)
        if match is None:
            return invalid(message, self.source)
        if self.paths is None:
            return invalid(message, match.group(0))
        where, rest = self.paths[int(match.group(1))], match.group(2)
        key = max((k for k in where if rest.startswith(k) and rest[len(k):len(k) + 1] in ("", ".", "[")),
                  key=len)  # "" is always there
        param = where[key] + rest[len(key):]
        message = message[:match.start()] + param + message[match.end():]
        return invalid(message.replace("tool_call_id", "call_id"), param)


_MESSAGE_PATH = re.compile(r"messages\[(\d+)\]((?:\.\w+|\[\d+\])*)")


def template_kwargs(body: dict) -> dict:
    """`chat_template_kwargs` (vLLM, llama.cpp's server), the channel some clients use for the effort."""
    kw = body.get("chat_template_kwargs")
    if kw is None:
        return {}
    if not isinstance(kw, dict):
        raise invalid("'chat_template_kwargs' must be an object.", "chat_template_kwargs")
    return kw


def date_field(body: dict) -> str | None:
    date = body.get("date")
    if date is not None and not isinstance(date, str):
        raise invalid("'date' must be a YYYY-MM-DD string.", "date")
    return date


def parse_chat(body: dict, default_effort: str) -> Turn:
    messages = body.get("messages")
    if messages is None:
        raise invalid("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list of messages.", "messages")
    P.unsupported(body)
    fns = P.tools(body.get("tools"))
    fns, prefill = P.tool_choice(body.get("tool_choice"), fns)
    kw = template_kwargs(body)
    reasoning = body.get("reasoning")  # OpenRouter's {"effort": ...}
    effort = body.get("reasoning_effort") or kw.get("reasoning_effort") or (
        reasoning.get("effort") if isinstance(reasoning, dict) else None)
    identity = kw.get("model_identity")
    if identity is not None and not isinstance(identity, str):
        raise invalid("'chat_template_kwargs.model_identity' must be a string.", "chat_template_kwargs")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("'stream' must be true or false.", "stream")
    return Turn(messages=messages, tools=fns, reasoning_effort=P.effort(effort, "reasoning_effort", default_effort),
                params=P.sampling(body, ("max_completion_tokens", "max_tokens")), prefill=prefill,
                stop=P.stop_strings(body.get("stop")), stream=stream, date=date_field(body),
                model_identity=identity)


def include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    return bool(isinstance(opts, dict) and opts.get("include_usage"))


def usage_json(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion(end: TurnEnd, cid: str, model: str, created: int) -> dict[str, Any]:
    out = assistant_history_message(end.message)
    if "reasoning_content" in out:  # servers disagree on the field: both
        out["reasoning"] = out["reasoning_content"]
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": out, "logprobs": None, "finish_reason": end.finish_reason}],
            "usage": usage_json(end.usage), "system_fingerprint": None}


def _sse(data: dict) -> str:
    return "data: " + json.dumps(data, ensure_ascii=False) + "\n\n"


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
    cid, created = new_id(), int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if with_usage:
            data["usage"] = None
        return _sse(data)

    yield chunk({"role": "assistant", "content": ""})
    async for item in turn_events:
        if isinstance(item, TurnEnd):
            yield chunk({}, item.finish_reason)
            if with_usage:
                yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "system_fingerprint": None, "choices": [], "usage": usage_json(item.usage)})
            break
        yield chunk(_delta(item))
    yield "data: [DONE]\n\n"
