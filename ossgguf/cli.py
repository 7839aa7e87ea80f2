"""The `ossgguf` command: a thin click shell over the library functions.

One error boundary: an OssggufError (or any error) prints one line and exits non-zero; set
OSSGGUF_DEBUG=1 for the traceback. The answer goes to stdout; progress and logs go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import click

from . import __version__, limits
from .errors import OssggufError
from .sizes import parse_size


def _die(msg: str, code: int = 1) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def _sigterm(signum, frame):  # turn `kill` into the same clean unwinding as Ctrl-C
    raise KeyboardInterrupt


VERBOSE_HELP = "Show detailed logs (llama.cpp's own log where a model loads)."


def _set_verbose(ctx: click.Context, param: click.Parameter | None, on: bool) -> None:
    """-v before the command or after it: either form turns on the one flag in ctx.obj, which the
    command's context shares with the group's."""
    obj = ctx.ensure_object(dict)
    obj["verbose"] = obj.get("verbose", False) or on
    logging.getLogger().setLevel(logging.INFO if obj["verbose"] else logging.WARNING)


class _Group(click.Group):
    """Gives every command -v/--verbose too, so that it works after the command as well, as llama.cpp's
    tools take it (`ossgguf run model.gguf -p hi -v`)."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not any("--verbose" in p.opts for p in cmd.params):  # once, should a command be added twice
            cmd.params.append(click.Option(["-v", "--verbose"], is_flag=True, expose_value=False,
                                           callback=_set_verbose, help=VERBOSE_HELP))
        super().add_command(cmd, name)


def _number(limit: limits.Limit) -> click.ParamType:
    """click's own range type for a limit, so that a bad value gets click's usual usage error."""
    kind = click.IntRange if limit.integer else click.FloatRange
    return kind(limit.lo, limit.hi, min_open=limit.lo_open)


class Size(click.ParamType):
    """A size such as 48G, 500MB or 24GiB (ossgguf.sizes.parse_size), in bytes, within `limit`.
    `memory`: a bare G is GiB, as memory is sized; for files it is GB, as llama.cpp's gguf-split reads it."""

    name = "size"

    def __init__(self, limit: limits.Limit, memory: bool = False) -> None:
        self.limit, self.base = limit, 1024 if memory else 1000

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        try:
            n = parse_size(value, self.base)
        except OssggufError as e:
            self.fail(str(e), param, ctx)
        if not self.limit.ok(n):
            self.fail(f"{value!r} is {n:,} bytes; it must be {self.limit.describe()}", param, ctx)
        return n


FILE_SIZE = Size(limits.FILE_SIZE)


class GpuSizes(Size):
    """--gpu-mem: one size, or one per GPU in llama.cpp's device order (24GiB,24GiB) -> int or tuple."""

    def convert(self, value, param, ctx):
        if isinstance(value, (int, tuple)) or "," not in value:
            return super().convert(value, param, ctx)
        sizes = tuple(super(GpuSizes, self).convert(v.strip(), param, ctx) for v in value.split(","))
        if 0 in sizes:
            self.fail(f"{value!r}: a list of GPU sizes has no 0 (give 0 alone for no GPU)", param, ctx)
        return sizes


def _options(*opts):
    """A decorator adding click options in the order given (for option groups several commands share)."""
    def deco(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return deco


def write_options(f):
    """The output flags of the commands that write a GGUF (convert, quantize, prune: convert.output.WritePlan)."""
    return _options(
        click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
                     help="Output GGUF path (with --split-max-size: the name shards are derived from)."),
        click.option("--split-max-size", type=FILE_SIZE, metavar="SIZE",
                     help="Split into gguf-split shards of at most SIZE (e.g. 48G)."),
        click.option("--dry-run", is_flag=True, help="Plan only: print what would be written, write nothing."),
        click.option("--json", "as_json", is_flag=True, help="With --dry-run: machine-readable plan on stdout."),
        click.option("--force", is_flag=True, help="Overwrite an existing output."),
    )(f)


