"""Which llama.cpp to build for this machine, and building it: `make setup` runs this file.

llama-cpp-python compiles llama.cpp from source with no GPU backend unless CMAKE_ARGS says so, and
pip's wheel cache ignores CMAKE_ARGS: a CPU wheel built once is reused for a GPU build. So the wheel
is built here with `pip wheel --no-cache-dir` into a wheelhouse keyed by the flags
(~/.cache/ossgguf/wheels/<key>/), installed with --force-reinstall, and the flags are recorded in
the venv (`.venv/.llama-backend`) so that `doctor` can say what was built and setup can tell when
they change. RPC is always compiled in (`ossgguf worker`, `--rpc`): it adds one small library.

Stdlib only: it runs before the package and its dependencies are installed
(`python ossgguf/build.py --gpu auto`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("auto", "cuda", "metal", "vulkan", "rocm", "cpu")
_BACKEND_FLAG = {"metal": "-DGGML_METAL=on", "vulkan": "-DGGML_VULKAN=on", "rocm": "-DGGML_HIP=on"}
BASE_FLAGS = ("-DGGML_RPC=ON",)
RECORD = ".llama-backend"  # in the venv: what setup built, read by `ossgguf doctor`


@dataclass
class Machine:
    """What the backend choice depends on, gathered once so that the choice is a pure function."""

    system: str  # platform.system()
    gpus: list[str] = field(default_factory=list)  # `nvidia-smi -L` lines or /proc/driver/nvidia/gpus
    compute_caps: list[str] = field(default_factory=list)  # "9.0", from nvidia-smi
    nvcc: str | None = None
    rocm: bool = False  # hipcc on PATH and /dev/kfd
    vulkan: bool = False  # glslc (the shader compiler the Vulkan build needs) on PATH


@dataclass
class Choice:
    backend: str
    flags: list[str]
    note: str = ""

    @property
    def cmake_args(self) -> str:
        return " ".join(self.flags)


def probe() -> Machine:
    m = Machine(system=platform.system(), nvcc=shutil.which("nvcc"),
                rocm=bool(shutil.which("hipcc")) and os.path.exists("/dev/kfd"),
                vulkan=bool(shutil.which("glslc")))
    if shutil.which("nvidia-smi"):
        m.gpus = [ln for ln in _out(["nvidia-smi", "-L"]).splitlines() if ln.startswith("GPU")]
        caps = _out(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]).split()
        m.compute_caps = [c for c in caps if re.fullmatch(r"\d+\.\d+", c)]
    if not m.gpus and os.path.isdir("/proc/driver/nvidia/gpus"):
        m.gpus = sorted(os.listdir("/proc/driver/nvidia/gpus"))
    return m


def _out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def choose(m: Machine, want: str = "auto") -> Choice:
    """The llama.cpp backend and CMake flags for machine `m`; `want` forces one (GPU=... in make)."""
    if want not in BACKENDS:
        raise ValueError(f"GPU={want!r}: choose one of {', '.join(BACKENDS)}")
    base = list(BASE_FLAGS)
    if want == "auto":
        if m.system == "Darwin":
            want = "metal"
        elif m.gpus and m.nvcc:
            want = "cuda"
        elif m.gpus:
            return Choice("cpu", base, f"{len(m.gpus)} NVIDIA GPU(s) found but no nvcc (the CUDA toolkit): "
                          "building for the CPU; install the CUDA toolkit and run `make setup GPU=cuda`")
        elif m.rocm:
            want = "rocm"
        else:
            note = "nvcc found but no GPU: building for the CPU" if m.nvcc else ""
            return Choice("cpu", base, note)
    if want == "cuda":
        archs = sorted({c.replace(".", "") for c in m.compute_caps})
        # Only the GPUs found: all architectures would triple the build time.
        arch = [f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}"] if archs else []
        return Choice("cuda", base + ["-DGGML_CUDA=on"] + arch,
                      "" if archs else "no GPU found to pick CUDA architectures for: building for CMake's default")
    if want in _BACKEND_FLAG:
        return Choice(want, base + [_BACKEND_FLAG[want]])
    return Choice("cpu", base + (["-DGGML_METAL=off"] if m.system == "Darwin" else []))


def llama_requirement(pyproject: Path) -> str:
    """The pinned llama-cpp-python requirement, from pyproject.toml (defined once there)."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return next(d for d in deps if d.startswith("llama-cpp-python"))


def wheelhouse(req: str, choice: Choice) -> Path:
    key = hashlib.sha256(f"{req} {choice.cmake_args} {platform.machine()} {sys.version_info[:2]}".encode())
    root = Path(os.environ.get("OSSGGUF_WHEELS", Path.home() / ".cache" / "ossgguf" / "wheels"))
    return root / f"{choice.backend}-{key.hexdigest()[:12]}"


def read_record(venv: Path | None = None) -> dict | None:
    """What setup recorded about the llama.cpp build in this venv, or None (not built by setup)."""
    path = Path(venv or sys.prefix) / RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def install(choice: Choice, req: str, python: str, venv: Path) -> None:
    """Build (once per flag set) and install llama-cpp-python for `choice` into `venv`."""
    record = {"backend": choice.backend, "cmake_args": choice.cmake_args, "requirement": req}
    if read_record(venv) == record:
        print(f"llama.cpp: {choice.backend} build already installed ({choice.cmake_args})")
        return
    house = wheelhouse(req, choice)
    wheels = sorted(house.glob("llama_cpp_python-*.whl"))
    if not wheels:
        print(f"llama.cpp: building {req} for {choice.backend} ({choice.cmake_args}); "
              "this compiles llama.cpp: ~5 min on 2 cores for the CPU, longer with a GPU backend", flush=True)
        tmp = house.with_name(house.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        env = dict(os.environ, CMAKE_ARGS=choice.cmake_args)
        subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary",
                        "llama-cpp-python", "-w", str(tmp), req], env=env, check=True)
        shutil.rmtree(house, ignore_errors=True)
        tmp.rename(house)  # only a finished build looks like one
        wheels = sorted(house.glob("llama_cpp_python-*.whl"))
    # --no-deps: its dependencies come with the project's own install right after.
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheels[-1])],
                   check=True)
    (venv / RECORD).write_text(json.dumps(record) + "\n")
    print(f"llama.cpp: installed the {choice.backend} build from {wheels[-1]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", default="auto", help=f"backend: {', '.join(BACKENDS)} (default auto)")
    ap.add_argument("--venv", default=".venv", help="the virtual environment to install into")
    ap.add_argument("--show", action="store_true", help="print the choice and exit")
    a = ap.parse_args(argv)
    try:
        choice = choose(probe(), a.gpu or "auto")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if choice.note:
        print(f"note: {choice.note}")
    if a.show:
        print(f"{choice.backend}: CMAKE_ARGS=\"{choice.cmake_args}\"")
        return 0
    venv = Path(a.venv)
    req = llama_requirement(Path(__file__).resolve().parent.parent / "pyproject.toml")
    install(choice, req, str(venv / "bin" / "python"), venv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
