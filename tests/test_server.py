"""The OpenAI-compatible server, driven by the official `openai` client over loopback.

References: prompts are compared with the official gpt-oss template rendered by transformers; token
counts with Hugging Face tokenizers; answers on the tiny GGUF with what llama.cpp generates for the
same prompt directly. Tool calls need a model that calls tools, so those tests script the model's
harmony output through `create_app(generate=...)`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files

import httpx
import pytest
from serving import free_port, wait_healthy
from tokenizers import Tokenizer

from ossgguf.harmony import parse_tokens
from ossgguf.runner.engine import Engine, GenerationChunk
from ossgguf.runner.generation import Usage
from ossgguf.runner.plan import GiB, PlacementOptions
from ossgguf.runner.server.app import create_app

openai = pytest.importorskip("openai")
ctu = pytest.importorskip("transformers.utils.chat_template_utils")
psutil = pytest.importorskip("psutil")

TEMPLATE = (files("ossgguf") / "data" / "chat_template.jinja").read_text(encoding="utf-8")
DATE = "2025-03-14"
CPU = PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=1024)
SPEC = {"num_hidden_layers": 3, "seed": 5}  # the engine tests' model (cached per session)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
USER = {"role": "user", "content": "What is the weather in Paris?"}
CALL_TEXT = ("<|channel|>analysis<|message|>Need the weather tool.<|end|><|start|>assistant<|channel|>commentary "
             'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}')  # llama.cpp drops <|call|>
FINAL_TEXT = "<|channel|>analysis<|message|>It answered.<|end|><|start|>assistant<|channel|>final<|message|>Sunny, 21 C."



def reference(messages, tools=None, **kwargs) -> str:
    """The official template's prompt (transformers' renderer), for messages in the template's form."""
    rendered, _ = ctu.render_jinja_template(conversations=[copy.deepcopy(messages)], tools=copy.deepcopy(tools),
                                            chat_template=TEMPLATE, add_generation_prompt=True, **kwargs)
    return rendered[0]


class Script:
    """A scripted model: call k answers texts[k] (the last one repeats) in 3-character chunks.
    `None` writes forever, slowly. Records the requests and how many generations were stopped early."""

    def __init__(self, *texts: str | None, delay: float = 0.0, fail: bool = False, finish: str = "stop") -> None:
        self.texts, self.delay, self.fail, self.finish = list(texts), delay, fail, finish
        self.requests: list = []
        self.stopped = self.active = self.max_active = 0
        self._lock = threading.Lock()

    def __call__(self, req):
        self.requests.append(req)
        return self._run(self.texts[min(len(self.requests), len(self.texts)) - 1])

    def _run(self, text):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        n, done = 0, False
        try:
            if self.fail:
                raise RuntimeError("the model fell over")
            while text is None or n * 3 < len(text):
                time.sleep(self.delay)
                piece = "la " if text is None else text[n * 3:n * 3 + 3]
                n += 1
                yield GenerationChunk(piece, 1, None, Usage(42, 0, n))
            done = True
            yield GenerationChunk("", 200012, self.finish, Usage(42, 0, n + 1))
        finally:
            with self._lock:
                self.active -= 1
                self.stopped += not done


