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
from conftest import kept_unchanged, run_preprocess

ALL = ("esm2nv", "bionemo2", "hf")
MANIFEST = "esm2dask-manifest.json"


def _test_fasta(qc_dir: Path, path: Path) -> Path:
    """The first 300 records of the training FASTA, some residues lower case (a test FASTA
    of its own: uf50/test keeps its case, bionemo2/test.db and hf/test upper-case it)."""
    records = (qc_dir / "uniref50_train_filt.fasta").read_text().split(">")[1:301]
    path.write_text("".join(">" + (r if i % 7 else r[: r.index("\n") + 1] + r[r.index("\n") + 1 :].lower())
                            for i, r in enumerate(records)))
    return path


@pytest.fixture(scope="module")
def qc_tree(qc_dir, tmp_path_factory, dask_cluster):
    """NVIDIA's QC sample in all three layouts, from one run, inputs copied beside it."""
    from esm2dask.config import ClusterConfig

    base = tmp_path_factory.mktemp("contract")
    test = _test_fasta(qc_dir, base / "test_records.fasta")
    out = base / "out"
    cluster = ClusterConfig(scheduler_address=dask_cluster.scheduler_address, dashboard_address=None)
    # 1 MB byte ranges: uf90 in 5, so hf/train in 5 parts
    run_preprocess(qc_dir, out, cluster, formats=ALL, uf90=str(qc_dir / "ur90_ur50_sampler.fasta"),
                   val=str(qc_dir / "uniref50_train_filt.fasta"), test=str(test), partition_size="1MB")
    yield from kept_unchanged(out, out)


def _uf90_place(tree: Path, part: str, row: int) -> str:
    """Where row ``row`` of ``hf/train/<part>`` sits in the uf90 CSV shards (line 1 is the header)."""
    import pyarrow.parquet as pq

    from esm2dask.layout import shard_bounds

    parts = sorted((tree / "hf/train").glob("part-*.parquet"))
    position = sum(pq.ParquetFile(p).metadata.num_rows for p in parts[: [p.name for p in parts].index(part)]) + row
    bounds = shard_bounds(11296, 50)
    shard = int(np.searchsorted(bounds, position, side="right")) - 1
    return f"uf90/uf90_csvs/x{shard:03d}.csv line {position - int(bounds[shard]) + 2}"


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
    assert "a" <= min((tree / "uf50/test/x000.csv").read_text().split("\n")[1].split(",")[3]), \
        "uf50/test keeps the lower case of its FASTA"
    result = verify(tree)
    assert result.exit_code == 0, result.output
    for what in ("input copies against the manifest", "counts against mapping.tsv", "bionemo2", "hf"):
        assert f"checked: {what}" in result.output


def test_manifest_lists_every_copy_with_its_sha256(qc_tree, qc_dir):
    manifest = json.loads((qc_tree / MANIFEST).read_text())
    copies = manifest["copied_inputs"]
    assert set(copies) == {"README.md", "mapping.tsv", "uniref50_train_filt.fasta", "ur90_ur50_sampler.fasta",
                           "test_records.fasta"}
    for name, entry in copies.items():
        # an independent digest of the input itself (the copy must hold exactly its bytes)
        source = qc_dir / name if name != "test_records.fasta" else qc_tree.parent / name
        assert entry["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest(), name


# ----------------------------------------------------------------------------- the copies


def test_a_byte_changed_in_a_copy_is_found(tree):
    names = ["README.md", "uniref50_train_filt.fasta", "mapping.tsv"]
    for name in names:
        path = tree / name
        data = bytearray(path.read_bytes())
        i = len(data) // 2
        data[i] = ord("x") if data[i] != ord("x") else ord("y")  # same size
        path.write_bytes(bytes(data))
    result = verify(tree)
    for name in names:
        assert_caught(result, f"{name}: SHA-256 differs from the manifest's")


# ----------------------------------------------------------------------------- ESM2nv rows


def test_lower_case_and_illegal_characters_in_rows(tree):
    """Each in a file of its own (verify names the first bad row of each kind per file)."""
    tampered, expected = [], []
    for rel, line in (("uf50/train/x003.csv", 5), ("uf90/uf90_csvs/x010.csv", 17)):
        name, _ = edit_row(tree / rel, line, lower_one)
        tampered.append(rel)
        expected.append((f"{rel}: line {line}", repr(name), "lower case"))
    for rel, char in (("uf50/val/x001.csv", "\x01"), ("uf50/test/x004.csv", "é"), ("uf90/uf90_csvs/x000.csv", "\x7f"),
                      ("uf50/train/x007.csv", " ")):
        name, _ = edit_row(tree / rel, 4, lambda s: s[:5] + char + s[6:])
        tampered.append(rel)
        expected.append((f"{rel}: line 4", repr(name), f"sequence has {char!r} at position 6, not a legal"))
    rel = "uf50/test/x001.csv"
    lines = (tree / rel).read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b",UniRef50_", b",UniRef50\x02", 1)
    (tree / rel).write_bytes(b"\n".join(lines))
    tampered.append(rel)
    expected.append((f"{rel}: line 3", "record_name", "not a legal name"))
    reseal(tree, *tampered)
    result = verify(tree)
    for needles in expected:
        assert_caught(result, *needles)


