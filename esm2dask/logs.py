"""Where log records go: nowhere on the terminal by default, to stderr with ``-v``, and
always, during a ``preprocess`` run, to the run's log file (``OUT/esm2dask.log``).

Dask configures its loggers when ``distributed`` is first imported, in this process and in
every worker process a LocalCluster starts, from the ``logging`` key of the Dask config.
:func:`configure_dask_logging` sets that key through ``$DASK_LOGGING`` (inherited by the
worker processes) before anything imports dask: Dask's loggers keep their levels but get no
handler of their own, and the root logger gets one :class:`Dispatch` handler, which sends
each record to the sinks esm2dask registers here (none in a worker process). The order of
imports therefore does not matter for ``-v``: a sink can be added at any time.

This module imports nothing heavy; the CLI imports it first.
"""

from __future__ import annotations

import logging
import os
import sys

from .redaction import MASK, SECRET_ENV, redact, register_secret, secret_values  # noqa: F401  (re-exported)

#: The Dask ``logging`` config (Python's dictConfig schema), set before dask is imported.
DASK_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"dispatch": {"class": "esm2dask.logs.Dispatch"}},
    "root": {"level": "INFO", "handlers": ["dispatch"]},
    "loggers": {
        "distributed": {"level": "INFO"},
        "distributed.client": {"level": "WARNING"},
        "distributed.gc": {"level": "WARNING"},
        "bokeh": {"level": "ERROR"},
        "tornado": {"level": "ERROR"},
        "tornado.access": {"level": "WARNING"},
    },
}
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"

_sinks: list[logging.Handler] = []

class RedactingFormatter(logging.Formatter):
    """Every sink's formatter: no secret value ever reaches a log file or the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _QuietOnFailure:
    """A sink that cannot write (a full disk, a closed pipe) drops its records silently:
    logging's default prints "--- Logging error ---" and a traceback for every record, a
    storm of lines that buries the one error that says what happened (the run reports a
    full disk itself)."""

    write_failed = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self.write_failed = True


class FileSink(_QuietOnFailure, logging.FileHandler):
    pass


class StreamSink(_QuietOnFailure, logging.StreamHandler):
    pass


class Dispatch(logging.Handler):
    """The root logger's one handler: passes each record to the registered sinks."""

    def emit(self, record: logging.LogRecord) -> None:
        for sink in list(_sinks):
            if record.levelno >= sink.level:
                sink.handle(record)


def configure_dask_logging() -> None:
    """Set ``$DASK_LOGGING`` (unless the user set it) so that Dask, when imported here or in
    a worker process, prints nothing itself. Call before dask is imported."""
    os.environ.setdefault("DASK_LOGGING", repr(DASK_LOGGING))
    logging.captureWarnings(True)  # Dask's and bokeh's warnings become log records
    root = logging.getLogger()
    if not any(isinstance(h, Dispatch) for h in root.handlers):
        root.addHandler(Dispatch())
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def _formatted(handler: logging.Handler) -> logging.Handler:
    handler.setFormatter(RedactingFormatter(LOG_FORMAT))
    return handler


def add_sink(handler: logging.Handler) -> logging.Handler:
    """Register ``handler`` to receive every record that reaches the root logger."""
    if handler.formatter is None:
        _formatted(handler)
    _sinks.append(handler)
    return handler


def remove_sink(handler: logging.Handler) -> None:
    if handler in _sinks:
        _sinks.remove(handler)
    try:
        handler.close()
    except OSError:  # a full disk cannot take the log's last lines: the run's error says why
        pass


_console: logging.Handler | None = None
_warnings: logging.Handler | None = None


