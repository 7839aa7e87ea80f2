"""gpt-oss's own tools in `ossgguf serve` (runner/server/builtin.py, responses_tools.py): a scripted model
(tests/scripted_model.py: real harmony tokens, run by llama.cpp) calls python and browser through the
real HTTP server; the official openai client reads the Responses items and events, which are also
validated strictly against its types (`test_server._conforms`), and chat completions show the calls
in `reasoning_content`.
"""

from __future__ import annotations

import json
import logging
import time
import typing

import httpx
import pytest
from serving import free_port, wait_healthy
from test_agents import agents, configure  # noqa: F401 - Codex from npm (installed once, or skipped)
from test_builtin_tools import BROWSER_SCRIPT, CPU, DATE, NOTES, PY_SCRIPT, sandbox_or_skip
from test_server import ServerThread, _conforms, _events

from ossgguf.runner.engine import Engine
from ossgguf.runner.server.app import create_app
from ossgguf.runner.tools import BuiltinOptions

openai = pytest.importorskip("openai")
pytest.importorskip("jupyter_client", reason="the python tool's extra: pip install -e '.[tools]'")

import test_real_vocab  # noqa: E402
from openai.types.responses import (  # noqa: E402
    Response,
    ResponseCodeInterpreterToolCall,
    ResponseFunctionWebSearch,
    ResponseStreamEvent,
)

o200k = test_real_vocab.o200k  # its fixture, shared
EVENT_TYPES = {typing.get_args(c.model_fields["type"].annotation)[0]: c
               for c in typing.get_args(typing.get_args(ResponseStreamEvent)[0])}


def client_of(srv: ServerThread):
    return openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=120)


# -- python: code_interpreter ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def py_engine(make_ckpt, tmp_path_factory):
    from scripted_model import scripted_gguf

    model = scripted_gguf(make_ckpt(), tmp_path_factory.mktemp("scripted-py"), PY_SCRIPT)
    with Engine.load(model, CPU) as e:
        yield e


@pytest.fixture(scope="module")
def py_server(py_engine):
    sandbox_or_skip()
    options = BuiltinOptions(names=["python"], python_timeout=10.0, python_memory=512 << 20)
    app = create_app(py_engine, "gpt-oss-test", date=DATE, builtin=options)
    with ServerThread(app) as srv:
        srv.app = app
        yield srv


CODE_INTERPRETER = [{"type": "code_interpreter", "container": {"type": "auto"}}]


def test_code_interpreter_runs_python_and_answers(py_server):
    """Two python calls (state kept between them) as code_interpreter_call items with the real output,
    then the answer; the next request of the conversation uses the same kernel."""
    client = client_of(py_server)
    r = client.responses.create(model="gpt-oss-test", input="hi", tools=CODE_INTERPRETER, temperature=0)
    assert [o.type for o in r.output] == ["code_interpreter_call", "code_interpreter_call", "message"]
    first, second = r.output[:2]
    assert (first.code, first.outputs, first.status) == ("x = 41", [], "completed")
    assert second.code == "print(x+1)#~" and [(o.type, o.logs) for o in second.outputs] == [("logs", "42")]
    assert first.container_id == second.container_id and first.container_id.startswith("cntr_")
    assert r.output_text == "Done." and r.status == "completed"
    assert r.tools[0].container == first.container_id  # the session, echoed as OpenAI's container id
    for item in r.output[:2]:
        ResponseCodeInterpreterToolCall.model_validate_json(item.model_dump_json(), strict=True)

    # previous_response_id: the same session (no new one; x is still 41). (With calls in its context the
    # scripted model answers at once.)
    sessions = py_server.app.state.server.tools
    assert list(sessions._sessions) == [first.container_id]
    r2 = client.responses.create(model="gpt-oss-test", input="hi", tools=CODE_INTERPRETER, temperature=0,
                                 previous_response_id=r.id)
    assert r2.output_text == "Done." and list(sessions._sessions) == [first.container_id]
    # a client that sends the whole conversation back (no previous_response_id) finds it by container_id
    items = [{"role": "user", "content": "hi"}] + [o.model_dump(exclude_none=True) for o in r.output]
    r3 = client.responses.create(model="gpt-oss-test", input=items + [{"role": "user", "content": "hi"}],
                                 tools=CODE_INTERPRETER, temperature=0, store=False)
    assert r3.output_text == "Done." and list(sessions._sessions) == [first.container_id]
    s = sessions.acquire(first.container_id)
    try:
        assert s.tools.python.run("print(x)") == "41"
    finally:
        sessions.release(s)


