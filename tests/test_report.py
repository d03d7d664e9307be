"""``esm2dask report``: what it finds, checked against what was planted and against an
independent count.

The oracle reads the ESM2nv CSVs with the ``csv`` module and the raw ``mapping.tsv`` with
plain line splitting; no polars, pyarrow or numpy. The planted tree is built from FASTAs
written here, with known duplicates, so that the report must name each of them and
nothing else, in every layout. The page is opened in headless Chromium, offline.
"""

from __future__ import annotations

import bisect
import csv
import json
import logging
import os
import random
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from conftest import assert_one_line_error, run_preprocess

ALL = ("esm2nv", "bionemo2", "hf")
STANDARD = "ACDEFGHIKLMNPQRSTVWY"


def _cluster(dask_cluster):
    from esm2dask.config import ClusterConfig

    return ClusterConfig(scheduler_address=dask_cluster.scheduler_address, dashboard_address=None)


def _report(out: Path, dask_cluster, layout: str | None = None) -> dict:
    from esm2dask.report import ReportConfig, build_report

    report, folder = build_report(ReportConfig(str(out), _cluster(dask_cluster), layout))
    assert folder == str(out / "esm2dask-report")
    assert json.loads((out / "esm2dask-report" / "report.json").read_text()) == report
    return report


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# ----------------------------------------------------------------------------- the digest


def test_the_digest_is_murmurhash3_x64_128():
    """The numba digest equals the reference C implementation (mmh3) at every tail length,
    on a sliced array too (offsets not starting at 0)."""
    mmh3 = pytest.importorskip("mmh3")
    import polars as pl

    from esm2dask.report import digests_of

    r = random.Random(3)
    values = ["".join(r.choices("ACDEFGHIKLMNPQRSTVWYXBZUO,-#", k=n)) for n in range(70)]
    values += ["".join(r.choices(STANDARD, k=r.randint(0, 3000))) for _ in range(300)]
    series = pl.Series(values)
    for lo, hi in ((0, len(values)), (5, 77), (69, 70)):
        want = b"".join(mmh3.hash_bytes(v.encode(), 0, True) for v in values[lo:hi])
        assert digests_of(series.slice(lo, hi - lo)) == want


# ----------------------------------------------------------------------------- the planted tree

rng = random.Random(19)


def _seq(n: int) -> str:
    return "".join(rng.choice(STANDARD) for _ in range(n))


def _fasta(path: Path, records: list[tuple[str, str]]) -> None:
    with open(path, "w") as f:
        for name, seq in records:
            f.write(f">{name} planted\n")
            for i in range(0, len(seq), 60):
                f.write(seq[i : i + 60] + "\n")


LEAKED = _seq(300)  # a validation sequence that also sits in a training cluster
TWIN = _seq(200)  # two training members with the same sequence


@pytest.fixture(scope="module")
def planted(tmp_path_factory, dask_cluster):
    """A raw set with known duplicates, converted into all three layouts."""
    raw = tmp_path_factory.mktemp("planted") / "raw"
    raw.mkdir()
    clusters = {f"UniRef50_C{c}": [f"M{c}_{m}" for m in range(1 + c % 3)] for c in range(12)}
    members = {m: _seq(50 + 37 * i) for i, m in enumerate(x for ms in clusters.values() for x in ms)}
    members["M4_1"] = LEAKED
    members["M2_0"] = TWIN
    members["M7_1"] = TWIN
    members["M9_0"] = _seq(40) + "U" + _seq(1100)  # beyond the crop, one non-standard letter
    with open(raw / "mapping.tsv", "w") as f:
        f.write("UR50_cluster_name\tmapped_id\n")
        for c, ms in clusters.items():
            f.write(f"{c}\t{','.join(ms)}\n")
    _fasta(raw / "uniref50_train_filt.fasta", [(c, _seq(120 + i)) for i, c in enumerate(clusters)])
    _fasta(raw / "uniref90membersandreps_ur50trainfiltreps.fasta", list(members.items()))
    # validation: the leaked sequence in lower case (compared upper-cased), and a record
    # named like a training member (a different sequence): one id in two splits
    _fasta(raw / "uniref50_valid.fasta", [("UniRef50_V0", _seq(90)), ("UniRef50_V1", LEAKED.lower()),
                                          ("M5_2", _seq(95)), ("UniRef50_V3", _seq(99))])
    _fasta(raw / "test.fasta", [("UniRef50_T0", _seq(80)), ("UniRef50_T1", _seq(81))])
    out = raw.parent / "out"
    run_preprocess(raw, out, _cluster(dask_cluster), formats=ALL, test=str(raw / "test.fasta"))
    return out


