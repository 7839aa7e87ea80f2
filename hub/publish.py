"""Publish GGUF files to the Hugging Face Hub: check them, hash them, write the card, upload.

Every check runs before any network call, so a bad file never leaves half a repo behind. The
upload goes through `HfApi.upload_folder`, which with hf_xet splits large folders into several
commits and resumes an interrupted upload when run again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ossgguf.gguf.read import GgufSet, read_gguf
from ossgguf.gguf.split import model_sets, shard_names, split_name
from ossgguf.gguf.tensors import FLOAT_TYPES, Q, Tensor

from ..errors import OssggufError
from ..model import TensorClass, check_gpt_oss, tensor_class
from .adapter import adapter_card, is_adapter
from .card import FileEntry, group_models, human_size, model_bits_per_weight, model_card
from .download import _first_line, looks_like_repo_id, offline_mode

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_FILE_SIZE = 48 * 10**9  # the Hub refuses single files over 50 GB; llama.cpp splits at 48G
RETRY_DELAYS = (5.0, 30.0)  # seconds slept after the 1st and 2nd failed attempt: 3 attempts in all
RECIPE_KEY = "ossgguf.recipe"


# --- which recipe -----------------------------------------------------------------------------------

_WEIGHTS = (TensorClass.EXPERT, TensorClass.ATTENTION, TensorClass.EMBEDDING, TensorClass.OUTPUT)


def infer_recipe(tensors: list[Tensor]) -> str:
    """The recipe whose types these tensors have (quantize.policy.RECIPES), or a description of them."""
    from ..quantize.policy import AS_STORED, RECIPES

    types: dict[TensorClass, set[Q]] = {}
    for t in tensors:
        if (cls := tensor_class(t.name, None)) in _WEIGHTS:
            types.setdefault(cls, set()).add(t.qtype)
    if TensorClass.EXPERT not in types:
        return "unknown"
    for name, table in RECIPES.items():
        if all(got <= (set(FLOAT_TYPES) if table[cls] is AS_STORED else {table[cls]}) for cls, got in types.items()):
            return name
    other = sorted({q.name for c, g in types.items() if c != TensorClass.EXPERT for q in g})
    experts = "/".join(sorted(q.name for q in types[TensorClass.EXPERT]))
    return f"custom (experts {experts}; other weights {'/'.join(other) or 'none'})"


def base_model_of(meta: GgufSet) -> str | None:
    """The Hub repo the GGUF was converted from, from its general.* source/base-model keys."""
    for key in ("general.source.repo_url", "general.base_model.0.repo_url"):
        url = str(meta.get(key) or "")
        m = re.match(r"^https?://(?:huggingface\.co|hf\.co)/([^/]+/[^/]+?)/?$", url)
        if m:
            return m[1]
    return None


# --- hashing and the plan ---------------------------------------------------------------------------

def sha256_files(paths: list[Path], chunk: int = 16 << 20) -> dict[Path, str]:
    """sha256 of each file, streamed, with one progress bar on stderr for all the bytes."""
    from tqdm import tqdm

    out: dict[Path, str] = {}
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256", file=sys.stderr, disable=None) as bar:
        for p in paths:
            h = hashlib.sha256()
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    h.update(view[:n])
                    bar.update(n)
            out[p] = h.hexdigest()
    return out


@dataclass
class PublishPlan:
    repo_id: str
    files: list[FileEntry]
    card: str
    private: bool = False
    revision: str | None = None
    commit_message: str = ""
    dry_run: bool = False
    commit_url: str | None = None  # set after the upload
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id, "private": self.private, "revision": self.revision,
            "commit_message": self.commit_message, "dry_run": self.dry_run, "total_bytes": self.total_bytes,
            "files": [{"name": f.name, "bytes": f.size, "sha256": f.sha256, "recipe": f.recipe,
                       "bits_per_weight": round(f.bits_per_weight, 4)} for f in self.files],
            "commit_url": self.commit_url, "notes": self.notes,
        }


def publish_plan_text(plan: PublishPlan) -> str:
    """What a publish does (or did), for people."""
    vis = "private" if plan.private else "public"
    head = f"{'would upload' if plan.dry_run else 'uploaded'} to {plan.repo_id} ({vis}"
    lines = [head + (f", revision {plan.revision})" if plan.revision else ")")]
    models = group_models(plan.files)
    width = max(len(f.name) for f in plan.files)
    for shards in models.values():
        bpw = model_bits_per_weight(shards)
        for f in shards:
            lines.append(f"  {f.name:<{width}}  {human_size(f.size):>9} {f.size:>17,} B  {f.recipe:<10} "
                         f"{bpw:5.2f} bpw  {f.sha256}")
    card_size = len(plan.card.encode())
    lines.append(f"  {'README.md':<{width}}  {human_size(card_size):>9} {card_size:>17,} B  model card")
    lines.append(f"  total {human_size(plan.total_bytes)} in {len(plan.files)} file(s); "
                 f"commit message: {plan.commit_message!r}")
    lines += [f"  note: {n}" for n in plan.notes]
    if plan.commit_url:
        lines.append(f"  commit: {plan.commit_url}")
    lines += ["", "--- README.md ---", plan.card]
    return "\n".join(lines)


def conventional_name(base: str, recipe: str, count: int = 1) -> str:
    """`<base>-<recipe>.gguf`, or its first shard `<base>-<recipe>-00001-of-0000N.gguf` (llama.cpp's naming)."""
    return shard_names(Path(f"{base}-{recipe}.gguf"), count)[0].name


def name_note(model: str, count: int, recipe: str, base_model: str | None, meta: GgufSet) -> str | None:
    """A warning when a model's file name does not end with its recipe: llama.cpp's `-hf repo:TAG`, Ollama's
    `hf.co/repo:TAG` and people choosing a file all go by the name (`model.gguf` says nothing)."""
    if " " in recipe or recipe == "unknown" or model.lower().endswith("-" + recipe.lower()):
        return None  # a custom mix has no conventional name
    base = (base_model.split("/")[-1] if base_model else None) or str(meta.get("general.name") or "") or model
    new = conventional_name(base, recipe, count)
    if count > 1:
        what = f"{model}-00001-of-{count:05d}.gguf (and its {count - 1} other shards) does"
        todo = f"rename the shards to {new} ... (`<base>-<recipe>-00001-of-0000N.gguf`)"
    else:
        what, todo = f"{model}.gguf does", f"rename it to {new} (`<base>-<recipe>.gguf`)"
    return (f"{what} not name its recipe ({recipe}): {todo} so that `llama-server -hf REPO:{recipe.upper()}` "
            "and readers of the repo can tell the files apart")


def _split_advice(path: Path, size: int, limit: int, recipe: str) -> str:
    out = path.parent / "split" / path.name
    rec = recipe if " " not in recipe else "mxfp4"
    return (f"{path} is {human_size(size)}, over the {human_size(limit)} limit for one file: split it with "
            f"`ossgguf quantize {path} -o {out} --recipe {rec} --split-max-size 48G` (or llama.cpp's "
            f"`llama-gguf-split --split-max-size 48G {path} {out.with_suffix('')}`), then publish the folder "
            f"{out.parent} or its first shard (-00001-of-0000N.gguf)")


def plan_publish(path: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                 commit_message: str | None = None, max_file_size: int = MAX_FILE_SIZE,
                 base_model: str | None = None, quantized_by: str | None = None,
                 compare: dict[str, Any] | None = None, plan_hints: list[str] | None = None,
                 dry_run: bool = True) -> PublishPlan:
    """Check, hash and describe the files; no network."""
    if not looks_like_repo_id(repo_id):
        raise OssggufError(f"'{repo_id}' is not a Hugging Face repo id: write it as owner/name")
    sets: list[GgufSet] = []
    for files in model_sets(path):  # each read and checked as one set (ossgguf.gguf.read)
        sets.append(read_gguf(files[0]))
        check_gpt_oss(sets[-1])
    adapters = [is_adapter(g) for g in sets]
    if any(adapters) and not all(adapters):
        raise OssggufError(f"{path} mixes LoRA adapters and models: publish them to separate repos")
    # name (without -0000N-of-0000M.gguf), files, recipe
    models = [(split_name(g.path.name)[0], g, "lora" if a else str(g.get(RECIPE_KEY) or infer_recipe(g.tensors)))
              for g, a in zip(sets, adapters)]
    for _, g, recipe in models:
        for f in g.files:
            if f.size > max_file_size:
                raise OssggufError(_split_advice(f.path, f.size, max_file_size, recipe))
    hashes = sha256_files([f.path for _, g, _ in models for f in g.files])
    entries = [FileEntry(f.path.name, f.size, hashes[f.path], recipe, sum(t.nbytes for t in f.tensors),
                         sum(t.n_params for t in f.tensors), f.path.resolve())
               for _, g, recipe in models for f in g.files]
    notes = []
    base = base_model or next((b for _, g, _ in models if (b := base_model_of(g))), None)
    if base is None:
        notes.append("base model unknown (no general.source.repo_url in the GGUF): pass --base-model")
    notes += [n for m, g, recipe in models if not all(adapters) and (n := name_note(m, len(g.files), recipe, base, g))]
    for n in notes:
        log.warning("%s", n)
    recipes = [recipe for _, _, recipe in models]
    main_recipe = max(recipes, key=recipes.count)
    license = str(models[0][1].get("general.license") or "apache-2.0")
    card = adapter_card(entries, base, repo_id, license) if all(adapters) else \
        model_card(entries, base, main_recipe, quantized_by or repo_id.split("/")[0], compare, plan_hints,
                   license=license, repo_id=repo_id)
    message = commit_message or f"Upload {', '.join(sorted(set(recipes)))} GGUF ({len(entries)} file(s))"
    return PublishPlan(repo_id, entries, card, private, revision, message, dry_run, notes=notes)


# --- the upload -------------------------------------------------------------------------------------

def _transient(e: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return False
    if isinstance(e, HfHubHTTPError):
        status = getattr(e.response, "status_code", None)
        return status is not None and (status >= 500 or status == 429)
    return isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError))


