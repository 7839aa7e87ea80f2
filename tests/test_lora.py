"""PEFT LoRA adapters converted to GGUF (`convert-lora`) and applied by llama.cpp (`--lora`).

The references are PEFT itself (adapters made with `get_peft_model`, reloaded with
`PeftModel.from_pretrained`, run by transformers) and llama.cpp's own convert_lora_to_gguf.py of the
pinned release. Logits use the metrics and thresholds of test_logits.py (the base conversion's).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from llama_source import llama_cpp_source
from peft import (  # the reference (dev extra): missing it fails, never skips
    LoraConfig,
    PeftModel,
    get_peft_model,
)
from transformers import GptOssForCausalLM

from ossgguf.convert.lora import convert_lora, plan_lora
from ossgguf.errors import OssggufError

REAL_ROPE = {"head_dim": 64, "max_position_embeddings": 131072, "sliding_window": 16}
ALL_ACTIVE = {"num_experts_per_tok": 4, **REAL_ROPE}  # 4 of 4 experts: no routing decision can flip
N_TOKENS = 64
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _ids() -> list[int]:
    return np.random.default_rng(1).integers(0, 500, N_TOKENS).tolist()


def _hf_model(ckpt: Path):
    return GptOssForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()


def make_adapter(ckpt: Path, out: Path, seed: int = 0, b_scale: float = 0.3, **lora) -> Path:
    """A PEFT adapter on `ckpt` with random A and B (PEFT's own init leaves B zero: no change to test),
    B scaled down so that the update is of the base weights' size; saved as PEFT saves it."""
    torch.manual_seed(seed)
    model = get_peft_model(_hf_model(ckpt), LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.mul_(b_scale)
    model.save_pretrained(out)
    return out


def peft_logits(ckpt: Path, adapters: dict[str, Path], scales: dict[str, float] | None = None) -> np.ndarray:
    """transformers + PeftModel (reloaded from the saved folders) on the test tokens, every adapter active."""
    from peft.tuners.lora import LoraLayer

    names = list(adapters)
    model = PeftModel.from_pretrained(_hf_model(ckpt), adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapters[n], adapter_name=n)
    model.base_model.set_adapter(names)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for n, s in (scales or {}).items():
                module.set_scale(n, s)
    with torch.no_grad():
        return model(torch.tensor([_ids()])).logits[0].numpy()


def hf_logits(ckpt: Path) -> np.ndarray:
    with torch.no_grad():
        return _hf_model(ckpt)(torch.tensor([_ids()])).logits[0].numpy()


def llama_logits(gguf: Path, loras: list[tuple[Path, float]] = ()) -> np.ndarray:
    from ossgguf.runner.llama_ctypes import open_llama
    from ossgguf.runner.lora import LoraSpec, apply_adapters

    llm = open_llama(gguf, n_ctx=128, n_batch=N_TOKENS, logits_all=True, n_threads=1, verbose=False)
    try:
        apply_adapters(llm.model, llm.ctx, [LoraSpec(p, s) for p, s in loras])
        llm.eval(_ids())
        return np.array(llm.scores[:N_TOKENS])
    finally:
        llm.close()


def metrics(got: np.ndarray, ref: np.ndarray, what: str) -> tuple[np.ndarray, float, float]:
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"{what}: min cos {cos.min():.6f}, median cos {np.median(cos):.6f}, top-1 {top1:.3f}, max |diff| {rel:.4f}")
    return cos, top1, rel


def assert_strict(got, ref, what):  # test_logits.py, all experts active
    cos, top1, rel = metrics(got, ref, what)
    assert cos.min() > 0.999, cos
    assert rel < 0.03
    assert top1 >= 0.9


def assert_routed(got, ref, what):  # test_logits.py, top-k routing
    cos, top1, _ = metrics(got, ref, what)
    assert np.median(cos) > 0.9995, cos
    assert (cos > 0.999).mean() >= 0.9, cos
    assert top1 >= 0.9


ADAPTERS = {
    "attention-r8": dict(r=8, lora_alpha=16, target_modules=ATTN),
    "attention-experts-r16": dict(r=16, lora_alpha=8, target_modules=ATTN, target_parameters=EXPERTS),
    # PEFT's own scalings that llama.cpp's one alpha cannot say: folded into lora_b
    "patterns-rslora": dict(r=8, lora_alpha=12, target_modules=["q_proj", "o_proj", "lm_head"],
                            target_parameters=["mlp.experts.gate_up_proj", "mlp.router.weight"], use_rslora=True,
                            rank_pattern={"o_proj": 4, "gate_up_proj": 16}, alpha_pattern={"q_proj": 3}),
}


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_logits_match_peft(make_ckpt, make_gguf, tmp_path, kind):
    ckpt, gguf = make_ckpt(layout="bf16", **ALL_ACTIVE), make_gguf("mxfp4", **ALL_ACTIVE)
    adapter = make_adapter(ckpt, tmp_path / "peft", **ADAPTERS[kind])
    out = convert_lora(adapter, tmp_path / "a.gguf", base=gguf).plan.shards[0].path
    ref, base_ref = peft_logits(ckpt, {"a": adapter}), hf_logits(ckpt)
    assert np.abs(ref - base_ref).max() > 0.05 * np.abs(base_ref).max()  # the adapter changes the model
    assert_strict(llama_logits(gguf, [(out, 1.0)]), ref, kind)


def test_logits_match_peft_routed(make_ckpt, make_gguf, tmp_path):
    ckpt, gguf = make_ckpt(layout="bf16", **REAL_ROPE), make_gguf("mxfp4", **REAL_ROPE)
    adapter = make_adapter(ckpt, tmp_path / "peft", **ADAPTERS["attention-experts-r16"])
    out = convert_lora(adapter, tmp_path / "a.gguf", base=gguf).plan.shards[0].path
    assert_routed(llama_logits(gguf, [(out, 1.0)]), peft_logits(ckpt, {"a": adapter}), "routed")


def test_scale_zero_is_base_and_two_adapters_add(make_ckpt, make_gguf, tmp_path):
    ckpt, gguf = make_ckpt(layout="bf16", **ALL_ACTIVE), make_gguf("mxfp4", **ALL_ACTIVE)
    a = make_adapter(ckpt, tmp_path / "pa", seed=1, r=8, lora_alpha=16, target_modules=ATTN, target_parameters=EXPERTS)
    b = make_adapter(ckpt, tmp_path / "pb", seed=2, r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                     target_parameters=EXPERTS)
    ga = convert_lora(a, tmp_path / "a.gguf", base=gguf).plan.shards[0].path
    gb = convert_lora(b, tmp_path / "b.gguf", base=gguf).plan.shards[0].path
    base = llama_logits(gguf)
    np.testing.assert_allclose(llama_logits(gguf, [(ga, 0.0)]), base, rtol=0, atol=1e-6 * np.abs(base).max())
    # both active at scales 1 and 0.5: llama.cpp adds s_i * dW_i; PEFT with both adapters active, b's scaled
    ref = peft_logits(ckpt, {"a": a, "b": b}, scales={"b": 0.5})
    assert_strict(llama_logits(gguf, [(ga, 1.0), (gb, 0.5)]), ref, "two adapters")


def test_same_tensors_as_llama_cpp_convert_lora(make_ckpt, tmp_path):
    """llama.cpp's convert_lora_to_gguf.py maps `*.lora_A.weight` names (not PEFT's expert parameters):
    on an attention-only adapter both files hold the same tensors, bit for bit."""
    from gguf import GGUFReader

    ckpt = make_ckpt(layout="bf16", **ALL_ACTIVE)
    adapter = make_adapter(ckpt, tmp_path / "peft", r=8, lora_alpha=16, target_modules=ATTN + ["lm_head"])
    llama_dir = llama_cpp_source("convert_lora_to_gguf.py", "conversion", "gguf-py")
    ref = tmp_path / "ref.gguf"
    proc = subprocess.run([sys.executable, str(llama_dir / "convert_lora_to_gguf.py"), "--base", str(ckpt),
                           "--outfile", str(ref), str(adapter)], capture_output=True, text=True, timeout=600,
                          cwd=llama_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = convert_lora(adapter, tmp_path / "ours.gguf", base=ckpt).plan.shards[0].path
    a, b = GGUFReader(ref), GGUFReader(ours)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb) and len(ta) == 2 * 4 * 2 + 2
    for name in ta:
        assert ta[name].tensor_type == tb[name].tensor_type, name
        assert list(ta[name].shape) == list(tb[name].shape), name
        assert np.array_equal(np.asarray(ta[name].data).view(np.uint8), np.asarray(tb[name].data).view(np.uint8)), name
    fa = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    # the keys llama.cpp's loader reads are equal; llama.cpp's converter also derives general.base_model.*
    # and tags from the adapter's card (a local base path becomes a huggingface.co URL): ours writes
    # base_model.* only for a repo id, and the rank
    for k in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha",
              "general.quantization_version"):
        assert fa[k] == fb[k], k
    assert set(fb) - set(fa) == {"ossgguf.lora.rank"}