@pytest.fixture(scope="module")
def planted_reports(planted, dask_cluster):
    """``planted_reports(layout)``: the report of the planted tree read in ``layout``, built
    once per layout (each build rewrites planted/esm2dask-report)."""
    reports = {}

    def report_of(layout: str) -> dict:
        if layout not in reports:
            reports[layout] = _report(planted, dask_cluster, layout)
        return reports[layout]

    return report_of


def _ids_of(examples, key):
    return [sorted(e[key]["ids"]) for e in examples]


@pytest.mark.parametrize("layout", ALL)
def test_planted_duplicates_are_named_and_nothing_else(planted_reports, layout):
    report = planted_reports(layout)
    lk = report["leakage"]
    assert report["headline"].startswith("LEAKAGE: 1 sequence(s) in both train/val; 1 id(s) in both train/val")
    assert lk["found"] is True and lk["hash_collisions"] == 0
    # the leaked sequence: the training member on one side, the validation record on the other
    assert [(e["pair"], e["a"]["ids"], e["b"]["ids"]) for e in lk["between_splits_examples"]] == [
        ("train/val", ["M4_1"], ["UniRef50_V1"])
    ]
    assert {p: v["sequences"] for p, v in lk["between_splits"].items() if v["sequences"]} == {"train/val": 1}
    # the twins, inside training
    assert [(e["split"], e["ids"]) for e in lk["within_split_examples"]] == [("train", ["M2_0", "M7_1"])]
    assert {s: v["groups"] for s, v in lk["within_split"].items() if v["groups"]} == {"train": 1}
    # the id in two splits
    assert [(e["pair"], e["id"]) for e in lk["ids_in_two_splits_examples"]] == [("train/val", "M5_2")]
    assert {p: n for p, n in lk["ids_in_two_splits"].items() if n} == {"train/val": 1}
    assert lk["repeated_id_examples"] == [] and not any(v["ids"] for v in lk["repeated_ids"].values())
    expected_splits = ["train", "uf50-train", "val", "test"] if layout == "esm2nv" else ["train", "val", "test"]
    assert list(report["splits"]) == expected_splits
    assert "test/val" not in lk["pairs_compared"] and "val/test" in lk["pairs_compared"]
    train = report["splits"]["train"]
    assert train["nonstandard"]["letters"] == {"U": 1} and train["nonstandard"]["examples"] == {"U": ["M9_0"]}
    assert train["beyond_crop"]["rows"] == 1 and train["beyond_crop"]["residues"] == 1141 - 1022
    assert report["splits"]["val"]["lowercase_residues"] == (300 if layout == "esm2nv" else 0)
    assert report["clusters"]["clusters"] == 12 and report["clusters"]["members"] == 24
    assert report["clusters"]["largest"][0]["members"] == 3


def test_the_layouts_agree(planted_reports):
    """The same numbers from the CSVs, the SQLite databases and the parquet parts."""
    reports = {layout: planted_reports(layout) for layout in ALL}
    keys = ("rows", "residues", "length_histogram", "beyond_crop", "composition", "nonstandard")
    for split in ("train", "val", "test"):
        want = {k: reports["esm2nv"]["splits"][split][k] for k in keys}
        for layout in ("bionemo2", "hf"):
            assert {k: reports[layout]["splits"][split][k] for k in keys} == want, (layout, split)
    sizes = reports["esm2nv"]["clusters"]["size_counts"]
    assert reports["bionemo2"]["clusters"]["size_counts"] == sizes == reports["hf"]["clusters"]["size_counts"]
    assert reports["hf"]["clusters"]["largest"] == reports["esm2nv"]["clusters"]["largest"]


