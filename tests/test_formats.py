"""``--format bionemo2`` and ``--format hf``, read the way their consumers read them.

BioNeMo 2's reader (``bionemo.esm2.data.dataset``, described in docs/bionemo2.md) is
re-enacted here from its contract, with pandas and sqlite3 only: ``pd.read_parquet(path)["ur90_id"]``
indexed by numpy integer labels, ``rng.choice`` of a member, ``SELECT sequence FROM protein WHERE id = ?``
on a plain ``sqlite3.connect``. The ``hf`` tree is loaded with ``datasets.load_dataset``. Every
cluster, member and sequence is checked against the ESM2nv tree of the same run, read with
plain string splitting (no polars, no pyarrow), whose own bytes the fingerprint tests pin.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cli.main import cli
from conftest import concat_md5, kept_unchanged, qc_fasta_options, run_preprocess
from esm2dask.config import UF90_FASTA

SPEC_UF50 = "182293ff6155c04c75610bb53397d1af"
SPEC_UF90 = "e9ffe11e5e6f5da097d65fc75219ce41"
DDL = "CREATE TABLE protein (id TEXT PRIMARY KEY, sequence TEXT)"
ALL = ("esm2nv", "bionemo2", "hf")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """``datasets`` reads local folders only here; never let it look for a hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _cluster(dask_cluster):
    from esm2dask.config import ClusterConfig

    return ClusterConfig(scheduler_address=dask_cluster.scheduler_address, dashboard_address=None)


@pytest.fixture(scope="module")
def qc_out(qc_dir, tmp_path_factory, dask_cluster):
    """NVIDIA's QC sample in all three layouts, from one run (1 MB byte ranges: 5 of uf90,
    so 5 hf parts)."""
    out = tmp_path_factory.mktemp("qc") / "out"
    result = run_preprocess(qc_dir, out, _cluster(dask_cluster), formats=ALL, partition_size="1MB",
                            **qc_fasta_options(qc_dir))
    yield from kept_unchanged(out, (out, result))


# ----------------------------------------------------------------------------- the oracle


def _read_split(folder: Path) -> list[tuple[int, str, str]]:
    """(record_id, record_name, sequence) of an ESM2nv folder, by plain string splitting."""
    rows = []
    for path in sorted(folder.glob("x*.csv")):
        lines = path.read_text().split("\n")
        assert lines[0] == "record_id,record_name,sequence_length,sequence" and lines[-1] == ""
        for line in lines[1:-1]:
            record_id, name, _, sequence = line.split(",")
            rows.append((int(record_id), name, sequence))
    return rows


class Esm2nvTree:
    """What the ESM2nv tree of a run says the other layouts must hold."""

    def __init__(self, out: Path, with_test: bool):
        train = _read_split(out / "uf50/train")
        uf90 = _read_split(out / "uf90/uf90_csvs")
        counts = np.fromfile(out / "uf50/train/counts.mmap", dtype="<u8").astype(int)
        starts = np.fromfile(out / "uf50/train/starts.mmap", dtype="<u8").astype(int)
        self.cluster_ids = [name for _, name, _ in train]
        self.clusters = [[uf90[p][1] for p in range(s, s + c)] for s, c in zip(starts, counts)]
        self.sequence_of = {}
        for _, name, seq in uf90:
            self.sequence_of.setdefault(name, seq)
        self.train_rows = [  # (ur50_id, ur90_id, sequence) of every training member, in uf90 order
            (cid, uf90[p][1], uf90[p][2])
            for cid, s, c in sorted(zip(self.cluster_ids, starts, counts), key=lambda x: x[1])
            for p in range(s, s + c)
        ]
        self.eval = {"validation": _read_split(out / "uf50/val")}
        if with_test:
            self.eval["test"] = _read_split(out / "uf50/test")


# ----------------------------------------------------------------------------- the readers


