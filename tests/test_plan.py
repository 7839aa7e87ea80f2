"""The memory planner against llama.cpp's own buffer report and against published gpt-oss figures.

- Tiny models: the planner's bytes per buffer (weights, KV cache, compute graph) against what
  llama.cpp 0.3.36 logs when it loads the same file with the same context (allocated, or with
  `no_alloc`, which sizes every buffer without allocating).
- gpt-oss-120b's real tensor infos (a sparse GGUF): the file size against the published
  63,387,346,464 bytes, and the placements against what users reported (FACTS.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gptoss_shapes import GPT_OSS_20B, GPT_OSS_120B, MXFP4_BF16, write_sparse_gguf

from ossgguf.errors import OssggufError
from ossgguf.gguf.read import read_gguf
from ossgguf.model import TensorClass
from ossgguf.runner.llama_ctypes import (
    LLAMA_LOG,
    llama_cpp_module,
    model_params,
    parse_buffer_lines,
    parse_kv_cells,
    repack_enabled,
)
from ossgguf.runner.plan import (
    Devices,
    GiB,
    PlacementOptions,
    estimate,
    format_plan,
    kv_bytes,
    kv_cells,
    parse_size,
    plan,
    read_model,
)

# big enough that llama.cpp's two-decimal MiB figures resolve 1%, small enough to convert in a second
BUF_SPEC = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_local_experts=8,
                num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                vocab_size=4096, sliding_window=128)
CPU_ONLY = Devices(ram_total=64 * GiB)


def llama_report(path: Path, n_ctx: int, n_ubatch: int, flash_attn: bool, no_alloc: bool) -> list[str]:
    """Load with llama.cpp as the engine does (mmap off so weight buffers are allocated, not mapped
    ranges) and return its log lines."""
    lc = llama_cpp_module()
    lc.llama_backend_init()
    mp = model_params()  # repacking as the engine does it (OSSGGUF_NO_REPACK=1: off)
    mp.no_alloc = no_alloc
    mp.load_mode = lc.LLAMA_LOAD_MODE_NONE
    with LLAMA_LOG.capture() as lines:
        model = lc.llama_model_load_from_file(str(path).encode(), mp)
        assert model
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_outputs_max = n_ctx, n_ubatch, n_ubatch, 1
        cp.flash_attn_type = 1 if flash_attn else 0
        cp.swa_full = False
        ctx = lc.llama_init_from_model(model, cp)
        assert ctx
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return [text for _, text in lines]


def close(a: int, b: int, rel: float = 0.05, abs_: int = 11 * 1024) -> bool:
    """Within 5% (and the +-5 KiB of llama.cpp's two-decimal MiB figures)."""
    return abs(a - b) <= max(rel * b, abs_)


@pytest.fixture(scope="module")
def buf_model(make_gguf) -> Path:
    return make_gguf(**BUF_SPEC)


def test_weight_buffers_match_llama(buf_model):
    lines = llama_report(buf_model, 2048, 512, True, no_alloc=False)
    got = {b.buffer: b.bytes for b in parse_buffer_lines(lines) if b.kind == "model"}
    p = estimate(read_model(buf_model), CPU_ONLY, 2048, 0, gpu=False)
    experts, other = [b.bytes for b in p.buffers if b.kind == "model"]
    # x86 with AVX2 (and ARM with dot products) repack MXFP4 experts into CPU_REPACK, other CPUs
    # keep them with everything else in the plain CPU buffer; repacking off, none does.
    assert set(got) <= {"CPU", "CPU_REPACK"}, got
    if "CPU_REPACK" in got:
        assert repack_enabled() and close(experts, got["CPU_REPACK"], rel=0.01)
        assert close(other, got["CPU"], rel=0.01)
    else:
        assert close(experts + other, got["CPU"], rel=0.01)


@pytest.mark.parametrize("n_ctx,n_ubatch,flash_attn", [
    (2048, 512, True), (4096, 256, True), (8192, 2048, True), (2048, 512, False), (4096, 1024, False),
])
def test_kv_and_compute_buffers_match_llama(buf_model, n_ctx, n_ubatch, flash_attn):
    lines = llama_report(buf_model, n_ctx, n_ubatch, flash_attn, no_alloc=True)
    m = read_model(buf_model)
    p = estimate(m, CPU_ONLY, n_ctx, 0, gpu=False, n_ubatch=n_ubatch, flash_attn=flash_attn)
    # KV: llama.cpp's iSWA cache = a full cache for the global layers + a window-sized one
    full, swa = kv_cells(m, n_ctx, n_ubatch)
    assert sorted(parse_kv_cells(lines)) == sorted([(full, m.swa_layers.count(False)), (swa, m.swa_layers.count(True))])
    kv_line = [ln for ln in lines if ln.startswith("llama_kv_cache: size =")]
    kv_mib = sum(float(ln.split("=")[1].split("MiB")[0]) for ln in kv_line)
    assert close(p.kv_bytes, round(kv_mib * 2**20))
    # compute: the graph's buffer plus the logits output buffer
    llama = sum(b.bytes for b in parse_buffer_lines(lines) if b.kind in ("compute", "output"))
    ours = sum(b.bytes for b in p.buffers if b.kind == "compute")
    assert close(ours, llama), (ours, llama)


@pytest.mark.parametrize("n_ctx,n_seq", [(2048, 2), (1100, 4)])
def test_kv_of_parallel_streams_matches_llama(buf_model, n_ctx, n_seq):
    """--parallel N: the engine creates the context with n_seq_max N and N x ctx (kv_unified off), so
    llama.cpp gives each sequence a stream of the whole context and its own window; the plan's KV, graph
    and logits buffers against what llama.cpp allocates."""
    from ossgguf.runner.engine import Engine

    opts = PlacementOptions(ram=16 * GiB, gpu_mem=0, ctx=n_ctx, threads=1, cache_ram=0, parallel=n_seq)
    with LLAMA_LOG.capture() as captured, Engine.load(buf_model, opts) as e:
        p = e.plan
    lines = [text for _, text in captured]
    full, swa = kv_cells(p.model, n_ctx, p.n_ubatch)
    assert sorted(parse_kv_cells(lines)) == sorted([(full, p.model.swa_layers.count(False)),
                                                    (swa, p.model.swa_layers.count(True))])
    assert any(f"{n_seq}/{n_seq} seqs" in ln for ln in lines if ln.startswith("llama_kv_cache: size ="))
    kv = sum(b.bytes for b in parse_buffer_lines(lines) if b.kind == "KV")
    assert close(p.kv_bytes, kv) and p.kv_bytes == n_seq * kv_bytes(p.model, n_ctx, p.n_ubatch)
    llama = sum(b.bytes for b in parse_buffer_lines(lines) if b.kind in ("compute", "output"))
    assert close(sum(b.bytes for b in p.buffers if b.kind == "compute"), llama)


@pytest.fixture(scope="module")
def g120(tmp_path_factory) -> Path:
    return write_sparse_gguf(tmp_path_factory.mktemp("g120") / "gpt-oss-120b-mxfp4.gguf", GPT_OSS_120B)


def test_header_reader_agrees_with_gguf_py(buf_model):
    """read_model reads headers with ossgguf.gguf.read, which steps over long vocabulary arrays
    itself (gguf-py takes 25 s on gpt-oss's)."""
    from gguf import GGUFReader

    ref, ours = GGUFReader(buf_model), read_gguf(buf_model).files[0]
    assert len(ref.fields["tokenizer.ggml.tokens"].data) >= 4096  # a long array is there
    assert ours.data_offset == ref.data_offset
    assert [(t.name, t.offset) for t in ours.tensors] == [(t.name, t.data_offset) for t in ref.tensors]
    assert [(t.name, t.nbytes) for t in read_model(buf_model).tensors] == [
        (t.name, int(t.n_bytes)) for t in ref.tensors]


def test_120b_shapes_match_the_published_file(g120):
    # llama.cpp's MXFP4 GGUF is 63,387,346,464 bytes; ours lacks only its ~13 MB tokenizer metadata
    assert abs(g120.stat().st_size - 63_387_346_464) < 20e6
    m = read_model(g120)
    assert (m.n_layer, m.n_expert, m.n_vocab, m.n_ctx_train) == (36, 128, 201088, 131072)
    assert m.swa_layers == tuple(i % 2 == 0 for i in range(36))
    assert abs(m.bytes_where(TensorClass.EXPERT, range(1)) - 1.69e9) < 0.01e9  # one layer's experts
    # KV: 36 KiB per token of f16 cache, from the 18 full-attention layers only
    assert kv_bytes(m, 2 * 65536, 512) - kv_bytes(m, 65536, 512) == 65536 * 36 * 1024


@pytest.mark.parametrize("gpu_gib,expected", [(80, {0}), (32, {21}), (24, {26, 27, 28}), (8, {34, 35, 36})])
def test_120b_on_discrete_gpus_matches_user_reports(g120, gpu_gib, expected):
    p = plan(g120, PlacementOptions(gpu_mem=gpu_gib * GiB, ram=128 * GiB))
    assert p.fits and p.n_cpu_moe in expected, format_plan(p)
    assert p.placement == ("gpu" if expected == {0} else "hybrid")
    assert p.gpu_bytes <= p.devices.gpu_budget


def test_120b_n_cpu_moe_20_does_not_fit_32gb(g120):
    p = plan(g120, PlacementOptions(gpu_mem=32 * GiB, ram=128 * GiB, n_cpu_moe=20))
    assert not p.fits and any(n.startswith("GPU: needs") for n in p.notes)


def test_120b_all_experts_in_ram_needs_about_8gb_gpu_at_128k(g120):
    p = plan(g120, PlacementOptions(gpu_mem=80 * GiB, ram=128 * GiB, cpu_moe=True, ctx=131072))
    assert p.to_json()["overrides"] == [r"\.ffn_(up|down|gate)_exps\.weight=CPU"]
    assert 7e9 < p.gpu_bytes < 9e9  # published: about 8 GB at 128k


@pytest.mark.parametrize("ram_gib,fits", [(64, False), (96, True), (128, True)])
def test_120b_on_unified_memory(g120, ram_gib, fits):
    p = plan(g120, PlacementOptions(unified=ram_gib * GiB))
    assert p.fits == fits, format_plan(p)
    if fits:
        assert p.placement == "gpu" and p.n_cpu_moe == 0
    else:  # not in the GPU working set, and not in RAM without paging weights from disk
        assert g120.stat().st_size > p.devices.gpu_budget
        assert any("paging" in n for n in p.notes)
        assert isinstance(p.gpu_bytes, int) and isinstance(p.cpu_bytes, int)


def test_20b_runs_within_16gb(tmp_path):
    """OpenAI: gpt-oss-20b runs within 16 GB of memory."""
    f = write_sparse_gguf(tmp_path / "gpt-oss-20b.gguf", GPT_OSS_20B)
    p = plan(f, PlacementOptions(gpu_mem=16 * GiB, ram=32 * GiB, ctx=8192))
    assert p.fits and p.placement == "gpu"


def test_json_is_complete_also_when_it_does_not_fit(g120):
    p = plan(g120, PlacementOptions(gpu_mem=8 * GiB, ram=64 * GiB, ctx=131072))
    doc = json.loads(json.dumps(p.to_json()))
    assert doc["fits"] is False
    by = lambda device=None, kind=None: sum(b["bytes"] for b in doc["buffers"]  # noqa: E731
                                            if device in (None, b["device"]) and kind in (None, b["kind"]))
    assert (doc["gpu_bytes"], doc["cpu_bytes"]) == (by("gpu"), by("cpu")) and doc["gpu_bytes"] > doc["gpu_budget"]
    assert (doc["kv_bytes"], doc["compute_bytes"]) == (by(kind="kv"), by(kind="compute"))
    # llama.cpp's iSWA cache (swa_full off): f16 K and V of 8 heads x 64 per cell; 18 full layers hold
    # the whole context, 18 sliding ones the 128-token window plus a batch, in cells of 256
    assert doc["kv_bytes"] == 8 * (64 + 64) * 2 * (18 * 131072 + 18 * -(-(128 + doc["n_ubatch"]) // 256) * 256)
    # the least GPU a plan can ask for: every layer's expert weights in RAM, one override for all
    assert doc["placement"] == "none" and doc["n_cpu_moe"] == 36
    assert doc["overrides"] == [r"\.ffn_(up|down|gate)_exps\.weight=CPU"]
    assert isinstance(doc["overrides"], list) and isinstance(doc["notes"], list)
    assert "fits with --ctx 65536" in doc["notes"]


def test_bf16_attention_suggests_the_q8_recipe(tmp_path):
    f = write_sparse_gguf(tmp_path / "bf16.gguf", GPT_OSS_120B, MXFP4_BF16)
    p = plan(f, PlacementOptions(unified=64 * GiB))
    assert not p.fits and any("mxfp4-q8" in n for n in p.notes)


def test_cpu_only_plan_and_report(buf_model):
    p = plan(buf_model, PlacementOptions(ram=8 * GiB, gpu_mem=0))
    assert p.fits and p.placement == "cpu" and p.gpu_bytes == 0 and p.overrides == []
    text = format_plan(p)
    assert "cpu     model" in text and "fits: cpu" in text and "no GPU" in text


def test_errors(tmp_path, buf_model):
    llama = write_sparse_gguf(tmp_path / "llama.gguf", GPT_OSS_20B, arch="llama")
    with pytest.raises(OssggufError, match="'llama' model, not gpt-oss"):
        read_model(llama)
    split = tmp_path / "m-00001-of-00002.gguf"
    split.write_bytes(buf_model.read_bytes())
    with pytest.raises(OssggufError, match="m-00002-of-00002.gguf missing"):
        read_model(split)
    n_train = read_model(buf_model).n_ctx_train
    with pytest.raises(OssggufError, match=f"larger than the model's {n_train}"):
        plan(buf_model, PlacementOptions(ctx=2 * n_train, ram=8 * GiB, gpu_mem=0))


def test_parse_size():
    assert parse_size("24GiB") == parse_size("24G") == 24 * GiB
    assert parse_size("24GB") == 24_000_000_000
    assert parse_size("512MiB") == 512 * 2**20
    with pytest.raises(OssggufError):
        parse_size("lots")


def test_detected_devices_match_llama_cpp_and_psutil(make_gguf):
    import psutil

    from ossgguf.runner.plan import resolve_devices

    d = resolve_devices()
    assert d.source == "detected"
    # llama.cpp's own word: the devices it says it uses when asked to offload every layer (a build with
    # the RPC backend supports offload with no GPU at all, so llama_supports_gpu_offload cannot tell)
    lc = llama_cpp_module()
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = 99
    with LLAMA_LOG.capture() as lines:
        model = lc.llama_model_load_from_file(str(make_gguf()).encode(), mp)
    lc.llama_model_free(model)
    assert d.has_gpu == any("using device" in line for _, line in lines)
    assert d.ram_total == psutil.virtual_memory().total
