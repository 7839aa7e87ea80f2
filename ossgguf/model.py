"""gpt-oss model knowledge, defined once: config fields, tensor names, tensor classes, metadata.

The converter, the quantizer, the planner and the offload patterns all read this module; nothing
else spells a gpt-oss tensor name. Names follow llama.cpp's gpt-oss loader (src/models/openai-moe.cpp).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGUFValueType

from ossgguf.gguf.values import KV, kv_array, kv_f32, kv_str, kv_u32

from .errors import OssggufError

ARCH = "gpt-oss"
HF_ARCHITECTURE = "GptOssForCausalLM"
MXFP4_BLOCK = 32  # values per MXFP4 block (one E8M0 scale + 16 bytes of E2M1 codes)


class TensorClass(enum.StrEnum):
    """What a tensor is for; recipes choose types and the planner places bytes by class."""

    EXPERT = "expert"  # ffn_{gate,up,down}_exps.weight: ~95% of gpt-oss-120b
    ATTENTION = "attention"  # attn_{q,k,v,output}.weight
    EMBEDDING = "embedding"  # token_embd.weight
    OUTPUT = "output"  # output.weight (the LM head)
    ROUTER = "router"  # ffn_gate_inp.weight
    NORM = "norm"  # norms, attention sinks and every bias: small, kept F32


@dataclass(frozen=True)
class GptOssConfig:
    """The config.json fields the conversion needs (both 120b and 20b share the layout)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_local_experts: int
    num_experts_per_tok: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_theta: float
    rope_scaling: dict[str, Any]
    max_position_embeddings: int
    vocab_size: int
    rms_norm_eps: float
    swiglu_limit: float
    eos_token_id: int | None
    pad_token_id: int | None
    bos_token_id: int | None
    quant_method: str | None  # "mxfp4" for the released checkpoints, None for BF16 fine-tunes
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], where: str = "config.json") -> GptOssConfig:
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") != "gpt_oss" and HF_ARCHITECTURE not in archs:
            got = cfg.get("model_type") or ", ".join(archs) or "unknown"
            raise OssggufError(
                f"{where} describes a '{got}' model, not gpt-oss: ossgguf converts only "
                f"gpt-oss checkpoints (model_type gpt_oss, {HF_ARCHITECTURE})"
            )
        try:
            n_layers = int(cfg["num_hidden_layers"])
            # transformers 5.x writes rope_parameters (with rope_theta inside) instead of
            # rope_scaling + rope_theta; accept both.
            rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
            rope_theta = float(cfg.get("rope_theta", rope.get("rope_theta", 150000.0)))
            layer_types = tuple(
                cfg.get("layer_types")
                or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
            )
            qcfg = cfg.get("quantization_config") or {}
            out = cls(
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_local_experts=int(cfg["num_local_experts"]),
                num_experts_per_tok=int(cfg.get("num_experts_per_tok", cfg.get("experts_per_token", 4))),
                num_attention_heads=int(cfg["num_attention_heads"]),
                num_key_value_heads=int(cfg["num_key_value_heads"]),
                head_dim=int(cfg.get("head_dim", 64)),
                sliding_window=int(cfg.get("sliding_window", 128)),
                layer_types=layer_types,
                rope_theta=rope_theta,
                rope_scaling=rope,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
                vocab_size=int(cfg["vocab_size"]),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
                eos_token_id=_first_id(cfg.get("eos_token_id")),
                pad_token_id=_first_id(cfg.get("pad_token_id")),
                bos_token_id=_first_id(cfg.get("bos_token_id")),
                quant_method=qcfg.get("quant_method"),
                raw=cfg,
            )
        except KeyError as e:
            raise OssggufError(f"{where} has no '{e.args[0]}' field: is it a gpt-oss config.json?") from None
        except (TypeError, ValueError) as e:
            raise OssggufError(f"{where} has a malformed field: {e}") from None
        if len(out.layer_types) != n_layers:
            raise OssggufError(f"{where}: layer_types has {len(out.layer_types)} entries for {n_layers} layers")
        rope_type = out.rope_scaling.get("rope_type", out.rope_scaling.get("type"))
        if out.rope_scaling and rope_type != "yarn":
            raise OssggufError(f"{where}: gpt-oss uses yarn rope scaling, this config has '{rope_type}'")
        return out

    @property
    def is_swa(self) -> list[bool]:
        return [t == "sliding_attention" for t in self.layer_types]


