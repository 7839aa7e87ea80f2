"""The streaming write loop of every command that writes a GGUF (convert, quantize, prune).

A task reads one slice of a source (a run of rows, one expert) with pread and returns the output
bytes it makes, as (tensor name, byte offset in the tensor, data) chunks; a small thread pool runs
the tasks (reads and numpy release the GIL) and each chunk is written with pwrite where the planned
layout puts it. Memory is bounded by the slices in flight, whatever the model size, and nothing is
mapped, so what was read is not counted in RSS either.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ossgguf.errors import OssggufError
from ossgguf.gguf.write import GGUFFileWriter, Shard

Chunk = tuple[str, int, np.ndarray]
Task = Callable[[], list[Chunk]]


class FileReader:
    """Byte ranges of source files, read with pread: one descriptor per file, opened before the
    tasks run on threads, and the pages dropped from the page cache once read (a read-once stream)."""

    def __init__(self, paths: Iterable[Path]):
        self.paths = sorted(set(paths))
        self._fds: dict[Path, int] = {}

    def __enter__(self) -> FileReader:
        for path in self.paths:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):  # sequential read-once access: little read-ahead kept around
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, path: Path, offset: int, nbytes: int, what: str = "") -> np.ndarray:
        """`nbytes` bytes of `path` from `offset`, as uint8 (OssggufError when the file ends early)."""
        out = np.empty(nbytes, dtype=np.uint8)
        view, fd, done = memoryview(out), self._fds[path], 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OssggufError(f"{path} ended early while reading {what or 'it'}: the file is truncated")
            done += n
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        return out


def pipelined(tasks: Iterable[Task], workers: int) -> Iterator[Chunk]:
    """Run tasks on a thread pool, results in order, at most 2 x workers slices in flight (which
    bounds memory)."""
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ossgguf-stream") as ex:
        try:
            for task in tasks:
                pending.append(ex.submit(task))
                if len(pending) >= 2 * workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def stream_write(shards: list[Shard], tasks: Iterable[Task], *, force: bool = False,
                 progress: Callable[[int], None] | None = None) -> int:
    """Write the planned shards from the chunks the tasks return; the files appear only when every
    planned byte is written. Returns the tensor bytes written."""
    planned = sum(t.nbytes for s in shards for t in s.tensors)
    written = 0
    with GGUFFileWriter(shards, force=force) as w:
        for name, off, data in pipelined(tasks, os.cpu_count() or 2):
            n = w.write(name, data, off)
            written += n
            if progress:
                progress(n)
        if written != planned:
            raise OssggufError(f"internal error: wrote {written} bytes of tensor data, planned {planned}")
        w.commit()
    return written
