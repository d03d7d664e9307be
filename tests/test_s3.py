"""Object storage through moto's S3 server on 127.0.0.1: s3 → s3, local → s3, s3 → local."""

from __future__ import annotations

import json
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
    from esm2dask.config import ClusterConfig

    out = tmp_path_factory.mktemp("local") / "out"
    run_preprocess(s3_raw, out, ClusterConfig(scheduler_address=dask_cluster.scheduler_address),
                   partition_size="40KB")
    return tree_digest(out)


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
    assert tree_digest(_download(fs, "esm2dask-test/out1", tmp_path / "dl")) == local_digest
    # verify reads the tree in place, and trusts it only with its manifest
    opts = json.dumps(s3_server)
    check = CliRunner().invoke(cli, ["verify", "s3://esm2dask-test/out1", "--storage-options", opts])
    assert check.exit_code == 0, check.output
    fs.rm("esm2dask-test/out1/esm2dask-manifest.json")
    check = CliRunner().invoke(cli, ["verify", "s3://esm2dask-test/out1", "--storage-options", opts])
    assert check.exit_code == 1 and "no esm2dask-manifest.json" in check.output


def test_local_to_s3_and_s3_to_local(s3_server, s3_raw, local_digest, tmp_path, cluster_config):
    import s3fs

    run_preprocess(s3_raw, "s3://esm2dask-test/out2", cluster_config, partition_size="40KB",
                   storage_options=s3_server)
    fs = s3fs.S3FileSystem(**s3_server)
    assert tree_digest(_download(fs, "esm2dask-test/out2", tmp_path / "dl")) == local_digest
    out = tmp_path / "from-s3"
    run_preprocess("s3://esm2dask-test/raw", out, cluster_config, partition_size="40KB",
                   storage_options=s3_server)
    assert tree_digest(out) == local_digest
    assert (out / "mapping.tsv").exists()  # raw inputs copied beside the output


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
