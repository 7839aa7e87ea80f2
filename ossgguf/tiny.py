"""Tiny gpt-oss checkpoints in the exact Hugging Face layout of openai/gpt-oss-20b / -120b.

Used by the tests and by `ossgguf demo`: the same files, names, dtypes, shapes and JSON as the real
repos (MXFP4 experts as *_blocks + *_scales, or the dequantized BF16 layout of fine-tunes), only
small. numpy and the standard library only: safetensors are written by hand.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OssggufError
from .model import HF_EXPERTS, MXFP4_BLOCK, GptOssConfig, hf_tensor_shapes
from .quantize.mxfp4 import dequantize_hf, quantize_hf
from .tiny_tokenizer import (
    EOS_TOKEN,
    HARMONY_SPECIAL_TOKENS,
    HF_WRITER_VERSION,
    PAD_TOKEN,
    generation_config_json,
    read_tiktoken,
    special_token_ids,
    special_tokens_map_json,
    tokenizer_config_json,
    tokenizer_json,
    tokenizer_json_from_ranks,
)

log = logging.getLogger(__name__)

# config.json quantization_config of the real checkpoints: attention, router, embeddings and head stay BF16.
MODULES_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
ROPE_THETA = 150000
YARN_FACTOR = 32.0
YARN_ORIGINAL_CONTEXT = 4096


@dataclass
class TinySpec:
    """Shapes and options of a tiny checkpoint. Defaults load in transformers in well under a second."""

    hidden_size: int = 64  # multiples of 32 (MXFP4 blocks)
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_local_experts: int = 4
    num_experts_per_tok: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    sliding_window: int = 8  # small, so tests can use prompts longer than the window
    vocab_size: int = 640  # embedding rows; the tokenizer has fewer tokens, like the real one
    n_merges: int = 300  # BPE merges learned from the built-in corpus
    # As the real model: yarn factor 32 over an original context of 4096. A smaller original context
    # would move yarn's correction dims to where llama.cpp (which always rounds them, ignoring
    # "truncate": false) and transformers disagree far more than they do on the real model.
    max_position_embeddings: int = 131072
    layout: str = "mxfp4"  # or "bf16": the dequantized fine-tune layout
    shards: int = 1  # >1: model-0000N-of-0000M.safetensors + model.safetensors.index.json
    rope_key: str = "rope_scaling"  # or "rope_parameters" (transformers 5.x form, rope_theta inside)
    seed: int = 0
    router_bias: list[list[float]] | None = None  # per layer, e.g. -1e4 for experts never chosen
    merges_as_strings: bool = False  # legacy "a b" merges in tokenizer.json
    openai_shard_names: bool = False  # the real repos' 0-based names: model-00000-of-00002 .. -00002-of-00002
    # A tiktoken ranks file (o200k_base.tiktoken) for the real vocabulary instead of learned merges:
    # with vocab_size 201088 the tokenizer is gpt-oss's own (special tokens at 199998..200018).
    vocab_file: str | None = None

    @property
    def n_tokens(self) -> int:
        """Tokens in the tokenizer: 256 bytes + merges (or the vocab_file's tokens) + the harmony tokens
        (< vocab_size rows)."""
        if self.vocab_file is not None:
            return len(_ranks(self.vocab_file)) + len(HARMONY_SPECIAL_TOKENS)
        return 256 + self.n_merges + len(HARMONY_SPECIAL_TOKENS)

    def validate(self) -> None:
        problems = []
        if self.hidden_size % MXFP4_BLOCK or self.intermediate_size % MXFP4_BLOCK:
            problems.append(f"hidden_size and intermediate_size must be multiples of {MXFP4_BLOCK} (MXFP4 blocks)")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            problems.append("num_experts_per_tok must be between 1 and num_local_experts")
        if self.layout not in ("mxfp4", "bf16"):
            problems.append(f"layout must be 'mxfp4' or 'bf16', not '{self.layout}'")
        if self.rope_key not in ("rope_scaling", "rope_parameters"):
            problems.append(f"rope_key must be 'rope_scaling' or 'rope_parameters', not '{self.rope_key}'")
        if self.shards < 1:
            problems.append("shards must be at least 1")
        if self.router_bias is not None and (
            len(self.router_bias) != self.num_hidden_layers
            or any(len(b) != self.num_local_experts for b in self.router_bias)
        ):
            problems.append("router_bias needs one list of num_local_experts values per layer")
        if self.n_tokens > self.vocab_size:
            problems.append(
                f"the tokenizer would have {self.n_tokens} tokens (256 bytes + {self.n_merges} merges + "
                f"{len(HARMONY_SPECIAL_TOKENS)} harmony tokens), more than vocab_size {self.vocab_size}: "
                "lower n_merges or raise vocab_size"
            )
        if self.n_merges < 0:
            problems.append("n_merges must not be negative")
        if problems:
            raise OssggufError("invalid TinySpec: " + "; ".join(problems))


def make_tiny_checkpoint(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a tiny gpt-oss checkpoint (weights, config, tokenizer, chat template) to `out_dir`.

    The output depends only on `spec` (same bytes every time); the mxfp4 and bf16 layouts of one
    seed hold the same expert values. Returns `out_dir`.
    """
    spec = spec or TinySpec()
    spec.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.vocab_file is not None:
        tok = tokenizer_json_from_ranks(_ranks(spec.vocab_file))
    else:
        tok = tokenizer_json(spec.n_merges, spec.merges_as_strings)
    base = len(tok["model"]["vocab"])  # the first harmony token's id (199998 in gpt-oss)
    config = config_json(spec, base)
    tensors = tiny_tensors(spec, GptOssConfig.from_dict(config))
    written = _write_weights(out, tensors, spec)
    _remove_stale_weights(out, keep=written)
    _write_text(out / "config.json", render_json(config))
    _write_text(out / "generation_config.json", render_json(generation_config_json(base)))
    _write_text(out / "tokenizer.json", json.dumps(tok, indent=2, ensure_ascii=False))
    _write_text(out / "tokenizer_config.json", render_json(tokenizer_config_json(base)))
    _write_text(out / "special_tokens_map.json", render_json(special_tokens_map_json()))
    template = resources.files("ossgguf").joinpath("data/chat_template.jinja").read_text(encoding="utf-8")
    _write_text(out / "chat_template.jinja", template)
    log.debug("tiny gpt-oss checkpoint (%s, %d shard(s)) written to %s", spec.layout, spec.shards, out)
    return out


@functools.lru_cache(maxsize=2)
def _ranks(path: str) -> dict[bytes, int]:
    return read_tiktoken(path)


# --- config.json ----------------------------------------------------------------------------------

def config_json(spec: TinySpec, special_base: int) -> dict[str, Any]:
    """config.json as the real repos write it (with 120b's shapes and base 199998: byte-identical)."""
    ids = special_token_ids(special_base)
    original_ctx = YARN_ORIGINAL_CONTEXT
    rope = {"beta_fast": 32.0, "beta_slow": 1.0, "factor": YARN_FACTOR,
            "original_max_position_embeddings": original_ctx, "rope_type": "yarn", "truncate": False}
    cfg: dict[str, Any] = {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": ids[EOS_TOKEN],
        "experts_per_token": spec.num_experts_per_tok,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initial_context_length": original_ctx,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                        for i in range(spec.num_hidden_layers)],
        "max_position_embeddings": spec.max_position_embeddings,
        "model_type": "gpt_oss",
        "num_attention_heads": spec.num_attention_heads,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "num_local_experts": spec.num_local_experts,
        "output_router_logits": False,
        "pad_token_id": ids[PAD_TOKEN],
        "rms_norm_eps": 1e-05,
        "router_aux_loss_coef": 0.9,
        "sliding_window": spec.sliding_window,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "transformers_version": HF_WRITER_VERSION,
        "use_cache": True,
        "vocab_size": spec.vocab_size,
    }
    if spec.rope_key == "rope_scaling":
        cfg.update(rope_scaling=rope, rope_theta=ROPE_THETA)
    else:
        cfg["rope_parameters"] = {**rope, "rope_theta": float(ROPE_THETA)}
    if spec.layout == "mxfp4":
        cfg["quantization_config"] = {"modules_to_not_convert": MODULES_NOT_CONVERTED, "quant_method": "mxfp4"}
    else:
        cfg["torch_dtype"] = "bfloat16"  # as transformers 4.55 writes a dequantized fine-tune
    return dict(sorted(cfg.items()))


def render_json(obj: Any) -> str:
    """JSON as transformers writes its config files: 2-space indent, sorted keys, final newline."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


# --- weights --------------------------------------------------------------------------------------

def _init(name: str, spec: TinySpec) -> tuple[float, float]:
    """(mean, std) of a tensor's initial values: unit-scale activations, a non-degenerate router,
    expert pre-activations that reach the swiglu clamp (7) only in their tails."""
    H, F = spec.hidden_size, spec.intermediate_size
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return 1.0, 0.1
    if name.endswith("sinks"):
        return 0.0, 0.5
    if name.endswith("bias"):
        return 0.0, 0.1
    table = {
        "embed_tokens.weight": 1.0,
        "q_proj.weight": H**-0.5, "k_proj.weight": H**-0.5, "v_proj.weight": H**-0.5,
        "o_proj.weight": (spec.num_attention_heads * spec.head_dim) ** -0.5,
        "router.weight": 1.5 * H**-0.5,
        "gate_up_proj": 2.5 * H**-0.5,
        "down_proj": 0.5 * F**-0.5,
        "lm_head.weight": 2.0 * H**-0.5,
    }
    for suffix, std in table.items():
        if name.endswith(suffix):
            return 0.0, std
    raise AssertionError(f"no init rule for {name}")


def _values(name: str, shape: tuple[int, ...], spec: TinySpec) -> np.ndarray:
    # One generator per tensor name: values do not depend on the layout or on tensor order.
    rng = np.random.default_rng([spec.seed, zlib.crc32(name.encode())])
    mean, std = _init(name, spec)
    return (mean + std * rng.standard_normal(shape)).astype(np.float32)


def tiny_tensors(spec: TinySpec, cfg: GptOssConfig) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (safetensors dtype, array) for every tensor of the checkpoint, in model order."""
    H, F, E = spec.hidden_size, spec.intermediate_size, spec.num_local_experts
    shapes = hf_tensor_shapes(cfg, spec.layout)
    # model order (embeddings, layers, final norm, head), which decides how shards are cut
    shapes = dict(sorted(shapes.items(), key=lambda kv: _model_rank(kv[0], spec.num_hidden_layers)))
    # Experts are drawn in the blocks orientation [E, out, in], quantized once; bf16 stores the same values.
    experts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in shapes:
        for proj, rows, cols in (("gate_up_proj", 2 * F, H), ("down_proj", H, F)):
            if re.search(rf"\.{re.escape(HF_EXPERTS)}{proj}(_blocks)?$", name):
                key = name.removesuffix("_blocks")
                experts[key] = quantize_hf(_values(key, (E, rows, cols), spec))
    out: dict[str, tuple[str, np.ndarray]] = {}
    for name, shape in shapes.items():
        key = name.removesuffix("_blocks").removesuffix("_scales")
        if key in experts:
            blocks, scales = experts[key]
            if spec.layout == "mxfp4":
                out[name] = ("U8", blocks if name.endswith("_blocks") else scales)
            else:  # [E, out, in] -> the fine-tune's [E, in, out]
                out[name] = ("BF16", to_bf16(dequantize_hf(blocks, scales).transpose(0, 2, 1)))
            continue
        values = _values(name, shape, spec)
        if name == "lm_head.weight":
            values[spec.n_tokens:] *= 0.1  # rows with no token (padding): rarely the argmax
        if name.endswith("mlp.router.bias") and spec.router_bias is not None:
            layer = int(name.split(".")[2])
            values = np.asarray(spec.router_bias[layer], dtype=np.float32)
        out[name] = ("BF16", to_bf16(values))
    for name, (_, arr) in out.items():
        if arr.shape != shapes[name]:
            raise AssertionError(f"{name}: made {arr.shape}, the layout says {shapes[name]}")
    return out


def _model_rank(name: str, n_layers: int) -> int:
    if name.startswith("model.embed_tokens."):
        return -1
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else n_layers + (name.startswith("lm_head."))


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even (exact values are truncated)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# --- safetensors ----------------------------------------------------------------------------------

_ITEMSIZE = {"BF16": 2, "U8": 1}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A .safetensors file as the safetensors library writes it: tensors ordered by dtype (BF16
    before U8) then name, header padded with spaces to 8 bytes, metadata {"format": "pt"}."""
    order = sorted(tensors, key=lambda n: (-_ITEMSIZE[tensors[n][0]], n))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        dtype, arr = tensors[name]
        nbytes = arr.size * _ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            dtype, arr = tensors[name]
            f.write(np.ascontiguousarray(arr, dtype="<u2" if dtype == "BF16" else np.uint8).tobytes())
    os.replace(tmp, path)


def _shard_names(spec: TinySpec) -> list[str]:
    n = spec.shards
    if n == 1:
        return ["model.safetensors"]
    if spec.openai_shard_names:  # openai/gpt-oss-120b: model-00000-of-00014 .. model-00014-of-00014
        return [f"model-{i:05d}-of-{n - 1:05d}.safetensors" for i in range(n)]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _write_weights(out: Path, tensors: dict[str, tuple[str, np.ndarray]], spec: TinySpec) -> list[str]:
    names = _shard_names(spec)
    if len(names) > len(tensors):
        raise OssggufError(f"{spec.shards} shards for {len(tensors)} tensors: ask for fewer shards")
    # Contiguous groups in model order cut near equal byte fractions, at least one tensor each.
    items = list(tensors.items())
    sizes = [arr.size * _ITEMSIZE[dt] for dt, arr in tensors.values()]
    total = sum(sizes)
    prefix = np.cumsum([0] + sizes)
    cuts = [0]
    for j in range(1, len(names)):
        k = int(np.searchsorted(prefix, j * total / len(names)))
        cuts.append(min(max(k, cuts[-1] + 1), len(items) - (len(names) - j)))
    cuts.append(len(items))
    groups = [dict(items[a:b]) for a, b in zip(cuts, cuts[1:])]
    for fname, group in zip(names, groups):
        write_safetensors(out / fname, group)
    if len(names) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: fname for fname, g in zip(names, groups) for n in g}}
        _write_text(out / "model.safetensors.index.json", render_json(index))
        return names + ["model.safetensors.index.json"]
    return names


def _remove_stale_weights(out: Path, keep: list[str]) -> None:
    """Weights left by an earlier run with other shard settings would shadow or confuse this one."""
    stale = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
    for p in out.iterdir():
        if stale.match(p.name) and p.name not in keep:
            log.debug("removing stale %s", p)
            p.unlink()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _write_text(path: Path, text: str) -> None:
    tmp = _tmp_name(path)
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)