def test_code_interpreter_history_renders_the_call_and_result(py_server):
    """A stored response's calls come back in the next prompt as harmony wants them (the tool's own
    message, author python, on the call's channel), and so do items a client sends back."""
    from ossgguf.runner.server.builtin import conversation_key
    from ossgguf.runner.server.responses import ResponseStore, parse_responses

    client = client_of(py_server)
    r = client.responses.create(model="gpt-oss-test", input="hi", tools=CODE_INTERPRETER, temperature=0)
    state = py_server.app.state.server
    for body in ({"previous_response_id": r.id, "input": "more"},
                 {"input": [{"role": "user", "content": "hi"}, *[o.model_dump(exclude_none=True) for o in r.output],
                            {"role": "user", "content": "more"}]}):
        req = parse_responses({**body, "tools": CODE_INTERPRETER}, "medium", state.store, ["python"])
        assert req.builtin == ["python"] and conversation_key(req.items) == r.output[0].container_id
        req.turn.builtin_tools = req.builtin
        prompt = "".join(s.text for s in req.turn.segments(DATE))
        assert "<|start|>assistant to=python<|channel|>analysis code<|message|>x = 41<|call|>" in prompt
        assert "<|start|>python to=assistant<|channel|>analysis<|message|>42<|end|>" in prompt
        assert "## python\n\nUse this tool to execute Python code" in prompt
    with pytest.raises(Exception, match="not a container id"):
        parse_responses({"input": "x", "tools": [{"type": "code_interpreter", "container": "../etc"}]}, "medium",
                        ResponseStore(), ["python"])


def test_code_interpreter_streams_the_events_openai_sends(py_server):
    body = {"model": "gpt-oss-test", "input": "hi", "tools": CODE_INTERPRETER, "temperature": 0, "stream": True}
    raws = _events(py_server.base_url + "/responses", body)
    kinds = [_conforms(EVENT_TYPES[json.loads(raw)["type"]], raw) for raw in raws]
    for k in ("response.code_interpreter_call.in_progress", "response.code_interpreter_call_code.done",
              "response.code_interpreter_call.interpreting", "response.code_interpreter_call.completed"):
        assert kinds.count(k) == 2, (k, kinds)
    code: dict[str, str] = {}  # the code streams as the model writes it
    for ev in map(json.loads, raws):
        if ev["type"] == "response.code_interpreter_call_code.delta":
            code[ev["item_id"]] = code.get(ev["item_id"], "") + ev["delta"]
    assert list(code.values()) == ["x = 41", "print(x+1)#~"]
    final = json.loads(raws[-1])["response"]
    _conforms(Response, json.dumps(final))
    assert [o["type"] for o in final["output"]] == ["code_interpreter_call", "code_interpreter_call", "message"]
    assert final["output"][1]["outputs"] == [{"type": "logs", "logs": "42"}]
    done = [json.loads(r)["item"] for r in raws if json.loads(r)["type"] == "response.output_item.done"]
    assert [d["status"] for d in done] == ["completed"] * 3 and done[1]["code"] == "print(x+1)#~"
    # the client's own stream reader: typed events, the same final response
    with client_of(py_server).responses.stream(**{k: v for k, v in body.items() if k != "stream"}) as stream:
        events = list(stream)
        resp = stream.get_final_response()
    assert any(type(e).__name__ == "ResponseCodeInterpreterCallCompletedEvent" for e in events)
    assert resp.output[1].outputs[0].logs == "42" and resp.output_text == "Done."


