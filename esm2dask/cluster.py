"""Getting a Dask client: a LocalCluster on this node, or a running cluster.

Shutting down quietly takes an order: the driver cancels its futures, closes the client,
then closes the cluster (the ``with`` blocks below), and the worker processes of a
LocalCluster ignore Ctrl-C (:func:`dask_setup`, a Dask preload), so that a Ctrl-C at the
terminal, which reaches every process of the foreground group, stops the driver alone and
the driver shuts the workers down.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from distributed.diagnostics.plugin import ForwardLoggingPlugin

from .config import ClusterConfig
from .errors import ConfigError

log = logging.getLogger("esm2dask")


#: Set by ``-v`` for the worker processes a LocalCluster starts (they inherit it).
VERBOSE_ENV = "ESM2DASK_VERBOSE"


class _StderrToLog(io.TextIOBase):
    """A worker process's stderr as log records (``distributed.worker.stderr``, WARNING):
    they reach the driver's log file while the worker is connected, never the terminal."""

    def __init__(self):
        self._pending = ""
        self._busy = False  # a failing handler writes to stderr: do not loop

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self._busy:
            return len(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        self._busy = True
        try:
            for line in lines:
                if line.strip():
                    logging.getLogger("distributed.worker.stderr").warning(line)
        finally:
            self._busy = False
        return len(text)


def take_back_ctrl_c(handler=None) -> None:
    """Put Python's own SIGINT disposition back (or ``handler``) over the one polars installs.

    polars' handler, with a query running in any thread, raises ``KeyboardInterrupt`` in
    that thread: on a thread worker a Dask executor thread, where it stops the cluster's
    event loop (the driver hangs, or fails with "IOLoop is closed"). polars is imported
    first (its handler comes with the import), then what Python had is set again: its
    handler, so that a Ctrl-C reaches the main thread only and the driver shuts the run
    down in order; or ``SIG_IGN`` for a process started with SIGINT ignored (a shell's
    background job), which keeps ignoring it, as any program does."""
    import polars  # noqa: F401

    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, handler if handler is not None else
                  current if current is not None else signal.default_int_handler)


def dask_setup(worker) -> None:
    """Dask preload, run in each LocalCluster worker process as it starts. Ctrl-C is for the
    driver, which shuts the workers down in order; and what a worker would print on the way
    out (a traceback from a shutdown race, say) goes to the log, not to the terminal,
    unless the run is verbose."""
    take_back_ctrl_c(signal.SIG_IGN)
    if not os.environ.get(VERBOSE_ENV):
        sys.stderr = _StderrToLog()


def wait_for_scheduler_file(path: str, timeout_s: float, say: Callable[[str], None]) -> None:
    """Wait for a scheduler file that is not there yet, as ``dask worker`` does."""
    if os.path.exists(path):
        return
    say(f"waiting up to {timeout_s:.0f} s for the scheduler file {path} (written by `dask scheduler --scheduler-file`)")
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise ConfigError(
                f"--scheduler-file {path}: no such file after {timeout_s:.0f} s; start the scheduler with "
                f"`dask scheduler --scheduler-file {path}` or raise --scheduler-timeout"
            )
        time.sleep(0.2)