def _bionemo2_reads(folder: Path, tree: Esm2nvTree) -> None:
    """Read ``folder`` as BioNeMo 2's ESMDataModule does and compare with ``tree``."""
    clusters = pd.read_parquet(folder / "train_clusters.parquet")["ur90_id"]
    assert isinstance(clusters.index, pd.RangeIndex) and clusters.index.start == 0
    assert len(clusters) == len(tree.clusters) >= 2
    con = sqlite3.connect(str(folder / "train.db"))
    cursor = con.cursor()
    for i in np.arange(len(clusters)):  # numpy integer labels, as the reader's resampler hands them
        members = clusters[i]
        assert list(members) == tree.clusters[i], i
        drawn = np.random.default_rng([7, int(i)]).choice(members)  # a numpy.str_, as in the reader
        cursor.execute("SELECT sequence FROM protein WHERE id = ?", (drawn,))
        assert cursor.fetchone()[0] == tree.sequence_of[drawn]
        for member in members:
            cursor.execute("SELECT sequence FROM protein WHERE id = ?", (member,))
            assert cursor.fetchone()[0] == tree.sequence_of[member]
    distinct = {m for c in tree.clusters for m in c}
    _assert_db_shape(con, len(distinct))
    con.close()
    names = {"validation": ("valid_clusters.parquet", "validation.db"), "test": ("test_clusters.parquet", "test.db")}
    assert {p.name for p in folder.iterdir()} == {"train_clusters.parquet", "train.db",
                                                   *(n for split in tree.eval for n in names[split])}
    for split, records in tree.eval.items():
        clusters_name, db_name = names[split]
        ids = pd.read_parquet(folder / clusters_name)["ur50_id"]
        assert isinstance(ids.index, pd.RangeIndex) and ids.index.start == 0
        assert list(ids) == [name for _, name, _ in records]
        con = sqlite3.connect(str(folder / db_name))
        for label in np.arange(len(ids)):
            cluster = [ids[label]]  # the reader wraps each validation id in a one-element list
            row = con.execute("SELECT sequence FROM protein WHERE id = ?", (cluster[0],)).fetchone()
            assert row[0] == records[label][2].upper()
        _assert_db_shape(con, len({name for _, name, _ in records}))
        con.close()


def _assert_db_shape(con: sqlite3.Connection, n_rows: int) -> None:
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert con.execute("SELECT sql FROM sqlite_master WHERE type = 'table'").fetchall() == [(DDL,)]
    assert con.execute("SELECT count(*) FROM protein").fetchone()[0] == n_rows
    types = con.execute("SELECT DISTINCT typeof(id), typeof(sequence) FROM protein").fetchall()
    assert types == [("text", "text")]


