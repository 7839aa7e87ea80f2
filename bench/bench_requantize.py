"""Requantizer benchmark: GGUF -> GGUF, mxfp4 -> mxfp4-q8, on a GGUF with gpt-oss-20b's real shapes.

The source is benchutil's synthetic 20b GGUF (random data, real names and shapes; an existing one
in the workdir is reused and kept). Baseline measured in the same run: `cp` of the
same source bytes plus `sync`. Prints the throughput ratio (ours / cp) and our peak RSS (wait4 rusage
of the child process). Page caches are dropped before each timed run when running as root.

    python bench/bench_requantize.py [--workdir bench/out] [--rounds 1] [--keep]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchutil import cache_note, synthetic_gguf, versus_copy  # bench/ is on sys.path when a script runs


def child(src: str, out: str, recipe: str) -> None:
    from ossgguf.quantize.requantize import requantize

    requantize(src, out, recipe, force=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench/out"))
    ap.add_argument("--recipe", default="mxfp4-q8")
    ap.add_argument("--rounds", type=int, default=1, help="cp and requantize runs, interleaved; best of each")
    ap.add_argument("--keep", action="store_true", help="keep the source GGUF for the next run")
    ap.add_argument("--child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.recipe)
        return

    from gguf import GGUFReader

    from ossgguf.fixtures.synthetic import checkpoint_bytes

    args.workdir.mkdir(parents=True, exist_ok=True)
    src, made = synthetic_gguf(args.workdir, room=checkpoint_bytes("20b") * 21 // 20)  # one output
    out = args.workdir / f"requant-out-20b-{args.recipe}.gguf"
    src_bytes = src.stat().st_size
    cached = cache_note()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--recipe", args.recipe, "--child", str(src), str(out)]
    t_cp, t_ours, rss = versus_copy(src, cmd, args.rounds, args.workdir)
    out_bytes = out.stat().st_size
    reader = GGUFReader(out)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    print()
    print(f"source: gpt-oss-20b shapes (synthetic data), mxfp4 GGUF of {src_bytes / 1e9:.2f} GB"
          f"{cached}; best of {args.rounds} round(s)")
    print(f"cp + sync:            {t_cp:7.1f} s  {src_bytes / t_cp / 1e9:6.2f} GB/s")
    print(f"ossgguf quantize:     {t_ours:7.1f} s  {src_bytes / t_ours / 1e9:6.2f} GB/s read, "
          f"{out_bytes / t_ours / 1e9:.2f} GB/s written, peak RSS {rss / 2**30:.2f} GiB")
    print(f"ratio (ours/cp throughput, same source bytes): {t_cp / t_ours:.2f}")
    print(f"output: {out_bytes:,} bytes ({args.recipe}), {len(reader.tensors)} tensors read back by gguf-py: "
          + ", ".join(f"{k} x{v}" for k, v in sorted(types.items())))
    del reader
    out.unlink()
    if made and not args.keep:
        src.unlink()


if __name__ == "__main__":
    main()