def test_random_split_counts_only_the_train_clusters_members(planted, tmp_path, dask_cluster):
    """v1.0's random split: uf90 holds every cluster's members, training only the train clusters'."""
    raw = planted.parent / "raw"
    out = tmp_path / "random"
    run_preprocess(raw, out, _cluster(dask_cluster), split="random", val_size=3, test_size=2, seed=1)
    report = _report(out, dask_cluster)
    lines = (raw / "mapping.tsv").read_text().split("\n")[1:]
    members = {c: m.split(",") for c, m in (line.split("\t") for line in lines if line)}
    held_out = [row[1] for d in ("uf50/val", "uf50/test") for p in sorted((out / d).glob("x*.csv"))
                for row in list(csv.reader(open(p)))[1:]]
    assert len(held_out) == 5
    excluded = {m for c in held_out for m in members[c]}
    train = report["splits"]["train"]
    assert train["rows"] == 24 - len(excluded) and train["excluded_rows"] == len(excluded)
    named = {i for e in report["leakage"]["within_split_examples"] for i in e["ids"]}
    assert named == ({"M2_0", "M7_1"} if not {"M2_0", "M7_1"} & excluded else set())
    assert report["clusters"]["clusters"] == 12 - 5


# ----------------------------------------------------------------------------- the QC sample


@pytest.fixture(scope="module")
def qc_report(qc_esm2nv, tmp_path_factory, dask_cluster):
    """The report of a copy of the session's QC tree (the report is written into the tree)."""
    out = tmp_path_factory.mktemp("qc-report") / "out"
    shutil.copytree(qc_esm2nv[0], out)
    return out, _report(out, dask_cluster)


def _oracle_split(folder: Path, edges: list[int]) -> dict:
    rows = residues = beyond_rows = beyond_residues = 0
    letters: Counter = Counter()
    hist = [0] * (len(edges) - 1)
    examples: dict[str, list[str]] = {}
    for path in sorted(folder.glob("x*.csv")):
        with open(path, newline="") as f:
            reader = csv.reader(f)
            assert next(reader) == ["record_id", "record_name", "sequence_length", "sequence"]
            for _, name, _, seq in reader:
                seq = seq.upper()
                rows += 1
                residues += len(seq)
                letters.update(seq)
                hist[min(bisect.bisect_right(edges, len(seq)) - 1, len(hist) - 1)] += 1
                if len(seq) > 1022:
                    beyond_rows += 1
                    beyond_residues += len(seq) - 1022
                for letter in sorted(set(seq) - set(STANDARD)):
                    if len(examples.setdefault(letter, [])) < 3:
                        examples[letter].append(name)
    other = {k: v for k, v in sorted(letters.items()) if k not in STANDARD}
    return {"rows": rows, "residues": residues, "hist": hist, "beyond": (beyond_rows, beyond_residues),
            "composition": {a: letters[a] for a in STANDARD}, "other": other,
            "examples": {k: examples[k] for k in other}}


