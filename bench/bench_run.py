"""`ossgguf run` against raw llama-cpp-python, and decode speed against this machine's memory bandwidth.

On benchutil's synthetic 20b GGUF (gpt-oss-20b's real shapes, random data; an existing one in the
workdir is reused and kept), with the same prompt tokens, threads, context, batch,
flash attention and greedy sampling on both sides:

- ours: `ossgguf run MODEL -p ... --json` (Engine, harmony rendering and parsing); timings from its JSON;
- baseline: llama-cpp-python's `Llama` (eval of the prompt, then `generate`), timed the same way.

Then the bandwidth bound: bytes a decoded token reads (the non-expert weights, the output head, the
chosen experts' share of the expert weights, one embedding row) over the memory bandwidth measured
in this run by numpy copies (one per thread, read + write bytes counted). Prints ratios.

    python bench/bench_run.py [--workdir bench/out] [--prompt-words 60] [--tokens 32] [--rounds 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchutil import synthetic_gguf  # bench/ is on sys.path when a script runs

DATE = "2025-03-14"
WORDS = ("the model reads every expert it routes to from memory so decoding is bound by bandwidth "
         "and the attention weights the output head and the router are read for every token ").split()


def bytes_per_token(path: Path) -> tuple[int, dict]:
    """What one decoded token reads: every weight except the experts not chosen and the embedding table
    (the expert biases, too, are read only for the chosen experts)."""
    from ossgguf.model import EXPERT_DOWN, EXPERT_GATE, EXPERT_UP, TensorClass, tensor_class
    from ossgguf.runner.plan import read_model

    m = read_model(path)
    share = m.n_expert_used / m.n_expert
    parts = {"experts (chosen share)": 0, "attention": 0, "output head": 0, "router, norms, biases": 0,
             "embedding row": m.bytes_where(TensorClass.EMBEDDING) // m.n_vocab}
    for t in m.tensors:
        if any(f".{e}." in t.name for e in (EXPERT_GATE, EXPERT_UP, EXPERT_DOWN)):
            parts["experts (chosen share)"] += int(t.nbytes * share)
        elif tensor_class(t.name) == TensorClass.ATTENTION:
            parts["attention"] += t.nbytes
        elif tensor_class(t.name) == TensorClass.OUTPUT:
            parts["output head"] += t.nbytes
        elif tensor_class(t.name) != TensorClass.EMBEDDING:
            parts["router, norms, biases"] += t.nbytes
    return sum(parts.values()), parts


def prompt_text(words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(words))


def run_ours(gguf: Path, args) -> dict:
    cmd = [sys.executable, "-m", "ossgguf.cli", "run", str(gguf), "-p", prompt_text(args.prompt_words),
           "--date", DATE, "--reasoning", "low", "--temp", "0", "--max-tokens", str(args.tokens),
           "--threads", str(args.threads), "--ctx", str(args.ctx), "--gpu-mem", "0", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"ossgguf run failed:\n{proc.stderr}")
    out = json.loads(proc.stdout)
    u, t = out["usage"], out["timings"]
    return {"prompt_tokens": u["prompt_tokens"], "gen_tokens": u["completion_tokens"],
            "prompt_tps": t["prompt_tps"], "gen_tps": t["generation_tps"], "n_ubatch": None}


def raw_child(gguf: str, args) -> None:
    """Runs in a child process: raw llama-cpp-python, the settings our engine uses on a CPU."""
    from ossgguf.runner.chat import Conversation
    from ossgguf.runner.llama_ctypes import open_llama
    from ossgguf.runner.plan import PlacementOptions, plan

    p = plan(gguf, PlacementOptions(gpu_mem=0, ctx=args.ctx))
    conv = Conversation(reasoning_effort="low", date=DATE)
    conv.add_user(prompt_text(args.prompt_words))
    llm = open_llama(gguf, n_ctx=p.n_ctx, n_batch=p.n_ubatch, n_ubatch=p.n_ubatch, n_threads=args.threads,
                     n_threads_batch=args.threads, n_gpu_layers=0, flash_attn=p.flash_attn, swa_full=False,
                     verbose=False)
    tokens = llm.tokenize(conv.render().encode(), add_bos=False, special=True)
    t0 = time.perf_counter()
    llm.eval(tokens)
    t1 = time.perf_counter()
    n = 0
    for _ in llm.generate(tokens, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        n += 1
        if n == args.tokens:
            break
    t2 = time.perf_counter()
    print(json.dumps({"prompt_tokens": len(tokens), "gen_tokens": n, "prompt_tps": len(tokens) / (t1 - t0),
                      "gen_tps": n / (t2 - t1), "n_ubatch": p.n_ubatch}))


def run_raw(gguf: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--raw-child", str(gguf), "--prompt-words", str(args.prompt_words),
           "--tokens", str(args.tokens), "--threads", str(args.threads), "--ctx", str(args.ctx)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"llama-cpp-python baseline failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench/out"))
    ap.add_argument("--prompt-words", type=int, default=60, help="user message length (the prompt adds the system message)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated")
    ap.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each, interleaved; best of each")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF for the next run")
    ap.add_argument("--raw-child", metavar="GGUF", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads is None:
        from ossgguf.runner.engine import _default_threads

        args.threads = _default_threads()
    if args.raw_child:
        raw_child(args.raw_child, args)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    gguf, made = synthetic_gguf(args.workdir)
    remove = made and not args.keep
    try:
        size = gguf.stat().st_size
        print(f"{gguf} ({size / 1e9:.1f} GB), {args.threads} threads, context {args.ctx}", flush=True)
        with open(gguf, "rb") as f:  # into the page cache, so the first run does not measure the disk
            while f.read(64 << 20):
                pass
        from ossgguf.runner.speed import probe_ram  # the planner's probe: 1 GiB copied per thread

        bw1, bw = probe_ram(1, 1 << 30), probe_ram(args.threads, (1 << 30) * args.threads)
        per_token, parts = bytes_per_token(gguf)
        ours, raw = [], []
        for r in range(args.rounds):
            ours.append(run_ours(gguf, args))
            raw.append(run_raw(gguf, args))
            print(f"round {r + 1}: ours {ours[-1]}\n         raw  {raw[-1]}", flush=True)
    finally:
        if remove:
            gguf.unlink(missing_ok=True)
    best = {k: {m: max(x[m] for x in runs) for m in ("prompt_tps", "gen_tps")}
            for k, runs in (("ours", ours), ("raw", raw))}
    if ours[0]["prompt_tokens"] != raw[0]["prompt_tokens"]:
        print(f"warning: prompt tokens differ: ours {ours[0]['prompt_tokens']}, raw {raw[0]['prompt_tokens']}")
    bound = bw / per_token
    print()
    print(f"prompt: {ours[0]['prompt_tokens']} tokens; generated: ours {ours[0]['gen_tokens']}, raw {raw[0]['gen_tokens']}")
    print(f"{'':24}{'ossgguf run':>14}{'llama-cpp-python':>18}{'ratio':>8}")
    for m, label in (("prompt_tps", "prompt tok/s"), ("gen_tps", "generation tok/s")):
        print(f"{label:24}{best['ours'][m]:14.2f}{best['raw'][m]:18.2f}{best['ours'][m] / best['raw'][m]:8.3f}")
    print()
    print(f"memory bandwidth (numpy copy, read + write): {bw1 / 1e9:.1f} GB/s with 1 thread, "
          f"{bw / 1e9:.1f} GB/s with {args.threads}")
    print(f"bytes read per decoded token: {per_token / 1e9:.2f} GB ("
          + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in parts.items()) + ")")
    print(f"bandwidth bound: {bound:.2f} tok/s; generation at {best['ours']['gen_tps'] / bound:.2f} of it "
          f"(raw llama-cpp-python {best['raw']['gen_tps'] / bound:.2f})")


if __name__ == "__main__":
    main()
