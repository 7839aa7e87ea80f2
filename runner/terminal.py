"""The terminal front-ends of `ossgguf run` and `ossgguf chat`, over `chat.respond`: `open_chat` sets
one up from the commands' options, `run_once` answers one turn, `chat_loop` is the REPL.

This is the edge: it writes to the streams it is given. The answer goes to `out` (stdout); reasoning
(when shown), tool activity, stats and notices go to `err` (stderr), dimmed on a terminal, so the
answer alone can be piped.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ossgguf.errors import OssggufError
from ossgguf.harmony import DEFAULT_REASONING, REASONING_EFFORTS, Event

from .chat import TOOL_TIMEOUT, Conversation, Reply, ToolResult, ToolRunner, load_conversation, respond
from .engine import Engine
from .generation import Sampling
from .plan import PlacementOptions, Plan
from .tools import BuiltinOptions, BuiltinTools

DIM, RESET = "\x1b[2m", "\x1b[0m"
HELP = """commands:
  /reasoning [low|medium|high]  show or set the reasoning effort
  /reset                        forget the conversation (keeps --system, --tools)
  /save FILE                    write the conversation as OpenAI chat messages (JSON)
  /help                         this help
  /exit                         leave (also Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C while the model answers stops the answer, not the chat."""


def placement_text(p: Plan) -> str:
    """Where the weights live, in a few words."""
    return {"gpu": "weights on the GPU", "cpu": "weights in RAM (CPU)",
            "hybrid": f"experts of {p.n_cpu_moe}/{p.model.n_layer} layers in RAM, the rest on the GPU",
            }.get(p.placement, "placement: does not fit this machine")


def load_line(engine: Engine) -> str:
    p = engine.plan
    return (f"loaded {engine.path.name} in {engine.load_seconds:.1f} s: {placement_text(p)}"
            f"{' (' + p.reason + ')' if p.reason else ''}; context {p.n_ctx} tokens")


def stats_line(reply: Reply, plan: Plan) -> str:
    calls, u = len(reply.tool_calls), reply.usage
    return (f"[{u.completion_tokens} tokens; prompt {u.prompt_tokens - u.cached_tokens} tokens "
            f"at {u.prompt_tps:.1f} tok/s ({u.cached_tokens} cached); generation {u.gen_tps:.1f} tok/s"
            + (f"; {calls} tool call{'s' * (calls != 1)}" if calls else "")
            + f"; {placement_text(plan)}]")


def result_json(reply: Reply, plan: Plan) -> dict:
    """`ossgguf run --json`."""
    u = reply.usage
    return {
        "content": reply.content, "reasoning": reply.reasoning, "tool_calls": reply.calls_json(),
        "finish_reason": reply.finish_reason, "errors": reply.errors, "rounds": reply.rounds,
        "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                  "total_tokens": u.total_tokens, "cached_tokens": u.cached_tokens},
        "timings": {"prompt_seconds": round(u.prompt_seconds, 4), "generation_seconds": round(u.generation_seconds, 4),
                    "prompt_tps": round(u.prompt_tps, 2), "generation_tps": round(u.gen_tps, 2)},
        "placement": {"placement": plan.placement, "n_cpu_moe": plan.n_cpu_moe, "n_ctx": plan.n_ctx,
                      "gpu_bytes": plan.gpu_bytes, "cpu_bytes": plan.cpu_bytes, "fits": plan.fits},
    }


@dataclass
class ChatSetup:
    """What `run` and `chat` work with: the loaded engine (close it, or use `with`), the conversation,
    how to sample and what runs tool calls."""

    engine: Engine
    conv: Conversation
    sampling: Sampling
    tool_runner: ToolRunner | None
    builtin: BuiltinTools | None = None  # --tools-builtin: python, browser (runner/tools)

    def __enter__(self) -> ChatSetup:
        return self

    def __exit__(self, *exc) -> None:
        if self.builtin is not None:
            self.builtin.close()
        self.engine.close()


def open_chat(model: str | Path, options: PlacementOptions | None = None, sampling: Sampling | None = None, *,
              messages_path: str | Path | None = None, tools_path: str | Path | None = None,
              system: str | None = None, reasoning_effort: str = DEFAULT_REASONING, date: str | None = None,
              tool_cmd: str | None = None, tool_timeout: float = TOOL_TIMEOUT, err: TextIO | None = None,
              builtin: BuiltinOptions | None = None) -> ChatSetup:
    """The conversation (from --messages/--tools files and a system prompt), the tool runner, gpt-oss's
    own tools (`builtin`) and the engine, loaded last so that bad input fails fast; the load line goes to `err`."""
    conv = load_conversation(messages_path, tools_path, system, reasoning_effort, date)
    runner = ToolRunner.from_command(tool_cmd, tool_timeout) if tool_cmd else None
    tools = BuiltinTools(builtin) if builtin is not None and builtin.names else None
    if tools is not None:
        conv.builtin_tools = tools.names
    options = options or PlacementOptions()
    if not options.verbose:  # run/chat report malformed model output themselves, once
        logging.getLogger("ossgguf.harmony.parse").setLevel(logging.ERROR)
    try:
        engine = Engine.load(model, options)
    except BaseException:
        if tools is not None:
            tools.close()
        raise
    if err is not None:
        err.write(load_line(engine) + "\n")
        err.flush()
    return ChatSetup(engine, conv, sampling or Sampling(), runner, tools)


@dataclass
class Printer:
    """Streams a turn's events: content to `out`, everything else to `err`."""

    out: TextIO
    err: TextIO
    show_reasoning: bool = False
    _where: str = ""  # the stream the last text went to: "out", "err" or ""

    def _dim(self, text: str) -> str:
        return f"{DIM}{text}{RESET}" if self.err.isatty() else text

    def _put(self, stream: str, text: str) -> None:
        f = self.out if stream == "out" else self.err
        f.write(text)
        f.flush()

    def _write(self, stream: str, text: str) -> None:
        if self._where and self._where != stream:  # start each kind of text on its own line
            self._put(self._where, "\n")
        self._put(stream, text)
        self._where = stream

    def end_line(self) -> None:
        if self._where:
            self._put(self._where, "\n")
        self._where = ""

    def note(self, text: str) -> None:
        self.end_line()
        self.err.write(self._dim(text) + "\n")
        self.err.flush()

    def event(self, ev: Event | ToolResult | Reply) -> None:
        if isinstance(ev, Event):
            if ev.kind == "content":
                self._write("out", ev.text)
            elif ev.kind == "reasoning" and self.show_reasoning:
                self._write("err", self._dim(ev.text))
        elif isinstance(ev, ToolResult):
            shown = ev.content if len(ev.content) <= 200 else ev.content[:200] + "..."
            self.note(f"[tool] {ev.name}({ev.arguments}) -> {shown}")
        elif isinstance(ev, Reply):
            self.end_line()
            for c in ev.tool_calls:
                if isinstance(c, dict):
                    self.note(f"[tool call, not run] {c['name']}({c['arguments']})")
            for e in ev.errors:
                self.note(f"warning: {e}")


class _Interrupt:
    """While active, Ctrl-C (SIGINT) stops the answer (engine.cancel) instead of the program."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.cancel, self._old = engine, threading.Event(), None

    def __enter__(self) -> _Interrupt:
        self.cancel.clear()
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.cancel.set()
        self.engine.cancel()

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _respond(chat: ChatSetup) -> Iterator[Event | ToolResult | Reply]:
    """`respond` on the setup's conversation, Ctrl-C stopping the answer."""
    with _Interrupt(chat.engine) as intr:
        yield from respond(chat.engine, chat.conv, chat.sampling, chat.tool_runner, cancel=intr.cancel,
                           builtin=chat.builtin)


def run_once(chat: ChatSetup, out: TextIO, err: TextIO, show_reasoning: bool = False, as_json: bool = False) -> Reply:
    """One turn: stream the answer (or print `result_json` at the end with `as_json`)."""
    printer = Printer(out, err, show_reasoning)
    reply = None
    for ev in _respond(chat):
        if isinstance(ev, Reply):
            reply = ev
        if not as_json:
            printer.event(ev)
    assert reply is not None
    if as_json:
        out.write(json.dumps(result_json(reply, chat.engine.plan), indent=1, ensure_ascii=False) + "\n")
        return reply
    for c in reply.tool_calls:
        if isinstance(c, dict):  # a call nobody ran: print it where a script can pick it up
            out.write(json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False) + "\n")
    _after(reply, printer, chat.tool_runner, chat.engine.plan)
    return reply


