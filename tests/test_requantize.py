"""GGUF -> GGUF requantization against references this project did not write: gguf-py's reader,
dequantizers and quantizers (types, bytes and values), ggml's reference MXFP4 quantizer as gguf-py
mirrors it (error), and llama.cpp's loader (every output loads and runs)."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import gguf.quants as gq
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter, LlamaFileType

from ossgguf.convert.convert import convert, plan_conversion
from ossgguf.errors import OssggufError
from ossgguf.quantize.requantize import plan_requantize, requantize

RECIPES = ["mxfp4", "mxfp4-q8", "q8_0", "bf16", "f16"]
STORED = "as stored"
# DESIGN.md's recipe table, spelled out here independently of quantize/policy.py.
EXPECTED = {
    "mxfp4": {"expert": "MXFP4", "attention": STORED, "embedding": STORED, "output": STORED},
    "mxfp4-q8": {"expert": "MXFP4", "attention": "Q8_0", "embedding": "Q8_0", "output": "Q8_0"},
    "q8_0": {"expert": "Q8_0", "attention": "Q8_0", "embedding": "Q8_0", "output": "Q8_0"},
    "bf16": {"expert": "BF16", "attention": "BF16", "embedding": "BF16", "output": "BF16"},
    "f16": {"expert": "F16", "attention": "F16", "embedding": "F16", "output": "F16"},
}
FILE_TYPE = {"mxfp4": LlamaFileType.MOSTLY_MXFP4_MOE, "mxfp4-q8": LlamaFileType.MOSTLY_MXFP4_MOE,
             "q8_0": LlamaFileType.MOSTLY_Q8_0, "bf16": LlamaFileType.MOSTLY_BF16, "f16": LlamaFileType.MOSTLY_F16}
CLASSES = [("expert", r"\.ffn_(gate|up|down)_exps\.weight$"), ("attention", r"\.attn_(q|k|v|output)\.weight$"),
           ("embedding", r"^token_embd\.weight$"), ("output", r"^output\.weight$")]
SOURCES = {"mxfp4": dict(recipe="mxfp4"), "bf16": dict(recipe="bf16", layout="bf16")}
CHANGED = ("general.file_type", "ossgguf.recipe", "split.no", "split.count", "split.tensors.count")


def klass(name: str) -> str:
    return next((c for c, pat in CLASSES if re.search(pat, name)), "small")  # norms, biases, sinks, router


def read_all(first: Path) -> tuple[dict, dict]:
    """(tensors by name, fields by key of the first shard) of a GGUF or a split set, by gguf-py."""
    files = sorted(first.parent.glob(first.name.replace("-00001-of-", "-*-of-"))) if "-00001-of-" in first.name \
        else [first]
    readers = [GGUFReader(f) for f in files]
    return {t.name: t for r in readers for t in r.tensors}, readers[0].fields


def raw(t) -> np.ndarray:
    return np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)


def field_value(f):
    return f.contents()


def run_in_llama(path: Path, n: int = 24) -> np.ndarray:
    from ossgguf.runner.llama_ctypes import open_llama

    llm = open_llama(path, n_ctx=64, logits_all=True, n_threads=2, verbose=False, swa_full=False)
    try:
        ids = llm.tokenize(b"The quick brown fox, 42 times: def f(x): return x", add_bos=False)[:n]
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)])
        assert scores.shape == (len(ids), llm.n_vocab())
        return scores
    finally:
        llm.close()


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_types_values_and_llama_cpp(make_gguf, tmp_path, source, recipe):
    src = make_gguf(**SOURCES[source])
    out = tmp_path / "out.gguf"
    report = requantize(src, out, recipe)
    assert out.stat().st_size == report.plan.total_bytes
    got, fields = read_all(out)
    ref, ref_fields = read_all(src)
    assert list(got) == list(ref)  # same tensors, same order
    for name, t in got.items():
        s = ref[name]
        want = EXPECTED[recipe].get(klass(name), "F32")
        want = s.tensor_type.name if want == STORED else want
        assert t.tensor_type.name == want, (name, t.tensor_type.name)
        assert list(t.shape) == list(s.shape)
        if t.tensor_type == s.tensor_type:  # as stored: the same bytes (MXFP4 experts bit for bit)
            assert np.array_equal(raw(t), raw(s)), name
        else:  # gguf-py's own dequantize -> quantize of the source
            expect = gq.quantize(gq.dequantize(s.data, s.tensor_type), t.tensor_type)
            assert np.array_equal(raw(t), np.ascontiguousarray(expect).view(np.uint8).reshape(-1)), name
    if source == "mxfp4" and EXPECTED[recipe]["expert"] == "MXFP4":
        assert all(np.array_equal(raw(got[n]), raw(ref[n])) for n in got if klass(n) == "expert")
    # metadata: the source's, but file type and recipe
    assert fields["general.file_type"].contents() == FILE_TYPE[recipe]
    assert fields["ossgguf.recipe"].contents() == recipe
    assert [k for k in fields if k not in CHANGED] == [k for k in ref_fields if k not in CHANGED]
    for k in ref_fields:
        if k not in CHANGED and not k.startswith("GGUF."):
            assert field_value(fields[k]) == field_value(ref_fields[k]), k
    logits = run_in_llama(out)
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("src_split,out_split", [(None, None), (None, 100_000), (60_000, None), (60_000, 150_000)])
def test_dry_run_json_equals_real_write(make_gguf, make_ckpt, tmp_path, src_split, out_split):
    src = make_gguf("mxfp4", split=src_split)
    out = tmp_path / "q.gguf"
    plan = plan_requantize(src, out, "mxfp4-q8", split_max_size=out_split)
    js = plan.to_json()
    assert not list(tmp_path.iterdir()), "planning wrote something"
    # the converter's dry-run JSON shape
    conv = plan_conversion(make_ckpt(), tmp_path / "c.gguf", "mxfp4-q8").to_json()
    assert set(conv) <= set(js) and set(conv["tensors"][0]) == set(js["tensors"][0])
    plan.run()
    files = sorted(tmp_path.glob("*.gguf"))
    assert [str(f) for f in files] == sorted(f["path"] for f in js["files"])
    assert js["total_bytes"] == sum(f.stat().st_size for f in files)
    assert [f.stat().st_size for f in sorted(files)] == [f["bytes"] for f in sorted(js["files"], key=lambda f: f["path"])]
    if out_split:
        assert len(files) > 1 and files[0].name.startswith("q-00001-of-")
        assert all(f["bytes"] <= out_split or f["tensors"] == 1 for f in js["files"])
    got, fields = read_all(Path(js["files"][0]["path"]))
    assert {t["name"]: (t["type"], t["shape"], t["bytes"]) for t in js["tensors"]} == {
        n: (t.tensor_type.name, [int(d) for d in t.shape], int(t.n_bytes)) for n, t in got.items()}
    if out_split:
        assert fields["split.count"].contents() == len(files)
        assert fields["split.tensors.count"].contents() == len(got)
    else:
        assert "split.count" not in fields
    run_in_llama(Path(js["files"][0]["path"]))


def test_bf16_layout_back_to_mxfp4_is_bit_exact(make_ckpt, make_gguf, tmp_path):
    """The tiny bf16 layout is an MXFP4 checkpoint dequantized (standard scale rule): MXFP4 comes back
    byte for byte, through the converter and through the requantizer."""
    mx = read_all(make_gguf("mxfp4"))[0]
    conv = convert(make_ckpt(layout="bf16"), tmp_path / "c.gguf", recipe="mxfp4").plan.shards[0].path
    req = requantize(make_gguf("bf16", layout="bf16"), tmp_path / "r.gguf", "mxfp4").plan.shards[0].path
    experts = [n for n in mx if klass(n) == "expert"]
    assert experts
    for path in (conv, req):
        got = read_all(path)[0]
        for n in experts:
            assert got[n].tensor_type == Q.MXFP4
            assert np.array_equal(raw(got[n]), raw(mx[n])), (path.name, n)


def finetune(src: Path, dst: Path, scale: float = 0.1, seed: int = 0) -> Path:
    """A BF16 'fine-tune': the expert weights moved off the MXFP4 grid by small noise (torch + safetensors)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(dst.glob("*.safetensors")):
        tensors = load_file(f)
        for k, v in tensors.items():
            if re.search(r"mlp\.experts\.(gate_up|down)_proj$", k):
                w = v.float()
                tensors[k] = (w + scale * w.std() * torch.randn(w.shape, generator=gen)).to(torch.bfloat16)
        save_file(tensors, f, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def finetune_ckpt(make_ckpt, tmp_path_factory):
    return finetune(make_ckpt(layout="bf16"), tmp_path_factory.mktemp("ft") / "ckpt", scale=0.3)


def mxfp4_values(data: np.ndarray) -> np.ndarray:
    return gq.dequantize(data, Q.MXFP4).astype(np.float64)


def test_mxfp4_error_no_worse_than_ggml_reference(finetune_ckpt, tmp_path):
    src = convert(finetune_ckpt, tmp_path / "ft-bf16.gguf", recipe="bf16").plan.shards[0].path
    out = requantize(src, tmp_path / "ft-mxfp4.gguf", "mxfp4").plan.shards[0].path
    ref, got = read_all(src)[0], read_all(out)[0]
    n = 0
    for name, t in got.items():
        if klass(name) != "expert":
            continue
        x = gq.dequantize(ref[name].data, Q.BF16).astype(np.float64)
        ours = mxfp4_values(t.data)
        ggml = mxfp4_values(gq.quantize(x.astype(np.float32), Q.MXFP4))  # mirrors quantize_row_mxfp4_ref
        err_ours = ((ours - x) ** 2).reshape(-1, 32).sum(-1)
        err_ggml = ((ggml - x) ** 2).reshape(-1, 32).sum(-1)
        assert err_ours.sum() <= err_ggml.sum(), name
        assert (err_ours <= err_ggml * (1 + 1e-6) + 1e-30).all(), name  # block by block too
        n += 1
    assert n == 3 * 2


# --- bad input: a clear OssggufError, and nothing left at the output ----------------------------------


def no_output(d: Path) -> None:
    assert not [p.name for p in d.iterdir()], "something was left behind"


def write_foreign(path: Path, arch: str = "llama") -> Path:
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("case", ["recipe", "type", "regex", "regex-nomatch", "row", "imatrix"])
def test_bad_options(make_gguf, tmp_path, case):
    src = make_gguf("mxfp4")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    kw = {"recipe": {"recipe": "q4_k_m"}, "type": {"tensor_types": ["attn_q=q9_9"]},
          "regex": {"tensor_types": ["attn_(=q8_0"]}, "regex-nomatch": {"tensor_types": ["nothing_here=q8_0"]},
          "row": {"tensor_types": ["attn_q\\.weight=q4_k"]}, "imatrix": {"tensor_types": ["attn_q\\.weight=iq2_xxs"]},
          }[case]
    with pytest.raises(OssggufError) as e:
        requantize(src, out_dir / "x.gguf", **{"recipe": "mxfp4", **kw})
    msg = str(e.value)
    assert {"recipe": "q4_k_m", "type": "q9_9", "regex": "bad regex", "regex-nomatch": "nothing_here",
            "row": "Q4_K", "imatrix": "IQ2_XXS"}[case] in msg, msg
    if case == "row":  # which tensors, why, and what they can take instead
        assert "(rows of 64, not a multiple of 256): blk.0.attn_q.weight, blk.1.attn_q.weight." in msg, msg
        fits = re.search(r"Types that fit these rows: ([\w, ]+)", msg)
        assert fits and {"q8_0", "mxfp4", "bf16", "q4_0"} <= set(fits[1].split(", ")), msg
        assert "q4_k" not in fits[1].split(", ") and "--allow-fallback" in msg, msg
    no_output(out_dir)


def test_allow_fallback_reports_the_type(make_gguf, tmp_path):
    r = requantize(make_gguf("mxfp4"), tmp_path / "f.gguf", "mxfp4", tensor_types=["attn_q\\.weight=q4_k"],
                   allow_fallback=True)
    fb = r.plan.to_json()["fallbacks"]
    assert fb and {f["requested"] for f in fb} == {"Q4_K"} and {f["type"] for f in fb} == {"Q5_0"}
    got = read_all(tmp_path / "f.gguf")[0]
    assert {got[f["name"]].tensor_type.name for f in fb} == {"Q5_0"}


@pytest.mark.parametrize("override,fallback", [("ffn_down_exps=q5_0", False), ("_exps=q4_k", True)])
def test_expert_overrides_keep_the_biases_f32_and_llama_cpp_runs_it(make_gguf, tmp_path, override, fallback):
    """A regex that also matches the 2-D expert biases must not quantize them: llama.cpp's add_id
    asserts F32 biases and aborts the process otherwise."""
    out = tmp_path / "o.gguf"
    requantize(make_gguf("mxfp4"), out, "mxfp4", tensor_types=[override], allow_fallback=fallback)
    got = read_all(out)[0]
    biases = {n: t.tensor_type.name for n, t in got.items() if "_exps.bias" in n}
    assert biases and set(biases.values()) == {"F32"}, biases
    weights = {t.tensor_type.name for n, t in got.items() if re.search(override.split("=")[0], n) and n.endswith("weight")}
    assert weights == {"Q5_0"}
    assert np.isfinite(run_in_llama(out)).all()


def test_override_of_only_f32_tensors_is_refused(make_gguf, tmp_path):
    with pytest.raises(OssggufError, match="matched only norms, sinks or biases"):
        requantize(make_gguf("mxfp4"), tmp_path / "o.gguf", "mxfp4", tensor_types=["exps\\.bias=q8_0"])
    assert not list(tmp_path.iterdir())


def _truncate(p: Path, n: int) -> None:
    with open(p, "r+b") as f:
        f.truncate(n)


@pytest.mark.parametrize("case", ["truncated-data", "truncated-header", "not-gguf", "other-arch", "missing-shard",
                                  "missing-file", "output-is-input", "exists"])
def test_bad_input_files(make_gguf, tmp_path, case):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "x.gguf"
    if case == "missing-shard":
        first = make_gguf("mxfp4", split=60_000)
        for f in first.parent.glob("*.gguf"):
            shutil.copy(f, src_dir)
        (src_dir / first.name.replace("-00001-of-", "-00002-of-")).unlink()
        src = src_dir / first.name
    else:
        src = src_dir / "m.gguf"
        shutil.copy(make_gguf("mxfp4"), src)
    needle = {"truncated-data": "truncated", "truncated-header": "truncated", "not-gguf": "not a GGUF",
              "other-arch": "'llama'", "missing-shard": "-00002-of-", "missing-file": "does not exist",
              "output-is-input": "is the input", "exists": "already exists"}[case]
    if case == "truncated-data":
        _truncate(src, src.stat().st_size - 100)
    elif case == "truncated-header":
        _truncate(src, 2000)
    elif case == "not-gguf":
        src.write_bytes(b"PK\x03\x04" + bytes(1000))
    elif case == "other-arch":
        write_foreign(src)
    elif case == "missing-file":
        src = src_dir / "absent.gguf"
    elif case == "output-is-input":
        out = src
    elif case == "exists":
        out.write_bytes(b"keep me")
    before = sorted(p.name for p in src_dir.iterdir())
    with pytest.raises(OssggufError) as e:
        requantize(src, out, "q8_0")
    assert needle in str(e.value), str(e.value)
    if case == "exists":
        assert out.read_bytes() == b"keep me"
        assert [p.name for p in out_dir.iterdir()] == ["x.gguf"]
    else:
        no_output(out_dir)
    assert sorted(p.name for p in src_dir.iterdir()) == before


def test_source_damaged_during_run_leaves_nothing(make_gguf, tmp_path):
    src = tmp_path / "m.gguf"
    shutil.copy(make_gguf("mxfp4"), src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    plan = plan_requantize(src, out_dir / "x.gguf", "q8_0")
    _truncate(src, src.stat().st_size // 2)
    with pytest.raises(OssggufError, match="truncated"):
        plan.run()
    no_output(out_dir)


def test_header_parser_matches_gguf_py(make_gguf, tmp_path):
    """Our header reader (used to copy metadata) against gguf-py's reader, on ours and on gguf-py's files."""
    from ossgguf.gguf.read import read_gguf

    foreign = write_foreign(tmp_path / "f.gguf")
    for path in (make_gguf("mxfp4"), make_gguf("mxfp4", split=60_000), foreign):
        mine = read_gguf(path)
        tensors, fields = read_all(path)
        assert [t.name for t in mine.tensors] == list(tensors)
        for t in mine.tensors:
            r = tensors[t.name]
            assert (t.qtype, list(reversed(t.shape)), t.nbytes) == (r.tensor_type, [int(d) for d in r.shape],
                                                                    int(r.n_bytes))
            with open(t.file, "rb") as f:
                f.seek(t.offset)
                assert f.read(t.nbytes) == raw(r).tobytes()
        assert list(mine.kvs) == [k for k in fields if not k.startswith("GGUF.")]
        for k, kv in mine.kvs.items():
            v = kv.value.tolist() if isinstance(kv.value, np.ndarray) else kv.value
            assert v == fields[k].contents(), k
            assert kv.type == fields[k].types[0], k


def test_unaligned_source_alignment_key(tmp_path):
    """A source with general.alignment != 32 (allowed by GGUF): read at its alignment, written at 32."""
    from ossgguf.gguf.read import read_gguf

    p = tmp_path / "a.gguf"
    w = GGUFWriter(str(p), "gpt-oss")
    w.data_alignment = 64
    w.add_custom_alignment(64)
    w.add_tensor("token_embd.weight", np.arange(8 * 32, dtype=np.float32).reshape(8, 32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    src = read_gguf(p)
    assert src.files[0].data_offset == GGUFReader(p).data_offset
    out = requantize(p, tmp_path / "b.gguf", "bf16").plan.shards[0].path
    r = GGUFReader(out)
    assert "general.alignment" not in r.fields
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert np.array_equal(gq.dequantize(emb.data, Q.BF16), np.arange(8 * 32, dtype=np.float32).reshape(8, 32))
    assert struct.unpack("<I", out.read_bytes()[4:8])[0] == 3
