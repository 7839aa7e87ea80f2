"""Open a Hugging Face gpt-oss checkpoint folder and check it against its config before any work."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import OssggufError
from ..model import GptOssConfig, hf_tensor_shapes
from .safetensors import TensorEntry, read_header

INDEX = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    path: Path
    config: GptOssConfig
    entries: dict[str, TensorEntry]
    layout: str  # "mxfp4" (experts in blocks + scales) or "bf16" (dequantized fine-tune)

    @property
    def files(self) -> list[Path]:
        return sorted({e.file for e in self.entries.values()})


def _safetensors_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            raise OssggufError(f"{index} is malformed (no weight_map): download it again") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise OssggufError(
                f"{INDEX} names {len(missing)} shard(s) missing from {path}: {', '.join(missing[:3])}"
                f"{' ...' if len(missing) > 3 else ''}; download the checkpoint again (ossgguf download REPO)"
            )
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise OssggufError(f"no .safetensors files in {path}: is this a Hugging Face checkpoint folder?")
    return files


def read_config(folder: Path, hint: str) -> tuple[dict, GptOssConfig]:
    """A checkpoint folder's config.json, raw and parsed; `hint` says what to do when it is missing."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise OssggufError(f"config.json not found in {folder}: {hint}")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OssggufError(f"{cfg_path} is not valid JSON: {e}") from None
    return raw, GptOssConfig.from_dict(raw, where=str(cfg_path))


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise OssggufError(f"{path} is not a folder: pass a checkpoint folder or a Hugging Face repo id")
    _, config = read_config(path, "download the checkpoint with `ossgguf download REPO`")

    entries: dict[str, TensorEntry] = {}
    for f in _safetensors_files(path):
        for name, e in read_header(f).items():
            if name in entries:
                raise OssggufError(f"tensor '{name}' appears in both {entries[name].file.name} and {f.name}")
            entries[name] = e

    blocks = {n[: -len("_blocks")] for n in entries if n.endswith("_blocks")}
    scales = {n[: -len("_scales")] for n in entries if n.endswith("_scales")}
    if blocks != scales:
        odd = sorted(blocks ^ scales)[0]
        which = "_scales" if odd in blocks else "_blocks"
        raise OssggufError(f"MXFP4 tensor '{odd}' has no '{which}' partner: the checkpoint is incomplete")
    layout = "mxfp4" if blocks else "bf16"

    expected = hf_tensor_shapes(config, layout)
    missing = [n for n in expected if n not in entries]
    extra = [n for n in entries if n not in expected]
    if missing:
        raise OssggufError(
            f"{len(missing)} tensor(s) that config.json implies are not in the checkpoint, e.g. {missing[0]}: "
            "is a shard missing, or does config.json belong to another model?"
        )
    if extra:
        raise OssggufError(
            f"{len(extra)} tensor(s) that a gpt-oss checkpoint does not have, e.g. {extra[0]}: "
            "ossgguf converts gpt-oss checkpoints in the Hugging Face layout only"
        )
    for name, shape in expected.items():
        e = entries[name]
        if e.shape != shape:
            raise OssggufError(
                f"tensor '{name}' has shape {list(e.shape)} in {e.file.name}, but config.json implies {list(shape)}"
            )
        quant = name.endswith(("_blocks", "_scales"))
        if quant != (e.dtype == "U8") or (not quant and e.dtype not in ("BF16", "F16", "F32")):
            raise OssggufError(f"tensor '{name}' has unexpected dtype {e.dtype} in {e.file.name}")
    return Checkpoint(path, config, entries, layout)


def checkpoint_license(path: Path) -> str | None:
    """The `license:` of the model card's YAML front matter, if the folder has a README.md."""
    readme = path / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    lic = re.search(r"^license:\s*(\S+)", m.group(1), re.M) if m else None
    return lic.group(1).strip("'\"") if lic else None
