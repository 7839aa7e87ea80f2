"""Chat on the engine: a conversation, one assistant turn with its tool loop, and tool commands.

Layered as mlx-lm does: `Engine.generate` streams tokens; `respond` renders the conversation in
harmony, streams parsed deltas (reasoning, content, tool calls), appends the assistant's messages to
the conversation and, given a `ToolRunner`, runs tool calls and generates again until an answer.
The engine keeps the KV cache between calls, so each round only prefills what changed. The terminal
front-ends (`ossgguf run`, `ossgguf chat`) and the server sit on top.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ossgguf import limits
from ossgguf.errors import OssggufError
from ossgguf.harmony.render import (
    REASONING_EFFORTS,
    Event,
    HarmonyStreamParser,
    load_messages_and_tools,
    normalize_messages,
    normalize_tools,
    render,
    render_segments,
    tool_call_problem,
)

from .engine import DEFAULT_MIN_P, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, Engine

log = logging.getLogger(__name__)

MAX_TOOL_ROUNDS = 8  # a model that keeps calling tools is stopped after this many rounds in one turn
TOOL_TIMEOUT = 60.0
TOOL_OUTPUT_CHARS = 32_000  # a tool result longer than this is cut (it all goes into the context)


@dataclass(frozen=True)
class Sampling:
    """Generation options; the defaults are OpenAI's for gpt-oss (temperature 1, top_p 1, no penalty)."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    min_p: float = DEFAULT_MIN_P
    seed: int | None = None
    max_tokens: int | None = None  # per generation round; None: until the context is full

    def __post_init__(self) -> None:  # the CLI and the server check the same limits first
        for name, limit in (("temperature", limits.TEMPERATURE), ("top_p", limits.TOP_P), ("top_k", limits.TOP_K),
                            ("min_p", limits.MIN_P), ("max_tokens", limits.MAX_TOKENS)):
            limit.check(name, getattr(self, name))


@dataclass
class Conversation:
    """OpenAI chat messages plus what the harmony system message needs; `render()` gives the prompt."""

    messages: list[dict] = field(default_factory=list)
    tools: list[dict] = field(default_factory=list)
    reasoning_effort: str = "medium"
    date: str | None = None  # YYYY-MM-DD for the system message; None: today

    def __post_init__(self) -> None:
        self.set_reasoning(self.reasoning_effort)
        self.tools = normalize_tools(self.tools)
        if self.messages:
            normalize_messages(self.messages)  # refuse bad input now, not at the first turn

    def set_reasoning(self, effort: str) -> None:
        if effort not in REASONING_EFFORTS:
            raise OssggufError(f"reasoning effort {effort!r} is not one of {', '.join(REASONING_EFFORTS)}")
        self.reasoning_effort = effort

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def reset(self) -> None:
        """Forget the exchange; keep the leading system/developer instructions."""
        keep = 0
        while keep < len(self.messages) and self.messages[keep]["role"] in ("system", "developer"):
            keep += 1
        del self.messages[keep:]

    def render(self) -> str:
        return render(self.messages, tools=self.tools or None, reasoning_effort=self.reasoning_effort,
                      date=self.date)

    def tokens(self, engine: Engine) -> list[int]:
        """The prompt's ids: message text never becomes a control token (`Engine.tokenize_segments`)."""
        return engine.tokenize_segments(render_segments(self.messages, tools=self.tools or None,
                                                        reasoning_effort=self.reasoning_effort, date=self.date))

    def to_json(self) -> list[dict]:
        """The messages as OpenAI chat messages (what `--messages` reads back)."""
        return json.loads(json.dumps(self.messages))


def load_conversation(messages_path: str | Path | None = None, tools_path: str | Path | None = None,
                      system: str | None = None, reasoning_effort: str = "medium",
                      date: str | None = None) -> Conversation:
    """A conversation from JSON files: messages (a list, or a request body with `messages` and
    `tools`), tools (a list or `{"tools": [...]}`), and a system prompt put first."""
    messages, tools = load_messages_and_tools(messages_path, tools_path)
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    return Conversation(messages=messages, tools=tools or [], reasoning_effort=reasoning_effort, date=date)


