"""Other machines as devices: llama.cpp's RPC backend (ggml-rpc.h), in this process.

`ossgguf worker` serves this machine's best device with `ggml_backend_rpc_start_server` (what
llama.cpp's rpc-server binary does, so no separate binary is needed); `--rpc host:port,...` registers
each worker with `ggml_backend_rpc_add_server` + `ggml_backend_register` before a model is loaded, after
which llama.cpp lists it as one more GPU-type device (`RPC0`, `RPC1`, ...) and places layers on it like
on a local GPU. Both ends must run the same RPC protocol (7.0.0 in the pinned llama.cpp: both sides
use the same llama-cpp-python release). The protocol has no authentication and no encryption:
workers listen on loopback unless told otherwise (docs/rpc.md: SSH tunnels, private networks).
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ossgguf.errors import OssggufError

from .llama_ctypes import backend_devices, ggml_lib, ggml_library_path, llama_cpp_module

log = logging.getLogger(__name__)

DEFAULT_PORT = 50052  # llama.cpp's rpc-server default
_VP, _SZ = ctypes.c_void_p, ctypes.c_size_t
NOT_BUILT = ("this llama.cpp was built without the RPC backend (GGML_RPC=ON): rebuild it with `make setup` "
             "(the setup builds RPC in) or `CMAKE_ARGS=\"-DGGML_RPC=ON\" pip install --force-reinstall "
             "--no-cache-dir llama-cpp-python==0.3.36`; `ossgguf doctor` shows what the build has")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_endpoint(text: str, what: str = "--rpc") -> Endpoint:
    """'host:port' (or '[v6]:port'; a bare host takes port 50052) -> Endpoint, or a clear error."""
    text = text.strip()
    host, sep, port = text.rpartition(":") if not text.endswith("]") else (text, "", "")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OssggufError(f"{what}: '{text}' is not HOST:PORT (e.g. 192.168.1.20:{DEFAULT_PORT})")
    return Endpoint(host, int(port))


def parse_endpoints(text: str) -> list[Endpoint]:
    """'a:1,b:2' -> endpoints, each once."""
    out = [parse_endpoint(part) for part in text.split(",") if part.strip()]
    if not out:
        raise OssggufError("--rpc: give one or more HOST:PORT, separated by commas")
    if len({str(e) for e in out}) != len(out):
        raise OssggufError(f"--rpc: '{text}' names a worker twice")
    return out


@functools.cache
def _rpc_lib() -> ctypes.CDLL | None:
    """libggml-rpc next to the bundled libggml, with its prototypes; None when the build has no RPC."""
    path = ggml_library_path().with_name(ggml_library_path().name.replace("ggml", "ggml-rpc", 1))  # libggml's own
    if not path.exists():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, _SZ, _SZ, ctypes.POINTER(_VP)]
    lib.ggml_backend_rpc_start_server.restype = None
    lib.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_rpc_add_server.restype = _VP
    g = ggml_lib()
    g.ggml_backend_register.argtypes, g.ggml_backend_register.restype = [_VP], None
    return lib


def rpc_supported() -> bool:
    """Whether this llama.cpp has the RPC backend (llama_supports_rpc, and its library is found)."""
    try:
        return bool(llama_cpp_module().llama_supports_rpc()) and _rpc_lib() is not None
    except OssggufError:
        return False


def _require() -> ctypes.CDLL:
    lib = _rpc_lib() if rpc_supported() else None
    if lib is None:
        raise OssggufError(NOT_BUILT)
    return lib


PROTOCOL = (7, 0)  # RPC_PROTO_MAJOR/MINOR_VERSION of the pinned llama.cpp (ggml-rpc.h)
_HELLO, _GET_DEVICE_MEMORY, _DEVICE_COUNT = 14, 11, 15  # enum rpc_cmd in ggml-rpc.cpp
_CAPS = 24  # RPC_CONN_CAPS_SIZE: all zero asks for the plain TCP transport


@dataclass(frozen=True)
class Worker:
    """What a worker said when asked: its protocol version and each device's (free, total) bytes."""

    endpoint: Endpoint
    version: tuple[int, int, int]
    memory: list[tuple[int, int]]

    @property
    def total(self) -> int:
        return sum(t for _, t in self.memory)


