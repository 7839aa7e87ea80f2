"""`plan`'s predicted speed on paper: bytes per token against the published figure, and the
prediction against published decode speeds of gpt-oss-120b (docs/benchmarks.md, "Predicted speed").
Measured checks on this machine are in bench/bench_speed.py (they take minutes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from gptoss_shapes import GPT_OSS_120B, write_sparse_gguf

from ossgguf.runner.devices import Device, Devices
from ossgguf.runner.plan import GiB, PlacementOptions, plan
from ossgguf.runner.speed import Memory, calibration, compare, memories, predict, token_bytes


@pytest.fixture(scope="module")
def g120(tmp_path_factory):
    return write_sparse_gguf(tmp_path_factory.mktemp("g120") / "gpt-oss-120b-mxfp4.gguf", GPT_OSS_120B)


def _on(g120, desc: str, gib: int, ram_gib: int = 128, unified: bool = False, ctx: int = 4096):
    d = Devices(ram_total=ram_gib * GiB, gpus=(Device("CUDA0", gib * GiB, description=desc),), unified=unified)
    return plan(g120, PlacementOptions(ctx=ctx), devices=d)


def test_bytes_per_token_match_the_published_figure(g120):
    # FACTS.md: experts 1.90 GB + attention (Q8_0) 1.02 GB + head 0.62 GB = 3.6 GB per decoded token
    p = _on(g120, "NVIDIA H100 80GB HBM3", 80)
    b = token_bytes(p, 0)
    assert set(b) == {"CUDA0", "RAM"} and b["RAM"] < 10_000  # one embedding row
    assert abs(b["CUDA0"] - 3.59e9) < 0.03e9
    # the KV cache read grows with the depth: 36 KiB of f16 K/V per token in the 18 full layers, and
    # the 18 sliding-window layers read at most their 128-token window
    assert token_bytes(p, 4096)["CUDA0"] - b["CUDA0"] == 4096 * 18 * 2048 + 128 * 18 * 2048


@pytest.mark.parametrize("desc,gib,published", [
    ("NVIDIA H100 80GB HBM3", 80, 140),  # the slow end of the per-layer cost was fitted to it
    ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 96, 197),  # the fast end, likewise
])
def test_single_gpu_figures_the_range_was_fitted_to(g120, desc, gib, published):
    p = _on(g120, desc, gib)
    s = predict(p, *memories(p))
    lo, hi = sorted(s.decode)
    assert p.placement == "gpu" and lo * 0.97 <= published <= hi * 1.03, s.decode
    assert s.dominant == "fixed per layer"  # launch-bound, not memory-bound (docs/benchmarks.md)


def test_published_figures_not_fitted(g120):
    # M2 Ultra (800 GB/s, 192 GB unified): ~80 tok/s
    p = _on(g120, "Apple M2 Ultra", 144, ram_gib=192, unified=True)
    lo, hi = sorted(predict(p, *memories(p)).decode)
    assert lo * 0.75 <= 80 <= hi * 1.25, (lo, hi)
    # a 24 GB GPU with the planner's n_cpu_moe, dual-channel DDR5 (60-80 GB/s): 18-26 tok/s published
    p = plan(g120, PlacementOptions(gpu_mem=24 * GiB, ram=64 * GiB, ctx=32768))
    cal = calibration()
    for bw, published in ((60e9, 18), (80e9, 26)):
        s = predict(p, Memory("RAM", bw, 1e12, "given"), [Memory(p.devices.gpus[0].name, 1.008e12, 330e12, "table")], cal)
        assert s.dominant == "RAM" and 0.75 * published <= s.decode[0] <= 1.25 * published, (bw, s.decode)


def test_more_layers_on_the_gpu_decode_faster(g120):
    rows = compare(g120, PlacementOptions(gpu_mem=80 * GiB, ram=128 * GiB, ctx=8192), [36, 24, 12, 0],
                   ram_bw=80e9, gpu_bw=[3.35e12])
    decode = [s.decode[0] for _, s in rows]
    assert decode == sorted(decode) and decode[-1] > 3 * decode[0]
    assert [p.n_cpu_moe for p, _ in rows] == [36, 24, 12, 0]


def test_plan_cli_speed_options(g120):
    def cli(*a):
        return subprocess.run([sys.executable, "-m", "ossgguf.cli", "plan", str(g120), "--gpu-mem", "24GiB",
                               "--ram", "64GiB", "--ctx", "8192", *a], capture_output=True, text=True, timeout=120)

    out = cli("--ram-bw", "80GB/s", "--gpu-bw", "1008GB/s", "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)["speed"]
    assert [m["bandwidth"] for m in s["memories"]] == [80e9, 1.008e12]
    assert s["dominant"] == "RAM" and s["decode_tps"][0] > 0 and s["prompt_tps"] > 0
    table = cli("--ram-bw", "80GB/s", "--compare", "20,28,36")
    assert table.returncode == 0 and len(table.stdout.strip().splitlines()) == 4 and "decode tok/s" in table.stdout
    text = cli("--ram-bw", "80GB/s").stdout
    assert "speed (RAM 80 GB/s (given)" in text and "dominates" in text
    for bad, opt in ((("--ram-bw", "fast"), "--ram-bw"), (("--compare", "a,b"), "--compare")):
        out = cli(*bad)
        assert out.returncode == 2 and opt in out.stderr
