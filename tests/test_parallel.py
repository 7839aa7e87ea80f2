"""Parallel streams (`serve --parallel N`, runner/parallel.py): N requests decoded in one llama.cpp batch.

The scripted model (tests/scripted_model.py, run by llama.cpp) writes a different text for each kind
of prompt, so each stream's tokens can be checked exactly: through the real HTTP server with
`--parallel 4`, concurrent requests get what the same request gets alone, also while another stream is
cancelled. The KV cache llama.cpp allocates for N streams is checked against the plan in test_plan.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from click.testing import CliRunner
from scripted_model import Episode, Script, scripted_gguf

from ossgguf.errors import OssggufError
from ossgguf.runner.engine import Engine
from ossgguf.runner.generation import Sampling
from ossgguf.runner.parallel import Scheduler
from ossgguf.runner.plan import GiB, PlacementOptions
from ossgguf.runner.server.app import create_app
from ossgguf.runner.server.worker import Backend, GenerationRequest, Worker

openai = pytest.importorskip("openai")
test_server = pytest.importorskip("test_server")  # its ServerThread and scripted `generate`

DATE = "2025-03-14"
CPU4 = PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=1024, threads=1, parallel=4)
# what each kind of prompt makes the scripted model write: "~" and "@" in the prompt switch detectors on
QUESTIONS = ["Plain question.", "A ~ question.", "An @ question.", "Another plain one, longer than the first."]
FOREVER = 900  # tokens a request may write: far more than the others take


@pytest.fixture(scope="module")
def scripted(make_ckpt, tmp_path_factory):
    script = Script(("~", "@"), [Episode((), "<|channel|>analysis<|message|>", " la"),
                                 Episode(("~",), "<|channel|>analysis<|message|>", " xo"),
                                 Episode(("@",), "<|channel|>final<|message|>", " do re")])
    return scripted_gguf(make_ckpt(), tmp_path_factory.mktemp("parallel"), script)


@pytest.fixture(scope="module")
def engine(scripted):
    with Engine.load(scripted, CPU4) as e:
        yield e


@pytest.fixture(scope="module")
def server(engine):
    with test_server.ServerThread(create_app(engine, "tiny", date=DATE)) as srv:
        yield srv


def ask(srv, question: str, max_tokens: int = 120, seed: int = 3) -> tuple[dict, str, int]:
    """(message, finish reason, completion tokens) of a chat completion; sampled (temperature 1)."""
    client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                       max_tokens=max_tokens, seed=seed)
    return r.choices[0].message.model_dump(), r.choices[0].finish_reason, r.usage.completion_tokens


def health(srv) -> dict:
    return httpx.get(srv.base_url.removesuffix("/v1") + "/health").json()


def wait_idle(srv, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while (h := health(srv))["busy"] or h["waiting"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.02)
    return h


def test_concurrent_streams_equal_each_alone(server, engine):
    """4 requests at once through the HTTP server, decoded in shared batches, each get exactly what the
    same request gets alone; a conversation then reuses its own sequence's prefix."""
    alone = [ask(server, q) for q in QUESTIONS]
    assert len({str(m) for m, _, _ in alone}) == 3  # the detectors give three different texts
    sched = engine.scheduler
    steps, tokens = sched.steps, sched.step_tokens
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda q: ask(server, q), QUESTIONS))
    assert together == alone
    assert sched.step_tokens - tokens > sched.steps - steps  # some steps decoded several streams
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                           max_tokens=4, seed=3)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    with pytest.raises(OssggufError, match="parallel scheduler"):  # the context is the scheduler's
        next(engine.generate("<|start|>user<|message|>hi<|end|><|start|>assistant"))
    assert wait_idle(server)["busy"] is False


def test_a_cancelled_stream_leaves_the_others_alone(server, engine):
    """A streaming client that goes away mid-answer is taken out of the batch; the two requests
    decoding beside it write exactly what they write alone, and every slot is free afterwards."""
    alone = [ask(server, q, max_tokens=300) for q in QUESTIONS[1:3]]
    sched = engine.scheduler
    cancelled_before = sched.cancelled
    got = {}

    def leave_early():
        body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": FOREVER,
                "stream": True}
        with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=30) as r:
            got["chunks"] = sum(1 for i, _ in zip(range(20), r.iter_lines()))

    with ThreadPoolExecutor(3) as pool:
        others = [pool.submit(ask, server, q, 300) for q in QUESTIONS[1:3]]
        pool.submit(leave_early).result()
        assert [f.result() for f in others] == alone
    wait_idle(server)
    assert sched.cancelled == cancelled_before + 1 and got["chunks"] == 20
    assert all(s.stream is None for s in sched.slots)


