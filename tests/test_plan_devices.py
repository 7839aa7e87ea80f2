"""The planner on several devices: layers split across 2-8 GPUs (llama.cpp's tensor_split).

- Against llama.cpp's own multi-device code: two `ossgguf worker` processes on loopback are two
  GPU-type devices to llama.cpp (RPC), so its layer assignment and its per-device weight, KV and
  compute buffers can be read from its log here, without a GPU, for the split the plan chose.
- gpt-oss-120b's real tensor infos on published multi-GPU setups (docs/benchmarks.md cites them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
from gptoss_shapes import GPT_OSS_120B, write_sparse_gguf
from test_plan import BUF_SPEC
from test_rpc import worker

from ossgguf.errors import OssggufError
from ossgguf.runner import rpc
from ossgguf.runner.devices import Device, Devices
from ossgguf.runner.llama_ctypes import LLAMA_LOG, parse_buffer_lines
from ossgguf.runner.plan import GiB, PlacementOptions, estimate, format_plan, layer_split, plan, read_model


@pytest.fixture(scope="module")
def g120(tmp_path_factory):
    return write_sparse_gguf(tmp_path_factory.mktemp("g120") / "gpt-oss-120b-mxfp4.gguf", GPT_OSS_120B)


def test_layer_split():
    assert layer_split([1] * 10, [10, 10]) == (5, 5)  # as even as possible
    assert layer_split([1] * 10, [8, 2]) == (8, 2)
    assert layer_split([5, 1, 1, 1, 5], [6, 7]) in ((2, 3), (3, 2))
    assert layer_split([1] * 10, [4, 4]) is None  # does not fit
    assert sum(layer_split([3] * 37, [40, 40, 40])) == 37


def _load_over_workers(model: str, ports: list[int], n_cpu_moe: int, first_mem: int | None = None) -> None:
    """In a child process (llama.cpp keeps registered workers for the process's life and aborts when
    one is gone): load over the workers, print the plan's split and buffers and llama.cpp's log.
    `first_mem`: the first worker's memory given by its HOST:PORT (--gpu-mem HOST:PORT=SIZE)."""
    from ossgguf.runner.engine import Engine

    given = {"gpu_mem": ((f"127.0.0.1:{ports[0]}", first_mem),)} if first_mem else {}
    with LLAMA_LOG.capture() as lines:
        eng = Engine.load(model, ctx=2048, ubatch=512, n_cpu_moe=n_cpu_moe,
                          rpc=",".join(f"127.0.0.1:{p}" for p in ports), **given)
    eng.close()
    p = eng.plan
    print(json.dumps({"split": p.split, "n_layer": p.model.n_layer, "log": [line for _, line in lines],
                      "gpus": [{"kind": g.kind, "host": g.host, "total": g.total} for g in p.devices.gpus],
                      "buffers": [vars(b) for b in p.buffers]}))


