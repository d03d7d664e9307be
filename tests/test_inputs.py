"""What a run reads is what its options say, checked before a cluster starts; the ``hf``
evaluation parts are sized by rows (issue 15)."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.main import cli
from conftest import assert_one_line_error, concat_md5
from test_fingerprints import SPEC_UF90

UF90_QC = "ur90_ur50_sampler.fasta"
#: the random split of NVIDIA's sample (500 val, 100 test, seed 0): test_fingerprints.py
RANDOM_TRAIN = "6f6143f214b40357aba881b5df58ee0c"
RANDOM_VAL = "6514663766f861553d5b230ad8747650"
RANDOM_TEST = "5db8f40cec84939f2ae633ceae6ba2b1"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_random_split_needs_no_validation_fasta(qc_random_all_formats):
    out, result = qc_random_all_formats
    assert concat_md5(out / "uf50/train") == RANDOM_TRAIN
    assert concat_md5(out / "uf50/val") == RANDOM_VAL
    assert concat_md5(out / "uf50/test") == RANDOM_TEST
    assert concat_md5(out / "uf90/uf90_csvs") == SPEC_UF90
    manifest = json.loads((out / "esm2dask-manifest.json").read_text())
    # the copies are of the inputs the run read, and of nothing else
    assert sorted(manifest["copied_inputs"]) == ["README.md", "mapping.tsv", "uniref50_train_filt.fasta", UF90_QC]
    assert not (out / "uniref50_valid.fasta").exists()
    assert not [url for url in manifest["inputs"] if "uniref50_valid" in url]
    for name in ("train.db", "validation.db", "test.db", "train_clusters.parquet",
                 "valid_clusters.parquet", "test_clusters.parquet"):
        assert (out / "bionemo2" / name).exists(), name


def test_hf_evaluation_parts_are_sized_by_rows(qc_random_all_formats):
    """500 validation and 100 test rows in 50 esm2nv shards: one part each, every row in order."""
    out, _ = qc_random_all_formats
    for split, folder, n in (("validation", "val", 500), ("test", "test", 100)):
        parts = sorted(os.listdir(out / "hf" / split))
        assert parts == ["part-00000.parquet"], (split, parts)
        table = pq.read_table(out / "hf" / split / parts[0])
        assert table.num_rows == n
        names = []
        for k in range(50):
            lines = (out / "uf50" / folder / f"x{k:03d}.csv").read_text().splitlines()[1:]
            names += [line.split(",")[1] for line in lines]
        assert table.column("ur50_id").to_pylist() == names


def test_the_random_split_from_the_command_line(qc_dir, tmp_path, cluster_config):
    """The issue's own command: the QC folder as it is, --split random, exit 0, verify OK."""
    out = tmp_path / "out"
    result = invoke("preprocess", qc_dir, "-o", out, "--uf90", qc_dir / UF90_QC, "--split", "random",
                    "--val-size", "500", "--test-size", "100", "--seed", "0", "--plain",
                    "--scheduler-address", cluster_config.scheduler_address)
    assert result.exit_code == 0, result.output
    assert "error" not in result.output
    assert concat_md5(out / "uf50/val") == RANDOM_VAL
    check = invoke("verify", out)
    assert check.exit_code == 0, check.output


@pytest.mark.parametrize("n_rows", [1, 500, 2 * 1_000_000, 2 * 1_000_000 + 1])
def test_part_counts_by_rows(n_rows):
    from esm2dask.formats import PART_ROWS, plan_row_parts

    assert PART_ROWS == 1_000_000
    parts = plan_row_parts(n_rows, 50, PART_ROWS)
    assert len(parts) == -(-n_rows // PART_ROWS)
    sizes = [sum(n for _, _, n in p) for p in parts]
    assert sum(sizes) == n_rows and max(sizes) <= PART_ROWS and min(sizes) > 0
    # the pieces tile the shards' rows exactly, in order
    from esm2dask.layout import shard_bounds

    bounds = shard_bounds(n_rows, 50)
    flat = [(int(bounds[k]) + lo, n) for p in parts for k, lo, n in p]
    pos = 0
    for start, n in flat:
        assert start == pos and n > 0
        pos += n
    assert pos == n_rows


@pytest.fixture(scope="session")
def raw(synth_raw):
    return synth_raw


@pytest.mark.parametrize("option", ["--uf50", "--uf90", "--mapping", "--val", "--test"])
def test_a_missing_input_named_by_an_option_fails_before_a_cluster(option, raw, tmp_path, no_cluster):
    missing = tmp_path / "no-such.fasta"
    out = tmp_path / "out"
    result = invoke("preprocess", raw, "-o", out, option, missing)
    line = assert_one_line_error(result, str(missing), "no such file")
    assert "Error" not in line and "Errno" not in line
    assert not out.exists()


def test_a_folder_given_as_an_input_fails_before_a_cluster(raw, tmp_path, no_cluster):
    out = tmp_path / "out"
    result = invoke("preprocess", raw, "-o", out, "--val", tmp_path)
    assert_one_line_error(result, str(tmp_path), "is a directory")
    assert not out.exists()


def test_the_random_split_does_not_read_a_validation_fasta(raw, tmp_path, no_cluster):
    """--plan lists what a run reads: no validation FASTA for a random split, even a missing one."""
    (raw_copy := tmp_path / "raw").mkdir()
    for p in raw.iterdir():
        if p.name != "uniref50_valid.fasta":
            os.link(p, raw_copy / p.name)
    result = invoke("preprocess", raw_copy, "-o", tmp_path / "out", "--split", "random",
                    "--val-size", "10", "--test-size", "10", "--plan")
    assert result.exit_code == 0, result.output
    assert "uniref50_valid" not in result.output
    failed = invoke("preprocess", raw_copy, "-o", tmp_path / "out", "--plan")  # the FASTA split needs it
    assert_one_line_error(failed, "uniref50_valid.fasta", "no such file")


def test_errors_in_words():
    from esm2dask.errors import describe_os_error

    text = describe_os_error(FileNotFoundError(2, "No such file or directory", "/x/a.fasta"))
    assert text == "/x/a.fasta: no such file or folder"
    assert "Errno" not in describe_os_error(OSError(28, "No space left on device"))
