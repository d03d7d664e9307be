"""``esm2dask.sqlite_pages``: databases written page by page, held to SQLite itself.

The oracle is SQLite (Python's ``sqlite3`` and Debian's ``sqlite3`` command-line tool, which
share no code with the writer): ``PRAGMA integrity_check`` (every page used once, cells in
order, overflow chains of the right length, every row in the index), the same answer to
every ``SELECT sequence FROM protein WHERE id = ?`` as a database SQLite builds from the same
rows, and the index used for it. The header is read with ``struct`` against the format's
documented offsets.
"""

from __future__ import annotations

import random
import hashlib
import shutil
import sqlite3
import string
import struct
import subprocess
import contextlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esm2dask import sqlite_pages as sp

DDL = "CREATE TABLE protein (id TEXT PRIMARY KEY, sequence TEXT)"
#: printable ASCII but space, comma and double quote: what a FASTA name may hold here
ID_ALPHABET = "".join(c for c in string.printable[:95] if c not in ' ,"')
RESIDUES = "ACDEFGHIKLMNOPQRSTUVWXYZ*-"


def _sqlite_built(path: Path, rows: list[tuple[str, str]]) -> None:
    con = sqlite3.connect(str(path), isolation_level=None)
    con.execute(DDL)
    con.execute("BEGIN")
    con.executemany("INSERT INTO protein VALUES (?, ?)", rows)
    con.execute("COMMIT")
    con.close()


def _chunks(rows, cuts):
    """``rows`` (sorted, distinct ids) cut at ``cuts`` into pyarrow arrays."""
    bounds = [0, *cuts, len(rows)]
    return [(pa.array([r[0] for r in rows[a:b]], pa.string()), pa.array([r[1] for r in rows[a:b]], pa.string()))
            for a, b in zip(bounds[:-1], bounds[1:])]


def build(path: Path, rows: list[tuple[str, str]], page_size: int, cuts=()) -> int:
    """``rows`` as chunks cut at ``cuts``, through the three steps the pipeline runs."""
    chunks, first_rowid = [], 1
    for ids, seqs in _chunks(rows, list(cuts)):
        chunks.append(sp.Chunk(ids, seqs, first_rowid, page_size))
        first_rowid += len(ids)
    layouts = [c.layout for c in chunks]
    firsts = sp.plan_pages(layouts)
    path.write_bytes(b"")
    edges = [c.write(str(path), f) for c, f in zip(chunks, firsts)]
    return sp.finish_database(str(path), edges, sp.chunk_pages_end(layouts), page_size)


def _cli_check(path: Path, pending_byte: int | None = None) -> None:
    cli = shutil.which("sqlite3")
    if cli is None:
        pytest.skip("Debian's sqlite3 command-line tool is not installed (apt-get install sqlite3)")
    script = (f".testctrl pending_byte {pending_byte}\n" if pending_byte else "") + "PRAGMA integrity_check;\n"
    out = subprocess.run([cli, "-readonly", str(path)], input=script, capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip(), out.stderr) == (0, "ok", "")


def _sqlite_test_control():
    """``sqlite3_test_control`` of the SQLite library Python's ``sqlite3`` runs on."""
    import ctypes

    import _sqlite3

    try:
        fn = ctypes.CDLL(_sqlite3.__file__).sqlite3_test_control
    except AttributeError:
        pytest.skip("this SQLite is built without sqlite3_test_control (SQLITE_UNTESTABLE)")
    fn.restype = ctypes.c_int
    return fn


@contextmanager
def pending_byte(offset: int):
    """SQLite's lock-byte offset moved from 1 GiB to ``offset``, in SQLite (this process's
    library, through ``SQLITE_TESTCTRL_PENDING_BYTE``) and in the writer alike: the page
    holding it, which no B-tree may use, then falls inside a database of a few hundred pages."""
    control = _sqlite_test_control()
    testctrl_pending_byte = 11
    old = control(testctrl_pending_byte, ctypes_uint(offset))
    saved = sp.PENDING_BYTE
    try:
        assert control(testctrl_pending_byte, ctypes_uint(0)) == offset  # 0 reads it back
        sp.PENDING_BYTE = offset
        yield
    finally:
        sp.PENDING_BYTE = saved
        control(testctrl_pending_byte, ctypes_uint(old))


def ctypes_uint(v: int):
    import ctypes

    return ctypes.c_uint(v)


