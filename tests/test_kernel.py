"""The FASTA kernel against the plain-Python oracle of tests/reference.py.

Records are drawn from the whole legal input space (every legal byte, lines starting with
``+ @ ; # ! 0``, ``>`` inside lines, lower case, empty and very long sequences, any wrap
width, CRLF, blank lines, free-text descriptions with any byte, no final newline) and cut
into byte ranges of every size down to a few bytes: the rows must be the oracle's, byte
for byte. Illegal bytes must give the exact error at the exact byte.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from esm2dask.errors import InputError
from esm2dask.kernel import as_array, convert_block, count_records
from esm2dask.ranges import ByteRange, read_owned_bytes
from reference import LEGAL, OracleError, csv_rows, parse_fasta_bytes

LEGAL_BYTES = bytes(sorted(LEGAL))
#: Bytes that can never be in a name or a sequence line.
ILLEGAL_BYTES = bytes(b for b in range(256) if b not in LEGAL and b != ord("\n"))

legal_text = st.binary(min_size=0, max_size=20).map(
    lambda raw: bytes(LEGAL_BYTES[b % len(LEGAL_BYTES)] for b in raw)
)
names = legal_text.filter(bool)
descriptions = st.one_of(
    st.just(b""),
    st.tuples(st.sampled_from([b" ", b"\t", b"\x0b", b"\x0c"]), st.binary(max_size=30)).map(
        lambda t: t[0] + t[1].replace(b"\n", b"")
    ),
)
line_starts = st.sampled_from([b"", b"+", b"@", b";", b"#", b"!", b"0", b"a"])


@st.composite
def sequences(draw, long_ones: bool = True) -> bytes:
    """Short (0-13), medium, or over 100,000 characters, any legal byte, lower case too."""
    kind = draw(st.sampled_from(["short"] * 4 + ["medium"] * 3 + ["long"] * long_ones))
    if kind == "short":
        return draw(legal_text.map(lambda b: b[: draw(st.integers(0, 13))]))
    chunk = draw(legal_text.filter(bool))
    size = draw(st.integers(14, 400)) if kind == "medium" else draw(st.integers(100_000, 120_000))
    return (chunk * (size // len(chunk) + 1))[:size]


@st.composite
def fasta_files(draw, long_ones: bool = True) -> bytes:
    out = []
    if draw(st.booleans()):
        out.append(draw(st.sampled_from([b"\n", b"\n\n", b"\r\n", b" \n"])))  # blank lines first
    for _ in range(draw(st.integers(0, 8))):
        out.append(b">" + draw(names) + draw(descriptions) + draw(st.sampled_from([b"\n", b"\r\n"])))
        seq = draw(st.sampled_from([b"", b"+", b"@", b";", b"#"])) + draw(sequences(long_ones))
        width = draw(st.integers(1, 90))
        for i in range(0, len(seq), width):
            line = seq[i : i + width]
            if line.startswith(b">"):
                line = draw(line_starts) + line[1:]  # a '>' here would start a record
            out.append(line + draw(st.sampled_from([b"\n", b"\r\n"])))
            if draw(st.integers(0, 9)) == 0:
                out.append(draw(st.sampled_from([b"\n", b"\r\n"])))  # a blank line
    data = b"".join(out)
    if draw(st.booleans()):
        data = data.rstrip(b"\r\n")  # no final newline
    return data


def kernel_rows(data: bytes, cuts: list[int], uppercase: bool) -> bytes:
    """Rows of every byte range, each converted on its own, ids counted across ranges."""
    f = io.BytesIO(data)
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    rows, next_id = [], 1
    for i in range(len(bounds) - 1):
        base, block = read_owned_bytes(f, ByteRange("mem.fa", bounds[i], bounds[i + 1], i, len(data)))
        parsed = convert_block(block, base, "mem.fa", uppercase=uppercase, first_id=next_id)
        assert len(parsed) == count_records(as_array(block))
        rows.append(bytes(parsed.rows.data))
        next_id += len(parsed)
    return b"".join(rows)


SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def rows_equal_the_oracle_for_any_cuts(data, uppercase, draw):
    want = csv_rows(parse_fasta_bytes(data, uppercase))
    partition = draw.draw(st.sampled_from([3, 5, 17, 64, 1000, 1 << 20]))
    partition = max(partition, len(data) // 400)  # at most ~400 ranges: each seeks on its own
    cuts = list(range(partition, len(data), partition))
    cuts += draw.draw(st.lists(st.integers(0, max(len(data), 1)), max_size=6))
    assert kernel_rows(data, cuts, uppercase) == want


# The same inputs and property twice: 50 examples in the default run (~4 s, most of it
# drawing the 100,000-character sequences), 200 in the drills.
test_rows_equal_the_oracle_for_any_cuts = settings(SETTINGS, max_examples=50)(
    given(fasta_files(), st.booleans(), st.data())(rows_equal_the_oracle_for_any_cuts))
test_rows_equal_the_oracle_for_any_cuts_200_examples = pytest.mark.drill(SETTINGS(
    given(fasta_files(), st.booleans(), st.data())(rows_equal_the_oracle_for_any_cuts)))


@SETTINGS
@given(fasta_files(), st.data())
@pytest.mark.drill  # every bad byte at every place, ~55 s
def test_an_illegal_byte_is_reported_at_its_place(data, draw):
    """Put one illegal byte into a name or a sequence line: the oracle and the kernel must
    both stop there, and the kernel's error names the file and that byte."""
    good = parse_fasta_bytes(data)
    assume(good)
    at = draw.draw(st.integers(0, max(len(data) - 1, 0)))
    assume(data and data[at] in LEGAL and not (data[at] == ord(">") and (at == 0 or data[at - 1] == 10)))
    bad_byte = draw.draw(st.sampled_from(ILLEGAL_BYTES))
    bad = data[:at] + bytes([bad_byte]) + data[at + 1 :]
    try:
        want = parse_fasta_bytes(bad)
    except OracleError as err:
        with pytest.raises(InputError) as got:
            convert_block(bad, 0, "bad.fa", uppercase=True, first_id=1)
        assert got.value.path == "bad.fa"
        assert got.value.where.split(",")[0] == f"byte {err.offset}"
    else:
        # the byte landed in a description, or ended a name: still legal input
        assert bytes(convert_block(bad, 0, "bad.fa", uppercase=False, first_id=1).rows.data) == csv_rows(want)


