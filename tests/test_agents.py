"""Codex CLI and opencode, the real clients, against `ossgguf serve`, configured as docs/server.md says.

The clients come from the npm registry at pinned versions and are installed once into .cache/npm
(git ignores it); without npm or the registry these tests skip. HOME, XDG_* and CODEX_HOME point
into a temporary folder, and the config files are the blocks of docs/server.md with the test's port
(and, for the small context, its --ctx). The model is the scripted tiny GGUF (tests/scripted_model.py):
with no tool call in its context it calls a tool nobody offered with arguments that are not JSON;
once a call is in the context it answers. So an answer shows that the client got the malformed call,
answered it and sent it back, and that the server took it (docs/server.md, "Malformed tool calls").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from scripted_model import Episode, Script, scripted_gguf
from serving import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "server.md"
PACKAGES = ("@openai/codex@0.171.0", "opencode-ai@1.18.33")
NPM_DIR = ROOT / ".cache" / "npm" / "agents-codex-0.171.0-opencode-1.18.33"
DOC_CTX, DOC_PORT = 65536, 8080  # what the docs' config blocks are written for
MODEL_NAME = "gpt-oss-20b"  # the docs' --model-name
ANSWER = "Sunny, 21 C."
SMALL_CTX = 4096  # less than either client's system prompt and tools

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def agents() -> dict[str, Path]:
    """codex and opencode from the npm registry, installed once per version pair (kept across runs)."""
    bins = {name: NPM_DIR / "node_modules" / ".bin" / name for name in ("codex", "opencode")}
    if not all(p.exists() for p in bins.values()):
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm not found: the agent tests install Codex CLI and opencode with it")
        tmp = NPM_DIR.with_name(f"{NPM_DIR.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [npm, "install", "--prefix", str(tmp), "--no-audit", "--no-fund", "--loglevel=error",
               "--cache", str(tmp / "npm-cache"), "--fetch-timeout=30000", "--fetch-retries=1", *PACKAGES]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.skip(f"npm install {' '.join(PACKAGES)} did not finish in 600 s (registry unreachable?)")
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            errors = [line.removeprefix("npm error").strip() for line in proc.stderr.splitlines()
                      if line.startswith("npm error") and line.removeprefix("npm error").strip()]
            pytest.skip(f"npm install {' '.join(PACKAGES)} failed (registry unreachable?): {'; '.join(errors[:3])}")
        shutil.rmtree(tmp / "npm-cache", ignore_errors=True)  # the downloads: only the installed tree is kept
        shutil.rmtree(NPM_DIR, ignore_errors=True)
        try:
            os.replace(tmp, NPM_DIR)  # whole or not at all: a cut-off install is never reused
        except OSError:  # another test run installed it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    for name, path in bins.items():
        try:
            subprocess.run([str(path), "--version"], capture_output=True, timeout=60, check=True)
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"{name} from npm does not run on this machine: {exc}")
    return bins


@pytest.fixture(scope="module")
def model(make_ckpt, tmp_path_factory) -> Path:
    script = Script(("<|call|>",), [Episode((), ' to=functions.nowhere<|message|>{"q":<|call|>'),
                                    Episode(("<|call|>",), f"<|channel|>final<|message|>{ANSWER}<|return|>")])
    return scripted_gguf(make_ckpt(), tmp_path_factory.mktemp("agents"), script)


@contextmanager
def serve(model: Path, ctx: int, log: Path, *args: str):
    """`ossgguf serve` as a user starts it (and `args`), on a free port of 127.0.0.1 (its stderr into `log`);
    yields the port."""
    port = free_port()
    cmd = [sys.executable, "-m", "ossgguf.cli", "serve", str(model), "--port", str(port), "--model-name",
           MODEL_NAME, "--ctx", str(ctx), "--gpu-mem", "0", "--ram", "16GiB", *args]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stderr=err)
    try:
        wait_healthy(port, proc, log.read_text)
        yield port
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def doc_block(section: str, lang: str) -> str:
    """The first ```lang block under `## section` of docs/server.md."""
    part = DOCS.read_text(encoding="utf-8").split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return part.split(f"```{lang}\n", 1)[1].split("```", 1)[0]


def configure(home: Path, port: int, ctx: int) -> None:
    """Both clients' config files: the docs' blocks for this port and this --ctx."""

    def adapted(text: str, numbers: dict[int, int]) -> str:
        for old, new in {DOC_PORT: port, **numbers}.items():
            assert str(old) in text, f"docs/server.md's config no longer holds {old}: update {__file__}"
            text = text.replace(str(old), str(new))
        return text

    codex = adapted(doc_block("Codex CLI", "toml"), {DOC_CTX: ctx})
    opencode = adapted(doc_block("opencode", "json"), {DOC_CTX: ctx, DOC_CTX // 4: ctx // 4})
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    (home / ".codex" / "config.toml").write_text(codex)
    (home / ".config" / "opencode").mkdir(parents=True, exist_ok=True)
    (home / ".config" / "opencode" / "opencode.json").write_text(opencode)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("home")
    (home / "project").mkdir()
    return home


def run(agent: str, bins: dict[str, Path], home: Path, timeout: float) -> tuple[int, str, float]:
    """One prompt through `codex exec` or `opencode run`: exit status, output (stdout and stderr), seconds."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "CODEX_HOME": str(home / ".codex"),
           "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local" / "share"),
           "XDG_CACHE_HOME": str(home / ".cache"), "XDG_STATE_HOME": str(home / ".local" / "state"),
           "NO_COLOR": "1",
           # no calls to models.dev or for updates: the test needs only the local server
           "OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_AUTOUPDATE": "1"}
    cmd = ([str(bins["codex"]), "exec", "--skip-git-repo-check", "Say hi"] if agent == "codex" else
           [str(bins["opencode"]), "run", "-m", f"ossgguf/{MODEL_NAME}", "Say hi"])
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=home / "project", env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (exc.stdout, exc.stderr))
        pytest.fail(f"{agent} still ran after {timeout:.0f} s (a compaction loop?):\n{out[-2000:]}")
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def test_agents_answer_with_the_docs_configuration(agents, model, home):
    with serve(model, DOC_CTX, home / "serve.log") as port:
        configure(home, port, DOC_CTX)
        for agent in ("codex", "opencode"):
            rc, out, seconds = run(agent, agents, home, timeout=180)
            assert rc == 0 and ANSWER in out, (agent, out[-3000:])
            assert "nowhere" in out, (agent, out[-3000:])  # the malformed call it got and answered


def test_agents_stop_on_a_context_too_small_for_their_prompt(agents, model, home):
    with serve(model, SMALL_CTX, home / "serve-small.log") as port:
        configure(home, port, SMALL_CTX)
        for agent in ("codex", "opencode"):
            rc, out, seconds = run(agent, agents, home, timeout=60)
            assert rc != 0 and seconds < 60, (agent, out[-3000:])
            assert f"context (--ctx {SMALL_CTX}): restart `ossgguf serve` with --ctx" in out, (agent, out[-3000:])
