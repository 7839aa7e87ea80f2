"""The model card (README.md) of a published GGUF repo: front matter as GGUF publishers write it, a
table of files, quality figures, and how to run the files with ossgguf, llama.cpp and Ollama."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ossgguf.gguf.split import split_name
from ossgguf.sizes import human_size

REPO_PLACEHOLDER = "USER/REPO"
# What each recipe (quantize/policy.py) does, for people; norms, sinks, biases and router are F32 in all.
RECIPE_NOTES = {
    "mxfp4": "experts in MXFP4 as OpenAI released them (copied bit for bit), the other weights as stored (BF16)",
    "mxfp4-q8": "experts in MXFP4 as OpenAI released them, attention, embeddings and output head in Q8_0 "
                "(the layout of llama.cpp's own gpt-oss GGUFs)",
    "q8_0": "every weight matrix in Q8_0 (experts re-quantized from MXFP4: bigger, and lossy)",
    "bf16": "every weight matrix in BF16 (dequantized)",
    "f16": "every weight matrix in F16 (dequantized)",
}


@dataclass(frozen=True)
class FileEntry:
    """One GGUF file to publish. Shards of one split model share `model` (the name without the
    -0000N-of-0000M.gguf suffix); bits per weight are reported per model, over all its shards."""

    name: str  # path in the repo
    size: int  # bytes on disk
    sha256: str
    recipe: str
    tensor_bytes: int  # bytes of tensor data (the header excluded)
    n_elements: int  # weights in the file's tensors
    path: Path | None = None  # the local file

    @property
    def model(self) -> str:
        return split_name(self.name)[0]

    @property
    def bits_per_weight(self) -> float:
        return self.tensor_bytes * 8 / self.n_elements if self.n_elements else 0.0


def group_models(files: list[FileEntry]) -> dict[str, list[FileEntry]]:
    """Files by model, shards in order."""
    out: dict[str, list[FileEntry]] = defaultdict(list)
    for f in sorted(files, key=lambda f: split_name(f.name)[:2]):
        out[f.model].append(f)
    return dict(out)


def model_bits_per_weight(shards: list[FileEntry]) -> float:
    elems = sum(f.n_elements for f in shards)
    return sum(f.tensor_bytes for f in shards) * 8 / elems if elems else 0.0


def llama_cpp_tag(model: str, models: list[str], recipe: str | None = None) -> str | None:
    """The `:TAG` that makes `llama-server -hf repo:TAG` pick this model, or None when no tag is unique.

    llama.cpp (common/download.cpp, find_best_model) takes the first file matching `TAG[.-]`
    case-insensitively: "mxfp4" also matches "...-mxfp4-q8.gguf", so a tag is offered only when it
    matches this model alone. The recipe is preferred, then the shortest distinctive name suffix.
    """
    parts = model.split("-")
    cands = ["-".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]
    if recipe and model.lower().endswith("-" + recipe.lower()):
        cands.insert(0, recipe)
    for cand in cands:
        pat = re.compile(re.escape(cand) + r"[.-]", re.IGNORECASE)
        if [m for m in models if pat.search(m + ".gguf")] == [model]:
            return cand.upper()
    return None


def render_card(lines: list[str], base_model: str | None, relation: str, license: str, tags: list[str],
                **extra: Any) -> str:
    """README.md: the Hub's YAML front matter (as GGUF publishers write it) above the text `lines`."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=base_model, base_model_relation=relation if base_model else None,
                         library_name="gguf", license=license, pipeline_tag="text-generation", tags=tags, **extra)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(files: list[FileEntry], base_model: str | None, recipe: str, quantized_by: str | None,
               compare: dict[str, Any] | None, plan_hints: list[str] | None, license: str = "apache-2.0",
               repo_id: str | None = None) -> str:
    """README.md text for a repo holding `files` (GGUFs of `base_model`, mostly made with `recipe`)."""
    repo = repo_id or REPO_PLACEHOLDER
    models = group_models(files)
    recipes = sorted({f.recipe for f in files} | {recipe})
    title = (base_model.split("/")[-1] if base_model else next(iter(models), "gpt-oss")) + " GGUF"
    src = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a gpt-oss checkpoint"
    lines = [
        f"# {title}",
        "",
        f"GGUF files of {src} for llama.cpp, made with ossgguf.",
        "",
        *[f"- `{r}`: {RECIPE_NOTES.get(r, 'tensor types as listed by `ossgguf inspect`')}." for r in recipes],
        "",
        "## Files",
        "",
        "| file | recipe | size | bits per weight | sha256 |",
        "|---|---|---|---|---|",
    ]
    for shards in models.values():
        bpw = model_bits_per_weight(shards)
        for f in shards:
            lines.append(f"| `{f.name}` | {f.recipe} | {human_size(f.size)} | {bpw:.2f} | `{f.sha256}` |")
    if any(len(s) > 1 for s in models.values()):
        lines += ["", "Split models: download all shards and load the first one (`-00001-of-`); "
                  "llama.cpp finds the others."]
    if compare:
        lines += ["", "## Quality", "", "| measure | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in compare.items()]
    lines += ["", "## How to run", ""]
    names = list(models)
    for model, shards in models.items():
        first = shards[0].name
        pattern = f"{model}-[0-9]*-of-*.gguf" if len(shards) > 1 else first  # not "{model}-q8-..." too
        tag = llama_cpp_tag(model, names, shards[0].recipe)
        llama = f"llama-server -hf {repo}:{tag}" if tag else f"llama-server --hf-repo {repo} --hf-file {first}"
        lines += [
            f"### {model}" if len(models) > 1 else "### Commands",
            "",
            "```sh",
            "# ossgguf (places the expert tensors in system RAM when the GPU is too small)",
            f'hf download {repo} --include "{pattern}" --local-dir .',
            f"ossgguf chat {first}",
            "# llama.cpp",
            f"{llama} --jinja",
        ]
        if len(shards) == 1 and (tag or len(models) == 1):
            # The Hub resolves hf.co/REPO:TAG for Ollama from the quant label in the file name.
            lines += ["# Ollama", f"ollama run hf.co/{repo}" + (f":{tag}" if len(models) > 1 else "")]
        lines.append("```")
        if len(shards) > 1:
            lines += ["", "Ollama cannot pull split GGUFs (ollama/ollama#5245): merge them first with "
                      f"`llama-gguf-split --merge {first} {model}.gguf`."]
        lines.append("")
    lines += ["## Placement", ""]
    hints = plan_hints or [
        "`ossgguf plan FILE.gguf --gpu-mem 24GiB --ram 64GiB` says what fits where before loading.",
        "`--cpu-moe` keeps every expert tensor in system RAM and the rest on the GPU (llama.cpp: "
        "`--cpu-moe`); `--n-cpu-moe N` does so for the first N layers only.",
        "Experts in RAM make decoding bound by memory bandwidth: dual-channel DDR5 gives about "
        "18-26 tokens/s for gpt-oss-120b.",
    ]
    lines += [f"- {h}" for h in hints]
    lines += ["", "Recommended sampling for gpt-oss: temperature 1.0, top_p 1.0.", ""]
    tags = ["gguf", "gpt-oss", "mxfp4", "llama.cpp", "ossgguf", *recipes]
    return render_card(lines, base_model, "quantized", license, tags, quantized_by=quantized_by)
