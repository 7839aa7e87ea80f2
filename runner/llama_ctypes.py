"""ctypes glue for what llama-cpp-python 0.3.36 leaves unwrapped: buffer overrides, devices, the log.

- `llama_model_params.tensor_buft_overrides` is declared `c_void_p` there; llama.cpp reads it as a
  NULL-terminated array of `{const char *pattern; ggml_backend_buffer_type_t buft}`.
- The bundled libggml (`ggml_lib`, the project's one loader) holds the backend device list,
  `ggml_backend_cpu_buffer_type()`, the quantizers (quantize/kernels.py) and the reads of graph
  tensors (the eval callback of runner/calibrate.py).
- llama.cpp's log is global (`llama_log_set` also sets ggml's); `LlamaLog` routes it: through to
  stderr in verbose mode (debug lines included), into captures for measurements and tests, and
  otherwise into a short ring buffer that error messages quote.
- `OSSGGUF_NO_REPACK=1` turns llama.cpp's weight repacking off (`use_extra_bufts = False`) for every
  model this project loads: the CPU then runs other kernels, as another processor would (tests use it).

The struct layouts match llama-cpp-python 0.3.36 (pinned in pyproject.toml).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import importlib.util
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ossgguf.errors import OssggufError

log = logging.getLogger(__name__)

# enum ggml_log_level (ggml.h)
LOG_NONE, LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_CONT = range(6)
# enum ggml_backend_dev_type (ggml-backend.h)
_DEV_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


def llama_cpp_module():
    """llama_cpp.llama_cpp, imported on first use (loading libllama takes a moment)."""
    import llama_cpp.llama_cpp as lc

    return lc


NO_REPACK_ENV = "OSSGGUF_NO_REPACK"


def repack_enabled() -> bool:
    """False when OSSGGUF_NO_REPACK is set (to anything but "" or "0")."""
    return os.environ.get(NO_REPACK_ENV, "").strip() in ("", "0")


def model_params():
    """llama_model_default_params() with repacking as OSSGGUF_NO_REPACK says."""
    mp = llama_cpp_module().llama_model_default_params()
    mp.use_extra_bufts = repack_enabled()
    return mp


@functools.lru_cache(maxsize=1)
def _llama_class():
    from llama_cpp import Llama

    class _Llama(Llama):
        # Llama.__init__ (0.3.36) assigns `self.model_params` once, before it loads the model and
        # then only sets other fields: the setter switches repacking in time, with no option for it.
        @property
        def model_params(self):
            return self._ossgguf_model_params

        @model_params.setter
        def model_params(self, mp) -> None:
            mp.use_extra_bufts = repack_enabled()
            self._ossgguf_model_params = mp

    return _Llama


def open_llama(path: str | Path, **kwargs):
    """llama_cpp.Llama(path, **kwargs) with repacking as OSSGGUF_NO_REPACK says: every comparison
    against raw llama-cpp-python then runs the kernels the engine runs."""
    return _llama_class()(str(path), **kwargs)


class BuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override (llama.h)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def ggml_library_path(search_dirs: Sequence[Path] | None = None) -> Path:
    """The libggml that llama-cpp-python ships, found without importing llama_cpp (no libllama load)."""
    if search_dirs is None:
        search_dirs = []
        if override := os.environ.get("LLAMA_CPP_LIB_PATH"):  # llama_cpp honours it too
            search_dirs.append(Path(override))
        spec = importlib.util.find_spec("llama_cpp")
        for loc in (spec.submodule_search_locations or []) if spec else []:
            search_dirs.append(Path(loc) / "lib")
    # The soname first: a wheel stores libggml.so and libggml.so.0 as two files, and loading the one
    # libllama does not link would map a second libggml with its own device registry (RPC devices added
    # there are invisible to llama.cpp) and its own backends.
    names = {"win32": ("ggml.dll", "libggml.dll"), "darwin": ("libggml.0.dylib", "libggml.dylib", "libggml.so")}.get(
        sys.platform, ("libggml.so.0", "libggml.so"))
    for d in search_dirs:
        for name in names:
            if (Path(d) / name).exists():
                return Path(d) / name
    where = ", ".join(str(d) for d in search_dirs) or "nowhere (llama_cpp is not installed)"
    raise OssggufError(f"libggml not found (looked in {where}): install llama-cpp-python==0.3.36 in this "
                       "environment, or set LLAMA_CPP_LIB_PATH to the folder holding its libggml")


_VP, _SZ, _I64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
_PROTOTYPES = {  # ggml.h and ggml-backend.h of the pinned release
    "ggml_quantize_chunk": ([ctypes.c_int, _VP, _VP, _I64, _I64, _I64, _VP], _SZ),
    "ggml_quantize_init": ([ctypes.c_int], None),
    "ggml_quantize_requires_imatrix": ([ctypes.c_int], ctypes.c_bool),
    "ggml_row_size": ([ctypes.c_int, _I64], _SZ),
    "ggml_blck_size": ([ctypes.c_int], _I64),
    "ggml_type_size": ([ctypes.c_int], _SZ),
    "ggml_nbytes": ([_VP], _SZ),
    "ggml_backend_tensor_get": ([_VP, _VP, _SZ, _SZ], None),  # copies from any backend, GPU buffers too
    "ggml_backend_cpu_buffer_type": ([], _VP),
    "ggml_backend_buft_name": ([_VP], ctypes.c_char_p),
    "ggml_backend_dev_count": ([], _SZ),
    "ggml_backend_dev_get": ([_SZ], _VP),
    "ggml_backend_dev_name": ([_VP], ctypes.c_char_p),
    "ggml_backend_dev_description": ([_VP], ctypes.c_char_p),
    "ggml_backend_dev_type": ([_VP], ctypes.c_int),
    "ggml_backend_dev_memory": ([_VP, ctypes.POINTER(_SZ), ctypes.POINTER(_SZ)], None),
}


@functools.cache
def ggml_lib() -> ctypes.CDLL:
    """The bundled libggml (its dependencies bring ggml-base and ggml-cpu): the quantizers, the
    backend devices and tensor reads, with their prototypes. The process's one copy: libllama links
    the same file."""
    path = ggml_library_path()
    try:
        lib = ctypes.CDLL(str(path))
        for name, (args, res) in _PROTOTYPES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
    except (OSError, AttributeError) as exc:
        raise OssggufError(f"{path} is not a usable libggml ({exc}): reinstall llama-cpp-python==0.3.36") from None
    log.debug("libggml: %s", path)
    return lib


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor of the ggml bundled with llama-cpp-python 0.3.36 (ggml/include/ggml.h)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", _VP), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", _VP * 10), ("view_src", _VP),
                ("view_offs", ctypes.c_size_t), ("data", _VP), ("name", ctypes.c_char * 64),
                ("extra", _VP), ("padding", ctypes.c_char * 8)]


def tensor_data(addr: int) -> tuple[GgmlTensor, np.ndarray]:
    """A graph tensor's struct and its bytes, copied from whichever backend holds them."""
    lib = ggml_lib()
    n = lib.ggml_nbytes(addr)
    buf = np.empty(n, np.uint8)
    lib.ggml_backend_tensor_get(addr, buf.ctypes.data, 0, n)
    return GgmlTensor.from_address(addr), buf


