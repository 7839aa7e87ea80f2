"""A tiny byte-level BPE tokenizer in the exact shape of gpt-oss's (o200k split + harmony tokens).

Writes the same tokenizer.json / tokenizer_config.json / special_tokens_map.json /
generation_config.json structures as openai/gpt-oss-20b and -120b, with a vocabulary of a few
hundred merges learned here from a built-in corpus. numpy-free and standard library only.
"""

from __future__ import annotations

import base64
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import OssggufError
from .model import HARMONY_SPECIAL_TOKENS, O200K_PATTERN

__all__ = [
    "HARMONY_SPECIAL_TOKENS", "O200K_PATTERN", "bpe_encode", "bytes_to_unicode", "generation_config_json",
    "read_tiktoken", "special_token_ids", "special_tokens_map_json", "tokenizer_config_json", "tokenizer_json",
    "tokenizer_json_from_ranks", "train_bpe",
]

# O200K_PATTERN (the Split regex, llama.cpp's "gpt-4o") and the harmony tokens are gpt-oss knowledge:
# model.py holds them; they are re-exported here for the tokenizer's users.
BOS_TOKEN, PAD_TOKEN, EOS_TOKEN, CALL_TOKEN = "<|startoftext|>", "<|endoftext|>", "<|return|>", "<|call|>"
# The real files were written by this transformers version; keeping it makes them byte-identical.
HF_WRITER_VERSION = "4.55.0.dev0"

# Training split only (the stdlib `re` has no \p{..}): it shapes which merges are learned, never
# how the tokenizer splits text, which is O200K_PATTERN.
_TRAIN_SPLIT = re.compile(
    r"[^\r\n\w]?[^\W\d_]+(?:'s|'t|'re|'ve|'m|'ll|'d)?|\d{1,3}| ?(?:[^\s\w]|_)+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A tiny model is still a model: it has weights,
a tokenizer and a chat template, and every part of the pipeline can be tested on it.
We're converting checkpoints, they'll run locally, and it's faster than you'd think.
Mixture-of-experts layers route each token to a few experts; the others stay idle in memory.
Attention keeps its keys and values in a cache, while the experts live in system RAM.
In 2024 the model was trained; on 2025-08-05 it was released with 117 billion parameters.
Prices: $3.50, 12%, 1,000,000 tokens, 0.125 seconds, 65536 bytes, 3.14159, 42 and 7.
Numbers like 1234567890 split into groups of three digits: 123 456 789 0.
HTTP/1.1 200 OK -- Content-Type: application/json; charset=utf-8

def quantize(weights, block_size=32):
    \"\"\"Return blocks and scales for MXFP4.\"\"\"
    scales = []
    for i in range(0, len(weights), block_size):
        block = weights[i : i + block_size]
        amax = max(abs(x) for x in block) or 1.0
        scales.append(int(math.floor(math.log2(amax))) - 2)
    return scales


class Config:
    hidden_size: int = 2880
    num_experts: int = 128  # experts per layer

    def __repr__(self) -> str:
        return f"Config(hidden_size={self.hidden_size})"

function add(a, b) { return a + b; }
const xs = [1, 2, 3].map((x) => x * 2);  // [2, 4, 6]
if (x != null && y >= 0 || z === "yes") { console.log("ok"); }
for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }
SELECT name, count(*) FROM users WHERE age > 21 GROUP BY name ORDER BY 2 DESC;
{"role": "user", "content": "What is the weather in Paris?"}
<|start|>assistant<|channel|>final<|message|>The answer is 42.<|end|>

Le renard brun saute par-dessus le chien paresseux. Ça coûte 5 € à Montréal, où l'été est chaud.
Der schnelle braune Fuchs springt über den faulen Hund. Grüße aus München und Köln!
El rápido zorro marrón salta sobre el perro perezoso. ¿Dónde está la biblioteca? ¡Olé!
Быстрая коричневая лиса прыгает через ленивую собаку. Привет, мир!
Γρήγορη καφέ αλεπού. Καλημέρα κόσμε! Ελληνικά γράμματα: α β γ δ ε.
敏捷的棕色狐狸跳过了懒狗。你好，世界！日本語のテキストも少し：こんにちは、世界。
한국어 문장도 있습니다. 안녕하세요! हिन्दी में नमस्ते। مرحبا بالعالم. שלום עולם.
Emoji and symbols: 🙂 🚀 ✅ ★ → ← ≤ ≥ ± × ÷ ∑ ∞ π µ ° © ® ™ — – … « » “quotes” ‘single’.
    Indented text with    runs of   spaces,	tabs,		and
blank lines.


THE END OF THE SHOUTING PART. CamelCaseWords and snake_case_names and kebab-case-names.
I'm sure you've seen it; we'd say they're right. Don't stop. It's OK, isn't it? I'll go.
Reasoning: low, medium or high. Knowledge cutoff: 2024-06. Current date: 2025-01-31.
The system message holds the identity; the developer message holds instructions and tools.
Tokenizers split text into pieces, then merge bytes into tokens, then map tokens to ids.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE alphabet), in its own order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _to_symbols(text: str, table: dict[int, str]) -> tuple[str, ...]:
    return tuple(table[b] for b in text.encode("utf-8"))


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Merge every occurrence of `pair`, left to right, without overlaps (as BPE does)."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def bpe_encode(symbols: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """Apply merges by rank (lowest first, leftmost first), as tokenizers' BPE model does."""
    word = symbols
    while len(word) > 1:
        best = min(((ranks.get(p, -1), p) for p in zip(word, word[1:]) if p in ranks), default=None)
        if best is None:
            break
        word = _merge_word(word, best[1])
    return word


