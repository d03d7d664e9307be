"""The functions that run as Dask tasks, and the small records they take and return.

Every task reads its own bytes, writes its own output under the run's work folder and
returns a receipt of a few numbers and paths. No record ever travels back to the driver.

One record's way from input to output (v1.10 layout, input already in mapping order):

1. :func:`scan_mapping` parses the mapping lines of one byte range into two Arrow files,
   the clusters (id, member count) and the flattened member ids, and returns their counts.
2. :func:`count_fasta` counts the records of one FASTA byte range; the driver turns the
   counts into each range's first position.
3. :func:`convert_in_order` runs the FASTA kernel (:mod:`esm2dask.kernel`) over the
   range, which writes the CSV rows straight from the input bytes, checks that the
   names are the mapping's ids at the same positions, and :func:`write_rows` writes the
   rows as CSV pieces, one per output shard the range touches
   (``pieces/uf90/uf90_csvs/017/000000123456-<bytes>.csv``).
4. :func:`assemble_shard` concatenates a shard's pieces, in position order, under the
   header into ``uf90/uf90_csvs/x017.csv``.

When the order does not hold, step 3 joins ids first and moves each record once:
:func:`bucket_ids` and :func:`index_fasta` partition the mapping ids (with positions) and
the FASTA names (with where each record is) by hash of the id; :func:`join_ids` joins
one bucket, so that each record learns its positions. A local FASTA's records then pass
through the work folder only as byte spans: :func:`route_records` (the ``scatter-*``
stages) sends each range's records, as spans the index saved, to their blocks of
consecutive positions, unread, and :func:`merge_records` (``merge-*``) copies one block's
records out of the mapped file in position order and converts them once, as the fast path
converts a range. A FASTA on an object store, where reading at random costs a request per
record, is converted by ranges again (:func:`scatter_fasta`), its rows written sorted by
position, and :func:`merge_scattered_block` merges each block from every range's rows.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from . import receipts, storage
from .storage import content_digest
from .errors import Esm2DaskError, InputError
from .kernel import Rows, as_array, convert_block, count_records, gather_records, row_sizes
from .layout import CSV_HEADER, shard_bounds, shard_name
from .mapping import line_number, parse_mapping_block
from .ranges import ByteRange, find_record_start, read_owned_bytes


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
    """Where a stream's rows go: its targets, the shard count and the run's folders.

    ``skip`` names targets whose CSV rows are not written (``--format`` without esm2nv
    stages only what the other layouts read); ``layouts`` (uf90 only) is the run's
    :class:`esm2dask.formats.Uf90Layouts`, which writes the other layouts from the same rows.
    """

    targets: tuple[Target, ...]
    num_files: int
    work_dir: str
    labels_url: str | None = None
    storage_options: dict = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    layouts: object | None = None
    #: the staged tree, where rows placed by the driver (:func:`place_rows`) are written
    tree_dir: str = ""


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
    #: :func:`content_digest` of the bytes the range owns, as this task read them
    digest: str = ""


@dataclass
class CountReceipt:
    """Records one FASTA range owns, and the :func:`content_digest` of its bytes as read;
    with ``sizes_url``, where each record's row size (but its id) was saved."""

    n_records: int
    digest: str = ""
    sizes_url: str | None = None


@dataclass
class PlaceReceipt:
    """The bytes one range's rows fill in each shard they go to: ``[shard, bytes]`` pairs."""

    shard_bytes: list


@dataclass
class FastReceipt:
    ok: bool
    n_rows: int
    mismatch: str = ""
    #: what the rows gave the other layouts (:class:`esm2dask.formats.Uf90Parts`), if any
    layouts: object | None = None


@dataclass
class BucketReceipt:
    url: str
    bounds: list[int]


@dataclass
class JoinReceipt:
    """One bucket joined: ``(record, position)`` pairs sorted by record; ``range_bounds``
    say where each FASTA range's records begin in them."""

    url: str
    range_bounds: list[int]
    n_fasta: int
    n_duplicates: int
    n_unnamed: int
    missing: list[str]
    n_missing: int


@dataclass
class ScatterReceipt:
    """One FASTA range's rows with their ids, sorted by position, in ``url``; the rows of
    position block g are ``rows[g]..rows[g+1]`` and bytes ``bytes[g]..bytes[g+1]``."""

    url: str
    index_url: str
    rows: list[int]
    bytes: list[int]


