"""Server load benchmark: 8 concurrent clients x 25 requests on a tiny gpt-oss GGUF, over loopback.

The server runs as `ossgguf.runner.server.app.serve` in its own process (its RSS is measured alone); the
clients are the official `openai` client on threads. Every request asks the same conversation with its
own seed and max_tokens, so each answer is identifiable, and all of them must equal a sequential run
through the same server (one prompt means one cached prefix whatever the order, so sampling is
bit-identical). The tiny model's end-of-generation rows of the output head are zeroed, so greedy
decoding never stops by itself (sampled answers mostly run to their max_tokens): a 6000-token greedy
stream is killed (SIGKILL of its client) and the next request must be answered at once.

Baseline measured in the same run: the same 200 generations by the engine alone, in this process
(best of one run before and one after the server's).
Prints requests, failures, p50/p95 latency, throughput as a ratio of the engine alone, RSS of the server
before and after.

    python bench/bench_server.py [--clients 8] [--requests 25] [--threads N]

On 2 cores, llama.cpp's threads, the event loop and the clients compete: --threads 1 leaves a core.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from openai import OpenAI

MESSAGES = [{"role": "system", "content": "You are a storyteller."}, {"role": "user", "content": "Tell me a story."}]
CTX = 8192
KILLED_MAX_TOKENS = 6000


def tiny_model(workdir: Path) -> Path:
    """A tiny checkpoint whose output head never prefers an end-of-generation token, as GGUF."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    from ossgguf.convert.convert import convert
    from ossgguf.fixtures.tiny import TinySpec, make_tiny_checkpoint
    from ossgguf.harmony.tokens import END_OF_GENERATION

    ckpt = make_tiny_checkpoint(workdir / "ckpt", TinySpec(num_hidden_layers=3, seed=5))
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    weights = load_file(str(ckpt / "model.safetensors"))
    for text in END_OF_GENERATION:
        weights["lm_head.weight"][tok.token_to_id(text)] = torch.zeros_like(weights["lm_head.weight"][0])
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    convert(ckpt, workdir / "tiny.gguf", force=True)
    return workdir / "tiny.gguf"


def request(i: int) -> dict:
    return {"seed": 1000 + i, "max_tokens": 16 + (i * 7) % 97}


def engine_alone(model: Path, n: int, threads: int | None) -> tuple[float, float]:
    """Seconds for the same generations on the engine directly (render + generate, warm cache), and
    for the greedy generation that the killed client asks for."""
    from ossgguf.harmony import render
    from ossgguf.runner.engine import Engine
    from ossgguf.runner.plan import PlacementOptions

    with Engine.load(model, PlacementOptions(gpu_mem=0, ctx=CTX, threads=threads)) as eng:
        list(eng.generate(render(MESSAGES, date="2025-01-01"), max_tokens=4))
        t0 = time.perf_counter()
        for i in range(n):
            tokens = eng.tokenize(render(MESSAGES, date="2025-01-01"))
            list(eng.generate(tokens, **request(i)))
        t1 = time.perf_counter()
        list(eng.generate(render(MESSAGES, date="2025-01-01"), temperature=0, max_tokens=KILLED_MAX_TOKENS))
        return t1 - t0, time.perf_counter() - t1


def start_server(model: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import logging; logging.getLogger('ossgguf.harmony.parse').setLevel(logging.ERROR); "  # random text
            "from ossgguf.runner.server.app import serve; from ossgguf.runner.plan import PlacementOptions; "
            f"serve({str(model)!r}, port={port}, options=PlacementOptions(gpu_mem=0, ctx={CTX}, threads={threads}), "
            "log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code])
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start") from None
            time.sleep(0.2)


KILLED_CLIENT = """
import sys, httpx
body = {"model": "tiny", "messages": %r, "stream": True, "temperature": 0, "max_tokens": %d}
with httpx.stream("POST", sys.argv[1] + "/v1/chat/completions", json=body, timeout=60) as r:
    for n, line in enumerate(r.iter_lines()):
        if n == 10:
            print("streaming", flush=True)
"""


def kill_mid_stream(base: str, client: OpenAI) -> tuple[float, dict]:
    """SIGKILL a streaming client; seconds until the next request is answered, and the server's counters."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT % (MESSAGES, KILLED_MAX_TOKENS), base],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "streaming"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.perf_counter()
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, seed=1)
    return time.perf_counter() - t0, httpx.get(base + "/health").json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="per client")
    ap.add_argument("--threads", type=int, help="llama.cpp threads (default: the physical cores)")
    args = ap.parse_args()
    n = args.clients * args.requests
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp))
        load0 = os.getloadavg()[0]
        direct, killed_alone = engine_alone(model, n, args.threads)
        proc, base = start_server(model, args.threads)
        try:
            server = psutil.Process(proc.pid)
            client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)

            def one(i: int):
                t0 = time.perf_counter()
                try:
                    r = client.chat.completions.create(model="tiny", messages=MESSAGES, **request(i))
                except Exception as exc:  # counted as a failure
                    return None, time.perf_counter() - t0, repr(exc)
                answer = (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens)
                return answer, time.perf_counter() - t0, None

            one(-1)  # warm-up: loads the prompt into the KV cache
            rss0 = server.memory_info().rss
            sequential = [one(i) for i in range(n)]
            rss1 = server.memory_info().rss
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                loaded = list(pool.map(one, range(n)))
            wall = time.perf_counter() - t0
            rss2 = server.memory_info().rss
            next_s, health = kill_mid_stream(base, client)
            rss3 = server.memory_info().rss
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        direct = min(direct, engine_alone(model, n, args.threads)[0])  # other work on the machine: best of two

    failures = [e for _, _, e in loaded if e]
    mixed = sum(a[0] != b[0] for a, b in zip(loaded, sequential) if not a[2])
    exact = sum(a[0][2] == request(i)["max_tokens"] for i, a in enumerate(loaded) if not a[2])
    lat = sorted(t for _, t, _ in loaded)
    p50, p95 = statistics.median(lat), lat[int(0.95 * (len(lat) - 1))]
    mib = 2**20
    print(f"load average before the run: {load0:.2f} ({os.cpu_count()} CPUs)")
    print(f"requests: {n} ({args.clients} clients x {args.requests}), failures: {len(failures)}, "
          f"different from the sequential run: {mixed}, ran to their own max_tokens: {exact}")
    print(f"latency under load: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms; "
          f"sequential p50 {statistics.median(t for _, t, _ in sequential) * 1000:.0f} ms")
    print(f"throughput: {n / wall:.1f} req/s loaded; engine alone {n / direct:.1f} req/s -> "
          f"ratio {direct / wall:.2f} (server / engine alone)")
    print(f"server RSS: {rss0 / mib:.1f} MiB after warm-up, {rss1 / mib:.1f} after the sequential run, "
          f"{rss2 / mib:.1f} after the loaded run, {rss3 / mib:.1f} after the kill "
          f"(+{(rss3 - rss0) / mib:.1f} MiB)")
    print(f"client killed mid-stream ({KILLED_MAX_TOKENS} tokens asked): next request answered in "
          f"{next_s * 1000:.0f} ms (that generation alone takes {killed_alone:.1f} s); server counters {health}")
    if failures:
        print("first failure:", failures[0])
    if failures or mixed or health["cancelled"] < 1:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
