"""The command line as a user meets it: help with examples, the demo end to end."""

from __future__ import annotations

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