def type_options(required: bool):
    """--recipe, --tensor-type and --allow-fallback of convert and quantize (quantize.policy)."""
    from .quantize.policy import DEFAULT_RECIPE, RECIPES

    return _options(
        click.option("--recipe", required=required, default=None if required else DEFAULT_RECIPE,
                     show_default=not required, help=f"Types per tensor class: {', '.join(RECIPES)}."),
        click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
                     help="Override the type of matching tensors (repeatable), e.g. 'attn_.*=q8_0'."),
        click.option("--allow-fallback", is_flag=True,
                     help="Use the nearest valid type when rows cannot take the one asked."),
    )


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ossgguf")
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP + " Also accepted after the command.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Convert, quantize, run and publish OpenAI gpt-oss models as GGUF.

    \b
    Start here:
      ossgguf demo                                   the whole pipeline on a built-in tiny model
      ossgguf convert openai/gpt-oss-20b -o gpt-oss-20b.gguf
    """
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    _set_verbose(ctx, None, verbose)


def main() -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    debug = bool(os.environ.get("OSSGGUF_DEBUG"))
    try:
        rc = cli.main(standalone_mode=False, prog_name="ossgguf")
        if isinstance(rc, int) and rc:  # ctx.exit(N) returns N here instead of exiting
            sys.exit(rc)
    except OssggufError as e:
        if debug:
            raise
        _die(str(e))
    except click.exceptions.Abort:
        _die("interrupted", 130)
    except KeyboardInterrupt:
        _die("interrupted: no output was left behind", 130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except OSError as e:
        if debug:
            raise
        _die(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}")
    except Exception as e:  # noqa: BLE001 - the one boundary where unexpected errors become one line
        if debug:
            raise
        _die(f"unexpected {type(e).__name__}: {e} (set OSSGGUF_DEBUG=1 for the traceback and report it)", 2)


def _progress_bar(total: int, desc: str, unit: str = "B"):
    """A tqdm bar on stderr (off when stderr is not a terminal); bytes count in binary units."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000, desc=desc,
                file=sys.stderr, disable=None, dynamic_ncols=True)


def _write(plan, dry_run: bool, as_json: bool, force: bool) -> None:
    """The one --dry-run / --json / progress / summary path of convert, quantize and prune
    (a convert.output.WritePlan)."""
    if dry_run:
        click.echo(json.dumps(plan.to_json(), indent=1) if as_json else plan.summary())
        return
    if as_json:
        raise click.UsageError("--json goes with --dry-run")
    with _progress_bar(plan.data_bytes, plan.command) as bar:
        report = plan.run(force=force, progress=bar.update)
    click.echo(report.summary(), err=True)
    click.echo(str(plan.shards[0].path))


@cli.command()
@click.argument("repo_id")
@click.option("--revision", help="Branch, tag or commit (default: main).")
@click.option("--local-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Download into this folder instead of the shared Hugging Face cache.")
@click.option("--token", help="Hugging Face token (default: the one `hf auth login` stored).")
@click.option("--offline", is_flag=True, help="Use only the local cache (as HF_HUB_OFFLINE=1).")
def download(repo_id: str, revision: str | None, local_dir: Path | None, token: str | None, offline: bool) -> None:
    """Download a gpt-oss checkpoint from the Hub: weights, config, tokenizer, template only
    (never the original/ and metal/ folders, which would double the download). Prints the folder.

    \b
    Examples:
      ossgguf download openai/gpt-oss-20b
      ossgguf download openai/gpt-oss-120b --local-dir ./gpt-oss-120b
    """
    from .hub.download import download as hub_download

    click.echo(str(hub_download(repo_id, local_dir=local_dir, revision=revision, token=token,
                                offline=True if offline else None)))


@cli.command()
@click.argument("src")
@write_options
@type_options(required=False)
@click.option("--merge-lora", metavar="ADAPTER", help="Merge a PEFT LoRA adapter (folder or repo id) into the "
              "weights; merged experts are quantized again and their error reported (docs/lora.md).")
def convert(src: str, out: Path, recipe: str, tensor_types: tuple[str, ...], split_max_size: int | None,
            allow_fallback: bool, dry_run: bool, as_json: bool, force: bool, merge_lora: str | None) -> None:
    """Convert a Hugging Face gpt-oss checkpoint (folder or repo id) to GGUF.

    MXFP4 experts are copied bit for bit; everything streams, so memory stays small whatever the
    model size.

    \b
    Examples:
      ossgguf convert ./gpt-oss-20b -o gpt-oss-20b-mxfp4.gguf
      ossgguf convert openai/gpt-oss-120b -o gpt-oss-120b-mxfp4.gguf --split-max-size 48G
      ossgguf convert ./my-finetune -o ft.gguf --recipe bf16 --dry-run --json
    """
    from .convert.convert import plan_conversion
    from .hub.download import resolve_source

    path, repo = resolve_source(src)
    if merge_lora is not None:
        from .hub.adapter import resolve_adapter

        merge_lora = resolve_adapter(merge_lora)[0]
    _write(plan_conversion(path, out, recipe, tensor_types, split_max_size, allow_fallback, source_repo=repo,
                           merge_lora=merge_lora), dry_run, as_json, force)


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
def convert_lora(adapter: str, out: Path, base: Path | None, allow_other_base: bool, dry_run: bool, as_json: bool,
                 force: bool) -> None:
    """Convert a PEFT LoRA adapter of gpt-oss (folder or repo id) to a GGUF adapter for `--lora`.

    Attention, router, LM head and expert (target_parameters) adapters; the adapter is checked against
    the base's shapes. DoRA and other LoRA variants are refused.

    \b
    Examples:
      ossgguf convert-lora ./my-adapter -o my-adapter.gguf --base gpt-oss-20b-mxfp4.gguf
      ossgguf convert-lora someone/gpt-oss-20b-lora -o lora.gguf --dry-run --json
      ossgguf run gpt-oss-20b-mxfp4.gguf --lora my-adapter.gguf -p "Hi"
    """
    from .convert.lora import plan_lora
    from .hub.adapter import resolve_adapter

    path, repo = resolve_adapter(adapter)
    _write(plan_lora(path, out, base, allow_other_base=allow_other_base, source_repo=repo), dry_run, as_json, force)


