"""One model, one generation at a time: a FIFO of jobs run on a worker thread, streamed to the event loop.

llama.cpp's context holds one sequence, and the engine reuses its KV cache across requests by token
prefix, so requests are served one after the other. Generation runs on the worker thread; chunks reach
the asyncio side through `call_soon_threadsafe`, so the event loop stays free to accept, queue and
cancel. A client that goes away cancels its job: a queued job is skipped, a running one is stopped
through `Engine.cancel` (which also aborts a long prompt prefill).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from ossgguf.harmony.parse import Event, HarmonyStreamParser, ParsedMessage
from ossgguf.harmony.render import Segment, tool_call_problem
from ossgguf.runner.chat import Sampling
from ossgguf.runner.engine import GenerationChunk

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # how often a waiting request checks that its client is still connected


@dataclass(frozen=True)
class GenerationRequest:
    """What the model is asked: the rendered prompt (with any forced prefix) and how to sample."""

    prompt: str
    tokens: list[int] | None  # the prompt's tokens when the backend tokenizes (checked against n_ctx)
    params: Sampling


GenerateFn = Callable[[GenerationRequest], Iterable[GenerationChunk]]


@dataclass
class Backend:
    """Where generations come from: an `Engine`, or (tests) any function yielding `GenerationChunk`s."""

    generate: GenerateFn
    tokenize: Callable[[list[Segment]], list[int]] | None = None  # a rendered prompt's segments -> ids
    n_ctx: int | None = None
    cancel: Callable[[], None] | None = None  # stops the running generation early (engine only)
    # id -> text of the vocabulary's special tokens: output is parsed on ids. None (a scripted
    # `generate` without a vocabulary): chunk texts are read as harmony markup.
    special_tokens: Mapping[int, str] | None = None

    @classmethod
    def from_engine(cls, engine, generate: GenerateFn | None = None) -> Backend:
        def run(req: GenerationRequest) -> Iterator[GenerationChunk]:
            return engine.generate(req.tokens if req.tokens is not None else req.prompt, **asdict(req.params))

        # a `generate` given beside the engine scripts the output as markup (tests): no ids to read
        return cls(generate=generate or run, tokenize=engine.tokenize_segments, n_ctx=engine.n_ctx,
                   cancel=engine.cancel, special_tokens=None if generate else engine.special_tokens())


class ClientGone(Exception):
    """The client disconnected; its job was cancelled."""


_END = object()


@dataclass(eq=False)  # identity: jobs live in a set
class Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, item: Any) -> None:
        """From the worker thread: hand an item to the event loop (dropped if the loop is gone)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            self.cancelled.set()

    async def chunks(self, is_disconnected: Callable[[], Any] | None = None) -> AsyncIterator[GenerationChunk]:
        """The job's chunks as they come; raises the worker's error, or ClientGone once the client left."""
        checked = time.monotonic()
        while True:
            if is_disconnected is not None and time.monotonic() - checked > POLL_SECONDS:
                if await is_disconnected():
                    raise ClientGone()
                checked = time.monotonic()
            if not self.queue.empty():  # a fast model gets ahead: no timer per chunk then
                item = self.queue.get_nowait()
            else:
                try:
                    item = await asyncio.wait_for(self.queue.get(), POLL_SECONDS)
                except TimeoutError:
                    continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Worker:
    """Runs jobs one at a time, in submission order, on one thread."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ossgguf-generate")
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._queued: set[Job] = set()
        self.served = 0
        self.cancelled = 0

    @property
    def busy(self) -> bool:
        return self._current is not None

    @property
    def waiting(self) -> int:
        """Queued jobs whose client is still there (a cancelled one is skipped when its turn comes)."""
        with self._lock:
            return sum(not j.cancelled.is_set() for j in self._queued)

    def submit(self, request: GenerationRequest) -> Job:
        job = Job(request, asyncio.get_running_loop())
        with self._lock:
            self._queued.add(job)
        self._pool.submit(self._run, job)
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job: skipped if still queued, stopped after the current token (or prefill batch) if running."""
        if job.cancelled.is_set():
            return
        job.cancelled.set()
        with self._lock:
            if self._current is job and self.backend.cancel is not None:
                self.backend.cancel()

    def close(self) -> None:
        with self._lock:
            if self._current is not None:
                self._current.cancelled.set()
                if self.backend.cancel is not None:
                    self.backend.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: Job) -> None:
        with self._lock:
            self._queued.discard(job)
            if job.cancelled.is_set():
                self.cancelled += 1
                job.put(_END)
                return
            self._current = job
        gen = None
        try:
            gen = iter(self.backend.generate(job.request))
            for chunk in gen:
                job.put(chunk)
                if job.cancelled.is_set():
                    break
        except Exception as exc:  # handed to the request, which answers it as an error
            log.exception("generation failed")
            job.put(exc)
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()  # frees the engine's sampler now, not at garbage collection
            with self._lock:
                self._current = None
                self.served += 1
                self.cancelled += job.cancelled.is_set()
            job.put(_END)


