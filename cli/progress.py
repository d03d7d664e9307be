"""Progress for the terminal (rich bars) or for logs (plain lines)."""

from __future__ import annotations

import sys

import click

from esm2dask.progress import Reporter


class PlainReporter(Reporter):
    """One line per stage start and end, on stderr."""

    def message(self, text: str) -> None:
        click.echo(text, err=True)

    def stage(self, name: str, total: int) -> None:
        click.echo(f"[{name}] {total} task(s)", err=True)

    def stage_done(self, name: str, seconds: float) -> None:
        click.echo(f"[{name}] done in {seconds:.2f} s", err=True)


class RichReporter(Reporter):
    """A progress bar per stage, on stderr."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.tasks = {}

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def stage(self, name: str, total: int) -> None:
        self.tasks[name] = self.progress.add_task(name, total=total)

    def advance(self, name: str, done: int = 1) -> None:
        self.progress.advance(self.tasks[name], done)

    def stage_done(self, name: str, seconds: float) -> None:
        pass

    def close(self) -> None:
        self.progress.stop()


def make_reporter(plain: bool | None = None) -> Reporter:
    if plain is None:
        plain = not sys.stderr.isatty()
    return PlainReporter() if plain else RichReporter()
