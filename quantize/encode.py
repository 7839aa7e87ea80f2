"""Turn source values into the bytes of a GGML type.

Floats are widened to float32 once per slice; quantized types go through ggml's own C quantizers
(quantize/kernels.py, the libggml that llama-cpp-python ships) when available, else gguf-py's numpy
reference.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import OssggufError

Q = GGMLQuantizationType

# safetensors dtype name or GGML type name of the source -> numpy view of its raw elements
RAW_FLOAT = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}


def to_f32(raw: np.ndarray, src: str) -> np.ndarray:
    """Raw source elements (BF16 as uint16 bits, F16, F32) -> float32."""
    if src == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if src in ("F16", "F32"):
        return raw.astype(np.float32)
    raise OssggufError(f"cannot convert {src} values")


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bits, round to nearest even (as torch and ggml do); NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def encode(x: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 [rows, n] -> uint8 [rows, row_bytes] of `qtype`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == Q.F32:
        return x.view(np.uint8)
    if qtype == Q.F16:
        return x.astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        return f32_to_bf16_bits(x).view(np.uint8)
    try:
        from .kernels import quantize_rows
    except ImportError:  # pragma: no cover - the kernels module is part of the package
        quantize_rows = None
    if quantize_rows is not None:
        return quantize_rows(x.reshape(-1, x.shape[-1]), qtype).reshape(x.shape[:-1] + (-1,))
    import gguf.quants

    return gguf.quants.quantize(x, qtype)
