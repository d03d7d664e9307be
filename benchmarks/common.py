"""Shared pieces of the benchmark studies: cached seeded inputs, a measured run of the
real command in its own process tree, the ``cp -r`` floor, tables and plots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = Path(os.environ.get("ESM2DASK_BENCH_CACHE", HERE / ".cache"))
ESM2DASK = [sys.executable, "-m", "cli"]


def dataset(clusters: int, seed: int = 1, unsorted: bool = False) -> Path:
    """A cached ``synth`` raw folder (generated on first use)."""
    name = f"synth-{clusters}-{seed}{'-unsorted' if unsorted else ''}"
    raw = CACHE / name / "raw"
    if not (raw / "README.md").exists():
        shutil.rmtree(raw, ignore_errors=True)
        cmd = [*ESM2DASK, "synth", str(raw), "--clusters", str(clusters), "--seed", str(seed)]
        subprocess.run(cmd + (["--unsorted"] if unsorted else []), check=True)
    return raw


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Run:
    label: str
    wall_s: float
    input_mb: float
    mb_per_s: float
    tasks: int
    driver_peak_mb: float
    worker_peak_mb: float
    vs_cp: float = 0.0
    digest: str = ""
    #: from the run's manifest: seconds per stage, and the other layouts' rows and bytes
    stage_seconds: dict = field(default_factory=dict)
    layouts: dict = field(default_factory=dict)
    #: bytes the run's processes read and wrote through system calls (Linux rchar/wchar,
    #: copy_file_range included), and the bytes of the published output
    read_chars: int = 0
    write_chars: int = 0
    output_bytes: int = 0


class _RssSampler(threading.Thread):
    """Samples the RSS of a process and its children every 20 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak: dict[int, float] = {}
        self.io: dict[int, tuple[int, int]] = {}  # pid -> (read_chars, write_chars), the last seen
        self.stop = threading.Event()

    def run(self):
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    rss = p.memory_info().rss / 2**20
                    io = p.io_counters()
                except psutil.Error:
                    continue
                self.peak[p.pid] = max(self.peak.get(p.pid, 0.0), rss)
                self.io[p.pid] = (io.read_chars, io.write_chars)
            time.sleep(0.02)


def cp_floor(raw: Path, repeats: int = 3) -> float:
    """Median wall time of ``cp -r RAW`` on the same disk."""
    times = []
    for _ in range(repeats):
        dest = Path(tempfile.mkdtemp(dir=raw.parent.parent)) / "copy"
        start = time.perf_counter()
        subprocess.run(["cp", "-r", str(raw), str(dest)], check=True)
        times.append(time.perf_counter() - start)
        shutil.rmtree(dest.parent)
    return sorted(times)[len(times) // 2]


def preprocess(raw: Path, label: str, *args: str, code: Path | None = None) -> Run:
    """Run ``esm2dask preprocess`` as a subprocess; wall time, RSS, bytes read and written,
    tasks, output digest. ``code``: a checkout of another revision to run instead (its
    ``cli`` and ``esm2dask`` first on the path), for before/after in one study."""
    out = Path(tempfile.mkdtemp(dir=raw.parent)) / "out"
    report = out.parent / "report.json"
    cmd = [*ESM2DASK, "preprocess", str(raw), "-o", str(out), "--plain", "--json", "--dashboard-address", ":0",
           *args]
    env = None if code is None else {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=None if code is None else str(code))
    sampler = _RssSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    manifest = json.loads((out / "esm2dask-manifest.json").read_text())
    tasks = json.loads(stdout)["tasks"]
    digest = subprocess.run(
        f"cd {out} && find uf50 uf90 -type f | sort | xargs md5sum | md5sum",
        shell=True, capture_output=True, text=True,
    ).stdout.split()[0]
    driver = sampler.peak.pop(proc.pid, 0.0)
    worker = max(sampler.peak.values(), default=0.0)
    input_mb = manifest["input_bytes"] / 1e6
    # the tree and the inputs copied beside it: every byte the run publishes
    output = sum(f["bytes"] for key in ("files", "copied_inputs") for f in (manifest.get(key) or {}).values())
    read_chars = sum(r for r, _ in sampler.io.values())
    write_chars = sum(w for _, w in sampler.io.values())
    shutil.rmtree(out.parent)
    del report
    return Run(label, round(wall, 2), round(input_mb, 1), round(input_mb / wall, 1), tasks,
               round(driver, 1), round(worker, 1), digest=digest,
               stage_seconds=manifest.get("stage_seconds", {}), layouts=manifest.get("layouts", {}),
               read_chars=read_chars, write_chars=write_chars, output_bytes=output)


def add_small(ap, **presets) -> None:
    """``--small``: the study at a size that runs in a few minutes on 2 cores, its results
    written as ``<name>-small.*`` beside (never over) the full study's."""
    ap.add_argument("--small", action="store_true",
                    help="a few minutes on 2 cores: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in presets.items()))
    ap.set_defaults(_small_presets=presets)


def apply_small(args) -> str:
    """Apply the ``--small`` presets; returns the suffix of the results' names."""
    if not getattr(args, "small", False):
        return ""
    for key, value in args._small_presets.items():
        setattr(args, key, value)
    return "-small"


class StudyClock:
    """The wall time of a whole study, recorded in its results file."""

    def __init__(self):
        self.start = time.perf_counter()

    def line(self) -> str:
        return f"Study run time: {time.perf_counter() - self.start:.0f} s (generating any input not cached yet included)."


def write_table(name: str, title: str, command: str, runs: list[Run], notes: str = "",
                clock: StudyClock | None = None) -> Path:
    cols = ["label", "wall_s", "mb_per_s", "vs_cp", "tasks", "driver_peak_mb", "worker_peak_mb"]
    head = ["configuration", "wall s", "MB/s of input", "× cp -r", "tasks", "driver peak RSS MB", "worker peak RSS MB"]
    lines = [f"# {title}", "", f"Reproduce: `{command}`", "",
             f"Machine: {os.cpu_count()} cores; measured {time.strftime('%Y-%m-%d %H:%M')}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        d = asdict(r)
        lines.append("| " + " | ".join(str(d[c]) for c in cols) + " |")
    if notes:
        lines += ["", notes]
    if clock:
        lines += ["", clock.line()]
    path = RESULTS / f"{name}.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    return path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(7, 4))


def _finish(plt, fig, ax, name: str, title: str, xlabel: str, ylabel: str, legend: bool) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if legend:
        ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)


def plot(name: str, title: str, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, logx=False, hline=None):
    """Lines over a numeric x axis; a legend when there is more than one series."""
    plt, fig, ax = _figure()
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if hline:
        ax.axhline(hline[0], color="grey", linestyle="--", label=hline[1])
    if logx:
        ax.set_xscale("log", base=2)
    _finish(plt, fig, ax, name, title, xlabel, ylabel, legend=len(series) + bool(hline) > 1)


def bars(name: str, title: str, categories: list[str], series: dict[str, list[float]], xlabel: str, ylabel: str):
    """Grouped bars for categorical studies (engines, input order, …), each bar labelled
    with its value; a legend when there is more than one series."""
    plt, fig, ax = _figure()
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(categories))]
        drawn = ax.bar(xs, values, width=width, label=label)
        ax.bar_label(drawn, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(categories)), categories)
    _finish(plt, fig, ax, name, title, xlabel, ylabel, legend=len(series) > 1)