def check(path: Path, rows: list[tuple[str, str]], page_size: int, pages: int, cli: bool = False,
          tmp: Path | None = None, pending: int | None = None) -> None:
    data = path.read_bytes()
    assert len(data) == pages * page_size
    head = data[:100]
    assert head[:16] == b"SQLite format 3\x00"
    assert struct.unpack(">H", head[16:18])[0] == (1 if page_size == 65536 else page_size)
    assert head[18] == 1 and head[19] == 1  # rollback journal: journal_mode DELETE
    assert head[20] == 0 and tuple(head[21:24]) == (64, 32, 32)
    change, count, trunk, free, cookie, fmt = struct.unpack(">6I", head[24:48])
    assert count == pages and trunk == 0 and free == 0 and cookie >= 1 and fmt == 4
    assert struct.unpack(">I", head[56:60])[0] == 1  # UTF-8
    assert struct.unpack(">I", head[92:96])[0] == change
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert con.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert con.execute("PRAGMA page_count").fetchone()[0] == pages
    assert con.execute("PRAGMA freelist_count").fetchone()[0] == 0
    assert con.execute("PRAGMA page_size").fetchone()[0] == page_size
    assert con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type DESC").fetchall() == [
        ("table", "protein", "protein", DDL), ("index", "sqlite_autoindex_protein_1", "protein", None)]
    plan = " ".join(r[-1] for r in con.execute("EXPLAIN QUERY PLAN SELECT sequence FROM protein WHERE id = ?", ("x",)))
    assert "USING INDEX sqlite_autoindex_protein_1 (id=?)" in plan, plan
    # rowid = position in id order, every row text/text
    got = con.execute("SELECT rowid, id, sequence, typeof(id), typeof(sequence) FROM protein ORDER BY rowid").fetchall()
    assert got == [(i + 1, r[0], r[1], "text", "text") for i, r in enumerate(rows)]
    # the oracle: SQLite's own database of the same rows answers every lookup the same way
    oracle_path = (tmp or path.parent) / (path.name + ".oracle")
    _sqlite_built(oracle_path, rows)
    oracle = sqlite3.connect(str(oracle_path))
    for r in rows:
        want = oracle.execute("SELECT sequence FROM protein WHERE id = ?", (r[0],)).fetchall()
        assert con.execute("SELECT sequence FROM protein WHERE id = ?", (r[0],)).fetchall() == want == [(r[1],)]
    for absent in ("", "~~~~absent", (rows[0][0] + "\x00") if rows else "a"):
        assert con.execute("SELECT 1 FROM protein WHERE id = ?", (absent,)).fetchall() == []
    assert [r[0] for r in con.execute("SELECT id FROM protein ORDER BY id")] == [r[0] for r in rows]
    oracle.close()
    oracle_path.unlink()
    con.close()
    if cli:
        _cli_check(path, pending)


def _rows(n: int, seed: int, id_len=(3, 30), seq_len=(0, 400)) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    ids = set()
    while len(ids) < n:
        ids.add("".join(rng.choices(ID_ALPHABET, k=rng.randint(*id_len))))
    return [(i, "".join(rng.choices(RESIDUES, k=rng.randint(*seq_len)))) for i in sorted(ids, key=str.encode)]


@pytest.mark.parametrize("page_size", [4096, 65536])
@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_tiny_tables(tmp_path, page_size, n):
    rows = _rows(n, n)
    db = tmp_path / "t.db"
    check(db, rows, page_size, build(db, rows, page_size), cli=True)


@pytest.mark.parametrize("page_size", [4096, 65536])
def test_overflow_pages_long_sequences_and_long_ids(tmp_path, page_size):
    """Sequences to 100,000 residues (table cells over many overflow pages); ids long enough
    that index cells overflow too (over a quarter of a page), and of every size around the
    local-payload thresholds."""
    rng = random.Random(1)
    u = page_size
    x_table, x_index = u - 35, (u - 12) * 64 // 255 - 23
    rows = {}
    for n in [1, 2, x_index - 20, x_index - 3, x_index, x_index + 1, x_index + 4, 2 * u, 3 * u + 7]:
        rows["I" + "".join(rng.choices(ID_ALPHABET, k=n))] = "M"
    for n in [0, 100_000, 99_999, x_table - 6, x_table - 5, x_table - 4, x_table, u - 4, 5 * (u - 4), 35_213]:
        rows[f"S{n:06d}"] = "".join(rng.choices(RESIDUES, k=n))
    for k in range(300):
        rows[f"R{k:04d}"] = "".join(rng.choices(RESIDUES, k=rng.randint(0, 3000)))
    rows = sorted(rows.items(), key=lambda r: r[0].encode())
    db = tmp_path / "o.db"
    check(db, rows, page_size, build(db, rows, page_size, cuts=(7, 8, 30, 200)), cli=True)


@pytest.mark.parametrize("page_size", [4096, 65536])
def test_chunks_of_every_size_join(tmp_path, page_size):
    """Empty chunks, one-row chunks, chunks of one leaf and of many, in every order."""
    rows = _rows(4000, 3, seq_len=(0, 120))
    cuts = [0, 0, 1, 2, 2, 3, 40, 41, 300, 301, 302, 2000, 2001, 3998, 3999, 3999]
    db = tmp_path / "c.db"
    check(db, rows, page_size, build(db, rows, page_size, cuts=cuts), cli=True)


def test_one_chunk_and_many_give_the_same_rows(tmp_path):
    rows = _rows(3000, 4)
    one, many = tmp_path / "one.db", tmp_path / "many.db"
    build(one, rows, 4096)
    build(many, rows, 4096, cuts=list(range(0, 3000, 37)))
    a, b = sqlite3.connect(str(one)), sqlite3.connect(str(many))
    q = "SELECT rowid, id, sequence FROM protein ORDER BY id"
    assert a.execute(q).fetchall() == b.execute(q).fetchall()