@contextlib.contextmanager
def dask_client(config: ClusterConfig, say: Callable[[str], None] = log.info,
                ctrl_c_now: bool = True) -> Iterator:
    """A connected client; the LocalCluster, if one is started, closes on exit.

    Every worker's thread pools (polars, Arrow, numba, BLAS) are limited to its Dask
    threads (:mod:`esm2dask.workerenv`), whoever started the worker. ``ctrl_c_now=False``:
    the caller calls :func:`take_back_ctrl_c` itself, before its first task that uses
    polars (the import it needs costs 0.1-0.2 s: the report does it while its first
    tasks run).
    """
    import dask
    from distributed import Client, LocalCluster

    from .workerenv import ThreadLimits, thread_environment

    if ctrl_c_now:
        take_back_ctrl_c()  # a Ctrl-C is the driver's: never polars' in a task's thread
    with dask.config.set({"distributed.worker.daemon": False}):
        if config.scheduler_address or config.scheduler_file:
            where = config.scheduler_address or config.scheduler_file
            if config.scheduler_file:
                wait_for_scheduler_file(config.scheduler_file, config.scheduler_timeout_s, say)
            try:
                client = Client(
                    address=config.scheduler_address,
                    scheduler_file=config.scheduler_file,
                    timeout=f"{config.scheduler_timeout_s}s",
                )
            except (OSError, TimeoutError, ValueError) as err:
                raise ConfigError(f"cannot connect to the Dask scheduler at {where}: {err}") from None
            with client, _forwarding(client):
                client.register_plugin(ThreadLimits())
                yield client
            return
        try:
            cluster = LocalCluster(
                n_workers=config.workers,
                threads_per_worker=config.threads_per_worker,
                processes=config.processes,
                memory_limit=config.memory_limit or "auto",
                dashboard_address=config.dashboard_address,
                # worker processes take the limits from their environment, and ignore Ctrl-C
                # (dask_setup); threads share this process's pools, sized to the machine
                **({"env": thread_environment(config.threads_per_worker), "preload": ["esm2dask.cluster"]}
                   if config.processes else {}),
            )
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"cannot start a local Dask cluster: {err}") from None
        try:
            if not config.processes or config.dashboard_address is None:
                _close_http_servers(cluster, dashboard=config.dashboard_address is not None,
                                    thread_workers=not config.processes)
            with Client(cluster) as client, _forwarding(client, in_process=not config.processes):
                if config.processes:
                    client.register_plugin(ThreadLimits())
                yield client
        finally:
            cluster.close()


#: Tells this process apart from every other: a worker plugin that carries it and finds
#: the same value where it is set up runs inside this very process.
PROCESS_TOKEN = secrets.token_hex(8)
FORWARD_PLUGIN = "esm2dask-forward-logging"
FORWARD_TOPIC = "esm2dask-forwarded-log-record"


class ForwardWorkerLogs(ForwardLoggingPlugin):
    """Dask's log forwarding, except in a worker that runs inside the driver's own process
    (a LocalCluster of threads, or a cluster the driver's process hosts): there a worker's
    records reach the driver's log already, and a forwarding handler on the shared root
    logger would send each forwarded record back to it again, forever."""

    def __init__(self, level, topic: str, process_token: str):
        super().__init__(None, level, topic)
        self.process_token = process_token

    def setup(self, worker):
        if self.process_token == PROCESS_TOKEN:  # read in the worker's process
            return
        super().setup(worker)


def _handle_forwarded(event) -> None:
    _, attributes = event
    record = logging.makeLogRecord(attributes)
    logging.getLogger(record.name).handle(record)


@contextlib.contextmanager
def _forwarding(client, in_process: bool = False):
    """Workers' warnings and errors come to this process's log (file, and stderr with -v),
    each exactly once. Workers that are threads of this process log here already."""
    if in_process:
        yield
        return
    try:
        client.subscribe_topic(FORWARD_TOPIC, _handle_forwarded)
        client.register_plugin(ForwardWorkerLogs(logging.WARNING, FORWARD_TOPIC, PROCESS_TOKEN),
                               name=FORWARD_PLUGIN)
    except Exception:  # pragma: no cover - an older scheduler without the event topic
        log.debug("worker log forwarding not available", exc_info=True)
        yield
        return
    try:
        yield
    finally:
        try:  # a shared cluster keeps no plugin of this run
            client.unsubscribe_topic(FORWARD_TOPIC)
            client.unregister_worker_plugin(FORWARD_PLUGIN)
        except Exception:
            log.debug("could not stop worker log forwarding", exc_info=True)


def _close_http_servers(cluster, dashboard: bool, thread_workers: bool) -> None:
    """No listener that was not asked for: without a dashboard (``--dashboard-address
    none``) the scheduler's HTTP server is closed too (Dask starts one whatever it is
    told), and workers that are threads of this process never need theirs."""
    from distributed.utils import sync

    servers = [] if dashboard else [cluster.scheduler]
    if thread_workers:
        servers += list(cluster.workers.values())

    async def close():
        for node in servers:
            server = getattr(node, "http_server", None)
            if server is not None:
                server.stop()

    sync(cluster.loop, close)


