"""GGUF LoRA adapters at run time: `--lora` on plan/run/compare, the engine and the planner's bytes.

References: llama.cpp's own load log (tensors loaded, LoRA buffer sizes) and the `compare` metrics
(llama.cpp's logits) of the same run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from test_lora import ALL_ACTIVE, ATTN, EXPERTS, make_adapter

from ossgguf.convert.lora import convert_lora
from ossgguf.runner.engine import Engine
from ossgguf.runner.llama_ctypes import LLAMA_LOG
from ossgguf.runner.lora import LoraSpec, parse_lora
from ossgguf.runner.plan import GiB, PlacementOptions, plan

CLI = [sys.executable, "-m", "ossgguf.cli"]
CPU = PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=256)
LORA_BUF = re.compile(r"(\S+) LoRA buffer size =\s+([\d.]+) MiB")
LOADED = re.compile(r"loaded (\d+) tensors from lora file")


def cli(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def files(make_ckpt, make_gguf, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-run")
    ckpt, gguf = make_ckpt(layout="bf16", **ALL_ACTIVE), make_gguf("mxfp4", **ALL_ACTIVE)
    peft = make_adapter(ckpt, d / "peft", r=8, lora_alpha=16, target_modules=ATTN, target_parameters=EXPERTS)
    return gguf, peft, convert_lora(peft, d / "a.gguf", base=gguf).plan.shards[0].path


def test_engine_loads_adapter_and_planner_counts_its_bytes(files):
    gguf, _, adapter = files
    from gguf import GGUFReader

    n_tensors = len(GGUFReader(adapter).tensors)
    with LLAMA_LOG.capture() as lines, Engine.load(gguf, CPU, lora=(LoraSpec(adapter),)) as e:
        text = "".join(c.text for c in e.generate("<|start|>user<|message|>Hi<|end|>", temperature=0, max_tokens=4))
    assert isinstance(text, str)
    loaded = [int(m[1]) for _, t in lines if (m := LOADED.search(t))]
    assert loaded == [n_tensors]
    bufs = [float(m[2]) for _, t in lines if (m := LORA_BUF.search(t))]  # one per buffer type (MiB, 2 decimals)
    reported = sum(bufs) * 2**20
    with_lora = plan(gguf, PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=256, lora=(str(adapter),)))
    delta = with_lora.cpu_bytes - plan(gguf, CPU).cpu_bytes
    assert bufs and abs(delta - reported) <= len(bufs) * 0.00501 * 2**20
    assert with_lora.model.bytes_where() > plan(gguf, CPU).model.bytes_where()


def test_plan_puts_adapter_bytes_with_the_tensors_they_change(files):
    gguf, _, adapter = files
    opts = dict(ram=16 * GiB, gpu_mem=24 * GiB, ctx=256, cpu_moe=True)
    base, lora = plan(gguf, PlacementOptions(**opts)), plan(gguf, PlacementOptions(**opts, lora=(str(adapter),)))
    from gguf import GGUFReader

    ts = GGUFReader(adapter).tensors
    expert = sum(int(t.n_bytes) for t in ts if "_exps" in t.name)
    assert lora.cpu_bytes - base.cpu_bytes >= expert  # experts (and their adapters) in RAM
    assert lora.gpu_bytes - base.gpu_bytes >= sum(int(t.n_bytes) for t in ts) - expert  # attention on the GPU
    proc = cli("plan", gguf, "--gpu-mem", "24GiB", "--ram", "16GiB", "--ctx", "256", "--cpu-moe", "--lora",
               adapter, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["gpu_bytes"] == lora.gpu_bytes


def test_compare_scales(files):
    gguf, _, adapter = files

    def kl(*args) -> float:
        proc = cli("compare", gguf, gguf, "--ctx", "64", "--threads", "1", "--json", *args)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["kl_mean"]

    assert kl("--lora", f"{adapter}:0") < 1e-9  # scale 0 is the base
    assert kl("--lora", adapter, "--ref-lora", adapter) < 1e-9
    assert kl("--lora", adapter) > 1e-4 < kl("--lora", f"{adapter}:2")


def test_cli_convert_run_and_errors(files, tmp_path):
    gguf, peft, adapter = files
    out = tmp_path / "cli.gguf"
    dry = cli("convert-lora", peft, "-o", out, "--base", gguf, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert not out.exists()
    done = cli("convert-lora", peft, "-o", out, "--base", gguf)
    assert done.returncode == 0, done.stderr
    assert json.loads(dry.stdout)["total_bytes"] == out.stat().st_size
    again = cli("convert-lora", peft, "-o", out, "--base", gguf)
    assert again.returncode == 1 and "--force" in again.stderr and "Traceback" not in again.stderr
    run = cli("run", gguf, "-p", "Hi", "--lora", f"{out}:0.5", "--temp", "0", "--max-tokens", "4", "--gpu-mem", "0",
              "--ctx", "256", "--json")
    assert run.returncode == 0, run.stderr
    assert "finish_reason" in json.loads(run.stdout)
    bad = cli("run", gguf, "-p", "Hi", "--lora", tmp_path / "nope.gguf")
    assert bad.returncode != 0 and "no such file" in bad.stderr and "Traceback" not in bad.stderr
    not_adapter = cli("run", gguf, "-p", "Hi", "--lora", gguf, "--gpu-mem", "0", "--ctx", "256")
    assert not_adapter.returncode == 1 and "not a LoRA adapter" in not_adapter.stderr


def test_parse_lora(tmp_path):
    f = tmp_path / "a:b.gguf"
    f.write_bytes(b"")
    assert parse_lora(f"{f}:0.25") == LoraSpec(f, 0.25)
    assert parse_lora(str(f)) == LoraSpec(f, 1.0)
    from ossgguf.errors import OssggufError

    for bad in ("nan", "inf", "1e3"):
        with pytest.raises(OssggufError, match="out of range"):
            parse_lora(f"{f}:{bad}")


def test_calibrate_records_the_adapters(files, tmp_path):
    from ossgguf.errors import OssggufError
    from ossgguf.quantize.stats import ExpertStats
    from ossgguf.runner.calibrate import calibrate

    gguf, _, adapter = files
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "s.json"
    calibrate(gguf, [text], out, PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=64, lora=(LoraSpec(adapter),)))
    lora = ExpertStats.load(out).identity["lora"]
    assert [x["file"] for x in lora] == [adapter.name] and lora[0]["scale"] == 1.0
    with pytest.raises(OssggufError, match="differs in lora"):  # the same file, without the adapter
        calibrate(gguf, [text], out, PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=64))


def test_server_selects_adapters_per_request(files, tmp_path):
    """`NAME+ADAPTER` / `NAME+none` model ids switch the adapter set per request; each answer equals that of
    a server whose engine was loaded with exactly that set (same run, greedy)."""
    import shutil

    from openai import OpenAI
    from test_server import ServerThread

    from ossgguf.runner.server.app import create_app

    gguf, _, adapter = files
    second = shutil.copy(adapter, tmp_path / "second.gguf")
    both = (LoraSpec(adapter), LoraSpec(second, 0.5))
    msgs = [{"role": "user", "content": "Say something."}]

    def answers(engine_loras, models) -> dict:
        with Engine.load(gguf, CPU, lora=engine_loras) as e, ServerThread(create_app(e, "tiny")) as srv:
            client = OpenAI(base_url=srv.base_url, api_key="x")
            ids = [m.id for m in client.models.list()]
            return ids, {m: client.chat.completions.create(model=m, messages=msgs, temperature=0, max_tokens=6)
                         .choices[0].message.model_dump() for m in models}

    ids, got = answers(both, ["tiny+a", "tiny+none", "tiny", "tiny+second", "tiny+a"])
    assert ids == ["tiny", "tiny+a", "tiny+second", "tiny+none"]
    _, ref_none = answers((), ["tiny"])
    _, ref_a = answers((LoraSpec(adapter),), ["tiny"])
    _, ref_both = answers(both, ["tiny"])
    assert got["tiny+none"] == ref_none["tiny"]
    assert got["tiny+a"] == ref_a["tiny"]
    assert got["tiny"] == ref_both["tiny"]


def test_publish_plan_of_an_adapter(files):
    """`publish` (no network: its plan) describes an adapter repo: the card names the base as an adapter's."""
    from huggingface_hub import ModelCard

    from ossgguf.hub.publish import plan_publish

    _, _, adapter = files
    p = plan_publish(adapter, "me/gpt-oss-lora", base_model="openai/gpt-oss-20b")
    card = ModelCard(p.card)
    assert card.data.base_model == "openai/gpt-oss-20b" and card.data.base_model_relation == "adapter"
    assert f"--lora {adapter.name}" in p.card and "lora" in card.data.tags
    assert [f.name for f in p.files] == [adapter.name] and p.files[0].recipe == "lora"
