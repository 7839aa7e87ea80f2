"""Predicted decode and prompt speed of a placement (`ossgguf plan`), from bytes and bandwidths.

Decoding one token reads, from the memory that holds them: every non-expert weight of every layer,
the chosen experts' share (n_expert_used / n_expert) of the expert weights, the output head and the
KV cache up to the current depth. Layers run one after another, so the time is the sum over
memories of bytes / bandwidth, divided by an efficiency factor, plus a fixed cost per layer (kernel
launches and synchronisation, which dominate a fast GPU). Prompt processing is compute-bound:
2 FLOPs per active weight per token (plus attention), over the device's compute; with experts in
RAM, each prompt batch also streams them to the GPU over PCIe (llama.cpp's op offload).

The factors are stored, not fitted per call (ossgguf/data/speed_calibration.json):
`bench/bench_speed.py --calibrate` measured the CPU ones on this project's machine against its own
probes; the efficiency against a nominal RAM bandwidth was fitted to one published figure and the GPU
per-layer cost is a range fitted to two (docs/benchmarks.md says which, and which figures are checks).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from importlib.resources import files

from ossgguf.model import TensorClass

from .network import DEFAULT_LINK_GBIT, network_seconds, remote
from .plan import Plan, _class, _layer

GB = 1e9
# Known devices: memory bandwidth (bytes/s) and dense FP16 tensor compute (FLOP/s), vendors' figures.
KNOWN = (  # (substring of llama.cpp's description, bandwidth, flops)
    ("H200", 4.8e12, 989e12), ("H100 PCIe", 2.0e12, 756e12), ("H100", 3.35e12, 989e12),
    ("A100-SXM4-80GB", 2.04e12, 312e12), ("A100", 1.94e12, 312e12), ("L40S", 864e9, 362e12),
    ("RTX PRO 6000", 1.79e12, 500e12), ("RTX 5090", 1.79e12, 419e12), ("RTX 4090", 1.008e12, 330e12),
    ("RTX 3090", 936e9, 142e12), ("RTX A6000", 768e9, 155e12), ("RTX 4080", 717e9, 195e12),
    ("M2 Ultra", 800e9, 27e12), ("M3 Ultra", 819e9, 28e12), ("M4 Max", 546e9, 17e12), ("M3 Max", 400e9, 14e12),
    ("M4 Pro", 273e9, 9e12),
)
DEFAULT_RAM_BW = 89.6e9  # dual-channel DDR5-5600 (2 x 8 bytes x 5600 MT/s), when not measured or given
DEFAULT_GPU = ("RTX 4090 class", 1.008e12, 330e12)  # a GPU not in the table, without --gpu-bw
PCIE_BW = 25e9  # PCIe 4.0 x16 in practice, for streaming RAM-resident experts during prompts


@dataclass(frozen=True)
class Calibration:
    ram_eff: float  # decode bytes/s achieved over the probed RAM bandwidth (--measure; CPU)
    ram_eff_nominal: float  # the same over a given or assumed (vendor's peak) RAM bandwidth
    cpu_layer_s: float  # fixed seconds per layer per decoded token on the CPU
    cpu_pp_eff: float  # prompt FLOP/s achieved over the probed numpy float32 matmul FLOP/s
    gpu_eff: float  # GPU bytes/s achieved over the table bandwidth (assumed, not measured here)
    gpu_layer_s: tuple[float, float]  # fixed seconds per layer per token on a GPU: (fast, slow)
    gpu_pp_eff: float  # prompt FLOP/s over the table tensor FLOP/s (assumed)
    source: str = ""


def calibration() -> Calibration:
    doc = json.loads((files("ossgguf") / "data" / "speed_calibration.json").read_text())
    doc["gpu_layer_s"] = tuple(doc["gpu_layer_s"])
    return Calibration(**{k: v for k, v in doc.items() if k in Calibration.__dataclass_fields__})


@dataclass(frozen=True)
class Memory:
    name: str
    bandwidth: float  # bytes/s
    flops: float  # FLOP/s
    source: str  # measured, given, table, assumed
    cpu: bool = False  # a CPU's RAM (this machine's, or a worker's assumed so): CPU efficiencies apply


def probe_ram(threads: int | None = None, nbytes: int = 512 << 20, repeat: int = 3) -> float:
    """RAM bandwidth (bytes/s, read + write counted): `threads` concurrent numpy copies of separate
    arrays (numpy releases the GIL in copies), best of `repeat`."""
    import numpy as np

    threads = threads or len(os.sched_getaffinity(0))
    pairs = [(np.ones(nbytes // 8 // threads), np.empty(nbytes // 8 // threads)) for _ in range(threads)]
    best = 0.0
    for _ in range(repeat):
        barrier = threading.Barrier(threads + 1)
        ts = [threading.Thread(target=lambda s=s, d=d, b=barrier: (b.wait(), np.copyto(d, s))) for s, d in pairs]
        for t in ts:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in ts:
            t.join()
        best = max(best, 2 * sum(s.nbytes for s, _ in pairs) / (time.perf_counter() - t0))
    return best


def probe_cpu_flops(n: int = 768, seconds: float = 0.3) -> float:
    """float32 matmul FLOP/s of numpy's BLAS on this CPU (all its threads)."""
    import numpy as np

    a, b = np.ones((n, n), np.float32), np.ones((n, n), np.float32)
    a @ b
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        k += 1
    return 2 * n**3 * k / (time.perf_counter() - t0)


