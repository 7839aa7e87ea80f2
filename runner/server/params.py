"""What the Chat Completions and Responses endpoints share: the `Turn` a request is read into, its
fields checked as OpenAI checks them, ids and SSE framing.

Every problem becomes a 400 that names the field (`param`), so a client sees what to fix.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ossgguf import limits
from ossgguf.errors import OssggufError
from ossgguf.harmony import REASONING_EFFORTS, Segment, forced_call_start, normalize_tools, render_segments
from ossgguf.harmony.tools import tool_namespace
from ossgguf.runner.generation import Sampling
from ossgguf.runner.server.errors import APIError, invalid

# Efforts of newer OpenAI models, mapped to the nearest of gpt-oss's three (Codex sends them).
_EFFORT_ALIASES = {"none": "low", "minimal": "low", "xhigh": "high", "max": "high"}


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
    builtin_tools: list[str] = field(default_factory=list)  # gpt-oss's own tools described (server/builtin.py)

    @property
    def tool_names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def segments(self, server_date: str, messages: list[dict] | None = None, **options: Any) -> list[Segment]:
        """The turn's prompt (or `messages`' with the turn's tools and settings), before any prefill."""
        return render_segments(self.messages if messages is None else messages, self.tools, self.reasoning_effort,
                               date=self.date or server_date, model_identity=self.model_identity,
                               builtin_tools=self.builtin_tools or None, **options)

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


def read_turn(body: dict, messages: list[dict], fns: list[dict], effort_value: Any, effort_param: str,
              default_effort: str, max_keys: tuple[str, ...], **fields: Any) -> Turn:
    """A `Turn` from what both endpoints read alike: tool_choice, the effort, sampling, stream, date."""
    fns, prefill = tool_choice(body.get("tool_choice"), fns)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("'stream' must be true or false.", "stream")
    date = body.get("date")
    if date is not None and not isinstance(date, str):
        raise invalid("'date' must be a YYYY-MM-DD string.", "date")
    return Turn(messages, fns, effort(effort_value, effort_param, default_effort), sampling(body, max_keys),
                prefill=prefill, stream=stream, date=date, **fields)


def template_kwargs(body: dict) -> dict:
    """`chat_template_kwargs` (vLLM, llama.cpp's server), the channel some clients use for the effort."""
    kw = body.get("chat_template_kwargs")
    if kw is None:
        return {}
    if not isinstance(kw, dict):
        raise invalid("'chat_template_kwargs' must be an object.", "chat_template_kwargs")
    return kw


def new_id(prefix: str, sep: str = "_") -> str:
    return f"{prefix}{sep}{uuid.uuid4().hex[:24]}"


def sse(data: dict, event: str | None = None) -> str:
    """One server-sent event; the Responses API names each event, Chat Completions does not."""
    return (f"event: {event}\n" if event else "") + "data: " + json.dumps(data, ensure_ascii=False) + "\n\n"


def sse_events(events: list[dict]) -> str:
    """Events named by their `type` (the Responses and Messages APIs)."""
    return "".join(sse(e, e["type"]) for e in events)