def test_qc_numbers_equal_an_independent_count(qc_report, qc_dir):
    out, report = qc_report
    folders = {"train": "uf90/uf90_csvs", "uf50-train": "uf50/train", "val": "uf50/val", "test": "uf50/test"}
    assert list(report["splits"]) == list(folders)
    for split, rel in folders.items():
        s = report["splits"][split]
        want = _oracle_split(out / rel, s["length_histogram"]["edges"])
        assert s["rows"] == want["rows"] and s["residues"] == want["residues"], split
        assert s["length_histogram"]["counts"] == want["hist"], split
        assert (s["beyond_crop"]["rows"], s["beyond_crop"]["residues"]) == want["beyond"], split
        assert s["beyond_crop"]["rows_share"] == want["beyond"][0] / want["rows"]
        assert s["beyond_crop"]["residues_share"] == want["beyond"][1] / want["residues"]
        assert s["composition"] == want["composition"], split
        assert s["nonstandard"]["letters"] == want["other"], split
        assert s["nonstandard"]["examples"] == want["examples"], split
    assert report["splits"]["train"]["rows"] == 11_296 and report["splits"]["uf50-train"]["rows"] == 5_001
    assert report["splits"]["test"]["same_as"] == "val"  # both from one FASTA here
    assert report["splits"]["train"]["nonstandard"]["letters"], "the sample has X and friends"
    # clusters, from the raw mapping.tsv by line splitting
    lines = (qc_dir / "mapping.tsv").read_text().split("\n")[1:]
    members = {c: m.split(",") for c, m in (line.split("\t")[:2] for line in lines if line)}
    sizes = Counter(len(m) for m in members.values())
    c = report["clusters"]
    assert c["size_counts"] == {str(k): sizes[k] for k in sorted(sizes)}
    assert c["clusters"] == 5_001 and c["members"] == 11_296 and c["max_members"] == 152
    largest = sorted(((-len(m), cid) for cid, m in members.items()))[:20]
    assert [(x["id"], x["members"]) for x in c["largest"]] == [(cid, -n) for n, cid in largest]


def test_qc_leakage_against_a_plain_join(qc_report):
    """val and test are the training FASTA here: every representative is in val."""
    out, report = qc_report
    lk = report["leakage"]

    def read(rel):
        rows = []
        for path in sorted((out / rel).glob("x*.csv")):
            with open(path, newline="") as f:
                rows += [(name, seq.upper()) for _, name, _, seq in list(csv.reader(f))[1:]]
        return rows

    uf90, uf50, val = read("uf90/uf90_csvs"), read("uf50/train"), read("uf50/val")
    for label, a_rows in (("train", uf90), ("uf50-train", uf50)):
        shared = {s for _, s in a_rows} & {s for _, s in val}
        got = lk["between_splits"][f"{label}/val"]
        assert got["sequences"] == len(shared)
        assert got[f"{label}_rows"] == sum(1 for _, s in a_rows if s in shared)
    for label, rows in (("train", uf90), ("uf50-train", uf50), ("val", val)):
        groups = Counter(s for _, s in rows)
        assert lk["within_split"][label]["groups"] == sum(1 for n in groups.values() if n > 1), label
        assert lk["within_split"][label]["extra_rows"] == sum(n - 1 for n in groups.values() if n > 1)
    assert lk["ids_in_two_splits"]["uf50-train/val"] == 5_001
    assert lk["pairs_compared"] == ["train/val", "uf50-train/val"]  # test: the same records as val
    assert report["headline"].startswith("LEAKAGE:")


def _weak_first_half(data, starts, lengths):
    """A digest that collides all the time: equal for values of equal length mod 7."""
    import numpy as np

    return np.stack([(lengths % 7).astype(np.uint64), np.zeros(len(lengths), dtype=np.uint64)], axis=1)


def _weak_second_half(data, starts, lengths):
    """Equal first halves whose second halves differ (the join must not group on one half)."""
    import numpy as np

    return np.stack([(lengths % 2).astype(np.uint64), (lengths % 5).astype(np.uint64)], axis=1)


def _in_process_report(out: Path, layout: str | None = None) -> dict:
    """The report computed by threads of this process (a monkeypatch reaches its tasks)."""
    from esm2dask.config import ClusterConfig
    from esm2dask.report import ReportConfig, build_report

    cluster = ClusterConfig(workers=2, processes=False, dashboard_address=None)
    return build_report(ReportConfig(str(out), cluster, layout))[0]


