"""FASTA parsing of one owned block of bytes, in bulk.

A block holds whole records (see :mod:`esm2dask.ranges`). The default engine, ``numpy``,
parses it without a Python loop over records: it finds line and header positions with
numpy, gathers names and sequence bytes with index arithmetic, and hands the results
to polars as Arrow string arrays. ``pyfastx`` (a C parser) and ``python`` (a plain
line parser) are kept as alternatives and as references in tests and benchmarks; all
three give identical :class:`Records` and the same errors.

Record rules (the BioNeMo layout, ``shared/spec/esm2-layout.md``): the name is the first
whitespace-delimited token after ``>``; the sequence is the record's lines joined, one
trailing ``\\r`` stripped from each line, blank lines skipped. Bytes that would corrupt an
unquoted CSV (``,``, ``"``, whitespace, control characters) and non-ASCII bytes are errors.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from .errors import InputError

ENGINES = ("numpy", "pyfastx", "python")

_WHITESPACE = b" \t\n\r\x0b\x0c"

# Bytes allowed in a sequence or a name: printable ASCII except , " and space.
_BAD = np.ones(256, dtype=bool)
_BAD[33:127] = False
_BAD[ord(",")] = True
_BAD[ord('"')] = True

_IS_SPACE = np.zeros(256, dtype=bool)
_IS_SPACE[list(_WHITESPACE)] = True

_UPPER = np.arange(256, dtype=np.uint8)
_UPPER[ord("a") : ord("z") + 1] -= 32


@dataclass
class Records:
    """Parsed records of one block, in file order."""

    names: pl.Series
    sequences: pl.Series
    #: File offset of each record's ``>``; used only to place errors.
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame({"record_name": self.names, "sequence": self.sequences})


def count_records(data: bytes) -> int:
    """Number of records in an owned block (records start at ``>`` after ``\\n``)."""
    if not data:
        return 0
    return data.count(b"\n>") + (1 if data[:1] == b">" else 0)


def _strings(data: np.ndarray, lengths: np.ndarray) -> pl.Series:
    """A polars String series from concatenated bytes and per-item lengths (zero-copy)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    arr = pa.LargeStringArray.from_buffers(
        len(lengths), pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(data))
    )
    return pl.from_arrow(arr)


def _gather(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate ``buf[starts[i]:starts[i]+lengths[i]]`` for all i, without a loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.uint8)
    seg_begin = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=seg_begin[1:])
    index = np.repeat(starts - seg_begin, lengths) + np.arange(total, dtype=np.int64)
    return buf[index]


def _raise_bad_byte(url, base, names, rec_offsets, offset, what):
    byte = int(what)
    rec = int(np.searchsorted(rec_offsets, offset, side="right")) - 1
    name = names[rec] if 0 <= rec < len(names) else "?"
    shown = repr(bytes([byte]))
    raise InputError(
        url,
        f"byte {base + offset}, record {name!r}",
        f"character {shown} would corrupt the CSV output (only printable ASCII other than "
        f"',' '\"' and space is allowed in names and sequences)",
    )


def _check_start(url: str, base: int, data: bytes) -> int:
    """Skip blank lines before the first record; anything else there is an error."""
    first = data.find(b">")
    if first == 0:
        return 0
    head = data[: first if first >= 0 else len(data)]
    if head.strip(_WHITESPACE):
        bad = len(head) - len(head.lstrip(_WHITESPACE))
        raise InputError(url, f"byte {base + bad}", "text before the first '>' header")
    if first > 0 and data[first - 1 : first] != b"\n":
        raise InputError(url, f"byte {base}", "text before the first '>' header")
    return first if first >= 0 else len(data)


def parse_block(
    data: bytes, base_offset: int, url: str, *, uppercase: bool, engine: str = "numpy"
) -> Records:
    """Parse an owned block (``data`` starts at file offset ``base_offset``)."""
    if engine == "numpy":
        return _parse_numpy(data, base_offset, url, uppercase)
    if engine == "pyfastx":
        return _parse_pyfastx(data, base_offset, url, uppercase)
    if engine == "python":
        return _parse_python(data, base_offset, url, uppercase)
    raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


