"""``report``: what a conversion produced, and whether validation leaks into training.

The report reads one layout of an output tree (``esm2nv`` if present, else ``bionemo2``,
else ``hf``; ``--layout`` chooses), on the Dask cluster, each file once:

1. The driver lists the files (never following a symbolic link under OUT) and plans one
   *piece* per file (a CSV shard, a parquet part, a rowid range of a SQLite table).
2. One task per piece reads it and returns small statistics: rows, residues, the count of
   every sequence length and of every letter (upper-cased), the sequences beyond ESM-2's
   crop, examples of non-standard letters, and — for training clusters — the members per
   cluster. It also leaves three small files in the report's temporary folder: a 128-bit
   digest (MurmurHash3 x64_128) of every upper-cased sequence and one of every id, each
   sorted into hash buckets (20 bytes a row), and where each row's id and sequence are in
   the shard. A SQLite or parquet piece also leaves its ids and sequences there, as one
   buffer (an ESM2nv shard is that buffer itself).
3. One task per bucket reads that bucket's digests from every piece and groups them in
   numpy. Only a digest that could make a finding (two rows of one split, or both splits
   of a compared pair) has its rows' ids and sequences read back, byte ranges of their
   files, and each group is confirmed by comparing the values themselves. It returns
   counts and a bounded number of examples: duplicates inside a split, sequences shared
   by training and validation/test, ids in two splits, and the digests shared by different
   values among the rows read back (``hash_collisions``). (A uf50 representative that is
   also its uf90 member shares a digest with it: not a finding, never read back.)

The driver merges these records into the report (:func:`build_report`), and
:mod:`esm2dask.report_html` draws it. Everything is built in ``OUT/.esm2dask-report-*`` and
renamed to ``OUT/esm2dask-report`` at the end; nothing else in OUT is touched.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import mmap
import os
import re
import secrets
import shutil
import sqlite3
import stat
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from . import __version__
from .cluster import dashboard_link, dask_client, interruptible, settle, take_back_ctrl_c, task_result
from .config import ClusterConfig
from .errors import ConfigError, InputError, OutputError
from .layout import CSV_HEADER, FORMATS, shard_bounds
from .progress import Reporter

log = logging.getLogger("esm2dask")

REPORT_DIR = "esm2dask-report"
TMP_PREFIX = ".esm2dask-report-"
#: ESM-2 crops a sequence to 1024 tokens, BOS and EOS included: 1022 residues.
CROP_RESIDUES = 1022
CROP_TOKENS = 1024
STANDARD = "ACDEFGHIKLMNPQRSTVWY"
#: Sequence-length histogram bins, the same for every split: ``[edge[i], edge[i+1])``,
#: about four per doubling; the last bin also holds anything longer.
LENGTH_EDGES = [0] + sorted({int(round(2 ** (k / 4))) for k in range(0, 4 * 20 + 1)})
#: Examples kept per kind of finding (the counts are always complete).
EXAMPLES_MAX = 1000
#: Ids shown per side of one duplicate group.
IDS_PER_GROUP = 10
#: Examples of each non-standard letter.
LETTER_EXAMPLES = 3
TOP_CLUSTERS = 20
#: Bytes of input per SQLite piece (rowid range).
DB_PIECE_BYTES = 64 * 2**20
#: Bytes of input per hash bucket of the join (its digests are about 1/15 of that).
BUCKET_BYTES = 256 * 2**20
#: Small pieces are read by one task up to this many bytes together.
BATCH_BYTES = 32 * 2**20

TRAIN, UF50_TRAIN, VAL, TEST = "train", "uf50-train", "val", "test"
SPLITS = (TRAIN, UF50_TRAIN, VAL, TEST)
#: The pairs of splits compared for leakage (the two training views are one training set).
PAIRS = ((TRAIN, VAL), (TRAIN, TEST), (UF50_TRAIN, VAL), (UF50_TRAIN, TEST), (VAL, TEST))
_SHARD_RE = re.compile(r"^x\d{3}\.csv$")
_PART_RE = re.compile(r"^part-\d{5}\.parquet$")


@dataclass(frozen=True)
class ReportConfig:
    """One ``report`` run: the output tree (a local folder), the layout to read, the cluster
    (by default a LocalCluster without a dashboard: a report lasts seconds)."""

    output_dir: str
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(dashboard_address=None))
    #: ``esm2nv``, ``bionemo2`` or ``hf``; None: the first of those present.
    layout: str | None = None
    #: print the dashboard's link (``preprocess --report`` has printed its own already)
    announce_dashboard: bool = True

    def __post_init__(self):
        if "://" in self.output_dir and not self.output_dir.startswith("file://"):
            raise ConfigError(
                f"{self.output_dir}: esm2dask report reads and writes a local folder only; "
                f"copy the tree to a local disk first"
            )
        if self.layout is not None and self.layout not in FORMATS:
            raise ConfigError(f"--layout {self.layout!r} is not one of {', '.join(FORMATS)}")

    @property
    def root(self) -> str:
        path = self.output_dir[len("file://"):] if self.output_dir.startswith("file://") else self.output_dir
        return os.path.abspath(path)


@dataclass(frozen=True)
class Piece:
    """One task's share of the reading: a CSV shard, a parquet part or a rowid range."""

    index: int
    split: str
    kind: str  # "csv", "parquet", "sqlite"
    path: str
    rel: str
    size_bytes: int
    #: uf50 train shards: (counts.mmap path, first row, last row + 1) of its clusters
    counts: tuple[str, int, int] | None = None
    #: hf train parts: count the runs of ur50_id (clusters stand together, in uf90 order)
    cluster_column: bool = False
    #: sqlite: rowids [lo, hi)
    rowids: tuple[int, int] | None = None
    #: uf90 of a random split: its first global row, and row intervals [lo, hi) of val/test
    #: clusters' members, which are not training rows
    first_row: int = 0
    exclude: tuple[tuple[int, int], ...] = ()


@dataclass
class PieceStats:
    """What one piece returns to the driver: small, whatever the piece's size."""

    index: int
    rows: int = 0
    residues: int = 0
    lengths: dict[int, int] = field(default_factory=dict)
    letters: dict[str, int] = field(default_factory=dict)
    lowercase_residues: int = 0
    letter_examples: dict[str, list[str]] = field(default_factory=dict)
    beyond_rows: int = 0
    beyond_residues: int = 0
    excluded_rows: int = 0
    digest: str = ""
    #: the file the join reads this piece's ids and sequences back from
    source: str = ""
    #: cluster sizes: members → clusters; the largest (members, id); for hf the first and
    #: last run of ur50_id (they may continue in the neighbouring part)
    cluster_sizes: dict[int, int] = field(default_factory=dict)
    top_clusters: list[tuple[int, str]] = field(default_factory=list)
    edge_runs: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class BucketResult:
    """Duplicates found in one hash bucket: complete counts, bounded examples."""

    within: dict[str, dict[str, int]] = field(default_factory=dict)
    within_examples: list[dict] = field(default_factory=list)
    between: dict[str, dict[str, int]] = field(default_factory=dict)
    between_examples: list[dict] = field(default_factory=list)
    repeated_ids: dict[str, dict[str, int]] = field(default_factory=dict)
    repeated_id_examples: list[dict] = field(default_factory=list)
    shared_ids: dict[str, int] = field(default_factory=dict)
    shared_id_examples: list[dict] = field(default_factory=list)
    hash_collisions: int = 0


# ----------------------------------------------------------------------------- planning


def _regular(path: str, rel: str) -> int:
    """The size of a regular file; a link or anything else is refused (never followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise InputError(path, "", "no such file") from None
    if stat.S_ISLNK(st.st_mode):
        raise InputError(path, "", f"{rel} is a symbolic link; esm2dask report never follows links under OUT")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(path, "", f"{rel} is not a regular file")
    return st.st_size


def _real_dir(path: str) -> bool:
    """A folder that is not a symbolic link (a link to one is not read)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _folder(root: str, rel: str) -> bool:
    """Whether ``root/rel`` is a folder, refusing a symbolic link at any level below root
    (the system would follow a link in the middle of a path without telling)."""
    path = root
    for part in rel.split("/"):
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise InputError(path, "", f"{os.path.relpath(path, root)} is a symbolic link; esm2dask report never "
                                       f"follows links under OUT")
        if not _real_dir(path):
            return False
    return True


def _names(folder: str, pattern: re.Pattern) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if pattern.match(e.name))


def layouts_found(root: str) -> tuple[str, ...]:
    """The layouts whose files are in ``root``, in the order of ``FORMATS``."""
    found = {
        "esm2nv": _real_dir(os.path.join(root, "uf50", "train")) or _real_dir(os.path.join(root, "uf90", "uf90_csvs")),
        "bionemo2": os.path.lexists(os.path.join(root, "bionemo2", "train.db"))
        or os.path.lexists(os.path.join(root, "bionemo2", "validation.db")),
        "hf": _real_dir(os.path.join(root, "hf", "train")) or _real_dir(os.path.join(root, "hf", "validation")),
    }
    return tuple(f for f in FORMATS if found[f])


