"""MXFP4 in the two layouts gpt-oss meets: Hugging Face's and ggml's.

A block is 32 values: one E8M0 scale byte (2^(s-127)) and 32 four-bit E2M1 codes (bit 3 is the sign).
- Hugging Face: `*_blocks` [..., n_blocks, 16] where byte k holds element 2k (low nibble) and 2k+1
  (high nibble); `*_scales` [..., n_blocks] is a separate tensor.
- ggml (GGML_TYPE_MXFP4, block_mxfp4 in ggml-common.h): 17 bytes, the scale first, then byte j holds
  element j (low nibble) and element j+16 (high nibble). Codes and scales are copied as they are, so
  the repack is lossless: it only moves nibbles.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
GGML_BLOCK_BYTES = 17
# E2M1 code -> value (OpenAI's reference weights.py FP4_VALUES, same order as ggml's kvalues_mxfp4 / 2).
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)


_LO = np.uint64(0x0F0F0F0F0F0F0F0F)
_HI = np.uint64(0xF0F0F0F0F0F0F0F0)
_FOUR = np.uint64(4)


def repack_hf_to_ggml(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """HF blocks [..., nb, 16] + scales [..., nb] -> ggml bytes [..., nb * 17], bit for bit."""
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {blocks.shape} do not match scales {scales.shape}")
    lead = scales.shape
    n = scales.size
    # Work on each block's two 8-byte halves as uint64 so numpy loops run long: a small innermost
    # axis (8 or 16 bytes) makes numpy several times slower.
    halves = np.ascontiguousarray(blocks).reshape(n, 16).view(np.uint64)
    a, b = halves[:, 0], halves[:, 1]  # a: elements 0..15 (byte m = 2m lo, 2m+1 hi); b: 16..31
    even = ((a & _LO) | ((b & _LO) << _FOUR)).view(np.uint8).reshape(n, 8)  # ggml byte 2m = e[2m] | e[2m+16]<<4
    odd = (((a >> _FOUR) & _LO) | (b & _HI)).view(np.uint8).reshape(n, 8)  # ggml byte 2m+1 = e[2m+1] | e[2m+17]<<4
    out = np.empty((n, GGML_BLOCK_BYTES), dtype=np.uint8)
    out[:, 0] = scales.reshape(n)
    out[:, 1::2], out[:, 2::2] = even, odd
    return out.reshape(lead[:-1] + (lead[-1] * GGML_BLOCK_BYTES,))


def repack_ggml_to_hf(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of repack_hf_to_ggml: ggml bytes [..., nb * 17] -> (blocks [..., nb, 16], scales [..., nb])."""
    g = data.reshape(data.shape[:-1] + (-1, GGML_BLOCK_BYTES))
    scales = g[..., 0].copy()
    lo, hi = g[..., 1::2], g[..., 2::2]  # ggml bytes 2m and 2m+1
    blocks = np.empty(scales.shape + (16,), dtype=np.uint8)
    blocks[..., :8] = (lo & 0x0F) | ((hi & 0x0F) << 4)
    blocks[..., 8:] = (lo >> 4) | (hi & 0xF0)
    return blocks, scales


def dequantize_hf(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """HF-layout MXFP4 -> float32 [..., nb * 32], as OpenAI's reference implementation does."""
    codes = np.empty(blocks.shape[:-1] + (32,), dtype=np.uint8)
    codes[..., 0::2] = blocks & 0x0F
    codes[..., 1::2] = blocks >> 4
    vals = E2M1_VALUES[codes] * np.ldexp(np.float32(1), scales.astype(np.int32) - 127)[..., None]
    return vals.reshape(blocks.shape[:-2] + (-1,)).astype(np.float32)


def quantize_hf(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [..., cols] -> HF-layout MXFP4 with the standard scale rule e = floor(log2(amax)) - 2.

    Rounds to the nearest E2M1 value (ties toward zero, as ggml), never emits negative zero, so a
    dequantized result quantizes back to the same bytes.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 rows must be a multiple of {BLOCK} values, got {w.shape[-1]}")
    x = w.reshape(w.shape[:-1] + (-1, BLOCK))
    amax = np.abs(x).max(axis=-1)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(np.maximum(amax, np.finfo(np.float32).tiny))) - 2, -127)
    e = np.clip(e, -127, 127).astype(np.int32)
    scaled = x / np.ldexp(np.float32(1), e)[..., None]
    mags = E2M1_VALUES[:8]
    a = np.abs(scaled)
    # nearest magnitude: index of the closest of the 8 values (ties -> the even code, as round-half-even)
    idx = np.abs(a[..., None] - mags).argmin(axis=-1).astype(np.uint8)
    codes = np.where((scaled < 0) & (idx > 0), idx | 8, idx).astype(np.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (e + 127).astype(np.uint8)
