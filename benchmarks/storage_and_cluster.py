"""A ~100 MB run three ways: local → local on a LocalCluster, s3 → s3 through moto's S3
server on 127.0.0.1, and local → local on an external `dask scheduler` + `dask worker`s.

    python -m benchmarks.storage_and_cluster [--clusters 65000] [--workers 2] [--small]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import RESULTS, StudyClock, add_small, apply_small, bars, dataset, folder_bytes

BIN = Path(sys.executable).parent


def _timed(label, raw, out, cluster, **kwargs):
    from esm2dask.config import PreprocessConfig
    from esm2dask.preprocess import preprocess

    start = time.perf_counter()
    preprocess(PreprocessConfig.from_options(raw_dir=raw, output_dir=out, cluster=cluster, **kwargs))
    wall = time.perf_counter() - start
    print(f"{label}: {wall:.2f} s")
    return label, wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clusters", type=int, default=65_000)
    ap.add_argument("--workers", type=int, default=2)
    add_small(ap, clusters=20_000)
    args = ap.parse_args(argv)
    clock, suffix = StudyClock(), apply_small(args)
    import boto3
    import s3fs
    from distributed import Client

    from esm2dask.config import ClusterConfig

    raw = dataset(args.clusters)
    mb = folder_bytes(raw) / 1e6
    work = Path(tempfile.mkdtemp(dir=raw.parent))
    local = ClusterConfig(workers=args.workers, dashboard_address=None)
    rows = [_timed(f"local → local, LocalCluster({args.workers})", str(raw), str(work / "o1"), local)]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    so = {"key": "bench", "secret": "bench", "endpoint_url": f"http://127.0.0.1:{port}"}
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=so["endpoint_url"], aws_access_key_id="bench",
                     aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket="esm2dask-bench")
        s3fs.S3FileSystem(**so).put(str(raw) + "/", "esm2dask-bench/raw/", recursive=True)
        rows.append(_timed(f"s3 → s3 (moto), LocalCluster({args.workers})", "s3://esm2dask-bench/raw",
                           "s3://esm2dask-bench/out", local, storage_options=so))
    finally:
        moto.terminate()

    sched = work / "scheduler.json"
    env = {**os.environ, "DASK_LOGGING__DISTRIBUTED": "error"}
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--dashboard-address", ":0", "--scheduler-file", str(sched)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        while not sched.exists():
            time.sleep(0.2)
        for _ in range(args.workers):
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", "--scheduler-file", str(sched),
                                           "--nthreads", "1"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(scheduler_file=str(sched)) as client:
            client.wait_for_workers(args.workers, timeout=120)
        rows.append(_timed(f"local → local, external `dask scheduler` + {args.workers} `dask worker`",
                           str(raw), str(work / "o3"), ClusterConfig(scheduler_file=str(sched))))
    finally:
        for p in procs:
            p.terminate()
    shutil.rmtree(work, ignore_errors=True)
    command = "python -m benchmarks.storage_and_cluster " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["# Storage and cluster", "", f"Reproduce: `{command.strip()}`", "",
             f"Input {mb:.0f} MB (`synth --clusters {args.clusters} --seed 1`). Wall time of the library call; "
             "a LocalCluster's start-up is included, the external cluster was started beforehand.", "",
             "| configuration | wall s | MB/s |", "|---|---|---|"]
    lines += [f"| {label} | {wall:.2f} | {mb / wall:.0f} |" for label, wall in rows]
    lines += ["", clock.line()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"storage_and_cluster{suffix}.md").write_text("\n".join(lines) + "\n")
    short = ["local, LocalCluster", "S3 (moto), LocalCluster", "local, external cluster"]
    bars(f"storage_and_cluster{suffix}", f"{mb:.0f} MB: storage and cluster", short[:len(rows)],
         {"MB/s": [mb / wall for _, wall in rows]}, "input/output and cluster", "MB/s of input")


if __name__ == "__main__":
    main()
