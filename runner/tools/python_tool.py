"""gpt-oss's `python` tool: a stateful Jupyter kernel per conversation, in a sandbox (sandbox.py).

The kernel is ipykernel, driven with jupyter_client over ZeroMQ's `ipc` transport (unix sockets in a
private folder bound into the sandbox: the sandbox has no network). What comes back to the model is
what a notebook cell shows: stdout/stderr, the value of the last expression, and errors with a plain
traceback, cut to a bounded size. A call that runs past its timeout is interrupted (KeyboardInterrupt);
a kernel that does not stop, or dies (memory, CPU budget), is restarted and the model is told that
its state is lost.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ossgguf.errors import OssggufError

from .sandbox import Cgroups, Limits, SandboxPlan, SandboxUnavailable, bwrap_argv, macos_profile, sandbox_env

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0  # the tool's system text: "time out after 120.0 seconds"
MAX_OUTPUT_CHARS = 16_000  # about 4k tokens go back into the context at most
START_TIMEOUT = 60.0
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Run silently after each call in the bwrap sandbox, where the kernel is pid 1 of its own pid
# namespace: whatever the call left running (a fork loop's children) ends with the call.
_REAP = """
import os as _o
for _p in _o.listdir('/proc'):
    if _p.isdigit() and int(_p) != _o.getpid():
        try:
            _o.kill(int(_p), 9)
        except OSError:
            pass
while True:
    try:
        if _o.waitpid(-1, _o.WNOHANG)[0] == 0:
            break
    except ChildProcessError:
        break
