"""`plan`'s predicted speed against measured `ossgguf run` tok/s, CPU only (issue 15).

--calibrate (once; writes ossgguf/data/speed_calibration.json, keeping its GPU fields): in the same
run, probe RAM bandwidth and numpy matmul FLOP/s (runner/speed.py), then
  - the fixed cost per layer per token: decode of a tiny 8-layer model (its bytes are negligible);
  - the RAM efficiency and the prompt efficiency: decode and prompt of the mid-size GGUF (gpt-oss-20b's
    shapes with 8 layers) at a 1k context.
--check (default): predictions with the stored calibration and this run's probes against measured
decode and prompt tok/s of the 20b-shaped GGUF at 1k and 8k contexts and the mid-size one at 32k;
prints the ratios (within +-25% passes) and the peak RSS of the runs.

GGUFs are converted from sparse synthetic checkpoints (real shapes and names, zero data, the tiny
generator's tokenizer) into --workdir and kept for the next run.

    python bench/bench_speed.py --paper   # published gpt-oss-120b setups, on paper (seconds)
    python bench/bench_speed.py [--calibrate] [--workdir bench/out] [--tokens 32] [--prompt-words 60]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_run import DATE, prompt_text  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "ossgguf" / "data" / "speed_calibration.json"


def gguf(workdir: Path, name: str, layers: int | None) -> Path:
    """workdir/<name>.gguf: tiny (layers=None: an 8-layer tiny model) or the 20b shapes with `layers`."""
    from ossgguf.convert.convert import convert

    out = workdir / f"{name}.gguf"
    if out.exists():
        return out
    ckpt = workdir / f"{name}-ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    if layers is None:
        from ossgguf.fixtures.tiny import TinySpec, make_tiny_checkpoint

        make_tiny_checkpoint(ckpt, TinySpec(num_hidden_layers=8))
    else:
        from ossgguf.fixtures.synthetic import make_synthetic

        make_synthetic(ckpt, "20b", sparse=True, layers=layers)
    print(f"converting {name} ...", flush=True)
    convert(ckpt, out, force=True)
    shutil.rmtree(ckpt)
    return out


def run(model: Path, ctx: int, args) -> dict:
    cmd = [sys.executable, "-m", "ossgguf.cli", "run", str(model), "-p", prompt_text(args.prompt_words), "--date", DATE,
           "--reasoning", "low", "--temp", "0", "--max-tokens", str(args.tokens), "--ctx", str(ctx), "--gpu-mem", "0",
           "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"ossgguf run failed:\n{proc.stderr}")
    out = json.loads(proc.stdout)
    return {"prompt_tokens": out["usage"]["prompt_tokens"], "gen_tokens": out["usage"]["completion_tokens"],
            "prompt_tps": out["timings"]["prompt_tps"], "gen_tps": out["timings"]["generation_tps"]}


def best(model: Path, ctx: int, args) -> dict:
    runs = [run(model, ctx, args) for _ in range(args.rounds)]
    return runs[0] | {k: max(r[k] for r in runs) for k in ("prompt_tps", "gen_tps")}


def predicted(model: Path, ctx: int, measured: dict, ram, cal):
    from ossgguf.runner.plan import PlacementOptions, plan
    from ossgguf.runner.speed import predict

    p = plan(model, PlacementOptions(gpu_mem=0, ctx=ctx))
    n = measured["prompt_tokens"]
    return p, predict(p, ram, [], cal, depth=n + measured["gen_tokens"] // 2, prompt_tokens=n)


def paper(workdir: Path) -> None:
    """The prediction for published gpt-oss-120b setups (docs/benchmarks.md), from a sparse GGUF with
    its real tensor infos (tests/gptoss_shapes.py); header only, seconds."""
    sys.path.insert(0, str(ROOT / "tests"))
    from gptoss_shapes import GPT_OSS_120B, write_sparse_gguf

    from ossgguf.runner.devices import Device, Devices
    from ossgguf.runner.plan import GiB, PlacementOptions, plan
    from ossgguf.runner.speed import memories, predict

    f = workdir / "g120-sparse.gguf"
    if not f.exists():
        write_sparse_gguf(f, GPT_OSS_120B)
    print("| machine | planner | bound tok/s | predicted tok/s | published tok/s |\n|---|---|---|---|---|")
    for label, gpus, ram_gib, ctx, ram_bw, published, unified, n in (
            ("1x H100 80GB", [("H100", 80)], 128, 8192, None, "~140 (fitted)", False, None),
            ("1x RTX PRO 6000 96GB", [("RTX PRO 6000", 96)], 128, 8192, None, "~197 (fitted)", False, None),
            ("M2 Ultra 192GB", [("M2 Ultra", 144)], 192, 8192, None, "~80", True, None),
            ("RTX 4090 + DDR5 60 GB/s", [("RTX 4090", 24)], 64, 32768, 60e9, "18-26", False, None),
            ("RTX 4090 + DDR5 80 GB/s", [("RTX 4090", 24)], 64, 32768, 80e9, "18-26", False, None),
            ("RTX 4090 + DDR4 40 GB/s", [("RTX 4090", 24)], 64, 32768, 40e9, "~15", False, None),
            ("2x RTX 3090 + DDR4 51 GB/s, n_cpu_moe 26", [("RTX 3090", 24)] * 2, 64, 38000, 51.2e9, "10-17", False, 26),
            ("3x RTX 3090", [("RTX 3090", 24)] * 3, 64, 32768, 51.2e9, "unverified", False, None),
            ("4x RTX 3090, 64k", [("RTX 3090", 24)] * 4, 64, 65536, 51.2e9, "150-161", False, None),
            ("2x RTX A6000 48GB", [("RTX A6000", 48)] * 2, 64, 32768, 51.2e9, "unverified", False, None)):
        d = Devices(ram_total=ram_gib * GiB, unified=unified,
                    gpus=tuple(Device(f"CUDA{i}", g * GiB, description=desc) for i, (desc, g) in enumerate(gpus)))
        p = plan(f, PlacementOptions(ctx=ctx, n_cpu_moe=n), devices=d)
        s = predict(p, *memories(p, ram_bw=ram_bw))
        lo, hi = sorted(s.decode)
        where = {"gpu": "all on the GPUs", "hybrid": f"n_cpu_moe={p.n_cpu_moe}"}.get(p.placement, p.placement)
        split = f", split {','.join(map(str, p.split))}" if len(p.split) > 1 else ""
        print(f"| {label} | {where}{split}{'' if p.fits else ' (DOES NOT FIT)'} | {s.decode_bound:.0f} | "
              f"{lo:.0f}-{hi:.0f} | {published} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--paper", action="store_true", help="only the published 120b setups (seconds)")
    ap.add_argument("--workdir", type=Path, default=Path("bench/out"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2, help="runs per case; best of them")
    args = ap.parse_args()
    from dataclasses import asdict, replace

    from ossgguf.runner.speed import Memory, calibration, probe_cpu_flops, probe_ram, token_bytes

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.paper:
        paper(args.workdir)
        return
    tiny, mid, g20 = gguf(args.workdir, "tiny-8l", None), gguf(args.workdir, "mid-20b-8l", 8), gguf(args.workdir, "g20b", 24)
    for f in (mid, g20):  # into the page cache: runs measure memory, not the disk
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    bw, flops = probe_ram(), probe_cpu_flops()
    ram = Memory("RAM", bw, flops, "measured")
    print(f"probes: RAM {bw / 1e9:.1f} GB/s (numpy copies, read + write), numpy matmul {flops / 1e9:.1f} GFLOP/s", flush=True)
    cal = calibration()
    if args.calibrate:
        t = best(tiny, 1024, args)
        p_t, _ = predicted(tiny, 1024, t, ram, cal)
        layer_s = 1 / t["gen_tps"] / p_t.model.n_layer
        m = best(mid, 1024, args)
        p_m, s_m = predicted(mid, 1024, m, ram, replace(cal, cpu_layer_s=layer_s))
        mem_s = sum(token_bytes(p_m, m["prompt_tokens"] + m["gen_tokens"] // 2).values()) / bw
        ram_eff = mem_s / (1 / m["gen_tps"] - p_m.model.n_layer * layer_s)
        from ossgguf.runner.speed import prompt_flops

        pp_eff = m["prompt_tps"] * prompt_flops(p_m, m["prompt_tokens"]) / flops
        doc = json.loads(CALIBRATION.read_text())
        doc.update(ram_eff=round(ram_eff, 4), cpu_layer_s=float(f"{layer_s:.3g}"), cpu_pp_eff=round(pp_eff, 4),
                   source=f"bench/bench_speed.py --calibrate, {time.strftime('%Y-%m-%d')}: tiny 8-layer decode "
                          f"{t['gen_tps']:.0f} tok/s; mid-size decode {m['gen_tps']:.2f}, prompt {m['prompt_tps']:.1f} "
                          f"tok/s at 1k; RAM {bw / 1e9:.1f} GB/s, numpy {flops / 1e9:.1f} GFLOP/s")
        tmp = CALIBRATION.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(CALIBRATION)
        print(f"calibrated: {doc}")
        cal = calibration()
    print(f"calibration: {asdict(cal)}")
    rows = []
    for name, model, ctx in (("20b-shaped", g20, 1024), ("20b-shaped", g20, 8192), ("mid-size", mid, 32768)):
        meas = best(model, ctx, args)
        p, s = predicted(model, ctx, meas, ram, cal)
        rows.append((name, ctx, meas, s))
        print(f"{name} ctx {ctx}: measured {meas}, predicted decode {s.decode[0]:.2f}, prompt {s.prompt:.2f}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    print("\n| model | context | prompt tokens | decode measured | predicted | ratio | prompt measured | predicted | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for name, ctx, meas, s in rows:
        rd, rp = meas["gen_tps"] / s.decode[0], meas["prompt_tps"] / s.prompt
        ok &= 0.75 <= rd <= 1.25 and 0.75 <= rp <= 1.25
        print(f"| {name} | {ctx} | {meas['prompt_tokens']} | {meas['gen_tps']:.2f} | {s.decode[0]:.2f} | **{rd:.2f}** "
              f"| {meas['prompt_tps']:.1f} | {s.prompt:.1f} | **{rp:.2f}** |")
    print(f"\npeak RSS of the runs: {peak:.2f} GB; all within +-25%: {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