def _without_timings(report: dict) -> dict:
    report = json.loads(json.dumps(report))
    for key in ("seconds", "stage_seconds"):
        report.pop(key)
    report["leakage"].pop("hash_collisions")
    return report


def test_suspects_are_grouped_on_all_128_bits():
    """Rows are read back only where the whole digest repeats in a way that could be a
    finding: two rows of one split, or both splits of a compared pair."""
    import numpy as np

    from esm2dask.report import KEY, SPLITS, _suspects

    def keys(*digests):
        out = np.zeros(len(digests), dtype=KEY)
        out["h1"], out["h2"] = [d[0] for d in digests], [d[1] for d in digests]
        out["k"] = range(len(digests))
        return out

    train, uf50, val = SPLITS.index("train"), SPLITS.index("uf50-train"), SPLITS.index("val")
    pairs = [(train, val), (uf50, val)]
    # first halves equal, second ones not, interleaved inside one piece: one pair repeats
    found = _suspects([keys((1, 1), (1, 2), (1, 1), (1, 3))], [train], pairs)
    assert sorted(zip(found[0].tolist(), found[1].tolist())) == [(0, 0), (0, 2)]
    assert set(zip(found[2].tolist(), found[3].tolist())) == {(1, 1)}
    # train and uf50-train share a digest (a representative and its member): not compared
    assert _suspects([keys((5, 5)), keys((5, 5), (6, 1))], [train, uf50], pairs) is None
    # train and val share one: both rows; val's other row has the first half only
    found = _suspects([keys((5, 5)), keys((5, 6), (5, 5))], [train, val], pairs)
    assert sorted(zip(found[0].tolist(), found[1].tolist())) == [(0, 0), (1, 1)]


@pytest.mark.parametrize("seed", range(6))
def test_suspects_equal_a_plain_grouping(seed):
    """Against a dict of the digests: pieces of any size and split, digests that repeat,
    that differ only in the low bits of the first half (the bits the sort gives to the
    split and row), or only in the second half, and big runs of one digest."""
    import numpy as np

    from esm2dask.report import KEY, PAIRS, SPLITS, _suspects

    r = random.Random(seed)
    pool = [(r.getrandbits(64), r.getrandbits(64)) for _ in range(40)]
    pool += [((pool[0][0] & ~0xFFFFFF) | r.getrandbits(24), pool[0][1]) for _ in range(10)]  # low bits only
    pool += [(pool[1][0], r.getrandbits(64)) for _ in range(10)]  # second half only
    pool += [(r.getrandbits(64), r.getrandbits(64)) for _ in range(400)]  # mostly unique
    pieces, codes = [], []
    for _ in range(r.randint(1, 7)):
        n = r.choice([0, 1, 2, r.randint(3, 300), 2000])
        digests = [pool[0] if n == 2000 else r.choice(pool) for _ in range(n)]
        keys = np.zeros(n, dtype=KEY)
        keys["h1"], keys["h2"] = [d[0] for d in digests], [d[1] for d in digests]
        keys["k"] = r.sample(range(10 * n + 1), n)  # rows of the piece, in bucket order
        pieces.append(keys)
        codes.append(r.randrange(len(SPLITS)))
    pairs = [(SPLITS.index(a), SPLITS.index(b)) for a, b in PAIRS if r.random() < 0.7]
    groups: dict = {}
    for j, keys in enumerate(pieces):
        for h1, h2, k in keys.tolist():
            groups.setdefault((h1, h2), []).append((j, k))
    want = set()
    for digest, rows in groups.items():
        per_split = Counter(codes[j] for j, _ in rows)
        if any(c > 1 for c in per_split.values()) or any(per_split[a] and per_split[b] for a, b in pairs):
            want |= {(j, k) + digest for j, k in rows}
    found = _suspects(pieces, codes, pairs)
    got = set() if found is None else set(zip(*(a.tolist() for a in found)))
    assert got == want and (found is None or len(found[0]) == len(want))


