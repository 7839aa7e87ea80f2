"""Memory planner: where each byte of a gpt-oss GGUF goes (GPU, system RAM) for a context size.

Reads headers only (ossgguf.gguf.read: nothing mapped, so sparse files and 60 GB shards are cheap),
models llama.cpp 0.3.36's buffers (weights per buffer type, the iSWA KV cache, the compute buffer by
replaying the gpt-oss graph through ggml-alloc's allocator) and picks the placement: all on the GPU,
the experts of the first N layers in RAM (`--n-cpu-moe N`), all experts in RAM, or CPU only.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ossgguf import limits
from ossgguf.errors import OssggufError
from ossgguf.gguf.read import GgufSet, read_gguf
from ossgguf.gguf.tensors import FLOAT_TYPES, Q, Tensor, pad, tensor_bytes
from ossgguf.limits import DEFAULT_CTX, UBATCH_DEFAULT, UBATCH_OFFLOAD
from ossgguf.model import HParams, Offload, TensorClass, expert_offload, layer_of, read_hparams, tensor_class
from ossgguf.sizes import parse_size as _parse_size

from .plan_graph import compute_buffer_bytes

log = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2
CPU_ALIGN, GPU_ALIGN = 32, 128  # ggml CPU (TENSOR_ALIGNMENT) and CUDA buffer alignment


# --- the model ---------------------------------------------------------------------------------------


# A name's class and layer, asked of ossgguf.model once per name: the search asks them thousands of times.
_class = functools.cache(tensor_class)
_layer = functools.cache(layer_of)


@dataclass(frozen=True)
class ModelInfo(HParams):
    """What the planner needs from a gpt-oss GGUF (all shards): its hyperparameters and tensors."""

    path: Path
    files: tuple[Path, ...]
    file_bytes: int
    tensors: tuple[Tensor, ...] = field(repr=False)

    def bytes_where(self, cls: TensorClass | None = None, layers: range | None = None,
                    align: int = 1) -> int:
        """Sum of tensor bytes (each padded to `align`, as a backend buffer lays them out)."""
        return sum(pad(t.nbytes, align) for t in self.tensors
                   if (cls is None or _class(t.name) == cls) and (layers is None or _layer(t.name) in layers))

    def expert_weights(self, layer: int) -> list[Tensor]:
        return [t for t in self.tensors if _layer(t.name) == layer and _class(t.name) == TensorClass.EXPERT]

    def type_summary(self, cls: TensorClass) -> str:
        return "/".join(sorted({t.qtype.name for t in self.tensors if _class(t.name) == cls})) or "-"


def read_model(path: str | Path) -> ModelInfo:
    """Tensor infos and the hyperparameters the byte model needs, from a gpt-oss GGUF's headers."""
    return model_info(read_gguf(path))


def model_info(g: GgufSet) -> ModelInfo:
    """ModelInfo of a GGUF whose headers are read already (one header reader: ossgguf.gguf.read)."""
    hp = read_hparams(g)
    for t in g.tensors:
        _class(t.name)  # OssggufError for a tensor gpt-oss does not have
    files = tuple(f.path for f in g.files)
    return ModelInfo(**vars(hp), path=files[0], files=files, file_bytes=g.size, tensors=tuple(g.tensors))