def cpu_buffer_type() -> int:
    """ggml_backend_cpu_buffer_type(): llama.cpp then also considers CPU_REPACK for the tensor."""
    llama_cpp_module().llama_backend_init()
    return int(ggml_lib().ggml_backend_cpu_buffer_type())


class BufferOverrides:
    """A NULL-terminated override array for `llama_model_params.tensor_buft_overrides`.

    Holds the pattern bytes and the array itself: llama.cpp keeps the pointer, so this object must
    live as long as the model does.
    """

    def __init__(self, patterns: Sequence[str]):
        self.patterns = list(patterns)
        self._bytes = [p.encode() for p in self.patterns]
        self.array = (BuftOverride * (len(self._bytes) + 1))()
        buft = cpu_buffer_type() if self._bytes else None
        for i, p in enumerate(self._bytes):
            self.array[i].pattern = p
            self.array[i].buft = buft
        self.array[len(self._bytes)].pattern = None  # the terminator

    @property
    def address(self) -> int | None:
        return ctypes.addressof(self.array) if self.patterns else None


@dataclass(frozen=True)
class BackendDevice:
    """One ggml backend device as llama.cpp sees it (Metal reports its GPU working-set limit as total)."""

    name: str
    description: str
    kind: str  # cpu, gpu, igpu, accel
    free: int
    total: int


