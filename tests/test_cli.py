"""The command line as a user meets it: help with examples, the demo end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

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
    t0 = time.perf_counter()
    proc = run("convert", str(make_ckpt()), "-o", str(out))
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)  # only the path on stdout, so it can be piped
    reader = GGUFReader(out)
    n, size = len(reader.tensors), out.stat().st_size
    assert f"{n} tensors, {size:,} bytes in 1 file(s): {out}" in proc.stderr, proc.stderr
    m = re.search(r"(\d+\.\d) s, (\d+\.\d\d) GB/s, peak RSS (\d+) MiB", proc.stderr)
    assert m, proc.stderr
    # the write took part of the process's wall time, at no less than its data over that time (rounded
    # down to 0.01 GB/s); peak RSS is that of a small numpy process
    data = sum(int(t.n_bytes) for t in reader.tensors)
    assert float(m[1]) <= wall and float(m[2]) >= int(data / wall / 1e7) / 100 and 10 < int(m[3]) < 4096, m[0]
    for cls, types in (("expert", "MXFP4"), ("attention", "BF16"), ("norm", "F32")):
        assert re.search(rf"^{cls}\s+{types}\s+[\d,]+$", proc.stderr, re.M), proc.stderr


# --- -v/--verbose where users type it ------------------------------------------------------------


def test_every_command_takes_verbose_after_its_name():
    from ossgguf.cli import cli as group

    missing = [name for name, cmd in group.commands.items() if not any("--verbose" in p.opts for p in cmd.params)]
    assert not missing, missing
    proc = run("inspect", "--help")
    assert "-v, --verbose" in proc.stdout


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_command(make_gguf, where):
    args = ["run", str(make_gguf()), "-p", "hi", "--max-tokens", "1", "--ctx", "512", "--threads", "1"]
    proc = run(*(["-v", *args] if where == "before" else [*args, "-v"]))
    assert proc.returncode == 0, proc.stderr
    assert "llama_model_loader" in proc.stderr  # what the command reads from ctx.obj["verbose"]
    quiet = run(*args)
    assert quiet.returncode == 0 and "llama_model_loader" not in quiet.stderr


# --- option values: click's usage error naming the option, nothing run, nothing written ----------

BAD_VALUES = [
    ("run", ["-p", "hi"], "--max-tokens", "0"),
    ("run", ["-p", "hi"], "--max-tokens", "-5"),
    ("run", ["-p", "hi"], "--ctx", "0"),
    ("run", ["-p", "hi"], "--ctx", "-1"),
    ("run", ["-p", "hi"], "--temp", "-1"),
    ("run", ["-p", "hi"], "--top-p", "1.5"),
    ("run", ["-p", "hi"], "--top-k", "-1"),
    ("run", ["-p", "hi"], "--min-p", "2"),
    ("run", ["-p", "hi"], "--tool-timeout", "0"),
    ("chat", [], "--ubatch", "0"),
    ("plan", [], "--ctx", "-1"),
    ("plan", [], "--ctx", "lots"),
    ("plan", [], "--n-cpu-moe", "-1"),
    ("plan", [], "--threads", "0"),
    ("plan", [], "--gpu-mem", "-5G"),
    ("plan", [], "--ram", "0"),
    ("plan", [], "--unified", "1.2.3G"),
    ("serve", [], "--port", "0"),
    ("serve", [], "--port", "65536"),
    ("calibrate", ["--text", "{model}", "-o", "{out}"], "--ctx", "0"),
    ("compare", ["{model}"], "--ctx", "0"),
    ("compare", ["{model}"], "--threads", "0"),
    ("prune", ["-o", "{out}", "--dry-run"], "--keep", "0"),
    ("prune", ["-o", "{out}", "--keep", "2"], "--ctx", "0"),
    ("prune", ["-o", "{out}"], "--target-size", "-1G"),
    ("prune", ["-o", "{out}", "--keep", "2"], "--split-max-size", "0"),
    ("quantize", ["-o", "{out}", "--recipe", "mxfp4"], "--split-max-size", "0"),
    ("convert", ["-o", "{out}"], "--split-max-size", "-48G"),
]


@pytest.mark.parametrize("command,args,option,value", BAD_VALUES, ids=lambda x: x if isinstance(x, str) else None)
def test_bad_option_values_are_usage_errors(make_gguf, make_ckpt, tmp_path, command, args, option, value):
    model, out = make_gguf(), tmp_path / "out.gguf"
    source = make_ckpt() if command == "convert" else model
    args = [a.format(model=model, out=out) for a in args]
    proc = run(command, str(source), *args, option, value)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"Error: Invalid value for '{option}': "), proc.stderr
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_boundary_values_are_accepted(make_gguf):
    proc = run("plan", str(make_gguf()), "--gpu-mem", "0", "--ram", "8G", "--ctx", "1", "--ubatch", "1",
               "--threads", "1", "--n-cpu-moe", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["n_ctx"], out["n_ubatch"], out["placement"]) == (1, 1, "cpu")


def test_the_library_refuses_what_the_cli_refuses(make_ckpt, make_gguf, tmp_path):
    """The CLI is not the only caller: the option classes check the same limits (ossgguf.limits)."""
    from ossgguf.convert.convert import convert
    from ossgguf.errors import OssggufError
    from ossgguf.quantize.prune import plan_prune
    from ossgguf.runner.chat import Sampling, ToolRunner
    from ossgguf.runner.plan import PlacementOptions

    bad = [(PlacementOptions, {"ctx": 0}), (PlacementOptions, {"ubatch": -1}), (PlacementOptions, {"threads": 0}),
           (PlacementOptions, {"n_cpu_moe": -1}), (PlacementOptions, {"gpu_mem": -1}), (PlacementOptions, {"ram": 0}),
           (PlacementOptions, {"unified": 0}), (PlacementOptions, {"ctx": 1.5}), (Sampling, {"max_tokens": 0}),
           (Sampling, {"temperature": -0.5}), (Sampling, {"top_p": 1.5}), (Sampling, {"top_k": -1}),
           (Sampling, {"min_p": float("nan")})]
    for cls, kw in bad:
        [(name, value)] = kw.items()
        with pytest.raises(OssggufError, match=rf"^{name} must be .*, not {value}$"):
            cls(**kw)
    assert PlacementOptions(gpu_mem=0, n_cpu_moe=0, ctx=1).gpu_mem == 0 and Sampling(temperature=0).temperature == 0
    with pytest.raises(OssggufError, match="timeout must be greater than 0"):
        ToolRunner(["true"], timeout=0)
    out = tmp_path / "x.gguf"
    with pytest.raises(OssggufError, match="split_max_size must be greater than 0, not 0"):
        convert(make_ckpt(), out, split_max_size=0)
    with pytest.raises(OssggufError, match="ctx must be at least 1, not 0"):
        plan_prune(make_gguf(), out, keep=2, ctx=0, dry_run=True)
    with pytest.raises(OssggufError, match="target_size must be greater than 0"):
        plan_prune(make_gguf(), out, target_size=-1, dry_run=True)
    with pytest.raises(OssggufError, match="--target-device ram must be greater than 0"):
        plan_prune(make_gguf(), out, target_device="ram:0", dry_run=True)
    assert list(tmp_path.iterdir()) == []


def test_sizes_are_read_and_shown_in_units_that_show_them():
    from ossgguf.errors import OssggufError
    from ossgguf.sizes import human_size, parse_size

    assert [parse_size(t) for t in ("0", "1.5k", ".5M", "24G")] == [0, 1500, 500_000, 24 * 10**9]
    assert parse_size("24G", bare_unit_base=1024) == 24 * 2**30
    for text, why in (("-5G", "negative"), ("1.2.3G", "cannot read"), ("lots", "cannot read")):
        with pytest.raises(OssggufError, match=why):
            parse_size(text)
    assert [human_size(n) for n in (0, 999, 310_976, 65_369_017_728)] == ["0 B", "999 B", "311.0 kB", "65.4 GB"]


# --- failures that used to exit 0, or say too much or too little ---------------------------------


def test_piped_chat_that_hits_an_error_exits_non_zero(make_gguf, tmp_path):
    model = make_gguf()
    base = [*CLI, "chat", str(model), "--threads", "1", "--max-tokens", "1"]
    proc = subprocess.run([*base, "--ctx", "16"], input="hello\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "the context holds 16" in line and "--ctx" in line
    save = tmp_path / "no-such-dir" / "chat.json"
    proc = subprocess.run([*base, "--ctx", "1024"], input=f"/save {save}\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and f"error: cannot write {save}" in proc.stderr, proc.stderr
    ok = subprocess.run([*base, "--ctx", "1024"], input="/help\n", capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr


def test_a_refused_type_for_many_tensors_is_summarised(make_gguf, tmp_path):
    out = tmp_path / "x.gguf"
    proc = run("quantize", str(make_gguf()), "-o", str(out), "--recipe", "mxfp4", "--tensor-type", "ffn_.*_exps.*=q4_k")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.splitlines()
    assert len(line) < 400, line  # every tensor listed made it 530 characters on this tiny model
    assert "6 tensors cannot be stored as Q4_K (rows of 64, not a multiple of 256)" in line, line
    assert "blk.0.ffn_gate_exps.weight" in line and "and 3 more" in line and "blk.1." not in line, line
    fits = re.search(r"Types that fit these rows: ([\w, ]+);", line)
    assert fits and {"q8_0", "mxfp4", "q4_0"} <= set(fits[1].split(", ")) and "q4_k" not in fits[1], line
    assert not out.exists()


def test_full_disk_message_shows_small_sizes(make_ckpt, tmp_path, monkeypatch):
    import errno
    import os
    import shutil
    from types import SimpleNamespace

    from ossgguf.convert.convert import convert
    from ossgguf.errors import OssggufError

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**6, used=10**6 - 12_345, free=12_345))
    out = tmp_path / "x.gguf"
    with pytest.raises(OssggufError) as e:
        convert(make_ckpt(), out)
    assert re.search(r"the output needs \d+\.\d kB, 12\.3 kB are free", str(e.value)), e.value
    assert list(tmp_path.iterdir()) == []
