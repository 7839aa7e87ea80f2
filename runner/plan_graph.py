"""The compute buffer of llama.cpp's gpt-oss graph, by replaying the graph through ggml-alloc's allocator.

llama.cpp sizes its compute buffer by allocating the graph of one ubatch with ggml-alloc (best fit
among freed blocks, in-place ops reusing their source, graph inputs first, outputs never freed).
This module builds the same node list for gpt-oss (src/models/openai-moe.cpp, build_moe_ffn) with
each node's size and replays the allocator, giving the buffer's peak without loading anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ossgguf.gguf.tensors import pad

if TYPE_CHECKING:
    from .plan import ModelInfo


class _Allocator:
    """ggml-alloc's dynamic allocator: best fit among inner free blocks, else the growing tail."""

    def __init__(self, align: int):
        self.align, self.blocks, self.tail, self.max = align, [], 0, 0  # inner free blocks (offset, size)

    def alloc(self, size: int) -> int:
        size = pad(size, self.align)
        fit = [i for i, (_, s) in enumerate(self.blocks) if s >= size]
        if fit:
            i = min(reversed(fit), key=lambda j: self.blocks[j][1])
            off, s = self.blocks[i]
            self.blocks[i:i + 1] = [(off + size, s - size)] if s > size else []
            return off
        off, self.tail = self.tail, self.tail + size
        self.max = max(self.max, self.tail)
        return off

    def free(self, off: int, size: int) -> None:
        blocks = sorted([*self.blocks, (off, pad(size, self.align))])
        merged: list[tuple[int, int]] = []
        for o, s in blocks:
            if merged and sum(merged[-1]) == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + s)
            else:
                merged.append((o, s))
        if merged and sum(merged[-1]) == self.tail:  # a block touching the tail joins it
            self.tail = merged.pop()[0]
        self.blocks = merged


class _Graph:
    """Nodes as ggml builds them: (size, sources, may run in place). Inputs are allocated first."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.kind: list[str] = []  # input, node, output
        self.nodes: list[tuple[int, tuple[int, ...], bool]] = []

    def tensor(self, size: int, kind: str) -> int:
        self.sizes.append(size)
        self.kind.append(kind)
        return len(self.sizes) - 1

    def op(self, size: int, *srcs: int, inplace: bool = False, output: bool = False) -> int:
        t = self.tensor(size, "output" if output else "node")
        self.nodes.append((t, srcs, inplace))
        return t

    def ip(self, src: int, *others: int, output: bool = False) -> int:
        """An op that may run in place on `src` (norm, bias add, rope, soft_max, ...): same size."""
        return self.op(self.sizes[src], src, *others, inplace=True, output=output)

    def peak(self, align: int) -> int:
        """The allocator's high-water mark, following ggml_gallocr_alloc_graph_impl."""
        children = [0] * len(self.sizes)
        a, addr = _Allocator(align), {}
        for t, kind in enumerate(self.kind):  # graph inputs are leafs: allocated first, in graph order
            if kind == "input":
                addr[t] = a.alloc(self.sizes[t])
        for _, srcs, _ in self.nodes:
            for s in srcs:
                children[s] += 1
        for t, srcs, inplace in self.nodes:
            parent = next((s for s in srcs if inplace and s in addr and children[s] == 1
                           and self.kind[s] != "output" and self.sizes[s] == self.sizes[t]), None)
            addr[t] = addr.pop(parent) if parent is not None else a.alloc(self.sizes[t])
            for s in srcs:
                children[s] -= 1
                if children[s] == 0 and s in addr and self.kind[s] != "output":
                    a.free(addr.pop(s), self.sizes[s])  # outputs are never freed
        return a.max


