"""The prompt cache: checkpoints of the sliding-window state, and whole sequences saved in RAM.

gpt-oss alternates full-attention layers with 128-token sliding-window layers. With `swa_full = False`
the window layers keep only the last window (plus a batch), so a prompt that diverges from what the
context holds anywhere before its end cannot reuse the context, unless the window state at that point
was saved. Harmony makes this the common case: each turn drops the previous turn's analysis, so the new
prompt diverges exactly where the previous prompt ended (`<|start|>assistant`). This module does what
llama.cpp's server does with `--ctx-checkpoints` and `--cache-ram` (tools/server/server-context.cpp):

- a `Checkpoint` is the window layers' state (`LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`) taken after a
  prompt is read; restoring it and cutting the full-attention cells back to the same length gives the
  context as it was at that point;
- a `PromptCache` holds whole sequences (all cells, with their checkpoints) in RAM, least recently used
  first out under a byte budget; a request that does not continue the last one saves the context there
  and takes back the entry that shares the longest prefix with the new prompt.

Entries are keyed by the model file, the context size and the LoRA adapter set (`CacheKey`): llama.cpp
would load a state of another model whose shapes agree, so a key that differs is refused, never used.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ossgguf.errors import OssggufError

from .llama_ctypes import llama_cpp_module

log = logging.getLogger(__name__)

N_CHECKPOINTS = 8  # per sequence, as llama.cpp's server (--ctx-checkpoints); a tool loop of 8 rounds still resumes
CACHE_RAM_MAX = 8 * 1024**3  # llama.cpp's --cache-ram default (8192 MiB): the most the default gives
# a re-rendered turn diverges from what the model wrote this soon after the prompt's end
# (`<|start|>assistant` + `<|channel|>`, then "final" where the model wrote "analysis")
HARMONY_CUT = 8
FLAGS_ALL, FLAGS_SWA_ONLY = 0, 1  # llama.h: LLAMA_STATE_SEQ_FLAGS_NONE, _PARTIAL_ONLY (= _SWA_ONLY)


# --- llama.cpp's sequence state ---------------------------------------------------------------------------


def save_state(ctx: int, seq: int, swa_only: bool) -> bytearray:
    """The state of sequence `seq` (its cells' positions and K/V), all layers or only the window ones."""
    lc = llama_cpp_module()
    flags = FLAGS_SWA_ONLY if swa_only else FLAGS_ALL
    size = lc.llama_state_seq_get_size_ext(ctx, seq, flags)
    data = bytearray(size)
    if size and lc.llama_state_seq_get_data_ext(ctx, (ctypes.c_uint8 * size).from_buffer(data), size, seq, flags) != size:
        raise OssggufError(f"llama.cpp could not save the state of sequence {seq} ({size} bytes)")
    return data


def load_state(ctx: int, seq: int, data: bytearray, swa_only: bool) -> bool:
    """Replace sequence `seq`'s cells (all layers, or only the window ones) with a saved state;
    False when llama.cpp refuses it (it then leaves the sequence empty in the layers it read)."""
    lc = llama_cpp_module()
    flags = FLAGS_SWA_ONLY if swa_only else FLAGS_ALL
    n = len(data)
    return n > 0 and lc.llama_state_seq_set_data_ext(ctx, (ctypes.c_uint8 * n).from_buffer(data), n, seq, flags) == n


# --- keys ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheKey:
    """What a saved state is only valid for: the model's files (path, size, modification time), the
    context size and the LoRA adapters applied (path and scale each; empty: none)."""

    model: tuple[tuple[str, int, int], ...]
    n_ctx: int
    adapters: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, files: Sequence[str | Path], n_ctx: int, adapters: Sequence[tuple[str, float]] = ()) -> CacheKey:
        ident = []
        for f in files:
            st = os.stat(f)
            ident.append((str(Path(f).resolve()), st.st_size, st.st_mtime_ns))
        return cls(tuple(ident), n_ctx, tuple((str(p), float(s)) for p, s in adapters))


# --- checkpoints of the sliding-window state -----------------------------------------------------------


