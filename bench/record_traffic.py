"""Record what Codex CLI and opencode send to `ossgguf serve`, scrubbed, as test data for the prompt cache.

The server is `ossgguf serve`'s app (runner/server/app.py) on the scripted tiny GGUF of tests/test_agents.py
(it calls a tool nobody offered, then answers once the call is in its context), with an ASGI layer in
front that keeps each request's JSON body. The clients are the npm packages tests/test_agents.py pins,
configured with docs/server.md's blocks, HOME/XDG/CODEX_HOME in a temporary folder. Sessions:

- codex: `codex exec PROMPT`, then `codex exec resume --last PROMPT2` (the same conversation);
- opencode: `opencode run PROMPT` (a title request and the agent's requests), then `opencode run -c PROMPT2`.

The bodies are written in order, one JSON object a line ({"path", "body"}), to
tests/data/traffic/{codex,opencode}.jsonl after `scrub`: the temporary home becomes /home/user, the user
name and host name `user` and `host`, dates and times a fixed day, UUIDs and other ids numbered in order
of appearance (consistently, so that prefixes the clients share between requests stay shared).

    python bench/record_traffic.py [--out tests/data/traffic] [--workdir /tmp/record-traffic] [--force]
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # scripted_model and test_agents: the clients' setup lives there

DATE = "2025-03-14"  # the server's system-message date while recording, and what scrubbed dates become
UNIX_MS = "1741953600000"  # DATE 12:00 UTC, in milliseconds
HOME = "/home/user"
PROMPTS = {
    "codex": ("List the files of this project and say what it is for.", "Now say it in one sentence."),
    "opencode": ("List the files of this project and say what it is for.", "Now say it in one sentence.",
                 "Add a line to README.md that says how to run it."),
}

# --- scrubbing --------------------------------------------------------------------------------------------

_UUID = re.compile(r"(?<![0-9a-f])[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(?![0-9a-f])", re.I)
# opencode's and OpenAI-style ids (Codex writes msg_<uuid v7>)
_IDS = re.compile(r"\b(ses|msg|prt|call|resp|fc|rs)_[0-9A-Za-z][0-9A-Za-z-]{7,}")
_UNIX_MS = re.compile(r"(?<!\d)1[5-9]\d{11}(?!\d)")  # Codex's turn_started_at_unix_ms
_ISO_TIME = re.compile(r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?")
_ISO_DATE = re.compile(r"\b(19|20)\d{2}-\d{2}-\d{2}\b")
_DAYS = "Mon|Tue|Wed|Thu|Fri|Sat|Sun"
_MONTHS = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec"
_JS_DATE = re.compile(rf"\b({_DAYS}) ({_MONTHS}) \d{{2}} \d{{4}}\b")  # JavaScript's Date.toDateString()
_TZ = re.compile(r"<timezone>[^<]*</timezone>")


class Scrubber:
    """Rewrites machine-specific text the same way in every body of a recording."""

    def __init__(self, home: Path, extra: dict[str, str] | None = None) -> None:
        self.ids: dict[str, str] = {}
        # longest first: the temporary home before its parents, the user name last
        literal = {str(home): HOME, str(home.resolve()): HOME, **(extra or {})}
        host, user = socket.gethostname(), getpass.getuser()
        if len(host) >= 3:
            literal[host] = "host"
        if len(user) >= 3 and user not in ("root", "user"):
            literal[user] = "user"
        self.literal = sorted(literal.items(), key=lambda kv: -len(kv[0]))

    def _id(self, m: re.Match) -> str:
        old = m.group(0)
        if old not in self.ids:
            n = len(self.ids) + 1
            self.ids[old] = (f"00000000-0000-4000-8000-{n:012d}" if _UUID.fullmatch(old) else
                             f"{old.split('_', 1)[0]}_{n:024d}")
        return self.ids[old]

    def text(self, s: str) -> str:
        for old, new in self.literal:
            s = s.replace(old, new)
        s = _IDS.sub(self._id, s)
        s = _UUID.sub(self._id, s)
        s = _UNIX_MS.sub(UNIX_MS, s)
        s = _ISO_TIME.sub(f"{DATE}T12:00:00Z", s)
        s = _ISO_DATE.sub(DATE, s)
        s = _JS_DATE.sub("Fri Mar 14 2025", s)
        return _TZ.sub("<timezone>UTC</timezone>", s)

    def __call__(self, value):
        """`value` (parsed JSON) with every string, keys included, scrubbed."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, dict):
            return {self.text(k): self(v) for k, v in value.items()}
        return value


# --- recording ----------------------------------------------------------------------------------------------


