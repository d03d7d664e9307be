"""SQLite database files for ``protein (id TEXT PRIMARY KEY, sequence TEXT)``, written page by page.

BioNeMo 2 reads ``train.db`` as ``SELECT sequence FROM protein WHERE id = ?``. The file holds two
B-trees (sqlite.org, "Database File Format"): the table keyed by rowid, and the primary key's
``sqlite_autoindex_protein_1`` keyed by ``(id, rowid)``. From rows sorted by id, with rowid
ascending in id order, both can be built bottom-up and in parallel:

1. Each worker sorts its id range (a *chunk*) and lays it out (:func:`layout_rows`, from the
   lengths of its ids and sequences): how many table leaves, index leaves and overflow pages its
   rows fill. Nothing is written yet.
2. The driver gives every chunk a contiguous run of page numbers (:func:`plan_pages`, pure).
3. Each worker writes its pages there (:meth:`Chunk.write`, a few MiB a ``pwrite``, its rows
   read through the sorted order): table leaves, the
   index leaves between its first and last, overflow pages. It hands back, in a small file
   (:class:`ChunkEdges`), what the tree above needs: each table leaf's largest rowid, and the
   index cells it did not place (its first and last index leaf, and the divider cells between
   its leaves).
4. One small final step (:func:`finish_database`) packs the index cells at the seams between
   chunks into leaves, builds the interior pages of both trees, page 1 (the schema table with
   both entries and their root pages) and the 100-byte header. It reads O(chunks + leaves)
   bytes, no row.

An index B-tree keeps each entry once, interior entries included, so between two neighbouring
leaves one entry (the *divider*) moves up a level; a chunk's first and last index leaf are left
to the final step so that chunks of any size (one row, or none) join without a special case.

The file is one SQLite 3 itself could have written: rollback journal (``journal_mode=DELETE``,
header bytes 18–19 = 1), UTF-8, schema format 4, empty freelist, the page count in the header
valid, every page used once but the lock-byte page (the one holding byte 2**30, in a file over
1 GiB), which SQLite never uses: the plan numbers pages without a gap, :func:`file_page` steps
over it where a page is written or linked. Bytes differ from SQLite's own (pages are filled fuller); the
tests hold it to SQLite's ``integrity_check`` and to a database SQLite builds from the same rows.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numba import njit

from .kernel import copy_bytes
from .storage import pwrite_all

#: The table BioNeMo 2 queries, byte for byte as SQLite stores it in ``sqlite_schema``.
PROTEIN_DDL = "CREATE TABLE protein (id TEXT PRIMARY KEY, sequence TEXT)"
INDEX_NAME = "sqlite_autoindex_protein_1"
#: Page size chosen by measurement (benchmarks/results/sqlite_pages.md).
DEFAULT_PAGE_SIZE = 65536
PAGE_SIZES = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
#: ``SQLITE_VERSION_NUMBER`` written at header offset 96: SQLite 3.40.1, the oldest this
#: module's output is tested against (a fixed value: the same rows give the same bytes).
SQLITE_VERSION_NUMBER = 3040001
#: SQLite's lock byte: the page that holds this offset (page ``PENDING_BYTE // page_size + 1``,
#: the *lock-byte page*) is never a B-tree or freelist page; SQLite refuses to read it. A file
#: over 1 GiB leaves it unused. (SQLite's own tests move it; so do ours.)
PENDING_BYTE = 0x40000000
#: Bytes of pages a chunk fills before it writes them (``pwrite``): one buffer of this size
#: is reused, so a chunk's pages are never all in memory (benchmarks/results/train_db.md).
WINDOW_BYTES = 4 << 20
#: Page sizes written with ``O_DIRECT`` are multiples of this (the block size direct I/O
#: needs for offsets, lengths and buffer addresses); smaller pages are written through the
#: page cache.
DIRECT_BLOCK = 4096

_LEAF_TABLE, _INTERIOR_TABLE, _LEAF_INDEX, _INTERIOR_INDEX = 0x0D, 0x05, 0x0A, 0x02


# ----------------------------------------------------------------------------- the kernels


@njit(nogil=True, cache=True, inline="always")
def _varint_len(v):
    if v < 0 or v >= (1 << 56):
        return 9
    n = 1
    while v >= 128:
        v >>= 7
        n += 1
    return n


@njit(nogil=True, cache=True, inline="always")
def _put_varint(buf, pos, v):
    """SQLite's varint at ``buf[pos:]``: big-endian 7-bit groups, high bit = more follows
    (a 9th byte, when needed, carries 8 bits). Returns the position after it."""
    if v < 0 or v >= (1 << 56):
        buf[pos + 8] = v & 0xFF
        v >>= 8
        for k in range(7, -1, -1):
            buf[pos + k] = (v & 0x7F) | 0x80
            v >>= 7
        return pos + 9
    n = _varint_len(v)
    for k in range(n - 1, -1, -1):
        b = v & 0x7F
        if k != n - 1:
            b |= 0x80
        buf[pos + k] = b
        v >>= 7
    return pos + n


@njit(nogil=True, cache=True, inline="always")
def _int_serial_type(v):
    """The serial type SQLite gives an integer (schema format 4: 0 and 1 take no bytes)."""
    if v == 0:
        return 8
    if v == 1:
        return 9
    if -128 <= v <= 127:
        return 1
    if -32768 <= v <= 32767:
        return 2
    if -8388608 <= v <= 8388607:
        return 3
    if -2147483648 <= v <= 2147483647:
        return 4
    if -140737488355328 <= v <= 140737488355327:
        return 5
    return 6


@njit(nogil=True, cache=True, inline="always")
def _int_body_len(st):
    if st <= 4:
        return st
    if st == 5:
        return 6
    if st == 6:
        return 8
    return 0


@njit(nogil=True, cache=True, inline="always")
def _local_size(p, u, index):
    """Bytes of a payload of ``p`` bytes kept on its B-tree page (the rest overflows)."""
    max_local = (u - 12) * 64 // 255 - 23 if index else u - 35
    if p <= max_local:
        return p
    min_local = (u - 12) * 32 // 255 - 23
    k = min_local + (p - min_local) % (u - 4)
    return k if k <= max_local else min_local


@njit(nogil=True, cache=True)
def _sizes(id_len, seq_len, first_rowid, u):
    """Per row (in id order, from its id's and sequence's byte lengths): table cell bytes on
    the page, its overflow pages; the same for the index cell."""
    n = len(id_len)
    table_cell = np.empty(n, np.int64)
    table_ovfl = np.empty(n, np.int64)
    index_cell = np.empty(n, np.int64)
    index_ovfl = np.empty(n, np.int64)
    for i in range(n):
        rowid = first_rowid + i
        st_id = 13 + 2 * id_len[i]
        st_seq = 13 + 2 * seq_len[i]
        h = 1 + _varint_len(st_id) + _varint_len(st_seq)
        p = h + id_len[i] + seq_len[i]
        local = _local_size(p, u, False)
        table_cell[i] = _varint_len(p) + _varint_len(rowid) + local + (4 if local < p else 0)
        table_ovfl[i] = (p - local + u - 5) // (u - 4)
        st_row = _int_serial_type(rowid)
        h = 1 + _varint_len(st_id) + 1
        p = h + id_len[i] + _int_body_len(st_row)
        local = _local_size(p, u, True)
        index_cell[i] = _varint_len(p) + local + (4 if local < p else 0)
        index_ovfl[i] = (p - local + u - 5) // (u - 4)
    return table_cell, table_ovfl, index_cell, index_ovfl


@njit(nogil=True, cache=True)
def _pack_table(cell, u):
    """Where each table leaf's rows end: as many cells as fit (8-byte header, 2 per pointer)."""
    n = len(cell)
    ends = np.empty(max(n, 1), np.int64)
    m = 0
    used = 8
    for i in range(n):
        need = cell[i] + 2
        if used + need > u and used > 8:
            ends[m] = i
            m += 1
            used = 8
        used += need
    if n:
        ends[m] = n
        m += 1
    return ends[:m]


