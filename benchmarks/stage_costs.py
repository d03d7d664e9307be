"""Where the other layouts' time goes: ``--format esm2nv`` against ``--format
esm2nv,bionemo2,hf`` side by side, each stage's compute summed over the task stream,
with the bytes each configuration publishes and the disk's write rate measured in the
same run (issue 16's ``≤ 1.5 ×`` target).

    python -m benchmarks.stage_costs [--clusters 800000] [--repeats 2] [--small]

Wall time: the real command (``common.preprocess``), configurations taking turns.
Compute: one more run of each through the library on a LocalCluster of worker
processes (one thread each), so that a task's seconds are its own and not another
thread's wait for the GIL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import common
from .common import StudyClock, add_small, apply_small, cp_floor, dataset, preprocess

CONFIGS = {"esm2nv": "esm2nv", "all three": "esm2nv,bionemo2,hf"}


def write_rate(folder: Path, total: int = 1 << 30, block: int = 64 << 20) -> float:
    """MB/s of ``total`` bytes written in ``block``-sized writes into a new file on the
    disk the outputs go to (into the page cache, as the runs write), unlinked after."""
    path = folder / "write-rate.bin"
    data = os.urandom(block)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(total // block):
            f.write(data)
    seconds = time.perf_counter() - start
    path.unlink()
    return total / seconds / 1e6


def stage_compute(raw: Path, formats: str, workers: int) -> tuple[dict[str, float], float]:
    """Compute seconds per stage of one run (task stream of a process LocalCluster)."""
    from distributed import Client, LocalCluster, get_task_stream

    from esm2dask.config import ClusterConfig, PreprocessConfig
    from esm2dask.preprocess import preprocess as run
    from esm2dask.runner import stage_of_key

    out = Path(tempfile.mkdtemp(dir=raw.parent)) / "out"
    with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        config = PreprocessConfig.from_options(
            raw_dir=str(raw), output_dir=str(out), formats=formats,
            cluster=ClusterConfig(scheduler_address=cluster.scheduler_address))
        start = time.perf_counter()
        with Client(cluster) as client, get_task_stream(client) as stream:
            run(config)
        wall = time.perf_counter() - start
    shutil.rmtree(out.parent)
    compute: dict[str, float] = {}
    for task in stream.data:
        stage = stage_of_key(task["key"])
        for span in task["startstops"]:
            if span["action"] == "compute":
                compute[stage] = compute.get(stage, 0.0) + span["stop"] - span["start"]
    return compute, wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", type=int, default=800_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    add_small(ap, clusters=20_000, repeats=1)
    args = ap.parse_args(argv)
    clock, suffix = StudyClock(), apply_small(args)
    raw = dataset(args.clusters)
    load = [os.getloadavg()[0]]
    floor = cp_floor(raw)
    disk = write_rate(raw.parent)
    best: dict[str, object] = {}
    for _ in range(args.repeats):
        for label, formats in CONFIGS.items():
            run = preprocess(raw, label, "--format", formats, "--workers", str(args.workers))
            if label not in best or run.wall_s < best[label].wall_s:
                best[label] = run
            load.append(os.getloadavg()[0])
    compute = {label: stage_compute(raw, formats, args.workers) for label, formats in CONFIGS.items()}
    base, three = best["esm2nv"], best["all three"]

    stages = sorted(set(compute["esm2nv"][0]) | set(compute["all three"][0]),
                    key=lambda s: -(compute["all three"][0].get(s, 0.0)))
    rows = []
    for stage in stages:
        a, b = compute["esm2nv"][0].get(stage, 0.0), compute["all three"][0].get(stage, 0.0)
        rows.append((stage, a, b, b - a))
    total_a = sum(r[1] for r in rows)
    total_b = sum(r[2] for r in rows)
    command = (f"python -m benchmarks.stage_costs --clusters {args.clusters} --workers {args.workers} "
               f"--repeats {args.repeats}" + (" --small" if suffix else ""))
    lines = [
        "# Where the other layouts' time goes: `--format esm2nv` against `esm2nv,bionemo2,hf`", "",
        f"Reproduce: `{command}`", "",
        f"Machine: {os.cpu_count()} cores; measured {time.strftime('%Y-%m-%d %H:%M')}; 1-minute load "
        f"{min(load):.1f}–{max(load):.1f}. Input {base.input_mb:.0f} MB (`synth --clusters {args.clusters} --seed 1`), "
        f"{args.workers} workers.", "",
        "| configuration | wall s, fastest of " + str(args.repeats) + " | × esm2nv | published MB | "
        "published ÷ esm2nv's | written ÷ published | × cp -r |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in (base, three):
        lines.append(f"| {run.label} | {run.wall_s:.2f} | {run.wall_s / base.wall_s:.2f} | "
                     f"{run.output_bytes / 1e6:,.0f} | {run.output_bytes / base.output_bytes:.2f} | "
                     f"{run.write_chars / run.output_bytes:.2f} | {run.wall_s / floor:.1f} |")
    lines += [
        "", f"`cp -r` of the raw folder: {floor:.2f} s; the disk takes new bytes at {disk:,.0f} MB/s "
        f"(1 GiB in 64 MiB writes, page cache, this run): the bytes all three layouts publish beyond "
        f"esm2nv's take {(three.output_bytes - base.output_bytes) / 1e6 / disk:.1f} s of writing at that rate.", "",
        f"Compute seconds per stage (one more run of each, {args.workers} worker processes × 1 thread; "
        f"wall {compute['esm2nv'][1]:.1f} s and {compute['all three'][1]:.1f} s):", "",
        "| stage | esm2nv s | all three s | extra s |", "|---|---|---|---|",
    ]
    lines += [f"| {s} | {a:.2f} | {b:.2f} | {d:+.2f} |" for s, a, b, d in rows]
    lines += [f"| **total** | {total_a:.2f} | {total_b:.2f} | {total_b - total_a:+.2f} |", "", clock.line()]
    results = common.RESULTS  # looked up now: the smoke test points it elsewhere
    results.mkdir(parents=True, exist_ok=True)
    name = f"stage_costs{suffix}"
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    (results / f"{name}.json").write_text(json.dumps({
        "cp_s": floor, "disk_mb_per_s": disk, "load": load,
        "runs": {r.label: {"wall_s": r.wall_s, "output_bytes": r.output_bytes, "write_chars": r.write_chars}
                 for r in (base, three)},
        "compute": {label: c for label, (c, _) in compute.items()},
    }, indent=2) + "\n")
    top = [r for r in rows if r[3] > 0.05][:8][::-1]  # largest extra at the top
    plt, fig, ax = common._figure()
    ys = range(len(top))
    ax.barh([y + 0.2 for y in ys], [r[1] for r in top], height=0.4, label="esm2nv")
    ax.barh([y - 0.2 for y in ys], [r[2] for r in top], height=0.4, label="esm2nv,bionemo2,hf")
    ax.set_yticks(list(ys), [r[0] for r in top])
    common._finish(plt, fig, ax, name, "Compute per stage, where all three layouts add most",
                   "compute seconds (summed over the workers)", "stage", legend=True)
    print((results / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