# --- devices -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Devices:
    """The memory the plan may use. `gpu_total` is 0 without a GPU; on unified memory (Apple) it is
    the GPU working-set limit (macOS wires ~75% of RAM by default) and every byte also counts in RAM."""

    ram_total: int
    gpu_total: int = 0
    gpu_name: str = ""
    unified: bool = False
    source: str = "given"

    @property
    def has_gpu(self) -> bool:
        return self.gpu_total > 0

    @property
    def gpu_budget(self) -> int:
        # driver context, cuBLAS/Metal workspaces, the desktop and fragmentation live outside our buffers
        return max(0, self.gpu_total - (768 * MiB + self.gpu_total // 20)) if self.has_gpu else 0

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


def resolve_devices(gpu_mem: int | None = None, ram: int | None = None, unified: int | None = None,
                    detect: bool = True) -> Devices:
    """Devices from the options; what is not given is detected (llama.cpp's device list, system RAM)."""
    if unified:
        ws = gpu_mem or unified * 3 // 4
        return Devices(ram_total=unified, gpu_total=ws, gpu_name="unified GPU", unified=True)
    ram_total = ram or system_ram()
    if gpu_mem is not None:
        return Devices(ram_total=ram_total, gpu_total=gpu_mem, gpu_name="GPU" if gpu_mem else "")
    if not detect:
        return Devices(ram_total=ram_total)
    from .llama_ctypes import backend_devices

    gpus = [d for d in backend_devices() if d.kind in ("gpu", "igpu")]
    if not gpus:
        return Devices(ram_total=ram_total, source="detected")
    g = gpus[0]  # one GPU: splitting layers across GPUs is not planned here
    # Metal reports its working-set limit as the device's memory; an iGPU shares RAM as well
    return Devices(ram_total=ram_total, gpu_total=g.total, gpu_name=g.description or g.name,
                   unified=sys.platform == "darwin" or g.kind == "igpu", source="detected")


def parse_size(text: str | int) -> int:
    """A memory size: '24G' and '24GiB' are binary, '24GB' decimal; 0 (as in --gpu-mem 0: no GPU) is allowed."""
    return _parse_size(text, bare_unit_base=1024)


# --- the compute buffer (plan_graph replays llama.cpp's graph allocation) ----------------------------


@functools.lru_cache(maxsize=256)
def _compute(*args) -> int:
    return compute_buffer_bytes(*args)


# --- one placement ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlacementOptions:
    """Options shared by plan/run/chat/serve (CLI flags of the same names); None lets the planner decide."""

    gpu_mem: int | None = None  # --gpu-mem: GPU memory in bytes (0: no GPU); default: ask llama.cpp
    ram: int | None = None  # --ram: system RAM in bytes; default: the machine's
    unified: int | None = None  # --unified: Apple-style memory of this size, GPU working set 75% (or gpu_mem)
    cpu_moe: bool = False  # --cpu-moe: all experts in RAM
    n_cpu_moe: int | None = None  # --n-cpu-moe N: the experts of layers 0..N-1 in RAM
    ctx: int | None = None  # --ctx: context tokens; default min(65536, the model's)
    ubatch: int | None = None  # --ubatch: prompt batch; default 2048 with experts in RAM, else 512
    threads: int | None = None  # --threads: default the physical cores
    flash_attn: bool = True  # no n_ctx x batch x heads score matrix; llama.cpp supports gpt-oss sinks in it
    op_offload: bool = True  # prompt batches stream RAM-resident experts through the GPU
    verbose: bool = False  # -v: llama.cpp's whole log (debug lines too) on stderr

    def __post_init__(self) -> None:  # the CLI checks the same limits; other callers get this message
        for name, limit in (("ctx", limits.CTX), ("ubatch", limits.UBATCH), ("threads", limits.THREADS),
                            ("n_cpu_moe", limits.N_CPU_MOE), ("gpu_mem", limits.GPU_MEM), ("ram", limits.MEMORY),
                            ("unified", limits.MEMORY)):
            limit.check(name, getattr(self, name))


@dataclass(frozen=True)
class Buffer:
    device: str  # "gpu" or "cpu"
    kind: str  # model, kv, compute
    bytes: int
    what: str


@dataclass
class Plan:
    fits: bool
    placement: str  # gpu, hybrid, cpu, none
    n_cpu_moe: int
    n_ctx: int
    n_ubatch: int
    flash_attn: bool
    op_offload: bool
    gpu_bytes: int
    cpu_bytes: int
    kv_bytes: int
    compute_bytes: int
    overrides: list[Offload]  # experts kept in RAM
    buffers: list[Buffer]
    devices: Devices
    model: ModelInfo = field(repr=False)
    notes: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def gpu_layers(self) -> int:
        """llama.cpp's n_gpu_layers: all of them, or none for a CPU-only plan."""
        return 0 if self.placement in ("cpu",) or not self.devices.has_gpu else self.model.n_layer + 1

    def to_json(self) -> dict:
        return {
            "fits": self.fits, "n_cpu_moe": self.n_cpu_moe, "gpu_bytes": self.gpu_bytes,
            "cpu_bytes": self.cpu_bytes, "kv_bytes": self.kv_bytes, "compute_bytes": self.compute_bytes,
            "overrides": [str(o) for o in self.overrides], "notes": self.notes, "placement": self.placement,
            "n_ctx": self.n_ctx, "n_ubatch": self.n_ubatch, "flash_attn": self.flash_attn,
            "gpu_budget": self.devices.gpu_budget, "ram_budget": self.devices.ram_budget,
            "unified": self.devices.unified,
            "buffers": [{"device": b.device, "kind": b.kind, "bytes": b.bytes, "what": b.what}
                        for b in self.buffers],
        }


def kv_cells(model: ModelInfo, n_ctx: int, n_ubatch: int) -> tuple[int, int]:
    """(full-attention cells, sliding-window cells) as llama.cpp 0.3.36 sizes them (swa_full=False)."""
    full = pad(n_ctx, 256)
    swa = min(full, pad(model.n_swa + min(n_ubatch, full), 256))
    return full, swa


def kv_bytes(model: ModelInfo, n_ctx: int, n_ubatch: int, type_size: int = 2) -> int:
    """f16 K and V for every layer: full layers grow with the context, SWA layers keep window + ubatch."""
    full, swa = kv_cells(model, n_ctx, n_ubatch)
    per_cell = model.n_head_kv * (model.head_dim_k + model.head_dim_v) * type_size
    return sum((swa if is_swa else full) * per_cell for is_swa in model.swa_layers)


def estimate(model: ModelInfo, devices: Devices, n_ctx: int, n_cpu_moe: int, *, n_ubatch: int | None = None,
             gpu: bool = True, flash_attn: bool = True, op_offload: bool = True,
             n_outputs: int = 1) -> Plan:
    """Bytes per device for one placement: experts of layers 0..n_cpu_moe-1 in RAM (gpu=True), or
    everything in RAM (gpu=False). Does not judge fit beyond filling `fits`."""
    use_gpu = gpu and devices.has_gpu
    n_cpu_moe = max(0, min(n_cpu_moe, model.n_layer)) if gpu else model.n_layer
    ub = min(n_ubatch or (UBATCH_OFFLOAD if use_gpu and n_cpu_moe > 0 else UBATCH_DEFAULT), n_ctx)
    cpu_layers = range(n_cpu_moe)
    g_align = GPU_ALIGN if use_gpu else CPU_ALIGN
    bufs: list[Buffer] = []
    embd = model.bytes_where(TensorClass.EMBEDDING, align=CPU_ALIGN)
    if use_gpu:
        cpu_exp = model.bytes_where(TensorClass.EXPERT, cpu_layers, CPU_ALIGN)
        gpu_w = sum(pad(t.nbytes, g_align) for t in model.tensors if _class(t.name) != TensorClass.EMBEDDING
                    and not (_class(t.name) == TensorClass.EXPERT and _layer(t.name) in cpu_layers))
        bufs.append(Buffer("cpu", "model", embd, "token embeddings (llama.cpp keeps the input layer in RAM)"))
        if cpu_exp:
            bufs.append(Buffer("cpu", "model", cpu_exp, f"experts of layers 0-{n_cpu_moe - 1}"))
        bufs.append(Buffer("gpu", "model", gpu_w, "attention, router, norms, output"
                           + (f", experts of layers {n_cpu_moe}-{model.n_layer - 1}"
                              if n_cpu_moe < model.n_layer else "")))
    else:
        exp = model.bytes_where(TensorClass.EXPERT, align=CPU_ALIGN)
        bufs += [Buffer("cpu", "model", exp, "experts (CPU_REPACK where the CPU repacks MXFP4)"),
                 Buffer("cpu", "model", model.bytes_where(align=CPU_ALIGN) - exp, "other weights")]
    kv = kv_bytes(model, n_ctx, ub)
    full, swa = kv_cells(model, n_ctx, ub)
    bufs.append(Buffer("gpu" if use_gpu else "cpu", "kv", kv, f"f16 K/V: {full} cells full, {swa} sliding"))
    n_out = min(ub, n_outputs)
    copies = ([max(t.nbytes for t in model.expert_weights(i)) for i in cpu_layers]
              if use_gpu and op_offload and ub >= 32 else [])
    comp = _compute(model, ub, n_out, full, swa, flash_attn, g_align, max(copies, default=0))
    out_buf = model.n_vocab * 4 * n_out  # llama.cpp's host output buffer (logits of the last tokens)
    if use_gpu:
        host = model.n_embd * ub * 4 + ub * 4 + out_buf  # embeddings are looked up on the CPU
        bufs += [Buffer("gpu", "compute", comp, f"graph for {ub}-token batches"),
                 Buffer("cpu", "compute", host, "input embeddings, logits")]
    else:
        bufs.append(Buffer("cpu", "compute", comp + out_buf, f"graph for {ub}-token batches, logits"))
    # overrides follow the request even without a GPU: llama.cpp then logs them, placing nothing elsewhere
    overrides = [expert_offload(None if n_cpu_moe == model.n_layer else range(n_cpu_moe))] if gpu and n_cpu_moe > 0 else []
    placement = "cpu" if not use_gpu else "gpu" if n_cpu_moe == 0 else "hybrid"
    gpu_bytes = sum(b.bytes for b in bufs if b.device == "gpu")
    cpu_bytes = sum(b.bytes for b in bufs if b.device == "cpu")
    return Plan(fits=False, placement=placement, n_cpu_moe=n_cpu_moe, n_ctx=n_ctx, n_ubatch=ub,
                flash_attn=flash_attn, op_offload=op_offload, gpu_bytes=gpu_bytes, cpu_bytes=cpu_bytes,
                kv_bytes=kv, compute_bytes=sum(b.bytes for b in bufs if b.kind == "compute"),
                overrides=overrides, buffers=bufs, devices=devices, model=model)


def _check(p: Plan) -> Plan:
    """Fill fits/notes: every byte within its device's budget (unified: all of them within RAM too)."""
    d = p.devices
    ram_need = p.cpu_bytes + (p.gpu_bytes if d.unified else 0)
    gpu_ok = p.gpu_bytes <= d.gpu_budget
    ram_ok = ram_need <= d.ram_budget
    p.fits = gpu_ok and ram_ok
    if not gpu_ok:
        p.notes.append(f"GPU: needs {_gb(p.gpu_bytes)}, budget {_gb(d.gpu_budget)} of {_gb(d.gpu_total)}"
                       + (" (the GPU working set of unified memory)" if d.unified else ""))
    if not ram_ok:
        p.notes.append(f"RAM: needs {_gb(ram_need)}, budget {_gb(d.ram_budget)} of {_gb(d.ram_total)}: "
                       "running anyway would rely on the OS paging weights from disk (mmap), "
                       "which is not fitting")
    return p


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


# --- choosing ----------------------------------------------------------------------------------------


def plan(model: ModelInfo | str | Path, options: PlacementOptions | None = None,
         devices: Devices | None = None) -> Plan:
    """Choose the placement for a model, the devices and a context size.

    With a GPU: all on the GPU if it fits, else the smallest N whose non-expert weights, KV cache and
    compute buffer fit on the GPU with the experts of layers 0..N-1 in RAM; else CPU only. Options
    `cpu_moe`/`n_cpu_moe` force a placement (the plan then says whether it fits).
    """
    o = options or PlacementOptions()
    m = model if isinstance(model, ModelInfo) else read_model(model)
    d = devices or resolve_devices(o.gpu_mem, o.ram, o.unified)
    n_ctx = o.ctx or min(DEFAULT_CTX, m.n_ctx_train)
    if n_ctx > m.n_ctx_train:
        raise OssggufError(f"context {n_ctx} is larger than the model's {m.n_ctx_train} tokens: "
                           f"use --ctx {m.n_ctx_train} or less")
    kw = dict(n_ubatch=o.ubatch, flash_attn=o.flash_attn, op_offload=o.op_offload)
    forced = m.n_layer if o.cpu_moe else o.n_cpu_moe
    if forced is not None:
        p = _check(estimate(m, d, n_ctx, forced, **kw))
        p.reason = f"placement given: experts of {p.n_cpu_moe} of {m.n_layer} layers in RAM"
    else:
        p = _choose(m, d, n_ctx, kw)
    if not o.ctx:
        p.notes.append(f"context {n_ctx} tokens (default; --ctx up to {m.n_ctx_train})")
    if not o.flash_attn:
        p.notes.append("flash attention off: the compute buffer holds a context x batch x heads score matrix")
    if not p.fits:
        p.notes.extend(alternatives(m, d, n_ctx, kw))
    return p


def _choose(m: ModelInfo, d: Devices, n_ctx: int, kw: dict) -> Plan:
    if d.has_gpu:
        for n in range(m.n_layer + 1):
            p = estimate(m, d, n_ctx, n, **kw)
            if p.gpu_bytes <= d.gpu_budget:
                _check(p)
                if p.fits:
                    p.reason = ("everything fits on the GPU" if n == 0 else
                                "all experts in RAM, attention and KV cache on the GPU"
                                if n == m.n_layer else
                                f"the experts of layers 0-{n - 1} in RAM, the rest on the GPU "
                                f"(N={n - 1} does not fit the GPU)")
                    return p
                break  # more experts in RAM only needs more RAM
    cpu = _check(estimate(m, d, n_ctx, m.n_layer, gpu=False, **kw))
    if cpu.fits:
        cpu.reason = "CPU only: " + ("no GPU" if not d.has_gpu else "the GPU cannot hold even the attention")
        return cpu
    best = _check(estimate(m, d, n_ctx, m.n_layer, **kw)) if d.has_gpu else cpu
    best.placement = "none"
    best.reason = "does not fit these devices"
    return best


def alternatives(m: ModelInfo, d: Devices, n_ctx: int, kw: dict) -> list[str]:
    """What would fit instead: a smaller context, a smaller recipe, a pruned model."""
    out = []
    for ctx in (65536, 32768, 16384, 8192, 4096):
        if ctx < n_ctx and _choose(m, d, ctx, kw).fits:
            out.append(f"fits with --ctx {ctx}")
            break
    # RAM short by this much with every expert in RAM (the placement needing the least GPU)
    least = estimate(m, d, n_ctx, m.n_layer, gpu=d.has_gpu, **kw)
    short = least.cpu_bytes + (least.gpu_bytes if d.unified else 0) - d.ram_budget
    wide = [t for t in m.tensors if t.qtype in FLOAT_TYPES
            and _class(t.name) in (TensorClass.ATTENTION, TensorClass.EMBEDDING, TensorClass.OUTPUT)]
    if wide:
        saving = sum(t.nbytes - tensor_bytes(Q.Q8_0, t.shape) for t in wide)
        out.append(f"the mxfp4-q8 recipe (Q8_0 attention, embeddings and head) saves {_gb(saving)}"
                   + (" and would fit" if 0 < short <= saving else ""))
    exp = m.bytes_where(TensorClass.EXPERT)
    if any(t.qtype != Q.MXFP4 for t in m.tensors if _class(t.name) == TensorClass.EXPERT):
        out.append(f"the mxfp4 recipe keeps the experts at 4.25 bits per weight ({_gb(exp)} now)")
    if short > 0 and exp:
        keep = int(m.n_expert * (1 - short / exp))
        if keep >= m.n_expert_used:
            out.append(f"a model pruned to at most {keep} of {m.n_expert} experts per layer would fit")
    return out


# --- the report --------------------------------------------------------------------------------------


def format_plan(p: Plan) -> str:
    """A per-device table and the reason for the choice, for people."""
    d, m = p.devices, p.model
    lines = [f"model: {m.path.name} ({_gb(m.file_bytes)}, {m.n_layer} layers, {m.n_expert} experts; "
             f"experts {m.type_summary(TensorClass.EXPERT)}, attention {m.type_summary(TensorClass.ATTENTION)})",
             f"context {p.n_ctx}, batch {p.n_ubatch}, flash attention {'on' if p.flash_attn else 'off'}", ""]
    rows = [("device", "kind", "bytes", "what")]
    rows += [(b.device, b.kind, _human(b.bytes), b.what) for b in p.buffers]
    gpu_desc = (f"{d.gpu_name or 'GPU'}: {_gb(p.gpu_bytes)} of {_gb(d.gpu_budget)} budget"
                f" ({_gb(d.gpu_total)}{' working set' if d.unified else ''})") if d.has_gpu else "no GPU"
    ram_used = p.cpu_bytes + (p.gpu_bytes if d.unified else 0)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines += ["  ".join(r[i].ljust(widths[i]) if i < 2 else r[i].rjust(widths[i]) for i in range(3)) + "  " + r[3]
              for r in rows]
    lines += ["", gpu_desc, f"RAM: {_gb(ram_used)} of {_gb(d.ram_budget)} budget ({_gb(d.ram_total)})", "",
              f"{'fits' if p.fits else 'DOES NOT FIT'}: {p.placement}"
              + (f", n_cpu_moe={p.n_cpu_moe}" if p.placement == "hybrid" else "") + f" - {p.reason}"]
    lines += [f"  override: {o}" for o in p.overrides]
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)

