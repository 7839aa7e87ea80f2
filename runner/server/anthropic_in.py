"""Anthropic's Messages API, the request side: a `/v1/messages` body as the chat messages and function
tools that the OpenAI endpoints read (`params.Turn`), checked the way Anthropic checks it, with errors in
Anthropic's shape that name the field (`messages.1.content.0: ...`). See anthropic.py for the mapping.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from typing import Any

from ossgguf.runner.server import params as P
from ossgguf.runner.server.anthropic_tools import RESULT_BLOCKS, SERVER_TOOLS, server_base, server_tool
from ossgguf.runner.server.builtin import CONTAINER_ID
from ossgguf.runner.server.errors import APIError

log = logging.getLogger(__name__)

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 429: "rate_limit_error", 500: "api_error",
                501: "api_error", 529: "overloaded_error"}
_EFFORT_BUDGETS = ((4096, "low"), (16384, "medium"))  # thinking.budget_tokens below -> effort; else high
_IGNORED = ("allowed_domains", "blocked_domains", "user_location", "max_uses")  # server tools' fields
# a server tool named by tool_choice: the start of the gpt-oss call that answers it (web_fetch has none:
# the browser opens what a search found)
FORCED = {"web_search": "<|channel|>analysis to=browser.search <|constrain|>json<|message|>",
          "code_execution": "<|channel|>analysis to=python code<|message|>"}


class AnthropicError(APIError):
    """An `APIError` answered in Anthropic's shape (the app's handler calls `response()` -> `body()`)."""

    def body(self) -> dict[str, Any]:
        kind = self.type or _ERROR_TYPES.get(self.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    @classmethod
    def of(cls, exc: APIError) -> AnthropicError:
        """An error of the shared code (params, errors), its OpenAI `param` written Anthropic's way."""
        message, param = exc.message, exc.param
        if param:
            where = dotted(param)
            message = message.replace(param, where)
            if not message.startswith(where):
                message = f"{where}: {message}"
        return cls(message, exc.status, param, exc.code)


def dotted(path: str) -> str:
    """`messages[1].content[0]` -> `messages.1.content.0` (how Anthropic's errors name fields)."""
    return re.sub(r"\[(\d+)\]", r".\1", path)


def bad(where: str, message: str) -> AnthropicError:
    return AnthropicError(f"{where}: {message}", 400, where)


def _text(block: Any, where: str) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("text"), str):
        raise bad(where, "a text block needs a 'text' string")
    return block["text"]


