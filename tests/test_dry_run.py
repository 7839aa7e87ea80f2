"""--dry-run --json predicts exactly what a real run writes (single file and split), read back by gguf-py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from gguf import GGUFReader


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ossgguf.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("recipe,split", [("mxfp4", None), ("bf16", None), ("mxfp4", "60K"), ("q8_0", "100K")])
def test_dry_run_matches_real_write(make_ckpt, tmp_path, recipe, split):
    ckpt = make_ckpt(shards=2)
    out = tmp_path / "m.gguf"
    extra = ["--split-max-size", split] if split else []
    dry = cli("convert", ckpt, "-o", out, "--recipe", recipe, "--dry-run", "--json", *extra)
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert not list(tmp_path.glob("*.gguf")), "a dry run wrote something"
    real = cli("convert", ckpt, "-o", out, "--recipe", recipe, *extra)
    assert real.returncode == 0, real.stderr
    files = sorted(tmp_path.glob("*.gguf"))
    assert [str(f) for f in files] == sorted(f["path"] for f in plan["files"])
    assert plan["total_bytes"] == sum(f.stat().st_size for f in files)
    if split:
        assert len(files) > 1 and files[0].name.startswith("m-00001-of-")
        # a shard may only exceed the limit when it holds a single tensor that is bigger on its own
        limit = int(split[:-1]) * 1000
        assert all(f["bytes"] <= limit or f["tensors"] == 1 for f in plan["files"]), plan["files"]
    got = {}
    for f in files:
        for t in GGUFReader(f).tensors:
            got[t.name] = {"type": t.tensor_type.name, "shape": [int(d) for d in t.shape], "bytes": int(t.n_bytes)}
    assert {t["name"]: {k: t[k] for k in ("type", "shape", "bytes")} for t in plan["tensors"]} == got


def test_split_output_loads_in_llama_cpp(make_gguf):
    from ossgguf.runner.llama_ctypes import open_llama

    first = make_gguf("mxfp4", split=60_000)
    assert first.name.endswith("-00001-of-" + first.name.split("-of-")[1])
    llm = open_llama(first, n_ctx=64, verbose=False)
    try:
        toks = llm.tokenize(b"hello world", add_bos=False)
        llm.eval(toks)
        assert len(llm.scores[0]) == llm.n_vocab()
    finally:
        llm.close()