@njit(nogil=True, cache=True)
def _pack_index(cell, u):
    """Index leaves as ``[start, end)`` row ranges; the row after each leaf but the last is
    the divider that moves up a level. A leaf takes as many cells as fit, except that a lone
    last row (no row after it to divide) takes the leaf's last row as its divider."""
    n = len(cell)
    starts = np.empty(max(n, 1), np.int64)
    ends = np.empty(max(n, 1), np.int64)
    m = 0
    i = 0
    while i < n:
        start = i
        used = 8
        while i < n and (used + cell[i] + 2 <= u or i == start):
            used += cell[i] + 2
            i += 1
        if i == n - 1 and i - start >= 2:
            i -= 1
        starts[m] = start
        ends[m] = i
        m += 1
        if i < n:
            i += 1  # the divider
    return starts[:m], ends[:m]


@njit(nogil=True, cache=True, inline="always")
def _copy_record(dst, dpos, hdr, hlen, data1, a1, n1, data2, a2, n2, start, length):
    """Bytes ``[start, start + length)`` of the record ``hdr[:hlen] + data1[a1:a1+n1] +
    data2[a2:a2+n2]`` to ``dst[dpos:]``."""
    end = start + length
    s, e = start, min(end, hlen)
    if e > s:
        copy_bytes(dst, dpos, hdr, s, e - s)
        dpos += e - s
    s, e = max(start, hlen), min(end, hlen + n1)
    if e > s:
        copy_bytes(dst, dpos, data1, a1 + s - hlen, e - s)
        dpos += e - s
    s, e = max(start, hlen + n1), min(end, hlen + n1 + n2)
    if e > s:
        copy_bytes(dst, dpos, data2, a2 + s - hlen - n1, e - s)
        dpos += e - s
    return dpos


@njit(nogil=True, cache=True, inline="always")
def _put_u32(buf, pos, v):
    buf[pos] = (v >> 24) & 0xFF
    buf[pos + 1] = (v >> 16) & 0xFF
    buf[pos + 2] = (v >> 8) & 0xFF
    buf[pos + 3] = v & 0xFF


@njit(nogil=True, cache=True, inline="always")
def _put_u16(buf, pos, v):
    buf[pos] = (v >> 8) & 0xFF
    buf[pos + 1] = v & 0xFF


@njit(nogil=True, cache=True, inline="always")
def _slot(k, hole):
    """Where a chunk's ``k``-th page lies in its region: one further on from the region's
    lock-byte page (``hole``; -1 when the region holds none), which stays blank."""
    return k + 1 if 0 <= hole <= k else k


@njit(nogil=True, cache=True, inline="always")
def _write_local(dst, dpos, u, index, hdr, hlen, d1, a1, n1, d2, a2, n2, rowid, p, first_overflow):
    """One cell at ``dst[dpos:]``: ``varint(p)``, the rowid for a table cell, the payload's
    local part and, when it overflows, its first overflow page (a file page). Returns the end."""
    local = _local_size(p, u, index)
    dpos = _put_varint(dst, dpos, p)
    if not index:
        dpos = _put_varint(dst, dpos, rowid)
    dpos = _copy_record(dst, dpos, hdr, hlen, d1, a1, n1, d2, a2, n2, 0, local)
    if local < p:
        _put_u32(dst, dpos, first_overflow)
        dpos += 4
    return dpos


