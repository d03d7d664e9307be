"""The cluster options every cluster command takes (``preprocess``, ``report``), as one
:class:`esm2dask.config.ClusterConfig`."""

from __future__ import annotations


def cluster_config(workers, threads_per_worker, processes, memory_limit, scheduler_address, scheduler_file,
                   scheduler_timeout, dashboard_address, performance_report=None):
    """The cluster options every cluster command takes, as one :class:`ClusterConfig`."""
    from esm2dask.config import ClusterConfig
    from esm2dask.storage import cpu_count

    return ClusterConfig(
        workers=cpu_count() if workers is None else workers,
        threads_per_worker=threads_per_worker,
        processes=processes,
        memory_limit=memory_limit,
        scheduler_address=scheduler_address,
        scheduler_file=scheduler_file,
        scheduler_timeout_s=scheduler_timeout,
        dashboard_address=None if dashboard_address.lower() in ("none", "") else dashboard_address,
        performance_report=performance_report,
    )
