"""Decode speed with LoRA adapters applied at run time (`--lora`), as a ratio to the base alone.

On a synthetic gpt-oss-20b GGUF (the real shapes, random data) cut to a few layers so that it converts
and decodes in minutes on a small machine, with PEFT-layout adapters written by numpy
(ossgguf/fixtures/lora.py) and converted by `convert-lora` (its time and peak RSS are printed too):

- base: the GGUF alone;
- attention: a rank-16 adapter on q/k/v/o of every layer;
- attention + experts: the same plus gate_up/down of every expert (target_parameters);
- scale 0: the attention + experts adapter loaded at scale 0 (llama.cpp still computes it);
- two adapters: attention + experts and attention at 1.0 and 0.5.

Every configuration decodes the same prompt greedily in interleaved rounds (a noisy neighbour hurts all
alike); the best tokens/s of each is compared with the base's of the same run.

    python bench/bench_lora.py [--workdir bench/out] [--layers 4] [--tokens 32] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from benchutil import synthetic_checkpoint  # bench/ is on sys.path when a script runs

PROMPT = ("<|start|>user<|message|>Explain in detail why decoding a mixture-of-experts model is bound by "
          "memory bandwidth, and what an adapter adds to each token.<|end|><|start|>assistant")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench/out"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)

    from ossgguf.convert.checkpoint import load_checkpoint
    from ossgguf.convert.convert import convert
    from ossgguf.convert.lora import convert_lora
    from ossgguf.fixtures.lora import make_peft_adapter
    from ossgguf.runner.engine import Engine
    from ossgguf.runner.lora import LoraSpec
    from ossgguf.runner.plan import GiB, PlacementOptions

    gguf = a.workdir / f"synthetic-20b-{a.layers}l-mxfp4.gguf"
    ckpt, made = synthetic_checkpoint(a.workdir, "20b", layers=a.layers)
    cfg = load_checkpoint(ckpt).config
    if not gguf.is_file():
        print(f"converting {ckpt} -> {gguf} ...", flush=True)
        convert(ckpt, gguf, force=True)
    adapters = {}
    for tag, experts in (("attn", False), ("attn-experts", True)):
        peft = make_peft_adapter(a.workdir / f"peft-{tag}-r{a.rank}", cfg, r=a.rank, experts=experts)
        out = a.workdir / f"lora-{tag}-r{a.rank}.gguf"
        t0 = time.perf_counter()
        report = convert_lora(peft, out, base=gguf, force=True)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"convert-lora {tag}: {out.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.2f} s "
              f"(peak RSS of this process so far {rss:.0f} MiB)", flush=True)
        adapters[tag] = report.plan.shards[0].path

    # one model and context, both adapters loaded; each configuration sets its scales (None: left out)
    configs = {
        "base": (None, None),
        "attention": (None, 1.0),
        "attention + experts": (1.0, None),
        "attention + experts, scale 0": (0.0, None),
        "two adapters (1.0 + 0.5)": (1.0, 0.5),
    }
    opts = PlacementOptions(ram=64 * GiB, gpu_mem=None, ctx=512, threads=a.threads,
                            lora=(LoraSpec(adapters["attn-experts"]), LoraSpec(adapters["attn"])))
    best = {k: 0.0 for k in configs}
    with Engine.load(gguf, opts) as e:
        print(f"placement: {e.plan.placement} ({e.plan.reason}); threads {a.threads or 'default'}")
        for r in range(a.rounds + 1):  # round 0 warms up (page faults, repacking)
            for k, scales in configs.items():
                e.set_adapter_scales(scales)
                e.reset()
                usage = None
                for chunk in e.generate(PROMPT, temperature=0, max_tokens=a.tokens):
                    usage = chunk.usage
                tps = usage.completion_tokens / usage.generation_seconds if usage.generation_seconds else 0.0
                if r:
                    best[k] = max(best[k], tps)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\ndecode, {a.tokens} tokens greedy, best of {a.rounds} interleaved rounds, "
          f"{cfg.num_hidden_layers}-layer gpt-oss-20b shapes, rank {a.rank}:")
    for k, tps in best.items():
        print(f"  {k:<30} {tps:8.2f} tok/s   ratio to base {tps / best['base']:.3f}")
    print("adapter files: " + ", ".join(f"{k} {p.stat().st_size / 1e6:.1f} MB" for k, p in adapters.items())
          + f"; base {gguf.stat().st_size / 1e9:.2f} GB")
    print(f"peak RSS {rss:.0f} MiB")
    if made:
        print(f"(the synthetic checkpoint stays in {ckpt} for the next run)")


if __name__ == "__main__":
    main()