@dataclass
class Checkpoint:
    """The window layers' state when the context held `n_tokens` tokens (cells `pos_min`..n_tokens-1)."""

    n_tokens: int
    pos_min: int
    data: bytearray = field(repr=False)

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass
class Checkpoints:
    """A sequence's checkpoints, oldest first; at most `limit`, one per length."""

    limit: int = N_CHECKPOINTS
    items: list[Checkpoint] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.items)

    def add(self, cp: Checkpoint) -> None:
        if self.limit <= 0:
            return
        self.items = [c for c in self.items if c.n_tokens != cp.n_tokens] + [cp]
        del self.items[:-self.limit]

    def truncate(self, n: int) -> None:
        """The context now holds only its first `n` tokens: checkpoints taken later no longer describe it."""
        self.items = [c for c in self.items if c.n_tokens <= n]

    def clear(self) -> None:
        self.items = []

    def best(self, n: int, n_swa: int) -> Checkpoint | None:
        """The latest checkpoint at or before `n` whose window covers the next token's attention."""
        for c in reversed(self.items):
            if c.n_tokens <= n and c.pos_min <= max(0, c.n_tokens - n_swa):
                return c
        return None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reusable(tokens: Sequence[int], pos_min: int, checkpoints: Checkpoints, n: int, n_swa: int) -> tuple[int, Checkpoint | None]:
    """How many of `tokens` (a context whose window layers hold positions pos_min..len-1) a prompt
    sharing their first `n` can keep: all `n` when nothing is cut or the window before `n` is still
    held, else up to the best checkpoint (returned: it must be restored), else none."""
    if n >= len(tokens) or n == 0 or (0 <= pos_min <= max(0, n - n_swa)):
        return n, None
    cp = checkpoints.best(n, n_swa)
    return (cp.n_tokens, cp) if cp is not None else (0, None)


# --- saved sequences in RAM -------------------------------------------------------------------------------


@dataclass
class Entry:
    """A saved sequence: its tokens, the state of all its cells, its checkpoints and the length of the
    last prompt read into it (what a request that continues the conversation extends)."""

    key: CacheKey
    tokens: list[int]
    pos_min: int  # the window layers' oldest position when saved
    data: bytearray = field(repr=False)
    checkpoints: Checkpoints
    prompt_len: int = 0
    prompt_ends: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return len(self.data) + self.checkpoints.nbytes


