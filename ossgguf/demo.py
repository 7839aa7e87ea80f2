"""`ossgguf demo`: the whole pipeline on a tiny generated gpt-oss checkpoint, no network needed."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import click


def _step(n: int, text: str) -> None:
    click.secho(f"[{n}/4] {text}", bold=True, err=True)


def run_demo(workdir: Path | None = None, keep: bool = False, verbose: bool = False) -> None:
    from .convert.convert import plan_conversion, run_conversion, summarize
    from .tiny import TinySpec, make_tiny_checkpoint

    tmp = None
    if workdir is None:
        tmp = workdir = Path(tempfile.mkdtemp(prefix="ossgguf-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        _step(1, "making a tiny gpt-oss checkpoint in the Hugging Face layout (MXFP4 experts)")
        ckpt = make_tiny_checkpoint(workdir / "tiny-gpt-oss", TinySpec())
        files = sorted(p.name for p in ckpt.iterdir())
        click.echo(f"      {ckpt}: {', '.join(files)}", err=True)

        _step(2, "converting it to GGUF (experts repacked bit for bit)")
        out = workdir / "tiny-gpt-oss-mxfp4.gguf"
        plan = plan_conversion(ckpt, out)
        report = run_conversion(plan, force=True)
        click.echo("      " + summarize(report).replace("\n", "\n      "), err=True)

        _step(3, "loading it in llama.cpp (llama-cpp-python)")
        from .runner.engine import detokenize
        from .runner.llama_ctypes import open_llama

        t0 = time.perf_counter()
        # One thread: a model this small is faster without the threads waiting on each other.
        llm = open_llama(out, n_ctx=256, n_threads=1, verbose=verbose, seed=0, swa_full=False)
        click.echo(f"      loaded in {time.perf_counter() - t0:.2f} s: {llm.n_vocab()} tokens, "
                   f"{llm.metadata.get('gpt-oss.block_count')} layers", err=True)

        _step(4, "generating 16 tokens from a harmony prompt (random weights: expect gibberish)")
        prompt = "<|start|>user<|message|>Hello, gpt-oss!<|end|><|start|>assistant"
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        t0 = time.perf_counter()
        out_tokens = []
        for tok in llm.generate(tokens, temp=0.0):
            out_tokens.append(tok)
            if len(out_tokens) == 16:
                break
        dt = time.perf_counter() - t0
        text = detokenize(llm.model, out_tokens)  # Llama.detokenize garbles tokens over 32 bytes
        click.echo(f"      prompt: {len(tokens)} tokens; generated: {out_tokens}", err=True)
        click.echo(text)
        click.echo(f"      {len(out_tokens) / dt:.0f} tok/s. The pipeline works end to end.", err=True)
        llm.close()
        if keep or tmp is None:
            click.echo(f"      files kept in {workdir}", err=True)
    finally:
        if tmp is not None and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    sys.stdout.flush()