def backend_devices() -> list[BackendDevice]:
    llama_cpp_module().llama_backend_init()
    lib = ggml_lib()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(BackendDevice(
            name=(lib.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
            description=(lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
            kind=_DEV_KINDS.get(lib.ggml_backend_dev_type(dev), "other"),
            free=int(free.value), total=int(total.value),
        ))
    return out


class LlamaLog:
    """Routes llama.cpp's (and ggml's) log. One instance per process: the C side has one callback."""

    def __init__(self) -> None:
        self.verbose = False
        self.recent: collections.deque[str] = collections.deque(maxlen=40)
        self._captures: list[list[tuple[int, str]]] = []
        self._partial = ""
        self._level = LOG_INFO
        self._lock = threading.Lock()
        self._callback = None  # the CFUNCTYPE object must stay referenced

    def install(self) -> None:
        if self._callback is not None:
            return
        lc = llama_cpp_module()
        self._callback = lc.llama_log_callback(self._on_log)
        lc.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        chunk = text.decode("utf-8", errors="replace") if text else ""
        with self._lock:
            if level != LOG_CONT:
                self._level = level
            if self.verbose:
                sys.stderr.write(chunk)
                sys.stderr.flush()
            self._partial += chunk
            while "\n" in self._partial:
                line, self._partial = self._partial.split("\n", 1)
                self.recent.append(line)
                for cap in self._captures:
                    cap.append((self._level, line))

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[tuple[int, str]]]:
        """Collect every (level, line) logged inside the block, debug lines included."""
        self.install()
        lines: list[tuple[int, str]] = []
        with self._lock:
            self._captures.append(lines)
        try:
            yield lines
        finally:
            with self._lock:
                self._captures.remove(lines)

    def last_errors(self, n: int = 3) -> str:
        """The last few lines, for an error message when llama.cpp refuses something."""
        return " | ".join(list(self.recent)[-n:])


LLAMA_LOG = LlamaLog()


# --- llama.cpp's own buffer report --------------------------------------------------------------------

_BUF_LINE = re.compile(r"^\S+:\s+(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")
_KV_SIZE = re.compile(r"^llama_kv_cache: size =\s+([\d.]+) MiB \(\s*(\d+) cells,\s+(\d+) layers")


@dataclass(frozen=True)
class ReportedBuffer:
    kind: str  # model, KV, compute, output
    buffer: str  # llama.cpp's buffer name: CPU, CPU_REPACK, CPU_Mapped, CUDA0, Metal, ...
    bytes: int  # from MiB with two decimals: +-5 KiB


def parse_buffer_lines(lines: Sequence[str]) -> list[ReportedBuffer]:
    """The `... buffer size = X MiB` lines of a model load and context creation."""
    out = []
    for line in lines:
        m = _BUF_LINE.match(line.strip())
        if m:
            out.append(ReportedBuffer(m.group(2), m.group(1), round(float(m.group(3)) * 2**20)))
    return out


def parse_kv_cells(lines: Sequence[str]) -> list[tuple[int, int]]:
    """(cells, layers) of each KV cache llama.cpp created (the iSWA cache makes two)."""
    out = []
    for line in lines:
        m = _KV_SIZE.match(line.strip())
        if m:
            out.append((int(m.group(2)), int(m.group(3))))
    return out
