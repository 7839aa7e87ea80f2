"""The prompt cache (runner/prompt_cache.py) against the engine without it, in the same run.

On a synthetic gpt-oss-20b-shaped GGUF (real shapes, random data; `--layers N` keeps the first N of its
24 layers to fit a small machine), two engines load the same file with the same placement: "before"
without window checkpoints and without the RAM cache (the engine as it was), "after" with both.

- chat: 3 turns; each turn's reasoning is forced as given tokens (the model's own would be random) and
  then dropped from the next prompt, as harmony does; per turn, prompt tokens processed / total and the
  time to first token (the prompt's reading, checkpoint included);
- interleaved: two conversations, A B A B (`--rounds`), each with its own `--prefix`-word (or
  `--prefix-tokens`-token) start; processed / total and time to first token per request, against a
  request that only has its new tokens to read.

    python bench/bench_prompt_cache.py [--workdir bench/out] [--layers 4] [--analysis 1200] [--prefix 4096]
    python bench/bench_prompt_cache.py --skip-chat --skip-before --prefix-tokens 8192 --rounds 2 --ctx 20480
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

from benchutil import synthetic_checkpoint  # bench/ is on sys.path when a script runs

DATE = "2025-03-14"
WORDS = ("the agent reads the repository then plans the change runs the tests and reports what it found "
         "with the files it touched and the commands it ran ").split()


def gguf_of(workdir: Path, layers: int) -> Path:
    from ossgguf.convert.convert import convert

    out = workdir / f"synthetic-20b-{layers}l-mxfp4.gguf"
    if not out.is_file():
        ckpt, _ = synthetic_checkpoint(workdir, "20b", layers=layers)
        print(f"converting {ckpt} to {out} ...", flush=True)
        convert(ckpt, out, force=True)
    return out


def text(n_words: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def ask(engine, prompt: list[int]) -> tuple[int, int, float]:
    """(total, processed, seconds to first token) of one request."""
    chunks = list(engine.generate(prompt, max_tokens=1, temperature=0))
    u = chunks[-1].usage
    print(f"  {u.prompt_tokens} tokens, {u.cached_tokens} cached, {u.prompt_seconds:.2f}s", file=sys.stderr, flush=True)
    return u.prompt_tokens, u.prompt_tokens - u.cached_tokens, u.prompt_seconds


def chat(engine, analysis: int, system: int, turns: int = 3) -> list[tuple[int, int, float]]:
    from ossgguf.runner.chat import Conversation

    conv = Conversation(date=DATE, messages=[{"role": "system", "content": text(system, 0)}])
    out = []
    for k in range(turns):
        conv.add_user(f"Turn {k}: " + text(60, k + 1))
        prompt = conv.tokens(engine)
        out.append(ask(engine, prompt))
        # the reasoning, read as given tokens where the model would write it, then the answer is sent back
        reasoning = text(analysis, 100 + k)
        forced = engine.tokenize_text(reasoning)[:analysis]
        header = engine.tokenize("<|channel|>analysis<|message|>")
        ask(engine, prompt + header + forced)
        conv.messages.append({"role": "assistant", "content": f"Done with turn {k}.", "thinking": reasoning})
    return out


def start(engine, words: int, seed: int, tokens: int | None) -> str:
    """A conversation's start: `words` words, or (`tokens`) text of that many tokens."""
    if tokens is None:
        return text(words, seed)
    body = text(tokens, seed)  # a word is at least one token
    return engine.detokenize(engine.tokenize_text(body)[:tokens])