@dataclass
class RouteReceipt:
    """One local FASTA range's records routed, sorted by position: ``(position, first byte,
    end byte)`` of each in ``url``; position block g's are ``rows[g]..rows[g+1]``, and (a
    placed stream) their rows fill ``bytes[g]..bytes[g+1]`` of the stream's output."""

    url: str
    rows: list[int]
    bytes: list[int]


@dataclass
class InputCopy:
    """One raw input copied into staging by :func:`copy_input`: from ``source`` (the input's
    URL as the run named it) to ``dest_url``, how (``copy``, ``reflink``, ``hardlink``), and
    the SHA-256 of its bytes, hashed as they were copied."""

    source: str
    dest_url: str
    bytes: int
    how: str
    sha256: str


#: what ``--resume`` may read back (as JSON data, never code): one line per new receipt type
receipts.register(MappingReceipt, FastReceipt, BucketReceipt, JoinReceipt, ScatterReceipt, RouteReceipt,
                  CountReceipt, PlaceReceipt, InputCopy)


# ----------------------------------------------------------------------------- helpers


@storage.retrying
def _write_ipc(url: str, frame: pl.DataFrame, storage_options: dict) -> None:
    storage.write_arrow(url, frame.to_arrow(), storage_options)


def _read_ipc(url: str, storage_options: dict) -> pl.DataFrame:
    return pl.from_arrow(storage.read_arrow(url, storage_options))


def read_slices(slices, storage_options: dict) -> pl.DataFrame | None:
    """Rows ``[lo, hi)`` of each Arrow file, concatenated (:func:`esm2dask.storage.read_arrow_slices`);
    None if there are none."""
    table = storage.read_arrow_slices(slices, storage_options)
    return None if table is None else pl.from_arrow(table)


@storage.retrying
def _read_range(byte_range: ByteRange, storage_options: dict, marker: bytes = b">"):
    with storage.open_input(byte_range.url, storage_options) as f:
        return read_owned_bytes(f, byte_range, marker)


@contextlib.contextmanager
def _owned_block(byte_range: ByteRange, storage_options: dict):
    """``(base, bytes)`` of the records ``byte_range`` owns, for the time of the ``with``: a
    local file's mapped (the page cache in place: no copy into fresh memory, which on these
    VMs costs more than the parse), an object store's read (with retries)."""
    if not storage.is_local(byte_range.url):
        base, data = _read_range(byte_range, storage_options)
        yield base, as_array(data)
        return
    with storage.open_input(byte_range.url, storage_options) as f:
        begin = find_record_start(f, byte_range.start, byte_range.file_size)
        end = find_record_start(f, byte_range.stop, byte_range.file_size)
        if end <= begin:
            yield begin, np.zeros(0, dtype=np.uint8)
            return
        with storage.range_view(f, byte_range.url, begin, end) as view:
            yield begin, view
            del view


def range_digest(byte_range: ByteRange, storage_options: dict, marker: bytes = b">") -> str:
    """:func:`content_digest` of the bytes ``byte_range`` owns now."""
    _, data = _read_range(byte_range, storage_options, marker)
    return content_digest(byte_range.url, data)


def load_labels(url: str | None, storage_options: dict) -> np.ndarray | None:
    """The split label of every uf50 cluster, in mapping order (the random split's
    ``labels.npy``), or None without a random split: the one reader of that file."""
    if url is None:
        return None
    return storage.read_npy(url, storage_options)  # not np.load: see esm2dask.npyfile


def piece_url(work_dir: str, split_dir: str, shard: int, first_position: int, n_bytes: int) -> str:
    """Pieces sort in row order by name; the name also records the piece's size, so an
    interrupted assembly can be redone exactly (see :func:`assemble_shard`)."""
    name = f"{first_position:012d}-{n_bytes}.csv"
    return storage.join(work_dir, "pieces", split_dir, f"{shard:03d}", name)


# ----------------------------------------------------------------------------- writing


@storage.retrying
def _write_piece(routing: Routing, split_dir: str, shard: int, first_position: int,
                 header: bytes, payload: memoryview) -> None:
    """One piece; the shard's first piece carries the header. Its name records its size."""
    size = len(header) + len(payload)
    final = piece_url(routing.work_dir, split_dir, shard, first_position, size)
    storage.write_whole(final, [header, payload], routing.storage_options)


