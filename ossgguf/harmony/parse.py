"""Streaming parser for gpt-oss output in the harmony format.

Generated text starts right after a prompt that ends in `<|start|>assistant`, so the first message's
role is implied. A message is `HEADER<|message|>BODY` closed by `<|end|>`, `<|return|>` (final
answer) or `<|call|>` (tool call). The header holds the channel and, for tool calls, the recipient in
either form the model writes: `<|channel|>commentary to=functions.f <|constrain|>json` (harmony docs)
or ` to=functions.f<|channel|>commentary json` (the official template's history form).
The parser never raises on model output: problems end up in `ParsedMessage.error` / `stop_reason`.

Model output is parsed on token ids, as openai-harmony does (`feed_token`): a control token is
known by its id, and text made of ordinary tokens stays text even where it spells `<|end|>` (a model
explaining harmony). `feed` / `parse_completion` read harmony markup instead (a rendered or scripted
string, the server's forced tool-call start), where every special-token string is a control token.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from .tokens import CALL, CHANNEL, CONSTRAIN, END, ENDOFTEXT, MESSAGE, PARSED_TOKENS, RETURN, START

log = logging.getLogger(__name__)


# A header longer than this without `<|message|>` means the model is not writing harmony.
MAX_HEADER_CHARS = 512
# What the text of a first header cut off before `<|channel|>` can look like (" to=functions.f").
_HEADER_START = re.compile(r"\s*[\w.\-]*(?:\s+to=[^\s<]*)?\s*")

EventKind = Literal["reasoning", "content", "tool_call", "tool_args"]
StopReason = Literal["stop", "tool_calls", "length", "error"]


@dataclass
class Event:
    """One streaming delta. `tool_call` opens call `index` (id, name); `tool_args` extends its arguments."""

    kind: EventKind
    text: str = ""
    index: int = -1
    id: str = ""
    name: str = ""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text as the model wrote it ("{}" when it wrote nothing)
    # The header as the model wrote it, rendered back in history: None where it wrote none.
    channel: str | None = None  # "commentary" for function calls, "analysis" for built-in tools
    content_type: str | None = None  # "<|constrain|>json" (harmony docs), "json" (template form)
    # A call to one of gpt-oss's own tools (`python`, `browser.search`): `name` is the whole recipient.
    builtin: bool = False

    def header_fields(self) -> dict[str, str]:
        """The channel and content type the model wrote, for a history message's `function`; a
        built-in tool's call also keeps its recipient (rendered without `functions.`)."""
        return {k: v for k, v in (("channel", self.channel), ("content_type", self.content_type),
                                  ("recipient", self.name if self.builtin else None)) if v}


@dataclass
class ParsedMessage:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    stop_reason: StopReason = "stop"
    error: str | None = None


@dataclass
class _Header:
    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None


def default_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_header(parts: list[tuple[str, str]]) -> _Header:
    """Split header pieces, ("text", s) and ("special", `<|channel|>` / `<|constrain|>`), into its
    fields. A content type after `<|constrain|>` keeps the marker, as openai-harmony's does."""
    sections: dict[str, list[str]] = {"role": [], CHANNEL: [], CONSTRAIN: []}
    current = "role"
    for kind, part in parts:
        if kind == "special":
            current = part
        else:
            sections[current].append(part)
    role, channel, recipient, content_type = "", None, None, None
    for section, text in sections.items():
        for word in "".join(text).split():
            if word.startswith("to="):
                recipient = word[3:]
            elif section == "role" and not role:
                role = word
            elif section == CHANNEL and channel is None:
                channel = word
            elif content_type is None:
                content_type = CONSTRAIN + word if section == CONSTRAIN else word
    return _Header(role or "assistant", channel, recipient, content_type)