def _first_id(v: Any) -> int | None:
    if isinstance(v, list):
        return int(v[0]) if v else None
    return None if v is None else int(v)


# --- tensor names -------------------------------------------------------------------------------

# Hugging Face name (with {i} for the layer) -> (GGUF name, class). The expert tensors are handled
# by EXPERT_SOURCES below, since one HF tensor becomes two GGUF tensors (gate/up de-interleaved).
GLOBAL_TENSORS: dict[str, tuple[str, TensorClass]] = {
    "model.embed_tokens.weight": ("token_embd.weight", TensorClass.EMBEDDING),
    "model.norm.weight": ("output_norm.weight", TensorClass.NORM),
    "lm_head.weight": ("output.weight", TensorClass.OUTPUT),
}
LAYER_TENSORS: dict[str, tuple[str, TensorClass]] = {
    "input_layernorm.weight": ("attn_norm.weight", TensorClass.NORM),
    "post_attention_layernorm.weight": ("post_attention_norm.weight", TensorClass.NORM),
    "self_attn.q_proj.weight": ("attn_q.weight", TensorClass.ATTENTION),
    "self_attn.q_proj.bias": ("attn_q.bias", TensorClass.NORM),
    "self_attn.k_proj.weight": ("attn_k.weight", TensorClass.ATTENTION),
    "self_attn.k_proj.bias": ("attn_k.bias", TensorClass.NORM),
    "self_attn.v_proj.weight": ("attn_v.weight", TensorClass.ATTENTION),
    "self_attn.v_proj.bias": ("attn_v.bias", TensorClass.NORM),
    "self_attn.o_proj.weight": ("attn_output.weight", TensorClass.ATTENTION),
    "self_attn.o_proj.bias": ("attn_output.bias", TensorClass.NORM),
    "self_attn.sinks": ("attn_sinks.weight", TensorClass.NORM),
    "mlp.router.weight": ("ffn_gate_inp.weight", TensorClass.ROUTER),
    "mlp.router.bias": ("ffn_gate_inp.bias", TensorClass.NORM),
}
# Expert tensors. gate_up is interleaved (gate = even rows, up = odd rows) in weights, scales
# and bias alike; MXFP4 checkpoints store *_blocks [E, rows, cols/32, 16] + *_scales [E, rows, cols/32];
# BF16 fine-tunes store gate_up_proj [E, H, 2F] and down_proj [E, F, H] (transposed).
EXPERT_GATE = "ffn_gate_exps"
EXPERT_UP = "ffn_up_exps"
EXPERT_DOWN = "ffn_down_exps"
HF_LAYER_PREFIX = "model.layers.{i}."
HF_EXPERTS = "mlp.experts."

_BLK = re.compile(r"^blk\.(\d+)\.")
_EXPERT_WEIGHT = re.compile(r"\.ffn_(gate|up|down)_exps\.weight$")


def layer_of(gguf_name: str) -> int | None:
    """The block index of a GGUF tensor name, or None for global tensors."""
    m = _BLK.match(gguf_name)
    return int(m.group(1)) if m else None


def tensor_class(gguf_name: str) -> TensorClass:
    """The class of any gpt-oss GGUF tensor name (also for names read back from a GGUF file)."""
    if _EXPERT_WEIGHT.search(gguf_name):
        return TensorClass.EXPERT
    if gguf_name.endswith(".bias"):
        return TensorClass.NORM
    base = _BLK.sub("", gguf_name)
    for name, cls in list(GLOBAL_TENSORS.values()) + list(LAYER_TENSORS.values()):
        if name == base:
            return cls
    raise OssggufError(f"'{gguf_name}' is not a gpt-oss tensor name")


def expert_offload_pattern(layers: range | None = None, weights_only: bool = True) -> str:
    """The tensor-buffer-override regex that keeps expert tensors in system RAM.

    Matches llama.cpp's --cpu-moe (all layers) or --n-cpu-moe N (blk.0 .. blk.N-1). Matching only
    `.weight` keeps the tiny expert biases with the rest of the layer on the GPU.
    """
    suffix = r"\.weight" if weights_only else ""
    exps = r"ffn_(up|down|gate)_exps" + suffix
    if layers is None:
        return r"\." + exps
    ids = "|".join(str(i) for i in layers)
    return rf"^blk\.({ids})\.{exps}"


def size_label(total_params: int, active_params: int | None = None) -> str:
    """general.size_label as llama.cpp writes it for MoE models ("120B", "20B", or "1.2M")."""
    def fmt(n: int) -> str:
        for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= scale:
                v = n / scale
                return f"{v:.0f}{unit}" if v >= 10 else f"{v:.1f}{unit}".replace(".0", "")
        return str(n)

    return fmt(total_params)