@njit(nogil=True, cache=True, inline="always")
def _write_overflow(dst, pos, u, index, hdr, hlen, d1, a1, n1, d2, a2, n2, p, j, next_page):
    """Overflow page ``j`` of a payload of ``p`` bytes at ``dst[pos:]``: the next page of the
    chain (0 on the last), then the next ``u - 4`` bytes after the local part."""
    start = _local_size(p, u, index) + j * (u - 4)
    _put_u32(dst, pos, next_page)
    _copy_record(dst, pos + 4, hdr, hlen, d1, a1, n1, d2, a2, n2, start, min(u - 4, p - start))


@njit(nogil=True, cache=True)
def _table_hdr(hdr, id_len, seq_len):
    pos = _put_varint(hdr, 1, 13 + 2 * id_len)
    pos = _put_varint(hdr, pos, 13 + 2 * seq_len)
    hdr[0] = pos
    return pos


@njit(nogil=True, cache=True)
def _index_hdr(hdr, rowbody, id_len, rowid):
    st = _int_serial_type(rowid)
    pos = _put_varint(hdr, 1, 13 + 2 * id_len)
    hdr[pos] = st
    pos += 1
    hdr[0] = pos
    nb = _int_body_len(st)
    for k in range(nb):
        rowbody[k] = (rowid >> (8 * (nb - 1 - k))) & 0xFF
    return pos, nb


@njit(nogil=True, cache=True)
def _fill_pages(window, k_lo, k_hi, first_page, hole, u, id_off, id_data, seq_off, seq_data, order, first_rowid,
                table_cell, table_ends, index_cell, index_starts, index_ends, table_ovfl_at, index_ovfl_at):
    """The chunk's pages ``k_lo`` to ``k_hi - 1`` into ``window`` (zeroed; page ``k`` at slot
    ``_slot(k, hole) - _slot(k_lo, hole)``, the lock-byte page ``hole`` left blank). A chunk's
    pages are, in order: its table leaves, its index leaves but the first and the last, then
    the overflow pages (every table cell's in row order, then every index cell's:
    ``table_ovfl_at[i]`` to ``table_ovfl_at[i + 1]`` are row ``i``'s, the same for
    ``index_ovfl_at``). Each page depends on the layout alone, so any window can be filled.
    Row ``i`` in id order (rowid ``first_rowid + i``) is row ``order[i]`` of the id and
    sequence arrays (their offsets and bytes)."""
    hdr = np.zeros(32, np.uint8)
    rowbody = np.zeros(8, np.uint8)
    n_table = len(table_ends)
    first_overflow = n_table + max(0, len(index_starts) - 2)
    n_table_overflow = table_ovfl_at[-1]
    origin = _slot(k_lo, hole)
    for k in range(k_lo, k_hi):
        base = (_slot(k, hole) - origin) * u
        if k < first_overflow:
            index = k >= n_table
            if index:
                leaf = k - n_table + 1
                lo, hi = index_starts[leaf], index_ends[leaf]
            else:
                lo, hi = (table_ends[k - 1] if k else 0), table_ends[k]
            window[base] = 0x0A if index else 0x0D
            _put_u16(window, base + 3, hi - lo)
            top = base + u
            for i in range(lo, hi):
                src = order[i]
                id_len = id_off[src + 1] - id_off[src]
                if index:
                    hlen, nb = _index_hdr(hdr, rowbody, id_len, first_rowid + i)
                    top -= index_cell[i]
                    _write_local(window, top, u, True, hdr, hlen, id_data, id_off[src], id_len, rowbody, 0, nb, 0,
                                 hlen + id_len + nb, first_page + _slot(index_ovfl_at[i], hole))
                else:
                    seq_len = seq_off[src + 1] - seq_off[src]
                    hlen = _table_hdr(hdr, id_len, seq_len)
                    top -= table_cell[i]
                    _write_local(window, top, u, False, hdr, hlen, id_data, id_off[src], id_len, seq_data,
                                 seq_off[src], seq_len, first_rowid + i, hlen + id_len + seq_len,
                                 first_page + _slot(table_ovfl_at[i], hole))
                _put_u16(window, base + 8 + 2 * (i - lo), top - base)
            _put_u16(window, base + 5, (top - base) & 0xFFFF)
            continue
        index = k >= n_table_overflow
        at = index_ovfl_at if index else table_ovfl_at
        i = np.searchsorted(at, k, side="right") - 1  # the row whose chain holds page k
        j = k - at[i]
        nxt = first_page + _slot(k + 1, hole) if j + 1 < at[i + 1] - at[i] else 0
        src = order[i]
        id_len = id_off[src + 1] - id_off[src]
        if index:
            hlen, nb = _index_hdr(hdr, rowbody, id_len, first_rowid + i)
            _write_overflow(window, base, u, True, hdr, hlen, id_data, id_off[src], id_len, rowbody, 0, nb,
                            hlen + id_len + nb, j, nxt)
        else:
            seq_len = seq_off[src + 1] - seq_off[src]
            hlen = _table_hdr(hdr, id_len, seq_len)
            _write_overflow(window, base, u, False, hdr, hlen, id_data, id_off[src], id_len, seq_data, seq_off[src],
                            seq_len, hlen + id_len + seq_len, j, nxt)