def _read_u64(path: str, rel: str, first: int | None = None, count: int | None = None) -> np.ndarray:
    size = _regular(path, rel)
    if size % 8:
        raise InputError(path, "", f"{size} bytes, not a whole number of uint64 values")
    with open(path, "rb") as f:
        if first is not None:
            f.seek(8 * first)
            return np.frombuffer(f.read(8 * count), dtype="<u8").astype(np.int64)
        return np.frombuffer(f.read(), dtype="<u8").astype(np.int64)


def _plan_esm2nv(root: str) -> tuple[list[Piece], dict[str, str], list[str]]:
    pieces: list[Piece] = []
    sources: dict[str, str] = {}
    notes: list[str] = []
    folders = {TRAIN: "uf90/uf90_csvs", UF50_TRAIN: "uf50/train", VAL: "uf50/val", TEST: "uf50/test"}
    shards = {}
    for split, rel in folders.items():
        folder = os.path.join(root, rel)
        if _folder(root, rel):
            shards[split] = _names(folder, _SHARD_RE)
            if not shards[split]:
                raise InputError(folder, "", f"{rel} holds no x000.csv …: not an ESM2nv folder")
            sources[split] = rel
    if UF50_TRAIN not in shards and TRAIN not in shards:
        raise InputError(root, "", "neither uf50/train nor uf90/uf90_csvs is there")
    counts_rel = "uf50/train/counts.mmap"
    train_bounds = None
    if UF50_TRAIN in shards and os.path.lexists(os.path.join(root, counts_rel)):
        n = _regular(os.path.join(root, counts_rel), counts_rel)
        if n % 8:
            raise InputError(os.path.join(root, counts_rel), "", f"{n} bytes, not a whole number of uint64 values")
        train_bounds = shard_bounds(n // 8, len(shards[UF50_TRAIN]))
    # A random split (v1.0) keeps counts/starts in val and test too, and uf90 holds the
    # members of every cluster: only the train clusters' members are training rows.
    exclude: list[tuple[int, int]] = []
    uf90_bounds = None
    if TRAIN in shards and os.path.lexists(os.path.join(root, "uf50/val/counts.mmap")):
        total = 0
        for d in ("uf50/train", "uf50/val", "uf50/test"):
            c_rel, s_rel = f"{d}/counts.mmap", f"{d}/starts.mmap"
            if not os.path.lexists(os.path.join(root, c_rel)):
                continue
            n = _regular(os.path.join(root, c_rel), c_rel) // 8
            if n == 0:
                continue
            if d == "uf50/train":  # its last value only: the tasks read the rest
                counts = _read_u64(os.path.join(root, c_rel), c_rel, n - 1, 1)
                starts = _read_u64(os.path.join(root, s_rel), s_rel, n - 1, 1)
            else:
                counts = _read_u64(os.path.join(root, c_rel), c_rel)
                starts = _read_u64(os.path.join(root, s_rel), s_rel)
                exclude.extend(zip(starts.tolist(), (starts + counts).tolist()))
            total = max(total, int(starts[-1] + counts[-1]))
        exclude.sort()
        exclude_starts = [a for a, _ in exclude]
        uf90_bounds = shard_bounds(total, len(shards[TRAIN]))
        notes.append("random split: uf90/uf90_csvs holds the members of every cluster; only the train "
                     "clusters' members count as training rows here")
    for split in SPLITS:
        for k, name in enumerate(shards.get(split, [])):
            rel = f"{folders[split]}/{name}"
            path = os.path.join(root, rel)
            extra = {}
            if split == UF50_TRAIN and train_bounds is not None:
                extra["counts"] = (os.path.join(root, counts_rel), int(train_bounds[k]), int(train_bounds[k + 1]))
            if split == TRAIN and uf90_bounds is not None:
                lo, hi = int(uf90_bounds[k]), int(uf90_bounds[k + 1])
                # the intervals are sorted and disjoint: from the last one starting at or
                # before lo, up to the first one starting at or after hi
                i = max(bisect.bisect_right(exclude_starts, lo) - 1, 0)
                j = bisect.bisect_left(exclude_starts, hi)
                mine = [(a, b) for a, b in exclude[i:j] if b > lo]
                extra["first_row"], extra["exclude"] = lo, tuple(mine)
            pieces.append(Piece(len(pieces), split, "csv", path, rel, _regular(path, rel), **extra))
    return pieces, sources, notes


def _db_pieces(root: str, rel: str, split: str, first_index: int) -> list[Piece]:
    path = os.path.join(root, rel)
    size = _regular(path, rel)
    with _connect(path) as con:
        try:
            lo, hi = con.execute("SELECT min(rowid), max(rowid) FROM protein").fetchone()
        except sqlite3.DatabaseError:
            raise InputError(path, "", "not a SQLite database with a protein table (id, sequence)") from None
    if lo is None:
        lo, hi = 1, 0
    n = max(1, min(math.ceil(size / DB_PIECE_BYTES), hi - lo + 1))
    edges = np.linspace(lo, hi + 1, n + 1).astype(np.int64)
    return [
        Piece(first_index + i, split, "sqlite", path, rel, size // n, rowids=(int(edges[i]), int(edges[i + 1])))
        for i in range(n)
    ]


def _plan_bionemo2(root: str) -> tuple[list[Piece], dict[str, str], list[str]]:
    pieces: list[Piece] = []
    sources = {}
    for split, name in ((TRAIN, "train.db"), (VAL, "validation.db"), (TEST, "test.db")):
        rel = f"bionemo2/{name}"
        if _folder(root, "bionemo2") and os.path.lexists(os.path.join(root, rel)):
            pieces.extend(_db_pieces(root, rel, split, len(pieces)))
            sources[split] = rel
    return pieces, sources, []


def _plan_hf(root: str) -> tuple[list[Piece], dict[str, str], list[str]]:
    pieces: list[Piece] = []
    sources = {}
    for split, name in ((TRAIN, "train"), (VAL, "validation"), (TEST, "test")):
        rel_dir = f"hf/{name}"
        folder = os.path.join(root, rel_dir)
        if not _folder(root, rel_dir):
            continue
        sources[split] = rel_dir
        for part in _names(folder, _PART_RE):
            rel = f"{rel_dir}/{part}"
            path = os.path.join(root, rel)
            pieces.append(Piece(len(pieces), split, "parquet", path, rel, _regular(path, rel),
                                cluster_column=split == TRAIN))
    return pieces, sources, []


def plan_report(config: ReportConfig) -> tuple[str, list[Piece], dict[str, str], list[str], str | None]:
    """The layout read, the pieces, each split's source, notes, and the bionemo2 clusters file."""
    root = config.root
    if not os.path.isdir(root):  # OUT itself may be a link; nothing under it is followed
        raise OutputError(f"{config.output_dir}: no such folder")
    found = layouts_found(root)
    if not found:
        raise OutputError(
            f"{config.output_dir}: not an output of esm2dask preprocess (no uf50/train, uf90/uf90_csvs, "
            f"bionemo2/train.db or hf/train in it)"
        )
    layout = config.layout or found[0]
    if layout not in found:
        raise OutputError(f"{config.output_dir}: no {layout} layout in it (found: {', '.join(found)})")
    planner = {"esm2nv": _plan_esm2nv, "bionemo2": _plan_bionemo2, "hf": _plan_hf}[layout]
    pieces, sources, notes = planner(root)
    clusters_file = None
    if layout == "bionemo2" and os.path.lexists(os.path.join(root, "bionemo2/train_clusters.parquet")):
        clusters_file = os.path.join(root, "bionemo2/train_clusters.parquet")
        _regular(clusters_file, "bionemo2/train_clusters.parquet")
    if not pieces:
        raise OutputError(f"{config.output_dir}: the {layout} layout holds no data files")
    return layout, pieces, sources, notes, clusters_file


# ----------------------------------------------------------------------------- reading


def _connect(path: str) -> sqlite3.Connection:
    """Read-only and immutable: no journal, no lock file, nothing written beside it."""
    uri = f"file:{urllib.parse.quote(path)}?mode=ro&immutable=1"
    return sqlite3.connect(uri, uri=True)


def _byte_classes() -> np.ndarray:
    """What a byte of an ESM2nv sequence is: 0 a standard amino acid in upper case (the
    common case, one table look-up); 1 a byte a shard never holds there (a control,
    non-ASCII, space, '"' or ',' byte; the line break ends the field); 2 anything else."""
    classes = np.full(256, 2, dtype=np.uint8)
    classes[:33] = 1
    classes[127:] = 1
    classes[[34, 44]] = 1
    classes[[ord(a) for a in STANDARD]] = 0
    return classes


BYTE_CLASSES = _byte_classes()


@njit(nogil=True, cache=True)
def parse_esm2nv(data: np.ndarray, start: int, keep: np.ndarray, room: int, classes: np.ndarray):
    """One pass over the rows of an ESM2nv shard (``data[start:]``, after the header):
    ``record_id,record_name,sequence_length,sequence\\n``, never quoted.

    For the rows whose ``keep`` is set (one entry per line; every row if ``keep`` is
    empty, with room for ``room`` rows: no line count first), returns where their
    record_name and sequence are in ``data`` (start, length), the count of every raw
    sequence byte, and for every byte value ``u`` that is not a standard amino acid the
    first LETTER_EXAMPLES rows (index among the kept rows, -1 beyond) whose upper-cased
    sequence holds ``u``; then the rows read, the bad line or 0, and what is wrong
    (:data:`_NO_ROOM`: more rows than ``room``). Every line is checked (four fields; no
    control, non-ASCII, space or '"' byte in name or sequence)."""
    n_data = len(data)
    keep_all = len(keep) == 0
    n_keep = room
    if not keep_all:
        n_keep = 0
        for i in range(len(keep)):
            n_keep += keep[i]
    id_start = np.empty(n_keep, dtype=np.int64)
    id_len = np.empty(n_keep, dtype=np.int64)
    seq_start = np.empty(n_keep, dtype=np.int64)
    seq_len = np.empty(n_keep, dtype=np.int64)
    counts = np.zeros(256, dtype=np.int64)
    examples = np.full((256, 3), -1, dtype=np.int64)
    n_examples = np.zeros(256, dtype=np.int64)
    rows = 0
    k = 0
    p = start
    while p < n_data:
        line = rows + 2
        if not keep_all and rows >= len(keep):
            return id_start, id_len, seq_start, seq_len, counts, examples, rows, line, 1
        take = keep_all or keep[rows] != 0
        if take and k == n_keep:
            return id_start, id_len, seq_start, seq_len, counts, examples, rows, line, _NO_ROOM
        # record_id
        while p < n_data and data[p] != 44 and data[p] != 10:
            p += 1
        if p >= n_data or data[p] != 44:
            return id_start, id_len, seq_start, seq_len, counts, examples, rows, line, 2
        p += 1
        # record_name
        q = p
        while q < n_data and data[q] != 44 and data[q] != 10:
            b = data[q]
            if b <= 32 or b >= 127 or b == 34:
                return id_start, id_len, seq_start, seq_len, counts, examples, rows, line, 3
            q += 1
        if q >= n_data or data[q] != 44:
            return id_start, id_len, seq_start, seq_len, counts, examples, rows, line, 2
        name_at, name_len = p, q - p
        p = q + 1
        # sequence_length
        while p < n_data and data[p] != 44 and data[p] != 10:
            p += 1
        if p >= n_data or data[p] != 44:
            return id_start, id_len, seq_start, seq_len, counts, examples, rows, line, 2
        p += 1
        # sequence, up to the end of the line (or of the file)
        q = p
        if take:  # two loops: the test stays out of the one that runs per residue
            while q < n_data:
                b = data[q]
                c = classes[b]
                if c != 0:
                    if b == 10:
                        break
                    if c == 1:
                        return id_start, id_len, seq_start, seq_len, counts, examples, rows, line, 4 if b != 44 else 2
                    u = b - 32 if 97 <= b <= 122 else b
                    n = n_examples[u]
                    if classes[u] != 0 and n < 3 and (n == 0 or examples[u, n - 1] != k):
                        examples[u, n] = k
                        n_examples[u] = n + 1
                counts[b] += 1
                q += 1
        else:
            while q < n_data:
                b = data[q]
                if classes[b] == 1:
                    if b == 10:
                        break
                    return id_start, id_len, seq_start, seq_len, counts, examples, rows, line, 4 if b != 44 else 2
                q += 1
        if take:
            id_start[k], id_len[k], seq_start[k], seq_len[k] = name_at, name_len, p, q - p
            k += 1
        p = q + 1
        rows += 1
    if not keep_all and rows != len(keep):
        return id_start, id_len, seq_start, seq_len, counts, examples, rows, rows + 2, 1
    return id_start[:k], id_len[:k], seq_start[:k], seq_len[:k], counts, examples, rows, 0, 0


#: :func:`parse_esm2nv` ran out of room for rows (read again with the lines counted).
_NO_ROOM = 5
#: Bytes per row that :func:`parse_esm2nv` first makes room for (UniRef's rows are ~10×).
_ROOM_BYTES_PER_ROW = 32
_PARSE_ERRORS = {
    1: "more rows than lines (a line break inside a row)",
    2: "not the four fields record_id,record_name,sequence_length,sequence of an ESM2nv shard",
    3: "a byte in record_name that an ESM2nv shard never holds (a control, non-ASCII, space or '\"' byte)",
    4: "a byte in sequence that an ESM2nv shard never holds (a control, non-ASCII, space or '\"' byte)",
}


@njit(nogil=True, cache=True)
def gather(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, upper: bool):
    """The values ``data[starts[i]:starts[i] + lengths[i]]`` one after the other (ASCII
    upper-cased if ``upper``), and their offsets from 0."""
    offsets = np.zeros(len(starts) + 1, dtype=np.int64)
    for i in range(len(starts)):
        offsets[i + 1] = offsets[i] + lengths[i]
    out = np.empty(offsets[-1], dtype=np.uint8)
    for i in range(len(starts)):
        o = offsets[i]
        for j in range(lengths[i]):
            b = data[starts[i] + j]
            out[o + j] = b - 32 if upper and 97 <= b <= 122 else b
    return offsets, out


@dataclass
class _Rows:
    """A piece's rows, as places in one byte buffer: ``data[id_start[i]:][:id_len[i]]`` is
    row ``i``'s id and ``data[seq_start[i]:][:seq_len[i]]`` its sequence (upper-cased if
    ``upper_cased``). ``source`` is the file whose bytes ``data`` are (an ESM2nv shard);
    None when ``data`` was assembled from a database or parquet part. ``row``: each row's
    number in the piece (val/test rows of a random split are left out)."""

    data: np.ndarray
    id_start: np.ndarray
    id_len: np.ndarray
    seq_start: np.ndarray
    seq_len: np.ndarray
    row: np.ndarray
    raw_counts: np.ndarray
    upper_cased: bool
    source: str | None
    letter_examples: dict[str, list[str]]
    excluded_rows: int = 0
    ur50: object = None

    def id_at(self, i: int) -> str:
        a = int(self.id_start[i])
        return self.data[a : a + int(self.id_len[i])].tobytes().decode("utf-8", "replace")

    def upper_sequences(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets from 0, bytes) of the upper-cased sequences, one after the other."""
        lower = self.raw_counts[ord("a") : ord("z") + 1].any() and not self.upper_cased
        return gather(self.data, self.seq_start, self.seq_len, lower)


def _keep_mask(piece: Piece, n: int) -> np.ndarray:
    keep = np.ones(n, dtype=np.uint8)
    for a, b in piece.exclude:
        keep[max(a - piece.first_row, 0) : max(b - piece.first_row, 0)] = 0
    return keep


def _mapped(path: str) -> np.ndarray:
    """A file's bytes, mapped read-only: no copy out of the page cache (``np.fromfile``'s
    read costs 0.15 s of system time per GB here). Our own output files: none is cut short
    while a report reads it (a run replaces files, never truncates them)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.frombuffer(mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ), dtype=np.uint8)