def write_rows(rows: Rows, first_position: int, routing: Routing, placement: list | None = None) -> list:
    """Write the CSV rows of positions ``[first_position, first_position + len(rows))``.

    Each target gets the rows it owns, cut at its shard boundaries; each cut is one CSV
    piece named by its first position so that pieces sort in row order. The rows are
    written as they are (their ``record_id`` is the position + 1).

    With ``placement`` (one target; ``[shard, offset, bytes]`` of each cut, from the
    driver), each cut is written straight into its shard in the staged tree instead, once;
    then returns where: ``(first row, end row, shard, byte offset)`` of each cut (else []).
    """
    n = len(rows)
    labels = load_labels(routing.labels_url, routing.storage_options)
    written, placed = 0, []
    for target in routing.targets:
        if target.split_dir in routing.skip:
            continue
        if target.label is None:
            own, first_ordinal = rows, first_position
            positions = None
        else:
            mask = np.asarray(labels[first_position : first_position + n]) == target.label
            picked = np.flatnonzero(mask)
            own = rows.take(picked)
            positions = picked + first_position
            first_ordinal = int(np.count_nonzero(np.asarray(labels[:first_position]) == target.label))
        if len(own) == 0:
            continue
        bounds = shard_bounds(target.n_rows, routing.num_files)
        end_ordinal = first_ordinal + len(own)
        first_shard = int(np.searchsorted(bounds, first_ordinal, side="right")) - 1
        last_shard = int(np.searchsorted(bounds, end_ordinal - 1, side="right")) - 1
        for shard in range(first_shard, last_shard + 1):
            lo = max(int(bounds[shard]), first_ordinal) - first_ordinal
            hi = min(int(bounds[shard + 1]), end_ordinal) - first_ordinal
            header = CSV_HEADER if lo + first_ordinal == int(bounds[shard]) else b""
            position = first_position + lo if positions is None else int(positions[lo])
            if placement is None:
                _write_piece(routing, target.split_dir, shard, position, header, own.span(lo, hi))
            else:
                placed_shard, offset, size = placement[written]
                payload = own.span(lo, hi)
                if placed_shard != shard or size != len(payload):
                    raise Esm2DaskError(
                        f"rows {first_position + lo}…{first_position + hi} of {target.split_dir}: {len(payload)} "
                        f"bytes where the count pass measured {size}; was an input changed during the run?")
                # rows at their place in a shard the driver made at its final size
                storage.write_at(storage.join(routing.tree_dir, target.split_dir, shard_name(shard)), offset, payload)
                placed.append((lo, hi, shard, offset))
            written += 1
    return placed


def emit_rows(rows: Rows, first_position: int, routing: Routing, name: str, placement: list | None = None):
    """The rows to every layout of the run: their CSV rows (:func:`write_rows`), and to
    ``routing.layouts`` if the run writes other layouts; returns what those wrote."""
    placed = write_rows(rows, first_position, routing, placement)
    return None if routing.layouts is None else routing.layouts.write(rows, first_position, name, placed)


def write_count_pieces(
    counts: np.ndarray, first_cluster: int, first_member: int, routing: Routing
) -> None:
    """``counts.mmap``/``starts.mmap`` pieces for clusters from ``first_cluster`` on."""
    starts = np.empty(len(counts), dtype=np.uint64)
    starts[0:1] = first_member
    np.cumsum(counts[:-1], out=starts[1:])
    starts[1:] += np.uint64(first_member)
    labels = load_labels(routing.labels_url, routing.storage_options)
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


def _read_npy_slice(s: "Slice", storage_options: dict) -> np.ndarray:
    return np.asarray(storage.read_npy(s.url, storage_options)[s.lo : s.hi])  # not np.load: see esm2dask.npyfile


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
        byte_range.index, clusters_url, members_url, len(block.clusters), len(block.members),
        digest=content_digest(byte_range.url, data),
    )
    for kind, frame in (("clusters", block.clusters), ("members", block.members)):
        hashes = np.sort(frame["id"].hash(seed=0).to_numpy())
        url = storage.join(work_dir, "mapping", f"{kind}-hashes", f"{byte_range.index:05d}.npy")
        storage.write_npy(url, hashes, storage_options)
        bounds = np.searchsorted(hash_bucket(hashes, hash_buckets[kind]), np.arange(hash_buckets[kind] + 1))
        receipt.hash_urls[kind] = url
        receipt.hash_bounds[kind] = bounds.tolist()
    return receipt


