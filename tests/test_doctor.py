"""`ossgguf doctor` and the unused-GPU warning: on this machine (a CPU + RPC build, no GPU), with a
fake `nvidia-smi` on PATH, and the known-model shapes against a GGUF that gguf-py writes.

References: llama.cpp's own words (llama_print_system_info, its device list, the "using device" log
line of a load asking for every layer on a GPU), psutil and shutil for memory and disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import psutil
import pytest
from gptoss_shapes import GPT_OSS_20B, GPT_OSS_120B, Dims, write_sparse_gguf
from test_build import H100, _fake_tools

from ossgguf import build
from ossgguf.runner import doctor as doc
from ossgguf.runner.known_models import known_model
from ossgguf.runner.llama_ctypes import LLAMA_LOG, backend_devices, llama_cpp_module
from ossgguf.runner.plan import GiB, PlacementOptions, plan, read_model


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ossgguf.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_doctor_on_this_machine(tmp_path, make_gguf):
    r = doc.doctor([tmp_path], ctx=8192)
    lc = llama_cpp_module()
    info = lc.llama_print_system_info().decode()
    # the registries that report features in llama.cpp's own system info ("CPU : SSE3 = 1 | ...")
    assert "CPU" in re.findall(r"(\w+) : ", info) and set(re.findall(r"(\w+) : ", info)) <= set(r.build.registries)
    assert r.build.rpc == bool(lc.llama_supports_rpc()) and r.build.gpu_offload == bool(lc.llama_supports_gpu_offload())
    assert [d.name for d in r.devices] == [d.name for d in backend_devices()]
    assert r.ram_total == psutil.virtual_memory().total
    assert r.disks[0][0] == tmp_path and abs(r.disks[0][1] - shutil.disk_usage(tmp_path).free) < 1 << 30
    # whether the build can place layers on a GPU: llama.cpp says "using device" when it can
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = 99
    with LLAMA_LOG.capture() as lines:
        lc.llama_model_free(lc.llama_model_load_from_file(str(make_gguf()).encode(), mp))
    uses_gpu = any("using device" in line and "RPC" not in line for _, line in lines)
    assert bool(r.build.gpu_backends and r.plan_devices.gpus) == uses_gpu
    text = doc.format_report(r)
    for k, p in r.verdicts:
        assert k.label in text and p.n_ctx == 8192
    if not r.build.gpu_backends:  # this machine: a build without a GPU backend, RPC compiled in
        assert "GPU backend: none (CPU only)" in text
        assert r.build.gpu_offload and "RPC alone makes it yes" in text
    out = _cli("doctor", "--json", "--dir", str(tmp_path), "--ctx", "8192")
    assert out.returncode == 0, out.stderr
    j = json.loads(out.stdout)
    assert j["backends"] == list(r.build.registries) and [m["fits"] for m in j["models"]] == [p.fits for _, p in r.verdicts]


@pytest.mark.parametrize("dims,recipe", [(GPT_OSS_20B, "mxfp4-q8"), (GPT_OSS_120B, "mxfp4-q8"),
                                         (Dims(n_layer=36, n_expert=96), "mxfp4-q8")])
def test_known_models_match_a_gguf_written_by_gguf_py(tmp_path, dims, recipe):
    ref = read_model(write_sparse_gguf(tmp_path / "m.gguf", dims))  # llama.cpp's MXFP4 layout (Q8_0 others)
    name = "gpt-oss-20b" if dims.n_layer == 24 else "gpt-oss-120b"
    ours = known_model(name, recipe, keep=dims.n_expert if dims.n_expert not in (32, 128) else None)
    assert sorted((t.name, t.qtype, t.shape) for t in ours.tensors) == sorted((t.name, t.qtype, t.shape) for t in ref.tensors)
    assert abs(ours.file_bytes - ref.file_bytes - 13e6) < 2e6  # the real file's tokenizer metadata
    opts = PlacementOptions(gpu_mem=24 * GiB, ram=64 * GiB, ctx=32768)
    a, b = plan(ours, opts), plan(ref, opts)
    assert (a.fits, a.placement, a.n_cpu_moe, a.gpu_bytes) == (b.fits, b.placement, b.n_cpu_moe, b.gpu_bytes)


def test_fake_nvidia_smi_gets_the_warning_and_the_rebuild_command(tmp_path, make_gguf):
    env = dict(os.environ, **_fake_tools(tmp_path / "bin", [H100], ["9.0"]))
    if "CUDA" in doc.read_build().registries:
        pytest.skip("this llama.cpp has CUDA: there is no unused GPU to warn about")
    out = _cli("doctor", "--dir", str(tmp_path), "--ctx", "4096", env=env)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("warning:"))
    assert "1 NVIDIA GPU(s) found (GPU 0: NVIDIA H100 80GB HBM3)" in line and "no CUDA backend" in line
    assert "make setup GPU=cuda" in line
    assert ('CMAKE_ARGS="-DGGML_RPC=ON -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90"' in line
            and "--force-reinstall --no-cache-dir" in line)
    # plan and run print the same line, once, on stderr (stdout stays the answer)
    model = make_gguf()
    for args in (["plan", str(model), "--gpu-mem", "0"],
                 ["run", str(model), "-p", "Hi", "--max-tokens", "2", "--ctx", "256", "--gpu-mem", "0"]):
        out = _cli(*args, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stderr.count(line) == 1 and "NVIDIA" not in out.stdout
    # without the fake tools: no warning on this machine
    out = _cli("plan", str(model), "--gpu-mem", "0")
    assert out.returncode == 0 and "NVIDIA" not in out.stderr


def test_unused_gpu_cases(monkeypatch):
    nv = build.Machine("Linux", gpus=[H100], compute_caps=["9.0"])
    w = doc.unused_gpu(nv, ("RPC", "CPU"))
    assert w.backend == "cuda" and "nvcc is not on PATH" in w.note  # the toolkit comes first
    assert doc.unused_gpu(nv, ("CUDA", "RPC", "CPU")) is None  # a CUDA build uses it
    amd = doc.unused_gpu(build.Machine("Linux", rocm=True), ("CPU",))
    assert amd.backend == "rocm" and "make setup GPU=rocm" in amd.command and "-DGGML_HIP=on" in amd.command
    assert doc.unused_gpu(build.Machine("Linux", rocm=True), ("ROCm", "CPU")) is None
    monkeypatch.setattr(doc.platform, "machine", lambda: "arm64")
    mac = doc.unused_gpu(build.Machine("Darwin"), ("CPU", "RPC"))
    assert mac.backend == "metal" and "-DGGML_METAL=on" in mac.command
    assert doc.unused_gpu(build.Machine("Darwin"), ("MTL", "CPU")) is None
    assert doc.unused_gpu(build.Machine("Linux", nvcc="/usr/bin/nvcc"), ("CPU",)) is None


def test_a_setup_record_the_loaded_build_does_not_match(tmp_path):
    """setup recorded a CUDA build, but the llama.cpp loaded has no CUDA (installed over since)."""
    from dataclasses import replace

    r = doc.doctor([tmp_path], ctx=4096, models=())
    if "CUDA" in r.build.registries:
        pytest.skip("this llama.cpp has CUDA")
    r.build = replace(r.build, record={"backend": "cuda", "cmake_args": "-DGGML_RPC=ON -DGGML_CUDA=on"})
    assert "setup built cuda, but the llama.cpp loaded has no CUDA backend: run `make setup GPU=cuda`" in \
        doc.format_report(r)