def return_freed_states_to_the_os() -> None:
    """glibc raises its mmap threshold after large blocks are freed (up to 32 MiB), so MB-sized saved
    states then come from the heap, and the heap keeps what evicted ones leave: RSS crept up by ~60 MiB
    over 200 requests with a full cache (docs/benchmarks.md). A fixed threshold keeps such blocks mapped
    and returned on free; measured flat. No-op outside glibc or when the user set MALLOC_MMAP_THRESHOLD_."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


@dataclass
class PromptCache:
    """Saved sequences in RAM under a byte budget, least recently used first out (`budget` 0: off).

    One cache may serve several sequences (`serve --parallel N`: one SeqCache per slot); an entry is only
    ever given to a sequence with the same `CacheKey`. Not thread-safe, like the context whose states it
    holds: one thread at a time uses both (the engine's caller, or with --parallel the scheduler's
    thread alone: runner/parallel.py, and `Engine.generate` refuses while a scheduler drives the context).
    """

    budget: int
    entries: list[Entry] = field(default_factory=list)  # least recently used first
    saved: int = 0
    restored: int = 0
    evicted: int = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def holds(self, key: CacheKey, tokens: Sequence[int]) -> bool:
        """Whether an entry already holds `tokens` (or a longer sequence that starts with them)."""
        return any(e.key == key and common_prefix(e.tokens, tokens) == len(tokens) for e in self.entries)

    def put(self, entry: Entry) -> bool:
        """Keep `entry`, dropping what it makes redundant, then the least recently used entries until it
        fits; False (nothing changed) when it alone exceeds the budget."""
        if self.budget <= 0 or entry.nbytes > self.budget:
            if self.budget > 0:
                log.info("prompt cache: a %d-token state of %.1f MiB exceeds the budget of %.1f MiB; not kept",
                         len(entry.tokens), entry.nbytes / 2**20, self.budget / 2**20)
            return False
        self.entries = [e for e in self.entries
                        if not (e.key == entry.key and common_prefix(e.tokens, entry.tokens) == len(e.tokens))]
        while self.entries and self.nbytes + entry.nbytes > self.budget:
            self.entries.pop(0)
            self.evicted += 1
        self.entries.append(entry)
        self.saved += 1
        return True

    def take(self, key: CacheKey, prompt: Sequence[int], n_swa: int, better_than: int) -> tuple[Entry, int] | None:
        """Remove and return the entry of `key` from which `prompt` can keep the most tokens, with that
        number, if it beats `better_than` (what the context itself keeps)."""
        best, best_n = None, better_than
        for e in self.entries:
            if e.key != key:
                continue
            n, _ = reusable(e.tokens, e.pos_min, e.checkpoints, common_prefix(e.tokens, prompt[:-1]), n_swa)
            if n > best_n:
                best, best_n = e, n
        if best is None:
            return None
        self.entries.remove(best)
        self.restored += 1
        return best, best_n

    def clear(self) -> None:
        self.entries = []


def default_cache_ram(ram_free: int) -> int:
    """The RAM cache's default budget: half of the RAM the plan leaves free, at most llama.cpp's 8 GiB."""
    return max(0, min(CACHE_RAM_MAX, ram_free // 2))


# --- one sequence of a context ------------------------------------------------------------------------------


@dataclass
class SeqCache:
    """How one sequence of a llama.cpp context reuses what it held: its window checkpoints, the length
    of the last prompt read, and the RAM cache it saves to and restores from (None: no RAM cache)."""

    ctx: int
    seq: int
    key: CacheKey
    n_swa: int
    ram: PromptCache | None = None
    checkpoints: Checkpoints = field(default_factory=Checkpoints)
    prompt_len: int = 0  # the last prompt's tokens: a request sharing fewer starts another conversation...
    prompt_ends: list[int] = field(default_factory=list)  # ...unless it diverges at an earlier prompt's end (harmony)
    restored_from_ram: int = 0  # tokens the last `reuse` took from the RAM cache (0: none)

    def _pos(self) -> tuple[int, int]:
        lc = llama_cpp_module()
        mem = lc.llama_get_memory(self.ctx)
        return lc.llama_memory_seq_pos_min(mem, self.seq), lc.llama_memory_seq_pos_max(mem, self.seq)

    def forget(self) -> None:
        """The sequence was emptied (reset, cancel): nothing of it can be restored."""
        self.checkpoints.clear()
        self.prompt_len = 0
        self.prompt_ends = []

    def clear(self) -> list[int]:
        lc = llama_cpp_module()
        lc.llama_memory_seq_rm(lc.llama_get_memory(self.ctx), self.seq, -1, -1)
        self.forget()
        return []

    def restore(self, entry: Entry) -> list[int]:
        """Put a saved sequence back into the context; its tokens (empty when llama.cpp refused it)."""
        if entry.key != self.key:
            raise OssggufError("the saved prompt state is from another model, context size or adapter set "
                               f"({entry.key.model[0][0]}, ctx {entry.key.n_ctx}): refused")
        if not load_state(self.ctx, self.seq, entry.data, swa_only=False):
            log.warning("llama.cpp refused a saved %d-token prompt state; reading the prompt again", len(entry.tokens))
            return self.clear()
        self.checkpoints = Checkpoints(self.checkpoints.limit, list(entry.checkpoints.items))
        self.prompt_len = entry.prompt_len
        self.prompt_ends = list(entry.prompt_ends)
        return list(entry.tokens)

    def save(self, held: list[int]) -> bool:
        """Copy the sequence (all cells and its checkpoints) into the RAM cache; False when not kept."""
        ram = self.ram
        if ram is None or not held or ram.budget <= 0 or ram.holds(self.key, held):
            return False
        lc = llama_cpp_module()
        if lc.llama_state_seq_get_size_ext(self.ctx, self.seq, FLAGS_ALL) + self.checkpoints.nbytes > ram.budget:
            return False
        data = save_state(self.ctx, self.seq, swa_only=False)
        return ram.put(Entry(self.key, list(held), self._pos()[0], data,
                             Checkpoints(self.checkpoints.limit, list(self.checkpoints.items)), self.prompt_len,
                             list(self.prompt_ends)))

    def reuse(self, held: list[int], prompt: Sequence[int]) -> list[int]:
        """Make the sequence hold the longest start of `prompt` it can (at least one prompt token is left
        to read); returns the tokens it then holds. A prompt that does not continue the conversation (it
        diverges before the last prompt's end, and not just after an earlier prompt's end: there harmony
        drops reasoning, a tool loop's included) saves the sequence to the RAM cache first, and takes the
        best entry from it if that keeps more."""
        self.restored_from_ram = 0
        n = common_prefix(held, prompt[:-1])
        if self.ram is not None:
            if held and n < self.prompt_len and not any(0 <= n - e <= HARMONY_CUT for e in self.prompt_ends):
                self.save(held)
            here, _ = reusable(held, self._pos()[0], self.checkpoints, n, self.n_swa)
            got = self.ram.take(self.key, prompt, self.n_swa, better_than=here)
            if got is not None:
                held = self.restore(got[0])
                n = common_prefix(held, prompt[:-1])
                self.restored_from_ram = got[1] if held else 0
        if n == len(held):
            return held
        keep, cp = reusable(held, self._pos()[0], self.checkpoints, n, self.n_swa)
        if cp is not None and not load_state(self.ctx, self.seq, cp.data, swa_only=True):
            keep = 0
        lc = llama_cpp_module()
        if keep == 0 or not lc.llama_memory_seq_rm(lc.llama_get_memory(self.ctx), self.seq, keep, -1):
            return self.clear()
        lo, hi = self._pos()
        # the window layers must hold the window before the first new position, and nothing after it
        if hi != keep - 1 or lo > max(0, keep - self.n_swa):
            log.warning("the context does not hold what it should after reuse (%d..%d for %d tokens); reading again",
                        lo, hi, keep)
            return self.clear()
        self.checkpoints.truncate(keep)
        self.prompt_ends = [e for e in self.prompt_ends if e <= keep]
        return held[:keep]

    def checkpoint(self, held: list[int]) -> None:
        """Keep the window layers' state as it is now, after `held` (see prompt_read)."""
        if self.n_swa > 0 and self.checkpoints.limit > 0 and held:
            self.checkpoints.add(Checkpoint(len(held), self._pos()[0], save_state(self.ctx, self.seq, swa_only=True)))

    def prompt_read(self, held: list[int], prompt_len: int) -> None:
        """The prompt is read (the sequence holds `held`): checkpoint the window there, where harmony's
        next prompt diverges when it drops this turn's analysis."""
        self.prompt_len = prompt_len
        self.prompt_ends = [e for e in self.prompt_ends if e != prompt_len][-15:] + [prompt_len]
        self.checkpoint(held)


# --- memory (what `plan` reports beside the buffers) ------------------------------------------------------


def plan_checkpoint_bytes(plan, n_checkpoints: int = N_CHECKPOINTS, n_seq: int | None = None) -> int:
    """RAM the window checkpoints of a plan's context may take: `n_checkpoints` per sequence (default:
    the plan's parallel streams), each at most every window cell (window + batch, as llama.cpp sizes that cache)."""
    from .plan import kv_cells

    n_seq = plan.parallel if n_seq is None else n_seq
    m = plan.model
    _, swa = kv_cells(m, plan.n_ctx, plan.n_ubatch)
    per_cell = m.n_head_kv * (m.head_dim_k + m.head_dim_v) * 2
    return n_checkpoints * n_seq * swa * per_cell * sum(1 for s in m.swa_layers if s)


def plan_ram_free(plan, n_checkpoints: int = N_CHECKPOINTS) -> int:
    """System RAM the plan leaves within its budget once the checkpoints are counted."""
    d = plan.devices
    used = plan.ram_bytes + plan_checkpoint_bytes(plan, n_checkpoints)
    return max(0, d.ram_budget - used)


def cache_budget(plan, cache_ram: int | None, n_checkpoints: int = N_CHECKPOINTS) -> int:
    """--cache-ram as given, or (None) the default from what the plan leaves free."""
    return default_cache_ram(plan_ram_free(plan, n_checkpoints)) if cache_ram is None else cache_ram


def cache_note(plan, cache_ram: int | None, n_checkpoints: int = N_CHECKPOINTS) -> str:
    """The plan's line on the prompt cache's RAM (not in the buffers: llama.cpp does not allocate it)."""
    budget = cache_budget(plan, cache_ram, n_checkpoints)
    ckpt = plan_checkpoint_bytes(plan, n_checkpoints)
    ram = f"up to {budget / 1e9:.1f} GB of saved prompts (--cache-ram)" if budget else "no saved prompts (--cache-ram 0)"
    per = f" per stream ({plan.parallel} streams)" if plan.parallel > 1 else ""
    return f"prompt cache in RAM: up to {n_checkpoints} window checkpoints{per} ({ckpt / 1e6:.0f} MB) and {ram}"
