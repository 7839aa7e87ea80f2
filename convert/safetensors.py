"""safetensors checkpoints: headers parsed and checked up front, tensor rows read with pread."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ossgguf.gguf.stream import FileReader

from ..errors import OssggufError

DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"),  # raw bits: numpy has no bfloat16
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along dim 0 (one expert for [E, ...] tensors)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one .safetensors header and check every tensor lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise OssggufError(f"{path} is truncated (no safetensors header): download it again")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > MAX_HEADER or 8 + hlen > size:
                raise OssggufError(f"{path} is not a valid safetensors file (header length {hlen}): download it again")
            header = json.loads(f.read(hlen))
    except OSError as e:
        raise OssggufError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OssggufError(f"{path} has a corrupt safetensors header: download it again") from None
    base = 8 + hlen
    out: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise OssggufError(f"{path}: malformed header entry for '{name}'") from None
        if dtype not in DTYPES:
            raise OssggufError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - start != nbytes:
            raise OssggufError(f"{path}: tensor '{name}' spans {end - start} bytes, its shape needs {nbytes}")
        if base + end > size:
            raise OssggufError(
                f"{path} is truncated: tensor '{name}' ends at byte {base + end} of a {size}-byte file; "
                "download it again"
            )
        out[name] = TensorEntry(name, dtype, shape, path, base + start, nbytes)
    return out


class TensorReader:
    """Rows along dim 0 of checkpoint tensors (one expert of an [E, ...] tensor, a run of a matrix's
    rows), read through the write loop's FileReader: nothing mapped, nothing kept resident."""

    def __init__(self, entries: dict[str, TensorEntry], files: FileReader):
        self.entries, self.files = entries, files

    def read(self, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
        """Rows [start, start+count) along dim 0 of tensor `name`, as an array of its dtype."""
        e = self.entries[name]
        count = (e.shape[0] if e.shape else 1) - start if count is None else count
        shape = (count,) + e.shape[1:] if e.shape else ()
        data = self.files.read(e.file, e.offset + start * e.row_bytes, count * e.row_bytes, f"'{name}'")
        return data.view(DTYPES[e.dtype]).reshape(shape)
