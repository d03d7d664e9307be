"""FASTA parsing of one owned block of bytes, in bulk.

A block holds whole records (see :mod:`esm2dask.ranges`). The default engine, ``numpy``,
parses it without a Python loop over records: it finds line and header positions with
numpy, gathers names and sequence bytes with index arithmetic, and hands the results
to polars as Arrow string arrays. ``pyfastx`` (a C parser) and ``python`` (a plain
line parser) are kept as alternatives and as references in tests and benchmarks; all
three give identical :class:`Records` and the same errors.

Record rules (the BioNeMo layout, ``docs/esm2-layout.md``): the name is the first
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

_IS_SPACE = np.zeros(256, dtype=bool)
_IS_SPACE[list(_WHITESPACE)] = True

@dataclass
class Records:
    """Parsed records of one block, in file order."""

    names: pl.Series
    sequences: pl.Series
    #: File offset of each record's ``>`` (used only to place errors), or a function
    #: that computes them when first asked for.
    _offsets: object

    @property
    def offsets(self) -> np.ndarray:
        if callable(self._offsets):
            self._offsets = self._offsets()
        return self._offsets

    def __len__(self) -> int:
        return len(self.names)

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame({"record_name": self.names, "sequence": self.sequences})


def count_records(data: bytes) -> int:
    """Number of records in an owned block (records start at ``>`` after ``\\n``)."""
    if not data:
        return 0
    return data.count(b"\n>") + (1 if data[:1] == b">" else 0)


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


def _string_views(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, buffer_index: int) -> np.ndarray:
    """Arrow string-view structs (16 bytes each) for ``buf[starts[i]:starts[i]+lengths[i]]``.

    A view holds its length and either the bytes themselves (up to 12) or a 4-byte prefix,
    the data buffer's index and the offset: items point into the block, nothing is copied.
    """
    n = len(starts)
    views = np.zeros((n, 16), dtype=np.uint8)
    views[:, 0:4] = lengths.astype("<i4").view(np.uint8).reshape(n, 4)
    head = buf[np.minimum(starts[:, None] + np.arange(12), max(len(buf) - 1, 0))] if len(buf) else np.zeros((n, 12), np.uint8)
    short = lengths <= 12
    views[short, 4:16] = np.where(np.arange(12) < lengths[short, None], head[short], 0)
    long_ = ~short
    views[long_, 4:8] = head[long_, 0:4]
    views[long_, 8:12] = np.frombuffer(np.int32(buffer_index).astype("<i4").tobytes(), np.uint8)
    views[long_, 12:16] = starts[long_].astype("<i4").view(np.uint8).reshape(-1, 4)
    return views


def _view_series(views: np.ndarray, buffers: list[bytes]) -> pl.Series:
    arr = pa.Array.from_buffers(
        pa.string_view(), len(views), [None, pa.py_buffer(views.tobytes()), *map(pa.py_buffer, buffers)]
    )
    return pl.from_arrow(arr)


#: Bytes looked at after '>' for the end of the name before looking further.
_NAME_WINDOW = 24


def _name_ends(buf: np.ndarray, name_starts: np.ndarray, line_ends: np.ndarray) -> np.ndarray:
    """Position of the first whitespace (or the line end) at or after each name start."""
    ends = line_ends.copy()
    todo = np.arange(len(name_starts))
    offset = 0
    n = len(buf)
    while len(todo):
        pos = name_starts[todo, None] + offset + np.arange(_NAME_WINDOW)
        window = _IS_SPACE[buf[np.minimum(pos, n - 1)]] | (pos >= n)
        hit = window.any(axis=1)
        first = window.argmax(axis=1)
        found = todo[hit]
        ends[found] = np.minimum(name_starts[found] + offset + first[hit], line_ends[found])
        todo = todo[~hit]
        offset += _NAME_WINDOW
    return ends


def _parse_numpy(data: bytes, base: int, url: str, uppercase: bool) -> Records:
    """Bulk parse: one pass to drop newlines, index arithmetic, zero-copy string views.

    Anything unusual (CR line ends, non-ASCII bytes, a character that is not allowed)
    sends the block to the plain parser, which handles it or raises the exact error.
    """
    skip = _check_start(url, base, data) if base == 0 else 0
    if skip:
        data, base = data[skip:], base + skip
    if not data:
        return _empty()
    if len(data) >= 2**31 or b"\r" in data or not data.isascii():
        return _parse_python(data, base, url, uppercase)
    buf = np.frombuffer(data, dtype=np.uint8)
    n = len(buf)
    newlines = np.flatnonzero(buf == 10)
    line_starts = np.concatenate(([0], newlines + 1))
    line_starts = line_starts[line_starts < n]
    headers = line_starts[buf[line_starts] == ord(">")]
    k = np.searchsorted(newlines, headers)
    header_ends = np.where(k < len(newlines), newlines[np.minimum(k, len(newlines) - 1)], n) if len(newlines) else np.full(len(headers), n)
    name_ends = _name_ends(buf, headers + 1, header_ends)
    name_lens = name_ends - headers - 1
    if np.any(name_lens == 0):
        first = int(headers[np.flatnonzero(name_lens == 0)[0]])
        raise InputError(url, f"byte {base + first}", "empty record id after '>'")

    # Coordinates in the block without its newlines: x - (newlines before x).
    blob = data.replace(b"\n", b"")
    seq_starts = np.where(header_ends < n, header_ends - k, len(blob))
    next_headers = np.append(headers[1:], n)
    seq_ends = next_headers - np.searchsorted(newlines, next_headers)
    seq_lens = seq_ends - seq_starts
    name_starts = headers + 1 - k
    blob_np = np.frombuffer(blob, dtype=np.uint8)
    names = _view_series(_string_views(blob_np, name_starts, name_lens, 0), [blob])
    if uppercase:
        seq_buffers = [blob, blob.upper()]
        sequences = _view_series(_string_views(blob_np, seq_starts, seq_lens, 1), seq_buffers)
    else:
        sequences = _view_series(_string_views(blob_np, seq_starts, seq_lens, 0), [blob])
    if not _clean(names, sequences, data):
        _parse_python(data, base, url, uppercase)  # raises with the exact place
        raise InputError(url, f"byte {base}", "a character would corrupt the CSV output")
    return Records(names, sequences, headers.astype(np.int64) + base)


_BAD_PATTERN = r'[^!#-+\--~]'  # anything but printable ASCII less space, '"' and ','
#: Every byte but the control characters (and '\n'): deleting these leaves the controls.
_NOT_CONTROL = bytes(b for b in range(256) if not (b < 32 or b == 127) or b == 10)


def _clean(names: pl.Series, sequences: pl.Series, data: bytes) -> bool:
    """True when no name or sequence holds a byte the CSV cannot carry (ASCII input).

    Sequences are large, so they are searched for the three printable offenders with
    plain substring search; the full pattern runs only if the block has a control byte.
    """
    if names.str.contains(_BAD_PATTERN + "|^$").any():  # kseq reads '> x' as an empty id
        return False
    if data.translate(None, _NOT_CONTROL):
        return not sequences.str.contains(_BAD_PATTERN).any()
    return not any(sequences.str.contains(c, literal=True).any() for c in (" ", ",", '"'))


def _empty() -> Records:
    return Records(pl.Series([], dtype=pl.String), pl.Series([], dtype=pl.String), np.zeros(0, dtype=np.int64))


def _from_lists(names, seqs, offsets, url, data: bytes = b"", base: int = 0) -> Records:
    """Build Records from Python lists, applying the same checks as the numpy engine."""
    name_s = pl.Series(names, dtype=pl.String)
    seq_s = pl.Series(seqs, dtype=pl.String)
    offs = np.asarray(offsets, dtype=np.int64)
    for i, name in enumerate(names):
        if not name:
            raise InputError(url, f"byte {offs[i]}", "empty record id after '>'")
    for series in (name_s, seq_s):
        hits = series.str.contains(_BAD_PATTERN)
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


#: Where pyfastx's input is staged: memory-backed when the machine has /dev/shm.
_TMP_DIR = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def _parse_pyfastx(data: bytes, base: int, url: str, uppercase: bool) -> Records:
    """pyfastx's C parser (kseq), fed the block through a temporary file.

    Anything kseq might read differently from the contract (non-ASCII bytes, an empty id,
    a character the CSV cannot hold) goes to the plain parser, which handles it or raises
    the exact error.
    """
    import pyfastx

    skip = _check_start(url, base, data) if base == 0 else 0
    if skip:
        data, base = data[skip:], base + skip
    if not data:
        return _empty()
    if not data.isascii():
        return _parse_python(data, base, url, uppercase)
    fd, tmp = tempfile.mkstemp(suffix=".fa", dir=_TMP_DIR)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        pairs = list(pyfastx.Fastx(tmp, format="fasta", uppercase=uppercase))
    finally:
        os.unlink(tmp)
    frame = pl.DataFrame(pairs, schema={"n": pl.String, "s": pl.String}, orient="row")
    names, sequences = frame["n"], frame["s"]
    if not _clean(names, sequences, data):
        _parse_python(data, base, url, uppercase)  # raises with the exact place
        raise InputError(url, f"byte {base}", "a character would corrupt the CSV output")
    return Records(names, sequences, lambda: _record_offsets(data) + base)


def _record_offsets(data: bytes) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    starts = np.flatnonzero(buf[1:] == ord(">")) + 1
    starts = starts[buf[starts - 1] == 10]
    if len(buf) and buf[0] == ord(">"):
        starts = np.concatenate(([0], starts))
    return starts.astype(np.int64)