def count_fasta(byte_range: ByteRange, storage_options: dict, sizes_url: str | None = None) -> CountReceipt:
    """Number of records ``byte_range`` owns (the kernel's count, at memory speed), and the
    :func:`content_digest` of the bytes counted; with ``sizes_url``, each record's row size
    but its id saved there (:func:`esm2dask.kernel.row_sizes`), for :func:`place_rows`.

    A local file is mapped, not read: the count and the digest walk the page cache in
    place, with no copy of the range and no fresh memory to fault in
    (benchmarks/results/kernel.md).
    """
    def counted(view) -> CountReceipt:
        if sizes_url is None:
            return CountReceipt(count_records(view), content_digest(byte_range.url, view))
        sizes = row_sizes(view)  # one per record: the count is its length
        storage.write_npy(sizes_url, sizes, storage_options)
        return CountReceipt(len(sizes), content_digest(byte_range.url, view), sizes_url)

    return _count_range(byte_range, storage_options, counted)


@storage.retrying  # a dropped connection or a throttled read of an object store
def _count_range(byte_range: ByteRange, storage_options: dict, counted):
    with storage.open_input(byte_range.url, storage_options) as f:
        begin = find_record_start(f, byte_range.start, byte_range.file_size)
        end = find_record_start(f, byte_range.stop, byte_range.file_size)
        if end <= begin:
            return counted(np.zeros(0, dtype=np.uint8))
        with storage.range_view(f, byte_range.url, begin, end) as view:  # mapped where local
            result = counted(view)
            del view  # the last reference: the map is closed as the view's context ends
        return result


#: 10, 100, … : a number's decimal digits are 1 + how many of these are not above it
_POWERS_OF_TEN = np.array([10**k for k in range(1, 19)], dtype=np.int64)