def _read_csv_rows(piece: Piece) -> _Rows:
    """An ESM2nv shard in one numba pass over its bytes: no CSV library, no per-row Python,
    no copy of names or sequences."""
    data = _mapped(piece.path)
    start = len(CSV_HEADER)
    if data[:start].tobytes() != CSV_HEADER:
        raise InputError(piece.path, "line 1", f"not the header {CSV_HEADER.decode().strip()!r} of an ESM2nv shard")
    body = data[start:]

    def lines() -> int:
        return int(np.count_nonzero(body == 10)) + (1 if len(body) and body[-1] != 10 else 0)

    if piece.exclude:  # a random split's val/test rows: a mask of the lines
        keep = _keep_mask(piece, lines())
        found = parse_esm2nv(data, start, keep, 0, BYTE_CLASSES)
    else:  # every row: room for a guess at how many (a count of the lines costs a pass)
        keep = np.zeros(0, dtype=np.uint8)
        found = parse_esm2nv(data, start, keep, len(body) // _ROOM_BYTES_PER_ROW + 16, BYTE_CLASSES)
        if found[-1] == _NO_ROOM:
            found = parse_esm2nv(data, start, keep, lines(), BYTE_CLASSES)
    id_start, id_len, seq_start, seq_len, raw_counts, examples, n_lines, bad, what = found
    if bad:
        raise InputError(piece.path, f"line {bad}", _PARSE_ERRORS[what])
    row = np.flatnonzero(keep).astype(np.int64) if len(keep) else np.arange(n_lines, dtype=np.int64)
    rows = _Rows(data, id_start, id_len, seq_start, seq_len, row, raw_counts, False, piece.path, {},
                 int(n_lines - len(row)))
    for u in np.flatnonzero(examples[:, 0] >= 0).tolist():
        rows.letter_examples[chr(u)] = [rows.id_at(i) for i in examples[u].tolist() if i >= 0]
    return rows


def _read_rows(piece: Piece) -> _Rows:
    """The rows of a piece (:class:`_Rows`), val/test rows of a random split left out."""
    if piece.kind == "csv":
        return _read_csv_rows(piece)
    import polars as pl

    ids, seqs, ur50 = _read_piece(piece)
    row = np.arange(len(seqs), dtype=np.int64)
    excluded = 0
    if piece.exclude:
        keep = _keep_mask(piece, len(seqs)).astype(bool)
        excluded = int((~keep).sum())
        mask = pl.Series(keep)
        ids, seqs, row = ids.filter(mask), seqs.filter(mask), row[keep]
    _, raw = _buffers(seqs)
    raw_counts = count_bytes(np.frombuffer(raw, dtype=np.uint8))
    upper = seqs.str.to_uppercase() if raw_counts[ord("a") : ord("z") + 1].sum() else seqs
    examples = {}
    for u in np.flatnonzero(raw_counts).tolist():
        letter = chr(u).upper() if 97 <= u <= 122 else chr(u)
        if letter not in STANDARD and letter not in examples:
            hits = ids.filter(upper.str.contains(letter, literal=True)).head(LETTER_EXAMPLES)
            examples[letter] = hits.to_list()
    # one buffer, the ids and then the sequences: the join reads its values back from it
    id_offsets, id_bytes = _buffers(ids)
    seq_offsets, seq_bytes = _buffers(upper)
    data = np.concatenate([np.frombuffer(id_bytes, dtype=np.uint8), np.frombuffer(seq_bytes, dtype=np.uint8)])
    return _Rows(data, id_offsets[:-1], np.diff(id_offsets), seq_offsets[:-1] + len(id_bytes), np.diff(seq_offsets),
                 row, raw_counts, True, None, dict(sorted(examples.items())), excluded, ur50)


def _read_piece(piece: Piece):
    """(ids, sequences, ur50 ids or None) of a parquet or SQLite piece, as polars Series."""
    import polars as pl

    if piece.kind == "parquet":
        import pyarrow.parquet as pq

        with open(piece.path, "rb") as f:
            try:
                names = pq.read_schema(f).names
                f.seek(0)
                wanted = ["ur90_id" if piece.split == TRAIN else "ur50_id", "sequence"]
                if piece.cluster_column:
                    wanted.append("ur50_id")
                if not set(wanted) <= set(names):
                    raise InputError(piece.path, "", f"not an hf part of esm2dask: columns {names}, "
                                                     f"expected {sorted(set(wanted))}")
                table = pq.read_table(f, columns=list(dict.fromkeys(wanted)))
            except InputError:
                raise
            except Exception:
                raise InputError(piece.path, "", "not a readable parquet file") from None
        frame = pl.from_arrow(table)
        ids = frame[wanted[0]].cast(pl.String).fill_null("")
        seqs = frame["sequence"].cast(pl.String).fill_null("")
        ur50 = frame["ur50_id"].cast(pl.String).fill_null("") if piece.cluster_column else None
        return ids, seqs, ur50
    lo, hi = piece.rowids
    with _connect(piece.path) as con:
        try:
            rows = con.execute(
                "SELECT id, sequence FROM protein WHERE rowid >= ? AND rowid < ? ORDER BY rowid", (lo, hi)
            ).fetchall()
        except sqlite3.DatabaseError:
            raise InputError(piece.path, "", "not a SQLite database with a protein table (id, sequence)") from None
    ids = pl.Series("id", [r[0] for r in rows], dtype=pl.String).fill_null("")
    seqs = pl.Series("sequence", [r[1] for r in rows], dtype=pl.String).fill_null("")
    return ids, seqs, None


def _buffers(series) -> tuple[np.ndarray, memoryview]:
    """Offsets (from 0) and the data bytes of a string Series, as one contiguous buffer."""
    import pyarrow as pa

    arr = series.to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.large_string())
    if len(arr) == 0:
        return np.zeros(1, dtype=np.int64), memoryview(b"")
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")
    return offsets - offsets[0], data[offsets[0] : offsets[-1]]


