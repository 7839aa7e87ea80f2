"""The server's sessions of gpt-oss's own tools (runner/server/builtin.py): one per conversation,
each with its python kernel and browser page stack; the sandbox and the browser backend are chosen
once for all of them. Bounded in number (`max_sessions`: a new one closes the least recently used
idle one), closed after `idle_seconds` unused, and all at shutdown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from ossgguf.errors import OssggufError
from ossgguf.harmony.parse import ToolCall
from ossgguf.runner.server.errors import APIError
from ossgguf.runner.server.params import new_id
from ossgguf.runner.tools import BuiltinOptions, BuiltinTools

log = logging.getLogger(__name__)

MAX_SESSIONS = 16
IDLE_SECONDS = 20 * 60.0  # OpenAI's containers expire after 20 idle minutes too


@dataclass(eq=False)
class Session:
    """One conversation's tools; `run` takes one call at a time (a kernel runs one cell at a time)."""

    key: str
    tools: BuiltinTools
    lock: threading.Lock = field(default_factory=threading.Lock)
    used: float = field(default_factory=time.monotonic)
    users: int = 0

    def run(self, call: ToolCall) -> tuple[str, bool]:
        with self.lock:
            text, ok = self.tools.run(call)
            self.used = time.monotonic()
            return text, ok

    def close(self) -> None:
        with self.lock:  # after a call still running
            self.tools.close()


class ServerTools:
    """The server's built-in tools: the options, the sandbox and browser backend chosen once (a
    python tool without a sandbox is refused now, not at the first call), and the live sessions."""

    def __init__(self, options: BuiltinOptions, max_sessions: int = MAX_SESSIONS,
                 idle_seconds: float = IDLE_SECONDS) -> None:
        self.options, self.names = options, list(options.names)
        self.max_sessions, self.idle_seconds = max_sessions, idle_seconds
        self._sandbox = self._backend = None
        if "python" in self.names:
            from ossgguf.runner.tools.sandbox import choose_sandbox

            self._sandbox = choose_sandbox(options.unsafe)
        if "browser" in self.names:
            from ossgguf.runner.tools.browser import make_backend

            self._backend = make_backend(options.browser_source, options.browser_allow)
        self._new_tools().close()  # the python tool's extra is there (jupyter_client, ipykernel)
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sweeper: threading.Thread | None = None

    def _new_tools(self) -> BuiltinTools:
        return BuiltinTools(self.options, sandbox=self._sandbox, backend=self._backend)

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, key: str) -> bool:
        return key in self._sessions

    def acquire(self, key: str | None = None) -> Session:
        """The live session `key`, or a new one (named `key` when given: a conversation whose session
        expired keeps its id, its state starts afresh). The caller releases it."""
        evicted: list[Session] = []
        with self._lock:
            if self._closed.is_set():
                raise APIError("the server is shutting down", 503)
            s = self._sessions.get(key) if key else None
            if s is None:
                while len(self._sessions) >= self.max_sessions:
                    idle = next((x for x in self._sessions.values() if x.users == 0), None)
                    if idle is None:
                        raise APIError(f"{self.max_sessions} conversations are using the built-in tools at once "
                                       "(the server's limit); try again when one is done", 429,
                                       code="rate_limit_exceeded")
                    evicted.append(self._sessions.pop(idle.key))
                if key:
                    log.info("tools: conversation %s expired or unknown here: its state starts afresh", key)
                s = Session(key or new_id("cntr"), self._new_tools())
                self._sessions[s.key] = s
            self._sessions.move_to_end(s.key)
            s.users += 1
            s.used = time.monotonic()
            if self._sweeper is None:
                self._sweeper = threading.Thread(target=self._sweep, name="ossgguf-tools-sweeper", daemon=True)
                self._sweeper.start()
        self._close_later(evicted, "the least recently used, for a new one")
        return s

    def release(self, s: Session, close: bool = False) -> None:
        with self._lock:
            s.users -= 1
            s.used = time.monotonic()
            close = close and s.users == 0 and self._sessions.get(s.key) is s
            if close:
                del self._sessions[s.key]
        if close:
            self._close_later([s], "its request ended")

    def _close_later(self, sessions: list[Session], why: str) -> None:
        """Close off the caller's thread: a kernel takes a moment to stop."""
        def close() -> None:
            for s in sessions:
                log.info("tools: closing conversation %s (%s)", s.key, why)
                s.close()

        if sessions:
            threading.Thread(target=close, name="ossgguf-tools-close", daemon=True).start()

    def _sweep(self) -> None:
        while not self._closed.wait(min(60.0, self.idle_seconds / 4)):
            now = time.monotonic()
            with self._lock:
                old = [s for s in self._sessions.values() if s.users == 0 and now - s.used > self.idle_seconds]
                for s in old:
                    del self._sessions[s.key]
            for s in old:
                log.info("tools: closing conversation %s (idle for %.0f s)", s.key, now - s.used)
                s.close()

    def close(self) -> None:
        """At shutdown: every session's kernel stops."""
        self._closed.set()
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            s.close()
        index = getattr(self._backend, "index", None)
        if index is not None:
            index.close()


def server_tools(options: BuiltinOptions | None) -> ServerTools | None:
    """The server's tools for `--tools-builtin` (None when it names none); errors name the option."""
    if options is None or not options.names:
        return None
    try:
        return ServerTools(options)
    except OssggufError:
        raise
    except Exception as exc:  # noqa: BLE001 - a backend that cannot start says why, with the option
        raise OssggufError(f"--tools-builtin {','.join(options.names)}: {type(exc).__name__}: {exc}") from exc
