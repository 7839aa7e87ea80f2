"""gpt-oss's own tools run here (`--tools-builtin python,browser`, runner/tools): calls parsed from the
harmony stream of a scripted model (tests/scripted_model.py: real harmony tokens, run by llama.cpp),
executed, rendered back as openai-harmony renders them; the python sandbox's limits; the browser's
local index, pages, citations and its refusal of private addresses.

The sandbox tests need bubblewrap: in CI (CI=true) they fail without it (.ci/run installs it); on a
machine without it they skip and say how to install it.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from scripted_model import Episode, Script, scripted_gguf

from ossgguf.harmony import parse_completion
from ossgguf.runner.chat import Conversation, Reply, complete
from ossgguf.runner.engine import Engine
from ossgguf.runner.generation import Sampling
from ossgguf.runner.plan import GiB, PlacementOptions

pytest.importorskip("jupyter_client", reason="the python tool's extra: pip install -e '.[tools]'")

from ossgguf.runner.tools import BuiltinOptions, BuiltinTools, parse_names  # noqa: E402
from ossgguf.runner.tools.python_tool import MAX_OUTPUT_CHARS, PythonTool  # noqa: E402
from ossgguf.runner.tools.sandbox import INSTALL_HINT, Limits, choose_sandbox, probe_bwrap, which_bwrap  # noqa: E402

CPU = PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=4096, threads=1)
DATE = "2025-03-14"
DONE = "<|channel|>final<|message|>Done.<|return|>"
GREEDY = Sampling(temperature=0)


def script(*episodes: Episode) -> Script:
    return Script(("<|call|>", "~", "@"), list(episodes))


def sandbox_or_skip():
    """bubblewrap working here; a failure in CI, a skip (with the install command) elsewhere."""
    why = "bubblewrap (bwrap) is not installed" if which_bwrap() is None else probe_bwrap(which_bwrap())
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the python sandbox cannot run in CI: {why}")
        pytest.skip(f"{why}: {INSTALL_HINT}")
    return choose_sandbox()


@pytest.fixture(scope="module")
def build(make_ckpt, tmp_path_factory):
    return lambda s: scripted_gguf(make_ckpt(), tmp_path_factory.mktemp("scripted"), s)


# -- python -----------------------------------------------------------------------------------------
# user "hi": two calls (state); user "@": an exception, then
# a while-True loop (timeout); user "~": prints 10 MB. Each call's text turns on the bits of the next.
PY_SCRIPT = script(
    Episode((), "<|channel|>analysis to=python code<|message|>x = 41<|call|>"),
    Episode(("<|call|>",), "<|channel|>analysis to=python code<|message|>print(x+1)#~<|call|>"),
    Episode(("<|call|>", "~"), DONE),
    Episode(("@",), "<|channel|>analysis to=python code<|message|>1/0<|call|>"),
    Episode(("@", "<|call|>"), "<|channel|>analysis to=python code<|message|>while 1:0#~<|call|>"),
    Episode(("@", "<|call|>", "~"), DONE),
    Episode(("~",), "<|channel|>analysis to=python code<|message|>print(big)<|call|>"),
)


@pytest.fixture(scope="module")
def py_model(build):
    return build(PY_SCRIPT)


@pytest.fixture(scope="module")
def py_engine(py_model):
    with Engine.load(py_model, CPU) as e:
        yield e


@pytest.fixture(scope="module")
def py_tools():
    plan = sandbox_or_skip()
    tools = BuiltinTools(BuiltinOptions(names=["python"], python_timeout=3.0, python_memory=512 << 20))
    assert tools.python.sandbox == plan
    yield tools
    tools.close()


def py_turn(engine, tools, text: str) -> tuple[Conversation, Reply]:
    conv = Conversation(date=DATE, builtin_tools=["python"])
    conv.add_user(text)
    return conv, complete(engine, conv, GREEDY, builtin=tools)


def test_python_keeps_state_across_calls_in_the_analysis_channel(py_engine, py_tools):
    py_tools.reset()
    conv, reply = py_turn(py_engine, py_tools, "hi")
    assert [(c.name, c.arguments, c.content, c.ok) for c in reply.tool_calls] == [
        ("python", "x = 41", "", True), ("python", "print(x+1)#~", "42", True)]
    assert reply.content == "Done." and reply.finish_reason == "stop" and reply.rounds == 3
    call = conv.messages[1]["tool_calls"][0]["function"]
    assert call == {"name": "python", "arguments": "x = 41", "channel": "analysis", "content_type": "code",
                    "recipient": "python"}
    prompt = conv.render()
    assert "<|start|>assistant to=python<|channel|>analysis code<|message|>x = 41<|call|>" in prompt
    assert "<|start|>python to=assistant<|channel|>analysis<|message|>42<|end|>" in prompt
    assert "## python\n\nUse this tool to execute Python code" in prompt  # the system text describes it


def test_python_errors_and_timeouts_come_back_as_text(py_engine, py_tools):
    _, reply = py_turn(py_engine, py_tools, "@")
    error, loop = reply.tool_calls
    assert "ZeroDivisionError: division by zero" in error.content and "Traceback" in error.content
    assert "KeyboardInterrupt" in loop.content and "[timed out after 3 s: interrupted]" in loop.content
    assert loop.seconds < 10 and reply.content == "Done."
    assert py_tools.python.run("print(x)").strip() == "41"  # the state of the first test survived


def test_python_output_is_truncated(py_engine, py_tools):
    py_tools.python.run("big = 'x' * 10**7")  # (a bigram model cannot write code that repeats a token pair)
    py_tools.python.max_chars = 2000  # the tiny vocabulary makes each x a token: keep the prompt in --ctx
    try:
        _, reply = py_turn(py_engine, py_tools, "~")
    finally:
        py_tools.python.max_chars = MAX_OUTPUT_CHARS
    out = reply.tool_calls[0].content
    assert len(out) < 2200 and "characters cut: the output was 10,000,001 characters" in out
    assert out.startswith("xxxx") and out.endswith("xxxx")


def test_reset_loses_the_state(py_tools):
    py_tools.python.run("y = 1")
    cgroups = list(py_tools.python._cgroups.dirs) if py_tools.python._cgroups else []  # as root
    py_tools.reset()
    assert not any(d.exists() for d in cgroups)  # the kernel's cgroups went with it
    assert "NameError" in py_tools.python.run("y")


def test_run_command_runs_python_and_reports_the_calls(py_model):
    """`ossgguf run --tools-builtin python --json`: the calls and their results in the JSON; without
    --tools-builtin the call is not run."""
    sandbox_or_skip()
    cmd = [sys.executable, "-m", "ossgguf.cli", "run", str(py_model), "-p", "hi", "--ctx", "4096", "--threads", "1",
           "--date", DATE, "--temp", "0"]
    proc = subprocess.run([*cmd, "--tools-builtin", "python", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [(c["name"], c["result"]) for c in out["tool_calls"]] == [("python", ""), ("python", "42")]
    assert out["content"] == "Done."
    shown = subprocess.run([*cmd, "--tools-builtin", "python"], capture_output=True, text=True, timeout=120)
    assert shown.stdout == "Done.\n" and "[tool] python(print(x+1)#~) -> 42" in shown.stderr
    bare = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert json.loads(bare.stdout.splitlines()[0])["name"] == "python"


def test_parse_names():
    assert parse_names("browser, python") == ["python", "browser"] and parse_names(None) == []
    with pytest.raises(Exception, match="unknown tool"):
        parse_names("python,shell")


# -- the python sandbox -----------------------------------------------------------------------------
LIMITS = Limits(memory_bytes=256 << 20, pids=32)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("scratch")


@pytest.fixture(scope="module")
def kernel(scratch):
    tool = PythonTool(sandbox_or_skip(), LIMITS, timeout=10.0, scratch=scratch)
    yield tool
    tool.close()


def within(seconds: float, fn, *args):
    """fn(*args) in a thread that must end within `seconds` (the outer timeout of a sandbox test)."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(fn(*args)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn.__name__}{args!r} still running after {seconds} s"
    return box[0]


