"""How the library reports progress: a small interface the CLI implements (with rich on
a terminal, plain log lines otherwise). The library itself only logs."""

from __future__ import annotations

import logging

log = logging.getLogger("esm2dask")


class Reporter:
    """Default reporter: plain log lines. Subclass to draw progress bars."""

    def message(self, text: str) -> None:
        log.info(text)

    def stage(self, name: str, total: int) -> None:
        log.info("%s: %d task(s)", name, total)

    def advance(self, name: str, done: int = 1) -> None:
        pass

    def stage_done(self, name: str, seconds: float) -> None:
        log.info("%s: done in %.2f s", name, seconds)

    def close(self) -> None:
        pass
