"""The one type policy: a tensor's class and a recipe choose its GGML type; --tensor-type overrides.

A type the rows cannot take (k-quants and IQ types need rows that are a multiple of 256; gpt-oss rows
are 2880 wide) is never silently replaced: the caller refuses, or with allow_fallback takes the
nearest valid type and reports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import LlamaFileType

from ossgguf.gguf.tensors import FLOAT_TYPES, Q, block_size, parse_type, row_fits, types_for_row

from ..errors import OssggufError
from ..model import TensorClass
from .kernels import check_encodable

AS_STORED = None  # keep the source's type (BF16 for gpt-oss's attention, embeddings and head)


def _recipe(experts: Q, others: Q | None) -> dict[TensorClass, Q | None]:
    """Experts in one type, attention, embeddings and head in another; norms, sinks, biases and the
    router stay F32 in every recipe, as in llama.cpp's own gpt-oss files."""
    return {TensorClass.EXPERT: experts, TensorClass.ATTENTION: others, TensorClass.EMBEDDING: others,
            TensorClass.OUTPUT: others, TensorClass.ROUTER: Q.F32, TensorClass.NORM: Q.F32}


# recipe -> class -> type
RECIPES: dict[str, dict[TensorClass, Q | None]] = {
    "mxfp4": _recipe(Q.MXFP4, AS_STORED), "mxfp4-q8": _recipe(Q.MXFP4, Q.Q8_0), "q8_0": _recipe(Q.Q8_0, Q.Q8_0),
    "bf16": _recipe(Q.BF16, Q.BF16), "f16": _recipe(Q.F16, Q.F16),
}
DEFAULT_RECIPE = "mxfp4"

# What llama-quantize falls back to when rows are not a multiple of 256 (tensor_type_fallback in
# llama-quant.cpp of the pinned release).
_FALLBACK = {
    Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
    Q.IQ2_XXS: Q.IQ4_NL, Q.IQ2_XS: Q.IQ4_NL, Q.IQ2_S: Q.IQ4_NL, Q.IQ3_XXS: Q.IQ4_NL, Q.IQ3_S: Q.IQ4_NL,
    Q.IQ1_S: Q.IQ4_NL, Q.IQ1_M: Q.IQ4_NL, Q.IQ4_XS: Q.IQ4_NL,
}


def parse_recipe(name: str) -> str:
    if name not in RECIPES:
        raise OssggufError(f"unknown recipe '{name}': use one of {', '.join(RECIPES)}")
    return name


def parse_overrides(items: list[str] | tuple[str, ...]) -> list[tuple[re.Pattern[str], Q]]:
    """`REGEX=TYPE` items, as llama-quantize's --tensor-type."""
    out = []
    for item in items:
        pat, sep, typ = item.rpartition("=")
        if not sep or not pat:
            raise OssggufError(f"--tensor-type '{item}' must look like REGEX=TYPE, e.g. 'attn_.*=q8_0'")
        try:
            out.append((re.compile(pat), parse_type(typ)))
        except re.error as e:
            raise OssggufError(f"--tensor-type '{item}': bad regex: {e}") from None
    return out


@dataclass(frozen=True)
class TypeChoice:
    name: str
    qtype: Q
    requested: Q
    why: str  # "recipe", "override", "fallback"

    @property
    def fell_back(self) -> bool:
        return self.qtype != self.requested


def choose_types(tensors: list[tuple[str, TensorClass, tuple[int, ...], Q]], recipe: str,
                 overrides: list[tuple[re.Pattern[str], Q]] = (), allow_fallback: bool = False) -> list[TypeChoice]:
    """One TypeChoice per (name, class, numpy shape, stored type), or OssggufError for what cannot be."""
    table = RECIPES[parse_recipe(recipe)]
    used = [False] * len(overrides)
    norm_only = [False] * len(overrides)  # matched, but only NORM tensors, which stay F32
    choices, bad = [], []
    for name, cls, shape, stored in tensors:
        want, why = table[cls], "recipe"
        if want is AS_STORED:
            want = stored if stored in FLOAT_TYPES or row_fits(stored, shape[-1]) else Q.BF16
        k = next((k for k, (pat, _) in enumerate(overrides) if pat.search(name)), None)
        if k is not None:
            # norms, sinks and biases (class NORM: F32 in every recipe) stay F32 whatever is asked:
            # llama.cpp reads them as F32 (ggml_add_id asserts it for the 2-D expert biases)
            typ = overrides[k][1]
            if cls != TensorClass.NORM:
                want, why = typ, "override"
            (used if cls != TensorClass.NORM or typ == Q.F32 else norm_only)[k] = True
        got = want
        if not row_fits(want, shape[-1]):
            alt = _FALLBACK.get(want, Q.Q8_0)
            if not allow_fallback or not row_fits(alt, shape[-1]):
                bad.append((name, want, shape))
                continue
            got, why = alt, "fallback"
        choices.append(TypeChoice(name, got, want, why))
    unused = [overrides[k][0].pattern for k, u in enumerate(used) if not u and not norm_only[k]]
    if unused:
        raise OssggufError(f"--tensor-type pattern(s) matched no tensor: {', '.join(unused)}")
    f32_only = [overrides[k][0].pattern for k, u in enumerate(used) if not u and norm_only[k]]
    if f32_only:
        raise OssggufError(f"--tensor-type pattern(s) matched only norms, sinks or biases, which "
                           f"llama.cpp reads as F32: {', '.join(f32_only)}; match weights (e.g. '\\.weight$')")
    if bad:
        raise OssggufError(_unfit_message(bad))
    for c, (_, _, shape, stored) in zip(choices, tensors):  # what no quantizer here writes (imatrix types)
        if c.qtype != stored and c.qtype not in FLOAT_TYPES:
            check_encodable(c.qtype, shape[-1])
    return choices


def _unfit_message(bad: list[tuple[str, Q, tuple[int, ...]]], shown: int = 3) -> str:
    """One short line however many tensors are refused (all the experts of a 120b are 108): the count,
    the first few names, and the types that every one of their rows can take."""
    types = sorted({t for _, t, _ in bad}, key=lambda t: t.value)
    blocks = sorted({block_size(t) for t in types})
    rows = sorted({shape[-1] for _, _, shape in bad})
    valid = [t for t in types_for_row(rows[0]) if all(row_fits(t, row) for row in rows)]
    names = ", ".join(n for n, _, _ in bad[:shown]) + (f" and {len(bad) - shown} more" if len(bad) > shown else "")
    return (f"{len(bad)} tensor{'s' * (len(bad) != 1)} cannot be stored as {'/'.join(t.name for t in types)} "
            f"(rows of {'/'.join(map(str, rows))}, not a multiple of {'/'.join(map(str, blocks))}): {names}. "
            f"Types that fit these rows: {', '.join(t.name.lower() for t in valid) or 'none'}; "
            "or pass --allow-fallback to take the nearest valid type")


def file_type(choices: list[TypeChoice], classes: dict[str, TensorClass]) -> int:
    """general.file_type: MOSTLY_MXFP4_MOE when the experts are MXFP4, else the experts' type."""
    exp = [c.qtype for c in choices if classes[c.name] == TensorClass.EXPERT]
    main = max(set(exp), key=exp.count) if exp else Q.F32
    if main == Q.MXFP4:
        return LlamaFileType.MOSTLY_MXFP4_MOE
    if main == Q.F32:
        return LlamaFileType.ALL_F32
    return getattr(LlamaFileType, f"MOSTLY_{main.name}", LlamaFileType.GUESSED)
