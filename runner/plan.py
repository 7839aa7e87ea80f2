"""Memory planner: where each byte of a gpt-oss GGUF goes (GPU, system RAM) for a context size.

Reads headers only (ossgguf.gguf.read: nothing mapped, so sparse files and 60 GB shards are cheap),
models llama.cpp 0.3.36's buffers (weights per buffer type, the iSWA KV cache, the compute buffer by
replaying the gpt-oss graph through ggml-alloc's allocator) and picks the placement: all on the GPU,
the experts of the first N layers in RAM (`--n-cpu-moe N`), all experts in RAM, or CPU only.
With several GPUs (runner/devices.py), llama.cpp's layers are split across them in order
(`tensor_split`), each GPU holding its layers' weights, KV cache and its own part of the graph.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ossgguf import limits
from ossgguf.errors import OssggufError
from ossgguf.gguf.read import GgufSet, read_gguf
from ossgguf.gguf.tensors import FLOAT_TYPES, Q, Tensor, pad, tensor_bytes
from ossgguf.limits import DEFAULT_CTX, UBATCH_DEFAULT, UBATCH_OFFLOAD
from ossgguf.model import HParams, Offload, TensorClass, expert_offload, layer_of, read_hparams, tensor_class
from ossgguf.sizes import parse_size as _parse_size

from .devices import (  # noqa: F401 (plan's API since issue 15)  # noqa: F401 (the same)
    Device,
    Devices,
    layer_split,
    local_first_split,
    need_of,
    proportional_split,
    resolve_devices,
    system_ram,
)
from .plan_graph import compute_buffer_bytes

log = logging.getLogger(__name__)

GiB, MiB = 1024**3, 1024**2
CPU_ALIGN, GPU_ALIGN = 32, 128  # ggml CPU (TENSOR_ALIGNMENT) and CUDA buffer alignment
MAX_GPUS = 16  # llama.cpp's LLAMA_MAX_DEVICES (the length of tensor_split)


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


# --- devices (runner/devices.py: RAM and the layer devices, in llama.cpp's order) -------------------


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

    # --gpu-mem: bytes, one size per GPU (0: no GPU), or (name or worker HOST:PORT, size) pairs; default: ask llama.cpp
    gpu_mem: int | tuple[int, ...] | tuple[tuple[str, int], ...] | None = None
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
    rpc: str | None = None  # --rpc host:port,...: llama.cpp RPC workers, added as devices (runner/rpc.py)
    cache_ram: int | None = None  # --cache-ram: saved prompts in RAM (runner/prompt_cache.py); None: from free RAM, 0: off
    lora: tuple = ()  # --lora A.gguf[:SCALE]: LoRA adapters (runner/lora.py LoraSpec or their text)
    parallel: int = 1  # --parallel N (serve): N sequences of `ctx` tokens each, decoded in one batch (runner/parallel.py)

    def __post_init__(self) -> None:  # the CLI checks the same limits; other callers get this message
        for name, limit in (("ctx", limits.CTX), ("ubatch", limits.UBATCH), ("threads", limits.THREADS),
                            ("n_cpu_moe", limits.N_CPU_MOE), ("ram", limits.MEMORY), ("unified", limits.MEMORY),
                            ("cache_ram", limits.CACHE_RAM), ("parallel", limits.PARALLEL)):
            limit.check(name, getattr(self, name))
        sizes = self.gpu_mem if isinstance(self.gpu_mem, tuple) else (self.gpu_mem,)
        sizes = tuple(s[1] if isinstance(s, tuple) else s for s in sizes)  # named: (("CUDA0", size), ...)
        for size in sizes:  # one size per GPU (a tuple: --gpu-mem 24GiB,24GiB)
            limits.GPU_MEM.check("gpu_mem", size)
        if isinstance(self.gpu_mem, tuple) and not 1 <= len(sizes) <= MAX_GPUS:
            raise OssggufError(f"gpu_mem: give 1 to {MAX_GPUS} GPU sizes, not {len(sizes)}")


@dataclass(frozen=True)
class Buffer:
    device: str  # "gpu" or "cpu"
    kind: str  # model, kv, compute
    bytes: int
    what: str
    gpu: int = 0  # which of devices.gpus (device "gpu")


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
    split: tuple[int, ...] = ()  # llama.cpp layers (blocks, then the output layer) per GPU: its tensor_split
    parallel: int = 1  # sequences (streams) of n_ctx tokens each: the KV cache holds one per stream

    @property
    def ram_bytes(self) -> int:
        """This machine's RAM: its buffers, and on unified memory its GPU's too (not the workers')."""
        if not self.devices.unified:
            return self.cpu_bytes
        return self.cpu_bytes + sum(self.gpu_bytes_of(i) for i, g in enumerate(self.devices.gpus) if g.kind != "rpc")

    def gpu_bytes_of(self, i: int) -> int:
        return sum(b.bytes for b in self.buffers if b.device == "gpu" and b.gpu == i)

    def layers_of(self, i: int) -> range:
        """The llama.cpp layers GPU i holds (n_layer is the output layer)."""
        start = sum(self.split[:i])
        return range(start, start + self.split[i])

    @property
    def gpu_layers(self) -> int:
        """llama.cpp's n_gpu_layers: all of them, or none for a CPU-only plan."""
        return 0 if self.placement in ("cpu",) or not self.devices.has_gpu else self.model.n_layer + 1

    def to_json(self) -> dict:
        return {
            "fits": self.fits, "n_cpu_moe": self.n_cpu_moe, "gpu_bytes": self.gpu_bytes,
            "cpu_bytes": self.cpu_bytes, "kv_bytes": self.kv_bytes, "compute_bytes": self.compute_bytes,
            "overrides": [str(o) for o in self.overrides], "notes": self.notes, "placement": self.placement,
            "n_ctx": self.n_ctx, "parallel": self.parallel, "n_ubatch": self.n_ubatch, "flash_attn": self.flash_attn,
            "gpu_budget": self.devices.gpu_budget, "ram_budget": self.devices.ram_budget,
            "unified": self.devices.unified,
            "buffers": [{"device": b.device, "kind": b.kind, "bytes": b.bytes, "what": b.what}
                        | ({"gpu": b.gpu} if b.device == "gpu" else {}) for b in self.buffers],
            "tensor_split": list(self.split),
            "gpus": [{"name": g.name, "kind": g.kind, "host": g.host, "total": g.total, "budget": g.budget,
                      "bytes": self.gpu_bytes_of(i), "layers": [r.start, r.stop] if (r := self.layers_of(i)) else []}
                     for i, g in enumerate(self.devices.gpus) if self.placement != "cpu"],
        }


def kv_cells(model: ModelInfo, n_ctx: int, n_ubatch: int) -> tuple[int, int]:
    """(full-attention cells, sliding-window cells) as llama.cpp 0.3.36 sizes them (swa_full=False)."""
    full = pad(n_ctx, 256)
    swa = min(full, pad(model.n_swa + min(n_ubatch, full), 256))
    return full, swa


def kv_bytes(model: ModelInfo, n_ctx: int, n_ubatch: int, type_size: int = 2, n_seq: int = 1) -> int:
    """f16 K and V for every layer: full layers grow with the context, SWA layers keep window + ubatch.
    `n_seq` sequences (kv_unified off, n_ctx x n_seq in the context): llama.cpp gives each its own
    stream of these cells, the window's included (src/llama-kv-cache.cpp, n_stream = n_seq_max)."""
    full, swa = kv_cells(model, n_ctx, n_ubatch)
    per_cell = model.n_head_kv * (model.head_dim_k + model.head_dim_v) * type_size
    return n_seq * sum((swa if is_swa else full) * per_cell for is_swa in model.swa_layers)


def gpu_layer_bytes(model: ModelInfo, n_cpu_moe: int) -> list[int]:
    """Weight bytes each llama.cpp layer puts on its GPU (index n_layer: the output layer), with the
    experts of layers 0..n_cpu_moe-1 in RAM; token embeddings always stay in RAM (llama.cpp's input layer)."""
    out = [0] * (model.n_layer + 1)
    for t in model.tensors:
        cls, il = _class(t.name), _layer(t.name)
        if cls == TensorClass.EMBEDDING or (cls == TensorClass.EXPERT and il < n_cpu_moe):
            continue
        out[model.n_layer if il is None else il] += pad(t.nbytes, GPU_ALIGN)
    return out


def kv_layer_bytes(model: ModelInfo, n_ctx: int, n_ubatch: int, type_size: int = 2, n_seq: int = 1) -> list[int]:
    """f16 K and V of each layer (the output layer has none), as kv_bytes sums them."""
    full, swa = kv_cells(model, n_ctx, n_ubatch)
    per_cell = model.n_head_kv * (model.head_dim_k + model.head_dim_v) * type_size * n_seq
    return [(swa if is_swa else full) * per_cell for is_swa in model.swa_layers] + [0]


def _span(r: range, n_layer: int) -> str:
    blocks = range(r.start, min(r.stop, n_layer))
    text = f"layers {blocks.start}-{blocks.stop - 1}" if len(blocks) > 1 else f"layer {blocks.start}" if blocks else ""
    return ", ".join(x for x in (text, "output" if n_layer in r else "") if x) or "no layers"


def estimate(model: ModelInfo, devices: Devices, n_ctx: int, n_cpu_moe: int, *, n_ubatch: int | None = None,
             gpu: bool = True, flash_attn: bool = True, op_offload: bool = True,
             n_outputs: int = 1, split: tuple[int, ...] | None = None, n_seq: int = 1) -> Plan:
    """Bytes per device for one placement: experts of layers 0..n_cpu_moe-1 in RAM (gpu=True), or
    everything in RAM (gpu=False). With several GPUs, `split` gives the layers per GPU (default: the
    most even split that fits, else one in proportion to their memory). Does not judge fit beyond
    filling `fits`. `n_seq` parallel sequences of n_ctx each: KV per sequence, one output (logits) each."""
    use_gpu = gpu and devices.has_gpu
    n_cpu_moe = max(0, min(n_cpu_moe, model.n_layer)) if gpu else model.n_layer
    ub = min(n_ubatch or (UBATCH_OFFLOAD if use_gpu and n_cpu_moe > 0 else UBATCH_DEFAULT), n_ctx)
    cpu_layers = range(n_cpu_moe)
    bufs: list[Buffer] = []
    embd = model.bytes_where(TensorClass.EMBEDDING, align=CPU_ALIGN)
    kv = kv_bytes(model, n_ctx, ub, n_seq=n_seq)
    full, swa = kv_cells(model, n_ctx, ub)
    streams = f" x {n_seq} streams" if n_seq > 1 else ""
    n_out = min(ub, max(n_outputs, n_seq))  # llama.cpp reserves an output per sequence at least
    out_buf = model.n_vocab * 4 * n_out  # llama.cpp's host output buffer (logits of the last tokens)
    copies = ([max(t.nbytes for t in model.expert_weights(i)) for i in cpu_layers]
              if use_gpu and op_offload and ub >= 32 else [])
    if use_gpu:
        gpus = devices.gpus
        weights, kvs = gpu_layer_bytes(model, n_cpu_moe), kv_layer_bytes(model, n_ctx, ub, n_seq=n_seq)
        # prompt batches stream RAM-resident experts through the first device (ggml-sched offloads
        # host-weight ops to its first backend), so only GPU 0's graph buffer holds those copies
        whole = _compute(model, ub, n_out, full, swa, flash_attn, GPU_ALIGN, max(copies, default=0))
        if len(gpus) == 1:
            split, comps = (model.n_layer + 1,), [whole]
        else:
            # llama.cpp turns pipeline parallelism on (inputs copied GGML_SCHED_MAX_COPIES=4 times) when
            # every layer is on the GPUs and no tensor is overridden (src/llama-context.cpp)
            n_copies = 4 if n_cpu_moe == 0 else 1

            def graphs(split: tuple[int, ...]) -> list[int]:  # each device's own part of the graph
                starts = [sum(split[:i]) for i in range(len(split))]
                return [_compute(model, ub, n_out, full, swa, flash_attn, GPU_ALIGN,
                                 max(copies, default=0) if i == 0 else 0, range(a, a + n), n_copies) if n else 0
                        for i, (a, n) in enumerate(zip(starts, split))]

            if split is None:  # sized with the one-device graph, then each device's own part below
                need = [w + k for w, k in zip(weights, kvs)]
                caps = [g.budget - whole for g in gpus]
                remote = [g.kind == "rpc" for g in gpus]
                split = local_first_split(need, caps, remote)
                while split and (over := [i for i, (g, c) in enumerate(zip(gpus, graphs(split))) if not remote[i]
                                          and split[i] and need_of(need, split, i) + c > g.budget]):
                    i = over[0]  # a local GPU filled up to the one-device graph: give its first layer back
                    split = split[:i - 1] + (split[i - 1] + 1, split[i] - 1) + split[i + 1:]
                split = (split or layer_split(need, caps)
                         or proportional_split(model.n_layer + 1, [g.budget for g in gpus]))
            if len(split) != len(gpus) or sum(split) != model.n_layer + 1:
                raise OssggufError(f"a split of {model.n_layer + 1} layers over {len(gpus)} GPUs, not {split}")
            comps = graphs(split)
        cpu_exp = model.bytes_where(TensorClass.EXPERT, cpu_layers, CPU_ALIGN)
        bufs.append(Buffer("cpu", "model", embd, "token embeddings (llama.cpp keeps the input layer in RAM)"))
        if cpu_exp:
            bufs.append(Buffer("cpu", "model", cpu_exp, f"experts of layers 0-{n_cpu_moe - 1}"))
        start = 0
        for i, n in enumerate(split):
            r = range(start, start + n)
            start += n
            gpu_exp = range(max(r.start, n_cpu_moe), min(r.stop, model.n_layer))
            what = ("attention, router, norms, output" if len(gpus) == 1 else
                    f"{_span(r, model.n_layer)}: attention, router, norms" + (", output" if model.n_layer in r else ""))
            bufs.append(Buffer("gpu", "model", sum(weights[j] for j in r), what
                               + (f", experts of layers {gpu_exp.start}-{gpu_exp.stop - 1}" if gpu_exp else ""), i))
            kv_i = sum(kvs[j] for j in r)
            bufs.append(Buffer("gpu", "kv", kv_i, f"f16 K/V: {full} cells full, {swa} sliding{streams}"
                               + ("" if len(gpus) == 1 else f", {sum(1 for j in r if j < model.n_layer)} layers"), i))
            if n or i == 0:  # a device given no layers gets no graph
                bufs.append(Buffer("gpu", "compute", comps[i], f"graph for {ub}-token batches", i))
        host = model.n_embd * ub * 4 + ub * 4 + out_buf  # embeddings are looked up on the CPU
        bufs.append(Buffer("cpu", "compute", host, "input embeddings, logits"))
    else:
        split = ()
        exp = model.bytes_where(TensorClass.EXPERT, align=CPU_ALIGN)
        bufs += [Buffer("cpu", "model", exp, "experts (CPU_REPACK where the CPU repacks MXFP4)"),
                 Buffer("cpu", "model", model.bytes_where(align=CPU_ALIGN) - exp, "other weights"),
                 Buffer("cpu", "kv", kv, f"f16 K/V: {full} cells full, {swa} sliding{streams}")]
        comp = _compute(model, ub, n_out, full, swa, flash_attn, CPU_ALIGN, 0)
        bufs.append(Buffer("cpu", "compute", comp + out_buf, f"graph for {ub}-token batches, logits"))
    # overrides follow the request even without a GPU: llama.cpp then logs them, placing nothing elsewhere
    overrides = [expert_offload(None if n_cpu_moe == model.n_layer else range(n_cpu_moe))] if gpu and n_cpu_moe > 0 else []
    placement = "cpu" if not use_gpu else "gpu" if n_cpu_moe == 0 else "hybrid"
    gpu_bytes = sum(b.bytes for b in bufs if b.device == "gpu")
    cpu_bytes = sum(b.bytes for b in bufs if b.device == "cpu")
    return Plan(fits=False, placement=placement, n_cpu_moe=n_cpu_moe, n_ctx=n_ctx, n_ubatch=ub,
                flash_attn=flash_attn, op_offload=op_offload, gpu_bytes=gpu_bytes, cpu_bytes=cpu_bytes,
                kv_bytes=kv, compute_bytes=sum(b.bytes for b in bufs if b.kind == "compute"),
                overrides=overrides, buffers=bufs, devices=devices, model=model, split=split, parallel=n_seq)


def _check(p: Plan) -> Plan:
    """Fill fits/notes: every byte within its device's budget (unified: all of them within RAM too)."""
    d = p.devices
    ram_need = p.ram_bytes
    over = [i for i in range(len(d.gpus)) if p.placement != "cpu" and not _gpu_fits(p, i)]
    ram_ok = ram_need <= d.ram_budget
    p.fits = not over and ram_ok
    for i in over:
        g = d.gpus[i]
        p.notes.append(f"{'GPU' if len(d.gpus) == 1 else g.name}: needs {_gb(p.gpu_bytes_of(i))}, "
                       f"budget {_gb(g.budget)} of {_gb(g.total)}"
                       + (" (the GPU working set of unified memory)" if d.unified else ""))
    if not ram_ok:
        p.notes.append(f"RAM: needs {_gb(ram_need)}, budget {_gb(d.ram_budget)} of {_gb(d.ram_total)}: "
                       "running anyway would rely on the OS paging weights from disk (mmap), "
                       "which is not fitting")
    return p


def _gpu_fits(p: Plan, i: int) -> bool:
    return p.gpu_bytes_of(i) <= p.devices.gpus[i].budget


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
    if o.lora:  # adapter tensors count where the tensors they change live (runner/lora.py)
        from .lora import with_adapters

        m = with_adapters(m, o.lora)
    if o.rpc and devices is None:  # workers become llama.cpp devices before the device list is read
        from .rpc import add_workers, parse_endpoints

        add_workers(parse_endpoints(o.rpc))
    d = devices or resolve_devices(o.gpu_mem, o.ram, o.unified)
    n_ctx = o.ctx or min(DEFAULT_CTX, m.n_ctx_train)
    if n_ctx > m.n_ctx_train:
        raise OssggufError(f"context {n_ctx} is larger than the model's {m.n_ctx_train} tokens: "
                           f"use --ctx {m.n_ctx_train} or less")
    kw = dict(n_ubatch=o.ubatch, flash_attn=o.flash_attn, op_offload=o.op_offload, n_seq=o.parallel)
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
    from .prompt_cache import cache_note  # the prompt cache's RAM, beside the buffers

    p.notes.append(cache_note(p, o.cache_ram))
    return p


def _choose(m: ModelInfo, d: Devices, n_ctx: int, kw: dict) -> Plan:
    if d.has_gpu:
        for n in range(m.n_layer + 1):
            p = estimate(m, d, n_ctx, n, **kw)
            if all(_gpu_fits(p, i) for i in range(len(d.gpus))):
                _check(p)
                if p.fits:
                    the = "the GPU" if len(d.gpus) == 1 else f"the {len(d.gpus)} GPUs"
                    p.reason = (f"everything fits on {the}" if n == 0 else
                                f"all experts in RAM, attention and KV cache on {the}"
                                if n == m.n_layer else
                                f"the experts of layers 0-{n - 1} in RAM, the rest on {the} "
                                f"(N={n - 1} does not fit {the})")
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
    short = least.ram_bytes - d.ram_budget
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
             f"context {p.n_ctx}" + (f" per stream, {p.parallel} parallel streams" if p.parallel > 1 else "")
             + f", batch {p.n_ubatch}, flash attention {'on' if p.flash_attn else 'off'}", ""]
    rows = [("device", "kind", "bytes", "what")]
    many = len(d.gpus) > 1
    rows += [(f"gpu{b.gpu}" if many and b.device == "gpu" else b.device, b.kind, _human(b.bytes), b.what)
             for b in p.buffers]
    gpu_desc = "\n".join(
        (f"gpu{i} " if many else "") + f"{g.label}: {_gb(p.gpu_bytes_of(i))} of {_gb(g.budget)} budget"
        f" ({_gb(g.total)}{' working set' if d.unified and g.kind != 'rpc' else ''})"
        + (f", {_span(p.layers_of(i), m.n_layer)}" if many and p.split else "")
        for i, g in enumerate(d.gpus)) if d.has_gpu else "no GPU"
    ram_used = p.ram_bytes
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines += ["  ".join(r[i].ljust(widths[i]) if i < 2 else r[i].rjust(widths[i]) for i in range(3)) + "  " + r[3]
              for r in rows]
    lines += ["", gpu_desc, f"RAM: {_gb(ram_used)} of {_gb(d.ram_budget)} budget ({_gb(d.ram_total)})", "",
              f"{'fits' if p.fits else 'DOES NOT FIT'}: {p.placement}"
              + (f", n_cpu_moe={p.n_cpu_moe}" if p.placement == "hybrid" else "") + f" - {p.reason}"]
    if many and p.split and p.placement != "cpu":
        lines.append(f"  tensor_split: {','.join(map(str, p.split))} (llama.cpp layers per GPU, the output layer last)")
    lines += [f"  override: {o}" for o in p.overrides]
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)

