"""Pruning benchmark: calibration speed against plain evaluation, prune throughput against a copy.

1. Calibration: a mid-size tiny gpt-oss (4 layers, 32 experts, hidden 512; made once in the
   workdir) evaluates the same text with and without the eval callback that gathers expert
   statistics: same model, same threads, same sequences; rounds interleaved, best of each.
   Prints the ratio calibrate / plain in tokens per second (target: at least 0.8).
2. Prune: benchutil's synthetic 20b GGUF (gpt-oss-20b's real shapes, random data; reused when
   another benchmark left it in the workdir) pruned to 24 of 32 experts,
   against `cp` of the same source plus `sync`. Prints the ratio of throughputs in source bytes
   and our peak RSS (wait4 rusage of the child). Page caches are dropped when running as root.

    python bench/bench_prune.py [--workdir bench/out] [--rounds 3] [--skip-prune] [--src X.gguf]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from benchutil import cache_note, need_free, synthetic_gguf, versus_copy  # bench/ is on sys.path

MID = dict(hidden_size=512, intermediate_size=512, num_hidden_layers=4, num_local_experts=32, num_experts_per_tok=4,
           num_attention_heads=8, num_key_value_heads=2, head_dim=64)
KEEP = 24


def child(src: str, out: str) -> None:
    import numpy as np

    from ossgguf.gguf.read import read_gguf
    from ossgguf.model import read_hparams
    from ossgguf.quantize.prune import plan_prune

    hp = read_hparams(read_gguf(src))
    n_layer, n_expert = hp.n_layer, hp.n_expert
    rng = np.random.default_rng(0)  # which experts does not change the bytes moved
    kept = [sorted(rng.choice(n_expert, KEEP, replace=False).tolist()) for _ in range(n_layer)]
    plan_prune(src, out, keep=KEEP, kept=kept).run(force=True)


def bench_calibrate(workdir: Path, rounds: int, threads: int) -> None:
    from ossgguf.convert.convert import convert
    from ossgguf.fixtures.tiny import TinySpec, make_tiny_checkpoint
    from ossgguf.quantize.compare import DEFAULT_TEXT
    from ossgguf.runner.calibrate import calibrate
    from ossgguf.runner.plan import PlacementOptions

    model = workdir / "prune-mid.gguf"
    if not model.is_file():
        print(f"making a mid-size tiny model {model} ...", flush=True)
        ckpt = make_tiny_checkpoint(workdir / "prune-mid-ckpt", TinySpec(**MID))
        convert(ckpt, model, force=True)
        shutil.rmtree(ckpt)
    text = workdir / "prune-calib.txt"
    text.write_text(DEFAULT_TEXT * 8)
    opts = PlacementOptions(threads=threads)
    best = {False: 0.0, True: 0.0}
    tokens = 0
    for _ in range(rounds):
        for collect in (False, True):
            r = calibrate(model, [text], options=opts, chunk=2048, collect=collect)
            best[collect], tokens = max(best[collect], r.tps), r.tokens
    print(f"model: {model.name} ({model.stat().st_size / 1e6:.1f} MB: 4 layers, 32 experts, hidden 512), "
          f"{tokens} tokens in 2048-token sequences, {threads} threads, best of {rounds}")
    print(f"plain evaluation:  {best[False]:8.0f} tok/s")
    print(f"calibrate:         {best[True]:8.0f} tok/s")
    print(f"ratio (calibrate / plain): {best[True] / best[False]:.2f}")


def bench_prune(workdir: Path, rounds: int, given: Path | None, keep_src: bool) -> None:
    from gguf import GGUFReader

    from ossgguf.model import arch_key

    src, made = (given, False) if given else synthetic_gguf(workdir)
    src_bytes = src.stat().st_size
    out = workdir / "prune-out-20b.gguf"
    need_free(workdir, int(2.2 * src_bytes), "a copy and the pruned output")
    cached = cache_note()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(src), str(out)]
    t_cp, t_ours, rss = versus_copy(src, cmd, rounds, workdir)
    out_bytes = out.stat().st_size
    reader = GGUFReader(out)
    n_exp = reader.get_field(arch_key("expert_count")).contents()
    print(f"source: {src.name}, gpt-oss-20b shapes (synthetic data), {src_bytes / 1e9:.2f} GB"
          f"{cached}; best of {rounds} round(s)")
    print(f"cp + sync:            {t_cp:7.1f} s  {src_bytes / t_cp / 1e9:6.2f} GB/s")
    print(f"ossgguf prune -> {KEEP}:  {t_ours:7.1f} s  {src_bytes / t_ours / 1e9:6.2f} GB/s of source, "
          f"{out_bytes / t_ours / 1e9:.2f} GB/s written, peak RSS {rss / 2**30:.2f} GiB")
    print(f"ratio (ours/cp throughput, same source bytes): {t_cp / t_ours:.2f}; "
          f"in bytes written: {t_cp / t_ours * out_bytes / src_bytes:.2f}")
    print(f"output: {out_bytes:,} bytes, {len(reader.tensors)} tensors, expert_count {n_exp} (gguf-py reads it)")
    del reader
    out.unlink()
    if made and not keep_src:
        src.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench/out"))
    ap.add_argument("--rounds", type=int, default=3, help="calibration rounds (prune: 1), interleaved; best of each")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--src", type=Path, help="the GGUF to prune (default: a 20b-shaped one in the workdir)")
    ap.add_argument("--skip-prune", action="store_true", help="only the calibration part")
    ap.add_argument("--keep", action="store_true", help="keep a source GGUF this run made")
    ap.add_argument("--child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    print("--- calibration speed ---", flush=True)
    bench_calibrate(args.workdir, args.rounds, args.threads)
    if not args.skip_prune:
        print("\n--- prune throughput ---", flush=True)
        bench_prune(args.workdir, 1, args.src, args.keep)


if __name__ == "__main__":
    main()