def test_chat_completions_show_python_in_reasoning(py_server):
    client = client_of(py_server)
    sessions = py_server.app.state.server.tools
    before = set(sessions._sessions)
    messages = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="gpt-oss-test", messages=messages, temperature=0)
    msg = r.choices[0].message
    assert msg.content == "Done." and not msg.tool_calls and r.choices[0].finish_reason == "stop"
    reasoning = msg.model_extra["reasoning_content"]
    assert "[python call]\nx = 41\n[python result]\n" in reasoning
    assert "[python call]\nprint(x+1)#~\n[python result]\n42" in reasoning
    assert msg.model_extra["reasoning"] == reasoning
    chunks = list(client.chat.completions.create(model="gpt-oss-test", messages=messages, temperature=0, stream=True))
    streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    assert streamed.strip("\n") == reasoning and not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Done."
    # chat_template_kwargs.builtin_tools = []: not run, the call goes to the client as written
    off = client.chat.completions.create(model="gpt-oss-test", messages=messages, temperature=0,
                                         extra_body={"chat_template_kwargs": {"builtin_tools": []}})
    assert off.choices[0].finish_reason == "tool_calls" and off.choices[0].message.tool_calls[0].function.name == "python"
    assert set(sessions._sessions) == before  # a chat completion's kernel ends with its request


def test_without_the_tools_the_request_still_works(py_engine, caplog):
    """A server started without --tools-builtin: the hosted tool is left out with a warning, as before,
    and the model's call goes to the client as a function_call."""
    with ServerThread(create_app(py_engine, "gpt-oss-test", date=DATE)) as srv, \
            caplog.at_level(logging.WARNING, logger="ossgguf.runner.server.builtin"):
        r = client_of(srv).responses.create(model="gpt-oss-test", input="hi", tools=CODE_INTERPRETER, temperature=0)
        raw = httpx.post(srv.base_url + "/responses", timeout=60,
                         json={"model": "gpt-oss-test", "input": "hi", "tools": CODE_INTERPRETER, "temperature": 0})
    assert r.status == "completed" and [o.type for o in r.output] == ["function_call"]
    assert r.output[0].name == "python" and r.output[0].arguments == "x = 41"
    assert "of type 'code_interpreter' left out" in caplog.text and "--tools-builtin python" in caplog.text
    _conforms(Response, raw.text)


def test_sessions_are_bounded_expire_and_close_at_shutdown(py_engine, notes):
    from ossgguf.runner.server.tool_sessions import ServerTools

    tools = ServerTools(BuiltinOptions(names=["browser"], browser_source=f"local:{notes}"), max_sessions=2,
                        idle_seconds=0.4)
    try:
        a, b = tools.acquire(), tools.acquire()
        with pytest.raises(Exception, match="2 conversations are using the built-in tools"):
            tools.acquire()  # both in use: refused (429), not evicted
        tools.release(a)
        c = tools.acquire()  # a, idle, makes room
        assert a.key not in tools and {b.key, c.key} == set(tools._sessions)
        tools.release(b)
        tools.release(c)
        deadline = time.monotonic() + 5
        while len(tools):  # idle past idle_seconds: closed by the sweeper
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        tools.close()
    # the python kernel of a conversation ends when the server shuts down
    sandbox_or_skip()
    app = create_app(py_engine, "gpt-oss-test", date=DATE, builtin=BuiltinOptions(names=["python"]))
    with ServerThread(app) as srv:
        r = client_of(srv).responses.create(model="gpt-oss-test", input="hi", tools=CODE_INTERPRETER, temperature=0)
        proc = app.state.server.tools._sessions[r.output[0].container_id].tools.python._proc
        assert proc.poll() is None
    assert proc.poll() is not None and len(app.state.server.tools) == 0


# -- browser: web_search --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    import os

    d = tmp_path_factory.mktemp("notes")
    for name, text in NOTES.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))  # the index lives there
    yield d
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="module")
def web_server(make_ckpt, o200k, tmp_path_factory, notes):
    from scripted_model import scripted_gguf

    ckpt = make_ckpt(vocab_size=201088, vocab_file=str(o200k), hidden_size=128)
    model = scripted_gguf(ckpt, tmp_path_factory.mktemp("scripted-web"), BROWSER_SCRIPT)
    with Engine.load(model, CPU) as engine:
        app = create_app(engine, "gpt-oss-test", date=DATE,
                         builtin=BuiltinOptions(names=["browser"], browser_source=f"local:{notes}"))
        with ServerThread(app) as srv:
            srv.app = app
            yield srv


