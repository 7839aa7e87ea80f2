"""Read the headers of a GGUF file set (one file, or every shard of a gguf-split set) without mapping it.

Metadata comes back as typed `KV` values (so it can be written again unchanged) and tensors as
absolute (file, offset, bytes) ranges, to be streamed with pread: nothing of the data is mapped, so
reading a 60 GB model keeps RSS small. Little-endian GGUF v2/v3, as llama.cpp writes.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import OssggufError
from .kv import KV

Q = GGMLQuantizationType
MAGIC = b"GGUF"
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_SHARD = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<n>\d{5})\.gguf$")
_SCALAR = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}
_READ = 1 << 20


@dataclass(frozen=True)
class GgufTensor:
    name: str
    qtype: Q
    shape: tuple[int, ...]  # numpy order: GGUF's ne reversed, the row (ne0) last
    file: Path
    offset: int  # absolute offset of the data in `file`
    nbytes: int

    @property
    def n_params(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class GgufFile:
    path: Path
    size: int
    kvs: dict[str, KV]
    tensors: list[GgufTensor]
    data_offset: int  # header bytes (aligned); tensor data follows

    def get(self, key: str, default: Any = None) -> Any:
        kv = self.kvs.get(key)
        return default if kv is None else kv.value


@dataclass
class GgufSet:
    """A model: one GGUF, or all shards of a split set (metadata lives in the first)."""

    files: list[GgufFile]

    @property
    def path(self) -> Path:
        return self.files[0].path

    @property
    def kvs(self) -> dict[str, KV]:
        return self.files[0].kvs

    @property
    def tensors(self) -> list[GgufTensor]:
        return [t for f in self.files for t in f.tensors]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def get(self, key: str, default: Any = None) -> Any:
        return self.files[0].get(key, default)


class _Truncated(Exception):
    pass


class _Cursor:
    """Sequential reads over a file with a growing buffer: header parsing without per-field syscalls."""

    def __init__(self, f: BinaryIO):
        self.f, self.buf, self.pos = f, b"", 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            more = self.f.read(max(n - (len(self.buf) - self.pos), _READ))
            self.buf = self.buf[self.pos:] + more
            self.pos = 0
            if n > len(self.buf):
                raise _Truncated
        out = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> str:
        return str(self.take(self.u64()), "utf-8")

    def value(self, vtype: GGUFValueType) -> KV:
        if vtype == GGUFValueType.STRING:
            return KV(vtype, self.string())
        if vtype == GGUFValueType.ARRAY:
            sub, count = GGUFValueType(self.u32()), self.u64()
            if sub == GGUFValueType.STRING:
                return KV(vtype, [self.string() for _ in range(count)], sub)
            if sub == GGUFValueType.ARRAY:
                raise ValueError("nested arrays are not supported")
            dt = np.dtype(_SCALAR[sub])
            return KV(vtype, np.frombuffer(self.take(dt.itemsize * count), dtype=dt).copy(), sub)
        dt = np.dtype(_SCALAR[vtype])
        return KV(vtype, np.frombuffer(self.take(dt.itemsize), dtype=dt)[0].item())

    def tell(self, base: int) -> int:
        return base + self.pos


def read_gguf_file(path: str | Path) -> GgufFile:
    """One GGUF file's metadata and tensor infos; OssggufError when it is not a complete GGUF."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise OssggufError(f"cannot read {path}: {e.strerror}") from None
    with f:
        c = _Cursor(f)
        try:
            if bytes(c.take(4)) != MAGIC:
                raise OssggufError(f"{path} is not a GGUF file (no GGUF magic): pass a .gguf that "
                                   "`ossgguf convert` or llama.cpp wrote")
            version = c.u32()
            if version not in (2, 3):
                raise OssggufError(f"{path}: GGUF version {version} is not supported (big-endian or too old)")
            n_tensors, n_kv = c.u64(), c.u64()
            kvs: dict[str, KV] = {}
            for _ in range(n_kv):
                key = c.string()
                kvs[key] = c.value(GGUFValueType(c.u32()))
            raw = []
            for _ in range(n_tensors):
                name = c.string()
                ne = [c.u64() for _ in range(c.u32())]
                raw.append((name, tuple(reversed(ne)), Q(c.u32()), c.u64()))
            consumed = c.tell(0)
        except _Truncated:
            raise OssggufError(f"{path} is truncated inside its header ({size:,} bytes): an interrupted "
                               "write or download? Write or fetch it again") from None
        except UnicodeDecodeError:
            raise OssggufError(f"{path} has a string that is not UTF-8 in its header: the file is corrupt") from None
        except (ValueError, OverflowError, MemoryError) as e:
            raise OssggufError(f"{path} has a corrupt or unsupported GGUF header ({e})") from None
    align_kv = kvs.get("general.alignment")
    align = int(align_kv.value) if align_kv is not None else 32
    data_offset = -(-consumed // align) * align
    tensors = []
    for name, shape, qtype, rel in raw:
        block, type_size = GGML_QUANT_SIZES[qtype]
        if shape and shape[-1] % block:
            raise OssggufError(f"{path}: tensor '{name}' has rows of {shape[-1]} values, not a multiple of "
                               f"{qtype.name}'s block of {block}: the file is corrupt")
        nbytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
        t = GgufTensor(name, qtype, shape, path, data_offset + rel, nbytes)
        if t.offset + nbytes > size:
            raise OssggufError(f"{path} is truncated: tensor '{name}' ends at byte {t.offset + nbytes:,} of a "
                               f"{size:,}-byte file (an interrupted write or download?): write or fetch it again")
        tensors.append(t)
    return GgufFile(path, size, kvs, tensors, data_offset)


def split_parts(path: Path) -> tuple[str, int, int] | None:
    """(stem, shard number from 1, shard count) of a gguf-split name, else None."""
    m = _SHARD.match(path.name)
    return (m["stem"], int(m["no"]), int(m["n"])) if m else None


def shard_paths(path: str | Path) -> list[Path]:
    """Every file of the set `path` belongs to (any shard may be given); OssggufError if one is missing."""
    path = Path(path)
    parts = split_parts(path)
    if parts is None or parts[2] == 1:
        if not path.is_file():
            raise OssggufError(f"{path} does not exist: pass a .gguf file (the first shard of a split set)")
        return [path]
    stem, _, n = parts
    files = [path.with_name(f"{stem}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise OssggufError(f"split set {stem} is incomplete: {', '.join(missing)} missing in {path.parent}; "
                           "keep all shards in one folder")
    return files


def read_gguf(path: str | Path) -> GgufSet:
    """A GGUF model (all shards of a split set) with its split metadata checked."""
    files = [read_gguf_file(p) for p in shard_paths(path)]
    n = len(files)
    for i, f in enumerate(files):
        no, count = f.get("split.no"), f.get("split.count")
        if n == 1 and (count or 1) > 1:
            raise OssggufError(f"{f.path} is shard {(no or 0) + 1} of {count} but its name lacks "
                               "-0000N-of-0000M.gguf: keep the names gguf-split wrote")
        if n > 1 and (no != i or count != n):
            raise OssggufError(f"{f.path}: split metadata (split.no {no}, split.count {count}) does not match "
                               "its name: keep the names gguf-split wrote")
    declared = files[0].get("split.tensors.count")
    got = sum(len(f.tensors) for f in files)
    if declared is not None and declared != got:
        raise OssggufError(f"{files[0].path}: the split set declares {declared} tensors, its shards hold {got}")
    return GgufSet(files)
