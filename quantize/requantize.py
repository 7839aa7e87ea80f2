"""GGUF -> GGUF with other types (the `quantize` command), streaming like the converter.

The plan (types, metadata, layout) comes from the source headers alone, so `--dry-run --json` is
exact. Each tensor is then read slice by slice with pread (nothing mapped: RSS stays bounded), and
either copied as stored (same type: MXFP4 experts stay bit for bit) or dequantized and re-encoded.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ossgguf.gguf.read import SPLIT_KEYS, GgufSet, GgufTensor, read_gguf
from ossgguf.gguf.values import KV, kv_str, kv_u32
from ossgguf.gguf.write import (
    ALIGNMENT,
    GGUFFileWriter,
    Shard,
    ShardedOutput,
    TensorInfo,
    plan_layout,
    refuse_inputs,
)

from ..convert.convert import peak_rss_bytes, pipelined
from ..convert.safetensors import TensorEntry, TensorReader
from ..errors import OssggufError
from ..model import ARCH, TensorClass, tensor_class
from . import mxfp4
from .encode import encode, to_f32
from .policy import (
    DEFAULT_RECIPE,
    FLOAT_TYPES,
    TypeChoice,
    choose_types,
    file_type,
    parse_overrides,
    parse_recipe,
)

log = logging.getLogger(__name__)
Q = GGMLQuantizationType
COPY_BYTES = 16 * 1024 * 1024  # one slice of a tensor copied as stored
CONVERT_VALUES = 4 * 1024 * 1024  # one slice of a tensor re-encoded: 16 MB as float32


@dataclass(frozen=True)
class RequantTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    cls: TensorClass
    src: GgufTensor


@dataclass
class RequantPlan(ShardedOutput):
    source: GgufSet
    tensors: list[RequantTensor]
    choices: dict[str, TypeChoice]
    shards: list[Shard]
    recipe: str

    def to_json(self) -> dict:
        """The converter's dry-run shape (ConversionPlan.to_json), plus the source file(s)."""
        return {
            **self.layout_json(),
            "recipe": self.recipe,
            "fallbacks": [{"name": c.name, "requested": c.requested.name, "type": c.qtype.name}
                          for c in self.choices.values() if c.fell_back],
            "source": [str(f.path) for f in self.source.files],
        }


@dataclass
class RequantReport:
    """Same fields as convert.ConvertReport, so convert.summarize() prints it."""

    plan: RequantPlan
    seconds: float = 0.0
    peak_rss: int = 0
    written: int = 0
    types: dict[str, int] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.written / self.seconds / 1e9 if self.seconds else 0.0


def source_metadata(src: GgufSet) -> dict[str, KV]:
    """A GGUF's metadata to carry into a rewritten file: without the split keys (the writer sets its
    own) and without an alignment other than the writer's."""
    kvs = {k: v for k, v in src.kvs.items() if k not in SPLIT_KEYS}
    if "general.alignment" in kvs and int(kvs["general.alignment"].value) != ALIGNMENT:
        del kvs["general.alignment"]  # the writer aligns to 32 (GGUF's default)
    return kvs


def _metadata(src: GgufSet, ftype: int, recipe: str) -> dict[str, KV]:
    kvs = source_metadata(src)
    kvs["general.file_type"] = kv_u32(ftype)  # in place when present: key order is kept
    kvs["ossgguf.recipe"] = kv_str(recipe)
    return kvs


def _check_encodable(choices: list[TypeChoice], stored: dict[str, GgufTensor]) -> None:
    """Refuse at plan time what encode() could not do (imatrix types, types no quantizer writes)."""
    from .kernels import row_bytes  # raises OssggufError with the reason

    for c in choices:
        if c.qtype != stored[c.name].qtype and c.qtype not in FLOAT_TYPES:
            row_bytes(c.qtype, stored[c.name].shape[-1])


def plan_requantize(src_gguf: str | Path, out: str | Path, recipe: str = DEFAULT_RECIPE,
                    tensor_types: tuple[str, ...] | list[str] = (), split_max_size: int | None = None,
                    allow_fallback: bool = False) -> RequantPlan:
    """Everything a requantization will do, from the source headers alone (this is --dry-run)."""
    parse_recipe(recipe)
    overrides = parse_overrides(tuple(tensor_types))
    src = read_gguf(src_gguf)
    arch = src.get("general.architecture")
    if arch != ARCH:
        raise OssggufError(f"{src.path} holds a '{arch}' model, not {ARCH}: ossgguf quantizes gpt-oss GGUFs only")
    out = Path(out)
    same = {f.path.resolve() for f in src.files}
    tensors = []
    for t in src.tensors:
        try:
            cls = tensor_class(t.name)
        except OssggufError as e:
            raise OssggufError(f"{t.file}: {e}; is it a gpt-oss GGUF written by llama.cpp or ossgguf?") from None
        tensors.append(RequantTensor(t.name, t.shape, cls, t))
    choices = choose_types([(t.name, t.cls, t.shape, t.src.qtype) for t in tensors], recipe, overrides, allow_fallback)
    _check_encodable(choices, {t.name: t.src for t in tensors})
    by_name = {c.name: c for c in choices}
    kvs = _metadata(src, file_type(choices, {t.name: t.cls for t in tensors}), recipe)
    shards = plan_layout(kvs, [TensorInfo(t.name, by_name[t.name].qtype, t.shape) for t in tensors], out,
                         split_max_size)
    refuse_inputs(shards, same, "the input")
    return RequantPlan(src, tensors, by_name, shards, recipe)