def _blocks(content: Any, where: str) -> list[dict]:
    """A message's content as a list of blocks (a string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad(where, "must be a string or a list of content blocks")
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise bad(f"{where}.{j}", "a content block must be an object with a 'type'")
    return content


def _unsupported_block(kind: str, where: str, allowed: str) -> AnthropicError:
    if kind in ("image", "document", "search_result"):
        return bad(f"{where}.type", f"'{kind}' blocks are not supported: gpt-oss reads text only")
    return bad(f"{where}.type", f"'{kind}' blocks are not allowed here: this message takes {allowed} blocks")


def system_text(system: Any, where: str = "system") -> str:
    if system is None:
        return ""
    blocks = _blocks(system, where)  # a string is one text block
    for j, block in enumerate(blocks):
        if block["type"] != "text":
            raise _unsupported_block(block["type"], f"{where}.{j}", "text")
    return "\n\n".join(_text(b, f"{where}.{j}") for j, b in enumerate(blocks))


def _tool_result(block: dict, where: str) -> str:
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise _unsupported_block(str(kind), f"{where}.content.{k}", "text")
            parts.append(_text(part, f"{where}.content.{k}"))
        text = "\n".join(parts)
    else:
        raise bad(f"{where}.content", "must be a string or a list of text blocks")
    return f"error: {text}" if block.get("is_error") else text


def chat_messages(raw: Any, system: Any) -> list[dict]:
    """Anthropic `system` and `messages` as the chat messages the OpenAI endpoints render."""
    if not isinstance(raw, list) or not raw:
        raise bad("messages", "must be a non-empty list of {'role': 'user'|'assistant', 'content': ...} objects")
    out: list[dict] = [{"role": "system", "content": system_text(system)}]
    calls: dict[str, str] = {}  # tool_use id -> name, for the tool_result blocks that answer them
    answered = False  # an assistant message came: the system prompt is closed
    for i, msg in enumerate(raw):
        where = f"messages.{i}"
        if not isinstance(msg, dict):
            raise bad(where, "must be an object with 'role' and 'content'")
        role = msg.get("role")
        blocks = _blocks(msg.get("content"), f"{where}.content")
        if role == "system":  # Claude Code sends its environment so, after the first user message
            text = system_text(blocks, f"{where}.content")
            if not answered:  # still before any answer: part of the system prompt (a stable prefix)
                out[0]["content"] = "\n\n".join(t for t in (out[0]["content"], text) if t)
            else:  # harmony has no system message mid-conversation: shown to the model as one
                out.append({"role": "user", "content": f"[system]\n{text}"})
        elif role == "user":
            texts: list[str] = []
            for j, block in enumerate(blocks):
                here, kind = f"{where}.content.{j}", block["type"]
                if kind == "text":
                    texts.append(_text(block, here))
                elif kind == "tool_result":
                    use_id = block.get("tool_use_id")
                    if use_id not in calls:
                        raise bad(here, f"unexpected `tool_use_id` found in `tool_result` blocks: {use_id}. Each "
                                        "`tool_result` block must have a corresponding `tool_use` block in an "
                                        f"earlier assistant message (known ids: {', '.join(calls) or 'none'})")
                    if texts:  # text before a result keeps its place in the conversation
                        out.append({"role": "user", "content": "\n".join(texts)})
                        texts = []
                    out.append({"role": "tool", "tool_call_id": use_id, "name": calls[use_id],
                                "content": _tool_result(block, here)})
                else:
                    raise _unsupported_block(kind, here, "text and tool_result")
            if texts or not blocks:
                out.append({"role": "user", "content": "\n".join(texts)})
        elif role == "assistant":
            answered = True
            texts, thinking, tool_calls = [], [], []
            for j, block in enumerate(blocks):
                here, kind = f"{where}.content.{j}", block["type"]
                if kind == "text":
                    texts.append(_text(block, here))
                elif kind == "thinking":
                    if not isinstance(block.get("thinking"), str):
                        raise bad(here, "a thinking block needs a 'thinking' string")
                    thinking.append(block["thinking"])
                elif kind == "redacted_thinking" or kind in RESULT_BLOCKS:
                    continue  # Claude's encrypted reasoning; server tool calls (anthropic_tools.py)
                elif kind == "tool_use":
                    use_id, name, args = block.get("id"), block.get("name"), block.get("input")
                    if not isinstance(use_id, str) or not use_id or not isinstance(name, str) or not name:
                        raise bad(here, "a tool_use block needs 'id' and 'name' strings")
                    if not isinstance(args, dict):
                        raise bad(f"{here}.input", "must be an object")
                    calls[use_id] = name
                    tool_calls.append({"id": use_id, "type": "function", "function": {"name": name, "arguments": args}})
                else:
                    raise _unsupported_block(kind, here, "text, thinking and tool_use")
            new: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
            if thinking:
                new["reasoning_content"] = "\n".join(thinking)
            if tool_calls:
                new["tool_calls"] = tool_calls
            out.append(new)
        else:
            raise bad(f"{where}.role", f"is {role!r}: use 'user', 'assistant' or 'system'")
    return out if out[0]["content"] else out[1:]


def chat_tools(value: Any, runs: Collection[str] = ()) -> list[dict]:
    """Anthropic tools (`name`, `description`, `input_schema`) as checked chat function tools. Anthropic's
    own typed tools (`bash_20250124`, `web_search_...`), which only Claude knows, are left out; those
    that map to a built-in tool in `runs` are the server's (anthropic_tools.py)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad("tools", "must be a list of tools")
    out, kept = [], []
    for k, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise bad(f"tools.{k}", "must be an object")
        if tool.get("type") not in (None, "custom"):
            if server_tool(tool.get("type")) in runs:
                continue
            log.warning("tools.%d of type %r left out: this server runs custom tools only", k, tool.get("type"))
            continue
        if tool.get("defer_loading"):  # Anthropic's tool search: not shown to the model until searched for
            continue
        fn = {"name": tool.get("name"), "parameters": tool.get("input_schema")}
        if tool.get("description") is not None:
            fn["description"] = tool["description"]
        if fn["parameters"] is None:
            raise bad(f"tools.{k}.input_schema", "Field required")
        out.append({"type": "function", "function": fn})
        kept.append(k)
    try:
        return P.tools(out)
    except APIError as exc:  # the chat form's tools[j].function.parameters is the request's tools.k.input_schema
        def path(m: re.Match) -> str:
            rest = {"parameters": ".input_schema", "name": ".name", "description": ".description"}.get(m.group(2) or "")
            return f"tools.{kept[int(m.group(1))]}" + (rest if rest is not None else "." + m.group(2))

        pattern = re.compile(r"tools\[(\d+)\](?:\.function)?(?:\.(\w+))?")
        raise bad(pattern.sub(path, exc.param or "tools"), pattern.sub(path, exc.message)) from None


