"""Stored values of one GGML type as the bytes of another: decode, encode and the two together.

Floats are widened to float32 once per slice (BF16 through the one codec in quantize/kernels.py);
quantized types are written by ggml's own C quantizers or the MXFP4 encoder (quantize/kernels.py)
and read back by gguf-py's dequantizers (MXFP4 by OpenAI's reference rule, quantize/mxfp4.py).
"""

from __future__ import annotations

import gguf.quants
import numpy as np

from ossgguf.gguf.tensors import FLOAT_TYPES, Q

from . import mxfp4
from .kernels import bf16_to_f32, f32_to_bf16, quantize_bf16_rows, quantize_rows

_FLOAT_VIEW = {Q.BF16: "<u2", Q.F16: "<f2", Q.F32: "<f4"}  # BF16 as its bits: numpy has no bfloat16


def decode(raw: np.ndarray, qtype: Q, row: int) -> np.ndarray:
    """Stored values (or their bytes) of `qtype` -> float32 [rows, row]."""
    if qtype in FLOAT_TYPES:
        x = raw.view(_FLOAT_VIEW[qtype])
        return (bf16_to_f32(x) if qtype == Q.BF16 else x.astype(np.float32)).reshape(-1, row)
    if qtype == Q.MXFP4:
        blocks, scales = mxfp4.repack_ggml_to_hf(raw)  # lossless nibble moves; OpenAI's dequantizer
        return mxfp4.dequantize_hf(blocks, scales).reshape(-1, row)
    return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(-1, row)


def encode(x: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 [rows, n] -> uint8 [rows, row_bytes] of `qtype`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == Q.F32:
        return x.view(np.uint8)
    if qtype == Q.F16:
        return x.astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        return f32_to_bf16(x).view(np.uint8)
    return quantize_rows(x.reshape(-1, x.shape[-1]), qtype).reshape(x.shape[:-1] + (-1,))


def transcode(raw: np.ndarray, src: Q, dst: Q, row: int) -> np.ndarray:
    """Stored values of type `src` in rows of `row` values -> bytes of `dst`; the same type is copied as is."""
    if src == dst:
        return raw.view(np.uint8)  # lossless: MXFP4 experts stay bit for bit
    if src == Q.BF16 and dst not in FLOAT_TYPES:  # the kernels widen BF16 bits per chunk themselves
        return quantize_bf16_rows(raw.view("<u2").reshape(-1, row), dst)
    return encode(decode(raw, src, row), dst)
