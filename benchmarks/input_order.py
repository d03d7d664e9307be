"""Input order: the released layout (FASTAs already in mapping order, fast path) against
the same records shuffled (hash join and reorder), same clusters and seed.

    python -m benchmarks.input_order [--clusters 800000] [--workers 2] [--small]
"""

from __future__ import annotations

import argparse
import sys

from .common import StudyClock, add_small, apply_small, bars, cp_floor, dataset, folder_bytes, preprocess, write_table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clusters", type=int, default=800_000)
    ap.add_argument("--workers", default="2")
    ap.add_argument("--partition-size", default="64MiB")
    add_small(ap, clusters=20_000, partition_size="4MiB")
    args = ap.parse_args(argv)
    clock, suffix = StudyClock(), apply_small(args)
    runs = []
    floors = {}
    for unsorted in (False, True):
        raw = dataset(args.clusters, unsorted=unsorted)
        floors[unsorted] = cp_floor(raw)
        run = preprocess(raw, "shuffled (hash join)" if unsorted else "mapping order (fast path)",
                         "--workers", args.workers, "--partition-size", args.partition_size)
        run.vs_cp = round(run.wall_s / floors[unsorted], 1)
        print(run)
        runs.append(run)
    note = (f"Input {folder_bytes(raw) / 1e6:.0f} MB each; `cp -r` {floors[False]:.2f} s / {floors[True]:.2f} s in "
            f"the same run. {args.workers} workers, {args.partition_size} partitions. Same output bytes for both "
            f"orders: {'yes' if runs[0].digest == runs[1].digest else 'NO'}.")
    command = "python -m benchmarks.input_order " + " ".join(sys.argv[1:] if argv is None else argv)
    write_table("input_order" + suffix, "Input order: released vs shuffled", command.strip(), runs, note, clock)
    bars("input_order" + suffix, "throughput by input order", ["mapping order (fast path)", "shuffled (hash join)"],
         {"MB/s": [r.mb_per_s for r in runs]}, "input order", "MB/s of input")

if __name__ == "__main__":
    main()