@njit(nogil=True, cache=True)
def _write_loose(loose, loose_sizes, rows, first_page, hole, u, id_off, id_data, order, first_rowid, index_ovfl_at):
    """The index cells of ``rows`` (in id order; those the final step places), their bodies
    one after another into ``loose``, their sizes into ``loose_sizes``. Returns the bytes used."""
    hdr = np.zeros(32, np.uint8)
    rowbody = np.zeros(8, np.uint8)
    pos = 0
    for j in range(len(rows)):
        i = rows[j]
        src = order[i]
        id_len = id_off[src + 1] - id_off[src]
        hlen, nb = _index_hdr(hdr, rowbody, id_len, first_rowid + i)
        end = _write_local(loose, pos, u, True, hdr, hlen, id_data, id_off[src], id_len, rowbody, 0, nb, 0,
                           hlen + id_len + nb, first_page + _slot(index_ovfl_at[i], hole))
        loose_sizes[j] = end - pos
        pos = end
    return pos


# ----------------------------------------------------------------------------- one chunk


@dataclass
class ChunkLayout:
    """What one chunk's rows fill (from :func:`layout_rows`): pages by kind."""

    rows: int
    table_leaves: int
    index_leaves: int
    overflow_pages: int

    @property
    def pages(self) -> int:
        """Pages the chunk writes itself: its index leaves but the first and the last."""
        return self.table_leaves + max(0, self.index_leaves - 2) + self.overflow_pages


@dataclass
class ChunkEdges:
    """What the final step needs of one written chunk (small: O(leaves), never a row).

    ``table_max_rowid[j]`` is the largest rowid of the chunk's table leaf ``j`` (page
    ``first_page + j``). The index leaves are ``index_leaves``; their loose cells (bodies
    without a child pointer) are, in order: leaf 0's cells, then for each further leaf the
    divider before it and, for the last leaf only, its cells; ``index_head_cells`` and
    ``index_tail_cells`` count the cells of leaf 0 and of the last leaf (when it is not leaf 0).
    """

    first_page: int
    table_max_rowid: np.ndarray
    index_leaves: int
    index_head_cells: int
    index_tail_cells: int
    loose: bytes
    loose_sizes: np.ndarray

    def save(self, path: str) -> None:
        """As seven little-endian int64 (first page, index leaves, head and tail cells, and
        the lengths of the three arrays), then the arrays' bytes: read back by
        :meth:`load` with no parser (``np.load``'s header parser is Python's ``ast``, and
        the file is read back from the output folder)."""
        table = np.ascontiguousarray(self.table_max_rowid, dtype="<i8")
        sizes = np.ascontiguousarray(self.loose_sizes, dtype="<i8")
        head = np.array([self.first_page, self.index_leaves, self.index_head_cells, self.index_tail_cells,
                         len(table), len(self.loose), len(sizes)], dtype="<i8")
        with open(path, "wb") as f:
            for part in (head.tobytes(), table.tobytes(), self.loose, sizes.tobytes()):
                f.write(part)

    @classmethod
    def load(cls, path: str) -> "ChunkEdges":
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < 56:
            raise ValueError(f"{path}: not a chunk's edges (cut short?)")
        first, leaves, head, tail, n_table, n_loose, n_sizes = np.frombuffer(data, "<i8", 7).tolist()
        if min(n_table, n_loose, n_sizes) < 0 or len(data) != 56 + 8 * n_table + n_loose + 8 * n_sizes:
            raise ValueError(f"{path}: not a chunk's edges (its lengths do not add up)")
        table = np.frombuffer(data, "<i8", n_table, 56).astype(np.int64)
        loose = data[56 + 8 * n_table : 56 + 8 * n_table + n_loose]
        sizes = np.frombuffer(data, "<i8", n_sizes, 56 + 8 * n_table + n_loose).astype(np.int64)
        return cls(first, table, leaves, head, tail, loose, sizes)


