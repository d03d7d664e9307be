"""Each output byte written once: rows of uf90 and uf50/train go straight to their place in
their shard (in mapping order the count pass measured every row; out of it the hash join's
scatter did, and each position block's merge writes in place), with no pieces and no
assembly copy; the evaluation splits still stage pieces. The bytes must be the same."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_preprocess, tree_digest
from esm2dask.config import PreprocessConfig
from esm2dask.errors import Esm2DaskError, Interrupted
from esm2dask.kernel import convert_block
from esm2dask.layout import CSV_HEADER, STAGING_PREFIX, shard_bounds
from esm2dask.preprocess import preprocess
from esm2dask.tasks import PlaceReceipt, Routing, Target, place_rows, write_rows
from test_lifecycle import StopAt


def _staged(out):
    (staged,) = [p for p in out.iterdir() if p.name.startswith(STAGING_PREFIX)]
    return staged


def test_in_mapping_order_no_piece_of_uf90_or_uf50_train_is_written(synth_raw, tmp_path, cluster_config):
    out = tmp_path / "out"
    config = PreprocessConfig.from_options(raw_dir=str(synth_raw), output_dir=str(out), cluster=cluster_config,
                                           partition_size="40KB")
    with pytest.raises(Interrupted):
        preprocess(config, StopAt("assemble"))
    staged = _staged(out)
    folders = {"/".join(p.relative_to(staged / "work" / "pieces").parts[:2])
               for p in (staged / "work" / "pieces").rglob("*.csv")}
    assert folders <= {"uf50/val", "uf50/test"}  # the evaluation rows (file order) keep pieces
    for folder in ("uf90/uf90_csvs", "uf50/train"):
        shards = sorted((staged / "tree" / folder).glob("x*.csv"))
        assert len(shards) == 50 and all(s.read_bytes().startswith(CSV_HEADER) for s in shards)
    # finishing it gives what one uninterrupted run gives, byte for byte
    preprocess(PreprocessConfig.from_options(raw_dir=str(synth_raw), output_dir=str(out), cluster=cluster_config,
                                             partition_size="40KB", resume=True))
    fresh = tmp_path / "fresh"
    run_preprocess(synth_raw, fresh, cluster_config, partition_size="40KB")
    assert tree_digest(out) == tree_digest(fresh)


def test_a_run_stopped_while_rows_are_placed_resumes_exactly(synth_raw, tmp_path, cluster_config):
    """Stopped as the first fast-uf90 task finishes: the shards hold some ranges' rows and
    zeros elsewhere; the resumed run keeps them (the same size) and fills in the rest."""
    out = tmp_path / "out"
    options = dict(raw_dir=str(synth_raw), output_dir=str(out), cluster=cluster_config, partition_size="40KB")
    with pytest.raises(Interrupted):
        preprocess(PreprocessConfig.from_options(**options), StopAt("fast-uf90"))
    staged = _staged(out)
    assert sorted(p.name for p in (staged / "tree" / "uf90" / "uf90_csvs").glob("x*.csv"))[0] == "x000.csv"
    preprocess(PreprocessConfig.from_options(**options, resume=True))
    fresh = tmp_path / "fresh"
    run_preprocess(synth_raw, fresh, cluster_config, partition_size="40KB")
    assert tree_digest(out) == tree_digest(fresh)


def test_shuffled_input_is_merged_into_the_placed_shards(tmp_path, cluster_config):
    """Out of mapping order the fast path's shards are dropped; the hash join's merge then
    writes each position block in place (blocks cut at the shard boundaries too): only the
    val and test shards are assembled, and the tree is the one the sorted input gives."""
    from esm2dask.synth import synth

    from esm2dask.stages import routed_streams

    raw = tmp_path / "raw"
    synth(str(raw), 300, seed=5, unsorted=True)
    out = tmp_path / "out"
    # local FASTAs: each record read once more, by its block's merge, where it lies
    assert routed_streams(PreprocessConfig.from_options(raw_dir=str(raw), output_dir=str(out))) == ("uf50", "uf90")
    result = run_preprocess(raw, out, cluster_config, partition_size="40KB")
    assert not result.streams["uf90"].fast_path and not result.streams["uf50"].fast_path
    assert result.stage_tasks["assemble"] == 100 and result.stage_tasks["merge-uf90"] > 1
    sorted_raw = tmp_path / "sorted"  # the same records, the FASTAs in mapping order
    synth(str(sorted_raw), 300, seed=5)
    fresh = tmp_path / "fresh"
    run_preprocess(sorted_raw, fresh, cluster_config, partition_size="40KB")
    assert {k: v for k, v in tree_digest(out).items() if k.startswith("uf")} == \
        {k: v for k, v in tree_digest(fresh).items() if k.startswith("uf")}


@pytest.mark.parametrize("stage", ["scatter-uf90", "merge-uf50", "merge-uf90"])
def test_shuffled_input_stopped_in_the_join_resumes_exactly(stage, tmp_path, cluster_config):
    """Stopped as the driver begins to wait on ``stage`` (the other stream's tasks of the
    round in flight): the resumed run keeps what finished merges wrote into the shards,
    writes the rest, and gives the sorted input's tree."""
    from esm2dask.synth import synth

    raw, out = tmp_path / "raw", tmp_path / "out"
    synth(str(raw), 300, seed=5, unsorted=True)
    options = dict(raw_dir=str(raw), output_dir=str(out), cluster=cluster_config, partition_size="40KB")
    with pytest.raises(Interrupted):
        preprocess(PreprocessConfig.from_options(**options), StopAt(stage))
    preprocess(PreprocessConfig.from_options(**options, resume=True))
    sorted_raw, fresh = tmp_path / "sorted", tmp_path / "fresh"
    synth(str(sorted_raw), 300, seed=5)
    run_preprocess(sorted_raw, fresh, cluster_config, partition_size="40KB")
    assert {k: v for k, v in tree_digest(out).items() if k.startswith("uf")} == \
        {k: v for k, v in tree_digest(fresh).items() if k.startswith("uf")}


