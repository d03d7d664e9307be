"""NVIDIA's QC sample against the fingerprints of docs/esm2-layout.md."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import concat_md5, file_md5, qc_fasta_options, run_preprocess

SPEC_UF50 = "182293ff6155c04c75610bb53397d1af"
SPEC_UF90 = "e9ffe11e5e6f5da097d65fc75219ce41"
SPEC_COUNTS = "049415ceb29b08ded142439ff3e7462f"
SPEC_STARTS = "d82072cb9a026d333e08a281bffe665c"


def test_v110_fingerprints(qc_esm2nv):
    out, result = qc_esm2nv
    assert concat_md5(out / "uf50/train") == SPEC_UF50
    assert concat_md5(out / "uf50/val") == SPEC_UF50
    assert concat_md5(out / "uf50/test") == SPEC_UF50
    assert concat_md5(out / "uf90/uf90_csvs") == SPEC_UF90
    assert file_md5(out / "uf50/train/counts.mmap") == SPEC_COUNTS
    assert file_md5(out / "uf50/train/starts.mmap") == SPEC_STARTS
    assert result.streams["uf50"].fast_path and result.streams["uf90"].fast_path

    rows = [len((out / "uf50/train" / f"x{i:03d}.csv").read_bytes().splitlines()) - 1 for i in range(50)]
    assert rows == [101] + [100] * 49
    rows90 = [len((out / "uf90/uf90_csvs" / f"x{i:03d}.csv").read_bytes().splitlines()) - 1 for i in range(50)]
    assert rows90 == [226] * 46 + [225] * 4
    first = (out / "uf50/train/x000.csv").read_text().splitlines()[1]
    assert first.startswith("1,UniRef50_A0A007,407,MGYIHTALKSAGFHHV")
    assert (out / "uf90/uf90_csvs/x000.csv").read_text().splitlines()[1].startswith("1,A0A007_STRVD,407,MGYIHTALKSAGFHHV")
    counts = np.fromfile(out / "uf50/train/counts.mmap", dtype="<u8")
    starts = np.fromfile(out / "uf50/train/starts.mmap", dtype="<u8")
    assert counts[:10].tolist() == [1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert starts[:10].tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10]
    # the raw inputs are linked beside the output, and nothing else is left behind
    assert (out / "mapping.tsv").exists() and (out / "ur90_ur50_sampler.fasta").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".esm2dask-staging")]
    assert (out / "esm2dask-manifest.json").exists()


def test_random_split_fingerprints(qc_dir, tmp_path, cluster_config):
    out = tmp_path / "out"
    result = run_preprocess(
        qc_dir, out, cluster_config, split="random", val_size=500, test_size=100, seed=0,
        **qc_fasta_options(qc_dir),
    )
    assert result.rows["uf50/train"] == 4401
    assert result.rows["uf50/val"] == 500
    assert result.rows["uf50/test"] == 100
    assert concat_md5(out / "uf50/train") == "6f6143f214b40357aba881b5df58ee0c"
    assert concat_md5(out / "uf50/val") == "6514663766f861553d5b230ad8747650"
    assert concat_md5(out / "uf50/test") == "5db8f40cec84939f2ae633ceae6ba2b1"
    assert concat_md5(out / "uf90/uf90_csvs") == SPEC_UF90
    # each split's counts/starts are the global values at its indices
    sizes = {s: np.fromfile(out / f"uf50/{s}/counts.mmap", dtype="<u8") for s in ("train", "val", "test")}
    assert sum(int(c.sum()) for c in sizes.values()) == 11296
    assert len(sizes["val"]) == 500 and len(sizes["test"]) == 100


# 256KB cuts the sample's uf90 and uf50 FASTAs into 19 and 8 byte ranges (the mapping into
# 9); 37KB into 129, 50 and 62, a drill's time on 2 cores.
@pytest.mark.parametrize("partition", ["256KB", pytest.param("37KB", marks=pytest.mark.drill)])
def test_qc_sample_with_tiny_partitions_takes_the_same_bytes(qc_dir, tmp_path, cluster_config, partition):
    out = tmp_path / "out"
    run_preprocess(qc_dir, out, cluster_config, partition_size=partition, **qc_fasta_options(qc_dir))
    assert concat_md5(out / "uf50/train") == SPEC_UF50
    assert concat_md5(out / "uf90/uf90_csvs") == SPEC_UF90
    assert file_md5(out / "uf50/train/starts.mmap") == SPEC_STARTS