def _buffers(strings) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (int64, from 0) and bytes (uint8) of a pyarrow string array."""
    import pyarrow as pa

    arr = strings.combine_chunks() if isinstance(strings, pa.ChunkedArray) else strings
    if arr.null_count:
        raise ValueError("a null string cannot be stored")
    arr = arr.cast(pa.large_string())
    _, offsets, data = arr.buffers()
    off = np.frombuffer(offsets, np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data_np = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    return off - off[0], data_np[off[0] : off[-1]] if len(off) else data_np[:0]


class Chunk:
    """One chunk's rows and the rowid of its first row; its layout is computed on creation.

    ``ids`` and ``sequences`` are pyarrow string arrays (chunked or not: a chunked array is
    made contiguous once, the only copy of the rows the writer makes). Row ``i`` in id order
    is row ``order[i]`` of them (``order`` None: they are in id order); the ids in that order
    are sorted bytewise and distinct. The writer reads the rows through ``order``, so the
    rows are never sorted into a copy of their own."""

    def __init__(self, ids, sequences, first_rowid: int, page_size: int = DEFAULT_PAGE_SIZE, order=None):
        if page_size not in PAGE_SIZES:
            raise ValueError(f"page size {page_size} is not a power of two from 512 to 65536")
        self.u, self.first_rowid = page_size, int(first_rowid)
        self.id_off, self.id_data = _buffers(ids)
        self.seq_off, self.seq_data = _buffers(sequences)
        if len(self.id_off) != len(self.seq_off):
            raise ValueError("ids and sequences differ in length")
        n = len(self.id_off) - 1
        self.order = np.arange(n, dtype=np.int64) if order is None else np.ascontiguousarray(order, np.int64)
        if len(self.order) and not (0 <= self.order.min() and self.order.max() < n):
            raise ValueError(f"order holds a row outside 0 … {n - 1}")
        self.table_cell, self.index_cell, self.table_ends, self.index_starts, self.index_ends, self.layout, \
            table_ovfl, index_ovfl = _layout(np.diff(self.id_off)[self.order], np.diff(self.seq_off)[self.order],
                                             self.first_rowid, self.u)
        # where each row's overflow chains begin among the chunk's pages (see _fill_pages)
        first_overflow = self.layout.table_leaves + max(0, self.layout.index_leaves - 2)
        self.table_ovfl_at = first_overflow + np.concatenate(([0], np.cumsum(table_ovfl)))
        self.index_ovfl_at = self.table_ovfl_at[-1] + np.concatenate(([0], np.cumsum(index_ovfl)))

    def write(self, path: str, first_page: int, file_offset: int | None = None,
              window_bytes: int = WINDOW_BYTES, direct: bool = True) -> ChunkEdges:
        """Its pages into the file at ``path`` (at page ``first_page``'s place, or at
        ``file_offset``), filled and written (``pwrite``) about ``window_bytes`` at a time;
        returns its :class:`ChunkEdges`. ``first_page`` is the chunk's number in the plan
        (:func:`plan_pages`); the lock-byte page, where the chunk's pages span it, stays blank.
        With ``direct`` the pages bypass the page cache where they can (:class:`_PageFile`)."""
        lay, u = self.layout, self.u
        first_file = file_page(first_page, u)
        lock = lock_page(u)
        hole = lock - first_file if first_file < lock < first_file + lay.pages else -1
        offset = (first_file - 1) * u if file_offset is None else file_offset
        window_pages = max(1, window_bytes // u)
        # two windows of page-aligned memory (direct I/O needs it), room for the lock-byte page
        # too: one is written (by a helper thread: the write waits on the disk, holding no GIL)
        # while the kernel fills the other
        n_windows = 2 if lay.pages > window_pages else 1
        windows = [np.frombuffer(mmap.mmap(-1, (min(window_pages, lay.pages) + 1) * u), np.uint8)
                   for _ in range(n_windows)]
        with _PageFile(path, direct and u % DIRECT_BLOCK == 0 and offset % DIRECT_BLOCK == 0) as out, \
                ThreadPoolExecutor(1, thread_name_prefix="esm2dask-pages") as pool:
            writing = None
            for j, k_lo in enumerate(range(0, lay.pages, window_pages)):
                k_hi = min(lay.pages, k_lo + window_pages)
                slot_lo, slot_hi = _slot(k_lo, hole), _slot(k_hi - 1, hole) + 1
                pages = windows[j % n_windows][: (slot_hi - slot_lo) * u]  # not the one being written
                pages[:] = 0
                _fill_pages(pages, k_lo, k_hi, first_file, hole, u, self.id_off, self.id_data, self.seq_off,
                            self.seq_data, self.order, self.first_rowid, self.table_cell, self.table_ends,
                            self.index_cell, self.index_starts, self.index_ends, self.table_ovfl_at,
                            self.index_ovfl_at)
                if writing is not None:
                    writing.result()
                writing = pool.submit(out.write, pages, offset + slot_lo * u)
            if writing is not None:
                writing.result()
        return self._edges(first_page, first_file, hole)

    def _edges(self, first_page: int, first_file: int, hole: int) -> ChunkEdges:
        """What the final step needs: the table leaves' largest rowids and the index cells it
        places (the chunk's first and last index leaf, and the dividers between its leaves)."""
        lay = self.layout
        head_cells = tail_cells = 0
        loose_rows = np.zeros(lay.rows, bool)
        if lay.rows:
            head_cells = int(self.index_ends[0] - self.index_starts[0])
            loose_rows[self.index_starts[0] : self.index_ends[0]] = True
            loose_rows[self.index_ends[:-1]] = True
            if lay.index_leaves > 1:
                tail_cells = int(self.index_ends[-1] - self.index_starts[-1])
                loose_rows[self.index_starts[-1] : self.index_ends[-1]] = True
        loose = np.zeros(int(self.index_cell[loose_rows].sum()), np.uint8)
        rows = np.flatnonzero(loose_rows)
        loose_sizes = np.zeros(len(rows), np.int64)
        used = _write_loose(loose, loose_sizes, rows, first_file, hole, self.u, self.id_off, self.id_data, self.order,
                            self.first_rowid, self.index_ovfl_at)
        max_rowid = self.first_rowid + self.table_ends - 1
        return ChunkEdges(first_page, max_rowid.astype(np.int64), lay.index_leaves, head_cells, tail_cells,
                          loose[:used].tobytes(), loose_sizes)


class _PageFile:
    """A file opened for a chunk's ``pwrite`` calls: with ``O_DIRECT`` when ``direct`` (and the
    platform and file system allow it), else through the page cache. A file written once and
    read later needs no copy in memory: on this VM a new file's pages cost ~400 MB/s to get
    from the host, and direct writes went at 2.0 GB/s to the end of an ``fsync``
    (benchmarks/results/train_db.md). A file system that takes the flag at ``open`` but not
    the write (``EINVAL``) gets the write again through the page cache."""

    def __init__(self, path: str, direct: bool):
        self.path, self.fd, self.direct = path, -1, direct and hasattr(os, "O_DIRECT")
        if self.direct:
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
            except OSError:  # tmpfs and some network file systems refuse O_DIRECT
                self.direct = False
        if not self.direct:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)

    def write(self, buf: np.ndarray, offset: int) -> None:
        try:
            pwrite_all(self.fd, buf, offset)
        except OSError as err:
            if not self.direct or err.errno != errno.EINVAL:
                raise
            os.close(self.fd)
            self.fd, self.direct = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644), False
            pwrite_all(self.fd, buf, offset)

    def __enter__(self) -> "_PageFile":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _layout(id_len, seq_len, first_rowid: int, u: int):
    table_cell, table_ovfl, index_cell, index_ovfl = _sizes(id_len, seq_len, first_rowid, u)
    table_ends = _pack_table(table_cell, u)
    index_starts, index_ends = _pack_index(index_cell, u)
    layout = ChunkLayout(len(id_len), len(table_ends), len(index_starts), int(table_ovfl.sum() + index_ovfl.sum()))
    return table_cell, index_cell, table_ends, index_starts, index_ends, layout, table_ovfl, index_ovfl


