"""LoRA adapters on the Hub: fetch an adapter repo (config + weights only), or a base's config.json.

The errors are hub.download's: one place says what a missing cache, a gated repo or a network failure
means for the user.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import OssggufError
from .card import render_card
from .download import _first_line, looks_like_repo_id, offline_mode

log = logging.getLogger(__name__)

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md"]


def _snapshot(repo_id: str, patterns: list[str], what: str, revision: str | None = None,
              token: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not looks_like_repo_id(repo_id):
        raise OssggufError(f"'{repo_id}' is not a Hugging Face repo id: write it as owner/name")
    offline = offline_mode()
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, local_files_only=offline,
                                      allow_patterns=patterns))
    except LocalEntryNotFoundError:
        why = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the Hub could not be reached"
        raise OssggufError(f"{what} '{repo_id}' is not in the cache and {why}: run with network, or pass a "
                           "local folder") from None
    except GatedRepoError:
        raise OssggufError(f"'{repo_id}' is gated: accept its terms on huggingface.co and log in") from None
    except RepositoryNotFoundError:
        raise OssggufError(f"repo '{repo_id}' was not found (or is private)") from None
    except RevisionNotFoundError:
        raise OssggufError(f"revision '{revision}' does not exist in '{repo_id}'") from None
    except (HfHubHTTPError, OSError) as e:
        raise OssggufError(f"downloading '{repo_id}' failed: {_first_line(e)}") from None


def fetch_config(repo_id: str) -> Path:
    """The folder holding a base model's config.json (the adapter's base_model_name_or_path), weights not fetched."""
    path = _snapshot(repo_id, ["config.json"], "the adapter's base model")
    if not (path / "config.json").is_file():
        raise OssggufError(f"'{repo_id}' has no config.json: pass --base (the base GGUF or checkpoint folder)")
    return path


def resolve_adapter(src: str | Path, revision: str | None = None, token: str | None = None) -> tuple[Path, str | None]:
    """(adapter folder, repo id or None): a path that exists is taken as is, a repo id is downloaded
    (adapter_config.json, adapter_model.safetensors, the card)."""
    p = Path(src).expanduser()
    if p.exists():
        return p, None
    if not looks_like_repo_id(str(src)):
        raise OssggufError(f"'{src}' is neither a folder nor a Hugging Face repo id (owner/name)")
    path = _snapshot(str(src), ADAPTER_FILES, "adapter", revision, token)
    log.info("adapter %s in %s", src, path)
    return path, str(src)


def is_adapter(meta) -> bool:
    """Whether a GGUF's metadata (anything with .get) says LoRA adapter (general.type adapter)."""
    return meta.get("general.type") == "adapter"


def adapter_card(files: list, base_model: str | None, repo_id: str, license: str = "apache-2.0") -> str:
    """README.md text for a repo of GGUF LoRA adapters (`files`: hub.card.FileEntry) of `base_model`."""
    base = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a gpt-oss model"
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"LoRA adapter(s) for {base} as GGUF, made with ossgguf (`ossgguf convert-lora`). An adapter "
             "changes a base model at run time: load the base's GGUF (any quantization of it) and the adapter.",
             "", "## Files", "", "| file | size | sha256 |", "|---|---|---|"]
    lines += [f"| `{f.name}` | {f.size:,} bytes | `{f.sha256}` |" for f in files]
    first = files[0].name
    lines += ["", "## How to run", "", "```sh", f'hf download {repo_id} {first} --local-dir .',
              "# ossgguf: the adapter at scale 1 (ADAPTER.gguf:0.5 for half strength; --lora is repeatable)",
              f"ossgguf chat BASE.gguf --lora {first}",
              "# llama.cpp", f"llama-server -m BASE.gguf --lora {first} --jinja", "```", "",
              "BASE.gguf: the base model" + (f" ({base_model})" if base_model else "") + " converted to GGUF, e.g. "
              "with `ossgguf convert`. The adapter must match its shapes (llama.cpp refuses another base).", ""]
    return render_card(lines, base_model, "adapter", license, ["gguf", "gpt-oss", "lora", "llama.cpp", "ossgguf"])