def dashboard_link(client, dashboard_address: str | None = None) -> str | None:
    """The dashboard's URL; with the host of ``--dashboard-address`` when it names one
    (an in-process cluster would otherwise show this machine's public address)."""
    try:
        link = client.dashboard_link
    except Exception:  # pragma: no cover - no dashboard (bokeh missing, disabled)
        return None
    host = (dashboard_address or "").rpartition(":")[0]
    if link and host:
        from urllib.parse import urlsplit

        parts = urlsplit(link)
        link = parts._replace(netloc=f"{host}:{parts.port}").geturl()
    return link


@contextlib.contextmanager
def maybe_performance_report(filename: str | None):
    """Dask's HTML performance report around the run, self-contained (works offline)."""
    if not filename:
        yield
        return
    from distributed import performance_report

    with performance_report(filename=filename, mode="inline"):
        yield


def hold_interrupts() -> Callable[[], None]:
    """After a first Ctrl-C: ignore further ones while the driver shuts down in order.
    Returns the function that restores the previous handler.

    A handler that does nothing, not ``SIG_IGN``: a Ctrl-C already caught at the C level
    but not yet handled would otherwise be reported as "ignored due to race condition"."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGINT, _ignore)
    return lambda: signal.signal(signal.SIGINT, previous)


def _ignore(signum, frame) -> None:
    pass


class TaskInterrupted(Exception):
    """A Ctrl-C that surfaced inside a task rather than in the driver.

    polars installs its own SIGINT handler and raises ``KeyboardInterrupt`` in whichever
    thread runs a query: on a thread worker that is a Dask executor thread, and a
    ``KeyboardInterrupt`` leaving a task stops the cluster's event loop (the driver then
    hangs, or fails with "IOLoop is closed"). :func:`interruptible` turns it into this
    ordinary task failure; :func:`task_result` turns it back into the interrupt."""


def interruptible(fn, *args):
    """Run a task's ``fn(*args)``; a Ctrl-C raised in it off the main thread becomes
    :class:`TaskInterrupted` (see there). Every task of a run is submitted through this."""
    try:
        return fn(*args)
    except KeyboardInterrupt:
        if threading.current_thread() is threading.main_thread():
            raise
        raise TaskInterrupted("interrupted") from None


def task_result(future):
    """A task's result in the driver; a failed task raises its own exception there, or
    ``KeyboardInterrupt`` if a Ctrl-C stopped it (:class:`TaskInterrupted`)."""
    if future.status == "error" and isinstance(future.exception(), TaskInterrupted):
        raise KeyboardInterrupt
    return future.result()


#: A worker's task states in which the task may still run (and write) later: queued on the
#: worker, fetching its inputs, running, or cancelled while it runs.
_LIVE_ON_WORKER = frozenset({"waiting", "ready", "constrained", "fetch", "flight", "executing",
                             "long-running", "cancelled", "resumed"})
#: The scheduler's states of a task that is not yet finished or forgotten.
_LIVE_ON_SCHEDULER = frozenset({"released", "waiting", "queued", "no-worker", "processing"})


def settle(client, token: str, timeout_s: float = 120.0) -> None:
    """After a failure or a Ctrl-C, with the run's futures cancelled: wait until no task
    whose key holds ``token`` can still run, on the scheduler or on any worker.

    A task that already runs cannot be stopped: it would write into the staging folder after
    the driver removed it. A task the worker has queued may start after the cancel was
    sent, since the cancel and this poll travel on different comms; so anything not yet
    finished counts, and the wait ends only on two empty polls in a row.
    """
    def on_workers(dask_worker):
        return [str(ts.key) for ts in dask_worker.state.tasks.values()
                if token in str(ts.key) and ts.state in _LIVE_ON_WORKER]

    def on_scheduler(dask_scheduler):
        return [str(key) for key, ts in dask_scheduler.tasks.items()
                if token in str(key) and ts.state in _LIVE_ON_SCHEDULER and ts.who_wants]

    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline and quiet < 2:
        try:
            busy = any(client.run(on_workers).values()) or bool(client.run_on_scheduler(on_scheduler))
        except Exception:  # workers or scheduler gone: nothing left running
            return
        quiet = 0 if busy else quiet + 1
        time.sleep(0.05 if busy else 0.1)