class HarmonyStreamParser:
    """Feed generated tokens one by one (`feed_token`); get deltas back; call `finish()` once at the end.

    `special_tokens` (id -> text, `Engine.special_tokens()`) tells which ids are harmony's control
    tokens; `feed` reads markup text instead.
    """

    def __init__(self, id_factory: Callable[[], str] | None = None,
                 special_tokens: Mapping[int, str] | None = None) -> None:
        self._new_id = id_factory or default_call_id
        self._control = {i: t for i, t in (special_tokens or {}).items() if t in PARSED_TOKENS}
        self._buf = ""  # text held back because it may be the start of a special token
        self._state = "header"  # header | body | between | done
        self._header: list[tuple[str, str]] = []  # ("text", s) and ("special", marker) pieces
        self._target: str | None = None  # reasoning | content | tool
        self._channel: str | None = None
        self._body_chars = 0
        self._opened = 0  # messages opened so far
        self._last_close: str | None = None  # END / RETURN / CALL of the last closed message
        self._finished = False  # flushed: no more input
        self._settled = False
        self.result = ParsedMessage()

    # -- input ---------------------------------------------------------------------------------
    def feed(self, piece: str) -> list[Event]:
        """Harmony markup: every special-token string in it is that control token. Only for text
        this program wrote or scripted; the model's output goes through `feed_token`."""
        if self._finished:
            raise RuntimeError("HarmonyStreamParser.feed() called after flush() or finish()")
        self._buf += piece
        events: list[Event] = []
        for kind, text in self._scan(final=False):
            self._step(kind, text, events)
        return events

    def feed_token(self, token: int | None, text: str) -> list[Event]:
        """One generated token and its text: a harmony control token by its id, anything else text,
        whatever it spells. `token` None: text alone (an engine's last, flushed bytes).

        A control token's `text` may begin with the rest of a UTF-8 sequence the decoder flushed
        with it: that part is text.
        """
        if self._finished:
            raise RuntimeError("HarmonyStreamParser.feed_token() called after flush() or finish()")
        events: list[Event] = []
        for kind, held in self._scan(final=True):  # markup fed before (a prefill) ends here
            self._step(kind, held, events)
        control = self._control.get(token) if token is not None else None
        if before := (text if control is None else text.removesuffix(control)):
            self._step("text", before, events)
        if control is not None:
            self._step("special", control, events)
        return events

    def flush(self) -> list[Event]:
        """The last deltas at the end of the stream: text held back as a possible partial special
        token, or plain text from a model that does not write harmony. `finish()` calls it too."""
        events: list[Event] = []
        if self._finished:
            return events
        self._finished = True
        for kind, text in self._scan(final=True):
            self._step(kind, text, events)
        if self._state == "header" and self._header and not self._opened and ("special", CHANNEL) not in self._header:
            text = "".join(p for kind, p in self._header if kind == "text")
            cut = text.rfind("<")  # drop a trailing start of a special token (a stream cut inside one)
            if cut >= 0 and any(t.startswith(text[cut:]) for t in PARSED_TOKENS):
                text = text[:cut]
            if not _HEADER_START.fullmatch(text):
                self._not_harmony(events)
        return events

    def finish(self, ended_by: Literal["stop", "length"] | None = None) -> ParsedMessage:
        """Close the stream (see `flush`) and settle `stop_reason`.

        `ended_by` is the engine's reason when the text has no terminator: llama.cpp stops at
        `<|return|>` / `<|call|>` without passing them on ("stop"), or at max tokens ("length").
        """
        if self._settled:
            return self.result
        self.flush()
        self._settled = True
        res = self.result
        unclosed = self._state == "body" or self._state == "header" and bool(self._header)
        if unclosed and ended_by == "stop":
            if self._state == "body":
                self._close(CALL if self._target == "tool" else RETURN)
            else:
                self._set_error("the model stopped inside a message header")
        if res.error is not None:
            res.stop_reason = "error"
        elif unclosed and ended_by != "stop":
            res.stop_reason = "length"
        elif self._last_close == RETURN:
            res.stop_reason = "stop"
        elif self._last_close == CALL and res.tool_calls:
            res.stop_reason = "tool_calls"
        elif ended_by is not None:
            res.stop_reason = ended_by
        elif self._last_close == END and self._channel not in ("final", None):
            res.stop_reason = "length"  # stopped after reasoning, before any answer
        else:
            res.stop_reason = "stop"
        if res.stop_reason == "error":
            log.warning("harmony output: %s", res.error)
        return res

    # -- tokenizing ----------------------------------------------------------------------------
    def _scan(self, final: bool) -> list[tuple[str, str]]:
        """Split the buffer into ("text", s) and ("special", tok); keep a possible partial token."""
        out: list[tuple[str, str]] = []
        buf, i, plain = self._buf, 0, 0
        while (j := buf.find("<", i)) >= 0:
            rest = buf[j:]
            tok = next((t for t in PARSED_TOKENS if rest.startswith(t)), None)
            if tok is not None:
                if j > plain:
                    out.append(("text", buf[plain:j]))
                out.append(("special", tok))
                i = plain = j + len(tok)
            elif not final and any(t.startswith(rest) for t in PARSED_TOKENS):
                if j > plain:
                    out.append(("text", buf[plain:j]))
                self._buf = rest
                return out
            else:
                i = j + 1
        if len(buf) > plain:
            out.append(("text", buf[plain:]))
        self._buf = ""
        return out

    # -- state machine -------------------------------------------------------------------------
    def _step(self, kind: str, text: str, events: list[Event]) -> None:
        state = self._state
        if state == "done":
            if kind != "text" or text.strip():
                log.debug("harmony output after the end ignored: %r", text)
            return
        if kind == "text":
            if state == "body":
                self._emit(text, events)
            elif state == "between" and not text.strip():
                return
            else:
                self._state = "header"
                self._header.append(("text", text))
                if sum(len(p) for _, p in self._header) > MAX_HEADER_CHARS:
                    self._not_harmony(events)
            return
        # special tokens
        if state == "body":
            if text in (END, CALL, RETURN):
                self._close(text)
            elif text in (START, CHANNEL):
                log.debug("harmony: %s inside a message body; closing the message", text)
                self._close(END)
                self._state, self._header = "header", [] if text == START else [("special", CHANNEL)]
            elif text == ENDOFTEXT:
                self._close(RETURN if self._target != "tool" else CALL)
                self._state = "done"
            else:  # <|message|>, <|constrain|>, <|startoftext|> inside a body: keep them as text
                self._emit(text, events)
        elif text == START:
            self._state, self._header = "header", []
        elif text in (CHANNEL, CONSTRAIN):
            self._state = "header"
            self._header.append(("special", text))
        elif text == MESSAGE:
            self._open(parse_header(self._header), events)
        elif text == ENDOFTEXT:
            self._state = "done"
        elif state == "header" and text in (END, RETURN, CALL):
            self._set_error(f"{text} inside a message header")
            self._state, self._header = "between", []

    def _open(self, header: _Header, events: list[Event]) -> None:
        self._header = []
        if header.role != "assistant":
            # The model started another participant's turn: nothing after this is its own output.
            self._set_error(f"the model wrote a message as {header.role!r}; output after it ignored")
            self._state = "done"
            return
        self._state, self._body_chars, self._channel = "body", 0, header.channel
        self._opened += 1
        if header.recipient:
            name = header.recipient.removeprefix("functions.")
            call = ToolCall(id=self._new_id(), name=name, arguments="", channel=header.channel,
                            content_type=header.content_type,
                            # gpt-oss's own tools: `python` (code as the message, not JSON), `browser.search/open/find`
                            builtin=header.recipient == "python" or header.recipient.startswith("browser."))
            self.result.tool_calls.append(call)
            self._target = "tool"
            events.append(Event("tool_call", index=len(self.result.tool_calls) - 1, id=call.id, name=name))
        elif header.channel == "analysis":
            self._target = "reasoning"
        else:  # final, commentary preambles (user-visible), or no channel at all
            if header.channel not in ("final", "commentary", None):
                log.debug("harmony: unknown channel %r treated as content", header.channel)
            self._target = "content"

    def _emit(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        res, target = self.result, self._target
        if target == "tool":
            res.tool_calls[-1].arguments += text
            events.append(Event("tool_args", text=text, index=len(res.tool_calls) - 1))
            return
        if self._body_chars == 0 and getattr(res, target):
            text = "\n" + text  # a second analysis/final message: keep it apart from the first
        self._body_chars += len(text)
        setattr(res, target, getattr(res, target) + text)
        events.append(Event(target, text=text))  # type: ignore[arg-type]

    def _close(self, token: str) -> None:
        if self._target == "tool":
            call = self.result.tool_calls[-1]
            if call.builtin and call.name == "python":
                pass  # python's message is code, not JSON
            elif not call.arguments.strip():
                call.arguments = "{}"
            else:
                try:
                    json.loads(call.arguments)
                except json.JSONDecodeError as exc:
                    self._set_error(f"tool call {call.name!r}: arguments are not valid JSON ({exc})")
        self._last_close = token
        self._state = "done" if token == RETURN else "between"

    def _not_harmony(self, events: list[Event]) -> None:
        """Deliver a header that never ended as content, so a broken model still shows its text."""
        self._set_error("the output is not in the harmony format (no <|channel|>...<|message|> header)")
        text = "".join(p for kind, p in self._header if kind == "text")
        self._header, self._state, self._target, self._body_chars, self._channel = [], "body", "content", 0, None
        self._emit(text, events)

    def _set_error(self, message: str) -> None:
        if self.result.error is None:
            self.result.error = message


def parse_completion(text: str, ended_by: Literal["stop", "length"] | None = None,
                     id_factory: Callable[[], str] | None = None) -> ParsedMessage:
    """Parse a whole completion written as harmony markup (text after `<|start|>assistant` in which
    every special-token string is a control token). Generated output: `parse_tokens`."""
    parser = HarmonyStreamParser(id_factory)
    parser.feed(text)
    return parser.finish(ended_by)


def parse_tokens(tokens: Iterable[tuple[int | None, str]], special_tokens: Mapping[int, str],
                 ended_by: Literal["stop", "length"] | None = None,
                 id_factory: Callable[[], str] | None = None) -> ParsedMessage:
    """Parse a whole generated completion from its (token id, text) pairs (see `feed_token`)."""
    parser = HarmonyStreamParser(id_factory, special_tokens)
    for token, text in tokens:
        parser.feed_token(token, text)
    return parser.finish(ended_by)
