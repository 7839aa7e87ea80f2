"""PEFT LoRA adapter -> GGUF LoRA adapter that llama.cpp applies at run time (`llama_adapter_lora_init`).

llama.cpp (src/llama-adapter.cpp, llama-graph.cpp's build_lora_mm / build_lora_mm_id) pairs
`<base tensor>.lora_a` [in, r] and `.lora_b` [r, out] (ggml order; numpy [r, in] and [out, r], with a
leading expert axis for expert tensors) and adds scale * alpha / r * B(A x), alpha being the one
`adapter.lora.alpha` of the file and r each pair's rank. PEFT's per-module alpha (alpha_pattern),
rank (rank_pattern) and rsLoRA (alpha / sqrt(r)) scalings therefore go into lora_b, as a factor; lora_b
is copied unchanged where that factor is 1 (so files match llama.cpp's convert_lora_to_gguf.py).

gpt-oss's experts are targeted through PEFT's `target_parameters` (lora.ParamWrapper, peft/tuners/lora/
layer.py): for an [E, in, out] parameter lora_A.weight is [r*E, in], expert-major (rows e*r .. e*r+r-1),
and lora_B.weight [out, r*E], expert-minor (column k*E + e); a wrapper around another wrapper (both
gate_up_proj and down_proj targeted) saves its inner one under `.base_layer.`. Which parameter a wrapper
adapts is read from its shapes, which tell gate_up (in H, out 2F) from down (in F, out H); transformers
marks gpt-oss's experts `is_transposed`, so PEFT keeps lora_A on the input side (the other orientation
is taken only where the shapes prove it). gate_up's interleaved rows (gate even, up odd) are split in lora_b exactly as the
converter splits the base weights; lora_a is shared by both halves.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ossgguf.gguf.stream import Chunk, FileReader, Task
from ossgguf.gguf.tensors import Q, Tensor
from ossgguf.gguf.values import KV, kv_f32, kv_str, kv_u32
from ossgguf.gguf.write import plan_layout, refuse_inputs

from ..errors import OssggufError
from ..model import ARCH, EXPERT_DOWN, EXPERT_GATE, EXPERT_UP, HF_EXPERTS
from ..quantize.encode import decode
from .output import WritePlan, WriteReport
from .peft import (  # noqa: F401 (load_adapter, load_base: this module's API too)
    _GLOBAL_LINEAR,
    _LINEAR,
    ADAPTER_WEIGHTS,
    DOWN,
    GATE_UP,
    PEFT_PREFIX,
    ROUTER_PARAM,
    Adapter,
    Base,
    _is_repo_id,
    default_base,
    load_adapter,
    load_base,
)
from .safetensors import TensorEntry, TensorReader

log = logging.getLogger(__name__)

LORA_TYPE = Q.F32  # as llama.cpp's convert_lora_to_gguf.py by default: adapters are small, F32 is exact
CHUNK_BYTES = 16 * 1024 * 1024
_LORA_NAME = re.compile(r"^(?P<module>.+?)(?P<nest>(\.base_layer)*)\.lora_(?P<ab>[AB])\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LoraOut:
    """One GGUF adapter tensor and how it is made from the PEFT tensors.

    role "a" / "b" (lora_a / lora_b); `source` the PEFT tensor it is read from; `swapped`: PEFT's
    orientation in which lora_A holds the output side (then GGUF's a comes from PEFT's B and vice versa);
    `part` gate/up (rows of interleaved gate_up) or None; `factor` multiplies lora_b (scalings folded in).
    """

    name: str
    shape: tuple[int, ...]  # numpy order
    role: str
    source: str
    experts: int = 0  # 0: a 2-D linear layer
    rank: int = 0
    part: str | None = None
    swapped: bool = False
    factor: float = 1.0


# --- the table ---------------------------------------------------------------------------------------

def _factor(cfg: dict[str, Any], key: str, r: int, where: Path) -> float:
    """The factor that folds PEFT's scaling of the module or parameter `key` (as PEFT names it: relative to
    the transformers model) into lora_b, given the file's one alpha; rank_pattern / alpha_pattern matched as
    peft.utils.other.get_pattern_key. OssggufError when the configured rank is not the weights' `r`."""
    def pattern(patterns: dict[str, Any], default: Any) -> Any:
        return next((v for k, v in (patterns or {}).items() if re.match(rf"(.*\.)?({k})$", key)), default)

    rank = int(pattern(cfg.get("rank_pattern"), cfg["r"]))
    alpha = float(pattern(cfg.get("alpha_pattern"), cfg["lora_alpha"]))
    if rank != r:
        raise OssggufError(f"{where}: '{key}' has rank {r}, but adapter_config.json (r / rank_pattern) says "
                           f"{rank}: the config does not belong to these weights")
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r) * r / float(cfg["lora_alpha"])


