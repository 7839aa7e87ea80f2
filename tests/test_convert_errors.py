"""Bad input through the real CLI: one clear line on stderr, a non-zero exit, never a traceback,
and never a file at OUT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ossgguf.gguf.write import partial_path

CLI = [sys.executable, "-m", "ossgguf.cli"]


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, **kw)


def assert_clean_failure(proc, out: Path, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    for n in needles:
        assert n in last, last
    assert not out.exists()
    assert not partial_path(out).exists()


@pytest.fixture
def ckpt(make_ckpt, tmp_path):
    """A private copy of the default tiny checkpoint, free to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(make_ckpt(), dst)
    return dst


@pytest.fixture
def sharded(make_ckpt, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(make_ckpt(shards=3), dst)
    return dst


def test_missing_config(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli("convert", ckpt, "-o", out), out, "config.json not found")


def test_missing_tokenizer(ckpt, tmp_path):
    (ckpt / "tokenizer.json").unlink()
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli("convert", ckpt, "-o", out), out, "tokenizer.json not found")


def test_other_architecture(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli("convert", ckpt, "-o", out), out, "not gpt-oss")


def test_missing_shard(sharded, tmp_path):
    victim = sorted(sharded.glob("*.safetensors"))[1]
    victim.unlink()
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli("convert", sharded, "-o", out), out, "missing", victim.name)


def test_truncated_safetensors(ckpt, tmp_path):
    f = next(ckpt.glob("*.safetensors"))
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli("convert", ckpt, "-o", out), out, "truncated")


def test_shapes_disagree_with_config(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli("convert", ckpt, "-o", out), out, "config.json implies")


def _rewrite_header(path: Path, edit) -> None:
    """Edit a safetensors header in place (data offsets unchanged)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    path.write_bytes(raw[:8] + new + raw[8 + n:])


def test_blocks_without_scales(ckpt, tmp_path):
    f = next(ckpt.glob("*.safetensors"))
    _rewrite_header(f, lambda h: h.pop("model.layers.0.mlp.experts.down_proj_scales"))
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli("convert", ckpt, "-o", out), out, "down_proj", "_scales")


def test_existing_output_needs_force(ckpt, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    proc = run_cli("convert", ckpt, "-o", out)
    assert proc.returncode != 0 and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_bytes() == b"precious"
    proc = run_cli("convert", ckpt, "-o", out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json"])
def test_output_onto_the_checkpoint_is_refused_even_with_force(ckpt, victim):
    target = ckpt / victim if (ckpt / victim).exists() else next(ckpt.glob("*.safetensors"))
    before = target.read_bytes()
    proc = run_cli("convert", ckpt, "-o", target, "--force")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "is a file of the checkpoint" in proc.stderr.splitlines()[-1]
    assert target.read_bytes() == before and not partial_path(target).exists()


def test_full_disk(ckpt, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = mnt / "o.gguf"
        assert_clean_failure(run_cli("convert", ckpt, "-o", out), out, "not enough disk space")
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    """Big enough (~70 MB of experts) that a conversion is still running when we signal it."""
    from ossgguf.fixtures.tiny import TinySpec, make_tiny_checkpoint

    spec = TinySpec(hidden_size=512, intermediate_size=512, num_local_experts=64, num_hidden_layers=4, seed=5)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("big"), spec)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_leaves_nothing_valid(big_ckpt, tmp_path, sig):
    for attempt in range(3):
        out = tmp_path / f"o{attempt}.gguf"
        # Ctrl-C's default action in the child, as in a terminal: a shell's background job (CI started with
        # `cmd &` in a script) ignores SIGINT, and a Python started so keeps ignoring it
        proc = subprocess.Popen([*CLI, "convert", str(big_ckpt), "-o", str(out)], stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 60
        while not partial_path(out).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the conversion finished before it could be interrupted"
        # held still, so that the signal surely comes before the end: on a fast disk the last bytes
        # and the rename could come between the check above and the signal (then the run is whole: retry)
        proc.send_signal(signal.SIGSTOP)
        if not out.exists():
            break
        proc.send_signal(signal.SIGCONT)
        proc.communicate(timeout=60)
    else:
        pytest.fail("the conversion finished before it could be interrupted, 3 times")
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    if sig == signal.SIGKILL:
        # Nothing can clean up after SIGKILL: what is left must not look like a GGUF file.
        p = partial_path(out)
        assert not p.exists() or p.read_bytes()[:4] != b"GGUF"
    else:
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: interrupted")
        assert not partial_path(out).exists()
