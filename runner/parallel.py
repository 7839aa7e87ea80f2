"""Parallel streams (`serve --parallel N`): N sequences of one llama.cpp context decoded in one batch.

What llama.cpp's server does with its slots (tools/server/server-context.cpp), kept small: one
scheduler thread owns the context. Each request becomes a `Stream`, an iterator of `GenerationChunk`s
as `Engine.generate` yields them, fed through a queue. The scheduler gives it a free slot (a sequence
id), reads its prompt in decode calls of its own, one `n_ubatch` chunk per round so that the other
streams keep decoding, and from then on decodes one token of every generating stream per
`llama_decode` (continuous batching: a stream joins at the next step and leaves when it ends). Each
stream has its own sampler, UTF-8 decoder and limits. Cancelling one (its client left) takes it out
before the next step; a prompt still being read is aborted and its sequence removed
(`llama_memory_seq_rm`); the other streams never notice.

The context has `n_seq_max = N`, `n_ctx = N x ctx` and kv_unified off (runner/engine.py), so each
sequence has its own KV stream of `ctx` tokens, as runner/plan.py sizes it. Each slot reuses its own
sequence's prefix with its own `SeqCache` (window checkpoints); the RAM `PromptCache` is shared by the
slots. Only the scheduler thread calls llama.cpp on the context and touches the slots' caches.
LoRA adapters are set per context: only requests with the adapter set in use join the batch; a
request with another set waits, first in line, until the batch is empty, and the set is switched then.
"""

from __future__ import annotations

import codecs
import copy
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ossgguf.errors import OssggufError

from .engine import Engine, GenerationChunk
from .generation import Sampling, Usage
from .llama_ctypes import LLAMA_LOG, llama_cpp_module
from .prompt_cache import Checkpoints, SeqCache, common_prefix

log = logging.getLogger(__name__)

# llama.cpp's --slot-prompt-similarity: a free slot holding at least this share of a prompt takes it;
# else the least recently used slot does (its sequence goes to the RAM cache if the prompt diverges)
SLOT_SIMILARITY = 0.1


class Stream:
    """One request's generation: iterate for its `GenerationChunk`s (the last one has a finish_reason);
    `cancel()` from any thread; `close()` (the reader stops early, as `run_turn` does) cancels too."""

    def __init__(self, scheduler: Scheduler, tokens: list[int], sampling: Sampling, adapters: tuple | None) -> None:
        self._scheduler = scheduler
        self.tokens, self.sampling, self.adapters = tokens, sampling, adapters
        self.cancelled = threading.Event()
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._done = False
        # the scheduler thread's: what is left of the prompt to read, the token to decode next, ...
        self.usage = Usage(prompt_tokens=len(tokens))
        self.todo: list[int] = []
        self.cut = 0  # where the prompt's last message starts: the window is checkpointed there (0: nowhere)
        self.next_token: int | None = None
        self.limit = 0
        self.sampler = None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.t0 = self.t1 = 0.0

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> GenerationChunk:
        if self._done:
            raise StopIteration
        item = self._chunks.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finish_reason is not None
        return item

    def cancel(self) -> None:
        self._scheduler.cancel(self)

    def close(self) -> None:
        if not self._done:
            self.cancel()

    def put(self, item: GenerationChunk | BaseException) -> None:
        self._chunks.put(item)


@dataclass
class _Slot:
    seq: SeqCache  # its sequence id is seq.seq
    held: list[int] = field(default_factory=list)  # the tokens the sequence holds, in order
    stream: Stream | None = None
    used: int = 0  # the round it last took a stream (0: never)


