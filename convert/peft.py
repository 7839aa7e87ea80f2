"""PEFT LoRA adapter folders and the base model they are checked against (for convert/lora.py and
convert/merge.py): adapter_config.json read and refused where llama.cpp's plain LoRA cannot express it,
adapter_model.safetensors' headers, and the base's GGUF tensor shapes from a GGUF or a checkpoint folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ossgguf.gguf.read import read_gguf

from ..errors import OssggufError
from ..hub.adapter import fetch_config
from ..hub.download import looks_like_repo_id
from ..model import GLOBAL_TENSORS, LAYER_TENSORS, conversion_table, read_hparams
from .checkpoint import read_config
from .safetensors import TensorEntry, read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps LoraModel wraps the transformers model
GATE_UP, DOWN = "gate_up_proj", "down_proj"
ROUTER_PARAM = "router.weight"  # gpt-oss's router is no nn.Linear: PEFT reaches it through target_parameters

# Modules a LoRA may target (their HF weight -> GGUF tensor); llama.cpp applies an adapter to each
# through build_lora_mm (attention projections, router, LM head).
_LINEAR = {name.removesuffix(".weight"): gguf for name, (gguf, _) in LAYER_TENSORS.items()
           if name.endswith("_proj.weight") or name == "mlp.router.weight"}
_GLOBAL_LINEAR = {"lm_head": GLOBAL_TENSORS["lm_head.weight"][0]}


@dataclass
class Adapter:
    """A PEFT LoRA adapter folder: its config and its tensors' headers."""

    path: Path
    config: dict[str, Any]
    entries: dict[str, TensorEntry] = field(repr=False)

    @property
    def files(self) -> list[Path]:
        return sorted({e.file for e in self.entries.values()})


def _refuse_config(cfg: dict[str, Any], where: Path) -> None:
    """What llama.cpp cannot apply as plain LoRA: say why and what to do instead."""
    merge = "merge it in transformers (PeftModel.merge_and_unload), save, and convert the merged checkpoint"
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise OssggufError(f"{where} is a {cfg.get('peft_type')} adapter: ossgguf converts LoRA adapters only")
    if cfg.get("use_dora"):
        raise OssggufError(f"{where}: DoRA adapters (use_dora: true) cannot be converted: llama.cpp applies plain "
                           f"LoRA only (DoRA rescales each weight column by its norm); {merge}")
    if cfg.get("lora_bias"):
        raise OssggufError(f"{where}: lora_bias: true adds a bias that llama.cpp's LoRA cannot hold; {merge}")
    if cfg.get("modules_to_save"):
        raise OssggufError(f"{where}: modules_to_save {cfg['modules_to_save']} stores whole modules, not a "
                           f"low-rank update; {merge}")
    if cfg.get("trainable_token_indices"):
        raise OssggufError(f"{where}: trainable_token_indices (trained token embeddings) are not LoRA; {merge}")
    if cfg.get("fan_in_fan_out"):
        raise OssggufError(f"{where}: fan_in_fan_out: true is for Conv1D models, not gpt-oss's Linear layers")
    if cfg.get("alora_invocation_tokens") or cfg.get("invocation_string"):
        raise OssggufError(f"{where}: activated LoRA (aLoRA) adapters are not supported")
    variants = [k for k in ("layer_replication", "use_qalora", "use_bdlora", "kasa_config", "velora_config",
                            "monteclora_config", "arrow_config") if cfg.get(k)]
    if variants:
        raise OssggufError(f"{where}: {variants[0]} is a LoRA variant llama.cpp cannot apply as plain LoRA; {merge}")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "corda", "olora")):
        raise OssggufError(f"{where}: init_lora_weights '{init}' changes the base weights as well; save the adapter "
                           "with path_initial_model_for_weight_conversion (PEFT) to get a plain LoRA, then convert")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, list):
        known = [*_LINEAR, *_GLOBAL_LINEAR]
        for t in targets:
            if not any(k == t or k.endswith("." + t) or t.endswith("." + k) or t == k.rsplit(".", 1)[-1]
                       for k in known):
                raise OssggufError(f"{where}: target_modules entry '{t}' is not a module ossgguf can convert "
                                   f"(gpt-oss LoRA targets: {', '.join(k.rsplit('.', 1)[-1] for k in known)}; "
                                   f"experts through target_parameters mlp.experts.{GATE_UP} / {DOWN})")
    for p in cfg.get("target_parameters") or []:
        if not p.endswith((f"experts.{GATE_UP}", f"experts.{DOWN}", ROUTER_PARAM)):
            raise OssggufError(f"{where}: target_parameters entry '{p}' is not a gpt-oss expert or router weight "
                               f"(mlp.experts.{GATE_UP}, mlp.experts.{DOWN}, mlp.{ROUTER_PARAM})")