# --- tokenizer ----------------------------------------------------------------------------------

# The o200k split regex of gpt-oss's tokenizer.json (as tiktoken's o200k_base). llama.cpp implements
# it as the "gpt-4o" pre-tokenizer; recognising the regex itself (not a hash of a sample encoding)
# lets re-trained vocabularies with the same pre-tokenizer convert.
O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA_PRE_TOKENIZER = "gpt-4o"

# Harmony special tokens in gpt-oss's order; the real ids are 199998 + index. A re-trained or tiny
# vocabulary keeps the names (the chat format and llama.cpp's end-of-generation detection use them).
HARMONY_SPECIAL_TOKENS = (
    "<|startoftext|>", "<|endoftext|>", "<|reserved_200000|>", "<|reserved_200001|>", "<|return|>",
    "<|constrain|>", "<|reserved_200004|>", "<|channel|>", "<|start|>", "<|end|>", "<|message|>",
    "<|reserved_200009|>", "<|reserved_200010|>", "<|reserved_200011|>", "<|call|>",
    "<|reserved_200013|>", "<|reserved_200014|>", "<|reserved_200015|>", "<|reserved_200016|>",
    "<|reserved_200017|>", "<|endofprompt|>",
)


# --- the conversion table -----------------------------------------------------------------------

@dataclass(frozen=True)
class OutTensor:
    """One GGUF tensor and where its values come from in a Hugging Face checkpoint.

    kind: "copy" (one HF tensor as is), "experts" (an HF expert tensor, MXFP4 blocks+scales or dense;
    `part` gate/up/down picks the rows of interleaved gate_up), "bias_part" (gate/up half of an
    interleaved expert bias).
    """

    name: str
    shape: tuple[int, ...]  # numpy order
    cls: TensorClass
    kind: str
    source: str  # HF tensor name (for MXFP4 experts: the common prefix of *_blocks / *_scales)
    part: str | None = None