def test_the_qc_sample_equals_the_oracle(qc_dir):
    for name, upper in (("ur90_ur50_sampler.fasta", True), ("uniref50_train_filt.fasta", False)):
        data = (qc_dir / name).read_bytes()
        got = convert_block(data, 0, name, uppercase=upper, first_id=1)
        assert bytes(got.rows.data) == csv_rows(parse_fasta_bytes(data, upper))
    assert len(got) == 5001


@pytest.mark.parametrize(
    "data, rows",
    [
        # lines starting with '+' or '@' are sequence, not FASTQ (kseq read these wrongly)
        (b">V1\nMKV\n+LLL\n>V2\nGGGG\n>V3\nAAAA\n", b"1,V1,7,MKV+LLL\n2,V2,4,GGGG\n3,V3,4,AAAA\n"),
        (b">A1\nMKVL\n@XX\nWWWW", b"1,A1,11,MKVL@XXWWWW\n"),
        (b">a b\n;x\n#y\n!0\n", b"1,a,6,;x#y!0\n"),
        (b">a\nab>c\n\n\r\nde\r\n", b"1,a,6,ab>cde\n"),
        (b">x\n>y\nA", b"1,x,0,\n2,y,1,A\n"),
        (b">n\x01desc\xff\nA\n", None),  # \x01 is part of the name: an error
        (b">n\tdesc \xff\x00\nA\n", b"1,n,1,A\n"),  # anything goes in the description
    ],
)
def test_examples(data, rows):
    if rows is None:
        with pytest.raises(InputError):
            convert_block(data, 0, "f.fa", uppercase=False, first_id=1)
    else:
        assert bytes(convert_block(data, 0, "f.fa", uppercase=False, first_id=1).rows.data) == rows


def test_short_sequences_are_upper_cased():
    """The numpy engine once left sequences of 12 characters or fewer in lower case."""
    data = b">a\nmkv\n>b\nacdefghiklmn\n>c\nacdefghiklmnp\n"
    got = convert_block(data, 0, "f.fa", uppercase=True, first_id=1)
    assert bytes(got.rows.data) == b"1,a,3,MKV\n2,b,12,ACDEFGHIKLMN\n3,c,13,ACDEFGHIKLMNP\n"


