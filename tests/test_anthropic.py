"""Anthropic's Messages API (`/v1/messages`), driven by the official `anthropic` client over loopback.

References: every response, stream event, error and token count is parsed strictly into the anthropic
client's own types; prompts are compared with the official gpt-oss template rendered by transformers
for the same conversation in chat form (one conversion layer: Anthropic -> chat -> harmony); token
counts with Hugging Face tokenizers. Tool calls need a model that calls tools: those tests script the
model's harmony output through `create_app(generate=...)` (test_server.Script).
"""

from __future__ import annotations

import json
import logging
import typing

import httpx
import pytest
from test_server import CALL_TEXT, CPU, DATE, FINAL_TEXT, SPEC, USER, WEATHER, Script, ServerThread, reference
from tokenizers import Tokenizer

from ossgguf.runner.engine import Engine
from ossgguf.runner.server.app import create_app

anthropic = pytest.importorskip("anthropic")

TOOL = {"name": "get_weather", "description": "Current weather in a city",
        "input_schema": WEATHER["function"]["parameters"]}
ASK = {"role": "user", "content": "What is the weather in Paris?"}
CLAUDE = "claude-sonnet-4-5"  # what Claude Code asks for: served by the loaded model


def _serve(script: Script, **kw) -> ServerThread:
    return ServerThread(create_app(None, "gpt-oss-test", generate=script, date=DATE, **kw))


def _client(srv: ServerThread, key: str = "none", **kw):
    return anthropic.Anthropic(base_url=srv.base_url.removesuffix("/v1"), api_key=key, max_retries=0, **kw)


def _extra_fields(obj, path: str = "") -> list[str]:
    """Fields of a parsed object (recursively) that its pydantic type does not declare."""
    from pydantic import BaseModel

    out = []
    if isinstance(obj, BaseModel):
        out += [f"{path}.{k}" for k in (obj.model_extra or {})]
        for name in type(obj).model_fields:
            out += _extra_fields(getattr(obj, name), f"{path}.{name}")
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            out += _extra_fields(item, f"{path}[{i}]")
    return out


def _conforms(cls, raw: str):
    """`raw` (JSON) validated strictly against the client's type `cls` (a class or a discriminated union):
    required fields present, no coercion, no undeclared field."""
    from pydantic import TypeAdapter

    obj = TypeAdapter(cls).validate_json(raw, strict=True)
    assert not _extra_fields(obj), (cls, _extra_fields(obj), raw)
    return obj


def _events(url: str, body: dict, headers: dict | None = None) -> list[tuple[str, str]]:
    """(event name, data) of an SSE response."""
    out, name = [], None
    with httpx.stream("POST", url, json=body, timeout=10, headers=headers) as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, line[6:]))
    return out


