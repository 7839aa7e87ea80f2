"""gpt-oss harmony chat format: OpenAI chat messages -> prompt text, and parsed output -> history.

`render` reproduces the official chat template (ossgguf/data/chat_template.jinja) byte for byte,
in plain Python, so no jinja runs at serving time. Where the template fails on input that clients
really send, the input is normalised first (`normalize_messages`); where it silently loses data, we
keep it (see `render`'s docstring). The output parser lives in `harmony_parse`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any

from ossgguf.errors import OssggufError

from .harmony_parse import (
    Event,
    HarmonyStreamParser,
    ParsedMessage,
    ToolCall,
    parse_completion,
)
from .harmony_tools import BROWSER_TOOL, PYTHON_TOOL, check_tools, tojson, tool_namespace

__all__ = [
    "Event",
    "HarmonyStreamParser",
    "ParsedMessage",
    "ToolCall",
    "assistant_history_message",
    "load_messages_and_tools",
    "usable_tool_calls",
    "normalize_messages",
    "normalize_tools",
    "parse_completion",
    "render",
    "render_from_files",
]

log = logging.getLogger(__name__)

REASONING_EFFORTS = ("low", "medium", "high")
BUILTIN_TOOLS = ("browser", "python")
DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
_TEXT_PART_TYPES = ("text", "input_text", "output_text")
_REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
_CHANNEL_TAGS = ("<|channel|>analysis<|message|>", "<|channel|>final<|message|>")


def _text(content: Any, where: str) -> str:
    """A message field's text (`where` names the field): a string, null, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in _TEXT_PART_TYPES:
                if not isinstance(part.get("text"), str):
                    raise OssggufError(f"{where}[{k}] has no 'text' string")
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise OssggufError(
                    f"{where}[{k}] is of type {kind!r}: gpt-oss reads text only; "
                    "send content as a string or a list of {'type': 'text', 'text': ...} parts"
                )
        return "\n".join(texts)
    raise OssggufError(
        f"{where} must be a string, null or a list of text parts, not {type(content).__name__}"
    )


def _tool_content(content: Any, where: str) -> Any:
    """A tool result: text parts become a string; other JSON values stay as they are (the template JSON-encodes them)."""
    is_parts = (
        isinstance(content, list) and content and all(isinstance(p, dict) and "type" in p for p in content)
    )
    if content is None or isinstance(content, str) or is_parts:
        return _text(content, where)
    return content


def _check_no_channel_tags(text: str, where: str) -> None:
    if any(tag in text for tag in _CHANNEL_TAGS):
        raise OssggufError(
            f"{where} contains raw harmony <|channel|> tags: pass the analysis text as "
            "'reasoning_content' and the final answer as 'content', without the tags"
        )


def _arguments(raw: Any, where: str) -> Any:
    if raw is None:
        return {}
    if isinstance(raw, str):
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise OssggufError(
                f"{where} is not valid JSON ({exc}): send a JSON object or a JSON-encoded string"
            ) from None
    return raw


def _tool_calls(calls: Any, where: str, n: int) -> list[dict]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise OssggufError(f"{where}.tool_calls must be a list")
    out = []
    for k, call in enumerate(calls):
        here = f"{where}.tool_calls[{k}]"
        if not isinstance(call, dict):
            raise OssggufError(f"{here} must be an object")
        if call.get("type", "function") != "function":
            raise OssggufError(
                f"{here} has type {call.get('type')!r}: only 'function' tool calls are supported"
            )
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise OssggufError(f"{here} needs a 'function' object with a 'name'")
        call_id = call.get("id") or f"call_{n}_{k}"  # clients that omit ids answer by name or order
        new_fn = {
            "name": fn["name"],
            "arguments": _arguments(fn.get("arguments"), f"{here}.function.arguments"),
        }
        if "content_type" in fn:
            new_fn["content_type"] = fn["content_type"]
        out.append({"id": str(call_id), "type": "function", "function": new_fn})
    return out


