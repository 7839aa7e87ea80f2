"""`POST /v1/responses` (the API Codex CLI speaks): input items to a chat conversation, harmony events to
output items (`reasoning`, `message`, `function_call`) and to the Responses streaming events.

Reasoning items carry the raw analysis text as `reasoning_text` content (as OpenAI's gpt-oss reference
server does); sent back as input, they are rendered inside a tool loop and dropped after it, as the
harmony format wants. `previous_response_id` works for responses this server stored (in memory).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from ossgguf.harmony import Event
from ossgguf.runner.generation import Usage
from ossgguf.runner.server import params as P
from ossgguf.runner.server.builtin import PRIVATE, Hosted, history, hosted_tool, requested
from ossgguf.runner.server.errors import APIError, invalid
from ossgguf.runner.server.responses_tools import HOSTED_ITEMS, HostedItems, hosted_echo
from ossgguf.runner.turn import TurnEnd

log = logging.getLogger(__name__)


class ResponseStore:
    """The last `size` stored conversations (input and output items), for `previous_response_id`; and
    the last built-in tool calls as rendered (server/builtin.py), by item id, so that a client that
    sends its history back (Codex: store=false) gets them rendered as the model saw them."""

    CALLS = 1000

    def __init__(self, size: int = 100) -> None:
        self.size = size
        self._items: OrderedDict[str, list[dict]] = OrderedDict()
        self._calls: OrderedDict[str, dict] = OrderedDict()

    def remember_call(self, item_id: str, rendered: dict) -> None:
        self._calls[item_id] = rendered
        while len(self._calls) > self.CALLS:
            self._calls.popitem(last=False)

    def recall(self, item: Any) -> Any:
        """A built-in call item as sent back, with what it rendered when this server ran it."""
        if isinstance(item, dict) and item.get("type") in HOSTED_ITEMS and PRIVATE not in item \
                and item.get("id") in self._calls:
            return {**item, PRIVATE: self._calls[item["id"]]}
        return item

    def get(self, rid: str) -> list[dict]:
        if rid not in self._items:
            raise APIError(f"Previous response with id '{rid}' not found.", 400, "previous_response_id",
                           "previous_response_not_found")
        self._items.move_to_end(rid)
        return self._items[rid]

    def put(self, rid: str, items: list[dict]) -> None:
        self._items[rid] = items
        while len(self._items) > self.size:
            self._items.popitem(last=False)


# -- request -------------------------------------------------------------------------------------
def _chat_tools(value: Any, builtin: Collection[str] = ()) -> list[dict]:
    """Responses function tools (`{"type": "function", "name", "parameters"}`) in chat form. Hosted tools
    (web_search, ...) are gpt-oss's own where the server runs them (`builtin`, server/builtin.py), else
    left out with a warning, so agents that list them still work."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("'tools' must be a list of function tools.", "tools")
    out, kept = [], []
    for k, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise invalid(f"'tools[{k}]' must be an object.", f"tools[{k}]")
        if tool.get("type", "function") != "function":
            hosted_tool(tool, k, builtin)  # run here (server/builtin.py), or left out with a warning
            continue
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        out.append({"type": "function", "function": {k2: fn[k2] for k2 in ("name", "description", "parameters")
                                                      if k2 in fn}})
        kept.append(k)
    try:
        return P.tools(out)
    except APIError as exc:  # errors name the chat form's tools[j].function.x: the request's is tools[k].x

        def request_path(m: re.Match) -> str:
            return f"tools[{kept[int(m.group(1))]}]" + ("." if m.group(2) else "")

        path = re.compile(r"tools\[(\d+)\](\.function\.)?")
        exc.message = path.sub(request_path, exc.message)
        exc.param = path.sub(request_path, exc.param) if exc.param else exc.param
        raise


def _reasoning_text(item: dict) -> str:
    parts = item.get("content") or item.get("summary") or []
    if not isinstance(parts, list):
        return ""
    return "\n".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))


