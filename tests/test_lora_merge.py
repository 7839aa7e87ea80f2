"""`convert --merge-lora`: a PEFT adapter merged during conversion.

References: PEFT's `merge_and_unload()` (transformers saves the merged model, which the converter then
converts as any fine-tune), llama.cpp with the GGUF adapter applied at run time (`compare`'s KL and top-1),
and MXFP4's own error on data of the same size (same run) for the re-quantized experts.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from gguf import GGUFReader
from test_lora import ALL_ACTIVE, ATTN, EXPERTS, _hf_model, make_adapter

from ossgguf.convert.convert import convert, plan_conversion
from ossgguf.convert.lora import convert_lora
from ossgguf.errors import OssggufError
from ossgguf.gguf.tensors import Q
from ossgguf.quantize.compare import compare
from ossgguf.quantize.encode import decode, encode


def _values(path) -> dict[str, np.ndarray]:
    out = {}
    for t in GGUFReader(path).tensors:
        raw = np.asarray(t.data)
        out[t.name] = decode(raw.reshape(-1).view(np.uint8), Q(t.tensor_type), int(t.shape[0])).reshape(-1)
    return out


def test_merge_lora(make_ckpt, make_gguf, tmp_path):
    from peft import PeftModel

    ckpt_bf16, ckpt = make_ckpt(layout="bf16", **ALL_ACTIVE), make_ckpt(**ALL_ACTIVE)
    adapter = make_adapter(ckpt_bf16, tmp_path / "peft", r=8, lora_alpha=16, target_modules=ATTN,
                           target_parameters=EXPERTS)
    dry = plan_conversion(ckpt, tmp_path / "merged.gguf", merge_lora=adapter).to_json()
    report = convert(ckpt, tmp_path / "merged.gguf", merge_lora=adapter)
    merged = report.plan.shards[0].path
    assert dry["total_bytes"] == merged.stat().st_size and dry["merge_lora"]["adapter"] == str(adapter)
    with pytest.raises(OssggufError, match="trained on another model"):  # checked before anything is written
        convert(make_ckpt(hidden_size=96, **ALL_ACTIVE), tmp_path / "other.gguf", merge_lora=adapter)
    assert not (tmp_path / "other.gguf").exists()
    assert len(report.plan.facts["merge_lora"]["tensors"]) == 2 * (4 + 3)
    assert "relative RMSE" in report.summary()

    # the experts: re-quantized to MXFP4 with the error MXFP4 has on data of this size
    errors = report.plan.after_run.__self__.relative_rmse()  # after_run is the plan's MergeStats.lines
    assert set(errors) == {f"blk.{i}.ffn_{p}_exps.weight" for i in range(2) for p in ("gate", "up", "down")}
    x = np.random.default_rng(0).standard_normal((64, 64), dtype=np.float32)
    mxfp4 = float(np.sqrt(np.square(decode(encode(x, Q.MXFP4), Q.MXFP4, 64) - x).sum() / np.square(x).sum()))
    print("relative RMSE per expert tensor", errors, "MXFP4 on Gaussian data", mxfp4)
    assert max(errors.values()) < 1.5 * mxfp4

    # the other tensors: as PEFT's merge_and_unload, up to BF16 storage
    model = PeftModel.from_pretrained(_hf_model(ckpt_bf16), adapter).merge_and_unload()
    model.save_pretrained(tmp_path / "hf-merged")
    for f in ckpt_bf16.iterdir():  # transformers saves weights and config; the tokenizer comes along as is
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, tmp_path / "hf-merged" / f.name)
    ref = convert(tmp_path / "hf-merged", tmp_path / "ref.gguf", recipe="mxfp4").plan.shards[0].path
    ours, theirs = _values(merged), _values(ref)
    assert set(ours) == set(theirs)
    for name, v in ours.items():
        if "_exps.weight" in name:
            continue
        # BF16 keeps 8 significant bits; float32 sums in another order differ by ~1e-7 of the largest terms
        tol = np.abs(theirs[name]) * 2.0**-8 + 2.0**-20 * np.abs(theirs[name]).max()
        assert np.all(np.abs(v - theirs[name]) <= tol), name

    # llama.cpp: merged files against the base with the GGUF adapter applied at run time. Merged with BF16
    # experts (nothing re-quantized) the two agree as closely as a conversion agrees with transformers;
    # merged with MXFP4 experts they differ by what re-quantizing the BF16-merged file to MXFP4 costs.
    from ossgguf.quantize.requantize import plan_requantize

    base = make_gguf("mxfp4", **ALL_ACTIVE)
    lora = convert_lora(adapter, tmp_path / "a.gguf", base=base).plan.shards[0].path
    merged_bf16 = convert(ckpt, tmp_path / "merged-bf16.gguf", recipe="bf16", merge_lora=adapter).plan.shards[0].path
    requant = plan_requantize(merged_bf16, tmp_path / "requant.gguf", "mxfp4").run().plan.shards[0].path
    ids = np.random.default_rng(1).integers(0, 500, 64).tolist()

    def kl(a, b, **kw) -> dict:
        return compare(a, b, tokens=ids, n_ctx=64, threads=1, **kw)

    exact, mx, requantized = (kl(base, merged_bf16, ref_lora=[str(lora)]), kl(base, merged, ref_lora=[str(lora)]),
                              kl(merged_bf16, requant))
    print("KL vs base+adapter: merged BF16", exact["kl_mean"], "merged MXFP4", mx["kl_mean"],
          "; BF16-merged -> MXFP4:", requantized["kl_mean"])
    assert exact["cosine_min"] > 0.999 and exact["top1_agreement"] >= 0.9
    assert mx["kl_mean"] < 2 * requantized["kl_mean"] + 1e-4