def _pairs(adapter: Adapter, base: Base | None = None) -> dict[tuple[str, int], dict[str, TensorEntry]]:
    """PEFT's tensors grouped by (module, nesting depth) into {"A": entry, "B": entry}."""
    out: dict[tuple[str, int], dict[str, TensorEntry]] = {}
    for name, e in adapter.entries.items():
        rel = name.removeprefix(PEFT_PREFIX)
        m = _LORA_NAME.match(rel)
        if not m and rel.endswith(".base_layer.weight") and base is not None:
            # PEFT also saves a targeted lm_head's own weight (save_embedding_layers): skipped, as llama.cpp's
            # converter does, once its shape shows the vocabulary was not resized
            _check_base(base, _GLOBAL_LINEAR.get(rel.removesuffix(".base_layer.weight"), rel), e.shape, rel)
            continue
        if not m:
            what = ("a trained embedding (lora_embedding_A/B)" if "lora_embedding" in rel else
                    "a DoRA magnitude" if "lora_magnitude" in rel else "not a lora_A / lora_B weight")
            raise OssggufError(f"{adapter.path / ADAPTER_WEIGHTS}: tensor '{name}' is {what}: ossgguf converts "
                               "LoRA on gpt-oss's attention, router, LM head and experts only")
        if len(e.shape) != 2 or e.dtype not in ("F32", "F16", "BF16"):
            raise OssggufError(f"{adapter.path / ADAPTER_WEIGHTS}: tensor '{name}' is {e.dtype} {list(e.shape)}, "
                               "not a 2-D float LoRA matrix")
        out.setdefault((m["module"], m["nest"].count(".base_layer")), {})[m["ab"]] = e
    return out


def lora_table(adapter: Adapter, base: Base) -> list[LoraOut]:
    """The GGUF adapter tensors, checked against the base's shapes (OssggufError naming what disagrees)."""
    cfg, where = adapter.config, adapter.path / ADAPTER_WEIGHTS
    out: list[LoraOut] = []
    for (module, depth), ab in sorted(_pairs(adapter, base).items(), key=lambda kv: _order(kv[0])):
        for side, other in (("A", "B"), ("B", "A")):
            if side not in ab:
                raise OssggufError(f"{where}: '{module}' has lora_{other} but no lora_{side} tensor: "
                                   "the adapter file is incomplete")
        a, b = ab["A"], ab["B"]
        m = _LAYER.match(module)
        layer, local = (int(m[1]), m[2]) if m else (None, module)
        if local == HF_EXPERTS.rstrip("."):
            out += _expert_outs(a, b, layer, base, cfg, where)
            continue
        if depth:
            raise OssggufError(f"{where}: '{module}' is nested (base_layer) but is not gpt-oss's experts")
        gguf = (_LINEAR.get(local) if layer is not None else _GLOBAL_LINEAR.get(local))
        if gguf is None:
            raise OssggufError(f"{where}: LoRA on '{module}' is not supported: gpt-oss's LoRA targets are "
                               f"{', '.join(_LINEAR)} (per layer), lm_head, and the experts")
        name = f"blk.{layer}.{gguf}" if layer is not None else gguf
        r = a.shape[0]
        if b.shape[1] != r:
            raise OssggufError(f"{where}: '{module}' lora_A has rank {r}, lora_B {b.shape[1]}")
        _check_base(base, name, (b.shape[0], a.shape[1]), module)
        # PEFT names a targeted parameter (the router's weight) by the parameter, a module by the module
        key = module + ".weight" if any(p.endswith(ROUTER_PARAM) for p in cfg.get("target_parameters") or []) \
            and local == "mlp.router" else module
        out += [LoraOut(f"{name}.lora_a", (r, a.shape[1]), "a", a.name, rank=r),
                LoraOut(f"{name}.lora_b", (b.shape[0], r), "b", b.name, rank=r, factor=_factor(cfg, key, r, where))]
    if not out:
        raise OssggufError(f"{where} holds no LoRA tensors")
    return out