@pytest.mark.parametrize(
    "data, where, what",
    [
        (b"junk\n>a\nAC\n", "byte 0", "text before the first"),
        (b"  >a\nAC\n", "byte 2", "text before the first"),
        (b">a\nAC\n>\nGG\n", "byte 6", "empty record id"),
        (b">a\nAC,D\n", "byte 5, record 'a'", "would corrupt"),
        (b'>a\nAC"D\n', "byte 5, record 'a'", "would corrupt"),
        (b">a\nAC D\n", "byte 5, record 'a'", "would corrupt"),
        (b">a\nAC\x07D\n", "byte 5, record 'a'", "would corrupt"),
        (b">a\nQCN\x00GKH\n", "byte 6, record 'a'", "would corrupt"),
        (b">a\nAC\xc3\xa9\n", "byte 5, record 'a'", "would corrupt"),
        (b">a,b\nACD\n", "byte 2, record 'a,b'", "would corrupt"),
        (b">a\nAC\rD\n", "byte 5, record 'a'", "would corrupt"),
        (b">a\nAC\r\r\n", "byte 5, record 'a'", "would corrupt"),
        (b">a x\ty\nAC\tD\n", "byte 9, record 'a'", "would corrupt"),
        (b">a\nAC\n> b\nGG\n", "byte 6", "empty record id"),
    ],
)
def test_bad_input_names_file_and_place(data, where, what):
    with pytest.raises(InputError) as err:
        convert_block(data, 0, "bad.fa", uppercase=True, first_id=1)
    assert err.value.path == "bad.fa"
    assert err.value.where == where
    assert what in err.value.message


def test_offsets_count_from_the_block_base():
    with pytest.raises(InputError) as err:
        convert_block(b">a\nA,C\n", 1000, "f.fa", uppercase=True, first_id=1)
    assert err.value.where == "byte 1004, record 'a'"


def test_rows_without_ids_then_ids_in_any_order():
    block = convert_block(b">a\nAC\n>b\nG\n>c\n\n", 0, "f.fa", uppercase=True, first_id=None)
    assert bytes(block.rows.data) == b"a,2,AC\nb,1,G\nc,0,\n"
    assert block.name_series().to_list() == ["a", "b", "c"]
    import numpy as np

    again = block.rows.with_ids(np.array([2, 0, 0]), np.array([7, 8, 1234567890123]))
    assert bytes(again.data) == b"7,c,0,\n8,a,2,AC\n1234567890123,a,2,AC\n"
    assert bytes(block.rows.take(np.array([1])).data) == b"b,1,G\n"


@pytest.mark.parametrize("records", [1, 16, 1000, 20_000])
def test_more_records_than_the_room_first_guessed(records):
    """The first attempt makes room for one record per 40 input bytes (+16); a block of
    shorter records is counted and parsed again: the rows and the errors are the same."""
    from esm2dask import kernel

    parts = [b">%d\nm\n" % i if i % 3 else b">n%d d\n\n" % i for i in range(records)]
    data = b"".join(parts)
    guess = len(data) // kernel._GUESS_BYTES_PER_RECORD + 16
    assert (records > guess) == (records >= 1000)  # the second attempt, or not
    got = convert_block(data, 0, "f.fa", uppercase=True, first_id=5)
    assert bytes(got.rows.data) == csv_rows(parse_fasta_bytes(data, True), first_id=5)
    assert len(got.name_series()) == records
    bad = data + b">last\nA,C\n"
    with pytest.raises(InputError) as err:
        convert_block(bad, 0, "f.fa", uppercase=True, first_id=1)
    assert err.value.where == f"byte {len(data) + 7}, record 'last'"


def test_a_range_whose_count_differs_is_an_error(tmp_path):
    """Defence in depth: records parsed must equal records counted, range by range."""
    from esm2dask import tasks

    path = tmp_path / "f.fa"
    path.write_bytes(b">a\nAC\n>b\nGG\n")
    byte_range = ByteRange(str(path), 0, 12, 0, 12)
    assert len(tasks._convert(byte_range, {}, uppercase=True, first_id=1, expected=2)) == 2
    with pytest.raises(InputError) as err:
        tasks._convert(byte_range, {}, uppercase=True, first_id=1, expected=3)
    assert err.value.where == "bytes 0-12" and "2 records parsed but 3 counted" in err.value.message


