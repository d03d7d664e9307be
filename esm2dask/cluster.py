"""Getting a Dask client: a LocalCluster on this node, or a running cluster."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .config import ClusterConfig
from .errors import ConfigError


@contextlib.contextmanager
def dask_client(config: ClusterConfig) -> Iterator:
    """A connected client; the LocalCluster, if one is started, closes on exit.

    Every worker's thread pools (polars, Arrow, numba, BLAS) are limited to its Dask
    threads (:mod:`esm2dask.workerenv`), whoever started the worker.
    """
    import dask
    from distributed import Client, LocalCluster

    from .workerenv import ThreadLimits, thread_environment

    with dask.config.set({"distributed.worker.daemon": False}):
        if config.scheduler_address or config.scheduler_file:
            try:
                client = Client(
                    address=config.scheduler_address,
                    scheduler_file=config.scheduler_file,
                    timeout="30s",
                )
            except (OSError, TimeoutError, ValueError) as err:
                where = config.scheduler_address or config.scheduler_file
                raise ConfigError(f"cannot connect to the Dask scheduler at {where}: {err}") from None
            try:
                client.register_plugin(ThreadLimits())
                yield client
            finally:
                client.close()
            return
        cluster = LocalCluster(
            n_workers=config.workers,
            threads_per_worker=config.threads_per_worker,
            processes=config.processes,
            memory_limit=config.memory_limit or "auto",
            dashboard_address=config.dashboard_address,
            # worker processes take the limits from their environment; threads share this
            # process's pools, which are sized to the machine
            **({"env": thread_environment(config.threads_per_worker)} if config.processes else {}),
        )
        try:
            with Client(cluster) as client:
                if config.processes:
                    client.register_plugin(ThreadLimits())
                yield client
        finally:
            cluster.close()


def dashboard_link(client) -> str | None:
    try:
        return client.dashboard_link
    except Exception:  # pragma: no cover - no dashboard (bokeh missing, disabled)
        return None


@contextlib.contextmanager
def maybe_performance_report(filename: str | None):
    """Dask's HTML performance report around the run, self-contained (works offline)."""
    if not filename:
        yield
        return
    from distributed import performance_report

    with performance_report(filename=filename, mode="inline"):
        yield