def _order(key: tuple[str, int]) -> tuple:
    m = _LAYER.match(key[0])
    return (0, int(m[1]), m[2], key[1]) if m else (1, 0, key[0], key[1])


def _check_base(base: Base, name: str, shape: tuple[int, ...], module: str) -> None:
    want = base.shapes.get(name)
    if want is None:
        raise OssggufError(f"the adapter changes '{module}', but the base ({base.what}) has no {name}: "
                           "is the adapter for another model?")
    if tuple(want) != tuple(shape):
        raise OssggufError(f"the adapter's '{module}' is {list(shape)} (out, in), but the base's {name} is "
                           f"{list(want)} ({base.what}): the adapter was trained on another model")


def _expert_outs(a: TensorEntry, b: TensorEntry, layer: int | None, base: Base, cfg: dict[str, Any],
                 where: Path) -> list[LoraOut]:
    E, H, F = base.n_expert, base.hidden, base.ff
    module = f"model.layers.{layer}.mlp.experts"
    if layer is None or f"blk.{layer}.{EXPERT_DOWN}.weight" not in base.shapes:
        raise OssggufError(f"the adapter changes '{module}', but the base ({base.what}) has no such layer")
    if a.shape[0] != b.shape[1] or a.shape[0] % E:
        raise OssggufError(f"{where}: '{a.name}' has {a.shape[0]} rows for {b.name}'s {b.shape[1]} columns: "
                           f"expected rank x {E} experts in both (is the adapter for a model with {E} experts?)")
    r = a.shape[0] // E
    # (in, out) of PEFT's lora_A / lora_B -> (parameter, swapped): see the module docstring
    # transformers marks gpt-oss's experts is_transposed ([E, in, out]), so PEFT keeps A on the input side;
    # the swapped orientation is taken only where the shapes rule the other out (gpt-oss has H == F, so
    # down_proj's two orientations have the same shapes).
    kinds = {(H, F): (DOWN, True), (2 * F, H): (GATE_UP, True), (F, H): (DOWN, False), (H, 2 * F): (GATE_UP, False)}
    kind = kinds.get((a.shape[1], b.shape[0]))
    if kind is None:
        raise OssggufError(f"the adapter's '{a.name}' / '{b.name}' ({list(a.shape)}, {list(b.shape)}) fit neither "
                           f"gate_up_proj nor down_proj of the base ({base.what}: hidden {H}, expert FFN {F}, "
                           f"{E} experts): the adapter was trained on another model")
    param, swapped = kind
    f = _factor(cfg, f"{module}.{param}", r, where)
    # GGUF's a: [E, r, in]; b: [E, out, r]; PEFT's A feeds the input side unless swapped
    src_a, src_b = (b, a) if swapped else (a, b)
    n_in = H if param == GATE_UP else F
    parts = [("gate", EXPERT_GATE, F), ("up", EXPERT_UP, F)] if param == GATE_UP else [(None, EXPERT_DOWN, H)]
    out = []
    for part, gguf, n_out in parts:
        name = f"blk.{layer}.{gguf}.weight"
        if tuple(base.shapes.get(name, ())) != (E, n_out, n_in):
            raise OssggufError(f"the base ({base.what}) has {name} {list(base.shapes.get(name, ()))}, not "
                               f"{[E, n_out, n_in]}: the adapter was trained on another model")
        out += [LoraOut(f"{name}.lora_a", (E, r, n_in), "a", src_a.name, E, r, None, swapped),
                LoraOut(f"{name}.lora_b", (E, n_out, r), "b", src_b.name, E, r, part, swapped, f)]
    return out


