"""The three FASTA engines agree, and reject what would corrupt the CSV."""

from __future__ import annotations

import pytest

from esm2dask.errors import InputError
from esm2dask.fasta import ENGINES, parse_block

SAMPLE = (
    b">sp|P1|X first protein\nMKVl\nacd\n\n>P2\r\nMM\r\nKK\r\n>P3 empty follows\n>P4\nW\n"
)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("upper", [True, False])
def test_engines_agree(engine, upper):
    got = parse_block(SAMPLE, 0, "s.fa", uppercase=upper, engine=engine)
    assert got.names.to_list() == ["sp|P1|X", "P2", "P3", "P4"]
    want = ["MKVLACD", "MMKK", "", "W"] if upper else ["MKVlacd", "MMKK", "", "W"]
    assert got.sequences.to_list() == want


def test_engines_agree_on_the_qc_sample(qc_dir):
    data = (qc_dir / "ur90_ur50_sampler.fasta").read_bytes()
    results = [parse_block(data, 0, "qc", uppercase=True, engine=e) for e in ENGINES]
    for other in results[1:]:
        assert other.names.equals(results[0].names)
        assert other.sequences.equals(results[0].sequences)
    assert len(results[0]) == 11296


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "data, where, what",
    [
        (b"junk\n>a\nAC\n", "byte 0", "text before the first"),
        (b">a\nAC\n>\nGG\n", "byte 6", "empty record id"),
        (b">a\nAC,D\n", "byte 5, record 'a'", "would corrupt"),
        (b'>a\nAC"D\n', "byte 5, record 'a'", "would corrupt"),
        (b">a\nAC D\n", "byte 5, record 'a'", "would corrupt"),
        (b">a\nAC\x07D\n", "byte 5, record 'a'", "would corrupt"),
        (b">a,b\nACD\n", "byte 2, record 'a,b'", "would corrupt"),
        (b">a\nAC\rD\n", "byte 5, record 'a'", "would corrupt"),
        (b">a x\ty\nAC\tD\n", "byte 9, record 'a'", "would corrupt"),
        (b">a\nAC\n> b\nGG\n", "byte 6", "empty record id"),
    ],
)
def test_bad_input_names_file_and_place(engine, data, where, what):
    with pytest.raises(InputError) as err:
        parse_block(data, 0, "bad.fa", uppercase=True, engine=engine)
    assert err.value.path == "bad.fa"
    assert err.value.where == where
    assert what in err.value.message


def test_offsets_count_from_the_block_base():
    with pytest.raises(InputError) as err:
        parse_block(b">a\nA,C\n", 1000, "f.fa", uppercase=True)
    assert err.value.where == "byte 1004, record 'a'"


def test_leading_blank_lines_are_allowed():
    got = parse_block(b"\n\n>a\nAC\n", 0, "f.fa", uppercase=True)
    assert got.names.to_list() == ["a"]
