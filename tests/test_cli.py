"""The command line: help everywhere, one-line errors, nothing published on failure."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
from click.testing import CliRunner

from cli.main import cli
from conftest import assert_one_line_error, kept_unchanged, tree_digest


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def all_commands(group=cli, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if hasattr(cmd, "commands"):
            yield from all_commands(cmd, (*prefix, name))


@pytest.mark.parametrize("command", list(all_commands()), ids=" ".join)
def test_every_command_has_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output
    doc = cli
    for part in command:
        doc = doc.commands[part]
    assert doc.help, f"{' '.join(command)} has no help text"


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory):
    from esm2dask.synth import synth

    raw = tmp_path_factory.mktemp("raw") / "set"
    synth(str(raw), 300, seed=2)
    return raw


def _copy_raw(small_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(small_raw, raw)
    return raw


def run_cli(raw, out, address, *extra):
    return invoke("preprocess", raw, "-o", out, "--scheduler-address", address, "--plain", *extra)


def _files_of(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def small_run(small_raw, tmp_path_factory, dask_cluster):
    """One output of ``small_raw`` by the command: ``(out, small_raw's files (name: size,
    mtime) before the run, the command's output)``."""
    before = _files_of(small_raw)
    out = tmp_path_factory.mktemp("small-out") / "out"
    result = run_cli(small_raw, out, dask_cluster.scheduler_address)
    assert result.exit_code == 0, result.output
    assert invoke("verify", out).exit_code == 0
    yield from kept_unchanged(out, (out, before, result.output))


@pytest.fixture
def small_out(small_run):
    """That output, shared: the tampering tests each spoil a copy."""
    return small_run[0]


def test_synth_preprocess_verify_roundtrip(small_raw, small_run, tmp_path, dask_cluster):
    done, _, output = small_run
    assert "uf90/uf90_csvs" in output and "MB/s" in output
    out = tmp_path / "out"
    shutil.copytree(done, out)
    manifest = json.loads((out / "esm2dask-manifest.json").read_text())
    assert manifest["outputs"]["uf50/train"]["rows"] == 300
    check = invoke("verify", out)
    assert check.exit_code == 0, check.output
    assert "OK" in check.output
    # an existing output is refused without --overwrite, replaced with it
    again = run_cli(small_raw, out, dask_cluster.scheduler_address)
    assert again.exit_code == 1 and "--overwrite" in again.output
    again = run_cli(small_raw, out, dask_cluster.scheduler_address, "--overwrite")
    assert again.exit_code == 0, again.output


def test_same_bytes_for_one_and_two_local_workers_and_any_partition_size(small_raw, tmp_path):
    """Real LocalClusters started by the command itself."""
    digests = []
    for workers, partition in (("1", "64MiB"), ("2", "7KB")):
        out = tmp_path / f"out{workers}"
        result = invoke(
            "preprocess", small_raw, "-o", out, "--workers", workers, "--partition-size", partition,
            "--dashboard-address", ":0", "--plain",
        )
        assert result.exit_code == 0, result.output
        digests.append(tree_digest(out))
    assert digests[0] == digests[1]
    assert len(digests[0]) == 4 * 50 + 2


def _assert_clean_failure(result, out, *needles):
    assert_one_line_error(result, *needles)
    assert not (out / "uf50").exists() and not (out / "uf90").exists()
    assert not out.exists() or not [p for p in out.iterdir() if p.name.startswith(".esm2dask")]


def _edit(path, old: bytes, new: bytes, count=1):
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, count))