def _chain_first(first: tuple[str, str], pairs: Counter[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    yield first
    yield from sorted((p for p in pairs if p != first), key=lambda p: (-pairs[p], p))


def train_bpe(n_merges: int, corpus: str = CORPUS) -> list[tuple[str, str]]:
    """Learn `n_merges` byte-level BPE merges from `corpus`, deterministically.

    Every merge makes a new token, and every token encodes to itself by rank-ordered merging: a
    whole-word vocabulary lookup (tokenizers' ignore_merges, set in the real tokenizer.json) and
    llama.cpp's merge-only BPE then give the same ids.
    """
    table = bytes_to_unicode()
    words = Counter(_to_symbols(w, table) for w in _TRAIN_SPLIT.findall(corpus))
    vocab = set(table.values())
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in words.items():
            for p in zip(word, word[1:]):
                pairs[p] += freq
        chosen = None
        # the most frequent pair (ties: the smallest), or the next ones when it is not allowed
        first = min(pairs, key=lambda p: (-pairs[p], p), default=None)
        for pair in () if first is None else _chain_first(first, pairs):
            merged = pair[0] + pair[1]
            if merged in vocab:
                continue
            ranks[pair] = len(merges)
            if bpe_encode(tuple(merged), ranks) == (merged,):
                chosen = pair
                break
            del ranks[pair]
        if chosen is None:
            raise OssggufError(
                f"the built-in corpus yields only {len(merges)} BPE merges, fewer than the {n_merges} asked "
                "for: choose a smaller n_merges"
            )
        merges.append(chosen)
        vocab.add(chosen[0] + chosen[1])
        words = Counter({(_merge_word(w, chosen) if chosen[0] in w else w): f for w, f in words.items()})
    return merges


def _added_token(token_id: int, content: str) -> dict[str, Any]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def tokenizer_json(n_merges: int, merges_as_strings: bool = False) -> dict[str, Any]:
    """tokenizer.json in the structure of gpt-oss's (transformers' TikTokenConverter output)."""
    table = bytes_to_unicode()
    merges = train_bpe(n_merges)
    tokens = list(table.values()) + [a + b for a, b in merges]
    return _tokenizer_json(tokens, merges, merges_as_strings)


def read_tiktoken(path: str | Path) -> dict[bytes, int]:
    """A tiktoken ranks file (`o200k_base.tiktoken`: one `base64(token bytes) rank` per line)."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise OssggufError(f"{path}:{n} is not a `base64 rank` line of a tiktoken file") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise OssggufError(f"{path}: the ranks are not 0..{len(ranks) - 1}, one per token")
    return ranks


def tokenizer_json_from_ranks(ranks: dict[bytes, int]) -> dict[str, Any]:
    """tokenizer.json for a tiktoken vocabulary (o200k_base: gpt-oss's real one), as transformers'
    TikTokenConverter builds it: token id = rank, and every split of a token into two tokens is a
    merge, ordered by the token's rank, then by the ranks of the two halves."""
    table = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[c] for c in b)

    by_rank = sorted(ranks, key=ranks.__getitem__)
    merges: list[tuple[str, str]] = []
    for token in by_rank:
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges += [(text(a), text(b)) for a, b in splits]
    return _tokenizer_json([text(t) for t in by_rank], merges, False)


def _tokenizer_json(tokens: list[str], merges: list[tuple[str, str]], merges_as_strings: bool) -> dict[str, Any]:
    base = len(tokens)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(base + i, t) for i, t in enumerate(HARMONY_SPECIAL_TOKENS)],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [f"{a} {b}" if merges_as_strings else [a, b] for a, b in merges],
        },
    }


def special_token_ids(base: int) -> dict[str, int]:
    """Harmony token -> id when the special tokens start at `base` (199998 in gpt-oss)."""
    return {t: base + i for i, t in enumerate(HARMONY_SPECIAL_TOKENS)}


def tokenizer_config_json(base: int) -> dict[str, Any]:
    """tokenizer_config.json as gpt-oss ships it (no chat_template: that is chat_template.jinja)."""
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    return {
        "added_tokens_decoder": {str(i): {"content": t, **flags} for t, i in special_token_ids(base).items()},
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def special_tokens_map_json() -> dict[str, Any]:
    return {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}


def generation_config_json(base: int) -> dict[str, Any]:
    """generation_config.json: generation stops at <|return|>, <|endoftext|> or <|call|>."""
    ids = special_token_ids(base)
    return {
        "bos_token_id": ids[BOS_TOKEN],
        "do_sample": True,
        "eos_token_id": [ids[EOS_TOKEN], ids[PAD_TOKEN], ids[CALL_TOKEN]],
        "pad_token_id": ids[PAD_TOKEN],
        "transformers_version": HF_WRITER_VERSION,
    }
