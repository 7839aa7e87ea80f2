"""What a generation is asked (`Sampling`) and what it cost (`Usage`), defined once for the engine,
the chat, the server and the command line (which takes its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ossgguf import limits


@dataclass(frozen=True)
class Sampling:
    """How tokens are picked. The defaults are OpenAI's for gpt-oss (its model card: temperature 1,
    top_p 1): sample the whole distribution, with no truncation and no repetition penalty."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None  # None: random
    max_tokens: int | None = None  # per generation; None: until the context is full

    def __post_init__(self) -> None:  # the CLI and the server check the same limits first
        for name, limit in (("temperature", limits.TEMPERATURE), ("top_p", limits.TOP_P), ("top_k", limits.TOP_K),
                            ("min_p", limits.MIN_P), ("max_tokens", limits.MAX_TOKENS)):
            limit.check(name, getattr(self, name))


@dataclass
class Usage:
    """What generating cost: one generation (`GenerationChunk.usage`, so far), one turn, or a chat
    turn's rounds added up (`a + b`). Tokens are counted as OpenAI's API counts them: the whole
    prompt of each generation, the part reused from the KV cache included."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache (not decoded again)
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # completion chunks whose text went to the analysis channel
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def prompt_tps(self) -> float:
        """Prefill speed, over the prompt tokens actually decoded."""
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        return self.completion_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))