def _parse_numpy(data: bytes, base: int, url: str, uppercase: bool) -> Records:
    skip = _check_start(url, base, data) if base == 0 else 0
    buf = np.frombuffer(data, dtype=np.uint8)[skip:]
    base += skip
    n = len(buf)
    if n == 0:
        return _empty()
    newlines = np.flatnonzero(buf == 10)
    line_starts = np.concatenate(([0], newlines + 1))
    line_ends = np.concatenate((newlines, [n]))
    keep_line = line_starts < n
    line_starts, line_ends = line_starts[keep_line], line_ends[keep_line]
    is_header = buf[line_starts] == ord(">")
    hdr_starts = line_starts[is_header]
    hdr_ends = line_ends[is_header]

    # Name: from after '>' up to the first whitespace (a newline ends it at the latest).
    spaces = np.flatnonzero(_IS_SPACE[buf])
    spaces = np.concatenate((spaces, [n]))
    name_ends = spaces[np.searchsorted(spaces, hdr_starts + 1)]
    name_ends = np.minimum(name_ends, hdr_ends)
    name_lens = name_ends - (hdr_starts + 1)
    name_bytes = _gather(buf, hdr_starts + 1, name_lens)

    # Sequence: the bytes between a header line's end and the next header, less each
    # line's '\n' and one '\r' right before it (or before the end of the block).
    seq_begin = np.minimum(hdr_ends + 1, n)
    seq_end = np.concatenate((hdr_starts[1:], [n]))
    drop = np.zeros(n, dtype=bool)
    drop[newlines] = True
    cr = newlines[newlines > 0] - 1
    cr = cr[buf[cr] == 13]
    drop[cr] = True
    if buf[-1] == 13:
        drop[n - 1] = True
        cr = np.concatenate((cr, [n - 1]))
    header_bytes = np.zeros(n + 1, dtype=np.int8)
    np.add.at(header_bytes, hdr_starts, 1)
    np.add.at(header_bytes, np.minimum(hdr_ends + 1, n), -1)
    in_header = np.cumsum(header_bytes[:n], dtype=np.int8).astype(bool)
    keep = ~(drop | in_header)
    seq_bytes = buf[keep]
    dropped_nl = np.searchsorted(newlines, seq_end) - np.searchsorted(newlines, seq_begin)
    dropped_cr = np.searchsorted(cr, seq_end) - np.searchsorted(cr, seq_begin)
    seq_lens = (seq_end - seq_begin) - dropped_nl - dropped_cr

    offsets = hdr_starts.astype(np.int64)
    empty = np.flatnonzero(name_lens == 0)
    if len(empty):
        raise InputError(url, f"byte {base + int(offsets[empty[0]])}", "empty record id after '>'")
    bad_name = np.flatnonzero(_BAD[name_bytes])
    if len(bad_name):
        names = _strings_safe(name_bytes, name_lens)
        pos = _position_in(hdr_starts + 1, name_lens, int(bad_name[0]))
        _raise_bad_byte(url, base, names, offsets, pos, name_bytes[bad_name[0]])
    bad_seq = np.flatnonzero(_BAD[seq_bytes])
    if len(bad_seq):
        names = _strings_safe(name_bytes, name_lens)
        pos = int(np.flatnonzero(keep)[bad_seq[0]])
        _raise_bad_byte(url, base, names, offsets, pos, seq_bytes[bad_seq[0]])
    if uppercase:
        seq_bytes = _UPPER[seq_bytes]
    return Records(
        names=_strings(name_bytes, name_lens),
        sequences=_strings(seq_bytes, seq_lens),
        offsets=offsets + base,
    )


def _position_in(starts: np.ndarray, lengths: np.ndarray, flat_index: int) -> int:
    """Block position of item ``flat_index`` of the concatenation of ``starts/lengths``."""
    ends = np.cumsum(lengths)
    item = int(np.searchsorted(ends, flat_index, side="right"))
    before = int(ends[item - 1]) if item else 0
    return int(starts[item]) + flat_index - before


