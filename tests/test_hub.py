"""hub/: download from a Hugging Face cache laid out as huggingface_hub does, publish through a
patched HfApi, and the model card read back by huggingface_hub's own ModelCard. No test touches the
network: sockets are refused wherever the Hub could be called."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
from pathlib import Path
from unittest import mock

import gguf
import httpx2
import huggingface_hub
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from huggingface_hub import CommitInfo, HfApi, ModelCard, constants, scan_cache_dir
from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import filter_repo_objects
from llama_source import find_best_model_binary

from ossgguf.errors import OssggufError
from ossgguf.gguf.read import read_gguf, read_gguf_file
from ossgguf.hub import download as dl
from ossgguf.hub import publish as pub
from ossgguf.hub.card import llama_cpp_tag
from ossgguf.model import ARCH, EXPERT_DOWN, EXPERT_GATE, GLOBAL_TENSORS, LAYER_TENSORS

REPO = "openai/gpt-oss-20b"
REV = "0123456789abcdef0123456789abcdef01234567"


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    """Refuse every socket connection and name lookup; the list records any attempt."""
    hits: list[tuple] = []

    def refuse(*args, **kwargs):
        hits.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return hits


# config.json of openai/gpt-oss-20b as published on the Hub (values in shared/FACTS.md), and a llama's.
GPT_OSS_20B_CONFIG = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                            "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                            "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088,
}
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 128256}


@pytest.fixture
def hf_configs() -> dict[str, dict]:
    return {"gpt_oss": GPT_OSS_20B_CONFIG, "llama": LLAMA_CONFIG}


def populate_cache(cache: Path, repo_id: str, files: dict[str, bytes], listed: list[str] | None = None) -> Path:
    """A cached snapshot in huggingface_hub's layout: blobs by sha256, snapshot symlinks, refs/main,
    and (when `listed` is given) the repo's tree listing written by huggingface_hub itself."""
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snap = repo / "snapshots" / REV
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REV)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    if listed is not None:
        write_tree_cache(str(repo), REV, {n: TreeCacheEntry(size=1, blob_id="0" * 40) for n in listed})
    return snap


def checkpoint_files(config: dict) -> dict[str, bytes]:
    return {"config.json": json.dumps(config).encode(), "model-00001-of-00001.safetensors": b"\0" * 16,
            "model.safetensors.index.json": b"{}", "tokenizer.json": b"{}", "chat_template.jinja": b""}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty shared cache: HF_HUB_CACHE and huggingface_hub's constant (read at its import)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _add(w: gguf.GGUFWriter, name: str, arr: np.ndarray, qtype: Q) -> None:
    if qtype == Q.F32:
        w.add_tensor(name, arr.astype(np.float32))
        return
    q = gguf.quants.quantize(arr.astype(np.float32), qtype)  # gguf-py's own reference quantizers
    w.add_tensor(name, q, raw_shape=None if q.dtype == np.uint8 else q.shape, raw_dtype=qtype)


def write_gguf(path: Path, experts: Q = Q.MXFP4, other: Q = Q.BF16, arch: str = ARCH, split_max_size: int = 0,
               meta: dict[str, str] | None = None) -> list[Path]:
    """A small gpt-oss GGUF written by gguf-py; returns its file(s) (shards when split)."""
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch, split_max_size=split_max_size)
    for k, v in (meta or {}).items():
        w.add_string(k, v)
    H = 64
    _add(w, GLOBAL_TENSORS["model.embed_tokens.weight"][0], rng.standard_normal((32, H)), other)
    _add(w, "blk.0." + LAYER_TENSORS["input_layernorm.weight"][0], rng.standard_normal(H), Q.F32)
    _add(w, "blk.0." + LAYER_TENSORS["self_attn.q_proj.weight"][0], rng.standard_normal((H, H)), other)
    _add(w, f"blk.0.{EXPERT_GATE}.weight", rng.standard_normal((2, H, H)), experts)
    _add(w, f"blk.0.{EXPERT_DOWN}.weight", rng.standard_normal((2, H, H)), experts)
    _add(w, GLOBAL_TENSORS["lm_head.weight"][0], rng.standard_normal((32, H)), other)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_size:
        return sorted(path.parent.glob(path.stem + "-*-of-*.gguf"))
    return [path]


