"""The tests' oracle: the layout's record rules written out plainly in Python.

It shares nothing with esm2dask (no numpy, numba, polars or pyfastx): bytes split into
lines, dicts for the lookups, f-strings for the rows. Slow and obvious on purpose.
"""

from __future__ import annotations

#: Bytes allowed in a record name or a sequence line: printable ASCII but , " and space.
LEGAL = frozenset(range(0x21, 0x7F)) - {ord(","), ord('"')}
_LEGAL_BYTES = bytes(sorted(LEGAL))
#: Bytes that end a name (besides the end of the line).
NAME_END = frozenset(b" \t\r\x0b\x0c")


class OracleError(Exception):
    """Bad input: ``kind`` is 'text', 'empty' or 'char'; ``offset`` the byte."""

    def __init__(self, kind: str, offset: int):
        super().__init__(kind, offset)
        self.kind = kind
        self.offset = offset


def parse_fasta_bytes(data: bytes, uppercase: bool = False, at_file_start: bool = True) -> list[tuple[str, str]]:
    """``(name, sequence)`` of every record; raises OracleError at the first bad byte."""
    pos = 0
    if at_file_start:
        while pos < len(data) and data[pos] in b" \t\r\x0b\x0c\n":
            pos += 1
        if pos < len(data) and (data[pos] != ord(">") or (pos > 0 and data[pos - 1] != ord("\n"))):
            raise OracleError("text", pos)
    records: list[tuple[str, list[str]]] = []
    offset = pos
    for line in data[pos:].split(b"\n"):
        if line.startswith(b">"):
            i = 1
            while i < len(line) and line[i] not in NAME_END:
                if line[i] not in LEGAL:
                    raise OracleError("char", offset + i)
                i += 1
            if i == 1:
                raise OracleError("empty", offset)
            records.append((line[1:i].decode("ascii"), []))
        else:
            body = line[:-1] if line.endswith(b"\r") else line
            illegal = set(body.translate(None, _LEGAL_BYTES))  # what is left is illegal
            if illegal:
                raise OracleError("char", offset + min(body.find(bytes([b])) for b in illegal))
            if body:
                text = body.decode("ascii")
                records[-1][1].append(text.upper() if uppercase else text)
        offset += len(line) + 1
    return [(name, "".join(parts)) for name, parts in records]


def csv_rows(records, first_id: int = 1) -> bytes:
    return "".join(f"{first_id + i},{n},{len(s)},{s}\n" for i, (n, s) in enumerate(records)).encode()


def read_fasta_plain(path) -> list[tuple[str, str]]:
    with open(path, "rb") as f:
        return parse_fasta_bytes(f.read())


def read_mapping(path) -> list[tuple[str, list[str]]]:
    with open(path) as f:
        lines = f.read().splitlines()[1:]
    return [(c, m.split(",")) for c, m, *_ in (line.split("\t") for line in lines)]


def shards(rows: list[str], k: int) -> list[bytes]:
    n = len(rows)
    q, r = divmod(n, k)
    out, pos = [], 0
    for i in range(k):
        size = q + (1 if i < r else 0)
        body = "".join(rows[pos : pos + size])
        out.append(("record_id,record_name,sequence_length,sequence\n" + body).encode())
        pos += size
    return out


def expected_layout(raw, uf50, uf90, val, k=50) -> dict[str, list[bytes]]:
    """Expected bytes of each shard, v1.10 semantics, test = val."""
    mapping = read_mapping(raw / "mapping.tsv")
    first50, first90 = {}, {}
    for n, s in read_fasta_plain(uf50):
        first50.setdefault(n, s)
    for n, s in read_fasta_plain(uf90):
        first90.setdefault(n, s)
    train = [
        f"{i + 1},{c},{len(first50[c])},{first50[c].upper()}\n" for i, (c, _) in enumerate(mapping)
    ]
    members = [m for _, ms in mapping for m in ms]
    uf90_rows = [f"{i + 1},{m},{len(first90[m])},{first90[m].upper()}\n" for i, m in enumerate(members)]
    val_rows = [f"{i + 1},{n},{len(s)},{s}\n" for i, (n, s) in enumerate(read_fasta_plain(val))]
    counts, starts, total = [], [], 0
    for _, ms in mapping:
        counts.append(len(ms))
        starts.append(total)
        total += len(ms)
    return {
        "uf50/train": shards(train, k),
        "uf50/val": shards(val_rows, k),
        "uf50/test": shards(val_rows, k),
        "uf90/uf90_csvs": shards(uf90_rows, k),
        "counts": b"".join(c.to_bytes(8, "little") for c in counts),
        "starts": b"".join(s.to_bytes(8, "little") for s in starts),
    }
