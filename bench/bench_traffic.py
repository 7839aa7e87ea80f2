"""Real clients' traffic (tests/data/traffic) replayed through `ossgguf serve`'s app, prompt cache off and on.

The request bodies Codex CLI and opencode sent in a recorded session (bench/record_traffic.py) are posted in
order, streamed as the clients ask, to the app on a synthetic gpt-oss-20b-shaped GGUF (real shapes, random
data; `--layers N` keeps the first N of its 24 layers, as bench/bench_prompt_cache.py). "before" loads it
without window checkpoints and without the RAM cache (the engine as it was), "after" with both (the
defaults of `ossgguf serve`). Each answer is capped at `--max-tokens` (the model's own would be random and
unbounded), more than the window layers keep beyond the window (their cells: the 128-token window plus a
prompt batch, rounded up to 256), as a gpt-oss agent turn's reasoning and call usually are: so that, as in
real use, the window has moved past the point where the next prompt diverges (the end of this one) when
it comes. `--ubatch 128` (256 cells) lets 160 tokens do that; at the CPU's default batch of 512 (768 cells)
it takes 640+, whose decoding would dominate the run on a small machine. Per request:
prompt tokens, cached tokens (the usage the server reports), time to first token (the engine's: reading the prompt,
cache work included, to the first token) and its ratio, the client's time to the first streamed delta
(later than the first token when the model writes markup the stream holds back); then peak RSS.

    python bench/bench_traffic.py [--workdir bench/out] [--layers 2] [--max-tokens 160] [--ubatch 128]
        [--clients codex,opencode] [--runs before,after]
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

from bench_prompt_cache import gguf_of  # bench/ is on sys.path when a script runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from traffic_replay import CLIENTS, load, replay, serving  # noqa: E402  (tests/ holds the recordings and the replay)

DATE = "2025-03-14"  # the recordings' scrubbed date: the system message renders as it did


def run(path: Path, opts, clients: list[str], max_tokens: int, **engine_kw) -> tuple[dict, str]:
    from ossgguf.runner.engine import Engine
    from ossgguf.runner.server.app import create_app

    out = {}
    with Engine.load(path, opts, **engine_kw) as engine:
        firsts: list[float] = []  # the engine's time to the first token, per request: the client's first delta
        generate = engine.generate  # can come much later (a random model writes markup the stream holds back)

        def timed(prompt, sampling=None, **changes):
            last = None
            try:
                for last in generate(prompt, sampling, **changes):
                    yield last
            finally:
                firsts.append(last.usage.prompt_seconds if last is not None else float("nan"))

        engine.generate = timed
        with serving(create_app(engine, "gpt-oss-20b", date=DATE)) as url:
            for name in clients:
                def show(a, name=name) -> None:  # as it comes: a cold prompt takes minutes on a small machine
                    a.prompt_seconds = firsts[-1] if firsts else None
                    print(f"  {name}: {a.prompt_tokens} tokens, {a.cached_tokens} cached, first token {a.prompt_seconds:.2f}s, "
                          f"first delta {a.ttft:.2f}s", file=sys.stderr, flush=True)

                out[name] = replay(url, load(name), max_tokens=max_tokens, timeout=None, on_answer=show)
        pc = engine.prompt_cache
        note = (f"RAM cache: budget {pc.budget / 2**30:.1f} GiB, {len(pc)} entries, {pc.nbytes / 2**20:.0f} MiB"
                if pc is not None else "no RAM cache")  # an empty cache is falsy (len 0)
    return out, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench/out"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--model", type=Path, help="another GGUF to serve (default: the synthetic 20b-shaped one)")
    ap.add_argument("--max-tokens", type=int, default=160, help="tokens generated per answer")
    ap.add_argument("--ubatch", type=int, default=128, help="prompt batch (the window layers keep the window + it)")
    ap.add_argument("--clients", default=",".join(CLIENTS))
    ap.add_argument("--runs", default="before,after", help="before, after, or both (the ratio needs both)")
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    clients = [c for c in a.clients.split(",") if c]
    runs = [r for r in ("before", "after") if r in a.runs.split(",")]
    if not runs:
        raise SystemExit(f"--runs {a.runs}: give before, after or both")
    unknown = set(clients) - set(CLIENTS)
    if unknown:
        raise SystemExit(f"--clients: no recording for {', '.join(sorted(unknown))} (have {', '.join(CLIENTS)})")

    from ossgguf.runner.plan import PlacementOptions

    path = a.model or gguf_of(a.workdir, a.layers)
    if not path.is_file():
        raise SystemExit(f"--model {path}: no such file")
    opts = PlacementOptions(gpu_mem=0, ctx=a.ctx, threads=a.threads, ubatch=a.ubatch)
    before, after, note = {}, {}, ""
    for name in clients:  # client by client, so that an interrupted run still has whole tables
        if "before" in runs:
            print(f"{name}, before: no checkpoints, no RAM cache", file=sys.stderr)
            before.update(run(path, opts, [name], a.max_tokens, checkpoints=0, cache_ram=0)[0])
        if "after" in runs:
            print(f"{name}, after: checkpoints and RAM cache (serve's defaults)", file=sys.stderr)
            got, note = run(path, opts, [name], a.max_tokens)
            after.update(got)
    if runs != ["before", "after"]:  # one side only (a slow machine): its figures, no ratio
        for name in clients:
            print(f"{name}, {runs[0]}:\nreq  endpoint           prompt  cached  TTFT")
            for k, x in enumerate((before or after)[name]):
                print(f"{k + 1:>3}  {x.path:<17}  {x.prompt_tokens or 0:>6}  {x.cached_tokens or 0:>6}  {x.prompt_seconds:>6.2f}s"
                      f"{'  failed: ' + x.error[:200] if x.error or x.status != 200 else ''}")
        print(note)
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
        return
    print(f"model {path.name}{'' if a.model else f' ({a.layers} of 24 layers)'}, ctx {a.ctx}, ubatch {a.ubatch}, CPU, "
          f"{a.max_tokens} tokens per answer\n")
    for name in clients:
        print(f"{name} ({len(before[name])} requests, as recorded):")
        print("TTFT: the engine's time to the first token; delta: the client's first streamed delta")
        print("req  endpoint           prompt  cached before  cached after  TTFT before  TTFT after  TTFT ratio"
              "  delta before  delta after")
        for k, (b, c) in enumerate(zip(before[name], after[name])):
            bad = [x.error for x in (b, c) if x.status != 200 or x.error]
            if bad:
                print(f"{k + 1:>3}  failed: {bad[0][:200]}")
                continue
            print(f"{k + 1:>3}  {b.path:<17}  {b.prompt_tokens:>6}  {b.cached_tokens:>13}  {c.cached_tokens:>12}"
                  f"  {b.prompt_seconds:>10.2f}s  {c.prompt_seconds:>9.2f}s  {b.prompt_seconds / c.prompt_seconds:>9.1f}x"
                  f"  {b.ttft:>11.2f}s  {c.ttft:>10.2f}s")
        tb, ta = (sum(x.prompt_seconds for x in side[name]) for side in (before, after))
        print(f"all  {'':<17}  {sum(x.prompt_tokens or 0 for x in before[name]):>6}  "
              f"{sum(x.cached_tokens or 0 for x in before[name]):>13}  {sum(x.cached_tokens or 0 for x in after[name]):>12}"
              f"  {tb:>10.2f}s  {ta:>9.2f}s  {tb / ta:>9.1f}x\n")
    print(note)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())
