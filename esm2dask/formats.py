"""``--format bionemo2`` and ``--format hf``: the BioNeMo 2 and Hugging Face layouts.

The uf90 records, the bulk of both layouts, come from the same parse that writes the
ESM2nv rows: the task that converts a byte range (or, for input out of mapping order,
gathers a block of positions) hands its rows in memory to :meth:`Uf90Layouts.write`, so
no uf90 byte is read back from a CSV and ``--format bionemo2`` alone writes no uf90 CSV at
all. One member's way, say the uf90 row at position 1 of NVIDIA's sample
(``A0A009DWD5_ACIBA``, the only member of cluster ``UniRef50_A0A009DWD5``, mapping line 3):

1. Before any FASTA is converted, the driver makes the run's :class:`Uf90Layouts`: the
   mapping ranges (:class:`MappingSpan`), the split labels, and for ``train.db`` the
   bucket splitters (id quantiles sampled from the mapping by :func:`sample_member_ids`).
2. The converting task takes the names and sequences out of its CSV rows
   (:meth:`esm2dask.kernel.Rows.columns`), finds each row's cluster from the member counts
   of the mapping ranges that cover its positions only, and writes its ``hf`` part(s)
   (``ur50_id``, ``ur90_id``, ``sequence``; the driver then names the parts that hold rows
   ``hf/train/part-00000.parquet`` on) and its ``train.db`` run: ``(id, sequence)`` sorted
   by id and cut at the splitters.
3. ``train.db`` is written page by page (:mod:`esm2dask.sqlite_pages`): :func:`layout_train_chunk`
   sorts one id range from every run and counts the pages its rows fill; the driver gives
   each range its page numbers; :func:`write_train_chunk` writes that range's pages into the
   one database file; :func:`finish_train_db` adds the interior pages, the schema page and
   the header. No process handles more than one id range's rows.
4. :func:`write_train_clusters` streams ``train_clusters.parquet``, one row group per
   mapping range: the cluster's member ids as ``list<string>``. It needs the mapping
   alone, so its task is submitted before the conversion and runs beside it.

The validation (and test) records, a few thousand rows, come from the staged ``uf50/val``
(``uf50/test``) shards: :func:`write_bionemo2_eval` writes ``valid_clusters.parquet`` +
``validation.db``, :func:`write_hf_eval_part` ``hf/validation/part-NNNNN.parquet``. With
``--split random`` only the train-labelled clusters (and their members) go into the train
files.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from . import receipts, sqlite_pages, storage
from .errors import ConfigError, Esm2DaskError
from .layout import BIONEMO2_DIR, HF_DIR, UF50_TRAIN, UF90, shard_bounds, shard_name
from .layout import eval_splits as layout_eval_splits
from .tasks import Slice, _write_ipc, load_labels, read_slices

#: The table BioNeMo 2 queries (``SELECT sequence FROM protein WHERE id = ?``).
PROTEIN_DDL = sqlite_pages.PROTEIN_DDL
#: Rows per ``hf`` part at most: about 300 MB of UniRef90 sequence text.
PART_ROWS = 1_000_000
#: Page size of the databases (chosen by measurement: benchmarks/results/formats.md).
DB_PAGE_SIZE = sqlite_pages.DEFAULT_PAGE_SIZE
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
    """One file written: its path relative to OUT, its rows and bytes, and the SHA-256 of
    those bytes where the task that wrote them hashed them as it did ("" where not), with
    the file's modification time then (nanoseconds; 0 on an object store)."""

    path: str
    rows: int
    bytes: int
    sha256: str = ""
    mtime_ns: int = 0


@dataclass
class Uf90Parts:
    """What one converting task wrote of the other layouts: its ``hf`` parts (in row
    order; one may hold no row) and its sorted ``train.db`` run."""

    hf: list[Written] = field(default_factory=list)
    run_url: str | None = None
    #: where each ``train.db`` bucket begins in the sorted run
    bucket_bounds: list[int] = field(default_factory=list)