@pytest.mark.parametrize("n_cpu_moe,first_mem", [(0, None), (2, None), (0, 900 * 1024**2)])
def test_split_matches_llama_cpp_over_two_workers(make_gguf, n_cpu_moe, first_mem):
    """The plan's tensor_split as llama.cpp applies it: which layers each device holds and its
    weights and KV cache (1%); the compute buffers, which the plan replays per device, within 20%.
    With the first worker's memory given by its HOST:PORT as too small for a layer (a budget of 0
    after the planner's reserve), llama.cpp puts every layer on the second."""
    if not rpc.rpc_supported():
        pytest.skip(rpc.NOT_BUILT)
    model = make_gguf(**BUF_SPEC)
    with ExitStack() as stack:
        ports = [stack.enter_context(worker())[0] for _ in range(2)]
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_plan_devices as t; "
                f"t._load_over_workers({str(model)!r}, {ports!r}, {n_cpu_moe}, {first_mem})")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "OSSGGUF_NO_REPACK": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    split, gpus, text = r["split"], r["gpus"], r["log"]
    assert [g["kind"] for g in gpus] == ["rpc", "rpc"] and {g["host"] for g in gpus} == {f"127.0.0.1:{q}" for q in ports}
    assert len(split) == 2 and sum(split) == r["n_layer"] + 1
    if first_mem:
        assert gpus[0]["total"] == first_mem and split[0] == 0, (gpus, split)
    else:
        assert all(split)
    assigned = {int(m.group(1)): m.group(2) for line in text
                if (m := re.search(r"layer\s+(\d+) assigned to device (\S+?),", line))}
    for i in range(2):  # llama.cpp names the device RPC<i> in this log, by its place in the list
        layers = set(range(sum(split[:i]), sum(split[:i + 1])))
        assert {il for il, dev in assigned.items() if dev == f"RPC{i}"} == layers, (assigned, split)
    reported = parse_buffer_lines(text)
    for i, g in enumerate(gpus):
        mine = {k: sum(b["bytes"] for b in r["buffers"] if b["device"] == "gpu" and b["gpu"] == i and b["kind"] == k)
                for k in ("model", "kv", "compute")}
        theirs = {k: sum(b.bytes for b in reported if b.buffer.endswith(f"[{g['host']}]") and b.kind == kk)
                  for k, kk in (("model", "model"), ("kv", "KV"), ("compute", "compute"))}
        assert abs(mine["model"] - theirs["model"]) <= 0.01 * theirs["model"] + 11 * 1024, (i, mine, theirs)
        assert abs(mine["kv"] - theirs["kv"]) <= 0.01 * theirs["kv"] + 11 * 1024, (i, mine, theirs)
        assert abs(mine["compute"] - theirs["compute"]) <= 0.2 * theirs["compute"], (i, mine, theirs)
    assert any("pipeline parallelism enabled" in line for line in text) == (n_cpu_moe == 0)


def _gpus(*gib: int) -> PlacementOptions:
    return PlacementOptions(gpu_mem=tuple(g * GiB for g in gib), ram=128 * GiB, ctx=32768)


@pytest.mark.parametrize("gib", [(24, 24), (24, 24, 24), (48, 48), (24, 24, 24, 24), (16,) * 8, (80, 24)])
def test_120b_split_fits_each_gpu(g120, gib):
    p = plan(g120, _gpus(*gib))
    m = p.model
    assert p.fits, format_plan(p)
    assert len(p.split) == len(gib) and sum(p.split) == m.n_layer + 1
    for i, g in enumerate(p.devices.gpus):
        assert p.gpu_bytes_of(i) <= g.budget
    # every weight is placed once: the GPUs' weights, the experts in RAM and the embeddings add up
    gpu_w = sum(b.bytes for b in p.buffers if b.device == "gpu" and b.kind == "model")
    cpu_w = sum(b.bytes for b in p.buffers if b.device == "cpu" and b.kind == "model")
    assert abs(gpu_w + cpu_w - m.bytes_where()) < 0.001 * m.bytes_where()
    assert sum(b.bytes for b in p.buffers if b.kind == "kv") == p.kv_bytes
    # more GPU memory never needs more experts in RAM
    one = plan(g120, PlacementOptions(gpu_mem=max(gib) * GiB, ram=128 * GiB, ctx=32768))
    assert p.n_cpu_moe <= one.n_cpu_moe


def test_120b_published_multi_gpu_setups(g120):
    """Reports (docs/benchmarks.md, "Several GPUs"): 4x RTX 3090 holds the whole model (ik_llama.cpp
    PR #1118, ggml-org MXFP4 file, -ngl all); 2x RTX 3090 + 64 GB RAM ran with --n-cpu-moe 26 at a
    38k context (llmgarage.ai), so the plan needs at most 26 there."""
    four = plan(g120, PlacementOptions(gpu_mem=(24 * GiB,) * 4, ram=64 * GiB, ctx=65536))
    assert four.fits and four.placement == "gpu" and four.n_cpu_moe == 0, format_plan(four)
    two = plan(g120, PlacementOptions(gpu_mem=(24 * GiB,) * 2, ram=64 * GiB, ctx=38000))
    assert two.fits and two.placement == "hybrid" and two.n_cpu_moe <= 26, format_plan(two)
    # one 24 GB card needs 26-28 (test_plan): a second one takes about 13 more layers' experts
    assert two.n_cpu_moe <= 26 - 10


