"""OpenAI chat messages for harmony: every variant clients send normalised to one form, messages and
tools read from files, and the assistant message of a parsed completion (history).

The official template fails on input that clients really send (`content: null` beside tool calls,
arguments as a JSON string, reasoning under another field): `normalize_messages` gives the one form
that the renderer (and the template) reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ossgguf.errors import OssggufError
from ossgguf.harmony.parse import ParsedMessage, ToolCall
from ossgguf.harmony.tools import check_tools

log = logging.getLogger(__name__)

_TEXT_PART_TYPES = ("text", "input_text", "output_text")
_REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")


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
                raise OssggufError(f"{where}[{k}] is of type {kind!r}: gpt-oss reads text only; "
                                   "send content as a string or a list of {'type': 'text', 'text': ...} parts")
        return "\n".join(texts)
    raise OssggufError(f"{where} must be a string, null or a list of text parts, not {type(content).__name__}")


def _tool_content(content: Any, where: str) -> Any:
    """A tool result: text parts become a string; other JSON values stay as they are (the template JSON-encodes them)."""
    is_parts = isinstance(content, list) and content and all(isinstance(p, dict) and "type" in p for p in content)
    if content is None or isinstance(content, str) or is_parts:
        return _text(content, where)
    return content


def _arguments(raw: Any, where: str) -> Any:
    if raw is None or isinstance(raw, str) and not raw.strip():
        return {}
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            # A malformed call the model wrote comes back in history (tool_call_problem): keep its
            # text; rendered as a JSON string, as the official template renders string arguments.
            log.debug("%s is not valid JSON: rendered as a string", where)
            return raw
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
            raise OssggufError(f"{here} has type {call.get('type')!r}: only 'function' tool calls are supported")
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise OssggufError(f"{here} needs a 'function' object with a 'name'")
        call_id = call.get("id") or f"call_{n}_{k}"  # clients that omit ids answer by name or order
        args = fn.get("arguments")
        if not (fn.get("recipient") and isinstance(args, str)):  # a built-in tool's message is kept as written
            args = _arguments(args, f"{here}.function.arguments")  # (python's is code, not JSON)
        new_fn = {"name": fn["name"], "arguments": args}
        for key in ("content_type", "channel", "recipient"):  # a parsed call's header, as the model wrote it
            if fn.get(key) is not None:
                if not isinstance(fn[key], str):
                    raise OssggufError(f"{here}.function.{key} must be a string")
                new_fn[key] = fn[key]
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
    call_fns: dict[str, dict] = {}  # id -> the call's function: its name; a built-in tool's header
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
                log.warning("%s: %s message after the conversation started is ignored by gpt-oss's template",
                            where, role)
            out.append({"role": role, "content": text})
            continue
        leading = False
        if role == "user":
            out.append({"role": "user", "content": _text(msg.get("content"), f"{where}.content")})
        elif role == "assistant":
            new: dict[str, Any] = {"role": "assistant", "content": _text(msg.get("content"), f"{where}.content")}
            for key in _REASONING_FIELDS:
                if reasoning := _text(msg.get(key), f"{where}.{key}"):
                    new["thinking"] = reasoning
                    break
            if calls := _tool_calls(msg.get("tool_calls"), where, n):
                new["tool_calls"] = calls
                call_fns |= {call["id"]: call["function"] for call in calls}
                last_call_name = calls[-1]["function"]["name"]
            out.append(new)
        elif role == "tool":
            call_id, name = msg.get("tool_call_id"), msg.get("name")
            if call_id is not None:
                if not isinstance(call_id, str) or call_id not in call_fns:
                    raise OssggufError(f"{where}: tool_call_id {call_id!r} matches no earlier assistant tool call "
                                       f"(known ids: {sorted(call_fns) or 'none'})")
                if name and name != call_fns[call_id]["name"]:
                    log.warning("%s: name %r differs from call %s's name %r; using the call's",
                                where, name, call_id, call_fns[call_id]["name"])
                name = call_fns[call_id]["name"]
            elif not name:
                if last_call_name is None:
                    raise OssggufError(f"{where}: tool message with no earlier assistant tool call to answer")
                name = last_call_name
            out.append({"role": "tool", "tool_call_id": call_id, "name": name,
                        "content": _tool_content(msg.get("content"), f"{where}.content")})
            if (fn := call_fns.get(call_id or "")) and fn.get("recipient"):
                # gpt-oss's own tool answers as itself, on the channel of the call
                out[-1].update(author=fn["recipient"], channel=fn.get("channel") or "commentary")
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
            raise OssggufError(f"tools[{k}] has type {tool.get('type')!r}: only function tools are supported "
                               "(gpt-oss's own browser/python tools are turned on with builtin_tools)")
        fn = tool.get("function", tool if "name" in tool else None)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise OssggufError(f"tools[{k}] needs a 'function' object with a 'name'")
        if "parameters" in fn and fn["parameters"] is not None and not isinstance(fn["parameters"], dict):
            raise OssggufError(f"tools[{k}].function.parameters must be a JSON schema object")
        out.append({"type": "function", "function": fn})
    check_tools(out)
    return out


# -- the model's output as a message -----------------------------------------------------------------
def tool_call_problem(call: ToolCall, tool_names: Iterable[str] | None = None) -> str | None:
    """Why a tool call the model wrote cannot be run as it stands (None: it can), for the one policy
    on malformed calls (docs/server.md, "Malformed tool calls"):

    A call is never dropped or rewritten: every path reports it as the model wrote it, as OpenAI's
    API does (its `arguments` "may not be valid JSON" and may name a function that was not offered).
    The server hands it to the client (finish reason `tool_calls`; cut off by max tokens: `length`),
    whose tool loop answers it with an error the model can act on; `chat`/`run` answer it with this
    text instead of running the tool. A forced tool call the model botched is such a call.
    `tool_names`: the offered functions (None: any name goes).
    """
    names = None if tool_names is None else list(tool_names)
    if names is not None and call.name not in names:
        offered = ", ".join(names) if names else "none were offered"
        return f"there is no tool named {call.name!r} (tools: {offered}): call one of them"
    try:
        args = json.loads(call.arguments)
    except json.JSONDecodeError as exc:
        return f"the arguments of this call to {call.name!r} are not valid JSON ({exc}): call it again with a JSON object"
    if not isinstance(args, dict):
        return f"the arguments of this call to {call.name!r} are not a JSON object: call it again with a JSON object"
    return None


def assistant_message(parsed: ParsedMessage, headers: bool = False) -> dict:
    """The OpenAI-shaped assistant message for a parsed completion, every tool call as the model wrote
    it (`tool_call_problem`). `headers`: each call also keeps the channel and content type the model
    wrote, so that history renders it back as written (chat); API clients get the plain form."""
    msg: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.reasoning:
        msg["reasoning_content"] = parsed.reasoning
    if parsed.tool_calls:
        msg["content"] = parsed.content or None
        msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.name, "arguments": c.arguments, **(c.header_fields() if headers else {})}}
            for c in parsed.tool_calls]
    return msg


# -- files ------------------------------------------------------------------------------------------
def _load_json(path: str | Path, what: str) -> Any:
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the JSON
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise OssggufError(f"{what} file {path} not found") from None
    except UnicodeDecodeError as exc:
        raise OssggufError(f"{what} file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                           f"{exc.start:,}): save it as UTF-8 JSON") from None
    except OSError as exc:
        raise OssggufError(f"cannot read {what} file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise OssggufError(f"{what} file {path} is not valid JSON: {exc}") from None


def _in_file(path: str | Path, check, value: Any) -> None:
    """Run a check on what a file holds, its error prefixed with the file (`chat.json: messages[0] ...`):
    the field paths alone do not say which of two files is wrong. Its warnings are left to the
    rendering that follows, so that each is shown once."""
    quiet, log.disabled = log.disabled, True
    try:
        check(value)
    except OssggufError as exc:
        raise OssggufError(f"{path}: {exc}") from None
    finally:
        log.disabled = quiet


def load_messages_and_tools(messages_path: str | Path | None,
                            tools_path: str | Path | None = None) -> tuple[list[dict], list[dict] | None]:
    """Messages and tools from JSON files: a message list (or a chat request body with `messages`
    and `tools`) and optionally a tool list (or `{"tools": [...]}`), which wins over the body's.
    Both are checked here, so that an error names the file it comes from."""
    messages, tools = [], None
    if messages_path is not None:
        data = _load_json(messages_path, "messages")
        if isinstance(data, dict):
            tools = data.get("tools")
            data = data.get("messages")
        if not isinstance(data, list):
            raise OssggufError(f"{messages_path} must hold a list of messages or an object with a 'messages' list")
        if not data:
            raise OssggufError(f"{messages_path} holds no messages: give at least one "
                               "{'role': ..., 'content': ...} object, or leave out --messages")
        _in_file(messages_path, normalize_messages, data)
        _in_file(messages_path, normalize_tools, tools)  # a request body's own tools
        messages = data
    if tools_path is not None:
        tools = _load_json(tools_path, "tools")
        if isinstance(tools, dict):
            tools = tools.get("tools")
        if not isinstance(tools, list):
            raise OssggufError(f"{tools_path} must hold a list of tools or an object with a 'tools' list")
        _in_file(tools_path, normalize_tools, tools)
    return messages, tools

