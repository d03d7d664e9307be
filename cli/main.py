"""The ``esm2dask`` command. Each command parses options, builds one config, calls one
library function and prints a summary; errors are turned into messages in one place.

Dask's logging is configured first, before any command module imports dask (see
:mod:`esm2dask.logs`): by default the terminal shows only esm2dask's progress and summary.
"""

from __future__ import annotations

from esm2dask import logs

logs.configure_dask_logging()
logs.show_warnings()

import gc  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import click  # noqa: E402

from esm2dask import __version__  # noqa: E402
from esm2dask.errors import Esm2DaskError, Interrupted, reason  # noqa: E402

from .flip_cmd import flip  # noqa: E402
from .ngc_cmd import ngc, pipeline  # noqa: E402
from .preprocess_cmd import preprocess, synth, verify  # noqa: E402
from .report_cmd import report  # noqa: E402

VERBOSE_HELP = "Show esm2dask's and Dask's log messages on stderr (a run's log file always has them)."


class HelpFormatter(click.HelpFormatter):
    """Click's, except that a long word (a file name, an option) is never cut in two."""

    def write_dl(self, rows, col_max: int = 30, col_spacing: int = 2) -> None:
        rows = list(rows)
        first_col = min(max((len(term) for term, _ in rows), default=0), col_max) + col_spacing
        for term, text in rows:
            self.write(f"{'':>{self.current_indent}}{term}")
            if not text:
                self.write("\n")
                continue
            if len(term) <= first_col - col_spacing:
                self.write(" " * (first_col - len(term)))
            else:
                self.write("\n" + " " * (first_col + self.current_indent))
            width = max(self.width - first_col - 2, 10)
            lines = textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [""]
            self.write(lines[0] + "\n")
            for line in lines[1:]:
                self.write(f"{'':>{first_col + self.current_indent}}{line}\n")


class Context(click.Context):
    formatter_class = HelpFormatter


class Esm2DaskGroup(click.Group):
    """Turns the project's errors into one line on stderr and a non-zero exit."""

    def parse_args(self, ctx, args):
        if not args:  # `esm2dask` alone: the help, and success
            click.echo(ctx.get_help())
            ctx.exit(0)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Interrupted as err:
            click.echo(logs.redact(f"esm2dask: interrupted: {err}"), err=True)
            sys.exit(err.exit_code)
        except Esm2DaskError as err:
            click.echo(logs.redact(f"esm2dask: error: {err}"), err=True)
            sys.exit(getattr(err, "exit_code", 1))
        except KeyboardInterrupt:
            click.echo("esm2dask: interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as err:  # not foreseen: one line here, the traceback in a file
            where = logs.record_failure(err)
            click.echo(logs.redact(f"esm2dask: error: unexpected failure: {reason(err)}; the details are in "
                                   f"{where}; please report it"), err=True)
            sys.exit(1)


def _set_verbose(ctx, param, value):
    if value:
        logs.set_verbose(True)


def verbose_option() -> click.Option:
    """``-v``, accepted on the group and after any command (``esm2dask preprocess -v``)."""
    return click.Option(["-v", "--verbose"], is_flag=True, expose_value=False, is_eager=True,
                        callback=_set_verbose, help=VERBOSE_HELP)


@click.group(cls=Esm2DaskGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="esm2dask", help="Show the version and exit.")
def cli() -> None:
    """Prepare BioNeMo ESM2nv pre-training data (UniRef50/90 CSV shards) on Dask."""


for command in (preprocess, verify, report, synth, flip, ngc, pipeline):
    cli.add_command(command)


def _finish(command: click.Command) -> None:
    """-v and the help formatter on every command."""
    command.params.append(verbose_option())
    command.context_class = Context
    for sub in getattr(command, "commands", {}).values():
        _finish(sub)


_finish(cli)


def main() -> None:  # pragma: no cover - console entry
    try:
        cli()
    finally:
        # The process is ending, and what must be closed is closed: the cluster and every
        # file by their `with`, the log handlers by logging's atexit, stdout and stderr by
        # the interpreter (both still run). Left are the garbage collector's passes over
        # the whole heap while the interpreter tears itself down: 0.3 s after a report
        # (numba, distributed, matplotlib loaded), for memory the OS takes back at once.
        # They skip frozen objects. Given up: __del__ of an object in a reference cycle,
        # which esm2dask never relies on (Python does not promise it at exit either).
        gc.freeze()
