"""The engine on a CPU build of llama.cpp: expert placement visible in llama.cpp's own load log,
generation unchanged by the placement, KV-cache prefix reuse, cancel, errors; token ids against
Hugging Face tokenizers."""

from __future__ import annotations

import re

import numpy as np
import pytest
from gguf import GGUFReader
from gptoss_shapes import GPT_OSS_20B, write_sparse_gguf
from scripted_model import Episode, Script, scripted_gguf
from tokenizers import Tokenizer

from ossgguf.errors import OssggufError
from ossgguf.model import TensorClass, tensor_class
from ossgguf.runner.engine import Engine
from ossgguf.runner.llama_ctypes import LLAMA_LOG, open_llama
from ossgguf.runner.plan import GiB, PlacementOptions

OVERRIDDEN = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (CPU\S*)")
CPU = PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=512)  # this machine has no GPU: say so, no detection
PROMPT = "<|start|>user<|message|>Tell me about the weather in Paris today.<|end|><|start|>assistant"


@pytest.fixture(scope="module")
def model(make_gguf):
    return make_gguf(num_hidden_layers=3, seed=5)


@pytest.fixture(scope="module")
def engine(model):
    with Engine.load(model, CPU) as e:
        yield e


@pytest.fixture(scope="module")
def endless(make_ckpt, tmp_path_factory):
    """Writes " la" forever (hand-set weights, tests/scripted_model.py): on any CPU it never stops by itself."""
    return scripted_gguf(make_ckpt(), tmp_path_factory.mktemp("endless"), Script((), [Episode((), "", " la")]))


def greedy(e: Engine, prompt, n: int = 12) -> list[int]:
    return [c.token for c in e.generate(prompt, max_tokens=n, temperature=0) if c.token is not None]


def cached_after(history: list[int], prompt: list[int]) -> int:
    """What the engine may reuse for `prompt` after generating from `history` (prompt + sampled tokens):
    the common prefix with what it decoded, which is all but the last sampled token, leaving at least
    one prompt token to decode. Computed from the tokens a random model really wrote, on this CPU."""
    n = 0
    for a, b in zip(history[:-1], prompt[:-1]):
        if a != b:
            break
        n += 1
    return n


def expert_weights(path) -> set[str]:
    return {t.name for t in GGUFReader(path).tensors if tensor_class(t.name) == TensorClass.EXPERT}


@pytest.mark.parametrize("placement,layers", [({"cpu_moe": True}, {0, 1, 2}), ({"n_cpu_moe": 1}, {0}),
                                              ({"n_cpu_moe": 2}, {0, 1})])
def test_overrides_place_the_planned_experts(model, engine, placement, layers):
    with LLAMA_LOG.capture() as lines, Engine.load(model, CPU, **placement) as e:
        got = dict(m.groups() for _, text in lines if (m := OVERRIDDEN.search(text)))
        tokens = greedy(e, PROMPT)
    expected = {n for n in expert_weights(model) if int(n.split(".")[1]) in layers}
    assert set(got) == expected  # the weights only: the small expert biases stay with their layer
    assert e.plan.n_cpu_moe == max(layers) + 1
    assert tokens == greedy(engine, PROMPT)  # same tokens as without overrides


def test_verbose_passes_llama_log_through(model, capsys):
    with Engine.load(model, CPU, n_cpu_moe=1, verbose=True):
        pass
    err = capsys.readouterr().err
    assert "buffer type overridden" in err  # a debug-level line
    assert "llama_context" in err
    with Engine.load(model, CPU, n_cpu_moe=1):
        pass
    assert "llama" not in capsys.readouterr().err


def test_prefix_reuse_gives_the_same_tokens(engine):
    first = greedy(engine, PROMPT)
    prompt = engine.tokenize(PROMPT)
    follow = prompt + first[:5] + engine.tokenize("<|end|><|start|>user<|message|>and tomorrow?<|end|>")
    chunks = list(engine.generate(follow, max_tokens=8, temperature=0))
    # len(prompt) + 5 unless the model stopped within 5 tokens (what it writes depends on the CPU)
    assert chunks[-1].usage.cached_tokens == cached_after(prompt + first, follow) >= len(prompt)
    reused = [c.token for c in chunks if c.token is not None]
    engine.reset()
    assert greedy(engine, follow, 8) == reused


