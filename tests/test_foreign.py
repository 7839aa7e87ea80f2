"""Checkpoints this project did not generate: a model saved by transformers itself
(GptOssForCausalLM.save_pretrained, transformers 5's rope_parameters, BF16 experts) with a
vocabulary re-trained by Hugging Face `tokenizers` (the o200k pre-tokenizer, other merges, the
harmony tokens at other ids). llama.cpp's converter refuses such a vocabulary (its sample-encoding
hash is unknown); ours recognises the pre-tokenizer by its regex."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
import torch
from test_convert import TEXTS, expected_gguf_values, read_gguf
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GptOssConfig, GptOssForCausalLM

from ossgguf.convert.convert import convert
from ossgguf.harmony.tokens import SPECIAL_TOKENS as HARMONY_SPECIAL_TOKENS
from ossgguf.model import O200K_PATTERN

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def main():\n    print('hello, world')\n    return 0\n",
    "Numbers: 12345 678 9.75 and unicode: café naïve 東京 😀",
    "SHOUTING and CamelCase and snake_case and kebab-case",
] * 20


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    d = tmp_path_factory.mktemp("foreign")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=list(HARMONY_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(d / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in HARMONY_SPECIAL_TOKENS}
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}))
    (d / "chat_template.jinja").write_text(
        resources.files("ossgguf").joinpath("data/chat_template.jinja").read_text())

    cfg = GptOssConfig(vocab_size=448, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                       num_local_experts=4, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64, sliding_window=8, max_position_embeddings=131072,
                       eos_token_id=ids["<|return|>"], pad_token_id=ids["<|endoftext|>"],
                       bos_token_id=ids["<|startoftext|>"])
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg)
    with torch.no_grad():  # transformers' init leaves norms at 1 and biases at 0: make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.to(torch.bfloat16).save_pretrained(d)
    return d


def test_transformers_saved_checkpoint_converts_exactly(foreign, tmp_path):
    out = tmp_path / "f.gguf"
    convert(foreign, out, recipe="bf16")
    got, fields = read_gguf(out)
    want = expected_gguf_values(foreign)
    assert set(got) == set(want)
    for name, (_, values) in got.items():
        np.testing.assert_array_equal(values, want[name], err_msg=name)
    assert fields["tokenizer.ggml.pre"] == "gpt-4o"
    assert fields["tokenizer.ggml.eos_token_id"] == Tokenizer.from_file(str(foreign / "tokenizer.json")).token_to_id(
        "<|return|>")


def test_retrained_vocabulary_tokenizes_like_hf(foreign, tmp_path):
    from llama_cpp import Llama

    out = tmp_path / "f.gguf"
    convert(foreign, out)  # default recipe: the BF16 experts are quantized to MXFP4 on the way
    hf = Tokenizer.from_file(str(foreign / "tokenizer.json"))
    llm = Llama(str(out), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf.encode(
                text, add_special_tokens=False).ids, text
    finally:
        llm.close()


def test_transformers_saved_checkpoint_logits(foreign, tmp_path):
    from ossgguf.runner.llama_ctypes import open_llama

    out = tmp_path / "f.gguf"
    convert(foreign, out, recipe="bf16")
    ids = np.random.default_rng(2).integers(30, 400, 40).tolist()
    model = GptOssForCausalLM.from_pretrained(foreign, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    llm = open_llama(out, n_ctx=64, n_batch=64, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert np.median(cos) > 0.999 and (cos > 0.99).mean() >= 0.9, cos
