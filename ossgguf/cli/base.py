"""The group, the error boundary and the option types every command shares.

One error boundary: an OssggufError (or any error) prints one line and exits non-zero; set
OSSGGUF_DEBUG=1 for the traceback. The answer goes to stdout; progress and logs go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import click

from .. import __version__, limits
from ..errors import OssggufError
from ..sizes import parse_size


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
    """--gpu-mem: one size, or one per GPU in llama.cpp's device order (24GiB,24GiB) -> int or tuple;
    or sizes for named devices, a local GPU or a worker (CUDA0=20GiB,10.0.0.2:50052=60GiB) -> pairs."""

    def convert(self, value, param, ctx):
        if isinstance(value, (int, tuple)):
            return value
        if "=" in value:
            pairs = [v.strip().rpartition("=") for v in value.split(",")]
            if any(not name for name, _, _ in pairs):
                self.fail(f"{value!r}: give every device a name (NAME=SIZE,NAME=SIZE) or none (SIZE,SIZE)", param, ctx)
            names = [name for name, _, _ in pairs]
            if len(set(names)) < len(names):
                self.fail(f"{value!r}: a device is named twice", param, ctx)
            return tuple((name, super(GpuSizes, self).convert(size, param, ctx)) for name, _, size in pairs)
        if "," not in value:
            return super().convert(value, param, ctx)
        sizes = tuple(super(GpuSizes, self).convert(v.strip(), param, ctx) for v in value.split(","))
        if 0 in sizes:
            self.fail(f"{value!r}: a list of GPU sizes has no 0 (give 0 alone for no GPU)", param, ctx)
        return sizes


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


def _options(*opts):
    """A decorator adding click options in the order given (for option groups several commands share)."""
    def deco(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return deco


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
    except click.exceptions.Abort:
        _die("interrupted", 130)
    except KeyboardInterrupt:
        _die("interrupted: no output was left behind", 130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - the one boundary where unexpected errors become one line
        if debug:
            raise
        if isinstance(e, OssggufError):
            _die(str(e))
        if isinstance(e, OSError):
            _die(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}")
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
