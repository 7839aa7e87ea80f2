"""The memory a plan may use: system RAM and the accelerators llama.cpp places layers on, in its order.

One `Device` per accelerator, so that a plan can split layers across 2-8 GPUs (llama.cpp's
`tensor_split`) and take remote devices (RPC workers, which carry a `host`) the same way. The order
is llama.cpp's own (src/llama.cpp, default device selection): RPC servers first, then discrete GPUs,
then integrated GPUs only when there is no discrete one; CPU and accelerator (BLAS) devices are not
layer devices.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ossgguf.errors import OssggufError

log = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class Device:
    """One device layers can live on. `total`/`free` in bytes (free: None when given, not measured)."""

    name: str  # llama.cpp's name (CUDA0, Metal, Vulkan1, RPC0[host:port]), or GPU0.. when given
    total: int
    free: int | None = None
    kind: str = "gpu"  # gpu, igpu (shares system RAM), rpc
    host: str | None = None  # an RPC worker's host:port; None: this machine
    description: str = ""

    @property
    def budget(self) -> int:
        # driver context, cuBLAS/Metal workspaces, the desktop and fragmentation live outside our buffers
        return max(0, self.total - (768 * MiB + self.total // 20))

    @property
    def label(self) -> str:
        return f"{self.name} ({self.description})" if self.description and self.description != self.name else self.name


@dataclass(frozen=True)
class Devices:
    """System RAM and the layer devices, in llama.cpp's order. On unified memory (Apple) the one
    local device's total is the GPU working-set limit (macOS wires ~75% of RAM by default) and every
    byte placed on it also counts in RAM (RPC workers' devices have their own memory)."""

    ram_total: int
    gpus: tuple[Device, ...] = ()
    unified: bool = False
    source: str = "given"

    @classmethod
    def one(cls, ram_total: int, gpu_total: int = 0, gpu_name: str = "GPU", unified: bool = False,
            source: str = "given") -> Devices:
        """RAM and at most one GPU (none when gpu_total is 0)."""
        gpus = (Device(gpu_name or "GPU", gpu_total, kind="igpu" if unified else "gpu"),) if gpu_total else ()
        return cls(ram_total=ram_total, gpus=gpus, unified=unified, source=source)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def gpu_total(self) -> int:
        return sum(g.total for g in self.gpus)

    @property
    def gpu_budget(self) -> int:
        return sum(g.budget for g in self.gpus)

    @property
    def gpu_name(self) -> str:
        return ", ".join(g.label for g in self.gpus)

    @property
    def ram_budget(self) -> int:
        # the OS and the user's other programs keep at least 4 GiB or 10% of RAM
        return max(0, self.ram_total - max(4 * GiB, self.ram_total // 10))


def system_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        import psutil

        return int(psutil.virtual_memory().total)


_RPC_HOST = re.compile(r"^RPC\d*\[(.+)\]$")  # llama.cpp names a worker RPC<i>[host:port]


def llama_devices() -> list[Device]:
    """The devices llama.cpp would place layers on, in the order it uses them (src/llama.cpp)."""
    from .llama_ctypes import backend_devices

    rpc, gpus, igpus = [], [], []
    for d in backend_devices():
        if d.name.startswith("RPC"):  # RPC<i>, described by its endpoint (or named RPC<i>[host:port])
            host = _RPC_HOST.match(d.name)
            rpc.append(Device(d.name, d.total, d.free, "rpc", host.group(1) if host else d.description or None,
                              d.description))
        elif d.kind == "gpu":
            gpus.append(Device(d.name, d.total, d.free, "gpu", None, d.description))
        elif d.kind == "igpu":
            igpus.append(Device(d.name, d.total, d.free, "igpu", None, d.description))
    return rpc + gpus + (igpus if not gpus else [])


def resolve_devices(gpu_mem: int | Sequence[int] | None = None, ram: int | None = None, unified: int | None = None,
                    detect: bool = True) -> Devices:
    """Devices from the options; what is not given is detected (llama.cpp's device list, system RAM).
    `gpu_mem`: one size, or one per GPU (`--gpu-mem 24GiB,24GiB`), 0 meaning no GPU; or sizes of
    named devices among those detected ((name or worker HOST:PORT, size) pairs), the rest as detected."""
    if gpu_mem and isinstance(gpu_mem, (tuple, list)) and isinstance(gpu_mem[0], (tuple, list)):
        found = resolve_devices(None, ram, unified, detect)
        return replace(found, gpus=named_sizes(found.gpus, dict(gpu_mem)))
    sizes = [gpu_mem] if isinstance(gpu_mem, int) else list(gpu_mem) if gpu_mem is not None else None
    if sizes is not None and len(sizes) > 1 and (unified or 0 in sizes):
        raise OssggufError("--gpu-mem: a list of GPU sizes takes no 0 and no --unified (one device)")
    if unified:
        ws = sizes[0] if sizes else unified * 3 // 4
        return Devices.one(unified, ws, "unified GPU", unified=True)
    ram_total = ram or system_ram()
    if sizes is not None:
        return Devices(ram_total=ram_total, gpus=tuple(Device(f"GPU{i}" if len(sizes) > 1 else "GPU", s)
                                                      for i, s in enumerate(sizes) if s))
    if not detect:
        return Devices(ram_total=ram_total)
    gpus = llama_devices()
    # Metal reports its working-set limit as the device's memory; an iGPU shares RAM as well (workers' not ours)
    local = [g for g in gpus if g.kind != "rpc"]
    shared = bool(local) and all(g.kind == "igpu" or (sys.platform == "darwin" and g.kind == "gpu") for g in local)
    return Devices(ram_total=ram_total, gpus=tuple(gpus), unified=shared and len(local) == 1, source="detected")


def named_sizes(gpus: Sequence[Device], sizes: dict[str, int]) -> tuple[Device, ...]:
    """The detected devices with the memory given for some of them, by llama.cpp's name or a worker's
    HOST:PORT (a worker's RAM is not all free for layers; a GPU may be shared with the desktop)."""
    known = {g.name for g in gpus} | {g.host for g in gpus if g.host}
    if unknown := [n for n in sizes if n not in known]:
        raise OssggufError(f"--gpu-mem: no device {', '.join(unknown)}; llama.cpp sees "
                           + (", ".join(g.name for g in gpus) or "no GPU and no worker (is --rpc given?)"))
    return tuple(replace(g, total=sizes[g.host if g.host in sizes else g.name], free=None)
                 if g.name in sizes or g.host in sizes else g for g in gpus)


def tensor_split(split: Sequence[int], devices: Devices) -> ctypes.Array | None:
    """llama_model_params.tensor_split for a plan's layers per GPU (llama.cpp normalises it and gives
    layer il to the first device whose cumulative share exceeds il/(n_layer+1): integer counts place
    exactly those layers). None for one GPU, or when llama.cpp's devices are not the plan's (sizes
    given for another count of GPUs): llama.cpp then splits by free memory, as it does by default."""
    if len(split) < 2:
        return None
    found = [d.name for d in llama_devices()]
    mine = [g.name for g in devices.gpus]
    # given sizes (--gpu-mem 20GiB,20GiB) stand for llama.cpp's devices in its order
    if found != mine and not (devices.source == "given" and len(found) == len(mine)):
        log.warning("the plan splits layers over %d GPUs (%s), llama.cpp sees %s: it splits by free memory",
                    len(mine), ", ".join(mine), ", ".join(found) or "none")
        return None
    arr = (ctypes.c_float * 16)()  # llama_max_devices()
    for i, n in enumerate(split):
        arr[i] = float(n)
    return arr


# --- layers over devices (llama.cpp's layer split is contiguous, in the devices' order) ----------


def layer_split(need: list[int], caps: list[int]) -> tuple[int, ...] | None:
    """Layers per device, in order (llama.cpp's layer split is contiguous), so that each device's
    layers fit its capacity, as evenly filled as possible; None when no split fits."""
    def fill(frac: float) -> list[int] | None:
        counts, i = [], 0
        for cap in caps:
            used, start = 0, i
            while i < len(need) and used + need[i] <= cap * frac:
                used += need[i]
                i += 1
            counts.append(i - start)
        return counts if i == len(need) else None

    if fill(1.0) is None:
        return None
    lo, hi = 0.0, 1.0  # the smallest fill fraction that still places every layer: the most headroom everywhere
    for _ in range(24):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fill(mid) is not None else (mid, hi)
    return tuple(fill(hi))


def local_first_split(need: list[int], caps: list[int], remote: list[bool]) -> tuple[int, ...] | None:
    """With RPC workers (first in llama.cpp's order) and local GPUs (last): the local GPUs take as many
    of the last layers as they hold, since a layer there costs no network and a local GPU is usually
    the fastest memory; the workers share the rest evenly. None without both kinds, or when the
    workers cannot hold the rest."""
    n_remote = sum(remote)
    if not 0 < n_remote < len(caps) or remote != sorted(remote, reverse=True):
        return None
    local, end = [], len(need)
    for cap in reversed(caps[n_remote:]):  # from the output layer back, the last GPU first
        used, start = 0, end
        while start > 0 and used + need[start - 1] <= cap:
            start -= 1
            used += need[start]
        local.insert(0, end - start)
        end = start
    rest = layer_split(need[:end], caps[:n_remote]) if end else (0,) * n_remote
    return None if rest is None else tuple(rest) + tuple(local)


def need_of(need: list[int], split: tuple[int, ...], i: int) -> int:
    start = sum(split[:i])
    return sum(need[start:start + split[i]])


def proportional_split(n: int, weights: list[int]) -> tuple[int, ...]:
    """n layers in proportion to `weights` (llama.cpp's default split is by free memory)."""
    total = sum(weights) or 1
    bounds = [round(n * sum(weights[:i + 1]) / total) for i in range(len(weights))]
    return tuple(b - a for a, b in zip([0] + bounds[:-1], bounds))
