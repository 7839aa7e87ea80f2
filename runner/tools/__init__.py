"""gpt-oss's own tools, run here: `python` (a sandboxed Jupyter kernel, python_tool.py + sandbox.py)
and `browser` (search/open/find over a local index or a search service, browser.py, search_index.py,
web.py).

`BuiltinTools` is one conversation's set: the chat's tool loop (`chat.respond`) hands it the calls
the model addresses to `python` or `browser.*` (the harmony parser marks them `ToolCall.builtin`),
and renders what it returns as the tool's message (author `python` / `browser.search`, to=assistant,
on the channel of the call). The renderer writes the tools' descriptions into the system message
(`render(..., builtin_tools=names)`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ossgguf.errors import OssggufError
from ossgguf.harmony.parse import ToolCall

NAMES = ("python", "browser")  # the order the template writes them in


def parse_names(spec: str | Iterable[str] | None) -> list[str]:
    """`--tools-builtin python,browser` to a checked list (empty: none)."""
    if not spec:
        return []
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if bad := [n for n in names if n not in NAMES]:
        raise OssggufError(f"--tools-builtin: unknown tool(s) {', '.join(bad)}; gpt-oss's own tools are "
                           f"{', '.join(NAMES)}")
    return [n for n in NAMES if n in names]


@dataclass
class BuiltinOptions:
    """What `--tools-builtin` and its options ask for."""

    names: list[str] = field(default_factory=list)
    unsafe: bool = False  # run python without a sandbox (never chosen for the user)
    python_timeout: float = 120.0
    python_memory: int = 1 << 30
    scratch: Path | None = None  # /mnt/data's folder on this machine (default: a temporary one)
    browser_source: str | None = None  # local:DIR, searxng:URL, exa, tavily
    browser_allow: list[str] = field(default_factory=list)  # private hosts/networks `open` may fetch


class BuiltinTools:
    """The enabled tools of one conversation; `reset()` forgets their state (/reset)."""

    def __init__(self, options: BuiltinOptions, sandbox=None, backend=None) -> None:
        """`sandbox` (a SandboxPlan) and `backend` (a browser backend): chosen once and shared by the
        server's conversations (runner/server/builtin.py); default: chosen here."""
        self.options = options
        self.names = list(options.names)
        self.python = self.browser = None
        if "python" in self.names:
            from .python_tool import PythonTool
            from .sandbox import Limits, choose_sandbox

            self.python = PythonTool(sandbox or choose_sandbox(options.unsafe), Limits(memory_bytes=options.python_memory),
                                     timeout=options.python_timeout, scratch=options.scratch)
        if "browser" in self.names:
            from .browser import Browser, make_backend

            self.browser = Browser(backend or make_backend(options.browser_source, options.browser_allow),
                                   allow=options.browser_allow)

    def handles(self, call: ToolCall) -> bool:
        if not call.builtin:
            return False
        if call.name == "python":
            return self.python is not None
        return self.browser is not None and call.name.startswith("browser.")

    def run(self, call: ToolCall) -> tuple[str, bool]:
        """The tool's answer to `call` and whether it ran cleanly; failures are text for the model."""
        try:
            if call.name == "python":
                return self.python.run(call.arguments), True
            return self.browser.call(call.name.removeprefix("browser."), call.arguments)
        except OssggufError as e:
            return f"error: {e}", False

    def reset(self) -> None:
        if self.python is not None:
            self.python.reset()
        if self.browser is not None:
            self.browser.reset()

    def close(self) -> None:
        if self.python is not None:
            self.python.close()
