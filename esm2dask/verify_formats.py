"""``verify`` for the layouts of ``--format bionemo2`` and ``--format hf``.

What BioNeMo 2's reader and ``datasets`` rely on, seen from the files alone: parquet
schemas and types (no stored pandas index, no dictionary strings), at least 2 rows per
clusters file, no empty list, the SQLite table's DDL, TEXT ids and sequences, upper case,
``journal_mode=delete``, every id of a clusters file a key of its database; ``hf`` parts
named ``part-00000.parquet`` on, with the three string columns; every sequence legal
(printable ASCII but ``,``, ``"`` and space). When the ESM2nv tree is there too, every
id, count and sequence is checked against it: the train clusters against ``uf50/train``
and ``counts.mmap``, their members against ``uf90/uf90_csvs``, the evaluation ids against
``uf50/val`` (``uf50/test``); each database row's sequence against the ESM2nv row of its
id, each ``hf`` row's against the ESM2nv row at its position (upper-cased for val/test).
Sequences are compared as 64-bit hashes computed as each file is read, so no layout's
sequences are held in memory.
"""

from __future__ import annotations

import re
import sqlite3

import numpy as np
import polars as pl

from . import storage
from .config import has_own_test_split
from .formats import PROTEIN_DDL
from .layout import BIONEMO2_DIR, FORMATS, HF_DIR, UF50_TRAIN, UF90, eval_splits

#: Ids fetched from a database at a time (few Python strings alive at once).
FETCH_ROWS = 1_000_000
_PART_RE = re.compile(r"^part-(\d{5})\.parquet$")
#: A character that is not legal in a name or a sequence: anything but printable ASCII,
#: and ``"``, ``,`` and space within it (docs/esm2-layout.md, "Rules for every CSV file").
ILLEGAL = r"[^\x21\x23-\x2B\x2D-\x7E]"
#: Seed of the 64-bit hashes that compare sequences across layouts (one process: stable).
HASH_SEED = 20


def first_illegal(text: str) -> tuple[int, str]:
    """1-based position and repr of the first illegal character of ``text``."""
    i = next(i for i, c in enumerate(text) if not ("!" <= c <= "~" and c not in ',"'))
    return i + 1, repr(text[i])


def sequence_problems(seqs: pl.Series, upper: bool) -> list[tuple[int, str]]:
    """(0-based row, what is wrong) for the first sequence with an illegal character and the
    first with lower case (``upper``), each with how many such rows ``seqs`` holds."""
    out = []
    seqs = seqs.fill_null("")
    illegal = seqs.str.contains(ILLEGAL).arg_true()
    if len(illegal):
        i = int(illegal[0])
        pos, char = first_illegal(seqs[i])
        out.append((i, f"sequence has {char} at position {pos}, not a legal sequence character "
                       f"(printable ASCII but ',', '\"' and space){such_rows(len(illegal))}"))
    if upper:
        lower = seqs.str.contains("[a-z]").arg_true()
        if len(lower):
            i = int(lower[0])
            pos = next(p for p, c in enumerate(seqs[i], 1) if "a" <= c <= "z")
            out.append((i, f"sequence has lower case ({seqs[i][pos - 1]!r} at position {pos}); it must be "
                           f"upper-cased here{such_rows(len(lower))}"))
    return out


def such_rows(n: int, what: str = "rows") -> str:
    """`` (n such rows)`` when there is more than one."""
    return f" ({n} such {what})" if n > 1 else ""


def layouts_present(fs, root_path: str, params: dict) -> tuple[str, ...]:
    """The layouts a tree should hold: the manifest's ``formats``, else those found."""
    if params.get("formats"):
        return tuple(params["formats"])
    found = {
        "esm2nv": fs.exists(storage.join(root_path, "uf50")) or fs.exists(storage.join(root_path, "uf90")),
        "bionemo2": fs.exists(storage.join(root_path, BIONEMO2_DIR)),
        "hf": fs.exists(storage.join(root_path, HF_DIR)),
    }
    return tuple(f for f in FORMATS if found[f]) or ("esm2nv",)


def _eval_splits(params: dict, fs, root_path: str) -> list[tuple[str, str, str, str]]:
    """As :func:`esm2dask.formats.eval_splits`, from the manifest (else from what is there)."""
    if params:
        return eval_splits(has_own_test_split(params.get("split"), params.get("val"), params.get("test")))
    _, split, clusters_name, _ = eval_splits(True)[-1]
    return eval_splits(fs.exists(storage.join(root_path, BIONEMO2_DIR, clusters_name))
                       or fs.exists(storage.join(root_path, HF_DIR, split)))


