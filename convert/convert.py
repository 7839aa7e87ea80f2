"""Checkpoint -> GGUF in one streaming pass.

Every output tensor is produced slice by slice (a run of rows, or one expert) by tasks that the write
loop (ossgguf.gguf.stream) runs on a small thread pool, so memory is bounded by a few slices and a
checkpoint's interleaved gate/up experts are read once for both outputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ossgguf.gguf.stream import Chunk, FileReader, Task
from ossgguf.gguf.tensors import Q, Tensor
from ossgguf.gguf.write import plan_layout, refuse_inputs

from ..model import OutTensor, conversion_table, gguf_metadata
from ..quantize import mxfp4
from ..quantize.encode import decode, encode, transcode
from ..quantize.policy import DEFAULT_RECIPE, choose_types, file_type, parse_overrides
from .checkpoint import Checkpoint, checkpoint_license, load_checkpoint
from .merge import plan_merge
from .output import WritePlan, WriteReport
from .safetensors import TensorReader
from .vocab import vocab_metadata

CHUNK_BYTES = 16 * 1024 * 1024  # target size of one streamed slice (rows of a dense tensor)


def _stored_type(ckpt: Checkpoint, t: OutTensor) -> Q:
    return Q.MXFP4 if t.kind == "experts" and ckpt.layout == "mxfp4" else Q[ckpt.entries[t.source].dtype]


def plan_conversion(src: str | Path, out: str | Path, recipe: str = DEFAULT_RECIPE, tensor_types: tuple[str, ...] = (),
                    split_max_size: int | None = None, allow_fallback: bool = False,
                    source_repo: str | None = None, merge_lora: str | Path | None = None) -> WritePlan:
    """Everything a conversion will do, decided from headers alone (this is --dry-run). `merge_lora`: a PEFT
    LoRA adapter folder added into the weights (convert/merge.py)."""
    ckpt = load_checkpoint(src)
    cfg = ckpt.config
    merge = None
    if merge_lora is not None:
        merge = plan_merge(merge_lora, cfg, ckpt.path)
    table = conversion_table(cfg, ckpt.layout)
    choices = choose_types([(t.name, t.cls, t.shape, _stored_type(ckpt, t)) for t in table], recipe,
                           parse_overrides(tensor_types), allow_fallback)
    by_name = {c.name: c for c in choices}
    kvs = gguf_metadata(
        cfg, name=source_repo.split("/")[-1] if source_repo else ckpt.path.resolve().name,
        file_type=file_type(choices, {t.name: t.cls for t in table}), recipe=recipe,
        tensors=[(t.shape, t.cls) for t in table], license=checkpoint_license(ckpt.path), source_repo=source_repo,
    )
    kvs.update(vocab_metadata(ckpt.path, cfg.vocab_size, cfg.raw))
    shards = plan_layout(kvs, [Tensor(t.name, by_name[t.name].qtype, t.shape) for t in table], Path(out),
                         split_max_size)
    refuse_inputs(shards, [*ckpt.files, *(f for f in ckpt.path.iterdir() if f.is_file())], "a file of the checkpoint")
    types = {n: c.qtype for n, c in by_name.items()}
    plan = WritePlan("convert", shards, ckpt.files, functools.partial(_tasks, ckpt, table, types, merge=merge),
                     by_name, {"recipe": recipe})
    if merge is not None:
        refuse_inputs(shards, merge.files, "a file of the adapter")
        plan.sources = [*ckpt.files, *merge.files]
        plan.facts["merge_lora"] = {"adapter": str(merge.adapter.path), "tensors": sorted(merge.pairs)}
        plan.notes.append(f"merging the LoRA adapter {merge.adapter.path} into {len(merge.pairs)} tensor(s)")
        plan.after_run = merge.stats.lines
    return plan


# --- producers: tasks that each read one slice and return (output name, byte offset, bytes) ------

def _copy(reader: TensorReader, t: OutTensor, qtype: Q, merge=None) -> Iterator[Task]:
    e = reader.entries[t.source]
    if len(e.shape) == 1:  # small 1-D tensors: one slice
        yield lambda: [(t.name, 0, transcode(reader.read(t.source), Q[e.dtype], qtype, e.shape[-1]))]
        return
    rows = e.shape[0]
    per = max(1, CHUNK_BYTES // e.row_bytes)
    for start in range(0, rows, per):
        n = min(per, rows - start)

        def task(start=start, n=n) -> list[Chunk]:
            raw = reader.read(t.source, start, n)
            if merge is not None and t.name in merge:
                data = merge.merged(t.name, decode(raw, Q[e.dtype], e.shape[-1]), qtype, slice(start, start + n))
            else:
                data = transcode(raw, Q[e.dtype], qtype, e.shape[-1])
            return [(t.name, start * (data.nbytes // n), data)]

        yield task


def _bias_parts(reader: TensorReader, outs: list[OutTensor], types: dict[str, Q]) -> Iterator[Task]:
    def task() -> list[Chunk]:
        e = reader.entries[outs[0].source]
        raw = reader.read(e.name)  # [E, 2F], interleaved gate/up: small
        return [(t.name, 0, transcode(np.ascontiguousarray(raw[:, 0 if t.part == "gate" else 1::2]), Q[e.dtype],
                                      types[t.name], raw.shape[1] // 2)) for t in outs]

    yield task


def _rows(part: str | None) -> slice:
    """Rows of an expert matrix that belong to `part`: gate_up interleaves gate (even) and up (odd)."""
    return slice(None) if part in (None, "down") else slice(0 if part == "gate" else 1, None, 2)


def _experts_mxfp4(reader: TensorReader, outs: list[OutTensor], types: dict[str, Q], merge=None) -> Iterator[Task]:
    bname, sname = outs[0].source + "_blocks", outs[0].source + "_scales"
    for x in range(reader.entries[bname].shape[0]):

        def task(x=x) -> list[Chunk]:
            blocks, scales = reader.read(bname, x, 1)[0], reader.read(sname, x, 1)[0]
            chunks = []
            for t in outs:
                b, s = blocks[_rows(t.part)], scales[_rows(t.part)]
                if merge is not None and t.name in merge:  # no longer MXFP4 values: quantized again
                    data = merge.merged(t.name, mxfp4.dequantize_hf(b, s).reshape(b.shape[0], -1), types[t.name],
                                        slice(None), x)
                elif types[t.name] == Q.MXFP4:
                    data = mxfp4.repack_hf_to_ggml(b, s)  # bit for bit
                else:
                    data = encode(mxfp4.dequantize_hf(b, s), types[t.name])
                chunks.append((t.name, x * data.nbytes, data))
            return chunks

        yield task


def _experts_dense(reader: TensorReader, outs: list[OutTensor], types: dict[str, Q], merge=None) -> Iterator[Task]:
    e = reader.entries[outs[0].source]
    for x in range(e.shape[0]):

        def task(x=x) -> list[Chunk]:
            w = reader.read(e.name, x, 1)[0].T  # [in, out] -> [out, in]: GGUF rows are output features
            chunks = []
            for t in outs:
                rows = np.ascontiguousarray(w[_rows(t.part)])
                if merge is not None and t.name in merge:
                    data = merge.merged(t.name, decode(rows, Q[e.dtype], w.shape[1]), types[t.name], slice(None), x)
                else:
                    data = transcode(rows, Q[e.dtype], types[t.name], w.shape[1])
                chunks.append((t.name, x * data.nbytes, data))
            return chunks

        yield task


def _tasks(ckpt: Checkpoint, table: list[OutTensor], types: dict[str, Q], files: FileReader,
           merge=None) -> Iterator[Task]:
    reader = TensorReader(ckpt.entries, files)
    if merge is not None:
        merge.bind(files)
    groups: dict[tuple[str, str], list[OutTensor]] = {}
    for t in table:
        if t.kind == "copy":
            yield from _copy(reader, t, types[t.name], merge)
            continue
        group = groups.setdefault((t.kind, t.source), [])
        group.append(t)
        if t.part == "gate":  # gate and up share one interleaved source: read it once for both
            continue
        if t.kind == "bias_part":
            yield from _bias_parts(reader, group, types)
        elif ckpt.layout == "mxfp4":
            yield from _experts_mxfp4(reader, group, types, merge)
        else:
            yield from _experts_dense(reader, group, types, merge)


def convert(src: str | Path, out: str | Path, recipe: str = DEFAULT_RECIPE, tensor_types: tuple[str, ...] = (),
            split_max_size: int | None = None, allow_fallback: bool = False, dry_run: bool = False,
            force: bool = False, progress: Callable[[int], None] | None = None,
            source_repo: str | None = None, merge_lora: str | Path | None = None) -> WriteReport:
    """Convert a gpt-oss checkpoint folder to GGUF: plan_conversion, then (unless dry_run) its run()."""
    plan = plan_conversion(src, out, recipe, tensor_types, split_max_size, allow_fallback, source_repo,
                           merge_lora=merge_lora)
    return WriteReport(plan) if dry_run else plan.run(force=force, progress=progress)