def layout_rows(id_lengths, sequence_lengths, first_rowid: int, page_size: int = DEFAULT_PAGE_SIZE) -> ChunkLayout:
    """The pages one chunk's rows fill, from the byte lengths of its ids and sequences, in id
    order: what :class:`Chunk` lays out, without the rows."""
    id_len, seq_len = (np.ascontiguousarray(x, np.int64) for x in (id_lengths, sequence_lengths))
    return _layout(id_len, seq_len, int(first_rowid), page_size)[5]


# ----------------------------------------------------------------------------- the plan


def plan_pages(layouts: list[ChunkLayout]) -> list[int]:
    """Each chunk's first page: page 1 is the schema, the chunks follow in order, each its
    table leaves, its index leaves, its overflow pages; the final step's pages come last.

    >>> plan_pages([ChunkLayout(10, 2, 1, 0), ChunkLayout(0, 0, 0, 0), ChunkLayout(5, 1, 3, 2)])
    [2, 4, 4]
    """
    firsts, page = [], 2
    for lay in layouts:
        firsts.append(page)
        page += lay.pages
    return firsts


def chunk_pages_end(layouts: list[ChunkLayout]) -> int:
    """The first page after every chunk's pages."""
    return 2 + sum(lay.pages for lay in layouts)


def lock_page(u: int) -> int:
    """The lock-byte page of a database of ``u``-byte pages (SQLite's ``PENDING_BYTE_PAGE``).

    >>> lock_page(4096), lock_page(65536)
    (262145, 16385)
    """
    return PENDING_BYTE // u + 1


def file_page(plan_page: int, u: int) -> int:
    """Where page ``plan_page`` of the plan lies in the file: the plan numbers every page the
    writer makes without a gap; the file has the lock-byte page among them, unused.

    >>> [file_page(p, 65536) for p in (1, 16384, 16385, 16386)]
    [1, 16384, 16386, 16387]
    """
    return plan_page + 1 if plan_page >= lock_page(u) else plan_page


# ----------------------------------------------------------------------------- the final step


def _varint(v: int) -> bytes:
    buf = np.zeros(9, np.uint8)
    return buf[: _put_varint(buf, 0, v)].tobytes()


def _leaf_page(kind: int, cells: list[bytes], u: int, header_at: int = 0) -> bytearray:
    page = bytearray(u)
    top = u
    pointers = []
    for c in cells:
        top -= len(c)
        page[top : top + len(c)] = c
        pointers.append(top)
    page[header_at] = kind
    struct.pack_into(">HHHB", page, header_at + 1, 0, len(cells), top & 0xFFFF, 0)
    for k, p in enumerate(pointers):
        struct.pack_into(">H", page, header_at + 8 + 2 * k, p)
    if header_at + 8 + 2 * len(cells) > top:
        raise AssertionError("internal: cells overfill a page")
    return page


class _Pages:
    """Pages the final step adds, numbered from ``next_page`` on, kept until written."""

    def __init__(self, next_page: int, u: int):
        self.next, self.u, self.pages = next_page, u, {}

    def add(self, page) -> int:
        self.pages[self.next] = page
        self.next += 1
        return self.next - 1

    def add_block(self, block: np.ndarray) -> np.ndarray:
        """The rows of ``block`` (one page each) as the next pages; returns their numbers."""
        first = self.next
        for k in range(len(block)):
            self.add(block[k])
        return np.arange(first, self.next, dtype=np.int64)


@njit(nogil=True, cache=True)
def _level_ends(sizes, capacity):
    """The rule of both trees' interior levels: ``n`` children (``n - 1`` cells, ``sizes[j]``
    the bytes of child ``j``'s cell; the last child is a right pointer only) grouped into
    pages of ``capacity`` bytes. A page holds cells ``a … b-1`` (as many as fit, 2 bytes of
    pointer each, at least one) and child ``b`` as its right pointer; a last page with one
    child (no cell) borrows one from the page before. Returns each page's ``b``."""
    n = len(sizes) + 1
    ends = np.empty(n, np.int64)
    g = 0
    i = 0
    while i < n:
        a = i
        used = 0
        while i < n - 1 and (used + sizes[i] + 2 <= capacity or i == a):
            used += sizes[i] + 2
            i += 1
        ends[g] = i
        g += 1
        i += 1
    if g > 1 and ends[g - 1] == ends[g - 2] + 1:  # a last page with one child: it borrows one
        ends[g - 2] -= 1
    return ends[:g].copy()


