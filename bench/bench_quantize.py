"""BF16 -> MXFP4 / Q8_0 on gpt-oss shapes: ossgguf's kernels against gguf-py, libggml and a memory copy.

    python bench/bench_quantize.py [--quick] [--threads N]

Every figure is a ratio against baselines measured in this run (best of a few interleaved rounds,
since the machine may be shared): a plain copy of the same input bytes, gguf-py's numpy quantizer
(on a smaller slice, compared per input byte) and, for MXFP4, libggml's own C quantizer run on the
same thread pool layout. Peak RSS comes from getrusage.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from concurrent.futures import ThreadPoolExecutor

import gguf.quants as gq
import numpy as np
from benchutil import best_time  # bench/ is on sys.path when a script runs
from gguf import GGMLQuantizationType

from ossgguf.quantize import kernels as K
from ossgguf.runner.llama_ctypes import ggml_lib

Q = GGMLQuantizationType
ROW = 2880  # gpt-oss hidden = expert width


def make_bf16(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Weights-like BF16 bits (N(0, 0.02)), made one matrix at a time to keep memory low."""
    rng = np.random.default_rng(seed)
    out = np.empty(shape, dtype=np.uint16)
    flat = out.reshape(-1, shape[-2], shape[-1])
    for m in flat:
        K.f32_to_bf16((rng.standard_normal(m.shape, dtype=np.float32) * 0.02), out=m)
    return out


def ggml_mxfp4(bits: np.ndarray, out: np.ndarray, pool: ThreadPoolExecutor, threads: int) -> None:
    """libggml's quantize_row_mxfp4_ref on the same chunking, BF16 widened per chunk."""
    lib = ggml_lib()
    rows, dst = bits.reshape(-1, bits.shape[-1]), out.reshape(-1, out.shape[-1])
    step = max(1, K._CHUNK_ELEMS // rows.shape[1])

    def work(i: int) -> None:
        f = K.bf16_to_f32(rows[i : i + step])
        lib.ggml_quantize_chunk(int(Q.MXFP4), f.ctypes.data, dst[i : i + step].ctypes.data, 0, f.shape[0],
                                f.shape[1], None)

    list(pool.map(work, range(0, rows.shape[0], step)))


def gguf_py(bits: np.ndarray, qtype: Q) -> None:
    gq.quantize(K.bf16_to_f32(bits), qtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one 2880x2880 expert matrix only, fewer rounds")
    ap.add_argument("--threads", type=int, default=K.default_threads())
    args = ap.parse_args(argv)
    rounds = 2 if args.quick else 3
    th = args.threads

    tensors = {"expert 2880x2880": make_bf16((ROW, ROW), 0)}
    if not args.quick:
        tensors["stack 32x2880x2880"] = make_bf16((32, ROW, ROW), 1)
    ref_rows = {Q.MXFP4: 192, Q.Q8_0: 720}  # gguf-py slice: MXFP4 makes a [blocks, 32, 16] temporary
    pool = ThreadPoolExecutor(max_workers=th)

    print(f"ossgguf quantize kernels, BF16 input, {th} thread(s); GB/s of BF16 input read; "
          f"best of {rounds} rounds")
    header = f"{'tensor':20s} {'type':6s} {'method':24s} {'GB/s':>7s} {'vs copy':>8s} {'vs gguf-py':>11s} {'cpu/wall':>8s}"
    print(header)
    print("-" * len(header))
    for name, bits in tensors.items():
        for qtype in (Q.MXFP4, Q.Q8_0):  # warm every path once (tables, library, page faults)
            K.quantize_bf16_rows(bits.reshape(-1, ROW)[:64], qtype, th)
        nbytes = bits.nbytes
        dst_copy = np.empty_like(bits)
        t_copy, c_copy = best_time(lambda b=bits, d=dst_copy: np.copyto(d, b), rounds)
        for qtype in (Q.MXFP4, Q.Q8_0):
            out = np.empty(bits.shape[:-1] + (K.row_bytes(qtype, ROW),), dtype=np.uint8)
            sl = bits.reshape(-1, ROW)[: ref_rows[qtype]]
            t_ref, c_ref = (t * nbytes / sl.nbytes for t in best_time(lambda s=sl, q=qtype: gguf_py(s, q), 1))
            runs = {
                f"ossgguf ({th} threads)": lambda b=bits, q=qtype, o=out: K.quantize_bf16_rows(b, q, th, out=o),
                "ossgguf (1 thread)": lambda b=bits, q=qtype, o=out: K.quantize_bf16_rows(b, q, 1, out=o),
            }
            if qtype == Q.MXFP4:
                runs[f"libggml C ({th} threads)"] = lambda b=bits, o=out: ggml_mxfp4(b, o, pool, th)
            best = {k: (float("inf"), 0.0) for k in runs}
            for _ in range(rounds):  # interleaved, so a noisy neighbour hurts every method alike
                for k, fn in runs.items():
                    best[k] = min(best[k], best_time(fn, 1, warm=False))
            rows = [("plain copy", (t_copy, c_copy)), *best.items(), (f"gguf-py ({sl.shape[0]} rows)", (t_ref, c_ref))]
            for label, (t, c) in rows:
                print(f"{name:20s} {qtype.name:6s} {label:24s} {nbytes / t / 1e9:7.3f} {t_copy / t:8.3f} "
                      f"{t_ref / t:10.1f}x {c / t:8.2f}")
            times = {k: t for k, (t, _) in best.items()}
            ours = times[f"ossgguf ({th} threads)"]
            extra = f"; {th} threads vs 1: {times['ossgguf (1 thread)'] / ours:.2f}x"
            if qtype == Q.MXFP4:
                extra += f"; ossgguf numpy vs libggml C: {times[f'libggml C ({th} threads)'] / ours:.2f}x speed"
            print(f"{'':20s} {qtype.name:6s} ratios: {t_copy / ours:.3f} of copy speed, "
                  f"{t_ref / ours:.1f}x gguf-py{extra}")
        del dst_copy
    pool.shutdown()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / 1e6 if sys.platform == "darwin" else peak / 1e3  # bytes on macOS, KiB elsewhere
    total = sum(b.nbytes for b in tensors.values()) / 1e6
    print(f"peak RSS {peak_mb:.0f} MB (inputs {total:.0f} MB)")
    load = os.getloadavg()[0]
    if load > 0.5 * K.default_threads():  # ours included: past half the cores, others compete
        print(f"note: 1-minute load average {load:.1f} on {K.default_threads()} cores: other processes shared "
              f"the CPUs, so thread scaling (and cpu/wall) is understated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
