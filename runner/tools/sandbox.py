"""Where the python tool's kernel runs: a bubblewrap sandbox on Linux, a sandbox-exec profile on
macOS, or, only when the user says so, no sandbox at all.

Linux (bubblewrap, Debian/Ubuntu package `bubblewrap`): new user, network, pid, ipc and uts
namespaces (no network at all: the kernel talks to us over unix sockets in a bound folder, ZeroMQ's
`ipc` transport, since TCP cannot cross a network namespace); uid/gid 65534 inside with every
capability dropped; a file system of read-only binds (/usr, this Python's prefix and packages, a
few files of /etc) with /tmp a small tmpfs and the scratch folder bound writable at /mnt/data;
nothing of the user's home. Limits: RLIMIT_DATA (memory), RLIMIT_CPU (a lifetime CPU budget),
RLIMIT_FSIZE, RLIMIT_NPROC set inside the user namespace (it binds there for a normal user); as
root, where RLIMIT_NPROC does not bind (the sandbox's uid maps to root's), a pids cgroup (v1 or v2),
and CPU/memory cgroup limits where those controllers can be written.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ossgguf.errors import OssggufError

log = logging.getLogger(__name__)

SCRATCH = "/mnt/data"  # the python tool's system text promises this folder
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: `sudo apt-get install bubblewrap`; Fedora: `sudo dnf install bubblewrap`)"


@dataclass(frozen=True)
class Limits:
    """What the sandboxed kernel may use. Memory is RLIMIT_DATA (the heap and private mappings:
    an allocation past it fails with MemoryError instead of pushing the machine into swap)."""

    memory_bytes: int = 1 << 30
    pids: int = 64
    cpu_seconds: int = 3600  # over the kernel's life; the kernel is restarted when it is spent
    file_bytes: int = 1 << 30  # the largest file the code may write
    tmp_bytes: int = 64 << 20  # /tmp is a tmpfs: its pages are RAM
    cpus: float = 1.0  # cgroup CPU quota, where the cpu controller can be written


class SandboxUnavailable(OssggufError):
    """No sandbox can run here; the message says what to install (or the unsafe flag)."""


def which_bwrap() -> str | None:
    return shutil.which("bwrap")


# -- cgroups (root only: a normal user's limits come from rlimits inside the user namespace) --------
class Cgroups:
    """The cgroups one sandbox runs in: v1 (a folder per controller) or v2 (one folder)."""

    def __init__(self, name: str, limits: Limits) -> None:
        self.dirs: list[Path] = []
        self.has_pids = False
        root = Path("/sys/fs/cgroup")
        memory, quota = str(limits.memory_bytes + limits.tmp_bytes + (256 << 20)), int(100000 * limits.cpus)
        if (root / "cgroup.controllers").exists():  # v2: one folder, limits for the controllers enabled there
            try:
                enabled = (root / "cgroup.subtree_control").read_text().split()
            except OSError:
                return
            if "pids" not in enabled:
                return
            settings = {"": {"pids.max": str(limits.pids), **({"memory.max": memory} if "memory" in enabled else {}),
                             **({"cpu.max": f"{quota} 100000"} if "cpu" in enabled else {})}}
        else:
            settings = {"pids": {"pids.max": str(limits.pids)}, "memory": {"memory.limit_in_bytes": memory},
                        "cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": str(quota)}}
        for controller, files in settings.items():
            d = root / controller / name
            try:
                d.mkdir()
            except OSError:
                continue
            self.dirs.append(d)
            try:
                for f, v in files.items():
                    (d / f).write_text(v)
                    self.has_pids |= f == "pids.max"
            except OSError as e:
                log.debug("cgroup %s: %s", d, e)

    def remove(self) -> None:
        """Remove the (empty) cgroups; those still holding dying processes stay in `dirs`."""
        left = []
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:  # still has processes: they are being killed
                log.debug("cgroup %s not removed yet: %s", d, e)
                left.append(d)
        self.dirs = left


# -- Linux: bubblewrap -------------------------------------------------------------------------------
def _python_roots() -> list[str]:
    """The folders this Python and its packages live in (bound read-only)."""
    exe = Path(sys.executable)
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, str(exe.parent),
             str(exe.resolve().parent.parent), *map(sysconfig.get_path, ("stdlib", "platstdlib", "purelib", "platlib"))}
    out = sorted({str(Path(r)) for r in roots if r and Path(r).exists()})
    # keep only the outermost folders
    return [r for r in out if not any(r != o and r.startswith(o.rstrip("/") + "/") for o in out)]


def _system_binds() -> list[str]:
    args: list[str] = ["--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        p = Path(d)
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), d]
        elif p.is_dir():
            args += ["--ro-bind", d, d]
    for f in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime", "/etc/nsswitch.conf", "/etc/alternatives",
              "/etc/ssl", "/etc/ld.so.conf.d"):
        if Path(f).exists():
            args += ["--ro-bind", f, f]
    return args


def bwrap_argv(bwrap: str, private: Path, ipc_dir: Path, scratch: Path, limits: Limits, command: list[str]) -> list[str]:
    """The bubblewrap command line that runs `command` (argv inside the sandbox).

    `private` holds our passwd/group files; `ipc_dir` (bound at the same path, read-write) holds the
    connection file and the kernel's sockets; `scratch` is bound at /mnt/data.
    """
    (private / "passwd").write_text("sandbox:x:65534:65534:sandbox:/mnt/data:/usr/sbin/nologin\n")
    (private / "group").write_text("sandbox:x:65534:\n")
    args = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--uid", "65534", "--gid", "65534", "--hostname", "sandbox", "--as-pid-1"]
    args += _system_binds()
    args += ["--ro-bind", str(private / "passwd"), "/etc/passwd", "--ro-bind", str(private / "group"), "/etc/group"]
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.tmp_bytes), "--tmpfs", "/tmp"]
    for root in _python_roots():
        args += ["--ro-bind", root, root]
    args += ["--bind", str(ipc_dir), str(ipc_dir), "--bind", str(scratch), SCRATCH, "--chdir", SCRATCH]
    args += ["--remount-ro", "/"]  # bwrap's root is a tmpfs: nothing but /tmp and the binds above is writable
    args += ["--clearenv"]
    for k, v in sandbox_env().items():
        args += ["--setenv", k, v]
    # rlimits are set inside the new user namespace: there RLIMIT_NPROC counts only the sandbox's
    # processes, and binds (for a normal user; root is bound by the pids cgroup)
    prlimit = ["prlimit", f"--nproc={limits.pids}", f"--data={limits.memory_bytes}", f"--cpu={limits.cpu_seconds}",
               f"--fsize={limits.file_bytes}", "--core=0", "--"]
    return [*args, "--", *prlimit, *command]


def sandbox_env() -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": SCRATCH, "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1", "IPYTHONDIR": "/tmp/.ipython", "JUPYTER_RUNTIME_DIR": "/tmp/.jupyter",
        "JUPYTER_DATA_DIR": "/tmp/.jupyter", "MPLCONFIGDIR": "/tmp/.mpl", "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": "/tmp",
    }


@functools.cache
def probe_bwrap(bwrap: str) -> str | None:
    """None when bubblewrap can make its namespaces here, else why not (its own message)."""
    try:
        r = subprocess.run([bwrap, "--unshare-all", "--die-with-parent", "--cap-drop", "ALL", "--uid", "65534",
                            *_system_binds(), "--proc", "/proc", "--", "true"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip() or f"exit status {r.returncode}")


# -- macOS: sandbox-exec (not testable here: kept short) ---------------------------------------------
def macos_profile(scratch: Path, ipc_dir: Path) -> str:
    """A Seatbelt profile: no network but unix sockets, writes only to the scratch, ipc and temp
    folders, no reads under the user's home except this Python (which may live there)."""
    home = os.path.realpath(Path.home())
    py = [f'(subpath "{r}")' for r in _python_roots()]
    return f"""(version 1)
(allow default)
(deny network*)
(allow network* (local unix-socket) (remote unix-socket (subpath "{ipc_dir}")))
(deny file-write*)
(allow file-write* (subpath "{scratch}") (subpath "{ipc_dir}") (subpath "/private/var/folders") (literal "/dev/null"))
(deny file-read* (subpath "{home}"))
(allow file-read* {' '.join(py)} (subpath "{scratch}") (subpath "{ipc_dir}"))
"""


