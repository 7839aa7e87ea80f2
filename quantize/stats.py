"""The statistics `calibrate` records and `prune` ranks experts by, and the identity that ties them to a model.

Per [layer, expert]: selections, gate weights, output norms and gate x norm (REAP's score, Lasby et
al. 2025, is the last divided by the selections), with the model's identity (its MoE shape and a hash
of the router tensors, which every recipe keeps F32) so that `prune` refuses statistics of another
model, and the text files done, so that a run over many files can be resumed. runner/calibrate.py
fills them from llama.cpp's graph; this module needs neither llama.cpp nor the runner.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ossgguf.gguf.read import GgufSet, read_gguf

from ..errors import OssggufError
from ..model import ARCH, read_hparams, router_names

STATS_VERSION = 1
SCORES = ("reap", "frequency")


# --- identity ------------------------------------------------------------------------------------------

def moe_shape(g: GgufSet) -> dict[str, Any]:
    """A gpt-oss GGUF's MoE shape as statistics files record it (OssggufError for another architecture)."""
    hp = read_hparams(g)
    return {"architecture": ARCH, "block_count": hp.n_layer, "expert_count": hp.n_expert,
            "expert_used_count": hp.n_expert_used, "embedding_length": hp.n_embd}


def model_identity(src: GgufSet | str | Path) -> dict[str, Any]:
    """What makes statistics belong to a model: its MoE shape and the bytes of its routers."""
    g = src if isinstance(src, GgufSet) else read_gguf(src)
    shape = moe_shape(g)
    by_name = {t.name: t for t in g.tensors}
    h = hashlib.sha256()
    for name in router_names(shape["block_count"]):
        t = by_name.get(name)
        if t is None:
            raise OssggufError(f"{g.path} has no {name} tensor: is it a complete gpt-oss GGUF?")
        with open(t.file, "rb") as f:
            f.seek(t.offset)
            h.update(f.read(t.nbytes))
    return {**shape, "router_sha256": h.hexdigest()}


# --- statistics ----------------------------------------------------------------------------------------

@dataclass
class ExpertStats:
    """Sums per [layer, expert]; scores are means over the tokens routed to each expert."""

    identity: dict[str, Any]
    count: np.ndarray  # selections (int64)
    gate_sum: np.ndarray  # sum of gate weights g_j(x) over the tokens routed to j
    norm_sum: np.ndarray  # sum of ||expert_j(x)||_2
    reap_sum: np.ndarray  # sum of g_j(x) * ||expert_j(x)||_2
    tokens: int = 0
    files: list[dict[str, Any]] = field(default_factory=list)  # {"path", "sha256", "tokens"}

    @classmethod
    def empty(cls, identity: dict[str, Any]) -> ExpertStats:
        shape = (identity["block_count"], identity["expert_count"])
        return cls(identity, np.zeros(shape, np.int64), *(np.zeros(shape) for _ in range(3)))

    def add(self, other: ExpertStats) -> None:
        self.count += other.count
        self.gate_sum += other.gate_sum
        self.norm_sum += other.norm_sum
        self.reap_sum += other.reap_sum
        self.tokens += other.tokens
        self.files += other.files

    def scores(self, kind: str = "reap") -> np.ndarray:
        """[layer, expert]; higher is more worth keeping. Never-selected experts score 0."""
        if kind == "frequency":
            return self.count.astype(np.float64)
        if kind == "reap":
            return np.divide(self.reap_sum, self.count, out=np.zeros_like(self.reap_sum), where=self.count > 0)
        raise OssggufError(f"unknown score '{kind}': use one of {', '.join(SCORES)}")

    def ranking(self, kind: str = "reap") -> np.ndarray:
        """Expert ids per layer, best first: by score, ties by selections, then by gate weight."""
        s, c, g = self.scores(kind), self.count, self.gate_sum
        return np.stack([np.lexsort((g[i], c[i], s[i]))[::-1] for i in range(len(s))])

    def never_selected(self) -> list[list[int]]:
        return [np.flatnonzero(row == 0).tolist() for row in self.count]

    def to_json(self) -> dict[str, Any]:
        return {"version": STATS_VERSION, "identity": self.identity, "tokens": self.tokens, "files": self.files,
                "count": self.count.tolist(), "gate_sum": self.gate_sum.tolist(),
                "norm_sum": self.norm_sum.tolist(), "reap_sum": self.reap_sum.tolist(),
                "reap": self.scores("reap").tolist()}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        """Atomically: an interrupted save never leaves half a file."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(self.to_json()))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> ExpertStats:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            if d.get("version") != STATS_VERSION:
                raise ValueError(f"version {d.get('version')}")
            return cls(d["identity"], np.asarray(d["count"], np.int64), np.asarray(d["gate_sum"], float),
                       np.asarray(d["norm_sum"], float), np.asarray(d["reap_sum"], float), int(d["tokens"]),
                       list(d["files"]))
        except FileNotFoundError:
            raise OssggufError(f"{path} does not exist: make statistics with `ossgguf calibrate`") from None
        except (ValueError, KeyError, TypeError) as e:
            raise OssggufError(f"{path} is not an `ossgguf calibrate` statistics file ({e})") from None

    def check_model(self, identity: dict[str, Any], where: str, model: str | Path) -> None:
        if self.identity != identity:
            diff = [k for k in {**self.identity, **identity} if self.identity.get(k) != identity.get(k)]
            raise OssggufError(f"{where} holds statistics of another model than {model} (differs in "
                               f"{', '.join(diff)}): calibrate this model with `ossgguf calibrate`")
