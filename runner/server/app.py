"""An OpenAI-compatible HTTP server for a gpt-oss GGUF: Chat Completions, Responses, models, health.

`create_app(engine_or_path, model_name)` builds the FastAPI app around one loaded model; `serve(path)`
loads the model through the planner and runs it under uvicorn (127.0.0.1 unless told otherwise).
A request goes: its endpoint reads it into a `Turn` (chat.py, responses.py; the fields both share and
their checks: params.py); `ServerState.prepare` renders it to a harmony prompt (deterministically: the
date is fixed when the server starts, so a conversation's next request starts with the same tokens and
reuses the KV cache) and tokenizes it; the worker generates and parses turns one at a time
(worker.py, over `turn.run_turn`); the endpoint turns the events into its JSON or SSE. Errors keep
OpenAI's shape (errors.py).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hmac
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import takewhile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ossgguf.errors import OssggufError
from ossgguf.gguf.split import split_name
from ossgguf.harmony import DEFAULT_REASONING, markup_segments
from ossgguf.runner.plan import PlacementOptions
from ossgguf.runner.server.builtin import Rounds, chat_names, conversation_key, reasoning_view
from ossgguf.runner.server.chat import completion, include_usage, parse_chat, stream_chunks
from ossgguf.runner.server.errors import (
    APIError,
    context_exceeded,
    context_too_small,
    conversation_room,
    install_handlers,
    read_json_object,
)
from ossgguf.runner.server.params import Turn, new_id, sse, sse_events
from ossgguf.runner.server.responses import OutputBuilder, ResponseStore, parse_responses
from ossgguf.runner.server.tool_sessions import ServerTools, server_tools
from ossgguf.runner.server.worker import Backend, ClientGone, GenerateFn, GenerationRequest, Job, Worker
from ossgguf.runner.tools import BuiltinOptions
from ossgguf.runner.turn import TurnEnd

log = logging.getLogger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def default_model_name(path: str | Path) -> str:
    """The GGUF's file name without `.gguf` and without a split suffix (`-00001-of-00003`)."""
    return split_name(Path(path).name)[0]


@dataclass
class ServerState:
    model_name: str
    aliases: frozenset[str]
    backend: Backend
    worker: Worker
    api_key: str | None
    date: str
    default_effort: str
    store: ResponseStore
    created: int
    engine: Any = None  # the Engine when the app loaded it (closed at shutdown)
    lora_models: dict[str, tuple] = field(default_factory=dict)  # NAME+ADAPTER ids -> scales (runner/lora.py)
    tools: ServerTools | None = None  # gpt-oss's own tools, run here (--tools-builtin; builtin.py)

    def check_model(self, body: dict) -> str:
        model = body.get("model")
        if model is not None and model not in self.aliases and model not in self.lora_models:
            raise APIError(f"The model `{model}` does not exist. This server serves `{self.model_name}`"
                           + "".join(f", `{m}`" for m in self.lora_models) + ".", 404, "model", "model_not_found")
        return model if model in self.lora_models else self.model_name

    async def prepare(self, turn: Turn, model: str | None = None) -> GenerationRequest:
        """Render and tokenize off the event loop; refuse a prompt the context cannot hold."""

        def work() -> GenerationRequest:
            try:
                segments = turn.segments(self.date)
            except OssggufError as exc:
                raise turn.invalid(str(exc)) from None
            segments += markup_segments(turn.prefill)
            prompt = "".join(s.text for s in segments)
            # message text never becomes a control token (harmony.Segment)
            tokens = self.backend.tokenize(segments) if self.backend.tokenize else None
            if tokens is not None and self.backend.n_ctx and len(tokens) >= self.backend.n_ctx:
                raise self._too_long(turn, len(tokens), self.backend.n_ctx)
            return GenerationRequest(prompt, tokens, turn.params, turn.prefill, tuple(turn.stop),
                                     tuple(turn.tool_names), self.lora_models.get(model),
                                     builtin_tools=tuple(turn.builtin_tools))

        return await asyncio.to_thread(work)

    def _too_long(self, turn: Turn, n_prompt: int, n_ctx: int) -> APIError:
        """OpenAI's context error, on which agents compact the conversation; or, when what they never
        compact (the leading system/developer messages and the tools) leaves too little room for that
        to help, an error that makes them stop and names --ctx (errors.context_too_small)."""
        # the template reads only the leading run (harmony.normalize_messages)
        fixed = list(takewhile(lambda m: isinstance(m, dict) and m.get("role") in ("system", "developer"),
                               turn.messages))
        segments = turn.segments(self.date, fixed or [{"role": "system", "content": ""}], add_generation_prompt=False)
        n_fixed = len(self.backend.tokenize(segments))
        if n_ctx - n_fixed < conversation_room(n_ctx):
            return context_too_small(n_fixed, n_ctx)
        return context_exceeded(n_prompt, n_ctx, turn.source)


