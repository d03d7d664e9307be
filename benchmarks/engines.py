"""Engine comparison: each FASTA parser on the same ≥1 GB input, outputs checked equal.

    python -m benchmarks.engines [--clusters 800000] [--engines pyfastx,numpy,python] [--workers 2] [--small]
"""

from __future__ import annotations

import argparse
import sys

from .common import StudyClock, add_small, apply_small, bars, cp_floor, dataset, folder_bytes, preprocess, write_table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clusters", type=int, default=800_000)
    ap.add_argument("--engines", default="pyfastx,numpy,python")
    ap.add_argument("--workers", default="2")
    ap.add_argument("--partition-size", default="64MiB")
    add_small(ap, clusters=20_000, partition_size="4MiB")
    args = ap.parse_args(argv)
    clock, suffix = StudyClock(), apply_small(args)
    raw = dataset(args.clusters)
    floor = cp_floor(raw)
    runs = []
    for engine in args.engines.split(","):
        run = preprocess(raw, f"engine {engine}", "--engine", engine, "--workers", args.workers,
                         "--partition-size", args.partition_size)
        run.vs_cp = round(run.wall_s / floor, 1)
        print(run)
        runs.append(run)
    same = len({r.digest for r in runs}) == 1
    note = (f"`cp -r` of the raw folder ({folder_bytes(raw) / 1e6:.0f} MB): {floor:.2f} s in the same run. "
            f"{args.workers} workers, {args.partition_size} partitions. Outputs byte-identical across engines: "
            f"{'yes' if same else 'NO'}.")
    command = "python -m benchmarks.engines " + " ".join(sys.argv[1:] if argv is None else argv)
    write_table("engines" + suffix, "FASTA engines, end to end", command.strip(), runs, note, clock)
    bars("engines" + suffix, "preprocess throughput by engine", [r.label.split()[-1] for r in runs],
         {"MB/s": [r.mb_per_s for r in runs]}, "FASTA engine", "MB/s of input")

if __name__ == "__main__":
    main()
