"""Driver and worker memory against input size: the driver holds plans and receipts only,
so its peak RSS must not grow with the input (target: within 20 % from ~1 GB to ~4 GB).

    python -m benchmarks.driver_memory [--clusters 800000,3200000] [--workers 2] [--small]
"""

from __future__ import annotations

import argparse
import sys

from .common import StudyClock, add_small, apply_small, bars, dataset, folder_bytes, preprocess, write_table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clusters", default="800000,3200000")
    ap.add_argument("--workers", default="2")
    ap.add_argument("--partition-size", default="64MiB")
    add_small(ap, clusters="20000,80000", partition_size="16MiB")
    args = ap.parse_args(argv)
    clock, suffix = StudyClock(), apply_small(args)
    runs = []
    for clusters in args.clusters.split(","):
        raw = dataset(int(clusters))
        size = folder_bytes(raw)
        label = f"{size / 1e9:.1f} GB input" if size >= 1e9 else f"{size / 1e6:.0f} MB input"
        run = preprocess(raw, label, "--workers", args.workers,
                         "--partition-size", args.partition_size)
        print(run)
        runs.append(run)
    growth = runs[-1].driver_peak_mb / runs[0].driver_peak_mb - 1
    note = (f"Driver peak RSS grows {growth * 100:+.0f} % for {runs[-1].input_mb / runs[0].input_mb:.1f}× the input; "
            f"{args.workers} workers, {args.partition_size} partitions.")
    command = "python -m benchmarks.driver_memory " + " ".join(sys.argv[1:] if argv is None else argv)
    write_table("driver_memory" + suffix, "Memory against input size", command.strip(), runs, note, clock)
    bars("driver_memory" + suffix, "peak RSS by input size", [r.label for r in runs],
         {"driver": [r.driver_peak_mb for r in runs], "largest worker": [r.worker_peak_mb for r in runs]},
         "input", "peak RSS MB")

if __name__ == "__main__":
    main()
