"""The streaming writer against gguf-py's reader (a reference this project did not write)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType

from ossgguf.errors import OssggufError
from ossgguf.gguf.stream import stream_write
from ossgguf.gguf.tensors import Tensor
from ossgguf.gguf.values import kv_array, kv_bool, kv_f32, kv_str, kv_u32
from ossgguf.gguf.write import GGUFFileWriter, partial_path, plan_layout
from ossgguf.sizes import parse_size


def write_tensors(shards, chunks):
    """The write loop with one task per chunk."""
    stream_write(shards, [lambda c=c: [c] for c in chunks])


def _kvs():
    return {
        "general.architecture": kv_str("gpt-oss"),
        "general.name": kv_str("tëst"),
        "gpt-oss.block_count": kv_u32(2),
        "gpt-oss.rope.freq_base": kv_f32(150000.0),
        "tokenizer.ggml.tokens": kv_array(GGUFValueType.STRING, ["a", "b", "Ġc"]),
        "tokenizer.ggml.token_type": kv_array(GGUFValueType.INT32, [1, 1, 3]),
        "some.flag": kv_bool(True),
    }


def _tensors(rng):
    specs = [("a.weight", Q.F32, (3, 5)), ("b.weight", Q.BF16, (7, 64)), ("c.weight", Q.F16, (33,)),
             ("d.weight", Q.F32, (2, 2, 8))]
    data = {}
    for name, q, shape in specs:
        nbytes = Tensor(name, q, shape).nbytes
        data[name] = rng.integers(0, 255, nbytes, dtype=np.uint8)
    return [Tensor(n, q, s) for n, q, s in specs], data


@pytest.mark.parametrize("split", [None, 600])
def test_layout_is_exact_and_readable(tmp_path, split):
    rng = np.random.default_rng(0)
    infos, data = _tensors(rng)
    shards = plan_layout(_kvs(), infos, tmp_path / "m.gguf", split)
    write_tensors(shards, [(t.name, 0, data[t.name]) for t in infos])
    if split:
        assert len(shards) > 1
        assert [s.path.name for s in shards][0] == f"m-00001-of-{len(shards):05d}.gguf"
    seen = {}
    for i, s in enumerate(shards):
        assert s.path.stat().st_size == s.size
        r = GGUFReader(s.path)
        if split:
            assert int(r.fields["split.no"].parts[-1][0]) == i
            assert int(r.fields["split.count"].parts[-1][0]) == len(shards)
            assert int(r.fields["split.tensors.count"].parts[-1][0]) == len(infos)
        if i == 0:
            assert r.fields["general.name"].contents() == "tëst"
            assert r.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "Ġc"]
            assert r.fields["some.flag"].contents() is True
        for t in r.tensors:
            seen[t.name] = (t, bytes(np.asarray(t.data).view(np.uint8).reshape(-1)))
    for info in infos:
        t, raw = seen[info.name]
        assert raw == data[info.name].tobytes()
        assert tuple(int(d) for d in t.shape) == tuple(reversed(info.shape))
        assert t.tensor_type == info.qtype


def test_refuses_existing_output_and_cleans_up_on_error(tmp_path):
    rng = np.random.default_rng(1)
    infos, data = _tensors(rng)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    shards = plan_layout(_kvs(), infos, out)
    with pytest.raises(OssggufError, match="--force"):
        write_tensors(shards, [])
    assert out.read_bytes() == b"keep me"
    with pytest.raises(KeyboardInterrupt):
        with GGUFFileWriter(shards, force=True) as w:
            w.write("a.weight", data["a.weight"])
            assert partial_path(out).exists()
            with open(partial_path(out), "rb") as f:
                assert f.read(4) != b"GGUF"  # a partial file never looks like a GGUF
            raise KeyboardInterrupt
    assert not partial_path(out).exists()
    assert out.read_bytes() == b"keep me"


def test_no_holes(tmp_path):
    infos = [Tensor("big.weight", Q.F32, (1024, 1024))]
    shards = plan_layout(_kvs(), infos, tmp_path / "m.gguf")
    write_tensors(shards, [("big.weight", 0, np.ones((1024, 1024), np.float32))])
    st = os.stat(shards[0].path)
    assert st.st_blocks * 512 >= st.st_size


@pytest.mark.parametrize("text,value", [("48G", 48 * 10**9), ("48GB", 48 * 10**9), ("45GiB", 45 * 2**30),
                                        ("500M", 500 * 10**6), ("1024", 1024)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(OssggufError):
        parse_size("lots")