def memories(p: Plan, ram_bw: float | None = None, gpu_bw: list[float] | None = None, measure: bool = False,
             cpu_flops: float | None = None) -> tuple[Memory, list[Memory]]:
    """RAM (and the CPU's compute) and one Memory per GPU of the plan: given, measured, or from the table."""
    if ram_bw:
        ram_src = "given"
    elif measure:
        ram_bw, ram_src = probe_ram(), "measured"
    else:
        ram_bw, ram_src = DEFAULT_RAM_BW, "assumed dual-channel DDR5"
    flops = cpu_flops or (probe_cpu_flops() if measure else len(os.sched_getaffinity(0)) * 50e9)
    ram = Memory("RAM", ram_bw, flops, ram_src, cpu=True)
    gpus = []
    for i, g in enumerate(p.devices.gpus):
        known = next((k for k in KNOWN if k[0].lower() in f"{g.name} {g.description}".lower()), None)
        name, bw, fl = known or DEFAULT_GPU
        src = f"table: {name}" if known else "assumed: " + name
        if gpu_bw:
            bw, src = gpu_bw[min(i, len(gpu_bw) - 1)], "given"
        if p.devices.unified and not known and not gpu_bw:
            bw, src = ram_bw, f"unified memory: RAM bandwidth ({ram_src})"
        if g.kind == "rpc" and not gpu_bw:  # llama.cpp's RPC client does not learn what the worker serves
            bw, fl, src = DEFAULT_RAM_BW, flops, "a worker: assumed its CPU and RAM (give --gpu-bw)"
        gpus.append(Memory(g.name, bw, fl, src, cpu=g.kind == "rpc" and not gpu_bw))
    return ram, gpus


@dataclass
class Speed:
    decode: tuple[float, float]  # expected tok/s at an empty context (slow, fast end of the range)
    decode_full: tuple[float, float]  # at a full context (every KV cell read)
    decode_bound: float  # bytes / bandwidth only (efficiency 1, no fixed cost)
    prompt: float  # expected tok/s
    prompt_bound: float
    dominant: str  # what most of a decoded token's time goes to
    parts: dict[str, float] = field(default_factory=dict)  # seconds per token, by memory and "fixed"
    bytes: dict[str, int] = field(default_factory=dict)  # bytes read per token (empty context), by memory
    memories: list[Memory] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"decode_tps": list(self.decode), "decode_full_ctx_tps": list(self.decode_full),
                "decode_bound_tps": self.decode_bound, "prompt_tps": self.prompt, "prompt_bound_tps": self.prompt_bound,
                "dominant": self.dominant, "seconds_per_token": self.parts, "bytes_per_token": self.bytes,
                "memories": [vars(m) for m in self.memories]}


