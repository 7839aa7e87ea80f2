"""Typed GGUF metadata values (GGUF stores each key with its exact type)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf import GGUFValueType

# Each fixed-size value type as a little-endian numpy dtype (the reader's and the writer's table).
DTYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


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
