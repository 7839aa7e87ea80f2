"""gpt-oss-120b / -20b tensor shapes, and sparse GGUF files with their real tensor infos (no data).

The shapes come from the published config.json (FACTS.md); tensor names from ossgguf.model. A
sparse file is a real GGUF header (written by gguf-py's GGUFWriter) extended to its full length
with truncate, so readers that memory-map see the true file size at no disk cost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, RopeScalingType

from ossgguf.model import (
    ARCH,
    EXPERT_DOWN,
    EXPERT_GATE,
    EXPERT_UP,
    GLOBAL_TENSORS,
    LAYER_TENSORS,
    TensorClass,
    tensor_class,
)


@dataclass(frozen=True)
class Dims:
    n_layer: int
    n_expert: int
    n_embd: int = 2880
    n_ff: int = 2880
    n_expert_used: int = 4
    n_head: int = 64
    n_head_kv: int = 8
    head_dim: int = 64
    n_vocab: int = 201088
    n_ctx: int = 131072
    n_swa: int = 128


GPT_OSS_120B = Dims(n_layer=36, n_expert=128)
GPT_OSS_20B = Dims(n_layer=24, n_expert=32)

# llama.cpp's published MXFP4 GGUF: experts MXFP4, other 2-D weights Q8_0, router and small tensors F32
MXFP4_Q8 = {TensorClass.EXPERT: "MXFP4", TensorClass.ATTENTION: "Q8_0", TensorClass.EMBEDDING: "Q8_0",
            TensorClass.OUTPUT: "Q8_0", TensorClass.ROUTER: "F32", TensorClass.NORM: "F32"}
MXFP4_BF16 = {**MXFP4_Q8, TensorClass.ATTENTION: "BF16", TensorClass.EMBEDDING: "BF16", TensorClass.OUTPUT: "BF16"}


def tensor_table(d: Dims) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, ne in GGUF order) for every tensor."""
    q, kv = d.n_head * d.head_dim, d.n_head_kv * d.head_dim
    global_ne = {"model.embed_tokens.weight": (d.n_embd, d.n_vocab), "model.norm.weight": (d.n_embd,),
                 "lm_head.weight": (d.n_embd, d.n_vocab)}
    layer_ne = {
        "input_layernorm.weight": (d.n_embd,), "post_attention_layernorm.weight": (d.n_embd,),
        "self_attn.q_proj.weight": (d.n_embd, q), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (d.n_embd, kv), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (d.n_embd, kv), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (q, d.n_embd), "self_attn.o_proj.bias": (d.n_embd,),
        "self_attn.sinks": (d.n_head,),
        "mlp.router.weight": (d.n_embd, d.n_expert), "mlp.router.bias": (d.n_expert,),
    }
    experts = {f"{EXPERT_GATE}.weight": (d.n_embd, d.n_ff, d.n_expert), f"{EXPERT_GATE}.bias": (d.n_ff, d.n_expert),
               f"{EXPERT_UP}.weight": (d.n_embd, d.n_ff, d.n_expert), f"{EXPERT_UP}.bias": (d.n_ff, d.n_expert),
               f"{EXPERT_DOWN}.weight": (d.n_ff, d.n_embd, d.n_expert), f"{EXPERT_DOWN}.bias": (d.n_embd, d.n_expert)}
    out = [(GLOBAL_TENSORS[k][0], ne) for k, ne in global_ne.items()]
    for i in range(d.n_layer):
        out += [(f"blk.{i}.{LAYER_TENSORS[k][0]}", ne) for k, ne in layer_ne.items()]
        out += [(f"blk.{i}.{k}", ne) for k, ne in experts.items()]
    assert len(out) == len(GLOBAL_TENSORS) + d.n_layer * (len(LAYER_TENSORS) + len(experts))
    return out


def add_metadata(w: GGUFWriter, d: Dims) -> None:
    w.add_block_count(d.n_layer)
    w.add_context_length(d.n_ctx)
    w.add_embedding_length(d.n_embd)
    w.add_feed_forward_length(d.n_ff)
    w.add_expert_feed_forward_length(d.n_ff)
    w.add_expert_count(d.n_expert)
    w.add_expert_used_count(d.n_expert_used)
    w.add_head_count(d.n_head)
    w.add_head_count_kv(d.n_head_kv)
    w.add_key_length(d.head_dim)
    w.add_value_length(d.head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_sliding_window(d.n_swa)
    w.add_rope_freq_base(150000.0)
    w.add_rope_scaling_type(RopeScalingType.YARN)
    w.add_rope_scaling_factor(32.0)
    w.add_rope_scaling_orig_ctx_len(d.n_ctx // 32)


def write_sparse_gguf(path: Path, d: Dims, types: dict[TensorClass, str] = MXFP4_Q8,
                      arch: str = ARCH) -> Path:
    """A GGUF with the real tensor infos of `d` and no data: the header, then a hole to full length."""
    w = GGUFWriter(path, arch)
    add_metadata(w, d)
    for name, ne in tensor_table(d):
        qt = GGMLQuantizationType[types[tensor_class(name)]]
        block, type_size = GGML_QUANT_SIZES[qt]
        n = int(np.prod(ne))
        shape = tuple(reversed(ne))  # numpy order
        if qt in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            dtype = np.float32 if qt == GGMLQuantizationType.F32 else np.float16
            w.add_tensor_info(name, shape, np.dtype(dtype), n * type_size // block, raw_dtype=qt)
        else:  # quantized (and BF16) tensors are described by their byte shape
            byte_shape = (*shape[:-1], shape[-1] // block * type_size)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), n * type_size // block, raw_dtype=qt)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    start = w.ggml_pad(path.stat().st_size, w.data_alignment)  # tensor data begins aligned
    data = sum(w.ggml_pad(ti.nbytes, w.data_alignment) for ti in w.tensors[0].values())
    os.truncate(path, start + data)
    return path
