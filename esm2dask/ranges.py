"""Byte ranges: plan them on the driver from file sizes, read them in the tasks.

The one boundary rule, shared by both neighbours of every cut: a range ``[start, stop)``
owns every record whose first byte lies inside it. A record starts at byte 0 or right
after a ``\\n``, and begins with the record's marker (``>`` for FASTA, anything for the
lines of a TSV). The reader of a range therefore starts at the first record start at or
after ``start`` and reads on, past ``stop`` if needed, up to the first record start at or
after ``stop``. Both sides of a cut compute that same position with
:func:`find_record_start`, so consecutive ranges tile the file exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

#: How much to read at a time while looking for the next record start.
SEEK_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``[start, stop)`` of one file; ``index`` is its position in the file's plan."""

    url: str
    start: int
    stop: int
    index: int
    file_size: int

    @property
    def length(self) -> int:
        return self.stop - self.start


def plan_ranges(url: str, file_size: int, partition_bytes: int) -> list[ByteRange]:
    """Cut ``[0, file_size)`` into consecutive ranges of at most ``partition_bytes``.

    >>> [(r.start, r.stop) for r in plan_ranges("f", 10, 4)]
    [(0, 4), (4, 8), (8, 10)]
    """
    if partition_bytes <= 0:
        raise ValueError("partition_bytes must be positive")
    starts = range(0, max(file_size, 1), partition_bytes)
    return [
        ByteRange(url, s, min(s + partition_bytes, file_size), i, file_size)
        for i, s in enumerate(starts)
    ]


def find_record_start(f, offset: int, file_size: int, marker: bytes = b">") -> int:
    """The first record start at or after ``offset`` (``file_size`` if there is none).

    ``f`` is an open binary file. A record start is a byte at position 0 or right after
    ``\\n`` whose bytes begin with ``marker``. The search begins at ``offset - 1`` so that
    a record starting exactly at ``offset`` is found.
    """
    if offset <= 0:
        # Byte 0 always starts the first range's reading; what lies there is checked
        # by the parser (text before the first marker is an error).
        return 0
    if offset >= file_size:
        return file_size
    pattern = b"\n" + marker
    pos = offset - 1
    f.seek(pos)
    carry = b""
    while True:
        chunk = f.read(SEEK_CHUNK_BYTES)
        if not chunk:
            return file_size
        window = carry + chunk
        hit = window.find(pattern)
        if hit >= 0:
            return pos - len(carry) + hit + 1
        keep = len(pattern) - 1
        carry = window[-keep:] if keep else b""
        pos += len(chunk)


def read_owned_bytes(f, byte_range: ByteRange, marker: bytes = b">") -> tuple[int, bytes]:
    """The bytes of every record ``byte_range`` owns, and the file offset they start at."""
    begin = find_record_start(f, byte_range.start, byte_range.file_size, marker)
    end = find_record_start(f, byte_range.stop, byte_range.file_size, marker)
    if end <= begin:
        return begin, b""
    f.seek(begin)
    data = f.read(end - begin)
    if len(data) != end - begin:
        raise OSError(
            f"{byte_range.url}: short read at byte {begin} "
            f"({len(data)} of {end - begin} bytes); was the file changed during the run?"
        )
    return begin, data