class _JobStream(StreamingResponse):
    """An SSE response whose job is cancelled however the response ends (done, error, client gone)."""

    def __init__(self, job: Job, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=_SSE_HEADERS)
        self._job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancel()


async def _guard(events: AsyncIterator[str], on_error: Callable[[str], str]) -> AsyncIterator[str]:
    """After the headers went out, an error can only be reported inside the stream."""
    try:
        async for text in events:
            yield text
    except ClientGone:
        return
    except Exception as exc:
        log.exception("generation failed mid-stream")
        yield on_error(f"{type(exc).__name__}: {exc}")


async def built_reply(job: Job, events: AsyncIterator, out: Any, stream: bool, on_error: Callable[[str], str],
                      done: Callable[[dict], Any] = lambda _: None) -> Response:
    """A builder's answer (responses.OutputBuilder, anthropic_out.MessageBuilder): its JSON object, or
    its named SSE events; `done` gets the object."""
    if stream:
        return _JobStream(job, _guard(_builder_stream(out, events, done), on_error))
    try:
        _, obj = out.finish(await _last(events, out.feed))
    except ClientGone:
        return Response(status_code=499)
    done(obj)
    return JSONResponse(obj)


async def _builder_stream(out: Any, events: AsyncIterator, done: Callable[[dict], Any]) -> AsyncIterator[str]:
    """A builder's start, each event fed, its finish; a dict (a Messages ping) goes as it is."""
    yield sse_events(out.start())
    async for item in events:
        if isinstance(item, TurnEnd):
            final, obj = out.finish(item)
            done(obj)
            yield sse_events(final)
            return
        if text := sse_events([item] if isinstance(item, dict) else out.feed(item)):
            yield text


async def _last(events: AsyncIterator, on_event: Callable[[Any], Any] | None = None) -> TurnEnd:
    """The TurnEnd of a turn's events; `on_event` sees the others."""
    end = None
    async for item in events:  # to the end, so that the job is over now
        if isinstance(item, TurnEnd):
            end = item
        elif on_event is not None:
            on_event(item)
    if end is None:
        raise APIError("the generation ended without a result", 500)
    return end