def load_adapter(path: str | Path) -> Adapter:
    """Open a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) and check its config."""
    path = Path(path)
    if not path.is_dir():
        raise OssggufError(f"{path} is not a folder: pass a PEFT adapter folder (adapter_config.json + "
                           f"{ADAPTER_WEIGHTS}) or a Hugging Face repo id")
    cfg_path, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise OssggufError(f"{ADAPTER_CONFIG} not found in {path}: is it a PEFT adapter folder?")
    if not weights.is_file():
        bin_ = " (adapter_model.bin, a pickle, is not read: save with safe_serialization=True)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise OssggufError(f"{ADAPTER_WEIGHTS} not found in {path}{bin_}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OssggufError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise OssggufError(f"{cfg_path} is not a JSON object")
    _refuse_config(cfg, cfg_path)
    for k in ("r", "lora_alpha"):
        if not isinstance(cfg.get(k), int | float) or cfg[k] <= 0:
            raise OssggufError(f"{cfg_path}: '{k}' must be a positive number, not {cfg.get(k)!r}")
    return Adapter(path, cfg, read_header(weights))


# --- the base model --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Base:
    """What the adapter is checked against: the GGUF tensor shapes of the base and its repo id, if known."""

    shapes: dict[str, tuple[int, ...]]
    n_expert: int
    hidden: int
    ff: int
    repo: str | None
    what: str


def load_base(base: str | Path) -> Base:
    """A base model's GGUF tensor shapes, from a gpt-oss GGUF or a checkpoint folder (config.json alone
    is enough: the shapes follow from it)."""
    p = Path(base)
    if p.is_dir():
        raw, cfg = read_config(p, "--base takes a gpt-oss GGUF or checkpoint folder")
        shapes = {t.name: t.shape for t in conversion_table(cfg, "bf16")}
        repo = raw.get("_name_or_path") if _is_repo_id(raw.get("_name_or_path")) else None
        return Base(shapes, cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, repo, str(p))
    if p.is_file():
        g = read_gguf(p)
        hp = read_hparams(g)
        url = g.get("general.source.repo_url") or ""
        repo = url.removeprefix("https://huggingface.co/") if url.startswith("https://huggingface.co/") else None
        return Base({t.name: t.shape for t in g.tensors}, hp.n_expert, hp.n_embd, hp.n_ff_exp, repo, str(p))
    raise OssggufError(f"--base {base}: no such file or folder (a gpt-oss GGUF or checkpoint folder)")


def _is_repo_id(s: Any) -> bool:
    return isinstance(s, str) and not Path(s).expanduser().exists() and looks_like_repo_id(s)


def default_base(adapter: Adapter) -> str | Path:
    """The base named by adapter_config.json's base_model_name_or_path: a local folder, or a repo id whose
    config.json is fetched (or found in the Hugging Face cache)."""
    name = adapter.config.get("base_model_name_or_path")
    if not name:
        raise OssggufError(f"{adapter.path / ADAPTER_CONFIG} names no base_model_name_or_path: pass --base "
                           "(the base GGUF or checkpoint folder)")
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if not _is_repo_id(name):
        raise OssggufError(f"the adapter's base '{name}' is neither a folder nor a repo id: pass --base")
    return fetch_config(name)