def test_lower_case_in_val_is_kept_and_passes(tree):
    """uf50/val keeps the case of its FASTA (docs/esm2-layout.md): not a problem there, and
    the upper-cased copies in bionemo2/hf still match it."""
    rel = "uf50/val/x002.csv"
    edit_row(tree / rel, 3, lower_one)
    reseal(tree, rel)
    result = verify(tree)
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------- counts/starts


def test_swapped_counts_are_found_against_the_mapping(tree):
    keep_layouts(tree, "esm2nv")  # bionemo2's train_clusters.parquet would give it away too
    counts_path, starts_path = tree / "uf50/train/counts.mmap", tree / "uf50/train/starts.mmap"
    counts = np.fromfile(counts_path, dtype="<u8")
    assert counts[4] == 1 and counts[5] == 2  # docs/esm2-layout.md: counts[:10] = 1 1 1 1 1 2 …
    counts[[4, 5]] = counts[[5, 4]]
    counts.tofile(counts_path)
    np.concatenate(([0], np.cumsum(counts)[:-1])).astype("<u8").tofile(starts_path)  # consistent with the swap
    reseal(tree, "uf50/train/counts.mmap", "uf50/train/starts.mmap")
    line = assert_caught(verify(tree), "uf50/train/counts.mmap", "cluster 4", "mapping.tsv line 6 lists 1")
    assert "(2 such clusters)" in line


# ----------------------------------------------------------------------------- bionemo2 / hf


def _change_db_sequence(path: Path, rowid: int, new=None) -> str:
    con = sqlite3.connect(str(path), isolation_level=None)
    ident, seq = con.execute("SELECT id, sequence FROM protein WHERE rowid = ?", (rowid,)).fetchone()
    new = new or seq[:-1] + ("A" if seq[-1] != "A" else "C")  # still legal and upper case
    con.execute("UPDATE protein SET sequence = ? WHERE rowid = ?", (new, rowid))
    con.close()
    return ident


def _change_hf_sequence(path: Path, row: int, new=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    seqs = table.column("sequence").to_pylist()
    seqs[row] = new or (seqs[row][::-1] if seqs[row] != seqs[row][::-1] else seqs[row] + "A")
    pq.write_table(table.set_column(2, "sequence", pa.array(seqs, pa.string())), path)


def test_changed_sequences_in_bionemo2_and_hf(tree):
    """Legal, upper-case, ids untouched: only the comparison with the ESM2nv rows finds them."""
    expected = []
    for db, rowid, reference in (("train.db", 37, "uf90/uf90_csvs"), ("validation.db", 40, "uf50/val"),
                                 ("test.db", 12, "uf50/test")):
        ident = _change_db_sequence(tree / "bionemo2" / db, rowid)
        reseal(tree, f"bionemo2/{db}")
        expected.append((f"bionemo2/{db}: the sequence of {ident!r} differs from {reference} ({reference}/x",))
    # hf/validation is one part (5,001 rows), x000.csv holds its first 101: x001.csv line 9 is row 108
    for rel, reference, row in (("hf/train/part-00003.parquet", _uf90_place(tree, "part-00003.parquet", 7), 7),
                                ("hf/validation/part-00000.parquet", "uf50/val/x001.csv line 9", 101 + 7),
                                ("hf/test/part-00000.parquet", "uf50/test/x000.csv line 4", 2)):
        _change_hf_sequence(tree / rel, row)
        reseal(tree, rel)
        expected.append((f"{rel}: row {row}: sequence differs from {reference.split('/x')[0]} ({reference})",))
    result = verify(tree)
    for needles in expected:
        assert_caught(result, *needles)


def test_without_the_esm2nv_tree_sequences_are_legal_and_upper_case(tree):
    keep_layouts(tree, "bionemo2", "hf")
    train = _change_db_sequence(tree / "bionemo2/train.db", 5, "MKV,LA")
    val = _change_db_sequence(tree / "bionemo2/validation.db", 6, "MKVlA")
    _change_hf_sequence(tree / "hf/train/part-00002.parquet", 4, "MK*\x03LA")
    _change_hf_sequence(tree / "hf/test/part-00000.parquet", 2, "MKVÉA")
    reseal(tree, "bionemo2/train.db", "bionemo2/validation.db", "hf/train/part-00002.parquet",
           "hf/test/part-00000.parquet")
    result = verify(tree)
    assert_caught(result, f"bionemo2/train.db: the sequence of {train!r} has ','", "not a legal sequence character")
    assert_caught(result, f"bionemo2/validation.db: the sequence of {val!r} has lower case")
    assert_caught(result, "hf/train/part-00002.parquet: row 4: sequence has '\\x03' at position 4")
    assert_caught(result, "hf/test/part-00000.parquet: row 2: sequence has 'É' at position 4")


def test_a_copy_named_outside_the_tree_is_never_read(tree):
    (tree.parent / "victim.txt").write_text("outside OUT\n")
    (tree / "linked.fasta").symlink_to(tree.parent / "victim.txt")
    manifest = json.loads((tree / MANIFEST).read_text())
    for name in ("../victim.txt", "linked.fasta"):
        manifest["copied_inputs"][name] = {"bytes": 12, "sha256": "0" * 64}
    (tree / MANIFEST).write_text(json.dumps(manifest))
    result = verify(tree)
    assert_caught(result, "'../victim.txt': an input copy must be a file name inside the tree; not read")
    assert_caught(result, "linked.fasta: input copy is a symbolic link; not followed")
    assert not any("SHA-256" in p for p in problems(result)), result.output
