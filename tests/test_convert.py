"""The converter against references this project did not write: safetensors + torch (source
values), transformers' MXFP4 dequantizer, gguf-py's reader and dequantizers (GGUF bytes),
Hugging Face tokenizers and llama.cpp's tokenizer (token ids)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors import safe_open
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from ossgguf.convert.convert import convert

SHAPES = {
    "default": {},
    "bf16-finetune": {"layout": "bf16"},
    "sharded": {"shards": 3, "rope_key": "rope_parameters", "merges_as_strings": True, "seed": 3},
    "wider": {"hidden_size": 96, "intermediate_size": 32, "num_hidden_layers": 3, "num_local_experts": 8,
              "num_experts_per_tok": 3, "num_attention_heads": 6, "num_key_value_heads": 3, "vocab_size": 700,
              "seed": 7},
}


def source_tensors(ckpt) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def expected_gguf_values(ckpt) -> dict[str, np.ndarray]:
    """Each GGUF tensor's values, derived from the checkpoint by reference code (float32)."""
    src = source_tensors(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    exp = {"token_embd.weight": src["model.embed_tokens.weight"], "output_norm.weight": src["model.norm.weight"],
           "output.weight": src["lm_head.weight"]}
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
             "self_attn.sinks": "attn_sinks.weight", "mlp.router.weight": "ffn_gate_inp.weight",
             "mlp.router.bias": "ffn_gate_inp.bias"}
    for p, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")):
        for s in ("weight", "bias"):
            names[f"self_attn.{p}_proj.{s}"] = f"attn_{g}.{s}"
    for i in range(cfg["num_hidden_layers"]):
        L = f"model.layers.{i}."
        for hf, gg in names.items():
            exp[f"blk.{i}.{gg}"] = src[L + hf]
        x = L + "mlp.experts."
        if x + "gate_up_proj_blocks" in src:  # [E, in, out] after transformers' dequantizer
            gu = convert_moe_packed_tensors(src[x + "gate_up_proj_blocks"], src[x + "gate_up_proj_scales"],
                                            dtype=torch.float32)
            down = convert_moe_packed_tensors(src[x + "down_proj_blocks"], src[x + "down_proj_scales"],
                                              dtype=torch.float32)
        else:
            gu, down = src[x + "gate_up_proj"], src[x + "down_proj"]
        exp[f"blk.{i}.ffn_gate_exps.weight"] = gu[..., 0::2].transpose(1, 2)
        exp[f"blk.{i}.ffn_up_exps.weight"] = gu[..., 1::2].transpose(1, 2)
        exp[f"blk.{i}.ffn_down_exps.weight"] = down.transpose(1, 2)
        b = src[x + "gate_up_proj_bias"]
        exp[f"blk.{i}.ffn_gate_exps.bias"] = b[..., 0::2]
        exp[f"blk.{i}.ffn_up_exps.bias"] = b[..., 1::2]
        exp[f"blk.{i}.ffn_down_exps.bias"] = src[x + "down_proj_bias"]
    return {k: v.to(torch.float32).numpy() for k, v in exp.items()}