def _user_error(what: str, repo_id: str, e: BaseException, attempts: int) -> OssggufError:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    first = _first_line(e)
    status = getattr(getattr(e, "response", None), "status_code", None) if isinstance(e, HfHubHTTPError) else None
    if isinstance(e, OfflineModeIsEnabled):
        return OssggufError(f"{what}: offline mode is on (HF_HUB_OFFLINE): unset it to publish")
    if status == 401:
        return OssggufError(f"{what}: the Hub rejected the token (401): log in with `hf auth login` or pass --token")
    if status == 403:
        return OssggufError(f"{what}: no write access to {repo_id} (403): use a token with write permission "
                            "for that user or organisation")
    if _transient(e):
        return OssggufError(f"{what} failed {attempts} times ({first}): run the same command again; the upload "
                            "resumes (files already committed are skipped)")
    return OssggufError(f"{what} failed: {first}")


def _with_retry(what: str, repo_id: str, fn: Callable[[], T]) -> T:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    attempts = len(RETRY_DELAYS) + 1
    for i in range(attempts):
        try:
            return fn()
        except (HfHubHTTPError, httpx2.HTTPError, ConnectionError, TimeoutError) as e:
            if not _transient(e) or i == attempts - 1:
                raise _user_error(what, repo_id, e, i + 1) from e
            log.warning("%s failed (%s); attempt %d of %d in %.0f s", what, e, i + 2, attempts, RETRY_DELAYS[i])
            time.sleep(RETRY_DELAYS[i])
    raise AssertionError("unreachable")


