"""The functions that run as Dask tasks, and the small records they take and return.

Every task reads its own bytes, writes its own output under the run's work folder and
returns a receipt of a few numbers and paths. No record ever travels back to the driver.

One record's way from input to output (v1.10 layout, input already in mapping order):

1. :func:`scan_mapping` parses the mapping lines of one byte range into two Arrow files,
   the clusters (id, member count) and the flattened member ids, and returns their counts.
2. :func:`count_fasta` counts the records of one FASTA byte range; the driver turns the
   counts into each range's first position.
3. :func:`convert_in_order` parses the range, checks that its names are the mapping's ids
   at the same positions, and :func:`write_pieces` writes the rows as CSV pieces, one
   per output shard the range touches (``pieces/uf90/uf90_csvs/017/000000123456.csv``).
4. :func:`assemble_shard` concatenates a shard's pieces, in position order, under the
   header into ``uf90/uf90_csvs/x017.csv``.

When the order does not hold, steps 3–4 go through a hash join instead:
:func:`bucket_ids` and :func:`bucket_fasta` partition ids and records by hash of the id,
:func:`join_bucket` joins one bucket and sorts it by position, and :func:`gather_block`
collects one block of consecutive positions from every bucket and writes its pieces.
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from . import receipts, storage
from .errors import InputError
from .fasta import count_records, parse_block
from .layout import CSV_HEADER, shard_bounds, shard_name
from .mapping import line_number, parse_mapping_block
from .ranges import ByteRange, read_owned_bytes

COPY_CHUNK_BYTES = 8 * 1024 * 1024


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Target:
    """One output folder a stream's rows go to.

    ``label`` is None when every position goes there (record ordinal = position);
    otherwise only positions whose split label equals it (random split).
    """

    split_dir: str
    n_rows: int
    label: int | None = None


@dataclass(frozen=True)
class Routing:
    """Where a stream's rows go: its targets, the shard count and the run's folders."""

    targets: tuple[Target, ...]
    num_files: int
    work_dir: str
    labels_url: str | None = None
    storage_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Slice:
    """Rows ``[lo, hi)`` of an Arrow file."""

    url: str
    lo: int
    hi: int


@dataclass
class MappingReceipt:
    index: int
    clusters_url: str
    members_url: str
    n_clusters: int
    n_members: int
    #: per kind ("clusters", "members"): sorted 64-bit hashes of the ids, and where each
    #: hash bucket begins in them
    hash_urls: dict = field(default_factory=dict)
    hash_bounds: dict = field(default_factory=dict)


@dataclass
class FastReceipt:
    ok: bool
    n_rows: int
    mismatch: str = ""


@dataclass
class BucketReceipt:
    url: str
    bounds: list[int]


@dataclass
class JoinReceipt:
    url: str
    block_bounds: list[int]
    n_fasta: int
    n_duplicates: int
    n_unnamed: int
    missing: list[str]
    n_missing: int


#: what ``--resume`` may read back (as JSON data, never code): one line per new receipt type
receipts.register(MappingReceipt, FastReceipt, BucketReceipt, JoinReceipt)


# ----------------------------------------------------------------------------- helpers


#: Rows per record batch of the Arrow files: a reader of a slice on an object store
#: fetches only the batches it needs (ranged reads), not the whole file.
IPC_BATCH_ROWS = 1 << 16


@storage.retrying
def _write_ipc(url: str, frame: pl.DataFrame, storage_options: dict) -> None:
    import pyarrow.ipc as ipc

    table = frame.to_arrow().combine_chunks()
    with storage.open_for_write(url, storage_options) as f, ipc.new_file(f, table.schema) as writer:
        writer.write_table(table, max_chunksize=IPC_BATCH_ROWS)


@storage.retrying
def _read_ipc(url: str, storage_options: dict) -> pl.DataFrame:
    if storage.is_local(url):
        return pl.read_ipc(storage.local_path(url))
    fs, path = storage.get_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        return pl.read_ipc(io.BytesIO(f.read()))


def read_slices(slices, storage_options: dict) -> pl.DataFrame | None:
    """Rows ``[lo, hi)`` of each Arrow file, concatenated; None if there are none.

    Local files are memory-mapped and remote ones read batch by batch, so a slice costs
    what it holds, not the whole file.
    """
    import pyarrow as pa
    import pyarrow.ipc as ipc

    tables = []
    for s in slices:
        if s.hi <= s.lo:
            continue
        if storage.is_local(s.url):
            with pa.memory_map(storage.local_path(s.url)) as src:
                tables.append(ipc.open_file(src).read_all().slice(s.lo, s.hi - s.lo))
        else:
            tables.append(_read_remote_slice(s, storage_options))
    if not tables:
        return None
    return pl.from_arrow(pa.concat_tables(tables, promote_options="permissive"))


@storage.retrying
def _read_remote_slice(s: "Slice", storage_options: dict):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    fs, path = storage.get_fs(s.url, storage_options)
    first, last = s.lo // IPC_BATCH_ROWS, (s.hi - 1) // IPC_BATCH_ROWS
    with fs.open(path, "rb") as f:
        reader = ipc.open_file(f)
        table = pa.Table.from_batches([reader.get_batch(i) for i in range(first, last + 1)], reader.schema)
    return table.slice(s.lo - first * IPC_BATCH_ROWS, s.hi - s.lo)


@storage.retrying
def _read_range(byte_range: ByteRange, storage_options: dict, marker: bytes = b">"):
    fs, path = storage.get_fs(byte_range.url, storage_options)
    with fs.open(path, "rb") as f:
        return read_owned_bytes(f, byte_range, marker)


def _labels(routing: Routing) -> np.ndarray | None:
    if routing.labels_url is None:
        return None
    if storage.is_local(routing.labels_url):
        return np.load(storage.local_path(routing.labels_url), mmap_mode="r")
    fs, path = storage.get_fs(routing.labels_url, routing.storage_options)
    with fs.open(path, "rb") as f:
        return np.load(io.BytesIO(f.read()))


def piece_url(work_dir: str, split_dir: str, shard: int, first_position: int, n_bytes: int) -> str:
    """Pieces sort in row order by name; the name also records the piece's size, so an
    interrupted assembly can be redone exactly (see :func:`assemble_shard`)."""
    name = f"{first_position:012d}-{n_bytes}.csv"
    return storage.join(work_dir, "pieces", split_dir, f"{shard:03d}", name)


# ----------------------------------------------------------------------------- writing


@storage.retrying
def _write_piece(routing: Routing, split_dir: str, shard: int, first_position: int,
                 header: bytes, csv: pl.DataFrame) -> None:
    """One piece; the shard's first piece carries the header. Its name records its size."""
    if storage.is_local(routing.work_dir):
        # straight to the file, then renamed to the name that records the size
        # unique per writer: a task re-run elsewhere (lost worker, resumed run) never shares it
        tmp = storage.local_path(piece_url(routing.work_dir, split_dir, shard, first_position, 0)) + (
            f".{os.getpid()}-{threading.get_ident()}.tmp"
        )
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        with open(tmp, "wb", buffering=0) as f:
            f.write(header)
            csv.write_csv(f, include_header=False, quote_style="never", line_terminator="\n")
            size = f.tell()
        os.replace(tmp, storage.local_path(piece_url(routing.work_dir, split_dir, shard, first_position, size)))
        return
    buffer = io.BytesIO()
    buffer.write(header)
    csv.write_csv(buffer, include_header=False, quote_style="never", line_terminator="\n")
    data = buffer.getvalue()
    with storage.open_for_write(piece_url(routing.work_dir, split_dir, shard, first_position, len(data)),
                                routing.storage_options) as f:
        f.write(data)