# --- metadata and plan -------------------------------------------------------------------------------

def adapter_metadata(adapter: Adapter, alpha: float, name: str, base_repo: str | None) -> dict[str, KV]:
    """The keys llama.cpp's adapter loader reads (general.type, adapter.type, adapter.lora.alpha) and the
    general.* keys convert_lora_to_gguf.py writes."""
    kvs: dict[str, KV] = {
        "general.architecture": kv_str(ARCH),
        "general.type": kv_str("adapter"),
        "general.name": kv_str(name),
    }
    base_name = adapter.config.get("base_model_name_or_path")
    repo = base_repo or (base_name if _is_repo_id(base_name) else None)
    if repo:
        kvs["general.base_model.count"] = kv_u32(1)
        kvs["general.base_model.0.name"] = kv_str(repo.split("/")[-1])
        kvs["general.base_model.0.repo_url"] = kv_str(f"https://huggingface.co/{repo}")
    kvs["adapter.type"] = kv_str("lora")
    kvs["adapter.lora.alpha"] = kv_f32(alpha)
    kvs["general.quantization_version"] = kv_u32(2)
    kvs["ossgguf.lora.rank"] = kv_u32(int(adapter.config["r"]))
    return kvs


def _check_base_name(adapter: Adapter, base: Base, allow_other_base: bool) -> None:
    name = adapter.config.get("base_model_name_or_path")
    if allow_other_base or not base.repo or not _is_repo_id(name) or name.lower() == base.repo.lower():
        return
    raise OssggufError(f"the adapter was trained on '{name}' (adapter_config.json base_model_name_or_path), but "
                       f"the base {base.what} is '{base.repo}': pass the right --base, or --allow-other-base if "
                       "the two share weights (e.g. a re-upload)")


def plan_lora(src: str | Path, out: str | Path, base: str | Path | None = None, *, allow_other_base: bool = False,
              source_repo: str | None = None) -> WritePlan:
    """Everything a conversion of a PEFT adapter will write, decided from headers alone (--dry-run)."""
    adapter = load_adapter(src)
    b = load_base(base if base is not None else default_base(adapter))
    _check_base_name(adapter, b, allow_other_base)
    table = lora_table(adapter, b)
    alpha = float(adapter.config["lora_alpha"])
    name = source_repo.split("/")[-1] if source_repo else adapter.path.resolve().name
    kvs = adapter_metadata(adapter, alpha, name, b.repo)
    shards = plan_layout(kvs, [Tensor(t.name, LORA_TYPE, t.shape) for t in table], Path(out))
    refuse_inputs(shards, [*adapter.files, *(f for f in adapter.path.iterdir() if f.is_file())],
                  "a file of the adapter")
    folded = sorted({t.name for t in table if t.role == "b" and t.factor != 1.0})
    ranks = sorted({t.rank for t in table})
    experts = sum(1 for t in table if t.experts and t.role == "a")
    facts = {"alpha": alpha, "ranks": ranks, "scaled_lora_b": folded, "base": b.what}
    notes = [f"LoRA adapter: alpha {alpha:g}, rank {'/'.join(map(str, ranks))}, {len(table) // 2} tensor pairs "
             f"({experts} on experts); base {b.what}"]
    if folded:
        notes.append(f"{len(folded)} lora_b tensor(s) carry PEFT's own scaling (rank/alpha pattern, rsLoRA)")
    return WritePlan("convert-lora", shards, adapter.files, functools.partial(_tasks, adapter, table), {}, facts,
                     notes)


def convert_lora(src: str | Path, out: str | Path, base: str | Path | None = None, *, dry_run: bool = False,
                 force: bool = False, allow_other_base: bool = False, source_repo: str | None = None) -> WriteReport:
    """Convert a PEFT LoRA adapter folder to a GGUF adapter: plan_lora, then (unless dry_run) its run()."""
    plan = plan_lora(src, out, base, allow_other_base=allow_other_base, source_repo=source_repo)
    return WriteReport(plan) if dry_run else plan.run(force=force)


