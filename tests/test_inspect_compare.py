"""`inspect` against gguf-py's reader and the file system; `compare` shows the quality ordering the
recipes promise, measured by llama.cpp's own logits."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize
from test_requantize import finetune, klass

from ossgguf.convert.convert import convert
from ossgguf.errors import OssggufError
from ossgguf.quantize.compare import compare, format_compare
from ossgguf.quantize.inspect import format_inspect, inspect_gguf
from ossgguf.quantize.requantize import requantize

# --- inspect ---------------------------------------------------------------------------------------------


def shards_of(first: Path) -> list[Path]:
    return sorted(first.parent.glob(first.name.replace("-00001-of-", "-*-of-")))


@pytest.mark.parametrize("recipe,split", [("mxfp4", 60_000), ("mxfp4-q8", None), ("bf16", 150_000)])
def test_inspect_sums_to_files_and_matches_gguf_py(make_gguf, recipe, split):
    first = make_gguf(recipe, split=split)
    files = shards_of(first) if split else [first]
    assert len(files) > (1 if split else 0)
    info = inspect_gguf(first)
    json.dumps(info)  # machine-readable as is
    # sizes: tensors + headers/alignment = the files on disk
    assert info["totals"]["file_bytes"] == sum(f.stat().st_size for f in files)
    assert [f["bytes"] for f in info["files"]] == [f.stat().st_size for f in files]
    assert info["totals"]["tensor_bytes"] + info["totals"]["overhead_bytes"] == info["totals"]["file_bytes"]
    readers = [GGUFReader(f) for f in files]
    assert [f["header_bytes"] for f in info["files"]] == [r.data_offset for r in readers]
    # per class, from gguf-py's tensor infos and the class regexes of the recipe tests
    want: dict[str, dict] = {}
    for r in readers:
        for t in r.tensors:
            c = klass(t.name)
            c = {"small": "norm" if not t.name.endswith("ffn_gate_inp.weight") else "router"}.get(c, c)
            g = want.setdefault(c, {"tensors": 0, "params": 0, "bytes": 0, "types": {}})
            g["tensors"] += 1
            g["params"] += int(t.n_elements)
            g["bytes"] += int(t.n_bytes)
            g["types"][t.tensor_type.name] = g["types"].get(t.tensor_type.name, 0) + 1
    got = {c: {k: g[k] for k in ("tensors", "params", "bytes", "types")} for c, g in info["classes"].items()}
    assert got == want
    assert sum(g["bytes"] for g in got.values()) == info["totals"]["tensor_bytes"]
    assert info["classes"]["expert"]["bpw"] == {"mxfp4": 4.25, "mxfp4-q8": 4.25, "bf16": 16.0}[recipe]
    # metadata: scalars as stored, token arrays as counts
    fields = readers[0].fields
    assert info["metadata"]["general.architecture"] == "gpt-oss"
    assert info["metadata"]["ossgguf.recipe"] == recipe == info["recipe"]
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert info["metadata"][key]["count"] == len(fields[key].data)
    text = format_inspect(info)
    assert f"{info['totals']['file_bytes']:,} bytes" in text
    assert re.search(r"expert\s+\d+\s+MXFP4|expert\s+\d+\s+BF16", text)
    assert "tokenizer.ggml.tokens = [" in text


def test_inspect_bad_files(make_gguf, tmp_path):
    p = tmp_path / "t.gguf"
    shutil.copy(make_gguf("mxfp4"), p)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 1)
    with pytest.raises(OssggufError, match="truncated"):
        inspect_gguf(p)
    with pytest.raises(OssggufError, match="does not exist"):
        inspect_gguf(tmp_path / "nope.gguf")


# --- compare ---------------------------------------------------------------------------------------------

ALL_ACTIVE = {"num_experts_per_tok": 4}  # every expert active: no routing flips, so small errors stay small


@pytest.fixture(scope="module")
def from_mxfp4(make_gguf, tmp_path_factory):
    """bf16, mxfp4, mxfp4-q8 and q8_0 GGUFs, all requantized from one MXFP4 conversion."""
    d = tmp_path_factory.mktemp("cmp-mx")
    src = make_gguf("mxfp4", **ALL_ACTIVE)
    return {r: requantize(src, d / f"{r}.gguf", r).plan.shards[0].path for r in ("bf16", "mxfp4", "mxfp4-q8", "q8_0")}


@pytest.fixture(scope="module")
def from_finetune(make_ckpt, tmp_path_factory):
    """A BF16 fine-tune (experts off the MXFP4 grid), converted to bf16 and requantized from that."""
    d = tmp_path_factory.mktemp("cmp-ft")
    ckpt = finetune(make_ckpt(layout="bf16", **ALL_ACTIVE), d / "ckpt", scale=0.3)
    bf16 = convert(ckpt, d / "bf16.gguf", recipe="bf16").plan.shards[0].path
    out = {"bf16": bf16}
    out.update({r: requantize(bf16, d / f"{r}.gguf", r).plan.shards[0].path for r in ("q8_0", "mxfp4-q8")})
    return out


def test_compare_self_is_exact(from_mxfp4):
    r = compare(from_mxfp4["bf16"], from_mxfp4["bf16"], n_ctx=128, threads=2)
    assert r["kl_max"] < 1e-9 and r["top1_agreement"] == 1.0 and r["cosine_min"] > 0.999999
    assert r["n_tokens"] == 128 == len(r["tokens"])  # the default text is longer than the context


def test_compare_quality_order_from_mxfp4(from_mxfp4):
    a = from_mxfp4["bf16"]
    res = {r: compare(a, from_mxfp4[r], threads=2) for r in ("mxfp4", "mxfp4-q8", "q8_0")}
    for r, x in res.items():
        print(r, format_compare(x))
    kl = {r: x["kl_mean"] for r, x in res.items()}
    # mxfp4 holds the same weights as bf16 (gguf-py dequantizes both to identical values) ...
    ref = {t.name: t for t in GGUFReader(a).tensors}
    for t in GGUFReader(from_mxfp4["mxfp4"]).tensors:
        np.testing.assert_array_equal(dequantize(t.data, t.tensor_type),
                                      dequantize(ref[t.name].data, ref[t.name].tensor_type), err_msg=t.name)
    # ... so only llama.cpp's activation rounding differs: its CPU MXFP4 dot product rounds activations
    # to Q8_0 (BF16 weights: to BF16). That gives KL mean 4.0e-4, max 1.6e-3 on this model (the same
    # experts stored as F32 vs MXFP4 give 3.5e-4); a real weight change (mxfp4-q8) gives 1.2e-3, max 7e-3.
    assert kl["mxfp4"] < 8e-4 and res["mxfp4"]["kl_max"] < 4e-3, res["mxfp4"]
    assert kl["mxfp4"] < 0.5 * kl["mxfp4-q8"], kl
    assert kl["mxfp4-q8"] < kl["q8_0"], kl  # Q8_0 experts re-quantized from MXFP4: lossy
    assert res["mxfp4"]["top1_agreement"] >= res["q8_0"]["top1_agreement"]
    assert res["mxfp4"]["cosine_mean"] > res["mxfp4-q8"]["cosine_mean"] > res["q8_0"]["cosine_mean"]
    assert res["mxfp4"]["tokens"] == res["q8_0"]["tokens"]


def test_compare_quality_order_from_bf16_finetune(from_finetune):
    a = from_finetune["bf16"]
    res = {r: compare(a, from_finetune[r], threads=2) for r in ("q8_0", "mxfp4-q8")}
    for r, x in res.items():
        print(r, format_compare(x))
    assert res["q8_0"]["kl_mean"] < 0.5 * res["mxfp4-q8"]["kl_mean"], res
    assert res["q8_0"]["cosine_mean"] > res["mxfp4-q8"]["cosine_mean"]
    assert res["q8_0"]["top1_agreement"] >= res["mxfp4-q8"]["top1_agreement"]


def test_compare_against_numpy_on_logits(from_mxfp4):
    """The metrics recomputed from llama.cpp's logits with scipy-free numpy, on explicit token ids."""
    from ossgguf.runner.llama_ctypes import open_llama  # the switches compare() honours

    ids = list(range(3, 200, 3))
    r = compare(from_mxfp4["bf16"], from_mxfp4["q8_0"], tokens=ids, n_ctx=128, threads=1)
    assert r["tokens"] == ids
    logits = []
    for p in (from_mxfp4["bf16"], from_mxfp4["q8_0"]):
        llm = open_llama(p, n_ctx=128, logits_all=True, n_threads=1, verbose=False, swa_full=False)
        llm.eval(ids)
        logits.append(np.array(llm.scores[: len(ids)], dtype=np.float64))
        llm.close()
    pa = np.exp(logits[0] - logits[0].max(-1, keepdims=True))
    pa /= pa.sum(-1, keepdims=True)
    pb = np.exp(logits[1] - logits[1].max(-1, keepdims=True))
    pb /= pb.sum(-1, keepdims=True)
    kl = (pa * np.log(pa / pb)).sum(-1)
    assert r["kl_mean"] == pytest.approx(kl.mean(), rel=1e-4)
    assert r["kl_max"] == pytest.approx(kl.max(), rel=1e-4)
    assert r["top1_agreement"] == pytest.approx((logits[0].argmax(-1) == logits[1].argmax(-1)).mean())