def hf_tensor_shapes(cfg: GptOssConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Every tensor a gpt-oss checkpoint of this config holds, with its shape (layout mxfp4 or bf16)."""
    H, F, E, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H),
    }
    for i in range(cfg.num_hidden_layers):
        p = HF_LAYER_PREFIX.format(i=i)
        x = p + HF_EXPERTS
        out.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, H), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (H, q), p + "self_attn.o_proj.bias": (H,),
            p + "self_attn.sinks": (cfg.num_attention_heads,),
            p + "mlp.router.weight": (E, H), p + "mlp.router.bias": (E,),
            x + "gate_up_proj_bias": (E, 2 * F), x + "down_proj_bias": (E, H),
        })
        if layout == "mxfp4":
            out.update({
                x + "gate_up_proj_blocks": (E, 2 * F, H // MXFP4_BLOCK, 16),
                x + "gate_up_proj_scales": (E, 2 * F, H // MXFP4_BLOCK),
                x + "down_proj_blocks": (E, H, F // MXFP4_BLOCK, 16),
                x + "down_proj_scales": (E, H, F // MXFP4_BLOCK),
            })
        else:  # dequantized fine-tunes: [E, in, out], transposed relative to the blocks layout
            out.update({x + "gate_up_proj": (E, H, 2 * F), x + "down_proj": (E, F, H)})
    return out


def conversion_table(cfg: GptOssConfig, layout: str) -> list[OutTensor]:
    """The GGUF tensors of a converted checkpoint, in llama.cpp's order, with their sources."""
    H, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    shapes = hf_tensor_shapes(cfg, layout)
    out = [OutTensor("token_embd.weight", shapes["model.embed_tokens.weight"], TensorClass.EMBEDDING, "copy",
                     "model.embed_tokens.weight")]
    for i in range(cfg.num_hidden_layers):
        p, b = HF_LAYER_PREFIX.format(i=i), f"blk.{i}."
        for hf, (name, cls) in LAYER_TENSORS.items():
            out.append(OutTensor(b + name, shapes[p + hf], cls, "copy", p + hf))
        x = p + HF_EXPERTS
        src_gu = x + "gate_up_proj"
        src_d = x + "down_proj"
        for part, name, shape in (("gate", EXPERT_GATE, (E, F, H)), ("up", EXPERT_UP, (E, F, H)),
                                  ("down", EXPERT_DOWN, (E, H, F))):
            src = src_d if part == "down" else src_gu
            out.append(OutTensor(f"{b}{name}.weight", shape, TensorClass.EXPERT, "experts", src, part))
            if part == "down":
                out.append(OutTensor(f"{b}{name}.bias", (E, H), TensorClass.NORM, "copy", x + "down_proj_bias"))
            else:
                out.append(OutTensor(f"{b}{name}.bias", (E, F), TensorClass.NORM, "bias_part",
                                     x + "gate_up_proj_bias", part))
    out.append(OutTensor("output_norm.weight", (H,), TensorClass.NORM, "copy", "model.norm.weight"))
    out.append(OutTensor("output.weight", shapes["lm_head.weight"], TensorClass.OUTPUT, "copy", "lm_head.weight"))
    return out


# --- metadata -----------------------------------------------------------------------------------

def gguf_metadata(cfg: GptOssConfig, *, name: str, file_type: int, recipe: str, tensors: list[tuple[tuple[int, ...], TensorClass]],
                  license: str | None = None, source_repo: str | None = None) -> dict[str, KV]:
    """The general.* and gpt-oss.* keys llama.cpp's loader reads (src/models/openai-moe.cpp)."""
    from gguf.utility import size_label

    n_params = [int(np.prod(shape)) for shape, _ in tensors]
    expert = sum(n for n, (_, c) in zip(n_params, tensors) if c == TensorClass.EXPERT)
    total = sum(n_params)
    A = ARCH
    rope = cfg.rope_scaling
    kvs: dict[str, KV] = {
        "general.architecture": kv_str(A),
        "general.type": kv_str("model"),
        "general.name": kv_str(name),
        "general.size_label": kv_str(size_label(total, total - expert, expert // max(cfg.num_local_experts, 1),
                                                cfg.num_local_experts)),
    }
    if license:
        kvs["general.license"] = kv_str(license)
    if source_repo:
        kvs["general.source.repo_url"] = kv_str(f"https://huggingface.co/{source_repo}")
    kvs.update({
        f"{A}.block_count": kv_u32(cfg.num_hidden_layers),
        f"{A}.context_length": kv_u32(cfg.max_position_embeddings),
        f"{A}.embedding_length": kv_u32(cfg.hidden_size),
        f"{A}.feed_forward_length": kv_u32(cfg.intermediate_size),
        f"{A}.expert_feed_forward_length": kv_u32(cfg.intermediate_size),
        f"{A}.expert_count": kv_u32(cfg.num_local_experts),
        f"{A}.expert_used_count": kv_u32(cfg.num_experts_per_tok),
        f"{A}.attention.head_count": kv_u32(cfg.num_attention_heads),
        f"{A}.attention.head_count_kv": kv_u32(cfg.num_key_value_heads),
        # Needed: hidden_size / heads (2880 / 64 = 45) is not gpt-oss's head size (64).
        f"{A}.attention.key_length": kv_u32(cfg.head_dim),
        f"{A}.attention.value_length": kv_u32(cfg.head_dim),
        f"{A}.attention.layer_norm_rms_epsilon": kv_f32(cfg.rms_norm_eps),
        f"{A}.attention.sliding_window": kv_u32(cfg.sliding_window),
        f"{A}.rope.freq_base": kv_f32(cfg.rope_theta),
    })
    default_swa = [i % 2 == 0 for i in range(cfg.num_hidden_layers)]
    if cfg.is_swa != default_swa:
        # llama.cpp assumes sliding/full alternating from layer 0 unless told otherwise.
        kvs[f"{A}.attention.sliding_window_pattern"] = kv_array(GGUFValueType.BOOL, cfg.is_swa)
    if rope:
        kvs.update({
            f"{A}.rope.scaling.type": kv_str("yarn"),
            f"{A}.rope.scaling.factor": kv_f32(rope.get("factor", 1.0)),
            f"{A}.rope.scaling.original_context_length": kv_u32(rope.get("original_max_position_embeddings", 4096)),
        })
        if "beta_fast" in rope:
            kvs[f"{A}.rope.scaling.yarn_beta_fast"] = kv_f32(rope["beta_fast"])
        if "beta_slow" in rope:
            kvs[f"{A}.rope.scaling.yarn_beta_slow"] = kv_f32(rope["beta_slow"])
    kvs["general.file_type"] = kv_u32(file_type)
    kvs["general.quantization_version"] = kv_u32(2)
    kvs["ossgguf.recipe"] = kv_str(recipe)
    return kvs
