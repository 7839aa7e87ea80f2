"""gpt-oss's `browser` tool: `search`, `open`, `find` over a page stack, shown as OpenAI's reference
browser (gpt_oss/tools/simple_browser) shows them, so that the model reads what it was trained on:

    [{cursor}] {title} ({url})
    **viewing lines [{first} - {last}] of {total - 1}**

    L0: ...

Every page goes on the stack; its index is the cursor the model cites: `【{cursor}†L{a}(-L{b})?】`.
Links on a page are `【{id}†{text}(†{domain})】`; `open` with that id follows it. Backends say where
`search` looks and how `open` reads a URL: `local:DIR` (search_index.py, offline), a SearXNG
instance (its JSON API), Exa or Tavily (API keys from the environment).
"""

from __future__ import annotations

import json
import logging
import os
import re
import textwrap
import urllib.request
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from urllib.parse import quote, unquote, urlencode

from ossgguf.errors import OssggufError

from . import web
from .search_index import LocalIndex, document_text, is_html

log = logging.getLogger(__name__)

VIEW_CHARS = 4000  # lines shown when `num_lines` is not given: about the reference's 1024 tokens
MAX_RESULTS = 10
CITATION = re.compile(r"【(?P<cursor>\d+)†L(?P<start>\d+)(?:-L(?P<end>\d+))?】")


class ToolUsageError(OssggufError):
    """A call the browser cannot follow: the text goes back to the model."""


@dataclass
class Page:
    url: str
    title: str
    text: str
    urls: dict[str, str] = field(default_factory=dict)  # link id -> URL
    snippets: dict[str, int] | None = None  # find results: link id -> line; search and find pages have them


def results_page(query: str, results: list[tuple[str, str, str]]) -> Page:
    """A search result page from (title, url, summary), built as the reference builds it: an HTML list."""
    items = "".join(f"<li><a href='{escape(u, quote=True)}'>{escape(t)}</a> {escape(s)}</li>" for t, u, s in results)
    title, text, urls = web.html_page(f"<html><body><h1>Search Results</h1><ul>{items}</ul></body></html>", "", query)
    return Page("", query, text, urls, snippets={})


# -- backends ------------------------------------------------------------------------------------------
class LocalBackend:
    """A folder of notes: search through its SQLite FTS5 index, open its files as `local://NAME/path`."""

    source = "local"

    def __init__(self, folder: str | Path) -> None:
        self.index = LocalIndex(folder)
        read, removed = self.index.update()
        log.info("browser: %s indexed (%d files read, %d removed)", self.index.folder, read, removed)
        self.prefix = f"local://{self.index.folder.name or 'root'}/"

    def search(self, query: str, topn: int) -> Page:
        self.index.update()  # incremental: a note written since the last call is found
        hits = self.index.search(query, topn)
        return results_page(query, [(h.title, self.prefix + quote(h.path), h.snippet) for h in hits])

    def fetch(self, url: str, allow: list[str]) -> Page:
        if not url.startswith(self.prefix):
            if url.startswith("local://"):
                raise ToolUsageError(f"{url!r} is not in the local index ({self.prefix})")
            return _page_from_fetch(web.fetch(url, allow))
        path = self.index.path(unquote(url[len(self.prefix):]))  # an OssggufError is the model's to read too
        if is_html(path.name):
            title, text, urls = web.html_page(path.read_text(errors="replace"), url)
            return Page(url, title, text, urls)
        title, text = document_text(path)
        return Page(url, title, text)


def _page_from_fetch(fetched: web.Fetched) -> Page:
    if fetched.content_type in ("text/html", "application/xhtml+xml"):
        title, text, urls = web.html_page(fetched.text, fetched.url)
        return Page(fetched.url, title, text, urls)
    return Page(fetched.url, web.domain(fetched.url) or fetched.url, fetched.text)