def test_gpu_mem_list_on_the_command_line(g120):
    out = subprocess.run([sys.executable, "-m", "ossgguf.cli", "plan", str(g120), "--gpu-mem", "24GiB,24GiB",
                          "--ram", "128GiB", "--ctx", "32768", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    j = json.loads(out.stdout)
    assert [g["name"] for g in j["gpus"]] == ["GPU0", "GPU1"] and sum(j["tensor_split"]) == 37
    assert j["gpu_bytes"] == sum(g["bytes"] for g in j["gpus"]) and all(g["bytes"] <= g["budget"] for g in j["gpus"])
    text = subprocess.run([sys.executable, "-m", "ossgguf.cli", "plan", str(g120), "--gpu-mem", "24GiB,24GiB",
                           "--ram", "128GiB", "--ctx", "32768"], capture_output=True, text=True, timeout=120).stdout
    assert "gpu0 GPU0:" in text and "gpu1 GPU1:" in text and "tensor_split: " in text
    bad = subprocess.run([sys.executable, "-m", "ossgguf.cli", "plan", str(g120), "--gpu-mem", "24GiB,0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--gpu-mem" in bad.stderr and "no 0" in bad.stderr


def test_devices_records_and_errors(g120):
    m = read_model(g120)
    d = Devices(ram_total=128 * GiB, gpus=(Device("CUDA0", 24 * GiB), Device("RPC0", 24 * GiB, kind="rpc",
                                                                            host="10.0.0.2:50052")))
    p = estimate(m, d, 8192, 20, split=(10, 27))
    assert p.layers_of(0) == range(0, 10) and p.layers_of(1) == range(10, 37)
    assert p.to_json()["gpus"][1]["host"] == "10.0.0.2:50052"
    # layers 0-9 hold no experts (theirs are in RAM): GPU 0's weights are their other tensors only
    own = sum(-(-t.nbytes // 128) * 128 for t in m.tensors
              if re.match(r"blk\.\d\.", t.name) and "_exps.weight" not in t.name)
    assert sum(b.bytes for b in p.buffers if b.device == "gpu" and b.gpu == 0 and b.kind == "model") == own
    with pytest.raises(OssggufError, match="split of 37 layers over 2 GPUs"):
        estimate(m, d, 8192, 20, split=(10, 10))
    with pytest.raises(OssggufError, match="no 0"):
        plan(g120, PlacementOptions(gpu_mem=(24 * GiB, 0)))
    with pytest.raises(OssggufError, match="gpu_mem must be"):
        PlacementOptions(gpu_mem=(24 * GiB, -1))


def test_120b_over_two_64gb_macs_counts_only_this_macs_memory(g120):
    """The issue's setup: 63.4 GB split over this Mac's Metal and another Mac's, reached through a
    worker. Unified memory means this Mac's GPU bytes are RAM too, the worker's are not its RAM."""
    from ossgguf.runner import network

    mac = 48 * GiB  # macOS wires ~75% of 64 GB for Metal
    d = Devices(ram_total=64 * GiB, unified=True, gpus=(
        Device("RPC0[mac-b:50052]", mac, kind="rpc", host="mac-b:50052"), Device("Metal", mac)))
    p = plan(g120, PlacementOptions(ctx=32768), devices=d)
    assert p.fits and p.placement == "gpu" and all(p.split), format_plan(p)
    assert p.ram_bytes == p.cpu_bytes + p.gpu_bytes_of(1) < p.cpu_bytes + p.gpu_bytes
    shares = {h.host: h for h in network.hosts(p)}
    assert set(shares) == {network.LOCAL, "mac-b:50052"}
    assert sum(h.total for h in shares.values()) == p.cpu_bytes + p.gpu_bytes
    # the output layer is on this Mac: per token the worker gets the hidden state and gives it back
    assert 2 * p.model.n_embd * 4 < shares["mac-b:50052"].token_bytes < p.model.n_vocab * 4
    assert "mac-b:50052" in network.format_hosts(p) and "logits" not in network.format_hosts(p)


@pytest.mark.parametrize("value,match", [("1GiB,a:1=2GiB", "give every device a name"),
                                         ("a:1=1GiB,a:1=2GiB", "named twice"),
                                         ("10.0.0.9:50052=8GiB", "no device 10.0.0.9:50052")])
def test_named_gpu_mem_errors(g120, value, match):
    out = subprocess.run([sys.executable, "-m", "ossgguf.cli", "plan", str(g120), "--gpu-mem", value],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and match in out.stderr and "Traceback" not in out.stderr, out.stderr