@pytest.mark.parametrize("weak", [_weak_first_half, _weak_second_half])
@pytest.mark.parametrize("layout", ALL)
def test_findings_are_confirmed_on_the_values_not_the_digests(planted, dask_cluster, monkeypatch, layout, weak):
    """With a digest that collides for most rows, the report is the same, down to every
    example: only the hash-collision count tells."""
    from esm2dask import report as report_module

    want = _report(planted, dask_cluster, layout)
    monkeypatch.setattr(report_module, "murmur3_128", weak)
    got = _in_process_report(planted, layout)
    assert got["leakage"]["hash_collisions"] > 0 and want["leakage"]["hash_collisions"] == 0
    assert _without_timings(got) == _without_timings(want)


def test_qc_leakage_with_a_colliding_digest(qc_report, monkeypatch):
    """The QC tree (every representative in val) with every row's digest in one of 7
    values: every count and example as with the real digest."""
    from esm2dask import report as report_module

    out, want = qc_report
    monkeypatch.setattr(report_module, "murmur3_128", _weak_first_half)
    got = _in_process_report(out)
    assert got["leakage"]["hash_collisions"] > 1000
    assert _without_timings(got) == _without_timings(want)


@pytest.mark.parametrize("row, where, what", [
    ("7,M 1,3,AAA\n", "line 3", "record_name"),
    ("7,M1,3,AA\x01A\n", "line 3", "a byte in sequence"),
    ('7,M1,3,AA"A\n', "line 3", "a byte in sequence"),
    ("7,M1,AAA\n", "line 3", "four fields"),
    ("7,M1,3,AA,A\n", "line 3", "four fields"),
])
def test_a_bad_row_is_one_error_line_naming_file_and_line(planted, tmp_path, dask_cluster, row, where, what):
    out = tmp_path / "out"
    shutil.copytree(planted / "uf50", out / "uf50")
    shard = out / "uf50/val/x000.csv"
    lines = shard.read_bytes().split(b"\n")
    shard.write_bytes(b"\n".join(lines[:2] + [row.encode().rstrip(b"\n")] + lines[2:]))
    before = _snapshot(out)
    result = invoke("report", out, "--scheduler-address", dask_cluster.scheduler_address)
    assert_one_line_error(result, "uf50/val/x000.csv", where, what)
    assert _snapshot(out) == before


def _short_rows_shard(path: Path, n: int, bad_at: int | None = None) -> None:
    """``n`` rows of 1 to 4 residues (any letter, either case), far shorter than the
    room the parser first makes (32 bytes a row); a bad row at line ``bad_at``."""
    letters = STANDARD + "XBZUOJ" + STANDARD.lower() + "xbz"
    with open(path, "w", newline="") as f:
        f.write("record_id,record_name,sequence_length,sequence\n")
        for i in range(n):
            seq = "".join(rng.choice(letters) for _ in range(1 + i % 4))
            f.write(f"{i},S{i},{len(seq)},{seq}\n" if i + 2 != bad_at else f"{i},S {i},1,A\n")


def test_rows_shorter_than_the_first_guess_are_all_counted(planted, tmp_path, dask_cluster):
    out = tmp_path / "out"
    shutil.copytree(planted / "uf50", out / "uf50")
    _short_rows_shard(out / "uf50/val/x000.csv", 5_000)
    s = _report(out, dask_cluster)["splits"]["val"]
    want = _oracle_split(out / "uf50/val", s["length_histogram"]["edges"])
    assert s["rows"] == want["rows"] > 5_000 and s["residues"] == want["residues"]  # and the other shards
    assert s["length_histogram"]["counts"] == want["hist"]
    assert s["composition"] == want["composition"]
    assert s["nonstandard"]["letters"] == want["other"] and s["nonstandard"]["examples"] == want["examples"]


