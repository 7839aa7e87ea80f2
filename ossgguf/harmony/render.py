"""gpt-oss harmony chat format: OpenAI chat messages -> the prompt, as text and as segments.

`render` reproduces the official chat template (ossgguf/data/chat_template.jinja) byte for byte,
in plain Python, so no jinja runs at serving time. `render_segments` gives the same prompt as
control tokens and text, so that message text is tokenized as text (as openai-harmony does) and
cannot forge a message. Messages are normalised first (messages.py); where the template silently
loses data, we keep it (see `render`'s docstring). The output parser lives in parse.py.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any, NamedTuple

from ossgguf.errors import OssggufError
from ossgguf.harmony.messages import load_messages_and_tools, normalize_messages, normalize_tools
from ossgguf.harmony.tokens import CONSTRAIN, CONTROL_TOKENS
from ossgguf.harmony.tools import builtin_tool_text, tojson, tool_namespace

REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_REASONING = "medium"  # the template's default, and the system message's when a request does not say
BUILTIN_TOOLS = ("browser", "python")
DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."


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
    out = [identity + "\n", "Knowledge cutoff: 2024-06\n", f"Current date: {date}\n\n", f"Reasoning: {effort}\n\n"]
    if builtin:
        out.append("# Tools\n\n")
        out += [builtin_tool_text(name) for name in BUILTIN_TOOLS if name in builtin]
    out.append("# Valid channels: analysis, commentary, final. Channel must be included for every message.")
    if has_tools:
        out.append("\nCalls to these tools must go to the commentary channel: 'functions'.")
    return "".join(out)


# -- prompt segments: the renderer's control tokens apart from text ---------------------------------
class Segment(NamedTuple):
    """A piece of a rendered prompt: one control token the renderer wrote (`control`), or text.

    Text is tokenized as plain text whatever it spells (`Engine.tokenize_text`): a message holding
    `<|end|><|start|>system<|message|>` stays text, as openai-harmony encodes it, and cannot forge
    a message. Adjacent text is one segment, tokenized as a whole, as the template's string would be.
    """

    text: str
    control: bool = False


_MARKUP = re.compile("(" + "|".join(re.escape(t) for t in CONTROL_TOKENS) + ")")


def markup_segments(markup: str) -> list[Segment]:
    """Harmony markup this program wrote (never message text): its special-token strings are control
    tokens. E.g. the server's forced tool-call start, `<|channel|>commentary to=functions.f ...`."""
    return _segments([markup])


def _segments(items: list[str | Segment]) -> list[Segment]:
    """`str` items are the renderer's markup, `Segment` items text; adjacent text is merged."""
    out: list[Segment] = []
    for item in items:
        parts = [item] if isinstance(item, Segment) else [
            Segment(p, p in CONTROL_TOKENS) for p in _MARKUP.split(item) if p]
        for seg in parts:
            if not seg.text:
                continue
            if out and not seg.control and not out[-1].control:
                out[-1] = Segment(out[-1].text + seg.text)
            else:
                out.append(seg)
    return out


def render(messages: list[dict], tools: list[dict] | None = None, **options: Any) -> str:
    """The prompt the official gpt-oss template renders for these messages, without jinja; `options`
    are `render_segments`' (reasoning_effort, date, add_generation_prompt, model_identity, builtin_tools).

    Identical to the template wherever it accepts the (normalised) input. Beyond it: leading
    system + developer messages are merged; every call of an assistant message is rendered (the
    template keeps only the first) and each tool result is labelled with its own call's name; an
    assistant message with both reasoning and content beside tool calls (which the template refuses)
    renders the reasoning as analysis and the content as a commentary preamble. Tool calls parsed
    from the model keep the channel and content type it wrote (`<|constrain|>json`). Assistant text
    holding `<|channel|>final<|message|>` (refused by the template) is text like any other: a model
    that explains harmony writes it, and it never becomes control tokens (`render_segments`).

    This text is for reading; a model gets `render_segments`' tokens, in which message text never
    becomes a control token.
    """
    return "".join(s.text for s in render_segments(messages, tools, **options))


