"""gpt-oss's own tools behind Anthropic's server tools (`/v1/messages` on a server started with
`--tools-builtin`; the tools run in builtin.py's rounds, as for the OpenAI endpoints).

A request's `tools` entry of type `web_search_*` or `web_fetch_*` turns on the browser, one of type
`code_execution_*` python (when the server runs them; otherwise they are left out with a warning, as
before). The model's calls come back in the shapes of the anthropic client's types:

- python: a `server_tool_use` block named `code_execution` (`input: {"code"}`), then a
  `code_execution_tool_result` with the output as `stdout` (a failed call's text as `stderr`,
  `return_code` 1);
- browser.search: `server_tool_use` `web_search` (`input: {"query"}`), then a `web_search_tool_result`
  listing the result pages (`url`, `title`; `encrypted_content` is empty: there is nothing to hide);
- browser.open / browser.find: `server_tool_use` `web_fetch` (`input: {"url"}`, plus `pattern` for a
  find), then a `web_fetch_tool_result` whose document holds the text the model read.

The python kernel and the browser's pages live in a session whose id is the response's `container`
(`{"id", "expires_at"}`); a request naming it in `container` goes on with the same state. Server tool
blocks a client sends back in an assistant message are left out of the prompt (harmony drops a
finished turn's tool calls anyway); the `【cursor†Lx-Ly】` citations stay in the text as the model
wrote them. `allowed_domains`, `blocked_domains`, `user_location` and `max_uses` are not applied
(the local index and the server's own URL rules decide), with a warning.
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import UTC, datetime
from typing import Any

from ossgguf.runner.server.builtin import ToolFinished, ToolStarted, is_builtin

log = logging.getLogger(__name__)

SERVER_TOOLS = {"web_search": "browser", "web_fetch": "browser", "code_execution": "python"}
RESULT_BLOCKS = ("server_tool_use", "web_search_tool_result", "web_fetch_tool_result", "code_execution_tool_result",
                 "bash_code_execution_tool_result", "text_editor_code_execution_tool_result")
_DATED = re.compile(r"(?P<base>[a-z_]+)_\d{8}")
_LINK = re.compile(r"【(\d+)†([^†】]*)")


def server_base(tool_type: Any) -> str | None:
    """`web_search` of `web_search_20250305` (a server tool this module maps), else None."""
    m = _DATED.fullmatch(tool_type) if isinstance(tool_type, str) else None
    return m["base"] if m and m["base"] in SERVER_TOOLS else None


def server_tool(tool_type: Any) -> str | None:
    """The built-in tool an Anthropic server tool type (`web_search_20250305`, ...) maps to, or None."""
    return SERVER_TOOLS.get(server_base(tool_type))


def _input(ev: ToolStarted) -> tuple[str, dict]:
    """(name, input) of a server_tool_use block for a built-in call about to run."""
    if ev.call.name == "python":
        return "code_execution", {"code": ev.call.arguments}
    action = ev.action or {}
    if action.get("type") == "search":
        return "web_search", {"query": action.get("query", "")}
    found = {"pattern": action["pattern"]} if action.get("type") == "find_in_page" else {}
    return "web_fetch", {"url": action.get("url") or "", **found}


def _result(name: str, use_id: str, ev: ToolFinished) -> dict:
    """The result block of a built-in call that ran."""
    if name == "code_execution":
        content = {"type": "code_execution_result", "stdout": ev.output if ev.ok else "",
                   "stderr": "" if ev.ok else ev.output, "return_code": 0 if ev.ok else 1, "content": []}
    elif not ev.ok or ev.page is None:
        content = {"type": f"{name}_tool_result_error", "error_code": "unavailable"}
    elif name == "web_search":
        titles = dict(_LINK.findall(ev.page.text))
        content = [{"type": "web_search_result", "url": url, "title": titles.get(link, url), "encrypted_content": "",
                    "page_age": None} for link, url in ev.page.urls.items()]
    else:
        content = {"type": "web_fetch_result", "url": ev.page.url, "retrieved_at": _now(),
                   "content": {"type": "document", "title": ev.page.title,
                               "source": {"type": "text", "media_type": "text/plain", "data": ev.output}}}
    return {"type": f"{name}_tool_result", "tool_use_id": use_id, "content": content}


def _now(later: float = 0.0) -> str:
    return datetime.fromtimestamp(time.time() + later, UTC).isoformat().replace("+00:00", "Z")


class ServerToolBlocks:
    """Mixed into `anthropic_out.MessageBuilder` (which has `blocks`, `_begin`, `_close`): built-in calls
    as server tool blocks. `init_server_tools(names, container, idle_seconds)` first."""

    def init_server_tools(self, names: list[str], container: str | None, idle_seconds: float) -> None:
        self.server_names, self.container = names, container
        self.idle_seconds = idle_seconds
        self._hidden: set[int] = set()  # this round's event indexes of built-in calls
        self._uses: dict[str, tuple[str, str]] = {}  # call id -> (server tool name, block id)
        self.searches = self.fetches = 0

    def is_server_tool(self, ev: Any) -> bool:
        if isinstance(ev, ToolStarted | ToolFinished):
            return True
        if not self.server_names or getattr(ev, "kind", None) not in ("tool_call", "tool_args"):
            return False
        if ev.kind == "tool_call":
            self._hidden.discard(ev.index)  # indexes count from 0 again each round
            if is_builtin(ev.name, self.server_names):
                self._hidden.add(ev.index)
        return ev.index in self._hidden

    def feed_server_tool(self, ev: Any) -> list[dict]:
        if isinstance(ev, ToolStarted):
            name, args = _input(ev)
            use_id = "srvtoolu_" + ev.call.id.removeprefix("call_")
            self._uses[ev.call.id] = name, use_id
            self.searches += name == "web_search"
            self.fetches += name == "web_fetch"
            out = self._begin({"type": "server_tool_use", "id": use_id, "name": name, "input": {}})
            self.blocks[-1]["input"] = args
            out.append({"type": "content_block_delta", "index": len(self.blocks) - 1,
                        "delta": {"type": "input_json_delta", "partial_json": json.dumps(args)}})
            return out + self._close()
        if isinstance(ev, ToolFinished):
            self._hidden.clear()
            name, use_id = self._uses[ev.call.id]
            return self._begin(_result(name, use_id, ev)) + self._close()
        return self._close() if ev.kind == "tool_call" else []  # the call's text is its server_tool_use

    def server_fields(self) -> dict:
        """The message's `container` (when a session ran the tools)."""
        if self.container is None or not self._uses:
            return {}
        return {"container": {"id": self.container, "expires_at": _now(self.idle_seconds)}}

    def server_usage(self) -> dict:
        used = {"web_search_requests": self.searches, "web_fetch_requests": self.fetches}
        return {"server_tool_use": used} if self.searches or self.fetches else {}
