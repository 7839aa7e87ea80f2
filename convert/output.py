"""The one plan and report of the commands that write a GGUF: convert, quantize and prune.

A plan is decided from headers alone, so `--dry-run` shows exactly what a real run writes: the
shards (ossgguf.gguf.write.plan_layout), the type chosen for each tensor and why, and the facts of
the command that made it. `run()` streams the tensors through ossgguf.gguf.stream.stream_write.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ossgguf.gguf.stream import FileReader, Task, stream_write
from ossgguf.gguf.tensors import Tensor
from ossgguf.gguf.write import Shard

from ..errors import OssggufError
from ..model import TensorClass, tensor_class

if TYPE_CHECKING:
    from ..quantize.policy import TypeChoice

log = logging.getLogger(__name__)


@dataclass
class WritePlan:
    command: str  # convert, quantize or prune: names the progress bar and the log line
    shards: list[Shard]
    sources: list[Path]  # the files the tasks read
    tasks: Callable[[FileReader], Iterator[Task]] = field(repr=False)
    choices: dict[str, TypeChoice] = field(default_factory=dict)  # the type of each tensor, and why
    facts: dict[str, Any] = field(default_factory=dict)  # the command's own --dry-run --json fields
    notes: list[str] = field(default_factory=list)  # ... and summary lines
    refusal: str | None = None  # why this plan can be shown but not written
    after_run: Callable[[], list[str]] | None = field(default=None, repr=False)  # summary lines measured while writing

    @property
    def tensors(self) -> list[Tensor]:
        return [t for s in self.shards for t in s.tensors]

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        """`--dry-run --json` (docs/converting.md): exact total bytes, the files, each tensor with its GGUF type,
        GGUF-order shape, bytes and class; then the fallbacks taken and the command's own fields."""
        out = {
            "total_bytes": self.total_bytes,
            "files": [{"path": str(s.path), "bytes": s.size, "tensors": len(s.tensors)} for s in self.shards],
            "tensors": [{"name": t.name, "type": t.qtype.name, "shape": list(reversed(t.shape)), "bytes": t.nbytes,
                         "class": tensor_class(t.name).value} for t in self.tensors],
            **self.facts,
        }
        if self.choices:
            out["fallbacks"] = [{"name": c.name, "requested": c.requested.name, "type": c.qtype.name}
                                for c in self.choices.values() if c.fell_back]
        return out

    def summary(self, report: WriteReport | None = None) -> str:
        """For people: the command's notes, types and bytes per tensor class, the files, the fallbacks
        taken and, after a run, its speed."""
        by_class: dict[TensorClass, tuple[int, set[str]]] = {}
        for t in self.tensors:
            n, types = by_class.get(tensor_class(t.name), (0, set()))
            by_class[tensor_class(t.name)] = (n + t.nbytes, types | {t.qtype.name})
        lines = [*self.notes, f"{'class':<10} {'types':<14} {'bytes':>16}"]
        lines += [f"{c.value:<10} {','.join(sorted(by_class[c][1])):<14} {by_class[c][0]:>16,}"
                  for c in TensorClass if c in by_class]
        lines.append(f"{len(self.tensors)} tensors, {self.total_bytes:,} bytes in {len(self.shards)} file(s): "
                     + ", ".join(str(s.path) for s in self.shards))
        lines += [f"fallback: {c.name} asked {c.requested.name}, stored as {c.qtype.name} (rows do not fit)"
                  for c in self.choices.values() if c.fell_back]
        if report is not None and self.after_run is not None:
            lines += self.after_run()
        if report is not None and report.seconds:
            lines.append(f"{report.seconds:.1f} s, {report.gbps:.2f} GB/s, peak RSS {report.peak_rss / 2**20:.0f} MiB")
        return "\n".join(lines)

    def run(self, force: bool = False, progress: Callable[[int], None] | None = None) -> WriteReport:
        """Write the planned file(s); they appear only when complete."""
        if self.refusal:
            raise OssggufError(self.refusal)
        t0 = time.perf_counter()
        with FileReader(self.sources) as files:
            written = stream_write(self.shards, self.tasks(files), force=force, progress=progress)
        # Linux reports the peak RSS in KiB
        report = WriteReport(self, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                             written)
        log.info("%s wrote %s in %.1f s", self.command, self.shards[0].path, report.seconds)
        return report


@dataclass
class WriteReport:
    plan: WritePlan
    seconds: float = 0.0
    peak_rss: int = 0
    written: int = 0

    @property
    def gbps(self) -> float:
        return self.written / self.seconds / 1e9 if self.seconds else 0.0

    def summary(self) -> str:
        return self.plan.summary(self)
