"""Read the headers of a GGUF file set (one file, or every shard of a gguf-split set) without mapping it.

Metadata comes back as typed `KV` values (so it can be written again unchanged) and tensors as
absolute (file, offset, bytes) ranges, to be streamed with pread: nothing of the data is mapped, so
reading a 60 GB model keeps RSS small. Little-endian GGUF v2/v3, as llama.cpp writes.

Every command that reads a GGUF comes through `read_gguf`, so it refuses what llama.cpp's loader
(ggml/src/gguf.cpp, src/llama-model-loader.cpp) refuses, with a message that names the file and
the key or tensor, before anything is loaded or written.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ossgguf.errors import OssggufError
from ossgguf.gguf.values import KV
from ossgguf.model import ARCH, TensorClass, layer_of, tensor_class

Q = GGMLQuantizationType
MAGIC = b"GGUF"
ALIGNMENT_KEY = "general.alignment"
DEFAULT_ALIGNMENT = 32
# The writer records one random id in every shard of one output (ossgguf/gguf/write.py): shards of
# two runs with the same layout cannot be told apart by llama.cpp's split keys alone.
SPLIT_ID = "ossgguf.split.id"
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count", SPLIT_ID)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: names must be shorter
INT64_MAX = 2**63 - 1
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
            dt = np.dtype(_SCALAR[sub])
            return KV(vtype, np.frombuffer(self.take(dt.itemsize * count), dtype=dt).copy(), sub)
        dt = np.dtype(_SCALAR[vtype])
        return KV(vtype, np.frombuffer(self.take(dt.itemsize), dtype=dt)[0].item())

    def tell(self) -> int:
        return self.base + self.pos


def _value_type(n: int) -> GGUFValueType:
    try:
        return GGUFValueType(n)
    except ValueError:
        raise ValueError(f"unknown value type {n}") from None


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def _alignment(path: Path, kvs: dict[str, KV]) -> int:
    """general.alignment as llama.cpp's loader takes it: a UINT32 power of two, or absent (32)."""
    kv = kvs.get(ALIGNMENT_KEY)
    if kv is None:
        return DEFAULT_ALIGNMENT
    v = kv.value
    if kv.type != GGUFValueType.UINT32 or v <= 0 or v & (v - 1):
        shown = f"{v!r}" if kv.type != GGUFValueType.ARRAY else "an array"
        raise OssggufError(f"{path}: key '{ALIGNMENT_KEY}' is {shown} ({kv.type.name}), not a UINT32 power of two: "
                           "llama.cpp cannot load the file either; write it again with `ossgguf convert` or "
                           "llama.cpp")
    return int(v)