def write_pieces(frame: pl.DataFrame, first_position: int, routing: Routing) -> int:
    """Write the rows of positions ``[first_position, first_position + len(frame))``.

    ``frame`` has ``record_name`` and ``sequence`` in position order. Each target gets
    the rows it owns, cut at its shard boundaries; each cut is one CSV piece (no header)
    named by its first position so that pieces sort in row order. Returns pieces written.
    """
    n = len(frame)
    labels = _labels(routing)
    positions = np.arange(first_position, first_position + n, dtype=np.int64)
    written = 0
    for target in routing.targets:
        if target.label is None:
            rows, first_ordinal = frame, first_position
            row_positions = positions
        else:
            mask = np.asarray(labels[first_position : first_position + n]) == target.label
            rows = frame.filter(pl.Series(mask))
            row_positions = positions[mask]
            first_ordinal = int(np.count_nonzero(np.asarray(labels[:first_position]) == target.label))
        if len(rows) == 0:
            continue
        bounds = shard_bounds(target.n_rows, routing.num_files)
        ordinals = (first_ordinal, first_ordinal + len(rows))
        first_shard = int(np.searchsorted(bounds, ordinals[0], side="right")) - 1
        last_shard = int(np.searchsorted(bounds, ordinals[1] - 1, side="right")) - 1
        for shard in range(first_shard, last_shard + 1):
            lo = max(int(bounds[shard]), ordinals[0]) - first_ordinal
            hi = min(int(bounds[shard + 1]), ordinals[1]) - first_ordinal
            part = rows.slice(lo, hi - lo)
            csv = pl.DataFrame(
                {
                    "record_id": pl.Series(row_positions[lo:hi] + 1),
                    "record_name": part["record_name"],
                    "sequence_length": part["sequence"].str.len_bytes(),
                    "sequence": part["sequence"],
                }
            )
            header = CSV_HEADER if lo + first_ordinal == int(bounds[shard]) else b""
            _write_piece(routing, target.split_dir, shard, int(row_positions[lo]), header, csv)
            written += 1
    return written


