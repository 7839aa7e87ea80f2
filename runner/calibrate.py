"""Expert statistics from running a gpt-oss GGUF over calibration text (the `calibrate` command).

llama.cpp's graph evaluation callback (`cb_eval` in the context params, as llama-imatrix uses it)
hands over three tensors of every MoE layer as they are computed (names from llama.cpp's
build_moe_ffn, src/llama-graph.cpp): `ffn_moe_topk-N` (selected expert ids, I32 [n_used, tokens]),
`ffn_moe_weights_softmax-N` (the gate weights applied to them, F32 [1, n_used, tokens]) and
`ffn_moe_down_biased-N` (each selected expert's output, F32 [n_embd, n_used, tokens]). Per layer and
expert they are summed into quantize/stats.py's `ExpertStats` (its format, the model's identity).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ossgguf.errors import OssggufError
from ossgguf.gguf.tensors import Q
from ossgguf.limits import CALIBRATE_CHUNK
from ossgguf.quantize.stats import ExpertStats, model_identity

from .llama_ctypes import GgmlTensor, ggml_lib, tensor_data

log = logging.getLogger(__name__)

_TOPK, _WEIGHTS, _OUT = b"ffn_moe_topk-", b"ffn_moe_weights_softmax-", b"ffn_moe_down_biased-"
_WANTED = (_TOPK, _WEIGHTS, _OUT)


# --- the eval callback ---------------------------------------------------------------------------------

_NAME_OFFSET = GgmlTensor.name.offset


class _Collector:
    """Receives the MoE tensors of each ubatch and accumulates them into `stats`."""

    def __init__(self, stats: ExpertStats):
        self.stats = stats
        self.n_expert = stats.count.shape[1]
        self.pending: dict[int, dict[bytes, np.ndarray]] = {}
        self.error: BaseException | None = None
        ggml_lib()  # loaded here, not inside llama.cpp's callback

    @staticmethod
    def _read(addr: int, dtype: type) -> np.ndarray:
        t, buf = tensor_data(addr)
        want = {Q.F32: np.float32, Q.I32: np.int32}.get(t.type)
        if want is not dtype:
            raise OssggufError(f"llama.cpp's {t.name.decode()} has ggml type {t.type}, expected {dtype.__name__}: "
                               "this llama-cpp-python is not the pinned 0.3.36")
        ne, nb = list(t.ne)[:3], list(t.nb)[:3]  # views (the top-k ids) have strides of the full argsort
        n = max(1, buf.nbytes // np.dtype(dtype).itemsize)
        arr = np.lib.stride_tricks.as_strided(buf.view(dtype)[:n], shape=ne[::-1], strides=nb[::-1])
        return np.array(arr)  # [ne2, ne1, ne0]

    def __call__(self, addr: int, ask: bool, _user: int) -> bool:
        name = ctypes.string_at(addr + _NAME_OFFSET)
        if ask:
            return name.startswith(_WANTED)
        try:
            kind, _, layer = name.rpartition(b"-")
            kind += b"-"
            il = int(layer)
            slot = self.pending.setdefault(il, {})
            slot[kind] = self._read(addr, np.int32 if kind == _TOPK else np.float32)
            if len(slot) == 3:
                self._accumulate(il, self.pending.pop(il))
        except BaseException as e:  # noqa: BLE001 - a Python error must not unwind through C; re-raised after
            self.error = self.error or e
        return True  # False would stop llama.cpp's graph computation

    def _accumulate(self, il: int, t: dict[bytes, np.ndarray]) -> None:
        ids = t[_TOPK][0]  # [tokens, n_used]
        w = t[_WEIGHTS][:, :, 0]  # [tokens, n_used]
        out = t[_OUT]  # [tokens, n_used, n_embd]
        nrm = np.sqrt(np.einsum("tue,tue->tu", out, out, dtype=np.float64))
        flat, E, s = ids.ravel(), self.n_expert, self.stats
        s.count[il] += np.bincount(flat, minlength=E)
        s.gate_sum[il] += np.bincount(flat, w.ravel(), minlength=E)
        s.norm_sum[il] += np.bincount(flat, nrm.ravel(), minlength=E)
        s.reap_sum[il] += np.bincount(flat, (w * nrm).ravel(), minlength=E)
        if il == 0:
            s.tokens += len(ids)


# --- running -------------------------------------------------------------------------------------------

def default_stats_path(model: str | Path) -> Path:
    """MODEL.stats.json beside MODEL.gguf: where `calibrate` writes and extends statistics unless told."""
    model = Path(model)
    return model.with_name(model.name.removesuffix(".gguf") + ".stats.json")


@dataclass
class CalibrationReport:
    stats: ExpertStats
    done: list[str]  # files processed in this run
    skipped: list[str]  # files already in the statistics
    tokens: int = 0
    seconds: float = 0.0
    out: Path | None = None  # where the statistics were saved

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        """`calibrate --json`: this run and the statistics so far, never-selected experts by layer."""
        s = self.stats
        return {"stats": str(self.out), "tokens_total": s.tokens, "tokens_this_run": self.tokens,
                "files_done": self.done, "files_skipped": self.skipped, "tokens_per_second": self.tps,
                "never_selected": {f"blk.{i}": e for i, e in enumerate(s.never_selected()) if e}}

    def summary(self) -> str:
        """For people: files skipped, tokens and speed, never-selected experts (cut to 400 characters)."""
        s = self.stats
        name = self.out.name if self.out else "the statistics"
        lines = [f"skipped (already in {name}): {f}" for f in self.skipped]
        lines.append(f"{self.tokens:,} tokens in {self.seconds:.1f} s ({self.tps:.1f} tok/s); {s.tokens:,} tokens "
                     f"over {len(s.files)} file(s) in the statistics")
        never = s.never_selected()
        if n_never := sum(len(e) for e in never):
            lines.append(f"{n_never} experts were never selected: " + "; ".join(
                f"blk.{i}: {', '.join(map(str, e))}" for i, e in enumerate(never) if e)[:400])
        return "\n".join(lines)


def calibrate(model: str | Path, texts: Sequence[str | Path], out: str | Path | None = None,
              options: Any = None, chunk: int | None = None,
              progress: Callable[[int], None] | None = None, on_total: Callable[[int], None] | None = None,
              collect: bool = True) -> CalibrationReport:
    """Run `model` over each text file (in sequences of `chunk` tokens: by default the options' ctx, else
    limits.CALIBRATE_CHUNK) and record expert statistics.

    With `out`, statistics already there (of this model) are extended: files already processed are
    skipped, and the file is saved after each text file, so an interrupted run resumes.
    `options` are runner.plan.PlacementOptions (the hybrid placement works: the callback copies from
    any backend). `collect=False` evaluates without the callback (the benchmark's baseline).
    """
    from .plan import PlacementOptions

    texts = [Path(t) for t in texts]
    for t in texts:
        if not t.is_file():
            raise OssggufError(f"calibration text {t} does not exist")
    identity = model_identity(model)
    if options is not None and getattr(options, "lora", ()):  # adapters change routing: part of the identity
        from .lora import adapter_identity

        identity = {**identity, "lora": adapter_identity(options.lora)}
    stats = ExpertStats.empty(identity)
    if out is not None and Path(out).exists():
        stats = ExpertStats.load(out)
        stats.check_model(identity, str(out), model)
    done_sha = {f["sha256"] for f in stats.files}
    todo, skipped = [], []
    for t in texts:
        data = t.read_bytes()  # read once: hashed here, tokenized below
        sha = hashlib.sha256(data).hexdigest()
        if sha in done_sha:
            skipped.append(t)
        else:
            todo.append((t, sha, data))
        done_sha.add(sha)
    report = CalibrationReport(stats, [str(t) for t, _, _ in todo], [str(t) for t in skipped],
                               out=Path(out) if out is not None else None)
    if not todo:
        return report
    chunk = chunk or (options.ctx if options is not None else None) or CALIBRATE_CHUNK
    opts = replace(options or PlacementOptions(), ctx=chunk)
    with _Session(model, opts, collect, identity) as s:
        tokenized = [(t, sha, s.tokenize(data.decode("utf-8", errors="replace"))) for t, sha, data in todo]
        del todo
        if on_total:
            on_total(sum(len(ids) for _, _, ids in tokenized))
        t0 = time.perf_counter()
        for path, sha, ids in tokenized:
            part = ExpertStats.empty(identity)
            s.collector.stats = part
            for start in range(0, len(ids), chunk):
                s.evaluate(ids[start:start + chunk], progress)
            report.tokens += len(ids)
            part.files = [{"path": str(path), "sha256": sha, "tokens": len(ids)}]
            stats.add(part)
            if out is not None:
                stats.save(out)
            log.info("calibrated on %s: %d tokens", path, len(ids))
        report.seconds = time.perf_counter() - t0
    return report


class _Session:
    """An Engine (placed by the planner) whose eval callback feeds a _Collector."""

    def __init__(self, path: str | Path, opts: Any, collect: bool, identity: dict[str, Any]):
        from .engine import Engine

        self.collector = _Collector(ExpertStats.empty(identity))
        self.engine = Engine.load(path, opts, eval_callback=self.collector if collect else None)

    def tokenize(self, text: str) -> list[int]:
        # special=True: chat transcripts in harmony format calibrate on the real <|start|>... tokens
        return self.engine.tokenize(text, special=True)

    def evaluate(self, ids: Sequence[int], progress: Callable[[int], None] | None) -> None:
        """One sequence from position 0, in ubatches, no logits (only the routing is wanted)."""

        def step(n: int) -> None:
            self._raise_collector_error()
            if progress:
                progress(n)

        try:
            self.engine.evaluate(ids, step)
        finally:
            self._raise_collector_error()

    def _raise_collector_error(self) -> None:
        if self.collector.error is not None:
            err, self.collector.error = self.collector.error, None
            raise err

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc) -> None:
        self.engine.close()
