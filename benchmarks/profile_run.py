"""One profiled run of the chosen configuration: Dask's performance report (HTML, works
offline) and a screenshot of the dashboard's task stream taken with headless Chromium.

    python -m benchmarks.profile_run [--clusters 800000] [--workers 2] [--partition-size 64MiB] [--small]

Needs Debian's `chromium` for the screenshot (skipped with a message if it is missing).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import threading
import time

from pathlib import Path

from .common import RESULTS, StudyClock, add_small, apply_small, dataset


def screenshot(url: str, dest: Path, ready: threading.Event, timeout_s: float = 600.0) -> bool:
    """Open ``url`` in headless Chromium (driven over the DevTools protocol) now, and take
    the screenshot once ``ready`` is set. The task stream draws from a websocket and shows
    only what happens while the page is open, so the page must be open during the run."""
    import asyncio
    import base64
    import json
    import socket

    import aiohttp

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        print("chromium not found: no screenshot (apt-get install chromium)")
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    profile = tempfile.mkdtemp()
    proc = subprocess.Popen([
        browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1400,900", f"--remote-debugging-port={port}",
        "--remote-allow-origins=*", "about:blank",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def shoot():
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                        pages = [p for p in await r.json() if p["type"] == "page"]
                    if pages:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                async def call(i, method, **params):
                    await ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
                    async for msg in ws:
                        data = json.loads(msg.data)
                        if data.get("id") == i:
                            return data.get("result", {})

                await call(1, "Page.navigate", url=url)
                waited = 0.0
                while not ready.is_set() and waited < timeout_s:
                    await asyncio.sleep(0.2)
                    waited += 0.2
                await asyncio.sleep(2.0)  # the last updates reach the page
                shot = await call(2, "Page.captureScreenshot", format="png")
                dest.write_bytes(base64.b64decode(shot["data"]))

    try:
        asyncio.run(shoot())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
    return dest.exists()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clusters", type=int, default=800_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--partition-size", default="64MiB")
    add_small(ap, clusters=20_000, partition_size="4MiB")
    args = ap.parse_args(argv)
    clock, suffix = StudyClock(), apply_small(args)
    raw = dataset(args.clusters)

    from distributed import LocalCluster

    from esm2dask.config import ClusterConfig, PreprocessConfig
    from esm2dask.preprocess import preprocess
    from esm2dask.runner import stage_of_key

    RESULTS.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address="127.0.0.1:0")
    report = RESULTS / f"performance_report{suffix}.html"
    out = Path(tempfile.mkdtemp(dir=raw.parent)) / "out"
    config = PreprocessConfig.from_options(
        raw_dir=str(raw), output_dir=str(out), partition_size=args.partition_size,
        cluster=ClusterConfig(scheduler_address=cluster.scheduler_address, performance_report=str(report)),
    )
    from distributed import Client, get_task_stream

    finished = threading.Event()
    link = cluster.dashboard_link.replace("/status", "/individual-task-stream")
    shots = {}
    camera = threading.Thread(target=lambda: shots.update(
        ok=screenshot(link, RESULTS / f"dashboard_task_stream{suffix}.png", finished)))
    camera.start()
    time.sleep(3)  # the page is open before the first task
    with Client(cluster) as client, get_task_stream(client) as stream:
        r = preprocess(config)
    finished.set()
    camera.join()
    cluster.close()
    compute = {}
    for task in stream.data:
        stage = stage_of_key(task["key"])
        for ss in task["startstops"]:
            if ss["action"] == "compute":
                compute[stage] = compute.get(stage, 0.0) + ss["stop"] - ss["start"]
    total = sum(compute.values())
    lines = ["# Where the time goes", "",
             f"Reproduce: `python -m benchmarks.profile_run --clusters {args.clusters} --workers {args.workers} "
             f"--partition-size {args.partition_size}`", "",
             f"{r.input_bytes / 1e6:.0f} MB in {r.wall_seconds:.1f} s ({r.mb_per_s:.0f} MB/s), {args.workers} workers. "
             f"Compute time summed over the workers' task stream ({total:.1f} s):", "",
             "| stage | compute s | share |", "|---|---|---|"]
    for stage, seconds in sorted(compute.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {stage} | {seconds:.2f} | {seconds / total * 100:.0f} % |")
    lines += ["", clock.line()]
    (RESULTS / f"profile{suffix}.md").write_text("\n".join(lines) + "\n")
    shot = shots.get("ok", False)
    shutil.rmtree(out.parent, ignore_errors=True)
    print(f"{r.input_bytes / 1e6:.0f} MB in {r.wall_seconds:.1f} s ({r.mb_per_s:.0f} MB/s); "
          f"report {report}; screenshot {'saved' if shot else 'not taken'}")
    print((RESULTS / f"profile{suffix}.md").read_text())


if __name__ == "__main__":
    main()