def test_web_search_over_a_local_folder(web_server, notes):
    """search, open, find as web_search_call items with their actions; the answer keeps its citation,
    with a url_citation annotation on it."""
    url = f"local://{notes.name}/zebra.md"
    body = {"model": "gpt-oss-test", "input": "Where do zebras go?", "tools": [{"type": "web_search"}],
            "temperature": 0}
    raw = httpx.post(web_server.base_url + "/responses", json=body, timeout=60).text
    _conforms(Response, raw)
    r = Response.model_validate_json(raw)
    assert [o.type for o in r.output] == ["web_search_call"] * 3 + ["message"], r.output
    search, opened, found = r.output[:3]
    for item in (search, opened, found):
        ResponseFunctionWebSearch.model_validate_json(item.model_dump_json(exclude_none=True), strict=True)
        assert item.status == "completed"
    assert search.action.type == "search" and search.action.query == "zebra migration"
    assert search.action.sources[0].url == url  # the right note first
    assert (opened.action.type, opened.action.url) == ("open_page", url)
    assert (found.action.type, found.action.pattern, found.action.url) == ("find_in_page", "Mara river", url)
    text = r.output[3].content[0]
    assert text.text == "They follow the rains 【1†L2-L3】."
    assert [a.model_dump() for a in text.annotations] == [{"type": "url_citation", "start_index": 22, "end_index": 31,
                                                          "url": url, "title": "Zebra migration"}]
    # sent back by a client that keeps its own history (store=false, as Codex does): the calls this
    # server ran render as the model saw them; a web_search_call it did not run has no page text
    from ossgguf.runner.server.responses import parse_responses

    state = web_server.app.state.server
    items = [{"role": "user", "content": "Where do zebras go?"}, *[o.model_dump(exclude_none=True) for o in r.output],
             {"role": "user", "content": "thanks"}]
    req = parse_responses({"input": items, "tools": [{"type": "web_search"}]}, "medium", state.store, ["browser"])
    prompt = "".join(s.text for s in req.turn.segments(DATE))
    assert '<|start|>assistant to=browser.search<|channel|>analysis <|constrain|>json<|message|>{"query":"zebra migration"}' \
        in prompt and "<|start|>browser.search to=assistant<|channel|>analysis<|message|>[0] zebra migration" in prompt
    foreign = [items[0], {**items[1], "id": "ws_elsewhere"}, items[-1]]
    req = parse_responses({"input": foreign}, "medium", state.store, ["browser"])
    assert "browser.search" not in "".join(s.text for s in req.turn.segments(DATE))
    # streamed: the web_search_call events, the annotation event, each of the client's types
    raws = _events(web_server.base_url + "/responses", {**body, "tools": [{"type": "web_search_preview"}],
                                                          "stream": True})
    kinds = [_conforms(EVENT_TYPES[json.loads(x)["type"]], x) for x in raws]
    for k in ("response.web_search_call.in_progress", "response.web_search_call.searching",
              "response.web_search_call.completed"):
        assert kinds.count(k) == 3, (k, kinds)
    assert kinds.count("response.output_text.annotation.added") == 1 and kinds[-1] == "response.completed"
    with client_of(web_server).responses.stream(**body) as stream:
        list(stream)
        final = stream.get_final_response()
    assert final.output_text == "They follow the rains 【1†L2-L3】." and final.output[0].action.query == "zebra migration"


def test_chat_completions_show_browser_calls_in_reasoning(web_server):
    r = client_of(web_server).chat.completions.create(
        model="gpt-oss-test", messages=[{"role": "user", "content": "Where do zebras go?"}], temperature=0)
    reasoning = r.choices[0].message.model_extra["reasoning_content"]
    assert '[browser.search call]\n{"query":"zebra migration"}\n[browser.search result]\n[0] zebra migration' in reasoning
    assert "[browser.find result]\n[2] Find results for text: `mara river`" in reasoning
    assert r.choices[0].message.content == "They follow the rains 【1†L2-L3】."


