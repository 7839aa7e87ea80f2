"""Chat: the tool loop, history and KV reuse through the real engine, `ossgguf run` / `ossgguf chat`
end to end (piped stdin, --json, a real terminal under tmux).

Random tiny models write random tokens and never call a tool, so most tests run a tiny GGUF whose
weights are set by hand to write a script (tests/scripted_model.py): a tool call when no `<|call|>`
is in the context yet, then reasoning and an answer; an endless " la la" when an "@" is in the
context. llama.cpp runs it like any other model. History rendering is checked against the official
chat template rendered by transformers.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from importlib.resources import files
from pathlib import Path

import pytest
from scripted_model import Episode, Script, scripted_gguf

from ossgguf.errors import OssggufError
from ossgguf.harmony import Event
from ossgguf.runner.chat import Conversation, Reply, ToolResult, ToolRunner, complete, respond
from ossgguf.runner.engine import Engine
from ossgguf.runner.generation import Sampling
from ossgguf.runner.plan import GiB, PlacementOptions

# one thread: a model this small runs faster without the threads waiting on each other (and on other jobs)
CPU = PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=4096, threads=1)
CLI = [sys.executable, "-m", "ossgguf.cli"]
DATE = "2025-03-14"
CALL = ' to=functions.now<|message|>{"q":1}<|call|>'
REASONING, ANSWER = "~12:00 UTC", "It is noon."
REPLY = (f"<|channel|>analysis<|message|>{REASONING}<|end|>"
         f"<|start|>assistant<|channel|>final<|message|>{ANSWER}<|return|>")
LOOP = Episode(("@",), "<|channel|>final<|message|>", " la")
TOOLS = [{"type": "function", "function": {"name": "now", "description": "Current time",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "number"}}}}}]
# A tool command: records the call it got on stdin, answers with a fixed text.
TOOL_PY = """import json, os, sys
call = json.load(sys.stdin)
with open(os.environ["CALLS_LOG"], "a") as f:
    f.write(json.dumps(call) + "\\n")
