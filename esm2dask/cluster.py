"""Getting a Dask client: a LocalCluster on this node, or a running cluster."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .config import ClusterConfig
from .errors import ConfigError


@contextlib.contextmanager
def dask_client(config: ClusterConfig) -> Iterator:
    """A connected client; the LocalCluster, if one is started, closes on exit.

    Each worker runs polars on one thread per Dask thread: several processes with one
    thread each parse FASTA faster than one process with many (the GIL), and a polars
    pool per process sized to the whole machine would oversubscribe the cores.
    """
    import dask
    from distributed import Client, LocalCluster

    os.environ.setdefault("POLARS_MAX_THREADS", str(config.threads_per_worker))
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
                yield client
            finally:
                client.close()
            return
        cluster = LocalCluster(
            n_workers=config.workers,
            threads_per_worker=config.threads_per_worker,
            processes=True,
            memory_limit=config.memory_limit or "auto",
            dashboard_address=config.dashboard_address,
            env={"POLARS_MAX_THREADS": str(config.threads_per_worker)},
        )
        try:
            with Client(cluster) as client:
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