def _call(sock: socket.socket, cmd: int, payload: bytes, answer: int) -> bytes:
    """One request/response of llama.cpp's RPC framing: cmd (1 byte), size (u64), data; size, data."""
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    head = _recv(sock, 8)
    (size,) = struct.unpack("<Q", head)
    if size != answer:
        raise _Malformed(f"answered {size} bytes where {answer} were expected")
    return _recv(sock, size)


class _Malformed(Exception):
    pass


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise _Malformed("closed the connection")
        buf += chunk
    return buf


def probe(endpoint: Endpoint, timeout: float = 5.0) -> Worker:
    """Ask a worker for its version and devices' memory, from Python.

    llama.cpp's own client calls GGML_ABORT, which ends the process, on any failure (no answer, a
    protocol mismatch, a malformed reply), so every worker is asked here first and a failure becomes
    an error that names it. A worker serves one client at a time: a busy one does not answer."""
    hint = (f"start one there with `ossgguf worker --host {endpoint.host} --port {endpoint.port}` (same ossgguf "
            "and llama.cpp release), or check the address and firewall")
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            major, minor, patch = struct.unpack("<3Bx", _call(sock, _HELLO, bytes(_CAPS), 4 + _CAPS)[:4])
            if major != PROTOCOL[0] or minor > PROTOCOL[1]:
                raise OssggufError(f"--rpc: the worker at {endpoint} speaks RPC protocol {major}.{minor}.{patch}, "
                                   f"this llama.cpp {PROTOCOL[0]}.{PROTOCOL[1]}: run the same ossgguf and "
                                   "llama-cpp-python release on both machines")
            (count,) = struct.unpack("<I", _call(sock, _DEVICE_COUNT, b"", 4))
            memory = [struct.unpack("<QQ", _call(sock, _GET_DEVICE_MEMORY, struct.pack("<I", d), 16))
                      for d in range(count)]
    except TimeoutError:
        raise OssggufError(f"--rpc: the worker at {endpoint} does not answer within {timeout:g} s (is it serving "
                           "another client? a worker serves one at a time); " + hint) from None
    except _Malformed as e:
        raise OssggufError(f"--rpc: {endpoint} is not an ossgguf/llama.cpp RPC worker (it {e}); " + hint) from None
    except OSError as e:
        raise OssggufError(f"--rpc: no worker answers at {endpoint} ({e.strerror or e}); " + hint) from None
    return Worker(endpoint, (major, minor, patch), [(int(f), int(t)) for f, t in memory])


def _connects(endpoint: Endpoint, timeout: float) -> bool:
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout):
            return True
    except OSError:
        return False


_ABORT = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_on_abort = None  # the installed callback, kept alive for the process


def _install_abort_line() -> None:
    """When llama.cpp aborts while workers are in use, say which worker went away in one line and exit.

    Any RPC failure inside llama.cpp ends in GGML_ABORT ("Remote RPC server crashed ..."), which names
    no host and prints a backtrace; abort() ends the process whatever the callback does, so a server
    with --rpc stops too (restart it, e.g. under systemd; docs/rpc.md)."""
    global _on_abort
    if _on_abort is not None:
        return

    def on_abort(message: bytes | None) -> None:
        text = (message or b"").decode(errors="replace")
        if "RPC" in text:
            gone = [ep for ep in (parse_endpoint(k) for k in _added) if not _connects(ep, 1.0)]
            names = ", ".join(map(str, gone)) or ", ".join(_added)
            sys.stderr.write(f"error: lost the RPC worker{'s' * (len(gone) > 1)} at {names} "
                             f"(llama.cpp: {text.split(': ', 1)[-1]}); nothing can continue without it: restart "
                             "the worker, then this command\n")
        else:
            sys.stderr.write(f"error: llama.cpp aborted: {text}\n")
        sys.stderr.flush()
        os._exit(134)  # what abort() would give, without the core dump and backtrace

    _on_abort = _ABORT(on_abort)
    g = ggml_lib()
    g.ggml_set_abort_callback.argtypes, g.ggml_set_abort_callback.restype = [_ABORT], _VP
    g.ggml_set_abort_callback(_on_abort)