def works(kernel) -> None:
    """The tool keeps working after what a test did: same kernel, its state kept."""
    assert within(20, kernel.run, "print(sum(range(5)))") == "10"


def test_sandbox_has_no_network(kernel):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    port = server.getsockname()[1]
    out = within(30, kernel.run, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)")
    assert "ConnectionRefusedError" in out or "unreachable" in out, out
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()
    works(kernel)


def test_sandbox_writes_only_to_the_scratch_folder(kernel, scratch, tmp_path):
    outside = tmp_path / "escaped.txt"
    for path in ("/usr/escaped.txt", "/etc/escaped.txt", str(outside), "/escaped.txt"):
        out = within(30, kernel.run, f"open({path!r}, 'w').write('x')")
        assert "Error" in out, (path, out)
    assert not outside.exists()
    assert within(30, kernel.run, "open('/mnt/data/kept.txt', 'w').write('kept')") == "4"
    assert (scratch / "kept.txt").read_text() == "kept"
    works(kernel)


def test_sandbox_cannot_read_home(kernel):
    with tempfile.NamedTemporaryFile("w", dir=Path.home(), prefix=".ossgguf-secret-", suffix=".txt") as f:
        f.write("the-content-of-a-private-file")
        f.flush()
        out = within(30, kernel.run, f"print(open({f.name!r}).read())")
        listing = within(30, kernel.run, f"import os\nprint(os.path.exists({str(Path.home())!r}) and os.listdir({str(Path.home())!r}))")
    assert "the-content-of-a-private-file" not in out and "FileNotFoundError" in out
    assert Path(f.name).name not in listing
    works(kernel)