class _Expected:
    """What the ESM2nv tree of the same run says the other layouts must hold (or None)."""

    def __init__(self, fs, root_path: str, data: dict):
        self.data = data
        self.train_names = _names(data, UF50_TRAIN)
        self.member_names = _names(data, UF90)
        self.counts = self.members = self.member_clusters = self.member_rows = None
        path = storage.join(root_path, UF50_TRAIN, "counts.mmap")
        if self.train_names is not None and fs.exists(path):
            with fs.open(path, "rb") as f:
                counts = np.frombuffer(f.read(), dtype="<u8").astype(np.int64)
            if len(counts) == len(self.train_names):
                self.counts = counts
        if self.counts is not None and self.member_names is not None:
            path = storage.join(root_path, UF50_TRAIN, "starts.mmap")
            with fs.open(path, "rb") as f:
                starts = np.frombuffer(f.read(), dtype="<u8").astype(np.int64)
            if len(starts) == len(self.counts) and (len(starts) == 0 or starts[-1] + self.counts[-1] <= len(self.member_names)):
                # uf90 positions of the training clusters' members, cluster by cluster
                first = np.repeat(starts - np.concatenate(([0], np.cumsum(self.counts)[:-1])), self.counts)
                self.member_rows = first + np.arange(int(self.counts.sum()))
                self.members = self.member_names.gather(self.member_rows)
                self.member_clusters = self.train_names.gather(np.repeat(np.arange(len(self.counts)), self.counts))

    def eval_names(self, split_dir: str) -> pl.Series | None:
        return _names(self.data, split_dir)

    def hashes(self, split_dir: str) -> pl.Series | None:
        """The 64-bit hash of each row's sequence (upper-cased) of an ESM2nv folder."""
        frame = self.data.get(split_dir)
        return None if frame is None else frame["seq_hash"]

    def member_hashes(self) -> pl.Series | None:
        """Sequence hashes of the training members, in ``hf/train`` order."""
        hashes = self.hashes(UF90)
        return None if hashes is None or self.member_rows is None else hashes.gather(self.member_rows)

    def by_name(self, split_dir: str) -> pl.DataFrame | None:
        """(name, seq_hash, row) of an ESM2nv folder, the first row of each name."""
        frame = self.data.get(split_dir)
        if frame is None:
            return None
        return (frame.select(pl.col("record_name").alias("id"), "seq_hash")
                .with_row_index("row").unique("id", keep="first"))


def _names(data: dict, split_dir: str) -> pl.Series | None:
    frame = data.get(split_dir)
    return None if frame is None else frame["record_name"]


def check_layouts(fs, root_path: str, params: dict, layouts, data: dict, report) -> None:
    """Add every problem of the bionemo2/hf layouts of ``root_path`` to ``report``."""
    expected = _Expected(fs, root_path, data)
    splits = _eval_splits(params, fs, root_path)
    if "bionemo2" in layouts:
        _check_bionemo2(fs, storage.join(root_path, BIONEMO2_DIR), splits, expected, report)
    if "hf" in layouts:
        _check_hf(fs, storage.join(root_path, HF_DIR), splits, expected, report)


# ----------------------------------------------------------------------------- parquet


