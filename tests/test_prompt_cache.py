"""The prompt cache (runner/prompt_cache.py) on llama.cpp: window checkpoints that let a chat resume
where harmony drops the previous analysis, saved prompts in RAM across interleaved conversations, and
restored states that continue as a freshly read prompt would (llama.cpp's logits, same run)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from scripted_model import Episode, Script, scripted_gguf

from ossgguf.errors import OssggufError
from ossgguf.runner.chat import Conversation
from ossgguf.runner.engine import Engine
from ossgguf.runner.llama_ctypes import llama_cpp_module
from ossgguf.runner.plan import GiB, PlacementOptions
from ossgguf.runner.prompt_cache import Checkpoints, PromptCache

DATE = "2025-03-14"
# one thread: a model this small runs faster without the threads waiting on each other (and on other jobs)
CPU = PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=2048, threads=1)
ANALYSIS = 1100  # analysis tokens per turn: far more than the window layers keep (128 + a 512 batch)


@pytest.fixture(scope="module")
def thinker(make_ckpt, tmp_path_factory):
    """A scripted model with gpt-oss's 128-token window that reasons forever (" la la ..." in analysis)."""
    script = Script((), [Episode((), "<|channel|>analysis<|message|>", " la")])
    return scripted_gguf(make_ckpt(sliding_window=128), tmp_path_factory.mktemp("thinker"), script)


@pytest.fixture(scope="module")
def model(make_gguf):
    """Random weights, a 16-token window: what a restored state computes is compared with llama.cpp's own."""
    return make_gguf(num_hidden_layers=3, seed=5, sliding_window=16)


def greedy(e: Engine, prompt: list[int], n: int) -> tuple[list[int], int]:
    chunks = list(e.generate(prompt, max_tokens=n, temperature=0))
    return [c.token for c in chunks if c.token is not None], chunks[-1].usage.cached_tokens


def chat_turns(e: Engine, turns: int) -> list[tuple[int, int, list[int]]]:
    """A chat whose every turn reasons ANALYSIS tokens; the client sends the answer back with its
    reasoning, and harmony drops that reasoning from the next prompt. (prompt, cached, tokens) per turn."""
    conv = Conversation(date=DATE)
    out = []
    for k in range(turns):
        conv.add_user(question(k))
        prompt = conv.tokens(e)
        tokens, cached = greedy(e, prompt, ANALYSIS)
        out.append((len(prompt), cached, tokens))
        conv.messages.append({"role": "assistant", "content": answer(k), "thinking": e.detokenize(tokens)})
    return out


def question(k: int) -> str:
    return f"Question {k}: what is {k} plus {k}?"


def answer(k: int) -> str:
    return f"It is {2 * k}."


def test_a_chat_reads_only_its_new_tokens_after_long_reasoning(thinker):
    """From turn 2 on, each turn processes the user message, the previous answer and their headers,
    not the history: the window checkpoint at the end of the previous prompt (where the dropped analysis
    began) is restored. Without checkpoints the same chat reads its whole prompt every turn."""
    with Engine.load(thinker, CPU, cache_ram=64 * 2**20) as e:
        turns = chat_turns(e, 6)
        assert e.prompt_cache.saved == 0  # a harmony cut continues the conversation: nothing to save
        # harmony's text between the previous prompt's `<|start|>assistant` and the new one's end
        new = [len(e.tokenize(f"<|channel|>final<|message|>{answer(k - 1)}<|end|>"
                              f"<|start|>user<|message|>{question(k)}<|end|><|start|>assistant")) for k in range(6)]
    prompts = [n for n, _, _ in turns]
    assert all(len(t) == ANALYSIS for _, _, t in turns)
    assert turns[0][1] == 0
    for k in range(1, 6):
        assert turns[k][1] == prompts[k - 1], f"turn {k + 1} reused {turns[k][1]} of {prompts[k - 1]} tokens"
        assert prompts[k] - turns[k][1] == new[k]  # the new messages only
    with Engine.load(thinker, CPU, cache_ram=0, checkpoints=0) as e:
        before = chat_turns(e, 2)
    assert [c for _, c, _ in before] == [0, 0]  # what the engine did before checkpoints
    assert before == [(n, 0, t) for n, _, t in turns[:2]]  # greedy tokens equal those after a fresh read


def logits(e: Engine) -> np.ndarray:
    lc = llama_cpp_module()
    n = lc.llama_vocab_n_tokens(e._vocab)
    ptr = lc.llama_get_logits_ith(e._ctx, -1)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (n,)).astype(np.float64)


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp = p_logits - np.logaddexp.reduce(p_logits)
    lq = q_logits - np.logaddexp.reduce(q_logits)
    return float(np.sum(np.exp(lp) * (lp - lq)))


def last_logits(e: Engine, prompt: list[int]) -> tuple[np.ndarray, int]:
    chunks = list(e.generate(prompt, max_tokens=1, temperature=0))
    return logits(e), chunks[-1].usage.cached_tokens