def test_a_bad_row_after_the_first_guess_names_its_line(planted, tmp_path, dask_cluster):
    out = tmp_path / "out"
    shutil.copytree(planted / "uf50", out / "uf50")
    _short_rows_shard(out / "uf50/val/x000.csv", 5_000, bad_at=4_321)
    result = invoke("report", out, "--scheduler-address", dask_cluster.scheduler_address)
    assert_one_line_error(result, "uf50/val/x000.csv", "line 4321", "record_name")


# ----------------------------------------------------------------------------- the command


def _snapshot(out: Path) -> dict:
    """Every path under OUT but the report folder, with its kind, size and mtime."""
    snap = {}
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(out))
            if rel.split(os.sep)[0] == "esm2dask-report":
                continue
            st = p.lstat()
            snap[rel] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return snap


def test_cli_json_exit_codes_and_nothing_else_touched(planted, dask_cluster):
    before = _snapshot(planted)
    address = dask_cluster.scheduler_address
    result = invoke("report", planted, "--scheduler-address", address, "--json", "--plain")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["headline"].startswith("LEAKAGE:")
    files = sorted(p.name for p in (planted / "esm2dask-report").iterdir())
    assert files == sorted(["report.html", "report.json", *report["plots"]])
    assert {"lengths-train.png", "composition.png", "cluster-sizes.png"} <= set(report["plots"])
    result = invoke("report", planted, "--scheduler-address", address, "--fail-on-leakage", "--plain")
    assert result.exit_code == 3
    assert result.stdout.splitlines()[0].startswith("LEAKAGE: 1 sequence(s) in both train/val")
    assert _snapshot(planted) == before


def test_the_dashboard_starts_only_when_asked_for(planted, tmp_path):
    """A report lasts seconds: no dashboard by default; ``--dashboard-address`` starts one
    and its link is said."""
    from esm2dask.config import ClusterConfig
    from esm2dask.progress import Reporter
    from esm2dask.report import ReportConfig, build_report

    from cli.report_cmd import report as report_command

    class Said(Reporter):
        def __init__(self):
            super().__init__()
            self.said = []

        def message(self, text):
            self.said.append(text)

    assert next(p for p in report_command.params if p.name == "dashboard_address").default == "none"
    assert ReportConfig(str(planted)).cluster.dashboard_address is None
    out = tmp_path / "out"
    shutil.copytree(planted, out)
    for address, links in ((None, 0), ("127.0.0.1:0", 1)):
        said = Said()
        build_report(ReportConfig(str(out), ClusterConfig(workers=1, dashboard_address=address)), said)
        dashboard = [m for m in said.said if m.startswith("Dask dashboard: http://127.0.0.1:")]
        assert len(dashboard) == links, said.said


@pytest.mark.parametrize("python", ["/nonexistent/python", "/bin/false"])
def test_the_plots_are_the_same_drawn_here_when_no_plot_process_runs(planted, tmp_path, dask_cluster,
                                                                     monkeypatch, caplog, python):
    """The plot process (a child Python) draws the PNGs; where it cannot start, or fails,
    the report draws them itself: the same bytes."""
    from esm2dask import report_html

    out = tmp_path / "out"
    shutil.copytree(planted, out)
    first = _report(out, dask_cluster)
    drawn = {name: (out / "esm2dask-report" / name).read_bytes() for name in first["plots"]}
    monkeypatch.setattr(report_html.sys, "executable", python)
    with caplog.at_level(logging.WARNING, logger="esm2dask"):
        again = _report(out, dask_cluster)
    assert again["plots"] == first["plots"]
    assert {name: (out / "esm2dask-report" / name).read_bytes() for name in again["plots"]} == drawn
    assert ("the plot process failed" in caplog.text) == (python == "/bin/false")
    assert not [p for p in os.listdir(out) if p.startswith(".esm2dask-report-")]


def test_not_our_tree_is_one_error_line(tmp_path, dask_cluster):
    (tmp_path / "notes.txt").write_text("hello")
    result = invoke("report", tmp_path, "--scheduler-address", dask_cluster.scheduler_address)
    assert_one_line_error(result, str(tmp_path), "not an output of esm2dask preprocess")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    result = invoke("report", tmp_path / "nowhere", "--scheduler-address", dask_cluster.scheduler_address)
    assert_one_line_error(result, "no such folder")


