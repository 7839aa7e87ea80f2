"""Expert pruning: keep the K best experts of every layer (the `prune` command).

llama.cpp needs the same expert count in every layer, so K is global and each layer keeps its own
K experts, ranked by calibration statistics (quantize/stats.py, recorded by `calibrate`: REAP's
router-weighted activation or selection frequency). Every tensor with an expert axis (dim 0 in numpy order, ne[last] in GGUF:
the three expert matrices, their biases, the router's rows and bias) is sliced expert by expert as
raw bytes (each expert is one contiguous block, so quantized data is never decoded); the rest is
copied. A WritePlan as convert's and quantize's: exact from the headers (this is --dry-run), written
by the same loop (the output appears only when complete), split as theirs.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType

from ossgguf.gguf.read import GgufSet, read_gguf
from ossgguf.gguf.stream import FileReader, Task
from ossgguf.gguf.tensors import Tensor
from ossgguf.gguf.values import KV, kv_array, kv_str, kv_u32
from ossgguf.gguf.write import carried_metadata, plan_layout, refuse_inputs

from .. import limits
from ..convert.output import WritePlan
from ..errors import OssggufError
from ..model import arch_key, has_expert_axis, layer_of, read_hparams
from ..runner.plan import PlacementOptions, model_info, parse_size, plan, resolve_devices
from .stats import SCORES, ExpertStats, model_identity

COPY_BYTES = 16 * 1024 * 1024
DEVICE_CTX = 32768  # --target-device plans for this context unless told
KEY_KEPT, KEY_ORIGINAL = "ossgguf.prune.kept", "ossgguf.prune.expert_count_original"
KEY_SCORE, KEY_STATS, KEY_TOKENS = "ossgguf.prune.score", "ossgguf.prune.stats_sha256", "ossgguf.prune.calibration_tokens"
_SHA_PLACEHOLDER = "0" * 64  # a dry run without statistics: same header size as the real run


# --- planning ------------------------------------------------------------------------------------------

def _metadata(src: GgufSet, keep: int, kept: list[list[int]] | None, n_layer: int, score: str,
              stats: ExpertStats | None, stats_sha: str | None) -> dict[str, KV]:
    kvs = carried_metadata(src.kvs)
    prev = src.get(KEY_KEPT)
    n_orig = int(src.get(KEY_ORIGINAL, src.get(arch_key("expert_count"))))
    if kept is None:
        ids = np.zeros(n_layer * keep, np.int32)
    else:  # ids of the original model, also when pruning a pruned file again
        k = np.asarray(kept, np.int32)
        ids = (np.asarray(prev, np.int32).reshape(n_layer, -1)[np.arange(n_layer)[:, None], k] if prev is not None
               else k).reshape(-1)
    kvs[arch_key("expert_count")] = kv_u32(keep)  # in place: key order is kept
    kvs[KEY_ORIGINAL] = kv_u32(n_orig)
    kvs[KEY_KEPT] = kv_array(GGUFValueType.INT32, ids)  # layer-major, K per layer (GGUF has no nested arrays)
    kvs[KEY_SCORE] = kv_str(score)
    kvs[KEY_STATS] = kv_str(stats_sha or _SHA_PLACEHOLDER)
    kvs[KEY_TOKENS] = KV(GGUFValueType.UINT64, stats.tokens if stats is not None else 0)
    return kvs


def _layout(src: GgufSet, keep: int, kept, score: str, stats, stats_sha: str | None, out: Path, split: int | None):
    """The output tensors (the source's, K experts where they have an expert axis) and their shards."""
    hp = read_hparams(src)
    n_expert, n_layer = hp.n_expert, hp.n_layer
    tensors = []
    for t in src.tensors:
        shape = t.shape
        if has_expert_axis(t.name):
            if shape[0] != n_expert:
                raise OssggufError(f"{t.file}: {t.name} has {shape[0]} experts, the metadata says {n_expert}")
            shape = (keep, *shape[1:])
        tensors.append(Tensor(t.name, t.qtype, shape))
    kvs = _metadata(src, keep, kept, n_layer, score, stats, stats_sha)
    return tensors, plan_layout(kvs, tensors, out, split)


def parse_device(spec: str) -> Any:
    """'unified:64GiB', 'gpu:80GiB', 'gpu:24GiB,ram:64GiB' or 'ram:64GiB' -> runner.plan.Devices."""
    parts: dict[str, int] = {}
    for item in spec.split(","):
        kind, sep, size = item.partition(":")
        kind = kind.strip()
        if not sep or kind not in ("unified", "gpu", "ram"):
            raise OssggufError(f"cannot read --target-device '{spec}': use unified:64GiB, gpu:80GiB, "
                               "gpu:24GiB,ram:64GiB or ram:64GiB")
        parts[kind] = parse_size(size.strip())
        (limits.GPU_MEM if kind == "gpu" else limits.MEMORY).check(f"--target-device {kind}", parts[kind])
    if "unified" in parts and len(parts) > 1:
        raise OssggufError("--target-device unified:SIZE stands alone (its GPU working set is ~75% of SIZE)")
    return resolve_devices(parts.get("gpu", 0 if "ram" in parts else None), parts.get("ram", 1 << 50)
                           if "unified" not in parts else None, parts.get("unified"), detect=False)


def _device_fit(info: Any, tensors: list[Tensor], total: int, keep: int, devices, ctx: int):
    """The planner's verdict on the would-be pruned model: unified memory or a lone GPU must hold all of
    it (the GPU working set), a GPU with a RAM size may keep experts in RAM, RAM alone runs CPU-only."""
    m = replace(info, n_expert=keep, tensors=tuple(tensors), file_bytes=total)
    p = plan(m, PlacementOptions(ctx=ctx), devices=devices)
    whole_gpu = devices.unified or devices.ram_total >= 1 << 50
    ok = p.fits and (p.placement == "gpu" if whole_gpu and devices.has_gpu else True)
    return ok, p


def plan_prune(src_gguf: str | Path, out: str | Path, *, keep: int | None = None, target_size: int | None = None,
               target_device: str | None = None, ctx: int = DEVICE_CTX, stats: str | Path | ExpertStats | None = None,
               score: str = "reap", kept: list[list[int]] | None = None, split_max_size: int | None = None,
               dry_run: bool = False) -> WritePlan:
    """Everything a pruning will do, from the headers (and the statistics): this is --dry-run.

    Exactly one of keep / target_size / target_device; `kept` (per-layer expert ids) overrides the
    ranking by statistics (tests, and pruning chosen elsewhere).
    """
    if sum(x is not None for x in (keep, target_size, target_device)) != 1:
        raise OssggufError("say how many experts to keep: exactly one of --keep K, --target-size SIZE or "
                           "--target-device unified:64GiB")
    if score not in SCORES:
        raise OssggufError(f"unknown --score '{score}': use one of {', '.join(SCORES)}")
    limits.FILE_SIZE.check("target_size", target_size)
    limits.CTX.check("ctx", ctx)
    src = read_gguf(src_gguf)
    hp = read_hparams(src)  # also refuses a non-gpt-oss file
    out = Path(out)
    n_expert, n_used, n_layer = hp.n_expert, hp.n_expert_used, hp.n_layer
    st = stats if isinstance(stats, ExpertStats) or stats is None else ExpertStats.load(stats)
    if st is not None:  # hashing the routers is needed only to match statistics to this model
        st.check_model(model_identity(src), "the statistics" if isinstance(stats, ExpertStats) else str(stats),
                       src.path)
    if st is None and kept is None and not dry_run:
        raise OssggufError("pruning needs statistics to choose the experts: run `ossgguf calibrate MODEL.gguf "
                           "--text FILE... -o stats.json`, then pass --stats stats.json")
    sha = st.sha256 if st is not None else None
    devices = parse_device(target_device) if target_device is not None else None

    @functools.cache  # the search asks for the same K more than once
    def layout(k: int):
        return _layout(src, k, None, score, st, sha, out, split_max_size)

    @functools.cache
    def base_info():  # the unpruned model as the planner sees it, from the headers read above
        return model_info(src)

    @functools.cache
    def device_fit(k: int):
        tensors, shards = layout(k)
        return _device_fit(base_info(), tensors, sum(s.size for s in shards), k, devices, ctx)

    if keep is not None:
        if not n_used <= keep <= n_expert:
            raise OssggufError(f"--keep {keep} is outside {n_used}..{n_expert}: the model has {n_expert} experts "
                               f"per layer and routes every token to {n_used} of them")
        reason = f"--keep {keep}"
    else:
        def size(k: int) -> int:
            return sum(s.size for s in layout(k)[1])

        def fits(k: int) -> bool:
            return device_fit(k)[0] if target_device is not None else size(k) <= target_size

        what = f"{target_device} at a {ctx}-token context" if target_device is not None else f"{target_size:,} bytes"
        if not fits(n_used):
            raise OssggufError(f"no expert count fits {what}: even {n_used} experts per layer (the fewest, as "
                               f"many as each token uses) make {size(n_used):,} bytes; choose a larger target "
                               "or a smaller recipe")
        lo, hi = n_used, n_expert  # fits(lo) holds; sizes grow with K, so search for the largest
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        keep = lo
        reason = f"the largest K that fits {what}"
    if kept is None and st is not None:
        kept = [row[:keep] for row in st.ranking(score)]
    if kept is not None:
        if len(kept) != n_layer or any(len(set(r)) != keep or not all(0 <= e < n_expert for e in r) for r in kept):
            raise OssggufError(f"kept experts must be {n_layer} lists of {keep} distinct ids in 0..{n_expert - 1}")
        kept = [sorted(int(e) for e in r) for r in kept]
    _, shards = _layout(src, keep, kept, score, st, sha, out, split_max_size)
    sources = [f.path for f in src.files]
    refuse_inputs(shards, sources, "the input")
    d = device_fit(keep)[1] if target_device is not None else None  # kept ids change no size: the probe's plan holds
    total = sum(s.size for s in shards)
    notes = [f"keep {keep} of {n_expert} experts per layer ({reason}; score {score})",
             f"{src.size:,} -> {total:,} bytes ({100 * total / src.size:.1f}%)"]
    if kept is None:
        notes.append("experts not chosen yet: a real run needs --stats from `ossgguf calibrate`")
    elif n_expert - keep <= 16:
        notes += [f"  blk.{i}: pruned {', '.join(map(str, sorted(set(range(n_expert)) - set(row)))) or '-'}"
                  for i, row in enumerate(kept)]
    if d is not None:
        notes.append(f"planner: {'fits' if d.fits else 'DOES NOT FIT'} ({d.placement}), GPU {d.gpu_bytes / 1e9:.2f} GB "
                     f"of {d.devices.gpu_budget / 1e9:.2f} GB budget, context {d.n_ctx}")
    facts = {"source": [str(p) for p in sources], "source_bytes": src.size, "expert_count": n_expert, "keep": keep,
             "score": score, "stats_sha256": sha, "kept": kept, "reason": reason}
    if d is not None:
        facts["device_plan"] = d.to_json()
    return WritePlan("prune", shards, sources, functools.partial(_tasks, src.tensors, kept), facts=facts,
                     notes=notes, refusal=None if kept is not None else
                     "this plan has no experts chosen (made without statistics): pass --stats")


# --- writing -------------------------------------------------------------------------------------------

def _runs(ids: list[int]) -> Iterator[tuple[int, int, int]]:
    """(first source expert, first output slot, length) of each run of consecutive kept ids."""
    for _, run in itertools.groupby(enumerate(ids), lambda p: p[1] - p[0]):
        (slot, first), *rest = run
        yield first, slot, 1 + len(rest)


def _tasks(sources: list[Tensor], kept: list[list[int]], files: FileReader) -> Iterator[Task]:
    """Raw byte copies: whole tensors, or the kept experts' blocks of those with an expert axis (each
    expert one contiguous block, so quantized data is never decoded)."""
    for t in sources:
        if has_expert_axis(t.name):  # rows are experts
            rows, pieces = t.shape[0], list(_runs(kept[layer_of(t.name)]))
        else:
            rows, pieces = t.rows, [(0, 0, t.rows)]
        row_bytes = t.nbytes // rows
        per = max(1, COPY_BYTES // row_bytes)
        for first, slot, n in pieces:
            for s in range(0, n, per):
                c = min(per, n - s)

                def task(t=t, a=first + s, b=slot + s, c=c, rb=row_bytes):
                    return [(t.name, b * rb, files.read(t.file, t.offset + a * rb, c * rb, f"'{t.name}'"))]

                yield task