def test_dry_run_json_is_exact(make_ckpt, make_gguf, tmp_path):
    ckpt, gguf = make_ckpt(layout="bf16", **ALL_ACTIVE), make_gguf("mxfp4", **ALL_ACTIVE)
    adapter = make_adapter(ckpt, tmp_path / "peft", r=8, lora_alpha=16, target_modules=ATTN,
                           target_parameters=EXPERTS)
    plan = plan_lora(adapter, tmp_path / "a.gguf", base=gguf).to_json()
    report = convert_lora(adapter, tmp_path / "a.gguf", base=gguf)
    assert plan["total_bytes"] == report.plan.shards[0].path.stat().st_size
    from gguf import GGUFReader

    got = {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in GGUFReader(report.plan.shards[0].path).tensors}
    assert got == {t["name"]: (t["type"], t["shape"]) for t in plan["tensors"]}
    assert {t["class"] for t in plan["tensors"]} == {"attention", "expert"}
    with pytest.raises(OssggufError, match="exists"):
        convert_lora(adapter, tmp_path / "a.gguf", base=gguf)
    convert_lora(adapter, tmp_path / "a.gguf", base=gguf, force=True)


def _edit(src: Path, dst: Path, config: dict | None = None, drop: str | None = None) -> Path:
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if drop:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(dst / "adapter_model.safetensors")
        tensors.pop(next(k for k in tensors if drop in k))
        save_file(tensors, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("case,match", [
    ("other-shapes", "trained on another model"),
    ("other-name", "trained on 'openai/gpt-oss-120b'"),
    ("missing", "no lora_B tensor"),
    ("target", "target_modules entry 'embed_tokens'"),
    ("dora", "DoRA"),
])
def test_bad_adapters_refused_nothing_written(make_ckpt, make_gguf, tmp_path, case, match):
    ckpt, gguf = make_ckpt(layout="bf16", **ALL_ACTIVE), make_gguf("mxfp4", **ALL_ACTIVE)
    good = make_adapter(ckpt, tmp_path / "peft", r=8, lora_alpha=16, target_modules=ATTN, target_parameters=EXPERTS)
    base: Path = gguf
    if case == "other-shapes":
        base = make_gguf("mxfp4", hidden_size=96, **ALL_ACTIVE)
        adapter = good
    elif case == "other-name":
        from ossgguf.convert.convert import convert

        base = convert(ckpt, tmp_path / "named.gguf", source_repo="openai/gpt-oss-20b").plan.shards[0].path
        adapter = _edit(good, tmp_path / "x", {"base_model_name_or_path": "openai/gpt-oss-120b"})
    elif case == "missing":
        adapter = _edit(good, tmp_path / "x", drop="layers.1.self_attn.v_proj.lora_B")
    elif case == "target":
        adapter = _edit(good, tmp_path / "x", {"target_modules": ATTN + ["embed_tokens"]})
    else:
        adapter = _edit(good, tmp_path / "x", {"use_dora": True})
    out = tmp_path / "out.gguf"
    with pytest.raises(OssggufError, match=match):
        convert_lora(adapter, out, base=base)
    assert not any(p.name.endswith(".gguf") or "partial" in p.name for p in tmp_path.iterdir() if p.is_file()
                   and p != base)


def test_numpy_adapter_has_peft_layout(make_ckpt, make_gguf, tmp_path):
    """The benchmark's numpy-written adapters (ossgguf/fixtures/lora.py) name and shape tensors as PEFT does."""
    from safetensors import safe_open

    from ossgguf.convert.checkpoint import load_checkpoint
    from ossgguf.fixtures.lora import make_peft_adapter

    ckpt, gguf = make_ckpt(layout="bf16", **ALL_ACTIVE), make_gguf("mxfp4", **ALL_ACTIVE)
    ref = make_adapter(ckpt, tmp_path / "peft", r=8, lora_alpha=16, target_modules=ATTN, target_parameters=EXPERTS)
    ours = make_peft_adapter(tmp_path / "np", load_checkpoint(ckpt).config, r=8, alpha=16)

    def shapes(d: Path) -> dict:
        with safe_open(d / "adapter_model.safetensors", "np") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert shapes(ours) == shapes(ref)
    convert_lora(ours, tmp_path / "np.gguf", base=gguf, allow_other_base=True)


def test_base_from_adapter_config_and_offline_hub(make_ckpt, tmp_path, monkeypatch):
    """Without --base, adapter_config.json's base_model_name_or_path is used: PEFT writes the local folder it
    trained on; a repo id that is not cached cannot be fetched offline: a clear error, nothing written."""
    from ossgguf.hub.adapter import resolve_adapter

    ckpt = make_ckpt(layout="bf16", **ALL_ACTIVE)
    adapter = make_adapter(ckpt, tmp_path / "peft", r=8, lora_alpha=16, target_modules=ATTN)
    report = convert_lora(adapter, tmp_path / "a.gguf")
    assert report.plan.facts["base"] == str(ckpt)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    other = _edit(adapter, tmp_path / "x", {"base_model_name_or_path": "openai/gpt-oss-20b"})
    with pytest.raises(OssggufError, match="not in the cache and offline mode"):
        convert_lora(other, tmp_path / "b.gguf")
    with pytest.raises(OssggufError, match="not in the cache and offline mode"):
        resolve_adapter("someone/gpt-oss-lora")
    assert not (tmp_path / "b.gguf").exists()
