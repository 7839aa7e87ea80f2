"""`convert --merge-lora ADAPTER`: a PEFT LoRA adapter added into the weights during the one streaming pass.

Each merged tensor is W + (alpha / r) · B · A, the update llama.cpp applies at run time for the GGUF adapter
that convert/lora.py would write (the same tensors: names, gate/up split, PEFT's scalings folded in), so a
merged file and base + adapter at run time compute the same function up to the storage types. Merged
experts are no longer MXFP4 values: they are quantized again (quantize/encode.py), and the error of each
expert tensor against its merged float values is measured as it is written (`MergeStats`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ossgguf.gguf.tensors import Q

from ..errors import OssggufError
from ..model import GptOssConfig, conversion_table
from ..quantize.encode import decode, encode
from .lora import Adapter, Base, LoraOut, load_adapter, lora_table
from .safetensors import TensorReader

CACHE_TENSORS = 8  # adapter tensors kept in memory as F32 (an expert lora_B of 120b: ~47 MB)


@dataclass
class MergeStats:
    """Per merged tensor: sum of squared quantization error and of squared merged values."""

    sums: dict[str, list[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, exact: np.ndarray, stored: np.ndarray) -> None:
        err = float(np.square(stored - exact, dtype=np.float64).sum())
        ref = float(np.square(exact, dtype=np.float64).sum())
        with self._lock:
            s = self.sums.setdefault(name, [0.0, 0.0])
            s[0] += err
            s[1] += ref

    def relative_rmse(self) -> dict[str, float]:
        return {n: (e / r) ** 0.5 if r else 0.0 for n, (e, r) in sorted(self.sums.items())}

    def lines(self) -> list[str]:
        rel = self.relative_rmse()
        if not rel:
            return []
        worst = max(rel, key=rel.get)
        return [f"merged and re-quantized {len(rel)} tensor(s): relative RMSE against the merged float values "
                f"median {float(np.median(list(rel.values()))):.4f}, max {rel[worst]:.4f} ({worst})"]


@dataclass
class Merge:
    """An adapter to merge into a conversion: its tensor pairs by the base GGUF tensor they change."""

    adapter: Adapter
    pairs: dict[str, tuple[LoraOut, LoraOut]]
    alpha: float
    stats: MergeStats = field(default_factory=MergeStats)
    _reader: TensorReader | None = field(default=None, repr=False)
    # adapter tensors as float32, read once each and kept (least recently used out) for every expert's task
    _cache: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def files(self) -> list[Path]:
        return self.adapter.files

    def __contains__(self, name: str) -> bool:
        return name in self.pairs

    def bind(self, files) -> None:
        """Read the adapter through the write loop's FileReader (ossgguf.gguf.stream)."""
        self._reader = TensorReader(self.adapter.entries, files)

    def delta(self, name: str, rows: slice, expert: int | None = None) -> np.ndarray:
        """(alpha / r) · b · a for rows `rows` of GGUF tensor `name` (of `expert`), float32 [rows, in]."""
        a, b = self.pairs[name]
        la = self._factor(a, expert)
        return (self._factor(b, expert)[rows] @ la) * np.float32(self.alpha / a.rank)

    def merged(self, name: str, values: np.ndarray, qtype: Q, rows: slice, expert: int | None = None) -> np.ndarray:
        """Bytes of `values` (float32 [rows, in] of the base) plus the update, stored as `qtype`; the error of
        re-quantized experts goes into `stats`."""
        exact = values + self.delta(name, rows, expert)
        data = encode(exact, qtype)
        if expert is not None and qtype not in (Q.F32,):
            self.stats.add(name, exact, decode(data, qtype, exact.shape[-1]).reshape(exact.shape))
        return data

    def _tensor(self, name: str) -> np.ndarray:
        with self._lock:  # one read per tensor, whichever worker thread asks first
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
            e = self._reader.entries[name]
            x = decode(self._reader.read(name), Q[e.dtype], e.shape[-1]).reshape(e.shape)
            self._cache[name] = x
            if len(self._cache) > CACHE_TENSORS:
                self._cache.popitem(last=False)
            return x

    def _factor(self, t: LoraOut, expert: int | None) -> np.ndarray:
        """The GGUF adapter tensor `t` (of one expert) as float32: lora_a [r, in] or lora_b [out, r] (factor in)."""
        x = self._tensor(t.source)
        if not t.experts:
            return x if t.role == "a" else x * np.float32(t.factor)
        E, r = t.experts, t.rank
        if t.role == "a":  # see convert/lora.py: PEFT's A is expert-major, its B expert-minor
            return x.reshape(x.shape[0], r, E)[:, :, expert].T if t.swapped else x[expert * r:(expert + 1) * r]
        b = x[expert * r:(expert + 1) * r].T if t.swapped else x.reshape(x.shape[0], r, E)[:, :, expert]
        if t.part is not None:
            b = b[0 if t.part == "gate" else 1::2]
        return b * np.float32(t.factor)


def plan_merge(src: str | Path, cfg: GptOssConfig, checkpoint: Path) -> Merge:
    """The adapter at `src`, checked against the checkpoint being converted (shapes and names)."""
    adapter = load_adapter(src)
    shapes = {t.name: t.shape for t in conversion_table(cfg, "bf16")}
    base = Base(shapes, cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, None, str(checkpoint))
    table = lora_table(adapter, base)
    by_name: dict[str, dict[str, LoraOut]] = {}
    for t in table:
        by_name.setdefault(t.name.rsplit(".", 1)[0], {})[t.role] = t
    pairs = {n: (d["a"], d["b"]) for n, d in by_name.items()}
    if any(len(d) != 2 for d in by_name.values()):
        raise OssggufError(f"{adapter.path}: an adapter tensor pair is incomplete")
    return Merge(adapter, pairs, float(adapter.config["lora_alpha"]))
