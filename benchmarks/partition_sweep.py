"""Partition-size sweep: 1–256 MiB × 1 and 2 workers on one ≥1 GB synth set.

    python -m benchmarks.partition_sweep [--clusters 800000] [--sizes 1,4,16,64,256] [--workers 1,2] [--small]
"""

from __future__ import annotations

import argparse
import sys

from .common import StudyClock, add_small, apply_small, cp_floor, dataset, folder_bytes, plot, preprocess, write_table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clusters", type=int, default=800_000)
    ap.add_argument("--sizes", default="1,4,16,64,256")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--name", default="partition_sweep")
    add_small(ap, clusters=20_000, sizes="1,4,16")
    args = ap.parse_args(argv)
    clock, suffix = StudyClock(), apply_small(args)
    args.name += suffix
    raw = dataset(args.clusters)
    floor = cp_floor(raw)
    print(f"input {folder_bytes(raw) / 1e6:.0f} MB; cp -r {floor:.2f} s")
    runs, series = [], {}
    for w in args.workers.split(","):
        xs, ys = [], []
        for size in args.sizes.split(","):
            run = preprocess(raw, f"{size} MiB, {w} worker(s)", "--workers", w, "--partition-size", f"{size}MiB")
            run.vs_cp = round(run.wall_s / floor, 1)
            print(run)
            runs.append(run)
            xs.append(int(size))
            ys.append(run.mb_per_s)
        series[f"{w} worker(s)"] = (xs, ys)
    digests = {r.digest for r in runs}
    note = (f"`cp -r` of the raw folder ({folder_bytes(raw) / 1e6:.0f} MB): {floor:.2f} s, measured in the same run. "
            f"All {len(runs)} outputs byte-identical: {'yes' if len(digests) == 1 else 'NO'}.")
    command = "python -m benchmarks.partition_sweep " + " ".join(sys.argv[1:] if argv is None else argv)
    write_table(args.name, "Partition-size sweep", command.strip(), runs, note, clock)
    plot(args.name, "preprocess throughput by partition size", series, "partition size (MiB)", "MB/s of input", logx=True)


if __name__ == "__main__":
    main()
