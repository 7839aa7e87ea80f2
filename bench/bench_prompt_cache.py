"""The prompt cache (runner/prompt_cache.py) against the engine without it, in the same run.

On a synthetic gpt-oss-20b-shaped GGUF (real shapes, random data; `--layers N` keeps the first N of its
24 layers to fit a small machine), two engines load the same file with the same placement: "before"
without window checkpoints and without the RAM cache (the engine as it was), "after" with both.

- chat: 3 turns; each turn's reasoning is forced as given tokens (the model's own would be random) and
  then dropped from the next prompt, as harmony does; per turn, prompt tokens processed / total and the
  time to first token (the prompt's reading, checkpoint included);
- interleaved: two conversations, A B A B, each with its own `--prefix`-token start; processed / total
  and time to first token per request, against a request that only has its new tokens to read.

    python bench/bench_prompt_cache.py [--workdir bench/out] [--layers 4] [--analysis 1200] [--prefix 4096]
"""

from __future__ import annotations

import argparse
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


def interleaved(engine, prefix: int, rounds: int = 3) -> list[tuple[str, int, int, float]]:
    from ossgguf.runner.chat import Conversation

    convs = {name: Conversation(date=DATE, messages=[{"role": "system", "content": text(prefix, seed)}])
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
    ap.add_argument("--skip-interleaved", action="store_true")
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)

    from ossgguf.runner.engine import Engine
    from ossgguf.runner.plan import PlacementOptions

    path = gguf_of(a.workdir, a.layers)
    opts = PlacementOptions(gpu_mem=0, ctx=a.ctx, threads=a.threads)
    results = {}
    for name, kw in (("before", {"cache_ram": 0, "checkpoints": 0}), ("after", {})):
        with Engine.load(path, opts, **kw) as e:
            results[name] = (chat(e, a.analysis, a.system), [] if a.skip_interleaved else interleaved(e, a.prefix))
            if name == "after":
                pc = e.prompt_cache
                note = (f"RAM cache: budget {pc.budget / 2**30:.1f} GiB, {len(pc)} entries, {pc.nbytes / 2**20:.0f} MiB; "
                        f"checkpoints {e._seq.checkpoints.nbytes / 2**20:.0f} MiB")
    print(f"model {path.name} ({a.layers} of 24 layers), ctx {a.ctx}, CPU\n")
    print(f"chat, {a.analysis} analysis tokens per turn:")
    print("turn  prompt  processed before  processed after  TTFT before  TTFT after  TTFT ratio")
    for k, (b, c) in enumerate(zip(*(results[n][0] for n in ("before", "after")))):
        print(f"{k + 1:>4}  {b[0]:>6}  {b[1]:>16}  {c[1]:>15}  {b[2]:>10.2f}s  {c[2]:>9.2f}s  {b[2] / c[2]:>9.1f}x")
    if a.skip_interleaved:
        print(note)
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
        return
    print(f"\ninterleaved conversations, {a.prefix}-word starts:")
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