def create_app(engine_or_path: Any, model_name: str | None = None, api_key: str | None = None, *,
               options: PlacementOptions | None = None, generate: GenerateFn | None = None,
               date: str | None = None, reasoning_effort: str = DEFAULT_REASONING, stored_responses: int = 100,
               strict_model: bool = False, builtin: BuiltinOptions | ServerTools | None = None) -> FastAPI:
    """The FastAPI app serving one model.

    `engine_or_path`: a loaded `Engine` (the caller closes it), a GGUF path (loaded now with `options`,
    closed at shutdown), or None with `generate`. `generate(GenerationRequest)` replaces the engine's
    generation (tests script the model's harmony output with it). `date` (YYYY-MM-DD) goes into every
    system message unless a request sends its own `date`; default: today, fixed for the server's life.
    `strict_model`: the Messages API refuses model names other than this model's (default: serves any).
    `builtin`: gpt-oss's own tools to run here (`--tools-builtin`; server/builtin.py).
    """
    from ossgguf.runner.engine import Engine

    engine, owned = engine_or_path, False
    if isinstance(engine_or_path, str | Path):
        engine, owned = Engine.load(engine_or_path, options), True
    if engine is None and generate is None:
        raise OssggufError("create_app needs an Engine, a GGUF path, or a generate function")
    backend = Backend.from_engine(engine, generate) if engine is not None else Backend(generate=generate)
    name = model_name or (default_model_name(engine.path) if engine is not None else "gpt-oss")
    aliases = {name} | ({default_model_name(engine.path), Path(engine.path).name} if engine is not None else set())
    state = ServerState(model_name=name, aliases=frozenset(aliases), backend=backend, worker=Worker(backend),
                        api_key=api_key, date=date or _dt.date.today().isoformat(),
                        default_effort=reasoning_effort, store=ResponseStore(stored_responses),
                        created=int(time.time()), engine=engine if owned else None,
                        tools=builtin if isinstance(builtin, ServerTools) else server_tools(builtin))
    if engine is not None and getattr(engine, "adapters", None) is not None:
        from ossgguf.runner.lora import adapter_models

        state.lora_models = adapter_models(name, engine.adapters.specs)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        state.worker.close()
        for owned in (state.tools, state.engine):
            if owned is not None:
                owned.close()

    app = FastAPI(title="ossgguf", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    install_handlers(app)

    async def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), state.api_key.encode()):
            msg = "Incorrect API key provided." if given else "You didn't provide an API key (Authorization: Bearer)."
            raise APIError(msg, 401, code="invalid_api_key")

    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> dict:
        w = state.worker
        out = {"status": "ok", "model": state.model_name, "busy": w.busy, "waiting": w.waiting,
               "served": w.served, "cancelled": w.cancelled}
        pc = getattr(engine, "prompt_cache", None)  # --cache-ram's saved prompts (None: off or no engine)
        if pc is not None:
            # read without the scheduler's thread stopping: counters of a moment, what bench/bench_cache_memory.py tracks
            entries = list(pc.entries)
            out["prompt_cache"] = {"budget": pc.budget, "entries": len(entries), "bytes": sum(e.nbytes for e in entries),
                                   "saved": pc.saved, "restored": pc.restored, "evicted": pc.evicted}
        return out

    api = APIRouter(dependencies=[Depends(check_key)])

    def model_card() -> dict:
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "ossgguf"}
        if state.backend.n_ctx:
            card["context_length"] = state.backend.n_ctx
        return card

    @api.get("/v1/models")
    @api.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()] + [{**model_card(), "id": m} for m in state.lora_models]}

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        return {**model_card(), "id": state.check_model({"model": model_id})}

    @api.post("/v1/chat/completions")
    @api.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json_object(request)
        model_name = state.check_model(body)
        turn = parse_chat(body, state.default_effort)
        names = chat_names(body, state.tools.names) if state.tools is not None else []
        job = await Rounds.start(state, turn, model_name, names, per_request=True)  # built-in tools: builtin.py
        events = reasoning_view(job.events(request.is_disconnected), names)
        if turn.stream:
            def error(msg: str) -> str:
                return sse(APIError(msg, 500).body()) + "data: [DONE]\n\n"
            chunks = stream_chunks(events, model_name, include_usage(body))
            return _JobStream(job, _guard(chunks, error))
        try:
            end = await _last(events)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse(completion(end, model_name))

    @api.post("/v1/responses")
    @api.post("/responses")
    async def responses(request: Request) -> Response:
        body = await read_json_object(request)
        model_name = state.check_model(body)
        req = parse_responses(body, state.default_effort, state.store, state.tools.names if state.tools is not None else ())
        job = await Rounds.start(state, req.turn, model_name, req.builtin, req.container or conversation_key(req.items))
        events = job.events(request.is_disconnected)
        out = OutputBuilder(new_id("resp"), model_name, {**req.echo, "store": req.store}, job.hosted)

        def remember(resp: dict) -> None:
            if req.store:  # every output item, malformed calls too (harmony.tool_call_problem)
                state.store.put(resp["id"], req.items + out.stored(resp["output"]))

        return await built_reply(job, events, out, req.turn.stream,
                                 lambda msg: sse_events(out.fail(msg)), remember)

    app.include_router(api)
    from ossgguf.runner.server.anthropic import router as anthropic_router  # /v1/messages (Claude Code)

    app.include_router(anthropic_router(state, strict_model))
    return app


# -- running it ----------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8080, options: PlacementOptions | None = None,
          api_key: str | None = None, model_name: str | None = None, reasoning_effort: str = DEFAULT_REASONING,
          log_level: str = "info", on_ready: Callable[[str], None] | None = None, strict_model: bool = False,
          builtin: BuiltinOptions | None = None) -> None:
    """Load the model through the planner and serve it until interrupted (Ctrl-C).

    `on_ready(line)` gets one line saying where the weights live and the URL, once the model is loaded.
    `builtin`: gpt-oss's own tools to run (checked before the model loads: a python tool without a
    sandbox is refused at once).
    """
    import uvicorn

    from ossgguf.runner.engine import Engine

    if not _is_loopback(host) and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                    "(set --api-key)", host)
    tools = server_tools(builtin)
    with Engine.load(path, options) as engine:
        app = create_app(engine, model_name, api_key, reasoning_effort=reasoning_effort, strict_model=strict_model,
                         builtin=tools)
        name = app.state.server.model_name
        from ossgguf.runner.terminal import load_line

        cache = engine.prompt_cache  # saved prompts of other conversations (--cache-ram)
        line = (f"{load_line(engine)}; prompt cache {cache.budget / 2**30:.1f} GiB" if cache is not None else
                f"{load_line(engine)}; no prompt cache") + (f"; tools {','.join(tools.names)}" if tools is not None else "") \
            + (f"; {engine.plan.parallel} parallel streams" if engine.plan.parallel > 1 else "") \
            + f"; serving {name!r} at http://{host}:{port}/v1 (Ctrl-C stops)"
        (on_ready or log.info)(line)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
