"""llama.cpp's logits on our GGUF against transformers' GptOssForCausalLM on the same checkpoint.

The tiny models use gpt-oss's real head size and yarn settings (original context 4096, factor 32),
and prompts longer than the sliding window. With every expert active no routing decision can flip,
so the comparison is strict; with top-k routing a near-tie between two experts may flip on one
side only, so that comparison counts positions instead of taking the worst one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GptOssForCausalLM

REAL_ROPE = {"head_dim": 64, "max_position_embeddings": 131072, "sliding_window": 16}
N_TOKENS = 64  # four sliding windows


def _logits_pair(make_ckpt, make_gguf, recipe, **spec):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 500, N_TOKENS).tolist()
    # transformers reads the dequantized (BF16) layout of the same seed: the same expert values.
    model = GptOssForCausalLM.from_pretrained(make_ckpt(layout="bf16", **spec), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    from ossgguf.runner.llama_ctypes import open_llama  # honours OSSGGUF_NO_REPACK, as the engine does

    llm = open_llama(make_gguf(recipe, **spec), n_ctx=128, n_batch=N_TOKENS, logits_all=True, n_threads=1,
                     verbose=False)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[:N_TOKENS])
    finally:
        llm.close()
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"{recipe}: min cos {cos.min():.6f}, median cos {np.median(cos):.6f}, top-1 {top1:.3f}, max |diff| {rel:.4f} of max |logit|")
    return cos, top1, rel


@pytest.mark.parametrize("recipe", ["mxfp4", "bf16"])
def test_logits_match_transformers_all_experts_active(make_ckpt, make_gguf, recipe):
    cos, top1, rel = _logits_pair(make_ckpt, make_gguf, recipe, num_experts_per_tok=4, **REAL_ROPE)
    assert cos.min() > 0.999, cos
    assert rel < 0.03
    assert top1 >= 0.9  # random weights: a few positions have near-tied top tokens


@pytest.mark.parametrize("recipe", ["mxfp4", "bf16"])
def test_logits_match_transformers_routed(make_ckpt, make_gguf, recipe):
    cos, top1, _ = _logits_pair(make_ckpt, make_gguf, recipe, **REAL_ROPE)
    assert np.median(cos) > 0.9995, cos
    assert (cos > 0.999).mean() >= 0.9, cos
    assert top1 >= 0.9