@njit(nogil=True, cache=True)
def count_bytes(data: np.ndarray) -> np.ndarray:
    """How often each byte value occurs (``np.bincount`` would first widen every byte to 8)."""
    counts = np.zeros(256, dtype=np.int64)
    for b in data:
        counts[b] += 1
    return counts


_C1 = np.uint64(0x87C37B91114253D5)
_C2 = np.uint64(0x4CF5AD432745937F)


@njit(nogil=True, cache=True, inline="always")
def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@njit(nogil=True, cache=True, inline="always")
def _fmix(k):
    k ^= k >> np.uint64(33)
    k *= np.uint64(0xFF51AFD7ED558CCD)
    k ^= k >> np.uint64(33)
    k *= np.uint64(0xC4CEB9FE1A85EC53)
    k ^= k >> np.uint64(33)
    return k


@intrinsic
def _load_u64(typingctx, data, p):
    """The 8 bytes of ``data`` (uint8) from ``p`` as one integer, in one unaligned load
    (x86-64 and arm64 allow them; :func:`_word` loads and shifts byte by byte, 3.5 times
    slower). The machine's byte order: little-endian on both, as MurmurHash3 reads its
    blocks (tests/test_report.py checks the digests against mmh3)."""
    sig = types.uint64(data, types.intp)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        pointer = builder.bitcast(builder.gep(array.data, [args[1]]), ir.IntType(64).as_pointer())
        return builder.load(pointer, align=1)

    return sig, codegen


@njit(nogil=True, cache=True, inline="always")
def _word(data, p, n):
    """``n`` bytes from ``p`` as a little-endian integer."""
    k = np.uint64(0)
    for j in range(n):
        k |= np.uint64(data[p + j]) << np.uint64(8 * j)
    return k