# -- one assistant turn: chunks -> harmony events -> result -----------------------------------------
@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # tokens whose text went to the analysis channel

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TurnEnd:
    """The end of a turn. `message.content` is what was sent (cut at a stop string)."""

    message: ParsedMessage
    finish_reason: str  # OpenAI's: stop, length, tool_calls
    usage: Usage


class StopMatcher:
    """OpenAI's `stop` strings on the answer text: holds back what may begin a stop string."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self._held = True, ""
            return buf[:cut]
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1))
                    if buf.endswith(s[:k])), default=0)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _finish_reason(parsed: ParsedMessage, ended_by: str | None, stopped: bool) -> str:
    """The parser's stop reason in OpenAI's terms; "error" (output that is not clean harmony) included."""
    if stopped:
        return "stop"
    if parsed.stop_reason == "error" and ended_by == "length":
        return "length"
    if parsed.stop_reason in ("error", "tool_calls"):  # malformed calls too (harmony.tool_call_problem)
        return "tool_calls" if parsed.tool_calls else "stop"
    return parsed.stop_reason


async def run_turn(worker: Worker, job: Job, is_disconnected=None, prefill: str = "",
                   stop: Iterable[str] = (), tool_names: Iterable[str] | None = None
                   ) -> AsyncIterator[Event | TurnEnd]:
    """Parse a job's output as it streams: harmony `Event`s, then one `TurnEnd`.

    `prefill` is the start of the answer that the prompt already holds (a forced tool call): the
    parser reads it first. Cancels the job if the caller stops early or the client goes away.
    Tool calls go to the client as the model wrote them; `tool_names` (the offered functions) only
    serves the log line for a malformed one (harmony.tool_call_problem).
    """
    special = worker.backend.special_tokens
    parser = HarmonyStreamParser(special_tokens=special)
    matcher = StopMatcher(stop)
    usage = Usage()
    content: list[str] = []
    ended_by: str | None = None

    def deliver(events: list[Event]) -> list[Event]:
        out = []
        for ev in events:
            if ev.kind != "content":
                if held := matcher.flush():
                    content.append(held)
                    out.append(Event("content", text=held))
                out.append(ev)
                continue
            text = matcher.push(ev.text)
            if text:
                content.append(text)
                out.append(Event("content", text=text))
        return out

    try:
        for ev in deliver(parser.feed(prefill) if prefill else []):
            yield ev
        async for chunk in job.chunks(is_disconnected):
            usage.prompt_tokens, usage.cached_tokens = chunk.prompt_tokens, chunk.cached_tokens
            usage.completion_tokens = chunk.generation_tokens
            if chunk.finish_reason is not None:
                ended_by = chunk.finish_reason
            if chunk.text:
                # on ids (a stop chunk's token ends the output: finish() is told); markup without a vocabulary
                events = deliver(parser.feed(chunk.text) if special is None else
                                 parser.feed_token(None if chunk.finish_reason else chunk.token, chunk.text))
                usage.reasoning_tokens += any(e.kind == "reasoning" for e in events)
                for ev in events:
                    yield ev
            if matcher.hit:
                worker.cancel(job)
                break
        for ev in deliver(parser.flush()):
            yield ev
        if not matcher.hit and (held := matcher.flush()):
            content.append(held)
            yield Event("content", text=held)
        parsed = parser.finish(ended_by if ended_by in ("stop", "length") else None)
        parsed.content = "".join(content)
        names = None if tool_names is None else list(tool_names)
        for call in parsed.tool_calls:
            if problem := tool_call_problem(call, names):
                log.warning("tool call %s handed to the client as written: %s", call.id, problem)
        yield TurnEnd(parsed, _finish_reason(parsed, ended_by, matcher.hit), usage)
    finally:
        worker.cancel(job)  # no-op once it ended; stops it when the consumer left early
