"""How far a quantized GGUF's predictions move from a reference's (the `compare` command).

Both files run in llama.cpp on the same token ids with every position's logits kept; B is scored
against A (the reference) as llama-perplexity's --kl-divergence does: KL(P_A || P_B) per position,
top-1 agreement, logit cosine, and each model's perplexity on the text. The models load one after
the other, so memory holds one model and the reference logits.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ossgguf.gguf.read import read_gguf

from ..errors import OssggufError
from ..limits import COMPARE_CTX

log = logging.getLogger(__name__)
ROWS = 64  # positions per step of the metric computation (float64 log-softmax of 64 x vocab)

# A few hundred tokens of mixed text: prose, code, numbers, a table, punctuation.
DEFAULT_TEXT = """\
The lighthouse keeper wrote in the log every evening at six: wind from the north-west, force 5,
visibility good, two fishing boats returned before dusk. In the winter of 1987 the lamp failed twice,
and each time she climbed the 142 steps with a paraffin lantern, because a dark tower is worse than none.

def moving_average(values: list[float], window: int = 3) -> list[float]:
    \"\"\"Mean of each run of `window` consecutive values.\"\"\"
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    for i in range(len(values) - window + 1):
        out.append(sum(values[i:i + window]) / window)
    return out

print(moving_average([3.5, 4.0, 2.25, 8.0, 1.5], window=2))  # [3.75, 3.125, 5.125, 4.75]

| year | revenue (EUR) | growth |
|------|---------------|--------|
| 2021 | 1,204,500     | 4.2%   |
| 2022 | 1,318,930     | 9.5%   |
| 2023 | 1,297,010     | -1.7%  |

SELECT name, COUNT(*) AS orders FROM customers JOIN orders USING (customer_id)
WHERE created_at >= '2024-01-01' GROUP BY name ORDER BY orders DESC LIMIT 10;