# --- producers ---------------------------------------------------------------------------------------

def _f32(reader: TensorReader, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
    e = reader.entries[name]
    raw = reader.read(name, start, count)
    return decode(raw, Q[e.dtype], e.shape[-1]).reshape(raw.shape).astype(np.float32, copy=False)


def _rows_per_task(e: TensorEntry) -> int:
    return max(2, CHUNK_BYTES // max(1, e.shape[1] * 4)) // 2 * 2  # even: gate/up rows stay paired


def _dense(reader: TensorReader, outs: list[LoraOut]) -> Iterator[Task]:
    """Rows of one PEFT tensor copied as they are (times lora_b's factor) into each output in `outs`."""
    t = outs[0]
    e = reader.entries[t.source]
    per = _rows_per_task(e)
    for start in range(0, e.shape[0], per):
        def task(start=start) -> list[Chunk]:
            x = _f32(reader, t.source, start, min(per, e.shape[0] - start))
            if t.factor != 1.0:
                x = x * np.float32(t.factor)
            x = np.ascontiguousarray(x, np.float32)
            return [(o.name, start * e.shape[1] * 4, x) for o in outs]
        yield task


def _half(rows: np.ndarray, part: str | None, axis: int) -> np.ndarray:
    return rows if part is None else rows.take(range(0 if part == "gate" else 1, rows.shape[axis], 2), axis=axis)


def _expert_a(reader: TensorReader, outs: list[LoraOut]) -> Iterator[Task]:
    """GGUF lora_a [E, r, in] of each output in `outs` (gate and up share theirs)."""
    t = outs[0]
    e = reader.entries[t.source]
    E, r = t.experts, t.rank
    if not t.swapped:  # PEFT's A [r*E, in] is expert-major: the same bytes as [E, r, in]
        yield from _dense(reader, outs)
        return

    def whole() -> list[Chunk]:  # PEFT's B [in, r*E], expert-minor: a = B_e^T for each expert
        x = _f32(reader, t.source).reshape(e.shape[0], r, E).transpose(2, 1, 0)
        return [(o.name, 0, np.ascontiguousarray(x)) for o in outs]
    yield whole


def _expert_b(reader: TensorReader, t: LoraOut) -> Iterator[Task]:
    """GGUF lora_b [E, out, r] of one output (the gate or up half of gate_up, or down)."""
    e = reader.entries[t.source]
    E, r = t.experts, t.rank
    n_out = t.shape[1]
    scale = np.float32(t.factor)
    if t.swapped:  # PEFT's A [r*E, out] expert-major: b_e = A_e^T
        for x in range(E):
            def task(x=x) -> list[Chunk]:
                rows = _half(_f32(reader, t.source, x * r, r), t.part, 1)  # [r, out]
                return [(t.name, x * n_out * r * 4, np.ascontiguousarray(rows.T * scale))]
            yield task
        return
    per = _rows_per_task(e)  # PEFT's B [out(all), r*E], expert-minor: b_e = B[:, k*E + e]
    for start in range(0, e.shape[0], per):
        def task(start=start) -> list[Chunk]:
            rows = _f32(reader, t.source, start, min(per, e.shape[0] - start))
            rows = _half(rows, t.part, 0).reshape(-1, r, E)  # [n, r, E]
            first = start // 2 if t.part else start
            return [(t.name, (x * n_out + first) * r * 4, np.ascontiguousarray(rows[:, :, x] * scale))
                    for x in range(E)]
        yield task


def _tasks(adapter: Adapter, table: list[LoraOut], files: FileReader) -> Iterator[Task]:
    reader = TensorReader(adapter.entries, files)
    shared: dict[str, list[LoraOut]] = {}
    for t in table:
        if t.role == "a" and t.experts:
            shared.setdefault(t.source, []).append(t)
    for t in table:
        if t.role == "a" and t.experts:
            if shared[t.source][0] is t:  # gate and up share one lora_a source: read it once for both
                yield from _expert_a(reader, shared[t.source])
        elif t.experts:
            yield from _expert_b(reader, t)
        else:
            yield from _dense(reader, [t])
