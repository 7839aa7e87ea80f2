"""Option groups several commands share, each with the library's defaults and limits."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import limits
from ..errors import OssggufError
from .base import FILE_SIZE, GpuSizes, Size, _number, _options


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
    from ..quantize.policy import DEFAULT_RECIPE, RECIPES

    return _options(
        click.option("--recipe", required=required, default=None if required else DEFAULT_RECIPE,
                     show_default=not required, help=f"Types per tensor class: {', '.join(RECIPES)}."),
        click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
                     help="Override the type of matching tensors (repeatable), e.g. 'attn_.*=q8_0'."),
        click.option("--allow-fallback", is_flag=True,
                     help="Use the nearest valid type when rows cannot take the one asked."),
    )


def _parse_loras(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple:
    from ..runner.lora import parse_lora

    try:
        return tuple(parse_lora(v) for v in values)
    except OssggufError as e:
        raise click.BadParameter(str(e)) from None


def lora_option(help: str = "Apply a LoRA adapter (from `ossgguf convert-lora`) at SCALE (default 1); "
                            "repeatable (docs/lora.md)."):
    return click.option("--lora", "lora", multiple=True, metavar="ADAPTER.gguf[:SCALE]", callback=_parse_loras,
                        help=help)


def parallel_option():
    """--parallel N (serve, and plan to size it): streams decoded in one batch (runner/parallel.py)."""
    return click.option("--parallel", type=_number(limits.PARALLEL), default=1, show_default=True, metavar="N",
                        help=f"Serve up to N requests at once, decoded in one batch, each with the whole --ctx "
                             f"(the KV cache is N times larger; more requests wait in line; at most "
                             f"{limits.PARALLEL.hi:g}).")


def placement_options(f):
    """The placement flags of every command that loads a model (runner.plan.PlacementOptions)."""
    return _options(
        click.option("--gpu-mem", type=GpuSizes(limits.GPU_MEM, memory=True), metavar="SIZE[,SIZE...]",
                     help="GPU memory to plan for, e.g. 24GiB, or one size per GPU: 24GiB,24GiB "
                     "(0: no GPU; default: detect), or per device or worker: CUDA0=20GiB,HOST:PORT=60GiB."),
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
    )(f)


def _placement(kw: dict, verbose: bool = False):
    """PlacementOptions from the placement flags (removed from kw); warns once about a GPU the build cannot use."""
    from ..runner.doctor import gpu_warning
    from ..runner.plan import PlacementOptions

    if warning := gpu_warning():
        click.echo(warning, err=True)
    flags = ("gpu_mem", "ram", "unified", "cpu_moe", "n_cpu_moe", "ctx", "ubatch", "threads", "rpc")
    return PlacementOptions(**{k: kw.pop(k) for k in flags}, lora=kw.pop("lora", ()),
                            cache_ram=kw.pop("cache_ram", None), parallel=kw.pop("parallel", 1), verbose=verbose)


def reasoning_option(help: str | None = None):
    """--reasoning, wherever a prompt is rendered, with the library's default."""
    from ..harmony import DEFAULT_REASONING, REASONING_EFFORTS

    return click.option("--reasoning", "reasoning_effort", type=click.Choice(REASONING_EFFORTS),
                        default=DEFAULT_REASONING, show_default=True, help=help)


def chat_options(f):
    """Conversation and generation flags shared by run and chat (runner.terminal.open_chat), with the
    library's defaults (Sampling's are OpenAI's for gpt-oss)."""
    from ..runner.chat import TOOL_TIMEOUT
    from ..runner.generation import Sampling

    default = Sampling()
    return _options(
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
    )(f)


def builtin_tool_options(f):
    """--tools-builtin and its options (run, chat, serve): gpt-oss's own python and browser tools
    (runner/tools, docs/tools.md)."""
    return _options(
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
    )(f)


def _builtin(kw: dict):
    """runner.tools.BuiltinOptions from the --tools-builtin flags (popped from `kw`)."""
    from ..runner.tools import BuiltinOptions, parse_names

    return BuiltinOptions(names=parse_names(kw.pop("tools_builtin")), unsafe=kw.pop("tools_unsafe"),
                          **{k: kw.pop(k) for k in ("python_timeout", "python_memory", "scratch", "browser_source")},
                          browser_allow=list(kw.pop("browser_allow")))


def _open_chat(context: click.Context, model: Path, kw: dict):
    from ..runner.generation import Sampling
    from ..runner.terminal import open_chat

    sampling = Sampling(**{k: kw.pop(k) for k in ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens")})
    builtin = _builtin(kw)
    options = _placement(kw, context.obj["verbose"])
    return open_chat(model, options, sampling, err=sys.stderr, builtin=builtin, **kw)


def prune_options(f):
    """How prune chooses K and the experts, with quantize.prune's defaults."""
    from ..quantize.prune import DEVICE_CTX
    from ..quantize.stats import SCORES

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
