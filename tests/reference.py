"""An independent, straightforward reference of the layout, for the tests.

It shares no code with esm2dask: whole files parsed with pyfastx (C, kseq) or a
plain line loop, dicts for the lookups, f-strings for the rows.
"""

from __future__ import annotations

import pyfastx


def read_fasta_pyfastx(path) -> list[tuple[str, str]]:
    return [(n, s) for n, s in pyfastx.Fastx(str(path), format="fasta", uppercase=False)]


def read_fasta_plain(path) -> list[tuple[str, str]]:
    records, name, parts = [], None, []
    with open(path, "rb") as f:
        for raw in f.read().split(b"\n"):
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if line.startswith(b">"):
                if name is not None:
                    records.append((name, "".join(parts)))
                name, parts = line[1:].split()[0].decode(), []
            elif line:
                parts.append(line.decode())
    if name is not None:
        records.append((name, "".join(parts)))
    return records


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


def expected_layout(raw, uf50, uf90, val, k=50, reader=read_fasta_pyfastx) -> dict[str, list[bytes]]:
    """Expected bytes of each shard, v1.10 semantics, test = val."""
    mapping = read_mapping(raw / "mapping.tsv")
    first50, first90 = {}, {}
    for n, s in reader(uf50):
        first50.setdefault(n, s)
    for n, s in reader(uf90):
        first90.setdefault(n, s)
    train = [
        f"{i + 1},{c},{len(first50[c])},{first50[c].upper()}\n" for i, (c, _) in enumerate(mapping)
    ]
    members = [m for _, ms in mapping for m in ms]
    uf90_rows = [f"{i + 1},{m},{len(first90[m])},{first90[m].upper()}\n" for i, m in enumerate(members)]
    val_rows = [f"{i + 1},{n},{len(s)},{s}\n" for i, (n, s) in enumerate(reader(val))]
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
