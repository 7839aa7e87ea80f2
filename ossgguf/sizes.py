"""Sizes written by people ('48G', '48GB', '45GiB', '512MiB', '1024') and sizes shown to them."""

from __future__ import annotations

import re

from .errors import OssggufError

_SIZE = re.compile(r"^\s*([-+]?)(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(i?)(B?)\s*$", re.IGNORECASE)


def parse_size(text: str | int, bare_unit_base: int = 1000) -> int:
    """Bytes (0 or more: the caller's limit, ossgguf.limits, says what is allowed). 'GiB' is binary and
    'GB' decimal; a bare 'G' takes `bare_unit_base`: 1000 for file sizes (as llama.cpp's gguf-split reads
    --split-max-size), 1024 for memory (a "24G" GPU has 24 GiB)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise OssggufError(f"cannot read size '{text}': use a number with a unit, e.g. 48G, 500M or 45GiB")
    sign, num, unit, i, b = m.groups()
    if sign == "-":
        raise OssggufError(f"size '{text.strip()}' is negative")
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    base = 1024 if i else 1000 if b else bare_unit_base
    return int(float(num) * base**power)


def human_size(n: float) -> str:
    """Decimal units with one decimal, so that small sizes still show: '0 B', '310.9 kB', '65.4 GB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
