"""One generation read as an assistant turn: the engine's chunks in, harmony events out, then a `TurnEnd`.

The one driver over the harmony parser: `chat.respond` runs it once per round of its tool loop,
the server on its worker thread for every request. The prompt is rendered before (harmony's
`render_segments`, tokenized by `Engine.tokenize_segments`); what the turn does with tool calls is
the caller's (the policy on malformed ones: `harmony.tool_call_problem`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ossgguf.harmony import Event, HarmonyStreamParser, ParsedMessage

from .generation import Usage

if TYPE_CHECKING:
    from .engine import GenerationChunk


@dataclass
class TurnEnd:
    """The end of a turn. `message.content` is what was delivered (cut at a stop string)."""

    message: ParsedMessage
    finish_reason: str  # OpenAI's stop, length or tool_calls; cancelled when the engine was stopped
    usage: Usage
    stop_sequence: str | None = None  # the stop string that ended the turn (Anthropic reports which)


class StopMatcher:
    """OpenAI's `stop` strings on the answer text: holds back what may begin a stop string."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.hit = False
        self.matched: str | None = None

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        buf = self._held + text
        found = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda f: f[0])
            self.hit, self._held = True, ""
            return buf[:cut]
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1))
                    if buf.endswith(s[:k])), default=0)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def finish_reason(parsed: ParsedMessage, ended_by: str | None, stopped: bool) -> str:
    """The turn's finish reason in OpenAI's terms, from the parser's and the engine's (`ended_by`).
    Output that is not clean harmony ends as `stop`, or `tool_calls` where it holds calls: a malformed
    call goes out as written (`harmony.tool_call_problem`)."""
    if stopped:
        return "stop"
    if ended_by == "cancelled":
        return "cancelled"
    if parsed.stop_reason == "error" and ended_by == "length":
        return "length"
    if parsed.stop_reason in ("error", "tool_calls"):
        return "tool_calls" if parsed.tool_calls else "stop"
    return parsed.stop_reason


def run_turn(chunks: Iterable[GenerationChunk], special_tokens: Mapping[int, str] | None, prefill: str = "",
             stop: Iterable[str] = ()) -> Iterator[Event | TurnEnd]:
    """Parse a generation as it streams: harmony `Event`s, then one `TurnEnd`.

    Output is parsed on token ids, `special_tokens` (`Engine.special_tokens()`) telling the control
    tokens; None (a scripted model without a vocabulary): chunk texts are read as harmony markup.
    `prefill` is the start of the answer that the prompt already holds (a forced tool call): the
    parser reads it first. A `stop` string ends the turn there; the generation is closed then, and
    when the caller stops reading.
    """
    parser = HarmonyStreamParser(special_tokens=special_tokens)
    matcher = StopMatcher(stop)
    usage, reasoning_chunks = Usage(), 0
    content: list[str] = []
    ended_by: str | None = None

    def deliver(events: list[Event]) -> list[Event]:
        out = []
        for ev in events:
            if ev.kind != "content":
                if held := matcher.flush():
                    content.append(held)
                    out.append(Event("content", text=held))
                out.append(ev)
            elif text := matcher.push(ev.text):
                content.append(text)
                out.append(Event("content", text=text))
        return out

    yield from deliver(parser.feed(prefill) if prefill else [])
    stream = iter(chunks)
    try:
        for chunk in stream:
            usage = chunk.usage
            if chunk.finish_reason is not None:
                ended_by = chunk.finish_reason
            if chunk.text:
                # a stop chunk's token ends the output (finish() is told), its text is the rest
                events = deliver(parser.feed(chunk.text) if special_tokens is None else
                                 parser.feed_token(None if chunk.finish_reason else chunk.token, chunk.text))
                reasoning_chunks += any(e.kind == "reasoning" for e in events)
                yield from events
            if matcher.hit:
                break
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # frees the engine's sampler now, not at garbage collection
    yield from deliver(parser.flush())
    if not matcher.hit and (held := matcher.flush()):
        content.append(held)
        yield Event("content", text=held)
    parsed = parser.finish(ended_by if ended_by in ("stop", "length") else None)
    parsed.content = "".join(content)
    yield TurnEnd(parsed, finish_reason(parsed, ended_by, matcher.hit), replace(usage, reasoning_tokens=reasoning_chunks),
                  matcher.matched)
