"""``mapping.tsv``: one header line, then ``<cluster id>\\t<member>,<member>,…`` per cluster.

Each task parses the lines its byte range owns (see :mod:`esm2dask.ranges`, with every
line start a record start) into two frames, in file order: the clusters with their
member counts, and the flattened member ids.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import polars as pl

from .errors import InputError

# printable ASCII except space, '"' and ','
ID_PATTERN_BAD = r'[^!#-+\--~]'


@dataclass
class MappingBlock:
    clusters: pl.DataFrame  # columns: id (str), count (u64)
    members: pl.DataFrame  # column: id (str)


def line_number(f, offset: int) -> int:
    """1-based line number of the line starting at ``offset`` (counts newlines before it)."""
    f.seek(0)
    remaining, newlines = offset, 0
    while remaining > 0:
        chunk = f.read(min(remaining, 16 * 1024 * 1024))
        if not chunk:
            break
        newlines += chunk.count(b"\n")
        remaining -= len(chunk)
    return newlines + 1


def first_invalid_utf8(data: bytes) -> int | None:
    """Offset of the first byte that is not valid UTF-8, or None (ASCII data: one pass).

    >>> first_invalid_utf8(b"ok\\tA\\n"), first_invalid_utf8(b"ab\\xffc"), first_invalid_utf8("é".encode())
    (None, 2, None)
    """
    if data.isascii():
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start
    return None


def describe_bad_char(text: str) -> str:
    """The first character of ``text`` an id may not hold, in words.

    >>> describe_bad_char("P\u00e9p"), describe_bad_char("a b"), describe_bad_char('a"')
    ('a non-ASCII byte 0xc3 (UTF-8 of \'é\')', 'a space', "a '\"'")
    """
    for ch in text:
        if ch == " ":
            return "a space"
        if ch == "\t":
            return "a tab"
        if ord(ch) > 0x7E:
            return f"a non-ASCII byte 0x{ch.encode('utf-8')[0]:02x} (UTF-8 of {ch!r})"
        if ord(ch) < 0x21:
            return f"the control byte 0x{ord(ch):02x}"
        if ch in ',"':
            return f"a {ch!r}"
    return "an illegal character"


def _row_offset(data: bytes, row: int) -> int:
    """Offset within ``data`` of the ``row``-th line (0-based)."""
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    return 0 if row == 0 else int(newlines[row - 1]) + 1


def parse_mapping_block(data: bytes, base_offset: int, url: str, locate) -> MappingBlock:
    """Parse the mapping lines in ``data`` (which starts at file offset ``base_offset``).

    The header line at byte 0 is skipped. ``locate(offset)`` turns a byte offset into a
    human place string for error messages (it may read the file to count lines).
    """
    if base_offset == 0:
        cut = data.find(b"\n")
        skipped = len(data) if cut < 0 else cut + 1
        data = data[skipped:]
        base_offset += skipped
    if not data.strip():
        if data.strip(b"\n"):
            raise InputError(url, locate(base_offset), "malformed mapping line (blank)")
        return MappingBlock(
            pl.DataFrame(schema={"id": pl.String, "count": pl.UInt64}),
            pl.DataFrame(schema={"id": pl.String}),
        )
    if b"\x01" in data:
        at = data.index(b"\x01")
        raise InputError(url, locate(base_offset + at), "control character in mapping line")
    at = first_invalid_utf8(data)
    if at is not None:
        raise InputError(
            url, locate(base_offset + at),
            f"byte 0x{data[at]:02x} is not valid UTF-8 (mapping ids are ASCII); is this the right file?",
        )

    def fail(row: int, message: str):
        raise InputError(url, locate(base_offset + _row_offset(data, row)), message)

    lines = pl.read_csv(
        io.BytesIO(data),
        has_header=False,
        separator="\x01",
        quote_char=None,
        schema={"line": pl.String},
    )["line"]
    blank = lines.is_null()
    if blank.any():
        fail(int(blank.arg_true()[0]), "malformed mapping line (blank)")
    fields = lines.str.split("\t")
    n_fields = fields.list.len()
    short = n_fields < 2
    if short.any():
        fail(
            int(short.arg_true()[0]),
            "malformed mapping line: expected '<cluster id>\\t<member>,<member>,…'",
        )
    cluster = fields.list.get(0).str.strip_suffix("\r").alias("id")
    members_text = fields.list.get(1).str.strip_suffix("\r")
    for name, col in (("cluster id", cluster), ("member list", members_text)):
        empty = col.str.len_bytes() == 0
        if empty.any():
            fail(int(empty.arg_true()[0]), f"malformed mapping line: empty {name}")
    bad = cluster.str.contains(ID_PATTERN_BAD)
    if bad.any():
        row = int(bad.arg_true()[0])
        fail(row, f"malformed mapping line: cluster id {cluster[row]!r} holds {describe_bad_char(cluster[row])} "
                  f"(ids are printable ASCII without space, ',' or '\"')")
    member_lists = members_text.str.split(",")
    member_ids = member_lists.explode().alias("id")
    bad = (member_ids.str.len_bytes() == 0) | member_ids.str.contains(ID_PATTERN_BAD)
    if bad.any():
        row_of_member = np.repeat(
            np.arange(len(member_lists)), member_lists.list.len().to_numpy()
        )
        member = member_ids[int(bad.arg_true()[0])]
        what = f"member id {member!r} holds {describe_bad_char(member)}" if member else "an empty member id"
        fail(
            int(row_of_member[int(bad.arg_true()[0])]),
            f"malformed mapping line: {what} (ids are printable ASCII without space or '\"'; members are "
            f"separated by ',' with no spaces)",
        )
    counts = member_lists.list.len().cast(pl.UInt64).alias("count")
    return MappingBlock(pl.DataFrame([cluster, counts]), pl.DataFrame([member_ids]))