class Scheduler:
    """Decodes the streams of an engine loaded with `parallel=N` (PlacementOptions) on its own thread.
    `generate(...)` has `Engine.generate`'s arguments and returns a `Stream`; `close()` (also run by
    `Engine.close`) ends every stream. While a scheduler drives it, the engine's own `generate` refuses."""

    def __init__(self, engine: Engine) -> None:
        if engine.scheduler is not None:
            raise OssggufError("the engine already has a parallel scheduler")
        self.engine = engine
        engine.reset()
        engine._cancel = False  # its abort flag is the scheduler's from now on: set only while a prompt is read
        base = engine._seq
        self.slots = [_Slot(SeqCache(engine._ctx, i, base.key, base.n_swa, base.ram, Checkpoints(base.checkpoints.limit)))
                      for i in range(engine.plan.parallel)]
        self._adapters = self._adapter_set(None)  # as loaded
        self._cond = threading.Condition()
        self._pending: deque[Stream] = deque()
        self._prefilling: Stream | None = None
        self._closed = False
        self._round = 0
        self.steps = self.step_tokens = 0  # batched decoding steps and the tokens they decoded
        self.cancelled = 0  # streams ended by cancel() before their end
        engine.scheduler = self
        self._thread = threading.Thread(target=self._run, name="ossgguf-parallel", daemon=True)
        self._thread.start()

    # --- any thread -----------------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], sampling: Sampling | None = None, adapters: tuple | None = None,
                 **changes) -> Stream:
        """Queue a generation (`adapters`: LoRA scales, one per loaded adapter; None: as loaded)."""
        sampling = replace(sampling or Sampling(), **changes)
        e = self.engine
        tokens = e.prompt_tokens(prompt)
        st = Stream(self, tokens, sampling, self._adapter_set(adapters))
        with self._cond:
            if self._closed:
                raise OssggufError("the parallel scheduler is closed")
            self._pending.append(st)
            self._cond.notify()
        return st

    def cancel(self, st: Stream) -> None:
        with self._cond:
            st.cancelled.set()
            if self._prefilling is st:
                self.engine._cancel = True  # the engine's abort callback stops its prompt's decode
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self.engine.scheduler = None

    def _adapter_set(self, scales: Sequence[float | None] | None) -> tuple | None:
        """The scales a request sets (None: the adapters as loaded), comparable between requests."""
        a = self.engine.adapters
        if a is None:
            return None
        return tuple(s.scale for s in a.specs) if scales is None else tuple(scales)

    # --- the scheduler thread -------------------------------------------------------------------------

    def _run(self) -> None:
        lc = llama_cpp_module()
        batch = lc.llama_batch_init(max(self.engine.plan.n_ubatch, len(self.slots)), 0, 1)
        error: BaseException | None = None
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._pending and not any(s.stream for s in self.slots):
                        self._cond.wait()
                    if self._closed:
                        break
                    joining = self._admit()
                for slot in joining:
                    self._join(slot)
                self._drop_cancelled()
                self._prefill(batch)
                self._step(batch)
        except BaseException as exc:  # every stream gets it; the server answers them as errors
            log.exception("the parallel scheduler failed")
            error = exc
        finally:
            lc.llama_batch_free(batch)
            with self._cond:
                self._closed = True
                left = list(self._pending)
                self._pending.clear()
            for st in left:
                st.put(error or GenerationChunk("", None, "cancelled", copy.copy(st.usage)))
            for slot in self.slots:
                if slot.stream is not None:
                    if error is not None:
                        slot.stream.put(error)
                        self._release(slot)
                    else:
                        self._finish(slot, "cancelled")

    def _admit(self) -> list[_Slot]:
        """Give queued streams free slots, in order, while their adapter set is the one in use (or the
        batch is empty, and the set is switched). The slot whose sequence shares most of the prompt takes
        it, if that is a fair share (SLOT_SIMILARITY); else the least recently used one."""
        for st in [st for st in self._pending if st.cancelled.is_set()]:  # their readers need not wait for a slot
            self._pending.remove(st)
            self.cancelled += 1
            st.put(GenerationChunk("", None, "cancelled", copy.copy(st.usage)))
        out: list[_Slot] = []
        free = [s for s in self.slots if s.stream is None]
        busy = len(self.slots) - len(free)
        while self._pending and free:
            st = self._pending[0]
            if st.adapters != self._adapters:
                if busy or out:
                    break  # first in line: nobody overtakes it while the batch drains
                self._switch_adapters(st.adapters)
            self._pending.popleft()
            slot = max(free, key=lambda s: (common_prefix(s.held, st.tokens), -s.used))
            if common_prefix(slot.held, st.tokens) <= SLOT_SIMILARITY * len(st.tokens):
                slot = min(free, key=lambda s: s.used)
            free.remove(slot)
            slot.stream = st
            out.append(slot)
        return out

    def _switch_adapters(self, scales: tuple | None) -> None:
        e = self.engine
        before = e._seq.key
        e.set_adapter_scales(scales)  # a changed set clears the context (its KV was computed with the old one)
        if e._seq.key != before:
            for s in self.slots:
                s.held = []
                s.seq.forget()
                s.seq.key = e._seq.key
        self._adapters = scales

    def _join(self, slot: _Slot) -> None:
        st = slot.stream
        self._round += 1
        slot.used = self._round
        st.t0 = time.perf_counter()
        try:
            slot.held = slot.seq.reuse(slot.held, st.tokens)
        except Exception as exc:
            slot.held = slot.seq.clear()
            st.put(exc)
            slot.stream = None
            return
        st.usage.cached_tokens = len(slot.held)
        st.todo = st.tokens[len(slot.held):]
        st.cut = self.engine.message_cut(st.tokens, len(slot.held), slot.seq)  # a checkpoint there, as Engine.generate
        st.sampler = self.engine._sampler(st.sampling)

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.stream is not None and slot.stream.cancelled.is_set():
                if slot.stream.todo:  # a prompt half read: nothing to continue from
                    slot.held = slot.seq.clear()
                self.cancelled += 1
                self._finish(slot, "cancelled")

    def _decode(self, batch, items: list[tuple[int, int, int, bool]]) -> int:
        """llama_decode of (token, position, sequence, wants logits) items."""
        for i, (tok, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        return llama_cpp_module().llama_decode(self.engine._ctx, batch)

    def _prefill(self, batch) -> None:
        """Read the next chunk of the prompt of the stream that joined first, alone in its decode call."""
        reading = [s for s in self.slots if s.stream is not None and s.stream.todo]
        if not reading:
            return
        slot = min(reading, key=lambda s: s.used)
        st = slot.stream
        n = self.engine.plan.n_ubatch
        if len(slot.held) < st.cut < len(slot.held) + n:  # end this chunk where the last message starts
            n = st.cut - len(slot.held)
        chunk = st.todo[:n]
        last = len(chunk) == len(st.todo)
        with self._cond:
            if st.cancelled.is_set():
                return  # dropped next round
            self._prefilling = st
        try:
            rc = self._decode(batch, [(t, len(slot.held) + i, slot.seq.seq, last and i == len(chunk) - 1)
                                      for i, t in enumerate(chunk)])
        finally:
            with self._cond:
                self._prefilling = None
                self.engine._cancel = False
        if rc != 0:  # 2: aborted by its cancel; llama.cpp may keep part of the chunk
            slot.held = slot.seq.clear()
            if rc == 2:
                self.cancelled += 1
                self._finish(slot, "cancelled")
            else:
                st.put(OssggufError(f"llama_decode failed ({rc}): {LLAMA_LOG.last_errors()}"))
                self._release(slot)
            return
        slot.held.extend(chunk)
        st.todo = st.todo[len(chunk):]
        if len(slot.held) == st.cut:
            slot.seq.checkpoint(slot.held)
        if not last:
            return
        slot.seq.prompt_read(slot.held, len(st.tokens))
        st.t1 = time.perf_counter()
        st.usage.prompt_seconds = st.t1 - st.t0
        st.limit = self.engine.n_ctx - len(slot.held)
        if st.sampling.max_tokens is not None:
            st.limit = min(st.limit, st.sampling.max_tokens)
        self._sample(slot, -1)

    def _step(self, batch) -> None:
        """Decode the last sampled token of every generating stream in one call, then sample each."""
        gen = [s for s in self.slots if s.stream is not None and s.stream.next_token is not None]
        if not gen:
            return
        rc = self._decode(batch, [(s.stream.next_token, len(s.held), s.seq.seq, True) for s in gen])
        if rc != 0:
            err = OssggufError(f"llama_decode failed ({rc}): {LLAMA_LOG.last_errors()}")
            for s in gen:
                s.held = s.seq.clear()
                s.stream.put(err)
                self._release(s)
            return
        self.steps += 1
        self.step_tokens += len(gen)
        for i, s in enumerate(gen):
            s.held.append(s.stream.next_token)
            s.stream.next_token = None
            self._sample(s, i)

    def _sample(self, slot: _Slot, idx: int) -> None:
        """The stream's next token from output `idx` of the last decode, as `Engine.generate` picks it."""
        e, st = self.engine, slot.stream
        u = st.usage
        if u.completion_tokens >= st.limit:
            self._finish(slot, "length")
            return
        tok = llama_cpp_module().llama_sampler_sample(st.sampler, e._ctx, idx)
        u.completion_tokens += 1
        if e.is_stop(tok):
            u.generation_seconds = time.perf_counter() - st.t1
            self._finish(slot, "stop", tok)
            return
        text = st.decoder.decode(e.token_bytes(tok))
        u.generation_seconds = time.perf_counter() - st.t1
        st.put(GenerationChunk(text, tok, None, copy.copy(u)))
        if u.completion_tokens < st.limit:
            st.next_token = tok
        else:
            self._finish(slot, "length")

    def _finish(self, slot: _Slot, reason: str, tok: int | None = None) -> None:
        st = slot.stream
        st.put(GenerationChunk(st.decoder.decode(b"", final=True), tok, reason, copy.copy(st.usage)))
        self._release(slot)

    def _release(self, slot: _Slot) -> None:
        st, slot.stream = slot.stream, None
        if st is not None and st.sampler is not None:
            llama_cpp_module().llama_sampler_free(st.sampler)
            st.sampler = None
