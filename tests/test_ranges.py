"""The byte-range boundary rule: ranges tile a file exactly, whatever the cuts."""

from __future__ import annotations

import io

import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esm2dask.kernel import as_array, convert_block, count_records
from esm2dask.ranges import ByteRange, find_record_start, plan_ranges, read_owned_bytes

names = st.text(alphabet="ABCXYZ_019>", min_size=1, max_size=8).filter(lambda s: not s.startswith(">"))
seqs = st.text(alphabet="ACDEFGHIKLMNPQRSTVWYacgt", min_size=0, max_size=50)
records = st.lists(st.tuples(names, seqs, st.sampled_from(["", " desc", " a>b >c"])), min_size=1, max_size=30)


def render(recs, width: int, crlf: bool) -> bytes:
    nl = "\r\n" if crlf else "\n"
    out = []
    for name, seq, comment in recs:
        out.append(f">{name}{comment}{nl}")
        for i in range(0, len(seq), width):
            out.append(seq[i : i + width] + nl)
    return "".join(out).encode()


def parse_ranges(data: bytes, cuts: list[int]):
    f = io.BytesIO(data)
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(data))), len(data)]
    names, seqs = [], []
    for i in range(len(bounds) - 1):
        r = ByteRange("mem.fa", bounds[i], bounds[i + 1], i, len(data))
        base, block = read_owned_bytes(f, r)
        names_, seqs_ = _names_and_sequences(convert_block(block, base, "mem.fa", uppercase=False, first_id=None))
        names += names_
        seqs += seqs_
    return names, seqs


def _names_and_sequences(block):
    rows = bytes(block.rows.data).decode().splitlines()
    return [r.split(",")[0] for r in rows], [r.split(",")[2] for r in rows]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records, st.integers(1, 12), st.booleans(), st.lists(st.integers(0, 4000), max_size=12))
def test_ranges_tile_the_file(recs, width, crlf, cuts):
    data = render(recs, width, crlf)
    whole = _names_and_sequences(convert_block(data, 0, "mem.fa", uppercase=False, first_id=None))
    assert parse_ranges(data, cuts) == whole
    assert whole == ([n for n, _, _ in recs], [s for _, s, _ in recs])


@settings(max_examples=60, deadline=None)
@given(records, st.booleans())
def test_cuts_on_around_every_record_start(recs, crlf):
    """Cuts exactly on a '>', one byte before it and one after."""
    data = render(recs, 5, crlf)
    starts = [i for i in range(len(data)) if data[i : i + 1] == b">" and (i == 0 or data[i - 1 : i] == b"\n")]
    want = _names_and_sequences(convert_block(data, 0, "mem.fa", uppercase=False, first_id=None))
    for delta in (-1, 0, 1):
        cuts = [s + delta for s in starts]
        assert parse_ranges(data, cuts) == want


def test_each_record_owned_once_with_many_tiny_ranges():
    data = render([("a", "ACGT" * 30, " x>y"), ("b", "", ""), ("c", "M", "")], 7, False)
    f = io.BytesIO(data)
    total = 0
    for r in plan_ranges("mem.fa", len(data), 3):
        _, block = read_owned_bytes(f, r)
        total += count_records(as_array(block))
    assert total == 3


def test_find_record_start_ignores_gt_inside_lines():
    data = b">a x>y\nAC>GT\n>b\nA\n"
    f = io.BytesIO(data)
    assert find_record_start(f, 1, len(data)) == data.index(b">b")
    assert find_record_start(f, data.index(b">b"), len(data)) == data.index(b">b")
    assert find_record_start(f, data.index(b">b") + 1, len(data)) == len(data)


def test_plan_ranges_covers_the_file():
    plan = plan_ranges("f", 1000, 64)
    assert plan[0].start == 0 and plan[-1].stop == 1000
    assert all(a.stop == b.start for a, b in zip(plan, plan[1:]))


def test_arrow_slices_read_the_same_locally_and_from_a_remote_store(tmp_path):
    """Remote slices read only the record batches they need; the rows must be the same."""
    import numpy as np
    import polars as pl

    from esm2dask import storage, tasks

    n = 3 * storage.ARROW_BATCH_ROWS + 123
    frame = pl.DataFrame({"id": [f"id{i}" for i in range(n)], "pos": np.arange(n)})
    local, remote = str(tmp_path / "f.arrow"), "memory://esm2dask-test/f.arrow"
    tasks._write_ipc(local, frame, {})
    tasks._write_ipc(remote, frame, {})
    edges = [0, 1, storage.ARROW_BATCH_ROWS - 1, storage.ARROW_BATCH_ROWS, 2 * storage.ARROW_BATCH_ROWS + 5, n]
    for lo in edges:
        for hi in edges:
            if hi <= lo:
                continue
            want = frame.slice(lo, hi - lo)
            for url in (local, remote):
                got = tasks.read_slices([tasks.Slice(url, lo, hi)], {})
                assert got.equals(want), (url, lo, hi)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(records, st.integers(1, 70), st.booleans(), st.integers(1, 300))
def test_the_count_task_maps_a_local_file_and_counts_what_each_range_owns(tmp_path, recs, width, crlf, partition):
    """``count_fasta`` maps a local file: range by range, its counts are the records the
    kernel parses from the same range read into memory, and they sum to the file's."""
    from esm2dask.tasks import count_fasta, range_digest

    data = render(recs, width, crlf)
    path = tmp_path / "f.fa"
    path.write_bytes(data)
    counts = []
    with open(path, "rb") as f:
        for r in plan_ranges(str(path), len(data), partition):
            _, block = read_owned_bytes(f, r)
            receipt = count_fasta(r, {})
            counts.append(receipt.n_records)
            assert receipt.digest == "xxh3-128:" + xxhash.xxh3_128(block).hexdigest()  # the bytes it counted
            assert range_digest(r, {}, b">") == receipt.digest  # what --resume compares
            assert counts[-1] == len(convert_block(block, 0, "f.fa", uppercase=False, first_id=None))
    assert sum(counts) == len(recs)


def test_the_count_task_refuses_a_file_that_shrank(tmp_path):
    import pytest

    from esm2dask.tasks import count_fasta

    path = tmp_path / "f.fa"
    path.write_bytes(b">a\nAC\n>b\nGG\n")
    byte_range = ByteRange(str(path), 0, 12, 0, 12)
    assert count_fasta(byte_range, {}).n_records == 2
    path.write_bytes(b">a\nAC\n")
    with pytest.raises(OSError, match="short read at byte 0"):
        count_fasta(byte_range, {})
