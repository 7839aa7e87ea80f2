"""A streaming GGUF (v3) writer whose layout is computed before a byte is written.

The layout (headers, tensor offsets, shard boundaries, file sizes) is a pure function of the
metadata and the tensors, so `--dry-run` reports exactly what a real run writes. A real run writes
each shard under a temporary name, preallocated to its final size (a full disk fails at once, and
the file has no holes), fills tensor data with pwrite at known offsets, writes the GGUF magic last,
then renames: an interrupted run never leaves a file that looks valid.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType

from ossgguf.errors import OssggufError
from ossgguf.gguf.split import SPLIT_COUNT, SPLIT_ID, SPLIT_KEYS, SPLIT_NO, SPLIT_TENSORS, shard_names
from ossgguf.gguf.tensors import Tensor, pad
from ossgguf.gguf.values import DTYPES, KV, kv_i32, kv_str
from ossgguf.limits import FILE_SIZE
from ossgguf.sizes import human_size

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"


@dataclass
class Shard:
    path: Path
    tensors: list[Tensor]
    header: bytes = b""
    offsets: dict[str, int] = field(default_factory=dict)  # absolute file offset of each tensor's data
    size: int = 0


def carried_metadata(kvs: dict[str, KV]) -> dict[str, KV]:
    """A source GGUF's metadata to write again: without the keys the writer sets itself (the split
    keys, an alignment other than its own 32, GGUF's default)."""
    out = {k: v for k, v in kvs.items() if k not in SPLIT_KEYS}
    if ALIGNMENT_KEY in out and int(out[ALIGNMENT_KEY].value) != ALIGNMENT:
        del out[ALIGNMENT_KEY]
    return out


def refuse_inputs(shards: list[Shard], inputs: Iterable[Path], what: str) -> None:
    """OssggufError when an output file is one of the inputs: even --force must not destroy what is read."""
    ins = {Path(p).resolve() for p in inputs}
    clash = [s.path for s in shards if s.path.resolve() in ins]
    if clash:
        raise OssggufError(f"the output {clash[0]} is {what}: write to another path with -o")


def _pack_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _pack_value(t: GGUFValueType, v: Any, sub: GGUFValueType | None) -> bytes:
    if t == GGUFValueType.STRING:
        return _pack_str(v)
    if t == GGUFValueType.ARRAY:
        assert sub is not None
        head = struct.pack("<IQ", sub, len(v))
        if sub == GGUFValueType.STRING:
            return head + b"".join(_pack_str(s) for s in v)
        return head + np.asarray(v, dtype=DTYPES[sub]).tobytes()
    return np.asarray(v, dtype=DTYPES[t]).tobytes()


def _header(kvs: dict[str, KV], tensors: list[Tensor]) -> tuple[bytes, dict[str, int]]:
    parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kvs))]
    for key, kv in kvs.items():
        parts += [_pack_str(key), struct.pack("<I", kv.type), _pack_value(kv.type, kv.value, kv.sub)]
    rel, offsets = 0, {}
    for t in tensors:
        dims = tuple(reversed(t.shape))
        parts += [_pack_str(t.name), struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t.qtype, rel)]
        offsets[t.name] = rel
        rel += pad(t.nbytes, ALIGNMENT)
    head = b"".join(parts)
    return head + b"\0" * (pad(len(head), ALIGNMENT) - len(head)), offsets