def _parquet_types(path: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    return {f.name: str(f.type) for f in schema}


def _hf_reads(folder: Path, tree: Esm2nvTree, tmp_path: Path) -> None:
    """Load ``folder`` with ``datasets`` and compare every row with ``tree``."""
    import datasets

    loaded = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf-cache"))
    assert set(loaded) == {"train", *tree.eval}
    train = loaded["train"]
    assert train.column_names == ["ur50_id", "ur90_id", "sequence"]
    assert list(zip(train["ur50_id"], train["ur90_id"], train["sequence"])) == tree.train_rows
    for split, records in tree.eval.items():
        got = loaded[split]
        assert got["ur50_id"] == [name for _, name, _ in records]
        assert got["sequence"] == [seq.upper() for _, _, seq in records]
        assert set(got["ur90_id"]) == {None}
    for part in folder.rglob("*.parquet"):
        assert _parquet_types(part) == {"ur50_id": "string", "ur90_id": "string", "sequence": "string"}


# ----------------------------------------------------------------------------- the runs


def test_qc_sample_in_three_layouts(qc_out, tmp_path):
    out, result = qc_out
    # the ESM2nv tree is unchanged byte for byte
    assert concat_md5(out / "uf50/train") == SPEC_UF50 and concat_md5(out / "uf90/uf90_csvs") == SPEC_UF90
    tree = Esm2nvTree(out, with_test=False)
    _bionemo2_reads(out / "bionemo2", tree)
    assert _parquet_types(out / "bionemo2/train_clusters.parquet") == {"ur90_id": "list<element: string>"}
    assert _parquet_types(out / "bionemo2/valid_clusters.parquet") == {"ur50_id": "string"}
    _hf_reads(out / "hf", tree, tmp_path)
    assert result.layouts["bionemo2/train.db"]["rows"] == 11296
    # one hf part per uf90 byte range, written by the task that converted it
    n_parts = result.stage_tasks["fast-uf90"]
    assert result.layouts["hf/train"] == {"rows": 11296, "bytes": result.layouts["hf/train"]["bytes"], "files": n_parts}
    manifest = json.loads((out / "esm2dask-manifest.json").read_text())
    assert {"bionemo2/train.db", "bionemo2/valid_clusters.parquet", f"hf/train/part-{n_parts - 1:05d}.parquet",
            "uf90/uf90_csvs/x049.csv"} <= set(manifest["files"])
    assert manifest["parameters"]["formats"] == list(ALL)
    check = CliRunner().invoke(cli, ["verify", str(out)])
    assert check.exit_code == 0, check.output
    assert "checked: bionemo2" in check.output and "checked: hf" in check.output


@pytest.fixture
def qc_random_4000_900(qc_dir, tmp_path, cluster_config):
    out = tmp_path / "out"
    result = run_preprocess(qc_dir, out, cluster_config, formats=ALL, split="random", val_size=4000,
                            test_size=900, seed=0, partition_size="64KB", **qc_fasta_options(qc_dir))
    return out, result


@pytest.mark.parametrize("run, val_size, test_size", [
    ("qc_random_all_formats", 500, 100),  # the session's run of this split (conftest)
    ("qc_random_4000_900", 4000, 900),
], ids=["500-100", "4000-900"])
def test_random_split(run, val_size, test_size, tmp_path, request):
    """Only the train-labelled clusters go into the train files. With 101 of them, some uf90
    byte ranges hold no training member: their hf parts are left out, the others renumbered
    (with 4000 + 900 held out, in 64 KB ranges)."""
    out, result = request.getfixturevalue(run)
    tree = Esm2nvTree(out, with_test=True)
    assert len(tree.clusters) == 5001 - val_size - test_size
    _bionemo2_reads(out / "bionemo2", tree)
    _hf_reads(out / "hf", tree, tmp_path)
    assert result.layouts["bionemo2/test.db"]["rows"] == test_size
    assert result.layouts["hf/train"]["rows"] == sum(len(c) for c in tree.clusters) < 11296
    assert (result.layouts["hf/train"]["files"] < result.stage_tasks["fast-uf90"]) == (val_size == 4000)
    check = CliRunner().invoke(cli, ["verify", str(out)])
    assert check.exit_code == 0, check.output


def test_shuffled_input_many_ranges_buckets_and_parts(tmp_path, cluster_config, monkeypatch):
    """Records out of mapping order (hash join), tiny partitions: many mapping ranges,
    ``train.db`` buckets and ``hf`` parts per shard."""
    from esm2dask import formats
    from esm2dask.synth import synth

    monkeypatch.setattr(formats, "PART_ROWS", 97)
    raw = tmp_path / "raw"
    synth(str(raw), 1500, seed=5, unsorted=True)
    out = tmp_path / "out"
    result = run_preprocess(raw, out, cluster_config, formats=ALL, partition_size="40KB", num_csv_files=7)
    assert not result.streams["uf90"].fast_path
    tree = Esm2nvTree(out, with_test=False)
    _bionemo2_reads(out / "bionemo2", tree)
    _hf_reads(out / "hf", tree, tmp_path)
    parts = sorted(p.name for p in (out / "hf/train").iterdir())
    assert len(parts) > 7 and parts[-1] == f"part-{len(parts) - 1:05d}.parquet"
    assert (raw / UF90_FASTA).stat().st_size > 20 * 40_000  # so train.db has 20+ buckets
    check = CliRunner().invoke(cli, ["verify", str(out)])
    assert check.exit_code == 0, check.output


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_without_esm2nv_the_csv_tree_is_not_published(qc_dir, qc_out, tmp_path, cluster_config):
    out = tmp_path / "out"
    result = run_preprocess(qc_dir, out, cluster_config, formats=("bionemo2",), partition_size="1MB",
                            **qc_fasta_options(qc_dir))
    assert not (out / "uf50").exists() and not (out / "uf90").exists() and not (out / "hf").exists()
    assert result.rows == {}
    full = qc_out[0] / "bionemo2"
    assert {p.name: _md5(p) for p in (out / "bionemo2").iterdir()} == {p.name: _md5(p) for p in full.iterdir()}
    manifest = json.loads((out / "esm2dask-manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(f"bionemo2/{p.name}" for p in full.iterdir())
    check = CliRunner().invoke(cli, ["verify", str(out)])
    assert check.exit_code == 0, check.output
    assert "checked: uf50/train" not in check.output
    # a later run asking for other layouts replaces the whole output, stale layouts too
    run_preprocess(qc_dir, out, cluster_config, formats=("hf",), overwrite=True, **qc_fasta_options(qc_dir))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["hf"]
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code == 0


def test_without_esm2nv_no_train_csv_is_staged(qc_dir, tmp_path, cluster_config):
    """``--format bionemo2``: the uf90 and uf50/train records go from the parse straight into
    the layout's files; of the CSV rows only the validation split's (which its database is
    made from) are staged. Stopped when train.db's pages are laid out, the staging folder
    shows what the run wrote."""
    from esm2dask.config import PreprocessConfig
    from esm2dask.errors import Interrupted
    from esm2dask.layout import STAGING_PREFIX
    from esm2dask.preprocess import preprocess
    from test_lifecycle import StopAt

    out = tmp_path / "out"
    config = PreprocessConfig.from_options(raw_dir=str(qc_dir), output_dir=str(out), cluster=cluster_config,
                                           formats=("bionemo2",), partition_size="1MB", **qc_fasta_options(qc_dir))
    with pytest.raises(Interrupted):
        preprocess(config, StopAt("bionemo2-train-layout"))
    (staged,) = [p for p in out.iterdir() if p.name.startswith(STAGING_PREFIX)]
    csvs = sorted(str(p.relative_to(staged)) for p in staged.rglob("*.csv"))
    assert [c for c in csvs if c.startswith("tree/")] == [f"tree/uf50/val/x{k:03d}.csv" for k in range(50)]
    assert all(c.startswith(("tree/uf50/val/", "work/pieces/uf50/val/")) for c in csvs), csvs
    assert not list(staged.rglob("*.mmap")) and not list(staged.rglob("*.u64"))
    runs = sorted(p.name for p in (staged / "work/formats/uf90/runs").iterdir())
    assert runs == [f"range-{i:05d}.arrow" for i in range(5)]


def test_too_few_clusters_for_bionemo2_is_one_clear_error(tmp_path, dask_cluster):
    from esm2dask.synth import synth

    raw = tmp_path / "raw"
    synth(str(raw), 1, seed=3)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "preprocess", str(raw), "-o", str(out), "--scheduler-address", dask_cluster.scheduler_address,
        "--plain", "--format", "esm2nv,bionemo2",
    ])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("esm2dask: error:")]
    assert len(lines) == 1 and "train_clusters.parquet would have 1 row(s)" in lines[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("values, want", [
    (("esm2nv",), ("esm2nv",)),
    (("hf,bionemo2",), ("bionemo2", "hf")),
    (("hf", "esm2nv, hf"), ("esm2nv", "hf")),
])
def test_format_option_repeats_and_takes_lists(values, want):
    from esm2dask.config import parse_formats

    assert parse_formats(values) == want


def test_unknown_format_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["preprocess", str(tmp_path), "--format", "esm2nv,parquet"])
    assert result.exit_code == 1
    assert result.output.strip() == "esm2dask: error: --format 'parquet' is not one of esm2nv, bionemo2, hf"