@cli.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@write_options
@type_options(required=True)
def quantize(src: Path, out: Path, recipe: str, tensor_types: tuple[str, ...], split_max_size: int | None,
             allow_fallback: bool, dry_run: bool, as_json: bool, force: bool) -> None:
    """Re-quantize a gpt-oss GGUF (single or split: pass any shard) with another recipe.

    Tensors that keep their type are copied byte for byte (MXFP4 experts included); a type the
    rows cannot take is refused, or with --allow-fallback replaced and listed.

    \b
    Examples:
      ossgguf quantize gpt-oss-120b-mxfp4.gguf -o gpt-oss-120b-mxfp4-q8.gguf --recipe mxfp4-q8
      ossgguf quantize in.gguf -o out.gguf --recipe mxfp4 --tensor-type 'attn_(q|k|v)[.]weight=q8_0'
    """
    from .quantize.requantize import plan_requantize

    _write(plan_requantize(src, out, recipe, tensor_types, split_max_size, allow_fallback), dry_run, as_json, force)


@cli.command("inspect")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_cmd(path: Path, as_json: bool) -> None:
    """Show a GGUF's metadata and, per tensor class, its real types, parameters, bytes and bits per weight.

    \b
    Example:
      ossgguf inspect gpt-oss-120b-mxfp4-q8-00001-of-00002.gguf
    """
    from .quantize.inspect import format_inspect, inspect_gguf

    info = inspect_gguf(path)
    click.echo(json.dumps(info, indent=1) if as_json else format_inspect(info))