def _strings_safe(data: np.ndarray, lengths: np.ndarray) -> list[str]:
    raw = data.tobytes()
    out, pos = [], 0
    for length in lengths.tolist():
        out.append(raw[pos : pos + length].decode("latin-1"))
        pos += length
    return out


def _empty() -> Records:
    return Records(
        names=pl.Series([], dtype=pl.String),
        sequences=pl.Series([], dtype=pl.String),
        offsets=np.zeros(0, dtype=np.int64),
    )


def _from_lists(names, seqs, offsets, url, data: bytes = b"", base: int = 0) -> Records:
    """Build Records from Python lists, applying the same checks as the numpy engine."""
    name_s = pl.Series(names, dtype=pl.String)
    seq_s = pl.Series(seqs, dtype=pl.String)
    offs = np.asarray(offsets, dtype=np.int64)
    for i, name in enumerate(names):
        if not name:
            raise InputError(url, f"byte {offs[i]}", "empty record id after '>'")
    bad = r'[^!#-+\--~]'  # printable ASCII minus space, '"' and ','
    for series in (name_s, seq_s):
        hits = series.str.contains(bad)
        if hits.any():
            i = int(hits.arg_true()[0])
            text = series[i]
            ch = next(c for c in text if not ("!" <= c <= "~") or c in ',"')
            at = int(offs[i])
            if data:
                # the exact byte: the first such character after the '>' of that record
                start = at - base + (1 if series is name_s else data.find(b"\n", at - base) + 1 - (at - base))
                at = base + data.find(ch.encode("latin-1"), start)
            raise InputError(
                url,
                f"byte {at}, record {names[i]!r}",
                f"character {ch.encode('latin-1', 'replace')!r} would corrupt the CSV output "
                f"(only printable ASCII other than ',' '\"' and space is allowed in names "
                f"and sequences)",
            )
    return Records(name_s, seq_s, offs)


def _parse_python(data: bytes, base: int, url: str, uppercase: bool) -> Records:
    """A plain line-by-line parser: slow, simple, the reference the others are held to."""
    skip = _check_start(url, base, data) if base == 0 else 0
    names, seqs, offsets = [], [], []
    parts: list[bytes] = []
    pos = skip
    for line in data[skip:].split(b"\n"):
        if line.startswith(b">"):
            if names:
                seqs.append(b"".join(parts))
            parts = []
            token = line[1:].split(None, 1)
            first = line[1:2]
            name = token[0] if token and first not in _WHITESPACE_SET else b""
            names.append(name)
            offsets.append(base + pos)
        else:
            if line.endswith(b"\r"):
                line = line[:-1]
            if line:
                parts.append(line)
        pos += len(line) + 1
    if names:
        seqs.append(b"".join(parts))
    if uppercase:
        seqs = [s.upper() for s in seqs]
    return _from_lists(
        [n.decode("latin-1") for n in names], [s.decode("latin-1") for s in seqs], offsets, url,
        data, base,
    )


_WHITESPACE_SET = {bytes([b]) for b in _WHITESPACE}


def _parse_pyfastx(data: bytes, base: int, url: str, uppercase: bool) -> Records:
    """pyfastx's C parser (kseq) over the block, written to a temporary file first."""
    import pyfastx

    skip = _check_start(url, base, data) if base == 0 else 0
    data = data[skip:]
    if not data:
        return _empty()
    offsets = _record_offsets(data) + base + skip
    fd, tmp = tempfile.mkstemp(suffix=".fa")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        names, seqs = [], []
        for name, seq in pyfastx.Fastx(tmp, format="fasta", uppercase=uppercase):
            names.append(name)
            seqs.append(seq)
    finally:
        os.unlink(tmp)
    if len(names) != len(offsets):
        # kseq merges a record with an empty id into the previous one; find it.
        raise InputError(url, f"byte {offsets[0]}", "malformed record (empty id?)")
    return _from_lists(names, seqs, offsets, url, data, base + skip)


def _record_offsets(data: bytes) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    starts = np.flatnonzero(buf[1:] == ord(">")) + 1
    starts = starts[buf[starts - 1] == 10]
    if len(buf) and buf[0] == ord(">"):
        starts = np.concatenate(([0], starts))
    return starts.astype(np.int64)
