"""Checkpoints with gpt-oss-20b / -120b's real names, dtypes and shapes, holding random bytes or
sparse holes: for benchmarks and size predictions that need the real sizes. The tokenizer files
come from the tiny generator."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from .model import GptOssConfig, hf_tensor_shapes
from .tiny import TinySpec, make_tiny_checkpoint

CONFIGS = {
    "20b": {"num_hidden_layers": 24, "num_local_experts": 32},
    "120b": {"num_hidden_layers": 36, "num_local_experts": 128},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def config(model: str, layers: int | None = None, layout: str = "mxfp4") -> dict:
    """config.json of the model's real shapes; `layers` fewer blocks (same tensor shapes), `layout`
    "bf16" a dequantized fine-tune (no quantization_config)."""
    layers = layers or CONFIGS[model]["num_hidden_layers"]
    quant = {"quantization_config": {"quant_method": "mxfp4"}} if layout == "mxfp4" else {}
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
        "intermediate_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
        "num_experts_per_tok": 4, "sliding_window": 128, "rope_theta": 150000, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "vocab_size": 201088, "rms_norm_eps": 1e-5, "swiglu_limit": 7.0, "eos_token_id": 200002,
        "pad_token_id": 199999, **quant, **CONFIGS[model], "num_hidden_layers": layers,
    }


def _dtype(name: str) -> tuple[str, int]:
    return ("U8", 1) if name.endswith(("_blocks", "_scales")) else ("BF16", 2)


def make_synthetic(out: Path, model: str = "20b", shard_bytes: int = 5 * 10**9, sparse: bool = False,
                   seed: int = 0, layers: int | None = None, layout: str = "mxfp4") -> Path:
    """Write a checkpoint folder; data is a repeated random block (or holes when sparse). In the bf16
    layout the block holds BF16 values of weight-like size (N(0, 0.02)), not random bit patterns."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(model, layers, layout)
    shapes = hf_tensor_shapes(GptOssConfig.from_dict(cfg), layout)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * _dtype(name)[1]
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    rng = np.random.default_rng(seed)
    if layout == "bf16":
        values = (rng.standard_normal(32 * 2**20, dtype=np.float32) * 0.02).view(np.uint32)
        block = (values >> 16).astype(np.uint16).tobytes()  # truncated to BF16
    else:
        block = rng.integers(0, 256, 64 * 2**20, dtype=np.uint8).tobytes()
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            dt, item = _dtype(name)
            n = int(np.prod(shapes[name])) * item
            header[name] = {"dtype": dt, "shape": list(shapes[name]), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            if sparse:
                f.truncate(f.tell() + off)
            else:
                left = off
                while left:
                    k = min(left, len(block))
                    f.write(block[:k])
                    left -= k
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    with tempfile.TemporaryDirectory() as td:
        tiny = make_tiny_checkpoint(Path(td) / "t", TinySpec())
        for f in TOKENIZER_FILES:
            shutil.copy(tiny / f, out / f)
    return out


def checkpoint_bytes(model: str, layers: int | None = None, layout: str = "mxfp4") -> int:
    shapes = hf_tensor_shapes(GptOssConfig.from_dict(config(model, layers, layout)), layout)
    return sum(int(np.prod(s)) * _dtype(n)[1] for n, s in shapes.items())
