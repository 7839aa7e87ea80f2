"""Download a gpt-oss checkpoint from the Hugging Face Hub: the files the converter reads, nothing else.

The repos also hold OpenAI's own layout (original/) and Metal weights (metal/), as large as the
checkpoint itself: they are skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from ..errors import OssggufError
from ..model import GptOssConfig

log = logging.getLogger(__name__)

ALLOW_PATTERNS = [
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "README.md",  # the model card: its license goes into the GGUF metadata
]
IGNORE_PATTERNS = ["original/*", "metal/*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "on", "yes", "true"}


def offline_mode() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but at call time (its constant is read at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    return env.strip().lower() in _TRUE if env is not None else bool(constants.HF_HUB_OFFLINE)


def looks_like_repo_id(src: str) -> bool:
    return bool(_REPO_ID.match(src)) and ".." not in src and not src.endswith((".git", "."))


def download(repo_id: str, local_dir: str | Path | None = None, revision: str | None = None,
             token: str | None = None, offline: bool | None = None) -> Path:
    """Fetch (or find in the cache) the checkpoint files of a gpt-oss repo; returns their folder.

    Files go to the shared Hugging Face cache (HF_HUB_CACHE) unless `local_dir` is given. Offline
    (`offline=True` or HF_HUB_OFFLINE=1), only the cache or `local_dir` is used.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not looks_like_repo_id(repo_id):
        raise OssggufError(f"'{repo_id}' is not a Hugging Face repo id: write it as owner/name (openai/gpt-oss-20b)")
    offline = offline_mode() if offline is None else offline
    where = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")

    def fetch(patterns: list[str]) -> Path:
        return Path(snapshot_download(
            repo_id, repo_type="model", revision=revision, local_dir=local_dir,
            token=token, local_files_only=offline, allow_patterns=patterns, ignore_patterns=IGNORE_PATTERNS,
        ))

    try:
        # config.json first: a repo that is not gpt-oss is refused before its weights are fetched
        _check_config(fetch(["config.json"]), repo_id)
        path = fetch(ALLOW_PATTERNS)
    except IncompleteSnapshotError as e:
        raise OssggufError(f"{where} is only partly in the cache ({_first_line(e)}): run "
                           f"`ossgguf download {repo_id}` with network to complete it") from None
    except LocalEntryNotFoundError:
        off = offline or offline_mode()
        why = "offline mode is on (HF_HUB_OFFLINE or --offline)" if off else "the Hub could not be reached"
        raise OssggufError(f"{where} is not in the cache and {why}: run with network, or pass a local folder "
                           "that holds the checkpoint") from None
    except GatedRepoError:
        raise OssggufError(f"{where} is gated: accept its terms on huggingface.co, then log in with "
                           "`hf auth login` or pass --token") from None
    except RepositoryNotFoundError:
        raise OssggufError(f"repo {where} was not found (or is private): check the name, or log in with "
                           "`hf auth login` / pass --token") from None
    except RevisionNotFoundError:
        raise OssggufError(f"revision '{revision}' does not exist in '{repo_id}': pass a branch, tag or "
                           "commit that exists") from None
    except HfHubHTTPError as e:
        raise OssggufError(f"downloading {where} failed: {_first_line(e)}; try again later") from None
    except OSError as e:  # disk full, permissions, a lost connection in the middle of a file
        raise OssggufError(f"downloading {where} failed: {e}; check free space and run again to resume") from None
    if not any(path.glob("*.safetensors")):
        raise OssggufError(f"{repo_id} has no .safetensors weights in {path}: run `ossgguf download` with network "
                           "to fetch them")
    log.info("checkpoint %s in %s", repo_id, path)
    return path


def _check_config(path: Path, what: str) -> GptOssConfig:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise OssggufError(f"{what} has no config.json: it is not a Hugging Face checkpoint")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OssggufError(f"{cfg_path} cannot be read: {e}") from None
    return GptOssConfig.from_dict(cfg, where=f"{what}/config.json")


def resolve_source(src: str | Path, revision: str | None = None, token: str | None = None,
                   offline: bool | None = None) -> tuple[Path, str | None]:
    """(checkpoint folder, repo id or None): a path that exists is taken as given (the converter's reader
    says what it lacks), anything else must be a repo id (owner/name), downloaded to the cache."""
    p = Path(src).expanduser()
    if p.exists():
        return p, None
    text = str(src)
    if looks_like_repo_id(text):
        return download(text, revision=revision, token=token, offline=offline), text
    raise OssggufError(f"'{text}' is neither a folder nor a Hugging Face repo id (owner/name)")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
