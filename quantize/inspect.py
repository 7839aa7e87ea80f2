"""What a GGUF holds (the `inspect` command): real tensor types, parameters, bytes and bits per weight
by tensor class, the files of a split set, and the metadata with the token arrays shown as counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType, LlamaFileType

from ossgguf.gguf.read import GgufSet, read_gguf

from ..model import TensorClass, tensor_class

MAX_ARRAY = 16  # longer arrays (tokens, merges, token types) are shown as their element type and count
OTHER = "other"  # tensors that are not gpt-oss's (inspect reads any GGUF)


def _value(kv) -> Any:
    if kv.type == GGUFValueType.FLOAT32:
        return float(str(np.float32(kv.value)))  # 1e-05, not 9.999999747378752e-06
    if kv.type != GGUFValueType.ARRAY:
        return kv.value
    if len(kv.value) > MAX_ARRAY:
        return {"array": kv.sub.name, "count": len(kv.value)}
    return kv.value.tolist() if isinstance(kv.value, np.ndarray) else list(kv.value)


def _group(rows: list[tuple[str, str, int, int]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, qtype, params, nbytes in rows:
        g = out.setdefault(key, {"tensors": 0, "types": {}, "params": 0, "bytes": 0})
        g["tensors"] += 1
        g["types"][qtype] = g["types"].get(qtype, 0) + 1
        g["params"] += params
        g["bytes"] += nbytes
    for g in out.values():
        g["bpw"] = round(8 * g["bytes"] / g["params"], 4) if g["params"] else 0.0
    return out


def inspect_gguf(path: str | Path) -> dict[str, Any]:
    """Types, sizes and metadata of a GGUF file (all shards of a split set: pass any of them)."""
    src: GgufSet = read_gguf(path)
    rows = [(tensor_class(t.name, OTHER), t.qtype.name, t.n_params, t.nbytes) for t in src.tensors]
    by_class = _group(rows)
    order = [c.value for c in TensorClass] + [OTHER]
    ftype = src.get("general.file_type")
    try:
        ftype_name = LlamaFileType(ftype).name if ftype is not None else None
    except ValueError:
        ftype_name = None
    tensor_bytes = sum(r[3] for r in rows)
    params = sum(r[2] for r in rows)
    return {
        "path": str(src.path),
        "architecture": src.get("general.architecture"),
        "name": src.get("general.name"),
        "recipe": src.get("ossgguf.recipe"),
        "file_type": {"id": ftype, "name": ftype_name},
        "files": [{"path": str(f.path), "bytes": f.size, "header_bytes": f.data_offset, "tensors": len(f.tensors),
                   "tensor_bytes": sum(t.nbytes for t in f.tensors)} for f in src.files],
        "classes": {c: by_class[c] for c in order if c in by_class},
        "types": {k: {f: v[f] for f in ("tensors", "params", "bytes", "bpw")}
                  for k, v in sorted(_group([(r[1], r[1], r[2], r[3]) for r in rows]).items())},
        "totals": {"tensors": len(rows), "params": params, "tensor_bytes": tensor_bytes,
                   "file_bytes": src.size, "overhead_bytes": src.size - tensor_bytes,
                   "bpw": round(8 * tensor_bytes / params, 4) if params else 0.0},
        "metadata": {k: _value(kv) for k, kv in src.kvs.items()},
    }


def _short(v: Any, width: int = 72) -> str:
    if isinstance(v, dict) and "count" in v:
        return f"[{v['count']:,} {v['array'].lower()} values]"
    text = repr(v) if not isinstance(v, str) else v.replace("\n", "\\n")
    return text if len(text) <= width else f"{text[:width]}... ({len(text):,} chars)"


def format_inspect(info: dict[str, Any]) -> str:
    t = info["totals"]
    ft = info["file_type"]
    head = (f"{info['path']}: {info['architecture']}, {t['params']:,} parameters, {t['file_bytes']:,} bytes in "
            f"{len(info['files'])} file(s)")
    lines = [head, f"recipe {info['recipe'] or '(not written by ossgguf)'}, file type {ft['name'] or ft['id']}", "",
             f"{'class':<10} {'tensors':>7}  {'types':<18} {'params':>16} {'bytes':>16} {'bpw':>6}"]
    for cls, g in info["classes"].items():
        types = ",".join(f"{k}x{n}" if len(g["types"]) > 1 else k for k, n in g["types"].items())
        lines.append(f"{cls:<10} {g['tensors']:>7}  {types:<18} {g['params']:>16,} {g['bytes']:>16,} {g['bpw']:>6.2f}")
    lines += [f"{'total':<10} {t['tensors']:>7}  {'':<18} {t['params']:>16,} {t['tensor_bytes']:>16,} {t['bpw']:>6.2f}",
              f"headers and alignment: {t['overhead_bytes']:,} bytes"]
    if len(info["files"]) > 1:
        lines += ["", *(f"  {f['path']}: {f['bytes']:,} bytes, {f['tensors']} tensors" for f in info["files"])]
    lines += ["", "metadata:", *(f"  {k} = {_short(v)}" for k, v in info["metadata"].items())]
    return "\n".join(lines)
