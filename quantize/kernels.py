"""Fast row quantization on all cores: ggml's own C quantizers (ctypes) and a numpy MXFP4 encoder.

Quantized types go through `ggml_quantize_chunk` in the libggml that llama-cpp-python ships, so
the bytes are llama.cpp's own. Rows are split into chunks run on a persistent thread pool (ctypes and
numpy release the GIL). MXFP4 has its own numpy encoder: ggml's scale rule e = floor(log2(amax)) - 2
clips block maxima in (7, 8) * 2^e to 6 * 2^e; trying e + 1 for those blocks and keeping the lower
squared error is never worse than ggml per block and ~5% better in MSE on weights, while values that
came from MXFP4 still come back bit for bit (e has zero error there and wins ties).
Nothing is loaded at import time.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from ossgguf.gguf.tensors import IMATRIX_TYPES, SUPPORTED_TYPES, Q, block_size, row_bytes, types_for_row

from ..errors import OssggufError
from ..runner.llama_ctypes import ggml_lib, ggml_library_path

_CHUNK_ELEMS = 1 << 18  # values per task: fits L2 with the temporaries, amortises Python overhead


def check_encodable(qtype: Q, n_per_row: int) -> None:
    """OssggufError unless ossgguf can write rows of `n_per_row` values as `qtype`, saying why and
    which types would fit."""
    qtype = Q(qtype)
    if qtype in IMATRIX_TYPES:
        raise OssggufError(
            f"{qtype.name} needs an importance matrix (imatrix), which ossgguf does not compute: "
            f"choose another type, e.g. IQ3_S, IQ4_XS, Q4_K or MXFP4"
        )
    if qtype not in SUPPORTED_TYPES:
        names = ", ".join(q.name for q in SUPPORTED_TYPES)
        raise OssggufError(f"cannot quantize to {qtype.name}: supported types are {names}")
    blck = block_size(qtype)
    if n_per_row <= 0 or n_per_row % blck:
        fit = ", ".join(q.name for q in types_for_row(n_per_row)) or "none"
        raise OssggufError(
            f"cannot quantize rows of {n_per_row} values to {qtype.name}: its blocks hold {blck} values "
            f"and {n_per_row} is not a multiple of {blck}; types that fit this row width: {fit}"
        )


# ---------------------------------------------------------------- BF16


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) -> float32, exactly."""
    bits = np.asarray(bits)
    out = np.empty(bits.shape, dtype=np.float32)
    np.left_shift(bits.view(np.uint16), np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)
    return out


