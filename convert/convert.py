"""Checkpoint -> GGUF in one streaming pass.

Every output tensor is produced slice by slice (a run of rows, or one expert) by tasks on a small
thread pool and written with pwrite at the offset the precomputed layout gives it, so memory is
bounded by a few slices and a checkpoint's interleaved gate/up experts are read once for both outputs.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ossgguf.gguf.write import GGUFFileWriter, Shard, ShardedOutput, TensorInfo, plan_layout, refuse_inputs

from ..errors import OssggufError
from ..model import ARCH, OutTensor, TensorClass, conversion_table, gguf_metadata
from ..quantize import mxfp4
from ..quantize.encode import encode, to_f32
from ..quantize.policy import DEFAULT_RECIPE, TypeChoice, choose_types, file_type, parse_overrides
from .checkpoint import Checkpoint, checkpoint_license, load_checkpoint
from .safetensors import TensorReader
from .vocab import vocab_metadata

log = logging.getLogger(__name__)
Q = GGMLQuantizationType
CHUNK_BYTES = 16 * 1024 * 1024  # target size of one streamed slice (rows of a dense tensor)


@dataclass
class ConversionPlan(ShardedOutput):
    checkpoint: Checkpoint
    tensors: list[OutTensor]
    choices: dict[str, TypeChoice]
    shards: list[Shard]
    recipe: str

    def to_json(self) -> dict:
        return {
            **self.layout_json(),
            "recipe": self.recipe,
            "fallbacks": [{"name": c.name, "requested": c.requested.name, "type": c.qtype.name}
                          for c in self.choices.values() if c.fell_back],
        }


@dataclass
class ConvertReport:
    plan: ConversionPlan
    seconds: float = 0.0
    peak_rss: int = 0
    written: int = 0

    @property
    def gbps(self) -> float:
        return self.written / self.seconds / 1e9 if self.seconds else 0.0


def _stored_type(ckpt: Checkpoint, t: OutTensor) -> Q:
    if t.kind == "experts" and ckpt.layout == "mxfp4":
        return Q.MXFP4
    e = ckpt.entries[t.source]
    return Q[e.dtype]


def plan_conversion(src: str | Path, out: str | Path, recipe: str = DEFAULT_RECIPE, tensor_types: tuple[str, ...] = (),
                    split_max_size: int | None = None, allow_fallback: bool = False,
                    source_repo: str | None = None, name: str | None = None) -> ConversionPlan:
    """Everything a conversion will do, decided from headers alone (this is --dry-run)."""
    ckpt = load_checkpoint(src)
    cfg = ckpt.config
    table = conversion_table(cfg, ckpt.layout)
    choices = choose_types([(t.name, t.cls, t.shape, _stored_type(ckpt, t)) for t in table], recipe,
                           parse_overrides(tensor_types), allow_fallback)
    by_name = {c.name: c for c in choices}
    infos = [TensorInfo(t.name, by_name[t.name].qtype, t.shape) for t in table]
    kvs = gguf_metadata(
        cfg, name=name or (source_repo.split("/")[-1] if source_repo else ckpt.path.resolve().name),
        file_type=file_type(choices, {t.name: t.cls for t in table}), recipe=recipe,
        tensors=[(t.shape, t.cls) for t in table], license=checkpoint_license(ckpt.path), source_repo=source_repo,
    )
    kvs.update(vocab_metadata(ckpt.path, cfg.vocab_size, cfg.raw))
    shards = plan_layout(kvs, infos, Path(out), split_max_size)
    refuse_inputs(shards, [*ckpt.files, *(f for f in ckpt.path.iterdir() if f.is_file())], "a file of the checkpoint")
    return ConversionPlan(ckpt, table, by_name, shards, recipe)


# --- producers: tasks that each read one slice and return (output name, byte offset, bytes) ------

Chunk = tuple[str, int, np.ndarray]
Task = Callable[[], list[Chunk]]


def _copy(reader: TensorReader, t: OutTensor, qtype: Q) -> Iterator[Task]:
    e = reader.entries[t.source]
    if len(e.shape) == 1:  # small 1-D tensors: one slice
        yield lambda: [(t.name, 0, _convert_raw(reader.read(t.source), e.dtype, qtype, e.shape[-1]))]
        return
    rows = e.shape[0]
    per = max(1, CHUNK_BYTES // e.row_bytes)
    for start in range(0, rows, per):
        n = min(per, rows - start)

        def task(start=start, n=n) -> list[Chunk]:
            data = _convert_raw(reader.read(t.source, start, n), e.dtype, qtype, e.shape[-1])
            return [(t.name, start * (data.nbytes // n), data)]

        yield task


def _convert_raw(raw: np.ndarray, dtype: str, qtype: Q, row: int) -> np.ndarray:
    if Q[dtype] == qtype:
        return raw.view(np.uint8)  # lossless: the stored bytes as they are
    return encode(to_f32(raw, dtype).reshape(-1, row), qtype)


def _bias_parts(reader: TensorReader, outs: list[OutTensor], types: dict[str, Q]) -> Iterator[Task]:
    def task() -> list[Chunk]:
        e = reader.entries[outs[0].source]
        raw = reader.read(e.name)  # [E, 2F], interleaved gate/up: small
        return [(t.name, 0, encode(to_f32(np.ascontiguousarray(raw[:, 0 if t.part == "gate" else 1::2]), e.dtype),
                                   types[t.name])) for t in outs]

    yield task


def _rows(part: str | None) -> slice:
    """Rows of an expert matrix that belong to `part`: gate_up interleaves gate (even) and up (odd)."""
    return slice(None) if part in (None, "down") else slice(0 if part == "gate" else 1, None, 2)


def _experts_mxfp4(reader: TensorReader, outs: list[OutTensor], types: dict[str, Q]) -> Iterator[Task]:
    bname, sname = outs[0].source + "_blocks", outs[0].source + "_scales"
    for x in range(reader.entries[bname].shape[0]):

        def task(x=x) -> list[Chunk]:
            blocks, scales = reader.read(bname, x, 1)[0], reader.read(sname, x, 1)[0]
            chunks = []
            for t in outs:
                b, s = blocks[_rows(t.part)], scales[_rows(t.part)]
                if types[t.name] == Q.MXFP4:
                    data = mxfp4.repack_hf_to_ggml(b, s)  # bit for bit
                else:
                    data = encode(mxfp4.dequantize_hf(b, s), types[t.name])
                chunks.append((t.name, x * data.nbytes, data))
            return chunks

        yield task


def _experts_dense(reader: TensorReader, outs: list[OutTensor], types: dict[str, Q]) -> Iterator[Task]:
    e = reader.entries[outs[0].source]
    for x in range(e.shape[0]):

        def task(x=x) -> list[Chunk]:
            w = reader.read(e.name, x, 1)[0].T  # [in, out] -> [out, in]: GGUF rows are output features
            chunks = []
            for t in outs:
                data = _convert_raw(np.ascontiguousarray(w[_rows(t.part)]), e.dtype, types[t.name], w.shape[1])
                chunks.append((t.name, x * data.nbytes, data))
            return chunks

        yield task


def _tasks(plan: ConversionPlan, reader: TensorReader) -> Iterator[Task]:
    types = {n: c.qtype for n, c in plan.choices.items()}
    groups: dict[tuple[str, str], list[OutTensor]] = {}
    for t in plan.tensors:
        if t.kind == "copy":
            yield from _copy(reader, t, types[t.name])
            continue
        group = groups.setdefault((t.kind, t.source), [])
        group.append(t)
        if t.part == "gate":  # gate and up share one interleaved source: read it once for both
            continue
        if t.kind == "bias_part":
            yield from _bias_parts(reader, group, types)
        elif plan.checkpoint.layout == "mxfp4":
            yield from _experts_mxfp4(reader, group, types)
        else:
            yield from _experts_dense(reader, group, types)


def pipelined(tasks: Iterator[Task], workers: int) -> Iterator[Chunk]:
    """Run tasks on a thread pool (reads and numpy release the GIL), results in order, at most
    2 x workers slices in flight, which bounds memory."""
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert") as ex:
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


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_conversion(plan: ConversionPlan, force: bool = False, progress: Callable[[int], None] | None = None,
                   threads: int | None = None) -> ConvertReport:
    """Write the planned GGUF file(s). The output appears only when complete."""
    t0 = time.perf_counter()
    written = 0
    workers = threads or os.cpu_count() or 2
    with TensorReader(plan.checkpoint.entries) as reader, GGUFFileWriter(plan.shards, force=force) as w:
        for name, off, data in pipelined(_tasks(plan, reader), workers):
            n = w.write(name, data, off)
            written += n
            if progress:
                progress(n)
        if written != plan.data_bytes:
            raise OssggufError(f"internal error: wrote {written} bytes of tensor data, planned {plan.data_bytes}")
        w.commit()
    report = ConvertReport(plan, time.perf_counter() - t0, peak_rss_bytes(), written)
    log.info("wrote %s (%s) in %.1fs", plan.shards[0].path, ARCH, report.seconds)
    return report


def summarize(report: ConvertReport) -> str:
    plan = report.plan
    by_class: dict[str, tuple[int, set]] = {}
    infos = {t.name: t for s in plan.shards for t in s.tensors}
    for t in plan.tensors:
        n, types = by_class.get(t.cls.value, (0, set()))
        types.add(infos[t.name].qtype.name)
        by_class[t.cls.value] = (n + infos[t.name].nbytes, types)
    lines = [f"{'class':<10} {'types':<14} {'bytes':>16}"]
    for cls in TensorClass:
        if cls.value in by_class:
            n, types = by_class[cls.value]
            lines.append(f"{cls.value:<10} {','.join(sorted(types)):<14} {n:>16,}")
    files = ", ".join(str(s.path) for s in plan.shards)
    lines.append(
        f"{len(plan.tensors)} tensors, {plan.total_bytes:,} bytes in {len(plan.shards)} file(s): {files}")
    if report.seconds:
        lines.append(f"{report.seconds:.1f} s, {report.gbps:.2f} GB/s, peak RSS {report.peak_rss / 2**20:.0f} MiB")
    fb = [c for c in plan.choices.values() if c.fell_back]
    for c in fb:
        lines.append(f"fallback: {c.name} asked {c.requested.name}, stored as {c.qtype.name} (rows do not fit)")
    return "\n".join(lines)


def convert(src: str | Path, out: str | Path, recipe: str = DEFAULT_RECIPE, tensor_types: tuple[str, ...] = (),
            split_max_size: int | None = None, allow_fallback: bool = False, dry_run: bool = False,
            force: bool = False, progress: Callable[[int], None] | None = None,
            source_repo: str | None = None) -> ConvertReport:
    """Convert a gpt-oss checkpoint folder to GGUF (see plan_conversion / run_conversion)."""
    plan = plan_conversion(src, out, recipe, tensor_types, split_max_size, allow_fallback, source_repo)
    if dry_run:
        return ConvertReport(plan)
    return run_conversion(plan, force=force, progress=progress)


