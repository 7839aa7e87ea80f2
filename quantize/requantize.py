"""GGUF -> GGUF with other types (the `quantize` command), streaming like the converter.

The plan (types, metadata, layout) comes from the source headers alone, so `--dry-run --json` is
exact. Each tensor is then read slice by slice with pread (nothing mapped: RSS stays bounded), and
either copied as stored (same type: MXFP4 experts stay bit for bit) or dequantized and re-encoded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

from ossgguf.gguf.read import read_gguf
from ossgguf.gguf.stream import FileReader, Task
from ossgguf.gguf.tensors import Tensor
from ossgguf.gguf.values import kv_str, kv_u32
from ossgguf.gguf.write import carried_metadata, plan_layout, refuse_inputs

from ..convert.output import WritePlan, WriteReport
from ..errors import OssggufError
from ..model import check_gpt_oss, tensor_class
from .encode import transcode
from .policy import DEFAULT_RECIPE, choose_types, file_type, parse_overrides, parse_recipe

COPY_BYTES = 16 * 1024 * 1024  # one slice of a tensor copied as stored
CONVERT_VALUES = 4 * 1024 * 1024  # one slice of a tensor re-encoded: 16 MB as float32


def plan_requantize(src_gguf: str | Path, out: str | Path, recipe: str = DEFAULT_RECIPE,
                    tensor_types: tuple[str, ...] | list[str] = (), split_max_size: int | None = None,
                    allow_fallback: bool = False) -> WritePlan:
    """Everything a requantization will do, from the source headers alone (this is --dry-run)."""
    parse_recipe(recipe)
    overrides = parse_overrides(tuple(tensor_types))
    src = read_gguf(src_gguf)
    check_gpt_oss(src)
    classes = {}
    for t in src.tensors:
        try:
            classes[t.name] = tensor_class(t.name)
        except OssggufError as e:
            raise OssggufError(f"{t.file}: {e}; is it a gpt-oss GGUF written by llama.cpp or ossgguf?") from None
    choices = choose_types([(t.name, classes[t.name], t.shape, t.qtype) for t in src.tensors], recipe, overrides,
                           allow_fallback)
    kvs = carried_metadata(src.kvs)
    kvs["general.file_type"] = kv_u32(file_type(choices, classes))  # in place when present: key order is kept
    kvs["ossgguf.recipe"] = kv_str(recipe)
    by_name = {c.name: c for c in choices}
    shards = plan_layout(kvs, [Tensor(t.name, by_name[t.name].qtype, t.shape) for t in src.tensors], Path(out),
                         split_max_size)
    sources = [f.path for f in src.files]
    refuse_inputs(shards, sources, "the input")
    return WritePlan("quantize", shards, sources, functools.partial(_tasks, src.tensors, shards), by_name,
                     {"recipe": recipe, "source": [str(p) for p in sources]})


def _tasks(sources: list[Tensor], shards, files: FileReader) -> Iterator[Task]:
    outs = {t.name: t for s in shards for t in s.tensors}
    for t in sources:
        dst = outs[t.name]
        rows, row = t.rows, t.shape[-1]
        in_row, out_row = t.nbytes // rows, dst.nbytes // rows
        per = max(1, COPY_BYTES // in_row) if t.qtype == dst.qtype else max(1, CONVERT_VALUES // row)
        for start in range(0, rows, per):
            n = min(per, rows - start)

            def task(t=t, dst=dst, start=start, n=n, in_row=in_row, out_row=out_row, row=row):
                raw = files.read(t.file, t.offset + start * in_row, n * in_row, f"'{t.name}'").reshape(n, in_row)
                return [(t.name, start * out_row, transcode(raw, t.qtype, dst.qtype, row))]

            yield task


def requantize(src_gguf: str | Path, out: str | Path, recipe: str = DEFAULT_RECIPE,
               tensor_types: tuple[str, ...] | list[str] = (), split_max_size: int | None = None,
               allow_fallback: bool = False, dry_run: bool = False, force: bool = False,
               progress: Callable[[int], None] | None = None) -> WriteReport:
    """plan_requantize then (unless dry_run) its run()."""
    plan = plan_requantize(src_gguf, out, recipe, tensor_types, split_max_size, allow_fallback)
    return WriteReport(plan) if dry_run else plan.run(force=force, progress=progress)