def _after(reply: Reply, printer: Printer, tool_runner: ToolRunner | None, plan: Plan) -> None:
    if reply.finish_reason == "tool_calls" and tool_runner is None:
        printer.note("the model called a tool: pass --tool-cmd CMD to run it and continue")
    elif reply.finish_reason == "cancelled":
        printer.note("[stopped]")
    elif reply.finish_reason == "length":
        printer.note("[stopped at the token limit]")
    printer.note(stats_line(reply, plan))


def _lines(stdin: TextIO, interactive: bool, prompt: str) -> Iterator[str]:
    """User lines until EOF; on a terminal with line editing (readline) and a prompt."""
    if not interactive:
        for line in stdin:
            yield line.rstrip("\n")
        return
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    while True:
        try:
            yield input(prompt)
        except (EOFError, KeyboardInterrupt):
            print()
            return


def chat_loop(chat: ChatSetup, stdin: TextIO, out: TextIO, err: TextIO, show_reasoning: bool = False) -> int:
    """The REPL. Piped stdin: one message per line, no prompt. A conversation that ends with a
    user (or tool) message, from --messages, is answered first.

    An error is shown and the chat goes on; returns how many messages or commands failed, so that a
    piped run can report failure in its exit status."""
    engine, conv, tool_runner = chat.engine, chat.conv, chat.tool_runner
    interactive = stdin.isatty()
    failed = 0
    printer = Printer(out, err, show_reasoning)
    if interactive:
        printer.note("type a message; /help for commands, Ctrl-C stops an answer, Ctrl-D leaves")
    pending = bool(conv.messages) and conv.messages[-1]["role"] in ("user", "tool")
    lines = _lines(stdin, interactive, ">>> ")
    while True:
        if pending:
            pending = False
        else:
            line = next(lines, None)
            if line is None:
                return failed
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                try:
                    if not _command(text, conv, engine, printer, chat.builtin):
                        return failed
                except OssggufError as e:
                    printer.note(f"error: {e}")
                    failed += 1
                continue
            conv.add_user(line)
        try:
            for ev in _respond(chat):
                printer.event(ev)
                if isinstance(ev, Reply):
                    _after(ev, printer, tool_runner, engine.plan)
        except OssggufError as e:
            printer.note(f"error: {e}")
            failed += 1
            if conv.messages and conv.messages[-1]["role"] == "user":
                conv.messages.pop()  # the message was not answered: let the user /reset or retry


