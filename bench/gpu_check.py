"""The planner and the speed prediction on a real NVIDIA GPU, offline (issue 15). Two steps:

1. build (once, minutes): llama-cpp-python with CUDA (and RPC, as `make setup` builds it) from a
   local sdist or wheel, no network; the CMake flags come from ossgguf/build.py for the GPUs found:

       python bench/gpu_check.py build --from llama_cpp_python-0.3.36.tar.gz   # or a .whl built elsewhere

   (an sdist builds with --no-build-isolation: scikit-build-core and cmake must be in the venv, as
   `make setup` leaves them; nvcc on PATH.)

2. check (under 5 minutes on an NVMe disk): a GGUF with gpt-oss-20b's shapes (a sparse synthetic
   checkpoint converted: zero data, real sizes), then for 3 placements (all on the GPU, the experts of
   12 layers in RAM, all experts in RAM) at an 8k context: the planner's bytes per CUDA buffer
   (weights, KV cache, compute graph) against what llama.cpp reports, within 5%, and `plan`'s
   predicted decode/prompt tok/s against `ossgguf run`'s measured ones. One table on stdout:

       python bench/gpu_check.py check [--workdir /tmp/gpu_check]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACEMENTS = (0, 12, 24)  # --n-cpu-moe
CTX = 8192
PROMPT = " ".join(["the model reads every expert it routes to from memory, so decoding is bound by bandwidth"] * 12)


def build(source: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from ossgguf.build import choose, probe

    choice = choose(probe(), "cuda")
    print(f"CMAKE_ARGS=\"{choice.cmake_args}\" {choice.note}", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--force-reinstall", "--no-cache-dir"]
    if source.name.endswith((".tar.gz", ".zip")):
        cmd.append("--no-build-isolation")
    subprocess.run([*cmd, str(source)], env=dict(os.environ, CMAKE_ARGS=choice.cmake_args, FORCE_CMAKE="1"),
                   check=True)
    venv = Path(sys.prefix)
    (venv / ".llama-backend").write_text(json.dumps({"backend": "cuda", "cmake_args": choice.cmake_args,
                                                     "requirement": f"local {source.name}"}) + "\n")
    print("built; `ossgguf doctor` shows the CUDA backend and the GPU")


def model(workdir: Path) -> Path:
    from ossgguf.convert.convert import convert
    from ossgguf.fixtures.synthetic import make_synthetic

    out = workdir / "g20b.gguf"
    if not out.exists():
        ckpt = workdir / "g20b-ckpt"
        make_synthetic(ckpt, "20b", sparse=True)
        convert(ckpt, out, force=True)
        import shutil

        shutil.rmtree(ckpt)
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ossgguf.cli", *args], capture_output=True, text=True, timeout=600)


def check(workdir: Path) -> int:
    from ossgguf.runner.llama_ctypes import parse_buffer_lines

    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    g = model(workdir)
    print(f"{g} ({g.stat().st_size / 1e9:.1f} GB) in {time.monotonic() - t0:.0f} s", flush=True)
    rows, ok = [], True
    for n in PLACEMENTS:
        place = ["--n-cpu-moe", str(n), "--ctx", str(CTX)]
        plan = cli("plan", str(g), *place, "--measure", "--json")
        if plan.returncode:
            raise SystemExit(plan.stderr)
        p = json.loads(plan.stdout)
        run = cli("-v", "run", str(g), "-p", PROMPT, "--temp", "0", "--max-tokens", "64", "--json", *place)
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        r = json.loads(run.stdout)
        reported = parse_buffer_lines(run.stderr.splitlines())
        for i in range(len(p["gpus"])):
            for kind, theirs_kind in (("model", "model"), ("kv", "KV"), ("compute", "compute")):
                mine = sum(b["bytes"] for b in p["buffers"] if b["device"] == "gpu" and b.get("gpu") == i
                           and b["kind"] == kind)
                theirs = sum(b.bytes for b in reported if b.buffer == f"CUDA{i}" and b.kind == theirs_kind)
                good = abs(mine - theirs) <= 0.05 * max(theirs, 1)
                ok &= good
                rows.append((n, f"CUDA{i} {kind}", f"{mine / 1e6:.0f} MB", f"{theirs / 1e6:.0f} MB",
                             f"{mine / max(theirs, 1):.3f}", "ok" if good else "OFF"))
        s, t = p["speed"], r["timings"]
        lo, hi = sorted(s["decode_tps"])
        rows.append((n, "decode tok/s", f"{lo:.0f}-{hi:.0f}", f"{t['generation_tps']:.1f}",
                     f"{t['generation_tps'] / ((lo + hi) / 2):.2f}", "ok" if lo * 0.75 <= t["generation_tps"] <= hi * 1.25 else "OFF"))
        rows.append((n, "prompt tok/s", f"{s['prompt_tps']:.0f}", f"{t['prompt_tps']:.1f}",
                     f"{t['prompt_tps'] / s['prompt_tps']:.2f}", "(prompt of ~300 tokens)"))
    print("\n| n_cpu_moe | what | planned / predicted | llama.cpp / measured | ratio | |\n|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    print(f"\nbuffers within 5%: {'yes' if ok else 'NO'}; {time.monotonic() - t0:.0f} s in all")
    return 0 if ok else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    b = sub.add_parser("build")
    b.add_argument("--from", dest="source", type=Path, required=True, help="llama-cpp-python sdist or wheel")
    c = sub.add_parser("check")
    c.add_argument("--workdir", type=Path, default=Path("/tmp/gpu_check"))
    a = ap.parse_args()
    if a.step == "build":
        build(a.source)
    else:
        sys.exit(check(a.workdir))


if __name__ == "__main__":
    main()
