"""Run a gpt-oss GGUF with llama-cpp-python, placed by the planner, as a streaming generator.

In the mlx-lm style: `Engine.load(path, options)`, `engine.tokenize(text)`,
`engine.generate(tokens or text, sampling)` yields `GenerationChunk`s. The KV cache is kept between calls
and the longest common prefix is reused, back to a window checkpoint where the sliding-window
layers no longer hold it, or from saved prompts in RAM (runner/prompt_cache.py).
Built on llama-cpp-python's low-level API, because its `Llama` class cannot pass tensor buffer
overrides, `n_outputs_max` or sampling defaults that suit gpt-oss.
"""

from __future__ import annotations

import codecs
import copy
import ctypes
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ossgguf.errors import OssggufError
from ossgguf.harmony.tokens import START

from .devices import tensor_split
from .generation import Sampling, Usage
from .llama_ctypes import LLAMA_LOG, BufferOverrides, llama_cpp_module, model_params
from .plan import PlacementOptions, Plan, plan, read_model
from .prompt_cache import (
    N_CHECKPOINTS,
    CacheKey,
    Checkpoints,
    PromptCache,
    SeqCache,
    cache_budget,
    return_freed_states_to_the_os,
)

log = logging.getLogger(__name__)

GGML_TYPE_F16 = 1
FLASH_ATTN_ENABLED, FLASH_ATTN_DISABLED = 1, 0
# llama_token_attr bits (llama.h) of tokens that are not text: harmony's <|start|>, <|end|>, ...
TOKEN_ATTR_CONTROL, TOKEN_ATTR_USER_DEFINED = 1 << 3, 1 << 4


def token_bytes(model: int, token: int, special: bool = True) -> bytes:
    """A token's bytes (special tokens as their text with `special`), from a llama_model pointer.

    The buffer grows to the piece's size: llama-cpp-python's `Llama.detokenize` has a fixed
    32-byte one and garbles longer tokens (40 spaces + "x" comes back as " x").
    """
    lc = llama_cpp_module()
    vocab = lc.llama_model_get_vocab(model)
    buf = ctypes.create_string_buffer(64)
    n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


def detokenize(model: int, tokens: Iterable[int], special: bool = True) -> str:
    """The text of `tokens` (see `token_bytes`); works on `Engine._model` and on `Llama.model` alike."""
    return b"".join(token_bytes(model, t, special) for t in tokens).decode("utf-8", errors="replace")


def _text_cuts(text: str, specials: Iterable[str]) -> list[int]:
    """Where to cut `text` so that no piece holds a whole special-token string: right after the `<|`
    of each occurrence. The o200k split regex always ends a piece there (a run of punctuation never
    takes the letter that follows), so tokenizing the pieces one by one gives the ids that
    tokenizing the whole text as plain text gives (tiktoken's encode_ordinary, openai-harmony)."""
    cuts = set()
    for s in specials:
        start = text.find(s)
        if start >= 0 and not (len(s) > 2 and s[:2] == "<|" and s[2].isascii() and s[2].isalpha()):
            raise OssggufError(f"cannot keep the special token {s!r} out of plain text: it is not <|name|>")
        while start >= 0:
            cuts.add(start + 2)
            start = text.find(s, start + 1)
    return sorted(cuts)


@dataclass(frozen=True)
class GenerationChunk:
    """One step of `Engine.generate`: the text of one token (may be "" inside a UTF-8 sequence)."""

    text: str
    token: int | None
    finish_reason: str | None  # None while generating; "stop", "length" or "cancelled" at the end
    usage: Usage  # the generation's so far


def _default_threads() -> int:
    """Physical cores where psutil can tell (hyper-threads slow memory-bound decoding), else all."""
    import psutil  # a dependency (pyproject.toml)

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