@njit(nogil=True, cache=True)
def _interior_level(child_pages, buf, key_at, key_len, kind, u):
    """One level of a tree's interior pages (``kind``) over ``n`` children: child ``j``'s
    cell is its file page (``child_pages[j]``) and, for ``j < n - 1``, its key
    ``buf[key_at[j] : key_at[j] + key_len[j]]`` (a rowid's varint, or an index entry); a
    page holds cells ``a … b-1`` and child ``b`` as its right pointer (:func:`_level_ends`),
    and key ``b`` of each page but the last moves up. Returns the pages (one row each) and
    each page's ``b``."""
    n = len(child_pages)
    sizes = 4 + key_len[: n - 1]
    ends = _level_ends(sizes, u - 12)
    out = np.zeros((len(ends), u), np.uint8)
    a = 0
    for k in range(len(ends)):
        b = ends[k]
        page = out[k]
        top = u
        for j in range(a, b):
            top -= sizes[j]
            _put_u32(page, top, child_pages[j])
            copy_bytes(page, top + 4, buf, key_at[j], key_len[j])
            _put_u16(page, 12 + 2 * (j - a), top)
        page[0] = kind
        _put_u16(page, 3, b - a)
        _put_u16(page, 5, top & 0xFFFF)
        _put_u32(page, 8, child_pages[b])
        a = b + 1
    return out, ends


@njit(nogil=True, cache=True)
def _varint_keys(keys):
    """Each of ``keys`` as SQLite's varint, back to back: the bytes, each one's offset and length."""
    n = len(keys)
    at = np.empty(n, np.int64)
    length = np.empty(n, np.int64)
    total = 0
    for j in range(n):
        length[j] = _varint_len(keys[j])
        at[j] = total
        total += length[j]
    buf = np.empty(total, np.uint8)
    for j in range(n):
        _put_varint(buf, at[j], keys[j])
    return buf, at, length


@njit(nogil=True, cache=True)
def _seam_leaves(buf, cell_at, cell_len, seam_lo, seam_hi, u):
    """Each seam's loose index cells (cells ``seam_lo[s] … seam_hi[s]-1``, cell ``i`` at
    ``buf[cell_at[i] : cell_at[i] + cell_len[i]]``) packed into leaves as a chunk packs its
    rows (:func:`_pack_index`). Returns the leaves (one row each, the seams' in order), each
    seam's count of leaves, and the cells between a seam's leaves that move up (in order)."""
    n_seams = len(seam_lo)
    total = 0
    for s in range(n_seams):
        total += seam_hi[s] - seam_lo[s]
    starts = np.empty(total, np.int64)
    ends = np.empty(total, np.int64)
    counts = np.empty(n_seams, np.int64)
    g = 0
    for s in range(n_seams):
        lo = seam_lo[s]
        st, en = _pack_index(cell_len[lo : seam_hi[s]], u)
        m = len(st)
        for k in range(m):
            starts[g + k] = lo + st[k]
            ends[g + k] = lo + en[k]
        counts[s] = m
        g += m
    out = np.zeros((g, u), np.uint8)
    dividers = np.empty(g, np.int64)
    d = 0
    k = 0
    for s in range(n_seams):
        for j in range(counts[s]):
            a, b = starts[k], ends[k]
            page = out[k]
            top = u
            for i in range(a, b):
                top -= cell_len[i]
                copy_bytes(page, top, buf, cell_at[i], cell_len[i])
                _put_u16(page, 8 + 2 * (i - a), top)
            page[0] = _LEAF_INDEX
            _put_u16(page, 3, b - a)
            _put_u16(page, 5, top & 0xFFFF)
            if j < counts[s] - 1:
                dividers[d] = b
                d += 1
            k += 1
    return out, counts, dividers[:d].copy()


def _file_pages(plan_pages: np.ndarray, u: int) -> np.ndarray:
    """:func:`file_page` of each of ``plan_pages``."""
    return plan_pages + (plan_pages >= lock_page(u))


def _table_root(leaves: np.ndarray, max_rowids: np.ndarray, pages: _Pages) -> int:
    """The table tree over its leaves (plan pages) and their largest rowids."""
    if not len(leaves):
        return pages.add(_leaf_page(_LEAF_TABLE, [], pages.u))
    children, keys = leaves, max_rowids
    while len(children) > 1:
        buf, key_at, key_len = _varint_keys(keys)  # a child's key: its largest rowid
        block, ends = _interior_level(_file_pages(children, pages.u), buf, key_at, key_len, _INTERIOR_TABLE, pages.u)
        children, keys = pages.add_block(block), keys[ends]
    return int(children[0])