def write_count_pieces(
    counts: np.ndarray, first_cluster: int, first_member: int, routing: Routing
) -> None:
    """``counts.mmap``/``starts.mmap`` pieces for clusters from ``first_cluster`` on."""
    starts = np.empty(len(counts), dtype=np.uint64)
    starts[0:1] = first_member
    np.cumsum(counts[:-1], out=starts[1:])
    starts[1:] += np.uint64(first_member)
    labels = _labels(routing)
    for target in routing.targets:
        if target.label is None:
            mask = slice(None)
        else:
            mask = np.asarray(labels[first_cluster : first_cluster + len(counts)]) == target.label
        for name, values in (("counts", counts[mask]), ("starts", starts[mask])):
            url = storage.join(
                routing.work_dir, "pieces", target.split_dir, name, f"{first_cluster:012d}.u64"
            )
            with storage.open_for_write(url, routing.storage_options) as f:
                f.write(values.astype("<u8").tobytes())


# ----------------------------------------------------------------------------- tasks


def hash_bucket(hashes: np.ndarray, n_buckets: int) -> np.ndarray:
    """Bucket of each 64-bit hash, monotonic in the hash (sorted hashes stay grouped)."""
    if n_buckets == 1:
        return np.zeros(len(hashes), dtype=np.int64)
    width = np.uint64((2**64 - 1) // n_buckets + 1)
    return (hashes // width).astype(np.int64)


def _write_npy(url: str, array: np.ndarray, storage_options: dict) -> None:
    with storage.open_for_write(url, storage_options) as f:
        np.save(f, array)


def _read_npy_slice(s: "Slice", storage_options: dict) -> np.ndarray:
    if storage.is_local(s.url):
        return np.asarray(np.load(storage.local_path(s.url), mmap_mode="r")[s.lo : s.hi])
    fs, path = storage.get_fs(s.url, storage_options)
    with fs.open(path, "rb") as f:
        return np.load(io.BytesIO(f.read()))[s.lo : s.hi]


def scan_mapping(
    byte_range: ByteRange, work_dir: str, storage_options: dict, hash_buckets: dict[str, int]
) -> MappingReceipt:
    """Parse the mapping lines ``byte_range`` owns into clusters and members Arrow files,
    and the sorted hashes of their ids (for the repeated-id check)."""
    fs, path = storage.get_fs(byte_range.url, storage_options)
    with fs.open(path, "rb") as f:
        base, data = read_owned_bytes(f, byte_range, marker=b"")

        def locate(offset: int) -> str:
            return f"line {line_number(f, offset)}, byte {offset}"

        block = parse_mapping_block(data, base, byte_range.url, locate)
    name = f"{byte_range.index:05d}.arrow"
    clusters_url = storage.join(work_dir, "mapping", "clusters", name)
    members_url = storage.join(work_dir, "mapping", "members", name)
    _write_ipc(clusters_url, block.clusters, storage_options)
    _write_ipc(members_url, block.members, storage_options)
    receipt = MappingReceipt(
        byte_range.index, clusters_url, members_url, len(block.clusters), len(block.members)
    )
    for kind, frame in (("clusters", block.clusters), ("members", block.members)):
        hashes = np.sort(frame["id"].hash(seed=0).to_numpy())
        url = storage.join(work_dir, "mapping", f"{kind}-hashes", f"{byte_range.index:05d}.npy")
        _write_npy(url, hashes, storage_options)
        bounds = np.searchsorted(hash_bucket(hashes, hash_buckets[kind]), np.arange(hash_buckets[kind] + 1))
        receipt.hash_urls[kind] = url
        receipt.hash_bounds[kind] = bounds.tolist()
    return receipt


def count_fasta(byte_range: ByteRange, storage_options: dict) -> int:
    """Number of records ``byte_range`` owns."""
    _, data = _read_range(byte_range, storage_options)
    return count_records(data)


def write_counts(
    clusters_url: str, first_cluster: int, first_member: int, routing: Routing
) -> None:
    counts = _read_ipc(clusters_url, routing.storage_options)["count"].to_numpy()
    if len(counts):
        write_count_pieces(counts.astype(np.uint64), first_cluster, first_member, routing)


def convert_in_file_order(
    byte_range: ByteRange, first_position: int, uppercase: bool, engine: str, routing: Routing
) -> int:
    """Convert a FASTA range as it is (val/test): rows in file order."""
    base, data = _read_range(byte_range, routing.storage_options)
    records = parse_block(data, base, byte_range.url, uppercase=uppercase, engine=engine)
    if len(records):
        write_pieces(records.frame(), first_position, routing)
    return len(records)


def convert_in_order(
    byte_range: ByteRange,
    first_position: int,
    ids: list[Slice],
    engine: str,
    routing: Routing,
) -> FastReceipt:
    """Fast path: write the range's rows if its names are the mapping ids at its positions.

    Writes nothing and returns ``ok=False`` (with the first mismatch) otherwise.
    """
    base, data = _read_range(byte_range, routing.storage_options)
    if not data.strip():
        return FastReceipt(True, 0)
    expected = read_slices(ids, routing.storage_options)["id"]
    head = data[:4096].lstrip()
    first = head[1:].split(None, 1)[0].decode("latin-1") if head[1:2].strip() else ""
    if len(expected) and first and first != expected[0]:
        # shuffled input: known from the first name, before any parsing
        return FastReceipt(False, 0, f"record {first!r} at byte {base} where the mapping has {expected[0]!r}")
    records = parse_block(data, base, byte_range.url, uppercase=True, engine=engine)
    n = len(records)
    if len(expected) != n:
        return FastReceipt(False, n, f"{n} records but {len(expected)} mapping ids")
    differs = records.names != expected
    if differs.any():
        i = int(differs.arg_true()[0])
        return FastReceipt(
            False,
            n,
            f"record {records.names[i]!r} at byte {int(records.offsets[i])} where the mapping "
            f"has {expected[i]!r}",
        )
    write_pieces(records.frame(), first_position, routing)
    return FastReceipt(True, n)


def _bucket_of(names: pl.Series, n_buckets: int) -> np.ndarray:
    return hash_bucket(names.hash(seed=0).to_numpy(), n_buckets)


def _write_bucketed(frame: pl.DataFrame, key: str, n_buckets: int, url: str, so) -> BucketReceipt:
    bucket = _bucket_of(frame[key], n_buckets)
    order = np.argsort(bucket, kind="stable")
    frame = frame[order]
    bounds = np.searchsorted(bucket[order], np.arange(n_buckets + 1), side="left")
    _write_ipc(url, frame, so)
    return BucketReceipt(url, bounds.tolist())


def bucket_ids(
    ids_url: str, first_position: int, n_buckets: int, out_url: str, storage_options: dict
) -> BucketReceipt:
    """Mapping ids of one mapping range with their positions, grouped by hash bucket."""
    ids = _read_ipc(ids_url, storage_options)
    frame = ids.with_columns(
        pl.int_range(first_position, first_position + len(ids), dtype=pl.Int64).alias("pos")
    )
    return _write_bucketed(frame, "id", n_buckets, out_url, storage_options)


def count_duplicate_hashes(slices: list[Slice], storage_options: dict) -> int:
    """How many id hashes of one bucket repeat another (0 means no id repeats; a 64-bit
    collision can only make this too large, which sends the stream to the exact join)."""
    parts = [_read_npy_slice(s, storage_options) for s in slices if s.hi > s.lo]
    if not parts:
        return 0
    hashes = np.sort(np.concatenate(parts))
    return int(np.count_nonzero(hashes[1:] == hashes[:-1]))


def bucket_fasta(
    byte_range: ByteRange, n_buckets: int, engine: str, out_url: str, storage_options: dict
) -> BucketReceipt:
    """Records of one FASTA range, with their file order, grouped by hash bucket of name."""
    base, data = _read_range(byte_range, storage_options)
    records = parse_block(data, base, byte_range.url, uppercase=True, engine=engine)
    frame = records.frame().with_columns(
        (pl.int_range(0, len(records), dtype=pl.UInt64) + (byte_range.index << 32)).alias("order")
    )
    return _write_bucketed(frame, "record_name", n_buckets, out_url, storage_options)


def join_bucket(
    ids: list[Slice],
    records: list[Slice],
    block_starts: list[int],
    out_url: str,
    storage_options: dict,
) -> JoinReceipt:
    """Join one bucket's mapping ids to its records; sort by position; write.

    A repeated FASTA id keeps its first occurrence in file order. ``block_starts`` are
    the position blocks of :func:`gather_block`; the receipt says where each begins.
    """
    id_frame = read_slices(ids, storage_options)
    rec_frame = read_slices(records, storage_options)
    if id_frame is None:
        id_frame = pl.DataFrame(schema={"id": pl.String, "pos": pl.Int64})
    if rec_frame is None:
        rec_frame = pl.DataFrame(
            schema={"record_name": pl.String, "sequence": pl.String, "order": pl.UInt64}
        )
    n_fasta = len(rec_frame)
    unique = rec_frame.sort("order").unique(subset="record_name", keep="first", maintain_order=True)
    joined = id_frame.join(unique, left_on="id", right_on="record_name", how="left")
    missing_mask = joined["sequence"].is_null()
    n_missing = int(missing_mask.sum())
    missing = joined.filter(missing_mask).sort("pos")["id"].head(5).to_list()
    n_unnamed = len(unique) - int(unique["record_name"].is_in(id_frame["id"].unique()).sum())
    out = (
        joined.filter(~missing_mask)
        .select(pl.col("pos"), pl.col("id").alias("record_name"), pl.col("sequence"))
        .sort("pos")
    )
    _write_ipc(out_url, out, storage_options)
    bounds = np.searchsorted(out["pos"].to_numpy(), np.asarray(block_starts), side="left")
    return JoinReceipt(
        out_url, bounds.tolist(), n_fasta, n_fasta - len(unique), n_unnamed, missing, n_missing
    )


def gather_block(
    slices: list[Slice], first_position: int, n_rows: int, routing: Routing
) -> int:
    """Collect positions ``[first_position, first_position + n_rows)`` from every bucket
    and write their pieces."""
    frame = read_slices(slices, routing.storage_options)
    if frame is None or n_rows == 0:
        return 0
    frame = frame.sort("pos")
    if len(frame) != n_rows:  # pragma: no cover - guarded by the missing-id check
        raise RuntimeError(f"block at {first_position}: {len(frame)} rows, expected {n_rows}")
    write_pieces(frame.select("record_name", "sequence"), first_position, routing)
    return n_rows


def _list_pieces(work_dir: str, parts: tuple[str, ...], storage_options: dict) -> list[str]:
    fs, path = storage.get_fs(storage.join(work_dir, "pieces", *parts), storage_options)
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.ls(path, detail=False) if p.endswith(".csv") or p.endswith(".u64"))


def _append(out, paths: list[str]) -> None:
    """Append local files to the open unbuffered file ``out``, in the kernel."""
    for path in paths:
        with open(path, "rb") as src:
            remaining = os.fstat(src.fileno()).st_size
            while remaining > 0:
                sent = os.copy_file_range(src.fileno(), out.fileno(), remaining)
                if sent == 0:
                    break
                remaining -= sent


@storage.retrying
def _concatenate(out_url: str, head: bytes, pieces: list[str], storage_options: dict) -> int:
    """Write ``head`` then every piece, in order, to ``out_url``; returns bytes written."""
    if storage.is_local(out_url):
        with open(storage.local_path(out_url), "wb", buffering=0) as out:
            out.write(head)
            _append(out, pieces)
            return out.tell()
    fs, out_path = storage.get_fs(out_url, storage_options)
    size = len(head)
    with fs.open(out_path, "wb") as out:
        out.write(head)
        for piece in pieces:
            with fs.open(piece, "rb") as src:
                while chunk := src.read(COPY_CHUNK_BYTES):
                    out.write(chunk)
                    size += len(chunk)
    return size


def _piece_bytes(path: str) -> int:
    return int(path.rsplit("/", 1)[-1].split("-")[1].split(".")[0])


def assemble_shard(
    work_dir: str, tree_dir: str, split_dir: str, shard: int, storage_options: dict
) -> int:
    """The shard's pieces in position order → ``<split_dir>/x###.csv``.

    The first piece of a non-empty shard already holds the header. On a local file
    system it becomes the shard itself: cut back to its recorded size (which makes a
    repeated attempt exact), the other pieces appended in the kernel, then renamed.
    Elsewhere the pieces are copied into the shard.
    """
    pieces = _list_pieces(work_dir, (split_dir, f"{shard:03d}"), storage_options)
    out_url = storage.join(tree_dir, split_dir, shard_name(shard))
    if not pieces:
        if storage.is_local(out_url) and os.path.exists(storage.local_path(out_url)):
            return os.path.getsize(storage.local_path(out_url))  # finished by an earlier attempt
        return _concatenate(out_url, CSV_HEADER, [], storage_options)
    if not storage.is_local(out_url):
        return _concatenate(out_url, b"", pieces, storage_options)
    first = pieces[0]
    out_path = storage.local_path(out_url)
    with open(first, "rb") as f:
        carries_header = f.read(len(CSV_HEADER)) == CSV_HEADER
    if not carries_header and os.path.exists(out_path):
        return os.path.getsize(out_path)  # an earlier attempt finished (its first piece became the shard)
    with open(first, "r+b", buffering=0) as out:
        out.truncate(_piece_bytes(first))
        out.seek(0, os.SEEK_END)
        _append(out, pieces[1:])
        size = out.tell()
    os.replace(first, out_path)
    return size


def assemble_array(
    work_dir: str, tree_dir: str, split_dir: str, name: str, storage_options: dict
) -> int:
    """Concatenate the ``counts``/``starts`` pieces of one split into ``<name>.mmap``."""
    pieces = _list_pieces(work_dir, (split_dir, name), storage_options)
    out_url = storage.join(tree_dir, split_dir, f"{name}.mmap")
    return _concatenate(out_url, b"", pieces, storage_options)


def raise_missing(url: str, kind: str, n_missing: int, examples: list[str]) -> None:
    shown = ", ".join(repr(x) for x in examples)
    raise InputError(
        url,
        "",
        f"{n_missing} {kind} id(s) named in the mapping are not in this FASTA "
        f"(first: {shown}); nothing was written",
    )
