"""Helpers for tests that start `ossgguf serve` or `ossgguf worker` as a user does: a free port, and
waiting until the process answers (or failing with its log when it exits or takes too long)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc, log: Callable[[], str], seconds: float = 60) -> None:
    """Until `GET /health` on `port` answers 200; fails with `log()` if `proc` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline, log()
            time.sleep(0.2)


def wait_listening(port: int, proc, log: Callable[[], str], seconds: float = 60) -> None:
    """Until a TCP connection to `port` succeeds (an RPC worker speaks no HTTP)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log()
            time.sleep(0.2)
