"""`ossgguf run --rpc` with two `ossgguf worker`s on loopback against the same run on the local CPU.

On a synthetic checkpoint with gpt-oss-20b's real shapes and a few layers (random data), converted
once: prompt and generation tok/s of both (ratio RPC / local), the bytes that cross the loopback
interface per generated token (from /proc/net/dev, the difference between a short and a long
generation, so the model upload at load time cancels out; it counts every loopback user and the
TCP/IP headers), the same through counting relays in front of the workers (llama.cpp's RPC bytes
only) against the planner's figure (`plan --json`: network_bytes_per_token), and peak RSS of the main process and of
the workers. Loopback has no wire latency: on a real network add the round trips (docs/rpc.md).

    python bench/bench_rpc.py [--workdir bench/out] [--layers 4] [--tokens 8,40] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from benchutil import synthetic_checkpoint  # bench/ is on sys.path when a script runs

from ossgguf.fixtures.relay import counting_relay

PROMPT = ("the model reads every expert it routes to from memory so decoding is bound by bandwidth "
          "and the attention weights the output head and the router are read for every token ") * 3


def loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])  # received bytes (each loopback byte is sent and received once)
    raise SystemExit("no loopback interface in /proc/net/dev")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(gguf: Path, tokens: int, threads: int, *extra: str) -> tuple[dict, int]:
    cmd = [sys.executable, "-m", "ossgguf.cli", "run", str(gguf), "-p", PROMPT, "--date", "2025-03-14",
           "--reasoning", "low", "--temp", "0", "--max-tokens", str(tokens), "--threads", str(threads),
           "--ctx", "1024", "--json", *extra]
    before = loopback_bytes()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OSSGGUF_NO_REPACK": "1"})
    if proc.returncode:
        raise SystemExit(f"ossgguf run failed:\n{proc.stderr}")
    return json.loads(proc.stdout), loopback_bytes() - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(__file__).parent / "out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", default="8,40", help="short,long generation lengths")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from ossgguf.convert.convert import convert
    from ossgguf.runner.rpc import rpc_supported

    if not rpc_supported():
        raise SystemExit("this llama.cpp has no RPC backend: run `make setup`")
    args.workdir.mkdir(parents=True, exist_ok=True)
    gguf = args.workdir / f"synthetic-20b-{args.layers}l-mxfp4.gguf"
    if not gguf.is_file():
        ckpt, _ = synthetic_checkpoint(args.workdir, layers=args.layers)
        convert(ckpt, gguf, force=True)
    short, long = (int(x) for x in args.tokens.split(","))
    local, _ = run(gguf, long, args.threads, "--gpu-mem", "0")
    ports = [free_port(), free_port()]
    workers = [subprocess.Popen([sys.executable, "-m", "ossgguf.cli", "worker", "--port", str(p), "--threads",
                                 str(args.threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for p in ports]
    try:
        for p in ports:
            for _ in range(300):
                try:
                    socket.create_connection(("127.0.0.1", p), timeout=0.5).close()
                    break
                except OSError:
                    time.sleep(0.1)
        spec = ",".join(f"127.0.0.1:{p}" for p in ports)
        a, net_a = run(gguf, short, args.threads, "--rpc", spec)
        b, net_b = run(gguf, long, args.threads, "--rpc", spec)
        with ExitStack() as stack:  # the same runs through counting relays: llama.cpp's own bytes only
            relays = [stack.enter_context(counting_relay(p)) for p in ports]
            relayed = ",".join(f"127.0.0.1:{r}" for r, _ in relays)
            exact = []
            for n in (short, long):
                before = sum(c["sent"] + c["received"] for _, c in relays)
                u = run(gguf, n, args.threads, "--rpc", relayed)[0]["usage"]["completion_tokens"]
                exact.append((u, sum(c["sent"] + c["received"] for _, c in relays) - before))
        planned = subprocess.run([sys.executable, "-m", "ossgguf.cli", "plan", str(gguf), "--rpc", spec, "--ctx", "1024",
                                  "--json"], capture_output=True, text=True, check=True)
        predicted = json.loads(planned.stdout)["network_bytes_per_token"]
    finally:
        for w in workers:
            w.terminate()
            w.wait(10)
    gen = b["usage"]["completion_tokens"] - a["usage"]["completion_tokens"]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB: the largest child
    lt, rt = local["timings"], b["timings"]
    print(f"model: {gguf.name} ({gguf.stat().st_size / 1e9:.2f} GB), two loopback workers, {args.threads} threads each")
    print(f"prompt:     local {lt['prompt_tps']:8.1f} tok/s   rpc {rt['prompt_tps']:8.1f} tok/s   "
          f"ratio {rt['prompt_tps'] / lt['prompt_tps']:.2f}")
    print(f"generation: local {lt['generation_tps']:8.1f} tok/s   rpc {rt['generation_tps']:8.1f} tok/s   "
          f"ratio {rt['generation_tps'] / lt['generation_tps']:.2f}")
    if gen > 0:
        per_token = (net_b - net_a) / gen
        print(f"network: {per_token / 1e3:.1f} kB per generated token over loopback "
              f"({gen} tokens between the two runs); model upload at load: {net_a / 1e9:.2f} GB")
        (ua, ba), (ub, bb) = exact
        relay_token = (bb - ba) / (ub - ua) if ub > ua else float("nan")
        print(f"through counting relays (llama.cpp's RPC bytes only): {relay_token / 1e3:.1f} kB per token; "
              f"the planner (runner/network.py): {predicted / 1e3:.1f} kB; measured / planned {relay_token / predicted:.3f}")
    print(f"peak RSS of the largest process (main or worker): {peak:.2f} GiB")


if __name__ == "__main__":
    main()