def test_sandbox_memory_limit_stops_an_allocation_of_twice_the_limit(kernel):
    out = within(30, kernel.run, f"x = bytearray({2 * LIMITS.memory_bytes})")
    assert "MemoryError" in out
    works(kernel)


def test_sandbox_pids_limit_stops_a_fork_loop(kernel):
    code = "import os, time\nn = 0\nwhile True:\n    if os.fork() == 0:\n        time.sleep(60)\n        os._exit(0)\n    n += 1"
    out = within(60, kernel.run, code)
    assert "BlockingIOError" in out or "Resource temporarily unavailable" in out, out
    n = int(within(20, kernel.run, "print(n)"))
    assert 0 < n < LIMITS.pids
    # the forked processes ended with the call: the kernel can start processes again
    assert within(20, kernel.run, "import subprocess\nprint(subprocess.run(['echo', 'ok'], capture_output=True, text=True).stdout.strip())") == "ok"
    works(kernel)


def test_without_a_sandbox_the_tool_refuses_unless_unsafe(monkeypatch):
    import ossgguf.runner.tools.sandbox as sb

    monkeypatch.setattr(sb, "which_bwrap", lambda: None)
    monkeypatch.setattr(sb.sys, "platform", "linux")
    with pytest.raises(sb.SandboxUnavailable, match="apt-get install bubblewrap.*--tools-unsafe"):
        sb.choose_sandbox()
    assert sb.choose_sandbox(unsafe=True).kind == "none"


# -- browser ----------------------------------------------------------------------------------------
# gpt-oss's real vocabulary (o200k, from npm as test_real_vocab.py fetches it): its harmony words and
# 【 】 are single tokens, which a bigram script needs. `source` is a parameter the reference takes and
# ignores; its "~" / "@" move the script on.
import test_real_vocab  # noqa: E402

enc, o200k = test_real_vocab.enc, test_real_vocab.o200k  # its fixtures, shared

NOTES = {
    "zebra.md": "# Zebra migration\n\nPlains zebras migrate across the Serengeti every year.\n"
                "They follow the rains to find fresh grass.\n\nThe herd crosses the Mara river in July.\n",
    "cats/cats.html": "<html><head><title>Cats</title></head><body><p>Cats sleep most of the day, "
                      "see <a href='https://example.org/sleep'>sleep</a>.</p></body></html>",
    "weather.txt": "Rain and weather, nothing about animals.\n",
}
PAGE = "<html><head><title>Loopback page</title></head><body><h1>Served here</h1><p>A page on this machine.</p></body></html>"


