"""LoRA adapters at run time: `--lora adapter.gguf[:SCALE]` on run, chat, serve, compare and calibrate.

llama.cpp loads an adapter against a model (`llama_adapter_lora_init`: it checks the architecture and
every tensor's shape, and allocates the adapter next to the tensors it changes) and applies a whole list
of them to a context at once (`llama_set_adapters_lora(ctx, adapters, n, scales)`); adapters live as long
as their model, which frees them. The planner counts an adapter's tensors where their base tensors live
(`with_adapters`), as llama.cpp places them.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ossgguf.errors import OssggufError
from ossgguf.model import ARCH

from .llama_ctypes import LLAMA_LOG, llama_cpp_module

if TYPE_CHECKING:
    from .plan import ModelInfo


@dataclass(frozen=True)
class LoraSpec:
    """One adapter and its scale (1.0: as trained; 0: off; negative values subtract it)."""

    path: Path
    scale: float = 1.0

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


def parse_lora(text: str | LoraSpec) -> LoraSpec:
    """`adapter.gguf` or `adapter.gguf:SCALE` (a path holding ':' takes the scale after the last one)."""
    if isinstance(text, LoraSpec):
        return text
    path, scale = str(text), 1.0
    head, sep, tail = path.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass  # a ':' that belongs to the path
    p = Path(path).expanduser()
    if not p.is_file():
        raise OssggufError(f"--lora {text}: no such file (a GGUF adapter from `ossgguf convert-lora`, "
                           "optionally :SCALE)")
    if not -100.0 <= scale <= 100.0 or scale != scale:
        raise OssggufError(f"--lora {text}: scale {tail} is out of range (-100 to 100)")
    return LoraSpec(p, scale)


def read_adapter(path: Path):
    """The adapter's GGUF headers, checked: a gpt-oss LoRA adapter (general.type adapter, adapter.type lora)."""
    from ossgguf.gguf.read import read_gguf_file

    g = read_gguf_file(path)
    kind, arch = g.get("general.type"), g.get("general.architecture")
    if kind != "adapter" or g.get("adapter.type") != "lora":
        raise OssggufError(f"{path} is not a LoRA adapter (general.type {kind!r}): convert a PEFT adapter with "
                           "`ossgguf convert-lora`")
    if arch != ARCH:
        raise OssggufError(f"{path} is an adapter for a '{arch}' model, not {ARCH}")
    return g


def adapter_identity(loras: Sequence[LoraSpec | str]) -> list[dict]:
    """What ties statistics (calibrate) to a set of adapters: each file's name, bytes' sha256 and scale."""
    import hashlib

    out = []
    for spec in map(parse_lora, loras):
        h = hashlib.sha256()
        with open(spec.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out.append({"file": spec.path.name, "sha256": h.hexdigest(), "scale": spec.scale})
    return out


def with_adapters(model: ModelInfo, loras: Sequence[LoraSpec | str]) -> ModelInfo:
    """The model's tensors plus the adapters' (`NAME.lora_a/b` has NAME's class and layer, so each byte
    is counted on the device of the tensor it changes, as llama-adapter.cpp allocates it)."""
    extra = []
    names = {t.name for t in model.tensors}
    for spec in map(parse_lora, loras):
        for t in read_adapter(spec.path).tensors:
            base = t.name.removesuffix(".lora_a").removesuffix(".lora_b")
            if base not in names:
                raise OssggufError(f"{spec.path}: the adapter changes {base}, which {model.path.name} does not have: "
                                   "is it an adapter for another model?")
            extra.append(t)
    return dataclasses.replace(model, tensors=model.tensors + tuple(extra))


class Adapters:
    """Adapters loaded against one llama_model (freed with it) and set on its context."""

    def __init__(self, model: int, loras: Sequence[LoraSpec | str]):
        self.specs = [parse_lora(s) for s in loras]
        self._handles: list = []
        self._set: tuple | None = None  # the scales last set on the context (None: never set)
        lc = llama_cpp_module()
        for spec in self.specs:
            read_adapter(spec.path)  # a clear message before llama.cpp's own
            h = lc.llama_adapter_lora_init(model, str(spec.path).encode())
            if not h:
                raise OssggufError(f"llama.cpp could not load the adapter {spec.path}: {LLAMA_LOG.last_errors()}")
            self._handles.append(h)

    def apply(self, ctx: int, scales: Sequence[float | None] | None = None) -> bool:
        """Set the adapters on `ctx` at their scales (or `scales`, one per adapter, None leaving it out):
        llama.cpp replaces the whole list. Returns whether the set changed."""
        scales = tuple(s.scale for s in self.specs) if scales is None else tuple(scales)
        if len(scales) != len(self._handles):
            raise OssggufError(f"{len(scales)} scales for {len(self._handles)} adapters")
        if scales == self._set:
            return False
        lc = llama_cpp_module()
        on = [(h, s) for h, s in zip(self._handles, scales) if s is not None]
        n = len(on)
        arr = (lc.llama_adapter_lora_p_ctypes * max(n, 1))(*(h for h, _ in on))
        sc = (ctypes.c_float * max(n, 1))(*(s for _, s in on))
        if lc.llama_set_adapters_lora(ctx, arr, n, sc) != 0:
            raise OssggufError(f"llama.cpp refused the adapters: {LLAMA_LOG.last_errors()}")
        self._set = scales
        return True

    @property
    def active(self) -> list[tuple[str, float]]:
        """(path, scale) of each adapter set on the context, in order (a prompt cache key)."""
        return [(str(spec.path), s) for spec, s in zip(self.specs, self._set or ()) if s is not None]

    @property
    def nbytes(self) -> int:
        from ossgguf.gguf.read import read_gguf_file

        return sum(t.nbytes for s in self.specs for t in read_gguf_file(s.path).tensors)


NONE = "none"  # the model id suffix of the base alone


def adapter_models(name: str, specs: Sequence[LoraSpec]) -> dict[str, tuple]:
    """The server's model ids for a base NAME and its loaded adapters -> the scales each id sets:
    NAME+ADAPTER (that adapter alone, at its --lora scale) for each adapter, NAME+none (the base alone).
    NAME itself keeps every adapter as loaded."""
    out: dict[str, tuple] = {}
    for i, spec in enumerate(specs):
        stem = spec.path.name.removesuffix(".gguf")
        out[f"{name}+{stem}"] = tuple(s.scale if j == i else None for j, s in enumerate(specs))
    out[f"{name}+{NONE}"] = tuple(None for _ in specs)
    return out


def apply_adapters(model: int, ctx: int, loras: Sequence[LoraSpec | str]) -> Adapters | None:
    """Load `loras` against `model` and set them on `ctx` (None when there are none)."""
    if not loras:
        return None
    adapters = Adapters(model, loras)
    adapters.apply(ctx)
    return adapters