def _parse_loras(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple:
    from .runner.lora import parse_lora

    try:
        return tuple(parse_lora(v) for v in values)
    except OssggufError as e:
        raise click.BadParameter(str(e)) from None


def lora_option(help: str = "Apply a LoRA adapter (from `ossgguf convert-lora`) at SCALE (default 1); "
                            "repeatable (docs/lora.md)."):
    return click.option("--lora", "lora", multiple=True, metavar="ADAPTER.gguf[:SCALE]", callback=_parse_loras,
                        help=help)


@cli.command()
@click.argument("reference", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("candidate", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False), help="Text to evaluate on.")
@click.option("--ctx", type=_number(limits.CTX), default=limits.COMPARE_CTX, show_default=True, help="Tokens evaluated.")
@click.option("--threads", type=_number(limits.THREADS), help="CPU threads (default: llama.cpp's).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--rpc", metavar="HOST:PORT,...", help="Run CANDIDATE on these `ossgguf worker`s (REFERENCE runs "
              "here): checks a multi-machine setup against a local run (docs/rpc.md).")
@lora_option("Apply a LoRA adapter to CANDIDATE at SCALE (default 1); repeatable.")
@click.option("--ref-lora", "ref_lora", multiple=True, metavar="ADAPTER.gguf[:SCALE]", callback=_parse_loras,
              help="Apply a LoRA adapter to REFERENCE; repeatable.")
def compare(reference: Path, candidate: Path, text_file: str | None, ctx: int, threads: int | None,
            as_json: bool, rpc: str | None, lora: tuple, ref_lora: tuple) -> None:
    """Quality of CANDIDATE against REFERENCE on the same tokens: KL divergence, top-1 agreement,
    logit cosine (as llama.cpp's perplexity --kl-divergence).

    \b
    Examples:
      ossgguf compare gpt-oss-20b-bf16.gguf gpt-oss-20b-mxfp4-q8.gguf --text wiki.txt
      ossgguf compare model.gguf model.gguf --rpc 192.168.1.20:50052
      ossgguf compare base.gguf base.gguf --lora my-adapter.gguf        # how far the adapter moves it
    """
    from .quantize.compare import compare as run_compare
    from .quantize.compare import format_compare, read_text_file

    text = read_text_file(text_file) if text_file else None
    r = run_compare(reference, candidate, text=text, n_ctx=ctx, threads=threads, rpc=rpc, lora=lora,
                    ref_lora=ref_lora)
    click.echo(json.dumps(r, indent=1) if as_json else format_compare(r))


class Bandwidths(click.ParamType):
    """A rate such as 90GB/s (decimal, as vendors quote bandwidth), or a comma list: bytes/s."""

    name = "rate"

    def convert(self, value, param, ctx) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            out = tuple(float(parse_size(v.strip().removesuffix("/s"), 1000)) for v in value.split(","))
        except OssggufError as e:
            self.fail(f"{value!r}: {e} (e.g. 90GB/s)", param, ctx)
        if not all(v > 0 for v in out):
            self.fail(f"{value!r}: a bandwidth must be greater than 0", param, ctx)
        return out


def placement_options(f):
    """The placement flags of every command that loads a model (runner.plan.PlacementOptions)."""
    opts = [
        click.option("--gpu-mem", type=GpuSizes(limits.GPU_MEM, memory=True), metavar="SIZE[,SIZE...]",
                     help="GPU memory to plan for, e.g. 24GiB, or one size per GPU: 24GiB,24GiB "
                     "(0: no GPU; default: detect)."),
        click.option("--ram", type=Size(limits.MEMORY, memory=True), metavar="SIZE",
                     help="System RAM to plan for (default: this machine's)."),
        click.option("--unified", type=Size(limits.MEMORY, memory=True), metavar="SIZE",
                     help="Apple-style unified memory of SIZE (GPU working set ~75%)."),
        click.option("--cpu-moe", is_flag=True, help="Keep every layer's experts in system RAM."),
        click.option("--n-cpu-moe", type=_number(limits.N_CPU_MOE), metavar="N",
                     help="Keep the experts of layers 0..N-1 in system RAM."),
        click.option("--ctx", type=_number(limits.CTX),
                     help=f"Context size in tokens (default: min({limits.DEFAULT_CTX}, the model's))."),
        click.option("--ubatch", type=_number(limits.UBATCH), help=f"Prompt micro-batch (default: "
                     f"{limits.UBATCH_OFFLOAD} with experts in RAM, else {limits.UBATCH_DEFAULT})."),
        click.option("--threads", type=_number(limits.THREADS), help="CPU threads (default: the physical cores)."),
        click.option("--rpc", metavar="HOST:PORT,...",
                     help="Use `ossgguf worker`s on other machines as devices (llama.cpp RPC; docs/rpc.md)."),
        lora_option(),
        click.option("--cache-ram", type=Size(limits.CACHE_RAM, memory=True), metavar="SIZE",
                     help="RAM for saved prompts of other conversations (0: off; default: half the RAM the plan "
                          "leaves free, at most 8GiB)."),
    ]
    return _options(*opts)(f)


def _placement(kw: dict, verbose: bool = False):
    """PlacementOptions from the placement flags (removed from kw); warns once about a GPU the build cannot use."""
    from .runner.doctor import gpu_warning
    from .runner.plan import PlacementOptions

    if warning := gpu_warning():
        click.echo(warning, err=True)

    return PlacementOptions(gpu_mem=kw.pop("gpu_mem"), ram=kw.pop("ram"), unified=kw.pop("unified"),
                            cpu_moe=kw.pop("cpu_moe"), n_cpu_moe=kw.pop("n_cpu_moe"), ctx=kw.pop("ctx"),
                            ubatch=kw.pop("ubatch"), threads=kw.pop("threads"), rpc=kw.pop("rpc"),
                            lora=kw.pop("lora", ()), cache_ram=kw.pop("cache_ram", None), verbose=verbose)


@cli.command("plan")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@placement_options
@click.option("--measure", is_flag=True, help="Measure RAM bandwidth and CPU compute for the speed prediction (~2 s).")
@click.option("--ram-bw", type=Bandwidths(), metavar="RATE", help="RAM bandwidth, e.g. 90GB/s (default: measured "
              "with --measure, else dual-channel DDR5).")
@click.option("--gpu-bw", type=Bandwidths(), metavar="RATE[,RATE...]",
              help="GPU memory bandwidth(s), e.g. 1008GB/s (default: a table of known GPUs).")
@click.option("--compare", "compare_n", metavar="N,N,...", help="Compare these --n-cpu-moe values side by side.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable plan.")
def plan_cmd(model: Path, as_json: bool, measure: bool, ram_bw, gpu_bw, compare_n: str | None, **kw) -> None:
    """Decide, before loading, what lives on the GPU and what stays in system RAM, and how fast it runs.

    Reads only the GGUF's tensor infos. Prints a per-device table, the reason for the choice and the
    predicted decode and prompt speed (bytes per token over bandwidth, docs/benchmarks.md); --json
    gives {"fits", "n_cpu_moe", "gpu_bytes", "cpu_bytes", "kv_bytes", "compute_bytes", "overrides",
    "notes", "speed", ...}.

    \b
    Examples:
      ossgguf plan gpt-oss-120b-mxfp4.gguf --gpu-mem 24GiB --ram 64GiB
      ossgguf plan gpt-oss-120b-mxfp4.gguf --gpu-mem 24GiB,24GiB --ram 64GiB --measure
      ossgguf plan gpt-oss-120b-mxfp4.gguf --gpu-mem 24GiB --compare 20,24,28,36
      ossgguf plan gpt-oss-120b-mxfp4.gguf --unified 64GiB --ctx 32768 --json
    """
    from .runner import speed
    from .runner.plan import format_plan, plan

    options = _placement(kw)
    bw = dict(ram_bw=ram_bw[0] if ram_bw else None, gpu_bw=list(gpu_bw) if gpu_bw else None, measure=measure)
    if compare_n:
        try:
            values = [int(v) for v in compare_n.split(",")]
        except ValueError:
            raise click.BadParameter(f"{compare_n!r}: give --n-cpu-moe values, e.g. 20,24,28", param_hint="--compare") from None
        rows = speed.compare(model, options, values, **bw)
        click.echo(json.dumps([p.to_json() | {"speed": s.to_json()} for p, s in rows], indent=1) if as_json
                   else speed.format_compare(rows))
        return
    p = plan(model, options)
    s = speed.predict(p, *speed.memories(p, **bw))
    click.echo(json.dumps(p.to_json() | {"speed": s.to_json()}, indent=1) if as_json
               else format_plan(p) + "\n\n" + speed.format_speed(s, p.n_ctx))


def reasoning_option(help: str | None = None):
    """--reasoning, wherever a prompt is rendered, with the library's default."""
    from .harmony import DEFAULT_REASONING, REASONING_EFFORTS

    return click.option("--reasoning", "reasoning_effort", type=click.Choice(REASONING_EFFORTS),
                        default=DEFAULT_REASONING, show_default=True, help=help)


def chat_options(f):
    """Conversation and generation flags shared by run and chat (runner.terminal.open_chat), with the
    library's defaults (Sampling's are OpenAI's for gpt-oss)."""
    from .runner.chat import TOOL_TIMEOUT
    from .runner.generation import Sampling

    default = Sampling()
    opts = [
        click.option("--system", help="System prompt (the developer instructions gpt-oss reads)."),
        click.option("--messages", "messages_path", type=click.Path(exists=True, dir_okay=False),
                     help="Start from these OpenAI chat messages (a JSON list, or a request body)."),
        click.option("--tools", "tools_path", type=click.Path(exists=True, dir_okay=False),
                     help="OpenAI function tools the model may call (JSON)."),
        click.option("--tool-cmd", metavar="CMD",
                     help="Run tool calls with CMD: the call as JSON on stdin, its stdout is the result."),
        click.option("--tool-timeout", type=_number(limits.TOOL_TIMEOUT), default=TOOL_TIMEOUT, show_default=True,
                     help="Seconds per tool call."),
        reasoning_option("Reasoning effort."),
        click.option("--show-reasoning", is_flag=True, help="Show the model's reasoning (on stderr, dimmed)."),
        builtin_tool_options,
        click.option("--date", help="Current date for the system message, YYYY-MM-DD (default: today)."),
        click.option("--temp", "temperature", type=_number(limits.TEMPERATURE), default=default.temperature,
                     show_default=True, help="Temperature (0: greedy)."),
        click.option("--top-p", type=_number(limits.TOP_P), default=default.top_p, show_default=True),
        click.option("--top-k", type=_number(limits.TOP_K), default=default.top_k, show_default=True, help="0: off."),
        click.option("--min-p", type=_number(limits.MIN_P), default=default.min_p, show_default=True),
        click.option("--seed", type=int, help="Sampling seed (default: random)."),
        click.option("--max-tokens", type=_number(limits.MAX_TOKENS),
                     help="Tokens per generation round (default: until the context is full)."),
    ]
    return _options(*opts)(f)


def builtin_tool_options(f):
    """--tools-builtin and its options (run, chat, serve): gpt-oss's own python and browser tools
    (runner/tools, docs/tools.md)."""
    opts = [
        click.option("--tools-builtin", metavar="python,browser",
                     help="Run gpt-oss's own tools here: python (a sandboxed Jupyter kernel), browser (search, "
                          "open, find). See docs/tools.md."),
        click.option("--tools-unsafe", is_flag=True,
                     help="Run the python tool WITHOUT a sandbox where none works: its code can read and write what "
                          "you can, and reach the network."),
        click.option("--python-timeout", type=_number(limits.TOOL_TIMEOUT), default=120.0, show_default=True,
                     help="Seconds per python call (the model is told 120)."),
        click.option("--python-memory", type=Size(limits.MEMORY, memory=True), default="1GiB", show_default=True,
                     help="Memory the python kernel may allocate."),
        click.option("--scratch", type=click.Path(file_okay=False, path_type=Path),
                     help="This machine's folder for python's /mnt/data (default: a temporary one, deleted after)."),
        click.option("--browser-source", metavar="SOURCE",
                     help="Where browser searches: local:DIR (an index of your files; offline), searxng:URL, exa or "
                          "tavily (key in EXA_API_KEY / TAVILY_API_KEY)."),
        click.option("--browser-allow", multiple=True, metavar="HOST|CIDR",
                     help="Let browser open this loopback/private host or network (repeatable)."),
    ]
    return _options(*opts)(f)


def _builtin(kw: dict):
    """runner.tools.BuiltinOptions from the --tools-builtin flags (popped from `kw`)."""
    from .runner.tools import BuiltinOptions, parse_names

    return BuiltinOptions(names=parse_names(kw.pop("tools_builtin")), unsafe=kw.pop("tools_unsafe"),
                          python_timeout=kw.pop("python_timeout"), python_memory=kw.pop("python_memory"),
                          scratch=kw.pop("scratch"), browser_source=kw.pop("browser_source"),
                          browser_allow=list(kw.pop("browser_allow")))


def _open_chat(context: click.Context, model: Path, kw: dict):
    """runner.terminal.open_chat from the run/chat flags."""
    from .runner.generation import Sampling
    from .runner.terminal import open_chat

    sampling = Sampling(**{k: kw.pop(k) for k in ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens")})
    builtin = _builtin(kw)
    options = _placement(kw, context.obj["verbose"])
    return open_chat(model, options, sampling, err=sys.stderr, builtin=builtin, **kw)


@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-p", "--prompt", help="The user message (optional with --messages).")
@chat_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON result: content, reasoning, tool_calls, "
              "finish_reason, usage, timings, placement.")
@placement_options
@click.pass_context
def run(context: click.Context, model: Path, prompt: str | None, show_reasoning: bool, as_json: bool, **kw) -> None:
    """Answer one prompt: the answer on stdout, reasoning (--show-reasoning) and stats on stderr.

    \b
    Examples:
      ossgguf run gpt-oss-20b.gguf -p "Why is the sky blue?" --reasoning low
      ossgguf run gpt-oss-120b.gguf -p "Weather in Paris?" --tools tools.json --tool-cmd ./tools.py --json
      ossgguf run gpt-oss-120b.gguf --messages chat.json --n-cpu-moe 26 --ctx 32768
    """
    from .runner.terminal import run_once

    if prompt is None and kw.get("messages_path") is None:
        raise click.UsageError("give a prompt with -p, or a conversation with --messages")
    with _open_chat(context, model, kw) as chat:
        if prompt is not None:
            chat.conv.add_user(prompt)
        run_once(chat, sys.stdout, sys.stderr, show_reasoning, as_json)


@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@chat_options
@placement_options
@click.pass_context
def chat(context: click.Context, model: Path, show_reasoning: bool, **kw) -> None:
    """Chat in the terminal: streaming answers, tool calls, /reasoning, /reset, /save, /help, /exit.

    Ctrl-C stops an answer; Ctrl-C or Ctrl-D at the prompt leaves. With stdin piped, each line is
    one message.

    \b
    Examples:
      ossgguf chat gpt-oss-20b.gguf --show-reasoning
      ossgguf chat gpt-oss-120b.gguf --gpu-mem 24GiB --tools tools.json --tool-cmd "python3 tools.py"
      printf 'Hi\\nWhat did I just say?\\n' | ossgguf chat gpt-oss-20b.gguf
    """
    from .runner.terminal import chat_loop

    with _open_chat(context, model, kw) as chat:
        failed = chat_loop(chat, sys.stdin, sys.stdout, sys.stderr, show_reasoning)
    if failed and not sys.stdin.isatty():  # as a script, a message that was not answered is a failure
        context.exit(1)


@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (another than loopback is reachable from the network: set --api-key).")
@click.option("--port", default=8080, show_default=True, type=_number(limits.PORT))
@click.option("--api-key", envvar="OSSGGUF_API_KEY",
              help="Require `Authorization: Bearer KEY` or `x-api-key: KEY` (env OSSGGUF_API_KEY).")
@click.option("--model-name", help="The model's id in the API (default: the file name without .gguf).")
@click.option("--strict-model", is_flag=True,
              help="Refuse /v1/messages requests for other model names (default: this model serves any name).")
@reasoning_option("Reasoning effort when a request does not say.")
@placement_options
@click.pass_context
def serve(context: click.Context, model: Path, host: str, port: int, api_key: str | None, model_name: str | None,
          strict_model: bool, reasoning_effort: str, **kw) -> None:
    """Serve the model over the OpenAI API (/v1/chat/completions, /v1/responses, /v1/models) and Anthropic's
    Messages API (/v1/messages, for Claude Code); /health.

    \b
    Examples:
      ossgguf serve gpt-oss-20b-mxfp4.gguf                       # http://127.0.0.1:8080/v1
      ossgguf serve gpt-oss-120b-mxfp4-00001-of-00003.gguf --gpu-mem 24GiB --ctx 32768 --port 8081
      ossgguf serve gpt-oss-20b-mxfp4.gguf --host 0.0.0.0 --api-key "$OSSGGUF_API_KEY"
      ossgguf serve gpt-oss-20b-mxfp4.gguf --lora a.gguf --lora b.gguf   # models NAME, NAME+a, NAME+b, NAME+none
    """
    try:
        from ossgguf.runner.server.app import serve as run_server
    except ImportError as e:  # fastapi/uvicorn are the `server` extra
        raise OssggufError(f"the server needs its extra: pip install 'ossgguf[server]' ({e})") from None

    verbose = context.obj["verbose"]
    options = _placement(kw, verbose)
    run_server(model, host=host, port=port, options=options, api_key=api_key, model_name=model_name,
               reasoning_effort=reasoning_effort, log_level="info" if verbose else "warning",
               on_ready=lambda line: click.echo(line, err=True), strict_model=strict_model)


@cli.command(help=f"""Run MODEL over calibration text and record, per layer and expert, how often the router
    selects it, the gate weights it gets and the size of its outputs: the statistics `prune` ranks experts by.

    --ctx is the length of each evaluated sequence (default {limits.CALIBRATE_CHUNK}). Use text like the model's
    real work: harmony chat transcripts, code, your own domain (see docs/pruning.md).

    \b
    Examples:
      ossgguf calibrate gpt-oss-120b-mxfp4-00001-of-00003.gguf --text chat.txt code/*.py -o 120b.stats.json
      ossgguf calibrate gpt-oss-20b-mxfp4.gguf --text mydomain.txt -o 20b.stats.json --cpu-moe
    """)
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("more_texts", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--text", "texts", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Calibration text file (repeatable; more files may follow as arguments).")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Statistics file (default: MODEL.stats.json). An existing one is extended: files already "
                   "in it are skipped.")
@placement_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (never-selected experts included).")
@click.pass_context
def calibrate(context: click.Context, model: Path, more_texts: tuple[Path, ...], texts: tuple[Path, ...],
              out: Path | None, as_json: bool, **kw) -> None:
    from .runner.calibrate import calibrate as run_calibrate
    from .runner.calibrate import default_stats_path

    files = list(texts) + list(more_texts)
    if not files:
        raise click.UsageError("give calibration text with --text FILE")
    with _progress_bar(0, "calibrate", unit="tok") as bar:
        def total(n: int) -> None:
            bar.total = n
            bar.refresh()

        r = run_calibrate(model, files, out or default_stats_path(model), _placement(kw, context.obj["verbose"]),
                          progress=bar.update, on_total=total)
    if as_json:
        click.echo(json.dumps(r.to_json(), indent=1))
        return
    click.echo(r.summary(), err=True)
    click.echo(str(r.out))


def prune_options(f):
    """How prune chooses K and the experts, with quantize.prune's defaults."""
    from .quantize.prune import DEVICE_CTX
    from .quantize.stats import SCORES

    return _options(
        click.option("--keep", type=_number(limits.COUNT), help="Experts to keep in every layer."),
        click.option("--target-size", type=FILE_SIZE, metavar="SIZE",
                     help="Keep the most experts whose file fits SIZE (e.g. 50GiB)."),
        click.option("--target-device", metavar="SPEC", help="Keep the most experts the planner fits on: "
                     "unified:64GiB, gpu:80GiB, gpu:24GiB,ram:64GiB, ram:64GiB."),
        click.option("--ctx", type=_number(limits.CTX), default=DEVICE_CTX, show_default=True,
                     help="Context the --target-device plan holds."),
        click.option("--stats", "stats_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="Statistics from `ossgguf calibrate` of this model (needed to write)."),
        click.option("--score", type=click.Choice(SCORES), default=SCORES[0], show_default=True,
                     help="Rank experts by REAP (gate weight x output norm) or by how often they are selected."),
    )(f)


@cli.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@write_options
@prune_options
def prune(src: Path, out: Path, keep: int | None, target_size: int | None, target_device: str | None, ctx: int,
          stats_path: Path | None, score: str, split_max_size: int | None, dry_run: bool, as_json: bool,
          force: bool) -> None:
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
    from .quantize.prune import plan_prune

    if as_json and not dry_run:
        raise click.UsageError("--json goes with --dry-run")
    _write(plan_prune(src, out, keep=keep, target_size=target_size, target_device=target_device, ctx=ctx,
                      stats=stats_path, score=score, split_max_size=split_max_size, dry_run=dry_run),
           dry_run, as_json, force)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The RPC protocol has no authentication: keep loopback, or use a "
                   "private network / SSH tunnel (docs/rpc.md).")
@click.option("--port", default=50052, show_default=True, type=_number(limits.PORT))
@click.option("--device", "devices", multiple=True, metavar="NAME",
              help="llama.cpp device to serve, e.g. CUDA0 (repeatable; default: the GPUs, else the CPU).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep received tensors here, so the next load of the same model sends only their hashes.")
@click.option("--threads", type=_number(limits.THREADS), help="CPU threads when serving the CPU.")
def worker(host: str, port: int, devices: tuple[str, ...], cache_dir: Path | None, threads: int | None) -> None:
    """Serve this machine's GPU (or CPU and RAM) to `--rpc` on another machine, through llama.cpp's RPC
    backend. One client at a time; stop with Ctrl-C.

    \b
    Examples:
      ossgguf worker                                   # loopback: for an SSH tunnel (ssh -R 50052:...)
      ossgguf worker --host 192.168.1.20 --cache ~/.cache/ossgguf-rpc
      ossgguf run gpt-oss-120b-mxfp4-00001-of-00003.gguf --rpc 192.168.1.20:50052 -p "Hello"
    """
    from .runner.rpc import Endpoint, serve_worker

    ep = Endpoint(host, port)
    if not ep.loopback:
        click.secho(f"WARNING: listening on {ep}: anyone who can reach this address can run code in this "
                    "worker's memory and read what is sent (llama.cpp's RPC has no authentication or "
                    "encryption). Use it only on a private network you trust, or keep the default loopback "
                    "and an SSH tunnel; see docs/rpc.md.", fg="red", bold=True, err=True)
    serve_worker(ep, list(devices) or None, cache_dir, threads,
                 on_ready=lambda names: click.echo(f"worker: serving {', '.join(names)} on {ep} (Ctrl-C stops)",
                                                   err=True))


@cli.command()
@click.option("--dir", "dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="A folder where models live, for its free disk space (default: the Hugging Face cache and .).")
@click.option("--ctx", type=_number(limits.CTX), default=32768, show_default=True,
              help="Context the verdicts plan for.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def doctor(dirs: tuple[Path, ...], ctx: int, as_json: bool) -> None:
    """What llama.cpp was built with and sees (backends, devices, memory), the disk where models live,
    and which gpt-oss models fit this machine. A GPU the build cannot use is named, with the command
    that rebuilds llama.cpp for it.

    \b
    Example:
      ossgguf doctor
    """
    from .runner.doctor import doctor as run_doctor
    from .runner.doctor import format_report

    r = run_doctor(list(dirs) or None, ctx=ctx)
    click.echo(json.dumps(r.to_json(), indent=1) if as_json else format_report(r))


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
def publish(repo_id: str, path: Path, private: bool, revision: str | None, commit_message: str | None,
            token: str | None, base_model: str | None, quantized_by: str | None, dry_run: bool, as_json: bool) -> None:
    """Publish GGUF file(s) to a Hub repo with a model card, as `hf upload REPO_ID PATH` (PATH: a GGUF,
    the first shard of a split set, or a folder of them).

    \b
    Examples:
      ossgguf publish me/gpt-oss-120b-GGUF gpt-oss-120b-mxfp4-00001-of-00002.gguf --dry-run
      ossgguf publish me/gpt-oss-120b-GGUF ./out/ --private
    """
    from .hub.download import looks_like_repo_id
    from .hub.publish import publish as hub_publish
    from .hub.publish import publish_plan_text

    if not path.exists():
        if Path(repo_id).exists():  # ossgguf 0.1's order, PATH REPO_ID: still read, with a note
            click.echo("note: `ossgguf publish PATH REPO_ID` is deprecated: write `ossgguf publish REPO_ID PATH`, "
                       "the order of `hf upload`", err=True)
            repo_id, path = str(path), Path(repo_id)
        else:  # name the missing file, in either order
            missing = path if looks_like_repo_id(repo_id) else repo_id
            raise click.BadParameter(f"Path '{missing}' does not exist.", param_hint="'PATH'")

    plan = hub_publish(path, repo_id, private=private, revision=revision, commit_message=commit_message,
                       token=token, dry_run=dry_run, base_model=base_model, quantized_by=quantized_by)
    click.echo(json.dumps(plan.to_json(), indent=1) if as_json else publish_plan_text(plan))


if __name__ == "__main__":
    main()
