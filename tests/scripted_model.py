"""A tiny gpt-oss GGUF with hand-set weights that writes given harmony text, run by the real engine.

Random tiny models write random tokens, so they never call a tool. This one is a bigram model with
a few context bits: the next token depends on the last token and on whether certain "detector"
tokens occur anywhere in the context (the prompt or what was generated so far):

- the embedding of a token is a one-hot vector; both MoE layers output zero (zero experts); the
  sliding-window layer's attention outputs zero;
- each detector is one head of the full-attention layer: a constant query meets a key that only the
  detector token has (in the lowest-frequency rope pair, so position barely matters), and its value
  writes one "bit" dimension of the residual stream;
- the output head is fitted (a multi-class perceptron with a margin) so that for every
  (token, bits) state a script reaches, the scripted next token wins by tens of logits: even
  sampling at temperature 1 follows the script.

A script is a list of episodes: the bits at the start and the text the model writes after a prompt
that ends in `<|start|>assistant`; detector tokens it writes turn their bit on as it goes. A `cycle`
text repeats until max tokens. llama.cpp runs the result; nothing here imitates it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

HEAD_DIM, N_HEADS = 16, 4  # TinySpec defaults; kv heads 2 (heads 0,1 -> kv 0; heads 2,3 -> kv 1)
# (query head, key/value head, rope dim of the key, value dim) for up to three detectors
DETECTOR_HEADS = ((0, 0, 7, 0), (1, 0, 6, 1), (2, 1, 7, 0))


@dataclass
class Episode:
    bits: tuple[str, ...]  # detectors on at the start (their tokens are in the prompt)
    text: str  # what the model writes
    cycle: str = ""  # then repeats this forever


@dataclass
class Script:
    detectors: tuple[str, ...]  # token texts, e.g. ("<|call|>", "~", "@")
    episodes: list[Episode] = field(default_factory=list)
    prompt_end: str = "<|start|>assistant"


def _ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def transitions(script: Script, tok: Tokenizer) -> dict[tuple[int, frozenset], int]:
    """(last token, bits on) -> next token, for every state the script reaches; conflicts are errors."""
    det = {}
    for d in script.detectors:
        ids = _ids(tok, d)
        assert len(ids) == 1, f"detector {d!r} must be one token, is {ids}"
        det[ids[0]] = d
    start = _ids(tok, script.prompt_end)[-1]
    out: dict[tuple[int, frozenset], int] = {}
    for ep in script.episodes:
        bits, last = set(ep.bits), start
        text_ids, cycle_ids = _ids(tok, ep.text), _ids(tok, ep.cycle) if ep.cycle else []
        seq = text_ids + cycle_ids + cycle_ids[:1]
        for i, nxt in enumerate(seq):
            key = (last, frozenset(bits))
            if out.setdefault(key, nxt) != nxt:
                raise ValueError(f"script conflict at token {tok.id_to_token(last)!r} with bits {sorted(bits)}: "
                                 f"{tok.id_to_token(out[key])!r} or {tok.id_to_token(nxt)!r}")
            if nxt in det:
                bits.add(det[nxt])
            last = nxt
            if i == len(seq) - 1 and cycle_ids:  # the cycle closes: its states repeat from here
                break
    return out


def _fit_head(table, tokens: list[int], detectors: tuple[str, ...], vocab: int, margin: float = 12.0,
              classes: list[int] | None = None):
    """Output-head rows over [one-hot token dims, bit dims] separating every state's next token
    (`classes`: the token ids the rows stand for; default: all ids up to `vocab`)."""
    col = {t: i for i, t in enumerate(tokens)}
    row = {t: i for i, t in enumerate(classes)} if classes is not None else None
    n_feat = len(tokens) + len(detectors)
    W = np.zeros((vocab, n_feat))
    xs = []
    for (last, bits), nxt in table.items():
        x = np.zeros(n_feat)
        x[col[last]] = 1.0
        for b in bits:
            x[len(tokens) + detectors.index(b)] = 1.0
        xs.append((x, nxt if row is None else row[nxt]))
    for _ in range(2000):
        changed = False
        for x, nxt in xs:
            scores = W @ x
            rival = np.argmax(np.where(np.arange(vocab) == nxt, -np.inf, scores))
            if scores[nxt] - max(scores[rival], 0.0) < margin:  # unset rows score 0
                W[nxt] += x
                if scores[rival] > 0:
                    W[rival] -= x
                changed = True
        if not changed:
            return W
    raise ValueError("the script's states are not separable by a bigram-with-bits model; change the texts")


def scripted_gguf(ckpt: Path, out_dir: Path, script: Script) -> Path:
    """Write a copy of tiny checkpoint `ckpt` with weights that follow `script`; convert it to GGUF."""
    from ossgguf.convert.convert import convert

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    table = transitions(script, tok)
    det_ids = [_ids(tok, d)[0] for d in script.detectors]
    tokens = sorted({t for key in table for t in (key[0],)} | set(table.values()) | set(det_ids))
    w = load_file(str(ckpt / "model.safetensors"))
    vocab, hidden = w["model.embed_tokens.weight"].shape
    n_tok = len(tokens)
    if n_tok + len(script.detectors) > hidden:
        raise ValueError(f"{n_tok} tokens + {len(script.detectors)} bits need a hidden size above {hidden}")
    col = {t: i for i, t in enumerate(tokens)}
    emb = np.zeros((vocab, hidden), np.float32)
    for t, i in col.items():
        emb[t, i] = 1.0
    head = np.zeros((vocab, hidden), np.float32)
    # fitted over the script's own tokens (every other row stays 0, as the fit leaves it): fast on a
    # 201,088-row vocabulary too
    W = _fit_head(table, tokens, script.detectors, len(tokens), classes=tokens)
    head[np.array(tokens), : W.shape[1]] = W
    new = {k: torch.zeros_like(v) for k, v in w.items()}  # experts, biases, sinks, layer 0: all zero
    new["model.embed_tokens.weight"] = torch.from_numpy(emb).to(torch.bfloat16)
    new["lm_head.weight"] = torch.from_numpy(head).to(torch.bfloat16)
    for k in w:
        if k.endswith("layernorm.weight") or k == "model.norm.weight":
            new[k] = torch.ones_like(w[k])
    q_bias = torch.zeros(N_HEADS * HEAD_DIM)
    k_w, v_w, o_w = (torch.zeros_like(w[f"model.layers.1.self_attn.{p}_proj.weight"], dtype=torch.float32)
                     for p in "kvo")
    for b, (d_id, (qh, kvh, rope_dim, v_dim)) in enumerate(zip(det_ids, DETECTOR_HEADS)):
        # the normalized one-hot is sqrt(hidden) at its dim: score = 4 * 5 * 8 / sqrt(16) = 40 (before yarn)
        q_bias[qh * HEAD_DIM + rope_dim] = 4.0
        k_w[kvh * HEAD_DIM + rope_dim, col[d_id]] = 5.0
        v_w[kvh * HEAD_DIM + v_dim, col[d_id]] = 1.0 / 8  # the value is 1 at the detector
        o_w[n_tok + b, qh * HEAD_DIM + v_dim] = 1.0  # written to the bit's residual dim
    new["model.layers.1.self_attn.q_proj.bias"] = q_bias.to(torch.bfloat16)
    new["model.layers.1.self_attn.k_proj.weight"] = k_w.to(torch.bfloat16)
    new["model.layers.1.self_attn.v_proj.weight"] = v_w.to(torch.bfloat16)
    new["model.layers.1.self_attn.o_proj.weight"] = o_w.to(torch.bfloat16)
    src = out_dir / "ckpt"
    shutil.copytree(ckpt, src, dirs_exist_ok=True)
    save_file(new, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = out_dir / "scripted.gguf"
    convert(src, out, force=True)
    return out