# -- Codex CLI ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_codex_shows_the_web_search_and_sends_it_back(agents, make_ckpt, o200k, tmp_path, notes):  # noqa: F811
    """Codex CLI with `web_search = "live"` (docs/server.md) offers the web_search tool; `ossgguf serve
    --tools-builtin browser` runs the model's search; Codex shows the web_search_call item and the answer.
    Resumed, Codex sends the item back and the server renders the call as the model saw it: the
    scripted model (which searches while no call is in its context) then answers at once."""
    import os
    import signal
    import subprocess
    import sys

    from scripted_model import Episode, Script, scripted_gguf

    ckpt = make_ckpt(vocab_size=201088, vocab_file=str(o200k), hidden_size=128)
    model = scripted_gguf(ckpt, tmp_path, Script(("<|call|>",), [
        Episode((), '<|channel|>analysis to=browser.search <|constrain|>json<|message|>{"query":"zebra migration"}<|call|>'),
        Episode(("<|call|>",), "<|channel|>final<|message|>They follow the rains 【0†L2】.<|return|>")]))
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "ossgguf.cli", "serve", str(model), "--port", str(port), "--model-name", "gpt-oss-20b",
           "--ctx", "65536", "--gpu-mem", "0", "--ram", "16GiB", "--tools-builtin", "browser",
           "--browser-source", f"local:{notes}"]
    with open(log, "w") as err:
        server = subprocess.Popen(cmd, stderr=err)
    home = tmp_path / "home"
    (home / "project").mkdir(parents=True)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "CODEX_HOME": str(home / ".codex"), "NO_COLOR": "1",
           "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache")}

    def codex(*args: str) -> list[dict]:
        proc = subprocess.run([str(agents["codex"]), "exec", "--skip-git-repo-check", "--json", *args],
                              cwd=home / "project", env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=180)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    try:
        wait_healthy(port, server, lambda: log.read_text()[-3000:])
        configure(home, port, 65536)  # the docs' Codex block, then the line the docs add for web search
        config = home / ".codex" / "config.toml"
        config.write_text('web_search = "live"\n' + config.read_text())
        items = [e["item"] for e in codex("Where do zebras go?") if e["type"] == "item.completed"]
        search = next(i for i in items if i["type"] == "web_search")
        assert search["action"] == {"type": "search", "query": "zebra migration"} and search["id"].startswith("ws_")
        assert items[-1] == {**items[-1], "type": "agent_message", "text": "They follow the rains 【0†L2】."}
        again = [e["item"] for e in codex("resume", "--last", "And then?") if e["type"] == "item.completed"]
        assert [i["type"] for i in again if i["type"] != "error"] == ["agent_message"], again
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


def test_serve_checks_the_tools_before_loading_the_model(tmp_path):
    """`ossgguf serve --tools-builtin browser` without a source fails at once, naming the option (the
    model file is not even read: this one is not a GGUF)."""
    from click.testing import CliRunner

    from ossgguf.cli import cli

    model = tmp_path / "not-a-model.gguf"
    model.write_bytes(b"x")
    result = CliRunner().invoke(cli, ["serve", str(model), "--tools-builtin", "browser"])
    assert result.exit_code != 0 and "needs --browser-source" in str(result.output) + str(result.exception)
    result = CliRunner().invoke(cli, ["serve", str(model), "--tools-builtin", "shell"])
    assert result.exit_code != 0 and "unknown tool(s) shell" in str(result.output) + str(result.exception)