def _command(text: str, conv: Conversation, engine: Engine, printer: Printer,
             builtin: BuiltinTools | None = None) -> bool:
    """Run a /command; False to leave the chat."""
    cmd, _, arg = text.partition(" ")
    arg = arg.strip()
    if cmd in ("/exit", "/quit", "/bye"):
        return False
    if cmd == "/help":
        printer.note(HELP)
    elif cmd == "/reset":
        conv.reset()
        engine.reset()
        if builtin is not None:
            builtin.reset()  # the python kernel's state and the browser's pages go with the conversation
        printer.note("conversation cleared")
    elif cmd == "/reasoning":
        if arg:
            if arg not in REASONING_EFFORTS:
                printer.note(f"reasoning effort is one of {', '.join(REASONING_EFFORTS)}")
                return True
            conv.set_reasoning(arg)
        printer.note(f"reasoning: {conv.reasoning_effort}")
    elif cmd == "/save":
        if not arg:
            printer.note("usage: /save FILE")
            return True
        try:
            Path(arg).write_text(json.dumps(conv.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            printer.note(f"saved {len(conv.messages)} messages to {arg}")
        except OSError as e:
            raise OssggufError(f"cannot write {arg}: {e.strerror or e}") from None
    else:
        printer.note(f"unknown command {cmd}; /help lists them")
    return True