@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    (root / "a.html").write_text(PAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()


BROWSER_SCRIPT = script(
    Episode((), '<|channel|>analysis to=browser.search <|constrain|>json<|message|>{"query":"zebra migration"}<|call|>'),
    Episode(("<|call|>",), '<|channel|>commentary to=browser.open <|constrain|>json<|message|>{"id":0,"source":"~"}<|call|>'),
    Episode(("<|call|>", "~"), '<|channel|>analysis to=browser.find <|constrain|>json<|message|>{"source":"@","pattern":"Mara river"}<|call|>'),
    Episode(("<|call|>", "~", "@"), "<|channel|>final<|message|>They follow the rains 【1†L2-L3】.<|return|>"),
)


@pytest.fixture(scope="module")
def web_engine(make_ckpt, o200k, tmp_path_factory):
    ckpt = make_ckpt(vocab_size=201088, vocab_file=str(o200k), hidden_size=128)
    model = scripted_gguf(ckpt, tmp_path_factory.mktemp("scripted-web"), BROWSER_SCRIPT)
    with Engine.load(model, CPU) as e:
        yield e


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
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


def web_tools(notes, allow=()) -> BuiltinTools:
    return BuiltinTools(BuiltinOptions(names=["browser"], browser_source=f"local:{notes}", browser_allow=list(allow)))


def web_turn(engine, tools, text: str) -> tuple[Conversation, Reply]:
    conv = Conversation(date=DATE, builtin_tools=["browser"])
    conv.add_user(text)
    return conv, complete(engine, conv, GREEDY, builtin=tools)


def test_browser_searches_a_local_folder_opens_finds_and_keeps_citations(web_engine, notes):
    tools = web_tools(notes)
    conv, reply = web_turn(web_engine, tools, "Where do zebras go?")
    assert len(reply.tool_calls) == 3, (reply, conv.render()[-3000:])
    search, opened, found = reply.tool_calls
    assert [c.name for c in reply.tool_calls] == ["browser.search", "browser.open", "browser.find"]
    assert search.content.startswith("[0] zebra migration\n**viewing lines [0 - ")
    assert "L2:   * 【0†Zebra migration†" in search.content  # the right note first
    assert opened.content.startswith(f"[1] Zebra migration (local://{notes.name}/zebra.md)\n**viewing lines [0 - 6] of 6**")
    assert "L3: They follow the rains to find fresh grass." in opened.content
    assert found.content.startswith("[2] Find results for text: `mara river` in `Zebra migration`")
    assert "# 【0†match at L5】\nL1: The herd crosses the Mara river in July." in found.content
    assert reply.content == "They follow the rains 【1†L2-L3】." and reply.finish_reason == "stop"
    assert tools.browser.citations(reply.content) == [{"type": "url_citation", "start_index": 22, "end_index": 31,
                                                      "url": f"local://{notes.name}/zebra.md",
                                                      "title": "Zebra migration"}]
    prompt = conv.render()
    assert '<|start|>assistant to=browser.search<|channel|>analysis <|constrain|>json<|message|>' in prompt
    assert "<|start|>browser.find to=assistant<|channel|>analysis<|message|>[2] Find results" in prompt


def test_browser_opens_loopback_urls_only_when_allowed(notes, http_server):
    """A call as the model writes it in the template's header form (parsed from harmony markup)."""
    parsed = parse_completion(f' to=browser.open<|channel|>commentary json<|message|>{{"id":"{http_server}/a.html"}}<|call|>')
    (call,) = parsed.tool_calls
    assert (call.name, call.builtin, call.channel) == ("browser.open", True, "commentary")
    text, ok = web_tools(notes, allow=["127.0.0.1"]).run(call)
    assert ok and text.startswith(f"[0] Loopback page ({http_server}/a.html)\n**viewing lines [0 - 2] of 2**")
    assert "L0: # Served here" in text
    text, ok = web_tools(notes).run(call)
    assert not ok and "loopback, private or reserved address" in text and "--browser-allow" in text


@pytest.mark.parametrize("url", ["http://10.0.0.1/", "http://169.254.169.254/latest/meta-data/", "http://[::1]/",
                                 "file:///etc/passwd", "http://localhost:1/"])
def test_browser_refuses_private_addresses_and_files(url):
    from ossgguf.runner.tools.web import FetchRefused, resolve

    with pytest.raises(FetchRefused):
        resolve(url, [])
    if url.startswith("http://10."):
        assert resolve(url, ["10.0.0.0/8"])[3] == ["10.0.0.1"]


def test_browser_refuses_a_redirect_to_a_private_address(http_server, tmp_path):
    from ossgguf.runner.tools.web import FetchRefused, fetch

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/secret")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # allowed: the first host by name; the redirect's target 127.0.0.1 is not
        with pytest.raises(FetchRefused, match="127.0.0.1"):
            fetch(f"http://localhost:{server.server_address[1]}/", allow=["localhost"])
    finally:
        server.shutdown()


def test_local_index_is_persistent_and_incremental(notes):
    from ossgguf.runner.tools.search_index import LocalIndex

    index = LocalIndex(notes)
    assert index.update() == (0, 0)  # indexed by an earlier test: nothing to read again
    (notes / "new.md").write_text("# Okapi\n\nThe okapi is a relative of the giraffe.\n")
    assert index.update() == (1, 0) and index.search("giraffe")[0].path == "new.md"
    (notes / "new.md").unlink()
    assert index.update() == (0, 1) and index.search("giraffe") == []
    assert index.search("sleep")[0].title == "Cats"


def harmony_messages(oh, conv: Conversation) -> list:
    """conv's messages as openai-harmony Messages (the reference renderer), built field by field."""
    out = []
    for m in conv.messages:
        if m["role"] == "user":
            out.append(oh.Message.from_role_and_content(oh.Role.USER, m["content"]))
        elif m["role"] == "tool":
            call = next(c["function"] for a in conv.messages for c in a.get("tool_calls", []) if c["id"] == m["tool_call_id"])
            out.append(oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, call["recipient"]), m["content"])
                       .with_recipient("assistant").with_channel(call["channel"]))
        elif m.get("tool_calls"):
            for c in m["tool_calls"]:
                fn = c["function"]
                out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, fn["arguments"]).with_channel(fn["channel"])
                           .with_recipient(fn["recipient"]).with_content_type(fn["content_type"]))
        else:
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, m["content"]).with_channel("final"))
    return out


