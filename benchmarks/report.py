"""``esm2dask report`` against the ``preprocess`` run that made its tree, side by side.

    python -m benchmarks.report [--clusters 800000] [--workers 2] [--repeats 3] [--format esm2nv]
                                [--before DIR [--before-defaults]] [--name report] [--small]

Each repeat runs ``esm2dask preprocess`` (wall clock of the whole command) and then
``esm2dask report`` on its output (likewise), both as subprocesses with the same workers
and flags; then ``esm2dask preprocess --report``, where the report runs in the process
that made the tree (no second interpreter start, imports or exit): its share is the
report's own ``seconds`` against the rest of that command's wall clock, in one run.

The report runs with its own defaults (no dashboard), and once more with
``--dashboard-address :0`` (a dashboard, as preprocess has by default: its row shows what
the dashboard costs). ``--before DIR`` also runs the report of an earlier source tree
(``git archive REV | tar -x -C DIR``) on the same output, with the same interpreter and packages, in turn with
this one (the order alternates between repeats). Each command's CPU time (user + system,
of its process and the children it waited for) and the 1-minute load average when it
started are recorded: the machine is shared, and the CPU time tells a slow run from a
starved one. The table gives the fastest and the median run of each; the ratio target
is report ≤ 0.3 × preprocess. The current report's ``stage_seconds`` break its time
down; what is left of the wall clock (interpreter start, imports, exit) is 'outside'.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import common
from .common import ESM2DASK, StudyClock, add_small, apply_small, dataset, folder_bytes


@dataclass
class Timed:
    """One command: wall and CPU seconds, the load average when it started, its JSON."""

    wall_s: float
    cpu_s: float
    load: float
    out: dict = field(default_factory=dict)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], cwd: str | None = None, env: dict | None = None) -> Timed:
    load = os.getloadavg()[0]
    cpu = _children_cpu()
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return Timed(wall, _children_cpu() - cpu, load, json.loads(done.stdout))


def time_preprocess(raw: Path, workers: str, formats: str, *extra: str) -> tuple[Timed, Path]:
    """``esm2dask preprocess`` into a new folder beside the input, which is kept for the report."""
    out = Path(tempfile.mkdtemp(dir=raw.parent)) / "out"
    cmd = [*ESM2DASK, "preprocess", str(raw), "-o", str(out), "--plain", "--json", "--workers", workers,
           "--dashboard-address", ":0", "--format", formats, *extra]
    return timed(cmd), out


def time_report(out: Path, workers: str, layout: str | None, before: Path | None = None,
                dashboard: bool = False, before_defaults: bool = False) -> Timed:
    """``esm2dask report`` of this tree, or (``before``) of an earlier source tree; with its
    default cluster, or ``dashboard``: ``--dashboard-address :0``, which an earlier tree gets
    too (before 51e6f4e its default was a dashboard on port 8787, which two runs at once would
    share) unless ``before_defaults`` (an earlier tree whose default is no dashboard)."""
    cmd = [*ESM2DASK, "report", str(out.resolve()), "--json", "--plain", "--workers", workers]
    if dashboard or (before is not None and not before_defaults):
        cmd += ["--dashboard-address", ":0"]
    if layout:
        cmd += ["--layout", layout]
    if before is None:
        return timed(cmd)
    env = {**os.environ, "PYTHONPATH": str(before.resolve())}
    return timed(cmd, cwd=str(before.resolve()), env=env)


def _best(runs: list[Timed]) -> Timed:
    return min(runs, key=lambda r: r.wall_s)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _row(label: str, layout: str, mb: float, runs: list[Timed], pre: list[Timed]) -> tuple[str, dict]:
    best, pre_best = _best(runs), _best(pre)
    med, pre_med = _median([r.wall_s for r in runs]), _median([r.wall_s for r in pre])
    cpu, pre_cpu = _best(runs).cpu_s, _best(pre).cpu_s
    inside = best.out.get("seconds")
    line = (f"| {label} | {layout} | {mb:.0f} | {best.wall_s:.2f} | {med:.2f} | "
            f"{'–' if inside is None else f'{inside:.2f}'} | {cpu:.1f} | {best.wall_s / pre_best.wall_s:.2f} | "
            f"{med / pre_med:.2f} | {cpu / pre_cpu:.2f} | "
            f"{min(r.load for r in runs):.1f}–{max(r.load for r in runs):.1f} |")
    record = {"wall_s": [round(r.wall_s, 3) for r in runs], "cpu_s": [round(r.cpu_s, 3) for r in runs],
              "load": [round(r.load, 2) for r in runs], "best_wall_s": round(best.wall_s, 3),
              "median_wall_s": round(med, 3), "ratio_best": round(best.wall_s / pre_best.wall_s, 3),
              "ratio_median": round(med / pre_med, 3), "ratio_cpu": round(cpu / pre_cpu, 3)}
    if inside is not None:
        record["inside_s"] = inside
    if "stage_seconds" in best.out:
        record["stage_seconds"] = best.out["stage_seconds"]
    return line, record


def _breakdown(run: Timed) -> dict[str, float]:
    """Where the wall clock of one report run went: outside the library call, then its stages."""
    stages = dict(run.out.get("stage_seconds", {}))
    inside = run.out["seconds"]
    parts = {"outside (interpreter start, imports, exit)": round(run.wall_s - inside, 3)}
    parts.update(stages)
    rest = inside - sum(stages.values())
    if stages and rest > 0.0005:
        parts["html, json"] = round(rest, 3)
    return parts


#: Parts of the report drawn as their own segment; the others (plan, summary, cluster
#: close, html and json: hundredths of a second) are drawn together.
DRAWN = ("outside (interpreter start, imports, exit)", "cluster start", "report-stats", "report-join", "plots")
#: The ratio issue 19 asks for.
TARGET = 0.3


def plot(name: str, record: dict) -> None:
    """The fastest runs (``record``: what the study writes to NAME.json), one horizontal
    bar per command, its segments the parts of its wall clock; the target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = record["runs"]
    pre = runs["preprocess"]["best_wall_s"]
    bars = {"preprocess": {"whole command": pre}}
    for key, run in runs.items():
        if key.startswith("report before"):
            bars[f"report before ({record['before']})"] = {
                "outside (interpreter start, imports, exit)": run["best_wall_s"] - run["inside_s"],
                "inside (its own seconds)": run["inside_s"]}
            break
    parts = record["breakdown"]
    bars["report"] = {p: v for p, v in parts.items() if p in DRAWN}
    bars["report"]["the rest"] = sum(v for p, v in parts.items() if p not in DRAWN)
    fig, ax = plt.subplots(figsize=(8, 2.4 + 0.7 * len(bars)))
    colors = {"whole command": "#1f77b4", "outside (interpreter start, imports, exit)": "#ff7f0e",
              "inside (its own seconds)": "#2ca02c", "cluster start": "#d62728", "report-stats": "#9467bd",
              "report-join": "#8c564b", "plots": "#e377c2", "the rest": "#7f7f7f"}
    labels = list(bars)[::-1]
    drawn = set()
    for i, b in enumerate(labels):
        left = 0.0
        for part, width in bars[b].items():
            ax.barh(i, width, left=left, height=0.6, color=colors[part],
                    label=None if part in drawn else part)
            drawn.add(part)
            left += width
        ax.text(left, i, f" {left:.1f} s", va="center", fontsize=9,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ax.axvline(TARGET * pre, color="black", linestyle="--", linewidth=1,
               label=f"target: {TARGET} × preprocess ({TARGET * pre:.1f} s)")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("wall clock of the whole command (s)")
    ax.set_title(f"esm2dask report vs preprocess, {record['input_bytes'] / 1e6:.0f} MB input, "
                 f"{record['workers']} workers: fastest of {record['repeats']}", fontsize=10)
    ax.set_xlim(0, max(sum(v.values()) for v in bars.values()) * 1.12)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.45, -0.2), ncols=3, frameon=False)
    fig.tight_layout()
    fig.savefig(common.RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clusters", type=int, default=800_000)
    ap.add_argument("--workers", default="2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--format", default="esm2nv", help="--format of the preprocess run; the report reads each "
                                                       "layout of it in turn")
    ap.add_argument("--before", type=Path, help="an earlier source tree whose report runs beside this one")
    ap.add_argument("--before-defaults", action="store_true",
                    help="run the earlier tree with its own defaults (a tree from 51e6f4e on: no dashboard)")
    ap.add_argument("--name", default="report", help="results file name (benchmarks/results/NAME.md)")
    add_small(ap, clusters=20_000, repeats=1)
    args = ap.parse_args(argv)
    clock = StudyClock()
    suffix = apply_small(args)
    raw = dataset(args.clusters)
    layouts = [f.strip() for f in args.format.split(",")]
    pre: list[Timed] = []
    now: dict[str, list[Timed]] = {layout: [] for layout in layouts}
    before: dict[str, list[Timed]] = {layout: [] for layout in layouts}
    dashboard: dict[str, list[Timed]] = {layout: [] for layout in layouts}
    series = {"now": now, "before": before, "dashboard": dashboard}
    with_report: list[Timed] = []
    for repeat in range(args.repeats):
        run, out = time_preprocess(raw, args.workers, args.format)
        pre.append(run)
        print(f"preprocess {run.wall_s:.2f} s, {run.cpu_s:.1f} s CPU, load {run.load:.1f}", flush=True)
        for layout in layouts:
            order = ["now", "before", "dashboard"] if repeat % 2 == 0 else ["dashboard", "before", "now"]
            for which in order:
                if which == "before" and args.before is None:
                    continue
                run = time_report(out, args.workers, layout, args.before if which == "before" else None,
                                  dashboard=which == "dashboard", before_defaults=args.before_defaults)
                series[which][layout].append(run)
                print(f"report {which} {layout} {run.wall_s:.2f} s, {run.cpu_s:.1f} s CPU, load {run.load:.1f}",
                      flush=True)
        shutil.rmtree(out.parent)
        run, out = time_preprocess(raw, args.workers, args.format, "--report")
        with_report.append(run)
        inside = run.out["report"]["seconds"]
        print(f"preprocess --report {run.wall_s:.2f} s, of which the report {inside:.2f} s, load {run.load:.1f}",
              flush=True)
        shutil.rmtree(out.parent)
    name = f"{args.name}{suffix}"
    command = "python -m benchmarks.report " + " ".join(sys.argv[1:] if argv is None else argv)
    input_mb = folder_bytes(raw) / 1e6
    lines = [
        "# `esm2dask report` against `preprocess`, side by side", "",
        f"Reproduce: `{command.strip()}`", "",
        f"Machine: {os.cpu_count()} vCPUs, shared with other sessions; measured {time.strftime('%Y-%m-%d %H:%M')}. "
        f"Input {input_mb:.0f} MB (`synth --clusters {args.clusters} --seed 1`), {args.workers} workers (threads), "
        f"`--format {args.format}`; preprocess with `--dashboard-address :0` (a dashboard, as by default, on "
        f"any free port), the report with its defaults (no dashboard), and again with `--dashboard-address :0`"
        f"{'; the earlier report with its own defaults (no dashboard)' if args.before and args.before_defaults else ', as the earlier report (whose default was a dashboard)' if args.before else ''}; {args.repeats} "
        f"repeat(s), each a preprocess run and then the report(s) of its tree. Wall clock of the whole command "
        f"(interpreter and LocalCluster start included); 'inside': the report's own `seconds` (up to the plots drawn); CPU: user + system "
        f"seconds of the fastest run; load: the 1-minute load average when each run started.", "",
        "| command | layout read | bytes read MB | wall s, best | wall s, median | inside s | CPU s | "
        "× preprocess, best | × preprocess, median | × preprocess, CPU | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pre_line, pre_record = _row("preprocess", "–", input_mb, pre, pre)
    lines.append(pre_line)
    records = {"preprocess": pre_record}
    for layout in layouts:
        mb = now[layout][0].out["bytes_read"] / 1e6
        line, records[f"report {layout}"] = _row("report", layout, mb, now[layout], pre)
        lines.append(line)
        line, records[f"report dashboard {layout}"] = _row("report --dashboard-address :0", layout, mb,
                                                           dashboard[layout], pre)
        lines.append(line)
        if before[layout]:
            line, records[f"report before {layout}"] = _row(f"report before ({args.before.name})", layout, mb,
                                                            before[layout], pre)
            lines.append(line)
    shares = [r.out["report"]["seconds"] / (r.wall_s - r.out["report"]["seconds"]) for r in with_report]
    fastest = _best(with_report)
    inside = fastest.out["report"]["seconds"]
    lines += ["", f"`preprocess --report` ({layouts[0]}, the first layout present), the report in the same "
                  f"process: fastest run {fastest.wall_s:.2f} s, of which the report {inside:.2f} s "
                  f"({inside / (fastest.wall_s - inside):.2f} × the rest of that run); median of the "
                  f"{len(shares)} run(s): {_median(shares):.2f} ×; load {min(r.load for r in with_report):.1f}–"
                  f"{max(r.load for r in with_report):.1f}."]
    records["preprocess --report"] = {
        "wall_s": [round(r.wall_s, 3) for r in with_report],
        "report_s": [r.out["report"]["seconds"] for r in with_report],
        "share": [round(x, 3) for x in shares], "load": [round(r.load, 2) for r in with_report],
        "stage_seconds": fastest.out["report"]["stage_seconds"]}
    first = _best(now[layouts[0]])
    parts = _breakdown(first)
    lines += ["", f"Where the fastest `report` ({layouts[0]}) spent its {first.wall_s:.2f} s:", "",
              "| part | s | share |", "|---|---|---|"]
    lines += [f"| {p} | {v:.2f} | {v / first.wall_s * 100:.0f} % |" for p, v in parts.items()]
    lines += ["", "What the report found: " + first.out["headline"], "", clock.line()]
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    record = {"command": command.strip(), "input_bytes": folder_bytes(raw), "workers": args.workers,
              "repeats": args.repeats, "before": args.before.name if args.before else None,
              "runs": records, "breakdown": parts}
    (common.RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(name, record)


if __name__ == "__main__":
    main()
