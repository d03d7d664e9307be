"""Every option is checked before a cluster starts: one line, exit 1, nothing written."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cli.main import cli
from conftest import assert_one_line_error


@pytest.fixture(scope="session")
def raw(synth_raw):
    return synth_raw


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, env=env)


BAD_OPTIONS = {
    "workers-0": (["--workers", "0"], ["--workers must be at least 1"]),
    "threads-0": (["--threads-per-worker", "0"], ["--threads-per-worker"]),
    "memory-banana": (["--memory-limit", "banana"], ["--memory-limit 'banana'", "4GiB"]),
    "memory-tiny": (["--memory-limit", "1KB"], ["at least 256MiB"]),
    "memory-fraction-above-1": (["--memory-limit", "1.5"], ["--memory-limit '1.5'"]),
    "dashboard-banana": (["--dashboard-address", "banana"], ["--dashboard-address 'banana'", "[HOST]:PORT"]),
    "dashboard-port-too-big": (["--dashboard-address", ":99999"], ["--dashboard-address"]),
    "scheduler-banana": (["--scheduler-address", "banana"], ["--scheduler-address 'banana'"]),
    "scheduler-timeout-0": (["--scheduler-file", "x.json", "--scheduler-timeout", "0"], ["--scheduler-timeout"]),
    "partition-tiny": (["--partition-size", "10"], ["--partition-size 10 bytes", "ranges", "at most 10,000"]),
    "partition-banana": (["--partition-size", "lots"], ["not a byte size"]),
    "seed-negative": (["--seed", "-1"], ["--seed must be 0 or more"]),
    "num-csv-files": (["--num-csv-files", "0"], ["between 1 and 1000"]),
    "report-folder": (["--performance-report", "/no/such/folder/r.html"], ["no folder /no/such/folder"]),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_is_one_line_before_any_cluster(case, raw, tmp_path, no_cluster):
    args, needles = BAD_OPTIONS[case]
    out = tmp_path / "out"
    result = invoke("preprocess", raw, "-o", out, *args)
    assert_one_line_error(result, *needles)
    assert not out.exists()


def test_partition_size_refusal_names_the_task_count(raw, tmp_path, no_cluster):
    from esm2dask.plan import MAX_RANGES_PER_INPUT

    uf90 = raw / "uniref90membersandreps_ur50trainfiltreps.fasta"
    size = uf90.stat().st_size
    result = invoke("preprocess", raw, "-o", tmp_path / "out", "--partition-size", "20")
    assert_one_line_error(result, f"into {-(-size // 20):,} ranges")
    # at the limit itself it is accepted (the plan is printed)
    ok = invoke("preprocess", raw, "-o", tmp_path / "out", "--plan", "--partition-size",
                str(-(-size // MAX_RANGES_PER_INPUT)))
    assert ok.exit_code == 0, ok.output


def test_missing_scheduler_file_is_waited_for_then_one_line(raw, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "scheduler.json"
    result = invoke("preprocess", raw, "-o", out, "--scheduler-file", missing, "--scheduler-timeout", "0.5",
                    "--plain")
    assert f"for the scheduler file {missing}" in result.output
    assert_one_line_error(result, f"--scheduler-file {missing}: no such file after")
    assert not out.exists()


def test_scheduler_file_that_appears_is_used(raw, tmp_path, dask_cluster):
    """The wait ends when the file appears (written here by a thread, as a scheduler would)."""
    import json
    import threading
    import time

    path = tmp_path / "scheduler.json"

    def write_later():
        time.sleep(1.0)
        path.write_text(json.dumps({"address": dask_cluster.scheduler_address, "type": "Scheduler"}))

    threading.Thread(target=write_later).start()
    out = tmp_path / "out"
    result = invoke("preprocess", raw, "-o", out, "--scheduler-file", path, "--scheduler-timeout", "30", "--plain")
    assert result.exit_code == 0, result.output
    assert "waiting up to 30 s for the scheduler file" in result.output
    assert (out / "esm2dask-manifest.json").exists()


def test_no_raw_dir_explains_where_it_looked(tmp_path, no_cluster, monkeypatch):
    monkeypatch.delenv("ESM2DASK_RAW_DIR", raising=False)
    result = invoke("preprocess", "-o", tmp_path / "out")
    assert_one_line_error(result, "/workspace/data_from_ngc/uniref50_90_202104_esm2nv_v1.0", "no such folder",
                          "$ESM2DASK_RAW_DIR is not set", "seed workflow", "esm2dask preprocess RAW_DIR")
    result = invoke("preprocess", "-o", tmp_path / "out", env={"ESM2DASK_RAW_DIR": str(tmp_path / "nope")})
    assert_one_line_error(result, str(tmp_path / "nope"), "from $ESM2DASK_RAW_DIR")
    assert not (tmp_path / "out").exists()


def test_cluster_config_checks_directly():
    from esm2dask.config import ClusterConfig
    from esm2dask.errors import ConfigError

    for ok in (":8787", "127.0.0.1:0", "8787", "[::1]:8787", None):
        ClusterConfig(workers=1, dashboard_address=ok)
    for ok in ("auto", "0.5", "4GiB", "300MB", None):
        ClusterConfig(workers=1, memory_limit=ok)
    for ok in ("tcp://10.0.0.5:8786", "127.0.0.1:8786", "tls://sched.example.org:8786"):
        ClusterConfig(scheduler_address=ok)
    for bad in ({"workers": -3}, {"dashboard_address": "host:"}, {"memory_limit": "0"},
                {"scheduler_address": "tcp://:8786"}, {"scheduler_address": "gopher://h:1"}):
        with pytest.raises(ConfigError):
            ClusterConfig(**{"workers": 1, **bad})


def test_each_option_says_whether_it_counts_for_resume_and_the_manifest():
    """The rules live with the options (config field metadata), not in lists elsewhere:
    where a run runs and how it treats OUT never stop a resume; credentials never reach
    the manifest (nor a staging folder's plan)."""
    from esm2dask.config import MANIFEST, RESUME, PreprocessConfig, options_where
    from esm2dask.publish import run_plan

    config = PreprocessConfig.from_options(raw_dir="raw", output_dir="out", storage_options={"key": "SECRETKEY1"})
    resume, manifest = options_where(config, RESUME), options_where(config, MANIFEST)
    assert not {"cluster", "overwrite", "resume", "storage_options", "copy_inputs", "link_inputs"} & set(resume)
    assert {"formats", "split", "seed", "num_csv_files", "partition_bytes", "uf90"} <= set(resume)
    assert "storage_options" not in manifest and {"cluster", "formats"} <= set(manifest)
    assert "SECRETKEY1" not in repr(run_plan(config, {})) and "SECRETKEY1" not in repr(manifest)
