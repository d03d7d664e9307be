"""``verify`` checks the contract itself, not only the manifest's digests.

One preprocessed tree of NVIDIA's QC sample in all three layouts (with the raw inputs
copied beside it) is shared by the module; each test tampers with a copy of it. Where a
test "reseals" a file, the manifest's size and SHA-256 of that file are rewritten to match,
as a bug or an attacker that also rewrote the manifest would: only the contract checks can
then find the change. Every tampering must fail ``verify`` with a line naming the file and
the place.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from conftest import run_preprocess

ALL = ("esm2nv", "bionemo2", "hf")
MANIFEST = "esm2dask-manifest.json"


@pytest.fixture(scope="module")
def qc_tree(qc_dir, tmp_path_factory, dask_cluster):
    """NVIDIA's QC sample in all three layouts, from one run, inputs copied beside it."""
    from esm2dask.config import ClusterConfig

    out = tmp_path_factory.mktemp("contract") / "out"
    train = str(qc_dir / "uniref50_train_filt.fasta")
    cluster = ClusterConfig(scheduler_address=dask_cluster.scheduler_address, dashboard_address=None)
    run_preprocess(qc_dir, out, cluster, formats=ALL, uf90=str(qc_dir / "ur90_ur50_sampler.fasta"),
                   val=train, test=train)
    return out


@pytest.fixture
def tree(qc_tree, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(qc_tree, out)
    return out


def verify(out: Path):
    return CliRunner().invoke(cli, ["verify", str(out)])


def problems(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("PROBLEM: ")]


def assert_caught(result, *needles: str) -> str:
    """verify failed, and one PROBLEM line holds every needle; returns that line."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    hits = [p for p in problems(result) if all(n in p for n in needles)]
    assert hits, f"no problem line with {needles}:\n{result.output}"
    return hits[0]


def reseal(out: Path, *rels: str) -> None:
    """Rewrite the manifest's size and SHA-256 of ``rels`` to match the files as they are now."""
    path = out / MANIFEST
    manifest = json.loads(path.read_text())
    for rel in rels:
        data = (out / rel).read_bytes()
        entry = manifest["files"].get(rel) or manifest["copied_inputs"][rel]
        entry["bytes"] = len(data)
        entry["sha256"] = hashlib.sha256(data).hexdigest()
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def keep_layouts(out: Path, *keep: str) -> None:
    """Make ``out`` what a run with ``--format`` of ``keep`` would hold (folders and manifest)."""
    tops = {"esm2nv": ("uf50", "uf90"), "bionemo2": ("bionemo2",), "hf": ("hf",)}
    gone = [top for layout in ALL if layout not in keep for top in tops[layout]]
    for top in gone:
        shutil.rmtree(out / top)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k.split("/", 1)[0] not in gone}
    manifest["parameters"]["formats"] = list(keep)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def edit_row(path: Path, line: int, change) -> tuple[str, str]:
    """Apply ``change`` to the sequence of 1-based ``line`` of a CSV shard, keeping
    ``sequence_length`` in step; returns (record_name, new sequence)."""
    lines = path.read_bytes().split(b"\n")
    record_id, name, _, seq = lines[line - 1].decode().split(",")
    new = change(seq)
    lines[line - 1] = f"{record_id},{name},{len(new)},{new}".encode()
    path.write_bytes(b"\n".join(lines))
    return name, new


def lower_one(seq: str) -> str:
    return seq[:3] + seq[3].lower() + seq[4:]


# ----------------------------------------------------------------------------- untouched


def test_untouched_tree_passes(tree):
    result = verify(tree)
    assert result.exit_code == 0, result.output
    assert "checked: input copies against the manifest" in result.output


def test_manifest_lists_every_copy_with_its_sha256(qc_tree, qc_dir):
    manifest = json.loads((qc_tree / MANIFEST).read_text())
    copies = manifest["copied_inputs"]
    assert set(copies) == {"README.md", "mapping.tsv", "uniref50_train_filt.fasta", "ur90_ur50_sampler.fasta"}
    for name, entry in copies.items():
        # an independent digest of the input itself (the copy must hold exactly its bytes)
        assert entry["sha256"] == hashlib.sha256((qc_dir / name).read_bytes()).hexdigest(), name


# ----------------------------------------------------------------------------- the copies


@pytest.mark.parametrize("name", ["README.md", "uniref50_train_filt.fasta", "mapping.tsv"])
def test_a_byte_changed_in_a_copy_is_found(tree, name):
    path = tree / name
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i] = ord("x") if data[i] != ord("x") else ord("y")  # same size
    path.write_bytes(bytes(data))
    assert_caught(verify(tree), f"{name}: SHA-256 differs from the manifest's")


# ----------------------------------------------------------------------------- ESM2nv rows


@pytest.mark.parametrize("rel, line", [("uf50/train/x003.csv", 5), ("uf90/uf90_csvs/x010.csv", 17)])
def test_lower_case_residue_in_train_and_uf90(tree, rel, line):
    name, _ = edit_row(tree / rel, line, lower_one)
    reseal(tree, rel)
    assert_caught(verify(tree), f"{rel}: line {line}", name, "lower case")


def test_lower_case_in_val_is_kept_and_passes(tree):
    """uf50/val keeps the case of its FASTA (docs/esm2-layout.md): not a problem there, and
    the upper-cased copies in bionemo2/hf still match it."""
    rel = "uf50/val/x002.csv"
    edit_row(tree / rel, 3, lower_one)
    reseal(tree, rel)
    result = verify(tree)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("rel, char", [("uf50/val/x001.csv", "\x01"), ("uf50/test/x004.csv", "é"),
                                       ("uf90/uf90_csvs/x000.csv", "\x7f")])