@dataclass
class TrainChunkReceipt:
    """One ``train.db`` id range written: where its edges file is (and, on object storage,
    its pages, uploaded for the final step to place)."""

    edges_url: str
    region_url: str | None = None


#: what ``--resume`` may read back of these stages (JSON data, see esm2dask.receipts)
receipts.register(Written, Uf90Parts, sqlite_pages.ChunkLayout, TrainChunkReceipt)


# ----------------------------------------------------------------------------- files


def _size(url: str, storage_options: dict) -> int:
    fs, path = storage.get_fs(url, storage_options)
    return int(fs.size(path))


@storage.retrying
def read_shard_rows(url: str, row_lo: int, n_rows: int | None, storage_options: dict) -> pl.DataFrame:
    """``record_id``, ``record_name``, ``sequence`` of rows ``[row_lo, row_lo + n_rows)`` of a
    staged CSV shard (all rows when ``n_rows`` is None); an empty sequence reads as ``""``."""
    frame = storage.read_csv_rows(url, row_lo, n_rows, ["record_id", "record_name", "sequence"], storage_options,
                                  schema=_CSV_SCHEMA, quote_char=None)
    return frame.with_columns(pl.col("sequence").fill_null(""))


def _string_table(frame: pl.DataFrame):
    """Arrow table of plain ``string`` columns (polars writes ``large_string``), no pandas metadata."""
    import pyarrow as pa

    table = frame.to_arrow()
    return table.cast(pa.schema([pa.field(name, pa.string()) for name in table.column_names]))


