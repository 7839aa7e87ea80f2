"""The valid range of each numeric option, and the defaults the library applies, defined once.

The CLI turns the ranges into click types (a bad value is a usage error naming the option) and shows
the defaults in its help; the library's option classes (PlacementOptions, Sampling, ToolRunner, the
GGUF writer's split size) and the server's request checks refuse the same values with an
OssggufError, since the CLI is not their only caller. This module imports nothing heavy, so that
`ossgguf --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

from .errors import OssggufError

INT32_MAX = 2**31 - 1  # llama.cpp keeps top_k and token counts in int32_t


@dataclass(frozen=True)
class Limit:
    """lo <= value <= hi (no upper bound when hi is None); with lo_open, lo itself is refused."""

    lo: float
    hi: float | None = None
    lo_open: bool = False
    integer: bool = False

    def _kind_ok(self, value: object) -> bool:  # numpy scalars count; True is not a number here
        return not isinstance(value, bool) and isinstance(value, Integral if self.integer else Real)

    def ok(self, value: float) -> bool:
        if not self._kind_ok(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        return above and (self.hi is None or value <= self.hi)  # NaN fails both comparisons

    def describe(self) -> str:
        """'at least 1', 'greater than 0', 'between 0 and 2'."""
        if self.hi is None:
            return f"{'greater than' if self.lo_open else 'at least'} {self.lo:g}"
        return f"between {self.lo:g} and {self.hi:g}"

    def check(self, name: str, value: float | None) -> None:
        """OssggufError naming `name` unless the value is None (the default) or within the range."""
        if value is None or self.ok(value):
            return
        if not self._kind_ok(value):
            raise OssggufError(f"{name} must be {'an integer' if self.integer else 'a number'}, not {value!r}")
        raise OssggufError(f"{name} must be {self.describe()}, not {value!r}")


# placement (runner.plan.PlacementOptions); sizes in bytes
CTX = Limit(1, integer=True)  # the model's own context length bounds it from above (runner.plan)
UBATCH = Limit(1, integer=True)  # llama.cpp takes at most the context
THREADS = Limit(1, integer=True)
N_CPU_MOE = Limit(0, integer=True)  # more than the model's layers means all of them
GPU_MEM = Limit(0, integer=True)  # 0: no GPU
MEMORY = Limit(0, lo_open=True, integer=True)  # RAM, unified memory
CACHE_RAM = Limit(0, integer=True)  # --cache-ram: bytes of saved prompts in RAM; 0 turns the cache off
PARALLEL = Limit(1, 256, integer=True)  # --parallel: streams decoded in one batch (llama.cpp's LLAMA_MAX_SEQ)

# placement defaults (runner.plan) when --ctx / --ubatch are not given
DEFAULT_CTX = 65536  # capped by the model's context; long enough for tool use, 2.4 GB of KV on 120b
UBATCH_OFFLOAD = 2048  # large prompt batches amortise streaming RAM-resident experts to the GPU
UBATCH_DEFAULT = 512

# generation (runner.generation.Sampling): OpenAI's ranges, which the server also enforces
TEMPERATURE = Limit(0, 2)  # 0: greedy
TOP_P = Limit(0, 1)
TOP_K = Limit(0, INT32_MAX, integer=True)  # 0: off
MIN_P = Limit(0, 1)
MAX_TOKENS = Limit(1, INT32_MAX, integer=True)
TOOL_TIMEOUT = Limit(0, lo_open=True)  # seconds

# files and the rest
FILE_SIZE = Limit(0, lo_open=True, integer=True)  # --split-max-size, --target-size
COUNT = Limit(1, integer=True)  # prune's --keep (the model bounds it further)
PORT = Limit(1, 65535, integer=True)
COMPARE_CTX = 512  # tokens `compare` evaluates by default
CALIBRATE_CHUNK = 2048  # tokens per calibration sequence (REAP calibrates on 2048-token sequences)
