"""Output layouts: ``--format esm2nv`` alone and with each added layout, side by side on
the same input; then the single SQLite writer of ``bionemo2/train.db``, three ways, on
the real uf90 rows of that input, projected to the full release (~150 M rows).

    python -m benchmarks.formats [--clusters 800000] [--workers 2] [--repeats 2] [--writer-rows 0]
    python -m benchmarks.formats --train-db [--train-db-rows 8000000] [--workers 2]

Each configuration runs ``--repeats`` times, round-robin, and the fastest run is reported:
on a shared machine the slow runs measure the neighbours.

The writer ways: (a) one writer inserting the rows as they come, ids in no order (the rows
shuffled, seeded: in UniRef's mapping order the member ids are as good as unordered, rank
correlation 0.04 with id order on NVIDIA's sample, while synth's ids happen to be sorted),
(b) one writer inserting in id order, (c) what ``--format bionemo2`` does: sorted id ranges
built into small databases (in parallel on the workers), copied in id order by SQLite
itself (``INSERT … SELECT`` from each attached file). ``--writer-rows N`` repeats the rows with
renamed ids up to N rows, to see how each way holds up as the table outgrows the cache.

``--train-db`` (issue 17): ``train.db`` from sorted runs, as ``--format bionemo2`` builds it, on
``--workers`` worker processes: today's way (bucket databases by SQLite, then the single merge
writer; kept below as :func:`old_build_bucket_db` and :func:`old_merge_databases`, for this
comparison only) against the page writer (``esm2dask.sqlite_pages``: layout, pages, final step)
at several page sizes, side by side in one run, with the disk's write rate and a projection to
NVIDIA's 187,382,018 train rows on 64 workers. Writes ``results/train_db.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .common import ESM2DASK, RESULTS, cp_floor, dataset, folder_bytes, preprocess, write_table

FULL_RELEASE_ROWS = 150_000_000
CONFIGS = (
    ("esm2nv", "esm2nv"),
    ("esm2nv + bionemo2", "esm2nv,bionemo2"),
    ("esm2nv + hf", "esm2nv,hf"),
    ("esm2nv + bionemo2 + hf", "esm2nv,bionemo2,hf"),
    ("bionemo2 alone", "bionemo2"),
    ("hf alone", "hf"),
)
#: the stages each added layout brings (the uf90 parts and runs are written inside the
#: fast-uf90 / merge-uf90 tasks, from the same parse: no stage of their own)
LAYOUT_STAGES = ("bionemo2-sample-ids", "bionemo2-train-layout", "bionemo2-train-pages", "bionemo2-train-db",
                 "bionemo2-train-clusters", "bionemo2-validation", "bionemo2-test", "hf-validation", "hf-test")


def _uf90_rows(raw: Path, workers: str, partition: str, total: int):
    """``(id, sequence)`` of the uf90 rows of one esm2nv run, in mapping order; repeated with
    renamed ids (``…~1``, ``…~2``) up to ``total`` rows when ``total`` is larger."""
    import polars as pl

    from esm2dask.formats import read_shard_rows

    out = Path(tempfile.mkdtemp(dir=raw.parent)) / "out"
    try:
        subprocess.run([*ESM2DASK, "preprocess", str(raw), "-o", str(out), "--plain", "--workers", workers,
                        "--partition-size", partition, "--dashboard-address", ":0"],
                       check=True, capture_output=True)
        frame = pl.concat([read_shard_rows(str(p), 0, None, {}) for p in sorted((out / "uf90/uf90_csvs").glob("x*.csv"))])
    finally:
        shutil.rmtree(out.parent)
    frame = frame.select(pl.col("record_name").alias("id"), "sequence")
    copies = [frame] + [frame.with_columns(pl.col("id") + f"~{k}") for k in range(1, math.ceil(total / len(frame)))]
    return pl.concat(copies).head(max(total, len(frame)))


# ----------------------------------------------------------------------------- today's writer, kept


def _open_for_loading(path: str) -> sqlite3.Connection:
    """A new database with the ``protein`` table, set up for bulk loading (no journal, no fsync)."""
    from esm2dask.formats import PROTEIN_DDL

    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute(PROTEIN_DDL)
    return con


def _close_loaded(con: sqlite3.Connection) -> None:
    mode = con.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
    con.close()
    assert mode == "delete", mode


def _old_write_db(path: str, frame) -> None:
    """``frame`` (sorted, distinct ids) inserted by SQLite in one transaction."""
    con = _open_for_loading(path)
    con.execute("BEGIN")
    for batch in frame.iter_slices(200_000):
        con.executemany("INSERT INTO protein (id, sequence) VALUES (?, ?)",
                        zip(batch["id"].to_list(), batch["sequence"].to_list()))
    con.execute("COMMIT")
    _close_loaded(con)


def old_build_bucket_db(slices, db_path: str) -> tuple[int, float]:
    """Today's ``bionemo2-bucket-db`` task: one id range of every run into a small database."""
    from esm2dask.formats import _sorted_distinct
    from esm2dask.tasks import read_slices

    t = time.perf_counter()
    frame = _sorted_distinct(read_slices(slices, {}))
    _old_write_db(db_path, frame)
    return len(frame), time.perf_counter() - t


