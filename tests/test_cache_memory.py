"""The prompt cache's memory stays bounded (issue 12, "Memory"): many conversations through the server
with `--parallel 2` and a RAM cache far smaller than they need save, evict and restore, and after every
request the cache's bytes (counted here from the entries' own buffers, not from its `nbytes`) stay
within the budget, its entries within what the budget can hold, and each sequence's checkpoints within
their limit. The long run (200 requests, the server's RSS against the plan) is bench/bench_cache_memory.py.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading

import httpx
import pytest

from ossgguf.runner.engine import Engine
from ossgguf.runner.plan import GiB, PlacementOptions
from ossgguf.runner.prompt_cache import N_CHECKPOINTS, PromptCache, cache_budget, plan_checkpoint_bytes
from ossgguf.runner.server.app import create_app

openai = pytest.importorskip("openai")
test_server = pytest.importorskip("test_server")  # its ServerThread

DATE = "2025-03-14"
CPU2 = PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=2048, threads=1, ubatch=64, parallel=2)
WORDS = "sun rain wind cloud snow storm fog hail frost dew mist gale".split()
CONVERSATIONS, TURNS = 12, 4


@pytest.fixture(scope="module")
def model(make_gguf):
    """Random weights, a 16-token window: the tokens do not matter here, the states' sizes do."""
    return make_gguf(num_hidden_layers=3, seed=5, sliding_window=16)


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def counted(cache: PromptCache) -> int:
    """The bytes the cache holds, from the buffers themselves: each state and each of its checkpoints."""
    return sum(len(e.data) + sum(len(c.data) for c in e.checkpoints.items) for e in cache.entries)


def entry_size(model) -> int:
    """The RAM one saved conversation of the kind below takes (its start and a turn read)."""
    with Engine.load(model, dataclasses.replace(CPU2, parallel=1), cache_ram=0) as probe:
        prompt = probe.tokenize(f"<|start|>system<|message|>{words(150, 0)}<|end|>"
                                f"<|start|>user<|message|>{words(10, 1)}<|end|><|start|>assistant")
        list(probe.generate(prompt, max_tokens=1, temperature=0))
        probe._seq.ram = PromptCache(2**40)
        probe._seq.save(probe._tokens)
        return probe._seq.ram.entries[0].nbytes


def test_many_conversations_keep_the_ram_cache_within_its_budget(model):
    """12 conversations x 4 growing turns, two clients at once in a seeded random order: the cache saves
    far more states than it can hold; its bytes never pass the budget and old entries are evicted."""
    size = entry_size(model)
    budget = 3 * size  # room for ~3 of the 12 conversations: the LRU must evict
    with Engine.load(model, CPU2, cache_ram=budget) as e, \
            test_server.ServerThread(create_app(e, "tiny", date=DATE)) as srv:
        cache = e.prompt_cache
        assert cache.budget == budget
        lock, seen, failures = threading.Lock(), [], []

        def check() -> None:
            with lock:  # a moment's snapshot; the scheduler's thread may be saving meanwhile
                health = httpx.get(srv.base_url.removesuffix("/v1") + "/health").json()["prompt_cache"]
                seen.append((counted(cache), len(cache), min((en.nbytes for en in cache.entries), default=size), health))

        def client(convs: list[int], seed: int | None) -> list[int]:
            """Each conversation TURNS times, in a seeded random order (None: as given, once each);
            the cached tokens of each request."""
            api = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0)
            chats = {c: [{"role": "system", "content": words(150, 100 + c)}] for c in convs}
            order = convs if seed is None else [c for c in convs for _ in range(TURNS)]
            if seed is not None:
                random.Random(seed).shuffle(order)
            cached = []
            try:
                for c in order:
                    msgs = chats[c]
                    msgs.append({"role": "user", "content": f"{c}: {words(10, len(msgs))}"})
                    r = api.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, temperature=0)
                    cached.append(r.usage.prompt_tokens_details.cached_tokens)
                    msgs.append({"role": "assistant", "content": f"answer {len(msgs)}"})
                    check()
            except Exception as exc:  # noqa: BLE001  (reported below, with the test's own assertion)
                failures.append(exc)
            return cached

        threads = [threading.Thread(target=client, args=(list(range(k, CONVERSATIONS, 2)), k)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures
        saved, evicted = cache.saved, cache.evicted
        # the cache still serves after all that: A, B, C, A from one client (two slots: C's request puts A
        # in RAM, A's takes it back) reads A's second turn from the cache
        restored = cache.restored
        cached = client([100, 101, 102, 100], None)
        assert not failures, failures
        assert cache.restored > restored and cached[-1] > 0, (cache.restored, cached)
        assert e.scheduler is not None  # --parallel 2: the server's requests went through its slots
        assert all(len(slot.seq.checkpoints.items) <= N_CHECKPOINTS for slot in e.scheduler.slots)
        assert all(len(en.checkpoints.items) <= N_CHECKPOINTS for en in cache.entries)
        assert counted(cache) == cache.nbytes <= budget
    assert len(seen) == CONVERSATIONS * TURNS + 4
    for nbytes, n, smallest, health in seen:
        assert nbytes <= budget, (nbytes, budget)
        assert n <= budget // smallest, (n, smallest)
        assert health["budget"] == budget and health["bytes"] <= budget
    # many more states went in than the budget holds: the bound above came from evicting them
    assert saved > 2 * (budget // size) and evicted > budget // size, (saved, evicted, budget // size)


def test_plan_json_counts_the_prompt_cache(model):
    """`plan --json` gives the RAM the prompt cache may add (what the benchmark holds RSS to): the
    checkpoints of every stream and the --cache-ram budget, as the engine sizes them."""
    from click.testing import CliRunner

    from ossgguf.cli import cli
    from ossgguf.runner.plan import plan

    args = ["plan", str(model), "--gpu-mem", "0", "--ram", "16GiB", "--ctx", "2048", "--ubatch", "64",
            "--parallel", "2", "--cache-ram", "3MiB", "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    p = plan(model, PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=2048, ubatch=64, parallel=2, cache_ram=3 * 2**20))
    assert got["prompt_cache"] == {"budget": 3 * 2**20, "checkpoint_bytes": plan_checkpoint_bytes(p)}
    assert got["prompt_cache"]["checkpoint_bytes"] == 2 * plan_checkpoint_bytes(p, n_seq=1) > 0
    assert got["ram_bytes"] == p.ram_bytes and cache_budget(p, None) > 0
