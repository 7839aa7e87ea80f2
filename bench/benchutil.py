"""Helpers the disk-bound benchmarks share: cold page cache, and a child's wall time and peak RSS."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


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