# -- scripted model output: tools, thinking, streaming ---------------------------------------------
def test_tool_use_then_tool_result_follow_up(fixed_date):
    script = Script(CALL_TEXT, FINAL_TEXT)
    with _serve(script) as srv:
        client = _client(srv)
        m1 = client.messages.create(model=CLAUDE, max_tokens=256, system="Be brief.", messages=[ASK], tools=[TOOL])
        assert m1.stop_reason == "tool_use" and [b.type for b in m1.content] == ["thinking", "tool_use"]
        assert m1.content[0].thinking == "Need the weather tool."
        use = m1.content[1]
        assert (use.name, use.input) == ("get_weather", {"city": "Paris"}) and use.id.startswith("toolu_")
        result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                               "content": [{"type": "text", "text": "sunny, 21 C"}]}]}
        m2 = client.messages.create(model=CLAUDE, max_tokens=256, system=[{"type": "text", "text": "Be brief."}],
                                    messages=[ASK, m1.to_param(), result], tools=[TOOL])
        assert [b.type for b in m2.content] == ["thinking", "text"] and m2.stop_reason == "end_turn"
        assert m2.content[1].text == "Sunny, 21 C." and m2.model == "gpt-oss-test"
        assert m2.usage.output_tokens > 0 and m2.usage.cache_read_input_tokens == 0
    call = {"id": use.id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    system = {"role": "system", "content": "Be brief."}
    conversation = [system, USER, {"role": "assistant", "content": "", "thinking": "Need the weather tool.",
                                   "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": use.id, "content": "sunny, 21 C"}]
    # the same harmony prompt that the official template writes for the chat form of the conversation
    assert script.requests[0].prompt == reference([system, USER], [WEATHER])
    assert script.requests[1].prompt == reference(conversation, [WEATHER])


def test_claude_codes_message_forms(fixed_date):
    """What Claude Code sends: `system` messages inside `messages`, deferred tools, error results."""
    script = Script(FINAL_TEXT)
    env = {"role": "system", "content": [{"type": "text", "text": "Env: linux", "cache_control": {"type": "ephemeral"}}]}
    deferred = {**TOOL, "name": "later", "defer_loading": True}
    with _serve(script) as srv:
        client = _client(srv)
        client.messages.create(model=CLAUDE, max_tokens=8, system="Be brief.", messages=[ASK, env],
                               tools=[TOOL, deferred])
        use = {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, {
            "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]}
        result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                               "content": "no network"}, {"type": "text", "text": "Try again."}]}
        client.messages.create(model=CLAUDE, max_tokens=8, messages=[ASK, use, result, env], tools=[TOOL])
    system = {"role": "system", "content": "Be brief.\n\nEnv: linux"}
    assert script.requests[0].prompt == reference([system, USER], [WEATHER])  # the deferred tool is left out
    call = {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert script.requests[1].prompt == reference([USER, {"role": "assistant", "content": "Checking.", "tool_calls": [call]},
                                                   {"role": "tool", "tool_call_id": "toolu_1", "content": "error: no network"},
                                                   {"role": "user", "content": "Try again."},
                                                   {"role": "user", "content": "[system]\nEnv: linux"}], [WEATHER])


def test_streaming_matches_create_and_every_event_parses():
    from anthropic.types import Message, RawMessageStreamEvent

    script = Script(CALL_TEXT, CALL_TEXT, FINAL_TEXT, FINAL_TEXT)
    body = {"model": CLAUDE, "max_tokens": 256, "messages": [ASK], "tools": [TOOL]}
    with _serve(script) as srv:
        client = _client(srv)
        with client.messages.stream(**body) as stream:
            kinds = [ev.type for ev in stream]
            streamed = stream.get_final_message()
        created = client.messages.create(**body)
        def summary(m):  # tool_use ids are new in every answer
            return [b.model_dump(exclude={"id"}) for b in m.content], m.stop_reason, m.usage, m.model

        assert summary(streamed) == summary(created) and streamed.content[1].input == {"city": "Paris"}
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "input_json" in kinds
        raw = _events(srv.base_url + "/messages", {**body, "stream": True, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]})
        for name, data in raw:
            assert name == json.loads(data)["type"]  # the SSE event name is the data's type, as Anthropic sends
        seen = [name for name, _ in raw]
        assert seen[:2] == ["message_start", "ping"] and seen[-2:] == ["message_delta", "message_stop"]
        for name, data in raw:
            if name != "ping":
                _conforms(RawMessageStreamEvent, data)
        text = [json.loads(d)["delta"]["text"] for n, d in raw if n == "content_block_delta"
                and json.loads(d)["delta"]["type"] == "text_delta"]
        assert "".join(text) == "Sunny, 21 C."
        _conforms(Message, httpx.post(srv.base_url + "/messages", json=body).text)
        assert "thinking_delta" in {json.loads(d)["delta"]["type"] for n, d in raw if n == "content_block_delta"}


def test_thinking_budgets_and_tool_choice_render_as_harmony(fixed_date):
    script = Script(FINAL_TEXT)
    with _serve(script) as srv:
        client = _client(srv)
        for thinking in ({"type": "enabled", "budget_tokens": 1024}, {"type": "enabled", "budget_tokens": 10000},
                         {"type": "enabled", "budget_tokens": 31999}, {"type": "disabled"}, None):
            extra = {"thinking": thinking} if thinking else {}
            client.messages.create(model=CLAUDE, max_tokens=16000, messages=[ASK], **extra)
        client.messages.create(model=CLAUDE, max_tokens=8, messages=[ASK], extra_body={"output_config": {"effort": "max"}})
        prompts = [r.prompt for r in script.requests]
        assert prompts == [reference([USER], reasoning_effort=e) for e in ("low", "medium", "high", "low", "medium",
                                                                            "high")]
        script.requests.clear()
        for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}, {"type": "none"}, {"type": "auto"}):
            client.messages.create(model=CLAUDE, max_tokens=8, messages=[ASK], tools=[TOOL], tool_choice=choice)
        any_, named, none, auto = (r.prompt for r in script.requests)
        assert any_ == reference([USER], [WEATHER]) + "<|channel|>commentary to=functions."
        assert named.endswith("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>")
        assert none == reference([USER]) and auto == reference([USER], [WEATHER])


def test_stop_sequences_max_tokens_and_sampling():
    script = Script("<|channel|>final<|message|>one two three four")
    with _serve(script) as srv:
        client = _client(srv)
        m = client.messages.create(model=CLAUDE, max_tokens=64, messages=[ASK], stop_sequences=["zzz", "thr"],
                                   metadata={"user_id": "u1"}, extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 20})
        assert (m.content[0].text, m.stop_reason, m.stop_sequence) == ("one two ", "stop_sequence", "thr")
        params = script.requests[0].params
        assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.5, 0.9, 20, 64)
        script.finish = "length"
        m = client.messages.create(model=CLAUDE, max_tokens=64, messages=[ASK])
        assert m.stop_reason == "max_tokens" and m.stop_sequence is None