def _tensor(path: Path, name: str, ne: list[int], qtype: int, rel: int, data_offset: int) -> GgufTensor:
    """One tensor info checked as llama.cpp's loader checks it (gguf.cpp, gguf_init_from_reader)."""
    def bad(what: str) -> OssggufError:
        return OssggufError(f"{path}: tensor '{name}' {what}: the file is corrupt (llama.cpp cannot load it either)")

    try:
        q = Q(qtype)
        block, type_size = GGML_QUANT_SIZES[q]
    except (ValueError, KeyError):
        raise bad(f"has unknown type {qtype}") from None
    if any(d > INT64_MAX for d in ne):  # llama.cpp reads ne as int64: these are negative
        raise bad(f"has a negative dimension ({' x '.join(map(str, ne))})")
    n = 1
    for d in ne:
        n *= d
    if n >= INT64_MAX:
        raise bad(f"has {' x '.join(map(str, ne))} = {n:,} elements, more than a GGUF tensor can hold (2^63)")
    if ne and ne[0] % block:
        raise bad(f"has rows of {ne[0]} values, not a multiple of {q.name}'s block of {block}")
    return GgufTensor(name, q, tuple(reversed(ne)), path, data_offset + rel, n // block * type_size)


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
            if bytes(c.take(4)) != MAGIC:
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
    data_offset = _pad(consumed, align)
    tensors = []
    expect = 0  # llama.cpp requires the tensors' data in header order, each padded to the alignment
    for name, ne, qtype, rel in raw:
        t = _tensor(path, name, ne, qtype, rel, data_offset)
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
        expect += _pad(t.nbytes, align)
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


_MIXED = "shards of different models or runs mixed in one folder? Keep the shards that one run wrote together"


def check_split_set(files: list[GgufFile]) -> None:
    """The shards of one split set as llama.cpp's loader checks them (split.no and split.count in
    each, no tensor twice, split.tensors.count the sum), plus the writer's id where recorded."""
    n = len(files)
    first = files[0]
    if n == 1:
        count = first.get("split.count")
        if (count or 1) > 1:
            raise OssggufError(f"{first.path} is shard {(first.get('split.no') or 0) + 1} of {count} but its name "
                               "lacks -0000N-of-0000M.gguf: keep the names gguf-split wrote")
    for i, f in enumerate(files if n > 1 else []):
        no, count = f.get("split.no"), f.get("split.count")
        if no is None or count is None:
            raise OssggufError(f"{f.path} has no split.no/split.count keys: it is not a shard of a gguf-split set "
                               "(a renamed file?); keep the names gguf-split wrote")
        if count != n:
            raise OssggufError(f"{f.path}: split.count is {count}, but the set has {n} files: {_MIXED}")
        if no != i:
            raise OssggufError(f"{f.path}: split metadata (split.no {no}, split.count {count}) does not match "
                               "its name: keep the names gguf-split wrote")
        sid, first_id = f.get(SPLIT_ID), first.get(SPLIT_ID)
        if sid is not None and first_id is not None and sid != first_id:
            raise OssggufError(f"{f.path} belongs to another output than {first.path.name} ({SPLIT_ID} {sid} and "
                               f"{first_id}): {_MIXED}")
    total = sum(len(f.tensors) for f in files)
    for f in files:
        declared = f.get("split.tensors.count")
        if declared is not None and declared != total:
            raise OssggufError(f"{f.path}: split.tensors.count is {declared}, but the set's {n} file(s) hold {total} "
                               f"tensors" + (f": {_MIXED}" if n > 1 else ": the file is corrupt"))
    where: dict[str, Path] = {}
    for f in files:
        for t in f.tensors:
            if t.name in where:
                raise OssggufError(f"{f.path}: tensor '{t.name}' is also in {where[t.name].name}: {_MIXED}")
            where[t.name] = f.path
    _check_gpt_oss_shapes(files)


def _check_gpt_oss_shapes(files: list[GgufFile]) -> None:
    """A gpt-oss set's tensors must fit its first shard's block and expert counts: shards of a 20b and a
    120b model (24 and 36 layers, 32 and 128 experts) mixed in one set break this."""
    first = files[0]
    if first.get("general.architecture") != ARCH:
        return
    n_layer, n_expert = first.get(f"{ARCH}.block_count"), first.get(f"{ARCH}.expert_count")
    todo = _MIXED if len(files) > 1 else "the metadata does not match the tensors; write the file again"
    for f in files:
        for t in f.tensors:
            layer = layer_of(t.name)
            if n_layer is not None and layer is not None and layer >= n_layer:
                raise OssggufError(f"{f.path}: tensor '{t.name}' is in layer {layer}, but {first.path.name} has "
                                   f"{ARCH}.block_count {n_layer}: {todo}")
            if n_expert is not None and len(t.shape) == 3 and t.shape[0] != n_expert and _is_expert(t.name):
                raise OssggufError(f"{f.path}: tensor '{t.name}' holds {t.shape[0]} experts, but {first.path.name} "
                                   f"has {ARCH}.expert_count {n_expert}: {todo}")


def _is_expert(name: str) -> bool:
    try:
        return tensor_class(name) == TensorClass.EXPERT
    except OssggufError:
        return False


def read_gguf(path: str | Path) -> GgufSet:
    """A GGUF model (all shards of a split set: pass any of them), every file and the set checked."""
    files = [read_gguf_file(p) for p in shard_paths(path)]
    check_split_set(files)
    return GgufSet(files)