def one_and_two_batches(e: Engine, prompt: list[int], cut: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's logits for `prompt` read in one go, and in two (the first `cut` tokens, then the rest)."""
    e.reset()
    one, _ = last_logits(e, prompt)
    e.reset()
    last_logits(e, prompt[:cut])
    two, cached = last_logits(e, prompt)
    assert cached == cut
    e.reset()
    return one, two


def text_ids(e: Engine, n: int, seed: int, lead: str = "") -> list[int]:
    words = np.random.default_rng(seed).choice(["sun", "rain", "wind", "cloud", "snow", "storm", "fog"], n)
    return e.tokenize_text(lead + " ".join(words))[:n]


def test_a_restored_checkpoint_continues_as_a_fresh_prompt(model):
    """Back to a checkpoint 300 tokens (beyond the 16 + 64 window cells) behind the end: the logits of
    the new prompt's last token are within llama.cpp's own one-batch vs two-batch difference."""
    with Engine.load(model, CPU, ubatch=64, cache_ram=0) as e:
        a, x, y = text_ids(e, 200, 1), text_ids(e, 300, 2, "Then"), text_ids(e, 40, 3, "But")
        assert x[0] != y[0]
        last_logits(e, a)
        _, cached = last_logits(e, a + x)
        assert cached == len(a)
        restored, cached = last_logits(e, a + y)
        assert cached == len(a)  # from the checkpoint at the end of `a`
        one, two = one_and_two_batches(e, a + y, len(a))
    assert kl(one, restored) <= kl(one, two) * 1.5 + 1e-9, (kl(one, restored), kl(one, two))


def test_interleaved_conversations_resume_from_ram(model):
    """A, B, A, B: each request after the first two restores its conversation from the RAM cache
    and reads only its new tokens; the logits equal a fresh read within llama.cpp's batch difference."""
    with Engine.load(model, CPU, ubatch=64, cache_ram=256 * 2**20) as e:
        a, b = text_ids(e, 300, 4), text_ids(e, 300, 5)
        more = [text_ids(e, 20, 10 + i) for i in range(4)]
        last_logits(e, a)
        last_logits(e, b)
        ra, cached_a = last_logits(e, a + more[0])
        rb, cached_b = last_logits(e, b + more[1])
        assert (cached_a, cached_b) == (len(a), len(b))
        _, cached_a = last_logits(e, a + more[0] + more[2])
        assert cached_a == len(a) + len(more[0])
        assert e.prompt_cache.restored == 3 and len(e.prompt_cache) >= 1
        one, two = one_and_two_batches(e, b + more[1], len(b))
    assert kl(one, rb) <= kl(one, two) * 1.5 + 1e-9, (kl(one, rb), kl(one, two))


def test_without_a_ram_cache_interleaving_reads_everything(model):
    with Engine.load(model, CPU, ubatch=64, cache_ram=0) as e:
        a, b = text_ids(e, 300, 4), text_ids(e, 300, 5)
        last_logits(e, a)
        last_logits(e, b)
        _, cached = last_logits(e, a + text_ids(e, 20, 10))
    assert cached == 0 and e.prompt_cache is None


def test_a_state_of_another_model_or_context_size_is_refused(model, make_gguf):
    """Entries are keyed by model files, context size and adapters: another engine never takes them,
    and restoring one by hand is an error."""
    cache = PromptCache(256 * 2**20)
    other_model = make_gguf(num_hidden_layers=3, seed=6, sliding_window=16)
    with Engine.load(model, CPU, ubatch=64, prompt_cache=cache) as e:
        a, b = text_ids(e, 200, 4), text_ids(e, 200, 5)
        last_logits(e, a)
        last_logits(e, b)  # saves `a`
    assert len(cache) == 1
    entry = cache.entries[0]
    for path, ctx in ((model, 1024), (other_model, 2048)):
        with Engine.load(path, CPU, ctx=ctx, ubatch=64, prompt_cache=cache) as e:
            assert e._seq.key != entry.key
            _, cached = last_logits(e, a + b)
            assert cached == 0 and cache.restored == 0
            with pytest.raises(OssggufError, match="another model, context size or adapter set"):
                e._seq.restore(entry)
    assert entry.key.adapters == ()


def test_the_ram_cache_stays_within_its_budget(model):
    """Least recently used entries go first; a state larger than the whole budget is not kept."""
    with Engine.load(model, CPU, ubatch=64, cache_ram=0) as probe:
        a = text_ids(probe, 300, 4)
        last_logits(probe, a)
        probe._seq.ram = PromptCache(2**40)
        probe._seq.save(probe._tokens)
        size = probe._seq.ram.entries[0].nbytes
    budget = int(size * 2.5)
    with Engine.load(model, CPU, ubatch=64, cache_ram=budget) as e:
        convs = [text_ids(e, 300, 20 + i) for i in range(5)]
        for c in convs:
            last_logits(e, c)
            assert e.prompt_cache.nbytes <= budget
        assert len(e.prompt_cache) == 2 and e.prompt_cache.evicted == 2
        assert [en.tokens[:5] for en in e.prompt_cache.entries] == [convs[2][:5], convs[3][:5]]
    with Engine.load(model, CPU, ubatch=64, cache_ram=size // 2) as e:
        for c in convs[:2]:
            last_logits(e, c)
        assert len(e.prompt_cache) == 0


def test_checkpoints_are_bounded():
    cps = Checkpoints(limit=3)
    from ossgguf.runner.prompt_cache import Checkpoint

    for n in (10, 20, 30, 40, 40):
        cps.add(Checkpoint(n, max(0, n - 20), bytearray(8)))
    assert [c.n_tokens for c in cps.items] == [20, 30, 40]
    assert cps.best(35, 16).n_tokens == 30 and cps.best(19, 16) is None
    cps.truncate(25)
    assert [c.n_tokens for c in cps.items] == [20]


def test_interleaved_conversations_through_the_server_read_only_their_new_tokens(thinker):
    """Two chats through the OpenAI API, A, B, A, B, A, B, each turn reasoning beyond the window: every
    request after the first two reports its previous prompt as cached (usage.prompt_tokens_details) and
    reads only the new messages; B's first reuses what it shares with A's (all but its last message)."""
    openai = pytest.importorskip("openai")
    from test_server import ServerThread

    from ossgguf.runner.server.app import create_app

    with Engine.load(thinker, CPU, cache_ram=64 * 2**20) as e, \
            ServerThread(create_app(e, "thinker", date=DATE)) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0)
        chats: dict[str, list[dict]] = {"A": [], "B": []}
        seen: dict[str, list[tuple[int, int]]] = {"A": [], "B": []}
        for k in range(3):
            for name, msgs in chats.items():
                msgs.append({"role": "user", "content": f"{name}: {question(k)}"})
                r = client.chat.completions.create(model="thinker", messages=msgs, max_tokens=800, temperature=0)
                assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 800
                seen[name].append((r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
                msgs.append({"role": "assistant", "content": answer(k)})
        # B's first prompt differs from A's only in its last message: it keeps all before that message
        # (the window checkpoint at each prompt's last message), and reads that message and the header
        last = len(e.tokenize(f"<|start|>user<|message|>B: {question(0)}<|end|><|start|>assistant"))
    assert seen["A"][0][1] == 0 and seen["B"][0][1] == seen["B"][0][0] - last > 0, seen
    for name, turns in seen.items():
        assert [cached for _, cached in turns[1:]] == [prompt for prompt, _ in turns[:-1]], (name, turns)


def test_plan_counts_the_cache_and_the_option_is_checked(model):
    from ossgguf.runner.plan import plan
    from ossgguf.runner.prompt_cache import plan_checkpoint_bytes

    p = plan(model, PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=2048, ubatch=64))
    # 256 window cells (16 + 64, padded) of the tiny model's window layers, 8 times
    m = p.model
    per_checkpoint = 256 * m.n_head_kv * (m.head_dim_k + m.head_dim_v) * 2 * sum(m.swa_layers)
    assert plan_checkpoint_bytes(p) == 8 * per_checkpoint
    assert any(n.startswith("prompt cache in RAM: up to 8 window checkpoints") and "GB of saved prompts" in n
               for n in p.notes)
    off = plan(model, PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=2048, cache_ram=0))
    assert any("--cache-ram 0" in n for n in off.notes)
    with pytest.raises(OssggufError, match="cache_ram"):
        PlacementOptions(cache_ram=-1)
    with Engine.load(model, CPU, ubatch=64, cache_ram=3 * 2**20) as e:
        assert e.prompt_cache.budget == 3 * 2**20


def test_a_cut_at_an_earlier_prompt_end_is_the_same_conversation(model):
    """A tool loop's rounds extend the prompt; the next user turn drops their reasoning and diverges where
    the first round's prompt ended: that continues the conversation (nothing saved to RAM), while a
    prompt that diverges anywhere else is another conversation (saved)."""
    with Engine.load(model, CPU, ubatch=64, cache_ram=256 * 2**20) as e:
        a, x, y = text_ids(e, 200, 1), text_ids(e, 300, 2, "Then"), text_ids(e, 40, 3, "But")
        last_logits(e, a)
        last_logits(e, a + x)
        _, cached = last_logits(e, a + x[:1] + y)  # as `<|channel|>` then "final" where "analysis" was
        assert cached == len(a) and e.prompt_cache.saved == 0
        last_logits(e, a[:150] + x)
        assert e.prompt_cache.saved == 1


def test_cache_ram_option(model):
    """`--cache-ram` reaches the plan (its notes) and is checked where it is read."""
    import json

    from click.testing import CliRunner

    from ossgguf.cli import cli

    base = ["plan", str(model), "--gpu-mem", "0", "--ram", "16GiB", "--ctx", "2048", "--json"]
    r = CliRunner().invoke(cli, base + ["--cache-ram", "0"])
    assert r.exit_code == 0, r.output
    assert any("no saved prompts (--cache-ram 0)" in n for n in json.loads(r.output)["notes"])
    r = CliRunner().invoke(cli, base + ["--cache-ram", "2GiB"])
    assert any("up to 2.1 GB of saved prompts" in n for n in json.loads(r.output)["notes"])
    r = CliRunner().invoke(cli, base + ["--cache-ram", "lots"])
    assert r.exit_code != 0 and "--cache-ram" in r.output