def test_illegal_character_in_a_sequence(tree, rel, char):
    name, _ = edit_row(tree / rel, 4, lambda s: s[:5] + char + s[6:])
    reseal(tree, rel)
    assert_caught(verify(tree), f"{rel}: line 4", name, "not a legal sequence character")


def test_illegal_character_in_a_name(tree):
    rel = "uf50/test/x001.csv"
    lines = (tree / rel).read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b",UniRef50_", b",UniRef50\x02", 1)
    (tree / rel).write_bytes(b"\n".join(lines))
    reseal(tree, rel)
    assert_caught(verify(tree), f"{rel}: line 3", "record_name")


# ----------------------------------------------------------------------------- counts/starts


def _swap_counts(out: Path, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    counts_path, starts_path = out / "uf50/train/counts.mmap", out / "uf50/train/starts.mmap"
    counts = np.fromfile(counts_path, dtype="<u8")
    assert counts[i] != counts[j]
    counts[[i, j]] = counts[[j, i]]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype("<u8")  # consistent with the swap
    counts.tofile(counts_path)
    starts.tofile(starts_path)
    reseal(out, "uf50/train/counts.mmap", "uf50/train/starts.mmap")
    return counts, starts


def test_swapped_counts_are_found_against_the_mapping(tree):
    keep_layouts(tree, "esm2nv")  # bionemo2's train_clusters.parquet would give it away too
    assert verify(tree).exit_code == 0
    _swap_counts(tree, 4, 5)  # counts 1 and 2 (docs/esm2-layout.md: counts[:10] = 1 1 1 1 1 2 …)
    line = assert_caught(verify(tree), "uf50/train/counts.mmap", "cluster 4", "mapping.tsv")
    assert "UniRef50_" in line


# ----------------------------------------------------------------------------- bionemo2 / hf


def _change_db_sequence(path: Path, rowid: int) -> str:
    con = sqlite3.connect(str(path), isolation_level=None)
    ident, seq = con.execute("SELECT id, sequence FROM protein WHERE rowid = ?", (rowid,)).fetchone()
    new = seq[:-1] + ("A" if seq[-1] != "A" else "C")  # still legal and upper case
    con.execute("UPDATE protein SET sequence = ? WHERE rowid = ?", (new, rowid))
    con.close()
    return ident


@pytest.mark.parametrize("db, reference", [("train.db", "uf90/uf90_csvs"), ("validation.db", "uf50/val")])
def test_changed_sequence_in_a_database(tree, db, reference):
    ident = _change_db_sequence(tree / "bionemo2" / db, 37)
    reseal(tree, f"bionemo2/{db}")
    assert_caught(verify(tree), f"bionemo2/{db}", repr(ident), f"differs from {reference}")


def test_changed_sequence_in_the_test_database(qc_dir, tmp_path, cluster_config):
    """``test.db`` (a --test FASTA of its own) against ``uf50/test``."""
    out = tmp_path / "out"
    run_preprocess(qc_dir, out, cluster_config, formats=("esm2nv", "bionemo2"),
                   uf90=str(qc_dir / "ur90_ur50_sampler.fasta"), val=str(qc_dir / "uniref50_train_filt.fasta"),
                   test=str(qc_dir / "ur90_ur50_sampler.fasta"), copy_inputs=False)
    assert verify(out).exit_code == 0
    ident = _change_db_sequence(out / "bionemo2/test.db", 1000)
    reseal(out, "bionemo2/test.db")
    assert_caught(verify(out), "bionemo2/test.db", repr(ident), "differs from uf50/test")


def _change_hf_sequence(path: Path, row: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    seqs = table.column("sequence").to_pylist()
    seqs[row] = seqs[row][::-1] if seqs[row] != seqs[row][::-1] else seqs[row] + "A"
    pq.write_table(table.set_column(2, "sequence", pa.array(seqs, pa.string())), path)


@pytest.mark.parametrize("rel, reference", [("hf/train/part-00003.parquet", "uf90/uf90_csvs"),
                                            ("hf/validation/part-00001.parquet", "uf50/val")])
def test_changed_sequence_in_an_hf_part(tree, rel, reference):
    _change_hf_sequence(tree / rel, 7)
    reseal(tree, rel)
    assert_caught(verify(tree), f"{rel}: row 7", f"differs from {reference}")


@pytest.mark.parametrize("seq", ["MKV,LA", "MKV LA", "MKV\x01A", "MKVÉA", "MKVlA"])
def test_without_the_esm2nv_tree_sequences_are_legal_and_upper_case(tree, seq):
    keep_layouts(tree, "bionemo2", "hf")
    con = sqlite3.connect(str(tree / "bionemo2/train.db"), isolation_level=None)
    ident = con.execute("SELECT id FROM protein WHERE rowid = 5").fetchone()[0]
    con.execute("UPDATE protein SET sequence = ? WHERE rowid = 5", (seq,))
    con.close()
    reseal(tree, "bionemo2/train.db")
    assert_caught(verify(tree), "bionemo2/train.db", repr(ident))


def test_without_the_esm2nv_tree_hf_sequences_are_legal(tree):
    import pyarrow as pa
    import pyarrow.parquet as pq

    keep_layouts(tree, "hf")
    rel = "hf/train/part-00002.parquet"
    table = pq.read_table(tree / rel)
    seqs = table.column("sequence").to_pylist()
    seqs[4] = seqs[4][:3] + "*" + "\x03" + seqs[4][5:]
    pq.write_table(table.set_column(2, "sequence", pa.array(seqs, pa.string())), tree / rel)
    reseal(tree, rel)
    assert_caught(verify(tree), f"{rel}: row 4", "not a legal sequence character")