def old_merge_databases(db_paths: list[str], out_path: str) -> int:
    """Today's ``bionemo2-train-db`` task: the bucket databases copied in id order by SQLite."""
    rows = 0
    con = _open_for_loading(out_path)
    for src in db_paths:
        con.execute("ATTACH DATABASE ? AS bucket", (src,))
        con.execute("BEGIN")
        rows += con.execute("INSERT INTO protein (id, sequence) SELECT id, sequence FROM bucket.protein "
                            "ORDER BY rowid").rowcount
        con.execute("COMMIT")
        con.execute("DETACH DATABASE bucket")
    _close_loaded(con)
    return rows


# ----------------------------------------------------------------------------- the layout study


def _timed_insert(frame, path: Path, batch_rows: int = 200_000) -> tuple[float, float, float]:
    """One writer, rows as they come, one transaction per batch: seconds, first and last batch rows/s."""
    con = _open_for_loading(str(path))
    rates, start = [], time.perf_counter()
    for batch in frame.iter_slices(batch_rows):
        t = time.perf_counter()
        con.execute("BEGIN")
        con.executemany("INSERT INTO protein (id, sequence) VALUES (?, ?)",
                        zip(batch["id"].to_list(), batch["sequence"].to_list()))
        con.execute("COMMIT")
        rates.append(len(batch) / (time.perf_counter() - t))
    seconds = time.perf_counter() - start
    _close_loaded(con)
    return seconds, rates[0], rates[-1]


