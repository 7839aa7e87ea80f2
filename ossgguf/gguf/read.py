"""Read the headers of a GGUF file set (one file, or every shard of a gguf-split set) without mapping it.

Metadata comes back as typed `KV` values (so it can be written again unchanged) and tensors as
absolute (file, offset, bytes) ranges, to be streamed with pread: nothing of the data is mapped, so
reading a 60 GB model keeps RSS small. Little-endian GGUF v2/v3, as llama.cpp writes.

Every command that reads a GGUF comes through `read_gguf`, so it refuses what llama.cpp's loader
(ggml/src/gguf.cpp, src/llama-model-loader.cpp) refuses, with a message that names the file and
the key or tensor, before anything is loaded or written.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGUFValueType

from ossgguf.errors import OssggufError
from ossgguf.gguf.split import MIXED, check_split_set, shard_paths
from ossgguf.gguf.tensors import Q, Tensor, block_size, pad
from ossgguf.gguf.values import DTYPES, KV
from ossgguf.gguf.write import ALIGNMENT, ALIGNMENT_KEY, GGUF_MAGIC
from ossgguf.model import TensorClass, arch_key, is_gpt_oss, layer_of, tensor_class

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: names must be shorter
INT64_MAX = 2**63 - 1
_READ = 1 << 20


@dataclass
class GgufFile:
    path: Path
    size: int
    kvs: dict[str, KV]
    tensors: list[Tensor]
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
    def tensors(self) -> list[Tensor]:
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

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size, self.buf, self.pos, self.base = f, size, b"", 0, 0

    def take(self, n: int) -> memoryview:
        if self.base + self.pos + n > self.size:  # before reading: a corrupt length must not allocate
            raise _Truncated
        if self.pos + n > len(self.buf):
            more = self.f.read(max(n - (len(self.buf) - self.pos), _READ))
            self.base += self.pos
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
            sub, count = _value_type(self.u32()), self.u64()
            if sub == GGUFValueType.STRING:
                return KV(vtype, [self.string() for _ in range(count)], sub)
            if sub == GGUFValueType.ARRAY:
                raise ValueError("nested arrays are not supported")
            dt = np.dtype(DTYPES[sub])
            return KV(vtype, np.frombuffer(self.take(dt.itemsize * count), dtype=dt).copy(), sub)
        dt = np.dtype(DTYPES[vtype])
        return KV(vtype, np.frombuffer(self.take(dt.itemsize), dtype=dt)[0].item())

    def tell(self) -> int:
        return self.base + self.pos


def _value_type(n: int) -> GGUFValueType:
    try:
        return GGUFValueType(n)
    except ValueError:
        raise ValueError(f"unknown value type {n}") from None


def _alignment(path: Path, kvs: dict[str, KV]) -> int:
    """general.alignment as llama.cpp's loader takes it: a UINT32 power of two, or absent (32)."""
    kv = kvs.get(ALIGNMENT_KEY)
    if kv is None:
        return ALIGNMENT
    v = kv.value
    if kv.type != GGUFValueType.UINT32 or v <= 0 or v & (v - 1):
        shown = f"{v!r}" if kv.type != GGUFValueType.ARRAY else "an array"
        raise OssggufError(f"{path}: key '{ALIGNMENT_KEY}' is {shown} ({kv.type.name}), not a UINT32 power of two: "
                           "llama.cpp cannot load the file either; write it again with `ossgguf convert` or "
                           "llama.cpp")
    return int(v)


def _tensor(path: Path, name: str, ne: list[int], qtype: int, offset: int) -> Tensor:
    """One tensor info checked as llama.cpp's loader checks it (gguf.cpp, gguf_init_from_reader)."""
    def bad(what: str) -> OssggufError:
        return OssggufError(f"{path}: tensor '{name}' {what}: the file is corrupt (llama.cpp cannot load it either)")

    try:
        q = Q(qtype)
        block = block_size(q)
    except (ValueError, KeyError):
        raise bad(f"has unknown type {qtype}") from None
    if any(d > INT64_MAX for d in ne):  # llama.cpp reads ne as int64: these are negative
        raise bad(f"has a negative dimension ({' x '.join(map(str, ne))})")
    n = math.prod(ne)
    if n >= INT64_MAX:
        raise bad(f"has {' x '.join(map(str, ne))} = {n:,} elements, more than a GGUF tensor can hold (2^63)")
    if (ne[0] if ne else 1) % block:
        raise bad(f"has rows of {ne[0] if ne else 1} values, not a multiple of {q.name}'s block of {block}")
    return Tensor(name, q, tuple(reversed(ne)), path, offset)