def test_resume_plan_survives_json():
    """A run's plan is compared with the one read back from disk (tuples come back as lists)."""
    from esm2dask.config import PreprocessConfig
    from esm2dask.publish import run_plan

    plan = run_plan(PreprocessConfig.from_options(raw_dir="/r", formats=("hf", "esm2nv")), {"/r/x": 1})
    assert json.loads(json.dumps(plan)) == plan


# ----------------------------------------------------------------------------- verify


def _tamper_db(path: Path, *statements: str) -> None:
    con = sqlite3.connect(str(path), isolation_level=None)
    for s in statements:
        con.execute(s)
    con.close()


def _rewrite_parquet(path: Path, change) -> None:
    import pyarrow.parquet as pq

    pq.write_table(change(pq.read_table(path)), path)


def _pandas_index(path: Path) -> None:
    frame = pd.read_parquet(path)
    frame.index = frame.index + 10
    frame.to_parquet(path)


TAMPER = {
    "wal": (lambda o: _tamper_db(o / "bionemo2/train.db", "PRAGMA journal_mode=WAL"), "journal_mode=wal"),
    "missing-key": (lambda o: _tamper_db(o / "bionemo2/train.db", "DELETE FROM protein WHERE rowid = 3"),
                    "are not keys of bionemo2/train.db"),
    "blob-id": (lambda o: _tamper_db(o / "bionemo2/validation.db",
                                     "UPDATE protein SET id = CAST(id AS BLOB) WHERE rowid = 1"),
                "is stored as blob/text"),
    "no-primary-key": (lambda o: _tamper_db(
        o / "bionemo2/train.db", "CREATE TABLE p2 (id TEXT, sequence TEXT)",
        "INSERT INTO p2 SELECT * FROM protein", "DROP TABLE protein", "ALTER TABLE p2 RENAME TO protein"),
        "table protein is"),
    "lower-case": (lambda o: _tamper_db(o / "bionemo2/validation.db",
                                        "UPDATE protein SET sequence = lower(sequence) WHERE rowid = 2"),
                   "has lower case"),
    "string-not-list": (lambda o: _rewrite_parquet(
        o / "bionemo2/train_clusters.parquet",
        lambda t: t.set_column(0, "ur90_id", t.column(0).combine_chunks().flatten()[: len(t)])),
        "column ur90_id is string, expected list<string>"),
    "dictionary-ids": (lambda o: _rewrite_parquet(
        o / "bionemo2/valid_clusters.parquet", lambda t: t.set_column(0, "ur50_id", t.column(0).dictionary_encode())),
        "column ur50_id is dictionary"),
    "pandas-index": (lambda o: _pandas_index(o / "bionemo2/train_clusters.parquet"), "stores a pandas index"),
    "hf-wrong-column": (lambda o: _rewrite_parquet(
        o / "hf/train/part-00003.parquet", lambda t: t.rename_columns(["ur50_id", "id", "sequence"])),
        "hf/train/part-00003.parquet: columns"),
    "hf-missing-part": (lambda o: (o / "hf/train/part-00001.parquet").unlink(), "parts are not part-00000"),
    "not-parquet": (lambda o: (o / "bionemo2/valid_clusters.parquet").write_bytes(b"ur50_id\nUniRef50_A\n"),
                    "valid_clusters.parquet: cannot be read as parquet"),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_verify_catches_tampering(case, qc_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(qc_out[0], out)
    tamper, needle = TAMPER[case]
    tamper(out)
    check = CliRunner().invoke(cli, ["verify", str(out)])
    assert check.exit_code == 1
    assert needle in check.output, check.output


# ----------------------------------------------------------------------------- object storage


@pytest.mark.drill  # S3 end to end, ~80 s
def test_s3_to_s3_without_esm2nv(s3_server, s3_raw, tmp_path, cluster_config):
    """Databases and parquet built in local temporary files and uploaded; verify in place."""
    import s3fs

    opts = json.dumps(s3_server)
    run_preprocess("s3://esm2dask-test/raw", "s3://esm2dask-test/formats", cluster_config,
                   partition_size="40KB", storage_options=s3_server, formats=("bionemo2", "hf"))
    fs = s3fs.S3FileSystem(**s3_server)
    top = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("esm2dask-test/formats"))
    assert "uf50" not in top and "uf90" not in top and {"bionemo2", "hf"} <= set(top)
    check = CliRunner().invoke(cli, ["verify", "s3://esm2dask-test/formats", "--storage-options", opts])
    assert check.exit_code == 0, check.output
    local = tmp_path / "local"
    run_preprocess(s3_raw, local, cluster_config, partition_size="40KB", formats=ALL)
    got = tmp_path / "got"
    fs.get("esm2dask-test/formats/bionemo2/", str(got) + "/", recursive=True)
    assert {p.name: _md5(p) for p in got.iterdir()} == {p.name: _md5(p) for p in (local / "bionemo2").iterdir()}
    _bionemo2_reads(got, Esm2nvTree(local, with_test=False))


from test_s3 import s3_raw, s3_server  # noqa: E402,F401  (the moto server and its raw folder)


def test_a_sequence_not_where_its_run_says_is_one_clear_error(tmp_path):
    """``train.db``'s pages take each sequence from its place in the staged uf90 shards; a
    place where no row's sequence lies (a shard changed under the run) is an error that
    names the shard, the record and the byte, and nothing is copied into a database."""
    import pyarrow as pa

    from esm2dask.errors import Esm2DaskError
    from esm2dask.formats import _gather_sequences

    shard = tmp_path / "x_000.csv"
    shard.write_bytes(b"record_id,record_name,sequence_length,sequence\n1,A,3,MKV\n2,B,0,\n3,C,2,QQ\n")
    text = shard.read_bytes()
    places = {"shard": [0, 0, 0], "at": [text.index(b"MKV"), text.index(b",\n3") + 1, text.index(b"QQ")],
              "length": [3, 0, 2]}
    table = pa.table({"id": ["C", "A", "B"], **{k: [v[2], v[0], v[1]] for k, v in places.items()}})
    assert _gather_sequences(table, (str(shard),)).to_pylist() == ["QQ", "MKV", ""]
    moved = table.set_column(2, "at", pa.array([places["at"][2] + 1, places["at"][0], places["at"][1]]))
    with pytest.raises(Esm2DaskError, match=rf"x_000\.csv: no sequence of 'C' at byte {places['at'][2] + 1}"):
        _gather_sequences(moved, (str(shard),))
