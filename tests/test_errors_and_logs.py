"""Issue 20: each log record once, no listener that was not asked for, no secret in any
output, and one clear error line (never a traceback) for the failures users met.

Most cases run the real command in a subprocess, as a user does; the non-root cases run it
as ``nobody`` through ``setpriv``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from conftest import REPO, assert_one_line_error, tree_digest
from test_ngc import KEY, fake_ngc  # noqa: F401 - the fixture
from test_s3 import s3_server  # noqa: F401 - the fixture

NOBODY = 65534


def esm2dask(*args, env=None, user: int | None = None, timeout=300) -> subprocess.CompletedProcess:
    """The command as a user runs it (as ``nobody`` when ``user`` is given)."""
    prefix = []
    if user is not None:
        if shutil.which("setpriv") is None or os.getuid() != 0:
            pytest.skip("running as another user needs root and setpriv")
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    return subprocess.run([*prefix, sys.executable, "-m", "cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=env)


def one_error_line(done: subprocess.CompletedProcess, *needles: str) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output and "Logging error" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("esm2dask: error:")]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def invoke(*args) -> subprocess.CompletedProcess:
    """The command in this process (for failures before or without worker processes): the
    result in the shape :func:`one_error_line` reads."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    code = result.exit_code if result.exception is None or isinstance(result.exception, SystemExit) else -1
    return subprocess.CompletedProcess(args, code, result.output, "")


