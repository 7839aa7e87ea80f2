"""Commands that read and write files: download, convert, convert-lora, quantize, inspect, prune,
render, demo, publish."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .base import _write, cli
from .options import prune_options, reasoning_option, type_options, write_options


@cli.command()
@click.argument("repo_id")
@click.option("--revision", help="Branch, tag or commit (default: main).")
@click.option("--local-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Download into this folder instead of the shared Hugging Face cache.")
@click.option("--token", help="Hugging Face token (default: the one `hf auth login` stored).")
@click.option("--offline", is_flag=True, help="Use only the local cache (as HF_HUB_OFFLINE=1).")
def download(repo_id: str, offline: bool, **kw) -> None:
    """Download a gpt-oss checkpoint from the Hub: weights, config, tokenizer, template only
    (never the original/ and metal/ folders, which would double the download). Prints the folder.

    \b
    Examples:
      ossgguf download openai/gpt-oss-20b
      ossgguf download openai/gpt-oss-120b --local-dir ./gpt-oss-120b
    """
    from ..hub.download import download as hub_download

    click.echo(str(hub_download(repo_id, offline=True if offline else None, **kw)))  # kw: revision, local_dir, token


@cli.command()
@click.argument("src")
@write_options
@type_options(required=False)
@click.option("--merge-lora", metavar="ADAPTER", help="Merge a PEFT LoRA adapter (folder or repo id) into the "
              "weights; merged experts are quantized again and their error reported (docs/lora.md).")
def convert(src: str, merge_lora: str | None, dry_run: bool, as_json: bool, force: bool, **kw) -> None:
    """Convert a Hugging Face gpt-oss checkpoint (folder or repo id) to GGUF.

    MXFP4 experts are copied bit for bit; everything streams, so memory stays small whatever the
    model size.

    \b
    Examples:
      ossgguf convert ./gpt-oss-20b -o gpt-oss-20b-mxfp4.gguf
      ossgguf convert openai/gpt-oss-120b -o gpt-oss-120b-mxfp4.gguf --split-max-size 48G
      ossgguf convert ./my-finetune -o ft.gguf --recipe bf16 --dry-run --json
    """
    from ..convert.convert import plan_conversion
    from ..hub.download import resolve_source

    path, repo = resolve_source(src)
    if merge_lora is not None:
        from ..hub.adapter import resolve_adapter

        merge_lora = resolve_adapter(merge_lora)[0]
    _write(plan_conversion(path, **kw, source_repo=repo, merge_lora=merge_lora), dry_run, as_json, force)


@cli.command("convert-lora")
@click.argument("adapter")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The GGUF adapter to write.")
@click.option("--base", type=click.Path(exists=True, path_type=Path),
              help="The base model: its GGUF or checkpoint folder (default: the adapter's base_model_name_or_path).")
@click.option("--allow-other-base", is_flag=True,
              help="Accept a base whose repo differs from the adapter's base_model_name_or_path (shapes still checked).")
@click.option("--dry-run", is_flag=True, help="Plan only: print what would be written, write nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: machine-readable plan on stdout.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def convert_lora(adapter: str, dry_run: bool, as_json: bool, force: bool, **kw) -> None:
    """Convert a PEFT LoRA adapter of gpt-oss (folder or repo id) to a GGUF adapter for `--lora`.

    Attention, router, LM head and expert (target_parameters) adapters; the adapter is checked against
    the base's shapes. DoRA and other LoRA variants are refused.

    \b
    Examples:
      ossgguf convert-lora ./my-adapter -o my-adapter.gguf --base gpt-oss-20b-mxfp4.gguf
      ossgguf convert-lora someone/gpt-oss-20b-lora -o lora.gguf --dry-run --json
      ossgguf run gpt-oss-20b-mxfp4.gguf --lora my-adapter.gguf -p "Hi"
    """
    from ..convert.lora import plan_lora
    from ..hub.adapter import resolve_adapter

    path, repo = resolve_adapter(adapter)
    _write(plan_lora(path, **kw, source_repo=repo), dry_run, as_json, force)


@cli.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@write_options
@type_options(required=True)
def quantize(src: Path, dry_run: bool, as_json: bool, force: bool, **kw) -> None:
    """Re-quantize a gpt-oss GGUF (single or split: pass any shard) with another recipe.

    Tensors that keep their type are copied byte for byte (MXFP4 experts included); a type the
    rows cannot take is refused, or with --allow-fallback replaced and listed.

    \b
    Examples:
      ossgguf quantize gpt-oss-120b-mxfp4.gguf -o gpt-oss-120b-mxfp4-q8.gguf --recipe mxfp4-q8
      ossgguf quantize in.gguf -o out.gguf --recipe mxfp4 --tensor-type 'attn_(q|k|v)[.]weight=q8_0'
    """
    from ..quantize.requantize import plan_requantize

    _write(plan_requantize(src, **kw), dry_run, as_json, force)


@cli.command("inspect")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_cmd(path: Path, as_json: bool) -> None:
    """Show a GGUF's metadata and, per tensor class, its real types, parameters, bytes and bits per weight.

    \b
    Example:
      ossgguf inspect gpt-oss-120b-mxfp4-q8-00001-of-00002.gguf
    """
    from ..quantize.inspect import format_inspect, inspect_gguf

    info = inspect_gguf(path)
    click.echo(json.dumps(info, indent=1) if as_json else format_inspect(info))


@cli.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@write_options
@prune_options
def prune(src: Path, stats_path: Path | None, dry_run: bool, as_json: bool, force: bool, **kw) -> None:
    """Keep the K best experts of every layer (ranked by `calibrate` statistics) and write a smaller GGUF.

    Expert weights, expert biases and router rows are sliced as stored (MXFP4 stays bit for bit);
    the metadata records the kept experts, the score and the statistics. See docs/pruning.md for
    what it costs.

    \b
    Examples:
      ossgguf prune gpt-oss-120b-mxfp4-00001-of-00003.gguf -o 120b-pruned.gguf --target-device unified:64GiB --dry-run
      ossgguf prune gpt-oss-120b-mxfp4-00001-of-00003.gguf -o 120b-96.gguf --keep 96 --stats 120b.stats.json
      ossgguf prune gpt-oss-20b-mxfp4.gguf -o 20b-small.gguf --target-size 9GiB --stats 20b.stats.json --dry-run --json
    """
    from ..quantize.prune import plan_prune

    if as_json and not dry_run:
        raise click.UsageError("--json goes with --dry-run")
    _write(plan_prune(src, **kw, stats=stats_path, dry_run=dry_run), dry_run, as_json, force)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--messages", "messages_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="OpenAI chat messages (a JSON list, or a request body with messages/tools).")
@click.option("--tools", "tools_path", type=click.Path(exists=True, dir_okay=False), help="OpenAI function tools (JSON).")
@reasoning_option()
@click.option("--date", help="Current date for the system message, YYYY-MM-DD (default: today).")
def render(model: str, messages_path: str, tools_path: str | None, reasoning_effort: str, date: str | None) -> None:
    """Print the exact harmony prompt gpt-oss sees for a conversation.

    \b
    Example:
      ossgguf render gpt-oss-20b.gguf --messages chat.json --tools tools.json --reasoning high
    """
    from ossgguf.harmony import render_from_files

    click.echo(render_from_files(messages_path, tools_path, reasoning_effort, date, model=model), nl=False)


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to keep the tiny checkpoint and GGUF (default: a temporary folder).")
@click.option("--keep", is_flag=True, help="Keep the files (with --workdir they are always kept).")
@click.pass_context
def demo(ctx: click.Context, workdir: Path | None, keep: bool) -> None:
    """Run the whole pipeline on a built-in tiny gpt-oss model: make, convert, load, generate."""
    from ossgguf.fixtures.demo import run_demo

    run_demo(workdir, keep=keep, verbose=ctx.obj["verbose"])


@cli.command()
@click.argument("repo_id")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", help="Branch to upload to (created if missing).")
@click.option("--commit-message", help="Commit message on the Hub.")
@click.option("--token", help="Hugging Face token with write access (default: the stored one).")
@click.option("--base-model", help="base_model for the card (default: read from the GGUF metadata).")
@click.option("--quantized-by", help="quantized_by for the card.")
@click.option("--dry-run", is_flag=True, help="Check files, hash them and print the card; upload nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def publish(repo_id: str, path: Path, as_json: bool, **kw) -> None:
    """Publish GGUF file(s) to a Hub repo with a model card, as `hf upload REPO_ID PATH` (PATH: a GGUF,
    the first shard of a split set, or a folder of them).

    \b
    Examples:
      ossgguf publish me/gpt-oss-120b-GGUF gpt-oss-120b-mxfp4-00001-of-00002.gguf --dry-run
      ossgguf publish me/gpt-oss-120b-GGUF ./out/ --private
    """
    from ..hub.download import looks_like_repo_id
    from ..hub.publish import publish as hub_publish
    from ..hub.publish import publish_plan_text

    if not path.exists():
        if Path(repo_id).exists():  # ossgguf 0.1's order, PATH REPO_ID: still read, with a note
            click.echo("note: `ossgguf publish PATH REPO_ID` is deprecated: write `ossgguf publish REPO_ID PATH`, "
                       "the order of `hf upload`", err=True)
            repo_id, path = str(path), Path(repo_id)
        else:  # name the missing file, in either order
            missing = path if looks_like_repo_id(repo_id) else repo_id
            raise click.BadParameter(f"Path '{missing}' does not exist.", param_hint="'PATH'")

    plan = hub_publish(path, repo_id, **kw)
    click.echo(json.dumps(plan.to_json(), indent=1) if as_json else publish_plan_text(plan))
