"""Workers on loopback through llama.cpp's RPC backend: what they run matches a local run.

The reference is the same llama.cpp in this process with every tensor on the CPU (repacking off, as
RPC workers keep plain CPU buffers), computed in the same run; llama.cpp's own log says where each
buffer went.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pytest
from serving import free_port, wait_healthy, wait_listening

from ossgguf.build import read_record
from ossgguf.errors import OssggufError
from ossgguf.fixtures.relay import counting_relay
from ossgguf.runner import rpc

# `make setup` always builds RPC in (ossgguf/build.py): there, a build without it is a failure. Only a
# venv that setup did not build (no record of it) may lack RPC.
pytestmark = pytest.mark.skipif(not rpc.rpc_supported() and read_record() is None,
                                reason="llama-cpp-python was not installed by `make setup`: " + rpc.NOT_BUILT)


@pytest.fixture(autouse=True)
def _rpc_built():
    assert rpc.rpc_supported(), rpc.NOT_BUILT
PROMPT = "The quick brown fox jumps over the lazy dog, and the dog does not mind."


@contextmanager
def worker(*args: str, port: int | None = None):
    """`ossgguf worker` as a user starts it; yields (port, process) once it accepts connections."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ossgguf.cli", "worker", "--port", str(port), *args],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(port, proc, proc.stderr.read)
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(10)


LOGITS_CHILD = """
import json, sys
import numpy as np
from ossgguf.runner.engine import Engine
from ossgguf.runner.llama_ctypes import LLAMA_LOG, llama_cpp_module, parse_buffer_lines

model, rpc, out = sys.argv[1:4]
with LLAMA_LOG.capture() as lines:
    eng = Engine.load(model, ctx=256, **({"rpc": rpc} if rpc else {"gpu_mem": 0}))
with eng:
    eng._decode(eng.tokenize_text(sys.argv[4]), want_logits=True)
    lc = llama_cpp_module()
    n = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(eng._model))
    np.save(out, np.ctypeslib.as_array(lc.llama_get_logits_ith(eng._ctx, -1), shape=(n,)).astype(np.float64))
print(json.dumps([[b.buffer, b.kind, b.bytes] for b in parse_buffer_lines([line for _, line in lines])]))
"""