def requested(tools: Any, enabled: list[str]) -> list[str]:
    """The built-in tools a request's `tools` asks for that this server runs (in the order python, browser)."""
    names = set()
    for k, tool in enumerate(tools if isinstance(tools, list) else []):
        name = server_tool(tool.get("type")) if isinstance(tool, dict) else None
        if name in enabled:
            names.add(name)
            if given := [f for f in _IGNORED if tool.get(f) is not None]:
                log.warning("tools.%d (%s): %s not applied by this server", k, tool["type"], ", ".join(given))
    return [n for n in ("python", "browser") if n in names]


def container_key(body: dict) -> str | None:
    """The session a request names in `container` (a string, or `{"id": ...}`); None: a new one."""
    value = body.get("container")
    key = value.get("id") if isinstance(value, dict) else value
    if key is None:
        return None
    if not isinstance(key, str) or not CONTAINER_ID.fullmatch(key):
        raise bad("container", "is not a container id this server made (cntr_...)")
    return key


def tool_choice(value: Any) -> Any:
    """Anthropic's `tool_choice` in OpenAI's form (`params.tool_choice` forces the call)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}
    raise bad("tool_choice", "must be {'type': 'auto'|'any'|'none'} or {'type': 'tool', 'name': ...}")


def effort(body: dict, default: str) -> str:
    config = body.get("output_config")
    if isinstance(config, dict) and config.get("effort") is not None:
        return P.effort(config["effort"], "output_config.effort", default)
    thinking = body.get("thinking")
    if thinking is None:
        return default
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return "low"
    if kind == "adaptive":
        return default
    if kind != "enabled":
        raise bad("thinking", "must be {'type': 'enabled', 'budget_tokens': N}, {'type': 'disabled'} "
                              "or {'type': 'adaptive'}")
    budget = thinking.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1024:
        raise bad("thinking.budget_tokens", f"is {budget!r}: it must be an integer of at least 1024")
    return next((e for limit, e in _EFFORT_BUDGETS if budget < limit), "high")


def parse_messages(body: dict, default_effort: str, count_only: bool = False, runs: Collection[str] = ()) -> P.Turn:
    """A Messages request (or a count_tokens one, which has no `max_tokens`) as a `Turn`; `runs`: the
    built-in tools this server runs (their Anthropic server tools are not function tools)."""
    if not isinstance(body.get("model"), str):
        raise bad("model", "Field required" if body.get("model") is None else "must be a string")
    if not count_only:
        if body.get("max_tokens") is None:
            raise bad("max_tokens", "Field required")
        if isinstance(body["max_tokens"], bool) or not isinstance(body["max_tokens"], int):
            raise bad("max_tokens", f"must be an integer, not {body['max_tokens']!r}")
    if body.get("messages") is None:
        raise bad("messages", "Field required")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        raise bad("stop_sequences", "must be a list of strings")
    messages = chat_messages(body.get("messages"), body.get("system"))
    fns = chat_tools(body.get("tools"), runs)
    choice = tool_choice(body.get("tool_choice"))
    choice, forced = _server_choice(body, choice, fns, runs)
    # read_turn reads OpenAI's names: the same checks, Anthropic's values
    shared = {k: body[k] for k in ("temperature", "top_p", "top_k", "stream") if k in body}
    if not count_only:
        shared["max_tokens"] = body["max_tokens"]
    try:
        turn = P.read_turn({**shared, "tool_choice": choice}, messages, fns, effort(body, default_effort),
                           "thinking", default_effort, ("max_tokens",), stop=list(stops or []))
    except APIError as exc:
        raise AnthropicError.of(exc) from None
    turn.prefill = forced or turn.prefill
    return turn



def _server_choice(body: dict, choice: Any, fns: list[dict], runs: Collection[str]) -> tuple[Any, str]:
    """`tool_choice` with server tools: (the choice for read_turn, the start of the answer). A named one is
    forced as a named function is, by starting the answer as its gpt-oss call (Claude Code's WebSearch
    forces web_search); `any` with only server tools lets the model pick its call."""
    typed = {t.get("name"): server_base(t.get("type")) for t in body.get("tools") or []
             if isinstance(t, dict) and server_base(t.get("type"))}
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    if named in typed:
        tool = SERVER_TOOLS[typed[named]]
        if tool not in runs:
            raise bad("tool_choice", f"names '{named}', a server tool that this server runs only when started "
                                     f"with --tools-builtin {tool} (gpt-oss's own {tool} tool)")
        return "auto", FORCED.get(typed[named], "")
    if choice == "required" and not fns and any(SERVER_TOOLS[b] in runs for b in typed.values()):
        return "auto", ""
    return choice, ""