def compute_buffer_bytes(m: ModelInfo, n_tokens: int, n_outputs: int, kv_full: int, kv_swa: int,
                         flash_attn: bool, align: int, offloaded_weight: int = 0,
                         layers: range | None = None, n_copies: int = 1) -> int:
    """Peak of llama.cpp's compute buffer for one ubatch (src/models/openai-moe.cpp, build_moe_ffn).

    `offloaded_weight`: with RAM-resident experts and op offload, each expert matmul of a prompt
    batch runs on the GPU from a copy of the weight in this buffer.
    `layers`: one device of several (llama.cpp's layer split; n_layer is the output layer): its part
    of the graph, whose inputs (the incoming hidden state, positions, KV indices and masks) ggml-sched
    copies into this buffer, `n_copies` times with pipeline parallelism (GGML_SCHED_MAX_COPIES).
    """
    g, T, E, f = _Graph(), n_tokens, m.n_embd, 4
    H, D, Dv, Hkv = m.n_head, m.head_dim_k, m.head_dim_v, m.n_head_kv
    F, K, X = m.n_ff_exp, m.n_expert_used, m.n_expert
    blocks = range(m.n_layer) if layers is None else range(layers.start, min(layers.stop, m.n_layer))
    head = layers is None or m.n_layer in layers
    kinds = {m.swa_layers[il] for il in blocks}
    if layers is None:
        tokens = g.tensor(T * 4, "input")
        g.tensor(E * T * f, "input")  # inp_embd: the float-embeddings path, built but not taken (never freed)
    else:
        h_in = [g.tensor(E * T * f, "input") for _ in range(n_copies)][-1]  # from the previous device
    pos = [g.tensor(T * 4, "input") for _ in range(1 if layers is None else n_copies if blocks else 0)]
    attn_in = {}
    for swa in (True, False):
        if layers is not None and swa not in kinds:
            continue
        n_kv = kv_swa if swa else kv_full
        v_idx = T * 8 if flash_attn else Hkv * Dv * T * 8
        for _ in range(1 if layers is None else n_copies):
            attn_in[swa] = (g.tensor(T * 8, "input"), g.tensor(v_idx, "input"),
                            g.tensor(n_kv * T * (2 if flash_attn else 4), "input"))
    out_ids = [g.tensor(n_outputs * 4, "input") for _ in range(1 if layers is None else n_copies if head else 0)]
    pos, out_ids = (pos or [None])[-1], (out_ids or [None])[-1]
    h = g.op(E * T * f, tokens) if layers is None else h_in  # token embeddings
    for il in blocks:
        k_idx, v_idx, mask = attn_in[m.swa_layers[il]]
        n_kv = kv_swa if m.swa_layers[il] else kv_full
        x = g.ip(g.ip(h))  # rms_norm, * attn_norm
        # wq, +bias, rope (rope reads a reshaped view, so ggml-alloc does not run it in place)
        q = g.op(H * D * T * f, g.ip(g.op(H * D * T * f, x)), pos)
        k = g.op(Hkv * D * T * f, g.ip(g.op(Hkv * D * T * f, x)), pos)
        v = g.ip(g.op(Hkv * Dv * T * f, x))
        g.op(0, k, k_idx)  # set_rows into the cache (a view: no memory)
        g.op(0, v, v_idx)
        if flash_attn:
            o = g.op(H * Dv * T * f, q, mask)
        else:
            kq = g.ip(g.op(n_kv * T * H * f, q), mask)  # k*q, soft_max_ext
            o = g.op(H * Dv * T * f, g.op(H * Dv * T * f, kq))  # v*kq, cont
        res = g.ip(g.ip(g.op(E * T * f, o)), h)  # wo, +bias, + residual
        x = g.ip(g.ip(res))  # rms_norm, * post norm
        probs = g.ip(g.op(X * T * f, x))  # router, +bias
        topk = g.op(X * T * 4, probs)  # argsort (top-k is a view of it)
        w = g.ip(g.op(K * T * f, probs, topk))  # get_rows, soft_max
        mm = []
        for _ in ("gate", "up"):
            cp = (g.op(offloaded_weight),) if offloaded_weight else ()
            mm.append(g.ip(g.op(F * K * T * f, *cp, x, topk), topk))  # mul_mat_id, +bias (add_id)
        act = g.op(F * K * T * f, *mm)  # swiglu_oai
        cp = (g.op(offloaded_weight),) if offloaded_weight else ()
        y = g.ip(g.ip(g.op(E * K * T * f, *cp, act, topk), topk), w)  # down, +bias, * weights
        acc = g.op(E * T * f, y, y)  # sum over the chosen experts (views of y)
        for _ in range(K - 2):
            acc = g.ip(acc, y)
        h = g.ip(acc, res, output=il == m.n_layer - 1)  # + residual (the last is an output: t_h_nextn)
    if head:
        x = g.ip(g.ip(g.op(E * n_outputs * f, h, out_ids)), output=True)  # get_rows, result_norm
        g.op(m.n_vocab * n_outputs * f, x, output=True)  # logits
    return g.peak(align)
