"""``esm2dask report`` against the ``preprocess`` run that made its tree, side by side.

    python -m benchmarks.report [--clusters 800000] [--workers 2] [--repeats 2] [--format esm2nv] [--small]

Each repeat runs ``esm2dask preprocess`` (wall clock of the whole command) and then
``esm2dask report`` on its output (likewise), both as subprocesses with the same workers;
the fastest of each is reported, with the ratio (the target: report ≤ 0.3 × preprocess).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ESM2DASK, RESULTS, StudyClock, add_small, apply_small, dataset, folder_bytes


def time_preprocess(raw: Path, workers: str, formats: str) -> tuple[float, Path]:
    """``esm2dask preprocess`` into a new folder beside the input, which is kept for the report."""
    out = Path(tempfile.mkdtemp(dir=raw.parent)) / "out"
    cmd = [*ESM2DASK, "preprocess", str(raw), "-o", str(out), "--plain", "--json", "--workers", workers,
           "--dashboard-address", ":0", "--format", formats]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return wall, out


def time_report(out: Path, workers: str, layout: str | None) -> tuple[float, dict]:
    cmd = [*ESM2DASK, "report", str(out), "--json", "--plain", "--workers", workers, "--dashboard-address", ":0"]
    if layout:
        cmd += ["--layout", layout]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clusters", type=int, default=800_000)
    ap.add_argument("--workers", default="2")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--format", default="esm2nv", help="--format of the preprocess run; the report reads each "
                                                       "layout of it in turn")
    ap.add_argument("--name", default="report", help="results file name (benchmarks/results/NAME.md)")
    add_small(ap, clusters=20_000, repeats=1)
    args = ap.parse_args(argv)
    clock = StudyClock()
    suffix = apply_small(args)
    raw = dataset(args.clusters)
    layouts = [f.strip() for f in args.format.split(",")]
    best_pre, best_report, reports = None, {}, {}
    for _ in range(args.repeats):
        wall, out = time_preprocess(raw, args.workers, args.format)
        print("preprocess", round(wall, 2), flush=True)
        best_pre = wall if best_pre is None else min(best_pre, wall)
        for layout in layouts:
            wall, report = time_report(out, args.workers, layout)
            print(layout, round(wall, 2), report["seconds"], flush=True)
            if layout not in best_report or wall < best_report[layout][0]:
                best_report[layout] = (wall, report["seconds"])
                reports[layout] = report
        shutil.rmtree(out.parent)
    name = f"{args.name}{suffix}"
    command = "python -m benchmarks.report " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# `esm2dask report` against `preprocess`, side by side", "",
        f"Reproduce: `{command.strip()}`", "",
        f"Machine: 2 vCPUs, shared; measured {time.strftime('%Y-%m-%d %H:%M')}. Input {folder_bytes(raw) / 1e6:.0f} MB "
        f"(`synth --clusters {args.clusters} --seed 1`), {args.workers} workers (threads), `--format {args.format}`; "
        f"the fastest of {args.repeats} run(s) of each, one after the other on the same tree. Wall clock of the "
        f"whole command (interpreter and LocalCluster start included); 'inside' is the report's own time "
        f"(cluster up to report folder in place).", "",
        "| command | layout read | bytes read MB | wall s | inside s | × preprocess |",
        "|---|---|---|---|---|---|",
        f"| preprocess | – | {folder_bytes(raw) / 1e6:.0f} | {best_pre:.2f} | – | 1.00 |",
    ]
    for layout, (wall, inside) in best_report.items():
        r = reports[layout]
        lines.append(f"| report | {layout} | {r['bytes_read'] / 1e6:.0f} | {wall:.2f} | {inside:.2f} | "
                     f"{wall / best_pre:.2f} |")
    first = reports[layouts[0]]
    lines += ["", "What the report found: " + first["headline"], "", clock.line()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({
        "command": command.strip(), "input_bytes": folder_bytes(raw), "workers": args.workers,
        "preprocess_wall_s": best_pre,
        "report": {k: {"wall_s": round(w, 3), "inside_s": i, "ratio": round(w / best_pre, 3),
                       "bytes_read": reports[k]["bytes_read"]} for k, (w, i) in best_report.items()},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
