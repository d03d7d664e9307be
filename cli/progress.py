"""Progress on stderr: one overall bar (work done, rate, ETA) and the current stage, drawn
by rich on a terminal; a plain line every few seconds otherwise (logs, CI, pipes)."""

from __future__ import annotations

import sys
import threading

import click

from esm2dask.progress import Reporter


class PlainReporter(Reporter):
    """A progress line every ``interval_s`` seconds while there is work, and the messages."""

    def __init__(self, interval_s: float = 5.0):
        super().__init__()
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def message(self, text: str) -> None:
        super().message(text)
        click.echo(text, err=True)

    def begin(self, total: int, unit: str = "B") -> None:
        super().begin(total, unit)
        if self._thread is None:
            self._thread = threading.Thread(target=self._tick, name="esm2dask-progress", daemon=True)
            self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            click.echo(self.tally.line(), err=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class RichReporter(Reporter):
    """Two rows: the overall bar, and the stage being waited on."""

    def __init__(self):
        super().__init__()
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self.overall = None
        self.current = None

    def message(self, text: str) -> None:
        super().message(text)
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def begin(self, total: int, unit: str = "B") -> None:
        super().begin(total, unit)
        if self.overall is None:
            self.overall = self.progress.add_task("read" if unit == "B" else "written", total=max(total, 1), info="")
            self.current = self.progress.add_task("starting", total=1, info="")
            self._draw()
            self.progress.start()
        self._draw()

    def grow(self, extra: int) -> None:
        super().grow(extra)
        self._draw()

    def skip(self, amount: int, tasks: int = 1) -> None:
        super().skip(amount, tasks)
        self._draw()

    def stage(self, name: str, total: int) -> None:
        super().stage(name, total)
        self._draw()

    def advance(self, name: str, done: int = 1) -> None:
        super().advance(name, done)
        self._draw()

    def progress(self, amount: int) -> None:
        super().progress(amount)
        self._draw()

    def _draw(self) -> None:
        if self.overall is None:
            return
        t = self.tally
        self.progress.update(self.overall, total=max(t.total, 1), completed=t.completed, info=t.overall_text())
        self.progress.update(self.current, description=t.stage or "starting", total=max(t.stage_total, 1),
                             completed=t.stage_done, info=f"{t.stage_done}/{t.stage_total} tasks")

    def close(self) -> None:
        if self.overall is not None:
            self._draw()
            self.progress.stop()


def make_reporter(plain: bool | None = None) -> Reporter:
    if plain is None:
        plain = not sys.stderr.isatty()
    return PlainReporter() if plain else RichReporter()
