"""Object storage through moto's S3 server on 127.0.0.1: s3 → s3, local → s3, s3 → local."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from conftest import run_preprocess, tree_digest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """A real moto S3 server process on loopback; yields s3fs storage options."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    options = {"key": "testing", "secret": "testing", "endpoint_url": f"http://127.0.0.1:{port}",
               "client_kwargs": {"region_name": "us-east-1"}}
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    yield options
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def s3_raw(s3_server, tmp_path_factory):
    """A synth raw folder, locally and uploaded to s3://esm2dask-test/raw."""
    import s3fs

    from esm2dask.synth import synth

    raw = tmp_path_factory.mktemp("s3raw") / "raw"
    synth(str(raw), 400, seed=9)
    import boto3

    boto3.client("s3", endpoint_url=s3_server["endpoint_url"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="esm2dask-test")
    fs = s3fs.S3FileSystem(**s3_server)
    fs.put(str(raw) + "/", "esm2dask-test/raw/", recursive=True)
    return raw


def _download(fs, url: str, dest: Path) -> Path:
    fs.get(url.rstrip("/") + "/", str(dest) + "/", recursive=True)
    return dest


@pytest.fixture(scope="module")
def local_digest(s3_raw, tmp_path_factory, dask_cluster):
    """``local_digest(num_csv_files)``: the tree digest of ``s3_raw`` converted from and to
    local folders (40 KB partitions), each made once."""
    from esm2dask.config import ClusterConfig

    digests = {}

    def digest(num_csv_files: int = 50) -> dict[str, str]:
        if num_csv_files not in digests:
            out = tmp_path_factory.mktemp("local") / "out"
            run_preprocess(s3_raw, out, ClusterConfig(scheduler_address=dask_cluster.scheduler_address),
                           partition_size="40KB", num_csv_files=num_csv_files)
            digests[num_csv_files] = tree_digest(out)
        return digests[num_csv_files]

    return digest


@pytest.mark.drill  # S3 end to end and failure drills
def test_s3_to_s3_equals_local(s3_server, s3_raw, local_digest, tmp_path, cluster_config):
    import s3fs

    result = run_preprocess(
        "s3://esm2dask-test/raw", "s3://esm2dask-test/out1", cluster_config,
        partition_size="40KB", storage_options=s3_server,
    )
    assert result.rows["uf90/uf90_csvs"] > 0
    fs = s3fs.S3FileSystem(**s3_server)
    assert not [p for p in fs.ls("esm2dask-test/out1") if ".esm2dask-staging" in p]
    manifest = json.loads(fs.cat("esm2dask-test/out1/esm2dask-manifest.json"))
    assert len(manifest["files"]) == 4 * 50 + 2
    assert tree_digest(_download(fs, "esm2dask-test/out1", tmp_path / "dl")) == local_digest()
    # verify reads the tree in place, and trusts it only with its manifest
    opts = json.dumps(s3_server)
    check = CliRunner().invoke(cli, ["verify", "s3://esm2dask-test/out1", "--storage-options", opts])
    assert check.exit_code == 0, check.output
    fs.rm("esm2dask-test/out1/esm2dask-manifest.json")
    check = CliRunner().invoke(cli, ["verify", "s3://esm2dask-test/out1", "--storage-options", opts])
    assert check.exit_code == 1 and "no esm2dask-manifest.json" in check.output


# Each object written to moto costs a few requests: the default 50 shards per split take
# 30-45 s on 2 cores, so the default run writes 7 (the same code paths); the drills write 50.
@pytest.mark.parametrize("num_csv_files", [7, pytest.param(50, marks=pytest.mark.drill)])
def test_local_to_s3_and_s3_to_local(s3_server, s3_raw, local_digest, tmp_path, cluster_config, num_csv_files):
    import s3fs

    prefix = f"esm2dask-test/out2-{num_csv_files}"
    run_preprocess(s3_raw, f"s3://{prefix}", cluster_config, partition_size="40KB",
                   storage_options=s3_server, num_csv_files=num_csv_files)
    fs = s3fs.S3FileSystem(**s3_server)
    assert tree_digest(_download(fs, prefix, tmp_path / "dl")) == local_digest(num_csv_files)
    out = tmp_path / "from-s3"
    run_preprocess("s3://esm2dask-test/raw", out, cluster_config, partition_size="40KB",
                   storage_options=s3_server, num_csv_files=num_csv_files)
    assert tree_digest(out) == local_digest(num_csv_files)
    assert (out / "mapping.tsv").exists()  # raw inputs copied beside the output


def test_shuffled_fastas_on_s3_are_converted_again_and_scattered(s3_server, s3_raw, local_digest, tmp_path,
                                                                  cluster_config):
    """FASTAs on an object store out of mapping order: read at random they would cost a
    request a record, so the join converts each range again and scatters its rows through
    the work folder (not routed, esm2dask.stages.routed_streams); the tree is the sorted
    local input's."""
    import s3fs

    from esm2dask.config import PreprocessConfig
    from esm2dask.stages import routed_streams
    from esm2dask.synth import synth

    raw = tmp_path / "shuffled"
    synth(str(raw), 400, seed=9, unsorted=True)  # s3_raw's records, out of order
    fs = s3fs.S3FileSystem(**s3_server)
    fs.put(str(raw) + "/", "esm2dask-test/shuffled/", recursive=True)
    config = PreprocessConfig.from_options(raw_dir="s3://esm2dask-test/shuffled", output_dir=str(tmp_path / "out"),
                                           cluster=cluster_config, partition_size="40KB", storage_options=s3_server)
    assert routed_streams(config) == ()
    result = run_preprocess("s3://esm2dask-test/shuffled", tmp_path / "out", cluster_config, partition_size="40KB",
                            storage_options=s3_server)
    assert not result.streams["uf90"].fast_path and result.stage_tasks["merge-uf90"] > 1
    assert tree_digest(tmp_path / "out") == local_digest()


def test_permanent_s3_errors_are_one_line(s3_server, tmp_path, dask_cluster):
    opts = json.dumps(s3_server)
    result = CliRunner().invoke(cli, [
        "preprocess", "s3://no-such-bucket/raw", "-o", str(tmp_path / "o"), "--storage-options", opts,
        "--scheduler-address", dask_cluster.scheduler_address, "--plain",
    ])
    assert result.exit_code == 1
    assert "s3://no-such-bucket/raw/mapping.tsv: no such file (or no such bucket)" in result.output
    assert "Traceback" not in result.output


def test_flip_from_s3_to_s3_and_verify_in_place(s3_server, tmp_path):
    import s3fs

    from test_flip import make_flip_tree

    src = tmp_path / "flip-src"
    make_flip_tree(src)
    fs = s3fs.S3FileSystem(**s3_server)
    fs.put(str(src) + "/", "esm2dask-test/flip-src/", recursive=True)
    opts = json.dumps(s3_server)
    result = CliRunner().invoke(cli, [
        "flip", "--tasks", "scl,secondary_structure", "--source", "s3://esm2dask-test/flip-src",
        "-o", "s3://esm2dask-test/FLIP", "--cache-dir", str(tmp_path / "cache"), "--storage-options", opts,
    ])
    assert result.exit_code == 0, result.output
    assert fs.cat("esm2dask-test/FLIP/scl/test/x000.csv") == b"id,sequence,scl_label\nscl_2,PQRS,Lysosome\n"
    check = CliRunner().invoke(cli, ["verify", "s3://esm2dask-test/FLIP", "--storage-options", opts])
    assert check.exit_code == 0, check.output
    assert "checked: secondary_structure/test" in check.output


# ----------------------------------------------------------------------------- publishing (issue 11)


def _tree_state(fs, prefix: str, dest: Path) -> tuple[dict, bytes]:
    fs.invalidate_cache()
    return tree_digest(_download(fs, prefix, dest)), fs.cat(f"{prefix}/esm2dask-manifest.json")


def _verify_s3(url: str, opts: dict):
    return CliRunner().invoke(cli, ["verify", url, "--storage-options", json.dumps(opts)])


@pytest.fixture(scope="module")
def s3_published(s3_server, s3_raw, dask_cluster):
    """A good tree at s3://esm2dask-test/pub (rebuilt by the tests that need it)."""
    from esm2dask.config import ClusterConfig

    def publish_good(prefix: str):
        run_preprocess("s3://esm2dask-test/raw", f"s3://esm2dask-test/{prefix}",
                       ClusterConfig(scheduler_address=dask_cluster.scheduler_address),
                       partition_size="40KB", storage_options=s3_server, overwrite=True)

    return publish_good


@pytest.mark.drill  # S3 end to end and failure drills
def test_failed_overwrite_leaves_the_previous_tree_on_the_store(s3_server, s3_raw, s3_published, tmp_path,
                                                                dask_cluster):
    """A good tree, then an --overwrite run with a comma in val: the tree and its manifest
    are as they were, and verify passes."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    s3_published("out3")
    before = _tree_state(fs, "esm2dask-test/out3", tmp_path / "before")
    bad = tmp_path / "bad"
    shutil.copytree(s3_raw, bad)
    val = bad / "uniref50_valid.fasta"
    data = val.read_bytes()
    line = data.index(b"\n") + 1
    val.write_bytes(data[: line + 3] + b"," + data[line + 3 :])
    fs.put(str(bad) + "/", "esm2dask-test/raw-comma/", recursive=True)
    result = CliRunner().invoke(cli, [
        "preprocess", "s3://esm2dask-test/raw-comma", "-o", "s3://esm2dask-test/out3", "--overwrite",
        "--storage-options", json.dumps(s3_server), "--scheduler-address", dask_cluster.scheduler_address,
        "--partition-size", "40KB", "--plain",
    ])
    assert result.exit_code == 1 and "uniref50_valid.fasta" in result.output and "Traceback" not in result.output
    assert _tree_state(fs, "esm2dask-test/out3", tmp_path / "after") == before
    assert not [p for p in fs.ls("esm2dask-test/out3") if ".esm2dask-staging" in p]
    check = _verify_s3("s3://esm2dask-test/out3", s3_server)
    assert check.exit_code == 0, check.output


SECRET = "esm2dask-FAKE-SECRET-5f0d2c9a"


@pytest.mark.drill  # S3 end to end and failure drills
def test_last_put_fails_previous_tree_intact_and_no_secret_anywhere(s3_server, s3_raw, s3_published, tmp_path,
                                                                    dask_cluster, monkeypatch):
    """The manifest PUT, the last of a run, fails: one error line, the previous tree and its
    manifest unchanged, the converted tree kept; --resume (options from ``@file``) publishes it.
    The secret is in no object, log, receipt, plan or report."""
    import logging

    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    s3_published("out4")
    before = _tree_state(fs, "esm2dask-test/out4", tmp_path / "before")
    options = {**s3_server, "secret": SECRET}
    opts_file = tmp_path / "s3.json"
    opts_file.write_text(json.dumps(options))
    real_commit = s3fs.core.S3File.commit

    def failing_commit(self):
        if self.key == "out4/esm2dask-manifest.json":
            raise OSError("simulated: the PUT of the manifest failed (503 Slow Down)")
        return real_commit(self)

    log_file = tmp_path / "run.log"
    handler = logging.FileHandler(log_file)
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    args = ["preprocess", str(s3_raw), "-o", "s3://esm2dask-test/out4", "--scheduler-address",
            dask_cluster.scheduler_address, "--partition-size", "40KB", "--plain", "--num-csv-files", "7",
            "--performance-report", str(tmp_path / "report.html")]
    try:
        monkeypatch.setattr(s3fs.core.S3File, "commit", failing_commit)
        failed = CliRunner().invoke(cli, [*args, "--overwrite", "--storage-options", json.dumps(options)])
        monkeypatch.undo()
        lines = [l for l in failed.output.splitlines() if l.startswith("esm2dask: error:")]
        assert failed.exit_code == 1 and len(lines) == 1, failed.output
        assert "publishing failed" in lines[0] and "the previous output and its manifest are unchanged" in lines[0]
        assert _tree_state(fs, "esm2dask-test/out4", tmp_path / "after") == before
        assert _verify_s3("s3://esm2dask-test/out4", s3_server).exit_code == 0
        fs.invalidate_cache()
        staged = [p for p in fs.ls("esm2dask-test/out4") if ".esm2dask-staging" in p]
        assert len(staged) == 1
        kept = {p: fs.cat(p) for p in fs.find(staged[0]) if p.endswith(".json")}
        assert any(p.endswith("plan.json") for p in kept) and any("/receipts/" in p for p in kept)
        resumed = CliRunner().invoke(cli, [*args, "--resume", "--storage-options", f"@{opts_file}"])
        assert resumed.exit_code == 0, resumed.output
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    check = _verify_s3("s3://esm2dask-test/out4", s3_server)
    assert check.exit_code == 0, check.output
    assert "checked: checksums against the manifest" in check.output
    fs.invalidate_cache()
    assert len(fs.ls("esm2dask-test/out4/uf90/uf90_csvs")) == 7
    # nowhere: objects (manifest, plan, receipts), the CLI's output (what `2> run.log` keeps), the
    # logging records of the driver, the performance report, the workers' and scheduler's logs
    from distributed import Client

    with Client(dask_cluster.scheduler_address) as client:
        worker_logs = json.dumps(client.get_worker_logs()) + json.dumps(client.get_scheduler_logs())
    places = {**kept, **{p: fs.cat(p) for p in fs.find("esm2dask-test/out4")},
              "output": (failed.output + resumed.output).encode(), "log": log_file.read_bytes(),
              "report": (tmp_path / "report.html").read_bytes(), "worker logs": worker_logs.encode()}
    assert places["report"] and places["output"]
    leaked = [where for where, data in places.items() if SECRET.encode() in data]
    assert not leaked