# ------------------------------------------------------------------ the kernel's fast paths
# The kernel validates and copies CHUNK_BYTES at a time and finishes a chunk that holds a
# line end or a bad byte byte by byte; names and header line ends are found a chunk at a
# time too. These tests put every line length, every bad byte and every byte value at
# every place relative to those chunks, and at the block's end.

from esm2dask.kernel import CHUNK_BYTES  # noqa: E402

#: Every line length from empty to past two chunks.
LINE_LENGTHS = range(0, 2 * CHUNK_BYTES + 2)


def _legal_line(length: int, salt: int) -> bytes:
    """``length`` legal bytes, lower case and ``> + @ ; #`` included, none of them the same
    pattern for two salts."""
    return bytes(LEGAL_BYTES[(salt * 7 + i * 13) % len(LEGAL_BYTES)] for i in range(length))


def _outcome(data: bytes, uppercase: bool):
    """The oracle's rows, or ('error', byte offset); the kernel's the same way."""
    try:
        want = csv_rows(parse_fasta_bytes(data, uppercase))
    except OracleError as err:
        want = ("error", err.offset)
    try:
        got = bytes(convert_block(data, 0, "f.fa", uppercase=uppercase, first_id=1).rows.data)
    except InputError as err:
        assert err.path == "f.fa"
        got = ("error", int(err.where.split(",")[0].removeprefix("byte ")))
    return want, got


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_lines_of_every_length_around_the_chunk_width(eol):
    """Records whose lines have every length 0..2×chunk+1, alone, wrapped, and at the end
    of the block with and without a final line end, both cases."""
    for length in LINE_LENGTHS:
        lines = [_legal_line(length, salt).replace(b">", b"+") for salt in range(3)]
        wrapped = b">w" + eol + eol.join(lines) + eol
        single = b">s desc" + eol + lines[0] + eol
        for data in (single + wrapped, wrapped + single, single + wrapped.rstrip(b"\r\n"),
                     wrapped + b">last" + eol + lines[1], b">h" * 0 + single.rstrip(b"\r\n")):
            for uppercase in (True, False):
                want, got = _outcome(data, uppercase)
                assert got == want, (length, data)
                assert count_records(as_array(data)) == data.count(b"\n>") + 1


def test_names_and_descriptions_of_every_length_around_the_chunk_width():
    for length in range(1, 2 * CHUNK_BYTES + 2):
        name = _legal_line(length, length)
        for data in (b">" + name, b">" + name + b"\n", b">" + name + b"\r\nAC\n",
                     b">" + name + b" " + b"d" * length + b"\nAC\n>b\nGG",
                     b">a\tx\n>" + name + b"\x0c" + b"\xff" * length):
            for uppercase in (True, False):
                want, got = _outcome(data, uppercase)
                assert got == want, (length, data)


#: One of each kind of illegal byte: control, space, the two CSV bytes, DEL, non-ASCII.
ILLEGAL_SAMPLES = b"\x00\x01\t\x0b\x0c \x1f,\"\x7f\x80\xc3\xff"


@pytest.mark.parametrize("length", [1, 2, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 2 * CHUNK_BYTES + 1, 100])
def test_an_illegal_byte_at_every_position_of_a_line(length):
    """The error names the same byte as the oracle (the first bad byte of the file) for
    every position of a sequence line or a name, every kind of bad byte, and a stray \\r."""
    line = _legal_line(length, 1).replace(b">", b"+")
    head = b">first\nACDE\n>rec desc\n"
    for at in range(length):
        for bad_byte in ILLEGAL_SAMPLES + b"\r":
            bad_line = line[:at] + bytes([bad_byte]) + line[at + 1 :]
            trailing_cr = bad_byte == 13 and at == length - 1  # legal: one trailing \r
            cases = [(head + bad_line + b"\n" + line + b"\n", len(head) + at),
                     (head + line + b"\n" + bad_line, len(head) + length + 1 + at),
                     (head + line + b"\n" + bad_line + b"\n" + line + b"\n", len(head) + length + 1 + at)]
            if bad_byte not in b"\t\x0b\x0c \r":  # these would end the name
                cases.append((b">" + bad_line + b"\nAC\n", 1 + at))
            for data, offset in cases:
                want, got = _outcome(data, True)
                assert got == want == (csv_rows(parse_fasta_bytes(data, True)) if trailing_cr else ("error", offset)), (at, bad_byte, data)


