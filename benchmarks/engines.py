"""The FASTA kernel alone, and end to end with processes or threads, side by side.

    python -m benchmarks.engines [--clusters 800000] [--block-size 64MiB] [--repeats 3] [--small]

Part 1, the kernel alone: 64 MiB in-memory blocks of the member FASTA (cut at record
starts), one core, best of ``--repeats``: the kernel writing CSV rows, against the
former default (pyfastx's kseq parser + polars ``write_csv``) on the same blocks, outputs
compared byte for byte. Part 2, end to end: ``esm2dask preprocess`` with 1 and 2 workers
as threads of the process (the default: the kernel releases the GIL), as 1 and 2 worker
processes, and as 1 process with 2 threads, against ``cp -r`` of the raw folder in the
same run.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

from .common import StudyClock, add_small, apply_small, bars, cp_floor, dataset, folder_bytes, preprocess, write_table


def _blocks(path, block_bytes: int, limit: int):
    """Up to ``limit`` blocks of whole records, each about ``block_bytes`` long."""
    blocks, carry = [], b""
    with open(path, "rb") as f:
        while len(blocks) < limit:
            chunk = f.read(block_bytes)
            if not chunk:
                break
            data = carry + chunk
            cut = data.rfind(b"\n>") + 1
            blocks.append(data[:cut])
            carry = data[cut:]
    return blocks


def _kernel(block: bytes):
    from esm2dask.kernel import convert_block

    return convert_block(block, 0, "bench", uppercase=True, first_id=1).rows.data


def _pyfastx_polars(block: bytes) -> bytes:
    import polars as pl
    import pyfastx

    with tempfile.NamedTemporaryFile(suffix=".fa") as tmp:
        tmp.write(block)
        tmp.flush()
        pairs = list(pyfastx.Fastx(tmp.name, format="fasta", uppercase=True))
    frame = pl.DataFrame(pairs, schema={"name": pl.String, "sequence": pl.String}, orient="row")
    frame = frame.select(
        pl.int_range(1, len(frame) + 1).alias("record_id"), "name",
        pl.col("sequence").str.len_bytes().alias("length"), "sequence",
    )
    out = io.BytesIO()
    frame.write_csv(out, include_header=False, quote_style="never", line_terminator="\n")
    return out.getbuffer()


def kernel_alone(path, block_bytes: int, repeats: int) -> list[dict]:
    os.environ["POLARS_MAX_THREADS"] = "1"  # one core, as a worker has
    blocks = _blocks(path, block_bytes, limit=4)
    _kernel(blocks[0][:10_000].rsplit(b"\n>", 1)[0])  # compiled (or loaded from cache) first
    rows = []
    outputs = {}
    for label, fn in (("kernel (numba, rows written from the input bytes)", _kernel),
                      ("pyfastx (kseq) + polars write_csv", _pyfastx_polars)):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            outputs[label] = [fn(b) for b in blocks]
            best = min(best, time.perf_counter() - start)
        mb = sum(map(len, blocks)) / 1e6
        rows.append({"label": label, "mb": round(mb, 1), "seconds": round(best, 3), "mb_per_s": round(mb / best, 1)})
    # compared after the timing: each side hands back its buffer without a final copy
    same = len({tuple(bytes(b) for b in o) for o in outputs.values()}) == 1
    for r in rows:
        r["identical"] = same
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clusters", type=int, default=800_000)
    ap.add_argument("--block-size", default="64MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--partition-size", default="64MiB")
    add_small(ap, clusters=20_000, block_size="4MiB", repeats=1, partition_size="4MiB")
    args = ap.parse_args(argv)
    clock, suffix = StudyClock(), apply_small(args)
    from dask.utils import parse_bytes

    raw = dataset(args.clusters)
    command = ("python -m benchmarks.engines " + " ".join(sys.argv[1:] if argv is None else argv)).strip()

    alone = kernel_alone(raw / "uniref90membersandreps_ur50trainfiltreps.fasta", parse_bytes(args.block_size), args.repeats)
    for r in alone:
        print(r)

    floor = cp_floor(raw)
    runs = []
    for label, extra in (("1 worker thread (in-process)", ["--workers", "1"]),
                         ("2 worker threads (in-process, the default)", ["--workers", "2"]),
                         ("1 worker process", ["--workers", "1", "--processes"]),
                         ("2 worker processes × 1 thread", ["--workers", "2", "--processes"]),
                         ("1 worker process × 2 threads", ["--workers", "1", "--threads-per-worker", "2", "--processes"])):
        run = preprocess(raw, label, *extra, "--partition-size", args.partition_size)
        run.vs_cp = round(run.wall_s / floor, 1)
        print(run)
        runs.append(run)
    same = len({r.digest for r in runs}) == 1
    kernel_table = ["| parser | MB | best s | MB/s, one core | output identical |", "|---|---|---|---|---|"]
    kernel_table += [f"| {r['label']} | {r['mb']} | {r['seconds']} | {r['mb_per_s']} | {'yes' if r['identical'] else 'NO'} |"
                     for r in alone]
    note = "\n".join([
        f"`cp -r` of the raw folder ({folder_bytes(raw) / 1e6:.0f} MB): {floor:.2f} s in the same run. "
        f"{args.partition_size} partitions. Outputs byte-identical across configurations: {'yes' if same else 'NO'}. "
        f"Scaling 1 → 2 workers: {runs[0].wall_s / runs[1].wall_s:.2f}× in-process, "
        f"{runs[2].wall_s / runs[3].wall_s:.2f}× as processes.",
        "",
        f"## The kernel alone ({args.block_size} in-memory blocks of the member FASTA, best of {args.repeats})",
        "",
        *kernel_table,
    ])
    write_table("engines" + suffix, "The FASTA kernel: alone, and end to end with processes or threads", command,
                runs, note, clock)
    bars("engines" + suffix, "kernel alone (one core) and end to end (MB/s of input)",
         ["kernel\nalone", "pyfastx+polars\nalone"] + [r.label.replace(" × ", "\n× ") for r in runs],
         {"MB/s": [r["mb_per_s"] for r in alone] + [r.mb_per_s for r in runs]}, "configuration", "MB/s")


if __name__ == "__main__":
    main()
