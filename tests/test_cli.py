"""The command line as a user meets it: help with examples, the demo end to end."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "ossgguf.cli"]


def run(*args):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["convert", "quantize", "inspect", "compare", "plan", "download", "render", "publish", "demo"])
def test_help(command):
    proc = run(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: ossgguf " + command in proc.stdout
    if command != "demo":
        assert "Example" in proc.stdout


def test_demo_runs_the_whole_pipeline():
    proc = run("demo")
    assert proc.returncode == 0, proc.stderr
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "works end to end"):
        assert step in proc.stderr
    assert proc.stdout.strip()  # the generated text goes to stdout


def test_usage_errors_are_one_line():
    proc = run("convert")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Missing argument" in proc.stderr


def test_convert_prints_a_summary_on_stderr(make_ckpt, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "tiny-mxfp4.gguf"
    proc = run("convert", str(make_ckpt()), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)  # only the path on stdout, so it can be piped
    reader = GGUFReader(out)
    n, size = len(reader.tensors), out.stat().st_size
    assert f"{n} tensors, {size:,} bytes in 1 file(s): {out}" in proc.stderr, proc.stderr
    m = re.search(r"(\d+\.\d) s, (\d+\.\d\d) GB/s, peak RSS (\d+) MiB", proc.stderr)
    assert m, proc.stderr
    # 300 kB in a few ms: the rate may round to 0.00 GB/s; peak RSS is that of a small numpy process
    assert float(m[2]) >= 0 and 10 < int(m[3]) < 4096, m[0]
    for cls, types in (("expert", "MXFP4"), ("attention", "BF16"), ("norm", "F32")):
        assert re.search(rf"^{cls}\s+{types}\s+[\d,]+$", proc.stderr, re.M), proc.stderr
