"""Converter benchmark on a checkpoint with gpt-oss-20b's real shapes (synthetic data).

Baseline measured in the same run: copying the same bytes with `cp` and syncing. Prints the
throughput ratio (ours / cp) and our peak RSS. Page caches are dropped before each timed run when
the bench runs as root, so both start from disk.

    python bench/bench_convert.py [--model 20b] [--workdir DIR] [--sparse] [--keep]
    python bench/bench_convert.py --layout bf16 --layers 6 --recipe mxfp4 --recipe q8_0

`--layout bf16` is a dequantized fine-tune (experts BF16, 3.8x the bytes): converting it quantizes
the experts on the way (MXFP4 or Q8_0), so it measures the quantization kernels inside the stream.
`--layers` keeps the real tensor shapes with fewer blocks, to fit the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from benchutil import cache_note, copy_seconds, drop_caches, synthetic_checkpoint, timed  # bench/ on sys.path

from ossgguf.fixtures.synthetic import checkpoint_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="20b", choices=["20b", "120b"])
    ap.add_argument("--workdir", type=Path, default=Path("bench/out"))
    ap.add_argument("--sparse", action="store_true", help="sparse source files (no real reads)")
    ap.add_argument("--layout", default="mxfp4", choices=["mxfp4", "bf16"], help="source layout")
    ap.add_argument("--layers", type=int, help="fewer blocks than the model has (same shapes)")
    ap.add_argument("--recipe", dest="recipes", action="append", help="recipe(s) to convert with (default: mxfp4)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint for the next run")
    ap.add_argument("--llama-cpp", type=Path, default=Path(".cache/llama.cpp"),
                    help="folder with llama.cpp's convert_hf_to_gguf.py, timed beside ours when present")
    args = ap.parse_args()

    recipes = args.recipes or ["mxfp4"]
    need = checkpoint_bytes(args.model, args.layers, args.layout)
    args.workdir.mkdir(parents=True, exist_ok=True)
    src, _ = synthetic_checkpoint(args.workdir, args.model, args.layers, args.layout, args.sparse, room=need + need // 20)
    tag = src.name.removeprefix("synthetic-")
    files = sorted(src.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    cached = cache_note()
    t_cp = copy_seconds(files, args.workdir)

    from gguf import GGUFReader

    out = args.workdir / f"out-{tag}.gguf"
    results = []
    for recipe in recipes:
        drop_caches()
        t, rss = timed([sys.executable, "-m", "ossgguf.cli", "convert", str(src), "-o", str(out), "--force",
                        "--recipe", recipe])
        st = os.stat(out)
        results.append((recipe, t, rss, st.st_size, len(GGUFReader(out).tensors), st.st_blocks * 512 >= st.st_size))
        out.unlink()
    ref = None
    if args.layout == "mxfp4" and (args.llama_cpp / "convert_hf_to_gguf.py").is_file():
        ref_out = args.workdir / "llama-cpp.gguf"
        drop_caches()
        wrapper = Path(__file__).resolve().parent / "llama_cpp_convert.py"
        ref = timed([sys.executable, str(wrapper), str(args.llama_cpp), str(src), str(ref_out)])
        ref_out.unlink()
    print()
    print(f"checkpoint: {tag} shapes ({args.layout} layout), {nbytes / 1e9:.2f} GB in {len(files)} files"
          f"{' (sparse)' if args.sparse else ''}{cached}")
    print(f"cp + sync:               {t_cp:7.1f} s  read {nbytes / t_cp / 1e9:6.2f} GB/s")
    for recipe, t, rss, out_bytes, n_tensors, solid in results:
        print(f"ossgguf convert {recipe:9}{t:7.1f} s  read {nbytes / t / 1e9:6.2f} GB/s  "
              f"ratio to cp (source bytes per second) {t_cp / t:.2f}  peak RSS {rss / 2**30:.2f} GiB  "
              f"output {out_bytes:,} bytes, {n_tensors} tensors read back by gguf-py, {'no holes' if solid else 'HAS HOLES'}")
    if ref:
        print(f"llama.cpp convert:       {ref[0]:7.1f} s  read {nbytes / ref[0] / 1e9:6.2f} GB/s  "
              f"ratio to cp {t_cp / ref[0]:.2f}  peak RSS {ref[1] / 2**30:.2f} GiB")
    if not args.keep:
        shutil.rmtree(src)


if __name__ == "__main__":
    main()
