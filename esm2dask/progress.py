"""How the library reports progress: a small interface the CLI implements (a rich bar on a
terminal, a plain line every few seconds otherwise). The library itself only logs.

The overall amount is work: for ``preprocess`` the input bytes its tasks read (each pass
over a FASTA counts its bytes, so the total is the sum of the planned passes, and grows
if a stream needs the hash join); for ``synth`` the records written. Work an earlier,
interrupted run already did is *skipped*: it fills the bar but not the rate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("esm2dask")


def human_amount(amount: float, unit: str) -> str:
    """``human_amount(37_500_000, "B")`` → ``'37.5 MB'``; other units as counts."""
    if unit != "B":
        return f"{amount:,.0f} {unit}"
    for prefix in ("", "K", "M", "G", "T"):
        if abs(amount) < 1000 or prefix == "T":
            return f"{amount:.0f} B" if not prefix else f"{amount:.1f} {prefix}B"
        amount /= 1000
    return f"{amount} B"  # pragma: no cover


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class Tally:
    """The numbers behind a progress display."""

    unit: str = "B"
    total: int = 0
    done: int = 0  # done in this run
    skipped: int = 0  # done by an earlier run
    skipped_tasks: int = 0
    started: float = field(default_factory=time.monotonic)
    stage: str = ""
    stage_total: int = 0
    stage_done: int = 0

    @property
    def completed(self) -> int:
        return self.done + self.skipped

    def rate(self, now: float | None = None) -> float:
        """Work per second in this run."""
        elapsed = (now or time.monotonic()) - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float | None = None) -> float | None:
        rate = self.rate(now)
        left = max(0, self.total - self.completed)
        return left / rate if rate > 0 else None

    def fraction(self) -> float:
        return min(1.0, self.completed / self.total) if self.total else 0.0

    def overall_text(self, now: float | None = None) -> str:
        """``37.5 MB/89.0 MB, 12.3 MB/s, ETA 4 s``."""
        now = now or time.monotonic()
        return (f"{human_amount(self.completed, self.unit)}/{human_amount(self.total, self.unit)}, "
                f"{human_amount(self.rate(now), self.unit)}/s, ETA {human_seconds(self.eta(now))}")

    def line(self, now: float | None = None) -> str:
        """One plain progress line."""
        stage = f"; {self.stage} {self.stage_done}/{self.stage_total}" if self.stage else ""
        return f"{self.fraction() * 100:3.0f}% {self.overall_text(now)}{stage}"


class Reporter:
    """Default reporter: keeps the tally and logs. Subclass to draw progress."""

    def __init__(self):
        self.tally = Tally()

    def message(self, text: str) -> None:
        log.info(text)

    def begin(self, total: int, unit: str = "B") -> None:
        """The overall amount of work (may grow, see :meth:`grow`)."""
        self.tally.unit, self.tally.total = unit, total
        self.tally.started = time.monotonic()
        log.info("work: %s", human_amount(total, unit))

    def grow(self, extra: int) -> None:
        self.tally.total += extra

    def skip(self, amount: int, tasks: int = 1) -> None:
        """Work an earlier run did (its receipts were loaded)."""
        self.tally.skipped += amount
        self.tally.skipped_tasks += tasks

    def stage(self, name: str, total: int) -> None:
        self.tally.stage, self.tally.stage_total, self.tally.stage_done = name, total, 0
        log.info("%s: %d task(s)", name, total)

    def advance(self, name: str, done: int = 1) -> None:
        """``done`` more tasks of stage ``name`` finished."""
        if name == self.tally.stage:
            self.tally.stage_done += done

    def progress(self, amount: int) -> None:
        """``amount`` more work done (bytes read, records written)."""
        self.tally.done += amount

    def stage_done(self, name: str, seconds: float) -> None:
        log.info("%s: done in %.2f s", name, seconds)

    def close(self) -> None:
        pass