@pytest.fixture(scope="module")
def raw(qc_dir, tmp_path_factory) -> Path:
    """NVIDIA's QC sample under a folder every user may read and write (for ``nobody``)."""
    base = Path(tempfile.mkdtemp(prefix="esm2dask-i20-"))
    base.chmod(0o777)
    folder = base / "raw"
    shutil.copytree(qc_dir, folder)
    # the release's names; the sample's validation FASTA is its training FASTA, as in test_fingerprints
    (folder / "ur90_ur50_sampler.fasta").rename(folder / "uniref90membersandreps_ur50trainfiltreps.fasta")
    shutil.copy(folder / "uniref50_train_filt.fasta", folder / "uniref50_valid.fasta")
    for p in [folder, *folder.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    yield folder
    shutil.rmtree(base, ignore_errors=True)


def qc_args(raw: Path) -> list[str]:
    return [raw, "--plain"]


@pytest.fixture(scope="module")
def qc_out(qc_esm2nv) -> Path:
    """The session's run of the QC sample (conftest: the same uf50/uf90 bytes as a run of
    ``raw``), copied by the tests that spoil it."""
    return qc_esm2nv[0]


# ----------------------------------------------------------------------------- item 3


def _fail_with(marker: str):
    raise ValueError(marker)


def _listening_ports() -> set[tuple[str, int]]:
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def _run_log_of(tmp_path, body) -> str:
    """What a run's log file receives while ``body(client)`` runs on thread workers."""
    from esm2dask import logs

    logs.configure_dask_logging()
    path = tmp_path / "run.log"
    sink = logs.add_sink(logs.FileSink(str(path)))
    try:
        body()
        time.sleep(1.0)  # a forwarding loop makes thousands of copies in this time
    finally:
        logs.remove_sink(sink)
    return path.read_text()


def test_thread_workers_log_a_dashboard_404_and_a_task_failure_once(tmp_path):
    """The default LocalCluster (workers are threads of this process): a real request for a
    missing dashboard page and a real failing task each leave exactly one record."""
    from distributed import wait

    from esm2dask.cluster import dask_client
    from esm2dask.config import ClusterConfig

    marker = f"esm2dask-test-failure-{os.getpid()}"

    def body():
        with dask_client(ClusterConfig(workers=2, processes=False, dashboard_address="127.0.0.1:0")) as client:
            port = client.scheduler_info()["services"]["dashboard"]
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/no-such-page", timeout=10)
            assert err.value.code == 404
            future = client.submit(_fail_with, marker, pure=False)
            wait([future])
            assert future.status == "error"
            time.sleep(1.0)

    log = _run_log_of(tmp_path, body)
    assert log.count("/no-such-page") == 1, log[-3000:]
    failures = [line for line in log.splitlines() if "Compute Failed" in line or ("Error" in line and marker in line)]
    assert len([line for line in log.splitlines() if "Compute Failed" in line]) == 1, failures[:5]


def test_a_cluster_hosted_by_this_process_forwards_nothing_back(tmp_path):
    """--scheduler-address of a cluster whose workers are threads of the driver's process:
    their records reach the log once, not once more for each forwarding."""
    from distributed import LocalCluster, wait

    from esm2dask.cluster import dask_client
    from esm2dask.config import ClusterConfig

    marker = f"esm2dask-hosted-failure-{os.getpid()}"
    with LocalCluster(n_workers=2, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=None) as hosted:
        def body():
            with dask_client(ClusterConfig(scheduler_address=hosted.scheduler_address)) as client:
                future = client.submit(_fail_with, marker, pure=False)
                wait([future])
                time.sleep(1.0)

        log = _run_log_of(tmp_path, body)
    assert len([line for line in log.splitlines() if "Compute Failed" in line]) == 1, log[-3000:]


def test_worker_processes_forward_their_warnings_once(tmp_path):
    """--processes: a worker's warning is forwarded to the driver's log, once."""
    import logging

    from distributed import wait

    from esm2dask.cluster import dask_client
    from esm2dask.config import ClusterConfig

    marker = f"esm2dask-process-warning-{os.getpid()}"

    def warn(text):
        logging.getLogger("esm2dask").warning(text)

    def body():
        with dask_client(ClusterConfig(workers=1, processes=True, dashboard_address=None)) as client:
            wait([client.submit(warn, marker, pure=False)])
            time.sleep(1.0)

    log = _run_log_of(tmp_path, body)
    assert log.count(marker) == 1, log[-3000:]


def test_dashboard_none_listens_nowhere_and_the_default_is_loopback():
    from esm2dask.cluster import dask_client
    from esm2dask.config import ClusterConfig

    assert ClusterConfig().dashboard_address == "127.0.0.1:8787"
    before = _listening_ports()
    with dask_client(ClusterConfig(workers=2, processes=False, dashboard_address=None)) as client:
        opened = _listening_ports() - before
    assert opened == set(), opened
    with dask_client(ClusterConfig(workers=2, processes=False, dashboard_address="127.0.0.1:0")) as client:
        opened = _listening_ports() - before
        port = client.scheduler_info()["services"]["dashboard"]
    assert opened == {("127.0.0.1", port)}, opened


@pytest.mark.drill
def test_verbose_run_on_a_nul_byte_prints_its_record_once(raw, tmp_path):
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    val = bad / "uniref50_valid.fasta"
    data = val.read_bytes()
    second = data.index(b"\n", data.index(b"\n") + 1)
    val.write_bytes(data[:second - 2] + b"\x00" + data[second - 1:])
    done = esm2dask("-v", "preprocess", *qc_args(bad), "-o", tmp_path / "out", "--workers", "2",
                    "--dashboard-address", "none")
    # -v shows Dask's record of the failed task (its traceback text included), once
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("esm2dask: error:")]
    assert len(errors) == 1 and str(val) in errors[0] and "b'\\x00'" in errors[0], done.stderr[-3000:]
    assert done.stderr.count("Compute Failed") == 1, done.stderr[-3000:]
    assert len(done.stderr) < 100_000


# ----------------------------------------------------------------------------- item 4