def _last_logits(model: Path, tmp_path: Path, rpc_list: str = "") -> tuple[np.ndarray, list]:
    """The last token's logits and llama.cpp's buffer lines, from a child process: llama.cpp keeps RPC
    devices registered for the life of the process, so a worker that has exited would abort any later
    device listing in this one (the tests that follow list devices)."""
    out = tmp_path / f"logits{len(rpc_list)}.npy"
    env = {**os.environ, "OSSGGUF_NO_REPACK": "1"}
    proc = subprocess.run([sys.executable, "-c", LOGITS_CHILD, str(model), rpc_list, str(out), PROMPT],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return np.load(out), json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_workers_compute_what_the_cpu_computes(make_gguf, tmp_path):
    model = make_gguf()
    local, local_bufs = _last_logits(model, tmp_path)
    assert {buf for buf, _, _ in local_bufs} <= {"CPU", "CPU_Mapped"}
    with ExitStack() as stack:
        ports = [stack.enter_context(worker())[0] for _ in range(2)]
        remote, bufs = _last_logits(model, tmp_path, ",".join(f"127.0.0.1:{p}" for p in ports))
    hosts = {buf for buf, kind, size in bufs if kind == "model" and size > 0}
    assert {f"RPC0[127.0.0.1:{p}]" for p in ports} <= hosts, bufs  # both workers hold layers
    p, q = np.exp(local - local.max()), np.exp(remote - remote.max())
    p, q = p / p.sum(), q / q.sum()
    kl = float(np.sum(p * (np.log(p) - np.log(q))))
    assert kl < 1e-6 and local.argmax() == remote.argmax(), (kl, np.abs(local - remote).max())


def test_run_over_rpc_answers_like_a_local_run(make_ckpt, tmp_path):
    """Greedy tokens on the scripted model: the same text through `ossgguf run --rpc` and locally."""
    from scripted_model import Episode, Script, scripted_gguf

    model = scripted_gguf(make_ckpt(), tmp_path, Script((), [Episode((), "<|channel|>final<|message|>Just words.<|return|>")]))
    env = {**os.environ, "OSSGGUF_NO_REPACK": "1"}

    def run(*extra: str) -> str:
        out = subprocess.run([sys.executable, "-m", "ossgguf.cli", "run", str(model), "-p", "hi", "--temp", "0",
                              "--ctx", "256", *extra], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    local = run("--gpu-mem", "0")
    with worker() as (port, _):
        remote = run("--rpc", f"127.0.0.1:{port}")
    assert local.strip() == remote.strip() == "Just words."


def test_compare_checks_a_worker_against_a_local_run(make_gguf):
    """`ossgguf compare M M --rpc ...`: the candidate on two workers, the reference here; by compare's
    own metrics the two runs agree (repacking off: workers keep plain CPU buffers)."""
    model = make_gguf()
    env = {**os.environ, "OSSGGUF_NO_REPACK": "1"}
    with ExitStack() as stack:
        ports = [stack.enter_context(worker())[0] for _ in range(2)]
        out = subprocess.run([sys.executable, "-m", "ossgguf.cli", "compare", str(model), str(model), "--ctx", "64",
                              "--json", "--rpc", ",".join(f"127.0.0.1:{p}" for p in ports)],
                             capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["n_tokens"] > 10 and r["top1_agreement"] == 1.0 and r["kl_max"] < 1e-6, r


def test_probe_agrees_with_llama_cpps_client():
    """The Python HELLO/device-memory probe reads what llama.cpp's own client reads from a worker."""
    import ctypes

    lib = rpc._rpc_lib()
    lib.ggml_backend_rpc_get_device_memory.argtypes = [ctypes.c_char_p, ctypes.c_uint32,
                                                       ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    with worker() as (port, _):
        ep = rpc.Endpoint("127.0.0.1", port)
        w = rpc.probe(ep)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        lib.ggml_backend_rpc_get_device_memory(str(ep).encode(), 0, ctypes.byref(free), ctypes.byref(total))
        again = rpc.probe(ep)  # the worker goes on serving after each client leaves
    assert w.version[:2] == rpc.PROTOCOL and len(w.memory) == 1
    assert w.memory[0][1] == total.value == again.memory[0][1] > 0


@contextmanager
def fake_endpoint(reply):
    """A TCP server on loopback that reads one request and answers `reply(request)` (None: silence)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(64)
                answer = reply(data)
                if answer is None:
                    stop.wait(10)
                else:
                    conn.sendall(answer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield rpc.Endpoint("127.0.0.1", srv.getsockname()[1])
    finally:
        stop.set()
        srv.close()


@pytest.mark.parametrize("reply,match", [
    (lambda req: struct.pack("<Q4B", 28, 6, 0, 0, 0) + bytes(24), "speaks RPC protocol 6.0.0"),
    (lambda req: b"HTTP/1.1 400 Bad Request\r\n\r\n", "is not an ossgguf/llama.cpp RPC worker"),
    (lambda req: b"", "is not an ossgguf/llama.cpp RPC worker"),
    (lambda req: None, "does not answer within"),
])
def test_a_wrong_or_silent_endpoint_is_refused_before_llama_cpp_sees_it(reply, match, make_gguf):
    """llama.cpp's client would abort the process on each of these: the probe must refuse first."""
    from ossgguf.runner.engine import Engine

    with fake_endpoint(reply) as ep:
        if reply(b"") is None:
            with pytest.raises(OssggufError, match=match):
                rpc.probe(ep, timeout=1.0)
        else:
            with pytest.raises(OssggufError, match=match):
                Engine.load(make_gguf(), ctx=256, rpc=str(ep))


CHILD = """
import sys
from ossgguf.runner.engine import Engine
eng = Engine.load(sys.argv[1], ctx=256, rpc=sys.argv[2])
print("READY", flush=True)
toks = eng.tokenize_text("hello there")
while True:
    eng.reset()
    eng._decode(toks, want_logits=True)
"""


def test_a_worker_that_dies_mid_run_ends_the_run_with_one_line(make_gguf):
    """GGML_ABORT inside llama.cpp's RPC client: one line that names the worker, no hang, no backtrace."""
    model = make_gguf()
    env = {**os.environ, "OSSGGUF_NO_REPACK": "1"}
    with worker() as (port, wproc):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(model), f"127.0.0.1:{port}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert child.stdout.readline().strip() == "READY", child.stderr.read()
            time.sleep(0.5)
            wproc.kill()
            rc = child.wait(30)
        finally:
            child.kill()
    err = child.stderr.read()
    assert rc == 134 and f"lost the RPC worker at 127.0.0.1:{port}" in err, err
    assert "backtrace" not in err.lower() and err.count("error:") == 1, err


def test_unreachable_worker_is_a_clear_error(make_gguf):
    from ossgguf.runner.engine import Engine

    port = free_port()  # nothing listens there
    with pytest.raises(OssggufError, match=f"no worker answers at 127.0.0.1:{port}.*ossgguf worker"):
        Engine.load(make_gguf(), ctx=256, rpc=f"127.0.0.1:{port}")


@pytest.mark.parametrize("text,match", [("nohost", None), ("a:1,a:1", "twice"), ("a:0", "HOST:PORT"),
                                        ("a:99999", "HOST:PORT"), (":50052", "HOST:PORT"), (",", "one or more")])
def test_endpoints_are_checked(text, match):
    if match is None:
        assert rpc.parse_endpoints(text) == [rpc.Endpoint("nohost", rpc.DEFAULT_PORT)]
        return
    with pytest.raises(OssggufError, match=match):
        rpc.parse_endpoints(text)


def test_worker_warns_off_loopback_and_refuses_a_busy_port():
    with worker("--host", "0.0.0.0") as (port, proc):
        time.sleep(0.5)
    assert "no authentication" in proc.stderr.read()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "ossgguf.cli", "worker", "--port", str(port)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "could not listen on 127.0.0.1" in out.stderr, out.stderr


TRAFFIC_CHILD = """
import json, sys
from ossgguf.runner import network
from ossgguf.runner.engine import Engine
from ossgguf.runner.plan import PlacementOptions, plan

model, rpc, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
eng = Engine.load(model, ctx=256, rpc=rpc)
toks = eng.tokenize_text("The quick brown fox")
eng._decode(toks, want_logits=True)
eng._decode([toks[-1]], want_logits=True)  # the first one-token graph is sent whole; later steps reuse it
p = plan(model, PlacementOptions(ctx=256, rpc=rpc))
print(json.dumps([network.token_traffic(p, len(toks) + 1 + k) for k in range(steps)]), flush=True)
sys.stdin.readline()  # the test reads the counters here: loading and the prompt are behind us
for k in range(steps):
    eng._decode([toks[-1]], want_logits=True)  # one decoded token, its logits back, as generation does
print("DONE", flush=True)
sys.stdin.readline()
"""


def test_the_planners_network_bytes_per_token_are_what_llama_cpp_sends(make_gguf):
    """runner/network.py's bytes per decoded token against the bytes llama.cpp's RPC client moved
    through a counting relay, for the same placement (every layer and the output on one worker). The
    planner counts a step that reuses the graph; a changed graph (the first one-token step, then every
    256 cells) is sent whole once, which a long generation spreads thin."""
    model, steps = make_gguf(), 24
    env = {**os.environ, "OSSGGUF_NO_REPACK": "1"}
    with worker() as (port, _), counting_relay(port) as (relay, counts):
        child = subprocess.Popen([sys.executable, "-c", TRAFFIC_CHILD, str(model), f"127.0.0.1:{relay}", str(steps)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env)
        watchdog = threading.Timer(120, child.kill)  # a hang fails the test instead of stalling the suite
        watchdog.start()
        try:
            predicted = [next(iter(t.values())) for t in json.loads(child.stdout.readline() or "null")]
            before = counts["sent"] + counts["received"]
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "DONE", child.stderr.read()
            time.sleep(0.2)
            measured = counts["sent"] + counts["received"] - before
            child.stdin.write("\n")
            child.stdin.flush()
            child.wait(30)
        finally:
            watchdog.cancel()
            child.kill()
    assert abs(measured - sum(predicted)) <= 0.05 * measured, (measured / steps, sum(predicted) / steps)


def test_a_server_whose_worker_dies_stops_with_one_line(make_gguf):
    """The approach chosen (docs/rpc.md): llama.cpp's RPC client aborts the process when a worker is
    lost, so `serve --rpc` stops with one line naming the worker (for a supervisor to restart it);
    it does not hang a client's request forever."""
    import httpx

    model, port = make_gguf(), free_port()
    env = {**os.environ, "OSSGGUF_NO_REPACK": "1", "PYTHONUNBUFFERED": "1"}
    with worker() as (wport, wproc):
        server = subprocess.Popen([sys.executable, "-m", "ossgguf.cli", "serve", str(model), "--port", str(port),
                                   "--ctx", "256", "--rpc", f"127.0.0.1:{wport}"], stderr=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, text=True, env=env)
        try:
            wait_healthy(port, server, server.stderr.read)
            wproc.kill()
            wproc.wait(10)
            try:  # the connection ends with the server
                r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                               json={"model": model.stem, "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 8})
                raise AssertionError(f"answered {r.status_code}: {r.text[:500]}")
            except httpx.TransportError:
                pass
            rc = server.wait(30)
        finally:
            server.kill()
    err = server.stderr.read()
    assert rc == 134 and f"lost the RPC worker at 127.0.0.1:{wport}" in err, err[-2000:]
    assert "backtrace" not in err.lower(), err[-2000:]
