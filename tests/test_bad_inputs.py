"""Bad input files through the CLI (issue 11): every command that reads a GGUF, a messages/tools file
or a text file refuses a bad one with one short line naming the file (and the key or tensor), no
traceback, and nothing written.

Each bad GGUF is a valid tiny one with header bytes patched, at positions found by gguf-py's reader
(a reference this project did not write); llama.cpp's loader (ggml/src/gguf.cpp) refuses them all.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType

from ossgguf.gguf.read import read_gguf
from ossgguf.gguf.split import SPLIT_ID

SPLIT = 60_000  # bytes per shard: the tiny model in 4 shards


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ossgguf.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, stdin=subprocess.DEVNULL, timeout=120)


def _cli_many(commands: list[list], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Several commands at once (each its own process): the module stays fast on few cores."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda args: _cli(*args, cwd=cwd), commands))


def _refused(proc: subprocess.CompletedProcess, *names: str) -> str:
    """The command failed with one short `error:` line that names each of `names` (or click's own usage
    error, whose last line is `Error: ...`, for a path that does not exist)."""
    err = proc.stderr.strip()
    assert proc.returncode != 0, (proc.stdout[-500:], err)
    assert "Traceback" not in err and "unexpected" not in err, err
    lines = err.splitlines()
    if lines and lines[-1].startswith("Error: ") and lines[0].startswith("Usage: "):
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].lower().startswith("error: "), err
    assert len(lines[0]) < 400, err
    for n in names:
        assert n in lines[0], (n, err)
    return lines[0]


# --- byte-level edits at positions gguf-py's reader reports -------------------------------------------

def _pos(field, part: int) -> int:
    """Absolute offset of `field.parts[part]` (parts: key/name length, bytes, then type, values...)."""
    return field.offset + sum(p.nbytes for p in field.parts[:part])


def _patch(src: Path, dst: Path, edits: list[tuple[int, bytes]], extra: bytes = b"") -> Path:
    data = bytearray(src.read_bytes())
    for at, raw in edits:
        data[at:at + len(raw)] = raw
    dst.write_bytes(bytes(data) + extra)
    return dst


def _tensor_field(src: Path, name: str):
    return next(t.field for t in gguf.GGUFReader(src).tensors if t.name == name)


def patch_tensor(src: Path, dst: Path, name: str, *, ne: list[int] | None = None, qtype: int | None = None,
                 offset: int | None = None, new_name: str | None = None, n_dims: int | None = None,
                 extra: bytes = b"") -> Path:
    """`src` with one tensor info changed in place (parts: name len, name, n_dims, ne, type, offset)."""
    f = _tensor_field(src, name)
    edits = []
    if new_name is not None:
        assert len(new_name) == len(name)
        edits.append((_pos(f, 1), new_name.encode()))
    if n_dims is not None:
        edits.append((_pos(f, 2), struct.pack("<I", n_dims)))
    if ne is not None:
        assert len(ne) == int(f.parts[2][0])
        edits.append((_pos(f, 3), struct.pack(f"<{len(ne)}Q", *ne)))
    if qtype is not None:
        edits.append((_pos(f, 4), struct.pack("<I", qtype)))
    if offset is not None:
        edits.append((_pos(f, 5), struct.pack("<Q", offset)))
    return _patch(src, dst, edits, extra)


def patch_kv(src: Path, dst: Path, key: str, raw: bytes | None = None, new_key: str | None = None) -> Path:
    """`src` with a scalar key's value bytes (or its name, same length) replaced in place."""
    f = gguf.GGUFReader(src).fields[key]
    edits = []
    if raw is not None:
        edits.append((_pos(f, 3), raw))
    if new_key is not None:
        assert len(new_key) == len(key)
        edits.append((_pos(f, 1), new_key.encode()))
    return _patch(src, dst, edits)


def insert_kv(src: Path, dst: Path, key: str, vtype: GGUFValueType, raw: bytes) -> Path:
    """`src` with one more key first: the tensor infos follow unchanged and the data moves to the next
    32-byte boundary after the longer header (their offsets are relative to it)."""
    r = gguf.GGUFReader(src)
    data = src.read_bytes()
    last = r.tensors[-1].field
    end = _pos(last, len(last.parts))  # end of the tensor infos
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    kv = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + raw
    head = data[:16] + struct.pack("<Q", n_kv + 1) + kv + data[24:end]
    head += b"\0" * (-len(head) % 32)
    dst.write_bytes(head + data[r.data_offset:])
    return dst