def test_streams_wait_for_a_free_slot_and_go_in_order(engine):
    """More streams than slots: the rest wait; each still ends as it would alone (scheduler level)."""
    prompts = [engine.tokenize(f"<|start|>user<|message|>{q}<|end|><|start|>assistant") for q in QUESTIONS * 2]
    sched = engine.scheduler
    alone = [[c.token for c in sched.generate(p, max_tokens=30, seed=1)] for p in prompts]
    streams = [sched.generate(p, max_tokens=30, seed=1) for p in prompts]
    out: list = [None] * len(streams)

    def read(i):
        out[i] = [c.token for c in streams[i]]

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert out == alone


def test_the_worker_runs_n_jobs_at_once_and_queues_the_rest():
    script = test_server.Script("abcdefghijkl", delay=0.01)

    async def main():
        worker = Worker(Backend(generate=script, parallel=2))
        jobs = [worker.submit(GenerationRequest("p", None, Sampling())) for _ in range(5)]
        for job in jobs:
            assert [e async for e in job.events()]
        worker.close()
        return worker.served

    assert asyncio.run(main()) == 5
    assert script.max_active == 2


def test_bad_parallel_values_are_clear_errors(scripted):
    for bad in (0, 257, 2.5):
        with pytest.raises(OssggufError, match="parallel must be"):
            PlacementOptions(parallel=bad)
    from ossgguf.cli import cli

    for cmd in (["serve", str(scripted), "--parallel", "0"], ["plan", str(scripted), "--parallel", "300"]):
        r = CliRunner().invoke(cli, cmd)
        assert r.exit_code == 2 and "Invalid value for '--parallel'" in r.output, r.output
    r = CliRunner().invoke(cli, ["plan", str(scripted), "--parallel", "4", "--gpu-mem", "0", "--ctx", "1024"])
    assert r.exit_code == 0 and "4 parallel streams" in r.output and "x 4 streams" in r.output, r.output


def test_one_scheduler_per_engine(engine):
    with pytest.raises(OssggufError, match="already has"):
        Scheduler(engine)


def test_another_adapter_set_waits_for_an_empty_batch(make_ckpt, make_gguf, tmp_path):
    """llama.cpp sets LoRA adapters per context: a stream with another set starts only once the batch is
    empty, and nobody overtakes it; streams of one set give the same tokens before and after a switch."""
    pytest.importorskip("peft")
    from test_lora import ALL_ACTIVE, ATTN, EXPERTS, make_adapter

    from ossgguf.convert.lora import convert_lora

    ckpt, gguf = make_ckpt(layout="bf16", **ALL_ACTIVE), make_gguf("mxfp4", **ALL_ACTIVE)
    peft = make_adapter(ckpt, tmp_path / "peft", r=8, lora_alpha=16, target_modules=ATTN, target_parameters=EXPERTS)
    adapter = convert_lora(peft, tmp_path / "a.gguf", base=gguf).plan.shards[0].path
    opts = PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=256, threads=1, parallel=3, lora=(str(adapter),))
    with Engine.load(gguf, opts) as e:
        sched = Scheduler(e)
        prompt = e.tokenize("<|start|>user<|message|>Hi<|end|><|start|>assistant")
        # as loaded, the base alone (the adapter left out), as loaded again
        streams = [sched.generate(prompt, max_tokens=40, seed=1, adapters=a) for a in (None, (None,), None)]
        tokens: list[list[int]] = [[], [], []]

        def read(i):
            tokens[i] = [c.token for c in streams[i]]

        threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    # when each joined the batch (the scheduler's clock) against when the one before it ended
    ended = [st.t1 + st.usage.generation_seconds for st in streams]
    assert streams[1].t0 >= ended[0] and streams[2].t0 >= ended[1]
    assert tokens[0] == tokens[2]