def test_a_larger_table_three_levels_deep(tmp_path):
    """200,000 rows, three levels of interior pages at 4096 bytes a page: checked by
    integrity_check and lookups (65536 is checked on the other cases)."""
    page_size = 4096
    rng = np.random.default_rng(7)
    n = 200_000
    ids = np.sort(np.array([f"UniRef90_{v:010d}" for v in rng.choice(10**10, n, replace=False)]))
    lengths = rng.integers(0, 60, n)
    letters = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
    data = letters[rng.integers(0, 20, int(lengths.sum()))].tobytes().decode()
    ends = np.cumsum(lengths)
    seqs = [data[e - k : e] for e, k in zip(ends, lengths)]
    rows = list(zip(ids.tolist(), seqs))
    db = tmp_path / "l.db"
    cuts = [0, 50_000, 50_001, 120_000, 199_999]
    pages = build(db, rows, page_size, cuts=cuts)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert con.execute("PRAGMA page_count").fetchone()[0] == pages
    assert con.execute("SELECT count(*), min(rowid), max(rowid) FROM protein").fetchone() == (n, 1, n)
    for k in rng.choice(n, 3000, replace=False).tolist():
        assert con.execute("SELECT sequence, rowid FROM protein WHERE id = ?", (rows[k][0],)).fetchone() == (rows[k][1], k + 1)
    got = con.execute("SELECT id, sequence FROM protein ORDER BY rowid").fetchall()
    assert got == rows
    con.close()
    _cli_check(db)


#: the table's interior levels laid out by the Python writer before the compiled one
#: (the same rule; ``test_table_levels_around_a_full_interior_page``'s rows)
TABLE_LEVEL_FINGERPRINTS = {
    72: "9d154b81ecf1dba227d496ab6c788154bf40e292174354c0c482d5d037929294",
    73: "c6256edb8dcb34054ae337e62d243be324e099d226a58d710f6deb15d7a98362",
    144: "1b5a520e6678c08c6e7d0dae46d4a696659084dd440570709c7ad480b02f967f",
    145: "788b66e5387e9db5f57858d699b87e60f87c1bc67ff47768000528be2e4e4b54",
    146: "aa355a23df3a10592a9a2daf67f929b185cefcb7311ecaefa407224bda45593b",
    300: "516bd6325bd40e902ccb46d328d78bf5dfbce4c66067b82095d7cfcc8488691d",
    5185: "01d769fc5721937dac62adb0cae4c303c4b03971bc6db5cf06f299466e2847ae",
}