def _parquet(fs, path: str, label: str, report):
    """The whole table, or None (after a problem) if it is not parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f)
    except (pa.ArrowException, OSError) as err:
        report.problems.append(f"{label}: cannot be read as parquet ({str(err).splitlines()[0]})")
        return None


def _read_checked(fs, path: str, label: str, types: dict, report):
    """The table, if it is parquet with exactly the columns of ``types`` (name → (test, what))
    and no stored pandas index; else None, after adding its problems."""
    table = _parquet(fs, path, label, report)
    if table is None:
        return None
    problems = _schema_problems(table, label, list(types), types)
    report.problems += problems
    return None if problems else table


def _is_string(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _schema_problems(table, label: str, columns: list[str], types: dict) -> list[str]:
    """Columns exactly ``columns`` with types passing ``types[name]``; no stored pandas index."""
    problems = []
    if table.column_names != columns:
        problems.append(f"{label}: columns {table.column_names}, expected {columns}")
        return problems
    for name, (ok, want) in types.items():
        if not ok(table.schema.field(name).type):
            problems.append(f"{label}: column {name} is {table.schema.field(name).type}, expected {want}")
    meta = table.schema.pandas_metadata or {}
    for index in meta.get("index_columns", []):
        if not (isinstance(index, dict) and index.get("kind") == "range" and index.get("start") == 0
                and index.get("step") == 1):
            problems.append(f"{label}: stores a pandas index ({index}); the reader looks rows up by "
                            f"position label and needs a plain 0..n-1 index")
    return problems


def _is_string_list(t) -> bool:
    import pyarrow as pa

    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_string(t.value_type)


def _first_mismatch(got: pl.Series, want: pl.Series, label: str, what: str) -> str | None:
    if len(got) != len(want):
        return f"{label}: {len(got)} {what}, the ESM2nv tree has {len(want)}"
    differs = (got != want).fill_null(True).arg_true()
    if len(differs):
        i = int(differs[0])
        return f"{label}: row {i}: {got[i]!r}, the ESM2nv tree has {want[i]!r}"
    return None


# ----------------------------------------------------------------------------- SQLite


def _check_db(fs, path: str, label: str, report) -> pl.DataFrame | None:
    """DDL, journal mode, types, legal upper-case sequences; returns (id, seq_hash) sorted
    by id, or None."""
    if not fs.exists(path):
        report.problems.append(f"{label}: missing")
        return None
    with storage.local_copy(fs, path) as local:  # SQLite opens only local files
        try:
            con = sqlite3.connect(f"file:{local}?mode=ro", uri=True)
            try:
                return _db_checks(con, label, report)
            finally:
                con.close()
        except sqlite3.DatabaseError as err:
            report.problems.append(f"{label}: cannot be read as SQLite ({err})")
            return None


def _db_checks(con: sqlite3.Connection, label: str, report) -> pl.DataFrame | None:
    mode = con.execute("PRAGMA journal_mode").fetchone()[0]
    if mode != "delete":
        report.problems.append(f"{label}: journal_mode={mode}, expected delete (a {mode} database on "
                               f"read-only storage cannot be opened)")
    tables = con.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall()
    ddl = dict(tables).get("protein")
    if ddl != PROTEIN_DDL:
        report.problems.append(f"{label}: table protein is {ddl!r}, expected {PROTEIN_DDL!r}")
        return None
    if len(tables) != 1:
        report.problems.append(f"{label}: extra table(s) {sorted(n for n, _ in tables if n != 'protein')}")
    bad = con.execute(
        "SELECT id, typeof(id), typeof(sequence) FROM protein "
        "WHERE typeof(id) != 'text' OR typeof(sequence) != 'text' LIMIT 1"
    ).fetchone()
    if bad:
        report.problems.append(f"{label}: id {bad[0]!r} is stored as {bad[1]}/{bad[2]}, expected text/text "
                               f"(a BLOB never matches a text id)")
    report.rows[label] = con.execute("SELECT count(*) FROM protein").fetchone()[0]
    # a key stored as anything but text matches no query: it counts as absent
    cursor = con.execute("SELECT id, CAST(sequence AS TEXT) FROM protein WHERE typeof(id) = 'text' ORDER BY id")
    chunks, found = [], {}
    for batch in iter(lambda: cursor.fetchmany(FETCH_ROWS), []):
        ids = pl.Series("id", [r[0] for r in batch], dtype=pl.String)
        seqs = pl.Series("sequence", [r[1] for r in batch], dtype=pl.String)
        for i, what in sequence_problems(seqs, upper=True):
            kind = "illegal" if "legal" in what else "lower"
            if kind not in found:  # the first of each kind, in id order
                found[kind] = f"{label}: the sequence of {ids[i]!r} " + what.removeprefix("sequence ")
        chunks.append(pl.DataFrame({"id": ids, "seq_hash": seqs.hash(HASH_SEED)}))
    report.problems += found.values()
    if not chunks:
        return pl.DataFrame({"id": [], "seq_hash": []}, schema={"id": pl.String, "seq_hash": pl.UInt64})
    return pl.concat(chunks)


def _check_db_sequences(db: pl.DataFrame | None, label: str, want: pl.DataFrame | None, split_dir: str,
                        report) -> None:
    """Each row's sequence equals that of the ESM2nv row of its id (``want``: id, seq_hash, row)."""
    if db is None or want is None:
        return
    joined = db.join(want, on="id", how="inner", suffix="_want")
    differs = joined.filter(pl.col("seq_hash") != pl.col("seq_hash_want")).sort("id")
    if len(differs):
        first = differs.row(0, named=True)
        report.problems.append(f"{label}: the sequence of {first['id']!r} differs from {split_dir} "
                               f"({report.place(split_dir, first['row'])}){such_rows(len(differs), 'ids')}")