class ServerThread:
    """Run an app under uvicorn on a background thread, on a free port of 127.0.0.1.

    `with ServerThread(app) as srv: OpenAI(base_url=srv.base_url, ...)`.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (else Nagle adds ~40 ms a request)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


def _serve(script: Script, **kw) -> ServerThread:
    return ServerThread(create_app(None, "gpt-oss-test", generate=script, date=DATE, **kw))


def _client(srv: ServerThread, key: str = "none", **kw):
    return openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, **kw)


def _wait_idle(srv: ServerThread, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(srv.base_url.removesuffix("/v1") + "/health").json()
        if not health["busy"] and not health["waiting"] or time.monotonic() > deadline:
            return health
        time.sleep(0.02)


def _wait_gone(srv: ServerThread, timeout: float = 5.0) -> None:
    """Until no queued request has a client any more (health's `waiting` counts live ones only)."""
    deadline = time.monotonic() + timeout
    while httpx.get(srv.base_url.removesuffix("/v1") + "/health").json()["waiting"]:
        assert time.monotonic() < deadline, "a queued request whose client left still counts as waiting"
        time.sleep(0.02)


# -- the real engine on the tiny GGUF ------------------------------------------------------------
@pytest.fixture(scope="module")
def model(make_gguf):
    return make_gguf(**SPEC)


@pytest.fixture(scope="module")
def engine(model):
    with Engine.load(model, CPU) as e:
        yield e


@pytest.fixture(scope="module")
def real(engine):
    with ServerThread(create_app(engine, "tiny", date=DATE)) as srv:
        yield srv


def test_models_and_health(real):
    client = _client(real)
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    health = httpx.get(real.base_url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_app_from_a_path_loads_and_closes_its_engine(model):
    app = create_app(model, options=CPU, date=DATE)
    with ServerThread(app) as srv:
        assert [m.id for m in _client(srv).models.list()] == [model.name.removesuffix(".gguf")]
    assert not app.state.server.engine._ctx  # closed at shutdown


def test_chat_on_the_tiny_model_is_what_llama_cpp_generates(real, engine, make_ckpt, fixed_date):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    prompt = reference(messages, reasoning_effort="low")
    engine.reset()
    direct = list(engine.generate(prompt, max_tokens=24, seed=11))
    # parsed on token ids, as the server does (the stop chunk's token is not output)
    expected = parse_tokens([(None if c.finish_reason else c.token, c.text) for c in direct],
                            engine.special_tokens(), ended_by=direct[-1].finish_reason)
    client = _client(real)
    engine.reset()  # same cache state as the direct run: sampling is then bit-identical
    r = client.chat.completions.create(model="tiny", messages=messages, reasoning_effort="low", max_tokens=24,
                                       seed=11)
    msg = r.choices[0].message
    assert (msg.content or "") == expected.content
    assert getattr(msg, "reasoning_content", None) == getattr(msg, "reasoning", None) == (expected.reasoning or None)
    tok = Tokenizer.from_file(str(make_ckpt(**SPEC) / "tokenizer.json"))
    assert r.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False).ids)
    assert r.usage.completion_tokens == direct[-1].usage.completion_tokens

    engine.reset()
    stream = client.chat.completions.create(model="tiny", messages=messages, reasoning_effort="low", max_tokens=24,
                                            seed=11, stream=True, stream_options={"include_usage": True})
    content, reasoning, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            content += ch.delta.content or ""
            reasoning += getattr(ch.delta, "reasoning_content", None) or ""
            finish = ch.finish_reason or finish
    assert (content, reasoning or None, finish) == (msg.content or "", getattr(msg, "reasoning_content", None),
                                                    r.choices[0].finish_reason)
    assert usage.completion_tokens == r.usage.completion_tokens and usage.prompt_tokens == r.usage.prompt_tokens
    # the next turn of the conversation starts with the same tokens: the engine reuses its cache
    r2 = client.chat.completions.create(model="tiny", max_tokens=4, reasoning_effort="low", messages=messages + [
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}])
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 4


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(real):
    client, url = _client(real), real.base_url
    raw = httpx.post(url + "/chat/completions", content=b'{"model": "tiny", "messages": [', timeout=10,
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    raw = httpx.get(url + "/nowhere")
    assert raw.status_code == 404 and raw.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=[USER])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=None)
    assert e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 2000}])
    assert e.value.code == "context_length_exceeded"
    bad_tools = [
        [{"type": "function", "function": {"name": "get weather", "parameters": {"type": "object"}}}],
        [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
        [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": []}}}],
        [{"type": "function", "function": {"description": "no name"}}],
        [{"type": "retrieval"}],
    ]
    for tools in bad_tools:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=[USER], tools=tools)
        assert e.value.param.startswith("tools"), tools
    for kwargs in ({"temperature": 3}, {"max_tokens": 0}, {"n": 2}, {"reasoning_effort": "extreme"}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=[USER], **kwargs)
    with pytest.raises(openai.BadRequestError):  # a tool result that answers no call
        client.chat.completions.create(model="tiny", messages=[USER, {"role": "tool", "tool_call_id": "x",
                                                                      "content": "1"}])
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="tiny", input=[{"type": "web_search_call", "id": "x"}])
    assert client.chat.completions.create(model="tiny", messages=[USER], max_tokens=3).choices


