"""``--format bionemo2`` and ``--format hf``: the BioNeMo 2 and Hugging Face layouts.

Both are derived from the staged ESM2nv tree of the same run (the FASTAs are read once),
as extra Dask stages after :meth:`esm2dask.preprocess._Run._assemble`. One member's way,
say the uf90 row at position 1 of NVIDIA's sample (``A0A009DWD5_ACIBA``, the only member
of cluster ``UniRef50_A0A009DWD5``, mapping line 3):

1. The driver cuts every uf90 shard into parts of at most :data:`PART_ROWS` rows and
   hands each part the mapping ranges that cover its positions (:class:`MappingSpan`).
2. :func:`derive_uf90_part` reads the part's rows from ``uf90/uf90_csvs/x###.csv`` and
   finds each row's cluster from the clusters' member counts of those ranges only. It
   writes an ``hf`` part (``ur50_id``, ``ur90_id``, ``sequence``; the driver then names
   the parts that hold rows ``hf/train/part-00000.parquet`` on) and,
   for ``train.db``, an Arrow run of ``(id, sequence)`` sorted by id and cut at the
   bucket splitters (id quantiles sampled from the mapping by :func:`sample_member_ids`).
3. :func:`build_bucket_db` sorts one id range from every run into a small SQLite file;
   :func:`merge_databases` copies them, in id order, into ``bionemo2/train.db`` inside
   SQLite (``INSERT … SELECT`` from each attached bucket): the single writer runs no
   Python per row, and every insert appends to the primary-key index.
4. :func:`write_train_clusters` streams ``train_clusters.parquet``, one row group per
   mapping range: the cluster's member ids as ``list<string>``.

The validation (and test) records come from ``uf50/val`` (``uf50/test``):
:func:`write_bionemo2_eval` writes ``valid_clusters.parquet`` + ``validation.db``,
:func:`write_hf_eval_part` ``hf/validation/part-NNNNN.parquet``. With ``--split random``
only the train-labelled clusters (and their members) go into the train files.
"""

from __future__ import annotations

import io
import math
import os
import sqlite3
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from . import npyfile, receipts, storage
from .errors import ConfigError, Esm2DaskError
from .layout import BIONEMO2_DIR, HF_DIR, UF50_TEST, UF50_TRAIN, UF50_VAL, UF90, shard_bounds, shard_name
from .tasks import Slice, _write_ipc, read_slices

#: The table BioNeMo 2 queries (``SELECT sequence FROM protein WHERE id = ?``).
PROTEIN_DDL = "CREATE TABLE protein (id TEXT PRIMARY KEY, sequence TEXT)"
#: Rows per ``hf`` part at most: about 300 MB of UniRef90 sequence text.
PART_ROWS = 1_000_000
#: Rows per ``executemany`` call of a loading transaction.
INSERT_BATCH_ROWS = 200_000
#: Id samples per ``train.db`` bucket drawn for the splitters (the buckets come out
#: within a few per cent of equal size).
SAMPLES_PER_BUCKET = 64
#: Rows per row group of the ``hf`` parts (a reader streams one at a time).
HF_ROW_GROUP_ROWS = 100_000

_CSV_SCHEMA = {"record_id": pl.Int64, "record_name": pl.String, "sequence_length": pl.Int64, "sequence": pl.String}


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class MappingSpan:
    """One mapping range's Arrow files and the positions its clusters and members start at."""

    clusters_url: str
    members_url: str
    n_clusters: int
    n_members: int
    first_cluster: int
    first_member: int


@dataclass(frozen=True)
class SplitLabels:
    """``--split random``: the label of every cluster position, and the training label."""

    url: str
    train_label: int


@dataclass(frozen=True)
class ShardPart:
    """Rows ``[row_lo, row_lo + n_rows)`` of one staged CSV shard; ``index`` names its part."""

    index: int
    shard_url: str
    row_lo: int
    n_rows: int


@dataclass
class Written:
    """One file written: its path relative to OUT, its rows and bytes."""

    path: str
    rows: int
    bytes: int