@pytest.mark.parametrize("n", list(TABLE_LEVEL_FINGERPRINTS))
def test_table_levels_around_a_full_interior_page(tmp_path, n):
    """One row per 512-byte leaf, so that the table's interior pages fill exactly (72 children
    a page while rowids take one varint byte), or leave one child over, which borrows one
    from the page before it (73), on to two-byte rowids and three levels (5185). SQLite
    checks the tree; the bytes are the earlier writer's; no interior page is left with no cell."""
    rows = [(f"P{i:05d}", "ACDEFGHIKL" * 42 + "A" * (i % 7)) for i in range(n)]
    db = tmp_path / "t.db"
    pages = build(db, rows, 512, cuts=[0, n // 3])
    assert hashlib.sha256(db.read_bytes()).hexdigest() == TABLE_LEVEL_FINGERPRINTS[n]
    data = db.read_bytes()
    interior = [data[k * 512 : (k + 1) * 512] for k in range(1, pages) if data[k * 512] == 0x05]
    cells = sorted(struct.unpack(">H", page[3:5])[0] for page in interior)
    assert cells and cells[0] >= 1  # without the borrowing, 73 leaves leave a page of one child, no cell
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert con.execute("SELECT id, sequence FROM protein ORDER BY rowid").fetchall() == rows
    con.close()


def test_lock_byte_page_is_left_unused(tmp_path):
    """Regression (issue 17, the 8 M-row benchmark): a file over 1 GiB holds SQLite's lock-byte
    page (the one with byte 2**30), which SQLite never reads or links; a tree page there made
    every lookup through it "database disk image is malformed". The lock byte moved to 1 MiB
    puts that page (257 at 4096 bytes, 2049 at 512) inside a chunk's table leaves, its index
    leaves, its overflow pages, at a chunk's first page, and among the final step's pages."""
    rows = _rows(5000, 11, id_len=(3, 60), seq_len=(0, 900))
    for page_size, cuts in [(4096, ()), (4096, (1000, 2400, 2401, 4000)), (512, (700, 3000))]:
        with pending_byte(1 << 20):
            lock = (1 << 20) // page_size + 1
            chunks = [sp.Chunk(ids, seqs, 1, page_size) for ids, seqs in _chunks(rows, list(cuts))]
            firsts = sp.plan_pages([c.layout for c in chunks])
            assert any(f <= lock < f + c.layout.pages for f, c in zip(firsts, chunks))
            db = tmp_path / f"lock-{page_size}-{len(cuts)}.db"
            pages = build(db, rows, page_size, cuts=cuts)
            assert pages > lock
            check(db, rows, page_size, pages, cli=True, pending=1 << 20)
    # the lock page as a chunk's first page, and among the final step's pages
    rows = _rows(3000, 12, seq_len=(0, 40))
    for lock_at in ("chunk", "final"):
        probe = [sp.Chunk(ids, seqs, 1, 4096) for ids, seqs in _chunks(rows, [1000, 2000])]
        firsts = sp.plan_pages([c.layout for c in probe])
        lock = firsts[1] if lock_at == "chunk" else sp.chunk_pages_end([c.layout for c in probe]) + 1
        with pending_byte((lock - 1) * 4096):
            db = tmp_path / f"lock-{lock_at}.db"
            pages = build(db, rows, 4096, cuts=(1000, 2000))
            assert pages > lock
            check(db, rows, 4096, pages, cli=True, pending=(lock - 1) * 4096)


_ids = st.text(alphabet=ID_ALPHABET, min_size=1, max_size=1500)
_seqs = st.text(alphabet=RESIDUES, max_size=9000)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(table=st.dictionaries(_ids, _seqs, max_size=60), cut_fractions=st.lists(st.floats(0, 1), max_size=6),
       page_size=st.sampled_from([512, 4096, 65536]))
def test_any_legal_rows_any_chunking(tmp_path_factory, table, cut_fractions, page_size):
    rows = sorted(table.items(), key=lambda r: r[0].encode())
    cuts = sorted(int(f * len(rows)) for f in cut_fractions)
    folder = tmp_path_factory.mktemp("h")
    db = folder / "h.db"
    check(db, rows, page_size, build(db, rows, page_size, cuts=cuts))


def test_write_database_one_process(tmp_path):
    rows = _rows(500, 9)
    db = tmp_path / "w.db"
    size = sp.write_database(str(db), pa.array([r[0] for r in rows]), pa.array([r[1] for r in rows]), 4096)
    assert size == db.stat().st_size
    check(db, rows, 4096, size // 4096, cli=True)


def test_plan_and_header_are_pure():
    lays = [sp.ChunkLayout(3, 1, 1, 0), sp.ChunkLayout(0, 0, 0, 0), sp.ChunkLayout(900, 20, 9, 4)]
    assert sp.plan_pages(lays) == [2, 3, 3]
    assert sp.chunk_pages_end(lays) == 3 + 20 + 7 + 4
    head = sp.database_header(41, 65536)
    assert len(head) == 100 and head[16:20] == b"\x00\x01\x01\x01"


def _read_varint(b: bytes) -> tuple[int, int]:
    """SQLite's varint decoder as the format page describes it (value, bytes used)."""
    v = 0
    for k in range(8):
        v = (v << 7) | (b[k] & 0x7F)
        if b[k] < 0x80:
            return v, k + 1
    return (v << 8) | b[8], 9


@settings(deadline=None)
@given(st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([0, 127, 128, 16383, 16384, 2**56 - 1, 2**56])))
def test_varints_decode_as_the_format_says(v):
    encoded = sp._varint(v)
    assert _read_varint(encoded + b"\x00" * 9) == (v, len(encoded)) and len(encoded) == sp._varint_len(v)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 1200), id_max=st.sampled_from([8, 60, 130, 400]), seq_max=st.sampled_from([0, 40, 700, 3000]),
       cut_fractions=st.lists(st.floats(0, 1), max_size=8), lock_at=st.none() | st.integers(9, 700),
       seed=st.integers(0, 2**32 - 1))
def test_deep_trees_any_chunking(tmp_path_factory, n, id_max, seq_max, cut_fractions, lock_at, seed):
    """512-byte pages and ids to 400 bytes (four or five index entries a page): 4–7 levels
    from a thousand rows, chunks of random sizes meeting at every level, the lock-byte page
    anywhere among the pages (or nowhere); held to integrity_check (Python's sqlite3 and
    the CLI) and to every lookup in a database SQLite builds from the same rows. (SQLite
    reads no database at all, not even its own, with the lock byte under 4 KiB: page 9 at
    512 bytes is the lowest lock page drawn.) Hypothesis
    draws the shape; the rows' text comes from a seeded generator (a thousand rows drawn
    character by character would exceed hypothesis's data budget)."""
    rnd = random.Random(seed)
    ids = set()
    while len(ids) < n:
        ids.add("".join(rnd.choices(ID_ALPHABET, k=rnd.randint(1, id_max))))
    rows = [(i, "".join(rnd.choices(RESIDUES, k=rnd.randint(0, seq_max)))) for i in sorted(ids, key=str.encode)]
    cuts = sorted(int(f * n) for f in cut_fractions)
    db = tmp_path_factory.mktemp("deep") / "d.db"
    pending = (lock_at - 1) * 512 if lock_at else None
    with pending_byte(pending) if pending else contextlib.nullcontext():
        pages = build(db, rows, 512, cuts=cuts)
        check(db, rows, 512, pages, cli=True, pending=pending)