def _row_bytes(sizes: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Each row's bytes: its size but the id (:func:`esm2dask.kernel.row_sizes`), the id's
    digits and its comma."""
    return sizes.astype(np.int64) + 1 + np.searchsorted(_POWERS_OF_TEN, ids, side="right")


def place_rows(sizes_url: str, first_position: int, bounds: list[int], storage_options: dict) -> PlaceReceipt:
    """The bytes the rows of positions ``first_position, …`` (one range's records, whose
    sizes but the ids the count pass saved) fill in each shard of ``bounds`` (the shards'
    first positions): the row of position p carries ``record_id`` p + 1."""
    sizes = storage.read_npy(sizes_url, storage_options)
    if len(sizes) == 0:
        return PlaceReceipt([])
    ids = np.arange(first_position + 1, first_position + 1 + len(sizes), dtype=np.int64)
    ends = np.concatenate(([0], np.cumsum(_row_bytes(sizes, ids))))
    cuts = np.asarray(bounds, dtype=np.int64)
    first = int(np.searchsorted(cuts, first_position, side="right")) - 1
    last = int(np.searchsorted(cuts, first_position + len(sizes) - 1, side="right")) - 1
    out = []
    for shard in range(first, last + 1):
        lo = max(int(cuts[shard]), first_position) - first_position
        hi = min(int(cuts[shard + 1]), first_position + len(sizes)) - first_position
        out.append([shard, int(ends[hi] - ends[lo])])
    return PlaceReceipt(out)


def copy_input(source: str, dest_url: str, hard_link: bool) -> InputCopy:
    """Copy a local raw input into the staging folder (a local one) and hash it on the way:
    the manifest's checksum of the copy needs no second read (see storage.copy_hashed)."""
    how, digest = storage.copy_hashed(source, dest_url, hard_link=hard_link)
    return InputCopy(source, dest_url, storage.file_size(dest_url), how, digest)


def write_counts(
    clusters_url: str, first_cluster: int, first_member: int, routing: Routing
) -> None:
    counts = _read_ipc(clusters_url, routing.storage_options)["count"].to_numpy()
    if len(counts):
        write_count_pieces(counts.astype(np.uint64), first_cluster, first_member, routing)


def _convert(byte_range: ByteRange, storage_options: dict, *, uppercase: bool,
             first_id: int | None, expected: int, owned: tuple[int, bytes] | None = None, rows: bool = True):
    """Read (mapped where local, see :func:`_owned_block`; unless ``owned`` is given) and
    convert one range (its names only, with ``rows=False``); the records parsed must be the
    records counted."""
    if owned is None:
        with _owned_block(byte_range, storage_options) as (base, data):
            block = convert_block(data, base, byte_range.url, uppercase=uppercase, first_id=first_id, rows=rows)
            del data
    else:
        base, data = owned
        block = convert_block(data, base, byte_range.url, uppercase=uppercase, first_id=first_id, rows=rows)
    if len(block) != expected:
        # defence in depth: the count pass and the kernel disagree about the range
        raise InputError(
            byte_range.url,
            f"bytes {byte_range.start}-{byte_range.stop}",
            f"{len(block)} records parsed but {expected} counted; was the file changed during the run?",
        )
    return block


def warn_empty_sequences(block, url: str, headers: np.ndarray | None = None, where: str = "of this byte range") -> int:
    """Say how many records of a converted range have an empty sequence (a header with no
    sequence line): legal under the layout's record rules, written as BioNeMo writes them
    (``sequence_length`` 0), but rarely what a user meant. Returns how many. ``headers``:
    the records' file offsets where the block is not the file's bytes (gathered records)."""
    ends = block.rows.starts[1:]
    if len(ends) == 0:
        return 0
    # a row ends "<last residue>\n", or ",\n" when the sequence is empty (',' is never a residue)
    empty = np.flatnonzero(block.rows.data[ends - 2] == ord(","))
    if len(empty):
        i = int(empty[0])
        logging.getLogger("esm2dask").warning(
            "%s (byte %d, record %r): empty sequence (%d record(s) %s have none); written "
            "with sequence_length 0, as the layout's record rules allow (docs/esm2-layout.md)",
            url, int((block.headers if headers is None else headers)[i]), block.name(i), len(empty), where,
        )
    return len(empty)


def convert_in_file_order(
    byte_range: ByteRange, first_position: int, expected: int, uppercase: bool, routing: Routing
) -> int:
    """Convert a FASTA range as it is (val/test): rows in file order."""
    block = _convert(byte_range, routing.storage_options, uppercase=uppercase,
                     first_id=first_position + 1, expected=expected)
    if len(block):
        warn_empty_sequences(block, byte_range.url)
        write_rows(block.rows, first_position, routing)
    return len(block)


def _first_name(data: bytes) -> str:
    head = data[:4096].lstrip()
    return head[1:].split(None, 1)[0].decode("latin-1") if head[1:2].strip() else ""


def convert_in_order(
    byte_range: ByteRange, first_position: int, expected: int, ids: list[Slice], routing: Routing,
    placement: list | None = None,
) -> FastReceipt:
    """Fast path: write the range's rows if its names are the mapping ids at its positions
    (at their place in the shards, with ``placement``; see :func:`write_rows`).

    Writes nothing and returns ``ok=False`` (with the first mismatch) otherwise.
    """
    mapping_ids = read_slices(ids, routing.storage_options)
    with _owned_block(byte_range, routing.storage_options) as (base, data):
        first = _first_name(bytes(data[:4096]))
        if mapping_ids is not None and first and first != mapping_ids["id"][0]:
            # shuffled input is told by the first name, before any parsing
            return FastReceipt(False, 0, f"record {first!r} at byte {base} where the mapping has {mapping_ids['id'][0]!r}")
        block = _convert(byte_range, routing.storage_options, uppercase=True,
                         first_id=first_position + 1, expected=expected, owned=(base, data))
        del data
    if len(block) == 0:
        return FastReceipt(True, 0)
    expected_ids = mapping_ids["id"]
    differs = block.name_series() != expected_ids
    if differs.any():
        i = int(differs.arg_true()[0])
        return FastReceipt(
            False, len(block),
            f"record {block.name(i)!r} at byte {int(block.headers[i])} where the mapping has {expected_ids[i]!r}",
        )
    warn_empty_sequences(block, byte_range.url)
    parts = emit_rows(block.rows, first_position, routing, f"range-{byte_range.index:05d}", placement)
    return FastReceipt(True, len(block), layouts=parts)


def _bucket_of(names: pl.Series, n_buckets: int) -> np.ndarray:
    return hash_bucket(names.hash(seed=0).to_numpy(), n_buckets)


def _write_bucketed(frame: pl.DataFrame, key: str, n_buckets: int, url: str, storage_options) -> BucketReceipt:
    bucket = _bucket_of(frame[key], n_buckets)
    order = np.argsort(bucket, kind="stable")
    frame = frame[order]
    bounds = np.searchsorted(bucket[order], np.arange(n_buckets + 1), side="left")
    _write_ipc(url, frame, storage_options)
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


#: A record's place: its range's index in the high 32 bits, its ordinal in the range below.
RANGE_SHIFT = 32


def index_fasta(
    byte_range: ByteRange, expected: int, n_buckets: int, out_url: str, storage_options: dict,
    spans_url: str | None = None,
) -> BucketReceipt:
    """The names of one FASTA range with where each record is, grouped by hash bucket (every
    byte checked as the conversion checks it; no row is written). With ``spans_url`` (a
    local FASTA) the file offset of each record's ``>`` is saved there, then the range's
    end: record i is bytes ``spans[i]..spans[i + 1]``, for :func:`route_records`."""
    with _owned_block(byte_range, storage_options) as (base, data):
        end = base + len(data)
        block = _convert(byte_range, storage_options, uppercase=True, first_id=None, expected=expected,
                         owned=(base, data), rows=False)
        del data
    if spans_url is not None:
        storage.write_npy(spans_url, np.append(block.headers, end).astype(np.int64), storage_options)
    frame = pl.DataFrame({
        "name": block.name_series(),
        "rec": np.arange(len(block), dtype=np.int64) + (byte_range.index << RANGE_SHIFT),
    })
    return _write_bucketed(frame, "name", n_buckets, out_url, storage_options)


def join_ids(
    ids: list[Slice], names: list[Slice], n_ranges: int, out_url: str, storage_options: dict
) -> JoinReceipt:
    """Join one bucket's mapping ids to its FASTA names: each position gets its record.

    A repeated FASTA id keeps its first occurrence in file order. Writes the
    ``(rec, pos)`` pairs sorted by record, so that each range reads only its own.
    """
    id_frame = read_slices(ids, storage_options)
    name_frame = read_slices(names, storage_options)
    if id_frame is None:
        id_frame = pl.DataFrame(schema={"id": pl.String, "pos": pl.Int64})
    if name_frame is None:
        name_frame = pl.DataFrame(schema={"name": pl.String, "rec": pl.Int64})
    n_fasta = len(name_frame)
    if not name_frame["rec"].is_sorted():  # the ranges' slices come in file order, each stably bucketed
        name_frame = name_frame.sort("rec")
    first = name_frame.unique("name", keep="first", maintain_order=True)  # each name at its least rec
    joined = id_frame.join(first, left_on="id", right_on="name", how="left")
    missing_mask = joined["rec"].is_null()
    n_missing = int(missing_mask.sum())
    missing = joined.filter(missing_mask).sort("pos")["id"].head(5).to_list() if n_missing else []
    pairs = joined.filter(~missing_mask).select("rec", "pos")
    n_unnamed = len(first) - pairs["rec"].n_unique()  # names no id named: those no pair holds
    pairs = pairs.sort("rec", "pos")
    _write_ipc(out_url, pairs, storage_options)
    range_of = pairs["rec"].to_numpy() >> RANGE_SHIFT
    bounds = np.searchsorted(range_of, np.arange(n_ranges + 1), side="left")
    return JoinReceipt(out_url, bounds.tolist(), n_fasta, n_fasta - len(first), n_unnamed, missing, n_missing)


def scatter_fasta(
    byte_range: ByteRange, expected: int, pairs: list[Slice], block_starts: list[int],
    out_url: str, storage_options: dict,
) -> ScatterReceipt:
    """Convert one range again and write its rows with their ids, sorted by position.

    ``pairs`` are this range's ``(rec, pos)`` slices from every bucket. A record named at
    several positions is written at each. The receipt says where each block begins.
    """
    frame = read_slices(pairs, storage_options)
    if frame is None:
        frame = pl.DataFrame(schema={"rec": pl.Int64, "pos": pl.Int64})
    frame = frame.sort("pos")
    block = _convert(byte_range, storage_options, uppercase=True, first_id=None, expected=expected)
    warn_empty_sequences(block, byte_range.url)
    positions = frame["pos"].to_numpy()
    local = frame["rec"].to_numpy() & ((1 << RANGE_SHIFT) - 1)
    rows = block.rows.with_ids(local, positions + 1)
    with storage.open_for_write(out_url, storage_options) as f:
        f.write(rows.data)
    index_url = out_url + ".idx.npy"
    storage.write_npy(index_url, np.stack([positions, rows.starts[:-1]], axis=1) if len(rows) else np.zeros((0, 2), np.int64), storage_options)
    row_bounds = np.searchsorted(positions, np.asarray(block_starts), side="left")
    byte_bounds = rows.starts[row_bounds]
    return ScatterReceipt(out_url, index_url, row_bounds.tolist(), byte_bounds.tolist())


@storage.retrying
def _read_span(url: str, lo: int, hi: int, storage_options: dict) -> bytes:
    fs, path = storage.get_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        f.seek(lo)
        return f.read(hi - lo)


def merge_scattered_block(
    parts: list[tuple[str, str, int, int, int, int]], first_position: int, n_rows: int, routing: Routing,
    block: int, placement: list | None = None,
):
    """Merge positions ``[first_position, first_position + n_rows)`` from every range's
    scattered rows and write them (and the other layouts' parts: returned): as pieces, or
    with ``placement`` at their place in the shards (see :func:`write_rows`).
    ``parts``: (rows url, index url, first row, end row, first byte, end byte) of each
    range that has rows in the block."""
    datas, positions, starts, offset = [], [], [], 0
    for url, index_url, row_lo, row_hi, byte_lo, byte_hi in parts:
        if row_hi <= row_lo:
            continue
        datas.append(_read_span(url, byte_lo, byte_hi, routing.storage_options))
        index = _read_npy_slice(Slice(index_url, row_lo, row_hi), routing.storage_options)
        positions.append(index[:, 0])
        starts.append(index[:, 1] - byte_lo + offset)
        offset += byte_hi - byte_lo
    if not datas or n_rows == 0:
        return None
    merged = Rows(as_array(b"".join(datas)), np.append(np.concatenate(starts), offset))
    pos = np.concatenate(positions)
    order = np.argsort(pos, kind="stable")
    if len(pos) != n_rows or pos[order[0]] != first_position or pos[order[-1]] != first_position + n_rows - 1:
        raise RuntimeError(f"block at {first_position}: {len(pos)} rows, expected {n_rows}")  # pragma: no cover
    return emit_rows(merged.take(order), first_position, routing, f"block-{block:05d}", placement)


def route_records(
    byte_range: ByteRange, pairs: list[Slice], cuts: list[int], spans_url: str, sizes_url: str | None,
    out_url: str, storage_options: dict,
) -> RouteReceipt:
    """Where one local range's records go, without reading them: ``(position, first byte,
    end byte)`` of each (its bytes from the index's spans), sorted by position, saved in
    ``out_url``. ``pairs`` are this range's ``(rec, pos)`` slices from every bucket (a record
    named at several positions goes to each). With ``sizes_url`` (the count pass's row sizes
    but the ids), the receipt also says the bytes its rows fill up to each of ``cuts``."""
    frame = read_slices(pairs, storage_options)
    if frame is None:
        frame = pl.DataFrame(schema={"rec": pl.Int64, "pos": pl.Int64})
    frame = frame.sort("pos")
    positions = frame["pos"].to_numpy().astype(np.int64)
    local = frame["rec"].to_numpy() & ((1 << RANGE_SHIFT) - 1)
    spans = storage.read_npy(spans_url, storage_options)
    storage.write_npy(out_url, np.stack([positions, spans[local], spans[local + 1]], axis=1), storage_options)
    row_bounds = np.searchsorted(positions, np.asarray(cuts, dtype=np.int64), side="left")
    if sizes_url is None:
        return RouteReceipt(out_url, row_bounds.tolist(), [0] * len(cuts))
    sizes = storage.read_npy(sizes_url, storage_options)
    ends = np.concatenate(([0], np.cumsum(_row_bytes(sizes[local], positions + 1))))
    return RouteReceipt(out_url, row_bounds.tolist(), ends[row_bounds].tolist())


def merge_records(
    fasta_url: str, parts: list[tuple[str, int, int]], first_position: int, n_rows: int, routing: Routing,
    block: int, placement: list | None = None,
):
    """Positions ``[first_position, first_position + n_rows)`` of a local FASTA: their
    records, routed there by every range (``parts``: each range's routed file and its rows
    of this block), copied out of the mapped file in position order and converted once, as
    the fast path converts a range; then written like its rows (:func:`emit_rows`)."""
    routed = [_read_npy_slice(Slice(url, lo, hi), routing.storage_options) for url, lo, hi in parts if hi > lo]
    if not routed or n_rows == 0:
        return None
    records = np.concatenate(routed)
    records = records[np.argsort(records[:, 0], kind="stable")]
    pos = records[:, 0]
    if len(pos) != n_rows or pos[0] != first_position or pos[-1] != first_position + n_rows - 1:
        raise RuntimeError(f"block at {first_position}: {len(pos)} rows, expected {n_rows}")  # pragma: no cover
    starts, ends = records[:, 1], records[:, 2]
    if int(starts.min()) < 0 or bool((ends < starts).any()):  # past the end: range_view refuses it
        raise RuntimeError(f"{fasta_url}: a routed record's span is not inside the file")  # a defect or a forged file
    with storage.open_input(fasta_url, routing.storage_options) as f:
        with storage.range_view(f, fasta_url, 0, int(ends.max()), random=True) as mapped:
            data = gather_records(mapped, starts, ends)
            del mapped
    try:
        converted = convert_block(data, 0, fasta_url, uppercase=True, first_id=first_position + 1)
    except InputError:  # every byte passed the index: the file is not what it read
        converted = None
    if converted is None or len(converted) != n_rows:
        raise InputError(fasta_url, f"bytes {int(starts.min())}-{int(ends.max())}",
                         "the records read again differ from what the index read; was the file changed during the run?")
    warn_empty_sequences(converted, fasta_url, starts, "of these positions")
    return emit_rows(converted.rows, first_position, routing, f"block-{block:05d}", placement)


def _list_pieces(work_dir: str, parts: tuple[str, ...], storage_options: dict) -> list[str]:
    fs, path = storage.get_fs(storage.join(work_dir, "pieces", *parts), storage_options)
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.ls(path, detail=False) if p.endswith(".csv") or p.endswith(".u64"))