def test_no_key_in_dry_run_or_error_lines_whatever_the_variables(fake_ngc, monkeypatch):  # noqa: F811
    other = "nvapi-OTHER-KEY-456"
    monkeypatch.setenv("NGC_API_KEY", other)
    dry = CliRunner().invoke(cli, ["ngc", "--dry-run", "workspace", "info", other])
    assert dry.exit_code == 0, dry.output
    assert "****" in dry.output and other not in dry.output and KEY not in dry.output
    monkeypatch.setenv("FAKE_NGC_SCENARIO", "auth")
    for env in ({"NGC_CLI_API_KEY": KEY, "NGC_API_KEY": other}, {"NGC_API_KEY": other}):
        monkeypatch.delenv("NGC_CLI_API_KEY", raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        result = CliRunner().invoke(cli, ["ngc", "workspace", "info", "x"])
        line = assert_one_line_error(result, "Invalid apikey", "NGC_API_KEY=****")
        assert other not in result.output and KEY not in result.output, line


def test_no_secret_in_the_log_or_an_error_line(tmp_path, monkeypatch):
    import logging

    from esm2dask import logs
    from esm2dask.storage import parse_storage_options

    monkeypatch.setenv("NGC_API_KEY", "nvapi-LOGGED-KEY-789")
    parse_storage_options(json.dumps({"secret": "s3-secret-value-0001", "endpoint_url": "http://x"}))
    path = tmp_path / "run.log"
    sink = logs.add_sink(logs.FileSink(str(path)))
    try:
        logging.getLogger("esm2dask").warning("key nvapi-LOGGED-KEY-789 secret s3-secret-value-0001")
    finally:
        logs.remove_sink(sink)
    text = path.read_text()
    assert "nvapi-LOGGED-KEY-789" not in text and "s3-secret-value-0001" not in text and text.count("****") == 2


# ----------------------------------------------------------------------------- item 10


def _numpy_format():
    """The module whose ``_read_array_header`` calls ``ast.literal_eval`` (numpy 2 moved it)."""
    import importlib

    try:
        return importlib.import_module("numpy.lib._format_impl")
    except ImportError:
        return importlib.import_module("numpy.lib.format")


def _broken_ast(*args, **kwargs):
    """What CPython 3.11's ast does, now and then, under threads."""
    raise SystemError("AST constructor recursion depth mismatch (before=49, after=48)")


def test_npy_headers_are_read_without_numpy_s_parser(monkeypatch, tmp_path):
    """numpy's header parser (ast, not thread-safe on CPython 3.11) is never called: the
    arrays esm2dask writes read back the same."""
    import io

    import numpy as np

    from esm2dask import npyfile, storage

    arrays = [np.arange(7, dtype="<u8"), np.array([0, 2, 1], dtype=np.int8), np.zeros(0, np.int8),
              np.arange(10, dtype="<i8").reshape(5, 2), np.zeros((0, 2), np.int64)]
    files = []
    for i, a in enumerate(arrays):
        files.append(tmp_path / f"{i}.npy")
        np.save(files[-1], a)
    monkeypatch.setattr(_numpy_format(), "_read_array_header", _broken_ast)
    for a, f in zip(arrays, files):
        got = storage.read_npy(str(f))
        assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a)
        buf = io.BytesIO()
        np.save(buf, a)
        assert npyfile.parse_header(buf.getvalue())[:2] == (a.dtype, a.shape)


def test_a_random_split_run_never_calls_numpy_s_header_parser(raw, tmp_path, monkeypatch):
    """--split random reads labels.npy in every task; with numpy's parser broken as on
    CPython 3.11 under threads, the run still gives the fingerprinted bytes."""
    from conftest import concat_md5, run_preprocess
    from esm2dask.config import ClusterConfig

    monkeypatch.setattr(_numpy_format(), "_read_array_header", _broken_ast)
    out = tmp_path / "out"
    run_preprocess(raw, out, ClusterConfig(workers=2, processes=False, dashboard_address=None),
                   split="random", val_size=500, test_size=100, seed=0)
    # test_fingerprints.test_random_split_fingerprints
    assert concat_md5(out / "uf50/train") == "6f6143f214b40357aba881b5df58ee0c"
    assert concat_md5(out / "uf50/val") == "6514663766f861553d5b230ad8747650"
    assert concat_md5(out / "uf50/test") == "5db8f40cec84939f2ae633ceae6ba2b1"


def test_every_layout_is_built_without_numpy_s_header_parser(raw, tmp_path, monkeypatch):
    """The train.db tasks read back their id orders and chunk edges from the staging
    folder: neither through np.load (whose header parser is ast), with every layout built."""
    import sqlite3

    from conftest import run_preprocess
    from esm2dask.config import ClusterConfig

    monkeypatch.setattr(_numpy_format(), "_read_array_header", _broken_ast)
    out = tmp_path / "out"
    run_preprocess(raw, out, ClusterConfig(workers=2, processes=False, dashboard_address=None),
                   formats=("esm2nv", "bionemo2", "hf"))
    with sqlite3.connect(f"file:{out / 'bionemo2/train.db'}?mode=ro", uri=True) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert con.execute("SELECT count(*) FROM protein").fetchone() == (11_296,)


