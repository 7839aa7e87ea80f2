"""The server's memory under a long run of interleaved conversations, against the planner's figure.

`ossgguf serve` runs as a child process, as a user starts it, on a synthetic gpt-oss-20b-shaped GGUF
(real shapes, random data; `--layers N` keeps the first N of its 24 layers) with `--parallel 2` and a
small `--cache-ram`, so that the RAM cache's least recently used entries must go. Two clients send
`--requests` chat completions of `--conversations` conversations (each client half of them, in a
seeded random order; each conversation grows turn by turn; a few tokens written each). After every
request the server's RSS (psutil, children included) and its /health counters are sampled.

The planner's figure for this placement comes from `ossgguf plan --json` with the same options: the RAM
it counts (weights, the KV cache of every stream, compute buffers) plus what the prompt cache may add
(the window checkpoints of every stream and the --cache-ram budget: runner/prompt_cache.py).

    python bench/bench_cache_memory.py [--workdir bench/out] [--layers 4] [--cache-ram 64MiB] [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_prompt_cache import gguf_of, text  # bench/ is on sys.path when a script runs

DATE = "2025-03-14"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def planned(gguf: Path, options: list[str]) -> dict:
    """`ossgguf plan --json` with the server's options."""
    out = subprocess.run([sys.executable, "-m", "ossgguf.cli", "plan", str(gguf), *options, "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def memory(proc, gguf: Path) -> tuple[int, int, int]:
    """(RSS, anonymous RSS, RSS of the GGUF's mapping) of the server and its children, in bytes."""
    rss = anon = mapped = 0
    target = str(gguf.resolve())
    for p in [proc, *proc.children(recursive=True)]:
        rss += p.memory_info().rss
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon += int(line.split()[1]) * 1024
        mapped += sum(m.rss for m in p.memory_maps(grouped=True) if m.path == target)
    return rss, anon, mapped


def wait_ready(url: str, server: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}): see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the server did not start within {timeout:.0f}s: see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench/out"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--cache-ram", default="64MiB", help="the server's --cache-ram (small: the LRU must evict)")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--conversations", type=int, default=20)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--start", type=int, default=20, help="words of each conversation's system message")
    ap.add_argument("--turn", type=int, default=8, help="words of each user message")
    ap.add_argument("--max-tokens", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)

    import httpx
    import psutil

    gguf = gguf_of(a.workdir, a.layers)
    options = ["--gpu-mem", "0", "--ctx", str(a.ctx), "--parallel", str(a.parallel), "--cache-ram", a.cache_ram]
    options += ["--threads", str(a.threads)] if a.threads else []
    plan = planned(gguf, options)
    budget, ckpt = plan["prompt_cache"]["budget"], plan["prompt_cache"]["checkpoint_bytes"]
    figure = plan["ram_bytes"] + ckpt + budget
    # weights llama.cpp reads in place from the mapped file (the rest of the model buffers are the
    # experts, repacked into buffers of their own: their pages in the map are read once, at load)
    in_place = sum(b["bytes"] for b in plan["buffers"]
                   if b["device"] == "cpu" and b["kind"] == "model" and not b["what"].startswith("experts"))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = a.workdir / "bench_cache_memory.server.log"
    with open(log, "w") as err:
        server = subprocess.Popen([sys.executable, "-m", "ossgguf.cli", "serve", str(gguf), "--port", str(port),
                                   "--model-name", "bench", *options], stdout=err, stderr=err)
    try:
        t_load = time.monotonic()
        wait_ready(url, server, log)
        t_load = time.monotonic() - t_load
        proc = psutil.Process(server.pid)
        base = memory(proc, gguf)
        samples: list[tuple[int, int, int, int, dict]] = []  # (request, rss, anon, mapped, /health prompt_cache)
        usage: list[tuple[int, int]] = []  # (prompt tokens, cached tokens)
        lock = threading.Lock()
        failures: list[BaseException] = []

        def client(k: int) -> None:
            convs = list(range(k, a.conversations, a.parallel))
            share = a.requests // a.parallel + (1 if k < a.requests % a.parallel else 0)
            order = [convs[i % len(convs)] for i in range(share)]  # each conversation about as many turns
            random.Random(a.seed * 1000 + k).shuffle(order)
            chats = {c: [{"role": "system", "content": f"Conversation {c}. " + text(a.start, 1000 + c)}] for c in convs}
            with httpx.Client(base_url=url, timeout=600) as http:
                for c in order:
                    msgs = chats[c]
                    msgs.append({"role": "user", "content": text(a.turn, 10_000 * c + len(msgs))})
                    r = http.post("/v1/chat/completions", json={"model": "bench", "messages": msgs, "temperature": 0,
                                                                "max_tokens": a.max_tokens})
                    r.raise_for_status()
                    u = r.json()["usage"]
                    msgs.append({"role": "assistant", "content": f"Noted, turn {len(msgs) // 2}."})
                    health = http.get("/health").json().get("prompt_cache", {})
                    with lock:
                        usage.append((u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"]))
                        samples.append((len(samples) + 1, *memory(proc, gguf), health))
                        n = len(samples)
                    if n % 10 == 0:
                        print(f"  {n} requests, RSS {samples[-1][1] / 2**30:.2f} GiB, cache {health}",
                              file=sys.stderr, flush=True)

        def run(k: int) -> None:
            try:
                client(k)
            except BaseException as e:  # noqa: BLE001  (reported after the join)
                failures.append(e)

        t0 = time.monotonic()
        threads = [threading.Thread(target=run, args=(k,)) for k in range(a.parallel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        if failures:
            raise SystemExit(f"a request failed: {failures[0]!r} (server log: {log})")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    g = 2**30
    peak = max(samples, key=lambda s: s[1])
    last = samples[-1][4]
    full = next((s[0] for s in samples if s[4].get("evicted", 0) > 0), None)
    after = [s for s in samples if full is not None and s[0] >= full]
    print(f"model {gguf.name} ({a.layers} of 24 layers), serve {' '.join(options)}, CPU, "
          f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs at the end")
    print(f"{len(samples)} requests of {a.conversations} conversations from {a.parallel} clients in {wall:.0f}s "
          f"(server loaded in {t_load:.0f}s); prompt tokens {sum(p for p, _ in usage)}, cached "
          f"{sum(c for _, c in usage)} ({sum(c for _, c in usage) / max(1, sum(p for p, _ in usage)):.0%})")
    print(f"prompt cache (/health): saved {last.get('saved')}, restored {last.get('restored')}, evicted "
          f"{last.get('evicted')}; at the end {last.get('entries')} entries, {last.get('bytes', 0) / 2**20:.0f} MiB "
          f"of a {budget / 2**20:.0f} MiB budget; first eviction after request {full}")
    print(f"\nplanned RAM: {figure / g:.2f} GiB = buffers {plan['ram_bytes'] / g:.2f} GiB (weights, KV for "
          f"{a.parallel} streams {plan['kv_bytes'] / 2**20:.0f} MiB, compute) + window checkpoints "
          f"{ckpt / 2**20:.0f} MiB + --cache-ram {budget / 2**20:.0f} MiB")
    print("\nrequest  RSS GiB  anonymous GiB  GGUF mapped GiB  cache entries  cache MiB")
    print(f"{'loaded':>7}  {base[0] / g:>7.2f}  {base[1] / g:>13.2f}  {base[2] / g:>15.2f}  {'':>13}  {'':>9}")
    for s in samples:
        if s[0] in (1, 50, 100, 150, 200, len(samples)) or s is peak:
            mark = " (peak)" if s is peak else ""
            print(f"{s[0]:>7}  {s[1] / g:>7.2f}  {s[2] / g:>13.2f}  {s[3] / g:>15.2f}  {s[4].get('entries', 0):>13}"
                  f"  {s[4].get('bytes', 0) / 2**20:>9.0f}{mark}")
    if after:
        lo, hi = min(s[1] for s in after), max(s[1] for s in after)
        print(f"after the cache filled (requests {full}..{samples[-1][0]}): RSS {lo / g:.2f}-{hi / g:.2f} GiB "
              f"(spread {(hi - lo) / 2**20:.0f} MiB), anonymous {min(s[2] for s in after) / g:.2f}-"
              f"{max(s[2] for s in after) / g:.2f} GiB")
    # the map's pages beyond the in-place weights are the repacked experts' source, read once at load:
    # clean page cache that the kernel may drop and llama.cpp never reads again, not memory the plan
    # must hold (their repacked copy is counted, in the anonymous RSS)
    dup = max(0, peak[3] - in_place)
    print(f"\npeak RSS {peak[1] / g:.2f} GiB / planned {figure / g:.2f} GiB = {peak[1] / figure:.2f}")
    print(f"RSS counts the GGUF's mapped pages that were touched ({peak[3] / g:.2f} GiB at the peak): the weights "
          f"llama.cpp uses in place ({in_place / g:.2f} GiB, in the plan) and the experts' pages read once to "
          f"repack them ({dup / g:.2f} GiB, clean page cache; the repacked copy is in the plan and in the "
          f"anonymous RSS). Without those: {(peak[1] - dup) / g:.2f} GiB / planned = {(peak[1] - dup) / figure:.2f}")
    # what the plan does not count: the libraries' pages, and the process's own heap (Python, the server)
    # beyond the buffers, the checkpoints and the cache the plan puts in anonymous memory
    own = figure - in_place
    print(f"the rest: libraries' pages {(peak[1] - peak[2] - peak[3]) / 2**20:.0f} MiB; anonymous {peak[2] / g:.2f} GiB "
          f"against the plan's {own / g:.2f} GiB (repacked experts, KV, compute, checkpoints, cache budget): "
          f"{(peak[2] - own) / 2**20:+.0f} MiB (at load, before any cache: {(base[1] - own + ckpt + budget) / 2**20:+.0f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