def measure_writer(raw: Path, workers: str, partition: str, writer_rows: int) -> dict:
    from esm2dask.config import parse_size
    from esm2dask.formats import _sorted_distinct

    frame = _uf90_rows(raw, workers, partition, writer_rows)
    n = len(frame)
    folder = Path(tempfile.mkdtemp(dir=raw.parent))
    try:
        shuffled = frame.sample(fraction=1.0, shuffle=True, seed=0)
        unordered_s, first, last = _timed_insert(shuffled, folder / "unordered.db")
        (folder / "unordered.db").unlink()
        del shuffled
        t = time.perf_counter()
        ordered = _sorted_distinct(frame)
        sort_s = time.perf_counter() - t
        sorted_s, _, sorted_last = _timed_insert(ordered, folder / "sorted.db")
        (folder / "sorted.db").unlink()
        # as --format bionemo2: id ranges of about one partition of uf90 text each
        text_bytes = int(frame["sequence"].str.len_bytes().sum() + frame["id"].str.len_bytes().sum())
        n_buckets = max(1, math.ceil(text_bytes / parse_size(partition)))
        cuts = [i * len(ordered) // n_buckets for i in range(n_buckets + 1)]
        urls, bucket_s = [], []
        for b in range(n_buckets):
            url = str(folder / f"bucket-{b:05d}.db")
            t = time.perf_counter()
            _old_write_db(url, ordered.slice(cuts[b], cuts[b + 1] - cuts[b]))
            bucket_s.append(time.perf_counter() - t)
            urls.append(url)
        t = time.perf_counter()
        assert old_merge_databases(urls, str(folder / "train.db")) == len(ordered)
        merge_s = time.perf_counter() - t
        db_bytes = (folder / "train.db").stat().st_size
    finally:
        shutil.rmtree(folder)
    w = int(workers)
    bucket_rate = len(ordered) / sum(bucket_s)
    return {
        "rows": n, "distinct_ids": len(ordered), "db_bytes": db_bytes, "buckets": n_buckets,
        "unordered_rows_per_s": round(n / unordered_s), "unordered_first_batch_rows_per_s": round(first),
        "unordered_last_batch_rows_per_s": round(last),
        "sorted_rows_per_s": round(n / sorted_s), "sorted_last_batch_rows_per_s": round(sorted_last),
        "sort_s": round(sort_s, 2),
        "bucket_db_rows_per_s_per_worker": round(bucket_rate), "merge_rows_per_s": round(len(ordered) / merge_s),
        "projected_full_s": {
            "ids in no order, one writer (at its last batch's rate; it keeps falling)": round(FULL_RELEASE_ROWS / last),
            "id order, one writer": round(FULL_RELEASE_ROWS / (n / sorted_s)),
            f"--format bionemo2: bucket databases on {w} worker(s)": round(FULL_RELEASE_ROWS / bucket_rate / w),
            "--format bionemo2: the single writer (merge)": round(FULL_RELEASE_ROWS / (len(ordered) / merge_s)),
        },
    }


def _plot(runs, writer: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.barh([r.label for r in runs], [r.wall_s for r in runs], color="#4C72B0")
    a.set_xlabel("wall s (whole command)")
    a.set_title("preprocess by --format")
    a.invert_yaxis()
    ways = {"ids in no order\n(one writer)": writer["unordered_rows_per_s"],
            "id order\n(one writer)": writer["sorted_rows_per_s"],
            "bucket dbs\n(per worker)": writer["bucket_db_rows_per_s_per_worker"],
            "merge\n(one writer)": writer["merge_rows_per_s"]}
    b.bar(list(ways), [v / 1e3 for v in ways.values()], color="#55A868")
    b.set_ylabel("thousand rows/s")
    b.set_title(f"train.db writers, {writer['rows']:,} rows")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "formats.png", dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clusters", type=int, default=800_000)
    ap.add_argument("--workers", default="2")
    ap.add_argument("--partition-size", default="64MiB")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--writer-rows", type=int, default=0)
    ap.add_argument("--train-db", action="store_true", help="only the train.db writers (issue 17)")
    ap.add_argument("--train-db-rows", type=int, default=8_000_000)
    ap.add_argument("--page-sizes", default="4096,16384,65536")
    ap.add_argument("--scratch", default=None, help="folder for the study's files (default: the temp folder)")
    args = ap.parse_args(argv)
    if args.train_db:
        return main_train_db(args, argv)
    raw = dataset(args.clusters)
    floor = cp_floor(raw)
    fastest, digests = {}, set()
    for _ in range(args.repeats):
        for label, fmt in CONFIGS:
            run = preprocess(raw, label, "--workers", args.workers, "--partition-size", args.partition_size,
                             "--format", fmt)
            run.vs_cp = round(run.wall_s / floor, 1)
            print(run, flush=True)
            if "esm2nv" in fmt:  # the others publish no esm2nv tree
                digests.add(run.digest)
            if label not in fastest or run.wall_s < fastest[label].wall_s:
                fastest[label] = run
    runs = [fastest[label] for label, _ in CONFIGS]
    writer = measure_writer(raw, args.workers, args.partition_size, args.writer_rows)
    print(writer, flush=True)
    base = runs[0].wall_s
    lines = [
        f"Input {folder_bytes(raw) / 1e6:.0f} MB (`synth --clusters {args.clusters} --seed 1`); `cp -r` {floor:.2f} s "
        f"in the same run. {args.workers} workers, {args.partition_size} partitions; the fastest of "
        f"{args.repeats} runs of each, round-robin. The esm2nv tree is byte-identical in every run: "
        f"{'yes' if len(digests) == 1 else 'NO'}. Without esm2nv no CSV of uf90 or uf50/train is written "
        f"at all, not even in staging.",
        "",
        "| configuration | wall s | added s | layout stages s | the layout stages (s) | files written |",
        "|---|---|---|---|---|---|",
    ]
    lines.insert(-2, "Layout stages: the seconds the driver waited on each stage the layouts add (a stage "
                     "that ran alongside others and was waited on last shows about 0); their sum is the added "
                     "time without the noise of the shared machine in the esm2nv part.\n")
    for r in runs:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r.stage_seconds.items() if k in LAYOUT_STAGES)
        files = ", ".join(f"{k} {v['rows']:,} rows {v['bytes'] / 1e6:.0f} MB" for k, v in r.layouts.items())
        total = sum(v for k, v in r.stage_seconds.items() if k in LAYOUT_STAGES)
        lines.append(f"| {r.label} | {r.wall_s} | {r.wall_s - base:+.1f} | {total:.1f} | {stages or '–'} | "
                     f"{files or 'the CSV tree'} |")
    lines += [
        "",
        f"## `train.db`: the single writer ({writer['rows']:,} rows of uf90, {writer['distinct_ids']:,} distinct "
        f"ids, {writer['db_bytes'] / 1e6:,.0f} MB; measured in one process)",
        "",
        "| way | rows/s | projected for 150 M rows |",
        "|---|---|---|",
        f"| one writer, ids in no order (first batch → last batch) | {writer['unordered_rows_per_s']:,} "
        f"({writer['unordered_first_batch_rows_per_s']:,} → {writer['unordered_last_batch_rows_per_s']:,}) | "
        f"≥ {_hours(list(writer['projected_full_s'].values())[0])} |",
        f"| one writer, id order (after a {writer['sort_s']} s sort) | {writer['sorted_rows_per_s']:,} | "
        f"{_hours(list(writer['projected_full_s'].values())[1])} |",
        f"| `--format bionemo2`: {writer['buckets']} bucket databases, per worker (parallel) | "
        f"{writer['bucket_db_rows_per_s_per_worker']:,} | {_hours(list(writer['projected_full_s'].values())[2])} "
        f"on {args.workers} worker(s) |",
        f"| `--format bionemo2`: merge, the single writer | {writer['merge_rows_per_s']:,} | "
        f"{_hours(list(writer['projected_full_s'].values())[3])} |",
    ]
    command = "python -m benchmarks.formats " + " ".join(sys.argv[1:] if argv is None else argv)
    write_table("formats", "Output layouts side by side, and the train.db writer", command.strip(), runs,
                "\n".join(lines))
    (RESULTS / "formats.json").write_text(json.dumps(
        {"runs": json.loads((RESULTS / "formats.json").read_text()), "train_db_writer": writer}, indent=2) + "\n")
    _plot(runs, writer)


# ----------------------------------------------------------------------------- the train.db study (issue 17)

NVIDIA_TRAIN_ROWS = 187_382_018


def _make_runs(folder: Path, n_rows: int, part_rows: int, bucket_bytes: int, seed: int = 0):
    """Sorted runs as the uf90 conversion tasks leave them (Arrow files of ``(id, sequence)``,
    each sorted by id, ids in no order across runs), and the slices of each id range (bucket:
    about ``bucket_bytes`` of text each, cut at sampled ids). Ids are UniRef90-like
    (``UniRef90_`` + 10 characters); sequences log-normal around 370 residues, as synth's."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.ipc as ipc

    from esm2dask.tasks import Slice

    rng = np.random.default_rng(seed)
    chars = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)
    residues = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
    pool = residues[rng.integers(0, 20, 64 << 20)]
    runs, samples, text = [], [], 0
    for k, lo in enumerate(range(0, n_rows, part_rows)):
        n = min(part_rows, n_rows - lo)
        body = chars[rng.integers(0, 36, (n, 10))]
        ids = np.concatenate([np.broadcast_to(np.frombuffer(b"UniRef90_", np.uint8), (n, 9)), body], axis=1)
        id_arr = pa.StringArray.from_buffers(n, pa.py_buffer((np.arange(n + 1, dtype=np.int32) * 19).tobytes()),
                                             pa.py_buffer(ids.tobytes()))
        lengths = np.clip(rng.lognormal(5.75, 0.6, n).astype(np.int64), 1, 35_000)
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        data = np.resize(np.roll(pool, int(rng.integers(len(pool)))), int(offsets[-1]))
        seq_arr = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data.tobytes()))
        table = pa.table({"id": id_arr, "sequence": seq_arr.cast(pa.string())})
        table = table.take(pc.sort_indices(table["id"]))
        path = folder / f"run-{k:05d}.arrow"
        with pa.OSFile(str(path), "wb") as f, ipc.new_file(f, table.schema) as w:
            w.write_table(table, max_chunksize=100_000)
        runs.append((str(path), table["id"]))
        samples += table["id"].take(rng.choice(n, min(n, 2000), replace=False)).to_pylist()
        text += int(offsets[-1]) + 19 * n
    n_buckets = max(1, math.ceil(text / bucket_bytes))
    pooled = sorted(samples)
    splitters = pa.array(sorted({pooled[j * len(pooled) // n_buckets] for j in range(1, n_buckets)}), pa.string())
    import polars as pl

    cut = pl.Series(splitters.to_pylist(), dtype=pl.String)
    bounds = [[0, *pl.Series(ids.combine_chunks()).search_sorted(cut, side="left").to_list(), len(ids)]
              for _, ids in runs]
    buckets = [[Slice(path, b[j], b[j + 1]) for (path, _), b in zip(runs, bounds)] for j in range(len(splitters) + 1)]
    return buckets, text


def _warm(_):
    """Load the compiled kernels in a pool worker before anything is timed."""
    import pyarrow as pa

    from esm2dask import sqlite_pages

    with tempfile.TemporaryDirectory() as d:
        sqlite_pages.write_database(os.path.join(d, "w.db"), pa.array(["a", "b"]), pa.array(["M", "K"]), 4096)
    return os.getpid()


def _timed(fn, *args):
    t = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t


def _run_old(pool, buckets, folder: Path) -> dict:
    t = time.perf_counter()
    paths = [str(folder / f"bucket-{b:05d}.db") for b in range(len(buckets))]
    done = list(pool.map(old_build_bucket_db, buckets, paths))
    bucket_s = time.perf_counter() - t
    t = time.perf_counter()
    rows = old_merge_databases(paths, str(folder / "old.db"))
    merge_s = time.perf_counter() - t
    for p in paths:
        os.unlink(p)
    return {"rows": rows, "bucket_stage_s": round(bucket_s, 2), "bucket_task_s": round(sum(s for _, s in done), 2),
            "merge_s": round(merge_s, 2), "total_s": round(bucket_s + merge_s, 2),
            "db_bytes": (folder / "old.db").stat().st_size}


def _run_new(pool, buckets, folder: Path, page_size: int) -> dict:
    from esm2dask import formats, sqlite_pages

    counts = [sum(s.hi - s.lo for s in ss) for ss in buckets]
    first_rowids = (1 + np.cumsum([0, *counts[:-1]])).tolist()
    order = [str(folder / f"order-{b:05d}.npy") for b in range(len(buckets))]
    pages = str(folder / "new.db.pages")
    out = str(folder / f"new-{page_size}.db")
    t0 = time.perf_counter()
    lay = list(pool.map(_timed, [formats.layout_train_chunk] * len(buckets), buckets, first_rowids, order,
                        [page_size] * len(buckets), [{}] * len(buckets)))
    t1 = time.perf_counter()
    layouts = [x for x, _ in lay]
    firsts = sqlite_pages.plan_pages(layouts)
    n = len(buckets)
    wrote = list(pool.map(_timed, [formats.write_train_chunk] * n, buckets, order, first_rowids, firsts, [pages] * n,
                          [str(folder / f"edges-{b:05d}.npz") for b in range(n)], [""] * n, [page_size] * n, [{}] * n))
    t2 = time.perf_counter()
    written = formats.finish_train_db([x for x, _ in wrote], layouts, pages, out, page_size, {})
    t3 = time.perf_counter()
    fsync_s = _fsync_seconds(out)
    for b in range(n):
        os.unlink(order[b])
        os.unlink(folder / f"edges-{b:05d}.npz")
    return {"page_size": page_size, "rows": written.rows, "layout_stage_s": round(t1 - t0, 2),
            "layout_task_s": round(sum(s for _, s in lay), 2), "pages_stage_s": round(t2 - t1, 2),
            "pages_task_s": round(sum(s for _, s in wrote), 2), "final_s": round(t3 - t2, 3),
            "total_s": round(t3 - t0, 2), "fsync_after_s": round(fsync_s, 2), "db_bytes": written.bytes, "path": out}


def _disk_write_rate(folder: Path, total: int = 2 << 30) -> dict:
    """MB/s of 64 MiB ``pwrite`` calls into one new file of ``total`` bytes, in one pass: to
    the last ``pwrite`` (``page_cache``: the bytes in memory, not on the disk) and to the end
    of the ``fsync`` after it (``fsync``: the bytes on the disk, what a file of many times the
    memory costs); then a second new file written with ``O_DIRECT``, as the page writer writes
    its pages, to the end of its ``fsync`` (``direct``). The files are new, so the first one's
    pages are fresh memory, as a database's are."""
    import mmap

    total -= total % (1 << 20)  # whole blocks, as O_DIRECT needs
    buf = np.frombuffer(mmap.mmap(-1, 64 << 20), np.uint8)  # page-aligned, as O_DIRECT needs
    buf[:] = np.random.default_rng(0).integers(0, 256, len(buf), dtype=np.uint8)
    rates = {}
    for how, flags in (("page_cache", 0), ("direct", getattr(os, "O_DIRECT", 0))):
        path = folder / "disk.bin"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
        except OSError:  # a file system without O_DIRECT (tmpfs): the page writer writes buffered there
            rates["direct"] = rates["fsync"]
            continue
        t = time.perf_counter()
        for off in range(0, total, len(buf)):
            os.pwrite(fd, buf[: min(len(buf), total - off)], off)
        written = time.perf_counter() - t
        os.fsync(fd)
        synced = time.perf_counter() - t
        os.close(fd)
        os.unlink(path)
        if how == "page_cache":
            rates["page_cache"], rates["fsync"] = round(total / written / 1e6), round(total / synced / 1e6)
            _settle()  # the second file does not write into the memory the first one freed
        else:
            rates["direct"] = round(total / synced / 1e6)
    return rates


def _fsync_seconds(path: str) -> float:
    """Seconds to put on the disk what of ``path`` is not there yet (written, never synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        os.fsync(fd)
        return time.perf_counter() - t
    finally:
        os.close(fd)


def _lookups(path: str, ids: list[str], repeats: int = 1) -> float:
    """Random ``SELECT sequence FROM protein WHERE id = ?`` per second (warm page cache)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    cur = con.cursor()
    t = time.perf_counter()
    for _ in range(repeats):
        for i in ids:
            cur.execute("SELECT sequence FROM protein WHERE id = ?", (i,))
            assert cur.fetchone() is not None
    rate = len(ids) * repeats / (time.perf_counter() - t)
    con.close()
    return round(rate)


def measure_train_db(n_rows: int, workers: int, page_sizes: tuple[int, ...], folder: Path) -> dict:
    import random

    import pyarrow.ipc as ipc

    t = time.perf_counter()
    buckets, text = _make_runs(folder, n_rows, 1_000_000, 64 << 20)
    print(f"runs: {n_rows:,} rows, {text / 1e9:.2f} GB of text, {len(buckets)} buckets, "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    with pa_memory_map(buckets[0][0].url) as src:
        some = ipc.open_file(src).read_all()["id"].to_pylist()
    ids = random.Random(0).sample(some, min(20_000, len(some)))
    result = {"rows": n_rows, "workers": workers, "buckets": len(buckets), "text_bytes": text}
    import multiprocessing

    # spawned, not forked: a fork of a process whose Arrow/polars threads hold locks can hang
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_warm, range(workers)))
        disk_bytes = min(4 << 30, max(64 << 20, text)) >> 20 << 20  # about the database's size, whole MiB
        result["disk_write_MB_per_s"] = _disk_write_rate(folder, disk_bytes)
        result["disk_test_bytes"] = disk_bytes
        print(result["disk_write_MB_per_s"], flush=True)
        # Today's way first: its database answers the lookups every other is held to.
        _settle()
        old = _run_old(pool, buckets, folder)
        print(old, flush=True)
        con_old = sqlite3.connect(str(folder / "old.db"))
        want = {i: con_old.execute("SELECT sequence FROM protein WHERE id = ?", (i,)).fetchone() for i in ids}
        con_old.close()
        old["lookups_per_s"] = _lookups(str(folder / "old.db"), ids)
        os.unlink(folder / "old.db")
        new = []
        for u in page_sizes:
            _settle()
            r = _run_new(pool, buckets, folder, u)
            print(r, flush=True)
            _check_new(r, old["rows"], ids, want)  # and deleted
            new.append(r)
    # the disk as the page writer writes to it: O_DIRECT (page sizes 4096 and up), on the disk
    # at the end of the fsync
    disk = result["disk_write_MB_per_s"]["direct"] * 1e6
    for r in new:
        r["rows_per_s"] = round(n_rows / _at_least(r["total_s"]))
        r["vs_old"] = round(old["total_s"] / _at_least(r["total_s"]), 1)
        r["writer_vs_old_merge"] = round(old["merge_s"] / _at_least(r["pages_stage_s"] + r["final_s"]), 1)
        per_worker = n_rows / _at_least(r["layout_task_s"] + r["pages_task_s"])
        r["per_worker_rows_per_s"] = round(per_worker)
        scale = NVIDIA_TRAIN_ROWS / n_rows
        compute = NVIDIA_TRAIN_ROWS / (64 * per_worker)
        write = r["db_bytes"] * scale / disk
        r["projected_187M_64_workers_s"] = {"workers (layout + pages)": round(compute, 1),
                                            "disk (the file at the O_DIRECT + fsync rate)": round(write, 1),
                                            "final step (scaled with the leaves)": round(r["final_s"] * scale, 1),
                                            "total": round(max(compute, write) + r["final_s"] * scale, 1)}
    old["rows_per_s"] = round(n_rows / _at_least(old["total_s"]))
    old["merge_rows_per_s"] = round(n_rows / _at_least(old["merge_s"]))
    old["projected_187M_64_workers_s"] = round(NVIDIA_TRAIN_ROWS / max(1, old["merge_rows_per_s"])
                                               + NVIDIA_TRAIN_ROWS / (64 * n_rows / _at_least(old["bucket_task_s"])), 1)
    result["old"], result["new"] = old, new
    return result