def _check_keys(ids: pl.Series, db: pl.DataFrame | None, label: str, db_label: str, report) -> None:
    """Every id is a key of the database, and the database holds no other row."""
    if db is None:
        return
    db_ids = db["id"]
    distinct = ids.unique().sort()
    if distinct.equals(db_ids):  # both sorted and distinct: the common case, no hash set
        return
    missing = distinct.filter(~distinct.is_in(db_ids))
    if len(missing):
        report.problems.append(f"{label}: {len(missing)} id(s) are not keys of {db_label} "
                               f"(first: {sorted(missing.to_list())[:3]})")
    rows = report.rows.get(db_label, len(db_ids))
    if rows != len(distinct):
        report.problems.append(f"{db_label}: {rows} rows for {len(distinct)} distinct ids in {label}")


# ----------------------------------------------------------------------------- bionemo2


def _check_bionemo2(fs, base: str, splits, expected: _Expected, report) -> None:
    wanted = {"train_clusters.parquet", "train.db", *(s[2] for s in splits), *(s[3] for s in splits)}
    if not fs.exists(base):
        report.problems.append(f"{BIONEMO2_DIR}/: missing")
        return
    present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)}
    for name in sorted(present - wanted):
        report.problems.append(f"{BIONEMO2_DIR}/{name}: unexpected file")
    label = f"{BIONEMO2_DIR}/train_clusters.parquet"
    ids = None
    if "train_clusters.parquet" not in present:
        report.problems.append(f"{label}: missing")
    else:
        table = _read_checked(fs, storage.join(base, "train_clusters.parquet"), label,
                              {"ur90_id": (_is_string_list, "list<string>")}, report)
        if table is not None:
            ids = _check_train_clusters(table, label, expected, report)
    db = _check_db(fs, storage.join(base, "train.db"), f"{BIONEMO2_DIR}/train.db", report)
    if ids is not None:
        _check_keys(ids, db, label, f"{BIONEMO2_DIR}/train.db", report)
    _check_db_sequences(db, f"{BIONEMO2_DIR}/train.db", expected.by_name(UF90), UF90, report)
    for split_dir, _, clusters_name, db_name in splits:
        label = f"{BIONEMO2_DIR}/{clusters_name}"
        if clusters_name not in present:
            report.problems.append(f"{label}: missing")
            continue
        table = _read_checked(fs, storage.join(base, clusters_name), label, {"ur50_id": (_is_string, "string")}, report)
        db = _check_db(fs, storage.join(base, db_name), f"{BIONEMO2_DIR}/{db_name}", report)
        _check_db_sequences(db, f"{BIONEMO2_DIR}/{db_name}", expected.by_name(split_dir), split_dir, report)
        if table is None:
            continue
        ids = pl.from_arrow(table.column("ur50_id")).alias("id")
        report.rows[label] = len(ids)
        if len(ids) < 2:
            report.problems.append(f"{label}: {len(ids)} row(s); BioNeMo 2 needs at least 2")
        if ids.null_count():
            report.problems.append(f"{label}: {ids.null_count()} null id(s)")
        want = expected.eval_names(split_dir)
        if want is not None:
            where = _first_mismatch(ids, want, label, "rows")
            if where:
                report.problems.append(where)
        _check_keys(ids.drop_nulls(), db, label, f"{BIONEMO2_DIR}/{db_name}", report)
    report.checked.append(BIONEMO2_DIR)