@dataclass
class Engine:
    """A loaded model and context. Create with `Engine.load`; close (or use `with`) to free memory."""

    path: Path
    plan: Plan
    options: PlacementOptions
    _model: int = field(repr=False)
    _ctx: int = field(repr=False)
    _overrides: BufferOverrides = field(repr=False)  # llama.cpp keeps pointers into it
    load_seconds: float = 0.0
    _tokens: list[int] = field(default_factory=list, repr=False)  # what the KV cache holds, in order
    _cancel: bool = field(default=False, repr=False)
    _abort_cb: object = field(default=None, repr=False)  # the C callback object must stay referenced
    _eval_cb: object = field(default=None, repr=False)  # likewise
    _specials: dict[int, str] | None = field(default=None, repr=False)  # see special_tokens()
    _start_id: int | None = field(default=None, repr=False)  # harmony's <|start|> (see message_cut)
    _control_ids: dict[str, int] = field(default_factory=dict, repr=False)
    _seq: SeqCache | None = field(default=None, repr=False)  # checkpoints, RAM cache (runner/prompt_cache.py)
    adapters: object = field(default=None, repr=False)  # runner.lora.Adapters of options.lora, freed with the model
    scheduler: object = field(default=None, repr=False)  # runner.parallel.Scheduler driving the context (--parallel)

    # --- loading -------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, options: PlacementOptions | None = None, *,
             eval_callback: Callable[[int, bool, int], bool] | None = None, prompt_cache: PromptCache | None = None,
             checkpoints: int = N_CHECKPOINTS, **changes) -> Engine:
        """Plan the placement (or follow cpu_moe/n_cpu_moe), then load the GGUF and create a context.

        `changes` are PlacementOptions fields, e.g. `Engine.load(p, n_cpu_moe=20, ctx=8192)`.
        `eval_callback(tensor_address, ask, user_data)` is llama.cpp's `cb_eval`: it sees the graph's
        intermediate tensors as they are computed (calibration reads the MoE routing this way).
        `checkpoints` window checkpoints are kept (0: none); `options.cache_ram` bytes of saved prompts in
        RAM (None: `default_cache_ram` of what the plan leaves free; 0: off), or a shared `prompt_cache`.
        """
        opts = replace(options or PlacementOptions(), **changes)
        t0 = time.perf_counter()
        info = read_model(path)  # also: not gpt-oss, missing shard
        p = plan(info, opts)
        if not p.fits:
            log.warning("the plan does not fit (%s); loading anyway", "; ".join(p.notes) or p.reason)
        log.info("placement: %s, n_cpu_moe=%d, ctx %d, batch %d", p.placement, p.n_cpu_moe, p.n_ctx, p.n_ubatch)
        lc = llama_cpp_module()
        LLAMA_LOG.install()
        LLAMA_LOG.verbose = opts.verbose
        lc.llama_backend_init()
        overrides = BufferOverrides([o.pattern for o in p.overrides])  # each to the CPU buffer type
        mp = model_params()  # OSSGGUF_NO_REPACK=1: repacking off
        mp.n_gpu_layers = p.gpu_layers if p.placement != "none" else info.n_layer + 1
        split = tensor_split(p.split, p.devices)  # several GPUs: the plan's layers on each
        if split is not None:
            mp.tensor_split = ctypes.cast(split, type(mp.tensor_split))
        mp.load_mode = lc.LLAMA_LOAD_MODE_MMAP
        if overrides.address:
            mp.tensor_buft_overrides = overrides.address
        model = lc.llama_model_load_from_file(str(info.path).encode(), mp)
        if not model:
            raise OssggufError(f"llama.cpp could not load {info.path}: {LLAMA_LOG.last_errors()}")
        cp = lc.llama_context_default_params()
        # --parallel N: N sequences of n_ctx tokens each; llama.cpp divides n_ctx by n_seq_max (kv_unified
        # off: each sequence its own KV stream), so the context is N x n_ctx (runner/parallel.py)
        cp.n_seq_max = p.parallel
        cp.kv_unified = False
        cp.n_ctx = p.n_ctx * p.parallel
        cp.n_ubatch = p.n_ubatch
        cp.n_batch = max(p.n_ubatch, p.parallel)  # a decoding step holds one token per stream
        cp.n_outputs_max = p.parallel  # only the last token's logits (per stream): no n_vocab x batch buffer
        threads = opts.threads or _default_threads()
        cp.n_threads = cp.n_threads_batch = threads
        cp.flash_attn_type = FLASH_ATTN_ENABLED if p.flash_attn else FLASH_ATTN_DISABLED
        cp.type_k = cp.type_v = GGML_TYPE_F16  # a quantized cache slows expert-offloaded decoding
        cp.swa_full = False  # sliding-window layers keep only the window (and a batch)
        cp.op_offload = p.op_offload
        cp.no_perf = False
        eval_cb = lc.ggml_backend_sched_eval_callback(eval_callback) if eval_callback else None
        if eval_cb is not None:
            cp.cb_eval, cp.cb_eval_user_data = eval_cb, None
        ctx = lc.llama_init_from_model(model, cp)
        if not ctx:
            lc.llama_model_free(model)
            raise OssggufError(f"llama.cpp could not create a {p.n_ctx}-token context: "
                               f"{LLAMA_LOG.last_errors()}; try a smaller --ctx")
        eng = cls(path=info.path, plan=p, options=opts, _model=model, _ctx=ctx, _overrides=overrides,
                  _eval_cb=eval_cb)
        if opts.lora:  # llama.cpp loads each adapter against the model and sets the list on the context
            from .lora import apply_adapters

            try:
                eng.adapters = apply_adapters(model, ctx, opts.lora)
            except BaseException:
                eng.close()
                raise
        me = weakref.ref(eng)  # no cycle through the callback: close() also runs from __del__
        eng._abort_cb = lc.ggml_abort_callback(lambda _: bool((e := me()) and e._cancel))
        lc.llama_set_abort_callback(ctx, eng._abort_cb, None)
        if prompt_cache is None and opts.cache_ram != 0:
            prompt_cache = PromptCache(cache_budget(p, opts.cache_ram, checkpoints))
            if prompt_cache.budget > 0:
                return_freed_states_to_the_os()
        eng._seq = SeqCache(ctx, 0, CacheKey.of(info.files, p.n_ctx, eng.adapters.active if eng.adapters else ()),
                            info.n_swa,
                            prompt_cache if prompt_cache is not None and prompt_cache.budget > 0 else None,
                            Checkpoints(checkpoints))
        eng.load_seconds = time.perf_counter() - t0
        return eng

    def set_adapter_scales(self, scales: Sequence[float | None] | None) -> None:
        """Apply the adapters loaded with `lora` at these scales (one per adapter, None leaving it out;
        `scales` None: as loaded) from the next generation on. A changed set drops the KV cache (computed
        with the old one), and saved prompt states of another set are not restored (their CacheKey names
        the adapters)."""
        if self.adapters is None:
            raise OssggufError("no LoRA adapters are loaded: load the engine with lora=(...) (--lora)")
        if self.adapters.apply(self._ctx, scales):
            self.reset()
            if self._seq is not None:
                self._seq.key = replace(self._seq.key, adapters=tuple(self.adapters.active))

    def close(self) -> None:
        if self.scheduler is not None:  # its thread stops before the context goes
            self.scheduler.close()
        if self._ctx:
            lc = llama_cpp_module()
            lc.llama_free(self._ctx)
            lc.llama_model_free(self._model)
            self._ctx = self._model = 0

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass

    # --- tokens --------------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.plan.n_ctx

    @property
    def _vocab(self):
        return llama_cpp_module().llama_model_get_vocab(self._model)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`; with `special`, harmony markers like <|start|> become their tokens.

        Even without `special`, llama.cpp matches gpt-oss's <|start|>, <|channel|>, <|message|>,
        <|constrain|> and <|end|> (user-defined tokens): use `tokenize_text` for untrusted text.
        """
        lc = llama_cpp_module()
        data = text.encode()
        n_max = len(data) + 8
        buf = (lc.llama_token * n_max)()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
        if n < 0:
            buf = (lc.llama_token * -n)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, -n, False, special)
        return list(buf[:n])

    def special_tokens(self) -> dict[int, str]:
        """id -> text of the vocabulary's control and user-defined tokens (gpt-oss: 199998..200018)."""
        if self._specials is None:
            lc = llama_cpp_module()
            vocab = self._vocab
            flags = TOKEN_ATTR_CONTROL | TOKEN_ATTR_USER_DEFINED
            self._specials = {
                t: self.token_bytes(t).decode("utf-8", errors="replace")
                for t in range(lc.llama_vocab_n_tokens(vocab)) if lc.llama_vocab_get_attr(vocab, t) & flags
            }
        return self._specials

    def tokenize_text(self, text: str) -> list[int]:
        """`text` as plain text, never a control token, even where it spells one (`<|end|>`): the
        ids openai-harmony gives message contents. Text that llama.cpp would match as a special
        token is cut inside each such string and tokenized piece by piece (see `_text_cuts`)."""
        specials = self.special_tokens()
        ids = self.tokenize(text, special=False)
        if not any(t in specials for t in ids):
            return ids
        cuts = _text_cuts(text, set(specials.values()))
        ids = []
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            ids += self.tokenize(text[a:b], special=False) if b > a else []
        if any(t in specials for t in ids):
            bad = sorted({specials[t] for t in ids if t in specials})
            raise OssggufError(f"could not tokenize text holding {', '.join(bad)} as plain text")
        return ids

    def tokenize_segments(self, segments: Iterable[tuple[str, bool]]) -> list[int]:
        """A rendered prompt's ids from its (text, is_control) segments (`harmony.render_segments`):
        each control segment is its one special token, each text segment plain text
        (`tokenize_text`), so no text can forge a control token."""
        ids: list[int] = []
        for text, control in segments:
            if not control:
                ids += self.tokenize_text(text)
                continue
            if text not in self._control_ids:
                tok = self.tokenize(text, special=True)
                if len(tok) != 1 or tok[0] not in self.special_tokens():
                    raise OssggufError(f"{self.path.name} has no {text} token: is it a gpt-oss GGUF?")
                self._control_ids[text] = tok[0]
            ids.append(self._control_ids[text])
        return ids

    def token_bytes(self, token: int) -> bytes:
        return token_bytes(self._model, token)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return detokenize(self._model, tokens)

    def is_stop(self, token: int) -> bool:
        """End-of-generation tokens of the vocabulary: <|return|>, <|call|>, <|endoftext|> for gpt-oss."""
        return bool(llama_cpp_module().llama_vocab_is_eog(self._vocab, token))

    # --- generation ----------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the running generation after the current token (or batch of prompt tokens)."""
        self._cancel = True

    def reset(self) -> None:
        """Forget the KV cache."""
        lc = llama_cpp_module()
        lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
        self._tokens = []
        if self._seq is not None:
            self._seq.forget()

    @property
    def prompt_cache(self) -> PromptCache | None:
        """The saved prompts in RAM this engine uses (None: off)."""
        return self._seq.ram if self._seq is not None else None

    def _reuse_prefix(self, prompt: list[int]) -> int:
        """Keep the longest start of `prompt` the cache can give (at least one prompt token is left to
        decode): the common prefix, back to a window checkpoint, or a saved prompt from RAM."""
        self._tokens = self._seq.reuse(self._tokens, prompt)
        return len(self._tokens)

    def prompt_tokens(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt's token ids (text is tokenized with special tokens), checked against the context."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens:
            raise OssggufError("the prompt is empty")
        if len(tokens) >= self.n_ctx:
            raise OssggufError(f"the prompt is {len(tokens)} tokens, the context holds {self.n_ctx}: "
                               "shorten it or load with a larger --ctx")
        return tokens

    def message_cut(self, tokens: list[int], cached: int, seq: SeqCache | None = None) -> int:
        """Where the prompt's last message starts (the `<|start|>` before the one that opens the
        assistant's turn), when the window can be checkpointed there and more than a window's worth of
        tokens is read before it; else 0. A new conversation of an agent shares the system prompt, the
        tools and often the history with an earlier one up to that message (opencode's next `run`),
        and the checkpoint at each prompt's end does not reach back so far. `seq`: the sequence read
        into (default this engine's own; runner/parallel.py passes each slot's)."""
        seq = seq or self._seq
        if seq is None or seq.checkpoints.limit <= 0 or seq.n_swa <= 0:
            return 0
        if self._start_id is None:
            self._start_id = next((t for t, text in self.special_tokens().items() if text == START), -1)
        found = 0
        for i in range(len(tokens) - 1, cached, -1):  # from the end: the assistant's header, then the cut
            if tokens[i] == self._start_id:
                found += 1
                if found == 2:
                    return i if i - cached > seq.n_swa else 0
        return 0

    def evaluate(self, tokens: Sequence[int], progress: Callable[[int], None] | None = None) -> None:
        """Run `tokens` through the model as one sequence from position 0, reading no logits
        (calibration: only what the eval callback sees matters). `progress(n)` after each batch."""
        self.reset()
        self._decode(tokens, want_logits=False, progress=progress)

    def _decode(self, tokens: Sequence[int], want_logits: bool,
                progress: Callable[[int], None] | None = None) -> None:
        lc = llama_cpp_module()
        step = self.plan.n_ubatch
        batch = lc.llama_batch_init(step, 0, 1)
        try:
            for start in range(0, len(tokens), step):
                chunk = tokens[start:start + step]
                pos0 = len(self._tokens)
                for i, t in enumerate(chunk):
                    batch.token[i] = t
                    batch.pos[i] = pos0 + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = want_logits and start + i == len(tokens) - 1
                batch.n_tokens = len(chunk)
                rc = lc.llama_decode(self._ctx, batch)
                if rc == 2:  # aborted through the cancel flag: the cache may hold part of the batch
                    self.reset()
                    raise _Cancelled()
                if rc != 0:
                    raise OssggufError(f"llama_decode failed ({rc}): {LLAMA_LOG.last_errors()}")
                self._tokens.extend(chunk)
                if progress:
                    progress(len(chunk))
        finally:
            lc.llama_batch_free(batch)

    def _sampler(self, s: Sampling):
        lc = llama_cpp_module()
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if s.temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(s.min_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(s.temperature))
        seed = lc.LLAMA_DEFAULT_SEED if s.seed is None else s.seed & 0xFFFFFFFF
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
        return chain

    def generate(self, prompt: str | Sequence[int], sampling: Sampling | None = None,
                 **changes) -> Iterator[GenerationChunk]:
        """Stream the continuation of `prompt` (text is tokenized with special tokens: give a
        conversation as `tokenize_segments` ids, in which message text stays text).

        `changes` are Sampling fields, e.g. `engine.generate(ids, temperature=0, max_tokens=8)`.
        Stops at an end-of-generation token (the last chunk carries it, with empty text), at
        `max_tokens`, at the end of the context, or after `cancel()`.
        """
        sampling = replace(sampling or Sampling(), **changes)
        if not self._ctx:
            raise OssggufError("the engine is closed")
        if self.scheduler is not None:  # its streams use sequence 0 too
            raise OssggufError("this engine's context is driven by its parallel scheduler: generate through it")
        lc = llama_cpp_module()
        tokens = self.prompt_tokens(prompt)
        self._cancel = False
        cached = self._reuse_prefix(tokens)
        st = Usage(prompt_tokens=len(tokens), cached_tokens=cached)
        t0 = time.perf_counter()
        sampler = self._sampler(sampling)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def chunk(text: str, tok: int | None, reason: str | None) -> GenerationChunk:
            return GenerationChunk(text, tok, reason, copy.copy(st))

        try:
            try:
                cut = self.message_cut(tokens, cached)
                if cut:  # read up to the last message, checkpoint the window there, then the rest
                    self._decode(tokens[cached:cut], want_logits=False)
                    self._seq.checkpoint(self._tokens)
                self._decode(tokens[cut or cached:], want_logits=True)
            except _Cancelled:
                yield chunk("", None, "cancelled")
                return
            self._seq.prompt_read(self._tokens, len(tokens))
            t1 = time.perf_counter()
            st.prompt_seconds = t1 - t0
            limit = self.n_ctx - len(self._tokens)
            if sampling.max_tokens is not None:
                limit = min(limit, sampling.max_tokens)
            while True:
                if self._cancel:
                    yield chunk(decoder.decode(b"", final=True), None, "cancelled")
                    return
                if st.completion_tokens >= limit:
                    yield chunk(decoder.decode(b"", final=True), None, "length")
                    return
                tok = lc.llama_sampler_sample(sampler, self._ctx, -1)
                st.completion_tokens += 1
                if self.is_stop(tok):
                    st.generation_seconds = time.perf_counter() - t1
                    yield chunk(decoder.decode(b"", final=True), tok, "stop")
                    return
                text = decoder.decode(self.token_bytes(tok))
                if st.completion_tokens < limit and not self._cancel:
                    try:
                        self._decode([tok], want_logits=True)
                    except _Cancelled:
                        yield chunk(text, tok, "cancelled")
                        return
                st.generation_seconds = time.perf_counter() - t1
                yield chunk(text, tok, None)
        finally:
            lc.llama_sampler_free(sampler)


class _Cancelled(Exception):
    pass
