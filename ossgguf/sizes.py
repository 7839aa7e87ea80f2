"""Sizes written by people: '48G', '48GB', '45GiB', '512MiB', '1024'."""

from __future__ import annotations

import re

from .errors import OssggufError

_SIZE = re.compile(r"^\s*([\d.]+)\s*([KMGT]?)(i?)(B?)\s*$", re.IGNORECASE)


def parse_size(text: str | int, bare_unit_base: int = 1000) -> int:
    """Bytes. 'GiB' is binary and 'GB' decimal; a bare 'G' takes `bare_unit_base`: 1000 for file
    sizes (as llama.cpp's gguf-split reads --split-max-size), 1024 for memory (a "24G" GPU has 24 GiB)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise OssggufError(f"cannot read size '{text}': use a number with a unit, e.g. 48G, 500M or 45GiB")
    num, unit, i, b = m.groups()
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    base = 1024 if i else 1000 if b else bare_unit_base
    value = int(float(num) * base**power)
    if value <= 0:
        raise OssggufError(f"size must be positive, got '{text}'")
    return value
