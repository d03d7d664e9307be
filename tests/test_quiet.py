"""The real command in a subprocess, as a user runs it: quiet by default (no Dask log line,
no traceback), one line on bad input and on Ctrl-C, everything in the run's log file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tree_digest

#: What a line from Dask, tornado or Python's error printing starts with or contains.
NOISE = ("distributed.", "tornado", "bokeh", "Traceback", "CommClosedError", "Nanny", "Scheduler",
         "Worker", "State start", "Lost all workers")


def esm2dask(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kwargs)


def as_at_a_terminal() -> None:
    """A child's SIGINT as at a terminal (Python's KeyboardInterrupt), whatever this test
    run inherited: a shell starts a background job with SIGINT ignored, and a process that
    starts so keeps ignoring it (esm2dask too: cluster.take_back_ctrl_c)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(n in line for n in NOISE)]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("quiet") / "raw"
    done = esm2dask("synth", folder, "--clusters", "400", "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert not noise(done.stderr)
    return folder


def local_run(raw, out, *extra):
    return esm2dask("preprocess", raw, "-o", out, "--workers", "1", "--dashboard-address", "127.0.0.1:0", *extra)


def test_a_normal_run_prints_no_dask_line_and_logs_everything(raw, tmp_path):
    out = tmp_path / "out"
    done = local_run(raw, out)
    assert done.returncode == 0, done.stderr
    assert noise(done.stderr) == [], done.stderr
    assert "Dask dashboard: http://127.0.0.1:" in done.stderr
    assert "manifest:" in done.stdout
    log = (out / "esm2dask.log").read_text()
    # the full log is kept beside the manifest: Dask's scheduler and workers, and esm2dask
    assert "distributed.scheduler INFO" in log and "distributed.worker INFO" in log
    assert "esm2dask INFO: esm2dask" in log
    assert not [p for p in out.iterdir() if p.name.startswith(".esm2dask-staging")]


# A run takes ~5 s: the default run starts one with -v after the command; the drills one
# with -v before it too (test_verbose_is_taken_on_either_side_of_the_command below checks,
# without a cluster, that both places turn on the same records).
@pytest.mark.parametrize("where", ["command", pytest.param("group", marks=pytest.mark.drill)])
def test_verbose_shows_dask_logs_on_either_side_of_the_command(raw, tmp_path, where):
    args = ["preprocess", raw, "-o", tmp_path / "out", "--workers", "1", "--dashboard-address", "127.0.0.1:0"]
    args = ["-v", *args] if where == "group" else [*args[:1], "-v", *args[1:]]
    done = esm2dask(*args)
    assert done.returncode == 0, done.stderr
    assert "distributed.scheduler INFO" in done.stderr and "esm2dask INFO" in done.stderr


@pytest.mark.parametrize("where", ["group", "command", "nowhere"])
def test_verbose_is_taken_on_either_side_of_the_command(where, tmp_path):
    """``esm2dask -v synth`` and ``esm2dask synth -v``: esm2dask's records on stderr
    (synth's: no cluster); without -v, none."""
    from click.testing import CliRunner

    from cli.main import cli
    from esm2dask import logs

    args = ["synth", str(tmp_path / "s"), "--clusters", "3"]
    args = {"group": ["-v", *args], "command": [args[0], "-v", *args[1:]], "nowhere": args}[where]
    try:
        result = CliRunner().invoke(cli, args)
    finally:
        logs.set_verbose(False)
    assert result.exit_code == 0, result.output
    assert ("esm2dask INFO: work: 13 records" in result.stderr) == (where != "nowhere"), result.stderr


def test_bad_input_is_exactly_one_line(raw, tmp_path):
    """A comma in a sequence (a task fails on a worker): no CommClosedError, no traceback."""
    bad = tmp_path / "raw"
    bad.mkdir()
    for p in raw.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    uf90 = bad / "uniref90membersandreps_ur50trainfiltreps.fasta"
    uf90.write_bytes(uf90.read_bytes().replace(b"\nM", b"\nM,", 1))
    out = tmp_path / "out"
    done = local_run(bad, out)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("esm2dask: error:")]
    assert len(errors) == 1 and "uniref90membersandreps" in errors[0] and "byte " in errors[0], done.stderr
    assert noise(done.stderr) == [], done.stderr
    assert not out.exists()


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not list(folder.glob(pattern)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {pattern} after {timeout_s} s"
        time.sleep(0.02)


@pytest.mark.drill  # a real SIGINT mid-run, then resume
def test_ctrl_c_is_one_line_and_resume_finishes_the_same_bytes(tmp_path, cluster_config):
    from conftest import run_preprocess
    from esm2dask.synth import synth

    raw = tmp_path / "raw"
    synth(str(raw), 4000, seed=3)  # ~6 MB
    reference = tmp_path / "reference"
    run_preprocess(raw, reference, cluster_config, num_csv_files=7)

    out = tmp_path / "out"
    # slow on purpose (one worker, ~100 small ranges per FASTA), so that Ctrl-C lands mid-run
    args = ["preprocess", raw, "-o", out, "--workers", "1", "--dashboard-address", "127.0.0.1:0",
            "--partition-size", "64KiB", "--num-csv-files", "7"]
    proc = subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=as_at_a_terminal)
    _wait_for(".esm2dask-staging-*/work/receipts/count-uf90/00000.*", out, proc)
    # Ctrl-C at a terminal: SIGINT to the whole foreground process group (workers included)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr
    assert noise(stderr) == [], stderr
    lines = [line for line in stderr.splitlines() if line.startswith("esm2dask:")]
    assert len(lines) == 1 and lines[0].startswith("esm2dask: interrupted: "), stderr
    assert "finished task(s) kept in" in lines[0] and "--resume" in lines[0]
    staged = [p for p in out.iterdir() if p.name.startswith(".esm2dask-staging")]
    assert len(staged) == 1 and (staged[0] / "esm2dask.log").exists()
    assert not (out / "uf90").exists()

    resumed = esm2dask(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert noise(resumed.stderr) == [], resumed.stderr
    assert "skipping the" in resumed.stderr and "resumed: skipped" in resumed.stdout
    assert tree_digest(out) == tree_digest(reference)
    log = (out / "esm2dask.log").read_text()
    assert log.count("esm2dask INFO: esm2dask") == 2  # both runs, in one file



def test_run_log_on_an_object_store_survives_a_resume():
    """On a store without rename the log is written locally, uploaded into the staging
    prefix when a run stops, continued by the resumed run and published beside the manifest."""
    import logging

    import fsspec

    from esm2dask.logs import RunLog, configure_dask_logging

    configure_dask_logging()
    log = logging.getLogger("esm2dask")
    fs = fsspec.filesystem("memory")
    root, out = "memory://logtest/out/.esm2dask-staging-x", "memory://logtest/out"
    first = RunLog(root, out, {})
    log.info("first run")
    first.keep()
    assert b"first run" in fs.cat("/logtest/out/.esm2dask-staging-x/esm2dask.log")
    second = RunLog(root, out, {})
    log.info("second run")
    assert second.publish() == "memory://logtest/out/esm2dask.log"
    log.info("after publishing")  # no longer logged to the file
    text = fs.cat("/logtest/out/esm2dask.log").decode()
    assert text.index("first run") < text.index("second run") and "after publishing" not in text


def _print_to_stderr(text):
    import sys

    print(text, file=sys.stderr)
    sys.stderr.flush()
    return True


def test_a_worker_process_stderr_goes_to_the_log_not_the_terminal(capfd, monkeypatch):
    """What a LocalCluster worker prints to stderr (a traceback on its way out, say) is a
    log record forwarded to the driver, never terminal output."""
    import logging

    from esm2dask import logs
    from esm2dask.cluster import dask_client
    from esm2dask.config import ClusterConfig

    monkeypatch.delenv("ESM2DASK_VERBOSE", raising=False)
    logs.configure_dask_logging()
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    sink = logs.add_sink(Keep())
    try:
        with dask_client(ClusterConfig(workers=1, processes=True, dashboard_address=None)) as client:
            assert client.submit(_print_to_stderr, "boom from a worker", pure=False).result()
            deadline = time.monotonic() + 30
            while not any("boom from a worker" in r.getMessage() for r in records):
                assert time.monotonic() < deadline, "the worker's stderr line never reached the driver"
                time.sleep(0.1)
    finally:
        logs.remove_sink(sink)
    assert "boom from a worker" not in capfd.readouterr().err
    assert any(r.name == "distributed.worker.stderr" for r in records)


def test_stderr_to_log_does_not_loop_on_a_failing_handler():
    import logging

    from esm2dask.cluster import _StderrToLog

    writer = _StderrToLog()
    seen = []

    class Reenter(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())
            writer.write("written while handling\n")  # as handleError would

    logger = logging.getLogger("distributed.worker.stderr")
    handler = Reenter()
    logger.addHandler(handler)
    try:
        writer.write("line one\nline ")
        writer.write("two\n\n")
    finally:
        logger.removeHandler(handler)
    assert seen == ["line one", "line two"]


#: A driver with a thread worker. "raised in the task": the task raises KeyboardInterrupt in
#: its executor thread, as polars' own SIGINT handler makes a query do wherever it runs
#: (pola-rs/polars#20961); "taken back": a real Ctrl-C while the task is inside polars, with
#: Python's handler put back as every run does.
_CTRL_C_IN_POLARS = r'''
import os, signal, sys, time
import polars as pl
from distributed import Client, LocalCluster
from esm2dask.cluster import TaskInterrupted, interruptible, take_back_ctrl_c, task_result

def query(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pl.LazyFrame().select(pl.int_range(0, 5_000_000).alias("a")).group_by(pl.col("a") % 7).agg(pl.len()).collect()
    return "finished"

def raising():
    time.sleep(0.5)
    raise KeyboardInterrupt

mode = sys.argv[1]
if mode == "taken back":
    take_back_ctrl_c()
with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
        Client(cluster) as client:
    if mode == "taken back":
        future = client.submit(interruptible, query, 3)
        while client.processing()[next(iter(client.processing()))] == ():
            time.sleep(0.05)
        time.sleep(0.5)  # inside polars
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            print("main thread: nothing", flush=True)
        except KeyboardInterrupt:
            print("main thread: KeyboardInterrupt", flush=True)
    else:
        future = client.submit(interruptible if mode == "raised in the task" else raising, *((raising,) if mode == "raised in the task" else ()))
    error = future.exception(timeout=30)
    print("task:", type(error).__name__ if error else future.result(), flush=True)
    try:
        task_result(future)
    except KeyboardInterrupt:
        print("driver: KeyboardInterrupt", flush=True)
    print("loop alive:", client.submit(sum, [40, 2]).result(timeout=30), flush=True)
'''


def _ctrl_c_script(tmp_path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "ctrl_c_in_polars.py"
    script.write_text(_CTRL_C_IN_POLARS)
    done = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[1], preexec_fn=as_at_a_terminal)
    assert done.returncode == 0, done.stderr
    return done


def test_ctrl_c_inside_a_polars_task_on_a_thread_worker_keeps_the_cluster_alive(tmp_path):
    """A KeyboardInterrupt raised in a task's thread (polars' handler does that) is an ordinary
    task failure to Dask (cluster.interruptible), so its event loop lives on, and the driver
    reads it back as the interrupt. Unwrapped, it leaves the task into the event loop and
    stops it (checked: with a bare task the driver's wait times out, then finds the loop
    closed)."""
    done = _ctrl_c_script(tmp_path, "raised in the task")
    assert done.stdout.splitlines() == ["task: TaskInterrupted", "driver: KeyboardInterrupt", "loop alive: 42"], \
        done.stdout + done.stderr


def test_ctrl_c_taken_back_from_polars_reaches_the_main_thread_only(tmp_path):
    """What every run does (cluster.take_back_ctrl_c, in dask_client): Python's handler
    over polars', so the Ctrl-C is the main thread's and the task in polars runs to its end."""
    done = _ctrl_c_script(tmp_path, "taken back")
    assert done.stdout.splitlines() == ["main thread: KeyboardInterrupt", "task: finished", "loop alive: 42"], \
        done.stdout + done.stderr