def copy_set(first: Path, folder: Path, name: str = "m") -> list[Path]:
    """The split set of `first` copied into `folder` as name-0000N-of-0000M.gguf."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [f.path for f in read_gguf(first).files]
    out = [folder / f"{name}-{i + 1:05d}-of-{len(files):05d}.gguf" for i in range(len(files))]
    for s, d in zip(files, out):
        shutil.copy(s, d)
    return out


# --- the bad files ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(make_gguf, tmp_path_factory) -> dict:
    """{case: (path to pass, [strings the error must name])}, plus the valid inputs under '_' keys."""
    d = tmp_path_factory.mktemp("bad")
    good = d / "good.gguf"
    shutil.copy(make_gguf("mxfp4"), good)
    u32 = lambda v: struct.pack("<I", v)  # noqa: E731
    out: dict = {"_good": good, "_text": d / "calib.txt", "_messages": d / "ok.json"}
    out["_text"].write_text("Hello there. " * 20)
    out["_messages"].write_text('[{"role": "user", "content": "hi"}]')

    def case(name: str, path: Path, *names: str, named: Path | None = None) -> None:
        """`path` to pass; the error must name `named` (default: `path`) and `names`."""
        out[name] = (path, [(named or path).name, *names])

    for label, vtype, raw in [("zero", GGUFValueType.UINT32, u32(0)), ("npot", GGUFValueType.UINT32, u32(48)),
                              ("negative", GGUFValueType.INT32, struct.pack("<i", -32)),
                              ("string", GGUFValueType.STRING, struct.pack("<Q", 2) + b"32")]:
        case(f"alignment-{label}", insert_kv(good, d / f"align-{label}.gguf", "general.alignment", vtype, raw),
             "general.alignment")
    embd = "token_embd.weight"  # BF16 [640, 64]: ne = [64, 640]
    case("ne-overflow", patch_tensor(good, d / "overflow.gguf", embd, ne=[4, 2**62]), embd)
    case("ne-too-big", patch_tensor(good, d / "big.gguf", embd, ne=[2**20, 2**40]), embd)
    case("ne-negative", patch_tensor(good, d / "negative.gguf", embd, ne=[64, 2**64 - 640]), embd)
    case("n-dims", patch_tensor(good, d / "dims.gguf", embd, n_dims=5), embd)
    case("type-unknown", patch_tensor(good, d / "type.gguf", embd, qtype=999), embd)
    last = "output.weight"
    off = int(_tensor_field(good, last).parts[5][0])
    case("offset-gap", patch_tensor(good, d / "gap.gguf", last, offset=off + 32, extra=bytes(32)), last)
    case("offset-overlap", patch_tensor(good, d / "overlap.gguf", last, offset=0), last)
    case("tensor-twice", patch_tensor(good, d / "dup.gguf", "blk.1.attn_q.weight", new_name="blk.0.attn_q.weight"),
         "blk.0.attn_q.weight")
    case("key-twice", patch_kv(good, d / "dupkey.gguf", "general.name", new_key="general.type"), "general.type")
    # metadata that the tensors contradict (as in a set mixing a 20b's and a 120b's shards)
    case("fewer-layers", patch_kv(good, d / "layers.gguf", "gpt-oss.block_count", u32(1)), "blk.1.", "block_count 1")
    case("other-experts", patch_kv(good, d / "experts.gguf", "gpt-oss.expert_count", u32(3)), "ffn_", "expert_count 3")
    raw = good.read_bytes()
    (d / "cut.gguf").write_bytes(raw[:-100])
    case("cut-data", d / "cut.gguf", "truncated")
    (d / "cut-head.gguf").write_bytes(raw[:200])
    case("cut-header", d / "cut-head.gguf", "truncated")
    (d / "counts.gguf").write_bytes(raw[:8] + struct.pack("<Q", 2**40) + raw[16:])
    case("tensor-count", d / "counts.gguf", "tensors")
    (d / "image.gguf").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    case("not-gguf", d / "image.gguf", "not a GGUF")
    case("missing", d / "nope.gguf", "does not exist")

    # split sets: A and B have the same layout (other weights), C one more layer
    a = make_gguf("mxfp4", split=SPLIT)
    b = make_gguf("mxfp4", split=SPLIT, seed=1)
    c = make_gguf("mxfp4", split=SPLIT, num_hidden_layers=3)
    sa = copy_set(a, d / "split-good")
    out["_split"] = sa
    n = len(sa)
    assert n > 2 and len(read_gguf(b).files) == n

    mixed = copy_set(a, d / "mixed-id")
    shutil.copy(read_gguf(b).files[1].path, mixed[1])
    case("split-other-run", mixed[0], SPLIT_ID, named=mixed[1])
    counted = copy_set(a, d / "tensors-count")
    patch_kv(sa[0], counted[0], "split.tensors.count", struct.pack("<i", len(read_gguf(a).tensors) - 1))
    case("split-tensors-count", counted[0], "split.tensors.count")
    numbered = copy_set(a, d / "split-no")
    patch_kv(sa[1], numbered[1], "split.no", struct.pack("<H", 2))
    case("split-no", numbered[0], "split.no", named=numbered[1])
    recounted = copy_set(a, d / "split-count")
    patch_kv(sa[2], recounted[2], "split.count", struct.pack("<H", n + 1))
    case("split-count", recounted[0], "split.count", named=recounted[2])
    # a shard of a deeper model with this set's id and count (as another writer's shards have no id)
    deep = copy_set(a, d / "mixed-depth")
    c2 = read_gguf(c).files[1].path
    sid = read_gguf(a).get(SPLIT_ID).encode()
    patch_kv(c2, deep[1], SPLIT_ID, struct.pack("<Q", len(sid)) + sid)
    patch_kv(deep[1], deep[1], "split.count", struct.pack("<H", n))
    case("split-other-model", deep[0], "mixed", named=deep[1])
    lone = d / "lone.gguf"  # a shard renamed as if it were a whole model
    shutil.copy(sa[0], lone)
    case("split-renamed", lone, "-0000N-of-0000M")
    return out


BAD = ["alignment-zero", "alignment-npot", "alignment-negative", "alignment-string", "ne-overflow", "ne-too-big",
       "ne-negative", "n-dims", "type-unknown", "offset-gap", "offset-overlap", "tensor-twice", "key-twice",
       "fewer-layers", "other-experts", "cut-data", "cut-header", "tensor-count", "not-gguf", "missing", "split-other-run", "split-tensors-count",
       "split-no", "split-count", "split-other-model", "split-renamed"]


def test_the_valid_files_pass(files, tmp_path):
    """The control: the unpatched files go through the same commands."""
    for path in (files["_good"], files["_split"][1]):
        assert _cli("inspect", path, cwd=tmp_path).returncode == 0
        proc = _cli("publish", "me/repo", path, "--dry-run", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    ids = {read_gguf(files["_split"][0]).files[i].get(SPLIT_ID) for i in range(len(files["_split"]))}
    assert len(ids) == 1 and None not in ids  # the writer's id, in every shard
    assert read_gguf(files["_good"]).get(SPLIT_ID) is None  # single files stay as llama.cpp writes them


@pytest.fixture(scope="module")
def inspected(files, tmp_path_factory) -> dict:
    """`ossgguf inspect` of every bad file, run side by side once."""
    return dict(zip(BAD, _cli_many([["inspect", files[c][0]] for c in BAD], tmp_path_factory.mktemp("inspect"))))


@pytest.mark.parametrize("case", BAD)
def test_inspect_refuses(files, inspected, case):
    _refused(inspected[case], *files[case][1])


def _command(cmd: str, path: Path, files: dict, out: Path) -> list:
    texts, msgs = files["_text"], files["_messages"]
    return {
        "plan": ["plan", path, "--ram", "8GiB", "--gpu-mem", "0"],
        "quantize": ["quantize", path, "-o", out, "--recipe", "mxfp4-q8"],
        "prune": ["prune", path, "-o", out, "--keep", "2", "--dry-run"],
        "publish": ["publish", "me/repo", path, "--dry-run"],
        "compare": ["compare", files["_good"], path, "--ctx", "16"],
        "run": ["run", path, "-p", "hi", "--max-tokens", "1"],
        "render": ["render", path, "--messages", msgs],
        "calibrate": ["calibrate", path, "--text", texts, "-o", out],
    }[cmd]


COMMANDS = ["plan", "quantize", "prune", "publish", "compare", "run", "render", "calibrate"]


@pytest.mark.parametrize("case", ["alignment-negative", "ne-overflow", "tensor-twice", "split-other-run"])
def test_every_reader_refuses(files, tmp_path, case):
    path, names = files[case]
    outs = [tmp_path / cmd for cmd in COMMANDS]
    for o in outs:
        o.mkdir()
    procs = _cli_many([_command(cmd, path, files, o / "o.gguf") for cmd, o in zip(COMMANDS, outs)], tmp_path)
    for cmd, proc, o in zip(COMMANDS, procs, outs):
        try:
            _refused(proc, *names)
        except AssertionError as e:
            raise AssertionError(f"ossgguf {cmd}: {e}") from None
        assert list(o.iterdir()) == [], cmd  # no output, no partial


def test_publish_checks_split_sets_with_the_reader(files, tmp_path):
    """publish --dry-run used to accept a wrong split.tensors.count and mixed shards: a file, a shard or
    a folder, the set is checked as one by the reader."""
    counted, names = files["split-tensors-count"]
    mixed, mixed_names = files["split-other-run"]
    procs = _cli_many([["publish", "me/repo", counted, "--dry-run"], ["publish", "me/repo", counted.parent, "--dry-run"],
                       ["publish", "me/repo", mixed.parent, "--dry-run"]], tmp_path)
    _refused(procs[0], *names)
    _refused(procs[1], *names)
    _refused(procs[2], *mixed_names)


# --- compare's own inputs -----------------------------------------------------------------------------

def test_compare_takes_any_shard_and_refuses_bad_options(files, tmp_path):
    good, shard2 = files["_good"], files["_split"][1]
    proc = _cli("compare", good, shard2, "--ctx", "16", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = _refused(_cli("compare", good, shard2, "--ctx", "0", cwd=tmp_path), "--ctx")
    assert good.name not in line and shard2.name not in line  # the option is wrong, not the files
    binary = tmp_path / "text.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(32))
    _refused(_cli("compare", good, good, "--text", binary, cwd=tmp_path), binary.name, "UTF-8")
    binary.write_bytes(b"abc" + bytes(32))
    _refused(_cli("compare", good, good, "--text", binary, cwd=tmp_path), binary.name, "text")


def test_compare_library_refuses_a_tiny_context(files):
    from ossgguf.errors import OssggufError
    from ossgguf.quantize.compare import compare

    with pytest.raises(OssggufError, match="--ctx 0 is too small"):
        compare(files["_good"], files["_good"], n_ctx=0)


# --- messages and tools files -------------------------------------------------------------------------

BAD_JSON = {
    "unknown-role": ('[{"role": "bot", "content": "x"}]', "messages[0]"),
    "not-object": ('["hi"]', "messages[0]"),
    "empty": ("[]", "no messages"),
    "orphan-tool": ('[{"role": "tool", "content": "42"}]', "messages[0]"),
    "unknown-call-id": ('[{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c9", "content": "1"}]',
                        "messages[1]"),
    "image-part": ('[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]',
                   "messages[0].content[0]"),
    "bad-call": ('[{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"id": "c", '
                 '"type": "function", "function": {"arguments": "{}"}}]}]', "messages[1].tool_calls[0]"),
    "not-json": ('[{"role": "user"', "not valid JSON"),
    "not-a-list": ('{"model": "x"}', "list of messages"),
    "body-bad-tool": ('{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
                      '"function": {"name": "f", "parameters": {"type": "string"}}}]}', "object"),
}
BAD_TOOLS = {
    "tool-name": ('[{"type": "function", "function": {"name": "two words"}}]', "tools[0].function.name"),
    "tool-schema": ('[{"type": "function", "function": {"name": "f", "parameters": {"properties": []}}}]',
                    "properties"),
    "tool-twice": ('[{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": '
                   '{"name": "f"}}]', "Duplicate"),
    "tool-not-object": ("[1]", "tools[0]"),
    "tools-not-list": ('{"tool": 1}', "list of tools"),
}


@pytest.mark.parametrize("case", [*BAD_JSON, "latin-1"])
def test_messages_file_errors_name_the_file(files, tmp_path, case):
    m = tmp_path / "chat.json"
    if case == "latin-1":
        m.write_bytes('[{"role": "user", "content": "café"}]'.encode("latin-1"))
        what = "UTF-8"
    else:
        m.write_text(BAD_JSON[case][0])
        what = BAD_JSON[case][1]
    good = files["_good"]
    commands = [["render", good, "--messages", m]]
    if case in ("latin-1", "unknown-role", "body-bad-tool"):  # run and chat load the file the same way
        commands += [["run", good, "--messages", m, "-p", "hi"], ["chat", good, "--messages", m]]
    for proc in _cli_many(commands, tmp_path):
        _refused(proc, "chat.json", what)


@pytest.mark.parametrize("case", BAD_TOOLS)
def test_tools_file_errors_name_the_file(files, tmp_path, case):
    m, t = tmp_path / "chat.json", tmp_path / "tools.json"
    m.write_text('[{"role": "user", "content": "hi"}]')
    t.write_text(BAD_TOOLS[case][0])
    _refused(_cli("render", files["_good"], "--messages", m, "--tools", t, cwd=tmp_path), "tools.json",
             BAD_TOOLS[case][1])


def test_render_reads_the_model(files, tmp_path):
    m = tmp_path / "chat.json"
    m.write_text('[{"role": "user", "content": "hi"}]')
    proc = _cli("render", files["_split"][1], "--messages", m, "--date", "2025-01-01", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.endswith("<|start|>assistant"), proc.stderr
    for case in ("missing", "not-gguf", "cut-data"):
        path, names = files[case]
        _refused(_cli("render", path, "--messages", m, cwd=tmp_path), *names)
    bare = tmp_path / "bare.gguf"  # a gpt-oss header whose vocabulary lacks harmony's tokens
    w = gguf.GGUFWriter(bare, "gpt-oss")
    w.add_token_list(["a", "b", "<|end|>"])
    w.add_tensor("token_embd.weight", np.zeros((3, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _refused(_cli("render", bare, "--messages", m, cwd=tmp_path), "bare.gguf", "<|start|>")