def _index_root(edges: list[ChunkEdges], pages: _Pages) -> int:
    """The index tree over every chunk's leaves, the seams between chunks packed here. The
    loose cells, every chunk's one after another, are cells ``0 … m-1``; a chunk of two index
    leaves or more ends a seam with its first leaf's cells and starts the next with its last
    leaf's (its dividers lie between), so a seam is a run of cells, chunks of one leaf inside."""
    u = pages.u
    edges = [e for e in edges if e.index_leaves]
    if not edges:
        return pages.add(_leaf_page(_LEAF_INDEX, [], u))
    buf = np.frombuffer(b"".join(e.loose for e in edges), np.uint8)
    cell_len = np.concatenate([e.loose_sizes for e in edges]).astype(np.int64)
    cell_at = np.cumsum(cell_len) - cell_len
    n_cells = np.array([len(e.loose_sizes) for e in edges], np.int64)
    first_cell = np.cumsum(n_cells) - n_cells
    split = np.array([k for k, e in enumerate(edges) if e.index_leaves > 1], np.int64)
    n_leaves = np.array([edges[k].index_leaves for k in split], np.int64)
    dividers_at = first_cell[split] + np.array([edges[k].index_head_cells for k in split], np.int64)
    seam_lo = np.concatenate(([0], dividers_at + n_leaves - 1)).astype(np.int64)
    seam_hi = np.concatenate((dividers_at, [len(cell_len)])).astype(np.int64)
    block, per_seam, seam_dividers = _seam_leaves(buf, cell_at, cell_len, seam_lo, seam_hi, u)
    seam_pages = pages.add_block(block)
    # the leaves in order: a seam's, then those the chunk after it wrote; the keys likewise
    leaf_at = np.concatenate(([0], np.cumsum(per_seam)))
    divider_at = np.concatenate(([0], np.cumsum(np.maximum(per_seam - 1, 0))))
    children, keys = [], []
    for s in range(len(seam_lo)):
        children.append(seam_pages[leaf_at[s] : leaf_at[s + 1]])
        keys.append(seam_dividers[divider_at[s] : divider_at[s + 1]])
        if s < len(split):
            e = edges[split[s]]
            children.append(e.first_page + len(e.table_max_rowid) + np.arange(e.index_leaves - 2, dtype=np.int64))
            keys.append(dividers_at[s] + np.arange(e.index_leaves - 1, dtype=np.int64))
    children, keys = np.concatenate(children), np.concatenate(keys)
    key_at, key_len = cell_at[keys], cell_len[keys]
    while len(children) > 1:
        block, ends = _interior_level(_file_pages(children, u), buf, key_at, key_len, _INTERIOR_INDEX, u)
        key_at, key_len = key_at[ends[:-1]], key_len[ends[:-1]]
        children = pages.add_block(block)
    return int(children[0])


def _record(values: list) -> bytes:
    """A record of text, integer and NULL values (the schema table's rows)."""
    types, body = [], b""
    for v in values:
        if v is None:
            types.append(0)
        elif isinstance(v, int):
            st = int(_int_serial_type(v))
            types.append(st)
            nb = int(_int_body_len(st))
            body += v.to_bytes(nb, "big", signed=True) if nb else b""
        else:
            b = v.encode()
            types.append(13 + 2 * len(b))
            body += b
    head = b"".join(_varint(t) for t in types)
    return _varint(len(head) + 1) + head + body


def schema_page(table_root: int, index_root: int, page_count: int, u: int) -> bytearray:
    """Page 1: the 100-byte header and ``sqlite_schema`` (a table leaf) holding the table
    and its primary key's autoindex."""
    rows = [["table", "protein", "protein", table_root, PROTEIN_DDL],
            ["index", INDEX_NAME, "protein", index_root, None]]
    cells = []
    for rowid, values in enumerate(rows, start=1):
        rec = _record(values)
        cells.append(_varint(len(rec)) + _varint(rowid) + rec)
    page = _leaf_page(_LEAF_TABLE, cells, u, header_at=100)
    page[:100] = database_header(page_count, u)
    return page


def database_header(page_count: int, u: int) -> bytes:
    """The 100-byte header: rollback journal (18–19 = 1), no reserved bytes, payload
    fractions 64/32/32, change counter 1 (and valid-for 1, so the page count holds), empty
    freelist, schema cookie 1, schema format 4, UTF-8."""
    return struct.pack(
        ">16sHBBBBBBIIIIIIIIIIII20sII",
        b"SQLite format 3\x00", 1 if u == 65536 else u, 1, 1, 0, 64, 32, 32,
        1, page_count, 0, 0, 1, 4, 0, 0, 1, 0, 0, 0, b"\x00" * 20, 1, SQLITE_VERSION_NUMBER,
    )


def finish_database(path: str, edges: list[ChunkEdges], next_page: int, u: int) -> int:
    """The index seams, both trees' interior pages, page 1 and the header into ``path``
    (whose chunk pages end before ``next_page`` of the plan); the file cut to its page
    count (the lock-byte page counted, as SQLite counts it). Returns the page count."""
    pages = _Pages(next_page, u)
    none = np.zeros(0, np.int64)
    leaves = np.concatenate([none] + [np.arange(e.first_page, e.first_page + len(e.table_max_rowid), dtype=np.int64)
                                      for e in edges])
    max_rowids = np.concatenate([none] + [e.table_max_rowid for e in edges]).astype(np.int64)
    table_root = file_page(_table_root(leaves, max_rowids, pages), u)
    index_root = file_page(_index_root(edges, pages), u)
    page_count = file_page(pages.next - 1, u)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for number, page in pages.pages.items():
            os.pwrite(fd, page, (file_page(number, u) - 1) * u)
        os.pwrite(fd, schema_page(table_root, index_root, page_count, u), 0)
        os.ftruncate(fd, page_count * u)
    finally:
        os.close(fd)
    return page_count


def write_database(path: str, ids, sequences, page_size: int = DEFAULT_PAGE_SIZE, first_rowid: int = 1) -> int:
    """A whole database from one sorted, distinct id array in this process (the small
    evaluation databases); returns its size in bytes."""
    chunk = Chunk(ids, sequences, first_rowid, page_size)
    (first,) = plan_pages([chunk.layout])
    with open(path, "wb"):
        pass
    edges = chunk.write(path, first)
    return finish_database(path, [edges], chunk_pages_end([chunk.layout]), page_size) * page_size