def _long_rows(seed: int, page_size: int) -> list[tuple[str, str]]:
    """Short rows, and rows around every overflow threshold: sequences to 100,000 residues,
    ids long enough that index cells overflow."""
    rng = random.Random(seed)
    u = page_size
    rows = dict(_rows(600, seed, id_len=(3, 80), seq_len=(0, 1500)))
    for n in [100_000, 99_999, u - 35, u - 34, 3 * (u - 4) + 1, 35_213]:
        rows[f"S{n:06d}"] = "".join(rng.choices(RESIDUES, k=n))
    for n in [(u - 12) * 64 // 255 - 20, u // 3, 2 * u + 5]:
        rows["I" + "".join(rng.choices(ID_ALPHABET, k=n))] = "MK"
    return sorted(rows.items(), key=lambda r: r[0].encode())


def _write_one(path: Path, chunks: list, window_bytes: int | None = None, direct: bool = True) -> bytes:
    """``chunks`` written as one database (``window_bytes`` at a time); the file's bytes."""
    layouts = [c.layout for c in chunks]
    path.write_bytes(b"")
    kw = {"direct": direct} if window_bytes is None else {"window_bytes": window_bytes, "direct": direct}
    edges = [c.write(str(path), f, **kw) for c, f in zip(chunks, sp.plan_pages(layouts))]
    sp.finish_database(str(path), edges, sp.chunk_pages_end(layouts), chunks[0].u)
    return path.read_bytes()


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_rows_read_through_the_order_give_the_sorted_rows_bytes(tmp_path, page_size):
    """A chunk's rows in any order (several Arrow chunks, 32- and 64-bit offsets, repeated
    ids left out of the order) written through ``order``: byte for byte the database of the
    rows sorted into arrays of their own, and SQLite's answers (overflow pages included)."""
    rows = _long_rows(31, page_size)
    cuts = (0, 1, 300, 301, 610)
    want = _write_one(tmp_path / "sorted.db", [sp.Chunk(i, s, 1 + a, page_size) for (i, s), a in
                                               zip(_chunks(rows, list(cuts)), [0, *cuts])])
    rnd = random.Random(7)
    chunks = []
    for (ids, seqs), a in zip(_chunks(rows, list(cuts)), [0, *cuts]):
        pairs = list(zip(ids.to_pylist(), seqs.to_pylist()))
        source = pairs + [(i, "X" * rnd.randint(0, 50)) for i, _ in rnd.sample(pairs, len(pairs) // 3)]
        perm = list(range(len(source)))
        rnd.shuffle(perm)
        shuffled = [source[p] for p in perm]
        at = {r: k for k, r in enumerate(shuffled)}  # the rows kept; the repeats ("X…") left out
        order = np.array([at[r] for r in pairs], np.int64)
        pieces = [shuffled[x : x + 97] for x in range(0, len(shuffled), 97)] or [[]]
        id_type = pa.string() if len(chunks) % 2 else pa.large_string()
        ids_c = pa.chunked_array([pa.array([r[0] for r in p], id_type) for p in pieces], id_type)
        seqs_c = pa.chunked_array([pa.array([r[1] for r in p], pa.large_string()) for p in pieces], pa.large_string())
        chunks.append(sp.Chunk(ids_c, seqs_c, 1 + a, page_size, order=order))
    assert _write_one(tmp_path / "ordered.db", chunks) == want
    check(tmp_path / "ordered.db", rows, page_size, len(want) // page_size)


def test_pages_written_a_window_at_a_time_are_the_same_bytes(tmp_path):
    """Windows of 1 to 61 pages, and one for the whole chunk: the same file, with the
    lock-byte page among a chunk's table leaves or its overflow pages (inside a window, and
    at a window's edge), overflow chains across windows; held to SQLite as well."""
    page_size = 4096
    rows = _long_rows(32, page_size)
    cuts = (200, 450)
    chunks = [sp.Chunk(i, s, 1 + a, page_size) for (i, s), a in zip(_chunks(rows, list(cuts)), [0, *cuts])]
    first = sp.plan_pages([c.layout for c in chunks])[1]
    lay = chunks[1].layout  # the long rows: table leaves, then 60+ overflow pages
    assert lay.overflow_pages > 60
    for hole in (12, lay.table_leaves + 15):  # the lock-byte page's place among the chunk's pages
        lock = first + hole
        with pending_byte((lock - 1) * page_size):
            chunks = [sp.Chunk(i, s, 1 + a, page_size) for (i, s), a in zip(_chunks(rows, list(cuts)), [0, *cuts])]
            whole = _write_one(tmp_path / "whole.db", chunks, window_bytes=1 << 40)
            for pages in (1, 2, 3, 4, 5, hole, hole - 1, 61):
                assert _write_one(tmp_path / f"w{pages}.db", chunks, window_bytes=pages * page_size) == whole, pages
            assert _write_one(tmp_path / "default.db", chunks) == whole
            check(tmp_path / "default.db", rows, page_size, len(whole) // page_size, cli=True,
                  pending=(lock - 1) * page_size)


@pytest.mark.parametrize("page_size", [4096, 65536])
def test_pages_written_past_the_page_cache_are_the_same_bytes(tmp_path, monkeypatch, page_size):
    """``O_DIRECT`` writes (taken here: ext4 or the like under the temp folder), writes through
    the page cache, and a file system that takes ``O_DIRECT`` at open but refuses the write
    (EINVAL: written again through the page cache) give the same file."""
    import errno
    import fcntl
    import os

    rows = _long_rows(35, page_size)
    chunks = [sp.Chunk(i, s, 1 + a, page_size) for (i, s), a in zip(_chunks(rows, [100, 400]), [0, 100, 400])]
    with sp._PageFile(str(tmp_path / "probe"), True) as probe:
        direct_taken = probe.direct
    buffered = _write_one(tmp_path / "buffered.db", chunks, direct=False)
    assert _write_one(tmp_path / "direct.db", chunks, window_bytes=3 * page_size) == buffered
    real = sp.pwrite_all
    refused = []

    def refuse_direct(fd, buf, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd, buf, offset)

    monkeypatch.setattr(sp, "pwrite_all", refuse_direct)
    assert _write_one(tmp_path / "refused.db", chunks, window_bytes=3 * page_size) == buffered
    assert len(refused) == (3 if direct_taken else 0)  # one a chunk: the rest go through the page cache
    check(tmp_path / "refused.db", rows, page_size, len(buffered) // page_size)


def test_layout_from_lengths_is_the_chunks_layout():
    rows = _long_rows(33, 4096)
    ids, seqs = _chunks(rows, [])[0]
    chunk = sp.Chunk(ids, seqs, 5, 4096)
    lengths = [np.array([len(x.encode()) for x in col]) for col in (ids.to_pylist(), seqs.to_pylist())]
    assert sp.layout_rows(*lengths, 5, 4096) == chunk.layout


def test_an_order_outside_the_rows_is_refused():
    with pytest.raises(ValueError, match="outside"):
        sp.Chunk(pa.array(["a", "b"]), pa.array(["M", "K"]), 1, 4096, order=np.array([0, 2]))


def test_train_db_tasks_from_sorted_runs(tmp_path):
    """The pipeline's three ``train.db`` tasks on sorted Arrow runs (memory-mapped; an id in
    two runs kept once, from the run listed first): SQLite's answers for the rows."""
    import pyarrow.ipc as ipc

    from esm2dask import formats
    from esm2dask.tasks import Slice

    rows = _long_rows(34, 4096)
    rnd = random.Random(3)
    runs = [[], [], []]
    for r in rows:
        runs[rnd.randrange(3)].append(r)
    runs[2] += [(i, "REPEAT") for i, _ in rnd.sample(runs[0], 20)]  # later in the slices: dropped
    slices_by_bucket = [[], []]
    split = rows[len(rows) // 2][0].encode()
    for k, run in enumerate(runs):
        run.sort(key=lambda r: r[0].encode())
        path = tmp_path / f"run-{k}.arrow"
        table = pa.table({"id": pa.array([r[0] for r in run], pa.large_string()),
                          "sequence": pa.array([r[1] for r in run], pa.large_string())})
        with pa.OSFile(str(path), "wb") as f, ipc.new_file(f, table.schema) as w:
            w.write_table(table, max_chunksize=50)
        cut = sum(r[0].encode() < split for r in run)
        slices_by_bucket[0].append(Slice(str(path), 0, cut))
        slices_by_bucket[1].append(Slice(str(path), cut, len(run)))
    counts = [sum(s.hi - s.lo for s in ss) for ss in slices_by_bucket]
    first_rowids = [1, 1 + counts[0]]
    orders = [str(tmp_path / f"order-{b}.npy") for b in range(2)]
    layouts = [formats.layout_train_chunk(ss, r, o, 4096, {}) for ss, r, o in zip(slices_by_bucket, first_rowids, orders)]
    firsts = sp.plan_pages(layouts)
    pages = str(tmp_path / "train.db.pages")
    receipts = [formats.write_train_chunk(ss, o, r, f, pages, str(tmp_path / f"edges-{b}.npz"), "", 4096, {})
                for b, (ss, o, r, f) in enumerate(zip(slices_by_bucket, orders, first_rowids, firsts))]
    out = tmp_path / "train.db"
    written = formats.finish_train_db(receipts, layouts, pages, str(out), 4096, {})
    assert written.rows == len(rows)
    con = sqlite3.connect(f"file:{out}?mode=ro", uri=True)
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert con.execute("SELECT id, sequence FROM protein ORDER BY id").fetchall() == rows
    con.close()


#: SHA-256 of the databases below as the writer made them before it read rows through an
#: order and wrote a window at a time (commit b8861e9): the bytes must not change.
FINGERPRINTS = {
    (512, (0, 1, 300, 301, 610), 300): "1e4697fc736dfd83a5efe95c570d185fd5c7f13084ba98ff901f844aa2b3acda",
    (4096, (200, 450), 60): "3025536b009b25ce0d3262379a539873d109352874a2b83b511f2e5e8cd5a05b",
    (4096, (200, 450), 163): "5171530850a1513df6b31325ab4efe9a212acdd0456ef2254fc674463a4c1219",
    (65536, (1, 300), None): "b0ef94b6d26cf56b5768bbd76d4ac8c3ac976e7785f7965af25c9c0053f99b2a",
}


@pytest.mark.parametrize("case", list(FINGERPRINTS))
def test_bytes_are_the_earlier_writers(tmp_path, case):
    """Rows to 100,000 residues, index cells that overflow, the lock-byte page moved into
    the file: the same bytes as the writer made before."""
    import hashlib

    page_size, cuts, lock = case
    rows = _long_rows(40 + page_size % 7, page_size)
    db = tmp_path / "f.db"
    with pending_byte((lock - 1) * page_size) if lock else contextlib.nullcontext():
        pages = build(db, rows, page_size, cuts)
    assert lock is None or pages > lock
    assert hashlib.sha256(db.read_bytes()).hexdigest() == FINGERPRINTS[case]


def _long_id_rows(n: int, seed: int, id_len: tuple[int, int], seq_len=(0, 40)) -> list[tuple[str, str]]:
    """``n`` rows with ids of ``id_len`` bytes (long: few index entries a page, many levels)."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(ID_ALPHABET.encode(), np.uint8)
    residues = np.frombuffer(RESIDUES.encode(), np.uint8)
    ids = set()
    while len(ids) < n:
        k = int(rng.integers(id_len[0], id_len[1] + 1))
        ids.add(alphabet[rng.integers(0, len(alphabet), k)].tobytes().decode())
    seqs = [residues[rng.integers(0, len(residues), int(k))].tobytes().decode()
            for k in rng.integers(seq_len[0], seq_len[1] + 1, n)]
    return list(zip(sorted(ids, key=str.encode), seqs))


def _index_tree(path: Path, u: int) -> list[list[int]]:
    """The index B-tree's pages level by level, the root's level first and the leaves' last
    (file pages: the root from SQLite, the rest read as the format describes interior pages:
    a 12-byte header, the right pointer at offset 8, each cell its child's page first)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    (root,) = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_protein_1'").fetchone()
    con.close()
    data = path.read_bytes()
    levels, level = [], [root]
    while True:
        levels.append(level)
        below = []
        for p in level:
            page = data[(p - 1) * u : p * u]
            if page[0] == 0x0A:
                continue
            assert page[0] == 0x02, (p, page[0])
            for k in range(struct.unpack(">H", page[3:5])[0]):
                at = struct.unpack(">H", page[12 + 2 * k : 14 + 2 * k])[0]
                below.append(struct.unpack(">I", page[at : at + 4])[0])
            below.append(struct.unpack(">I", page[8:12])[0])
        if not below:
            return levels
        level = below


def _index_case_rows(case):
    _, n, id_len, _, seed = case
    return _long_id_rows(n, seed, id_len)


def _write_case(db: Path, rows, page_size: int, cuts) -> int:
    """``cuts`` None: :func:`sp.write_database` (one process); else the chunked path."""
    if cuts is None:
        size = sp.write_database(str(db), pa.array([r[0] for r in rows], pa.string()),
                                 pa.array([r[1] for r in rows], pa.string()), page_size)
        assert size == db.stat().st_size
        return size // page_size
    return build(db, rows, page_size, cuts=cuts)


#: SHA-256 of the databases below as the writer made them while the index's interior levels
#: (and the seams' leaves) were laid out in Python (_index_level, _index_leaves, _interior_page),
#: before they were compiled: the bytes must not change.
#: (page size, rows, id bytes, cuts (None: write_database), seed) -> (interior levels, SHA-256)
INDEX_LEVEL_FINGERPRINTS = {
    (512, 700, (100, 400), None, 1): (2, "d862040324c7c8c346884336fdc06a7f3677c34119d08e4cf774674343a9a59e"),
    (512, 1500, (100, 1000), (0, 1, 2, 3, 200, 201, 640, 1100, 1497), 2): (3, "1ed7d361578664d9d71187b5a30e5ddae03235dc967d3b27e5a2b3a50ba406cb"),
    (1024, 2000, (100, 1000), None, 3): (3, "af6db92ebffaab9901fd86798990a0f4b25bcd26d34027ab0be2b1f46d71cf46"),
    (1024, 2000, (100, 1000), (5, 6, 7, 900, 901, 1999), 4): (3, "d3a6011abcf9de2613623a609ef9a08812fce25e5a491bba51c59e3b5474bb29"),
    (4096, 3000, (100, 1000), None, 5): (4, "c55c6e6243a30ca42c14e19ef0a028395b9f11cfb069267831d274c23d311604"),
    (4096, 3000, (100, 1000), (0, 17, 18, 1000, 1001, 1002, 2500), 6): (4, "6e3a0aedf7cf3ac7a66951b7b41f6fe181156be81f9876e52d4c1e4f4c887237"),
    (65536, 8000, (800, 1000), None, 7): (2, "8f08d159493e81b5e9c87b782a4585ef288cb8b6a181a7ae1c0cdd12a6b1cc03"),
    (65536, 8000, (800, 1000), (1, 2, 3000, 3001, 7000), 8): (2, "fb308f77a7b08befac800ec2fd811a8b3f678a23e4fba4d14618f4a678311d52"),
}


@pytest.mark.parametrize("case", list(INDEX_LEVEL_FINGERPRINTS), ids=str)
def test_index_levels_against_sqlite(tmp_path, case):
    """Ids of 100–1,000 bytes, so that a few thousand rows give an index of two or more
    interior levels (two to four), written in one process and in chunks
    (of one row, of a few, of many: seams at every level): SQLite checks the tree and answers
    every lookup through the index as its own database of the rows; the bytes are those of
    the Python index levels."""
    page_size, n, id_len, cuts, seed = case
    rows = _index_case_rows(case)
    db = tmp_path / "i.db"
    pages = _write_case(db, rows, page_size, cuts)
    data = db.read_bytes()
    levels, fingerprint = INDEX_LEVEL_FINGERPRINTS[case]
    assert len(_index_tree(db, page_size)) - 1 == levels >= 2
    assert hashlib.sha256(data).hexdigest() == fingerprint
    check(db, rows, page_size, pages, cli=cuts is not None)


def _lock_at(where: str, levels: list[list[int]], chunk_end: int) -> int:
    """The page the lock-byte page is moved onto, from the index tree (``levels``, as
    :func:`_index_tree` reads it) of the database written without it, where plan and file
    pages are the same; the chunks' pages end before ``chunk_end``."""
    leaves, level1 = levels[-1], levels[-2]
    if where == "first seam leaf":
        return min(p for p in leaves if p >= chunk_end)
    if where == "last chunk leaf":
        return max(p for p in leaves if p < chunk_end)
    if where == "first of level 1":
        return level1[0]
    if where == "middle of level 1":
        return level1[len(level1) // 2]
    if where == "last of level 1":
        return level1[-1]
    if where == "first of level 2":
        return levels[-3][0]
    if where == "root":
        return levels[0][0]
    raise AssertionError(where)


#: as INDEX_LEVEL_FINGERPRINTS (taken from the Python index levels before they were
#: compiled), the lock-byte page moved onto an index page of the final step or its child.
#: (page size, rows, id bytes, cuts (None: write_database), seed, where) -> (lock page, SHA-256)
LOCK_INDEX_FINGERPRINTS = {
    (512, 1500, (100, 1000), (0, 1, 2, 3, 200, 201, 640, 1100, 1497), 2, "first seam leaf"): (4335, "b2610b7f5ad895f382e62960150da4632c1c50593ace24bb9c6c157b021e3a9b"),
    (512, 1500, (100, 1000), (0, 1, 2, 3, 200, 201, 640, 1100, 1497), 2, "first of level 1"): (4344, "76a0704336c2d04a6d5c6fc4d0ea6b1c7075e90920f8f5622b1f1f56435a63ef"),
    (512, 1500, (100, 1000), (0, 1, 2, 3, 200, 201, 640, 1100, 1497), 2, "middle of level 1"): (4351, "6c5c85037f9afb86e8952f079cb3ecd34232714e03c8dd7c9d455a5d6c4bdb3a"),
    (1024, 2000, (100, 1000), None, 3, "first of level 2"): (3544, "72209d2e9dddd738e5d4322317dd0a3df2e1738d49196b4ada7ce561fe2254ff"),
    (1024, 2000, (100, 1000), (5, 6, 7, 900, 901, 1999), 4, "last of level 1"): (3501, "602e491d1c5f36d73302c01902cb5980f0f4f6142d56d79831bc439a8add095c"),
    (1024, 2000, (100, 1000), (5, 6, 7, 900, 901, 1999), 4, "root"): (3506, "33f1cd17447bcfc51537cdf1e59b632b258668f96680b2e9b31726bfcc1da61c"),
    (4096, 3000, (100, 1000), (0, 17, 18, 1000, 1001, 1002, 2500), 6, "last chunk leaf"): (863, "1d5f759cbfebf875bb1d5a2859e899c3aea41714b371966dce5ce8f3c2c397d1"),
}


@pytest.mark.parametrize("case", list(LOCK_INDEX_FINGERPRINTS), ids=str)
def test_lock_byte_page_inside_the_index_levels(tmp_path, case):
    """The lock-byte page (moved, as SQLite's own tests move it, from 1 GiB into a file of a
    few hundred pages) where the final step's index pages lie: on a seam's leaf, on the
    first, a middle and the last interior page of a level, on the root, on a chunk's index
    leaf below them. The page stays blank and unlinked, the pages after it one further on;
    SQLite checks the tree and every lookup; the bytes are those of the Python index levels."""
    page_size, n, id_len, cuts, seed, where = case
    rows = _index_case_rows(case[:5])
    plain = tmp_path / "plain.db"
    _write_case(plain, rows, page_size, cuts)
    if cuts is None:
        chunk_end = sp.chunk_pages_end([sp.layout_rows([len(r[0].encode()) for r in rows],
                                                       [len(r[1].encode()) for r in rows], 1, page_size)])
    else:
        chunk_end = sp.chunk_pages_end([sp.Chunk(i, s, 1, page_size).layout for i, s in _chunks(rows, list(cuts))])
    lock = _lock_at(where, _index_tree(plain, page_size), chunk_end)
    want_lock, fingerprint = LOCK_INDEX_FINGERPRINTS[case]
    assert lock == want_lock
    pending = (lock - 1) * page_size
    db = tmp_path / "lock.db"
    with pending_byte(pending):
        pages = _write_case(db, rows, page_size, cuts)
        data = db.read_bytes()
        assert pages > lock and data[(lock - 1) * page_size : lock * page_size] == bytes(page_size)
        assert all(lock not in level for level in _index_tree(db, page_size))
        assert hashlib.sha256(data).hexdigest() == fingerprint
        check(db, rows, page_size, pages, cli=True, pending=pending)
