"""One profiled run of the chosen configuration: Dask's performance report (HTML, works
offline) and a screenshot of the dashboard's task stream taken with headless Chromium.

    python -m benchmarks.profile_run [--clusters 800000] [--workers 2] [--partition-size 16MiB]

Needs Debian's `chromium` for the screenshot (skipped with a message if it is missing).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import threading

from pathlib import Path

from .common import RESULTS, dataset


def screenshot(url: str, dest: Path) -> bool:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        print("chromium not found: no screenshot (apt-get install chromium)")
        return False
    profile = tempfile.mkdtemp()
    subprocess.run([
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=4000",
        f"--screenshot={dest}", url,
    ], check=False, capture_output=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    return dest.exists()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clusters", type=int, default=800_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--partition-size", default="16MiB")
    args = ap.parse_args(argv)
    raw = dataset(args.clusters)

    from distributed import LocalCluster

    from esm2dask.config import ClusterConfig, PreprocessConfig
    from esm2dask.preprocess import preprocess

    RESULTS.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address="127.0.0.1:0")
    report = RESULTS / "performance_report.html"
    out = Path(tempfile.mkdtemp(dir=raw.parent)) / "out"
    config = PreprocessConfig.from_options(
        raw_dir=str(raw), output_dir=str(out), partition_size=args.partition_size,
        cluster=ClusterConfig(scheduler_address=cluster.scheduler_address, performance_report=str(report)),
    )
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=preprocess(config)))
    thread.start()
    thread.join()
    # the task stream of the finished run stays on the dashboard until the cluster closes
    link = cluster.dashboard_link.replace("/status", "/individual-task-stream")
    shot = screenshot(link, RESULTS / "dashboard_task_stream.png")
    cluster.close()
    shutil.rmtree(out.parent, ignore_errors=True)
    r = result["r"]
    print(f"{r.input_bytes / 1e6:.0f} MB in {r.wall_seconds:.1f} s ({r.mb_per_s:.0f} MB/s); "
          f"report {report}; screenshot {'saved' if shot else 'not taken'}")
    for stage, seconds in sorted(r.stage_seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {stage:<22} {seconds:6.2f} s")


if __name__ == "__main__":
    main()
