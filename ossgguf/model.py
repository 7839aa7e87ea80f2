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
SLIDING, FULL = "sliding_attention", "full_attention"  # config.json layer_types


def swa_layers(n_layer: int, pattern: Any = None) -> tuple[bool, ...]:
    """Which layers attend through the sliding window, as llama.cpp reads a gpt-oss GGUF's
    attention.sliding_window_pattern: one flag per layer, or a period whose last layer is full.
    Without it, gpt-oss's own pattern: sliding, full, sliding, ... from layer 0 (both released models)."""
    if pattern is not None and not isinstance(pattern, int):
        return tuple(bool(x) for x in pattern)
    period = int(pattern or 2)
    return tuple(i % period < period - 1 for i in range(n_layer))


def default_layer_types(n_layer: int) -> list[str]:
    """config.json's layer_types for gpt-oss's default pattern."""
    return [SLIDING if swa else FULL for swa in swa_layers(n_layer)]


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
            layer_types = tuple(cfg.get("layer_types") or default_layer_types(n_layers))
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
                quant_method=(cfg.get("quantization_config") or {}).get("quant_method"),
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
        return [t == SLIDING for t in self.layer_types]


def _first_id(v: Any) -> int | None:
    if isinstance(v, list):
        return int(v[0]) if v else None
    return None if v is None else int(v)


# --- tensor names -------------------------------------------------------------------------------

ROUTER = "ffn_gate_inp"  # [E, H] weight and [E] bias per layer
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
    "mlp.router.weight": (f"{ROUTER}.weight", TensorClass.ROUTER),
    "mlp.router.bias": (f"{ROUTER}.bias", TensorClass.NORM),
}
# Expert tensors. gate_up is interleaved (gate = even rows, up = odd rows) in weights, scales
# and bias alike; MXFP4 checkpoints store *_blocks [E, rows, cols/32, 16] + *_scales [E, rows, cols/32];
# BF16 fine-tunes store gate_up_proj [E, H, 2F] and down_proj [E, F, H] (transposed).
EXPERT_GATE = "ffn_gate_exps"
EXPERT_UP = "ffn_up_exps"
EXPERT_DOWN = "ffn_down_exps"
HF_LAYER_PREFIX = "model.layers.{i}."
HF_EXPERTS = "mlp.experts."

# Tensors with one slice per expert on axis 0 (numpy order): the expert matrices, their biases and the
# router's rows and bias. Pruning slices them; calibration identifies a model by its routers.
EXPERT_AXIS = tuple(f"{t}.{w}" for t in (EXPERT_GATE, EXPERT_UP, EXPERT_DOWN, ROUTER) for w in ("weight", "bias"))

_BLK = re.compile(r"^blk\.(\d+)\.")
_EXPERTS = r"ffn_(up|down|gate)_exps"
_EXPERT_WEIGHT = re.compile(rf"\.{_EXPERTS}\.weight$")
_CLASS_OF = dict([*GLOBAL_TENSORS.values(), *LAYER_TENSORS.values()])  # GGUF name (without blk.N.) -> class


def layer_of(gguf_name: str) -> int | None:
    """The block index of a GGUF tensor name, or None for global tensors."""
    m = _BLK.match(gguf_name)
    return int(m.group(1)) if m else None


def has_expert_axis(gguf_name: str) -> bool:
    return layer_of(gguf_name) is not None and gguf_name.split(".", 2)[2] in EXPERT_AXIS


def router_names(n_layer: int) -> list[str]:
    """The router tensors of every layer, weight then bias, in layer order."""
    return [f"blk.{i}.{ROUTER}.{w}" for i in range(n_layer) for w in ("weight", "bias")]


def tensor_class(gguf_name: str, other: Any = ...) -> TensorClass:
    """The class of any gpt-oss GGUF tensor name (also for names read back from a GGUF file); for a
    name gpt-oss does not have, `other` when given, else OssggufError. A LoRA adapter's `NAME.lora_a` /
    `.lora_b` has the class of NAME: llama.cpp keeps it where NAME lives (src/llama-adapter.cpp)."""
    gguf_name = gguf_name.removesuffix(".lora_a").removesuffix(".lora_b")
    if _EXPERT_WEIGHT.search(gguf_name):
        return TensorClass.EXPERT
    if gguf_name.endswith(".bias"):
        return TensorClass.NORM
    if (cls := _CLASS_OF.get(_BLK.sub("", gguf_name))) is not None:
        return cls
    if other is not ...:
        return other
    raise OssggufError(f"'{gguf_name}' is not a gpt-oss tensor name")


@dataclass(frozen=True)
class Offload:
    """A placement decision: tensors whose name matches `pattern` (re.search) live on `device`.
    llama.cpp takes it as a tensor buffer override; `str()` is its `--override-tensor` form."""

    pattern: str
    device: str = "CPU"

    def __str__(self) -> str:
        return f"{self.pattern}={self.device}"


