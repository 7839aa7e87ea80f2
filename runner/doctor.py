"""`ossgguf doctor`: what llama.cpp was built with, what it sees, and what this machine can run.

The build is read from llama.cpp itself (its backend registry, `llama_print_system_info`,
`llama_supports_*`), not from how it was installed: `llama_supports_gpu_offload` is true for any
build with the RPC backend (remote devices are offload targets), so a GPU backend is one whose
registry is compiled in (CUDA, ROCm, MUSA, Vulkan, MTL, ...), and it is in use when llama.cpp lists
a GPU device. A GPU that the build cannot use (an NVIDIA card with a CPU-only build, an AMD one
without ROCm, Apple silicon with Metal off) gets one line with the command that rebuilds for it;
plan/run/chat/serve print the same line once (`gpu_warning`).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ossgguf import build

from .devices import Devices, resolve_devices
from .known_models import DEFAULT, Known, known_model
from .llama_ctypes import BackendDevice, backend_devices, ggml_lib, llama_cpp_module

# registries that are not GPU backends (ggml's names): the CPU, BLAS (an accelerator of the CPU), RPC
NOT_GPU = {"CPU", "BLAS", "RPC"}
# the registry each build.choose backend compiles in (ggml-cuda.h, ggml-vulkan.h, ggml-metal.cpp)
REGISTRY = {"cuda": "CUDA", "rocm": "ROCm", "vulkan": "Vulkan", "metal": "MTL"}


@dataclass(frozen=True)
class Build:
    """The llama.cpp this environment loads."""

    version: str  # llama-cpp-python's
    registries: tuple[str, ...]  # ggml backend registries compiled in: CPU, RPC, CUDA, ...
    features: str  # llama_print_system_info: per registry, its compile-time features
    rpc: bool
    gpu_offload: bool  # llama_supports_gpu_offload (true with RPC alone)
    record: dict | None  # what `make setup` recorded (ossgguf/build.py), None when installed otherwise

    @property
    def gpu_backends(self) -> list[str]:
        return [r for r in self.registries if r not in NOT_GPU]


@functools.cache
def read_build() -> Build:
    lc = llama_cpp_module()
    lc.llama_backend_init()
    g = ggml_lib()
    g.ggml_backend_reg_count.restype = ctypes.c_size_t
    g.ggml_backend_reg_get.argtypes, g.ggml_backend_reg_get.restype = [ctypes.c_size_t], ctypes.c_void_p
    g.ggml_backend_reg_name.argtypes, g.ggml_backend_reg_name.restype = [ctypes.c_void_p], ctypes.c_char_p
    regs = tuple(g.ggml_backend_reg_name(g.ggml_backend_reg_get(i)).decode() for i in range(g.ggml_backend_reg_count()))
    return Build(version=importlib.metadata.version("llama-cpp-python"), registries=regs,
                 features=(lc.llama_print_system_info() or b"").decode(errors="replace").strip(),
                 rpc=bool(lc.llama_supports_rpc()), gpu_offload=bool(lc.llama_supports_gpu_offload()),
                 record=build.read_record())


@dataclass(frozen=True)
class UnusedGpu:
    """A GPU this machine has and the build cannot use, with the command that rebuilds for it."""

    what: str
    backend: str  # build.BACKENDS
    command: str
    note: str = ""

    def line(self) -> str:
        return f"warning: {self.what}, but this llama.cpp has no {REGISTRY[self.backend]} backend: it runs on the CPU. " \
               f"Rebuild with: {self.command}" + (f" ({self.note})" if self.note else "")


def rebuild_command(backend: str, machine: build.Machine) -> tuple[str, str]:
    """The exact commands that rebuild llama-cpp-python for `backend`: `make setup` in a checkout,
    and the pip line for other installs (flags from build.choose, so both build the same thing)."""
    choice = build.choose(machine, backend)
    req = f"llama-cpp-python=={importlib.metadata.version('llama-cpp-python')}"  # the installed (pinned) release
    pip = (f'CMAKE_ARGS="{choice.cmake_args}" {sys.executable} -m pip install --force-reinstall '
           f"--no-cache-dir --no-deps '{req}'")
    return f"make setup GPU={backend}  (or: {pip})", choice.note


def unused_gpu(machine: build.Machine, registries: tuple[str, ...] | list[str]) -> UnusedGpu | None:
    """Pure: the GPU in `machine` that a build with these registries cannot use, if any."""
    if machine.gpus and "CUDA" not in registries:
        names = "; ".join(g.split(" (UUID")[0] for g in machine.gpus[:4])
        cmd, note = rebuild_command("cuda", machine)
        if not machine.nvcc:
            note = "install the CUDA toolkit first: nvcc is not on PATH"
        return UnusedGpu(f"{len(machine.gpus)} NVIDIA GPU(s) found ({names})", "cuda", cmd, note)
    if machine.rocm and "ROCm" not in registries:
        cmd, note = rebuild_command("rocm", machine)
        return UnusedGpu("an AMD GPU with ROCm found (/dev/kfd, hipcc)", "rocm", cmd, note)
    if machine.system == "Darwin" and platform.machine() == "arm64" and "MTL" not in registries:
        cmd, note = rebuild_command("metal", machine)
        return UnusedGpu("Apple silicon found", "metal", cmd, note)
    return None


def _may_have_gpu() -> bool:
    """Cheap first look (no subprocess, no llama.cpp), so that machines without a GPU pay nothing."""
    return (bool(shutil.which("nvidia-smi")) or os.path.isdir("/proc/driver/nvidia/gpus")
            or os.path.exists("/dev/kfd") or (sys.platform == "darwin" and platform.machine() == "arm64"))


_warned: list[str] = []


def gpu_warning() -> str | None:
    """The one-line warning about an unused GPU, the first time it is asked for in this process."""
    if _warned or not _may_have_gpu():
        return None
    found = unused_gpu(build.probe(), read_build().registries)
    _warned.append(found.line() if found else "")
    return found.line() if found else None


# --- the report --------------------------------------------------------------------------------------


@dataclass
class Report:
    build: Build
    devices: list[BackendDevice]  # every device llama.cpp lists, the CPU included
    plan_devices: Devices  # what the planner uses (RAM total, layer devices)
    ram_total: int
    ram_free: int
    disks: list[tuple[Path, int, int]]  # (folder, free, total)
    unused: UnusedGpu | None
    verdicts: list[tuple[Known, object]] = field(default_factory=list)  # (model, runner.plan.Plan)

    def to_json(self) -> dict:
        b = self.build
        return {
            "llama_cpp_python": b.version, "backends": list(b.registries), "gpu_backends": b.gpu_backends,
            "rpc": b.rpc, "gpu_offload": b.gpu_offload, "setup_record": b.record, "features": b.features,
            "devices": [vars(d) for d in self.devices], "ram_total": self.ram_total, "ram_free": self.ram_free,
            "disks": [{"path": str(p), "free": f, "total": t} for p, f, t in self.disks],
            "unused_gpu": ({"what": self.unused.what, "backend": self.unused.backend, "command": self.unused.command,
                            "note": self.unused.note} if self.unused else None),
            "models": [{"model": k.name, "recipe": k.recipe, "file_bytes": p.model.file_bytes, "fits": p.fits,
                        "placement": p.placement, "n_cpu_moe": p.n_cpu_moe, "ctx": p.n_ctx, "reason": p.reason}
                       for k, p in self.verdicts],
        }


def model_dirs() -> list[Path]:
    """Where models live: the Hugging Face cache (downloads) and the current folder (conversions)."""
    from huggingface_hub import constants

    return [Path(constants.HF_HUB_CACHE), Path.cwd()]


def doctor(dirs: list[Path] | None = None, ctx: int = 32768, models: tuple[Known, ...] = DEFAULT) -> Report:
    import psutil

    from .plan import PlacementOptions, plan

    b = read_build()
    vm = psutil.virtual_memory()
    disks = []
    for d in dirs or model_dirs():
        p = next((q for q in [d, *d.parents] if q.exists()), Path("/"))  # a cache not made yet: its disk
        usage = shutil.disk_usage(p)
        disks.append((d, usage.free, usage.total))
    devices = resolve_devices()
    verdicts = [(k, plan(known_model(k.model, k.recipe, k.keep), PlacementOptions(ctx=ctx), devices=devices))
                for k in models]
    return Report(build=b, devices=backend_devices(), plan_devices=devices, ram_total=int(vm.total),
                  ram_free=int(vm.available), disks=disks, unused=unused_gpu(build.probe(), b.registries),
                  verdicts=verdicts)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def format_report(r: Report) -> str:
    b = r.build
    rec = b.record
    lines = [f"llama.cpp: llama-cpp-python {b.version}; backends {', '.join(b.registries)}; "
             f"GPU backend: {', '.join(b.gpu_backends) or 'none (CPU only)'}",
             f"  RPC {'yes' if b.rpc else 'no'}; llama_supports_gpu_offload {'yes' if b.gpu_offload else 'no'}"
             + (" (RPC alone makes it yes)" if b.gpu_offload and not b.gpu_backends else "")
             + "; flash attention: requested by every ossgguf context (flash_attn_type=enabled)",
             "  setup: " + (f"{rec['backend']} build, CMAKE_ARGS=\"{rec['cmake_args']}\"" if rec else
                            "not built by `make setup` (no .llama-backend record in this environment)"),
             f"  features: {b.features}"]
    if rec and REGISTRY.get(rec.get("backend", "")) not in (None, *b.registries):  # installed over since
        lines.append(f"  warning: setup built {rec['backend']}, but the llama.cpp loaded has no "
                     f"{REGISTRY[rec['backend']]} backend: run `make setup GPU={rec['backend']}` again")
    lines += ["", "devices llama.cpp sees:"]
    for d in r.devices:
        lines.append(f"  {d.name:<10} {d.kind:<5} {_gb(d.free)} free of {_gb(d.total)}  {d.description}")
    lines += [f"RAM: {_gb(r.ram_free)} free of {_gb(r.ram_total)}"]
    lines += [f"disk: {_gb(f)} free of {_gb(t)} at {p}" for p, f, t in r.disks]
    if r.unused:
        lines += ["", r.unused.line()]
    gpus = r.plan_devices.gpus
    lines += ["", f"gpt-oss on this machine (planner, {r.verdicts[0][1].n_ctx if r.verdicts else 0}-token context; "
              + (", ".join(g.label for g in gpus) if gpus else "no GPU") + f", {_gb(r.plan_devices.ram_total)} RAM):"]
    for k, p in r.verdicts:
        what = (f"n_cpu_moe={p.n_cpu_moe}" if p.placement == "hybrid" else p.placement)
        lines.append(f"  {k.label:<34} {_gb(p.model.file_bytes):>8}  {'fits' if p.fits else 'does not fit'}: "
                     f"{what} - {p.reason}")
    return "\n".join(lines)
