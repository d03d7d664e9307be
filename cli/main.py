"""The ``esm2dask`` command. Each command parses options, builds one config, calls one
library function and prints a summary; errors are turned into messages in one place."""

from __future__ import annotations

import logging
import os
import sys

import click

from esm2dask import __version__
from esm2dask.errors import Esm2DaskError


class Esm2DaskGroup(click.Group):
    """Turns the project's errors into one line on stderr and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Esm2DaskError as err:
            click.echo(f"esm2dask: error: {err}", err=True)
            sys.exit(getattr(err, "exit_code", 1))
        except KeyboardInterrupt:
            click.echo("esm2dask: interrupted; nothing was published", err=True)
            sys.exit(130)


@click.group(cls=Esm2DaskGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="esm2dask")
@click.option("-v", "--verbose", is_flag=True, help="Log Dask's own messages too.")
def cli(verbose: bool) -> None:
    """Prepare BioNeMo ESM2nv pre-training data (UniRef50/90 CSV shards) on Dask."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not verbose:
        # read by distributed when it is first imported, and by the worker processes
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
    for name in ("bokeh", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)


def main() -> None:  # pragma: no cover - console entry
    cli()


from . import flip_cmd, ngc_cmd, preprocess_cmd  # noqa: E402,F401  (registers commands)
