"""A safetensors reader that streams: headers parsed up front, data read with pread into reused
buffers, so nothing read stays resident (no mmap pages counted in RSS)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

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
    """Reads tensors (or runs of dim-0 slices) from safetensors files with pread.

    One open file descriptor per shard; callers pass their own reusable buffers so that peak memory
    is one slice, whatever the model size.
    """

    def __init__(self, entries: dict[str, TensorEntry]):
        self.entries = entries
        self._fds: dict[Path, int] = {}

    def __enter__(self) -> TensorReader:
        for path in {e.file for e in self.entries.values()}:  # open all now: reads run on threads
            self._fd(path)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
            # Sequential read-once access: tell the kernel not to keep much read-ahead around.
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, start+count) along dim 0 of tensor `name`, as an array of its dtype."""
        e = self.entries[name]
        n0 = e.shape[0] if e.shape else 1
        count = n0 - start if count is None else count
        shape = (count,) + e.shape[1:] if e.shape else ()
        nbytes = count * e.row_bytes
        if out is None:
            out = np.empty(shape, dtype=e.np_dtype)
        else:
            out = out.reshape(-1).view(np.uint8)[:nbytes].view(e.np_dtype).reshape(shape)
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd = self._fd(e.file)
        pos, done = e.offset + start * e.row_bytes, 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], pos + done)
            if n <= 0:
                raise OssggufError(f"{e.file} ended early while reading '{name}': the file is truncated")
            done += n
        if hasattr(os, "posix_fadvise"):
            # Drop the pages we just read from the page cache: this is a read-once stream.
            os.posix_fadvise(fd, pos, nbytes, os.POSIX_FADV_DONTNEED)
        return out
