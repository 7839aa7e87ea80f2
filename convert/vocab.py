"""gpt-oss's tokenizer.json (byte-level BPE) -> the GGUF vocabulary llama.cpp reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import GGUFValueType, TokenType

from ossgguf.gguf.values import KV, kv_array, kv_bool, kv_str, kv_u32

from ..errors import OssggufError
from ..model import LLAMA_PRE_TOKENIZER, O200K_PATTERN


def _split_patterns(pre: dict[str, Any] | None) -> list[str]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for sub in pre.get("pretokenizers", []) for p in _split_patterns(sub)]
    if pre.get("type") == "Split":
        pat = pre.get("pattern", {})
        return [pat.get("Regex") or pat.get("String") or ""]
    return []


def _special_id(value: Any, by_name: dict[str, int]) -> int | None:
    if isinstance(value, dict):
        value = value.get("content")
    return by_name.get(value) if isinstance(value, str) else None


def read_chat_template(ckpt: Path) -> str | None:
    f = ckpt / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    cfg = ckpt / "tokenizer_config.json"
    if cfg.is_file():
        tmpl = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(tmpl, list):  # named templates: take the default one
            tmpl = next((t.get("template") for t in tmpl if t.get("name") == "default"), None)
        return tmpl
    return None


def vocab_metadata(ckpt: Path, vocab_size: int, config: dict[str, Any]) -> dict[str, KV]:
    """Tokenizer keys for a GGUF: tokens padded to the embedding's rows, types, merges, special ids."""
    path = ckpt / "tokenizer.json"
    if not path.is_file():
        raise OssggufError(f"tokenizer.json not found in {ckpt}: download the checkpoint with `ossgguf download REPO`")
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        model = tok["model"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        raise OssggufError(f"{path} is not a valid tokenizer.json: download it again") from None
    if model.get("type") != "BPE":
        raise OssggufError(f"{path}: a {model.get('type')} tokenizer; gpt-oss uses byte-level BPE")
    patterns = _split_patterns(tok.get("pre_tokenizer"))
    if O200K_PATTERN not in patterns:
        found = patterns[0][:80] + "..." if patterns else "none"
        raise OssggufError(
            f"{path}: the pre-tokenizer is not gpt-oss's o200k split regex (found: {found}); "
            "llama.cpp has no matching pre-tokenizer for it"
        )
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= vocab_size:
        raise OssggufError(
            f"{path} has token id {max(by_id)} but the model's embedding has {vocab_size} rows (config vocab_size)"
        )
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            # llama.cpp requires one entry per embedding row; its converter pads like this.
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            looks_special = by_id[i].startswith("<|") and by_id[i].endswith("|>")
            types.append(TokenType.CONTROL if added[i].get("special") or looks_special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    by_name = {t: i for i, t in by_id.items()}
    tcfg_path = ckpt / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}
    kvs: dict[str, KV] = {
        "tokenizer.ggml.model": kv_str("gpt2"),
        "tokenizer.ggml.pre": kv_str(LLAMA_PRE_TOKENIZER),
        "tokenizer.ggml.tokens": kv_array(GGUFValueType.STRING, tokens),
        "tokenizer.ggml.token_type": kv_array(GGUFValueType.INT32, types),
        "tokenizer.ggml.merges": kv_array(GGUFValueType.STRING, merges),
    }
    for key, field in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
        tid = _special_id(tcfg.get(field), by_name)
        if tid is None:
            cid = config.get(f"{field}_id")
            tid = cid[0] if isinstance(cid, list) and cid else cid
        if tid is not None:
            kvs[f"tokenizer.ggml.{key}_token_id"] = kv_u32(int(tid))
    kvs["tokenizer.ggml.add_bos_token"] = kv_bool(bool(tcfg.get("add_bos_token", False)))
    kvs["tokenizer.ggml.add_eos_token"] = kv_bool(bool(tcfg.get("add_eos_token", False)))
    template = read_chat_template(ckpt)
    if template:
        kvs["tokenizer.chat_template"] = kv_str(template)
    return kvs