def test_bad_input_gets_anthropic_errors():
    from anthropic.types import ErrorResponse

    script = Script(FINAL_TEXT)
    use = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                             "input": {"city": "Paris"}}]}
    cases = [  # (body, the start of the message)
        ({"messages": [ASK]}, "max_tokens: Field required"),
        ({"max_tokens": 8, "messages": [ASK, use, {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "1"}]}]},
         "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_2"),
        ({"max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
         "messages.0.content.0.type: 'tool_use' blocks are not allowed here"),
        ({"max_tokens": 8, "messages": [ASK, {"role": "assistant", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": "1"}]}]},
         "messages.1.content.0.type: 'tool_result' blocks are not allowed here"),
        ({"max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]},
         "messages.0.content.0.type: 'image' blocks are not supported: gpt-oss reads text only"),
        ({"max_tokens": 8, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role: is 'tool'"),
        ({"max_tokens": 8, "messages": [ASK], "tools": [{"name": "get weather", "input_schema": {"type": "object"}}]},
         "tools.0.name"),
        ({"max_tokens": 8, "messages": [ASK], "tools": [{"name": "f"}]}, "tools.0.input_schema: Field required"),
        ({"max_tokens": 8, "messages": [ASK], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
        ({"max_tokens": 8, "messages": [ASK], "thinking": {"type": "enabled", "budget_tokens": 10}},
         "thinking.budget_tokens: is 10"),
        ({"max_tokens": 0, "messages": [ASK]}, "max_tokens"),
        ({"max_tokens": 8, "messages": [ASK], "temperature": 3}, "temperature"),
        ({"max_tokens": 8, "messages": []}, "messages: must be a non-empty list"),
    ]
    with _serve(script) as srv:
        for body, start in cases:
            r = httpx.post(srv.base_url + "/messages", json={"model": CLAUDE, **body})
            assert r.status_code == 400, (body, r.text)
            err = _conforms(ErrorResponse, r.text)
            assert err.error.type == "invalid_request_error" and err.error.message.startswith(start), (body, r.text)
        with pytest.raises(anthropic.BadRequestError) as e:  # the client raises its own error type
            _client(srv).messages.create(model=CLAUDE, max_tokens=8, messages=[])
        assert e.value.status_code == 400
    assert not script.requests  # no bad request reached the model


def test_api_key_model_names_and_errors_in_the_stream(caplog):
    from anthropic.types import ErrorResponse

    with _serve(Script(FINAL_TEXT), api_key="sesame") as srv:
        with pytest.raises(anthropic.AuthenticationError) as e:
            _client(srv, "wrong").messages.create(model=CLAUDE, max_tokens=8, messages=[ASK])
        assert _conforms(ErrorResponse, e.value.response.text).error.type == "authentication_error"
        ok = anthropic.Anthropic(base_url=srv.base_url.removesuffix("/v1"), auth_token="sesame", max_retries=0)
        with caplog.at_level(logging.WARNING, logger="ossgguf.runner.server.anthropic"):
            assert ok.messages.create(model=CLAUDE, max_tokens=8, messages=[ASK]).content[-1].text == "Sunny, 21 C."
            _client(srv, "sesame").messages.create(model="claude-haiku-4-5", max_tokens=8, messages=[ASK])
        said = [r.getMessage() for r in caplog.records if "serves them all" in r.getMessage()]
        assert len(said) == 1 and CLAUDE in said[0] and "--strict-model" in said[0]  # once
        assert httpx.post(srv.base_url + "/messages/count_tokens", json={}).status_code == 401
    with _serve(Script(FINAL_TEXT), strict_model=True) as srv:
        with pytest.raises(anthropic.NotFoundError) as e:
            _client(srv).messages.create(model=CLAUDE, max_tokens=8, messages=[ASK])
        assert _conforms(ErrorResponse, e.value.response.text).error.type == "not_found_error"
        assert _client(srv).messages.create(model="gpt-oss-test", max_tokens=8, messages=[ASK]).content
    with _serve(Script(FINAL_TEXT, fail=True)) as srv:
        with pytest.raises(anthropic.InternalServerError) as e:
            _client(srv).messages.create(model=CLAUDE, max_tokens=8, messages=[ASK])
        assert _conforms(ErrorResponse, e.value.response.text).error.type == "api_error"
        *_, (name, data) = _events(srv.base_url + "/messages", {"model": CLAUDE, "max_tokens": 8, "messages": [ASK],
                                                                "stream": True})
        assert name == "error" and _conforms(ErrorResponse, data).error.type == "api_error"
        with pytest.raises(anthropic.APIStatusError):  # the client raises on the error event
            with _client(srv).messages.stream(model=CLAUDE, max_tokens=8, messages=[ASK]) as stream:
                list(stream)


# -- the real engine on the tiny GGUF ------------------------------------------------------------
@pytest.fixture(scope="module")
def real(make_gguf):
    with Engine.load(make_gguf(**SPEC), CPU) as engine, ServerThread(create_app(engine, "tiny", date=DATE)) as srv:
        yield srv, engine


def test_count_tokens_usage_and_the_kv_cache_on_the_tiny_model(real, make_ckpt, fixed_date):
    from anthropic.types import Message, MessageTokensCount

    srv, engine = real
    client = _client(srv)
    tok = Tokenizer.from_file(str(make_ckpt(**SPEC) / "tokenizer.json"))
    system, messages = "Be brief.", [{"role": "user", "content": "Capital of France?"}]
    prompt = reference([{"role": "system", "content": system}, *messages])
    n_prompt = len(tok.encode(prompt, add_special_tokens=False).ids)
    raw = httpx.post(srv.base_url + "/messages/count_tokens",
                     json={"model": CLAUDE, "system": system, "messages": messages}).text
    assert _conforms(MessageTokensCount, raw).input_tokens == n_prompt
    assert client.messages.count_tokens(model=CLAUDE, system=system, messages=messages).input_tokens == n_prompt
    engine.reset()
    raw = httpx.post(srv.base_url + "/messages", json={"model": CLAUDE, "system": system, "messages": messages,
                                                       "max_tokens": 16}).text
    m1 = _conforms(Message, raw)
    assert (m1.usage.input_tokens, m1.usage.cache_read_input_tokens) == (n_prompt, 0)
    assert 0 < m1.usage.output_tokens <= 16
    turn2 = messages + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}]
    m2 = client.messages.create(model=CLAUDE, system=system, messages=turn2, max_tokens=4)
    n2 = client.messages.count_tokens(model=CLAUDE, system=system, messages=turn2).input_tokens
    # Anthropic's input_tokens leave out what was read from the cache: together, the whole prompt
    assert m2.usage.input_tokens + m2.usage.cache_read_input_tokens == n2
    assert m2.usage.cache_read_input_tokens >= n_prompt - 4  # turn 1's prompt was reused


def test_a_prompt_longer_than_the_context_names_ctx(real):
    from anthropic.types import ErrorResponse

    srv, _ = real
    long = "word " * 2000
    for body, phrase in (
        ({"system": "Be brief.", "messages": [{"role": "user", "content": long}]},
         "prompt is too long: "),  # compacting helps: Anthropic's own wording, which Claude Code compacts on
        ({"system": long, "messages": [ASK]}, "The system prompt and tools alone are"),  # it cannot: stop
        ({"messages": [ASK], "tools": [{**TOOL, "description": long}]}, "The system prompt and tools alone are"),
    ):
        r = httpx.post(srv.base_url + "/messages", json={"model": CLAUDE, "max_tokens": 8, **body})
        assert r.status_code == 400, r.text
        err = _conforms(ErrorResponse, r.text).error
        assert err.type == "invalid_request_error" and err.message.startswith(phrase), err.message
        assert "--ctx" in err.message and "1024" in err.message, err.message
    with pytest.raises(anthropic.BadRequestError):
        _client(srv).messages.create(model=CLAUDE, max_tokens=8, messages=[{"role": "user", "content": long}])


def test_stream_event_types_cover_the_api():
    """Every streaming event kind the API defines comes out, each of a type the client declares."""
    from anthropic.types import RawMessageStreamEvent

    union = typing.get_args(typing.get_args(RawMessageStreamEvent)[0])
    declared = {typing.get_args(c.model_fields["type"].annotation)[0] for c in union}
    seen, deltas = set(), set()
    for script in (Script(CALL_TEXT), Script(FINAL_TEXT)):
        with _serve(script) as srv:
            for name, data in _events(srv.base_url + "/messages", {"model": CLAUDE, "max_tokens": 64, "stream": True,
                                                                   "messages": [ASK], "tools": [TOOL]}):
                seen.add(name)
                if name == "content_block_delta":
                    deltas.add(json.loads(data)["delta"]["type"])
    assert declared <= seen and "ping" in seen
    assert deltas == {"text_delta", "thinking_delta", "input_json_delta"}


def test_pings_keep_a_silent_stream_alive_without_cancelling_it():
    import asyncio

    from ossgguf.runner.server.anthropic_out import with_pings

    async def slow():
        for i in range(3):
            await asyncio.sleep(0.12)
            yield i

    async def collect():
        return [item async for item in with_pings(slow(), seconds=0.05)]

    out = asyncio.run(collect())
    assert [x for x in out if not isinstance(x, dict)] == [0, 1, 2]  # nothing lost to the pings
    assert out.count({"type": "ping"}) >= 3
