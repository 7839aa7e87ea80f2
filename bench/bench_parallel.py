"""Parallel streams (`serve --parallel N`, runner/parallel.py): N streams in one batch against one stream.

On a synthetic gpt-oss-20b-shaped GGUF (real shapes, random data; `--layers N` keeps the first N of its
24 layers to fit a small machine), one engine loaded with `parallel=N` decodes first one stream, then N
at once, in turns (`--rounds`), with short prompts so that decoding dominates. Printed: total decode
tokens per second of each (tokens / the time from the first prompt read to the last token), their
ratio, and the ratio a bytes-per-step model predicts: a step reads the dense weights (attention,
router, norms, output head) once whatever the number of streams, and the experts the step's tokens
route to; N tokens route to E*(1-(1-k/E)^N) distinct experts per layer on average (E experts, k per
token, independent uniform routing: random weights route close to that). Also the peak RSS.

    python bench/bench_parallel.py [--workdir bench/out] [--layers 4] [--streams 4] [--tokens 96]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
from pathlib import Path

from bench_prompt_cache import gguf_of  # bench/ is on sys.path when a script runs

PROMPT = "<|start|>user<|message|>Tell me a story about stream {i}.<|end|><|start|>assistant"


def predicted_ratio(model, n: int, layers: int | None = None) -> tuple[float, float, float]:
    """(predicted throughput ratio of n streams to one, dense bytes, expert bytes a step of one token reads)
    for the model, or for it with `layers` layers (per-layer bytes as in its own layers: the full 24-layer
    20b from a cut file)."""
    from ossgguf.model import TensorClass, layer_of

    experts = model.bytes_where(TensorClass.EXPERT)
    embd = model.bytes_where(TensorClass.EMBEDDING)  # a lookup: a row per token, not the table
    in_layers = sum(t.nbytes for t in model.tensors if layer_of(t.name) is not None) - experts
    dense_global = sum(t.nbytes for t in model.tensors) - experts - embd - in_layers  # output head, final norm
    n_layer = layers or model.n_layer
    dense = dense_global + in_layers / model.n_layer * n_layer
    per_expert = experts / (model.n_layer * model.n_expert)
    e, k = model.n_expert, model.n_expert_used
    one = dense + n_layer * k * per_expert
    many = dense + n_layer * e * (1 - (1 - k / e) ** n) * per_expert
    return n * one / many, dense, n_layer * k * per_expert


def run_streams(sched, prompts: list[list[int]], tokens: int, seed: int) -> tuple[int, float, list[int], float]:
    """(tokens decoded, seconds from the first prompt read to the last token, tokens per stream, tokens per
    batched step)."""
    steps, batched = sched.steps, sched.step_tokens
    streams = [sched.generate(p, max_tokens=tokens, seed=seed + i) for i, p in enumerate(prompts)]
    ends: list = [None] * len(streams)

    def read(i):
        for c in streams[i]:
            ends[i] = c

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = min(s.t1 for s in streams)  # the scheduler's clock: when the first prompt was read
    end = max(s.t1 + c.usage.generation_seconds for s, c in zip(streams, ends))
    counts = [c.usage.completion_tokens for c in ends]
    return sum(counts), end - start, counts, (sched.step_tokens - batched) / max(1, sched.steps - steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench/out"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=96, help="tokens each stream writes (fewer if it stops)")
    ap.add_argument("--rounds", type=int, default=2, help="one stream, then N, this many times: the best of each")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)

    from ossgguf.runner.engine import Engine
    from ossgguf.runner.parallel import Scheduler
    from ossgguf.runner.plan import PlacementOptions

    path = gguf_of(a.workdir, a.layers)
    opts = PlacementOptions(gpu_mem=0, ctx=a.ctx, threads=a.threads, parallel=a.streams, cache_ram=0)
    with Engine.load(path, opts) as e:
        sched = Scheduler(e)
        prompts = [e.tokenize(PROMPT.format(i=i)) for i in range(a.streams)]
        run_streams(sched, prompts, 16, 0)  # warm: the pages of every expert, the graphs of both batch sizes
        one, many = [], []
        for r in range(a.rounds):
            one.append(run_streams(sched, prompts[:1], a.tokens, 100 * r))
            many.append(run_streams(sched, prompts, a.tokens, 100 * r))
            print(f"round {r + 1}: 1 stream {one[-1][0] / one[-1][1]:.2f} tok/s, {a.streams} streams "
                  f"{many[-1][0] / many[-1][1]:.2f} tok/s ({many[-1][2]} tokens)", file=sys.stderr, flush=True)
        ratio, dense, expert = predicted_ratio(e.plan.model, a.streams)
        full = predicted_ratio(e.plan.model, a.streams, 24)[0]
        kv, planned = e.plan.kv_bytes, e.plan.cpu_bytes
    best1 = max(n / s for n, s, *_ in one)
    bestn = max(n / s for n, s, *_ in many)
    paired = sorted((m[0] / m[1]) / (o[0] / o[1]) for o, m in zip(one, many))  # each round's own ratio
    print(f"model {path.name} ({a.layers} of 24 layers), ctx {a.ctx} per stream, CPU, "
          f"{a.threads or 'default'} threads, load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"decode, total tok/s: 1 stream {best1:.2f}, {a.streams} streams {bestn:.2f}: {bestn / best1:.2f}x "
          f"(best of {a.rounds}; per round {paired[0]:.2f}-{paired[-1]:.2f}x, median {paired[len(paired) // 2]:.2f}x; "
          f"{many[-1][3]:.2f} tokens per step with {a.streams}: the prompts join one per round)")
    print(f"bytes-per-step model: dense {dense / 1e9:.2f} GB + experts of one token {expert / 1e9:.2f} GB a step; "
          f"predicts {ratio:.2f}x; measured/predicted {bestn / best1 / ratio:.2f} "
          f"(the model predicts {full:.2f}x for the whole 24-layer 20b)")
    print(f"KV cache for {a.streams} streams: {kv / 2**20:.0f} MiB; the plan's RAM {planned / 2**30:.2f} GiB; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())
