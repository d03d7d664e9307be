"""Thread limits for a Dask worker: each library's pool as large as the worker's threads.

A worker process with T Dask threads runs at most T tasks at once; polars, Arrow, numba
and BLAS would each start a pool as large as the machine on first use, so 64 single-thread
workers on a 64-core node would run 64 × 64 threads. Limits must be set before those
libraries start their pools, so they are applied three ways:

- a LocalCluster started by esm2dask passes them as environment variables;
- ``dask worker … --preload esm2dask.workerenv`` applies them in a worker started by hand
  (the NGC pipeline's replicas do this);
- the driver registers :class:`ThreadLimits` on every cluster it uses, which applies them
  to a worker that has not loaded polars yet and warns once about one that has.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("esm2dask")

#: Environment variables that size the thread pools of the libraries a task may load.
THREAD_VARIABLES = (
    "POLARS_MAX_THREADS",
    "NUMBA_NUM_THREADS",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ARROW_NUM_THREADS",
)


def thread_environment(threads: int) -> dict[str, str]:
    """The variables that limit every pool to ``threads``."""
    return {name: str(threads) for name in THREAD_VARIABLES}


def apply_limits(threads: int) -> list[str]:
    """Limit this process's pools to ``threads``; returns the pools already too large."""
    os.environ.update(thread_environment(threads))
    too_late = []
    if "polars" in sys.modules:
        import polars as pl

        if pl.thread_pool_size() > threads:
            too_late.append(f"polars ({pl.thread_pool_size()} threads)")
    if "pyarrow" in sys.modules:
        import pyarrow as pa

        pa.set_cpu_count(threads)
        pa.set_io_thread_count(max(threads, 1))
    return too_late


def dask_setup(worker) -> None:
    """``dask worker --preload esm2dask.workerenv``: runs before the worker takes tasks."""
    apply_limits(worker.state.nthreads)


try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    WorkerPlugin = object


class ThreadLimits(WorkerPlugin):
    """Registered by the driver on every cluster (see the module doc)."""

    name = "esm2dask-thread-limits"

    def setup(self, worker) -> None:
        too_late = apply_limits(worker.state.nthreads)
        if too_late:
            log.warning(
                "worker %s: %s started before esm2dask could limit it to %d; start workers "
                "with --preload esm2dask.workerenv", worker.address, ", ".join(too_late),
                worker.state.nthreads,
            )
