"""The setup's llama.cpp backend choice (ossgguf/build.py): one case per rule of issue 15, the probe
on a fake `nvidia-smi`/`nvcc` on PATH, and every CMake flag checked against llama.cpp's own
ggml/CMakeLists.txt (the options of the release the installed llama-cpp-python vendors)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from llama_source import llama_cpp_source

from ossgguf import build
from ossgguf.build import BACKENDS, Machine, choose, probe

ROOT = Path(__file__).resolve().parents[1]
H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-8f1c2a57-3b3e-4a39-9f43-1a2b3c4d5e6f)"
RTX4090 = "GPU 1: NVIDIA GeForce RTX 4090 (UUID: GPU-0c3c8a0e-7d2d-4c55-8b3f-6e5d4c3b2a10)"


def test_gpu_and_nvcc_build_cuda_for_the_archs_found():
    m = Machine("Linux", gpus=[H100, RTX4090, H100], compute_caps=["9.0", "8.9", "9.0"], nvcc="/usr/local/cuda/bin/nvcc")
    c = choose(m)
    assert c.backend == "cuda" and not c.note
    assert c.flags == ["-DGGML_RPC=ON", "-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=89;90"]
    assert c.cmake_args == "-DGGML_RPC=ON -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89;90"


def test_nvcc_without_a_gpu_builds_for_the_cpu_with_a_note():
    c = choose(Machine("Linux", nvcc="/usr/bin/nvcc"))
    assert (c.backend, c.flags) == ("cpu", ["-DGGML_RPC=ON"])
    assert "nvcc found but no GPU" in c.note


def test_a_gpu_without_nvcc_builds_for_the_cpu_and_says_how_to_get_cuda():
    c = choose(Machine("Linux", gpus=["0000:01:00.0"]))  # as /proc/driver/nvidia/gpus lists it
    assert (c.backend, c.flags) == ("cpu", ["-DGGML_RPC=ON"])
    assert "no nvcc" in c.note and "make setup GPU=cuda" in c.note


def test_macos_builds_metal_and_cpu_switches_it_off():
    assert choose(Machine("Darwin")).flags == ["-DGGML_RPC=ON", "-DGGML_METAL=on"]
    # llama.cpp turns Metal on by default on Apple: a CPU build must say off
    assert choose(Machine("Darwin"), "cpu").flags == ["-DGGML_RPC=ON", "-DGGML_METAL=off"]


def test_plain_linux_and_rocm():
    c = choose(Machine("Linux"))
    assert c.backend == "cpu" and not c.note
    assert choose(Machine("Linux", rocm=True)).flags == ["-DGGML_RPC=ON", "-DGGML_HIP=on"]


@pytest.mark.parametrize("want,flag", [("cuda", "-DGGML_CUDA=on"), ("metal", "-DGGML_METAL=on"),
                                       ("vulkan", "-DGGML_VULKAN=on"), ("rocm", "-DGGML_HIP=on"), ("cpu", None)])
def test_forced_backends(want, flag):
    c = choose(Machine("Linux"), want)  # forced: whatever the machine has
    assert c.backend == want and c.flags[0] == "-DGGML_RPC=ON"
    assert c.flags[1:2] == ([flag] if flag else [])
    if want == "cuda":  # no GPU to read architectures from: CMake's default, said so
        assert "default" in c.note


def test_invalid_value_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"GPU='gpu'.*auto, cuda, metal, vulkan, rocm, cpu"):
        choose(Machine("Linux"), "gpu")
    out = subprocess.run([sys.executable, str(ROOT / "ossgguf" / "build.py"), "--gpu", "gpu", "--show"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "choose one of" in out.stderr


def test_every_flag_is_an_option_of_llama_cpp():
    cmake = (llama_cpp_source("ggml/CMakeLists.txt") / "ggml/CMakeLists.txt").read_text()
    options = set(re.findall(r"^option\((\w+)", cmake, re.M))
    m = Machine("Linux", gpus=[H100], compute_caps=["9.0"], nvcc="nvcc")
    for want in BACKENDS:
        for flag in choose(m, want).flags:
            name = flag[2:].split("=")[0]
            assert name in options or name == "CMAKE_CUDA_ARCHITECTURES", flag


def _fake_tools(folder: Path, gpus: list[str], caps: list[str]) -> dict:
    """`nvidia-smi` answering -L and --query-gpu=compute_cap as the real one does, and an `nvcc`."""
    folder.mkdir(exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\ncase \"$1\" in\n"
                   f"  -L) printf '%s\\n' {' '.join(repr(g) for g in gpus)} ;;\n"
                   f"  --query-gpu=compute_cap) printf '%s\\n' {' '.join(caps)} ;;\n"
                   "  *) exit 0 ;;\nesac\n")
    nvcc = folder / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    for f in (smi, nvcc):
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_probe_reads_a_fake_nvidia_smi(tmp_path, monkeypatch):
    for k, v in _fake_tools(tmp_path / "bin", [H100, RTX4090], ["9.0", "8.9"]).items():
        monkeypatch.setenv(k, v)
    m = probe()
    assert m.gpus == [H100, RTX4090] and m.compute_caps == ["9.0", "8.9"] and m.nvcc.endswith("/bin/nvcc")
    if sys.platform.startswith("linux"):  # (macOS builds Metal whatever it finds)
        assert choose(m).cmake_args.endswith("-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89;90")
        out = subprocess.run([sys.executable, str(ROOT / "ossgguf" / "build.py"), "--show"], capture_output=True,
                             text=True)
        assert out.returncode == 0 and 'cuda: CMAKE_ARGS="-DGGML_RPC=ON -DGGML_CUDA=on' in out.stdout


def test_wheelhouse_is_keyed_by_the_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSGGUF_WHEELS", str(tmp_path))
    req = build.llama_requirement(ROOT / "pyproject.toml")
    cpu, cuda = choose(Machine("Linux"), "cpu"), choose(Machine("Linux"), "cuda")
    assert req.startswith("llama-cpp-python==")
    assert build.wheelhouse(req, cpu) != build.wheelhouse(req, cuda)
    assert build.wheelhouse(req, cpu) == build.wheelhouse(req, choose(Machine("Linux")))
    assert build.wheelhouse(req, cuda).parent == tmp_path and build.wheelhouse(req, cuda).name.startswith("cuda-")
