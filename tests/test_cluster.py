"""An existing Dask cluster started as real `dask scheduler` / `dask worker` processes:
same bytes as a LocalCluster, a worker killed mid-run, a driver killed and resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from esm2dask.config import PreprocessConfig
from esm2dask.preprocess import preprocess
from esm2dask.progress import Reporter

from conftest import run_preprocess, tree_digest

#: real dask scheduler/worker processes killed mid-run, a full tmpfs: long, so `make test` skips them and `make drills` (CI) runs them
pytestmark = pytest.mark.drill

DASK = str(Path(sys.executable).parent / "dask")


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes on loopback."""
    from distributed import Client

    folder = tmp_path_factory.mktemp("cluster")
    sched_file = folder / "scheduler.json"
    env = {**os.environ, "DASK_LOGGING__DISTRIBUTED": "error"}
    procs = [subprocess.Popen(
        [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
         "--scheduler-file", str(sched_file)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )]
    deadline = time.monotonic() + 60
    while not sched_file.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("dask scheduler did not start")
        time.sleep(0.2)
    for _ in range(2):
        procs.append(subprocess.Popen(
            [DASK, "worker", "--scheduler-file", str(sched_file), "--nthreads", "1", "--memory-limit", "3GiB",
             "--host", "127.0.0.1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
    with Client(scheduler_file=str(sched_file), timeout="60s") as client:
        client.wait_for_workers(2, timeout=120)
    yield str(sched_file)
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture(scope="module")
def cluster_raw(tmp_path_factory):
    from esm2dask.synth import synth

    raw = tmp_path_factory.mktemp("craw") / "raw"
    synth(str(raw), 1500, seed=21, unsorted=True)
    return raw


@pytest.fixture(scope="module")
def reference_digest(cluster_raw, tmp_path_factory, dask_cluster):
    from esm2dask.config import ClusterConfig

    out = tmp_path_factory.mktemp("ref") / "out"
    run_preprocess(cluster_raw, out, ClusterConfig(scheduler_address=dask_cluster.scheduler_address),
                   partition_size="20KB")
    return tree_digest(out)


def _config(sched_file):
    from esm2dask.config import ClusterConfig

    return ClusterConfig(scheduler_file=sched_file, dashboard_address=None)


def test_external_cluster_gives_the_same_bytes(external_cluster, cluster_raw, reference_digest, tmp_path):
    out = tmp_path / "out"
    run_preprocess(cluster_raw, out, _config(external_cluster), partition_size="20KB")
    assert tree_digest(out) == reference_digest


def _run_killing_a_worker(sched_file, raw, out, when) -> None:
    """Run preprocess on the external cluster; SIGKILL one worker process the first time
    ``when(stage, done)`` holds (the nanny restarts it), then wait for both workers."""
    from distributed import Client

    with Client(scheduler_file=sched_file) as client:
        pids = client.run(os.getpid)
    victim = sorted(pids.values())[0]
    killed = threading.Event()

    class KillOnProgress(Reporter):
        def advance(self, name, done=1):
            if when(name, done) and not killed.is_set():
                os.kill(victim, signal.SIGKILL)
                killed.set()

    config = PreprocessConfig.from_options(raw_dir=str(raw), output_dir=str(out),
                                           cluster=_config(sched_file), partition_size="20KB")
    preprocess(config, KillOnProgress())
    assert killed.is_set()
    with Client(scheduler_file=sched_file) as client:
        client.wait_for_workers(2, timeout=60)


def test_worker_killed_mid_run(external_cluster, cluster_raw, reference_digest, tmp_path):
    """SIGKILL one worker process once the join stage is under way; the nanny restarts it,
    the scheduler reruns its tasks, and the output does not change."""
    _run_killing_a_worker(external_cluster, cluster_raw, tmp_path / "out",
                          lambda stage, done: stage.startswith("join-uf90"))
    assert tree_digest(tmp_path / "out") == reference_digest


def test_driver_killed_then_resumed(external_cluster, cluster_raw, reference_digest, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cli", "preprocess", str(cluster_raw), "-o", str(out), "--plain", "-v",
           "--scheduler-file", external_cluster, "--partition-size", "20KB"]
    driver = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    for line in driver.stderr:  # -v: esm2dask's log lines, one per stage start
        if "esm2dask INFO: merge-uf90:" in line:
            break  # the moment: uf90's join is done, its gather stage starting
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not (out / "uf50").exists()  # nothing published
    staged = [p for p in out.iterdir() if p.name.startswith(".esm2dask-staging")]
    assert len(staged) == 1 and list((staged[0] / "work" / "receipts").iterdir())
    messages = []

    class Collect(Reporter):
        def message(self, text):
            messages.append(text)

    config = PreprocessConfig.from_options(raw_dir=str(cluster_raw), output_dir=str(out), resume=True,
                                           cluster=_config(external_cluster), partition_size="20KB")
    preprocess(config, Collect())
    assert any(m.startswith("resuming") for m in messages)
    assert tree_digest(out) == reference_digest
    assert not [p for p in out.iterdir() if p.name.startswith(".esm2dask-staging")]


def test_worker_killed_during_shard_assembly(external_cluster, cluster_raw, reference_digest, tmp_path):
    """SIGKILL one worker while the shards are being assembled from their pieces: its shard
    is assembled again elsewhere (a first piece cut back to its recorded size), same bytes."""
    _run_killing_a_worker(external_cluster, cluster_raw, tmp_path / "out",
                          lambda stage, done: stage == "assemble" and done == 1)
    assert tree_digest(tmp_path / "out") == reference_digest


def test_output_file_system_full(tmp_path, dask_cluster):
    """A 2 MiB tmpfs as the output file system: a first small run fits; a bigger run with
    --overwrite fills it: one clear error line, nothing published, no staging folder left,
    the previous output intact and valid."""
    from click.testing import CliRunner

    from cli.main import cli
    from esm2dask.synth import synth

    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here ({mounted.stderr.strip() or mounted.returncode}): "
                    f"the full-disk drill needs `mount -t tmpfs` (root or CAP_SYS_ADMIN)")
    try:
        small, big = tmp_path / "small", tmp_path / "big"
        synth(str(small), 100, seed=3)
        synth(str(big), 1500, seed=3)
        out = mnt / "out"
        # few files: tmpfs spends a 4 KiB page on each
        args = ["-o", out, "--scheduler-address", dask_cluster.scheduler_address, "--plain", "--num-csv-files", "2"]

        def run(raw, *extra):
            # as a user runs it: this test process hosts the shared cluster's scheduler, whose
            # own log lines must not be mistaken for the command's output
            return subprocess.run([sys.executable, "-m", "cli", "preprocess", str(raw), *map(str, args), *extra],
                                  capture_output=True, text=True)

        first = run(small)
        assert first.returncode == 0, first.stderr
        before = tree_digest(out)
        manifest = (out / "esm2dask-manifest.json").read_bytes()
        result = run(big, "--overwrite")
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        lines = [l for l in output.splitlines() if l.startswith("esm2dask: error:")]
        assert len(lines) == 1 and "no space left on the output file system" in lines[0], output
        assert "Traceback" not in output and "--resume" not in output
        assert tree_digest(out) == before and (out / "esm2dask-manifest.json").read_bytes() == manifest
        assert not [p for p in out.iterdir() if p.name.startswith(".esm2dask")]
        check = CliRunner().invoke(cli, ["verify", str(out)])
        assert check.exit_code == 0, check.output
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mnt)], check=False)  # a worker still maps a file there