def test_cancelling_a_prompt_being_read_removes_its_sequence(scripted):
    """A long prompt is read in n_ubatch chunks between the other streams' steps; cancelled halfway, its
    sequence is removed (nothing half-read stays in the cache) and the stream beside it is unchanged."""
    from ossgguf.runner.llama_ctypes import llama_cpp_module

    opts = PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=1024, threads=1, parallel=2, ubatch=8, cache_ram=0)
    with Engine.load(scripted, opts) as e:
        sched = Scheduler(e)
        short = e.tokenize(f"<|start|>user<|message|>{QUESTIONS[2]}<|end|><|start|>assistant")
        long = e.tokenize("<|start|>user<|message|>" + "word " * 300 + "<|end|><|start|>assistant")
        alone = [c.token for c in sched.generate(short, max_tokens=200, seed=1)]
        e_short = sched.generate(short, max_tokens=200, seed=1)
        e_long = sched.generate(long, max_tokens=5, seed=1)
        got = []
        for c in e_short:
            got.append(c.token)
            if len(got) == 5:
                with sched._cond:  # the scheduler waits at its next round: the long prompt is still being read
                    assert any(s.stream is e_long and e_long.todo for s in sched.slots)
                    e_long.cancel()
        end = list(e_long)[-1]
        assert 800 < len(long) < 1000
        (slot,) = [s for s in sched.slots if not s.held]  # the other holds the short conversation
        lc = llama_cpp_module()
        pos_max = lc.llama_memory_seq_pos_max(lc.llama_get_memory(e._ctx), slot.seq.seq)
    assert got == alone
    assert end.finish_reason == "cancelled" and end.usage.completion_tokens == 0
    assert sched.cancelled == 1 and pos_max == -1


def test_slots_share_the_ram_cache(scripted):
    """Three conversations on two slots: the third takes the least recently used slot, whose conversation
    goes to the RAM cache; that conversation's next turn comes back, into the other slot, with all it
    held reused and the same continuation."""
    opts = PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=1024, threads=1, parallel=2, cache_ram=64 * 2**20)
    with Engine.load(scripted, opts) as e:
        sched = Scheduler(e)
        convs = [e.tokenize(f"<|start|>user<|message|>{name} " + "word " * 60 + "<|end|><|start|>assistant")
                 for name in ("Ann", "Bob", "Cy")]

        def run(prompt):
            chunks = list(sched.generate(prompt, max_tokens=6, seed=1))
            return chunks[-1].usage.cached_tokens, [c.token for c in chunks if c.token is not None]

        first = [run(p) for p in convs]
        # Ann's next turn: her first prompt, the answer, a new message
        held = len(convs[0]) + len(first[0][1]) - 1  # the answer's last token was sampled, never decoded
        cached, tokens = run(convs[0] + first[0][1] + e.tokenize("<|end|><|start|>user<|message|>More.<|end|>"
                                                                 "<|start|>assistant"))
        cache = e.prompt_cache
        assert (cache.saved, cache.restored) == (2, 1)  # Ann's state out (for Cy), Bob's out (for Ann), Ann's in
    assert cached == held and tokens == first[0][1]


def test_a_waiting_stream_cancelled_ends_at_once(engine):
    """A stream waiting for a slot that is cancelled ends without waiting for one (its reader, a server
    thread, is free again at once)."""
    sched = engine.scheduler
    prompt = engine.tokenize(f"<|start|>user<|message|>{QUESTIONS[0]}<|end|><|start|>assistant")
    with sched._cond:  # the scheduler waits at its next round: all four take slots in the same one
        busy = [sched.generate(prompt, max_tokens=FOREVER - 100, seed=i) for i in range(4)]
        waiting = sched.generate(prompt, max_tokens=5)
    first = [next(s) for s in busy]  # all four are decoding
    waiting.cancel()
    end = list(waiting)[-1]
    still = sum(s.stream is not None for s in sched.slots)
    for s in busy:
        s.cancel()
        assert list(s)[-1].finish_reason == "cancelled"
    assert end.finish_reason == "cancelled" and end.usage.completion_tokens == 0
    assert still == 4 and all(c.token is not None for c in first)