del _o
"""


@functools.cache
def _spawner() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="ossgguf-kernel-spawner")


class BoundedText:
    """Text kept to `limit` characters: the head and the tail (where an error ends up), with a note of what was cut."""

    def __init__(self, limit: int) -> None:
        self.limit, self.head, self.tail, self.total = limit, "", "", 0

    def add(self, text: str) -> None:
        self.total += len(text)
        room = self.limit * 3 // 4 - len(self.head)
        if room > 0:
            self.head += text[:room]
            text = text[room:]
        if text:
            self.tail = (self.tail + text)[-(self.limit // 4):]

    def text(self) -> str:
        cut = self.total - len(self.head) - len(self.tail)
        if cut <= 0:
            return self.head + self.tail
        return f"{self.head}\n[... {cut:,} characters cut: the output was {self.total:,} characters ...]\n{self.tail}"


class PythonTool:
    """One conversation's kernel, started at the first call. `run(code)` returns the output text."""

    def __init__(self, sandbox: SandboxPlan, limits: Limits | None = None, timeout: float = DEFAULT_TIMEOUT,
                 scratch: str | Path | None = None) -> None:
        try:
            import ipykernel  # noqa: F401
            import jupyter_client  # noqa: F401
        except ImportError as e:
            raise OssggufError(f"the python tool needs its extra: pip install 'ossgguf[tools]' ({e})") from None
        self.sandbox, self.limits = sandbox, limits or Limits()
        self.timeout, self.max_chars = timeout, MAX_OUTPUT_CHARS  # max_chars: tests lower it
        self.user_scratch = Path(scratch) if scratch else None
        self._proc: subprocess.Popen | None = None
        self._client = None
        self._dir: Path | None = None
        self._cgroups: Cgroups | None = None
        self.starts, self._msg_id = 0, ""

    # -- the kernel's life ---------------------------------------------------------------------------
    def _start(self) -> None:
        from jupyter_client import BlockingKernelClient
        from jupyter_client.connect import write_connection_file

        self._dir = Path(tempfile.mkdtemp(prefix="ossgguf-python-"))
        ipc = self._dir / "ipc"
        ipc.mkdir()
        scratch = self.user_scratch or self._dir / "data"
        scratch.mkdir(parents=True, exist_ok=True)
        conn = ipc / "kernel.json"
        write_connection_file(str(conn), transport="ipc", ip=str(ipc / "k"), key=secrets.token_hex(16).encode())
        command = [sys.executable, "-m", "ipykernel_launcher", "-f", str(conn), "--HistoryManager.enabled=False",
                   "--InteractiveShell.xmode=Plain", "--InteractiveShell.colors=NoColor", "--IPKernelApp.quiet=True"]
        log_file = open(self._dir / "kernel.log", "wb")  # noqa: SIM115 - the kernel writes it while it lives
        kind = self.sandbox.kind
        if kind == "bwrap":
            argv = bwrap_argv(self.sandbox.tool, self._dir, ipc, scratch, self.limits, command)
            if os.geteuid() == 0:
                # the sandbox's uid maps to root, which RLIMIT_NPROC does not bind: a pids cgroup does
                self._cgroups = Cgroups(f"ossgguf-python-{os.getpid()}-{secrets.token_hex(4)}", self.limits)
                if not self._cgroups.has_pids:
                    self._cgroups.remove()
                    raise SandboxUnavailable("running as root, the python sandbox limits processes with a pids cgroup, "
                                             "and none could be created under /sys/fs/cgroup: run as a normal user, "
                                             "or pass --tools-unsafe")
                join = "".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))} && " for d in self._cgroups.dirs)
                argv = ["/bin/sh", "-c", join + 'exec "$@"', "sh", *argv]
            env, cwd = None, None
        else:
            env, cwd = {**os.environ, **sandbox_env(), "HOME": str(scratch), "TMPDIR": str(self._dir)}, str(scratch)
            if kind == "sandbox-exec":
                argv = [self.sandbox.tool, "-p", macos_profile(scratch, ipc), *command]
            else:
                env |= {k: str(self._dir / k.lower())
                        for k in ("IPYTHONDIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "MPLCONFIGDIR")}
                argv = command
        # bwrap's --die-with-parent (PR_SET_PDEATHSIG) fires when the *thread* that started it ends:
        # start kernels from one thread that lives as long as this process
        self._proc = _spawner().submit(subprocess.Popen, argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True).result()
        log_file.close()
        self.starts += 1
        client = BlockingKernelClient()
        client.load_connection_file(str(conn))
        client.start_channels()
        self._client = client
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                problem = f"the python tool's kernel ({kind}) exited at start (status {self._proc.returncode})"
            else:
                client.kernel_info()
                try:
                    client.get_shell_msg(timeout=1.0)
                    break
                except queue.Empty:
                    if time.monotonic() <= deadline:
                        continue
                problem = f"the python tool's kernel did not start within {START_TIMEOUT:g} s"
            try:
                why = (self._dir / "kernel.log").read_text(errors="replace").strip()[-1500:] or "no output"
            except OSError:
                why = "no log"
            self._stop()
            raise OssggufError(f"{problem}: {why}")
        while True:  # the start's own iopub status messages
            try:
                client.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                break

    def _stop(self) -> None:
        if self._client is not None:
            try:
                self._client.stop_channels()
            except Exception as e:  # noqa: BLE001 - closing sockets of a dead kernel
                log.debug("stop_channels: %s", e)
            self._client = None
        if self._proc is not None:
            if self._proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(self._proc.pid, signal.SIGKILL)  # bwrap's --die-with-parent takes the rest
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("the python kernel (pid %d) did not exit", self._proc.pid)
        if self._cgroups is not None:
            for _ in range(100):  # the sandbox's processes die just after bwrap
                self._cgroups.remove()
                if not self._cgroups.dirs:
                    break
                time.sleep(0.05)
            else:
                log.warning("cgroups not removed (processes still in them): %s", self._cgroups.dirs)
            self._cgroups = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def reset(self) -> None:
        """Forget the state: the next call starts a new kernel."""
        self._stop()
        self._proc = None

    close = reset

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- one call ------------------------------------------------------------------------------------
    def run(self, code: str) -> str:
        notes = []
        if self._proc is not None and not self.alive:
            self._died(notes)
        if self._proc is None:
            self._start()
        out = BoundedText(self.max_chars)
        status = self._execute(code, out, self.timeout)
        if status == "timeout":
            self._client.control_channel.send(self._client.session.msg("interrupt_request", {}))
            status = self._execute(None, out, 5.0)
            if status == "idle":
                notes.append(f"[timed out after {self.timeout:g} s: interrupted]")
            else:
                notes.append(f"[timed out after {self.timeout:g} s; the kernel did not stop and was restarted: "
                             "its state is lost]")
                self.reset()
        elif status == "died":
            self._died(notes)
        if self.sandbox.kind == "bwrap" and self.alive:
            self._execute(_REAP, BoundedText(0), 10.0, silent=True)
        text = out.text().rstrip("\n")
        return "\n".join([text, *notes]).strip("\n") if notes else text

    def _died(self, notes: list[str]) -> None:
        code = self._proc.returncode
        why = {-signal.SIGXCPU: f"it used its CPU budget of {self.limits.cpu_seconds} s",
               -signal.SIGKILL: "it was killed (out of memory?)"}.get(code, f"exit status {code}")
        notes.append(f"[the python kernel died ({why}); a new one starts at the next call: its state is lost]")
        self.reset()

    def _execute(self, code: str | None, out: BoundedText, timeout: float, silent: bool = False) -> str:
        """Send `code` (None: wait on the call already sent) and collect its output until the kernel
        is idle again: "idle", "timeout" or "died"."""
        client = self._client
        if code is not None:
            self._msg_id = client.execute(code, silent=silent, store_history=not silent, allow_stdin=False,
                                          stop_on_error=False)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            try:
                msg = client.get_iopub_msg(timeout=min(left, 0.5))
            except queue.Empty:
                if not self.alive:
                    return "died"
                continue
            if msg["parent_header"].get("msg_id") != self._msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.add(content.get("text", ""))
            elif kind in ("execute_result", "display_data"):
                data = content.get("data", {})
                out.add(data.get("text/plain", f"<{', '.join(data)}>") + "\n")
            elif kind == "error":
                tb = _ANSI.sub("", "\n".join(content.get("traceback") or [f"{content.get('ename')}: {content.get('evalue')}"]))
                out.add((tb if len(tb) <= 2000 else "...\n" + tb[-2000:]) + "\n")
            elif kind == "status" and content.get("execution_state") == "idle":
                with contextlib.suppress(queue.Empty):  # the execute_reply, so that the shell channel does not fill up
                    client.get_shell_msg(timeout=1.0)
                return "idle"
