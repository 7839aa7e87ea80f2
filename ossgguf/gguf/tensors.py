"""GGML tensor types and the one tensor record that the reader, the writer and every command share.

Shapes are in numpy order everywhere, the row last (GGUF stores ne reversed: ne[0] is the row);
`--dry-run --json` and the planner's tables turn them around only where they show GGUF order. Block
and byte sizes come from gguf-py's GGML_QUANT_SIZES (ggml.c's type_traits); `tensor_bytes` is the
project's one size function. A tensor's class and layer are ossgguf.model's `tensor_class` and
`layer_of` of its name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ossgguf.errors import OssggufError

Q = GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
# The types ossgguf writes: the floats in numpy, MXFP4 with its own encoder, the rest with ggml's
# ggml_quantize_chunk (quantize/kernels.py); gguf-py reads every one of them back.
SUPPORTED_TYPES = FLOAT_TYPES + (Q.MXFP4,) + (
    Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.NVFP4,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    Q.IQ4_NL, Q.IQ4_XS, Q.IQ3_S, Q.IQ3_XXS, Q.IQ2_S, Q.IQ1_M, Q.TQ1_0, Q.TQ2_0,
)  # fmt: skip
# ggml_quantize_requires_imatrix (ggml.c): ossgguf computes no importance matrix; tests ask libggml.
IMATRIX_TYPES = (Q.IQ2_XXS, Q.IQ2_XS, Q.IQ1_S)


def pad(n: int, align: int) -> int:
    """`n` rounded up to a multiple of `align` (GGUF data, ggml buffers)."""
    return -(-n // align) * align


def block_size(qtype: Q) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def row_fits(qtype: Q, n_per_row: int) -> bool:
    return n_per_row % block_size(qtype) == 0


def row_bytes(qtype: Q, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` values stored as `qtype`."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise OssggufError(f"rows of {n_per_row} values cannot be stored as {qtype.name} (blocks of {block})")
    return n_per_row // block * type_size


def tensor_bytes(qtype: Q, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of numpy shape `shape` (the row last) stored as `qtype`."""
    shape = tuple(shape) or (1,)
    return math.prod(shape[:-1]) * row_bytes(qtype, shape[-1])


def types_for_row(n_per_row: int) -> list[Q]:
    """The types ossgguf writes whose blocks divide a row of `n_per_row` values."""
    return [q for q in SUPPORTED_TYPES if row_fits(q, n_per_row)]


def parse_type(name: str | Q) -> Q:
    """'q8_0', 'Q8_0', ' mxfp4' -> the GGML type; OssggufError listing the types ossgguf writes."""
    if isinstance(name, Q):
        return name
    try:
        return Q[str(name).strip().upper()]
    except KeyError:
        names = ", ".join(q.name.lower() for q in SUPPORTED_TYPES)
        raise OssggufError(f"unknown tensor type '{name}': use one of {names}") from None


@dataclass(frozen=True)
class Tensor:
    """A GGUF tensor: name, type, numpy-order shape and, once read from a file, where its data lies."""

    name: str
    qtype: Q
    shape: tuple[int, ...]
    file: Path | None = None
    offset: int = 0  # absolute offset of the data in `file`

    @cached_property
    def nbytes(self) -> int:
        return tensor_bytes(self.qtype, self.shape)

    @property
    def n_params(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Rows of the stored data (GGUF's ne[1] * ne[2] * ...): each `nbytes // rows` bytes."""
        return math.prod(self.shape[:-1])