def test_place_rows_sums_each_rows_bytes_with_its_id(tmp_path):
    """Against the rows the kernel writes, for ids crossing a power of ten."""
    from esm2dask.kernel import as_array, row_sizes
    from esm2dask.storage import write_npy

    data = b"".join(b">r%d d\nMK%s\n" % (i, b"A" * (i % 13)) for i in range(40))
    first = 95  # ids 96 … 135
    block = convert_block(data, 0, "mem.fa", uppercase=True, first_id=first + 1)
    url = str(tmp_path / "sizes.npy")
    write_npy(url, row_sizes(as_array(data)), {})
    bounds = [0, 100, 110, 130, 200]
    receipt = place_rows(url, first, bounds, {})
    rows = np.diff(block.rows.starts)
    want = [[k, int(rows[max(a, first) - first: min(b, first + 40) - first].sum())]
            for k, (a, b) in enumerate(zip(bounds, bounds[1:])) if a < first + 40 and b > first]
    assert receipt == PlaceReceipt(want)


def test_rows_that_do_not_fit_their_place_are_refused(tmp_path):
    """An input changed between the count and the conversion (same records, other lengths)."""
    data = b">a\nMKV\n>b\nMK\n"
    block = convert_block(data, 0, "mem.fa", uppercase=True, first_id=1)
    tree = tmp_path / "tree"
    (tree / "uf90" / "uf90_csvs").mkdir(parents=True)
    (tree / "uf90" / "uf90_csvs" / "x000.csv").write_bytes(CSV_HEADER + b"\0" * 100)
    routing = Routing((Target("uf90/uf90_csvs", 2),), 1, str(tmp_path / "work"), tree_dir=str(tree))
    assert list(shard_bounds(2, 1)) == [0, 2]
    with pytest.raises(Esm2DaskError, match="bytes where the count pass measured 9; was an input changed"):
        write_rows(block.rows, 0, routing, [[0, len(CSV_HEADER), 9]])
    write_rows(block.rows, 0, routing, [[0, len(CSV_HEADER), len(block.rows.data)]])
    got = (tree / "uf90" / "uf90_csvs" / "x000.csv").read_bytes()
    assert got[: len(CSV_HEADER) + len(block.rows.data)] == CSV_HEADER + b"1,a,3,MKV\n2,b,2,MK\n"


@pytest.mark.parametrize("stage", ["bionemo2-train-pages", "bionemo2-train-db"])
def test_the_other_layouts_resume_from_their_receipts(stage, synth_raw, tmp_path, cluster_config):
    """Receipts of the uf90 parts and train.db pages are read back on --resume (a field of
    no file is null, never an empty name: an empty one would be refused as outside)."""
    out = tmp_path / "out"
    options = dict(raw_dir=str(synth_raw), output_dir=str(out), cluster=cluster_config, partition_size="40KB",
                   formats=("esm2nv", "bionemo2", "hf"))
    with pytest.raises(Interrupted):
        preprocess(PreprocessConfig.from_options(**options), StopAt(stage))
    preprocess(PreprocessConfig.from_options(**options, resume=True))
    fresh = tmp_path / "fresh"
    run_preprocess(synth_raw, fresh, cluster_config, partition_size="40KB", formats=("esm2nv", "bionemo2", "hf"))
    assert tree_digest(out) == tree_digest(fresh)