_added: dict[str, int] = {}  # endpoint -> registry: llama.cpp's device list lives as long as the process
_add_lock = threading.Lock()


def add_workers(endpoints: list[Endpoint]) -> None:
    """Register each worker as a llama.cpp device (once per process), after checking it answers."""
    lib = _require()
    llama_cpp_module().llama_backend_init()
    with _add_lock:
        for ep in endpoints:
            if str(ep) in _added:
                continue
            total = probe(ep).total  # llama.cpp's client aborts the process where this raises
            reg = lib.ggml_backend_rpc_add_server(str(ep).encode())
            if not reg:
                raise OssggufError(f"--rpc: llama.cpp could not add the worker at {ep}")
            ggml_lib().ggml_backend_register(reg)
            _added[str(ep)] = reg
            _install_abort_line()
            log.info("RPC worker %s: %.1f GiB", ep, total / 2**30)


def pick_devices(names: list[str] | None = None) -> list[tuple[str, int]]:
    """(name, device) of what a worker serves: the devices named (llama.cpp's names: CUDA0, Metal, CPU,
    ...), else every non-CPU device, else the CPU (as llama.cpp's rpc-server chooses)."""
    llama_cpp_module().llama_backend_init()
    g = ggml_lib()
    found = [(d, g.ggml_backend_dev_get(i)) for i, d in enumerate(backend_devices())]
    if names:
        known = {d.name: dev for d, dev in found}
        missing = [n for n in names if n not in known]
        if missing:
            raise OssggufError(f"--device: no device named {', '.join(missing)}; this machine has "
                               f"{', '.join(known)}")
        return [(n, known[n]) for n in names]
    return ([(d.name, dev) for d, dev in found if d.kind != "cpu"]
            or [(d.name, dev) for d, dev in found if d.kind == "cpu"])


def _listening(endpoint: Endpoint, seconds: float, server: threading.Thread) -> bool:
    """Whether the server accepts connections (a plain TCP connect: an RPC client would hold the
    worker, which serves one client at a time)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(endpoint.host, endpoint.host)
    deadline = time.monotonic() + seconds
    while server.is_alive() and time.monotonic() < deadline:
        try:
            with socket.create_connection((host, endpoint.port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def serve_worker(endpoint: Endpoint, devices: list[str] | None = None, cache_dir: str | Path | None = None,
                 threads: int | None = None, on_ready=None) -> None:
    """Serve this machine's device(s) to one ossgguf/llama.cpp process at a time until interrupted.

    llama.cpp's server loop never returns, so it runs on a daemon thread and the main thread waits for
    Ctrl-C or SIGTERM, after which the process exits (the OS closes the listening socket)."""
    lib = _require()
    try:  # llama.cpp only prints that it failed; and a connect test cannot tell its socket from another's
        family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as llama.cpp's server socket
            probe.bind((endpoint.host, endpoint.port))
    except OSError as e:
        raise OssggufError(f"could not listen on {endpoint}: {e.strerror or e} (is another worker or program "
                           "using the port, or is the address not one of this machine's?)") from None
    picked = pick_devices(devices)
    arr = (_VP * len(picked))(*(dev for _, dev in picked))
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    n_threads = threads or max(1, len(os.sched_getaffinity(0)))
    args = (str(endpoint).encode(), str(cache_dir).encode() if cache_dir else None, n_threads, len(picked), arr)
    server = threading.Thread(target=lib.ggml_backend_rpc_start_server, args=args, daemon=True, name="ossgguf-rpc")
    server.start()
    if not _listening(endpoint, 10.0, server):
        raise OssggufError(f"could not listen on {endpoint}: is the port in use, or the address not one of this "
                           "machine's?")
    if on_ready:
        on_ready([name for name, _ in picked])
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while server.is_alive() and not stop.wait(0.5):
        pass