class _Esm2DaskWarningsOnly(logging.Filter):
    """esm2dask's warnings; its errors are the one error line the CLI prints, their
    tracebacks go to the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR and (record.name == "esm2dask" or record.name.startswith("esm2dask."))


def show_warnings() -> None:
    """By default esm2dask's own warnings (a retried download, truncated FLIP labels) still
    reach stderr, as one line each; Dask's do not."""
    global _warnings
    if _warnings is None:
        handler = StreamSink(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.addFilter(_Esm2DaskWarningsOnly())
        handler.setFormatter(RedactingFormatter("esm2dask: warning: %(message)s"))
        _warnings = add_sink(handler)


def set_verbose(verbose: bool = True) -> None:
    """``-v``: esm2dask's and Dask's log records on stderr as well."""
    global _console, _warnings
    if verbose and _console is None:
        if _warnings is not None:  # the verbose sink shows them, once
            remove_sink(_warnings)
            _warnings = None
        _console = add_sink(StreamSink(sys.stderr))
        os.environ["ESM2DASK_VERBOSE"] = "1"  # LocalCluster workers keep their stderr (cluster.VERBOSE_ENV)
    elif not verbose and _console is not None:
        os.environ.pop("ESM2DASK_VERBOSE", None)
        remove_sink(_console)
        _console = None
        show_warnings()


def failure_log_path() -> str:
    """Where :func:`record_failure` writes: the user's cache folder, else the temporary one."""
    import tempfile

    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    for folder in (os.path.join(base, "esm2dask"), os.path.join(tempfile.gettempdir(), f"esm2dask-{os.getuid()}")):
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK | os.X_OK):
            return os.path.join(folder, "last-failure.log")
    return os.devnull


def record_failure(err: BaseException) -> str:
    """The traceback of an unexpected failure: logged (a run's log file, stderr with ``-v``)
    and written, secrets masked, to :func:`failure_log_path`; returns that path."""
    import traceback

    logging.getLogger("esm2dask").error("unexpected failure", exc_info=err)
    path = failure_log_path()
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(redact(text))
    except OSError:
        return "the log (run with -v to see it)"
    return path


class RunLog:
    """The log file of one run: written in the staging folder while the run goes on (a
    resumed run appends to it), moved next to the manifest when the run is published.

    On an object store the file is written locally and uploaded: into the staging prefix
    when the run stops early, next to the manifest when it is published.
    """

    NAME = "esm2dask.log"

    def __init__(self, staging_root: str, output_dir: str, storage_options: dict):
        from . import storage

        self.storage_options = storage_options
        self.published = False  # moved next to the manifest: keep() and discard() leave it
        self.sealed = False  # closed, whole in the staging folder, for the switch to move in
        self.staged_url = storage.join(staging_root, self.NAME)
        self.final_url = storage.join(output_dir, self.NAME)
        self.file = storage.WorkingCopy(self.staged_url, storage_options)  # appends to a resumed run's log
        self.handler: logging.Handler | None = add_sink(FileSink(self.file.path, mode="a", delay=False))

    def _close(self) -> None:
        if self.handler is not None:
            remove_sink(self.handler)
            self.handler = None

    def publish(self) -> str:
        """Move the log next to the manifest; returns where it is."""
        logging.getLogger("esm2dask").info("publishing the log to %s", self.final_url)
        self._close()
        self.published = True
        self.file.move_to(self.final_url)
        return self.final_url

    def seal(self) -> str:
        """The run is about to publish: close the log and leave it whole in the staging
        folder, from where the switch moves it next to the manifest with the tree (a failed
        switch leaves it there, and OUT's previous log in place). Returns its staged URL."""
        logging.getLogger("esm2dask").info("publishing the log to %s", self.final_url)
        self._close()
        if not self.sealed:
            self.file.move_to(self.staged_url)
        self.sealed = True
        return self.staged_url

    def keep(self) -> None:
        """The run stopped early: leave the log in the staging folder for ``--resume``."""
        self._close()
        if not self.published and not self.sealed:
            try:
                self.file.move_to(self.staged_url)
            except OSError:
                pass

    def discard(self) -> None:
        self._close()
        if not self.published and not self.sealed:
            self.file.drop()
