"""One model, one turn at a time (or N with `--parallel N`): a FIFO of jobs run on worker threads, streamed
to the event loop.

llama.cpp's context holds one sequence, and the engine reuses its KV cache across requests by token
prefix, so requests are served one after the other. With `--parallel N` the engine's context holds N
sequences that runner/parallel.py decodes in one batch: N jobs run at once, each on its own thread,
reading its stream of the batch; more wait in the FIFO. Generation and its parsing (`turn.run_turn`) run on
the worker thread; harmony events reach the asyncio side through `call_soon_threadsafe`, so the event
loop stays free to accept, queue and cancel. A client that goes away cancels its job: a queued job is skipped, a running one is stopped
through `Engine.cancel` (which also aborts a long prompt prefill), or a parallel stream through its own
`cancel()`, which leaves the other streams alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ossgguf.harmony import Event, Segment, tool_call_problem
from ossgguf.runner.engine import GenerationChunk
from ossgguf.runner.generation import Sampling
from ossgguf.runner.turn import TurnEnd, run_turn

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # how often a waiting request checks that its client is still connected


@dataclass(frozen=True)
class GenerationRequest:
    """What the model is asked: the rendered prompt (with any forced start of the answer), how to
    sample, and how to read the answer."""

    prompt: str
    tokens: list[int] | None  # the prompt's tokens when the backend tokenizes (checked against n_ctx)
    params: Sampling
    prefill: str = ""  # the start of the answer that the prompt holds (a forced tool call)
    stop: tuple[str, ...] = ()  # OpenAI's stop strings
    tool_names: tuple[str, ...] = ()  # the offered functions, for the log line on a malformed call
    adapters: tuple | None = None  # LoRA scales, one per loaded adapter (None: off), from the model id; None: as loaded
    builtin_tools: tuple[str, ...] = ()  # gpt-oss's own tools the server runs for it (server/builtin.py)


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
    parallel: int = 1  # generations that may run at once (a `generate` result with cancel() stops alone)

    @classmethod
    def from_engine(cls, engine, generate: GenerateFn | None = None) -> Backend:
        parallel = engine.plan.parallel if generate is None else 1
        if parallel > 1:  # runner/parallel.py: one scheduler per engine, closed with it
            from ossgguf.runner.parallel import Scheduler

            sched = engine.scheduler or Scheduler(engine)

            def run_parallel(req: GenerationRequest):
                return sched.generate(req.tokens if req.tokens is not None else req.prompt, req.params,
                                      adapters=req.adapters)

            return cls(generate=run_parallel, tokenize=engine.tokenize_segments, n_ctx=engine.n_ctx,
                       special_tokens=engine.special_tokens(), parallel=parallel)

        def run(req: GenerationRequest) -> Iterator[GenerationChunk]:
            if getattr(engine, "adapters", None) is not None:  # runner/lora.py: this request's adapter set
                engine.set_adapter_scales(req.adapters)
            return engine.generate(req.tokens if req.tokens is not None else req.prompt, req.params)

        # a `generate` given beside the engine scripts the output as markup (tests): no ids to read
        return cls(generate=generate or run, tokenize=engine.tokenize_segments, n_ctx=engine.n_ctx,
                   cancel=engine.cancel, special_tokens=None if generate else engine.special_tokens())


class ClientGone(Exception):
    """The client disconnected; its job was cancelled."""


_END = object()


@dataclass(eq=False)  # identity: jobs live in a set
class Job:
    request: GenerationRequest
    worker: Worker
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, item: Any) -> None:
        """From the worker thread: hand an item to the event loop (dropped if the loop is gone)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            self.cancelled.set()

    def cancel(self) -> None:
        self.worker.cancel(self)

    async def events(self, is_disconnected: Callable[[], Any] | None = None) -> AsyncIterator[Event | TurnEnd]:
        """The turn's harmony events as they come, then its `TurnEnd` once the job is over; raises the
        worker's error, or ClientGone once the client left. Cancels the job if the caller stops early."""
        checked, end = time.monotonic(), None
        try:
            while True:
                if is_disconnected is not None and time.monotonic() - checked > POLL_SECONDS:
                    if await is_disconnected():
                        raise ClientGone()
                    checked = time.monotonic()
                if not self.queue.empty():  # a fast model gets ahead: no timer per event then
                    item = self.queue.get_nowait()
                else:
                    try:
                        item = await asyncio.wait_for(self.queue.get(), POLL_SECONDS)
                    except TimeoutError:
                        continue
                if item is _END:
                    if end is not None:  # after the worker's bookkeeping, so that the job counts as served
                        yield end
                    return
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, TurnEnd):
                    end = item
                else:
                    yield item
        finally:
            self.cancel()  # a no-op once the job ended


class Worker:
    """Runs jobs in submission order, `backend.parallel` at a time (default one), on as many threads."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._pool = ThreadPoolExecutor(max_workers=backend.parallel, thread_name_prefix="ossgguf-generate")
        self._lock = threading.Lock()
        self._running: dict[Job, Any] = {}  # job -> its generation (None until it has one)
        self._queued: set[Job] = set()
        self.served = 0
        self.cancelled = 0

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def waiting(self) -> int:
        """Queued jobs whose client is still there (a cancelled one is skipped when its turn comes)."""
        with self._lock:
            return sum(not j.cancelled.is_set() for j in self._queued)

    def submit(self, request: GenerationRequest) -> Job:
        job = Job(request, self, asyncio.get_running_loop())
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
            if job in self._running:
                self._stop(job)

    def _stop(self, job: Job) -> None:
        """Stop a running job's generation: its own cancel() (a parallel stream), else the backend's."""
        stop = getattr(self._running[job], "cancel", None) or self.backend.cancel
        if stop is not None:
            stop()

    def close(self) -> None:
        with self._lock:
            for job in self._running:
                job.cancelled.set()
                self._stop(job)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: Job) -> None:
        with self._lock:
            self._queued.discard(job)
            if job.cancelled.is_set():
                self.cancelled += 1
                job.put(_END)
                return
            self._running[job] = None
        req, turn = job.request, None
        try:
            generation = self.backend.generate(req)
            with self._lock:
                self._running[job] = generation
                if job.cancelled.is_set():
                    self._stop(job)
            turn = run_turn(generation, self.backend.special_tokens, req.prefill, req.stop)
            for item in turn:
                if isinstance(item, TurnEnd):
                    for call in item.message.tool_calls:  # handed to the client as written
                        if call.builtin and call.name.split(".")[0] in req.builtin_tools:
                            continue  # run by the server (server/builtin.py)
                        if problem := tool_call_problem(call, req.tool_names):
                            log.warning("tool call %s handed to the client as written: %s", call.id, problem)
                job.put(item)
                if job.cancelled.is_set():
                    break
        except Exception as exc:  # handed to the request, which answers it as an error
            log.exception("generation failed")
            job.put(exc)
        finally:
            if turn is not None:
                turn.close()  # closes the generation: frees the engine's sampler now
            with self._lock:
                self._running.pop(job, None)
                self.served += 1
                self.cancelled += job.cancelled.is_set()
            job.put(_END)