def test_rewind_past_the_sliding_window_prefills_again(model):
    """The window layers keep 8 + 256 positions (padded to 512 cells): a rewind to position 100
    after 700 tokens cannot reuse them, so the engine must prefill from scratch."""
    with Engine.load(model, CPU, ctx=1024, ubatch=256) as e:
        long = (e.tokenize(PROMPT) * 40)[:700]
        greedy(e, long, 4)
        chunks = list(e.generate(long[:100], max_tokens=6, temperature=0))
        assert chunks[-1].usage.cached_tokens == 0
        rewound = [c.token for c in chunks if c.token is not None]
        e.reset()
        assert greedy(e, long[:100], 6) == rewound
        kept = list(e.generate(long[:100] + rewound[:2], max_tokens=3, temperature=0))
        # a short rewind keeps the window: 101 unless the model stopped at its first token
        assert kept[-1].usage.cached_tokens == cached_after(long[:100] + rewound, long[:100] + rewound[:2]) >= 100


def test_stream_text_and_stats(engine):
    chunks = list(engine.generate(PROMPT, max_tokens=6, temperature=0))
    assert chunks[-1].finish_reason in ("length", "stop") and all(c.finish_reason is None for c in chunks[:-1])
    tokens = [c.token for c in chunks if c.token is not None and not engine.is_stop(c.token)]
    assert "".join(c.text for c in chunks) == engine.detokenize(tokens)
    usage = [c.usage for c in chunks]
    assert usage[-1].completion_tokens == len(tokens) + (chunks[-1].finish_reason == "stop")
    assert [u.completion_tokens for u, c in zip(usage, chunks) if c.token is not None] == list(
        range(1, len(tokens) + 1 + (chunks[-1].finish_reason == "stop")))
    assert usage[-1].prompt_tokens == len(engine.tokenize(PROMPT)) and usage[-1].prompt_seconds > 0
    assert usage[-1].generation_seconds >= usage[0].generation_seconds > 0


def test_cancel_between_tokens(endless):
    with Engine.load(endless, CPU) as e:
        it = e.generate(PROMPT, max_tokens=50, temperature=0)
        got = [next(it), next(it)]
        e.cancel()
        rest = list(it)
    assert rest[-1].finish_reason == "cancelled" and len(got) + len(rest) <= 4
    assert (" la" * 4).startswith("".join(c.text for c in got + rest))  # the script, cut short


def test_seeded_sampling_is_reproducible(engine):
    a = [c.token for c in engine.generate(PROMPT, max_tokens=8, seed=7)]
    b = [c.token for c in engine.generate(PROMPT, max_tokens=8, seed=7)]
    assert a == b


def test_default_sampling_draws_from_the_whole_distribution(model, engine):
    """OpenAI's settings for gpt-oss (temperature 1, no truncation): at the defaults the first token is
    drawn from softmax(logits) itself, the logits read from llama-cpp-python's own `Llama`. The statistic,
    the mean log-probability of the drawn tokens, rises under a temperature below 1 or any cut."""
    ids = engine.tokenize(PROMPT)
    llm = open_llama(model, n_ctx=512, logits_all=True, n_threads=1, verbose=False)
    llm.eval(ids)
    logits = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    p = np.exp(logp)
    want, n = float((p * logp).sum()), 400
    sd = float(np.sqrt((p * (logp - want) ** 2).sum() / n))

    def mean_logp(**sampling) -> float:
        return float(np.mean([logp[next(iter(engine.generate(ids, max_tokens=1, seed=s, **sampling))).token]
                              for s in range(n)]))

    assert abs(mean_logp() - want) < 4 * sd
    assert mean_logp(temperature=0.7) - want > 4 * sd and mean_logp(top_k=40) - want > 4 * sd


def test_tokens_match_hugging_face_tokenizers(make_ckpt, engine):
    ref = Tokenizer.from_file(str(make_ckpt(num_hidden_layers=3, seed=5) / "tokenizer.json"))
    for text in ("Hello world, it's 2025!", PROMPT, "  spaces\tand\nnewlines  ", "naïve café"):
        assert engine.tokenize(text) == ref.encode(text, add_special_tokens=False).ids


def test_errors(model, engine, tmp_path):
    with pytest.raises(OssggufError, match="the prompt is 600 tokens, the context holds 512"):
        list(engine.generate([100] * 600))
    with pytest.raises(OssggufError, match="larger than the model's"):
        Engine.load(model, CPU, ctx=10**7)
    with pytest.raises(OssggufError, match="not gpt-oss"):
        Engine.load(write_sparse_gguf(tmp_path / "l.gguf", GPT_OSS_20B, arch="llama"), CPU)
    shard = tmp_path / "m-00001-of-00003.gguf"
    shard.write_bytes(model.read_bytes())
    with pytest.raises(OssggufError, match="m-00002-of-00003.gguf, m-00003-of-00003.gguf missing"):
        Engine.load(shard, CPU)