# --- slices ------------------------------------------------------------------------------------------

Chunk = tuple[str, int, np.ndarray]


def decode(raw: np.ndarray, qtype: Q, row: int) -> np.ndarray:
    """Stored bytes [rows, row_bytes] of `qtype` -> float32 [rows, row]."""
    if qtype in FLOAT_TYPES:
        return to_f32(raw.view({Q.BF16: "<u2", Q.F16: "<f2", Q.F32: "<f4"}[qtype]), qtype.name).reshape(-1, row)
    if qtype == Q.MXFP4:
        blocks, scales = mxfp4.repack_ggml_to_hf(raw)  # lossless nibble moves; OpenAI's dequantizer
        return mxfp4.dequantize_hf(blocks, scales).reshape(-1, row)
    import gguf.quants

    return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(-1, row)


def _reencode(raw: np.ndarray, src: Q, dst: Q, row: int) -> np.ndarray:
    if src == Q.BF16 and dst not in FLOAT_TYPES:
        try:
            from .kernels import quantize_bf16_rows  # skips widening BF16 to float32 in numpy
        except ImportError:  # pragma: no cover
            quantize_bf16_rows = None
        if quantize_bf16_rows is not None:
            return quantize_bf16_rows(raw.view("<u2").reshape(-1, row), dst)
    return encode(decode(raw, src, row), dst)


def _tasks(plan: RequantPlan, reader: TensorReader) -> Iterator[Callable[[], list[Chunk]]]:
    for t in plan.tensors:
        src, dst = t.src.qtype, plan.choices[t.name].qtype
        entry = reader.entries[t.name]
        rows, row_bytes = entry.shape
        out_row = TensorInfo(t.name, dst, t.shape).nbytes // rows
        per = max(1, COPY_BYTES // row_bytes) if src == dst else max(1, CONVERT_VALUES // t.shape[-1])
        for start in range(0, rows, per):
            n = min(per, rows - start)

            def task(t=t, src=src, dst=dst, start=start, n=n, out_row=out_row) -> list[Chunk]:
                raw = reader.read(t.name, start, n)
                data = raw if src == dst else _reencode(raw, src, dst, t.shape[-1])
                return [(t.name, start * out_row, data)]

            yield task


def run_requantize(plan: RequantPlan, force: bool = False, progress: Callable[[int], None] | None = None,
                   threads: int | None = None) -> RequantReport:
    """Write the planned GGUF file(s); they appear only when complete."""
    t0 = time.perf_counter()
    entries = {}
    for t in plan.tensors:
        rows = int(np.prod(t.shape[:-1], dtype=np.int64)) if len(t.shape) > 1 else 1
        entries[t.name] = TensorEntry(t.name, "U8", (rows, t.src.nbytes // rows), t.src.file, t.src.offset,
                                      t.src.nbytes)
    written = 0
    workers = threads or os.cpu_count() or 2
    with TensorReader(entries) as reader, GGUFFileWriter(plan.shards, force=force) as w:
        for name, off, data in pipelined(_tasks(plan, reader), workers):
            n = w.write(name, data, off)
            written += n
            if progress:
                progress(n)
        if written != plan.data_bytes:
            raise OssggufError(f"internal error: wrote {written} bytes of tensor data, planned {plan.data_bytes}")
        w.commit()
    report = RequantReport(plan, time.perf_counter() - t0, peak_rss_bytes(), written)
    for c in plan.choices.values():
        report.types[c.qtype.name] = report.types.get(c.qtype.name, 0) + 1
    log.info("wrote %s from %s in %.1fs", plan.shards[0].path, plan.source.path, report.seconds)
    return report


def requantize(src_gguf: str | Path, out: str | Path, recipe: str = DEFAULT_RECIPE,
               tensor_types: tuple[str, ...] | list[str] = (), split_max_size: int | None = None,
               allow_fallback: bool = False, dry_run: bool = False, force: bool = False,
               progress: Callable[[int], None] | None = None) -> RequantReport:
    """plan_requantize then (unless dry_run) run_requantize."""
    plan = plan_requantize(src_gguf, out, recipe, tensor_types, split_max_size, allow_fallback)
    return RequantReport(plan) if dry_run else run_requantize(plan, force=force, progress=progress)
