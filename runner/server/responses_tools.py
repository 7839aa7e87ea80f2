"""Responses API output for gpt-oss's own tools (runner/server/builtin.py), in OpenAI's shapes (the
openai client's types `ResponseCodeInterpreterToolCall`, `ResponseFunctionWebSearch` and their events):

- python: a `code_interpreter_call` item (`code`, `outputs: [{"type": "logs", "logs"}]`,
  `container_id`: the conversation's session), opened when the model starts the call, its code streamed
  (`response.code_interpreter_call_code.delta`/`.done`), then `.in_progress`, `.interpreting`,
  `.completed`;
- browser: a `web_search_call` item with its `action` (`search` with the result URLs as `sources`,
  `open_page`, `find_in_page`), opened when the call runs (its arguments complete): `.in_progress`,
  `.searching`, `.completed`;
- the answer's `【cursor†Lx-Ly】` citations as `url_citation` annotations
  (`response.output_text.annotation.added`); the text keeps them as the model wrote them.

Stored responses (`previous_response_id`) keep each call and result as rendered (`builtin.PRIVATE`),
so the next request renders the conversation as the model saw it.
"""

from __future__ import annotations

import json

from ossgguf.harmony import Event
from ossgguf.runner.server.builtin import PRIVATE, Hosted, ToolFinished, ToolStarted, is_builtin
from ossgguf.runner.server.params import new_id

HOSTED_ITEMS = ("code_interpreter_call", "web_search_call")


def _copy(item: dict) -> dict:
    return json.loads(json.dumps(item))


def hosted_echo(echo: dict, hosted: Hosted | None) -> dict:
    """The request's tools as the response repeats them: a code_interpreter tool with its container
    (OpenAI's type requires one; this server's session id when it ran the tool)."""
    tools = []
    for tool in echo.get("tools") or []:
        if isinstance(tool, dict) and tool.get("type") == "code_interpreter" and not isinstance(tool.get("container"), str):
            ours = hosted is not None and hosted.container and "python" in hosted.names
            tool = {**tool, "container": hosted.container if ours else tool.get("container") or {"type": "auto"}}
        tools.append(tool)
    return {**echo, "tools": tools}


class HostedItems:
    """Mixed into `responses.OutputBuilder` (which has `_event`, `_begin`, `_close`, `_open`, `items`)."""

    def init_hosted(self, hosted: Hosted | None) -> None:
        self.hosted = hosted
        self._calls: dict[str, dict] = {}  # call id -> its item
        self._hosted_index: dict[int, str] = {}  # this round's built-in calls: event index -> call id
        self.private: dict[str, dict] = {}  # item id -> the call and result as rendered (stored only)

    def is_hosted(self, ev) -> bool:
        if isinstance(ev, ToolStarted | ToolFinished):
            return True
        if self.hosted is None or not isinstance(ev, Event):
            return False
        if ev.kind == "tool_call":
            self._hosted_index.pop(ev.index, None)  # indexes count from 0 again each round
            return is_builtin(ev.name, self.hosted.names)
        return ev.kind == "tool_args" and ev.index in self._hosted_index

    def _at(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.items.index(item)}

    def _phases(self, item: dict, *phases: str) -> list[dict]:
        """`response.code_interpreter_call.in_progress` and the like."""
        return [self._event(f"response.{item['type']}.{p}", **self._at(item)) for p in phases]

    def _code_item(self, call_id: str) -> tuple[dict, list[dict]]:
        item = {"id": new_id("ci"), "type": "code_interpreter_call", "status": "in_progress", "code": "",
                "outputs": None, "container_id": self.hosted.container}
        self._calls[call_id] = item
        return item, self._begin(item) + self._phases(item, "in_progress")

    def feed_hosted(self, ev) -> list[dict]:
        if isinstance(ev, ToolStarted):
            return self._started(ev)
        if isinstance(ev, ToolFinished):
            return self._finished(ev)
        if ev.kind == "tool_call":
            self._hosted_index[ev.index] = ev.id
            if ev.name == "python":
                return self._code_item(ev.id)[1]
            return self._close("completed")  # browser: its item opens when the call runs, with its action
        item = self._calls.get(self._hosted_index[ev.index])
        if item is None or item["type"] != "code_interpreter_call":
            return []
        item["code"] += ev.text
        return [self._event("response.code_interpreter_call_code.delta", **self._at(item), delta=ev.text)]

    def _started(self, ev: ToolStarted) -> list[dict]:
        call = ev.call
        if call.name == "python":
            item, out = self._calls.get(call.id), []
            if item is None:  # no tool_call event (the call was forced by the prompt)
                item, out = self._code_item(call.id)
            item["code"] = call.arguments
            out.append(self._event("response.code_interpreter_call_code.done", **self._at(item), code=item["code"]))
            out += self._phases(item, "interpreting")
            item["status"] = "interpreting"
            return out
        item = {"id": new_id("ws"), "type": "web_search_call", "status": "in_progress", "action": ev.action}
        self._calls[call.id] = item
        out = self._begin(item) + self._phases(item, "in_progress", "searching")
        item["status"] = "searching"
        return out

    def _finished(self, ev: ToolFinished) -> list[dict]:
        call, item = ev.call, self._calls[ev.call.id]
        if item["type"] == "code_interpreter_call":
            item["outputs"] = [{"type": "logs", "logs": ev.output}] if ev.output else []
        elif ev.sources:
            item["action"]["sources"] = [{"type": "url", "url": u} for u in ev.sources]
        item["status"] = "completed" if ev.ok else "failed"
        out = [*self._phases(item, "completed"),
               self._event("response.output_item.done", output_index=self.items.index(item), item=_copy(item))]
        if self._open is item:
            self._open = None
        self.private[item["id"]] = {
            "call": {"id": call.id, "type": "function",
                     "function": {"name": call.name, "arguments": call.arguments, **call.header_fields()}},
            "output": ev.output, "session": self.hosted.container if self.hosted else None}
        if self.hosted is not None and self.hosted.remember is not None:
            self.hosted.remember(item["id"], self.private[item["id"]])
        self._hosted_index.clear()
        return out

    def close_hosted(self, item: dict) -> list[dict]:
        """A built-in call item the turn ended on without running it (cancelled, out of tokens)."""
        item["status"] = "incomplete"
        return [self._event("response.output_item.done", output_index=self.items.index(item), item=_copy(item))]

    def annotate(self, item: dict) -> list[dict]:
        """The answer's citations as url_citation annotations, before its text is done."""
        if self.hosted is None or self.hosted.cite is None or item["type"] != "message":
            return []
        part = item["content"][0]
        part["annotations"] = self.hosted.cite(part["text"])
        return [self._event("response.output_text.annotation.added", **self._at(item), content_index=0,
                            annotation_index=i, annotation=a) for i, a in enumerate(part["annotations"])]

    def stored(self, output: list[dict]) -> list[dict]:
        """The output items as stored for previous_response_id: built-in calls with what they rendered."""
        return [{**i, PRIVATE: self.private[i["id"]]} if i.get("id") in self.private else i for i in output]
