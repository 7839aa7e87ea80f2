"""Commands that plan or load a model: plan, run, chat, serve, compare, calibrate, worker, doctor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .. import limits
from ..errors import OssggufError
from .base import Bandwidths, _number, _progress_bar, cli
from .options import (
    _builtin,
    _open_chat,
    _parse_loras,
    _placement,
    builtin_tool_options,
    chat_options,
    lora_option,
    parallel_option,
    placement_options,
    reasoning_option,
)


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
def compare(reference: Path, candidate: Path, text_file: str | None, ctx: int, as_json: bool, **kw) -> None:
    """Quality of CANDIDATE against REFERENCE on the same tokens: KL divergence, top-1 agreement,
    logit cosine (as llama.cpp's perplexity --kl-divergence).

    \b
    Examples:
      ossgguf compare gpt-oss-20b-bf16.gguf gpt-oss-20b-mxfp4-q8.gguf --text wiki.txt
      ossgguf compare model.gguf model.gguf --rpc 192.168.1.20:50052
      ossgguf compare base.gguf base.gguf --lora my-adapter.gguf        # how far the adapter moves it
    """
    from ..quantize.compare import compare as run_compare
    from ..quantize.compare import format_compare, read_text_file

    text = read_text_file(text_file) if text_file else None
    r = run_compare(reference, candidate, text=text, n_ctx=ctx, **kw)  # kw: threads, rpc, lora, ref_lora
    click.echo(json.dumps(r, indent=1) if as_json else format_compare(r))


@cli.command("plan")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@placement_options
@parallel_option()
@click.option("--measure", is_flag=True, help="Measure RAM bandwidth and CPU compute for the speed prediction (~2 s).")
@click.option("--ram-bw", type=Bandwidths(), metavar="RATE", help="RAM bandwidth, e.g. 90GB/s (default: measured "
              "with --measure, else dual-channel DDR5).")
@click.option("--gpu-bw", type=Bandwidths(), metavar="RATE[,RATE...]",
              help="GPU memory bandwidth(s), e.g. 1008GB/s (default: a table of known GPUs).")
@click.option("--compare", "compare_n", metavar="N,N,...", help="Compare these --n-cpu-moe values side by side.")
@click.option("--link", "link_gbit", type=click.FloatRange(0.01, 1000), default=1.0, show_default=True, metavar="GBIT",
              help="With --rpc: the network's speed in Gbit/s, for the predicted speed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable plan.")
def plan_cmd(model: Path, as_json: bool, measure: bool, ram_bw, gpu_bw, compare_n: str | None, link_gbit: float,
             **kw) -> None:
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
      ossgguf plan gpt-oss-120b-mxfp4.gguf --rpc 10.0.0.2:50052 --gpu-mem 10.0.0.2:50052=56GiB --link 10
    """
    from ..runner import network, speed
    from ..runner.plan import format_plan, plan

    options = _placement(kw)
    bw = dict(ram_bw=ram_bw[0] if ram_bw else None, gpu_bw=list(gpu_bw) if gpu_bw else None, measure=measure)
    if compare_n:
        try:
            values = [int(v) for v in compare_n.split(",")]
        except ValueError:
            raise click.BadParameter(f"{compare_n!r}: give --n-cpu-moe values, e.g. 20,24,28", param_hint="--compare") from None
        rows = speed.compare(model, options, values, **bw, link_gbit=link_gbit)
        click.echo(json.dumps([p.to_json() | {"speed": s.to_json()} for p, s in rows], indent=1) if as_json
                   else speed.format_compare(rows))
        return
    p = plan(model, options)
    s = speed.predict(p, *speed.memories(p, **bw), link_gbit=link_gbit)
    workers = bool(network.remote(p))
    if as_json:
        from ..runner.prompt_cache import cache_budget, plan_checkpoint_bytes

        # the RAM beside the buffers (the notes' line, in bytes): what bench/bench_cache_memory.py holds RSS to
        cache = {"prompt_cache": {"budget": cache_budget(p, options.cache_ram), "checkpoint_bytes": plan_checkpoint_bytes(p)},
                 "ram_bytes": p.ram_bytes}
        click.echo(json.dumps(p.to_json() | cache | {"speed": s.to_json()} | (network.to_json(p, link_gbit) if workers else {}),
                              indent=1))
    else:
        hosts = "\n\n" + network.format_hosts(p, link_gbit) if workers else ""
        click.echo(format_plan(p) + hosts + "\n\n" + speed.format_speed(s, p.n_ctx))


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
    from ..runner.terminal import run_once

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
    from ..runner.terminal import chat_loop

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
@builtin_tool_options
@placement_options
@parallel_option()
@click.pass_context
def serve(context: click.Context, model: Path, **kw) -> None:
    """Serve the model over the OpenAI API (/v1/chat/completions, /v1/responses, /v1/models) and Anthropic's
    Messages API (/v1/messages, for Claude Code); /health.

    \b
    Examples:
      ossgguf serve gpt-oss-20b-mxfp4.gguf                       # http://127.0.0.1:8080/v1
      ossgguf serve gpt-oss-120b-mxfp4-00001-of-00003.gguf --gpu-mem 24GiB --ctx 32768 --port 8081
      ossgguf serve gpt-oss-20b-mxfp4.gguf --host 0.0.0.0 --api-key "$OSSGGUF_API_KEY"
      ossgguf serve gpt-oss-20b-mxfp4.gguf --lora a.gguf --lora b.gguf   # models NAME, NAME+a, NAME+b, NAME+none
      ossgguf serve gpt-oss-20b-mxfp4.gguf --tools-builtin python,browser --browser-source local:~/notes
    """
    try:
        from ossgguf.runner.server.app import serve as run_server
    except ImportError as e:  # fastapi/uvicorn are the `server` extra
        raise OssggufError(f"the server needs its extra: pip install 'ossgguf[server]' ({e})") from None

    verbose = context.obj["verbose"]
    builtin = _builtin(kw)  # Responses code_interpreter / web_search, every chat completion (docs/tools.md)
    options = _placement(kw, verbose)
    # kw: host, port, api_key, model_name, strict_model, reasoning_effort
    run_server(model, options=options, log_level="info" if verbose else "warning", builtin=builtin,
               on_ready=lambda line: click.echo(line, err=True), **kw)


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
    from ..runner.calibrate import calibrate as run_calibrate
    from ..runner.calibrate import default_stats_path

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
    from ..runner.rpc import Endpoint, serve_worker

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
    from ..runner.doctor import doctor as run_doctor
    from ..runner.doctor import format_report

    r = run_doctor(list(dirs) or None, ctx=ctx)
    click.echo(json.dumps(r.to_json(), indent=1) if as_json else format_report(r))
