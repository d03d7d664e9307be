"""The FASTA kernel: one owned block of bytes in, CSV rows out, compiled and GIL-free.

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

One pass over the bytes validates, upper-cases and copies a record's sequence into a
scratch buffer, ``CHUNK_BYTES`` at a time in a branch-free loop that LLVM vectorises; a
chunk that holds a special byte (a line end, a trailing ``\r``, a bad byte) is kept up
to that byte, which is then dealt with on its own, so the first bad byte is found exactly
where a byte-by-byte walk finds it. A line as wide as the last whole line (FASTA files wrap
at one width) is first tried whole: chunks of a constant width, the last overlapping, and
its line end where the width says; if it holds any special byte the chunk walk redoes it.
The row is then written: id, name, the length (known now) and the sequence copied from the
scratch buffer. No Python object is made per record; the caller gets a few numpy arrays
back. Error messages are built apart, in Python (:func:`_error`), from the code, byte and
record the kernel reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .errors import InputError

# ---------------------------------------------------------------------------- tables

#: Byte classes of a name: 1 = legal, 2 = ends the name (whitespace), 0 = illegal.
_NAME_CLASS = np.zeros(256, dtype=np.uint8)
_NAME_CLASS[0x21:0x7F] = 1
_NAME_CLASS[[ord(","), ord('"')]] = 0
_NAME_CLASS[[ord(" "), ord("\t"), ord("\r"), 0x0B, 0x0C, ord("\n")]] = 2

#: Error codes the kernel reports (with the byte and the record index).
OK, TEXT_BEFORE_HEADER, EMPTY_NAME, BAD_NAME_BYTE, BAD_SEQUENCE_BYTE = 0, 1, 2, 3, 4
#: Not an error: the block holds more records than the room guessed for them.
FULL = 5

#: Input bytes per record the first attempt makes room for (a record of a 20-byte name
#: and 18 residues); a block of shorter records is counted, then parsed again. Counting
#: first cost 45 % of the parse (1,928 MB/s against 883 for the whole, synth member FASTA).
_GUESS_BYTES_PER_RECORD = 40

#: Bytes a row can take beyond its name and sequence: a 20-digit id, a 20-digit length,
#: 3 commas and \n.
_ROW_OVERHEAD = 48

#: Bytes validated, upper-cased and copied per step of the sequence loop. A fixed trip
#: count lets LLVM turn the step into a few vector instructions; a step that meets a line
#: end or a bad byte is then finished at that byte. 64 measured fastest for 80-column
#: FASTA (a line in two steps): 1,033 MB/s against 823 at 32; 60-column lines, one step
#: each that always meets the line end, 767 against 757 (benchmarks/results/kernel.md).
CHUNK_BYTES = 64


# ---------------------------------------------------------------------------- kernels


@njit(nogil=True, cache=True)
def count_records(buf: np.ndarray) -> int:
    """Records in an owned block: ``>`` at byte 0 or right after ``\\n``.

    Branch-free: each step adds ``(buf[i] == '\\n') & (buf[i + 1] == '>')`` over a fixed
    number of bytes, which LLVM vectorises (about memory speed; benchmarks/kernel.py).
    """
    n = len(buf)
    if n == 0:
        return 0
    count = 1 if buf[0] == 62 else 0
    i = 0
    step = 4096
    while i + step < n:
        part = 0
        for j in range(i, i + step):
            part += (buf[j] == 10) & (buf[j + 1] == 62)
        count += part
        i += step
    for j in range(i, n - 1):
        count += (buf[j] == 10) & (buf[j + 1] == 62)
    return count


@njit(nogil=True, cache=True, inline="always")
def _write_int(out, o, value):
    """Decimal digits of ``value`` (>= 0) at ``out[o:]``; returns the new end. Unsigned
    arithmetic: a division by 10 is then a multiply and a shift, with no sign fix-up."""
    v = np.uint64(value)
    ten = np.uint64(10)
    digits = 1
    bound = ten
    while v >= bound and digits < 20:
        digits += 1
        bound *= ten
    end = o + digits
    k = np.uint64(end - 1)
    for _ in range(digits):
        out[k] = np.uint8(np.uint64(48) + v % ten)
        v //= ten
        k -= np.uint64(1)
    return end


@intrinsic
def copy_bytes(typingctx, dst, dpos, src, spos, n):
    """``dst[dpos : dpos + n] = src[spos : spos + n]`` as one ``memcpy`` (uint8 arrays, no
    overlap, ``n >= 0``): numba's slice assignment builds two array views first, which at a
    few hundred bytes a copy costs more than the copy. Only contiguous uint8 arrays are
    typed (the addresses are byte offsets from the data pointer); anything else fails to
    compile."""
    for array in (dst, src):
        if not (isinstance(array, types.Array) and array.dtype == types.uint8 and array.layout == "C"
                and array.ndim == 1):
            return None
    sig = types.void(dst, types.intp, src, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        d = context.make_array(signature.args[0])(context, builder, args[0])
        s = context.make_array(signature.args[2])(context, builder, args[2])
        cgutils.raw_memcpy(builder, builder.gep(d.data, [args[1]]), builder.gep(s.data, [args[3]]), args[4], 1)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True, inline="always")
def _is_special(c):
    """Not a legal sequence byte: outside ``!``..``~``, or ``,`` or ``"`` (``\\n`` and
    ``\\r`` included, so that a clean chunk holds sequence bytes only)."""
    return (c < 33) | (c > 126) | (c == 44) | (c == 34)


# The helpers below index with unsigned integers: numba then emits no wraparound for a
# negative index, and LLVM sees plain consecutive loads it can vectorise.


@njit(nogil=True, cache=True, inline="always")
def _copy_chunk(buf, k, seq, s, width, delta):
    """``buf[k:k+width]`` into ``seq[s:]``, lower case minus ``delta`` (32 or 0); returns
    the offset of the first special byte (``width`` if none). The copy and a flag (any
    special byte, OR'd) have no branch inside: LLVM vectorises them; only in a chunk that
    holds a special byte is its offset found (:func:`_first_special`, branch-free too)."""
    if not _copy_clean(buf, k, seq, s, width, delta):
        return np.int64(width)
    return _first_special(buf, k, width)


@njit(nogil=True, cache=True, inline="always")
def _copy_clean(buf, k, seq, s, width, delta):
    """:func:`_copy_chunk`'s copy alone: whether ``buf[k:k+width]`` held a special byte."""
    ku = np.uint64(k)
    su = np.uint64(s)
    hit = False
    for i in range(np.uint64(width)):
        c = buf[ku + i]
        seq[su + i] = c - delta * ((c >= 97) & (c <= 122))
        hit |= _is_special(c)
    return hit


@njit(nogil=True, cache=True, inline="always")
def _copy_line(buf, k, seq, s, width, delta):
    """``buf[k:k+width]`` (``width >= 32``) copied as :func:`_copy_chunk` does, in chunks of
    a constant width, the last one overlapping the one before (it writes the same bytes);
    whether it held a special byte."""
    hit = False
    i = 0
    if width >= CHUNK_BYTES:
        while i + CHUNK_BYTES <= width:
            hit |= _copy_clean(buf, k + i, seq, s + i, CHUNK_BYTES, delta)
            i += CHUNK_BYTES
        if i < width:
            hit |= _copy_clean(buf, k + width - CHUNK_BYTES, seq, s + width - CHUNK_BYTES, CHUNK_BYTES, delta)
    else:
        while i + 32 <= width:
            hit |= _copy_clean(buf, k + i, seq, s + i, 32, delta)
            i += 32
        if i < width:
            hit |= _copy_clean(buf, k + width - 32, seq, s + width - 32, 32, delta)
    return hit


@njit(nogil=True, cache=True, inline="always")
def _first_special(buf, k, width):
    """Offset from ``k`` of the first special byte among ``width`` (``width`` if none;
    at most 255)."""
    ku = np.uint64(k)
    w = np.uint8(width)
    j = w
    for i in range(np.uint64(width)):
        j = min(j, np.uint8(i) if _is_special(buf[ku + i]) else w)
    return np.int64(j)


@njit(nogil=True, cache=True, inline="always")
def _first_newline(buf, k, width):
    """Offset from ``k`` of the first ``\n`` among ``width`` bytes (``width`` if none;
    at most 255)."""
    ku = np.uint64(k)
    w = np.uint8(width)
    j = w
    for i in range(np.uint64(width)):
        j = min(j, np.uint8(i) if buf[ku + i] == 10 else w)
    return np.int64(j)


@njit(nogil=True, cache=True, inline="always")
def _line_end(buf, e, n):
    """The first ``\n`` at or after ``e`` (``n`` if none), a chunk at a time."""
    while e + CHUNK_BYTES <= n:
        j = _first_newline(buf, e, CHUNK_BYTES)
        if j < CHUNK_BYTES:
            return e + j
        e += CHUNK_BYTES
    return e + _first_newline(buf, e, n - e)  # fewer than a chunk left


@njit(nogil=True, cache=True, inline="always")
def _copy(src, a, dst, d, length):
    """``src[a:a+length]`` to ``dst[d:]``."""
    au = np.uint64(a)
    du = np.uint64(d)
    for i in range(np.uint64(length)):
        dst[du + i] = src[au + i]


@njit(nogil=True, cache=True, inline="always")
def _holds(buf, k, width, value):
    """Whether ``value`` is among ``buf[k:k+width]`` (branch-free)."""
    ku = np.uint64(k)
    hit = False
    for i in range(np.uint64(width)):
        hit |= buf[ku + i] == value
    return hit


@njit(nogil=True, cache=True, inline="always")
def _next_record(buf, i, n):
    """The first ``>`` at or after ``i`` (``i >= 1``) that begins a line, or ``n``.
    ``>`` is rare outside headers: 64 bytes are tested at once, and only a step that
    holds one is walked."""
    while i + 64 <= n:
        if _holds(buf, i, 64, 62):
            for j in range(i, i + 64):
                if buf[j] == 62 and buf[j - 1] == 10:
                    return j
        i += 64
    for j in range(i, n):
        if buf[j] == 62 and buf[j - 1] == 10:
            return j
    return n


@njit(nogil=True, cache=True, inline="always")
def _line_bytes(buf, k, width):
    """How many of ``buf[k:k+width]`` are ``\n`` or ``\r`` (branch-free, vectorised)."""
    ku = np.uint64(k)
    total = 0
    for i in range(np.uint64(width)):
        c = buf[ku + i]
        total += (c == 10) | (c == 13)
    return total


@njit(nogil=True, cache=True)
def row_sizes(buf: np.ndarray) -> np.ndarray:
    """The bytes of each record's CSV row but its ``record_id``: ``,name,length,sequence\n``
    (``len(name) + digits(length) + length + 4``), for a legal owned block; one per record
    (``len`` of the result is :func:`count_records`). With the ids, which follow from the
    positions, the driver knows where every row lands in its shard before any row is written.

    The sequence length is the bytes after the header line less its ``\n`` and ``\r``
    bytes (in a legal body a ``\r`` ends a line or the file): what the kernel copies. Bad
    bytes are the kernel's to find; on a block that has them these sizes mean nothing. One
    pass: the name is walked, the header's line end and the next record are found a chunk
    at a time, and a body's line-end bytes are summed branch-free.
    """
    n = len(buf)
    sizes = np.empty(max(16, n // 256), dtype=np.int64)
    r = 0
    a = 0 if n > 0 and buf[0] == 62 else _next_record(buf, 1, n)
    while a < n:
        b = _next_record(buf, a + 1, n)
        q = a + 1
        while q < b:
            c = buf[q]
            if c == 32 or c == 9 or c == 13 or c == 11 or c == 12 or c == 10:
                break
            q += 1
        name = q - a - 1
        h = _line_end(buf, q, b)
        length = 0
        if h + 1 < b:  # a header line, then a body
            length = (b - h - 1) - _line_bytes(buf, h + 1, b - h - 1)
        digits = 1
        v = length
        while v >= 10:
            v //= 10
            digits += 1
        if r == len(sizes):
            grown = np.empty(2 * r, dtype=np.int64)
            grown[:r] = sizes
            sizes = grown
        sizes[r] = name + digits + length + 4
        r += 1
        a = b
    return sizes[:r].copy()


@njit(nogil=True, cache=True)
def _convert(buf, at_file_start, uppercase, name_class, first_id, with_ids, with_rows,
             out, seq, row_starts, names, name_starts, headers, err):
    """Parse ``buf`` and write its CSV rows (unless ``with_rows`` is false: then only the
    names, every byte checked all the same); returns the number of records.

    ``row_starts``/``name_starts`` get n+1 offsets into ``out``/``names``; ``headers``
    the offset of each record's ``>``. ``seq`` is scratch room for one record's
    sequence (as long as ``buf`` plus a chunk). On bad input ``err`` = (code, byte, record).
    """
    n_bytes = len(buf)
    delta = np.uint8(32 if uppercase else 0)
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
    wide = 0  # the width of the last whole line (FASTA files wrap at one width)
    eol = 1  # and the bytes of its line end (\n, or \r\n)
    row_starts[0] = 0
    name_starts[0] = 0
    while pos < n_bytes:
        if n == len(headers):  # no room for another record's offsets (the rows fit:
            err[0] = FULL      # their bytes are at most the input's plus the overhead)
            return n
        headers[n] = pos
        # the name: first token after '>'
        p = pos + 1
        q = p
        while q < n_bytes:  # legal name bytes are the legal sequence bytes
            if q + CHUNK_BYTES <= n_bytes:
                width = CHUNK_BYTES
                j = _first_special(buf, q, CHUNK_BYTES)
            else:
                width = n_bytes - q
                j = _first_special(buf, q, width)
            q += j
            if j < width:
                break
        if q < n_bytes and name_class[buf[q]] == 0:
            err[0] = BAD_NAME_BYTE
            err[1] = q
            err[2] = n
            return n
        if q == p:
            err[0] = EMPTY_NAME
            err[1] = pos
            err[2] = n
            return n
        # the rest of the header line is free text
        k = _line_end(buf, q, n_bytes) + 1
        # the sequence, line by line, into the scratch room: each chunk is copied
        # (upper-cased) whole; at a chunk that holds a special byte the copy is kept up
        # to that byte, which is then a line end, a trailing \r, or the first bad byte
        s = 0
        while k < n_bytes and buf[k] != 62:  # at a line start; '>' starts the next record
            # a line as wide as the last whole line: copied whole, if it holds no special
            # byte and its line end is where the width says (else the chunks below redo it)
            if (wide >= 32 and k + wide + eol <= n_bytes and buf[k + wide + eol - 1] == 10
                    and (eol == 1 or buf[k + wide] == 13)):
                if not _copy_line(buf, k, seq, s, wide, delta):
                    k += wide + eol
                    s += wide
                    continue
            line = k
            while True:
                if k + CHUNK_BYTES <= n_bytes:  # a constant trip count: fully vectorised
                    width = CHUNK_BYTES
                    j = _copy_chunk(buf, k, seq, s, CHUNK_BYTES, delta)
                else:
                    width = n_bytes - k
                    j = _copy_chunk(buf, k, seq, s, width, delta)
                k += j
                s += j
                if j == width:  # all sequence bytes
                    if k == n_bytes:
                        break
                    continue
                c = buf[k]
                if c == 10:
                    eol = 2 if k > line and buf[k - 1] == 13 else 1  # a \r before it was the line's
                    wide = k - line - (eol - 1)
                    k += 1
                    break
                if c == 13 and (k + 1 == n_bytes or buf[k + 1] == 10):
                    k += 1  # a line's one trailing \r
                    continue
                err[0] = BAD_SEQUENCE_BYTE
                err[1] = k
                err[2] = n
                return n
        end = min(k, n_bytes)
        _copy(buf, p, names, no, q - p)
        no += q - p
        if with_rows:  # the row: id, name, length (known now), sequence
            if with_ids:
                o = _write_int(out, o, first_id + n)
                out[o] = 44
                o += 1
            _copy(buf, p, out, o, q - p)
            o += q - p
            out[o] = 44
            o += 1
            o = _write_int(out, o, s)
            out[o] = 44
            o += 1
            _copy(seq, 0, out, o, s)
            o += s
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
        length = row_starts[i + 1] - row_starts[i]
        copy_bytes(gathered, t, out, row_starts[i], length)
        t += length
        starts[j + 1] = t
    return gathered[:t], starts


@njit(nogil=True, cache=True)
def _gather_records(src, starts, ends):
    total = 0
    for j in range(len(starts)):
        total += ends[j] - starts[j] + 1
    buf = np.empty(total, dtype=np.uint8)
    t = 0
    for j in range(len(starts)):
        length = ends[j] - starts[j]
        copy_bytes(buf, t, src, starts[j], length)
        t += length
        if length == 0 or src[ends[j] - 1] != 10:
            buf[t] = 10
            t += 1
    return buf[:t]


def gather_records(src: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Records ``src[starts[j]:ends[j]]`` (each from its ``>`` to the next record's) back to
    back in that order, one ``memcpy`` each: a block :func:`convert_block` parses into the
    rows it parses them into where they lie. A record the file ends without a ``\n`` gets
    one, so that the next record's ``>`` begins a line."""
    return _gather_records(src, np.ascontiguousarray(starts, dtype=np.int64), np.ascontiguousarray(ends, dtype=np.int64))


@njit(nogil=True, cache=True)
def _gather_sequences(dest, dest_at, src, src_at, lengths):
    for i in range(len(dest_at)):
        a, n = src_at[i], lengths[i]
        # a CSV row's sequence: after the row's third comma, up to its \n
        if a < 1 or a + n >= len(src) or src[a - 1] != 44 or src[a + n] != 10:
            return i
        copy_bytes(dest, dest_at[i], src, a, n)
    return -1


def gather_sequences(dest: np.ndarray, dest_at: np.ndarray, src: np.ndarray, src_at: np.ndarray,
                     lengths: np.ndarray) -> int:
    """Sequences ``src[src_at[j]:src_at[j] + lengths[j]]`` (of CSV rows in a shard's bytes)
    copied to ``dest[dest_at[j]:]``, one ``memcpy`` each. Each must sit where a row's sequence
    does (a ``,`` before it, its row's ``\n`` right after): the first that does not stops the
    copy, and its ``j`` is returned (-1 when all were copied)."""
    as_i64 = lambda a: np.ascontiguousarray(a, dtype=np.int64)  # noqa: E731
    return int(_gather_sequences(dest, as_i64(dest_at), src, as_i64(src_at), as_i64(lengths)))


@njit(nogil=True, cache=True)
def _row_columns(data, row_starts, with_sequences=True):
    """The names and the sequences of CSV rows ``id,name,length,sequence\n``, each back to
    back with n+1 offsets (Arrow's string layout); without ``with_sequences`` the sequences'
    offsets only (no byte of them copied). A name holds no comma and the id and the length
    are digits, so the fields are found by the first three commas of a row."""
    n = len(row_starts) - 1
    name_offsets = np.empty(n + 1, dtype=np.int64)
    seq_offsets = np.empty(n + 1, dtype=np.int64)
    name_offsets[0] = 0
    seq_offsets[0] = 0
    name_total = 0
    seq_total = 0
    fields = np.empty((n, 4), dtype=np.int64)  # name start, name end, sequence start, end
    for i in range(n):
        k = row_starts[i]
        while data[k] != 44:
            k += 1
        a = k + 1
        k = a
        while data[k] != 44:
            k += 1
        b = k
        k += 1
        while data[k] != 44:
            k += 1
        fields[i, 0] = a
        fields[i, 1] = b
        fields[i, 2] = k + 1
        fields[i, 3] = row_starts[i + 1] - 1  # before the row's \n
        name_total += b - a
        seq_total += row_starts[i + 1] - 1 - (k + 1)
        name_offsets[i + 1] = name_total
        seq_offsets[i + 1] = seq_total
    names = np.empty(name_total, dtype=np.uint8)
    seqs = np.empty(seq_total if with_sequences else 0, dtype=np.uint8)
    for i in range(n):
        copy_bytes(names, name_offsets[i], data, fields[i, 0], fields[i, 1] - fields[i, 0])
        if with_sequences:
            copy_bytes(seqs, seq_offsets[i], data, fields[i, 2], fields[i, 3] - fields[i, 2])
    return names, name_offsets, seqs, seq_offsets


# ---------------------------------------------------------------------------- Python side


@dataclass
class Rows:
    """CSV rows of consecutive records: row i is ``data[starts[i]:starts[i+1]]``."""

    data: np.ndarray
    starts: np.ndarray

    def __len__(self) -> int:
        return len(self.starts) - 1

    def columns(self):
        """``(names, sequences)`` of the rows as Arrow ``large_string`` arrays: the other
        layouts take the records from the rows in memory, never from a CSV read back."""
        import pyarrow as pa

        names, name_offsets, seqs, seq_offsets = _row_columns(self.data, self.starts)
        n = len(self)
        return (pa.LargeStringArray.from_buffers(n, pa.py_buffer(name_offsets), pa.py_buffer(names)),
                pa.LargeStringArray.from_buffers(n, pa.py_buffer(seq_offsets), pa.py_buffer(seqs)))

    def names_and_lengths(self):
        """``(names, sequence lengths)``: the names as :meth:`columns` gives them, and each
        row's sequence length (int64), with no byte of the sequences copied."""
        import pyarrow as pa

        names, name_offsets, _, seq_offsets = _row_columns(self.data, self.starts, False)
        return (pa.LargeStringArray.from_buffers(len(self), pa.py_buffer(name_offsets), pa.py_buffer(names)),
                np.diff(seq_offsets))

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


def convert_block(data, base_offset: int, url: str, *, uppercase: bool, first_id: int | None,
                  rows: bool = True) -> Block:
    """Parse an owned block starting at file offset ``base_offset`` into CSV rows.

    ``first_id`` is the ``record_id`` of the first record (the next ones count up from
    it), or None for rows without the id column (the join path adds ids later). With
    ``rows=False`` the block's rows are empty and only its names are kept (the hash join's
    index), with every check made as for the rows. Bad input raises :class:`InputError`
    naming ``url``, the byte offset and the record.
    """
    buf = as_array(data)
    n, arrays, err = _convert_into(buf, base_offset, uppercase, first_id, rows,
                                   len(buf) // _GUESS_BYTES_PER_RECORD + 16)
    if err[0] == FULL:
        n, arrays, err = _convert_into(buf, base_offset, uppercase, first_id, rows, count_records(buf) + 1)
    out, row_starts, names, name_starts, headers = arrays
    if err[0] != OK:
        raise _error(buf, base_offset, url, int(err[0]), int(err[1]), headers[int(err[2])] if err[0] != TEXT_BEFORE_HEADER else 0)
    end = int(row_starts[n])
    return Block(
        Rows(out[:end], row_starts[: n + 1]),
        names[: int(name_starts[n])],
        name_starts[: n + 1],
        headers[:n] + base_offset,
    )


def _convert_into(buf, base_offset, uppercase, first_id, rows, n_max):
    """:func:`_convert` with room for ``n_max`` records (``err[0]`` is FULL past them)."""
    out = np.empty(len(buf) + _ROW_OVERHEAD * n_max if rows else 0, dtype=np.uint8)
    seq = np.empty(len(buf) + CHUNK_BYTES, dtype=np.uint8)
    row_starts = np.empty(n_max + 1, dtype=np.int64)
    names = np.empty(len(buf), dtype=np.uint8)
    name_starts = np.empty(n_max + 1, dtype=np.int64)
    headers = np.empty(n_max, dtype=np.int64)
    err = np.zeros(3, dtype=np.int64)
    n = _convert(
        buf, base_offset == 0, uppercase, _NAME_CLASS,
        first_id if first_id is not None else 0, first_id is not None, rows,
        out, seq, row_starts, names, name_starts, headers, err,
    )
    return n, (out, row_starts, names, name_starts, headers), err


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
