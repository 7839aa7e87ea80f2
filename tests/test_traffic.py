"""What Codex CLI and opencode really send, replayed against `ossgguf serve`'s app with the prompt cache on.

tests/data/traffic holds the request bodies the clients sent in a recorded session (bench/record_traffic.py:
`codex exec` then `codex exec resume --last`; `opencode run` (a title request, then the agent's), `opencode
run -c`, and a new `opencode run`). They are posted to the app on the scripted tiny GGUF the recording used
(no npm needed), as two clients of one server send them: in turn, each client's in its recorded order, so
that a request which extends its client's previous one finds the other client's conversation in the context
and must come back from the RAM cache. The engine's `generate` is wrapped to see each rendered prompt's
token ids and what the model wrote, so the cached tokens each answer reports are checked against prefixes
computed here, not against the cache's own bookkeeping:

- every body is accepted (200, no error event) and its usage counts the prompt the server rendered;
- cached tokens never exceed the longest prefix the new prompt shares with an earlier prompt plus its output
  (the cache cannot hold more), and are at least the length of an earlier prompt that the new one extends
  (the RAM cache and the window checkpoint at that prompt's end must give it back).
"""

from __future__ import annotations

import pytest
from scripted_model import Episode, Script, scripted_gguf
from traffic_replay import CLIENTS, load, replay, serving

from ossgguf.runner.prompt_cache import common_prefix

ANSWER = "Sunny, 21 C."  # tests/test_agents.py's script, as recorded: a malformed call, then this answer
SCRIPT = Script(("<|call|>",), [Episode((), ' to=functions.nowhere<|message|>{"q":<|call|>'),
                                Episode(("<|call|>",), f"<|channel|>final<|message|>{ANSWER}<|return|>")])
CTX = 32768  # the clients' prompts are 15-18k tokens with the tiny vocabulary

pytestmark = pytest.mark.slow  # ~15-30 s on 2 cores: three cold 15-17k-token prompts


@pytest.fixture(scope="module")
def replayed(make_ckpt, tmp_path_factory):
    """{client: [(answer, prompt ids, generated ids, earlier requests' (prompt, generated) ids)]} of the
    interleaved replay, and the vocabulary's `<|start|>` id."""
    from ossgguf.runner.engine import Engine
    from ossgguf.runner.plan import PlacementOptions
    from ossgguf.runner.server.app import create_app

    model = scripted_gguf(make_ckpt(), tmp_path_factory.mktemp("traffic"), SCRIPT)
    seen: list[tuple[list[int], list[int]]] = []
    with Engine.load(model, PlacementOptions(gpu_mem=0, ram=16 * 2**30, ctx=CTX)) as engine:
        generate = engine.generate

        def spy(prompt, sampling=None, **changes):  # the prompt as rendered, and what the model wrote
            out: list[int] = []
            seen.append(([int(t) for t in prompt], out))
            for c in generate(prompt, sampling, **changes):
                if c.token is not None:
                    out.append(c.token)
                yield c

        engine.generate = spy
        start = engine.tokenize("<|start|>")
        with serving(create_app(engine, "gpt-oss-20b", date="2025-03-14")) as url:
            order = interleaved({name: load(name) for name in CLIENTS})
            answers = replay(url, [row for _, row in order])
    assert len(seen) == len(answers), "the server did not generate through engine.generate once per request"
    results: dict[str, list] = {name: [] for name in CLIENTS}
    for k, ((name, _), a) in enumerate(zip(order, answers)):
        results[name].append((a, *seen[k], seen[:k]))
    assert len(start) == 1
    return results, start[0]


def interleaved(recordings: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    """The clients' requests taken in turn (each client's in its order), as two clients of one server
    send them: a request that extends its client's last one finds the other client's in the context."""
    queues = {name: list(rows) for name, rows in recordings.items()}
    out = []
    while any(queues.values()):
        for name, rows in queues.items():
            if rows:
                out.append((name, rows.pop(0)))
    return out


@pytest.mark.parametrize("name", CLIENTS)
def test_real_clients_bodies_are_answered(replayed, name):
    for k, (a, prompt, _, _) in enumerate(replayed[0][name]):
        assert a.status == 200 and not a.error, (name, k, a)
        assert a.prompt_tokens == len(prompt), (name, k, a.prompt_tokens, len(prompt))


@pytest.mark.parametrize("name", CLIENTS)
def test_cached_tokens_are_the_prefix_an_earlier_prompt_gives(replayed, name):
    rows = replayed[0][name]
    extended = 0
    for k, (a, prompt, _, earlier) in enumerate(rows):
        most = max([common_prefix(prompt[:-1], p + out) for p, out in earlier] or [0])
        # an earlier prompt that this one extends: read up to its end, checkpointed there
        least = max([len(p) for p, _ in earlier if common_prefix(p, prompt[:-1]) == len(p)] or [0])
        assert least <= a.cached_tokens <= most, (name, k, a.cached_tokens, least, most)
        extended += least > 0
    assert extended >= 2, f"{name}'s recording has fewer than two requests that extend an earlier one"


def test_a_new_session_reuses_the_shared_system_prompt_and_tools(replayed):
    """opencode's second `opencode run` shares the system prompt, the tools and its first message with
    the first session, up to its last message: the window checkpoint at each prompt's last message
    (runner/engine.py `message_cut`) lets it keep all of that."""
    results, start = replayed
    for k, (a, prompt, _, earlier) in enumerate(results["opencode"]):
        shared = max([common_prefix(prompt[:-1], p) for p, _ in earlier] or [0])
        last_message = [i for i, t in enumerate(prompt) if t == start][-2]  # the last message before <|start|>assistant
        if shared >= last_message:
            assert a.cached_tokens >= last_message, (k, a.cached_tokens, last_message, shared)


@pytest.mark.parametrize("name", CLIENTS)
def test_recordings_are_scrubbed(name):
    """Committed bodies hold no machine's paths, user or host names, or dates (bench/record_traffic.py's scrub)."""
    import getpass
    import re
    import socket

    from traffic_replay import TRAFFIC

    text = (TRAFFIC / f"{name}.jsonl").read_text(encoding="utf-8")
    # /Users/name and /tmp/opencode are opencode's own text (a quoting example, its scratch folder)
    assert not re.findall(r"/home/(?!user\b)\w+|/Users/(?!name\b)\w+|/tmp/(?!opencode\b)\w+", text)
    assert set(re.findall(r"\b20\d\d-\d\d-\d\d\b", text)) <= {"2025-03-14"}
    for s in {getpass.getuser(), socket.gethostname()} - {"root", "user", "host", "vm"}:
        assert len(s) < 3 or s not in text, s