def test_an_unexpected_exception_is_one_line_and_its_traceback_is_in_the_log(raw, tmp_path, monkeypatch):
    from esm2dask import tasks

    def broken(*args, **kwargs):
        raise SystemError("AST constructor recursion depth mismatch (before=49, after=48)")

    monkeypatch.setattr(tasks, "count_fasta", broken)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["preprocess", *map(str, qc_args(raw)), "-o", str(out), "--workers", "2",
                                      "--dashboard-address", "none"])
    line = assert_one_line_error(result, "AST constructor recursion depth mismatch", "esm2dask.log")
    assert "SystemError" not in line
    logs = list(out.glob(".esm2dask-staging-*/esm2dask.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text()


def test_an_unexpected_exception_outside_a_run_is_one_line(tmp_path, monkeypatch):
    from esm2dask import verify

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr(verify, "verify_any", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = CliRunner().invoke(cli, ["verify", str(tmp_path)])
    line = assert_one_line_error(result, "something nobody foresaw", str(tmp_path / "cache"))
    assert "RuntimeError" not in line
    assert "Traceback" in (tmp_path / "cache" / "esm2dask" / "last-failure.log").read_text()


# ----------------------------------------------------------------------------- item 11


def test_an_s3_output_in_a_missing_bucket_is_refused_before_a_cluster_starts(raw, s3_server):  # noqa: F811
    import boto3

    options = json.dumps(s3_server)
    done = invoke("preprocess", *qc_args(raw), "-o", "s3://no-such-bucket-i20/out", "--storage-options", options,
                    "--dashboard-address", "none")
    one_error_line(done, "s3://no-such-bucket-i20/out", "no bucket 'no-such-bucket-i20'")
    assert "Dask dashboard" not in done.stdout and "testing" not in done.stdout
    s3 = boto3.client("s3", endpoint_url=s3_server["endpoint_url"], aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    assert "no-such-bucket-i20" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


# ----------------------------------------------------------------------------- item 15


def test_an_unreadable_input_as_a_non_root_user(raw, tmp_path):
    base = raw.parent
    bad = base / "unreadable"
    shutil.copytree(raw, bad)
    (bad / "mapping.tsv").chmod(0)
    try:
        done = esm2dask("preprocess", *qc_args(bad), "-o", base / "out-unreadable", user=NOBODY,
                        env={**os.environ, "HOME": "/nonexistent"})
    finally:
        shutil.rmtree(bad)
    one_error_line(done, str(bad / "mapping.tsv"), "not readable")


@pytest.mark.drill
def test_a_non_root_user_without_a_writable_numba_cache_runs(raw):
    """``nobody``: no home, and the package's __pycache__ is root's. The kernel is cached
    elsewhere (or compiled), never "cannot cache function"."""
    base = raw.parent
    out = base / "out-nobody"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "XDG_"))}
    done = esm2dask("preprocess", *qc_args(raw), "-o", out, "--workers", "2", "--dashboard-address", "none",
                    user=NOBODY, env={**env, "HOME": "/nonexistent"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cannot cache" not in done.stderr and "Traceback" not in done.stderr
    assert (out / "esm2dask-manifest.json").exists()


def test_an_output_path_with_a_bracket(raw, qc_out, tmp_path):
    out = tmp_path / "run[1]" / "out"
    done = invoke("preprocess", *qc_args(raw), "-o", out, "--workers", "2", "--dashboard-address", "none",
                  "--format", "esm2nv,bionemo2")
    assert done.returncode == 0, done.stdout[-3000:]
    assert tree_digest(out) == tree_digest(qc_out)
    check = invoke("verify", out)
    assert check.returncode == 0, check.stdout


def test_botocore_errors_during_a_run_are_one_line(raw, tmp_path, monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    from esm2dask import tasks

    def outage(*args, **kwargs):
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/esm2dask-test")

    monkeypatch.setattr(tasks, "count_fasta", outage)
    result = CliRunner().invoke(cli, ["preprocess", *map(str, qc_args(raw)), "-o", str(tmp_path / "out"),
                                      "--workers", "2", "--dashboard-address", "none"])
    line = assert_one_line_error(result, "object storage request failed", "http://127.0.0.1:9/esm2dask-test")
    assert "EndpointConnectionError" not in line


def test_an_unreachable_object_store_is_one_line(raw):
    options = json.dumps({"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s3-secret-i20",
                          "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}})
    done = invoke("preprocess", *qc_args(raw), "-o", "s3://bucket/out", "--storage-options", options)
    one_error_line(done, "s3://bucket/out", "cannot reach the object store")
    assert "s3-secret-i20" not in done.stdout + done.stderr


def test_botocore_names_of_storage_options_say_what_to_write(raw):
    options = json.dumps({"aws_access_key_id": "AKIA0000", "aws_secret_access_key": "abcdefgh"})
    done = invoke("preprocess", *qc_args(raw), "-o", "s3://bucket/out", "--storage-options", options)
    one_error_line(done, "'aws_access_key_id'", "'key'")
    assert "abcdefgh" not in done.stdout + done.stderr


@pytest.mark.parametrize("manifest, needles", [
    (b"{not json", ("line 1, column 2", "not valid JSON")),
    (b"[1, 2]", ("holds an array",)),
    (None, ("'files' entry 'uf50/train/x000.csv'", "no 'bytes'")),
])
def test_verify_on_a_broken_manifest_is_one_line(qc_out, tmp_path, manifest, needles):
    out = tmp_path / "out"
    shutil.copytree(qc_out, out)
    path = out / "esm2dask-manifest.json"
    if manifest is None:
        data = json.loads(path.read_bytes())
        del data["files"]["uf50/train/x000.csv"]["bytes"]
        manifest = json.dumps(data).encode()
    path.write_bytes(manifest)
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert_one_line_error(result, str(path), *needles)


def test_verify_on_a_path_with_double_colons(qc_out, tmp_path):
    out = tmp_path / "a::b" / "out"
    shutil.copytree(qc_out, out)
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 0, result.output
    assert f"OK: {out}" in result.output


def test_flip_overwrite_of_a_task_folder_that_is_a_symlink(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not esm2dask's\n")
    out = tmp_path / "FLIP"
    out.mkdir()
    (out / "secondary_structure").symlink_to(elsewhere)
    result = CliRunner().invoke(cli, ["flip", "--tasks", "secondary_structure", "-o", str(out), "--overwrite",
                                      "--source", str(tmp_path / "no-mirror")])
    assert_one_line_error(result, str(out / "secondary_structure"), "symbolic link")
    assert (elsewhere / "keep.txt").read_text() == "not esm2dask's\n"
    assert (out / "secondary_structure").is_symlink()


# ----------------------------------------------------------------------------- item 16


@pytest.mark.drill
def test_a_full_output_disk_with_thread_workers_is_one_line_naming_the_output(tmp_path):
    """A 2 MiB tmpfs as OUT's file system, the default in-process workers: no "Logging
    error" storm (the run's log file is on the full disk too), one line naming a file being
    written under OUT, nothing left there."""
    from esm2dask.synth import synth

    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        big = tmp_path / "big"
        synth(str(big), 1500, seed=3)
        out = mnt / "out"
        done = esm2dask("preprocess", big, "-o", out, "--workers", "2", "--dashboard-address", "none", "--plain",
                        "--num-csv-files", "2")
        line = one_error_line(done, "no space left on the output file system", f"(writing {out}/")
        assert str(big) not in line.split("(writing", 1)[1]
        assert len((done.stdout + done.stderr).splitlines()) < 20
        assert not [p for p in out.iterdir() if p.name.startswith(".esm2dask")] if out.exists() else True
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mnt)], check=False)


def test_a_sink_that_cannot_write_prints_no_logging_error(capfd):
    import logging

    from esm2dask import logs

    sink = logs.add_sink(logs.FileSink("/dev/full"))
    try:
        for i in range(50):
            logging.getLogger("esm2dask").info("line %d", i)
    finally:
        logs.remove_sink(sink)
    assert "Logging error" not in capfd.readouterr().err
    assert sink.write_failed


# ----------------------------------------------------------------------------- item 17


def test_more_workers_than_byte_ranges_are_capped_and_said(raw, qc_out, tmp_path):
    plan = CliRunner().invoke(cli, ["preprocess", *map(str, qc_args(raw)), "-o", str(tmp_path / "p"),
                                    "--workers", "500", "--plan"])
    assert plan.exit_code == 0, plan.output
    cap = int(plan.output.split("--workers 500: capped at ", 1)[1].split()[0].rstrip(","))
    assert 1 <= cap < 20 and f"Workers: {cap} local worker(s)" in plan.output, plan.output
    done = invoke("preprocess", *qc_args(raw), "-o", tmp_path / "out", "--workers", "500",
                  "--dashboard-address", "none")
    assert done.returncode == 0, done.stdout[-3000:]
    assert done.stdout.count(f"capped at {cap}") == 1
    assert tree_digest(tmp_path / "out") == tree_digest(qc_out)


# ----------------------------------------------------------------------------- item 18


def test_a_fifo_input_is_not_a_regular_file(raw, tmp_path):
    fifo = tmp_path / "val.fifo"
    os.mkfifo(fifo)
    done = invoke("preprocess", *qc_args(raw), "-o", tmp_path / "out", "--val", fifo)
    one_error_line(done, str(fifo), "not a regular file")
    assert "empty" not in done.stdout


def test_an_output_path_that_is_a_file(raw, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("mine\n")
    done = invoke("preprocess", *qc_args(raw), "-o", target)
    one_error_line(done, str(target), "is a file, not a folder")
    assert target.read_text() == "mine\n"


def test_a_non_ascii_mapping_id_names_the_byte(raw, tmp_path):
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    mapping = bad / "mapping.tsv"
    lines = mapping.read_bytes().split(b"\n")
    lines[2] = b"UniRef50_P\xc3\xa9p" + lines[2][lines[2].index(b"\t"):]
    mapping.write_bytes(b"\n".join(lines))
    done = invoke("preprocess", *qc_args(bad), "-o", tmp_path / "out", "--dashboard-address", "none")
    line = one_error_line(done, str(mapping), "line 3", "non-ASCII byte 0xc3")
    assert "whitespace" not in line


def test_an_input_path_with_double_colons_is_a_local_path(raw, tmp_path):
    from esm2dask.storage import check_input_file

    folder = tmp_path / "x::y"
    folder.mkdir()
    shutil.copy(raw / "mapping.tsv", folder / "mapping.tsv")
    assert check_input_file(str(folder / "mapping.tsv")) == (raw / "mapping.tsv").stat().st_size


def test_a_fasta_of_headers_only_is_legal_and_said(raw, tmp_path, caplog):
    """Empty sequences are legal by the record rules (docs/esm2-layout.md): their rows have
    sequence_length 0, and a warning names the file, the byte and the first record."""
    import logging

    val = tmp_path / "headers-only.fasta"
    val.write_bytes(b"".join(b">EMPTY_%d some text\n" % i for i in range(300)))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="esm2dask"):
        done = invoke("preprocess", *qc_args(raw), "-o", out, "--val", val, "--dashboard-address", "none",
                      "--workers", "2")
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Dask dashboard" not in done.stdout  # --dashboard-address none: no link to a closed port
    warnings = [r.getMessage() for r in caplog.records if "empty sequence" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"{val} (byte 0, record 'EMPTY_0')"), warnings
    assert "300 record(s)" in warnings[0]
    rows = b"".join((out / "uf50" / "val" / f"x{k:03d}.csv").read_bytes()[len(b"record_id,record_name,sequence_length,sequence\n"):]
                    for k in range(50))
    assert rows == b"".join(b"%d,EMPTY_%d,0,\n" % (i + 1, i) for i in range(300))


def test_helpers_are_plain():
    """No class name or errno number in the words for an OSError."""
    import errno

    from esm2dask.errors import reason

    assert reason(PermissionError(errno.EACCES, "Permission denied", "/x")) == "permission denied"
    assert reason(OSError(errno.ENOSPC, "No space left on device")) == "no space left on the file system"
    assert reason(ValueError("[Errno 5] oops")) == "oops"