def read_gguf_file(path: str | Path) -> GgufFile:
    """One GGUF file's metadata and tensor infos, checked; OssggufError naming the file and the key or
    tensor when it is not a complete, loadable GGUF."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise OssggufError(f"cannot read {path}: {e.strerror}") from None
    with f:
        c = _Cursor(f, size)
        try:
            if bytes(c.take(4)) != GGUF_MAGIC:
                raise OssggufError(f"{path} is not a GGUF file (no GGUF magic): pass a .gguf that "
                                   "`ossgguf convert` or llama.cpp wrote")
            version = c.u32()
            if version not in (2, 3):
                raise OssggufError(f"{path}: GGUF version {version} is not supported (big-endian or too old)")
            n_tensors, n_kv = c.u64(), c.u64()
            # A tensor info takes at least 24 bytes and a key 12: counts beyond that are corrupt, not long.
            if 24 * n_tensors + 12 * n_kv > size:
                raise OssggufError(f"{path} is truncated inside its header or corrupt: it declares {n_tensors:,} "
                                   f"tensors and {n_kv:,} keys, more than {size:,} bytes can hold; write or fetch "
                                   "it again")
            kvs: dict[str, KV] = {}
            for _ in range(n_kv):
                key = c.string()
                vtype = c.u32()
                try:
                    kv = c.value(_value_type(vtype))
                except ValueError as e:
                    raise OssggufError(f"{path}: key '{key}' has an unreadable value ({e}): the file is corrupt") from None
                if key in kvs:
                    raise OssggufError(f"{path}: key '{key}' appears twice in the header: the file is corrupt "
                                       "(llama.cpp cannot load it either)")
                kvs[key] = kv
            raw, seen = [], set()
            for _ in range(n_tensors):
                name = c.string()
                if name in seen:
                    raise OssggufError(f"{path}: tensor '{name}' appears twice: the file is corrupt (llama.cpp "
                                       "cannot load it either); write it again")
                if len(name.encode()) >= MAX_NAME:
                    raise OssggufError(f"{path}: tensor name '{name[:80]}' is longer than llama.cpp's limit of "
                                       f"{MAX_NAME - 1} bytes")
                seen.add(name)
                n_dims = c.u32()
                if n_dims > MAX_DIMS:
                    raise OssggufError(f"{path}: tensor '{name}' has {n_dims} dimensions, more than GGUF's "
                                       f"{MAX_DIMS}: the file is corrupt")
                ne = [c.u64() for _ in range(n_dims)]
                raw.append((name, ne, c.u32(), c.u64()))
            consumed = c.tell()
        except _Truncated:
            raise OssggufError(f"{path} is truncated inside its header ({size:,} bytes): an interrupted "
                               "write or download? Write or fetch it again") from None
        except UnicodeDecodeError:
            raise OssggufError(f"{path} has a string that is not UTF-8 in its header: the file is corrupt") from None
        except (ValueError, OverflowError, MemoryError) as e:
            raise OssggufError(f"{path} has a corrupt or unsupported GGUF header ({e})") from None
    align = _alignment(path, kvs)
    data_offset = pad(consumed, align)
    tensors = []
    expect = 0  # llama.cpp requires the tensors' data in header order, each padded to the alignment
    for name, ne, qtype, rel in raw:
        t = _tensor(path, name, ne, qtype, data_offset + rel)
        if rel != expect:
            raise OssggufError(f"{path}: tensor '{name}' has data offset {rel:,}, expected {expect:,} (data in "
                               f"header order, aligned to {align}): the file is corrupt (llama.cpp cannot load it "
                               "either)")
        if t.nbytes > size:
            raise OssggufError(f"{path}: tensor '{name}' claims {t.nbytes:,} bytes, more than the whole "
                               f"{size:,}-byte file: the header is corrupt")
        if t.offset + t.nbytes > size:
            raise OssggufError(f"{path} is truncated: tensor '{name}' ends at byte {t.offset + t.nbytes:,} of a "
                               f"{size:,}-byte file (an interrupted write or download?): write or fetch it again")
        expect += pad(t.nbytes, align)
        tensors.append(t)
    return GgufFile(path, size, kvs, tensors, data_offset)


def _check_gpt_oss_shapes(files: list[GgufFile]) -> None:
    """A gpt-oss set's tensors must fit its first shard's block and expert counts: shards of a 20b and a
    120b model (24 and 36 layers, 32 and 128 experts) mixed in one set break this."""
    first = files[0]
    if not is_gpt_oss(first):
        return
    n_layer, n_expert = first.get(arch_key("block_count")), first.get(arch_key("expert_count"))
    todo = MIXED if len(files) > 1 else "the metadata does not match the tensors; write the file again"
    for f in files:
        for t in f.tensors:
            layer = layer_of(t.name)
            if n_layer is not None and layer is not None and layer >= n_layer:
                raise OssggufError(f"{f.path}: tensor '{t.name}' is in layer {layer}, but {first.path.name} has "
                                   f"{arch_key('block_count')} {n_layer}: {todo}")
            if n_expert is not None and len(t.shape) == 3 and t.shape[0] != n_expert and tensor_class(t.name, None) == TensorClass.EXPERT:
                raise OssggufError(f"{f.path}: tensor '{t.name}' holds {t.shape[0]} experts, but {first.path.name} "
                                   f"has {arch_key('expert_count')} {n_expert}: {todo}")


def read_gguf(path: str | Path) -> GgufSet:
    """A GGUF model (all shards of a split set: pass any of them), every file and the set checked."""
    files = [read_gguf_file(p) for p in shard_paths(path)]
    check_split_set(files)
    _check_gpt_oss_shapes(files)
    return GgufSet(files)