#: Seconds every way waits (untimed) before it starts, after an ``os.sync``.
SETTLE_S = 30


def _settle() -> None:
    """Let every way start from the same state: no dirty page left by the way before, and no
    memory freed a moment ago. On this VM (Firecracker, free page reporting) freed memory is
    handed back to the host within seconds, and a new file's pages then go at about 400 MB/s,
    but at up to 4 GB/s into memory freed an instant before: 6 GiB freed, a new 3 GiB file
    10 s later went at 791 MB/s, 25 s and 45 s later at 399 and 415 MB/s. Without the wait
    whichever way ran first after a deletion was favoured (measured: results/train_db.md)."""
    os.sync()
    time.sleep(SETTLE_S)


def _check_new(r: dict, rows: int, ids: list[str], want: dict) -> None:
    """A page writer's database: the same rows as today's, SQLite's own integrity_check; then deleted."""
    con = sqlite3.connect(f"file:{r['path']}?mode=ro", uri=True)
    assert con.execute("SELECT count(*) FROM protein").fetchone()[0] == rows == r["rows"]
    assert all(con.execute("SELECT sequence FROM protein WHERE id = ?", (i,)).fetchone() == want[i] for i in ids)
    tq = time.perf_counter()
    r["integrity_check"] = con.execute("PRAGMA integrity_check").fetchone()[0]
    r["integrity_check_s"] = round(time.perf_counter() - tq, 1)
    assert r["integrity_check"] == "ok", (r["page_size"], r["integrity_check"])
    con.close()
    r["lookups_per_s"] = _lookups(r["path"], ids)
    os.unlink(r.pop("path"))