def expert_offload(layers: range | None = None) -> Offload:
    """Keep the expert weights of `layers` (None: all) in system RAM, as llama.cpp's --cpu-moe or
    --n-cpu-moe N (blk.0 .. blk.N-1). Matching only `.weight` keeps the tiny expert biases with the
    rest of the layer on the GPU."""
    if layers is None:
        return Offload(rf"\.{_EXPERTS}\.weight")
    ids = "|".join(str(i) for i in layers)
    return Offload(rf"^blk\.({ids})\.{_EXPERTS}\.weight")


# --- a GGUF read back ----------------------------------------------------------------------------

def arch_key(name: str) -> str:
    """The metadata key of a gpt-oss hyperparameter: 'expert_count' -> 'gpt-oss.expert_count'."""
    return f"{ARCH}.{name}"


def is_gpt_oss(gguf: Any) -> bool:
    """Whether a GGUF's metadata (anything with .get(key)) says gpt-oss."""
    return gguf.get("general.architecture") == ARCH


def check_gpt_oss(gguf: Any) -> None:
    """The one "is this gpt-oss" check of every command that reads a GGUF (`gguf`: an
    ossgguf.gguf.read.GgufSet, or anything with .get(key) and .path)."""
    if not is_gpt_oss(gguf):
        arch = gguf.get("general.architecture")
        raise OssggufError(f"{gguf.path} holds a '{arch}' model, not {ARCH}: ossgguf works only with gpt-oss "
                           f"GGUF files (general.architecture = {ARCH})")


@dataclass(frozen=True)
class HParams:
    """A gpt-oss GGUF's hyperparameters, from the keys llama.cpp's loader reads (src/llama-model.cpp,
    LLM_ARCH_OPENAI_MOE)."""

    n_layer: int  # block_count
    n_embd: int  # embedding_length
    n_head: int
    n_head_kv: int
    head_dim_k: int  # attention.key_length: 64, not n_embd / n_head (45)
    head_dim_v: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int  # expert_feed_forward_length
    n_vocab: int  # rows of token_embd.weight (the tokenizer may have fewer tokens)
    n_ctx_train: int  # context_length
    n_swa: int  # attention.sliding_window
    swa_layers: tuple[bool, ...]


def read_hparams(gguf: Any) -> HParams:
    """HParams of a GGUF whose headers are read (an ossgguf.gguf.read.GgufSet); OssggufError if it is not
    gpt-oss or lacks a key that llama.cpp needs."""
    check_gpt_oss(gguf)
    name = gguf.path.name

    def key(k: str, default: Any = None) -> int:
        v = gguf.get(arch_key(k), default)
        if v is None:
            raise OssggufError(f"{name} has no '{arch_key(k)}' key: convert it again with ossgguf")
        return int(v)

    embd = next((t for t in gguf.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise OssggufError(f"{name} has no token_embd.weight tensor")
    n_layer, n_embd, n_head = key("block_count"), key("embedding_length"), key("attention.head_count")
    head_k = key("attention.key_length", n_embd // n_head)
    return HParams(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=key("attention.head_count_kv"),
        head_dim_k=head_k, head_dim_v=key("attention.value_length", head_k),
        n_expert=key("expert_count"), n_expert_used=key("expert_used_count"),
        n_ff_exp=key("expert_feed_forward_length"), n_vocab=embd.shape[0], n_ctx_train=key("context_length"),
        n_swa=key("attention.sliding_window"),
        swa_layers=swa_layers(n_layer, gguf.get(arch_key("attention.sliding_window_pattern"))),
    )


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
# The harmony special tokens (names, gpt-oss's ids) are defined once, in ossgguf/harmony/tokens.py.


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
        for part, name, shape in (("gate", EXPERT_GATE, (E, F, H)), ("up", EXPERT_UP, (E, F, H)),
                                  ("down", EXPERT_DOWN, (E, H, F))):
            src = x + ("down_proj" if part == "down" else "gate_up_proj")
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
    if tuple(cfg.is_swa) != swa_layers(cfg.num_hidden_layers):
        # llama.cpp assumes sliding/full alternating from layer 0 unless told otherwise.
        kvs[f"{A}.attention.sliding_window_pattern"] = kv_array(GGUFValueType.BOOL, cfg.is_swa)
    if rope:
        kvs.update({
            f"{A}.rope.scaling.type": kv_str("yarn"),
            f"{A}.rope.scaling.factor": kv_f32(rope.get("factor", 1.0)),
            f"{A}.rope.scaling.original_context_length": kv_u32(rope.get("original_max_position_embeddings", 4096)),
        })
        for beta in ("beta_fast", "beta_slow"):
            if beta in rope:
                kvs[f"{A}.rope.scaling.yarn_{beta}"] = kv_f32(rope[beta])
    kvs["general.file_type"] = kv_u32(file_type)
    kvs["general.quantization_version"] = kv_u32(2)
    kvs["ossgguf.recipe"] = kv_str(recipe)
    return kvs