def _piece_bytes(path: str) -> int:
    return int(path.rsplit("/", 1)[-1].split("-")[1].split(".")[0])


def assemble_shard(
    work_dir: str, tree_dir: str, split_dir: str, shard: int, storage_options: dict
) -> int:
    """The shard's pieces in position order → ``<split_dir>/x###.csv``.

    The first piece of a non-empty shard already holds the header; its name records its
    size. :func:`esm2dask.storage.concatenate_pieces` makes it the shard on a file system
    (the other pieces appended in the kernel), and copies the pieces elsewhere.
    """
    pieces = _list_pieces(work_dir, (split_dir, f"{shard:03d}"), storage_options)
    out_url = storage.join(tree_dir, split_dir, shard_name(shard))
    first_bytes = _piece_bytes(pieces[0]) if pieces else 0
    return storage.concatenate_pieces(out_url, CSV_HEADER, pieces, first_bytes, storage_options)


def assemble_array(
    work_dir: str, tree_dir: str, split_dir: str, name: str, storage_options: dict
) -> int:
    """Concatenate the ``counts``/``starts`` pieces of one split into ``<name>.mmap``."""
    pieces = _list_pieces(work_dir, (split_dir, name), storage_options)
    out_url = storage.join(tree_dir, split_dir, f"{name}.mmap")
    return storage.concatenate(out_url, b"", pieces, storage_options)


def raise_missing(url: str, kind: str, n_missing: int, examples: list[str]) -> None:
    shown = ", ".join(repr(x) for x in examples)
    raise InputError(
        url,
        "",
        f"{n_missing} {kind} id(s) named in the mapping are not in this FASTA "
        f"(first: {shown}); nothing was written",
    )
