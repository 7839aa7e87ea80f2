"""gpt-oss's own tools in the server (`ossgguf serve --tools-builtin python,browser`; runner/tools).

A request that asks for them (Responses: a `code_interpreter` tool is python, `web_search` /
`web_search_preview` is browser; Chat Completions: every request, or the ones its
`chat_template_kwargs.builtin_tools` names) is answered in rounds (`Rounds`): the worker generates a
turn; when it ends in calls to those tools, they run here, off the event loop and off the model's
worker (which serves other requests meanwhile); the call and its result join the conversation as
harmony wants them (as `chat.respond` does for `ossgguf chat`), and the worker generates again,
until an answer, a function call for the client, the request's token budget or MAX_ROUNDS.

**Conversations.** What a conversation keeps (the python kernel's variables, the browser's page
stack that citations point into) lives in a `Session`, named as OpenAI names containers (`cntr_…`,
the `container_id` of `code_interpreter_call` items). A Responses request uses, in this order: the
container id its `code_interpreter` tool names; the newest one in its conversation (a
`code_interpreter_call` item in `input`, which clients that resend the whole history send back, or
any built-in call of the `previous_response_id` chain); else a new one. A Chat Completions request
has no conversation id: its session lives as long as the request. The sessions, bounded in number
and idle time: tool_sessions.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ossgguf.harmony import Event, assistant_message
from ossgguf.harmony.parse import ToolCall
from ossgguf.runner.generation import Usage
from ossgguf.runner.server.errors import invalid
from ossgguf.runner.server.params import Turn, new_id
from ossgguf.runner.server.tool_sessions import Session
from ossgguf.runner.turn import TurnEnd

log = logging.getLogger(__name__)

# Responses API hosted tool types -> gpt-oss's tool (the dated names are the openai client's aliases)
HOSTED = {"web_search": "browser", "web_search_2025_08_26": "browser", "web_search_preview": "browser",
          "web_search_preview_2025_03_11": "browser", "code_interpreter": "python"}
MAX_ROUNDS = 24  # tool rounds in one request: browsing takes more than chat's 8
PRIVATE = "_harmony"  # stored items only (previous_response_id): the call and result as rendered
CONTAINER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_builtin(name: str, names: Collection[str]) -> bool:
    """`name` (a call's recipient) is one of the tools in `names` (python, browser)."""
    return (name == "python" and "python" in names) or (name.startswith("browser.") and "browser" in names)


# -- what a request asks for ---------------------------------------------------------------------
def hosted_tool(tool: dict, k: int, enabled: Collection[str]) -> str | None:
    """The built-in tool a Responses hosted tool maps to, when this server runs it; else None, with
    the warning agents that list hosted tools get (they keep working without it)."""
    name = HOSTED.get(tool.get("type"))
    if name is not None and name in enabled:
        return name
    hint = f" (start the server with --tools-builtin {name} to run it)" if name else ""
    log.warning("tools[%d] of type %r left out: this server runs function tools only%s", k, tool.get("type"), hint)
    return None


def requested(value: Any, enabled: Collection[str]) -> tuple[list[str], str | None]:
    """The built-in tools a Responses request's `tools` asks for that this server runs, and the
    container id its code_interpreter names (None: auto)."""
    names, container = [], None
    for k, tool in enumerate(value if isinstance(value, list) else []):
        if not isinstance(tool, dict) or HOSTED.get(tool.get("type")) not in enabled:
            continue
        names.append(HOSTED[tool["type"]])
        spec = tool.get("container")
        if isinstance(spec, str) and spec != "auto":
            if not CONTAINER_ID.fullmatch(spec):
                raise invalid(f"'tools[{k}].container' is not a container id this server made (cntr_...).",
                              f"tools[{k}].container")
            container = spec
    return [n for n in ("python", "browser") if n in names], container


def conversation_key(items: Iterable) -> str | None:
    """The newest session id in a conversation's items: a code_interpreter_call's container_id, or
    the one a stored built-in call kept."""
    for item in reversed(list(items)):
        if not isinstance(item, dict):
            continue
        kept = item.get(PRIVATE)
        key = kept.get("session") if isinstance(kept, dict) else item.get("container_id")
        if item.get("type") in ("code_interpreter_call", "web_search_call") and isinstance(key, str) \
                and CONTAINER_ID.fullmatch(key):
            return key
    return None


def history(item: dict) -> tuple[dict, str] | None:
    """A built-in call item of the conversation as harmony history: the assistant's call (chat form,
    with its harmony header) and the tool's result. An item this server ran keeps both as rendered
    (`ResponseStore.recall`); otherwise a code_interpreter_call has python's code and logs, and a
    web_search_call has no page text and is left out (harmony drops a finished turn's analysis anyway)."""
    kept = item.get(PRIVATE)
    if isinstance(kept, dict) and isinstance(kept.get("call"), dict):
        return kept["call"], str(kept.get("output", ""))
    if item.get("type") == "code_interpreter_call" and isinstance(item.get("code"), str):
        logs = [o.get("logs", "") for o in item.get("outputs") or [] if isinstance(o, dict) and o.get("type") == "logs"]
        call = {"id": str(item.get("id") or new_id("ci")), "type": "function",
                "function": {"name": "python", "arguments": item["code"], "channel": "analysis",
                             "content_type": "code", "recipient": "python"}}
        return call, "\n".join(logs)
    return None


# -- one request's rounds ------------------------------------------------------------------------
@dataclass
class ToolStarted:
    """A built-in call about to run (its arguments complete)."""

    call: ToolCall
    action: dict | None = None  # browser: the web_search_call action (search, open_page, find_in_page)


@dataclass
class ToolFinished:
    call: ToolCall
    output: str  # what the model reads back
    ok: bool
    sources: list[str] = field(default_factory=list)  # browser.search: the result URLs
    page: Any = None  # browser: the page the call put on the stack (runner.tools.browser.Page)


@dataclass
class Hosted:
    """What a Responses builder needs to write built-in call items: the tools, the session, citations."""

    names: list[str]
    container: str | None
    cite: Callable[[str], list[dict]] | None = None  # answer text -> url_citation annotations
    remember: Callable[[str, dict], None] | None = None  # item id, the call and result as rendered


def web_action(browser, call: ToolCall) -> dict:
    """The web_search_call `action` of a browser call, from its arguments and the page stack."""
    fn = call.name.removeprefix("browser.")
    try:
        args = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        args = {}
    args = args if isinstance(args, dict) else {}
    if fn == "search":
        return {"type": "search", "query": str(args.get("query", ""))}
    stack, cursor = browser.stack, args.get("cursor", -1)
    page = stack[cursor] if stack and isinstance(cursor, int) and -1 <= cursor < len(stack) else None
    if fn == "open":
        link = args.get("id", -1)
        if isinstance(link, str):
            url = link
        elif page is not None and isinstance(link, int) and link >= 0:
            url = page.urls.get(str(link))
        else:
            url = page.url if page is not None else None
        return {"type": "open_page", "url": url or None}
    return {"type": "find_in_page", "pattern": str(args.get("pattern", "")), "url": page.url if page else ""}


class Rounds:
    """One request's turn, generated in rounds with the built-in tools run between them. `cancel()`
    is a worker Job's (app._JobStream calls it however the response ends); `events()` yields the
    harmony events, `ToolStarted` / `ToolFinished` per built-in call, then one `TurnEnd` whose usage
    adds up the rounds."""

    def __init__(self, state, turn: Turn, model: str, names: list[str], session: Session | None,
                 per_request: bool) -> None:
        self.state, self.turn, self.model, self.names = state, turn, model, names
        self.session, self.per_request = session, per_request
        self.job = None
        self._cancelled = False
        self._released = session is None

    @classmethod
    async def start(cls, state, turn: Turn, model: str, names: Iterable[str] = (), key: str | None = None,
                    per_request: bool = False) -> Rounds:
        """Queue the first round. `names`: the built-in tools the request asks for (those the server
        runs are kept); `key`: its conversation's session (None: a new one); `per_request`: the
        session ends with the request (Chat Completions)."""
        tools = getattr(state, "tools", None)
        names = [n for n in names if tools is not None and n in tools.names]
        turn.builtin_tools = names
        session = await asyncio.to_thread(tools.acquire, key) if names else None
        rounds = cls(state, turn, model, names, session, per_request)
        try:
            rounds.job = state.worker.submit(await state.prepare(turn, model))
        except BaseException:
            rounds.release()
            raise
        return rounds

    @property
    def hosted(self) -> Hosted:
        browser = self.session.tools.browser if self.session and "browser" in self.names else None
        return Hosted(self.names, self.session.key if self.session else None,
                      browser.citations if browser is not None else None, self.state.store.remember_call)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.state.tools.release(self.session, close=self.per_request)

    def cancel(self) -> None:
        self._cancelled = True
        if self.job is not None:
            self.job.cancel()
        self.release()

    async def events(self, is_disconnected: Callable[[], Any] | None = None) -> AsyncIterator:
        usage, budget = Usage(), self.turn.params.max_tokens
        try:
            for n in range(1, MAX_ROUNDS + 1):
                end = None
                async for item in self.job.events(is_disconnected):
                    if isinstance(item, TurnEnd):
                        end = item
                    else:
                        yield item
                if end is None:
                    return
                usage = usage + end.usage
                calls = end.message.tool_calls
                if end.finish_reason != "tool_calls" or not calls or not all(is_builtin(c.name, self.names)
                                                                            for c in calls):
                    yield replace(end, usage=usage)
                    return
                left = None if budget is None else budget - usage.completion_tokens
                if n == MAX_ROUNDS or (left is not None and left <= 0) or self._cancelled:
                    if n == MAX_ROUNDS:
                        log.warning("the model called built-in tools in %d rounds in a row; stopped there", n)
                    yield replace(end, usage=usage, finish_reason="cancelled" if self._cancelled else "length",
                                  message=replace(end.message, tool_calls=[]))
                    return
                self.turn.messages.append(assistant_message(end.message, headers=True))
                for call in calls:
                    browser = self.session.tools.browser
                    action = web_action(browser, call) if call.name.startswith("browser.") else None
                    yield ToolStarted(call, action)
                    text, ok = await asyncio.to_thread(self.session.run, call)
                    page = browser.stack[-1] if action is not None and ok and browser.stack else None
                    sources = list(dict.fromkeys(page.urls.values())) if call.name == "browser.search" and page else []
                    yield ToolFinished(call, text, ok, sources, page)
                    self.turn.messages.append({"role": "tool", "tool_call_id": call.id, "content": text})
                if self._cancelled:
                    return
                self.turn.prefill = ""  # a forced call (tool_choice) was the first round's
                self.turn.params = replace(self.turn.params, max_tokens=left)
                self.job = self.state.worker.submit(await self.state.prepare(self.turn, self.model))
        finally:
            self.release()


async def reasoning_view(events: AsyncIterator, names: Collection[str]) -> AsyncIterator:
    """For Chat Completions: each built-in call and its result as reasoning text (`[python call]`,
    the code, `[python result]`, the output), so clients show them as the model's thinking; the
    final message's reasoning is then all of it, rounds and tools."""
    said: list[str] = []
    ran, open_calls = False, set()

    def text(t: str) -> Event:
        said.append(t)
        return Event("reasoning", t)

    async for item in events:
        if isinstance(item, Event):
            if item.kind == "tool_call" and is_builtin(item.name, names):
                open_calls.add(item.index)
                yield text(("\n\n" if said and not said[-1].endswith("\n") else "\n" if said else "")
                           + f"[{item.name} call]\n")
                continue
            if item.kind == "tool_args" and item.index in open_calls:
                yield text(item.text)
                continue
            if item.kind == "reasoning":
                said.append(item.text)
            yield item
        elif isinstance(item, ToolFinished):
            ran = True
            open_calls.clear()
            yield text(f"\n[{item.call.name} result]\n{item.output}\n\n")
        elif isinstance(item, TurnEnd):
            if ran:
                item = replace(item, message=replace(item.message, reasoning="".join(said).strip("\n")))
            yield item


def chat_names(body: dict, enabled: Collection[str]) -> list[str]:
    """Chat Completions: every built-in tool the server runs, or those `chat_template_kwargs.builtin_tools`
    names (the official template's keyword; [] turns them off)."""
    kw = body.get("chat_template_kwargs")
    asked = kw.get("builtin_tools") if isinstance(kw, dict) else None
    if asked is None:
        return list(enabled)
    if not isinstance(asked, list) or not all(isinstance(n, str) for n in asked):
        raise invalid("'chat_template_kwargs.builtin_tools' must be a list of tool names (python, browser).",
                      "chat_template_kwargs.builtin_tools")
    for n in [n for n in asked if n not in enabled]:
        log.warning("chat_template_kwargs.builtin_tools: %r left out: this server does not run it "
                    "(--tools-builtin)", n)
    return [n for n in enabled if n in asked]
