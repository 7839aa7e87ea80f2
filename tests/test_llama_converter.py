"""Our GGUF against the one llama.cpp's own converter (convert_hf_to_gguf.py, from the source of the
llama-cpp-python release we pin, fetched from PyPI when missing: tests/llama_source.py) writes for
the same checkpoint: the same tensors with the same types and the same bytes, and the same metadata.
Identical tensors mean llama.cpp's logits are exactly as close to transformers' as with llama.cpp's
converter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from llama_source import ROOT, llama_cpp_source

from ossgguf.convert.convert import convert

OURS_ONLY = {"ossgguf.recipe"}
# llama.cpp's converter title-cases the folder name for general.name.
NAMES = {"general.name"}


def llama_convert(src: Path, out: Path) -> None:
    llama_dir = llama_cpp_source("convert_hf_to_gguf.py", "conversion", "gguf-py")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "llama_cpp_convert.py"), str(llama_dir), str(src),
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("layout,recipe", [("mxfp4", "mxfp4"), ("bf16", "bf16")])
def test_same_file_as_llama_cpp_converter(make_ckpt, tmp_path, layout, recipe):
    ckpt = make_ckpt(layout=layout, num_hidden_layers=3, seed=11)
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_convert(ckpt, ref)
    convert(ckpt, ours, recipe=recipe)
    a, b = GGUFReader(ref), GGUFReader(ours)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].tensor_type == tb[name].tensor_type, name
        assert list(ta[name].shape) == list(tb[name].shape), name
        assert np.array_equal(np.asarray(ta[name].data).view(np.uint8), np.asarray(tb[name].data).view(np.uint8)), name
    fa = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    assert set(fb) - set(fa) == OURS_ONLY
    assert set(fa) - set(fb) == set()
    for k in set(fa) - NAMES:
        assert fa[k] == fb[k], k