Q: If a train leaves at 14:35 and the trip takes 2 h 50 min, when does it arrive? A: at 17:25.
Photosynthesis turns carbon dioxide and water into glucose and oxygen: 6 CO2 + 6 H2O -> C6H12O6 + 6 O2.
"Measure twice, cut once," the carpenter said, handing over a pencil, a square and 3 m of tape.
"""


@dataclass
class _Side:
    n_vocab: int
    pieces: list[bytes]  # detokenized sample ids: the vocabularies must agree
    tokens: list[int]  # the ids evaluated
    own: list[int] | None  # the text tokenized with this file's vocabulary
    logits: np.ndarray  # [n_tokens, n_vocab] float32


def _sample_ids(n_vocab: int) -> list[int]:
    return sorted({0, 1, 2, n_vocab - 1, *np.linspace(0, n_vocab - 1, 13).astype(int).tolist()})


def _run(path: Path, text: str | None, tokens: Sequence[int] | None, n_ctx: int, threads: int,
         rpc: str | None = None, loras: Sequence = ()) -> _Side:
    from ..runner.engine import token_bytes
    from ..runner.llama_ctypes import open_llama

    if not path.is_file():
        raise OssggufError(f"{path} does not exist: pass a .gguf file (the first shard of a split set)")
    if rpc:  # every layer on the workers (llama.cpp spreads them by the memory each reports)
        from ..runner.rpc import add_workers, parse_endpoints

        add_workers(parse_endpoints(rpc))
    try:
        llm = open_llama(path, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512), logits_all=True,
                         n_threads=threads, n_threads_batch=threads, verbose=False, swa_full=False,
                         n_gpu_layers=-1 if rpc else 0)
    except (ValueError, RuntimeError) as e:
        raise OssggufError(f"llama.cpp cannot load {path} ({e}): is it a complete GGUF? Check it with "
                           "`ossgguf inspect`") from None
    try:
        if loras:  # LoRA adapters (runner/lora.py), applied as run/chat/serve apply them
            from ..runner.lora import apply_adapters

            apply_adapters(llm.model, llm.ctx, loras)
        n_vocab = llm.n_vocab()
        own = llm.tokenize(text.encode("utf-8"), add_bos=False) if text is not None else None
        ids = list(tokens) if tokens is not None else own
        bad = [t for t in ids if not 0 <= t < n_vocab]
        if bad:
            raise OssggufError(f"token ids {bad[:5]} are outside {path.name}'s vocabulary of {n_vocab}")
        ids = ids[:n_ctx]
        if len(ids) < 2:
            raise OssggufError("the text gives fewer than 2 tokens: pass a longer text")
        pieces = [token_bytes(llm.model, i) for i in _sample_ids(n_vocab)]  # not Llama's 32-byte buffer
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    return _Side(n_vocab, pieces, ids, own, logits)


def _finite(side: _Side, path: Path) -> None:
    """NaN or infinite logits make every metric NaN (and `--json` invalid JSON): say where instead."""
    bad = ~np.isfinite(side.logits).all(axis=-1)
    if bad.any():
        raise OssggufError(f"{path.name} gives non-finite logits (NaN or inf) at {int(bad.sum())} of {len(bad)} "
                           f"positions, the first at position {int(bad.argmax())}: its weights hold NaN/inf or "
                           "overflow (a random-bytes test model, or a broken conversion); compare needs finite logits")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(a_gguf: str | Path, b_gguf: str | Path, text: str | None = None, tokens: Sequence[int] | None = None,
            n_ctx: int = COMPARE_CTX, threads: int | None = None, rpc: str | None = None,
            lora: Sequence = (), ref_lora: Sequence = ()) -> dict[str, Any]:
    """KL divergence of B from A (the reference) per position, top-1 agreement, logit cosine, perplexities.

    `rpc` ("host:port,..."): B runs on those llama.cpp RPC workers, A locally, so that
    `compare model.gguf model.gguf --rpc ...` checks a distributed setup against a local run.
    `lora` / `ref_lora`: LoRA adapters (runner.lora.LoraSpec or "A.gguf[:SCALE]") applied to B / A.

    Token ids are `tokens`, else `text` (default: a built-in mixed text) tokenized with A's
    vocabulary; at most n_ctx of them are used.
    """
    if n_ctx < 2:
        raise OssggufError(f"--ctx {n_ctx} is too small: compare needs at least 2 tokens (default {COMPARE_CTX})")
    threads = threads or os.cpu_count() or 1
    if tokens is None and text is None:
        text = DEFAULT_TEXT
    # The project's reader first: a bad file gets its specific message, not llama.cpp's generic
    # failure, and any shard of a split set stands for the set (llama.cpp loads it from the first).
    a_path, b_path = read_gguf(a_gguf).path, read_gguf(b_gguf).path
    a = _run(a_path, text, tokens, n_ctx, threads, loras=ref_lora)
    log.info("reference %s: %d tokens evaluated", a_path, len(a.tokens))
    _finite(a, a_path)
    b = _run(b_path, text, a.tokens, n_ctx, threads, rpc, loras=lora)
    _finite(b, b_path)
    if b.n_vocab != a.n_vocab or b.pieces != a.pieces or b.own != a.own:
        raise OssggufError(f"{a_path.name} and {b_path.name} have different vocabularies "
                           f"({a.n_vocab:,} and {b.n_vocab:,} tokens, or other token texts): compare two files "
                           "of the same model")
    n = len(a.tokens)
    kl, cos, top1, nll_a, nll_b = [], [], [], [], []
    nxt = np.asarray(a.tokens[1:] + [-1])
    for s in range(0, n, ROWS):
        la, lb = a.logits[s:s + ROWS], b.logits[s:s + ROWS]
        pa, pb = _log_softmax(la), _log_softmax(lb)
        kl.append((np.exp(pa) * (pa - pb)).sum(-1))
        cos.append((la.astype(np.float64) * lb).sum(-1) / (np.linalg.norm(la, axis=-1) * np.linalg.norm(lb, axis=-1)))
        top1.append(la.argmax(-1) == lb.argmax(-1))
        k = nxt[s:s + ROWS]
        ok = k >= 0
        rows = np.arange(len(k))[ok]
        nll_a.append(-pa[rows, k[ok]])
        nll_b.append(-pb[rows, k[ok]])
    kl_all, cos_all = np.maximum(np.concatenate(kl), 0.0), np.concatenate(cos)
    return {
        "a": str(a_path), "b": str(b_path), "n_ctx": n_ctx, "n_tokens": n, "n_vocab": a.n_vocab,
        "kl_mean": float(kl_all.mean()), "kl_median": float(np.median(kl_all)),
        "kl_p99": float(np.percentile(kl_all, 99)), "kl_max": float(kl_all.max()),
        "top1_agreement": float(np.concatenate(top1).mean()),
        "cosine_mean": float(cos_all.mean()), "cosine_min": float(cos_all.min()),
        "ppl_a": float(np.exp(np.concatenate(nll_a).mean())), "ppl_b": float(np.exp(np.concatenate(nll_b).mean())),
        "kl_per_position": [float(x) for x in kl_all],
        "tokens": a.tokens,
    }


def read_text_file(path: str | Path) -> str:
    """A --text file as UTF-8 text; OssggufError naming the file when it is not text."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OssggufError(f"cannot read the text file {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OssggufError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start:,}): "
                           "--text takes a UTF-8 text file") from None
    if "\0" in text:  # decodes, but a NUL byte says binary (as git and grep judge it)
        raise OssggufError(f"{path} holds NUL bytes, so it is not a text file: --text takes a UTF-8 text file")
    return text


def format_compare(r: dict[str, Any]) -> str:
    return "\n".join([
        f"A (reference): {r['a']}",
        f"B:             {r['b']}",
        f"{r['n_tokens']} tokens (vocabulary {r['n_vocab']:,}), context {r['n_ctx']}",
        f"KL(A||B) per position: mean {r['kl_mean']:.6f}, median {r['kl_median']:.6f}, "
        f"99th pct {r['kl_p99']:.6f}, max {r['kl_max']:.6f}",
        f"top-1 agreement: {100 * r['top1_agreement']:.2f}%",
        f"logit cosine: mean {r['cosine_mean']:.6f}, min {r['cosine_min']:.6f}",
        f"perplexity on the text: A {r['ppl_a']:.4f}, B {r['ppl_b']:.4f}",
    ])