class Recorder:
    """ASGI middleware: each POST's path and JSON body, in arrival order, then the app as usual."""

    def __init__(self, app) -> None:
        self.app, self.bodies = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        raw = b"".join(chunks)
        try:
            self.bodies.append({"path": scope["path"], "body": json.loads(raw)})
        except ValueError:
            self.bodies.append({"path": scope["path"], "raw": raw.decode(errors="replace")})
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()  # then the disconnect, when it comes

        return await self.app(scope, replay, send)


def clients() -> dict[str, Path]:
    """codex and opencode as tests/test_agents.py installs them (.cache/npm); installed here when missing."""
    from test_agents import NPM_DIR, PACKAGES

    bins = {name: NPM_DIR / "node_modules" / ".bin" / name for name in ("codex", "opencode")}
    if not all(p.exists() for p in bins.values()):
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit("npm not found: it installs " + " ".join(PACKAGES))
        subprocess.run([npm, "install", "--prefix", str(NPM_DIR), "--no-audit", "--no-fund", *PACKAGES], check=True)
    return bins


def tiny_model(workdir: Path) -> Path:
    """The scripted tiny GGUF of tests/test_traffic.py (made once in `workdir`): tests/test_agents.py's script."""
    from scripted_model import scripted_gguf
    from test_traffic import SCRIPT  # the replay test runs the same model

    from ossgguf.fixtures.tiny import TinySpec, make_tiny_checkpoint

    out = workdir / "model"
    found = sorted(out.glob("*.gguf")) if out.is_dir() else []
    if found:
        return found[0]
    ckpt = make_tiny_checkpoint(workdir / "ckpt", TinySpec())
    out.mkdir(parents=True, exist_ok=True)
    return scripted_gguf(ckpt, out, SCRIPT)


def run_client(cmd: list[str], home: Path, timeout: float = 300) -> str:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "CODEX_HOME": str(home / ".codex"),
           "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local" / "share"),
           "XDG_CACHE_HOME": str(home / ".cache"), "XDG_STATE_HOME": str(home / ".local" / "state"),
           "NO_COLOR": "1", "OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_AUTOUPDATE": "1"}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=home / "project", env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, errors="replace", timeout=timeout)
    out = proc.stdout + proc.stderr
    print(f"  {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}: rc {proc.returncode}, "
          f"{time.monotonic() - t0:.1f} s", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{out[-3000:]}")
    return out


def record(workdir: Path, ctx: int = 131072) -> dict[str, list[dict]]:
    """Both clients' sessions against one server; the raw (unscrubbed) bodies per client, and their home."""
    import uvicorn
    from test_agents import MODEL_NAME, configure

    from ossgguf.runner.engine import Engine
    from ossgguf.runner.plan import PlacementOptions
    from ossgguf.runner.server.app import create_app

    bins = clients()
    model = tiny_model(workdir)
    out = {}
    with Engine.load(model, PlacementOptions(gpu_mem=0, ram=16 * 2**30, ctx=ctx)) as engine:
        rec = Recorder(create_app(engine, MODEL_NAME, date=DATE))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(rec, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.1)
        try:
            for name in ("codex", "opencode"):
                home = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
                (home / "project").mkdir()
                (home / "project" / "README.md").write_text("# demo\nA small demo project.\n")
                configure(home, port, ctx)
                first, second, third = (*PROMPTS[name], "")[:3]
                exe = str(bins[name])
                print(f"{name}:", flush=True)
                rec.bodies = []
                if name == "codex":
                    run_client([exe, "exec", "--skip-git-repo-check", first], home)
                    run_client([exe, "exec", "resume", "--skip-git-repo-check", "--last", second], home)
                else:
                    run_client([exe, "run", "-m", f"ossgguf/{MODEL_NAME}", first], home)
                    run_client([exe, "run", "-m", f"ossgguf/{MODEL_NAME}", "-c", second], home)
                    # a new session: its title request comes between the last agent request and the next
                    run_client([exe, "run", "-m", f"ossgguf/{MODEL_NAME}", third], home)
                out[name] = (rec.bodies, home)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    return out


def write_jsonl(path: Path, rows: list[dict], force: bool) -> None:
    if path.exists() and not force:
        raise SystemExit(f"{path} exists: pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows))
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "traffic")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "record-traffic")
    ap.add_argument("--force", action="store_true", help="replace recordings that exist")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    for name, (bodies, home) in record(a.workdir.resolve()).items():
        scrub = Scrubber(home, {str(a.workdir.resolve()): "/tmp"})
        rows = [scrub(b) for b in bodies]
        path = a.out / f"{name}.jsonl"
        write_jsonl(path, rows, a.force)
        leftover = [s for s in (str(home), str(a.workdir), getpass.getuser() if getpass.getuser() != "root" else "")
                    if s and s in path.read_text()]
        assert not leftover, f"{path} still holds {leftover}"
        print(f"{path}: {len(rows)} requests, {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