def read_gguf(path) -> tuple[dict, dict]:
    r = GGUFReader(path)
    tensors = {t.name: (t.tensor_type, dequantize(t.data, t.tensor_type).reshape(
        tuple(int(d) for d in reversed(t.shape)))) for t in r.tensors}
    fields = {k: f.contents() for k, f in r.fields.items()}
    return tensors, fields


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_tensor_is_exact(make_ckpt, tmp_path, shape):
    spec = SHAPES[shape]
    ckpt = make_ckpt(**spec)
    recipe = "bf16" if spec.get("layout") == "bf16" else "mxfp4"
    out = tmp_path / "m.gguf"
    convert(ckpt, out, recipe=recipe)
    got, fields = read_gguf(out)
    want = expected_gguf_values(ckpt)
    assert set(got) == set(want)
    for name, (qtype, values) in got.items():
        assert values.shape == want[name].shape, name
        np.testing.assert_array_equal(values, want[name], err_msg=name)
        if name.endswith("_exps.weight"):
            assert qtype == (Q.BF16 if recipe == "bf16" else Q.MXFP4), name
        elif values.ndim == 1 or name.endswith(".bias") or "ffn_gate_inp" in name:
            assert qtype == Q.F32, name
        else:
            assert qtype == Q.BF16, name

    cfg = json.loads((ckpt / "config.json").read_text())
    rope = cfg.get("rope_scaling") or cfg["rope_parameters"]
    A = "gpt-oss"
    assert fields["general.architecture"] == A
    assert fields[f"{A}.block_count"] == cfg["num_hidden_layers"]
    assert fields[f"{A}.embedding_length"] == cfg["hidden_size"]
    assert fields[f"{A}.expert_feed_forward_length"] == cfg["intermediate_size"]
    assert fields[f"{A}.expert_count"] == cfg["num_local_experts"]
    assert fields[f"{A}.expert_used_count"] == cfg["num_experts_per_tok"]
    assert fields[f"{A}.attention.head_count"] == cfg["num_attention_heads"]
    assert fields[f"{A}.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert fields[f"{A}.attention.key_length"] == cfg["head_dim"]
    assert fields[f"{A}.attention.sliding_window"] == cfg["sliding_window"]
    assert fields[f"{A}.context_length"] == cfg["max_position_embeddings"]
    assert fields[f"{A}.rope.freq_base"] == pytest.approx(cfg.get("rope_theta", rope.get("rope_theta")))
    assert fields[f"{A}.rope.scaling.factor"] == pytest.approx(rope["factor"])
    assert fields[f"{A}.rope.scaling.original_context_length"] == rope["original_max_position_embeddings"]
    assert fields[f"{A}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert len(fields["tokenizer.ggml.tokens"]) == cfg["vocab_size"]
    assert fields["tokenizer.ggml.eos_token_id"] == cfg["eos_token_id"]
    assert fields["tokenizer.ggml.padding_token_id"] == cfg["pad_token_id"]
    assert fields["tokenizer.chat_template"] == (ckpt / "chat_template.jinja").read_text()
    assert fields["general.file_type"] == (32 if recipe == "bf16" else 38)


MODEL_CARD = """---
license: apache-2.0
pipeline_tag: text-generation
library_name: transformers
tags:
- vllm
---

<p align="center">gpt-oss-20b</p>
license: mit (body text, not the front matter)
"""


@pytest.mark.parametrize("source_repo", [None, "openai/gpt-oss-20b"])
def test_license_and_source_repo_metadata(make_ckpt, tmp_path, source_repo):
    ckpt = tmp_path / "gpt-oss-tiny"
    shutil.copytree(make_ckpt(), ckpt)
    (ckpt / "README.md").write_text(MODEL_CARD)
    out = tmp_path / "m.gguf"
    convert(ckpt, out, source_repo=source_repo)
    fields = {k: f.contents() for k, f in GGUFReader(out).fields.items()}
    assert fields["general.license"] == "apache-2.0"
    if source_repo:
        assert fields["general.source.repo_url"] == "https://huggingface.co/openai/gpt-oss-20b"
        assert fields["general.name"] == "gpt-oss-20b"
    else:
        assert "general.source.repo_url" not in fields
        assert fields["general.name"] == "gpt-oss-tiny"

    (ckpt / "README.md").unlink()  # no model card: no license key (never a guessed one)
    convert(ckpt, out, force=True)
    assert "general.license" not in GGUFReader(out).fields


TEXTS = [
    "Hello, world! This is gpt-oss.",
    "Unicode: naïve café, Straße, 東京, 😀🚀, Ελληνικά, русский текст",
    "Digits 1234567890 and 3.14159, 1,000,000 and 0x1F",
    "def f(x):\n    return x ** 2  # comment\n\n\tindent\r\nwindows",
    "   leading spaces and    runs   \n\n\n trailing   ",
    "<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>",
    "I'm sure they'll say WE'RE done; it's John's CAMELCase and HTTPServer",
    "",
]


@pytest.mark.parametrize("shape", ["default", "sharded"])
def test_llama_cpp_tokenizer_matches_hf(make_ckpt, make_gguf, shape):
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    ckpt = make_ckpt(**SHAPES[shape])
    hf = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    llm = Llama(str(make_gguf(**SHAPES[shape])), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            want = hf.encode(text, add_special_tokens=False).ids
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            assert got == want, text
            assert llm.detokenize(got, special=True).decode("utf-8") == text
    finally:
        llm.close()