def test_compare_refuses_another_vocabulary(make_gguf, from_mxfp4):
    other = make_gguf("mxfp4", n_merges=200)  # same vocab_size (embedding rows), other tokens
    with pytest.raises(OssggufError, match="vocabular"):
        compare(from_mxfp4["bf16"], other, n_ctx=64, threads=2)


def test_compare_bad_files(from_mxfp4, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(OssggufError):
        compare(from_mxfp4["bf16"], bad, n_ctx=64, threads=2)
    with pytest.raises(OssggufError, match="does not exist"):
        compare(tmp_path / "nope.gguf", from_mxfp4["bf16"], n_ctx=64)


def test_compare_refuses_non_finite_logits(from_mxfp4, tmp_path):
    """A file whose output norm holds NaN (as random-bytes test models do): llama.cpp's logits are NaN,
    and compare says which file and where instead of printing NaN metrics (invalid JSON)."""
    from ossgguf.gguf.read import read_gguf

    src = from_mxfp4["bf16"]
    broken = tmp_path / "nan.gguf"
    shutil.copy(src, broken)
    t = next(t for t in read_gguf(broken).tensors if t.name == "output_norm.weight")
    with open(broken, "r+b") as f:
        f.seek(t.offset)
        f.write(np.full(t.nbytes // 4, np.nan, dtype=np.float32).tobytes())
    with pytest.raises(OssggufError, match=r"nan\.gguf gives non-finite logits .* at 64 of 64 positions"):
        compare(src, broken, n_ctx=64, threads=2)
