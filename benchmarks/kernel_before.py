"""THE KERNEL BEFORE ISSUE 16, kept only for benchmarks/kernel.py to measure side by side.

A verbatim copy of esm2dask/kernel.py as of commit 05086b2 (a scalar table lookup per
byte); nothing in esm2dask/ imports it. Its original docstring follows.

The FASTA kernel: one owned block of bytes in, CSV rows out, compiled and GIL-free.

This is the only FASTA parser of the product. It implements the record rules of
``docs/esm2-layout.md`` exactly and writes each record's CSV row
(``record_id,record_name,sequence_length,sequence``) straight from the input bytes:

- a record starts at a ``>`` that begins a line (byte 0 of the block or after ``\\n``);
- its name is the first token after ``>``, up to the first space, tab, ``\\r``, ``\\v``
  or ``\\f`` (or the line end); an empty name is an error;
- its sequence is the record's other lines joined, one trailing ``\\r`` stripped per line,
  blank lines skipped; train/uf90 sequences are upper-cased, val/test keep their case;
- every printable ASCII character but ``,`` ``"`` and space is legal in a name or a
  sequence line (``+ @ ; # >`` and digits included); anything else there is an error
  naming the byte. The rest of a header line (the description) is free text.

One pass over the bytes validates, upper-cases and copies a record's sequence into the
row; the length, known only at the end, is then written in front of it and the sequence
moved up (a plain memory move). No Python object is made per record; the caller gets a
few numpy arrays back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from esm2dask.errors import InputError

# ---------------------------------------------------------------------------- tables

#: Byte classes of a name: 1 = legal, 2 = ends the name (whitespace), 0 = illegal.
_NAME_CLASS = np.zeros(256, dtype=np.uint8)
_NAME_CLASS[0x21:0x7F] = 1
_NAME_CLASS[[ord(","), ord('"')]] = 0
_NAME_CLASS[[ord(" "), ord("\t"), ord("\r"), 0x0B, 0x0C, ord("\n")]] = 2

#: Output byte of each sequence byte (0 = illegal), kept as it is or upper-cased.
_SEQ_KEEP = np.zeros(256, dtype=np.uint8)
_SEQ_KEEP[0x21:0x7F] = np.arange(0x21, 0x7F, dtype=np.uint8)
_SEQ_KEEP[[ord(","), ord('"')]] = 0
_SEQ_UPPER = _SEQ_KEEP.copy()
_SEQ_UPPER[ord("a") : ord("z") + 1] -= 32

#: Error codes the kernel reports (with the byte and the record index).
OK, TEXT_BEFORE_HEADER, EMPTY_NAME, BAD_NAME_BYTE, BAD_SEQUENCE_BYTE = 0, 1, 2, 3, 4

#: Bytes a row can take beyond its name and sequence: a 20-digit id, 3 commas, \n and
#: the 21 bytes kept free for the length while the sequence is copied.
_ROW_OVERHEAD = 48


# ---------------------------------------------------------------------------- kernels


@njit(nogil=True, cache=True)
def count_records(buf: np.ndarray) -> int:
    """Records in an owned block: ``>`` at byte 0 or right after ``\\n``."""
    n = len(buf)
    if n == 0:
        return 0
    count = 1 if buf[0] == 62 else 0
    for i in range(n - 1):
        if buf[i] == 10 and buf[i + 1] == 62:
            count += 1
    return count


@njit(nogil=True, cache=True, inline="always")
def _write_int(out, o, value):
    """Decimal digits of ``value`` (>= 0) at ``out[o:]``; returns the new end."""
    digits = 1
    v = value // 10
    while v:
        digits += 1
        v //= 10
    end = o + digits
    k = end - 1
    v = value
    while True:
        out[k] = 48 + v % 10
        v //= 10
        if k == o:
            break
        k -= 1
    return end


@njit(nogil=True, cache=True)
def _convert(buf, at_file_start, table, name_class, first_id, with_ids,
             out, row_starts, names, name_starts, headers, err):
    """Parse ``buf`` and write its CSV rows; returns the number of records.

    ``row_starts``/``name_starts`` get n+1 offsets into ``out``/``names``; ``headers``
    the offset of each record's ``>``. On bad input ``err`` = (code, byte, record).
    """
    n_bytes = len(buf)
    pos = 0
    if at_file_start:
        # blank lines may precede the first header; anything else may not
        while pos < n_bytes and name_class[buf[pos]] == 2:
            pos += 1
        if pos < n_bytes and buf[pos] != 62:
            err[0] = TEXT_BEFORE_HEADER
            err[1] = pos
            return 0
        if pos > 0 and pos < n_bytes and buf[pos - 1] != 10:
            err[0] = TEXT_BEFORE_HEADER
            err[1] = pos
            return 0
    n = 0
    o = 0
    no = 0
    row_starts[0] = 0
    name_starts[0] = 0
    while pos < n_bytes:
        headers[n] = pos
        # the name: first token after '>'
        p = pos + 1
        q = p
        while q < n_bytes:
            cls = name_class[buf[q]]
            if cls == 2:
                break
            if cls == 0:
                err[0] = BAD_NAME_BYTE
                err[1] = q
                err[2] = n
                return n
            q += 1
        if q == p:
            err[0] = EMPTY_NAME
            err[1] = pos
            err[2] = n
            return n
        # the rest of the header line is free text
        e = q
        while e < n_bytes and buf[e] != 10:
            e += 1
        body = e + 1
        # the name, then the sequence copied 21 bytes on (room for its length, written
        # once known, and a comma); one pass validates, upper-cases and copies it
        if with_ids:
            o = _write_int(out, o, first_id + n)
            out[o] = 44
            o += 1
        for k in range(p, q):
            out[o] = buf[k]
            names[no] = buf[k]
            o += 1
            no += 1
        out[o] = 44
        o += 1
        seq = o + 21
        s = seq
        k = body
        at_next = k < n_bytes and buf[k] == 62  # no sequence lines: the next record follows
        while not at_next and k < n_bytes:
            c = buf[k]
            v = table[c]
            if v != 0:
                out[s] = v
                s += 1
                k += 1
                continue
            if c == 10:
                k += 1
                if k < n_bytes and buf[k] == 62:
                    break
                continue
            if c == 13 and (k + 1 == n_bytes or buf[k + 1] == 10):
                k += 1
                continue
            err[0] = BAD_SEQUENCE_BYTE
            err[1] = k
            err[2] = n
            return n
        end = min(k, n_bytes)
        length = s - seq
        o = _write_int(out, o, length)
        out[o] = 44
        o += 1
        for j in range(length):  # moves left: a forward copy is safe
            out[o + j] = out[seq + j]
        o += length
        out[o] = 10
        o += 1
        n += 1
        row_starts[n] = o
        name_starts[n] = no
        pos = end
    return n


@njit(nogil=True, cache=True)
def _gather_rows(out, row_starts, rows, ids, with_ids):
    """Rows ``rows`` (indices, in the order given) of ``out``, copied into one buffer;
    with ``with_ids`` each prefixed with ``ids[j]`` and a comma (rows written without ids)."""
    total = 0
    for i in rows:
        total += row_starts[i + 1] - row_starts[i] + (21 if with_ids else 0)
    gathered = np.empty(total, dtype=np.uint8)
    starts = np.empty(len(rows) + 1, dtype=np.int64)
    t = 0
    starts[0] = 0
    for j in range(len(rows)):
        i = rows[j]
        if with_ids:
            t = _write_int(gathered, t, ids[j])
            gathered[t] = 44
            t += 1
        for k in range(row_starts[i], row_starts[i + 1]):
            gathered[t] = out[k]
            t += 1
        starts[j + 1] = t
    return gathered[:t], starts


# ---------------------------------------------------------------------------- Python side


@dataclass
class Rows:
    """CSV rows of consecutive records: row i is ``data[starts[i]:starts[i+1]]``."""

    data: np.ndarray
    starts: np.ndarray

    def __len__(self) -> int:
        return len(self.starts) - 1

    def span(self, lo: int, hi: int) -> memoryview:
        """The bytes of rows ``[lo, hi)``, without a copy."""
        return memoryview(self.data)[int(self.starts[lo]) : int(self.starts[hi])]

    def take(self, rows: np.ndarray) -> "Rows":
        """Rows ``rows``, in that order."""
        return self._gather(rows, np.zeros(0, dtype=np.int64), False)

    def with_ids(self, rows: np.ndarray, ids: np.ndarray) -> "Rows":
        """Rows written without ids, in the order ``rows``, prefixed with ``ids``."""
        return self._gather(rows, ids, True)

    def _gather(self, rows, ids, with_ids: bool) -> "Rows":
        data, starts = _gather_rows(
            self.data, self.starts, np.ascontiguousarray(rows, dtype=np.int64),
            np.ascontiguousarray(ids, dtype=np.int64), with_ids,
        )
        return Rows(data, starts)


@dataclass
class Block:
    """One parsed block: its rows, its record names and where each record starts."""

    rows: Rows
    names: np.ndarray  # the names' bytes, back to back
    name_starts: np.ndarray  # n+1 offsets into names
    headers: np.ndarray  # file offset of each record's '>'

    def __len__(self) -> int:
        return len(self.rows)

    def name_series(self):
        """The names as a polars String Series (one Arrow buffer, no per-record object)."""
        import polars as pl
        import pyarrow as pa

        array = pa.LargeStringArray.from_buffers(
            len(self), pa.py_buffer(self.name_starts), pa.py_buffer(self.names)
        )
        return pl.from_arrow(array)

    def name(self, i: int) -> str:
        return bytes(self.names[self.name_starts[i] : self.name_starts[i + 1]]).decode("ascii")


def as_array(data) -> np.ndarray:
    """A read-only uint8 view of ``data`` (bytes, bytearray, mmap or memoryview)."""
    return np.frombuffer(data, dtype=np.uint8)


def convert_block(data, base_offset: int, url: str, *, uppercase: bool, first_id: int | None) -> Block:
    """Parse an owned block starting at file offset ``base_offset`` into CSV rows.

    ``first_id`` is the ``record_id`` of the first record (the next ones count up from
    it), or None for rows without the id column (the join path adds ids later). Bad
    input raises :class:`InputError` naming ``url``, the byte offset and the record.
    """
    buf = as_array(data)
    n_max = count_records(buf) + 1
    out = np.empty(len(buf) + _ROW_OVERHEAD * n_max, dtype=np.uint8)
    row_starts = np.empty(n_max + 1, dtype=np.int64)
    names = np.empty(len(buf), dtype=np.uint8)
    name_starts = np.empty(n_max + 1, dtype=np.int64)
    headers = np.empty(n_max, dtype=np.int64)
    err = np.zeros(3, dtype=np.int64)
    n = _convert(
        buf, base_offset == 0, _SEQ_UPPER if uppercase else _SEQ_KEEP, _NAME_CLASS,
        first_id if first_id is not None else 0, first_id is not None,
        out, row_starts, names, name_starts, headers, err,
    )
    if err[0] != OK:
        raise _error(buf, base_offset, url, int(err[0]), int(err[1]), headers[int(err[2])] if err[0] != TEXT_BEFORE_HEADER else 0)
    end = int(row_starts[n])
    return Block(
        Rows(out[:end], row_starts[: n + 1]),
        names[: int(name_starts[n])],
        name_starts[: n + 1],
        headers[:n] + base_offset,
    )


_LEGAL = "only printable ASCII other than ',' '\"' and space is allowed in names and sequences"


def _error(buf: np.ndarray, base: int, url: str, code: int, at: int, header: int) -> InputError:
    where = f"byte {base + at}"
    if code == TEXT_BEFORE_HEADER:
        return InputError(url, where, "text before the first '>' header")
    if code == EMPTY_NAME:
        return InputError(url, where, "empty record id after '>'")
    line_end = at if code == BAD_NAME_BYTE else header
    while line_end < len(buf) and buf[line_end] != 10:
        line_end += 1
    token = bytes(buf[header + 1 : line_end]).split(None, 1)
    name = token[0].decode("latin-1") if token else ""
    byte = bytes(buf[at : at + 1])
    return InputError(
        url, f"{where}, record {name!r}", f"character {byte!r} would corrupt the CSV output ({_LEGAL})"
    )