# --- tools -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolOutcome:
    content: str  # what goes back to the model as the tool's result
    ok: bool


@dataclass
class ToolRunner:
    """Runs tool calls with one command: the call as JSON on stdin, stdout is the result.

    stdin gets `{"name": ..., "arguments": {...}}`. No shell: the command line is split like a
    shell would (shlex) and run as an argument list. A failure (non-zero exit, timeout) becomes the
    result text the model reads, so the model can react; it never ends the chat.
    """

    argv: list[str]
    timeout: float = TOOL_TIMEOUT
    max_chars: int = TOOL_OUTPUT_CHARS

    def __post_init__(self) -> None:
        limits.TOOL_TIMEOUT.check("the tool timeout", self.timeout)

    @classmethod
    def from_command(cls, command: str, timeout: float = TOOL_TIMEOUT) -> ToolRunner:
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise OssggufError(f"--tool-cmd {command!r} cannot be split into arguments: {exc}") from None
        if not argv:
            raise OssggufError("--tool-cmd is empty: give a command that reads a JSON call on stdin")
        if shutil.which(argv[0]) is None:
            raise OssggufError(f"tool command {argv[0]!r} not found (not executable, or not on PATH)")
        return cls(argv, timeout)

    def __call__(self, name: str, arguments: Any) -> ToolOutcome:
        call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        try:
            proc = subprocess.run(self.argv, input=call, capture_output=True, text=True, timeout=self.timeout,
                                  env={**os.environ, "OSSGGUF_TOOL_NAME": name}, errors="replace")
        except subprocess.TimeoutExpired:
            return ToolOutcome(f"error: the tool {name!r} did not finish within {self.timeout:g} s", False)
        except OSError as exc:
            return ToolOutcome(f"error: the tool {name!r} could not be started: {exc}", False)
        if proc.returncode != 0:
            detail = proc.stderr.strip()[-2000:] or proc.stdout.strip()[-2000:]
            return ToolOutcome(f"error: the tool {name!r} failed (exit status {proc.returncode})"
                               + (f": {detail}" if detail else ""), False)
        out = proc.stdout.rstrip("\n")
        if len(out) > self.max_chars:
            out = out[: self.max_chars] + f"\n[... cut: the tool wrote {len(proc.stdout)} characters]"
        return ToolOutcome(out, True)


# --- one turn ----------------------------------------------------------------------------------------


@dataclass
class ToolResult:
    """A tool call of this turn and what came back (yielded after the call ran)."""

    id: str
    name: str
    arguments: str  # as the model wrote them
    content: str
    ok: bool
    seconds: float = 0.0
    kind: str = "tool_result"