@pytest.mark.parametrize("width", [31, 32, 33, 59, 60, 63, 64, 65, 80, 127, 128, 129])
def test_lines_as_wide_as_the_line_before(width):
    """A line as wide as the last whole line is copied whole when its line end (``\\n``, or
    ``\\r\\n`` after a CRLF line) is where the width says and it holds no special byte; every
    other line (shorter or one longer, whose later ``\\n`` or ``>`` falls at that place, a line
    end of the other kind, a next record, a bad byte) is walked: the rows and errors are the
    oracle's."""
    full = [_legal_line(width, salt).replace(b">", b"+") for salt in range(4)]
    short = [full[0][:m] for m in (0, 1, width // 2, width - 1)]
    followers = [b"\n" + full[1], b"\r\n" + full[1], b"\n>n\n" + full[2], b"\n\n" + full[3]]
    for first in (full[0] + b"\n", full[0] + b"\r\n"):
        for middle in short + full[1:2] + [full[1] + b"Q", full[1][:-1] + b"\r", full[2][:-1] + b",",
                                           full[3][:5] + b"\x00" + full[3][6:]]:
            for after in followers:
                data = b">a\n" + first + middle + after + b"\n"
                for shift in (b"", b"x" * (width - len(middle) - 1)):  # a later \n at the place
                    case = data.replace(middle + after, middle + after[:1] + shift + after[1:], 1) if shift else data
                    want, got = _outcome(case, True)
                    assert got == want, (width, case)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fasta_files(long_ones=False), st.integers(0, 255), st.integers(0, 10**9), st.booleans())
def test_every_byte_value_at_any_position(data, value, where, uppercase):
    """Any byte value (0..255) put anywhere: the kernel agrees with the oracle, rows or
    the byte of the error."""
    assume(data)
    at = where % len(data)
    changed = data[:at] + bytes([value]) + data[at + 1 :]
    want, got = _outcome(changed, uppercase)
    assert got == want


def test_every_byte_value_at_each_chunk_edge():
    """Each of the 256 byte values at the places where a chunk starts or ends, in a name,
    a description and a sequence line (deterministic, so every value is seen)."""
    seq = _legal_line(3 * CHUNK_BYTES, 5).replace(b">", b"+")
    name = _legal_line(2 * CHUNK_BYTES, 9).replace(b">", b"+")
    data = b">" + name + b" desc\n" + seq + b"\n" + seq[:50] + b"\r\n>n2\n" + seq
    body = data.index(b"\n") + 1
    places = {0, 1, 2, CHUNK_BYTES, CHUNK_BYTES + 1, 2 * CHUNK_BYTES, 2 * CHUNK_BYTES + 1, 2 * CHUNK_BYTES + 2,
              body - 1, body, body + CHUNK_BYTES - 1, body + CHUNK_BYTES, body + 2 * CHUNK_BYTES,
              body + len(seq), body + len(seq) + 1, body + len(seq) + 51, len(data) - CHUNK_BYTES, len(data) - 1}
    for at in sorted(places):
        for value in range(256):
            changed = data[:at] + bytes([value]) + data[at + 1 :]
            for uppercase in (True, False):
                want, got = _outcome(changed, uppercase)
                assert got == want, (at, value)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fasta_files(), st.booleans(), st.integers(1, 10**12))
def test_the_columns_taken_from_the_rows_are_the_oracles_records(data, uppercase, first_id):
    """The other layouts take names and sequences out of the CSV rows in memory
    (``Rows.columns``); they must be the records a plain line parser reads, whatever the ids."""
    want = parse_fasta_bytes(data, uppercase)
    block = convert_block(data, 0, "mem.fa", uppercase=uppercase, first_id=first_id)
    names, seqs = block.rows.columns()
    assert list(zip(names.to_pylist(), seqs.to_pylist())) == want
    reversed_rows = block.rows.take(list(range(len(block)))[::-1])
    names, seqs = reversed_rows.columns()
    assert list(zip(names.to_pylist(), seqs.to_pylist())) == want[::-1]
    names, lengths = reversed_rows.names_and_lengths()  # train.db of places: no sequence copied
    assert list(zip(names.to_pylist(), lengths.tolist())) == [(n, len(s)) for n, s in want[::-1]]