def token_bytes(p: Plan, depth: int) -> dict[str, int]:
    """Bytes one decoded token reads from each memory ("RAM", or a GPU's name) with `depth` tokens cached."""
    m = p.model
    gpus = p.devices.gpus if p.placement != "cpu" else ()
    where = ["RAM"] * (m.n_layer + 1)  # llama.cpp layer -> memory
    for i, g in enumerate(gpus):
        for il in p.layers_of(i):
            where[il] = g.name
    share = m.n_expert_used / m.n_expert
    out: dict[str, int] = {}
    for t in m.tensors:
        cls, il = _class(t.name), _layer(t.name)
        if cls == TensorClass.EMBEDDING:
            out["RAM"] = out.get("RAM", 0) + t.nbytes // m.n_vocab  # one row
            continue
        layer = m.n_layer if il is None else il
        mem = "RAM" if cls == TensorClass.EXPERT and layer < p.n_cpu_moe else where[layer]
        n = int(t.nbytes * share) if cls == TensorClass.EXPERT or t.name.endswith("_exps.bias") else t.nbytes
        out[mem] = out.get(mem, 0) + n
    per_cell = m.n_head_kv * (m.head_dim_k + m.head_dim_v) * 2
    for il, swa in enumerate(m.swa_layers):
        cells = min(depth, m.n_swa) if swa else depth
        out[where[il]] = out.get(where[il], 0) + cells * per_cell
    return out


def prompt_flops(p: Plan, prompt_tokens: int | None = None) -> float:
    """FLOPs per prompt token: 2 per active weight (the head only for the last token) plus attention
    at the middle of the prompt (default: one as long as the context)."""
    m = p.model
    mid = (prompt_tokens or p.n_ctx) // 2
    share = m.n_expert_used / m.n_expert
    weights = sum(t.n_params * (share if _class(t.name) == TensorClass.EXPERT else 1) for t in m.tensors
                  if _class(t.name) not in (TensorClass.EMBEDDING, TensorClass.OUTPUT))
    attn = sum(4 * m.n_head * m.head_dim_k * (min(mid, m.n_swa) if swa else mid)
               for swa in m.swa_layers)
    return 2 * weights + attn