def f32_to_bf16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> BF16 bits (uint16), round to nearest even; NaN stays a quiet NaN (ggml's rule)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (u >> np.uint32(16)) & np.uint32(1)
    r += np.uint32(0x7FFF)
    r += u  # may wrap only for NaN patterns, which are replaced below
    r >>= np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():  # ggml_compute_fp32_to_bf16: keep sign and payload top, force quiet
        r[nan] = (u[nan] >> np.uint32(16)) | np.uint32(64)
    if out is None:
        return r.astype(np.uint16)
    np.copyto(out, r, casting="unsafe")
    return out


# ---------------------------------------------------------------- MXFP4 (numpy)

_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Midpoints between E2M1 magnitudes; a value equal to one rounds down (toward zero), as ggml's
# best_index_mxfp4 and gguf-py's argmin do (first minimum).
_E2M1_MID = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


@functools.cache
def _mxfp4_tables() -> tuple[np.ndarray, np.ndarray]:
    """Tables indexed by the 16-bit key (bf16 bits of x / 2^(e-127), see _mxfp4_encode).

    Keys below 0x4100 are |v| < 8 with a positive sign, 0x8000 + that the negatives; the rest come
    from values that underflowed (wrapped) and encode 0. Returns (codes: [key] the code, [key + 65536]
    the code << 4 for the high nibble; error change in units of 2^(2(e-127)) when the block takes
    scale e + 1 instead of e).
    """
    key = np.arange(1 << 16, dtype=np.uint32)
    mag = key & 0x7FFF
    v = np.where(mag < 0x4100, (mag << 16).view(np.float32), np.float32(0)).astype(np.float64)
    m0 = np.searchsorted(_E2M1_MID, v, side="left")
    m1 = np.searchsorted(_E2M1_MID, v / 2, side="left")
    code = np.where((key >= 0x8000) & (m0 > 0), m0 | 8, m0).astype(np.uint8)
    d_err = 4 * (v / 2 - _E2M1[m1]) ** 2 - (v - _E2M1[m0]) ** 2
    return np.concatenate([code, code << 4]).astype(np.uint8), d_err.astype(np.float32)


# Table offset per element of a block: elements 16..31 go to the high nibbles.
_HALF = np.repeat(np.array([0, 1 << 16], dtype=np.int32), 16)
_PACKED = np.dtype([("e", "u1"), ("qs", "V16")])  # block_mxfp4


def _mxfp4_exact(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 blocks [nb, 32] -> (scale bytes, codes); slow, for blocks the bit path cannot take."""
    a = np.abs(x)
    amax = a.max(axis=1)
    _, ex = np.frexp(amax)  # amax = f * 2^ex, f in [0.5, 1): floor(log2(amax)) = ex - 1
    e = np.where(amax > 0, np.clip(ex - 1 - 2 + 127, 0, 254), 0)
    v = a / np.ldexp(1.0, e - 127)[:, None]
    m0 = np.searchsorted(_E2M1_MID, v, side="left")
    m1 = np.searchsorted(_E2M1_MID, v / 2, side="left")
    err0 = ((v - _E2M1[m0]) ** 2).sum(axis=1)
    err1 = 4 * ((v / 2 - _E2M1[m1]) ** 2).sum(axis=1)
    up = (err1 < err0) & (e < 254)
    mag = np.where(up[:, None], m1, m0)
    codes = np.where((x < 0) & (mag > 0), mag | 8, mag).astype(np.uint8)
    return (e + up).astype(np.uint8), codes


def _mxfp4_encode(src: np.ndarray, out: np.ndarray) -> None:
    """Blocks [nb, 32] of BF16 bits (uint16) or float32 -> ggml MXFP4 bytes out [nb, 17]."""
    codes, d_err = _mxfp4_tables()
    f32 = src.dtype == np.float32
    u = src.view(np.uint32 if f32 else np.uint16)
    mbits, shift = (23, 32) if f32 else (7, 16)
    ut = u.dtype.type
    amax = np.maximum.reduce(u & ut((1 << (shift - 1)) - 1), axis=1)
    expf = (amax >> ut(mbits)).astype(np.int32)
    if (expf == 255).any():
        raise OssggufError("cannot quantize to MXFP4: the tensor holds Inf or NaN values")
    e = expf - 2  # E8M0 byte of 2^(floor(log2(amax)) - 2)
    # Adding (127 - e) to the exponent field divides by the scale exactly; the sign bit rides along,
    # and values that underflow wrap into key ranges that the tables map to 0.
    delta = ((127 - e) << mbits).astype(u.dtype)
    delta[amax == 0] = 0
    e[amax == 0] = 0
    keys = u + delta[:, None]
    if f32:  # keep the top 16 bits, OR-ing the rest into bit 0 so ties are still seen exactly
        sticky = (keys & ut(0xFFFF)) != 0
        keys = (keys >> ut(16)).astype(np.uint16)
        keys |= sticky
    rare = np.flatnonzero((amax != 0) & (expf < 5))  # tiny blocks: subnormals break the bit trick
    cand = np.flatnonzero(amax + delta > ut(0x40E0 << (shift - 16)))  # amax > 7 * 2^e: e + 1 may win
    if cand.size:
        if f32:  # float32 keys are rounded: decide with exact errors
            up = cand[_mxfp4_exact(src[cand].astype(np.float64))[0] > e[cand]]
        else:
            # Each table entry is exact in float32 (bf16 v, 2-bit grid); float64 sums stay exact.
            up = cand[np.take(d_err, keys[cand]).sum(axis=1, dtype=np.float64) < 0]
        keys[up] -= np.uint16(1 << 7)  # one more in the scale: halve v
        e[up] += 1
    nib = np.take(codes, np.add(keys, _HALF, dtype=np.int32)).view(np.uint64)  # [nb, 4]: lo, lo, hi, hi
    qs = np.bitwise_or(nib[:, :2], nib[:, 2:])
    blocks = out.view(_PACKED).reshape(-1)
    blocks["e"] = e
    blocks["qs"] = qs.view(_PACKED["qs"]).reshape(-1)
    if rare.size:
        x = src[rare].astype(np.float64) if f32 else bf16_to_f32(src[rare]).astype(np.float64)
        er, codes = _mxfp4_exact(x)
        out[rare, 0] = er
        out[rare, 1:] = codes[:, :16] | (codes[:, 16:] << 4)


# ---------------------------------------------------------------- libggml

_initialised: set[Q] = set()
_init_lock = threading.Lock()


def _ggml_ready(qtype: Q) -> ctypes.CDLL:
    """Load the library and build qtype's tables once (IQ grids take seconds), before threads start."""
    lib = ggml_lib()
    if qtype not in _initialised:
        with _init_lock:
            if qtype not in _initialised:
                # A libggml whose type ids or sizes differ from gguf-py's would write garbage: refuse.
                n = block_size(qtype)
                if lib.ggml_row_size(int(qtype), n) != row_bytes(qtype, n):
                    raise OssggufError(f"{ggml_library_path()} disagrees with gguf-py on the size of "
                                       f"{qtype.name}: reinstall llama-cpp-python==0.3.36 and gguf==0.19.0")
                lib.ggml_quantize_init(int(qtype))
                _initialised.add(qtype)
    return lib


# ---------------------------------------------------------------- threads

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _run(tasks: list[Callable[[], None]], threads: int) -> None:
    """Run tasks with at most `threads` in flight on the shared pool (grown when asked for more)."""
    global _pool, _pool_size
    if threads <= 1 or len(tasks) <= 1:
        for t in tasks:
            t()
        return
    with _pool_lock:
        if _pool is None or _pool_size < threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(threads, thread_name_prefix="ossgguf-quant"), threads
        pool = _pool
    it = iter(tasks)
    running = [pool.submit(t) for t in itertools.islice(it, threads)]
    try:
        while running:
            running.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                running.append(pool.submit(nxt))
    finally:  # on an error, let the tasks in flight finish before `out` is handed back
        wait(running)


# ---------------------------------------------------------------- quantize


def quantize_rows(x: np.ndarray, qtype: Q, threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Float rows [..., n_per_row] (float32; float16/64 are widened per chunk) -> uint8 [..., row_bytes]."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise ValueError(f"rows must be floats, got {x.dtype} (BF16 bits go to quantize_bf16_rows)")
    return _quantize(x, Q(qtype), threads, out)


def quantize_bf16_rows(bits: np.ndarray, qtype: Q, threads: int | None = None,
                       out: np.ndarray | None = None) -> np.ndarray:
    """BF16 rows given as uint16 bit patterns [..., n_per_row] -> uint8 [..., row_bytes] in `qtype`."""
    bits = np.asarray(bits)
    if bits.dtype.itemsize != 2 or bits.dtype.kind not in "uiV":
        raise ValueError(f"BF16 rows must be 16-bit patterns (uint16), got {bits.dtype}")
    return _quantize(bits.view(np.uint16), Q(qtype), threads, out)


def _quantize(src: np.ndarray, qtype: Q, threads: int | None, out: np.ndarray | None) -> np.ndarray:
    if src.ndim == 0:
        src = src.reshape(1)
    n = src.shape[-1]
    check_encodable(qtype, n)
    rb = row_bytes(qtype, n)
    lead = src.shape[:-1]
    if out is None:
        out = np.empty(lead + (rb,), dtype=np.uint8)
    elif out.dtype != np.uint8 or out.shape != lead + (rb,) or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 of shape {lead + (rb,)}, got {out.dtype} {out.shape}")
    rows = src.reshape(-1, n) if src.size else src.reshape(0, n)
    dst = out.reshape(-1, rb)
    nrows = rows.shape[0]
    if nrows == 0:
        return out
    threads = default_threads() if threads is None else max(1, int(threads))
    step = max(1, _CHUNK_ELEMS // n)
    work = _kernel(qtype, rows.dtype, n)
    tasks = [functools.partial(work, rows[i : i + step], dst[i : i + step]) for i in range(0, nrows, step)]
    _run(tasks, threads)
    return out


def _kernel(qtype: Q, dtype: np.dtype, n: int) -> Callable[[np.ndarray, np.ndarray], None]:
    """The function that encodes one chunk of rows (src [r, n] -> dst [r, row_bytes])."""
    bf16 = dtype == np.uint16

    def as_f32(s: np.ndarray) -> np.ndarray:
        return bf16_to_f32(s) if bf16 else np.ascontiguousarray(s, dtype=np.float32)

    if qtype == Q.F32:
        return lambda s, d: np.copyto(d.view(np.float32), as_f32(s))
    if qtype == Q.F16:
        return lambda s, d: np.copyto(d.view(np.float16), as_f32(s), casting="same_kind")
    if qtype == Q.BF16:
        if bf16:
            return lambda s, d: np.copyto(d.view(np.uint16), s)
        return lambda s, d: f32_to_bf16(s, out=d.view(np.uint16))
    if qtype == Q.MXFP4:
        def mxfp4(s: np.ndarray, d: np.ndarray) -> None:
            s = np.ascontiguousarray(s, dtype=np.uint16 if bf16 else np.float32)
            _mxfp4_encode(s.reshape(-1, 32), d.reshape(-1, 17))
        return mxfp4
    lib = _ggml_ready(qtype)

    def ggml(s: np.ndarray, d: np.ndarray) -> None:
        f = as_f32(s)
        done = lib.ggml_quantize_chunk(int(qtype), f.ctypes.data, d.ctypes.data, 0, f.shape[0], n, None)
        if done != d.nbytes:  # ggml asserts this itself; a mismatch means a foreign library build
            raise OssggufError(f"ggml wrote {done} bytes for {d.nbytes} expected ({qtype.name})")
    return ggml