print("12:00")
"""


def script(*episodes: Episode) -> Script:
    return Script(("<|call|>", "~", "@"), list(episodes))


@pytest.fixture(scope="module")
def build(make_ckpt, tmp_path_factory):
    cache = {}

    def make(s: Script) -> Path:
        key = repr(s)
        if key not in cache:
            cache[key] = scripted_gguf(make_ckpt(), tmp_path_factory.mktemp("scripted"), s)
        return cache[key]

    return make


@pytest.fixture(scope="module")
def model(build):
    """Calls `now`, then reasons and answers; loops on "@"."""
    return build(script(Episode((), CALL), Episode(("<|call|>",), REPLY), LOOP,
                        Episode(("<|call|>", "@"), LOOP.text, LOOP.cycle)))


@pytest.fixture(scope="module")
def engine(model):
    with Engine.load(model, CPU) as e:
        yield e


@pytest.fixture
def tool(tmp_path, monkeypatch):
    """A ToolRunner over a python script; `calls()` reads back what it received."""
    path = tmp_path / "tool.py"
    path.write_text(TOOL_PY)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("CALLS_LOG", str(log))
    runner = ToolRunner.from_command(f"{sys.executable} {path}")
    runner.calls = lambda: [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    return runner


def conversation(text: str = "What time is it?") -> Conversation:
    conv = Conversation(tools=TOOLS, date=DATE)
    conv.add_user(text)
    return conv


# --- the library ---------------------------------------------------------------------------------


def test_tool_loop_runs_the_command_and_answers(engine, tool):
    conv = conversation()
    events = list(respond(engine, conv, tool_runner=tool))
    kinds = [e.kind for e in events]
    assert kinds[0] == "tool_call" and events[0].name == "now"
    assert "".join(e.text for e in events if isinstance(e, Event) and e.kind == "tool_args") == '{"q":1}'
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [(r.name, r.content, r.ok) for r in results] == [("now", "12:00", True)]
    assert tool.calls() == [{"name": "now", "arguments": {"q": 1}}]  # the call as JSON on stdin
    assert "".join(e.text for e in events if isinstance(e, Event) and e.kind == "reasoning") == REASONING
    assert "".join(e.text for e in events if isinstance(e, Event) and e.kind == "content") == ANSWER
    reply = events[-1]
    assert isinstance(reply, Reply) and kinds.index("tool_result") < kinds.index("content")
    assert (reply.content, reply.reasoning, reply.finish_reason, reply.rounds) == (ANSWER, REASONING, "stop", 2)
    assert reply.usage.completion_tokens > 0 and reply.usage.cached_tokens > 0  # round 2 reused round 1's prefix
    call_id = results[0].id
    assert conv.messages[1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "now", "arguments": '{"q":1}'}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "12:00"},
        {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING},
    ]


ctu = pytest.importorskip("transformers.utils.chat_template_utils")


def test_history_renders_as_the_official_template_and_reuses_the_cache(engine, tool, fixed_date):
    """The answer is stored with <|end|> and its reasoning dropped, as the template renders history;
    the next turn prefills only what follows the cached prefix."""
    conv = conversation()
    first = complete(engine, conv, tool_runner=tool)
    round2 = engine.tokenize(Conversation(conv.messages[:3], TOOLS, date=DATE).render())
    conv.add_user("thanks")
    template_form = [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "now", "arguments": {"q": 1}}}]},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": ANSWER, "thinking": REASONING},
        {"role": "user", "content": "thanks"},
    ]
    ref, _ = ctu.render_jinja_template(
        conversations=[copy.deepcopy(template_form)], tools=TOOLS, add_generation_prompt=True,
        chat_template=(files("ossgguf") / "data" / "chat_template.jinja").read_text(encoding="utf-8"))
    assert conv.render() == ref[0]
    assert f"<|channel|>final<|message|>{ANSWER}<|end|>" in ref[0] and REASONING not in ref[0]
    second = complete(engine, conv, tool_runner=tool)
    assert second.content == ANSWER and second.rounds == 1  # the call is in history: no new call
    assert second.usage.cached_tokens >= len(round2)  # everything up to the dropped reasoning was reused
    assert first.finish_reason == second.finish_reason == "stop"


@pytest.mark.parametrize("body,timeout,expected", [
    ("import sys; print('no such city', file=sys.stderr); sys.exit(3)", 30, "failed (exit status 3): no such city"),
    ("import time; time.sleep(10)", 0.5, "did not finish within 0.5 s"),
])
def test_tool_failures_go_back_to_the_model(engine, tmp_path, body, timeout, expected):
    (tmp_path / "t.py").write_text(body)
    runner = ToolRunner.from_command(f"{sys.executable} {tmp_path / 't.py'}", timeout=timeout)
    conv = conversation()
    reply = complete(engine, conv, tool_runner=runner)
    (result,) = reply.tool_calls
    assert not result.ok and expected in result.content
    assert conv.messages[2] == {"role": "tool", "tool_call_id": result.id, "content": result.content}
    assert reply.content == ANSWER  # the model went on after reading the error


def test_bad_json_from_the_model_is_answered_not_run(build, tool):
    bad = build(script(Episode((), ' to=functions.now<|message|>{"q":<|call|>'), Episode(("<|call|>",), REPLY)))
    with Engine.load(bad, CPU) as e:
        conv = conversation()
        reply = complete(e, conv, tool_runner=tool)
        prompt = conv.render()
    assert tool.calls() == []
    (result,) = reply.tool_calls
    assert not result.ok and "not valid JSON" in result.content and result.arguments == '{"q":'
    assert any("not valid JSON" in err for err in reply.errors)
    assert reply.content == ANSWER
    assert 'json<|message|>"{\\"q\\":"<|call|>' in prompt  # what the model wrote, kept as a JSON string


def test_tool_loop_is_bounded(build, tool):
    again = build(script(Episode((), CALL), Episode(("<|call|>",), CALL)))
    with Engine.load(again, CPU) as e:
        reply = complete(e, conversation(), tool_runner=tool, max_rounds=3)
    assert reply.rounds == 3 and len(reply.tool_calls) == 3 and len(tool.calls()) == 3
    assert reply.finish_reason == "tool_calls" and "3 rounds" in reply.errors[0]


def test_without_a_runner_the_turn_ends_at_the_call(engine):
    conv = conversation()
    reply = complete(engine, conv)
    assert reply.finish_reason == "tool_calls" and reply.rounds == 1
    assert [(c["name"], c["arguments"]) for c in reply.tool_calls] == [("now", '{"q":1}')]
    assert conv.messages[-1]["tool_calls"][0]["function"]["name"] == "now"


def test_cancel_stops_the_answer_and_the_chat_goes_on(engine, tool):
    conv = conversation("@ sing")
    stop = threading.Event()
    got = []
    for ev in respond(engine, conv, tool_runner=tool, cancel=stop):
        if isinstance(ev, Event) and ev.kind == "content":
            got.append(ev.text)
            if len(got) == 20:
                engine.cancel()
                stop.set()
    reply = ev
    assert reply.finish_reason == "cancelled" and 20 <= len(got) <= 22
    assert conv.messages[-1] == {"role": "assistant", "content": reply.content}
    assert reply.content.startswith(" la la") and len(reply.content) < 100
    conv.reset()
    conv.add_user("What time is it?")
    assert complete(engine, conv, tool_runner=tool).content == ANSWER


def test_tool_runner_uses_no_shell(tmp_path):
    marker = tmp_path / "marker"
    runner = ToolRunner.from_command(f"echo hello; touch {marker}")
    out = runner("now", {})
    assert out.ok and out.content == f"hello; touch {marker}" and not marker.exists()
    quoted = ToolRunner.from_command(f"{sys.executable} -c 'import sys; print(sys.stdin.read())'")
    assert quoted("f", {"a": [1, "é"]}).content == '{"name": "f", "arguments": {"a": [1, "é"]}}'
    with pytest.raises(OssggufError, match="not found"):
        ToolRunner.from_command("no-such-tool-cmd --x")
    with pytest.raises(OssggufError, match="cannot be split"):
        ToolRunner.from_command("python3 'unclosed")


def test_run_samples_as_the_library_does(make_gguf):
    """`ossgguf run` without sampling options samples as `Sampling()` does (that this is the whole
    distribution, OpenAI's setting, is test_engine's check): a random model, one seed, one answer."""
    model = make_gguf(num_hidden_layers=3, seed=5)
    proc = cli("run", model, "-p", "Hi", "--seed", 11, "--max-tokens", 12, "--date", DATE, "--ctx", 512, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    with Engine.load(model, CPU, ctx=512) as e:
        conv = Conversation(date=DATE)
        conv.add_user("Hi")
        reply = complete(e, conv, Sampling(seed=11, max_tokens=12))
    assert (out["content"], out["reasoning"], out["usage"]["completion_tokens"]) == (
        reply.content, reply.reasoning, reply.usage.completion_tokens)
    other = cli("run", model, "-p", "Hi", "--seed", 11, "--max-tokens", 12, "--date", DATE, "--ctx", 512, "--json",
                "--temp", 0.5)
    assert json.loads(other.stdout)["content"] != out["content"]  # the seed alone does not fix the answer


# --- the command line ----------------------------------------------------------------------------


def cli(*args, stdin: str | None = None, env: dict | None = None):
    proc = subprocess.run([*CLI, *map(str, args), "--threads", "1"], capture_output=True, text=True, timeout=120, input=stdin,
                          env={**os.environ, **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def stats_lines(err: str) -> int:
    return len(re.findall(r"^\[\d+ tokens; prompt", err, re.MULTILINE))


@pytest.fixture
def files_(tmp_path):
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    (tmp_path / "tool.py").write_text(TOOL_PY)
    return tmp_path


def tool_args(d: Path) -> list:
    return ["--tools", d / "tools.json", "--tool-cmd", f"{sys.executable} {d / 'tool.py'}", "--ctx", 4096,
            "--date", DATE]


def test_run_prints_the_answer_and_json(model, files_):
    env = {"CALLS_LOG": str(files_ / "calls.jsonl")}
    proc = cli("run", model, "-p", "What time is it?", *tool_args(files_), env=env)
    assert proc.returncode == 0 and proc.stdout == ANSWER + "\n"
    assert "[tool] now" in proc.stderr and "tok/s" in proc.stderr and REASONING not in proc.stderr
    shown = cli("run", model, "-p", "What time is it?", "--show-reasoning", *tool_args(files_), env=env)
    assert shown.stdout == ANSWER + "\n" and REASONING in shown.stderr
    js = cli("run", model, "-p", "What time is it?", "--json", *tool_args(files_), env=env)
    out = json.loads(js.stdout)
    assert (out["content"], out["reasoning"], out["finish_reason"]) == (ANSWER, REASONING, "stop")
    assert [(c["name"], c["arguments"], c["result"]) for c in out["tool_calls"]] == [("now", '{"q":1}', "12:00")]
    assert out["usage"]["completion_tokens"] > 0 and out["timings"]["generation_tps"] > 0
    assert out["placement"]["placement"] == "cpu" and out["placement"]["n_ctx"] == 4096
    # no --tool-cmd: the call is printed for a script to act on
    bare = cli("run", model, "-p", "What time is it?", "--tools", files_ / "tools.json", "--ctx", 4096)
    assert json.loads(bare.stdout) == {"name": "now", "arguments": '{"q":1}'}
    assert "--tool-cmd" in bare.stderr


def test_chat_with_piped_stdin_and_save_then_run_from_the_saved_messages(model, files_):
    env = {"CALLS_LOG": str(files_ / "calls.jsonl")}
    saved = files_ / "saved.json"
    proc = cli("chat", model, *tool_args(files_), stdin=f"What time is it?\n\nthanks\n/save {saved}\n", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{ANSWER}\n{ANSWER}\n"  # no prompt decoration when stdin is not a terminal
    assert stats_lines(proc.stderr) == 2 and "saved 6 messages" in proc.stderr
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    # the saved conversation is OpenAI messages that run reads back; an "@" turns the loop on
    messages.append({"role": "user", "content": "@ more"})
    saved.write_text(json.dumps(messages))
    more = cli("run", model, "--messages", saved, "--max-tokens", 11, *tool_args(files_), env=env)
    assert more.stdout == " la la la\n" and "token limit" in more.stderr


def test_chat_commands(model, files_):
    saved = files_ / "saved.json"
    stdin = f"/reasoning high\n/reasoning extreme\n/help\n/bogus\nWhat time is it?\n/reset\n/save {saved}\n"
    proc = cli("chat", model, "--system", "Be brief.", *tool_args(files_), stdin=stdin,
               env={"CALLS_LOG": str(files_ / "calls.jsonl")})
    assert proc.returncode == 0 and proc.stdout == ANSWER + "\n"
    for note in ("reasoning: high", "reasoning effort is one of low, medium, high", "/save FILE",
                 "unknown command /bogus", "conversation cleared"):
        assert note in proc.stderr
    assert json.loads(saved.read_text()) == [{"role": "system", "content": "Be brief."}]  # /reset keeps it
    conv = Conversation([{"role": "system", "content": "Be brief."}], reasoning_effort="high", date=DATE)
    conv.add_user("hi")
    assert "Reasoning: high" in conv.render() and "# Instructions\n\nBe brief." in conv.render()


def warnings_by_turn(err: str) -> list[list[str]]:
    """The `warning: ...` lines of each answered turn (a turn ends with its stats line)."""
    turns = re.split(r"^\[\d+ tokens; prompt.*$", err, flags=re.MULTILINE)[:-1]
    return [re.findall(r"^warning: (.*)$", t, re.MULTILINE) for t in turns]


def test_random_model_output_is_reported_and_the_chat_survives(make_gguf):
    """A random-weights model writes no harmony: the text is shown, the problem reported, the chat goes on.
    What it writes depends on the CPU's kernels, so the report is checked against the --json result of the
    same command (same machine, seed and date), never against expected tokens."""
    random_model = make_gguf(num_hidden_layers=2, seed=3)
    args = ["--ctx", 1024, "--max-tokens", 24, "--seed", 1, "--date", DATE]
    proc = cli("chat", random_model, *args, stdin="Hello\nAgain\n/exit\nNot read\n")
    assert proc.returncode == 0, proc.stderr
    turns = warnings_by_turn(proc.stderr)
    assert len(turns) == 2  # both messages answered, nothing after /exit
    assert all(len(w) <= 1 for w in turns), turns  # at most one problem per turn (no tools): never per token
    js = json.loads(cli("run", random_model, "-p", "Hello", *args, "--json").stdout)
    assert js["usage"]["completion_tokens"] <= 24
    shown = cli("run", random_model, "-p", "Hello", *args)
    assert shown.returncode == 0
    assert warnings_by_turn(shown.stderr) == [js["errors"]]  # each problem the parser found, reported once
    assert shown.stdout == (js["content"] + "\n" if js["content"] else "")  # the text, as parsed, is shown


def test_text_outside_harmony_is_shown_and_reported_every_turn(build):
    """A model that writes plain text without a harmony header (scripted: the same text on any CPU)."""
    plain = build(script(Episode((), "Just words.<|return|>")))
    proc = cli("chat", plain, "--ctx", 1024, "--date", DATE, stdin="Hello\nAgain\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Just words.\nJust words.\n"
    turns = warnings_by_turn(proc.stderr)
    assert len(turns) == 2 and all(len(w) == 1 and "not in the harmony format" in w[0] for w in turns), turns


def test_verbose_passes_the_llama_log(model):
    quiet = cli("run", model, "-p", "hi", "--ctx", 1024, "--max-tokens", 2)
    loud = cli("-v", "run", model, "-p", "hi", "--ctx", 1024, "--max-tokens", 2, "--cpu-moe")
    assert "llama_model_loader" not in quiet.stderr
    assert "llama_model_loader" in loud.stderr and "buffer type overridden" in loud.stderr


def test_help_and_usage_errors():
    for command in ("run", "chat"):
        proc = subprocess.run([*CLI, command, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "Examples:" in proc.stdout and "--tool-cmd" in proc.stdout
    proc = cli("run", __file__)
    assert proc.returncode != 0 and "give a prompt with -p" in proc.stderr


# --- a real terminal -----------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")
def test_chat_in_a_terminal(model, files_):
    """Two turns with a tool call, Ctrl-C during an endless answer, /reset, Ctrl-D, under tmux."""
    session = f"ossgguf-test-{os.getpid()}"
    cmd = shlex.join([*CLI, "chat", str(model), *map(str, tool_args(files_)), "--show-reasoning", "--threads", "1"])
    done = files_ / "exit_status"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50",
                    "-e", f"CALLS_LOG={files_ / 'calls.jsonl'}", f"{cmd}; echo $? > {done}; sleep 60"], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-e", "-J", "-S", "-2000", "-t", session],
                              capture_output=True, text=True).stdout

    def wait_for(text: str, count: int = 1, timeout: float = 20) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = screen()
            if s.count(text) >= count:
                return s
            time.sleep(0.1)
        raise AssertionError(f"{text!r} x{count} not on screen:\n{screen()[-3000:]}")

    def keys(*k: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", session, *k], check=True)

    try:
        wait_for(">>> ")
        keys("What time is it?", "Enter")
        s = wait_for(">>> ", 2)
        assert "[tool] now" in s and ANSWER in s
        assert "\x1b[2m" in s  # reasoning and stats are dimmed on a terminal
        keys("@ sing", "Enter")
        wait_for(" la la la la la la la la")
        keys("C-c")
        s = wait_for("[stopped]")
        wait_for(">>> ", 3)
        keys("/reset", "Enter")
        wait_for("conversation cleared")
        keys("What time is it?", "Enter")
        s = wait_for(">>> ", 5)
        assert s.count("[tool] now") == 2  # after /reset the model has no call in its context again
        keys("C-d")
        end = time.monotonic() + 10
        while not done.exists() and time.monotonic() < end:
            time.sleep(0.1)
        assert done.exists() and done.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