def interleaved(engine, prefix: int, rounds: int = 3, prefix_tokens: int | None = None) -> list[tuple[str, int, int, float]]:
    from ossgguf.runner.chat import Conversation

    convs = {name: Conversation(date=DATE, messages=[{"role": "system",
                                                      "content": start(engine, prefix, seed, prefix_tokens)}])
             for name, seed in (("A", 7), ("B", 8))}
    out = []
    for k in range(rounds):
        for name, conv in convs.items():
            conv.add_user(f"{name} {k}: " + text(40, 10 * k + len(name)))
            out.append((name, *ask(engine, conv.tokens(engine))))
            conv.messages.append({"role": "assistant", "content": f"{name} answered {k}."})
    # the baseline: A's next request right after its own, so only its new tokens are read, cache or not
    conv = convs["A"]
    conv.add_user("A again: " + text(40, 99))
    out.append(("A*", *ask(engine, conv.tokens(engine))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench/out"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--analysis", type=int, default=1200)
    ap.add_argument("--system", type=int, default=600, help="words of the chat's system prompt")
    ap.add_argument("--prefix", type=int, default=4096, help="words of each interleaved conversation's start")
    ap.add_argument("--prefix-tokens", type=int, help="instead: each interleaved start this many tokens long")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (A B each)")
    ap.add_argument("--skip-interleaved", action="store_true")
    ap.add_argument("--skip-chat", action="store_true")
    ap.add_argument("--skip-before", action="store_true",
                    help="interleaved only, the engine with the cache alone (before reads every prompt whole)")
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    if a.skip_before and not (a.skip_chat and not a.skip_interleaved):
        ap.error("--skip-before goes with --skip-chat (the interleaved table only)")
    a.workdir.mkdir(parents=True, exist_ok=True)

    from ossgguf.runner.engine import Engine
    from ossgguf.runner.plan import PlacementOptions

    path = gguf_of(a.workdir, a.layers)
    opts = PlacementOptions(gpu_mem=0, ctx=a.ctx, threads=a.threads)
    results = {}
    runs = (("before", {"cache_ram": 0, "checkpoints": 0}), ("after", {}))
    for name, kw in runs[1:] if a.skip_before else runs:
        with Engine.load(path, opts, **kw) as e:
            results[name] = ([] if a.skip_chat else chat(e, a.analysis, a.system),
                             [] if a.skip_interleaved else interleaved(e, a.prefix, a.rounds, a.prefix_tokens))
            if name == "after":
                pc = e.prompt_cache
                note = (f"RAM cache: budget {pc.budget / 2**30:.1f} GiB, {len(pc)} entries, {pc.nbytes / 2**20:.0f} MiB; "
                        f"checkpoints {e._seq.checkpoints.nbytes / 2**20:.0f} MiB")
    print(f"model {path.name} ({a.layers} of 24 layers), ctx {a.ctx}, CPU, "
          f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs at the end\n")
    if not a.skip_chat:
        print(f"chat, {a.analysis} analysis tokens per turn:")
        print("turn  prompt  processed before  processed after  TTFT before  TTFT after  TTFT ratio")
        for k, (b, c) in enumerate(zip(*(results[n][0] for n in ("before", "after")))):
            print(f"{k + 1:>4}  {b[0]:>6}  {b[1]:>16}  {c[1]:>15}  {b[2]:>10.2f}s  {c[2]:>9.2f}s  {b[2] / c[2]:>9.1f}x")
    if a.skip_interleaved:
        print(note)
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
        return
    starts = f"{a.prefix_tokens}-token" if a.prefix_tokens else f"{a.prefix}-word"
    print(f"\ninterleaved conversations, {starts} starts:")
    if a.skip_before:
        print("req  conv  prompt  processed  TTFT")
        for k, c in enumerate(results["after"][1]):
            print(f"{k + 1:>3}  {c[0]:>4}  {c[1]:>6}  {c[2]:>9}  {c[3]:>6.2f}s")
    else:
        print("req  conv  prompt  processed before  processed after  TTFT before  TTFT after  TTFT ratio")
        for k, (b, c) in enumerate(zip(*(results[n][1] for n in ("before", "after")))):
            print(f"{k + 1:>3}  {b[0]:>4}  {b[1]:>6}  {b[2]:>16}  {c[2]:>15}  {b[3]:>10.2f}s  {c[3]:>9.2f}s"
                  f"  {b[3] / c[3]:>9.1f}x")
    after, alone = results["after"][1][2:-1], results["after"][1][-1]
    print(f"\nA* follows A's own request (only new tokens to read, {alone[3]:.2f}s): requests 3..N after take "
          f"{min(t for *_, t in after) / alone[3]:.2f}-{max(t for *_, t in after) / alone[3]:.2f}x that")
    print(note)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())