def test_tool_rounds_stop_at_the_token_budget_and_the_round_limit(notes, monkeypatch):
    """A model that keeps searching (a markup script, test_server.Script): the rounds stop when the
    request's max_output_tokens, counted over all rounds, are spent, or after MAX_ROUNDS; the response
    is then incomplete, and the call it ended on was not run."""
    from test_server import Script

    from ossgguf.runner.server import builtin

    call = '<|channel|>analysis to=browser.search <|constrain|>json<|message|>{"query":"zebra"}'  # ~30 tokens a round
    options = BuiltinOptions(names=["browser"], browser_source=f"local:{notes}")
    script = Script(call)
    with ServerThread(create_app(None, "gpt-oss-test", generate=script, date=DATE, builtin=options)) as srv:
        client = client_of(srv)
        r = client.responses.create(model="gpt-oss-test", input="x", tools=[{"type": "web_search"}], max_output_tokens=80)
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        k = r.usage.output_tokens // 3  # each round's tokens, as the server counts them (3 rounds, 3k > 80)
        assert [o.type for o in r.output] == ["web_search_call"] * 2 and r.usage.output_tokens == 3 * k
        assert [q.params.max_tokens for q in script.requests] == [80, 80 - k, 80 - 2 * k]  # what was left
        monkeypatch.setattr(builtin, "MAX_ROUNDS", 3)
        r = client.responses.create(model="gpt-oss-test", input="x", tools=[{"type": "web_search"}])
        assert r.status == "incomplete" and [o.type for o in r.output] == ["web_search_call"] * 2


# -- Anthropic's server tools (/v1/messages) ------------------------------------------------------
def _anthropic(srv: ServerThread):
    anthropic = pytest.importorskip("anthropic")
    return anthropic.Anthropic(base_url=srv.base_url.removesuffix("/v1"), api_key="none", max_retries=0, timeout=120)


def _kw(body: dict) -> dict:
    """A request body as the client's keyword arguments (its create() takes no temperature)."""
    return {**{k: v for k, v in body.items() if k != "temperature"}, "extra_body": {"temperature": 0}}


def _message_events(srv: ServerThread, body: dict) -> tuple[list[dict], dict]:
    """A streamed /v1/messages: each event validated strictly against the anthropic client's types, and
    the message the events build (as the client's stream helper accumulates it)."""
    from anthropic.types import Message, RawMessageStreamEvent
    from test_anthropic import _conforms as conforms
    from test_anthropic import _events as sse

    events = [json.loads(conforms(RawMessageStreamEvent, data).model_dump_json())
              for name, data in sse(srv.base_url.removesuffix("/v1") + "/v1/messages", {**body, "stream": True})
              if name != "ping"]  # Anthropic's keep-alive, not one of the client's event types
    with _anthropic(srv).messages.stream(**_kw(body)) as stream:
        list(stream)
        final = stream.get_final_message()
    conforms(Message, final.model_dump_json(exclude_none=True))
    return events, final.model_dump(exclude_none=True)