def _check_train_clusters(table, label: str, expected: _Expected, report) -> pl.Series | None:
    clusters = pl.from_arrow(table.column("ur90_id"))
    report.rows[label] = len(clusters)
    if len(clusters) < 2:
        report.problems.append(f"{label}: {len(clusters)} row(s); BioNeMo 2 needs at least 2")
    sizes = clusters.list.len().fill_null(0)
    empty = ((sizes == 0) | clusters.is_null()).arg_true()
    if len(empty):
        report.problems.append(f"{label}: cluster {int(empty[0])} is empty or null ({len(empty)} such)")
    members = clusters.explode()
    if members.null_count():
        report.problems.append(f"{label}: {members.null_count()} null member id(s)")
    members = members.drop_nulls()
    if expected.train_names is not None and len(clusters) != len(expected.train_names):
        report.problems.append(f"{label}: {len(clusters)} clusters, uf50/train has {len(expected.train_names)}")
    elif expected.counts is not None:
        bad = np.flatnonzero(sizes.to_numpy() != expected.counts)
        if len(bad):
            report.problems.append(f"{label}: cluster {bad[0]} has {sizes[int(bad[0])]} members, "
                                   f"counts.mmap says {expected.counts[bad[0]]}")
        elif expected.members is not None:
            where = _first_mismatch(members, expected.members, label + " members", "member ids")
            if where:
                report.problems.append(where)
    return members


# ----------------------------------------------------------------------------- hf


def _check_hf(fs, base: str, splits, expected: _Expected, report) -> None:
    if not fs.exists(base):
        report.problems.append(f"{HF_DIR}/: missing")
        return
    wanted = {"train", *(s[1] for s in splits)}
    present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)}
    for name in sorted(present - wanted):
        report.problems.append(f"{HF_DIR}/{name}: unexpected (datasets would read it as a split)")
    want = {"ur90_id": expected.members, "ur50_id": expected.member_clusters}
    _check_hf_split(fs, base, "train", want, (UF90, expected.member_hashes(), expected.member_rows), False, report)
    for split_dir, split, _, _ in splits:
        hashes = expected.hashes(split_dir)
        rows = None if hashes is None else np.arange(len(hashes))
        _check_hf_split(fs, base, split, {"ur50_id": expected.eval_names(split_dir)}, (split_dir, hashes, rows),
                        True, report)
    report.checked.append(HF_DIR)


def _check_hf_split(fs, base: str, split: str, want: dict, sequences: tuple, evaluation: bool, report) -> None:
    """Parts ``part-00000.parquet`` on; schema; legal sequences; ids in order and sequences
    against the ESM2nv tree (``sequences``: its folder, the hash of each row's sequence, and
    the row of that folder each hf row comes from)."""
    split_dir, want_hashes, want_rows = sequences
    label = f"{HF_DIR}/{split}"
    folder = storage.join(base, split)
    if not fs.exists(folder):
        report.problems.append(f"{label}/: missing")
        return
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))
    others = [n for n in names if not _PART_RE.match(n)]
    if others:
        report.problems.append(f"{label}/: unexpected file(s) {', '.join(others[:5])}")
    parts = [n for n in names if _PART_RE.match(n)]
    if parts != [f"part-{i:05d}.parquet" for i in range(len(parts))] or not parts:
        report.problems.append(f"{label}/: parts are not part-00000.parquet … part-{len(parts) - 1:05d}.parquet")
        return
    types = {c: (_is_string, "string") for c in ("ur50_id", "ur90_id", "sequence")}
    ids, rows = {c: [] for c in want}, 0
    for name in parts:
        part_label = f"{label}/{name}"
        table = _read_checked(fs, storage.join(folder, name), part_label, types, report)
        if table is None:
            return
        frame = pl.from_arrow(table)
        rows += len(frame)
        nulls = {c: frame[c].null_count() for c in types}
        for c, n in nulls.items():
            if n and not (evaluation and c == "ur90_id"):
                report.problems.append(f"{part_label}: {n} null {c}")
        if evaluation and nulls["ur90_id"] != len(frame):
            report.problems.append(f"{part_label}: ur90_id is set in an evaluation split (it is null there)")
        for i, what in sequence_problems(frame["sequence"], upper=True):
            report.problems.append(f"{part_label}: row {i}: {what}")
        got = frame["sequence"].hash(HASH_SEED)
        first = rows - len(frame)
        if want_hashes is not None and rows <= len(want_hashes):
            differs = (got != want_hashes.slice(first, len(frame))).arg_true()
            if len(differs):
                i = int(differs[0])
                report.problems.append(f"{part_label}: row {i}: sequence differs from {split_dir} "
                                       f"({report.place(split_dir, int(want_rows[first + i]))}){such_rows(len(differs))}")
        for c in want:
            ids[c].append(frame[c])
    report.rows[label] = rows
    for c, want_ids in want.items():
        if want_ids is not None:
            where = _first_mismatch(pl.concat(ids[c]), want_ids, f"{label} {c}", "rows")
            if where:
                report.problems.append(where)
