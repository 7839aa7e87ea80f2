"""Converter benchmark on a checkpoint with gpt-oss-20b's real shapes (synthetic data).

Baseline measured in the same run: copying the same bytes with `cp` and syncing. Prints the
throughput ratio (ours / cp) and our peak RSS. Page caches are dropped before each timed run when
the bench runs as root, so both start from disk.

    python bench/bench_convert.py [--model 20b] [--workdir DIR] [--sparse] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ossgguf.synthetic import checkpoint_bytes, make_synthetic


def drop_caches() -> bool:
    subprocess.run(["sync"])
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process, sync included."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, ru = os.wait4(proc.pid, 0)
    subprocess.run(["sync"])
    dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return dt, ru.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="20b", choices=["20b", "120b"])
    ap.add_argument("--workdir", type=Path, default=Path("bench/out"))
    ap.add_argument("--sparse", action="store_true", help="sparse source files (no real reads)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint for the next run")
    ap.add_argument("--llama-cpp", type=Path, default=Path(".cache/llama.cpp"),
                    help="folder with llama.cpp's convert_hf_to_gguf.py, timed beside ours when present")
    args = ap.parse_args()

    need = checkpoint_bytes(args.model)
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.workdir / f"synthetic-{args.model}"
    have_src = (src / "config.json").is_file()
    free = shutil.disk_usage(args.workdir).free
    want = (0 if have_src else need) + need + need // 20
    if free < want:
        raise SystemExit(f"needs {want / 1e9:.1f} GB free in {args.workdir} (source + one output), has {free / 1e9:.1f} GB")
    if not have_src:
        print(f"writing a synthetic {args.model} checkpoint ({need / 1e9:.1f} GB) to {src} ...", flush=True)
        make_synthetic(src, args.model, sparse=args.sparse)
    files = sorted(src.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)

    copy_dir = args.workdir / "cp-copy"
    copy_dir.mkdir(exist_ok=True)
    cached = not drop_caches()
    t_cp, _ = timed(["cp", "--sparse=never", *map(str, files), str(copy_dir)])
    shutil.rmtree(copy_dir)

    out = args.workdir / f"out-{args.model}.gguf"
    drop_caches()
    t_ours, rss = timed([sys.executable, "-m", "ossgguf.cli", "convert", str(src), "-o", str(out), "--force"])
    out_bytes = out.stat().st_size
    st = os.stat(out)
    ref = None
    if (args.llama_cpp / "convert_hf_to_gguf.py").is_file():
        ref_out = args.workdir / "llama-cpp.gguf"
        drop_caches()
        wrapper = Path(__file__).resolve().parent / "llama_cpp_convert.py"
        ref = timed([sys.executable, str(wrapper), str(args.llama_cpp), str(src), str(ref_out)])
        ref_out.unlink()
    from gguf import GGUFReader

    n_tensors = len(GGUFReader(out).tensors)
    print()
    print(f"checkpoint: {args.model} shapes, {nbytes / 1e9:.2f} GB in {len(files)} files"
          f"{' (sparse)' if args.sparse else ''}{' (page cache not dropped: not root)' if cached else ''}")
    print(f"cp + sync:        {t_cp:7.1f} s  {nbytes / t_cp / 1e9:6.2f} GB/s")
    print(f"ossgguf convert:  {t_ours:7.1f} s  {out_bytes / t_ours / 1e9:6.2f} GB/s  peak RSS {rss / 2**30:.2f} GiB")
    if ref:
        print(f"llama.cpp convert:{ref[0]:7.1f} s  {out_bytes / ref[0] / 1e9:6.2f} GB/s  peak RSS {ref[1] / 2**30:.2f} GiB")
    print(f"ratio (ours/cp throughput, same bytes): {(out_bytes / t_ours) / (nbytes / t_cp):.2f}")
    if ref:
        print(f"ratio (llama.cpp's converter/cp):        {(out_bytes / ref[0]) / (nbytes / t_cp):.2f}")
    print(f"output: {out_bytes:,} bytes, {n_tensors} tensors read back by gguf-py, "
          f"{'no holes' if st.st_blocks * 512 >= out_bytes else 'HAS HOLES'}")
    out.unlink()
    if not args.keep:
        shutil.rmtree(src)


if __name__ == "__main__":
    main()