@njit(nogil=True, cache=True)
def murmur3_128(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """MurmurHash3 x64_128 (seed 0) of every value ``data[starts[i]:starts[i] + lengths[i]]``:
    ``out[i] = (h1, h2)``, the digest's two little-endian halves."""
    n = len(starts)
    out = np.empty((n, 2), dtype=np.uint64)
    for i in range(n):
        start, length = starts[i], lengths[i]
        h1 = np.uint64(0)
        h2 = np.uint64(0)
        blocks = length // 16
        for b in range(blocks):
            p = start + 16 * b
            k1 = _load_u64(data, p)
            k2 = _load_u64(data, p + 8)
            k1 *= _C1
            k1 = _rotl(k1, 31)
            k1 *= _C2
            h1 ^= k1
            h1 = _rotl(h1, 27)
            h1 += h2
            h1 = h1 * np.uint64(5) + np.uint64(0x52DCE729)
            k2 *= _C2
            k2 = _rotl(k2, 33)
            k2 *= _C1
            h2 ^= k2
            h2 = _rotl(h2, 31)
            h2 += h1
            h2 = h2 * np.uint64(5) + np.uint64(0x38495AB5)
        tail = start + 16 * blocks
        rest = length - 16 * blocks
        if rest > 8:
            k2 = _word(data, tail + 8, rest - 8)
            k2 *= _C2
            k2 = _rotl(k2, 33)
            k2 *= _C1
            h2 ^= k2
        if rest > 0:
            k1 = _word(data, tail, min(rest, 8))
            k1 *= _C1
            k1 = _rotl(k1, 31)
            k1 *= _C2
            h1 ^= k1
        h1 ^= np.uint64(length)
        h2 ^= np.uint64(length)
        h1 += h2
        h2 += h1
        h1 = _fmix(h1)
        h2 = _fmix(h2)
        h1 += h2
        h2 += h1
        out[i, 0] = h1
        out[i, 1] = h2
    return out


def digests_of(series) -> bytes:
    """16-byte MurmurHash3 x64_128 digests of every value of a string Series, concatenated.

    A cryptographic digest is not needed (every match is confirmed on the values), and
    blake2b called once per row from Python took two thirds of the report's time."""
    offsets, data = _buffers(series)
    return murmur3_128(np.frombuffer(data, dtype=np.uint8), offsets[:-1], np.diff(offsets)).astype("<u8").tobytes()


#: One row in a hash-bucket file: its digest and its index among the piece's rows.
KEY = np.dtype([("h1", "<u8"), ("h2", "<u8"), ("k", "<u4")])
#: Where each row of a piece is, one int64 column after the other: its row number in the
#: piece, and its id and sequence (start, length) in the piece's source (the shard
#: itself, or the piece's values file in the scratch folder).
PLACE_COLUMNS = ("row", "id_at", "id_len", "seq_at", "seq_len")


def _write_keys(path: str, digests: np.ndarray, n_buckets: int) -> None:
    """The rows' digests sorted into hash buckets: ``n_buckets + 1`` bucket bounds (int64),
    then the :data:`KEY` records, bucket after bucket."""
    buckets = (digests[:, 0] % np.uint64(n_buckets)).astype(np.uint16 if n_buckets <= 2**16 else np.uint32)
    order = np.argsort(buckets, kind="stable")  # a radix sort on small integers
    keys = np.empty(len(digests), dtype=KEY)
    keys["h1"], keys["h2"], keys["k"] = digests[order, 0], digests[order, 1], order
    bounds = np.searchsorted(buckets[order], np.arange(n_buckets + 1)).astype("<i8")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        bounds.tofile(f)
        keys.tofile(f)
    os.replace(tmp, path)


def _write_arrays(path: str, *arrays: np.ndarray) -> None:
    """The arrays' bytes, one after the other."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for array in arrays:
            f.write(memoryview(np.ascontiguousarray(array)))
    os.replace(tmp, path)


def _read_places(path: str, k: np.ndarray) -> np.ndarray:
    """Rows ``k`` of a piece's place file: an array (len(k), 5) of :data:`PLACE_COLUMNS`."""
    columns = np.memmap(path, dtype="<i8", mode="r")
    return columns.reshape(len(PLACE_COLUMNS), -1)[:, k].T


def scratch_paths(scratch: str, index: int) -> dict[str, str]:
    """The files a piece leaves for the join: sequence and id keys, places, values."""
    return {kind: os.path.join(scratch, f"{kind}-{index:05d}.bin") for kind in ("seq", "id", "place", "values")}


def piece_stats(piece: Piece, scratch: str, n_buckets: int) -> PieceStats:
    """Task: read one piece once; return its statistics; leave the digests of its
    sequences and ids, sorted into hash buckets, and where each row is, for the join."""
    rows = _read_rows(piece)
    stats = PieceStats(piece.index)
    stats.excluded_rows = rows.excluded_rows
    raw_counts, lengths = rows.raw_counts, rows.seq_len
    lower = raw_counts[ord("a") : ord("z") + 1]
    stats.lowercase_residues = int(lower.sum())
    letter_counts = raw_counts.copy()  # upper-casing moves a-z onto A-Z, nothing else (ASCII)
    letter_counts[ord("A") : ord("Z") + 1] += lower
    letter_counts[ord("a") : ord("z") + 1] = 0
    stats.rows = len(lengths)
    stats.residues = int(lengths.sum())
    values, counts = np.unique(lengths, return_counts=True)
    stats.lengths = dict(zip(values.tolist(), counts.tolist()))
    beyond = lengths > CROP_RESIDUES
    stats.beyond_rows = int(beyond.sum())
    stats.beyond_residues = int((lengths[beyond] - CROP_RESIDUES).sum())
    stats.letters = {chr(c): int(n) for c, n in enumerate(letter_counts.tolist()) if n}
    stats.letter_examples = rows.letter_examples

    seq_offsets = seq_bytes = None
    if not rows.upper_cased and lower.any():  # digests and the join see upper-cased sequences
        seq_offsets, seq_bytes = rows.upper_sequences()
    if piece.split in (VAL, TEST):  # to tell a test split that repeats validation
        if seq_offsets is None:
            seq_offsets, seq_bytes = rows.upper_sequences()
        h = hashlib.blake2b(digest_size=16)
        for offsets, buf in (gather(rows.data, rows.id_start, rows.id_len, False), (seq_offsets, seq_bytes)):
            h.update(offsets.astype("<i8").tobytes())
            h.update(buf.tobytes())
        stats.digest = h.hexdigest()

    if piece.counts is not None:
        path, lo, hi = piece.counts
        counts_here = _read_u64(path, "uf50/train/counts.mmap", lo, hi - lo)
        if len(counts_here) != stats.rows:
            raise InputError(path, f"rows {lo}-{hi}",
                             f"{len(counts_here)} counts for the {stats.rows} rows of {piece.rel}")
        _cluster_stats(stats, counts_here, rows.id_at)
    if rows.ur50 is not None:
        import polars as pl

        rle = rows.ur50.rle()
        run_ids, run_lengths = rle.struct.field("value"), rle.struct.field("len").cast(pl.Int64).to_numpy()
        if len(run_lengths) == 1:
            stats.edge_runs = [(run_ids[0], int(run_lengths[0]))]
        elif len(run_lengths) > 1:
            stats.edge_runs = [(run_ids[0], int(run_lengths[0])), (run_ids[-1], int(run_lengths[-1]))]
            if len(run_lengths) > 2:
                inner = run_ids.slice(1, len(run_lengths) - 2)
                _cluster_stats(stats, run_lengths[1:-1], lambda i: inner[i])

    if seq_offsets is not None:
        seq_digests = murmur3_128(seq_bytes, seq_offsets[:-1], np.diff(seq_offsets))
    else:
        seq_digests = murmur3_128(rows.data, rows.seq_start, rows.seq_len)
    id_digests = murmur3_128(rows.data, rows.id_start, rows.id_len)
    paths = scratch_paths(scratch, piece.index)
    _write_keys(paths["seq"], seq_digests, n_buckets)
    _write_keys(paths["id"], id_digests, n_buckets)
    _write_arrays(paths["place"], *(a.astype("<i8", copy=False) for a in
                                    (rows.row, rows.id_start, rows.id_len, rows.seq_start, rows.seq_len)))
    if rows.source is None:
        _write_arrays(paths["values"], rows.data)
        stats.source = paths["values"]
    else:
        stats.source = rows.source
    return stats


def stats_batch(pieces: list[Piece], scratch: str, n_buckets: int) -> list[PieceStats]:
    """Task: :func:`piece_stats` of a few small pieces (one task each would cost more to
    schedule than to run)."""
    return [piece_stats(p, scratch, n_buckets) for p in pieces]


def batch_pieces(pieces: list[Piece], batch_bytes: int = BATCH_BYTES) -> list[list[Piece]]:
    """Consecutive pieces in batches of about ``batch_bytes`` (a big piece alone)."""
    batches: list[list[Piece]] = []
    size = 0
    for p in pieces:
        if batches and size + p.size_bytes <= batch_bytes:
            batches[-1].append(p)
            size += p.size_bytes
        else:
            batches.append([p])
            size = p.size_bytes
    return batches


def _cluster_stats(stats: PieceStats, sizes: np.ndarray, id_at) -> None:
    """Members per cluster of a piece; ``id_at(i)``: the id naming cluster ``i``."""
    values, counts = np.unique(sizes, return_counts=True)
    for v, c in zip(values.tolist(), counts.tolist()):
        stats.cluster_sizes[v] = stats.cluster_sizes.get(v, 0) + c
    k = min(TOP_CLUSTERS, len(sizes))
    # the k largest by (size, id): the global top k is within the union of every piece's
    if k:
        threshold = np.partition(sizes, len(sizes) - k)[len(sizes) - k]
        idx = np.flatnonzero(sizes >= threshold)
        cand = sorted(((-int(sizes[i]), id_at(int(i))) for i in idx))[: max(k, 0)]
        stats.top_clusters.extend((-m, name) for m, name in cand)


def bionemo2_cluster_stats(path: str) -> PieceStats:
    """Task: members per cluster of ``train_clusters.parquet`` (its first member names it)."""
    import polars as pl
    import pyarrow.parquet as pq

    with open(path, "rb") as f:
        try:
            table = pq.read_table(f, columns=["ur90_id"])
        except Exception:
            raise InputError(path, "", "not a train_clusters.parquet with a ur90_id column") from None
    lists = pl.from_arrow(table)["ur90_id"]
    stats = PieceStats(-1)
    sizes = lists.list.len().fill_null(0).cast(pl.Int64).to_numpy()
    first = lists.list.first().fill_null("")
    _cluster_stats(stats, sizes, lambda i: first[i])
    return stats


# ----------------------------------------------------------------------------- the join


@dataclass(frozen=True)
class JoinPiece:
    """What the join needs of one piece: its split, its first row in the split, and the
    file its ids and sequences are read back from (upper-cased there or not)."""

    index: int
    split: str
    first_row: int
    source: str
    upper_cased: bool


def _bucket_keys(path: str, bucket: int, n_buckets: int) -> np.ndarray:
    with open(path, "rb") as f:
        bounds = np.fromfile(f, dtype="<i8", count=n_buckets + 1)
        lo, hi = int(bounds[bucket]), int(bounds[bucket + 1])
        f.seek(8 * (n_buckets + 1) + KEY.itemsize * lo)
        return np.fromfile(f, dtype=KEY, count=hi - lo)


@njit(nogil=True, cache=True)
def _suspect_rows(packed: np.ndarray, index_bits: int, code_bits: int, h1: np.ndarray, h2: np.ndarray,
                  n_splits: int, pairs: np.ndarray) -> np.ndarray:
    """The rows whose digest (``h1``, ``h2``) is shared by two rows of one split or by both
    splits of a pair in ``pairs`` (an array (n, 2) of split codes), in ``packed`` order.

    ``packed``: sorted; of each row, the high bits of its ``h1``, then its split's code
    (``code_bits``), then its index (``index_bits``), so rows whose ``h1`` starts alike are
    next to each other. A run of such rows (two, mostly: a sequence and its copy) that
    could not make a finding even if all its digests were one (a uf50 representative and
    its uf90 member) is passed over; otherwise its rows are grouped on all 128 bits of the
    digest (a run has few digests, however many rows)."""
    n = len(packed)
    shift = np.uint64(index_bits + code_bits)
    index_mask = (np.uint64(1) << np.uint64(index_bits)) - np.uint64(1)
    code_mask = (np.uint64(1) << np.uint64(code_bits)) - np.uint64(1)
    rows = np.empty(n, dtype=np.int64)
    hits = 0
    first = np.empty(n, dtype=np.int64)  # of each digest of a run, its first row
    digest_of = np.empty(n, dtype=np.int64)  # of each row of a run, its digest there
    counts = np.empty((n + 1, n_splits), dtype=np.int64)  # row n: the run's; then per digest
    suspect = np.empty(n, dtype=np.bool_)
    i = 0
    while i < n:
        top = packed[i] >> shift
        j = i + 1
        while j < n and packed[j] >> shift == top:
            j += 1
        if j - i > 1:
            counts[n, :] = 0
            for t in range(i, j):
                counts[n, (packed[t] >> np.uint64(index_bits)) & code_mask] += 1
            if _could_be_found(counts[n], pairs):
                d = 0
                for t in range(i, j):
                    row = np.int64(packed[t] & index_mask)
                    g = 0
                    while g < d and (h1[first[g]] != h1[row] or h2[first[g]] != h2[row]):
                        g += 1
                    if g == d:
                        first[d] = row
                        counts[d, :] = 0
                        d += 1
                    digest_of[t - i] = g
                    counts[g, (packed[t] >> np.uint64(index_bits)) & code_mask] += 1
                for g in range(d):
                    suspect[g] = _could_be_found(counts[g], pairs)
                for t in range(i, j):
                    if suspect[digest_of[t - i]]:
                        rows[hits] = np.int64(packed[t] & index_mask)
                        hits += 1
        i = j
    return rows[:hits]


@njit(nogil=True, cache=True, inline="always")
def _could_be_found(per_split: np.ndarray, pairs: np.ndarray) -> bool:
    """Rows of one digest, counted per split: two in one split, or both of a pair."""
    for c in range(len(per_split)):
        if per_split[c] > 1:
            return True
    for q in range(len(pairs)):
        if per_split[pairs[q, 0]] > 0 and per_split[pairs[q, 1]] > 0:
            return True
    return False


def _suspects(keys: list[np.ndarray], codes: list[int], pairs: list[tuple[int, int]]):
    """The rows (piece position, row index, digest) whose digest could make a finding: it
    is shared by two rows of one split, or by both splits of a compared pair. Everything
    else (a uf50 representative that is also its uf90 member, say) is not looked at.

    One ``np.sort`` of the rows' first halves with the split and index in their low bits
    (three times faster than ``np.argsort``), then one pass (:func:`_suspect_rows`)."""
    n = sum(len(k) for k in keys)
    if n < 2:
        return None
    every = np.concatenate(keys)
    h1, h2 = every["h1"], every["h2"]
    piece_of = np.repeat(np.arange(len(keys), dtype=np.int64), [len(k) for k in keys])
    code = np.asarray(codes, dtype=np.uint64)[piece_of]
    index_bits, code_bits = max(1, (n - 1).bit_length()), max(1, (len(SPLITS) - 1).bit_length())
    low = np.uint64(index_bits + code_bits)
    packed = (h1 >> low << low) | (code << np.uint64(index_bits)) | np.arange(n, dtype=np.uint64)
    packed.sort()
    hit = _suspect_rows(packed, index_bits, code_bits, h1, h2, len(SPLITS),
                        np.asarray(pairs, dtype=np.int64).reshape(-1, 2))
    if not len(hit):
        return None
    return piece_of[hit], every["k"][hit].astype(np.int64), h1[hit], h2[hit]


def _load_suspects(scratch: str, kind: str, bucket: int, n_buckets: int, pieces: list[JoinPiece],
                   pairs: list[tuple[int, int]]):
    """The rows of bucket ``bucket`` whose digest could make a finding (:func:`_suspects`),
    with their split, 1-based row, id (and upper-cased sequence), read back from their
    source; None when there are none."""

    keys = [_bucket_keys(scratch_paths(scratch, p.index)[kind], bucket, n_buckets) for p in pieces]
    found = _suspects(keys, [SPLITS.index(p.split) for p in pieces], pairs)
    if found is None:
        return None
    import polars as pl

    piece_of, k, h1, h2 = found
    columns = {"h1": h1, "h2": h2, "split": [], "row": np.empty(len(k), dtype=np.int64), "id": [None] * len(k)}
    if kind == "seq":
        columns["seq"] = [None] * len(k)
    columns["split"] = [pieces[j].split for j in piece_of.tolist()]
    for j in np.unique(piece_of).tolist():
        p = pieces[j]
        at = np.flatnonzero(piece_of == j)
        places = _read_places(scratch_paths(scratch, p.index)["place"], k[at])
        columns["row"][at] = places[:, 0] + p.first_row + 1
        with open(p.source, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            for i, place in zip(at.tolist(), places.tolist()):
                _, id_at, id_len, seq_at, seq_len = place
                columns["id"][i] = m[id_at : id_at + id_len].decode("utf-8", "replace")
                if kind == "seq":
                    seq = m[seq_at : seq_at + seq_len]
                    columns["seq"][i] = (seq if p.upper_cased else seq.upper()).decode("utf-8", "replace")
    return pl.DataFrame(columns, schema_overrides={"split": pl.String, "id": pl.String,
                                                   **({"seq": pl.String} if kind == "seq" else {})})


def _group_rows(frame, key: str):
    """Groups of rows whose digest and ``key`` column are equal (confirmed), with ≥ 2 rows,
    each with its rows per split (``n_<split>``); and the number of digests shared by
    different values (hash collisions)."""
    import polars as pl

    distinct = frame.select("h1", "h2", key).unique().group_by("h1", "h2").len()
    collisions = int((distinct["len"] - 1).sum())
    groups = (
        frame.sort("split", "row")
        .group_by("h1", "h2", key, maintain_order=True)
        .agg(pl.col("split"), pl.col("row"), pl.col("id").alias("ids"),
             *[(pl.col("split") == s).sum().alias(f"n_{s}") for s in SPLITS])
        .filter(pl.col("split").list.len() > 1)
    )
    return groups, collisions


def _side(rows: list[tuple[str, int, str]], split: str) -> dict:
    mine = [(r, i) for s, r, i in rows if s == split]
    return {"rows": len(mine), "ids": [i for _, i in mine[:IDS_PER_GROUP]],
            "records": [r for r, _ in mine[:IDS_PER_GROUP]]}


def _rows_of(g: dict) -> list[tuple[str, int, str]]:
    return list(zip(g["split"], g["row"], g["ids"]))


def join_bucket(bucket: int, n_buckets: int, scratch: str, pieces: list[JoinPiece]) -> BucketResult:
    """Task: the duplicate sequences and ids of one hash bucket, confirmed on the values.

    The digests are grouped in numpy; only the rows of a digest that could make a
    finding are read back and compared, and counting is done on whole columns; only the
    examples kept (at most EXAMPLES_MAX of each kind) become Python objects. polars is
    imported only where there is something to confirm."""
    result = BucketResult()
    present = {p.split for p in pieces}
    pairs = [(a, b) for a, b in PAIRS if a in present and b in present]
    coded = [(SPLITS.index(a), SPLITS.index(b)) for a, b in pairs]
    seqs = _load_suspects(scratch, "seq", bucket, n_buckets, pieces, coded)
    if seqs is not None:
        import polars as pl

        groups, result.hash_collisions = _group_rows(seqs, "seq")
        for split in present:
            hit = groups.filter(pl.col(f"n_{split}") > 1)
            if hit.height:
                n = int(hit[f"n_{split}"].sum())
                result.within[split] = {"groups": hit.height, "rows": n, "extra_rows": n - hit.height}
                for g in hit.head(EXAMPLES_MAX).iter_rows(named=True):
                    result.within_examples.append({"split": split, "length": len(g["seq"]), **_side(_rows_of(g), split)})
        for a, b in pairs:
            hit = groups.filter((pl.col(f"n_{a}") > 0) & (pl.col(f"n_{b}") > 0))
            if hit.height:
                key = f"{a}/{b}"
                result.between[key] = {"sequences": hit.height, a + "_rows": int(hit[f"n_{a}"].sum()),
                                       b + "_rows": int(hit[f"n_{b}"].sum())}
                for g in hit.head(EXAMPLES_MAX).iter_rows(named=True):
                    rows = _rows_of(g)
                    result.between_examples.append({"pair": key, "length": len(g["seq"]),
                                                    "a": _side(rows, a), "b": _side(rows, b)})
    ids = _load_suspects(scratch, "id", bucket, n_buckets, pieces, coded)
    if ids is not None:
        import polars as pl

        groups, collisions = _group_rows(ids, "id")
        result.hash_collisions += collisions
        for split in present:
            hit = groups.filter(pl.col(f"n_{split}") > 1)
            if hit.height:
                result.repeated_ids[split] = {"ids": hit.height, "rows": int(hit[f"n_{split}"].sum())}
                for g in hit.head(EXAMPLES_MAX).iter_rows(named=True):
                    result.repeated_id_examples.append(
                        {"split": split, "id": g["id"],
                         "records": [r for s, r, _ in _rows_of(g) if s == split][:IDS_PER_GROUP]})
        for a, b in pairs:
            hit = groups.filter((pl.col(f"n_{a}") > 0) & (pl.col(f"n_{b}") > 0))
            if hit.height:
                key = f"{a}/{b}"
                result.shared_ids[key] = hit.height
                for g in hit.head(EXAMPLES_MAX).iter_rows(named=True):
                    rows = _rows_of(g)
                    result.shared_id_examples.append({
                        "pair": key, "id": g["id"],
                        "a_records": [r for s, r, _ in rows if s == a][:IDS_PER_GROUP],
                        "b_records": [r for s, r, _ in rows if s == b][:IDS_PER_GROUP],
                    })
    _cap(result)
    return result



def _example_key(e: dict):
    first = e.get("records") or e.get("a", {}).get("records") or e.get("a_records") or [0]
    return (SPLITS.index(e["split"]) if "split" in e else [f"{a}/{b}" for a, b in PAIRS].index(e["pair"]),
            first[0], e.get("id", ""))


def _cap(result: BucketResult) -> None:
    """Keep the first EXAMPLES_MAX examples of each kind (by split, then record)."""
    for name in ("within_examples", "between_examples", "repeated_id_examples", "shared_id_examples"):
        examples = sorted(getattr(result, name), key=_example_key)
        kept, seen = [], Counter()
        for e in examples:
            kind = e.get("split") or e.get("pair")
            if seen[kind] < EXAMPLES_MAX:
                seen[kind] += 1
                kept.append(e)
        setattr(result, name, kept)


# ----------------------------------------------------------------------------- the run


def _histogram(lengths: dict[int, int]) -> list[int]:
    counts = [0] * (len(LENGTH_EDGES) - 1)
    for length, n in lengths.items():
        i = min(bisect.bisect_right(LENGTH_EDGES, length) - 1, len(counts) - 1)
        counts[i] += n
    return counts


def _median(lengths: dict[int, int], rows: int) -> float | None:
    if not rows:
        return None
    seen, mid = 0, [(rows - 1) // 2, rows // 2]
    out = []
    for length in sorted(lengths):
        seen += lengths[length]
        while mid and seen > mid[0]:
            out.append(length)
            mid.pop(0)
    return (out[0] + out[1]) / 2


def _split_summary(stats: list[PieceStats], source: str) -> dict:
    lengths: Counter = Counter()
    letters: Counter = Counter()
    examples: dict[str, list[str]] = {}
    for s in stats:
        lengths.update(s.lengths)
        letters.update(s.letters)
        for letter, ids in s.letter_examples.items():
            got = examples.setdefault(letter, [])
            got.extend(ids[: LETTER_EXAMPLES - len(got)])
    rows = sum(s.rows for s in stats)
    residues = sum(s.residues for s in stats)
    beyond_rows = sum(s.beyond_rows for s in stats)
    beyond_residues = sum(s.beyond_residues for s in stats)
    nonstandard = {k: v for k, v in sorted(letters.items()) if k not in STANDARD}
    return {
        "source": source,
        "files": len(stats),
        "rows": rows,
        "residues": residues,
        "length": {
            "min": min(lengths) if lengths else None,
            "max": max(lengths) if lengths else None,
            "mean": round(residues / rows, 3) if rows else None,
            "median": _median(dict(lengths), rows),
        },
        "length_histogram": {"edges": LENGTH_EDGES, "counts": _histogram(lengths)},
        "beyond_crop": {
            "crop_residues": CROP_RESIDUES,
            "rows": beyond_rows,
            "rows_share": beyond_rows / rows if rows else 0.0,
            "residues": beyond_residues,
            "residues_share": beyond_residues / residues if residues else 0.0,
        },
        "composition": {a: letters.get(a, 0) for a in STANDARD},
        "standard_residues": sum(letters.get(a, 0) for a in STANDARD),
        "nonstandard": {
            "residues": sum(nonstandard.values()),
            "letters": nonstandard,
            "examples": {k: examples.get(k, []) for k in nonstandard},
        },
        "lowercase_residues": sum(s.lowercase_residues for s in stats),
        "excluded_rows": sum(s.excluded_rows for s in stats),
    }


def _clusters_summary(stats: list[PieceStats], layout: str) -> dict | None:
    sizes: Counter = Counter()
    top: list[tuple[int, str]] = []
    current = None  # hf: the run of ur50_id that may continue into the next part

    def flush(run):
        sizes[run[1]] += 1
        top.append((run[1], run[0]))

    for s in stats:
        sizes.update(s.cluster_sizes)
        top.extend(s.top_clusters)
        if not s.edge_runs:
            continue
        first_id, first_n = s.edge_runs[0]
        if current and current[0] == first_id:
            current = (first_id, current[1] + first_n)
        else:
            if current:
                flush(current)
            current = (first_id, first_n)
        if len(s.edge_runs) == 2:  # the part's first run ends inside it
            flush(current)
            current = s.edge_runs[1]
    if current:
        flush(current)
    if not sizes:
        return None
    n = sum(sizes.values())
    members = sum(k * v for k, v in sizes.items())
    largest = sorted(top, key=lambda t: (-t[0], t[1]))[:TOP_CLUSTERS]
    return {
        "clusters": n,
        "members": members,
        "mean_members": round(members / n, 3),
        "max_members": max(sizes),
        "singletons": sizes.get(1, 0),
        "size_counts": {str(k): sizes[k] for k in sorted(sizes)},
        "largest": [{"id": name, "members": m} for m, name in largest],
        "named_by": "first member id" if layout == "bionemo2" else "UniRef50 cluster id",
    }


def _merge_buckets(results: list[BucketResult], splits: list[str]) -> dict:
    within: dict[str, dict[str, int]] = {}
    between: dict[str, dict[str, int]] = {}
    repeated: dict[str, dict[str, int]] = {}
    shared: dict[str, int] = {}
    merged = BucketResult()
    for r in results:
        for src, dst in ((r.within, within), (r.between, between), (r.repeated_ids, repeated)):
            for k, v in src.items():
                d = dst.setdefault(k, {})
                for kk, vv in v.items():
                    d[kk] = d.get(kk, 0) + vv
        for k, v in r.shared_ids.items():
            shared[k] = shared.get(k, 0) + v
        merged.within_examples += r.within_examples
        merged.between_examples += r.between_examples
        merged.repeated_id_examples += r.repeated_id_examples
        merged.shared_id_examples += r.shared_id_examples
        merged.hash_collisions += r.hash_collisions
    _cap(merged)
    pairs = [f"{a}/{b}" for a, b in PAIRS if a in splits and b in splits]
    n_between = sum(v["sequences"] for v in between.values())
    n_shared = sum(shared.values())
    return {
        "found": bool(n_between or n_shared),
        "pairs_compared": pairs,
        "within_split": {s: within.get(s, {"groups": 0, "rows": 0, "extra_rows": 0}) for s in splits},
        "within_split_examples": merged.within_examples,
        "between_splits": {p: between.get(p, {"sequences": 0, p.split("/")[0] + "_rows": 0,
                                                 p.split("/")[1] + "_rows": 0}) for p in pairs},
        "between_splits_examples": merged.between_examples,
        "repeated_ids": {s: repeated.get(s, {"ids": 0, "rows": 0}) for s in splits},
        "repeated_id_examples": merged.repeated_id_examples,
        "ids_in_two_splits": {p: shared.get(p, 0) for p in pairs},
        "ids_in_two_splits_examples": merged.shared_id_examples,
        "hash_collisions": merged.hash_collisions,
        "examples_max": EXAMPLES_MAX,
    }


def headline(report: dict) -> str:
    """The report's first line: leakage or not, in words."""
    lk = report["leakage"]
    within = sum(v["extra_rows"] for v in lk["within_split"].values())
    if lk["found"]:
        parts = [f"{v['sequences']:,} sequence(s) in both {p}" for p, v in lk["between_splits"].items()
                 if v["sequences"]]
        parts += [f"{n:,} id(s) in both {p}" for p, n in lk["ids_in_two_splits"].items() if n]
        text = "LEAKAGE: " + "; ".join(parts)
    else:
        text = f"No leakage: no sequence or id is shared by {', '.join(lk['pairs_compared']) or 'any two splits'}"
    return f"{text} ({within:,} duplicate row(s) inside splits)"


def _n_buckets(pieces: list[Piece], workers: int) -> int:
    total = sum(p.size_bytes for p in pieces)
    return max(2 * workers, math.ceil(total / BUCKET_BYTES), 1)


def _gather(client, reporter: Reporter, name: str, futures: list, amounts: list[int]) -> list:
    from distributed import as_completed

    reporter.stage(name, len(futures))
    amount = dict(zip((f.key for f in futures), amounts))
    start = time.perf_counter()
    try:
        for future in as_completed(futures):
            if future.status == "error":
                task_result(future)
            reporter.progress(amount.get(future.key, 0))
            reporter.advance(name)
        results = client.gather(futures)
    except BaseException:
        client.cancel(futures)
        raise
    reporter.stage_done(name, time.perf_counter() - start)
    return results


def build_report(config: ReportConfig, reporter: Reporter | None = None,
                 plotter=None) -> tuple[dict, str]:
    """Compute the report of ``config.output_dir`` on Dask and write ``OUT/esm2dask-report``.

    Returns the report (plain JSON values) and the folder written. Nothing else in OUT is
    written: the work happens in ``OUT/.esm2dask-report-<token>``, removed at the end.
    The report's ``stage_seconds`` say where its time went (``seconds``: all of it, up to
    the plots drawn; they are drawn by a process of their own while the workers join, and
    ``plots`` is the wait for them at the end). ``plotter``: a
    :class:`~esm2dask.report_html.PlotProcess` started earlier by the caller (this
    function closes it), or None to start one here.
    """
    from .report_html import PlotProcess, write_report_files

    reporter = reporter or Reporter()
    start = time.perf_counter()
    stage_seconds: dict[str, float] = {}
    lap = [start]

    def stage_end(name: str) -> None:
        now = time.perf_counter()
        stage_seconds[name] = round(now - lap[0], 3)
        lap[0] = now

    root = config.root
    layout, pieces, sources, notes, clusters_file = plan_report(config)
    final = os.path.join(root, REPORT_DIR)
    if os.path.islink(final) or (os.path.lexists(final) and not _is_our_report(final)):
        raise OutputError(f"{final}: exists and is not a report of esm2dask; move it away first")
    # starts with digits: the dashboard shows a key up to its first word with digits
    token = f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
    work = os.path.join(root, f"{TMP_PREFIX}{token}")
    scratch = os.path.join(work, "scratch")
    folder = os.path.join(work, REPORT_DIR)
    try:
        os.makedirs(scratch)
        os.makedirs(folder)
    except OSError as err:
        shutil.rmtree(work, ignore_errors=True)
        raise OutputError(f"{root}: cannot write the report folder there ({err.strerror})") from None
    # a csv piece's statistics use no polars: its import (and Ctrl-C taken back from it)
    # can wait until those tasks run
    tasks_need_polars = any(p.kind != "csv" for p in pieces)
    try:
        stage_end("plan")
        plotter = plotter or PlotProcess()  # imports matplotlib while the cluster starts and the workers read
        with dask_client(config.cluster, reporter.message, ctrl_c_now=tasks_need_polars) as client:
            if config.announce_dashboard and (config.cluster.external or config.cluster.dashboard_address is not None):
                link = dashboard_link(client, None if config.cluster.external else config.cluster.dashboard_address)
                if link:
                    reporter.message(f"Dask dashboard: {link}")
            stage_end("cluster start")
            try:
                workers = max(1, sum(client.nthreads().values()))
                n_buckets = _n_buckets(pieces, workers)
                total_bytes = sum(p.size_bytes for p in pieces)
                reporter.begin(2 * total_bytes)  # read by the statistics, then joined
                batches = batch_pieces(pieces, min(BATCH_BYTES, max(1, total_bytes // (4 * workers))))
                futures = [client.submit(interruptible, stats_batch, b, scratch, n_buckets,
                                         key=(f"report_stats-{token}", i), pure=False) for i, b in enumerate(batches)]
                if not tasks_need_polars:
                    take_back_ctrl_c()  # imports polars while the workers read (numba, not holding the GIL)
                cluster_future = (client.submit(interruptible, bionemo2_cluster_stats, clusters_file,
                                                key=(f"report_clusters-{token}", 0), pure=False)
                                  if clusters_file else None)
                stats = [s for batch in _gather(client, reporter, "report-stats", futures,
                                                [sum(p.size_bytes for p in b) for b in batches]) for s in batch]
                stage_end("report-stats")
                by_split: dict[str, list[PieceStats]] = {}
                for p, s in zip(pieces, stats):
                    by_split.setdefault(p.split, []).append(s)
                same_as = {}
                if VAL in by_split and TEST in by_split and \
                        [s.digest for s in by_split[VAL]] == [s.digest for s in by_split[TEST]]:
                    same_as[TEST] = VAL
                    notes.append("uf50/test holds the same records as uf50/val (the validation FASTA served as both); "
                                 "test is left out of the leakage comparison")
                first_rows, seen = {}, Counter()
                for p, s in zip(pieces, stats):
                    first_rows[p.index] = seen[p.split]
                    seen[p.split] += s.rows + s.excluded_rows
                included = [JoinPiece(p.index, p.split, first_rows[p.index], s.source, p.kind != "csv")
                            for p, s in zip(pieces, stats) if p.split not in same_as]
                join_futures = [client.submit(interruptible, join_bucket, b, n_buckets, scratch, included,
                                              key=(f"report_join-{token}", b), pure=False) for b in range(n_buckets)]
                cluster_stats = [task_result(cluster_future)] if cluster_future else \
                    [s for p, s in zip(pieces, stats) if p.split in (UF50_TRAIN, TRAIN) and
                     (p.counts is not None or p.cluster_column)]
                splits = [s for s in SPLITS if s in by_split]
                summaries = {split: _split_summary(by_split[split], sources[split]) for split in splits}
                for split, other in same_as.items():
                    summaries[split]["same_as"] = other
                clusters = _clusters_summary(cluster_stats, layout)
                # what the plots show, drawn while the workers join; the report holds it too
                drawn = {"crop": {"tokens": CROP_TOKENS, "residues": CROP_RESIDUES}, "standard_amino_acids": STANDARD,
                         "splits": summaries, "clusters": clusters}
                plotter.draw(drawn, folder)
                per_bucket = sum(p.size_bytes for p in pieces) // n_buckets
                amounts = [per_bucket] * n_buckets
                amounts[-1] += sum(p.size_bytes for p in pieces) - per_bucket * n_buckets
                buckets = _gather(client, reporter, "report-join", join_futures, amounts)
                stage_end("report-join")
            except BaseException:
                # tasks already running would write into the folder removed below
                client.cancel([f for f in client.futures.values() if token in str(f.key)])
                settle(client, token)
                raise
        stage_end("cluster close")
        compared = [s for s in splits if s not in same_as]
        report = {
            "headline": "",
            "tool": "esm2dask",
            "version": __version__,
            "output_dir": config.output_dir,
            "layout": layout,
            "layouts_found": list(layouts_found(root)),
            "manifest": _manifest_identity(root),
            **drawn,
            "leakage": _merge_buckets(buckets, compared),
            "notes": notes,
            "files_read": len(pieces) + (1 if clusters_file else 0),
            "bytes_read": sum(p.size_bytes for p in pieces),
        }
        report["headline"] = headline(report)
        stage_end("summary")
        plots = plotter.plots()
        stage_end("plots")
        report["stage_seconds"] = stage_seconds
        report["seconds"] = round(time.perf_counter() - start, 3)
        write_report_files(report, folder, plots)
        _switch(folder, final, work)
    except BaseException:
        if plotter is not None:
            plotter.close()
        shutil.rmtree(work, ignore_errors=True)
        raise
    plotter.close()
    shutil.rmtree(work, ignore_errors=True)
    return report, final


def _manifest_identity(root: str) -> dict | None:
    """When and by what the tree was made (its manifest), so that a report left beside a
    tree made again later can be told to be stale."""
    path = os.path.join(root, "esm2dask-manifest.json")
    if os.path.islink(path) or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    try:
        manifest = json.loads(data)
    except ValueError:
        return None
    return {"created": manifest.get("created"), "version": manifest.get("version"),
            "sha256": hashlib.sha256(data).hexdigest()}


def _is_our_report(path: str) -> bool:
    """A real folder holding esm2dask's report.json (the one thing a new report replaces)."""
    if not _real_dir(path):
        return False
    f = os.path.join(path, "report.json")
    if not os.path.isfile(f) or os.path.islink(f):
        return False
    try:
        with open(f) as fh:
            return json.load(fh).get("tool") == "esm2dask"
    except (OSError, ValueError, AttributeError):
        return False


def _switch(folder: str, final: str, work: str) -> None:
    """Put the new report in place with renames; an earlier report moves into ``work``
    (removed with it), so OUT never holds a half-written report folder."""
    if os.path.lexists(final):
        os.rename(final, os.path.join(work, "previous"))
    try:
        os.rename(folder, final)
    except OSError as err:
        if os.path.lexists(os.path.join(work, "previous")):
            os.rename(os.path.join(work, "previous"), final)
        raise OutputError(f"{final}: cannot put the report in place ({err.strerror})") from None