def test_row_sizes_of_many_records_and_of_every_place_a_record_can_start():
    """Thousands of tiny records (the result grows past its first guess), and one record
    starting at every offset around a 64-byte step, with ``>`` in descriptions and bodies
    ending ``\r\n`` or a bare ``\r``: each size is the oracle's row less its id."""
    from esm2dask.kernel import row_sizes

    def want(data):
        return [len(f",{n},{len(s)},{s}\n".encode()) for n, s in parse_fasta_bytes(data, True)]

    tiny = b"".join(b">%d\nM\n" % i if i % 7 else b">%d x>y\n\n" % i for i in range(5000))
    assert row_sizes(as_array(tiny)).tolist() == want(tiny)
    for lead in range(0, 140):
        body = b"M" * lead
        for tail in (b"\n", b"\r\n", b"\r", b""):
            data = b">a d>e\r\n" + body + b"\r\n>b\n" + body[: lead // 2] + tail + b">c\n" * tail.endswith(b"\n")
            sizes = row_sizes(as_array(data))
            assert sizes.tolist() == want(data), (lead, tail)
            assert len(sizes) == count_records(as_array(data))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fasta_files(), st.data())
def test_row_sizes_are_the_oracles_rows_without_their_ids(data, draw):
    """What the count pass tells the driver, so that every row is written once at its place:
    each record's row size but its id, for any cut of the file into ranges."""
    from esm2dask.kernel import row_sizes

    want = [len(f",{n},{len(s)},{s}\n".encode()) for n, s in parse_fasta_bytes(data, True)]
    cuts = sorted(set(draw.draw(st.lists(st.integers(1, max(len(data), 1)), max_size=6))))
    f = io.BytesIO(data)
    bounds = [0, *[c for c in cuts if c < len(data)], len(data)]
    got = []
    for i in range(len(bounds) - 1):
        _, block = read_owned_bytes(f, ByteRange("mem.fa", bounds[i], bounds[i + 1], i, len(data)))
        buf = as_array(block)
        sizes = row_sizes(buf)
        assert len(sizes) == count_records(buf)
        got += sizes.tolist()
    assert got == want


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fasta_files(), st.data())
def test_records_gathered_in_any_order_convert_to_the_oracles_rows(data, draw):
    """The hash join's merge of a local FASTA: each record's bytes from its ``>`` to the next
    record's (the spans the index saves, range by range, for any cut of the file), copied
    out in any order, repeats too, then converted as one block, give the oracle's rows of
    those records in that order, ids counted on from the block's first (a file that ends
    without a newline too)."""
    from esm2dask.kernel import gather_records

    records = parse_fasta_bytes(data, True)
    assume(records)
    cuts = sorted(set(draw.draw(st.lists(st.integers(1, max(len(data), 1)), max_size=6))))
    f = io.BytesIO(data)
    bounds = [0, *[c for c in cuts if c < len(data)], len(data)]
    starts, ends = [], []
    for i in range(len(bounds) - 1):
        base, block = read_owned_bytes(f, ByteRange("mem.fa", bounds[i], bounds[i + 1], i, len(data)))
        index = convert_block(block, base, "mem.fa", uppercase=True, first_id=None, rows=False)
        spans = np.append(index.headers, base + len(block))
        starts += spans[:-1].tolist()
        ends += spans[1:].tolist()
    assert len(starts) == len(records)
    order = draw.draw(st.lists(st.integers(0, len(records) - 1), min_size=1, max_size=3 * len(records)))
    gathered = gather_records(as_array(data), np.array(starts)[order], np.array(ends)[order])
    first_id = draw.draw(st.integers(1, 10**12))
    got = convert_block(gathered, 0, "mem.fa", uppercase=True, first_id=first_id)
    assert bytes(got.rows.data) == csv_rows([records[i] for i in order], first_id)