@dataclass
class PartReceipt:
    hf: Written | None = None
    run_url: str = ""
    #: where each ``train.db`` bucket begins in the part's sorted run
    bucket_bounds: list[int] = field(default_factory=list)


#: what ``--resume`` may read back of these stages (JSON data, see esm2dask.receipts)
receipts.register(Written, PartReceipt)


# ----------------------------------------------------------------------------- files


@contextmanager
def _local_target(url: str, storage_options: dict):
    """A local path to build ``url`` at: a temporary name beside it, renamed when complete
    (a repeated attempt never sees half a file); elsewhere a temporary file, uploaded."""
    if storage.is_local(url):
        path = storage.local_path(url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    with tempfile.TemporaryDirectory(prefix="esm2dask-") as folder:
        tmp = os.path.join(folder, url.rsplit("/", 1)[-1])
        yield tmp
        fs, path = storage.get_fs(url, storage_options)
        fs.makedirs(fs._parent(path), exist_ok=True)
        fs.put_file(tmp, path)


@contextmanager
def _local_source(url: str, storage_options: dict):
    """A local path holding ``url``'s bytes (the file itself on a file system)."""
    if storage.is_local(url):
        yield storage.local_path(url)
        return
    with tempfile.TemporaryDirectory(prefix="esm2dask-") as folder:
        tmp = os.path.join(folder, url.rsplit("/", 1)[-1])
        fs, path = storage.get_fs(url, storage_options)
        fs.get_file(path, tmp)
        yield tmp


def _size(url: str, storage_options: dict) -> int:
    fs, path = storage.get_fs(url, storage_options)
    return int(fs.size(path))


@storage.retrying
def read_shard_rows(url: str, row_lo: int, n_rows: int | None, storage_options: dict) -> pl.DataFrame:
    """``record_id``, ``record_name``, ``sequence`` of rows ``[row_lo, row_lo + n_rows)`` of a
    staged CSV shard (all rows when ``n_rows`` is None); an empty sequence reads as ``""``."""
    columns = ["record_id", "record_name", "sequence"]
    if storage.is_local(url):
        frame = pl.scan_csv(storage.local_path(url), schema=_CSV_SCHEMA, quote_char=None, glob=False)
        if n_rows is not None:
            frame = frame.slice(row_lo, n_rows)
        frame = frame.select(columns).collect()
    else:
        fs, path = storage.get_fs(url, storage_options)
        with fs.open(path, "rb") as f:
            data = f.read()
        frame = pl.read_csv(io.BytesIO(data), schema=_CSV_SCHEMA, quote_char=None, columns=columns)
        frame = frame.slice(row_lo, n_rows)
    return frame.with_columns(pl.col("sequence").fill_null(""))


def _load_labels(labels: SplitLabels, storage_options: dict) -> np.ndarray:
    return npyfile.load(labels.url, storage_options)  # not np.load: see npyfile


def _string_table(frame: pl.DataFrame):
    """Arrow table of plain ``string`` columns (polars writes ``large_string``), no pandas metadata."""
    import pyarrow as pa

    table = frame.to_arrow()
    return table.cast(pa.schema([pa.field(name, pa.string()) for name in table.column_names]))


def _write_parquet(url: str, table, storage_options: dict, row_group_rows: int | None = None) -> int:
    import pyarrow.parquet as pq

    with _local_target(url, storage_options) as path:
        pq.write_table(table, path, compression="zstd", row_group_size=row_group_rows)
        size = os.path.getsize(path)
    return size


# ----------------------------------------------------------------------------- SQLite


def _open_for_loading(path: str) -> sqlite3.Connection:
    """A new database with the ``protein`` table, set up for bulk loading: no rollback
    journal, no fsync (a failed load is thrown away whole, never repaired)."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute(PROTEIN_DDL)
    return con


def _close_loaded(con: sqlite3.Connection) -> None:
    """Leave the file in ``journal_mode=DELETE``: readable from read-only storage."""
    mode = con.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
    con.close()
    if mode != "delete":
        raise Esm2DaskError(f"SQLite kept journal_mode={mode!r}, expected 'delete'")


def _insert_sorted(con: sqlite3.Connection, frame: pl.DataFrame) -> None:
    """``frame`` (``id``, ``sequence``; sorted by id, ids distinct) in one transaction."""
    con.execute("BEGIN")
    for batch in frame.iter_slices(INSERT_BATCH_ROWS):
        con.executemany(
            "INSERT INTO protein (id, sequence) VALUES (?, ?)",
            zip(batch["id"].to_list(), batch["sequence"].to_list()),
        )
    con.execute("COMMIT")


def _sorted_distinct(frame: pl.DataFrame) -> pl.DataFrame:
    """Sorted by id (bytewise, as SQLite's BINARY collation); of a repeated id the first row."""
    return frame.sort("id", maintain_order=True).unique("id", keep="first", maintain_order=True)


def _write_db(url: str, frame: pl.DataFrame, storage_options: dict) -> int:
    with _local_target(url, storage_options) as path:
        con = _open_for_loading(path)
        _insert_sorted(con, frame)
        _close_loaded(con)
        size = os.path.getsize(path)
    return size


# ----------------------------------------------------------------------------- tasks


def member_clusters(spans: list[MappingSpan], lo: int, hi: int, storage_options: dict):
    """Cluster id and cluster position of every member position in ``[lo, hi)``, from
    the member counts of the covering mapping ranges (``spans``) only."""
    ids, positions, covered = [], [], 0
    for s in spans:
        a, b = max(lo, s.first_member), min(hi, s.first_member + s.n_members)
        if a >= b:
            continue
        clusters = read_slices([Slice(s.clusters_url, 0, s.n_clusters)], storage_options)
        ends = np.cumsum(clusters["count"].to_numpy().astype(np.int64)) + s.first_member
        local = np.searchsorted(ends, np.arange(a, b, dtype=np.int64), side="right")
        ids.append(clusters["id"].gather(local))
        positions.append(local + s.first_cluster)
        covered += b - a
    if covered != hi - lo:
        raise Esm2DaskError(f"internal: mapping ranges cover {covered} of member positions {lo}…{hi}")
    if not ids:
        return pl.Series("id", [], dtype=pl.String), np.zeros(0, dtype=np.int64)
    return pl.concat(ids), np.concatenate(positions)


def derive_uf90_part(
    part: ShardPart,
    first_position: int,
    spans: list[MappingSpan],
    labels: SplitLabels | None,
    hf_url: str | None,
    run_url: str | None,
    splitters: list[str],
    storage_options: dict,
) -> PartReceipt:
    """One part of a uf90 shard → its ``hf/train`` part and/or its sorted ``train.db`` run."""
    frame = read_shard_rows(part.shard_url, part.row_lo, part.n_rows, storage_options)
    want = np.arange(first_position + 1, first_position + part.n_rows + 1)
    if len(frame) != part.n_rows or not np.array_equal(frame["record_id"].to_numpy(), want):
        raise Esm2DaskError(
            f"{part.shard_url}: rows {part.row_lo}…{part.row_lo + part.n_rows} do not hold record_id "
            f"{first_position + 1}…{first_position + part.n_rows} (the staged tree changed during the run?)"
        )
    ur50, cluster_positions = member_clusters(spans, first_position, first_position + part.n_rows, storage_options)
    if labels is not None:
        keep = np.asarray(_load_labels(labels, storage_options)[cluster_positions]) == labels.train_label
        frame, ur50 = frame.filter(pl.Series(keep)), ur50.filter(pl.Series(keep))
    receipt = PartReceipt()
    if hf_url is not None:
        table = _string_table(pl.DataFrame({
            "ur50_id": ur50, "ur90_id": frame["record_name"], "sequence": frame["sequence"],
        }))
        size = _write_parquet(hf_url, table, storage_options, HF_ROW_GROUP_ROWS)
        receipt.hf = Written(hf_url, len(frame), size)
    if run_url is not None:
        run = frame.select(pl.col("record_name").alias("id"), "sequence").sort("id", maintain_order=True)
        cuts = run["id"].search_sorted(pl.Series(splitters, dtype=pl.String), side="left").to_list()
        _write_ipc(run_url, run, storage_options)
        receipt.run_url = run_url
        receipt.bucket_bounds = [0, *cuts, len(run)]
    return receipt


def sample_member_ids(members_url: str, n_members: int, n_samples: int, seed: int, storage_options: dict) -> list[str]:
    """``n_samples`` member ids of one mapping range, drawn at random (seeded)."""
    if n_members == 0 or n_samples == 0:
        return []
    ids = read_slices([Slice(members_url, 0, n_members)], storage_options)["id"]
    rows = np.random.default_rng(seed).choice(n_members, size=min(n_samples, n_members), replace=False)
    return ids.gather(np.sort(rows)).to_list()


def build_bucket_db(slices: list[Slice], db_url: str, storage_options: dict) -> int:
    """One id range of every sorted run → a small ``protein`` database in id order."""
    frame = read_slices(slices, storage_options)
    if frame is None:
        frame = pl.DataFrame(schema={"id": pl.String, "sequence": pl.String})
    frame = _sorted_distinct(frame)
    _write_db(db_url, frame, storage_options)
    return len(frame)


def merge_databases(db_urls: list[str], out_url: str, storage_options: dict) -> Written:
    """The bucket databases, in id order, into one: each copied by SQLite itself in one
    transaction (``INSERT … SELECT`` from the attached file, in its rowid = id order)."""
    rows = 0
    with _local_target(out_url, storage_options) as path:
        con = _open_for_loading(path)
        for url in db_urls:
            with _local_source(url, storage_options) as src:
                con.execute("ATTACH DATABASE ? AS bucket", (src,))
                con.execute("BEGIN")
                cursor = con.execute(
                    "INSERT INTO protein (id, sequence) SELECT id, sequence FROM bucket.protein ORDER BY rowid"
                )
                rows += cursor.rowcount
                con.execute("COMMIT")
                con.execute("DETACH DATABASE bucket")
        _close_loaded(con)
        size = os.path.getsize(path)
    return Written(out_url, rows, size)


def write_train_clusters(spans: list[MappingSpan], labels: SplitLabels | None, out_url: str,
                         storage_options: dict) -> Written:
    """``train_clusters.parquet``: column ``ur90_id`` (``list<string>``), one row per training
    cluster in mapping order, one row group per mapping range, no pandas index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([pa.field("ur90_id", pa.list_(pa.string()))])
    label_of = _load_labels(labels, storage_options) if labels is not None else None
    rows = 0
    with _local_target(out_url, storage_options) as path:
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            for s in spans:
                if s.n_clusters == 0:
                    continue
                counts = read_slices([Slice(s.clusters_url, 0, s.n_clusters)], storage_options)["count"].to_numpy()
                members = read_slices([Slice(s.members_url, 0, s.n_members)], storage_options)["id"]
                offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int32)
                lists = pa.ListArray.from_arrays(pa.array(offsets), members.to_arrow().cast(pa.string()))
                if label_of is not None:
                    keep = np.asarray(label_of[s.first_cluster : s.first_cluster + s.n_clusters]) == labels.train_label
                    lists = lists.filter(pa.array(keep))
                if len(lists):
                    writer.write_table(pa.table({"ur90_id": lists}, schema=schema))
                    rows += len(lists)
        size = os.path.getsize(path)
    return Written(out_url, rows, size)


def write_bionemo2_eval(shard_urls: list[str], clusters_url: str, db_url: str,
                        storage_options: dict) -> list[Written]:
    """``valid_clusters.parquet`` (``ur50_id``, one row per record in order) and its
    database keyed by those ids, sequences upper-cased; a repeated id keeps its first."""
    frame = pl.concat([read_shard_rows(u, 0, None, storage_options) for u in shard_urls])
    ids = _string_table(frame.select(pl.col("record_name").alias("ur50_id")))
    clusters_bytes = _write_parquet(clusters_url, ids, storage_options)
    records = _sorted_distinct(frame.select(pl.col("record_name").alias("id"), pl.col("sequence").str.to_uppercase()))
    db_bytes = _write_db(db_url, records, storage_options)
    return [Written(clusters_url, len(frame), clusters_bytes), Written(db_url, len(records), db_bytes)]


def write_hf_eval_part(pieces: list[ShardPart], out_url: str, storage_options: dict) -> Written:
    """One ``hf/validation`` (``hf/test``) part from consecutive shard rows (``pieces``, in
    row order): ``ur50_id``, ``ur90_id`` null, ``sequence`` upper-cased."""
    frame = pl.concat([read_shard_rows(p.shard_url, p.row_lo, p.n_rows, storage_options) for p in pieces])
    table = _string_table(frame.select(
        pl.col("record_name").alias("ur50_id"),
        pl.lit(None, dtype=pl.String).alias("ur90_id"),
        pl.col("sequence").str.to_uppercase(),
    ))
    return Written(out_url, len(frame), _write_parquet(out_url, table, storage_options, HF_ROW_GROUP_ROWS))


# ----------------------------------------------------------------------------- the driver


def plan_parts(n_rows: int, num_files: int, max_rows: int) -> list[tuple[int, int, int]]:
    """``(shard, row_lo, n_rows)`` of every part: each non-empty shard cut into the fewest
    parts of at most ``max_rows`` rows (so that no part is empty).

    >>> plan_parts(7, 3, max_rows=2)
    [(0, 0, 2), (0, 2, 1), (1, 0, 2), (2, 0, 2)]
    """
    bounds = shard_bounds(n_rows, num_files)
    parts = []
    for shard in range(num_files):
        rows = int(bounds[shard + 1] - bounds[shard])
        if rows == 0:
            continue
        cuts = shard_bounds(rows, math.ceil(rows / max_rows))
        parts += [(shard, int(a), int(b - a)) for a, b in zip(cuts[:-1], cuts[1:])]
    return parts


def hf_part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def plan_row_parts(n_rows: int, num_files: int, max_rows: int) -> list[list[tuple[int, int, int]]]:
    """The pieces ``(shard, row_lo, n_rows)`` of every part when a split's rows are cut
    into the fewest parts of at most ``max_rows`` rows, whatever the shards: 50 rows in
    50 shards make one part of 50 pieces; no part is empty, none is made for no rows.

    >>> plan_row_parts(5, 5, max_rows=3)
    [[(0, 0, 1), (1, 0, 1), (2, 0, 1)], [(3, 0, 1), (4, 0, 1)]]
    >>> plan_row_parts(0, 50, max_rows=3)
    []
    """
    shards = shard_bounds(n_rows, num_files)
    cuts = shard_bounds(n_rows, math.ceil(n_rows / max_rows)) if n_rows else np.zeros(1, dtype=np.int64)
    parts = []
    for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        pieces = []
        for shard in range(num_files):
            a, b = max(lo, int(shards[shard])), min(hi, int(shards[shard + 1]))
            if a < b:
                pieces.append((shard, a - int(shards[shard]), b - a))
        parts.append(pieces)
    return parts


def eval_splits(config) -> list[tuple[str, str, str, str]]:
    """``(esm2nv folder, hf split, bionemo2 clusters file, bionemo2 database)`` of each
    evaluation split to write: validation, and test where it is its own data."""
    splits = [(UF50_VAL, "validation", "valid_clusters.parquet", "validation.db")]
    if config.has_own_test_split:
        splits.append((UF50_TEST, "test", "test_clusters.parquet", "test.db"))
    return splits


def check_row_counts(config, rows: dict[str, int]) -> None:
    """BioNeMo 2 draws an epoch permutation of each clusters file: it needs 2 rows.
    ``datasets`` cannot load a split without rows."""
    if "bionemo2" in config.formats:
        for split_dir, what in [(UF50_TRAIN, "train_clusters.parquet"),
                                *[(s[0], s[2]) for s in eval_splits(config)]]:
            if rows[split_dir] < 2:
                raise ConfigError(
                    f"--format bionemo2: {what} would have {rows[split_dir]} row(s) ({split_dir} has "
                    f"{rows[split_dir]}); BioNeMo 2's reader needs at least 2"
                )
    if "hf" in config.formats:
        for split_dir, split, _, _ in eval_splits(config):
            if rows[split_dir] == 0:
                raise ConfigError(f"--format hf: the {split} split would be empty ({split_dir} has no rows)")


def derive_layouts(run, mapping, labels: SplitLabels | None, rows: dict[str, int],
                   sizes: dict[str, int]) -> dict[str, dict[str, int]]:
    """Write the layouts of ``--format`` other than ``esm2nv`` from ``run``'s staged tree;
    drop the staged ESM2nv tree if it was not asked for. Returns rows and bytes by path."""
    cfg = run.config
    check_row_counts(cfg, rows)
    out: dict[str, dict[str, int]] = {}
    if set(cfg.formats) - {"esm2nv"}:
        derivation = _Derivation(run, mapping, labels, rows, sizes)
        if "bionemo2" in cfg.formats:
            derivation.bionemo2(out)
        if "hf" in cfg.formats:
            derivation.hf(out)
        derivation.finish(out)
    if "esm2nv" not in cfg.formats:
        fs, _ = storage.get_fs(run.staging.tree_dir, run.so)
        for top in ("uf50", "uf90"):
            path = storage.get_fs(storage.join(run.staging.tree_dir, top), run.so)[1]
            if fs.exists(path):
                fs.rm(path, recursive=True)
    return dict(sorted(out.items()))


class _Derivation:
    """The stages of one run's extra layouts; tasks are submitted early, waited for late."""

    def __init__(self, run, mapping, labels, rows, sizes):
        self.run, self.cfg, self.so = run, run.config, run.so
        self.labels, self.rows = labels, rows
        self.tree = run.staging.tree_dir
        self.scratch = storage.join(run.work, "formats")
        cluster_first = np.concatenate(([0], np.cumsum([m.n_clusters for m in mapping])))
        member_first = np.concatenate(([0], np.cumsum([m.n_members for m in mapping])))
        self.spans = [
            MappingSpan(m.clusters_url, m.members_url, m.n_clusters, m.n_members,
                        int(cluster_first[i]), int(member_first[i]))
            for i, m in enumerate(mapping)
        ]
        self.n_members = int(member_first[-1])
        self.uf90_bytes = sizes.get(UF90, 0)
        self.pending: list[tuple[str, list, object]] = []  # (stage, handles, what to do with results)

    def _shard_url(self, split_dir: str, shard: int) -> str:
        return storage.join(self.tree, split_dir, shard_name(shard))

    def _rel(self, url: str) -> str:
        return url[len(self.tree.rstrip("/")) + 1 :]

    def _later(self, stage: str, fn, args_list, collect) -> None:
        self.pending.append((stage, self.run._submit(stage, fn, args_list), collect))

    def _record(self, out: dict, written: list[Written], folder: str | None = None) -> None:
        if folder is None:
            for w in written:
                out[self._rel(w.path)] = {"rows": w.rows, "bytes": w.bytes}
        else:
            out[folder] = {"rows": sum(w.rows for w in written), "bytes": sum(w.bytes for w in written),
                           "files": len(written)}

    def bionemo2(self, out: dict) -> None:
        base = storage.join(self.tree, BIONEMO2_DIR)
        self._later("bionemo2-train-clusters", write_train_clusters,
                    [(self.spans, self.labels, storage.join(base, "train_clusters.parquet"), self.so)],
                    lambda results: self._record(out, results))
        for split_dir, _, clusters_name, db_name in eval_splits(self.cfg):
            shards = [self._shard_url(split_dir, k) for k in range(self.cfg.num_csv_files)]
            self._later(f"bionemo2-{db_name.split('.')[0]}", write_bionemo2_eval,
                        [(shards, storage.join(base, clusters_name), storage.join(base, db_name), self.so)],
                        lambda results: self._record(out, results[0]))
        self.n_buckets = max(1, math.ceil(self.uf90_bytes / self.cfg.partition_bytes))
        self.splitters = self._splitters() if self.n_buckets > 1 else []

    def _splitters(self) -> list[str]:
        """``n_buckets - 1`` member ids cutting the sorted ids into about equal ranges."""
        total = SAMPLES_PER_BUCKET * self.n_buckets
        samples = self.run._run("bionemo2-sample-ids", sample_member_ids, [
            (s.members_url, s.n_members, math.ceil(total * s.n_members / max(1, self.n_members)), i, self.so)
            for i, s in enumerate(self.spans)
        ])
        pooled = sorted(set(x for sample in samples for x in sample))
        picked = [pooled[j * len(pooled) // self.n_buckets] for j in range(1, self.n_buckets)] if pooled else []
        return sorted(set(picked))

    def hf(self, out: dict) -> None:
        for split_dir, split, _, _ in eval_splits(self.cfg):
            # parts sized by rows, not by esm2nv shard: 50 validation rows are one part
            parts = plan_row_parts(self.rows[split_dir], self.cfg.num_csv_files, PART_ROWS)
            self._later(f"hf-{split}", write_hf_eval_part, [
                ([ShardPart(i, self._shard_url(split_dir, k), lo, n) for k, lo, n in pieces],
                 storage.join(self.tree, HF_DIR, split, hf_part_name(i)), self.so)
                for i, pieces in enumerate(parts)
            ], lambda results, split=split: self._record(out, results, f"{HF_DIR}/{split}"))

    def finish(self, out: dict) -> None:
        """The uf90 parts (``hf/train`` and the ``train.db`` runs), then ``train.db``."""
        want_hf, want_db = "hf" in self.cfg.formats, "bionemo2" in self.cfg.formats
        bounds = shard_bounds(self.n_members, self.cfg.num_csv_files)
        args = []
        for i, (k, lo, n) in enumerate(plan_parts(self.n_members, self.cfg.num_csv_files, PART_ROWS)):
            first = int(bounds[k]) + lo
            spans = [s for s in self.spans if s.first_member < first + n and s.first_member + s.n_members > first]
            args.append((
                ShardPart(i, self._shard_url(UF90, k), lo, n), first, spans, self.labels,
                storage.join(self.scratch, "hf-train", f"{i:05d}.parquet") if want_hf else None,
                storage.join(self.scratch, "runs", f"{i:05d}.arrow") if want_db else None,
                self.splitters if want_db else [], self.so,
            ))
        parts = self.run._run("uf90-parts", derive_uf90_part, args)
        if want_hf:
            self._record(out, self._name_train_parts([p.hf for p in parts]), f"{HF_DIR}/train")
        if want_db:
            buckets = [storage.join(self.scratch, "buckets", f"{b:05d}.db") for b in range(len(self.splitters) + 1)]
            self.run._run("bionemo2-bucket-db", build_bucket_db, [
                ([Slice(p.run_url, p.bucket_bounds[b], p.bucket_bounds[b + 1]) for p in parts], url, self.so)
                for b, url in enumerate(buckets)
            ])
            self._remove(storage.join(self.scratch, "runs"))
            (train_db,) = self.run._run("bionemo2-train-db", merge_databases, [
                (buckets, storage.join(self.tree, BIONEMO2_DIR, "train.db"), self.so)
            ])
            self._remove(storage.join(self.scratch, "buckets"))
            self._record(out, [train_db])
        for stage, handles, collect in self.pending:
            collect(self.run._wait(stage, handles))

    def _name_train_parts(self, written: list[Written]) -> list[Written]:
        """Move the parts that have rows to ``hf/train/part-00000.parquet`` on (with
        ``--split random`` a part may hold no training member, and ``datasets`` cannot
        read an empty part). A part already moved by an interrupted run stays."""
        named = []
        for j, w in enumerate(x for x in written if x.rows):
            target = storage.join(self.tree, HF_DIR, "train", hf_part_name(j))
            fs, src = storage.get_fs(w.path, self.so)
            if fs.exists(src):
                dest = storage.get_fs(target, self.so)[1]
                fs.makedirs(fs._parent(dest), exist_ok=True)
                fs.mv(src, dest)
            named.append(Written(target, w.rows, w.bytes))
        return named

    def _remove(self, url: str) -> None:
        """Scratch files no stage needs any more (a resumed run skips the stages that read them)."""
        fs, path = storage.get_fs(url, self.so)
        if fs.exists(path):
            fs.rm(path, recursive=True)
