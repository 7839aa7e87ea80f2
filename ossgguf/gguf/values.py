"""Typed GGUF metadata values (GGUF stores each key with its exact type)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf import GGUFValueType


@dataclass(frozen=True)
class KV:
    """One typed metadata value. Arrays carry their element type in `sub`."""

    type: GGUFValueType
    value: Any
    sub: GGUFValueType | None = None


def kv_str(v: str) -> KV:
    return KV(GGUFValueType.STRING, v)


def kv_u32(v: int) -> KV:
    return KV(GGUFValueType.UINT32, int(v))


def kv_i32(v: int) -> KV:
    return KV(GGUFValueType.INT32, int(v))


def kv_f32(v: float) -> KV:
    return KV(GGUFValueType.FLOAT32, float(v))


def kv_bool(v: bool) -> KV:
    return KV(GGUFValueType.BOOL, bool(v))


def kv_array(sub: GGUFValueType, values: list) -> KV:
    return KV(GGUFValueType.ARRAY, values, sub)