def test_a_system_prompt_too_big_for_the_context_gets_an_error_agents_stop_on(real):
    """OpenAI's "maximum context length" error makes agents compact and ask again: right when the
    conversation is what is long, a loop when the system prompt and tools alone do not fit (--ctx 1024)."""
    client = _client(real)
    long = "word " * 2000

    def error(create, **kw):
        with pytest.raises(openai.BadRequestError) as e:
            create(model="tiny", **kw)
        return e.value

    for err in (error(client.chat.completions.create, messages=[{"role": "system", "content": long}, USER]),
                error(client.responses.create, instructions=long, input="hi"),
                error(client.responses.create, input=[{"role": "developer", "content": long}, USER]),
                error(client.chat.completions.create, messages=[USER], tools=[
                    {"type": "function", "function": {**WEATHER["function"], "description": long}}])):
        msg = err.body["message"]
        assert err.code == "context_too_small" and "--ctx 1024" in msg and "--ctx 16384 or more" in msg, msg
        assert re.search(r"alone are \d[\d,]* tokens, more than", msg), msg
        for phrase in ("maximum context length", "context length", "too many tokens", "context_length_exceeded"):
            assert phrase not in msg.lower()  # what agents take for "compact and retry"
    # the system prompt fits but leaves too little for a conversation (a quarter of the context here)
    err = error(client.chat.completions.create, messages=[{"role": "system", "content": "word " * 240},
                                                          {"role": "user", "content": long}])
    assert err.code == "context_too_small" and "which leaves" in err.body["message"], err.body
    # a long conversation beside a short system prompt: compacting helps, so OpenAI's own error
    err = error(client.chat.completions.create, messages=[{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": long}])
    assert (err.code, err.param) == ("context_length_exceeded", "messages")
    assert "maximum context length is 1024 tokens" in err.body["message"]
    err = error(client.responses.create, input=long)
    assert (err.code, err.param) == ("context_length_exceeded", "input")


def test_suggested_context():
    from ossgguf.runner.server.errors import conversation_room, suggested_ctx

    assert [suggested_ctx(n) for n in (100, 7000, 16812, 24576, 30000)] == [16384, 16384, 32768, 32768, 65536]
    for n in (100, 7000, 16812, 24576, 30000, 100_000):  # the suggestion is never itself too small
        ctx = suggested_ctx(n)
        assert ctx - n >= conversation_room(ctx) and ctx - n >= 8192
    assert [conversation_room(c) for c in (1024, 8192, 32768, 131072)] == [256, 2048, 8192, 8192]


def test_responses_errors_name_the_request_fields(real):
    client = _client(real)
    image = {"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}
    cases = [  # (request, param, start of the message)
        ({"instructions": "Be brief.", "input": [USER, image]}, "input[1].content[0]", "input[1].content[0] is of"),
        ({"input": [USER, {"type": "function_call_output", "call_id": "nope", "output": "1"}]}, "input[1]",
         "input[1]: call_id 'nope' matches no"),
        ({"input": [USER, {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "hm"}]},
                    {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}]},
         "input[2].content[0]", "input[2].content[0] is of type 'refusal'"),  # one assistant message of two items
        ({"input": [USER], "tools": [{"type": "web_search"}, {"type": "function", "name": "get weather",
                                                               "parameters": {"type": "object"}}]}, "tools[1]", None),
        ({"input": [USER], "n": 2}, "n", None),
        ({"input": [USER], "top_logprobs": 3}, "top_logprobs", None),
        ({"input": [USER], "include": ["message.output_text.logprobs"]}, "include", None),
        ({"input": [USER], "background": True}, "background", None),
        ({"input": [USER], "conversation": "conv_1"}, "conversation", None),
        ({"input": [USER], "prompt": {"id": "pmpt_1"}}, "prompt", None),
        ({"input": [USER], "text": {"format": {"type": "json_object"}}}, "text.format", None),
    ]
    for body, param, start in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="tiny", extra_body=body)  # as sent, whatever the client's signature
        assert e.value.param is not None and e.value.param.startswith(param), (body, e.value.body)
        assert "messages" not in e.value.body["message"], e.value.body
        if start:
            assert e.value.body["message"].startswith(start), e.value.body
    # what changes no answer here is accepted (Codex sends these)
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=3, store=False, truncation="auto",
                                include=["reasoning.encrypted_content"], prompt_cache_key="k")
    assert r.status in ("completed", "incomplete") and r.truncation == "auto"