def _at_least(seconds: float) -> float:
    """A smoke-sized run can take less time than the rounding keeps (0.0 s)."""
    return max(seconds, 1e-3)


class pa_memory_map:
    def __init__(self, path):
        import pyarrow as pa

        self.src = pa.memory_map(path)

    def __enter__(self):
        return self.src

    def __exit__(self, *exc):
        self.src.close()


def _train_db_table(r: dict, command: str, seconds: float) -> str:
    old, new = r["old"], r["new"]
    best = max(new, key=lambda x: x["rows_per_s"])
    lines = [
        "# `train.db`: the page writer against today's merge writer (issue 17)", "",
        f"Reproduce: `{command}`", "",
        f"Machine: {os.cpu_count()} cores (shared); measured {time.strftime('%Y-%m-%d %H:%M')}. "
        f"{r['rows']:,} rows ({r['text_bytes'] / 1e9:.2f} GB of ids and sequences) in 8 sorted runs, "
        f"{r['buckets']} id ranges of about 64 MiB, {r['workers']} worker processes; every way from the same "
        "runs, in one run. Every database holds the same rows (count, and 20,000 random lookups equal to "
        "today's database).", "",
        "| way | page size | stage 1 s | stage 2 s | single-process s | total s | rows/s | × today | MB | lookups/s (warm) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| today: bucket databases (SQLite) → merge (one writer, `INSERT … SELECT`) | 4096 | "
        f"{old['bucket_stage_s']} | – | {old['merge_s']} | {old['total_s']} | {old['rows_per_s']:,} | 1.0 | "
        f"{old['db_bytes'] / 1e6:,.0f} | {old['lookups_per_s']:,} |",
    ]
    for x in new:
        lines.append(f"| page writer: layout → pages (`pwrite`) → final step | {x['page_size']} | "
                     f"{x['layout_stage_s']} | {x['pages_stage_s']} | {x['final_s']} | {x['total_s']} | "
                     f"{x['rows_per_s']:,} | {x['vs_old']} | {x['db_bytes'] / 1e6:,.0f} | {x['lookups_per_s']:,} |")
    disk = r["disk_write_MB_per_s"]
    p = best["projected_187M_64_workers_s"]
    lines += [
        "",
        "Stage 1: today the bucket databases, the page writer the layout (read the id range, sort, count pages); "
        "stage 2: the page writer's pages. Single-process: today's merge (every row through one SQLite), the page "
        "writer's final step (interior pages, seams, page 1, header: no row). "
        f"Today's merge alone: {old['merge_rows_per_s']:,} rows/s.",
        "",
        f"Disk: {disk['page_cache']:,} MB/s into the page cache, {disk['fsync']:,} MB/s to the end of an `fsync` "
        f"(one pass of 64 MiB `pwrite`s into a new {r.get('disk_test_bytes', 2 << 30) / 2**30:.2g} GiB file, "
        f"before the runs); {disk.get('direct', '?'):,} MB/s to the end of an `fsync` with `O_DIRECT` (a second "
        "new file, the way the page writer writes its pages). Today's way syncs nothing; the page writer's "
        "finished file then took "
        + ", ".join(f"{x.get('fsync_after_s', '?')} s ({x['page_size']})" for x in new)
        + " to `fsync` (what was not on the disk yet: its final step's pages).",
        "",
        f"## Projection: NVIDIA's {NVIDIA_TRAIN_ROWS:,} train rows on 64 workers (page size {best['page_size']})",
        "",
        f"Per worker, layout + pages: {best['per_worker_rows_per_s']:,} rows/s (task seconds summed, measured "
        f"with {r['workers']} workers on {os.cpu_count()} shared cores).",
        "",
        "| part | s |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in p.items()],
        f"| disk that 30 s would need | {best['db_bytes'] * NVIDIA_TRAIN_ROWS / r['rows'] / 30e9:.1f} GB/s "
        f"({best['db_bytes'] * NVIDIA_TRAIN_ROWS / r['rows'] / 1e9:,.0f} GB) |",
        f"| today (merge at {old['merge_rows_per_s']:,} rows/s after the bucket databases) | "
        f"{old['projected_187M_64_workers_s']} |",
        "",
        "The workers' part and the disk's overlap (the pages are written as they are made); the larger "
        "counts. The final step reads each id range's edges (one rowid per table leaf, the index cells "
        "of its first and last leaf and its dividers) and writes the interior pages.",
    ]
    lines.append("")
    for r in new:
        lines.append(f"`PRAGMA integrity_check` of the {r['page_size']}-byte database: "
                     f"{r['integrity_check']} ({r['integrity_check_s']} s).")
    lines += ["", f"Study run time: {seconds:.0f} s."]
    return "\n".join(lines) + "\n"