def reader_bpw(paths: list[Path]) -> float:
    ts = [t for p in paths for t in gguf.GGUFReader(p).tensors]
    return sum(int(t.n_bytes) for t in ts) * 8 / sum(int(t.n_elements) for t in ts)


def http_error(status: int) -> HfHubHTTPError:
    req = httpx2.Request("POST", "https://huggingface.co/api/models/me/repo/commit/main")
    return HfHubHTTPError(f"{status} Server Error", response=httpx2.Response(status, request=req))


def fake_api() -> mock.NonCallableMagicMock:
    """HfApi with the real method signatures (autospec): a wrong argument name fails the test."""
    api = mock.create_autospec(HfApi, instance=True)
    api.upload_folder.return_value = CommitInfo(
        commit_url="https://huggingface.co/me/repo/commit/abc", commit_message="m", commit_description="",
        oid="abc")
    return api


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(pub.time, "sleep", mock.Mock())


# --- download -------------------------------------------------------------------------------------

def test_download_offline_goes_through_huggingface_hub_cache(hf_cache, hf_configs, monkeypatch, no_network):
    snap = populate_cache(hf_cache, REPO, checkpoint_files(hf_configs["gpt_oss"]))
    # huggingface_hub's own cache scanner sees the layout as a cached repo with a main ref.
    info = {r.repo_id: r for r in scan_cache_dir(hf_cache).repos}
    assert {rev.commit_hash for rev in info[REPO].revisions} == {REV}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spy = mock.Mock(wraps=huggingface_hub.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    got = dl.download(REPO)
    assert got == snap
    assert [c.kwargs["allow_patterns"] for c in spy.call_args_list] == [["config.json"], dl.ALLOW_PATTERNS]
    kw = spy.call_args.kwargs
    assert kw["local_files_only"] is True and kw["allow_patterns"] == dl.ALLOW_PATTERNS
    assert kw["ignore_patterns"] == ["original/*", "metal/*"]
    assert no_network == []


def test_download_falls_back_to_cache_when_hub_unreachable(hf_cache, hf_configs, monkeypatch, no_network):
    snap = populate_cache(hf_cache, REPO, checkpoint_files(hf_configs["gpt_oss"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert dl.download(REPO, offline=False) == snap
    assert no_network, "huggingface_hub should have tried the Hub (and been refused) before using the cache"


def test_download_offline_empty_cache(hf_cache, no_network):
    with pytest.raises(OssggufError, match="not in the cache.*run with network, or pass a local folder"):
        dl.download(REPO, offline=True)
    assert no_network == []


def test_download_incomplete_snapshot(hf_cache, hf_configs):
    files = checkpoint_files(hf_configs["gpt_oss"])
    populate_cache(hf_cache, REPO, files, listed=[*files, "model-00002-of-00002.safetensors"])
    with pytest.raises(OssggufError, match="partly in the cache"):
        dl.download(REPO, offline=True)


def test_download_refuses_other_models_before_fetching_weights(hf_cache, hf_configs, monkeypatch):
    populate_cache(hf_cache, "meta-llama/tiny", checkpoint_files(hf_configs["llama"]))
    spy = mock.Mock(wraps=huggingface_hub.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    with pytest.raises(OssggufError, match="'llama' model, not gpt-oss"):
        dl.download("meta-llama/tiny", offline=True)
    assert [c.kwargs["allow_patterns"] for c in spy.call_args_list] == [["config.json"]]


def test_download_local_dir_offline(tmp_path, hf_configs, no_network):
    d = tmp_path / "ckpt"
    d.mkdir()
    for name, data in checkpoint_files(hf_configs["gpt_oss"]).items():
        (d / name).write_bytes(data)
    assert dl.download(REPO, local_dir=d, offline=True) == d.resolve()


def test_allow_patterns_keep_only_the_checkpoint():
    # The file list of openai/gpt-oss-120b, filtered by huggingface_hub's own pattern matcher.
    listing = [".gitattributes", "LICENSE", "README.md", "USAGE_POLICY", "chat_template.jinja", "config.json",
               "generation_config.json", "metal/model.bin", "model-00000-of-00014.safetensors",
               "model-00014-of-00014.safetensors", "model.safetensors.index.json", "original/config.json",
               "original/dtypes.json", "original/model--00001-of-00007.safetensors", "special_tokens_map.json",
               "tokenizer.json", "tokenizer_config.json"]
    kept = set(filter_repo_objects(listing, allow_patterns=dl.ALLOW_PATTERNS, ignore_patterns=dl.IGNORE_PATTERNS))
    assert kept == {"README.md", "chat_template.jinja", "config.json", "generation_config.json",
                    "model-00000-of-00014.safetensors",
                    "model-00014-of-00014.safetensors", "model.safetensors.index.json", "special_tokens_map.json",
                    "tokenizer.json", "tokenizer_config.json"}


def test_resolve_source(tmp_path, hf_cache, hf_configs, monkeypatch, no_network):
    """A path that exists is the checkpoint, whatever it lacks (the converter's reader names it); a path
    that does not exist must be a repo id, found in the cache."""
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert dl.resolve_source(str(folder)) == (folder, None)
    assert dl.resolve_source(folder / "config.json") == (folder / "config.json", None)
    with pytest.raises(OssggufError, match="neither a folder nor"):
        dl.resolve_source("no/such/folder")
    snap = populate_cache(hf_cache, REPO, checkpoint_files(hf_configs["gpt_oss"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dl.resolve_source(REPO) == (snap, REPO)
    (tmp_path / REPO).mkdir(parents=True)  # a folder named like the repo wins: nothing is downloaded
    monkeypatch.chdir(tmp_path)
    assert dl.resolve_source(REPO) == (Path(REPO), None)
    assert no_network == []


def test_cli_convert_repo_id_records_the_source(hf_cache, make_ckpt, tmp_path, monkeypatch, no_network):
    """`ossgguf convert REPO_ID`: the checkpoint comes from the offline cache, the GGUF names the repo
    (general.source.repo_url, general.name) and the license of the cached model card."""
    from click.testing import CliRunner

    from ossgguf.cli import cli

    files = {f.name: f.read_bytes() for f in make_ckpt().iterdir() if f.is_file() and f.name != "README.md"}
    files["README.md"] = b"---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n\n# gpt-oss-20b\n"
    populate_cache(hf_cache, REPO, files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "gpt-oss-20b-mxfp4.gguf"
    res = CliRunner().invoke(cli, ["convert", REPO, "-o", str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    assert res.stdout.strip() == str(out)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items()}
    assert fields["general.source.repo_url"] == f"https://huggingface.co/{REPO}"
    assert fields["general.name"] == "gpt-oss-20b"
    assert fields["general.license"] == "apache-2.0"
    assert pub.base_model_of(read_gguf(out)) == REPO  # what publish reads back
    assert no_network == []


# --- the GGUF header reader -----------------------------------------------------------------------

def test_header_matches_gguf_reader(tmp_path):
    paths = write_gguf(tmp_path / "m.gguf", split_max_size=12_000, meta={"ossgguf.recipe": "mxfp4"})
    assert len(paths) > 1
    for p in paths:
        ours, ref = read_gguf_file(p), gguf.GGUFReader(p)
        assert [(t.name, t.qtype, t.n_params, t.nbytes, t.offset) for t in ours.tensors] == [
            (t.name, t.tensor_type, int(t.n_elements), int(t.n_bytes), int(t.data_offset)) for t in ref.tensors]
        for key, field in ref.fields.items():
            if key in ours.kvs and field.types[0] != gguf.GGUFValueType.ARRAY:
                assert ours.get(key) == field.contents()


@pytest.mark.parametrize("experts,other,recipe", [
    (Q.MXFP4, Q.BF16, "mxfp4"), (Q.MXFP4, Q.Q8_0, "mxfp4-q8"), (Q.Q8_0, Q.Q8_0, "q8_0"), (Q.BF16, Q.BF16, "bf16"),
    (Q.MXFP4, Q.Q4_0, "custom (experts MXFP4; other weights Q4_0)"),
])
def test_recipe_inferred_from_tensor_types(tmp_path, experts, other, recipe):
    (p,) = write_gguf(tmp_path / "m.gguf", experts=experts, other=other)
    assert pub.infer_recipe(read_gguf(p).tensors) == recipe


# --- publish --------------------------------------------------------------------------------------

def test_dry_run_makes_no_call(tmp_path, monkeypatch, no_network):
    shards = write_gguf(tmp_path / "out" / "gpt-oss-20b-mxfp4-q8.gguf", other=Q.Q8_0, split_max_size=12_000)
    boom = mock.Mock(side_effect=AssertionError("HfApi used in a dry run"))
    monkeypatch.setattr(huggingface_hub, "HfApi", boom)
    monkeypatch.setattr(huggingface_hub.hf_api, "HfApi", boom)
    monkeypatch.setattr(huggingface_hub, "get_token", boom)
    plan = pub.publish(shards[0], "me/gpt-oss-20b-GGUF", dry_run=True, base_model=REPO)
    assert [f.name for f in plan.files] == [p.name for p in shards]
    for f, p in zip(plan.files, shards):
        assert f.size == p.stat().st_size
        assert f.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
        assert f.recipe == "mxfp4-q8"
    assert sum(f.tensor_bytes for f in plan.files) * 8 / sum(f.n_elements for f in plan.files) == pytest.approx(
        reader_bpw(shards))
    assert no_network == [] and not boom.called
    text = pub.publish_plan_text(plan)
    assert "would upload to me/gpt-oss-20b-GGUF" in text and plan.files[0].sha256 in text


def _block_hfapi(monkeypatch) -> mock.Mock:
    boom = mock.Mock(side_effect=AssertionError("HfApi used in a dry run"))
    monkeypatch.setattr(huggingface_hub, "HfApi", boom)
    monkeypatch.setattr(huggingface_hub.hf_api, "HfApi", boom)
    monkeypatch.setattr(huggingface_hub, "get_token", boom)
    return boom


def test_cli_publish_dry_run(tmp_path, monkeypatch, no_network):
    from click.testing import CliRunner

    from ossgguf.cli import cli

    out = tmp_path / "out"
    single = write_gguf(out / "gpt-oss-20b-mxfp4.gguf", meta={"general.source.repo_url": f"https://huggingface.co/{REPO}"})
    shards = write_gguf(out / "gpt-oss-20b-mxfp4-q8.gguf", other=Q.Q8_0, split_max_size=12_000)
    assert len(shards) > 1
    models = {"gpt-oss-20b-mxfp4": ("mxfp4", single), "gpt-oss-20b-mxfp4-q8": ("mxfp4-q8", shards)}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    boom = _block_hfapi(monkeypatch)
    res = CliRunner().invoke(cli, ["publish", "me/gpt-oss-20b-GGUF", str(out), "--dry-run"])
    assert res.exit_code == 0, (res.output, res.exception)
    text = res.stdout
    assert "deprecated" not in res.stderr
    # ossgguf 0.1's order, PATH REPO_ID, gives the same plan, with a note on stderr
    old = CliRunner().invoke(cli, ["publish", str(out), "me/gpt-oss-20b-GGUF", "--dry-run"])
    assert old.exit_code == 0 and old.stdout == text, (old.output, old.exception)
    assert "`ossgguf publish PATH REPO_ID` is deprecated: write `ossgguf publish REPO_ID PATH`" in old.stderr
    for args in (["me/gpt-oss-20b-GGUF", str(out / "nope.gguf")], [str(out / "nope.gguf"), "me/gpt-oss-20b-GGUF"]):
        bad = CliRunner().invoke(cli, ["publish", *args, "--dry-run"])
        assert bad.exit_code == 2 and f"Invalid value for 'PATH': Path '{out / 'nope.gguf'}' does not exist" in bad.stderr
    assert text.startswith("would upload to me/gpt-oss-20b-GGUF (public)")
    listing, card_text = text.split("--- README.md ---\n", 1)
    for recipe, paths in models.values():
        bpw = reader_bpw(paths)
        for p in paths:
            sha = hashlib.sha256(p.read_bytes()).hexdigest()
            (line,) = [x for x in listing.splitlines() if x.strip().startswith(p.name + " ")]
            assert f" {p.stat().st_size:,} B " in line and line.endswith(sha), line
            assert f" {recipe} " in line and f"{bpw:5.2f} bpw" in line, line
    assert "not name its recipe" not in text  # conventional names: no warning

    card = ModelCard(card_text)
    assert card.data.to_dict() == {
        "base_model": REPO, "base_model_relation": "quantized", "library_name": "gguf", "license": "apache-2.0",
        "pipeline_tag": "text-generation", "quantized_by": "me",
        "tags": ["gguf", "gpt-oss", "mxfp4", "llama.cpp", "ossgguf", "mxfp4-q8"],
    }
    lines = card.text.splitlines()
    assert "| file | recipe | size | bits per weight | sha256 |" in lines
    rows = {r[0].strip(" `"): [c.strip(" `") for c in r] for line in lines if line.startswith("| `")
            for r in [line.split("|")[1:-1]]}
    for recipe, paths in models.values():
        bpw = reader_bpw(paths)
        for p in paths:
            assert rows.pop(p.name) == [p.name, recipe, pub.human_size(p.stat().st_size), f"{bpw:.2f}",
                                        hashlib.sha256(p.read_bytes()).hexdigest()]
    assert rows == {}

    res = CliRunner().invoke(cli, ["publish", "me/gpt-oss-20b-GGUF", str(out), "--dry-run", "--json"])
    assert res.exit_code == 0, (res.output, res.exception)
    got = json.loads(res.stdout)
    assert got["dry_run"] is True and got["repo_id"] == "me/gpt-oss-20b-GGUF"
    assert [(f["name"], f["bytes"], f["sha256"]) for f in got["files"]] == [
        (p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) for p in [*single, *shards]]
    assert not boom.called and no_network == []


@pytest.mark.parametrize("name,split,suggested", [
    ("model.gguf", 0, "gpt-oss-20b-mxfp4.gguf"),
    ("model.gguf", 12_000, "gpt-oss-20b-mxfp4-00001-of-0000{n}.gguf"),
    ("gpt-oss-20b-mxfp4-q8.gguf", 0, "gpt-oss-20b-mxfp4.gguf"),  # the name claims another recipe
])
def test_publish_warns_when_the_name_lacks_the_recipe(tmp_path, monkeypatch, no_network, caplog, name, split,
                                                       suggested):
    from click.testing import CliRunner

    from ossgguf.cli import cli

    paths = write_gguf(tmp_path / "out" / name, split_max_size=split,
                       meta={"general.source.repo_url": f"https://huggingface.co/{REPO}"})
    suggested = suggested.format(n=len(paths))
    boom = _block_hfapi(monkeypatch)
    with caplog.at_level("WARNING", logger=pub.__name__):
        plan = pub.publish(paths[0], "me/repo", dry_run=True)
    (note,) = [n for n in plan.notes if "not name its recipe (mxfp4)" in n]
    assert note.startswith(paths[0].name) and f" to {suggested}" in note, note
    assert ("<base>-<recipe>-00001-of-0000N.gguf" if split else "<base>-<recipe>.gguf") in note
    assert (f"and its {len(paths) - 1} other shards" in note) == bool(split)
    assert note in caplog.messages  # logged as a warning too, so a real upload shows it before it starts
    assert f"note: {note}" in pub.publish_plan_text(plan)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(cli, ["publish", "me/repo", str(paths[0]), "--dry-run"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert f"note: {note}" in res.stdout
    assert not boom.called and no_network == []
    if name == "model.gguf" and not split:  # the command's own logging puts the warning on stderr
        import subprocess
        import sys

        proc = subprocess.run([sys.executable, "-m", "ossgguf.cli", "publish", "me/repo", str(paths[0]), "--dry-run"],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr
        assert f"WARNING ossgguf.hub.publish: {note}" in proc.stderr and f"note: {note}" in proc.stdout


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_publish_calls_hfapi(tmp_path, online, no_network, monkeypatch, link):
    (path,) = write_gguf(tmp_path / "gpt-oss-20b-mxfp4.gguf",
                         meta={"general.source.repo_url": f"https://huggingface.co/{REPO}"})
    if link == "symbolic":  # as when the staging folder is on another filesystem
        monkeypatch.setattr(pub.os, "link", mock.Mock(side_effect=OSError("cross-device link")))
    api = fake_api()
    seen = {}

    def upload_folder(**kw):
        folder = Path(kw["folder_path"])
        seen["names"] = sorted(p.name for p in folder.iterdir())
        seen["card"] = (folder / "README.md").read_text()
        assert (folder / path.name).is_symlink() == (link == "symbolic")
        # huggingface_hub lists the staged folder and hashes the files as upload_folder does (no network
        # for .gguf files): the same bytes as the original.
        (op,) = HfApi()._prepare_upload_folder_additions(folder, "", allow_patterns=["*.gguf"])
        seen["sha"] = op.upload_info.sha256.hex()
        seen["size"] = op.upload_info.size
        seen["folder"] = folder
        return api.upload_folder.return_value

    api.upload_folder.side_effect = upload_folder
    plan = pub.publish(path, "me/repo", private=True, token="hf_test", api=api)
    api.create_repo.assert_called_once_with("me/repo", private=True, exist_ok=True, repo_type="model",
                                            token="hf_test")
    api.upload_folder.assert_called_once_with(repo_id="me/repo", folder_path=str(seen["folder"]),
                                              repo_type="model", revision=None,
                                              commit_message=plan.commit_message, token="hf_test")
    api.create_branch.assert_not_called()
    assert seen["names"] == ["README.md", path.name]
    assert seen["card"] == plan.card
    assert (seen["sha"], seen["size"]) == (plan.files[0].sha256, path.stat().st_size)
    assert not seen["folder"].exists()  # staging removed, the GGUF itself kept
    assert path.exists() and plan.commit_url == "https://huggingface.co/me/repo/commit/abc"
    assert ModelCard(plan.card).data.base_model == REPO
    assert no_network == []


def test_publish_token_from_login_and_revision(tmp_path, online, monkeypatch):
    (path,) = write_gguf(tmp_path / "m.gguf")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_saved")
    api = fake_api()
    pub.publish(path, "me/repo", revision="v1", api=api, commit_message="first")
    api.create_branch.assert_called_once_with("me/repo", branch="v1", exist_ok=True, repo_type="model",
                                              token="hf_saved")
    kw = api.upload_folder.call_args.kwargs
    assert (kw["revision"], kw["commit_message"], kw["token"]) == ("v1", "first", "hf_saved")


@pytest.mark.parametrize("error", [http_error(503), httpx2.ConnectError("connection reset")])
def test_publish_retries_transient_errors(tmp_path, online, error):
    (path,) = write_gguf(tmp_path / "m.gguf")
    api = fake_api()
    api.upload_folder.side_effect = [error, api.upload_folder.return_value]
    plan = pub.publish(path, "me/repo", token="hf_test", api=api)
    assert api.upload_folder.call_count == 2
    assert api.upload_folder.call_args_list[0] == api.upload_folder.call_args_list[1]
    pub.time.sleep.assert_called_once_with(pub.RETRY_DELAYS[0])
    assert plan.commit_url


def test_publish_gives_up(tmp_path, online):
    (path,) = write_gguf(tmp_path / "m.gguf")
    api = fake_api()
    api.upload_folder.side_effect = http_error(502)
    with pytest.raises(OssggufError, match="failed 3 times.*run the same command again"):
        pub.publish(path, "me/repo", token="hf_test", api=api)
    assert api.upload_folder.call_count == 3
    api = fake_api()
    api.create_repo.side_effect = http_error(403)
    with pytest.raises(OssggufError, match="no write access"):
        pub.publish(path, "me/repo", token="hf_test", api=api)
    assert api.create_repo.call_count == 1 and not api.upload_folder.called


def _refused(path, api, match, **kw):
    with pytest.raises(OssggufError, match=match):
        pub.publish(path, "me/repo", api=api, **{"token": "hf_test", **kw})
    assert api.method_calls == []


def test_publish_refuses_bad_input(tmp_path, online, monkeypatch, no_network):
    api = fake_api()
    (good,) = write_gguf(tmp_path / "good" / "m.gguf")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    _refused(good, api, "no Hugging Face token", token=None)

    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model")
    _refused(text, api, "not a GGUF file")

    cut = tmp_path / "cut" / "m.gguf"
    cut.parent.mkdir()
    cut.write_bytes(good.read_bytes()[:-100])
    _refused(cut, api, "is truncated: tensor .* ends at byte")
    cut.write_bytes(good.read_bytes()[:200])
    _refused(cut, api, "truncated inside its header")

    (llama,) = write_gguf(tmp_path / "llama" / "m.gguf", arch="llama")
    _refused(llama, api, "'llama' model, not gpt-oss")

    with pytest.raises(OssggufError, match="over the 1.0 kB limit") as e:
        pub.publish(good, "me/repo", api=api, token="hf_test", max_file_size=1000)
    assert "--split-max-size 48G" in str(e.value) and "llama-gguf-split --split-max-size 48G" in str(e.value)
    assert api.method_calls == []

    shards = write_gguf(tmp_path / "split" / "m.gguf", split_max_size=12_000)
    shards[1].unlink()
    _refused(shards[0], api, f"incomplete: {shards[1].name} missing")
    _refused(tmp_path / "split", api, "incomplete")
    with pytest.raises(OssggufError, match="not a Hugging Face repo id"):
        pub.publish(good, "not a repo", api=api, token="hf_test")
    assert api.method_calls == [] and no_network == []


def test_offline_mode_refuses_publish(tmp_path, monkeypatch):
    (path,) = write_gguf(tmp_path / "m.gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    api = fake_api()
    _refused(path, api, "offline mode is on")


# --- the card ---------------------------------------------------------------------------------------

def test_card_metadata_round_trips(tmp_path):
    write_gguf(tmp_path / "gpt-oss-120b-mxfp4.gguf")
    write_gguf(tmp_path / "gpt-oss-120b-mxfp4-q8.gguf", other=Q.Q8_0, split_max_size=12_000,
               meta={"ossgguf.recipe": "mxfp4-q8"})
    plan = pub.publish(tmp_path, "me/gpt-oss-120b-GGUF", dry_run=True, base_model="openai/gpt-oss-120b",
                       quantized_by="me", compare={"top-1 agreement": 0.987654, "KL divergence": 0.0123})
    card = ModelCard(plan.card)
    assert card.data.to_dict() == {
        "base_model": "openai/gpt-oss-120b", "base_model_relation": "quantized", "library_name": "gguf",
        "license": "apache-2.0", "pipeline_tag": "text-generation", "quantized_by": "me",
        "tags": ["gguf", "gpt-oss", "mxfp4", "llama.cpp", "ossgguf", "mxfp4-q8"],
    }
    rows = [line.split("|")[1:-1] for line in card.text.splitlines() if line.startswith("| `")]
    assert [r[0].strip(" `") for r in rows] == [f.name for f in plan.files]
    assert [r[4].strip(" `") for r in rows] == [f.sha256 for f in plan.files]
    assert "| top-1 agreement | 0.9877 |" in card.text
    # "mxfp4" also matches the mxfp4-q8 files in llama.cpp's tag search: that model is named by file.
    assert "llama-server --hf-repo me/gpt-oss-120b-GGUF --hf-file gpt-oss-120b-mxfp4.gguf" in card.text
    assert "llama-server -hf me/gpt-oss-120b-GGUF:MXFP4-Q8" in card.text
    assert "ollama/ollama#5245" in card.text  # split files cannot go to Ollama
    # Each model's `hf download --include` pattern selects exactly its files (huggingface_hub's matcher).
    names = [f.name for f in plan.files]
    patterns = re.findall(r'--include "([^"]+)"', card.text)
    assert [sorted(filter_repo_objects(names, allow_patterns=[p])) for p in patterns] == [
        ["gpt-oss-120b-mxfp4.gguf"], sorted(n for n in names if "-q8-" in n)]


@pytest.fixture(scope="module")
def find_best_model(tmp_path_factory):
    """llama.cpp's own choice of file for `-hf REPO:TAG` (tests/llama_source.py builds it from its source)."""
    exe = find_best_model_binary(tmp_path_factory.mktemp("llama-download"))
    return lambda files, tag: subprocess.run([str(exe), tag, *files], capture_output=True, text=True,
                                             check=True).stdout


@pytest.mark.parametrize("repo", [
    {"gpt-oss-20b-mxfp4": "mxfp4"},
    {"gpt-oss-20b-mxfp4": "mxfp4", "gpt-oss-20b-mxfp4-q8": "mxfp4-q8"},
    {"gpt-oss-20b-q8_0": "q8_0", "gpt-oss-20b-mxfp4": "mxfp4"},
    {"gpt-oss-120b-mxfp4": "mxfp4", "gpt-oss-120b-mxfp4-q8": ("mxfp4-q8", 2), "gpt-oss-120b-bf16": ("bf16", 3)},
    {"model": "mxfp4", "model-q8": "q8_0"},
])
def test_llama_cpp_tag_is_what_llama_cpp_picks(repo, find_best_model):
    """The card's `-hf REPO:TAG` makes llama.cpp's find_best_model choose the model's (first) file in any
    listing order; where llama_cpp_tag offers none, no tag from the name or the recipe would."""
    files, first = [], {}
    for model, spec in repo.items():
        recipe, n = spec if isinstance(spec, tuple) else (spec, 1)
        shards = [f"{model}.gguf"] if n == 1 else [f"{model}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
        files += shards
        first[model] = shards[0]
    orders = [sorted(files), sorted(files, reverse=True)]
    for model, spec in repo.items():
        recipe = spec[0] if isinstance(spec, tuple) else spec
        tag = llama_cpp_tag(model, list(repo), recipe)
        if tag is not None:
            assert [find_best_model(order, tag) for order in orders] == [first[model]] * 2, tag
        else:
            parts = model.split("-")
            for t in {recipe, *("-".join(parts[i:]) for i in range(len(parts)))}:
                assert any(find_best_model(order, t.upper()) != first[model] for order in orders), t