@dataclass
class Reply:
    """The last event of `respond`: the turn's answer, its tool calls, and usage over all rounds."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolResult | dict] = field(default_factory=list)  # dicts: calls left unanswered
    finish_reason: str = "stop"  # stop, length, tool_calls (no runner, or the round limit), cancelled
    errors: list[str] = field(default_factory=list)  # malformed model output, tool loop limit
    rounds: int = 0
    prompt_tokens: int = 0  # summed over rounds (each round's whole prompt, as the API counts)
    cached_tokens: int = 0
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    kind: str = "reply"

    @property
    def prompt_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        return self.completion_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens, "cached_tokens": self.cached_tokens}

    def timings(self) -> dict:
        return {"prompt_seconds": round(self.prompt_seconds, 4), "generation_seconds": round(self.generation_seconds, 4),
                "prompt_tps": round(self.prompt_tps, 2), "generation_tps": round(self.gen_tps, 2)}

    def calls_json(self) -> list[dict]:
        out = []
        for c in self.tool_calls:
            if isinstance(c, ToolResult):
                out.append({"id": c.id, "name": c.name, "arguments": c.arguments, "result": c.content, "ok": c.ok})
            else:
                out.append(dict(c))
        return out


ChatEvent = Event | ToolResult | Reply


def respond(engine: Engine, conv: Conversation, sampling: Sampling = Sampling(),
            tool_runner: ToolRunner | None = None, max_rounds: int = MAX_TOOL_ROUNDS,
            cancel: threading.Event | None = None) -> Iterator[ChatEvent]:
    """Generate the assistant's turn for `conv` (which should end with a user or tool message).

    Yields harmony deltas (`Event`: reasoning, content, tool_call, tool_args) as they stream, a
    `ToolResult` per tool call run, and finally a `Reply`. Appends the assistant message(s) and tool
    results to `conv.messages`. To stop: `engine.cancel()` ends the current round, `cancel.set()`
    keeps the next one from starting (a Ctrl-C handler does both).
    """
    reply = Reply()
    gen_kw = asdict(sampling)
    while True:
        reply.rounds += 1
        parser = HarmonyStreamParser(special_tokens=engine.special_tokens())
        finish = None
        for chunk in engine.generate(conv.tokens(engine), **gen_kw):
            # parsed on ids; a stop chunk's token ends the output (finish() is told), its text is the rest
            yield from parser.feed_token(None if chunk.finish_reason else chunk.token, chunk.text)
            if chunk.finish_reason:
                finish = chunk.finish_reason
                reply.prompt_tokens += chunk.prompt_tokens
                reply.cached_tokens += chunk.cached_tokens
                reply.completion_tokens += chunk.generation_tokens
        yield from parser.flush()
        if finish != "cancelled" or engine.stats.generation_tokens:  # else the prefill never finished
            reply.prompt_seconds += engine.stats.prompt_seconds
        reply.generation_seconds += engine.stats.generation_seconds
        parsed = parser.finish(ended_by=finish if finish in ("stop", "length") else None)
        if parsed.error:
            reply.errors.append(parsed.error)
        if parsed.reasoning:
            reply.reasoning += ("\n" if reply.reasoning else "") + parsed.reasoning
        is_call = finish == "stop" and parsed.tool_calls and parsed.stop_reason != "stop"
        if finish == "cancelled" or not is_call:
            reply.content = parsed.content
            reply.finish_reason = finish or "stop"
            if parsed.content or (finish != "cancelled" and parsed.reasoning):
                msg = {"role": "assistant", "content": parsed.content}
                if parsed.reasoning and finish != "cancelled":
                    msg["reasoning_content"] = parsed.reasoning
                conv.messages.append(msg)
            yield reply
            return
        calls = [{"id": c.id, "type": "function",
                  "function": {"name": c.name, "arguments": c.arguments, **c.header_fields()}}
                 for c in parsed.tool_calls]
        msg = {"role": "assistant", "content": parsed.content or None, "tool_calls": calls}
        if parsed.reasoning:
            msg["reasoning_content"] = parsed.reasoning
        conv.messages.append(msg)
        if tool_runner is None or (cancel is not None and cancel.is_set()):
            reply.tool_calls += [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in parsed.tool_calls]
            reply.content = parsed.content
            reply.finish_reason = "tool_calls" if tool_runner is None else "cancelled"
            yield reply
            return
        names = [t["function"]["name"] for t in normalize_tools(conv.tools)]
        for c in parsed.tool_calls:
            t0 = time.perf_counter()
            if problem := tool_call_problem(c, names):  # answered, not run: the model can try again
                outcome = ToolOutcome(f"error: {problem}", False)
            else:
                outcome = tool_runner(c.name, json.loads(c.arguments))
            result = ToolResult(c.id, c.name, c.arguments, outcome.content, outcome.ok, time.perf_counter() - t0)
            conv.messages.append({"role": "tool", "tool_call_id": c.id, "content": outcome.content})
            reply.tool_calls.append(result)
            yield result
        if cancel is not None and cancel.is_set():
            reply.finish_reason = "cancelled"
            yield reply
            return
        if reply.rounds >= max_rounds:
            reply.errors.append(f"the model called tools in {max_rounds} rounds in a row; stopped there")
            reply.finish_reason = "tool_calls"
            yield reply
            return


def complete(engine: Engine, conv: Conversation, sampling: Sampling = Sampling(),
             tool_runner: ToolRunner | None = None, max_rounds: int = MAX_TOOL_ROUNDS) -> Reply:
    """`respond` without the stream: the final `Reply`."""
    reply = None
    for ev in respond(engine, conv, sampling, tool_runner, max_rounds):
        if isinstance(ev, Reply):
            reply = ev
    assert reply is not None
    return reply