def _write_parquet(url: str, table, rows: int, storage_options: dict, row_group_rows: int | None = None) -> Written:
    """``table`` as the parquet file ``url``: built in memory, hashed there, then written
    once (:func:`esm2dask.storage.write_hashed`); its checksum needs no read of the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    # a dictionary only where values repeat (a cluster's id, once per member): the
    # encoder's attempt on unique ids and sequences cost 20 % of the write, for nothing
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_rows,
                   use_dictionary=[c for c in table.column_names if c == "ur50_id"])
    data = sink.getvalue()
    digest = storage.write_hashed(url, data, storage_options)
    mtime_ns = os.stat(storage.local_path(url)).st_mtime_ns if storage.is_local(url) else 0
    return Written(url, rows, data.size, digest, mtime_ns)


# ----------------------------------------------------------------------------- SQLite


def _sorted_distinct(frame: pl.DataFrame) -> pl.DataFrame:
    """Sorted by id (bytewise, as SQLite's BINARY collation); of a repeated id the first row."""
    return frame.sort("id", maintain_order=True).unique("id", keep="first", maintain_order=True)


def _write_db(url: str, frame: pl.DataFrame, storage_options: dict) -> int:
    """``frame`` (``id``, ``sequence``; sorted, distinct) as a database, in this process."""
    table = frame.to_arrow()
    with storage.local_build(url, storage_options) as path:
        return sqlite_pages.write_database(path, table["id"], table["sequence"], DB_PAGE_SIZE)


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


@dataclass(frozen=True)
class Uf90Layouts:
    """The ``hf/train`` parts and ``train.db`` runs a uf90 converting task writes from its
    rows (see the module notes); made by the driver, carried in the uf90 routing."""

    spans: tuple[MappingSpan, ...]
    labels: SplitLabels | None
    scratch: str
    hf: bool
    db: bool
    splitters: tuple[str, ...]
    part_rows: int
    storage_options: dict
    #: the ``train.db`` runs hold each sequence's place in the staged uf90 shards (where the
    #: rows were just written) instead of its bytes: see :func:`_run_places`
    places: bool = False

    def write(self, rows, first_position: int, name: str, placed: list) -> Uf90Parts:
        """Rows of positions ``[first_position, first_position + len(rows))`` (CSV rows with
        their ids, from the kernel) → this task's parts and run, named by ``name``; ``placed``:
        where :func:`esm2dask.tasks.write_rows` wrote them in the uf90 shards. The columns
        stay Arrow arrays from the kernel to the files (no polars round trip)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        storage_options, n = self.storage_options, len(rows)
        if self.hf or not self.places:
            names, sequences = rows.columns()
            lengths = pc.binary_length(sequences).to_numpy().astype(np.int64)
        else:  # train.db alone, of places: the sequences stay where they are
            (names, lengths), sequences = rows.names_and_lengths(), None
        places = _run_places(rows, lengths, placed) if self.db and self.places else None
        spans = [s for s in self.spans if s.first_member < first_position + n and s.first_member + s.n_members > first_position]
        ur50, cluster_positions = member_clusters(spans, first_position, first_position + n, storage_options)
        ur50 = ur50.to_arrow()
        if self.labels is not None:
            labels = load_labels(self.labels.url, storage_options)
            keep = np.asarray(labels[cluster_positions]) == self.labels.train_label
            if places is not None:
                places = {c: a[keep] for c, a in places.items()}
            keep = pa.array(keep)
            names, ur50 = names.filter(keep), ur50.filter(keep)
            sequences = None if sequences is None else sequences.filter(keep)
        receipt = Uf90Parts()
        if self.hf:
            columns = {"ur50_id": ur50, "ur90_id": names, "sequence": sequences}
            table = pa.table({c: a.cast(pa.string()) for c, a in columns.items()})
            cuts = shard_bounds(len(table), max(1, math.ceil(len(table) / self.part_rows)))
            for j, (lo, hi) in enumerate(zip(cuts[:-1].tolist(), cuts[1:].tolist())):
                url = storage.join(self.scratch, "hf-train", f"{name}-{j:03d}.parquet")
                part = table.slice(lo, hi - lo)
                receipt.hf.append(_write_parquet(url, part, hi - lo, storage_options, HF_ROW_GROUP_ROWS))
        if self.db:
            run = pa.table({"id": names, **(places or {"sequence": sequences})})
            run = run.take(pc.sort_indices(names))  # stable: of a repeated id the first row stays first
            cuts = pl.from_arrow(run["id"]).search_sorted(pl.Series(list(self.splitters), dtype=pl.String), side="left")
            receipt.run_url = storage.join(self.scratch, "runs", f"{name}.arrow")
            storage.write_arrow(receipt.run_url, run, storage_options)
            receipt.bucket_bounds = [0, *cuts.to_list(), len(run)]
        return receipt


def _run_places(rows, length: np.ndarray, placed: list) -> dict[str, np.ndarray]:
    """Where each row's sequence lies in the staged uf90 shards: ``shard``, ``at`` (its first
    byte in the shard file) and ``length``, from the cuts :func:`esm2dask.tasks.write_rows`
    placed (``(first row, end row, shard, byte offset)``) and the rows' sequence lengths
    (``length``). A ``train.db`` run of these is ~30 bytes a row instead of the sequence's
    ~300: the pages task copies the sequences out of the shards (:func:`_gather_sequences`),
    which the run has just written."""
    n = len(rows)
    if sum(hi - lo for lo, hi, _, _ in placed) != n:
        raise Esm2DaskError(f"internal: {n} uf90 rows but {len(placed)} placed cuts cover others")
    shard, at = np.empty(n, dtype=np.int32), np.empty(n, dtype=np.int64)
    starts = rows.starts
    for lo, hi, k, offset in placed:
        shard[lo:hi] = k
        # a row is "id,name,length,sequence\n": its sequence ends right before its \n
        at[lo:hi] = offset + (starts[lo + 1 : hi + 1] - starts[lo]) - 1 - length[lo:hi]
    return {"shard": shard, "at": at, "length": length}


def _gather_sequences(table, shard_urls: tuple[str, ...]):
    """The sequences of a ``train.db`` run of places (:func:`_run_places`), in its row order,
    copied out of the staged uf90 shards (in the page cache: the run wrote them) as one
    Arrow ``large_string`` array. A place where no row's sequence lies is a defect (or a
    shard changed under the run), said so, never written into the database."""
    import mmap

    import pyarrow as pa

    from .kernel import gather_sequences

    shard = table["shard"].to_numpy()
    at = table["at"].to_numpy()
    length = table["length"].to_numpy().astype(np.int64)
    offsets = np.zeros(len(length) + 1, dtype=np.int64)
    np.cumsum(length, out=offsets[1:])
    data = np.empty(int(offsets[-1]), dtype=np.uint8)
    for k in np.unique(shard).tolist():
        picked = np.flatnonzero(shard == k)
        path = storage.local_path(shard_urls[k])
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
                src = np.frombuffer(mapped, dtype=np.uint8)
                try:
                    bad = gather_sequences(data, offsets[picked], src, at[picked], length[picked])
                finally:
                    del src  # the map closes only once no view of it is left
        finally:
            os.close(fd)
        if bad >= 0:
            row = int(picked[bad])
            raise Esm2DaskError(f"{path}: no sequence of {table['id'][row].as_py()!r} at byte {int(at[row])}; "
                                f"was the staged tree changed during the run?")
    return pa.LargeStringArray.from_buffers(len(length), pa.py_buffer(offsets), pa.py_buffer(data))


def sample_member_ids(members_url: str, n_members: int, n_samples: int, seed: int, storage_options: dict) -> list[str]:
    """``n_samples`` member ids of one mapping range, drawn at random (seeded)."""
    if n_members == 0 or n_samples == 0:
        return []
    ids = read_slices([Slice(members_url, 0, n_members)], storage_options)["id"]
    rows = np.random.default_rng(seed).choice(n_members, size=min(n_samples, n_members), replace=False)
    return ids.gather(np.sort(rows)).to_list()


def _chunk_rows(slices: list[Slice], storage_options: dict):
    """One id range of every sorted run, as one Arrow table of ``id``, ``sequence`` (local runs
    memory-mapped: a column's bytes are read where a task touches them, and only then)."""
    import pyarrow as pa

    table = storage.read_arrow_slices(slices, storage_options)
    if table is None:
        return pa.table({"id": pa.array([], pa.string()), "sequence": pa.array([], pa.string())})
    return table


def _id_order(ids) -> np.ndarray:
    """Of each id's first row, in id order (bytewise), its row number: the rows sorted and distinct."""
    frame = pl.from_arrow(ids).to_frame("id")
    return (frame.with_row_index("row").sort("id", maintain_order=True)
            .unique("id", keep="first", maintain_order=True)["row"].to_numpy().astype(np.int64))


def layout_train_chunk(slices: list[Slice], first_rowid: int, order_url: str, page_size: int,
                       storage_options: dict) -> sqlite_pages.ChunkLayout:
    """Sort one id range and count the ``train.db`` pages its rows fill; keep the order. Of
    the sequences only their lengths are read (from the Arrow offsets), never their bytes."""
    import pyarrow.compute as pc

    table = _chunk_rows(slices, storage_options)
    order = _id_order(table["id"])
    storage.write_npy(order_url, order, storage_options)
    id_lengths = pc.binary_length(table["id"]).to_numpy().astype(np.int64)
    seq_lengths = (table["length"].to_numpy().astype(np.int64) if "length" in table.column_names
                   else pc.binary_length(table["sequence"]).to_numpy().astype(np.int64))
    return sqlite_pages.layout_rows(id_lengths[order], seq_lengths[order], first_rowid, page_size)


def write_train_chunk(slices: list[Slice], order_url: str, first_rowid: int, first_page: int, db_url: str,
                      edges_url: str, region_url: str, page_size: int, storage_options: dict,
                      shard_urls: tuple[str, ...] = ()) -> TrainChunkReceipt:
    """One id range's pages into the database file at their place (``pwrite``); on object
    storage into a file of their own, uploaded to ``region_url``. The edges go to ``edges_url``.
    The rows are read in id order through the saved order, not sorted into a copy; runs of
    places take their sequences from the staged uf90 shards (``shard_urls``)."""
    table = _chunk_rows(slices, storage_options)
    order = storage.read_npy(order_url, storage_options, mapped=False)  # its header without ast
    sequences = _gather_sequences(table, shard_urls) if "at" in table.column_names else table["sequence"]
    chunk = sqlite_pages.Chunk(table["id"], sequences, first_rowid, page_size, order=order)
    in_place = storage.is_local(db_url)  # pwrite at offsets into one file: a file system's alone
    if in_place:
        edges = chunk.write(storage.ensure_parent(db_url), first_page)
    else:
        with storage.local_build(region_url, storage_options) as path:
            edges = chunk.write(path, first_page, file_offset=0)
    with storage.local_build(edges_url, storage_options) as path:
        edges.save(path)
    return TrainChunkReceipt(edges_url, None if in_place else region_url)


def finish_train_db(chunks: list[TrainChunkReceipt], layouts: list[sqlite_pages.ChunkLayout], pages_url: str,
                    out_url: str, page_size: int, storage_options: dict) -> Written:
    """The interior pages, page 1 and the header into the pages file, then ``train.db`` in
    place. On object storage the ranges' pages are placed into a local file first, which is
    uploaded (see benchmarks/results/formats.md for what that costs)."""
    edges = []
    for c in chunks:
        with storage.local_source(c.edges_url, storage_options) as path:
            edges.append(sqlite_pages.ChunkEdges.load(path))
    next_page = sqlite_pages.chunk_pages_end(layouts)
    rows = sum(lay.rows for lay in layouts)
    if chunks[0].region_url is None:  # the pages were written in place (write_train_chunk)
        path, final = storage.ensure_parent(pages_url), storage.ensure_parent(out_url)
        if not os.path.exists(path) and os.path.exists(final):  # placed by an interrupted attempt
            path = final
        sqlite_pages.finish_database(path, edges, next_page, page_size)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(path, final)
        return Written(out_url, rows, os.path.getsize(final))
    with storage.local_build(out_url, storage_options) as path:
        with open(path, "wb") as f:
            for c, e in zip(chunks, edges):
                fs, src = storage.get_fs(c.region_url, storage_options)
                f.seek((sqlite_pages.file_page(e.first_page, page_size) - 1) * page_size)
                with fs.open(src, "rb") as r:
                    shutil.copyfileobj(r, f, 16 << 20)
        sqlite_pages.finish_database(path, edges, next_page, page_size)
        size = os.path.getsize(path)
    return Written(out_url, rows, size)


def write_train_clusters(spans: list[MappingSpan], labels: SplitLabels | None, out_url: str,
                         storage_options: dict) -> Written:
    """``train_clusters.parquet``: column ``ur90_id`` (``list<string>``), one row per training
    cluster in mapping order, one row group per mapping range, no pandas index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([pa.field("ur90_id", pa.list_(pa.string()))])
    label_of = load_labels(labels.url, storage_options) if labels is not None else None
    rows = 0
    with storage.local_build(out_url, storage_options) as path:
        # no dictionary: the member ids are unique (the encoder's attempt on them, for nothing)
        with pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=False) as writer:
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
    clusters = _write_parquet(clusters_url, ids, len(frame), storage_options)
    records = _sorted_distinct(frame.select(pl.col("record_name").alias("id"), pl.col("sequence").str.to_uppercase()))
    db_bytes = _write_db(db_url, records, storage_options)
    return [clusters, Written(db_url, len(records), db_bytes)]


def write_hf_eval_part(pieces: list[ShardPart], out_url: str, storage_options: dict) -> Written:
    """One ``hf/validation`` (``hf/test``) part from consecutive shard rows (``pieces``, in
    row order): ``ur50_id``, ``ur90_id`` null, ``sequence`` upper-cased."""
    frame = pl.concat([read_shard_rows(p.shard_url, p.row_lo, p.n_rows, storage_options) for p in pieces])
    table = _string_table(frame.select(
        pl.col("record_name").alias("ur50_id"),
        pl.lit(None, dtype=pl.String).alias("ur90_id"),
        pl.col("sequence").str.to_uppercase(),
    ))
    return _write_parquet(out_url, table, len(frame), storage_options, HF_ROW_GROUP_ROWS)


# ----------------------------------------------------------------------------- the driver


def train_db_buckets(config, uf90_bytes: int) -> int:
    """``train.db`` id ranges: one per partition's worth of uf90 FASTA."""
    return max(1, math.ceil(uf90_bytes / config.partition_bytes))


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
    """:func:`esm2dask.layout.eval_splits` of this run."""
    return layout_eval_splits(config.has_own_test_split)


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


class Layouts:
    """The layouts of ``--format`` other than ``esm2nv`` for one run: planned once the
    mapping is scanned (:meth:`uf90_sink`, which the uf90 conversion feeds), finished once
    the conversion is done (:meth:`finish`). Tasks are submitted early, waited for late."""

    def __init__(self, runner, staging, config, mapping, labels: SplitLabels | None, plan):
        self.runner, self.cfg, self.storage_options = runner, config, config.storage_options
        self.labels = labels
        self.tree = staging.tree_dir
        self.scratch = storage.join(staging.work_dir, "formats")
        cluster_first = np.concatenate(([0], np.cumsum([m.n_clusters for m in mapping])))
        member_first = np.concatenate(([0], np.cumsum([m.n_members for m in mapping])))
        self.spans = [
            MappingSpan(m.clusters_url, m.members_url, m.n_clusters, m.n_members,
                        int(cluster_first[i]), int(member_first[i]))
            for i, m in enumerate(mapping)
        ]
        self.n_members = int(member_first[-1])
        self.want_hf, self.want_db = "hf" in self.cfg.formats, "bionemo2" in self.cfg.formats
        self.n_buckets = train_db_buckets(config, next(i.size_bytes for i in plan.inputs if i.role == "uf90"))
        self.pending: list[tuple[str, list, object]] = []  # (stage, handles, what to do with results)
        self.clusters: list = []  # the bionemo2-train-clusters task (start)
        self.splitters: list[str] = []
        self.places = False  # train.db's runs hold places in the uf90 shards (uf90_sink)
        #: files hashed as written: (SHA-256, bytes, modification time) by path in OUT
        self.hashed: dict[str, tuple[str, int, int]] = {}

    @property
    def wanted(self) -> bool:
        return self.want_hf or self.want_db

    def uf90_sink(self, placed: bool) -> Uf90Layouts | None:
        """What the uf90 conversion tasks write besides their CSV rows (None: nothing);
        ``placed``: whether they write those rows at their place in the staged uf90 shards
        (then ``train.db``'s runs hold places, not sequences)."""
        if not self.wanted:
            return None
        self.splitters = self._splitters() if self.want_db and self.n_buckets > 1 else []
        self.places = placed
        return Uf90Layouts(tuple(self.spans), self.labels, storage.join(self.scratch, "uf90"), self.want_hf,
                           self.want_db, tuple(self.splitters), PART_ROWS, self.storage_options, placed)

    def start(self) -> None:
        """Submit what needs the mapping alone (``train_clusters.parquet``) before any FASTA is
        converted: its task runs beside the conversion instead of after it."""
        if self.want_db:
            self.clusters = self.runner.submit("bionemo2-train-clusters", [
                (self.spans, self.labels, storage.join(self.tree, BIONEMO2_DIR, "train_clusters.parquet"),
                 self.storage_options)])

    def uncached_files(self) -> tuple[str, ...]:
        """The files, relative to OUT, written past the page cache (``train.db``'s pages, see
        :class:`esm2dask.sqlite_pages._PageFile`): their checksums read them the same way."""
        return (f"{BIONEMO2_DIR}/train.db",) if self.want_db else ()

    def remove_uf90_parts(self) -> None:
        """The uf90 conversion is done again another way (the hash join): drop what the
        first attempt wrote."""
        self._remove(storage.join(self.scratch, "uf90"))

    def finish(self, rows: dict[str, int], uf90_parts: list[Uf90Parts]) -> dict[str, dict[str, int]]:
        """Write the rest of the layouts from the staged tree and the uf90 parts; drop the
        staged ESM2nv tree if it was not asked for. Returns rows and bytes by path."""
        check_row_counts(self.cfg, rows)
        self.rows = rows
        uf90_parts = [p for p in uf90_parts if p is not None]  # a block of no rows writes none
        out: dict[str, dict[str, int]] = {}
        if self.want_db:
            self.bionemo2(out)
        if self.want_hf:
            self.hf(out)
            written = [w for p in uf90_parts for w in p.hf]
            self._record(out, self._name_train_parts(written), f"{HF_DIR}/train")
        if self.want_db:
            self._record(out, [self._train_db(uf90_parts)])
        for stage, handles, collect in self.pending:
            collect(self.runner.wait(stage, handles))
        if "esm2nv" not in self.cfg.formats:
            fs, _ = storage.get_fs(self.tree, self.storage_options)
            for top in ("uf50", "uf90"):
                path = storage.get_fs(storage.join(self.tree, top), self.storage_options)[1]
                if fs.exists(path):
                    fs.rm(path, recursive=True)
        return dict(sorted(out.items()))

    def _shard_url(self, split_dir: str, shard: int) -> str:
        return storage.join(self.tree, split_dir, shard_name(shard))

    def _rel(self, url: str) -> str:
        return url[len(self.tree.rstrip("/")) + 1 :]

    def _later(self, stage: str, args_list, collect) -> None:
        self.pending.append((stage, self.runner.submit(stage, args_list), collect))

    def _record(self, out: dict, written: list[Written], folder: str | None = None) -> None:
        for w in written:
            if w.sha256:
                self.hashed[self._rel(w.path)] = (w.sha256, w.bytes, w.mtime_ns)
        if folder is None:
            for w in written:
                out[self._rel(w.path)] = {"rows": w.rows, "bytes": w.bytes}
        else:
            out[folder] = {"rows": sum(w.rows for w in written), "bytes": sum(w.bytes for w in written),
                           "files": len(written)}

    def bionemo2(self, out: dict) -> None:
        base = storage.join(self.tree, BIONEMO2_DIR)
        self.pending.append(("bionemo2-train-clusters", self.clusters, lambda results: self._record(out, results)))
        for split_dir, _, clusters_name, db_name in eval_splits(self.cfg):
            shards = [self._shard_url(split_dir, k) for k in range(self.cfg.num_csv_files)]
            self._later(f"bionemo2-{db_name.split('.')[0]}",
                        [(shards, storage.join(base, clusters_name), storage.join(base, db_name), self.storage_options)],
                        lambda results: self._record(out, results[0]))

    def _splitters(self) -> list[str]:
        """``n_buckets - 1`` member ids cutting the sorted ids into about equal ranges."""
        total = SAMPLES_PER_BUCKET * self.n_buckets
        samples = self.runner.run("bionemo2-sample-ids", [
            (s.members_url, s.n_members, math.ceil(total * s.n_members / max(1, self.n_members)), i, self.storage_options)
            for i, s in enumerate(self.spans)
        ])
        pooled = sorted(set(x for sample in samples for x in sample))
        picked = [pooled[j * len(pooled) // self.n_buckets] for j in range(1, self.n_buckets)] if pooled else []
        return sorted(set(picked))

    def hf(self, out: dict) -> None:
        for split_dir, split, _, _ in eval_splits(self.cfg):
            # parts sized by rows, not by esm2nv shard: 50 validation rows are one part
            parts = plan_row_parts(self.rows[split_dir], self.cfg.num_csv_files, PART_ROWS)
            self._later(f"hf-{split}", [
                ([ShardPart(i, self._shard_url(split_dir, k), lo, n) for k, lo, n in pieces],
                 storage.join(self.tree, HF_DIR, split, hf_part_name(i)), self.storage_options)
                for i, pieces in enumerate(parts)
            ], lambda results, split=split: self._record(out, results, f"{HF_DIR}/{split}"))

    def _train_db(self, parts: list[Uf90Parts]) -> Written:
        """``train.db`` from the sorted runs, one id range per task (esm2dask.sqlite_pages).
        Rowids follow id order; each range's first is 1 + the rows of the ranges before it
        (counted before repeated ids are dropped, so a repeat leaves a gap, never a clash)."""
        n = len(self.splitters) + 1
        slices = [[Slice(p.run_url, p.bucket_bounds[b], p.bucket_bounds[b + 1]) for p in parts] for b in range(n)]
        counts = [sum(s.hi - s.lo for s in ss) for ss in slices]
        first_rowids = (1 + np.concatenate(([0], np.cumsum(counts)[:-1]))).astype(int).tolist()
        scratch = storage.join(self.scratch, "train-db")
        order = [storage.join(scratch, "order", f"{b:05d}.npy") for b in range(n)]
        layouts = self.runner.run("bionemo2-train-layout", [
            (slices[b], first_rowids[b], order[b], DB_PAGE_SIZE, self.storage_options) for b in range(n)
        ])
        firsts = sqlite_pages.plan_pages(layouts)
        pages_url = storage.join(scratch, "train.db.pages")
        out_url = storage.join(self.tree, BIONEMO2_DIR, "train.db")
        shards = tuple(self._shard_url(UF90, k) for k in range(self.cfg.num_csv_files)) if self.places else ()
        chunks = self.runner.run("bionemo2-train-pages", [
            (slices[b], order[b], first_rowids[b], firsts[b], pages_url,
             storage.join(scratch, "edges", f"{b:05d}.bin"), storage.join(scratch, "regions", f"{b:05d}.pages"),
             DB_PAGE_SIZE, self.storage_options, shards)
            for b in range(n)
        ])
        self._remove(storage.join(self.scratch, "uf90", "runs"))
        (train_db,) = self.runner.run("bionemo2-train-db", [
            (chunks, layouts, pages_url, out_url, DB_PAGE_SIZE, self.storage_options)
        ])
        self._remove(scratch)
        return train_db

    def _name_train_parts(self, written: list[Written]) -> list[Written]:
        """Move the parts that have rows to ``hf/train/part-00000.parquet`` on (with
        ``--split random`` a part may hold no training member, and ``datasets`` cannot
        read an empty part). A part already moved by an interrupted run stays."""
        named = []
        for j, w in enumerate(x for x in written if x.rows):
            target = storage.join(self.tree, HF_DIR, "train", hf_part_name(j))
            fs, src = storage.get_fs(w.path, self.storage_options)
            if fs.exists(src):
                dest = storage.get_fs(target, self.storage_options)[1]
                fs.makedirs(fs._parent(dest), exist_ok=True)
                fs.mv(src, dest)
            named.append(Written(target, w.rows, w.bytes, w.sha256, w.mtime_ns))
        return named

    def _remove(self, url: str) -> None:
        """Scratch files no stage needs any more (a resumed run skips the stages that read them)."""
        fs, path = storage.get_fs(url, self.storage_options)
        if fs.exists(path):
            fs.rm(path, recursive=True)