def test_anthropic_code_execution_runs_python(py_server, py_engine):
    """`code_execution_*` in a Messages request runs gpt-oss's python: each call a server_tool_use block
    and a code_execution_tool_result with the real output, in the anthropic client's own types; the
    response's container is the kernel's session, and a request that names it keeps the state."""
    from anthropic.types import Message
    from test_anthropic import _conforms as conforms

    body = {"model": "claude-sonnet-4-5", "max_tokens": 256, "temperature": 0,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "code_execution_20250522", "name": "code_execution"}]}
    raw = httpx.post(py_server.base_url.removesuffix("/v1") + "/v1/messages", json=body, timeout=120).text
    m = conforms(Message, raw)
    assert [b.type for b in m.content] == ["server_tool_use", "code_execution_tool_result"] * 2 + ["text"]
    first, first_out, second, second_out, answer = m.content
    assert (first.name, first.input, second.input) == ("code_execution", {"code": "x = 41"}, {"code": "print(x+1)#~"})
    assert first_out.tool_use_id == first.id and second_out.tool_use_id == second.id and first.id != second.id
    assert (second_out.content.stdout, second_out.content.return_code, second_out.content.stderr) == ("42", 0, "")
    assert answer.text == "Done." and m.stop_reason == "end_turn"
    assert m.container is not None and m.container.id.startswith("cntr_")
    sessions = py_server.app.state.server.tools
    assert m.container.id in sessions
    # the client sends the conversation back, server tool blocks included, naming the container:
    # accepted, and the same kernel (x is still 41)
    again = _anthropic(py_server).messages.create(**_kw({**body, "container": m.container.id, "messages": [
        body["messages"][0], {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": "and now?"}]}))
    assert again.content[-1].text == "Done."
    s = sessions.acquire(m.container.id)
    try:
        assert s.tools.python.run("print(x)") == "41"
    finally:
        sessions.release(s)
    # streamed: the same blocks, each event of the client's types
    events, final = _message_events(py_server, body)
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert starts == ["server_tool_use", "code_execution_tool_result"] * 2 + ["text"]
    assert [b["type"] for b in final["content"]] == starts and final["content"][3]["content"]["stdout"] == "42"
    # without the tools on the server, the typed tool is left out as before: the call reaches the client
    with ServerThread(create_app(py_engine, "gpt-oss-test", date=DATE)) as plain:
        r = _anthropic(plain).messages.create(**_kw(body))
        forced = httpx.post(plain.base_url.removesuffix("/v1") + "/v1/messages", timeout=60,
                            json={**body, "tool_choice": {"type": "tool", "name": "code_execution"}})
    assert [b.type for b in r.content] == ["tool_use"] and r.content[0].name == "python"
    assert forced.status_code == 400 and "--tools-builtin python" in forced.json()["error"]["message"]


def test_anthropic_web_search_over_a_local_folder(web_server, notes):
    """`web_search_*`: the browser's search as web_search + web_search_tool_result (the result pages),
    open and find as web_fetch + web_fetch_tool_result (the text the model read); usage counts them."""
    from anthropic.types import Message
    from test_anthropic import _conforms as conforms

    url = f"local://{notes.name}/zebra.md"
    # the request Claude Code 2.1.332's WebSearch tool sends (its system prompt, user text, tool and
    # tool_choice, as written in its binary), for the query "Where do zebras go?"
    body = {"model": "claude-haiku-4-5", "max_tokens": 512, "temperature": 0,
            "system": "You run a web search for another Claude model, which is waiting on the result and can "
                      "search again. Search once, then reply with a brief summary of the results.",
            "messages": [{"role": "user", "content": "Perform a web search for the query: Where do zebras go?"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
            "tool_choice": {"type": "tool", "name": "web_search"}, "thinking": {"type": "disabled"}}
    from ossgguf.runner.server.anthropic_in import parse_messages

    forced = parse_messages(body, "medium", runs=["browser"]).prefill  # the answer starts as the search
    assert forced == "<|channel|>analysis to=browser.search <|constrain|>json<|message|>"
    raw = httpx.post(web_server.base_url.removesuffix("/v1") + "/v1/messages", json=body, timeout=120).text
    m = conforms(Message, raw)
    kinds = [b.type for b in m.content]
    assert kinds == ["server_tool_use", "web_search_tool_result", "server_tool_use", "web_fetch_tool_result",
                     "server_tool_use", "web_fetch_tool_result", "text"], kinds
    search, results, opened, page, found, matches, answer = m.content
    assert (search.name, search.input) == ("web_search", {"query": "zebra migration"})
    assert results.tool_use_id == search.id and (results.content[0].url, results.content[0].title) == \
        (url, "Zebra migration")
    assert (opened.name, opened.input) == ("web_fetch", {"url": url})
    assert page.content.url == url and page.content.content.title == "Zebra migration"
    assert "Mara" in page.content.content.source.data  # the page as the model read it, with line numbers
    assert (found.name, found.input) == ("web_fetch", {"url": url, "pattern": "Mara river"})
    assert "Find results for text: `mara river`" in matches.content.content.source.data
    assert answer.text == "They follow the rains 【1†L2-L3】."
    assert (m.usage.server_tool_use.web_search_requests, m.usage.server_tool_use.web_fetch_requests) == (1, 2)
    events, final = _message_events(web_server, body)
    assert [b["type"] for b in final["content"]] == kinds
    assert [e["usage"]["server_tool_use"] for e in events if e["type"] == "message_delta"] == \
        [{"web_search_requests": 1, "web_fetch_requests": 2}]