def plan_layout(kvs: dict[str, KV], tensors: list[Tensor], out: Path, split_max_size: int | None = None) -> list[Shard]:
    """Assign tensors to shards (each shard file at most split_max_size bytes when possible) and
    compute every header, offset and file size exactly."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise OssggufError(f"duplicate tensor names in output: {', '.join(dup)}")
    FILE_SIZE.check("split_max_size", split_max_size)
    groups: list[list[Tensor]] = [[]]
    # One random id in every shard of this output (the reader refuses a set whose shards disagree):
    # llama.cpp's split keys cannot tell apart shards of two runs with the same layout. Fixed length,
    # so a dry run's sizes are exact; single files do not get it (byte-identical to llama.cpp's).
    split_id = kv_str(uuid.uuid4().hex)
    if split_max_size:
        split_kv = {SPLIT_NO: KV(GGUFValueType.UINT16, 0), SPLIT_COUNT: KV(GGUFValueType.UINT16, 0),
                    SPLIT_TENSORS: kv_i32(0), SPLIT_ID: split_id}
        size = len(_header({**kvs, **split_kv}, [])[0])
        for t in tensors:
            ti = len(_pack_str(t.name)) + 4 + 8 * len(t.shape) + 12
            need = ti + pad(t.nbytes, ALIGNMENT) + ALIGNMENT
            if groups[-1] and size + need > split_max_size:
                groups.append([])
                size = len(_header(split_kv, [])[0])
            groups[-1].append(t)
            size += need
    else:
        groups[0] = list(tensors)
    paths = shard_names(out, len(groups))
    shards = []
    for i, (path, group) in enumerate(zip(paths, groups)):
        meta = dict(kvs) if i == 0 else {}
        if len(groups) > 1:
            meta.update({SPLIT_NO: KV(GGUFValueType.UINT16, i), SPLIT_COUNT: KV(GGUFValueType.UINT16, len(groups)),
                         SPLIT_TENSORS: kv_i32(len(tensors)), SPLIT_ID: split_id})
        header, rel = _header(meta, group)
        size = len(header) + sum(pad(t.nbytes, ALIGNMENT) for t in group)
        shards.append(Shard(path, group, header, {k: len(header) + v for k, v in rel.items()}, size))
    return shards


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


class GGUFFileWriter:
    """Writes the shards of a planned layout. Use as a context manager: on any exception (Ctrl-C
    included) the temporary files are removed; `commit()` makes the output appear atomically."""

    def __init__(self, shards: list[Shard], force: bool = False):
        self.shards = shards
        self.force = force
        self._fds: list[int] = []
        self._where: dict[str, tuple[int, int]] = {}
        self._committed = False

    def __enter__(self) -> GGUFFileWriter:
        for s in self.shards:
            if s.path.exists() and not self.force:
                raise OssggufError(f"{s.path} already exists: pass --force to overwrite it")
        need = sum(s.size for s in self.shards)
        target = self.shards[0].path.parent
        if not target.is_dir():
            raise OssggufError(f"output folder {target} does not exist")
        try:
            for s in self.shards:
                tmp = partial_path(s.path)
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                self._allocate(fd, s.size, need, target)
                # The magic goes in last (commit): a partial file never starts with "GGUF".
                os.pwrite(fd, b"\0\0\0\0" + s.header[4:], 0)
                for name, off in s.offsets.items():
                    self._where[name] = (fd, off)
        except BaseException:
            self._cleanup()
            raise
        return self

    @staticmethod
    def _allocate(fd: int, size: int, need: int, target: Path) -> None:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                free = shutil.disk_usage(target).free
                raise OssggufError(
                    f"not enough disk space in {target}: the output needs {human_size(need)}, "
                    f"{human_size(free)} are free; free some space or write elsewhere with -o"
                ) from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.ftruncate(fd, size)  # file systems without fallocate: writes still fill every byte

    def write(self, name: str, data: np.ndarray | bytes | memoryview, offset: int = 0) -> int:
        fd, base = self._where[name]
        view = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else memoryview(
            np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        pos, done = base + offset, 0
        try:
            while done < len(view):
                done += os.pwrite(fd, view[done:], pos + done)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OssggufError("the disk filled up while writing the output: free some space and run again") from None
            raise
        return done

    def commit(self) -> None:
        for fd, s in zip(self._fds, self.shards):
            os.pwrite(fd, s.header[:4], 0)
            os.fsync(fd)
        # Rename the first shard last: it is the one llama.cpp and users open.
        for s in reversed(self.shards):
            os.replace(partial_path(s.path), s.path)
        dfd = os.open(self.shards[0].path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._committed = True

    def _cleanup(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        if not self._committed:
            for s in self.shards:
                partial_path(s.path).unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        self._cleanup()