def render_segments(messages: list[dict], tools: list[dict] | None = None, reasoning_effort: str = DEFAULT_REASONING,
                    date: str | _dt.date | None = None, add_generation_prompt: bool = True,
                    model_identity: str | None = None, builtin_tools: list[str] | None = None) -> list[Segment]:
    """`render`'s prompt as segments: the control tokens the renderer writes, and text (message
    contents, names, tool definitions) that must be tokenized as plain text (`Engine.tokenize_segments`)."""
    if reasoning_effort not in REASONING_EFFORTS:
        raise OssggufError(f"reasoning effort {reasoning_effort!r} is not one of {', '.join(REASONING_EFFORTS)}")
    builtin = list(builtin_tools or [])
    if unknown := [t for t in builtin if t not in BUILTIN_TOOLS]:
        raise OssggufError(f"unknown builtin tools {unknown}: gpt-oss has {', '.join(BUILTIN_TOOLS)}")
    msgs = normalize_messages(messages)
    fns = normalize_tools(tools)
    identity = DEFAULT_IDENTITY if model_identity is None else model_identity
    system = _system_message(reasoning_effort, _date_text(date), identity, builtin, bool(fns))
    T = Segment  # every message text, name and tool definition: never markup
    out: list[str | Segment] = ["<|start|>system<|message|>", T(system), "<|end|>"]

    instructions, loop = "", msgs
    if msgs[0]["role"] in ("system", "developer"):
        instructions, loop = msgs[0]["content"], msgs[1:]
    if instructions or fns:
        out.append("<|start|>developer<|message|>")
        if instructions:
            out.append(T("# Instructions\n\n" + instructions + "\n\n"))
        if fns:
            out.append(T("# Tools\n\n" + tool_namespace(fns)))
        out.append("<|end|>")

    for i, msg in enumerate(loop):
        role = msg["role"]
        if role == "assistant":
            out += _assistant(msg, loop[i + 1 :], last=i == len(loop) - 1 and not add_generation_prompt)
        elif role == "tool":  # a built-in tool's (author python, browser.*): as openai-harmony renders it
            author, content = msg.get("author"), msg["content"]
            text = content if author and isinstance(content, str) else tojson(content)
            out += ["<|start|>", T(f"{author or 'functions.' + msg['name']} to=assistant"), "<|channel|>",
                    T(msg["channel"] if author else "commentary"), "<|message|>", T(text), "<|end|>"]
        elif role == "user":
            out += ["<|start|>user<|message|>", T(msg["content"]), "<|end|>"]
    if add_generation_prompt:
        out.append("<|start|>assistant")
    return _segments(out)


def _assistant(msg: dict, later: list[dict], last: bool) -> list[str | Segment]:
    T = Segment
    content, thinking = msg["content"], msg.get("thinking", "")
    calls = msg.get("tool_calls")
    if not calls:
        if last:  # training-style transcript: keep the reasoning and end with <|return|>
            analysis = ["<|start|>assistant<|channel|>analysis<|message|>", T(thinking), "<|end|>"] if thinking else []
            return [*analysis, "<|start|>assistant<|channel|>final<|message|>", T(content), "<|return|>"]
        return ["<|start|>assistant<|channel|>final<|message|>", T(content), "<|end|>"]
    # Reasoning is kept only inside the current tool loop: until an answer without calls follows.
    answered = any(m["role"] == "assistant" and "tool_calls" not in m for m in later)
    out: list[str | Segment] = []
    if not answered and (thinking or content):
        out += ["<|start|>assistant<|channel|>analysis<|message|>", T(thinking or content), "<|end|>"]
    if thinking and content:
        out += ["<|start|>assistant<|channel|>commentary<|message|>", T(content), "<|end|>"]
    for call in calls:
        fn = call["function"]
        # The template's form; a call parsed from the model keeps its channel and content type.
        # openai-harmony renders a `<|constrain|>` content type as that token, the rest as text.
        ctype = fn.get("content_type") or ("" if fn.get("recipient") else "json")  # built-ins: as written
        constrain = [" <|constrain|>", T(ctype.removeprefix(CONSTRAIN))] if ctype.startswith(CONSTRAIN) else [
            T(" " + ctype)] if ctype else []
        to, args = fn.get("recipient") or f"functions.{fn['name']}", fn["arguments"]
        out += ["<|start|>", T(f"assistant to={to}"), "<|channel|>",
                T(fn.get("channel") or "commentary"), *constrain, "<|message|>",
                T(args if fn.get("recipient") and isinstance(args, str) else tojson(args)), "<|call|>"]
    return out


def forced_call_start(name: str | None = None) -> str:
    """The start of an assistant message that calls function `name` (None: any function), as harmony
    markup: a prompt ending in it forces a tool call (OpenAI's `tool_choice`) without constrained decoding."""
    if name is None:
        return "<|channel|>commentary to=functions."
    return f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>"


def render_from_files(messages_path: str | Path, tools_path: str | Path | None = None,
                      reasoning_effort: str = DEFAULT_REASONING, date: str | None = None, *,
                      model: str | Path | None = None) -> str:
    """Render a prompt from JSON files (see `load_messages_and_tools`); with `model`, only for a
    gpt-oss GGUF that speaks harmony (`check_harmony_model`)."""
    if model is not None:
        check_harmony_model(model)
    data, tools = load_messages_and_tools(messages_path, tools_path)
    return render(data, tools=tools, reasoning_effort=reasoning_effort, date=date)


def check_harmony_model(path: str | Path) -> None:
    """OssggufError unless `path` is a readable gpt-oss GGUF (any shard of a split set) whose
    vocabulary has harmony's control tokens: the prompt `render` prints is only right for such a model."""
    from ossgguf.gguf.read import read_gguf
    from ossgguf.model import check_gpt_oss

    model = read_gguf(path)  # the project's one header reader: refuses a missing, cut or corrupt file
    check_gpt_oss(model)
    tokens = set(model.get("tokenizer.ggml.tokens") or [])
    if missing := [t for t in CONTROL_TOKENS if t not in tokens]:
        raise OssggufError(f"{model.path}: its vocabulary lacks harmony's {', '.join(missing)}: not a gpt-oss "
                           "tokenizer; convert the model again with `ossgguf convert`")