def test_a_symlink_under_out_is_never_followed(planted, tmp_path, dask_cluster):
    out = tmp_path / "out"
    shutil.copytree(planted / "uf50", out / "uf50")
    shutil.copytree(planted / "uf90", out / "uf90")
    outside = tmp_path / "outside.csv"
    shutil.move(out / "uf50/val/x001.csv", outside)
    os.symlink(outside, out / "uf50/val/x001.csv")
    before = _snapshot(out)
    result = invoke("report", out, "--scheduler-address", dask_cluster.scheduler_address)
    assert_one_line_error(result, "uf50/val/x001.csv is a symbolic link")
    assert _snapshot(out) == before and not (out / "esm2dask-report").exists()
    # a link higher up: the system would follow it in the middle of a path
    shutil.move(out / "uf90", tmp_path / "uf90-elsewhere")
    os.symlink(tmp_path / "uf90-elsewhere", out / "uf90")
    result = invoke("report", out, "--scheduler-address", dask_cluster.scheduler_address)
    assert_one_line_error(result, "uf90 is a symbolic link")
    os.remove(out / "uf90")
    shutil.move(tmp_path / "uf90-elsewhere", out / "uf90")
    # a bad shard: one line naming it, and nothing left behind
    os.remove(out / "uf50/val/x001.csv")
    (out / "uf50/val/x001.csv").write_text("id,seq\n1,AAA\n")
    before = _snapshot(out)
    result = invoke("report", out, "--scheduler-address", dask_cluster.scheduler_address)
    assert_one_line_error(result, "uf50/val/x001.csv", "header")
    assert _snapshot(out) == before and not (out / "esm2dask-report").exists()


def test_preprocess_report(planted, tmp_path, dask_cluster):
    raw = planted.parent / "raw"
    out = tmp_path / "out"
    result = invoke("preprocess", raw, "-o", out, "--test", raw / "test.fasta", "--scheduler-address",
                    dask_cluster.scheduler_address, "--plain", "--report")
    assert result.exit_code == 0, result.output
    assert "LEAKAGE: 1 sequence(s) in both train/val" in result.stdout
    assert result.output.count("Dask dashboard:") == 1  # the run's link, not the report's again
    report = json.loads((out / "esm2dask-report/report.json").read_text())
    assert report["layout"] == "esm2nv" and report["leakage"]["found"]
    check = invoke("verify", out)  # the report folder is not part of the tree
    assert check.exit_code == 0, check.output


# ----------------------------------------------------------------------------- the page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_opens_offline_in_chromium_and_shows_the_plots(planted, dask_cluster, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium)")
    from matplotlib.image import imread

    report = _report(planted, dask_cluster, "esm2nv")
    page = planted / "esm2dask-report" / "report.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert text.count("data:image/png;base64,") == len(report["plots"])
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    profile.mkdir()
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--proxy-server=127.0.0.1:9", f"--user-data-dir={profile}", f"--screenshot={shot}",
           "--window-size=1200,3000", page.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.exists(), "Chromium wrote no screenshot"
    pixels = imread(str(shot))[:, :, :3]
    height = pixels.shape[0]
    non_white = (pixels.min(axis=2) < 0.9).mean(axis=1)  # share of non-white pixels per row
    assert non_white.mean() > 0.02, "the page looks blank"
    # the plots' blue bars (#1f77b4) are on the page: images decoded and drawn
    r, g, b = pixels[:, :, 0], pixels[:, :, 1], pixels[:, :, 2]
    blue = (abs(r - 0x1F / 255) < 0.08) & (abs(g - 0x77 / 255) < 0.08) & (abs(b - 0xB4 / 255) < 0.08)
    assert blue.sum() > 2000, f"no plot drawn in the {height}-pixel screenshot"
