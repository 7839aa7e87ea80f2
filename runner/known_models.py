"""The published gpt-oss models as the planner sees them, without their files.

`doctor` judges each model on this machine before anything is downloaded: the tensors come from the
converter's own table (ossgguf.model.conversion_table) for the published config.json, with the types
a recipe gives them, so the planner sizes them exactly as it sizes the converted file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ossgguf.gguf.tensors import Q, Tensor, pad
from ossgguf.model import GptOssConfig, TensorClass, conversion_table

from .plan import CPU_ALIGN, ModelInfo

# openai/gpt-oss-120b and -20b config.json (FACTS.md): the two differ in layers and experts only
_CONFIG = {
    "model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_experts_per_tok": 4,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "sliding_window": 128,
    "rope_theta": 150000.0, "rope_scaling": {"rope_type": "yarn", "factor": 32.0,
                                             "original_max_position_embeddings": 4096},
    "max_position_embeddings": 131072, "vocab_size": 201088, "quantization_config": {"quant_method": "mxfp4"},
}
SIZES = {"gpt-oss-20b": (24, 32), "gpt-oss-120b": (36, 128)}  # layers, experts
# the other weights per recipe (quantize/policy.RECIPES): as stored (BF16) or Q8_0
OTHER = {"mxfp4": Q.BF16, "mxfp4-q8": Q.Q8_0}
METADATA_BYTES = 13_000_000  # the tokenizer and template in the header (FACTS.md: ~13 MB)


@dataclass(frozen=True)
class Known:
    name: str  # gpt-oss-120b, gpt-oss-120b-pruned-96
    model: str
    recipe: str
    keep: int | None = None  # experts per layer after pruning

    @property
    def label(self) -> str:
        return f"{self.name} ({self.recipe})"


# what doctor judges: both models, the recipe with the smaller attention, and two pruned 120b sizes
# (docs/pruning.md: 94 of 128 fit a 64 GB Mac at 32k; 64 halves the experts)
DEFAULT = (Known("gpt-oss-20b", "gpt-oss-20b", "mxfp4"), Known("gpt-oss-120b", "gpt-oss-120b", "mxfp4"),
           Known("gpt-oss-120b", "gpt-oss-120b", "mxfp4-q8"),
           Known("gpt-oss-120b-pruned-96", "gpt-oss-120b", "mxfp4-q8", 96),
           Known("gpt-oss-120b-pruned-64", "gpt-oss-120b", "mxfp4-q8", 64))


def known_model(model: str = "gpt-oss-120b", recipe: str = "mxfp4", keep: int | None = None) -> ModelInfo:
    """ModelInfo of a published model converted with `recipe`, optionally pruned to `keep` experts."""
    if model not in SIZES or recipe not in OTHER:
        raise ValueError(f"known models: {', '.join(SIZES)}; recipes: {', '.join(OTHER)}")
    layers, experts = SIZES[model]
    cfg = GptOssConfig.from_dict(_CONFIG | {"num_hidden_layers": layers, "num_local_experts": keep or experts})
    types = {TensorClass.EXPERT: Q.MXFP4, TensorClass.ROUTER: Q.F32, TensorClass.NORM: Q.F32}
    tensors = tuple(Tensor(t.name, types.get(t.cls, OTHER[recipe]), t.shape) for t in conversion_table(cfg, "mxfp4"))
    name = f"{model}{f'-pruned-{keep}' if keep else ''}-{recipe}.gguf"
    size = METADATA_BYTES + sum(pad(t.nbytes, CPU_ALIGN) for t in tensors)
    return ModelInfo(n_layer=layers, n_embd=cfg.hidden_size, n_head=cfg.num_attention_heads,
                     n_head_kv=cfg.num_key_value_heads, head_dim_k=cfg.head_dim, head_dim_v=cfg.head_dim,
                     n_expert=keep or experts, n_expert_used=cfg.num_experts_per_tok,
                     n_ff_exp=cfg.intermediate_size, n_vocab=cfg.vocab_size,
                     n_ctx_train=cfg.max_position_embeddings, n_swa=cfg.sliding_window,
                     swa_layers=tuple(cfg.is_swa), path=Path(name), files=(Path(name),), file_bytes=size,
                     tensors=tensors)