BAD_INPUTS = {
    "missing-file": lambda raw: (raw / "uniref90membersandreps_ur50trainfiltreps.fasta").unlink(),
    "empty-file": lambda raw: (raw / "mapping.tsv").write_bytes(b""),
    "text-before-first-header": lambda raw: _edit(raw / "uniref50_train_filt.fasta", b">", b"junk\n>"),
    "empty-record-id": lambda raw: _edit(raw / "uniref50_valid.fasta", b">UniRef50_", b"> UniRef50_"),
    "malformed-mapping-line": lambda raw: _edit(raw / "mapping.tsv", b"\tA0A", b" A0A"),
    "mapping-id-missing-from-fasta": lambda raw: _edit(raw / "mapping.tsv", b"_DANRE", b"_NOSUCH", 3),
    "comma-in-sequence": lambda raw: _edit(raw / "uniref90membersandreps_ur50trainfiltreps.fasta", b"\nM", b"\nM,"),
    "gzip-input": lambda raw: (raw / "uniref50_valid.fasta").write_bytes(
        gzip.compress((raw / "uniref50_valid.fasta").read_bytes())
    ),
}
WHERE = {
    "missing-file": ("uniref90membersandreps", "no such file"),
    "empty-file": ("mapping.tsv", "byte 0", "empty"),
    "text-before-first-header": ("uniref50_train_filt.fasta", "byte 0", "text before"),
    "empty-record-id": ("uniref50_valid.fasta", "byte 0", "empty record id"),
    "malformed-mapping-line": ("mapping.tsv", "line 2", "malformed mapping line"),
    "mapping-id-missing-from-fasta": ("uniref90membersandreps", "_NOSUCH", "not in this FASTA"),
    "comma-in-sequence": ("uniref90membersandreps", "byte ", "record '", "corrupt"),
    "gzip-input": ("uniref50_valid.fasta", "gzip", "decompress"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_error(case, small_raw, tmp_path, dask_cluster):
    raw = _copy_raw(small_raw, tmp_path)
    BAD_INPUTS[case](raw)
    out = tmp_path / "out"
    result = run_cli(raw, out, dask_cluster.scheduler_address)
    _assert_clean_failure(result, out, *WHERE[case])


def test_unwritable_output(small_raw, tmp_path, dask_cluster):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    result = run_cli(small_raw, out, dask_cluster.scheduler_address)
    assert result.exit_code == 1 and "cannot write the output folder" in result.output
    assert "Traceback" not in result.output


def test_output_inside_input_is_refused(small_raw, tmp_path, dask_cluster):
    raw = _copy_raw(small_raw, tmp_path)
    result = run_cli(raw, raw / "out", dask_cluster.scheduler_address)
    assert result.exit_code == 1 and "inside it" in result.output
    assert not (raw / "out").exists()


def test_input_folder_is_left_untouched(small_raw, small_run):
    _, before, _ = small_run
    assert _files_of(small_raw) == before


def _bump_length(path):
    lines = path.read_text().splitlines(keepends=True)
    fields = lines[1].split(",")
    fields[2] = str(int(fields[2]) + 1)
    lines[1] = ",".join(fields)
    path.write_text("".join(lines))


@pytest.mark.parametrize(
    "tamper, problem",
    [
        (lambda out: (out / "uf90/uf90_csvs/x049.csv").unlink(), "missing x049.csv"),
        (lambda out: shutil.copy(out / "uf90/uf90_csvs/x000.csv", out / "uf90/uf90_csvs/x050.csv"), "extra x050.csv"),
        (lambda out: _edit(out / "uf50/train/x003.csv", b"\n20,", b"\r\n20,"), "'\\r' found"),
        (lambda out: _edit(out / "uf50/train/x001.csv", b"\n1", b"\n9"), "record_id"),
        (lambda out: _edit(out / "uf50/train/x000.csv", b"record_id,", b"id,"), "header"),
        (lambda out: (out / "uf50/train/starts.mmap").write_bytes((out / "uf50/train/counts.mmap").read_bytes()), "starts.mmap"),
        (lambda out: _bump_length(out / "uf90/uf90_csvs/x002.csv"), "sequence_length"),
    ],
    ids=["missing-file", "extra-file", "crlf", "record-id", "header", "starts", "length"],
)
def test_verify_catches_tampering(tamper, problem, small_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(small_out, out)
    tamper(out)
    result = invoke("verify", out)
    assert result.exit_code == 1
    assert problem in result.output, result.output


def test_verify_checks_names_against_mapping(small_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(small_out, out)
    path = out / "uf90/uf90_csvs/x004.csv"
    lines = path.read_text().splitlines(keepends=True)
    a, b = lines[1].split(","), lines[2].split(",")
    a[1], b[1] = b[1], a[1]
    lines[1], lines[2] = ",".join(a), ",".join(b)
    path.write_text("".join(lines))
    result = invoke("verify", out)
    assert result.exit_code == 1 and "uf90 names do not follow mapping.tsv" in result.output


def test_config_errors_are_one_line(small_raw, tmp_path):
    result = invoke("preprocess", small_raw, "-o", tmp_path / "o", "--partition-size", "lots")
    assert result.exit_code == 1 and "not a byte size" in result.output
    result = invoke("preprocess", small_raw, "-o", tmp_path / "o", "--num-csv-files", "1001")
    assert result.exit_code == 1 and "between 1 and 1000" in result.output