def test_copy_bytes_compiles_for_contiguous_bytes_only():
    """The intrinsic computes byte addresses from the data pointer: a strided or wider array
    must fail to compile, not copy the wrong bytes."""
    import numpy as np
    from numba import njit
    from numba.core.errors import TypingError

    from esm2dask.kernel import copy_bytes

    @njit
    def copy4(dst, src):
        copy_bytes(dst, 1, src, 2, 4)

    dst = np.zeros(8, np.uint8)
    copy4(dst, np.arange(10, dtype=np.uint8))
    assert dst.tolist() == [0, 2, 3, 4, 5, 0, 0, 0]
    for bad_src in (np.arange(10, dtype=np.int64), np.arange(20, dtype=np.uint8)[::2]):
        with pytest.raises(TypingError):
            copy4(dst, bad_src)


def _names_or_error(data: bytes, rows: bool):
    try:
        block = convert_block(data, 0, "f.fa", uppercase=True, first_id=None, rows=rows)
    except InputError as err:
        return ("error", err.where, err.message)
    return (len(block), block.name_series().to_list(), block.headers.tolist())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fasta_files(long_ones=False), st.integers(0, 255), st.integers(0, 10**9), st.booleans())
def test_names_only_checks_every_byte_as_the_rows_do(data, value, where, change):
    """The hash join's index asks for the names alone (``rows=False``): the same records,
    names and headers, or the same error at the same byte, as the whole conversion; and the
    names are the oracle's."""
    if change and data:
        at = where % len(data)
        data = data[:at] + bytes([value]) + data[at + 1 :]
    got = _names_or_error(data, rows=False)
    assert got == _names_or_error(data, rows=True)
    try:
        want = [name for name, _ in parse_fasta_bytes(data)]
    except OracleError:
        assert got[0] == "error"
    else:
        assert got[1] == want
        assert len(convert_block(data, 0, "f.fa", uppercase=True, first_id=None, rows=False).rows.data) == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_sequences_gathered_from_csv_rows_are_the_oracles(draw):
    """``gather_sequences`` (``train.db``'s pages take their sequences out of the staged uf90
    shards): the bytes a plain slice of each row's sequence gives, in any order and any
    subset, empty sequences and ones at the file's edges included; a place where no row's
    sequence lies stops the copy at its index."""
    from esm2dask.kernel import gather_sequences

    seqs = draw.draw(st.lists(st.text(alphabet="ACDEFGHIKLMNPQRSTVWYXBZUO", max_size=90), min_size=1, max_size=30))
    rows = [f"{i + 1},N{i}_{'x' * (i % 5)},{len(s)},{s}\n".encode() for i, s in enumerate(seqs)]
    data = b"record_id,record_name,sequence_length,sequence\n" + b"".join(rows)
    at, pos = [], len(data) - sum(map(len, rows))
    for row, s in zip(rows, seqs):
        at.append(pos + len(row) - 1 - len(s))
        pos += len(row)
    picked = draw.draw(st.lists(st.sampled_from(range(len(seqs))), max_size=40))
    lengths = np.array([len(seqs[j]) for j in picked], dtype=np.int64)
    dest_at = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64) if picked else np.zeros(0, np.int64)
    dest = np.zeros(int(lengths.sum()), dtype=np.uint8)
    src = np.frombuffer(data, dtype=np.uint8)
    assert gather_sequences(dest, dest_at, src, np.array([at[j] for j in picked], dtype=np.int64), lengths) == -1
    assert dest.tobytes() == "".join(seqs[j] for j in picked).encode()
    if picked:
        wrong = draw.draw(st.integers(0, len(picked) - 1))
        places = np.array([at[j] for j in picked], dtype=np.int64)
        places[wrong] += draw.draw(st.sampled_from([-1, 1, -len(data), len(data)]))
        # one byte off, a residue or a digit stands where the ',' or the '\n' should
        assert gather_sequences(dest, dest_at, src, places, lengths) == wrong
        if lengths[wrong]:  # a length one short: a residue where the row's '\n' should be
            short = lengths.copy()
            short[wrong] -= 1
            assert gather_sequences(dest, dest_at, src, np.array([at[j] for j in picked], dtype=np.int64),
                                    short) == wrong
