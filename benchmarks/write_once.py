"""Passes over the data, before and after, side by side in one run: how many times each
input byte is read and each published byte is written, by system calls (Linux ``rchar`` /
``wchar`` of every process of the run, ``copy_file_range`` included), and the wall time.

"Before" is an earlier revision of esm2dask checked out in a temporary git worktree
(``--baseline``, default: the revision before the one-parse / write-once work); "after" is
this checkout. Both run the same command on the same cached input, round-robin.

    python -m benchmarks.write_once --clusters 800000 --repeats 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import RESULTS, StudyClock, bars, cp_floor, dataset, folder_bytes, preprocess, write_table

REPO = Path(__file__).resolve().parents[1]
#: the last revision that wrote pieces and assembled every shard, and derived the other
#: layouts from the staged CSV tree
BASELINE = "e601360"
#: (label, --format, --partition-size or None for the study's): 8 MiB ranges give each shard
#: of this set about as many pieces as 64 MiB ranges give a shard of the 49 GB release
FORMATS = (("esm2nv", "esm2nv", None), ("esm2nv, 8 MiB ranges", "esm2nv", "8MiB"),
           ("all three", "esm2nv,bionemo2,hf", None), ("bionemo2 alone", "bionemo2", None))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clusters", type=int, default=800_000)
    ap.add_argument("--workers", default="2")
    ap.add_argument("--partition-size", default="64MiB")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--name", default="write_once", help="results/<name>.{md,json,png}")
    args = ap.parse_args(argv)
    clock = StudyClock()
    raw = dataset(args.clusters)
    floor = cp_floor(raw)
    input_bytes = folder_bytes(raw)
    with tempfile.TemporaryDirectory(prefix="esm2dask-baseline-") as tmp:
        base = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.baseline],
                       check=True, capture_output=True)
        try:
            fastest = {}
            for _ in range(args.repeats):
                for who, code in (("before", base), ("after", None)):
                    for label, fmt, partition in FORMATS:
                        run = preprocess(raw, f"{label}, {who}", "--workers", args.workers, "--partition-size",
                                         partition or args.partition_size, "--format", fmt, code=code)
                        run.vs_cp = round(run.wall_s / floor, 1)
                        print(run.label, run.wall_s, run.read_chars, run.write_chars, run.output_bytes, flush=True)
                        if run.label not in fastest or run.wall_s < fastest[run.label].wall_s:
                            fastest[run.label] = run
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
    runs = [fastest[f"{label}, {who}"] for label, _, _ in FORMATS for who in ("before", "after")]
    lines = [
        f"Input {input_bytes / 1e6:.0f} MB (`synth --clusters {args.clusters} --seed 1`, FASTAs in mapping order); "
        f"`cp -r` {floor:.2f} s in the same run. {args.workers} workers (the default: threads of one process), "
        f"{args.partition_size} partitions; the fastest of {args.repeats} runs of each, round-robin. Before: "
        f"`{args.baseline}`; after: this checkout. Published bytes: the tree and the inputs copied beside it "
        "(on ext4, a copy).",
        "",
        "| configuration | wall s | × cp -r | read ÷ input bytes | written ÷ published bytes | published MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r.label} | {r.wall_s} | {r.vs_cp} | {r.read_chars / input_bytes:.2f} | "
                     f"{r.write_chars / max(1, r.output_bytes):.2f} | {r.output_bytes / 1e6:,.0f} |")
    by = {r.label: r for r in runs}
    for who in ("before", "after"):
        ratio = by[f"all three, {who}"].wall_s / by[f"esm2nv, {who}"].wall_s
        lines.append(f"\n`--format esm2nv,bionemo2,hf` ÷ `--format esm2nv`, {who}: {ratio:.2f} ×.")
    command = "python -m benchmarks.write_once " + " ".join(sys.argv[1:] if argv is None else argv)
    write_table(args.name, "Passes over the data: bytes read and written, before and after", command.strip(),
                runs, "\n".join(lines), clock)
    bars(args.name, "Bytes written per byte published", [label for label, _, _ in FORMATS],
         {who: [by[f"{label}, {who}"].write_chars / max(1, by[f"{label}, {who}"].output_bytes)
                for label, _, _ in FORMATS] for who in ("before", "after")},
         "configuration (--format, --partition-size)", "bytes written ÷ bytes published")
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