def _train_db_plot(r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["today\n(merge)"] + [f"pages\n{x['page_size']}" for x in r["new"]]
    values = [r["old"]["rows_per_s"]] + [x["rows_per_s"] for x in r["new"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, [v / 1e6 for v in values], color=["#C44E52"] + ["#55A868"] * len(r["new"]))
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{v / 1e6:.2f}", ha="center", va="bottom")
    ax.set_ylabel("million rows/s (whole train.db build)")
    ax.set_title(f"train.db from sorted runs, {r['rows']:,} rows, {r['workers']} workers")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(RESULTS / "train_db.png", dpi=110)
    plt.close(fig)


def main_train_db(args, argv) -> None:
    start = time.perf_counter()
    sizes = tuple(int(x) for x in args.page_sizes.split(","))
    folder = Path(tempfile.mkdtemp(prefix="esm2dask-train-db-", dir=args.scratch))
    try:
        result = measure_train_db(args.train_db_rows, int(args.workers), sizes, folder)
    finally:
        shutil.rmtree(folder)
    command = "python -m benchmarks.formats " + " ".join(sys.argv[1:] if argv is None else argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_db.md").write_text(_train_db_table(result, command.strip(), time.perf_counter() - start))
    (RESULTS / "train_db.json").write_text(json.dumps(result, indent=2) + "\n")
    _train_db_plot(result)


def _hours(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    main()
