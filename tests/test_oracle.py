"""Inputs the released set never has (shuffled, re-wrapped, mixed case, CRLF, records the
mapping never names, repeated ids) against the independent reference in reference.py."""

from __future__ import annotations

import random
import shutil

import pytest

from conftest import run_preprocess
from reference import expected_layout, read_fasta_plain


def _write_fasta(path, records, rng, crlf=False):
    nl = "\r\n" if crlf else "\n"
    with open(path, "w", newline="") as f:
        for name, seq, comment in records:
            f.write(f">{name}{' ' + comment if comment else ''}{nl}")
            width = rng.choice([0, 7, 60, 80])
            if width == 0:
                f.write(seq + nl)
            else:
                for i in range(0, len(seq), width):
                    f.write(seq[i : i + width] + nl)
            if rng.random() < 0.05:
                f.write(nl)  # a blank line inside a record


def _mess_up(src, dst, seed, crlf=False):
    """Shuffle, re-wrap, lower-case some residues, add unnamed and repeated records."""
    from esm2dask.config import MAPPING_TSV, UF50_FASTA, UF90_FASTA, VAL_FASTA

    rng = random.Random(seed)
    dst.mkdir()
    shutil.copy(src / MAPPING_TSV, dst / MAPPING_TSV)
    for name in (UF50_FASTA, UF90_FASTA, VAL_FASTA):
        recs = [(n, s, "some > text") for n, s in read_fasta_plain(src / name)]
        recs = [(n, "".join(c.lower() if rng.random() < 0.2 else c for c in s), d) for n, s, d in recs]
        if name != VAL_FASTA:
            rng.shuffle(recs)
            recs += [(f"NOT_IN_MAPPING_{i}", "MKV" * (i + 1), "") for i in range(7)]
            dup = rng.randrange(len(recs))
            recs.append((recs[dup][0], "WWWW", "repeat, must lose to the first"))
        _write_fasta(dst / name, recs, rng, crlf=crlf)


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_shuffled_messy_input_equals_reference(tmp_path, cluster_config, crlf):
    from esm2dask.config import UF50_FASTA, UF90_FASTA, VAL_FASTA
    from esm2dask.synth import synth

    synth(str(tmp_path / "clean"), 600, seed=3)
    raw = tmp_path / "raw"
    _mess_up(tmp_path / "clean", raw, seed=5, crlf=crlf)
    out = tmp_path / "out"
    result = run_preprocess(raw, out, cluster_config, partition_size="50KB", num_csv_files=7)
    want = expected_layout(raw, raw / UF50_FASTA, raw / UF90_FASTA, raw / VAL_FASTA, k=7)
    for split in ("uf50/train", "uf50/val", "uf50/test", "uf90/uf90_csvs"):
        got = [(out / split / f"x{i:03d}.csv").read_bytes() for i in range(7)]
        assert got == want[split], split
    assert (out / "uf50/train/counts.mmap").read_bytes() == want["counts"]
    assert (out / "uf50/train/starts.mmap").read_bytes() == want["starts"]
    for name in ("uf50", "uf90"):
        rep = result.streams[name]
        assert not rep.fast_path
        assert rep.unnamed_dropped == 7
        assert rep.duplicates == 1


def test_in_order_input_takes_fast_path_and_equals_reference(tmp_path, cluster_config):
    from esm2dask.config import UF50_FASTA, UF90_FASTA, VAL_FASTA
    from esm2dask.synth import synth

    raw = tmp_path / "raw"
    synth(str(raw), 800, seed=11)
    out = tmp_path / "out"
    result = run_preprocess(raw, out, cluster_config, partition_size="64KB", num_csv_files=13)
    want = expected_layout(raw, raw / UF50_FASTA, raw / UF90_FASTA, raw / VAL_FASTA, k=13)
    for split in ("uf50/train", "uf90/uf90_csvs", "uf50/val"):
        got = [(out / split / f"x{i:03d}.csv").read_bytes() for i in range(13)]
        assert got == want[split], split
    assert result.streams["uf50"].fast_path and result.streams["uf90"].fast_path


def test_repeated_mapping_id_leaves_the_fast_path_and_first_occurrence_wins(tmp_path, cluster_config):
    """In mapping order, but one member listed twice with two different records."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "mapping.tsv").write_text("UR50_cluster_name\tmapped_id\nC1\tm1,m2\nC2\tm3,m1\n")
    (raw / "uniref50_train_filt.fasta").write_text(">C1\nAAA\n>C2\nCCC\n")
    (raw / "uniref90membersandreps_ur50trainfiltreps.fasta").write_text(
        ">m1 first\nMKV\n>m2\nGG\n>m3\nTT\n>m1 second\nWWWW\n"
    )
    (raw / "uniref50_valid.fasta").write_text(">V1\nacd\n")
    out = tmp_path / "out"
    result = run_preprocess(raw, out, cluster_config, num_csv_files=1)
    assert not result.streams["uf90"].fast_path and result.streams["uf50"].fast_path
    assert result.streams["uf90"].duplicates == 1
    assert (out / "uf90/uf90_csvs/x000.csv").read_text() == (
        "record_id,record_name,sequence_length,sequence\n1,m1,3,MKV\n2,m2,2,GG\n3,m3,2,TT\n4,m1,3,MKV\n"
    )
    assert (out / "uf50/val/x000.csv").read_text().endswith("1,V1,3,acd\n")  # case kept