def normalize_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages, in any variant clients send, to one canonical form.

    Canonical: leading system/developer messages merged into one; `content` always a string (a tool
    result may stay a JSON value); assistant reasoning under `thinking`, present only when non-empty;
    `tool_calls` present only when non-empty, with `arguments` decoded; tool messages carry the
    `name` of the call they answer. This is also the form the official template accepts.
    """
    if not isinstance(messages, list) or not messages:
        raise OssggufError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out: list[dict] = []
    call_names: dict[str, str] = {}
    last_call_name: str | None = None
    leading = True  # still in the run of system/developer messages that opens the conversation
    for n, msg in enumerate(messages):
        where = f"messages[{n}]"
        if not isinstance(msg, dict):
            raise OssggufError(f"{where} must be an object with a 'role'")
        role = msg.get("role")
        if role in ("system", "developer"):
            text = _text(msg.get("content"), f"{where}.content")
            if out and leading:
                # The template reads instructions only from messages[0]: merge a leading run.
                out[0]["content"] = "\n\n".join(t for t in (out[0]["content"], text) if t)
                continue
            if out:
                log.warning(
                    "%s: %s message after the conversation started is ignored by gpt-oss's template",
                    where,
                    role,
                )
            out.append({"role": role, "content": text})
            continue
        leading = False
        if role == "user":
            out.append({"role": "user", "content": _text(msg.get("content"), f"{where}.content")})
        elif role == "assistant":
            new: dict[str, Any] = {
                "role": "assistant",
                "content": _text(msg.get("content"), f"{where}.content"),
            }
            _check_no_channel_tags(new["content"], f"{where}.content")
            for key in _REASONING_FIELDS:
                reasoning = _text(msg.get(key), f"{where}.{key}")
                if reasoning:
                    _check_no_channel_tags(reasoning, f"{where}.{key}")
                    new["thinking"] = reasoning
                    break
            calls = _tool_calls(msg.get("tool_calls"), where, n)
            if calls:
                new["tool_calls"] = calls
                for call in calls:
                    call_names[call["id"]] = last_call_name = call["function"]["name"]
            out.append(new)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            name = msg.get("name")
            if call_id is not None:
                if not isinstance(call_id, str) or call_id not in call_names:
                    raise OssggufError(
                        f"{where}: tool_call_id {call_id!r} matches no earlier assistant tool call "
                        f"(known ids: {sorted(call_names) or 'none'})"
                    )
                if name and name != call_names[call_id]:
                    log.warning(
                        "%s: name %r differs from call %s's name %r; using the call's",
                        where,
                        name,
                        call_id,
                        call_names[call_id],
                    )
                name = call_names[call_id]
            elif not name:
                if last_call_name is None:
                    raise OssggufError(f"{where}: tool message with no earlier assistant tool call to answer")
                name = last_call_name
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "name": name,
                    "content": _tool_content(msg.get("content"), f"{where}.content"),
                }
            )
        else:
            raise OssggufError(f"{where} has role {role!r}: use system, developer, user, assistant or tool")
    return out


def normalize_tools(tools: list[dict] | None) -> list[dict]:
    """OpenAI function tools (`{"type": "function", "function": {...}}`, or the bare function) to the first form."""
    if not tools:
        return []
    if not isinstance(tools, list):
        raise OssggufError("tools must be a list of {'type': 'function', 'function': {...}} objects")
    out = []
    for k, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise OssggufError(f"tools[{k}] must be an object")
        if tool.get("type", "function") != "function":
            raise OssggufError(
                f"tools[{k}] has type {tool.get('type')!r}: only function tools are supported "
                "(gpt-oss's own browser/python tools are turned on with builtin_tools)"
            )
        fn = tool.get("function", tool if "name" in tool else None)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise OssggufError(f"tools[{k}] needs a 'function' object with a 'name'")
        if "parameters" in fn and fn["parameters"] is not None and not isinstance(fn["parameters"], dict):
            raise OssggufError(f"tools[{k}].function.parameters must be a JSON schema object")
        out.append({"type": "function", "function": fn})
    check_tools(out)
    return out


# -- tool definitions (the template's render_typescript_type / render_tool_namespace) -------------
def _date_text(date: str | _dt.date | None) -> str:
    if date is None:
        return _dt.datetime.now().strftime("%Y-%m-%d")  # what the template's strftime_now gives
    if isinstance(date, _dt.date):
        return date.strftime("%Y-%m-%d")
    try:
        return _dt.date.fromisoformat(date).strftime("%Y-%m-%d")
    except (TypeError, ValueError):
        raise OssggufError(f"date {date!r} is not a YYYY-MM-DD date") from None


def _system_message(effort: str, date: str, identity: str, builtin: list[str], has_tools: bool) -> str:
    out = [
        identity + "\n",
        "Knowledge cutoff: 2024-06\n",
        f"Current date: {date}\n\n",
        f"Reasoning: {effort}\n\n",
    ]
    if builtin:
        out.append("# Tools\n\n")
        out += [BROWSER_TOOL] if "browser" in builtin else []
        out += [PYTHON_TOOL] if "python" in builtin else []
    out.append("# Valid channels: analysis, commentary, final. Channel must be included for every message.")
    if has_tools:
        out.append("\nCalls to these tools must go to the commentary channel: 'functions'.")
    return "".join(out)


def render(
    messages: list[dict],
    tools: list[dict] | None = None,
    reasoning_effort: str = "medium",
    date: str | _dt.date | None = None,
    add_generation_prompt: bool = True,
    model_identity: str | None = None,
    builtin_tools: list[str] | None = None,
) -> str:
    """The prompt the official gpt-oss template renders for these messages, without jinja.

    Identical to the template wherever it accepts the (normalised) input. Beyond it: leading
    system + developer messages are merged; every call of an assistant message is rendered (the
    template keeps only the first) and each tool result is labelled with its own call's name; an
    assistant message with both reasoning and content beside tool calls (which the template refuses)
    renders the reasoning as analysis and the content as a commentary preamble.
    """
    if reasoning_effort not in REASONING_EFFORTS:
        raise OssggufError(
            f"reasoning effort {reasoning_effort!r} is not one of {', '.join(REASONING_EFFORTS)}"
        )
    builtin = list(builtin_tools or [])
    unknown = [t for t in builtin if t not in BUILTIN_TOOLS]
    if unknown:
        raise OssggufError(f"unknown builtin tools {unknown}: gpt-oss has {', '.join(BUILTIN_TOOLS)}")
    msgs = normalize_messages(messages)
    fns = normalize_tools(tools)
    identity = DEFAULT_IDENTITY if model_identity is None else model_identity
    system = _system_message(reasoning_effort, _date_text(date), identity, builtin, bool(fns))
    out = ["<|start|>system<|message|>", system, "<|end|>"]

    instructions, loop = "", msgs
    if msgs[0]["role"] in ("system", "developer"):
        instructions, loop = msgs[0]["content"], msgs[1:]
    if instructions or fns:
        out.append("<|start|>developer<|message|>")
        if instructions:
            out.append("# Instructions\n\n" + instructions + "\n\n")
        if fns:
            out.append("# Tools\n\n" + tool_namespace(fns))
        out.append("<|end|>")

    for i, msg in enumerate(loop):
        role = msg["role"]
        if role == "assistant":
            out.append(_assistant(msg, loop[i + 1 :], last=i == len(loop) - 1 and not add_generation_prompt))
        elif role == "tool":
            out.append(
                f"<|start|>functions.{msg['name']} to=assistant<|channel|>commentary<|message|>"
                + tojson(msg["content"])
                + "<|end|>"
            )
        elif role == "user":
            out.append("<|start|>user<|message|>" + msg["content"] + "<|end|>")
    if add_generation_prompt:
        out.append("<|start|>assistant")
    return "".join(out)


def _assistant(msg: dict, later: list[dict], last: bool) -> str:
    content, thinking = msg["content"], msg.get("thinking", "")
    calls = msg.get("tool_calls")
    if not calls:
        if last:  # training-style transcript: keep the reasoning and end with <|return|>
            analysis = (
                f"<|start|>assistant<|channel|>analysis<|message|>{thinking}<|end|>" if thinking else ""
            )
            return analysis + f"<|start|>assistant<|channel|>final<|message|>{content}<|return|>"
        return f"<|start|>assistant<|channel|>final<|message|>{content}<|end|>"
    # Reasoning is kept only inside the current tool loop: until an answer without calls follows.
    answered = any(m["role"] == "assistant" and "tool_calls" not in m for m in later)
    out = []
    if not answered and (thinking or content):
        out.append(f"<|start|>assistant<|channel|>analysis<|message|>{thinking or content}<|end|>")
    if thinking and content:
        out.append(f"<|start|>assistant<|channel|>commentary<|message|>{content}<|end|>")
    for call in calls:
        fn = call["function"]
        out.append(
            f"<|start|>assistant to=functions.{fn['name']}<|channel|>commentary "
            f"{fn.get('content_type', 'json')}<|message|>{tojson(fn['arguments'])}<|call|>"
        )
    return "".join(out)


# -- history and files ---------------------------------------------------------------------------
def usable_tool_calls(parsed: ParsedMessage) -> list:
    """The tool calls whose arguments are valid JSON: the others (cut off, malformed) could neither
    be run nor rendered back into the prompt."""
    calls = []
    for c in parsed.tool_calls:
        try:
            json.loads(c.arguments)
        except json.JSONDecodeError:
            log.warning("tool call %s (%s) left out: arguments are not valid JSON", c.id, c.name)
            continue
        calls.append(c)
    return calls


def assistant_history_message(parsed: ParsedMessage) -> dict:
    """The OpenAI-shaped assistant message for a parsed completion, to append to the conversation
    (without the tool calls that `usable_tool_calls` leaves out)."""
    msg: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.reasoning:
        msg["reasoning_content"] = parsed.reasoning
    calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in usable_tool_calls(parsed)]
    if calls:
        msg["content"] = parsed.content or None
        msg["tool_calls"] = calls
    return msg


def _load_json(path: str | Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OssggufError(f"{what} file {path} not found") from None
    except json.JSONDecodeError as exc:
        raise OssggufError(f"{what} file {path} is not valid JSON: {exc}") from None


def load_messages_and_tools(messages_path: str | Path | None,
                            tools_path: str | Path | None = None) -> tuple[list[dict], list[dict] | None]:
    """Messages and tools from JSON files: a message list (or a chat request body with `messages`
    and `tools`) and optionally a tool list (or `{"tools": [...]}`), which wins over the body's."""
    messages, tools = [], None
    if messages_path is not None:
        data = _load_json(messages_path, "messages")
        if isinstance(data, dict):
            tools = data.get("tools")
            data = data.get("messages")
        if not isinstance(data, list):
            raise OssggufError(f"{messages_path} must hold a list of messages or an object with a 'messages' list")
        messages = data
    if tools_path is not None:
        tools = _load_json(tools_path, "tools")
        if isinstance(tools, dict):
            tools = tools.get("tools")
        if not isinstance(tools, list):
            raise OssggufError(f"{tools_path} must hold a list of tools or an object with a 'tools' list")
    return messages, tools


def render_from_files(
    messages_path: str | Path,
    tools_path: str | Path | None = None,
    reasoning_effort: str = "medium",
    date: str | None = None,
) -> str:
    """Render a prompt from JSON files (see `load_messages_and_tools`)."""
    data, tools = load_messages_and_tools(messages_path, tools_path)
    return render(data, tools=tools, reasoning_effort=reasoning_effort, date=date)