def stage(plan: PublishPlan, folder: Path) -> None:
    """The repo's files in `folder`: links to the GGUFs (never copies of 60 GB) and README.md."""
    for f in plan.files:
        assert f.path is not None
        dst = folder / f.name
        try:
            os.link(f.path, dst)
        except OSError:  # another filesystem, or links not allowed
            os.symlink(f.path, dst)
    (folder / "README.md").write_text(plan.card, encoding="utf-8")


def publish(path: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
            commit_message: str | None = None, token: str | None = None, dry_run: bool = False,
            max_file_size: int = MAX_FILE_SIZE, api: Any = None, *, base_model: str | None = None,
            quantized_by: str | None = None, compare: dict[str, Any] | None = None,
            plan_hints: list[str] | None = None) -> PublishPlan:
    """Upload gpt-oss GGUFs (a file, the first shard of a split set, or a folder) and their card to a
    model repo. `dry_run` checks and hashes the files and returns the plan without any network call."""
    if not dry_run:
        if offline_mode():
            raise OssggufError("offline mode is on (HF_HUB_OFFLINE): unset it to publish, or use --dry-run")
        if token is None:
            from huggingface_hub import get_token

            token = get_token()
        if not token:
            raise OssggufError("no Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass --token "
                               "(it needs write access)")
    plan = plan_publish(path, repo_id, private=private, revision=revision, commit_message=commit_message,
                        max_file_size=max_file_size, base_model=base_model, quantized_by=quantized_by,
                        compare=compare, plan_hints=plan_hints, dry_run=dry_run)
    if dry_run:
        return plan
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="ossgguf-publish-") as tmp:
        stage(plan, Path(tmp))
        _with_retry(f"creating {repo_id}", repo_id, lambda: api.create_repo(
            repo_id, private=private, exist_ok=True, repo_type="model", token=token))
        if revision and revision != "main":
            _with_retry(f"creating branch {revision}", repo_id, lambda: api.create_branch(
                repo_id, branch=revision, exist_ok=True, repo_type="model", token=token))
        info = _with_retry(f"uploading to {repo_id}", repo_id, lambda: api.upload_folder(
            repo_id=repo_id, folder_path=tmp, repo_type="model", revision=revision,
            commit_message=plan.commit_message, token=token))
    plan.commit_url = str(getattr(info, "commit_url", "") or "") or None
    log.info("published %d file(s) to %s", len(plan.files), repo_id)
    return plan