@dataclass
class SandboxPlan:
    """How the kernel will be started: `kind` is bwrap, sandbox-exec or none (unsafe)."""

    kind: str
    tool: str | None = None


def choose_sandbox(unsafe: bool = False) -> SandboxPlan:
    """The sandbox for this machine; SandboxUnavailable unless one works or `unsafe` is given."""
    if unsafe:
        return SandboxPlan("none")
    if sys.platform.startswith("linux"):
        bwrap = which_bwrap()
        if bwrap is None:
            raise SandboxUnavailable(f"the python tool runs code in a sandbox, and bubblewrap (bwrap) is not installed: "
                                     f"{INSTALL_HINT}; or pass --tools-unsafe to run it without one")
        why = probe_bwrap(bwrap)
        if why is not None:
            raise SandboxUnavailable(
                f"bubblewrap cannot create its namespaces here ({why}). Allow unprivileged user namespaces "
                "(`sysctl kernel.unprivileged_userns_clone=1`; Ubuntu 24.04: an AppArmor profile for bwrap, or "
                "`sysctl kernel.apparmor_restrict_unprivileged_userns=0`), or pass --tools-unsafe")
        return SandboxPlan("bwrap", bwrap)
    if sys.platform == "darwin" and shutil.which("sandbox-exec"):
        return SandboxPlan("sandbox-exec", shutil.which("sandbox-exec"))
    raise SandboxUnavailable(f"no sandbox for the python tool on {sys.platform}: pass --tools-unsafe to run its "
                             "code without one (it can then read and write what you can)")
