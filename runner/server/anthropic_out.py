"""Harmony events as Anthropic content blocks (`thinking`, `text`, `tool_use`) and the Messages API's
streaming events: `message_start`, `ping`, `content_block_start` / `_delta` / `_stop`, `message_delta`,
`message_stop` (docs.anthropic.com, "Streaming Messages").

A `tool_use` block's input must be a JSON object, so its arguments are held until the call is complete
and sent as one `input_json_delta` (Anthropic allows any split of the JSON): arguments that are not a
JSON object go out as `{}` (the worker's log names the call, `harmony.tool_call_problem`), the same in
the stream and in the message, and the client's check of the input answers the model.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from ossgguf.harmony import Event
from ossgguf.runner.generation import Usage
from ossgguf.runner.server import params as P
from ossgguf.runner.server.anthropic_tools import ServerToolBlocks
from ossgguf.runner.turn import TurnEnd

PING_SECONDS = 10.0  # a `ping` while nothing else is sent (a long prompt's prefill), so proxies keep the stream

_STOP_REASONS = {"tool_calls": "tool_use", "length": "max_tokens", "stop": "end_turn", "cancelled": "end_turn"}


def usage_json(u: Usage, n_prompt: int | None = None) -> dict[str, Any]:
    """Anthropic counts input without the tokens read from the cache: input + cache reads = the prompt."""
    prompt = u.prompt_tokens or n_prompt or 0
    cached = min(u.cached_tokens, prompt)
    return {"input_tokens": prompt - cached, "output_tokens": u.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def tool_input(arguments: str) -> dict:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def tool_use_id(call_id: str) -> str:
    """The parser's `call_...` ids in Anthropic's form (`toolu_...`); any id the client sends back works."""
    return "toolu_" + call_id.removeprefix("call_")


class MessageBuilder(ServerToolBlocks):
    """Harmony events -> content blocks, and the stream events that describe them; gpt-oss's own
    tools, run by the server, as server tool blocks (anthropic_tools.py)."""

    def __init__(self, model: str, n_prompt: int, server_tools: list[str] = (), container: str | None = None,
                 idle_seconds: float = 0.0) -> None:
        self.id, self.model, self.n_prompt = P.new_id("msg"), model, n_prompt
        self.blocks: list[dict] = []
        self._open: dict | None = None
        self._args = ""  # the open tool_use block's arguments so far
        self.init_server_tools(list(server_tools), container, idle_seconds)

    def message(self, stop_reason: str | None, usage: dict, stop_sequence: str | None = None) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": json.loads(json.dumps(self.blocks)), "stop_reason": stop_reason,
                "stop_sequence": stop_sequence, "usage": usage, **self.server_fields()}

    def start(self) -> list[dict]:
        return [{"type": "message_start", "message": self.message(None, usage_json(Usage(), self.n_prompt))},
                {"type": "ping"}]

    def _begin(self, block: dict) -> list[dict]:
        out = self._close()
        self.blocks.append(block)
        self._open = block
        return out + [{"type": "content_block_start", "index": len(self.blocks) - 1,
                       "content_block": json.loads(json.dumps(block))}]

    def _close(self) -> list[dict]:
        block, self._open = self._open, None
        if block is None:
            return []
        index, out = len(self.blocks) - 1, []
        if block["type"] == "tool_use":
            block["input"] = tool_input(self._args)
            out.append({"type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}})
        return out + [{"type": "content_block_stop", "index": index}]

    def feed(self, ev: Event) -> list[dict]:
        if self.is_server_tool(ev):
            return self.feed_server_tool(ev)
        if ev.kind == "tool_call":
            self._args = ""
            return self._begin({"type": "tool_use", "id": tool_use_id(ev.id), "name": ev.name, "input": {}})
        if ev.kind == "tool_args":
            self._args += ev.text
            return []
        kind = "thinking" if ev.kind == "reasoning" else "text"
        out: list[dict] = []
        if self._open is None or self._open["type"] != kind:
            # signature: Anthropic's proof that Claude wrote the thinking; nothing to prove here
            out = self._begin({"type": kind, kind: "", **({"signature": ""} if kind == "thinking" else {})})
        self._open[kind] += ev.text
        delta = {"type": f"{kind}_delta", kind: ev.text}  # thinking_delta, text_delta
        return out + [{"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}]

    def finish(self, end: TurnEnd) -> tuple[list[dict], dict]:
        """Close the last block: the final events and the whole message."""
        out = self._close()
        reason = "stop_sequence" if end.stop_sequence else _STOP_REASONS.get(end.finish_reason, "end_turn")
        usage = usage_json(end.usage, self.n_prompt) | self.server_usage()
        out.append({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": end.stop_sequence},
                    "usage": usage})
        out.append({"type": "message_stop"})
        return out, self.message(reason, usage, end.stop_sequence)


async def with_pings(events: AsyncIterator, seconds: float = PING_SECONDS) -> AsyncIterator:
    """`events`, and a `{"type": "ping"}` dict whenever none came for `seconds` (never cancelling the
    pending read, which would end the generator)."""
    it = aiter(events)
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(it))
            done, _ = await asyncio.wait({pending}, timeout=seconds)
            if not done:
                yield {"type": "ping"}
                continue
            pending, fut = None, pending
            if isinstance(fut.exception(), StopAsyncIteration):
                return
            yield fut.result()
    finally:
        if pending is not None:
            pending.cancel()
