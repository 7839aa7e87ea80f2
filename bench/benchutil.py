"""What the benchmarks share: one synthetic source (a checkpoint and its GGUF with gpt-oss's real
shapes, made once in the workdir and reused by every benchmark) and one way to time (a child's wall
time and peak RSS from a cold page cache, best of interleaved rounds against `cp` of the same bytes,
or an in-process function's best wall and CPU time)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

# ossgguf is imported inside the functions: a timed child that imports this module stays as small as it was.

# --- the synthetic source ------------------------------------------------------------------------


def need_free(workdir: Path, nbytes: int, what: str) -> None:
    free = shutil.disk_usage(workdir).free
    if free < nbytes:
        raise SystemExit(f"needs {nbytes / 1e9:.1f} GB free in {workdir} ({what}), has {free / 1e9:.1f} GB")


def synthetic_checkpoint(workdir: Path, model: str = "20b", layers: int | None = None, layout: str = "mxfp4",
                         sparse: bool = False, room: int = 0) -> tuple[Path, bool]:
    """workdir/synthetic-<model>[-<layout>][-<N>l]: a checkpoint of the model's real shapes (random data),
    reused when there; `room` bytes must stay free beside it. Returns it and whether this call made it."""
    from ossgguf.fixtures.synthetic import checkpoint_bytes, make_synthetic

    tag = f"{model}{'-' + layout if layout != 'mxfp4' else ''}{f'-{layers}l' if layers else ''}"
    ckpt = workdir / f"synthetic-{tag}"
    if (ckpt / "config.json").is_file():
        need_free(workdir, room, "the outputs")
        return ckpt, False
    need = checkpoint_bytes(model, layers, layout)
    need_free(workdir, need + room, "the synthetic checkpoint and the outputs")
    print(f"writing a synthetic {tag} checkpoint ({need / 1e9:.1f} GB) to {ckpt} ...", flush=True)
    make_synthetic(ckpt, model, sparse=sparse, layers=layers, layout=layout)
    return ckpt, True


def synthetic_gguf(workdir: Path, room: int = 0) -> tuple[Path, bool]:
    """workdir/synthetic-20b-mxfp4.gguf: the synthetic 20b checkpoint converted with the default recipe,
    reused when there (a checkpoint this call makes for it is removed again). Returns it and whether
    this call made it."""
    from ossgguf.convert.convert import convert
    from ossgguf.fixtures.synthetic import checkpoint_bytes

    gguf = workdir / "synthetic-20b-mxfp4.gguf"
    if gguf.is_file():
        need_free(workdir, room, "the outputs")
        return gguf, False
    need = checkpoint_bytes("20b")
    ckpt, made = synthetic_checkpoint(workdir, room=need + need // 20 + room)
    print(f"converting it to {gguf} ...", flush=True)
    convert(ckpt, gguf, force=True)
    if made:
        shutil.rmtree(ckpt)
    return gguf, True


# --- timing ----------------------------------------------------------------------------------------


def drop_caches() -> bool:
    """Sync and drop the page cache (root only), so the next run reads from disk; False if not allowed."""
    subprocess.run(["sync"])
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds (sync included, so written data is on disk) and peak RSS in bytes of a child."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, ru = os.wait4(proc.pid, 0)
    subprocess.run(["sync"])
    dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return dt, ru.ru_maxrss * 1024


def copy_seconds(files: list[Path], workdir: Path) -> float:
    """`cp` of `files` plus sync from a cold cache (where allowed): the disk-bound benchmarks' baseline."""
    dst = workdir / "cp-copy"
    dst.mkdir(exist_ok=True)
    drop_caches()
    try:
        return timed(["cp", "--sparse=never", *map(str, files), str(dst)])[0]
    finally:
        shutil.rmtree(dst)


def versus_copy(src: Path, cmd: list[str], rounds: int, workdir: Path) -> tuple[float, float, int]:
    """`cp` of `src` and the child `cmd`, in interleaved rounds (a noisy neighbour hurts both alike), each
    from a cold cache: (best cp seconds, best cmd seconds, cmd's peak RSS)."""
    t_cp, t_cmd, rss = float("inf"), float("inf"), 0
    for _ in range(rounds):
        t_cp = min(t_cp, copy_seconds([src], workdir))
        drop_caches()
        t, r = timed(cmd)
        t_cmd, rss = min(t_cmd, t), max(rss, r)
    return t_cp, t_cmd, rss


def cache_note() -> str:
    """What the cold-cache runs were: said beside every disk-bound result."""
    return "" if drop_caches() else " (page cache not dropped: not root)"


def best_time(fn: Callable[[], object], rounds: int, warm: bool = True) -> tuple[float, float]:
    """(wall, cpu) seconds of the fastest of `rounds` in-process runs; cpu/wall shows the cores really used."""
    if warm:
        fn()  # page faults, tables, library load
    best = (float("inf"), 0.0)
    for _ in range(rounds):
        t, c = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - t, time.process_time() - c))
    return best
