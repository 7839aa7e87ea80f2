"""gguf-split sets: the shard names and the checks that make shards one model.

llama.cpp names shard i of n `STEM-0000i-of-0000n.gguf` (llama_split_path) and finds the others from
the first; every shard records split.no, split.count and split.tensors.count. The writer adds one
random id per output: shards of two runs with the same layout cannot be told apart by those keys.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ossgguf.errors import OssggufError

if TYPE_CHECKING:
    from ossgguf.gguf.read import GgufFile

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
SPLIT_ID = "ossgguf.split.id"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS, SPLIT_ID)
_SHARD = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<n>\d{5})\.gguf$")
MIXED = "shards of different models or runs mixed in one folder? Keep the shards that one run wrote together"


def split_name(name: str) -> tuple[str, int, int]:
    """(stem, shard number from 1, shard count): ('m', 2, 3) for 'm-00002-of-00003.gguf', ('m', 1, 1)
    for 'm.gguf'. The stem names the model in a card, a server's model list and a folder of sets."""
    m = _SHARD.match(name)
    if m:
        return m["stem"], int(m["no"]), int(m["n"])
    return (name[:-5] if name.lower().endswith(".gguf") else name), 1, 1


def shard_names(out: Path, n: int) -> list[Path]:
    """The files of an n-shard output named `out`: OUT.gguf -> OUT-00001-of-0000N.gguf, ..."""
    if n == 1:
        return [out]
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    return [out.with_name(f"{stem}-{i + 1:05d}-of-{n:05d}.gguf") for i in range(n)]


def shard_paths(path: str | Path) -> list[Path]:
    """Every file of the set `path` belongs to (any shard may be given); OssggufError if one is missing."""
    path = Path(path)
    stem, _, n = split_name(path.name)
    if n == 1:
        if not path.is_file():
            raise OssggufError(f"{path} does not exist: pass a .gguf file (the first shard of a split set)")
        return [path]
    files = shard_names(path.with_name(f"{stem}.gguf"), n)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise OssggufError(f"split set {stem} is incomplete: {', '.join(missing)} missing in {path.parent}; "
                           "keep all shards in one folder")
    return files


def model_sets(path: str | Path) -> list[list[Path]]:
    """The GGUF models at `path`: a file, the split set a shard belongs to, or every model in a folder;
    each as its files, shards in order."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(x for x in p.iterdir() if x.is_file() and x.suffix.lower() == ".gguf")
        if not files:
            raise OssggufError(f"{p} holds no .gguf files: pass a GGUF file or a folder of them")
    elif p.is_file():
        files = [p]
    else:
        raise OssggufError(f"{p} does not exist: pass a GGUF file or a folder of them")
    sets: dict[Path, list[Path]] = {}
    for f in files:
        shards = shard_paths(f)
        sets.setdefault(shards[0], shards)
    return [sets[first] for first in sorted(sets, key=lambda f: split_name(f.name)[0])]


def check_split_set(files: list[GgufFile]) -> None:
    """The shards of one split set as llama.cpp's loader checks them (split.no and split.count in
    each, no tensor twice, split.tensors.count the sum), plus the writer's id where recorded."""
    n = len(files)
    first = files[0]
    if n == 1:
        count = first.get(SPLIT_COUNT)
        if (count or 1) > 1:
            raise OssggufError(f"{first.path} is shard {(first.get(SPLIT_NO) or 0) + 1} of {count} but its name "
                               "lacks -0000N-of-0000M.gguf: keep the names gguf-split wrote")
    for i, f in enumerate(files if n > 1 else []):
        no, count = f.get(SPLIT_NO), f.get(SPLIT_COUNT)
        if no is None or count is None:
            raise OssggufError(f"{f.path} has no split.no/split.count keys: it is not a shard of a gguf-split set "
                               "(a renamed file?); keep the names gguf-split wrote")
        if count != n:
            raise OssggufError(f"{f.path}: split.count is {count}, but the set has {n} files: {MIXED}")
        if no != i:
            raise OssggufError(f"{f.path}: split metadata (split.no {no}, split.count {count}) does not match "
                               "its name: keep the names gguf-split wrote")
        sid, first_id = f.get(SPLIT_ID), first.get(SPLIT_ID)
        if sid is not None and first_id is not None and sid != first_id:
            raise OssggufError(f"{f.path} belongs to another output than {first.path.name} ({SPLIT_ID} {sid} and "
                               f"{first_id}): {MIXED}")
    total = sum(len(f.tensors) for f in files)
    for f in files:
        declared = f.get(SPLIT_TENSORS)
        if declared is not None and declared != total:
            raise OssggufError(f"{f.path}: split.tensors.count is {declared}, but the set's {n} file(s) hold {total} "
                               f"tensors" + (f": {MIXED}" if n > 1 else ": the file is corrupt"))
    where: dict[str, Path] = {}
    for f in files:
        for t in f.tensors:
            if t.name in where:
                raise OssggufError(f"{f.path}: tensor '{t.name}' is also in {where[t.name].name}: {MIXED}")
            where[t.name] = f.path
