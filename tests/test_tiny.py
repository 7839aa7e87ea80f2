"""The tiny checkpoint generator against references we did not write: safetensors, tokenizers,
transformers (GptOssForCausalLM, AutoTokenizer) and the published bytes of openai/gpt-oss-120b's files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ossgguf.errors import OssggufError
from ossgguf.fixtures.tiny import (
    TinySpec,
    config_json,
    make_tiny_checkpoint,
    render_json,
    tiny_tensors,
)
from ossgguf.fixtures.tokenizer import (
    HARMONY_SPECIAL_TOKENS,
    O200K_PATTERN,
    generation_config_json,
    special_tokens_map_json,
    tokenizer_config_json,
)
from ossgguf.quantize.kernels import f32_to_bf16

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n\treturn x ** 2  # squares\n\n\n    indented    runs   of spaces  ",
    "Numbers 1234567890, 3.14159 and 2025-08-05; prices $3.50 or 12%.",
    "Unicode: Привет мир, 你好世界, こんにちは, Grüße, café, 🙂🚀, naïve — “quotes”.",
    "CamelCaseWords snake_case_names I'm you'll WE'RE they'D \r\n windows line\r\nend",
    "",
    " ",
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    specs = {
        "mxfp4": TinySpec(),
        "bf16": TinySpec(layout="bf16"),
        "sharded": TinySpec(shards=3),
        "bf16_sharded": TinySpec(layout="bf16", shards=2, openai_shard_names=True),
        "rope_parameters": TinySpec(rope_key="rope_parameters"),
        "merges_as_strings": TinySpec(merges_as_strings=True),
    }
    return {k: make_tiny_checkpoint(root / k, s) for k, s in specs.items()}


def _load(path: Path, mxfp4: bool = True):
    """How the project loads each layout on CPU: MXFP4 needs Mxfp4Config(dequantize=True) (without
    it transformers asks for `accelerate` and GPU kernels); BF16 loads as is."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if mxfp4 else {}
    model, info = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _prompt_ids(path: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json")).encode(text).ids


# --- files and bytes -------------------------------------------------------------------------------

def test_safetensors_is_what_the_safetensors_library_writes(ckpts):
    """Every tensor reads back through safe_open, and the file equals safetensors' own serialization."""
    from safetensors import safe_open
    from safetensors.torch import save

    path = ckpts["mxfp4"] / "model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata() == {"format": "pt"}
    assert path.read_bytes() == save(tensors, metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["mxfp4", "bf16"])
def test_real_tensor_names_dtypes_shapes(ckpts, layout):
    """Names, dtypes and shapes of openai/gpt-oss-20b's checkpoint (FACTS.md), at tiny sizes."""
    from safetensors import safe_open

    s = TinySpec()
    H, F, E, V = s.hidden_size, s.intermediate_size, s.num_local_experts, s.vocab_size
    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    want = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(s.num_hidden_layers):
        p = f"model.layers.{i}."
        want.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, H), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (H, q), p + "self_attn.o_proj.bias": (H,),
            p + "self_attn.sinks": (s.num_attention_heads,),
            p + "mlp.router.weight": (E, H), p + "mlp.router.bias": (E,),
            p + "mlp.experts.gate_up_proj_bias": (E, 2 * F), p + "mlp.experts.down_proj_bias": (E, H),
        })
        if layout == "mxfp4":
            want.update({
                p + "mlp.experts.gate_up_proj_blocks": (E, 2 * F, H // 32, 16),
                p + "mlp.experts.gate_up_proj_scales": (E, 2 * F, H // 32),
                p + "mlp.experts.down_proj_blocks": (E, H, F // 32, 16),
                p + "mlp.experts.down_proj_scales": (E, H, F // 32),
            })
        else:
            want.update({p + "mlp.experts.gate_up_proj": (E, H, 2 * F), p + "mlp.experts.down_proj": (E, F, H)})
    with safe_open(ckpts[layout] / "model.safetensors", "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert got == want
    for k, dt in dtypes.items():
        assert dt == ("U8" if k.endswith(("_blocks", "_scales")) else "BF16"), k


def test_sharded_index(ckpts):
    from safetensors import safe_open

    for key, names in (("sharded", [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]),
                       ("bf16_sharded", ["model-00000-of-00001.safetensors", "model-00001-of-00001.safetensors"])):
        d = ckpts[key]
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == names
        assert not (d / "model.safetensors").exists()
        total = 0
        for name in names:
            with safe_open(d / name, "pt") as f:
                for k in f.keys():
                    assert index["weight_map"][k] == name
                    t = f.get_tensor(k)
                    total += t.numel() * t.element_size()
        assert index["metadata"]["total_size"] == total


def test_deterministic_and_rewrites_cleanly(tmp_path, ckpts):
    d = make_tiny_checkpoint(tmp_path / "a", TinySpec(shards=3))
    assert {p.name: p.read_bytes() for p in d.iterdir()} == {p.name: p.read_bytes() for p in ckpts["sharded"].iterdir()}
    make_tiny_checkpoint(d)  # same folder, one file now: the old shards and index must go
    assert sorted(p.name for p in d.glob("model*")) == ["model.safetensors"]
    assert not list(d.glob(".*tmp*"))


# Published SHA-256 of openai/gpt-oss-120b's files at revision b5c939de8f754692c1647ca79fbf85e8c1e70f8a.
REAL_120B_SHA256 = {
    "config.json": "933aeb666a3fd851133ddd7686414f369bc564c4185fb5704416550879f10566",
    "generation_config.json": "f9970ada892d2d1f72e3ed0a6535ccebadd11897318794ca671d8c7014c957da",
    "special_tokens_map.json": "dd5e191d20c12d2fee1da5bae14ca1db0f5f4215300af691f23cdee97120a293",
    "tokenizer_config.json": "9279e942392b742d633c7adbb89ebe002c98399db8926a7af5125c726f404070",
    "chat_template.jinja": "a4c9919cbbd4acdd51ccffe22da049264b1b73e59055fa58811a99efbd7c8146",
}


def test_json_files_are_byte_identical_to_gpt_oss_120b(ckpts):
    """With 120b's shapes and the real special-token base, the writers give the real files' bytes."""
    spec = TinySpec(hidden_size=2880, intermediate_size=2880, num_hidden_layers=36, num_local_experts=128,
                    num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                    sliding_window=128, vocab_size=201088, max_position_embeddings=131072)
    made = {
        "config.json": render_json(config_json(spec, 199998)),
        "generation_config.json": render_json(generation_config_json(199998)),
        "special_tokens_map.json": render_json(special_tokens_map_json()),
        "tokenizer_config.json": render_json(tokenizer_config_json(199998)),
        "chat_template.jinja": (ckpts["mxfp4"] / "chat_template.jinja").read_text(encoding="utf-8"),
    }
    for name, text in made.items():
        assert hashlib.sha256(text.encode()).hexdigest() == REAL_120B_SHA256[name], name


def test_config_fields(ckpts):
    cfg = json.loads((ckpts["mxfp4"] / "config.json").read_text())
    base = TinySpec().n_tokens - len(HARMONY_SPECIAL_TOKENS)
    assert cfg["eos_token_id"] == base + 4 and cfg["pad_token_id"] == base + 1
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"]
    assert cfg["rope_scaling"]["original_max_position_embeddings"] * 32 == cfg["max_position_embeddings"]
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    bf = json.loads((ckpts["bf16"] / "config.json").read_text())
    assert "quantization_config" not in bf and bf["torch_dtype"] == "bfloat16"
    rp = json.loads((ckpts["rope_parameters"] / "config.json").read_text())
    assert "rope_scaling" not in rp and "rope_theta" not in rp and rp["rope_parameters"]["rope_theta"] == 150000


def test_bf16_rounding_matches_torch():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 10000),
                        np.array([0.0, -0.0, 1.0, 1.00390625, 1.0078125, 1.01171875, 65504.0, 1e-40], np.float32)])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(f32_to_bf16(x), want)  # the one BF16 codec (quantize/kernels.py) makes the fixtures


def test_bad_specs_are_refused(tmp_path):
    with pytest.raises(OssggufError, match="n_merges"):
        make_tiny_checkpoint(tmp_path, TinySpec(n_merges=600))
    with pytest.raises(OssggufError, match="multiples of 32"):
        make_tiny_checkpoint(tmp_path, TinySpec(hidden_size=48))
    with pytest.raises(OssggufError, match="fewer than"):
        make_tiny_checkpoint(tmp_path, TinySpec(n_merges=3000, vocab_size=4096))


# --- tokenizer -------------------------------------------------------------------------------------

def _reference_tokenizer(path: Path):
    """gpt-oss's tokenizer as transformers' TikTokenConverter builds it, on our vocabulary and merges."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    model = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    ref = Tokenizer(BPE(model["vocab"], [tuple(m) for m in model["merges"]], fuse_unk=False))
    ref.model.ignore_merges = True
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in HARMONY_SPECIAL_TOKENS])
    ref.post_processor = processors.ByteLevel(trim_offsets=False)
    return ref


def test_tokenizer_json_is_what_tokenizers_writes(ckpts, tmp_path):
    ref = _reference_tokenizer(ckpts["mxfp4"])
    ref.save(str(tmp_path / "ref.json"), pretty=True)
    assert (ckpts["mxfp4"] / "tokenizer.json").read_bytes() == (tmp_path / "ref.json").read_bytes()


def test_tokenizer_round_trips_and_special_ids(ckpts):
    from tokenizers import Tokenizer

    spec = TinySpec()
    base = spec.n_tokens - len(HARMONY_SPECIAL_TOKENS)
    tok = Tokenizer.from_file(str(ckpts["mxfp4"] / "tokenizer.json"))
    legacy = Tokenizer.from_file(str(ckpts["merges_as_strings"] / "tokenizer.json"))
    assert tok.get_vocab_size() == spec.n_tokens <= spec.vocab_size
    for i, name in enumerate(HARMONY_SPECIAL_TOKENS):
        assert tok.encode(name).ids == [base + i]
        assert tok.id_to_token(base + i) == name
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
        assert legacy.encode(text).ids == ids
        assert max(ids, default=0) < base  # plain text never makes special tokens
    harmony = "<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"
    ids = tok.encode(harmony).ids
    assert tok.decode(ids, skip_special_tokens=False) == harmony
    assert ids[0] == base + 8 and ids[-1] == base + 4  # <|start|> ... <|return|>
    assert len(tok.encode("the model was trained").ids) < len(b"the model was trained")  # merges used


def test_every_token_is_its_own_merge_result(ckpts):
    """With ignore_merges off (llama.cpp's BPE) the ids are the same as with it on (tokenizers' default
    for gpt-oss): each token's text encodes to that token alone."""
    from tokenizers import Tokenizer

    data = json.loads((ckpts["mxfp4"] / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["ignore_merges"] = False
    merge_only = Tokenizer.from_str(json.dumps(data))
    tok = Tokenizer.from_file(str(ckpts["mxfp4"] / "tokenizer.json"))
    for token, i in data["model"]["vocab"].items():
        assert merge_only.model.tokenize(token)[0].id == i and len(merge_only.model.tokenize(token)) == 1, token
    corpus_like = " ".join(TEXTS) + " the experts tokens checkpoint weights converting"
    assert merge_only.encode(corpus_like).ids == tok.encode(corpus_like).ids


def test_autotokenizer_and_chat_template(ckpts):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = ckpts["mxfp4"]
    at = AutoTokenizer.from_pretrained(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    base = TinySpec().n_tokens - len(HARMONY_SPECIAL_TOKENS)
    assert (at.bos_token_id, at.eos_token_id, at.pad_token_id) == (base, base + 4, base + 1)
    for text in TEXTS:
        assert at(text)["input_ids"] == raw.encode(text).ids
    assert at.chat_template == (path / "chat_template.jinja").read_text(encoding="utf-8")
    messages = [{"role": "user", "content": "Hi there"}]
    text = at.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, reasoning_effort="low")
    assert text.startswith("<|start|>system<|message|>") and "Reasoning: low" in text
    assert text.endswith("<|start|>user<|message|>Hi there<|end|><|start|>assistant")
    ids = at.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids.count(base + 8) == 3 and ids.count(base + 10) == 2  # <|start|> x3, <|message|> x2


# --- transformers' GptOssForCausalLM ---------------------------------------------------------------

PROMPT = "The quick brown fox jumps over the lazy dog, and then it ran 12345 miles to Paris."


def test_layouts_load_and_agree(ckpts):
    """The MXFP4 and BF16 layouts of one seed are the same model: same parameters, same logits."""
    mx, bf = _load(ckpts["mxfp4"]), _load(ckpts["bf16"], mxfp4=False)
    sd_mx, sd_bf = mx.state_dict(), bf.state_dict()
    assert sd_mx.keys() == sd_bf.keys()
    for k in sd_mx:
        assert torch.equal(sd_mx[k], sd_bf[k]), k
    ids = _prompt_ids(ckpts["mxfp4"], PROMPT)
    assert len(ids) > 2 * TinySpec().sliding_window
    a, b = _logits(mx, ids), _logits(bf, ids)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


@pytest.mark.parametrize("variant,mxfp4", [("sharded", True), ("rope_parameters", True), ("bf16_sharded", False)])
def test_variants_give_the_same_logits(ckpts, variant, mxfp4):
    ids = _prompt_ids(ckpts["mxfp4"], PROMPT)
    want = _logits(_load(ckpts["mxfp4"]), ids)
    assert torch.equal(_logits(_load(ckpts[variant], mxfp4), ids), want)


def test_logits_are_not_degenerate(ckpts):
    model = _load(ckpts["mxfp4"])
    chosen: list[torch.Tensor] = []
    for layer in model.model.layers:
        layer.mlp.router.register_forward_hook(lambda mod, inp, out: chosen.append(out[2]))
    prompts = [PROMPT, "def f(x):\n    return x * 2\n", "Привет, мир! 你好，世界！ 🙂"]
    last = []
    for text in prompts:
        logits = _logits(model, _prompt_ids(ckpts["mxfp4"], text))
        assert torch.isfinite(logits).all() and logits.std() > 0.5
        assert len(set(logits.argmax(-1).tolist())) > 1  # not the same next token everywhere
        last.append(logits[-1])
    # the prompt moves the next-token logits (by 6-9 here), far beyond any CPU's rounding
    assert all((a - b).abs().max() > 1.0 for a, b in zip(last, last[1:]))
    spec = TinySpec()
    for idx in chosen:
        sets = {tuple(sorted(r)) for r in idx.tolist()}
        assert len(sets) > 1  # routing differs between tokens
        assert set(idx.flatten().tolist()) == set(range(spec.num_local_experts))  # every expert used


def test_router_bias_silences_experts(tmp_path):
    spec = TinySpec(router_bias=[[0.0, 0.0, -1e4, -1e4], [-1e4, 0.0, 0.0, -1e4]])
    model = _load(make_tiny_checkpoint(tmp_path, spec))
    chosen: list[torch.Tensor] = []
    for layer in model.model.layers:
        layer.mlp.router.register_forward_hook(lambda mod, inp, out: chosen.append(out[2]))
    _logits(model, _prompt_ids(tmp_path, PROMPT))
    assert set(chosen[0].flatten().tolist()) == {0, 1}
    assert set(chosen[1].flatten().tolist()) == {1, 2}


def test_expert_values_are_mxfp4_exact(ckpts):
    """The BF16 layout holds exactly transformers' own dequantization of the MXFP4 blocks."""
    from safetensors import safe_open
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    name = "model.layers.1.mlp.experts.down_proj"
    with safe_open(ckpts["mxfp4"] / "model.safetensors", "pt") as f:
        deq = convert_moe_packed_tensors(f.get_tensor(name + "_blocks"), f.get_tensor(name + "_scales"),
                                         dtype=torch.float32)
    with safe_open(ckpts["bf16"] / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor(name).float(), deq)


def test_tiny_tensors_independent_of_layout():
    from ossgguf.model import GptOssConfig

    spec_mx, spec_bf = TinySpec(), TinySpec(layout="bf16")
    mx = tiny_tensors(spec_mx, GptOssConfig.from_dict(config_json(spec_mx, spec_mx.n_tokens - 21)))
    bf = tiny_tensors(spec_bf, GptOssConfig.from_dict(config_json(spec_bf, spec_bf.n_tokens - 21)))
    for k in mx:
        if k in bf:
            assert np.array_equal(mx[k][1], bf[k][1]), k
