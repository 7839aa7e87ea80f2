"""Chat on the engine: a conversation, one assistant turn with its tool loop, and tool commands.

Layered as mlx-lm does: `Engine.generate` streams tokens; `respond` renders the conversation in
harmony, streams parsed deltas (reasoning, content, tool calls; `turn.run_turn`), appends the
assistant's messages to the conversation and, given a `ToolRunner`, runs tool calls and generates
again until an answer. The engine keeps the KV cache between calls, so each round only prefills what
changed. The terminal front-ends (`ossgguf run`, `ossgguf chat`: terminal.py) sit on top.
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
from dataclasses import dataclass, field
from itertools import takewhile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ossgguf import limits
from ossgguf.errors import OssggufError
from ossgguf.harmony import (
    DEFAULT_REASONING,
    REASONING_EFFORTS,
    Event,
    ParsedMessage,
    assistant_message,
    load_messages_and_tools,
    normalize_messages,
    normalize_tools,
    render,
    render_segments,
    tool_call_problem,
)

from .generation import Sampling, Usage
from .turn import TurnEnd, run_turn

if TYPE_CHECKING:
    from .engine import Engine
    from .tools import BuiltinTools

log = logging.getLogger(__name__)

MAX_TOOL_ROUNDS = 8  # a model that keeps calling tools is stopped after this many rounds in one turn
TOOL_TIMEOUT = 60.0
TOOL_OUTPUT_CHARS = 32_000  # a tool result longer than this is cut (it all goes into the context)


@dataclass
class Conversation:
    """OpenAI chat messages plus what the harmony system message needs; `render()` gives the prompt."""

    messages: list[dict] = field(default_factory=list)
    tools: list[dict] = field(default_factory=list)
    reasoning_effort: str = DEFAULT_REASONING
    date: str | None = None  # YYYY-MM-DD for the system message; None: today
    builtin_tools: list[str] = field(default_factory=list)  # gpt-oss's own tools described: python, browser

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
        keep = list(takewhile(lambda m: m["role"] in ("system", "developer"), self.messages))
        del self.messages[len(keep):]

    def render(self) -> str:
        return render(self.messages, tools=self.tools or None, reasoning_effort=self.reasoning_effort,
                      date=self.date, builtin_tools=self.builtin_tools or None)

    def tokens(self, engine: Engine) -> list[int]:
        """The prompt's ids: message text never becomes a control token (`Engine.tokenize_segments`)."""
        return engine.tokenize_segments(render_segments(self.messages, tools=self.tools or None,
                                                        reasoning_effort=self.reasoning_effort, date=self.date,
                                                        builtin_tools=self.builtin_tools or None))

    def to_json(self) -> list[dict]:
        """The messages as OpenAI chat messages (what `--messages` reads back)."""
        return json.loads(json.dumps(self.messages))


def load_conversation(messages_path: str | Path | None = None, tools_path: str | Path | None = None,
                      system: str | None = None, reasoning_effort: str = DEFAULT_REASONING,
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
    usage: Usage = field(default_factory=Usage)  # each round's whole prompt counted, as the API counts
    kind: str = "reply"

    def calls_json(self) -> list[dict]:
        return [{"id": c.id, "name": c.name, "arguments": c.arguments, "result": c.content, "ok": c.ok}
                if isinstance(c, ToolResult) else dict(c) for c in self.tool_calls]


ChatEvent = Event | ToolResult | Reply


def respond(engine: Engine, conv: Conversation, sampling: Sampling | None = None,
            tool_runner: ToolRunner | None = None, max_rounds: int = MAX_TOOL_ROUNDS,
            cancel: threading.Event | None = None, builtin: BuiltinTools | None = None) -> Iterator[ChatEvent]:
    """Generate the assistant's turn for `conv` (which should end with a user or tool message).

    Yields harmony deltas (`Event`: reasoning, content, tool_call, tool_args) as they stream, a
    `ToolResult` per tool call run, and finally a `Reply`. Appends the assistant message(s) and tool
    results to `conv.messages`. To stop: `engine.cancel()` ends the current round, `cancel.set()`
    keeps the next one from starting (a Ctrl-C handler does both).
    """
    reply = Reply()
    while True:
        reply.rounds += 1
        for item in run_turn(engine.generate(conv.tokens(engine), sampling), engine.special_tokens()):
            if isinstance(item, TurnEnd):
                end = item
            else:
                yield item
        parsed, reply.usage = end.message, reply.usage + end.usage
        if parsed.error:
            reply.errors.append(parsed.error)
        if parsed.reasoning:
            reply.reasoning += ("\n" if reply.reasoning else "") + parsed.reasoning
        reply.finish_reason = end.finish_reason
        if end.finish_reason != "tool_calls":
            reply.content = parsed.content
            # a cancelled answer stays in the history without its reasoning
            said = ParsedMessage(reasoning=parsed.reasoning if end.finish_reason != "cancelled" else "",
                                 content=parsed.content)
            if said.content or said.reasoning:
                conv.messages.append(assistant_message(said))
            yield reply
            return
        conv.messages.append(assistant_message(parsed, headers=True))
        # gpt-oss's own tools (`builtin`, runner/tools) run here even without a tool command
        runnable = tool_runner is not None or (builtin is not None and all(map(builtin.handles, parsed.tool_calls)))
        if not runnable or (cancel is not None and cancel.is_set()):
            reply.tool_calls += [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in parsed.tool_calls]
            reply.content = parsed.content
            reply.finish_reason = "tool_calls" if not runnable else "cancelled"
            yield reply
            return
        names = [t["function"]["name"] for t in normalize_tools(conv.tools)]
        for c in parsed.tool_calls:
            t0 = time.perf_counter()
            if builtin is not None and builtin.handles(c):
                outcome = ToolOutcome(*builtin.run(c))
            elif problem := tool_call_problem(c, names):  # answered, not run: the model can try again
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
            yield reply
            return


def complete(engine: Engine, conv: Conversation, sampling: Sampling | None = None,
             tool_runner: ToolRunner | None = None, max_rounds: int = MAX_TOOL_ROUNDS,
             builtin: BuiltinTools | None = None) -> Reply:
    """`respond` without the stream: the final `Reply`."""
    reply = None
    for ev in respond(engine, conv, sampling, tool_runner, max_rounds, builtin=builtin):
        if isinstance(ev, Reply):
            reply = ev
    assert reply is not None
    return reply
