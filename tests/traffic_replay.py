"""Replaying the request bodies real clients sent (tests/data/traffic, recorded by bench/record_traffic.py).

Shared by tests/test_traffic.py (the scripted tiny model) and bench/bench_traffic.py (a 20b-shaped GGUF):
`serving(app)` runs `ossgguf serve`'s app under uvicorn on a free loopback port, `replay` posts the bodies
in order, as recorded (streamed, as both clients ask), and reads from each answer the usage it reports
(prompt and cached tokens) and the time to its first generated token.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from serving import free_port

TRAFFIC = Path(__file__).resolve().parent / "data" / "traffic"
CLIENTS = ("codex", "opencode")


def load(name: str) -> list[dict]:
    """The recorded requests of client `name`: {"path", "body"} each, in the order it sent them."""
    path = TRAFFIC / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for k, row in enumerate(rows):
        if not isinstance(row.get("body"), dict) or not str(row.get("path", "")).startswith("/v1/"):
            raise ValueError(f"{path}, line {k + 1}: not a recorded request ({{'path': '/v1/...', 'body': {{...}}}})")
    return rows


@contextmanager
def serving(app):
    """`app` under uvicorn on a free port of 127.0.0.1; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass
class Answer:
    """What one replayed request got back."""

    path: str
    status: int
    prompt_tokens: int | None = None  # from the usage the server reported
    cached_tokens: int | None = None
    ttft: float | None = None  # seconds from sending to the first generated text, reasoning or call
    seconds: float = 0.0  # to the end of the answer
    error: str = ""
    prompt_seconds: float | None = None  # the engine's own time to the first token (filled by bench/bench_traffic.py)


def capped(row: dict, max_tokens: int | None) -> dict:
    """The body with at most `max_tokens` to generate (None: as recorded)."""
    body = dict(row["body"])
    if max_tokens is not None:
        if row["path"].endswith("/responses"):
            body["max_output_tokens"] = max_tokens
        else:
            body.pop("max_completion_tokens", None)
            body["max_tokens"] = max_tokens
    return body


def _usage(event: dict) -> dict | None:
    """The usage of a Responses event (response.completed/incomplete) or a chat chunk, if it has one."""
    if isinstance(event.get("response"), dict) and event["response"].get("usage"):
        u = event["response"]["usage"]
        return {"prompt": u["input_tokens"], "cached": u.get("input_tokens_details", {}).get("cached_tokens")}
    if event.get("usage"):
        u = event["usage"]
        return {"prompt": u["prompt_tokens"], "cached": (u.get("prompt_tokens_details") or {}).get("cached_tokens")}
    return None


def _generated(event: dict) -> bool:
    """Whether an event carries generated output (text, reasoning, or a call's arguments)."""
    if str(event.get("type", "")).endswith(".delta"):
        return True
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        if any(delta.get(k) for k in ("content", "reasoning", "reasoning_content", "tool_calls")):
            return True
    return False


def replay(base_url: str, rows: list[dict], max_tokens: int | None = None, timeout: float | None = 600,
           on_answer: Callable[[Answer], None] | None = None) -> list[Answer]:
    """Post each recorded body in order; the status, usage and timing of each answer (`timeout`: seconds
    without a byte from the server, None: no limit; `on_answer(answer)` as each one ends)."""
    out = []
    with httpx.Client(base_url=base_url, timeout=timeout) as client:
        for row in rows:
            body = capped(row, max_tokens)
            t0 = time.perf_counter()
            ans = Answer(row["path"], 0)
            if not body.get("stream"):
                r = client.post(row["path"], json=body)
                ans.status, ans.seconds = r.status_code, time.perf_counter() - t0
                data = r.json()
                if (u := _usage({"response": data} if "output" in data else data)) is not None:
                    ans.prompt_tokens, ans.cached_tokens = u["prompt"], u["cached"]
                ans.ttft = ans.seconds
                ans.error = "" if r.status_code == 200 else r.text[:500]
                out.append(ans)
                if on_answer is not None:
                    on_answer(ans)
                continue
            with client.stream("POST", row["path"], json=body) as r:
                ans.status = r.status_code
                if r.status_code != 200:
                    ans.error = r.read().decode(errors="replace")[:500]
                for line in r.iter_lines() if r.status_code == 200 else ():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if ans.ttft is None and _generated(event):
                        ans.ttft = time.perf_counter() - t0
                    if (u := _usage(event)) is not None:
                        ans.prompt_tokens, ans.cached_tokens = u["prompt"], u["cached"]
                    if "error" in event or event.get("type") in ("error", "response.failed"):
                        ans.error = json.dumps(event)[:500]
            ans.seconds = time.perf_counter() - t0
            if ans.ttft is None:  # nothing generated (an immediate end): the answer's time
                ans.ttft = ans.seconds
            out.append(ans)
            if on_answer is not None:
                on_answer(ans)
    return out