def number(body: dict, key: str, lo: float, hi: float, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise invalid(f"'{key}' must be {'an integer' if integer else 'a number'}, not {value!r}.", key)
    if not lo <= value <= hi:
        raise invalid(f"'{key}' is {value}; it must be between {lo} and {hi}.", key)
    return value


def sampling(body: dict, max_keys: tuple[str, ...]) -> Sampling:
    """Sampling options; the first of `max_keys` present bounds the generated tokens."""
    key = next((k for k in max_keys if body.get(k) is not None), None)
    max_tokens = number(body, key, limits.MAX_TOKENS.lo, limits.MAX_TOKENS.hi, integer=True) if key else None
    fields = {  # the ranges of the CLI's options (ossgguf.limits), which are OpenAI's
        "temperature": number(body, "temperature", limits.TEMPERATURE.lo, limits.TEMPERATURE.hi),
        "top_p": number(body, "top_p", limits.TOP_P.lo, limits.TOP_P.hi),
        "top_k": number(body, "top_k", limits.TOP_K.lo, limits.TOP_K.hi, integer=True),
        "min_p": number(body, "min_p", limits.MIN_P.lo, limits.MIN_P.hi),
        "seed": number(body, "seed", -(2**63), 2**64 - 1, integer=True),
    }
    return Sampling(max_tokens=max_tokens, **{k: v for k, v in fields.items() if v is not None})


def effort(value: Any, param: str, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise invalid(f"'{param}' must be one of {', '.join(REASONING_EFFORTS)}.", param)
    value = _EFFORT_ALIASES.get(value, value)
    if value not in REASONING_EFFORTS:
        raise invalid(f"'{param}' is {value!r}: gpt-oss takes {', '.join(REASONING_EFFORTS)}.", param)
    return value


def stop_strings(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise invalid("'stop' must be a string or a list of up to 4 strings.", "stop")
    return stops


def tools(value: Any, param: str = "tools") -> list[dict]:
    """Function tools in the chat form `{"type": "function", "function": {...}}`, checked."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid(f"'{param}' must be a list of function tools.", param)
    try:
        out = normalize_tools(value)  # checks names and schemas too (harmony.tools.check_tools)
    except OssggufError as exc:
        raise invalid(str(exc), getattr(exc, "param", None) or param) from None
    if out:
        try:
            tool_namespace(out)  # a schema the renderer cannot read fails here, not in the middle of a request
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise invalid(f"'{param}' could not be rendered for gpt-oss: {type(exc).__name__}: {exc}", param) from None
    return out


def tool_choice(value: Any, fns: list[dict], param: str = "tool_choice") -> tuple[list[dict], str]:
    """The tools to render and the start of the answer that forces a call, for OpenAI's `tool_choice`.

    gpt-oss has no constrained decoding here: `required` and a named function are forced by
    starting the assistant's message as a tool call (harmony's own header), `none` hides the tools.
    """
    if value is None or value == "auto":
        return fns, ""
    if value == "none":
        return [], ""
    names = [f["function"]["name"] for f in fns]
    if value == "required":
        if not fns:
            raise invalid("'tool_choice' is 'required' but no tools were given.", param)
        return fns, forced_call_start()
    name = None
    if isinstance(value, dict) and value.get("type") == "function":
        fn = value.get("function")
        name = fn.get("name") if isinstance(fn, dict) else value.get("name")  # chat form, Responses form
    if not isinstance(name, str):
        raise invalid("'tool_choice' must be 'none', 'auto', 'required' or "
                      "{'type': 'function', 'function': {'name': ...}}.", param)
    if name not in names:
        raise invalid(f"'tool_choice' names {name!r}, which is not among the tools ({', '.join(names) or 'none'}).",
                      param)
    return fns, forced_call_start(name)


def _one_choice(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise invalid("Only n=1 is supported: this server generates one choice per request.", "n")


def unsupported(body: dict) -> None:
    """Chat Completions options gpt-oss cannot honour here: refuse them rather than silently answer
    something else."""
    _one_choice(body)
    for key in ("logprobs", "top_logprobs"):
        if body.get(key):
            raise invalid("logprobs are not supported by this server.", key)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise invalid(f"response_format {fmt.get('type')!r} is not supported: only 'text'.", "response_format")


def unsupported_responses(body: dict) -> None:
    """The Responses API's options this server cannot honour, refused as `unsupported` refuses chat's.
    Accepted and ignored: what changes no answer here (`include: ["reasoning.encrypted_content"]`,
    which Codex sends: reasoning comes back as text; `prompt_cache_key`, `service_tier`, ...)."""
    _one_choice(body)
    include = body.get("include")
    if include is not None and (not isinstance(include, list) or not all(isinstance(i, str) for i in include)):
        raise invalid("'include' must be a list of strings.", "include")
    if body.get("top_logprobs") or body.get("logprobs") or "message.output_text.logprobs" in (include or []):
        raise invalid("logprobs are not supported by this server.",
                      "top_logprobs" if body.get("top_logprobs") else "include")
    if body.get("background"):
        raise invalid("Background responses are not supported by this server: send the request with or without "
                      "'stream'.", "background")
    if body.get("conversation") is not None:
        raise invalid("Conversations are not supported by this server: send 'previous_response_id' or the whole "
                      "conversation as 'input'.", "conversation")
    if body.get("prompt") is not None:
        raise invalid("Prompt templates are not supported by this server: send 'instructions' and 'input'.", "prompt")
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise invalid(f"text.format {fmt.get('type')!r} is not supported: only 'text'.", "text.format")
    if body.get("truncation") not in (None, "auto", "disabled"):
        raise invalid(f"'truncation' is {body['truncation']!r}: use 'auto' or 'disabled'.", "truncation")
