"""Every worker's thread pools are limited to its Dask threads, however it was started:
a LocalCluster, `dask worker --preload esm2dask.workerenv`, or a plain `dask worker`
that the driver's plugin reaches before polars starts. And nothing goes to /dev/shm."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esm2dask.cluster import dask_client
from esm2dask.config import ClusterConfig

DASK = str(Path(sys.executable).parent / "dask")

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to tell a limit of 1")


def _pools():
    """Run on a worker (pickled by value: external workers cannot import this module)."""

    def pools():
        import os

        import polars as pl

        return pl.thread_pool_size(), os.environ.get("NUMBA_NUM_THREADS"), os.environ.get("OMP_NUM_THREADS")

    return pools


def test_local_cluster_workers_are_limited():
    with dask_client(ClusterConfig(workers=1, threads_per_worker=1, processes=True, dashboard_address=":0")) as client:
        assert set(client.run(_pools()).values()) == {(1, "1", "1")}


def test_workers_started_by_hand_are_limited(tmp_path):
    sched_file = tmp_path / "scheduler.json"
    env = {k: v for k, v in os.environ.items() if k not in ("POLARS_MAX_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
    env["DASK_LOGGING__DISTRIBUTED"] = "error"
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                               "--scheduler-file", str(sched_file)], **quiet)]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        worker = [DASK, "worker", "--scheduler-file", str(sched_file), "--nthreads", "1", "--host", "127.0.0.1"]
        procs.append(subprocess.Popen([*worker, "--preload", "esm2dask.workerenv", "--name", "preloaded"], **quiet))
        procs.append(subprocess.Popen([*worker, "--name", "plain"], **quiet))
        with dask_client(ClusterConfig(scheduler_file=str(sched_file))) as client:
            client.wait_for_workers(2, timeout=120)
            pools = client.run(_pools())
        assert sorted(pools.values()) == [(1, "1", "1"), (1, "1", "1")]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_nothing_is_written_to_dev_shm(synth_raw, tmp_path, cluster_config):
    """A container's 64 MiB /dev/shm is smaller than a partition: the run must not use it."""
    from conftest import run_preprocess

    package = Path(__file__).resolve().parents[1] / "esm2dask"
    assert not [p.name for p in package.glob("*.py") if "/dev/shm" in p.read_text()]
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    before = set(os.listdir("/dev/shm"))
    # every stage of a run, in many byte ranges (7 shards: the shard count changes no stage)
    run_preprocess(synth_raw, tmp_path / "out", cluster_config, partition_size="64KB", num_csv_files=7)
    # multiprocessing's 32-byte semaphores (sem.*) come and go with any Python process here
    assert {f for f in set(os.listdir("/dev/shm")) - before if not f.startswith("sem.")} == set()