def input_messages(items: list, where: str = "input", skip: int = 0) -> tuple[list[dict], list[dict[str, str]]]:
    """Responses input items as chat messages, and per message where its parts are in the request
    (`Turn.paths`, so that errors name `input[k]`). Consecutive assistant-side items (reasoning, an
    assistant message, function calls) make one assistant message, as harmony renders them. The
    first `skip` items are a stored previous response's (`previous_response_id`)."""
    msgs: list[dict] = []
    paths: list[dict[str, str]] = []
    group: dict | None = None  # the assistant message being assembled

    def assistant(fresh_if_filled: bool, here: str) -> tuple[dict, dict[str, str]]:
        nonlocal group
        if group is None or (fresh_if_filled and (group["content"] or group.get("tool_calls"))):
            group = {"role": "assistant", "content": ""}
            msgs.append(group)
            paths.append({"": here})
        return group, paths[-1]

    for k, item in enumerate(items):
        here = f"{where}[{k - skip}]" if k >= skip else f"previous_response_id[{k}]"
        if not isinstance(item, dict):
            raise invalid(f"'{here}' must be an object.", here)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role == "assistant":
                g, path = assistant(True, here)
                g["content"] = item.get("content") or ""
                path[".content"] = f"{here}.content"
            elif role in ("user", "system", "developer"):
                group = None
                msgs.append({"role": role, "content": item.get("content")})
                paths.append({"": here})
            else:
                raise invalid(f"'{here}.role' is {role!r}: use user, system, developer or assistant.", f"{here}.role")
        elif kind == "reasoning":
            g, path = assistant(True, here)
            text = _reasoning_text(item)
            g["reasoning_content"] = "\n".join(t for t in (g.get("reasoning_content"), text) if t)
            path[".reasoning_content"] = f"{here}.content"
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                raise invalid(f"'{here}' needs 'name' and 'call_id' strings.", here)
            g, path = assistant(False, here)
            calls = g.setdefault("tool_calls", [])
            path[f".tool_calls[{len(calls)}]"] = here
            path[f".tool_calls[{len(calls)}].function.arguments"] = f"{here}.arguments"
            calls.append({"id": item["call_id"], "type": "function",
                          "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}})
        elif kind == "function_call_output":
            group = None
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")})
            paths.append({"": here, ".content": f"{here}.output"})
        elif kind in HOSTED_ITEMS:  # gpt-oss's own tools, run by this server (server/builtin.py)
            if (done := history(item)) is None:
                continue
            g, path = assistant(False, here)
            g.setdefault("tool_calls", []).append(done[0])
            group = None
            msgs.append({"role": "tool", "tool_call_id": done[0]["id"], "content": done[1]})
            paths.append({"": here, ".content": f"{here}.outputs"})
        else:
            raise invalid(f"'{here}' has type {kind!r}: this server takes message, reasoning, function_call, "
                          "function_call_output, code_interpreter_call and web_search_call items.", f"{here}.type")
    return msgs, paths


@dataclass
class ResponsesRequest:
    turn: P.Turn
    items: list[dict]  # the whole conversation as input items (previous response included)
    store: bool
    echo: dict[str, Any] = field(default_factory=dict)  # request fields repeated in the response object
    builtin: list[str] = field(default_factory=list)  # gpt-oss's own tools it asks for (server/builtin.py)
    container: str | None = None  # the conversation its code_interpreter tool names


def parse_responses(body: dict, default_effort: str, store: ResponseStore,
                    builtin: Collection[str] = ()) -> ResponsesRequest:
    """`builtin`: the built-in tools this server runs, which hosted tools map to."""
    raw = body.get("input")
    if raw is None:
        raise invalid("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    items = [{"type": "message", "role": "user", "content": raw}] if isinstance(raw, str) else raw
    if not isinstance(items, list):
        raise invalid("'input' must be a string or a list of input items.", "input")
    P.unsupported_responses(body)
    prev = body.get("previous_response_id")
    stored = list(store.get(str(prev))) if prev is not None else []
    items = stored + [store.recall(i) for i in items]
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("'instructions' must be a string.", "instructions")
    messages, paths = input_messages(items, skip=len(stored))
    if instructions:
        messages.insert(0, {"role": "developer", "content": instructions})
        paths.insert(0, {"": "instructions", ".content": "instructions"})
    if not messages:
        raise invalid("'input' holds no messages.", "input")
    fns = _chat_tools(body.get("tools"), builtin)
    names, container = requested(body.get("tools"), builtin)
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    effort = reasoning.get("effort") or P.template_kwargs(body).get("reasoning_effort")
    turn = P.read_turn(body, messages, fns, effort, "reasoning.effort", default_effort, ("max_output_tokens",),
                       source="input", paths=paths)
    echo = {"instructions": instructions, "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice", "auto"),
            "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
            "max_output_tokens": body.get("max_output_tokens"), "previous_response_id": prev,
            "parallel_tool_calls": body.get("parallel_tool_calls", True), "metadata": body.get("metadata") or {},
            "reasoning": {"effort": turn.reasoning_effort, "summary": None}, "text": {"format": {"type": "text"}},
            "truncation": body.get("truncation") or "disabled", "user": body.get("user")}
    return ResponsesRequest(turn, items, body.get("store", True) is not False, echo, names, container)


# -- output --------------------------------------------------------------------------------------
def usage_json(u: Usage) -> dict[str, Any]:
    # cache_write_tokens: required by the openai client's types; the KV cache is not billed storage here
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.total_tokens}


class OutputBuilder(HostedItems):
    """Harmony events -> output items, and the streaming events that describe them (with sequence numbers).
    `hosted`: gpt-oss's own tools this response runs (their items: responses_tools.py)."""

    def __init__(self, rid: str, model: str, echo: dict[str, Any], hosted: Hosted | None = None) -> None:
        self.rid, self.model, self.echo = rid, model, hosted_echo(echo, hosted)
        self.init_hosted(hosted)
        self.created = int(time.time())
        self.items: list[dict] = []
        self._open: dict | None = None
        self._seq = 0

    def _event(self, kind: str, **data) -> dict:
        ev = {"type": kind, "sequence_number": self._seq, **data}
        self._seq += 1
        return ev

    def response(self, status: str, usage: Usage | None = None, error: dict | None = None,
                 incomplete: str | None = None) -> dict:
        return {"id": self.rid, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": [json.loads(json.dumps(i)) for i in self.items],
                "usage": usage_json(usage) if usage else None, "error": error,
                "incomplete_details": {"reason": incomplete} if incomplete else None,
                "completed_at": int(time.time()) if status == "completed" else None, **self.echo}

    def start(self) -> list[dict]:
        snapshot = self.response("in_progress")
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def _begin(self, item: dict) -> list[dict]:
        out = self._close("completed")
        self.items.append(item)
        self._open = item
        out.append(self._event("response.output_item.added", output_index=len(self.items) - 1,
                               item=json.loads(json.dumps(item))))
        if item["type"] in ("message", "reasoning"):
            out.append(self._event("response.content_part.added", **self._at(item), content_index=0,
                                   part=dict(item["content"][0])))
        return out

    def feed(self, ev: Event) -> list[dict]:
        if self.is_hosted(ev):
            return self.feed_hosted(ev)
        item, out = self._open, []
        if ev.kind == "tool_call":
            return self._begin({"id": P.new_id("fc"), "type": "function_call", "status": "in_progress",
                                "call_id": ev.id, "name": ev.name, "arguments": ""})
        if ev.kind == "tool_args":
            item["arguments"] += ev.text
            return [self._event("response.function_call_arguments.delta", **self._at(item), delta=ev.text)]
        kind = "reasoning" if ev.kind == "reasoning" else "message"
        if item is None or item["type"] != kind:
            item = {"id": P.new_id("rs"), "type": "reasoning", "status": "in_progress", "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}]} if kind == "reasoning" else \
                {"id": P.new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                 "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
            out = self._begin(item)
        item["content"][0]["text"] += ev.text
        extra = {"logprobs": []} if kind == "message" else {}
        delta = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        out.append(self._event(delta, **self._at(item), content_index=0, delta=ev.text, **extra))
        return out

    def _close(self, status: str) -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        if item["type"] in HOSTED_ITEMS:
            return self.close_hosted(item)
        where = self._at(item)
        out = self.annotate(item)
        if item["type"] == "function_call":  # malformed or not, as written (harmony.tool_call_problem)
            item["arguments"] = item["arguments"] or "{}"
            out.append(self._event("response.function_call_arguments.done", **where, name=item["name"],
                                   arguments=item["arguments"]))
        else:
            part = item["content"][0]
            done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            extra = {"logprobs": []} if item["type"] == "message" else {}
            out.append(self._event(done, **where, content_index=0, text=part["text"], **extra))
            out.append(self._event("response.content_part.done", **where, content_index=0, part=dict(part)))
        item["status"] = status
        out.append(self._event("response.output_item.done", output_index=where["output_index"],
                               item=json.loads(json.dumps(item))))
        return out

    def finish(self, end: TurnEnd) -> tuple[list[dict], dict]:
        """Close the last item; the final events and the response object."""
        length = end.finish_reason == "length"
        out = self._close("incomplete" if length else "completed")
        resp = self.response("incomplete" if length else "completed", end.usage,
                             incomplete="max_output_tokens" if length else None)
        out.append(self._event("response.incomplete" if length else "response.completed", response=resp))
        return out, resp

    def fail(self, message: str) -> list[dict]:
        out = self._close("incomplete")
        resp = self.response("failed", error={"code": "server_error", "message": message})
        out.append(self._event("response.failed", response=resp))
        return out