def test_rendered_tool_conversation_matches_openai_harmony(web_engine, notes, enc):
    """Our prompt after the calls, token for token, is what openai-harmony renders for the same messages;
    the system message too (the browser's description, the date, the reasoning effort)."""
    import openai_harmony as oh

    from ossgguf.harmony import render_segments

    conv, _ = web_turn(web_engine, web_tools(notes), "Where do zebras go?")
    conv.add_user("thanks")
    ours = web_engine.tokenize_segments(render_segments(conv.messages, builtin_tools=["browser"], date=DATE))
    system = (oh.SystemContent.new().with_conversation_start_date(DATE)
              .with_reasoning_effort(oh.ReasoningEffort.MEDIUM).with_browser_tool())
    msgs = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system), *harmony_messages(oh, conv)]
    # One difference, by design: openai-harmony by default drops every analysis-channel message before
    # the last answer, built-in tool calls and results included; we drop only reasoning text, as the
    # official template does for function calls (the cached prompt stays a prefix). Without that drop:
    keep = oh.RenderConversationConfig(auto_drop_analysis=False)
    ref = enc.render_conversation_for_completion(oh.Conversation.from_messages(msgs), oh.Role.ASSISTANT, keep)
    assert enc.decode(ours) == enc.decode(list(ref))
    assert ours == list(ref)


def test_unsafe_mode_runs_without_a_sandbox(tmp_path):
    """--tools-unsafe: the same kernel and outputs, as this user (here only to show that it works)."""
    from ossgguf.runner.tools.sandbox import SandboxPlan

    tool = PythonTool(SandboxPlan("none"), timeout=10.0, scratch=tmp_path)
    try:
        assert tool.run("import os\nz = os.getcwd()\nprint(z)") == str(tmp_path)
        assert tool.run("z") == repr(str(tmp_path))
    finally:
        tool.close()


def test_searxng_backend_reads_its_json_api(http_server, monkeypatch):
    """A SearXNG instance (here a local server answering its /search?format=json shape): results become
    the reference's result page; a result's URL opens through the guarded fetch."""
    from ossgguf.runner.tools.browser import Browser, make_backend

    class Searx(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            assert "format=json" in self.path and "q=loopback+page" in self.path
            body = json.dumps({"results": [{"title": "Loopback page", "url": f"{http_server}/a.html",
                                            "content": "A page on this machine."}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Searx)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser = Browser(make_backend(f"searxng:http://127.0.0.1:{server.server_address[1]}"), allow=["localhost"])
        text, ok = browser.call("search", '{"query": "loopback page"}')
        assert ok and "* 【0†Loopback page†localhost:" in text, text
        text, ok = browser.call("open", '{"id": 0}')
        assert ok and text.startswith(f"[1] Loopback page ({http_server}/a.html)"), text
    finally:
        server.shutdown()
    monkeypatch.delenv("EXA_API_KEY", raising=False)
    with pytest.raises(Exception, match="needs an API key in the environment variable EXA_API_KEY"):
        make_backend("exa")