def predict(p: Plan, ram: Memory, gpus: list[Memory], cal: Calibration | None = None, depth: int = 0,
            prompt_tokens: int | None = None, link_gbit: float = DEFAULT_LINK_GBIT) -> Speed:
    """Decode at `depth` cached tokens and at a full context; prompt processing of `prompt_tokens`.
    With RPC workers, each token also waits for the network (runner/network.py) at `link_gbit`."""
    cal = cal or calibration()
    m = p.model
    bw = {"RAM": ram.bandwidth} | {g.name: g.bandwidth for g in gpus}
    # a probe measures what copies achieve; a given or assumed figure is usually the vendor's peak
    eff = {"RAM": cal.ram_eff if ram.source == "measured" else cal.ram_eff_nominal} | {
        g.name: cal.ram_eff_nominal if g.cpu else cal.gpu_eff for g in gpus}
    on_gpu = p.placement != "cpu" and bool(gpus)
    gpu_like = on_gpu and any(not g.cpu for g in gpus)  # workers assumed CPUs pay the CPU's per-layer cost
    fixed = [m.n_layer * s for s in (cal.gpu_layer_s if gpu_like else (cal.cpu_layer_s,) * 2)]

    def seconds(depth: int) -> dict[str, float]:
        return {k: v / (bw[k] * eff[k]) for k, v in token_bytes(p, depth).items()}

    empty, full = seconds(depth), seconds(p.n_ctx)
    net = {"network": network_seconds(p, depth, link_gbit)} if remote(p) else {}
    net_full = network_seconds(p, p.n_ctx, link_gbit) if net else 0.0
    mem_s, full_s = sum(empty.values()) + sum(net.values()), sum(full.values()) + net_full
    parts = empty | net | {"fixed per layer": fixed[1]}
    dominant = max(parts, key=parts.get)
    # prompt: compute on the device(s) holding the layers; RAM-resident experts cross PCIe once per batch
    flops = prompt_flops(p, prompt_tokens)
    if on_gpu:
        rate = sum(g.flops * (cal.cpu_pp_eff if g.cpu else cal.gpu_pp_eff) for g in gpus) / len(gpus)
        stream = sum(b.bytes for b in p.buffers if b.device == "cpu" and b.kind == "model"
                     and "experts" in b.what) / (PCIE_BW * p.n_ubatch)
    else:
        rate, stream = ram.flops * cal.cpu_pp_eff, 0.0
    bound_rate = sum(g.flops for g in gpus) / len(gpus) if on_gpu else ram.flops
    return Speed(decode=(1 / (mem_s + fixed[1]), 1 / (mem_s + fixed[0])),
                 decode_full=(1 / (full_s + fixed[1]), 1 / (full_s + fixed[0])),
                 decode_bound=1 / sum(v / bw[k] for k, v in token_bytes(p, 0).items()),
                 prompt=1 / (flops / rate + stream), prompt_bound=bound_rate / flops, dominant=dominant,
                 parts=parts, bytes=token_bytes(p, depth), memories=[ram, *gpus])


def _tps(r: tuple[float, float]) -> str:
    lo, hi = sorted(r)
    return f"{lo:.0f}" if hi < lo * 1.05 else f"{lo:.0f}-{hi:.0f}"


def format_speed(s: Speed, n_ctx: int) -> str:
    mems = ", ".join(f"{m.name} {m.bandwidth / GB:.0f} GB/s ({m.source})" for m in s.memories
                     if m.name == "RAM" or m.name in s.bytes)
    total = sum(s.parts.values())
    share = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(s.parts.items(), key=lambda kv: -kv[1]))
    return "\n".join([
        f"speed ({mems}):",
        f"  decode ~{_tps(s.decode)} tok/s at the start, ~{_tps(s.decode_full)} at {n_ctx} tokens "
        f"(bandwidth bound {s.decode_bound:.0f}); prompt ~{s.prompt:.0f} tok/s (compute bound {s.prompt_bound:.0f})",
        f"  a decoded token's time: {share}; {s.dominant} dominates",
    ])


def compare(model, options, values: list[int], ram_bw=None, gpu_bw=None, measure=False,
            link_gbit: float = DEFAULT_LINK_GBIT) -> list[tuple[Plan, Speed]]:
    """The plan and speed for each --n-cpu-moe value, side by side (one probe for all)."""
    from dataclasses import replace

    from .plan import plan, read_model

    info = read_model(model) if not hasattr(model, "tensors") else model
    out, mem = [], None
    for n in values:
        p = plan(info, replace(options, n_cpu_moe=n, cpu_moe=False))
        if mem is None:
            mem = memories(p, ram_bw, gpu_bw, measure)
        out.append((p, predict(p, *mem, link_gbit=link_gbit)))
    return out


def format_compare(rows: list[tuple[Plan, Speed]]) -> str:
    head = f"{'n_cpu_moe':>9}  {'fits':<4}  {'GPU GB':>7}  {'RAM GB':>7}  {'decode tok/s':>12}  {'prompt tok/s':>12}  dominant"
    lines = [head]
    for p, s in rows:
        lines.append(f"{p.n_cpu_moe:>9}  {'yes' if p.fits else 'no':<4}  {p.gpu_bytes / GB:7.1f}  {p.cpu_bytes / GB:7.1f}  "
                     f"{_tps(s.decode):>12}  {s.prompt:12.0f}  {s.dominant}")
    return "\n".join(lines)