def test_api_key():
    with _serve(Script(FINAL_TEXT), api_key="sesame") as srv:
        with pytest.raises(openai.AuthenticationError) as e:
            _client(srv, "wrong").chat.completions.create(model="gpt-oss-test", messages=[USER])
        assert e.value.code == "invalid_api_key"
        assert httpx.get(srv.base_url + "/models").status_code == 401
        assert httpx.get(srv.base_url.removesuffix("/v1") + "/health").status_code == 200
        r = _client(srv, "sesame").chat.completions.create(model="gpt-oss-test", messages=[USER])
        assert r.choices[0].message.content == "Sunny, 21 C."


# -- scripted model output: tool calls, reasoning, the Responses API ---------------------------------
@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_tool_call_then_final_answer(field, fixed_date):
    script = Script(CALL_TEXT, FINAL_TEXT)
    with _serve(script) as srv:
        client = _client(srv)
        r1 = client.chat.completions.create(model="gpt-oss-test", messages=[USER], tools=[WEATHER])
        assert r1.choices[0].finish_reason == "tool_calls"
        msg = r1.choices[0].message
        assert msg.content is None and msg.reasoning_content == msg.reasoning == "Need the weather tool."
        (call,) = msg.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        back = {"role": "assistant", "content": None, field: "Need the weather tool.",
                "tool_calls": [call.model_dump()]}
        result = {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}
        r2 = client.chat.completions.create(model="gpt-oss-test", messages=[USER, back, result], tools=[WEATHER])
        assert r2.choices[0].message.content == "Sunny, 21 C." and r2.choices[0].finish_reason == "stop"
    assert script.requests[0].prompt == reference([USER], [WEATHER])
    template_form = {"role": "assistant", "content": "", "thinking": "Need the weather tool.",
                     "tool_calls": [{"id": call.id, "type": "function",
                                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert script.requests[1].prompt == reference([USER, template_form, result], [WEATHER])


# -- malformed tool calls: one policy (harmony.tool_call_problem) on every path -------------------------
NOW = {"type": "function", "function": {"name": "now", "description": "Current time",
                                        "parameters": {"type": "object", "properties": {"q": {"type": "number"}}}}}
BOTCHED_ARGS = '{"q":'
ANSWER = "Sunny, 21 C."


@pytest.fixture(scope="module")
def botched(make_ckpt, tmp_path_factory):
    """The scripted model (tests/scripted_model.py) run by llama.cpp: with no call in the context it
    calls a tool nobody offered with arguments that are not JSON; after a call (`<|call|>` in the
    context) it answers. A forced call (the prompt ends in `<|message|>`) gets the same arguments."""
    from scripted_model import Episode, Script, scripted_gguf

    script = Script(("<|call|>",), [Episode((), f" to=functions.nowhere<|message|>{BOTCHED_ARGS}<|call|>"),
                                    Episode(("<|call|>",), f"<|channel|>final<|message|>{ANSWER}<|return|>")])
    path = scripted_gguf(make_ckpt(), tmp_path_factory.mktemp("botched"), script)
    with Engine.load(path, PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=2048, threads=1)) as e:
        yield e


def _streamed_calls(stream) -> tuple[list[tuple[str, str]], str | None]:
    calls, finish = {}, None
    for chunk in stream:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                c = calls.setdefault(tc.index, {"name": tc.function.name, "arguments": ""})
                c["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    return [(c["name"], c["arguments"]) for c in calls.values()], finish


def test_malformed_tool_calls_follow_one_policy_on_every_path(botched):
    """A call to an unknown tool with arguments that are not JSON, and a botched forced call: reported
    as written (finish tool_calls) by chat completions in both modes and by Responses, accepted back
    in history; `ossgguf chat`'s loop answers it with the problem instead of running the tool."""
    from ossgguf.runner.chat import Conversation, complete

    ran = []
    conv = Conversation(tools=[NOW], date=DATE)
    conv.add_user("What time is it?")
    reply = complete(botched, conv, tool_runner=lambda name, args: ran.append(name))
    (result,) = reply.tool_calls
    assert ran == [] and not result.ok and (result.name, result.arguments) == ("nowhere", BOTCHED_ARGS)
    assert "no tool named 'nowhere'" in result.content and reply.content == ANSWER

    forced = {"type": "function", "function": {"name": "now"}}
    with ServerThread(create_app(botched, "m", date=DATE)) as srv:
        client = _client(srv)
        for choice, expected in ((None, ("nowhere", BOTCHED_ARGS)), (forced, ("now", BOTCHED_ARGS))):
            kw = {"tool_choice": choice} if choice else {}
            r = client.chat.completions.create(model="m", messages=[USER], tools=[NOW], **kw)
            (call,) = r.choices[0].message.tool_calls
            assert ((call.function.name, call.function.arguments), r.choices[0].finish_reason) == (expected, "tool_calls")
            stream = client.chat.completions.create(model="m", messages=[USER], tools=[NOW], stream=True, **kw)
            assert _streamed_calls(stream) == ([expected], "tool_calls")
            flat = {"type": "function", "name": "now"} if choice else None
            resp = client.responses.create(model="m", input=[USER], tools=[{"type": "function", **NOW["function"]}],
                                           **({"tool_choice": flat} if flat else {}))
            (item,) = [o for o in resp.output if o.type == "function_call"]
            assert ((item.name, item.arguments), item.status, resp.status) == (expected, "completed", "completed")
        # the call goes back into the conversation as it was written; the model then answers
        back = [USER, r.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "error: no such tool"}]
        r2 = client.chat.completions.create(model="m", messages=back, tools=[NOW])
        assert (r2.choices[0].message.content, r2.choices[0].finish_reason) == (ANSWER, "stop")
        output = {"type": "function_call_output", "call_id": item.call_id, "output": "error: no such tool"}
        items = [USER, *(o.model_dump(exclude_none=True) for o in resp.output), output]
        assert client.responses.create(model="m", input=items, tools=[{"type": "function", **NOW["function"]}]
                                       ).output_text == ANSWER


def test_streamed_tool_call():
    with _serve(Script(CALL_TEXT)) as srv:
        stream = _client(srv).chat.completions.create(model="gpt-oss-test", messages=[USER], tools=[WEATHER],
                                                      stream=True)
        calls, reasoning, finish = {}, "", None
        for chunk in stream:
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for tc in delta.tool_calls or []:
                c = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
                c["arguments"] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and reasoning == "Need the weather tool."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Paris"})]
    assert calls[0]["id"].startswith("call_")


def test_reasoning_effort_changes_the_prompt(fixed_date):
    script = Script(FINAL_TEXT)
    with _serve(script) as srv:
        client = _client(srv)
        for effort in ("low", "high"):
            client.chat.completions.create(model="gpt-oss-test", messages=[USER], reasoning_effort=effort)
        client.chat.completions.create(model="gpt-oss-test", messages=[USER])
        client.responses.create(model="gpt-oss-test", input=[USER], reasoning={"effort": "high"})
    prompts = [r.prompt for r in script.requests]
    expected = [reference([USER], reasoning_effort=e) for e in ("low", "high", "medium", "high")]
    assert prompts == expected and len(set(prompts)) == 3


def test_forced_tool_choice_and_stop_strings():
    script = Script('{"city": "Rome"}', "<|channel|>final<|message|>one two three four")
    with _serve(script) as srv:
        client = _client(srv)
        r = client.chat.completions.create(model="gpt-oss-test", messages=[USER], tools=[WEATHER],
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
        (call,) = r.choices[0].message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Rome"})
        r = client.chat.completions.create(model="gpt-oss-test", messages=[USER], stop=["thr", "zzz"])
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("one two ", "stop")
    assert script.requests[0].prompt.endswith(
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>")
    assert script.stopped == 1  # the stop string ended the generation


def test_responses_function_call_round_trip(fixed_date):
    script = Script(CALL_TEXT, FINAL_TEXT, FINAL_TEXT, CALL_TEXT)
    tools = [{"type": "function", **WEATHER["function"]}]  # the Responses API's flat form
    with _serve(script) as srv:
        client = _client(srv)
        r1 = client.responses.create(model="gpt-oss-test", instructions="Be brief.", input=[USER], tools=tools)
        assert [o.type for o in r1.output] == ["reasoning", "function_call"] and r1.status == "completed"
        assert r1.output[0].content[0].text == "Need the weather tool."
        fc = r1.output[1]
        assert fc.name == "get_weather" and json.loads(fc.arguments) == {"city": "Paris"}
        output = {"type": "function_call_output", "call_id": fc.call_id, "output": "sunny, 21 C"}
        items = [USER] + [o.model_dump(exclude_none=True) for o in r1.output] + [output]
        r2 = client.responses.create(model="gpt-oss-test", instructions="Be brief.", input=items, tools=tools)
        assert r2.output_text == "Sunny, 21 C." and [o.type for o in r2.output] == ["reasoning", "message"]
        r3 = client.responses.create(model="gpt-oss-test", instructions="Be brief.", tools=tools,
                                     previous_response_id=r1.id, input=[output])
        assert r3.output_text == "Sunny, 21 C."
        hosted = [{"type": "web_search"}]  # listed by agents; left out, the function tools still work
        with client.responses.stream(model="gpt-oss-test", input=[USER], tools=tools + hosted) as stream:
            kinds = [ev.type for ev in stream]
            final = stream.get_final_response()
        assert "response.function_call_arguments.delta" in kinds and "response.reasoning_text.delta" in kinds
        assert kinds[-1] == "response.completed" and json.loads(final.output[1].arguments) == {"city": "Paris"}
    call = {"id": fc.call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    conversation = [{"role": "system", "content": "Be brief."}, USER,
                    {"role": "assistant", "content": "", "thinking": "Need the weather tool.", "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": fc.call_id, "content": "sunny, 21 C"}]
    assert script.requests[1].prompt == script.requests[2].prompt == reference(conversation, [WEATHER])


# -- every object against the openai client's own types ---------------------------------------------
# Fields this server adds on purpose: reasoning under both names (server.chat), the served context on
# the model card, and two fields of OpenAI's API spec that the python client's types lack.
EXTRA_FIELDS = {
    "ChatCompletionMessage": {"reasoning_content", "reasoning"},
    "ChoiceDelta": {"reasoning_content", "reasoning"},
    "Model": {"context_length"},
    "Response": {"store"},
    "ResponseFunctionCallArgumentsDoneEvent": {"name"},
}


def _extra_fields(obj, path: str = "") -> list[str]:
    """Fields of a parsed object (recursively) that its pydantic type does not declare, beyond EXTRA_FIELDS."""
    from pydantic import BaseModel

    out = []
    if isinstance(obj, BaseModel):
        allowed = EXTRA_FIELDS.get(type(obj).__name__, set())
        out += [f"{path}.{k}" for k in (obj.model_extra or {}) if k not in allowed]
        for name in type(obj).model_fields:
            out += _extra_fields(getattr(obj, name), f"{path}.{name}")
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            out += _extra_fields(item, f"{path}[{i}]")
    return out


def _conforms(cls, raw: str) -> str:
    """`raw` (JSON) validated strictly against the client's type `cls`: required fields present,
    no coercion, no undeclared field. Returns the object's `type`/`object` for bookkeeping."""
    obj = cls.model_validate_json(raw, strict=True)
    assert not _extra_fields(obj), (cls.__name__, _extra_fields(obj), raw)
    return getattr(obj, "type", None) or getattr(obj, "object", None) or cls.__name__


def _events(url: str, body: dict) -> list[str]:
    with httpx.stream("POST", url, json=body, timeout=10) as r:
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]


def test_every_object_matches_the_openai_client_types(real):
    import typing

    from openai.types import Model
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.responses import Response, ResponseStreamEvent
    from openai.types.shared import ErrorObject

    event_types = {typing.get_args(c.model_fields["type"].annotation)[0]: c
                   for c in typing.get_args(typing.get_args(ResponseStreamEvent)[0])}
    seen: set[str] = set()
    chat = {"model": "gpt-oss-test", "messages": [USER], "tools": [WEATHER]}
    resp = {"model": "gpt-oss-test", "input": [USER], "tools": [{"type": "function", **WEATHER["function"]}]}
    for script in (Script(CALL_TEXT), Script(FINAL_TEXT), Script(FINAL_TEXT, finish="length")):
        with _serve(script) as srv:
            url = srv.base_url
            seen.add(_conforms(ChatCompletion, httpx.post(url + "/chat/completions", json=chat).text))
            for raw in _events(url + "/chat/completions", {**chat, "stream": True,
                                                             "stream_options": {"include_usage": True}}):
                seen.add(_conforms(ChatCompletionChunk, raw))
            seen.add(_conforms(Response, httpx.post(url + "/responses", json=resp).text))
            for raw in _events(url + "/responses", {**resp, "stream": True}):
                seen.add(_conforms(event_types[json.loads(raw)["type"]], raw))
    with _serve(Script(FINAL_TEXT, fail=True)) as srv:
        for raw in _events(srv.base_url + "/responses", {**resp, "stream": True}):
            seen.add(_conforms(event_types[json.loads(raw)["type"]], raw))
        *chunks, raw = _events(srv.base_url + "/chat/completions", {**chat, "stream": True})
        seen |= {_conforms(ChatCompletionChunk, c) for c in chunks}
        seen.add(_conforms(ErrorObject, json.dumps(json.loads(raw)["error"])))  # an error inside the stream
    url = real.base_url
    listing = httpx.get(url + "/models").json()
    assert set(listing) == {"object", "data"} and listing["object"] == "list"
    seen |= {_conforms(Model, json.dumps(m)) for m in listing["data"]}
    seen.add(_conforms(Model, httpx.get(url + "/models/tiny").text))
    for raw in (httpx.post(url + "/responses", json={"model": "tiny"}).text, httpx.get(url + "/nowhere").text,
                httpx.post(url + "/chat/completions", json={"model": "tiny", "messages": [
                    {"role": "user", "content": "word " * 2000}]}).text):
        body = json.loads(raw)
        assert set(body) == {"error"}
        seen.add(_conforms(ErrorObject, json.dumps(body["error"])))
    assert {"chat.completion", "chat.completion.chunk", "response", "model", "invalid_request_error", "server_error",
            "response.created",
            "response.in_progress", "response.output_item.added", "response.content_part.added",
            "response.reasoning_text.delta", "response.reasoning_text.done", "response.output_text.delta",
            "response.output_text.done", "response.content_part.done", "response.output_item.done",
            "response.function_call_arguments.delta", "response.function_call_arguments.done",
            "response.completed", "response.incomplete", "response.failed"} <= seen


def test_generation_failure_is_a_500_and_the_server_recovers():
    script = Script(FINAL_TEXT, fail=True)
    with _serve(script) as srv:
        client = _client(srv)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="gpt-oss-test", messages=[USER])
        with pytest.raises(openai.APIError):  # inside the stream: an error event
            list(client.chat.completions.create(model="gpt-oss-test", messages=[USER], stream=True))
        script.fail = False
        assert client.chat.completions.create(model="gpt-oss-test", messages=[USER]).choices[0].message.content


# -- queueing, cancellation, load ------------------------------------------------------------------
def test_disconnects_cancel_running_and_queued_generations():
    script = Script(None, None, FINAL_TEXT, delay=0.01)
    with _serve(script) as srv:
        body = {"model": "gpt-oss-test", "messages": [USER], "stream": True}
        with httpx.Client(timeout=10) as http, http.stream("POST", srv.base_url + "/chat/completions",
                                                           json=body) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            with pytest.raises(httpx.ReadTimeout):  # queued behind the endless stream, then gone
                httpx.post(srv.base_url + "/chat/completions", json={**body, "stream": False}, timeout=0.5)
            _wait_gone(srv)  # the server noticed the queued client left before the running one ends
            next(lines)
        health = _wait_idle(srv)
        assert script.stopped == 1 and len(script.requests) == 1  # the queued one never ran
        assert health["cancelled"] == 2
        with pytest.raises(httpx.ReadTimeout):  # a running generation whose (non-streaming) client left
            httpx.post(srv.base_url + "/chat/completions", json={**body, "stream": False}, timeout=0.6)
        health = _wait_idle(srv)
        assert script.stopped == 2 and health["cancelled"] == 3
        r = _client(srv).chat.completions.create(model="gpt-oss-test", messages=[USER])
        assert r.choices[0].message.content == "Sunny, 21 C."


def test_concurrent_requests_are_served_one_at_a_time_and_not_mixed_up():
    script = Script("<|channel|>final<|message|>echo", delay=0.001)

    def echo(req):  # answers with the request's own question
        script(req)
        question = req.prompt.rsplit("<|start|>user<|message|>", 1)[1].split("<|end|>")[0]
        return script._run(f"<|channel|>final<|message|>{question}/{req.params.seed}")

    with ServerThread(create_app(None, "m", generate=echo, date=DATE)) as srv:
        client = _client(srv)

        def ask(i: int) -> bool:
            r = client.chat.completions.create(model="m", seed=i, messages=[{"role": "user", "content": f"q{i}"}])
            return r.choices[0].message.content == f"q{i}/{i}"

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(ask, range(48)))
    assert script.max_active == 1 and len(script.requests) == 48


def test_load_on_the_tiny_model(real):
    """4 clients x 6 requests, each identified by its seed and max_tokens, against a sequential run.
    All share one prompt, so after a warm-up every request reuses the same cached prefix whatever the
    order (a different cached prefix changes the float rounding of the prompt, hence the samples)."""
    client = _client(real, timeout=60)
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}]}

    def one(i: int):
        r = client.chat.completions.create(**ask, seed=1000 + i, max_tokens=4 + i)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    one(-1)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    sequential = [one(i) for i in range(24)]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(one, range(24)))
    assert concurrent == sequential
    # the answers tell the requests apart, so a mix-up would show (a random model's short outputs may
    # all parse to empty content on some CPU: max_tokens then still differs in the token counts)
    assert len(set(sequential)) > 12
    assert proc.memory_info().rss - rss0 < 64 * 2**20


# -- serve(): the model loaded from a path, uvicorn in its own process ------------------------------
def test_serve_loads_the_model_and_binds_loopback(model):
    port = free_port()
    cmd = [sys.executable, "-m", "ossgguf.cli", "serve", str(model), "--port", str(port), "--api-key", "k",
           "--gpu-mem", "0", "--ram", "16GiB", "--ctx", "512"]  # the CLI, as a user starts it
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_healthy(port, proc, proc.stderr.read)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list()] == [model.name.removesuffix(".gguf")]
        r = client.chat.completions.create(model=model.name.removesuffix(".gguf"), messages=[USER], max_tokens=5)
        assert r.usage.completion_tokens <= 5
        for conn in psutil.Process(proc.pid).net_connections():
            if conn.status == psutil.CONN_LISTEN:
                assert conn.laddr.ip == "127.0.0.1"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    log = proc.stderr.read()
    assert "weights in RAM (CPU)" in log and f"http://127.0.0.1:{port}/v1" in log, log