def _http_json(url: str, body: dict | None = None, headers: dict | None = None) -> dict:
    """A search service's JSON answer (the user chose this service: not subject to the private-address rule)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"User-Agent": web.USER_AGENT, "Accept": "application/json",
                                                            **({"Content-Type": "application/json"} if data else {}),
                                                            **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=web.TIMEOUT) as resp:
            return json.loads(resp.read(web.MAX_BYTES))
    except (OSError, ValueError) as e:
        raise OssggufError(f"search service {url.split('?')[0]}: {e}") from None


class WebBackend:
    """Search through a service; open URLs with `web.fetch`."""

    def __init__(self, source: str, url: str | None = None, key: str | None = None) -> None:
        self.source, self.url, self.key = source, url, key

    def search(self, query: str, topn: int) -> Page:
        if self.source == "searxng":
            data = _http_json(f"{self.url.rstrip('/')}/search?" + urlencode({"q": query, "format": "json"}))
        elif self.source == "exa":
            data = _http_json("https://api.exa.ai/search", {"query": query, "numResults": topn,
                                                            "contents": {"summary": True}}, {"x-api-key": self.key})
        else:  # tavily
            data = _http_json("https://api.tavily.com/search", {"query": query, "max_results": topn},
                              {"Authorization": f"Bearer {self.key}"})
        summary = "summary" if self.source == "exa" else "content"
        rows = [(r.get("title", ""), r.get("url", ""), r.get(summary, "")) for r in data.get("results", [])]
        return results_page(query, rows[:topn])

    def fetch(self, url: str, allow: list[str]) -> Page:
        return _page_from_fetch(web.fetch(url, allow))


def make_backend(source: str | None, allow: list[str] | None = None):
    """`--browser-source`: local:DIR, searxng:URL, exa, tavily."""
    if not source:
        raise OssggufError("the browser tool needs --browser-source: local:DIR (a folder of notes, offline), "
                           "searxng:URL, exa or tavily")
    kind, _, arg = source.partition(":")
    if kind == "local":
        return LocalBackend(arg or ".")
    if kind == "searxng":
        if not arg.startswith(("http://", "https://")):
            raise OssggufError(f"--browser-source {source}: give the SearXNG instance's URL, searxng:http://HOST:PORT")
        return WebBackend("searxng", arg)
    if kind in ("exa", "tavily"):
        env = f"{kind.upper()}_API_KEY"
        if not os.environ.get(env):
            raise OssggufError(f"--browser-source {kind} needs an API key in the environment variable {env}")
        return WebBackend(kind, key=os.environ[env])
    raise OssggufError(f"--browser-source {source!r}: use local:DIR, searxng:URL, exa or tavily")


# -- the tool ------------------------------------------------------------------------------------------
def wrap_lines(text: str, width: int = 80) -> list[str]:
    out: list[str] = []
    for line in text.split("\n"):
        out += textwrap.wrap(line, width=width, replace_whitespace=False, drop_whitespace=False) if line else [""]
    return out


class Browser:
    """One conversation's browser: `call(function, arguments JSON)` -> (text for the model, ok)."""

    def __init__(self, backend, allow: list[str] | None = None, view_chars: int = VIEW_CHARS) -> None:
        self.backend, self.allow, self.view_chars = backend, list(allow or []), view_chars
        self.stack: list[Page] = []

    def reset(self) -> None:
        self.stack = []

    def call(self, function: str, arguments: str) -> tuple[str, bool]:
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return f"error: the arguments are not valid JSON ({e})", False
        if not isinstance(args, dict):
            return "error: the arguments must be a JSON object", False
        fn = {"search": self.search, "open": self.open, "find": self.find}.get(function)
        if fn is None:
            return f"error: browser has no function {function!r} (search, open, find)", False
        try:
            return fn(**args), True
        except (TypeError, OssggufError) as e:
            return f"error: {e}", False

    def _page(self, cursor: int = -1) -> Page:
        if not self.stack:
            raise ToolUsageError("No pages to access!")
        if cursor == -1:
            return self.stack[-1]
        if not isinstance(cursor, int) or not 0 <= cursor < len(self.stack):
            raise ToolUsageError(f"Cursor `{cursor}` is out of range. Available cursor indices: [0 - {len(self.stack) - 1}].")
        return self.stack[cursor]

    def _show(self, loc: int = 0, num_lines: int = -1) -> str:
        page, cursor = self.stack[-1], len(self.stack) - 1
        lines = wrap_lines(page.text)
        if loc >= len(lines) and lines:
            self.stack.pop()
            raise ToolUsageError(f"Invalid location parameter: `{loc}`. Cannot exceed page maximum of {len(lines) - 1}.")
        if num_lines <= 0:
            end, used = loc, 0
            while end < len(lines) and (end == loc or used + len(lines[end]) + 8 <= self.view_chars):
                used += len(lines[end]) + 8  # "L123: " and the newline
                end += 1
        else:
            end = min(loc + num_lines, len(lines))
        body = "\n".join(f"L{i}: {line}" for i, line in enumerate(lines[loc:end], start=loc))
        header = page.title + (f" ({unquote(page.url)})" if page.url else "")
        return f"[{cursor}] {header}\n**viewing lines [{loc} - {end - 1}] of {len(lines) - 1}**\n\n{body}"

    def search(self, query: str, topn: int = MAX_RESULTS, top_n: int | None = None, source: str | None = None) -> str:
        self.stack.append(self.backend.search(str(query), max(1, min(int(top_n or topn), MAX_RESULTS))))
        return self._show(0)

    def open(self, id: int | str = -1, cursor: int = -1, loc: int = -1, num_lines: int = -1,
             view_source: bool = False, source: str | None = None) -> str:
        line = None
        if isinstance(id, str):  # a URL
            page = self.backend.fetch(id, self.allow)
        else:
            page = self._page(cursor)  # id -1: scroll this page
            if id >= 0:
                url = page.urls.get(str(id))
                if url is None:
                    raise ToolUsageError(f"Invalid link id `{id}`.")
                line = (page.snippets or {}).get(str(id))
                page = next((p for p in self.stack if p.url == url and p.snippets is None), None) \
                    or self.backend.fetch(url, self.allow)
        self.stack.append(page)
        if loc < 0:
            loc = max(0, line - 4) if line is not None else 0
        return self._show(loc, num_lines)

    def find(self, pattern: str, cursor: int = -1, source: str | None = None) -> str:  # source: as search/open
        page = self._page(cursor)
        if page.snippets is not None:
            raise ToolUsageError("Cannot run `find` on search results page or find results page")
        pattern = str(pattern).lower()
        lines = wrap_lines(page.text)
        chunks, lines_at, i = [], {}, 0
        while i < len(lines) and len(chunks) < 50:
            if pattern in lines[i].lower():
                n = len(chunks)
                chunks.append(f"# 【{n}†match at L{i}】\n" + "\n".join(lines[i:i + 4]))
                lines_at[str(n)] = i
                i += 4
            else:
                i += 1
        text = "\n\n".join(chunks) if chunks else f"No `find` results for pattern: `{pattern}`"
        self.stack.append(Page(f"{page.url}/find?pattern={quote(pattern)}",
                               f"Find results for text: `{pattern}` in `{page.title}`", text,
                               {k: page.url for k in lines_at}, snippets=lines_at))
        return self._show(0)

    def citations(self, text: str) -> list[dict]:
        """The `【cursor†La-Lb】` citations in an answer, with the URL of the page each cursor showed
        (OpenAI's `url_citation` annotations): start/end index in `text`, url, title."""
        cited = [(m, self.stack[int(m["cursor"])]) for m in CITATION.finditer(text) if int(m["cursor"]) < len(self.stack)]
        return [{"type": "url_citation", "start_index": m.start(), "end_index": m.end(), "url": page.url,
                 "title": page.title} for m, page in cited if page.url]
