"""--plan (a pure plan from sizes, the same one the run follows), progress and --json."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.main import cli
from esm2dask.config import ClusterConfig, PreprocessConfig
from esm2dask.plan import MAX_RANGES_PER_INPUT, estimate, make_plan
from esm2dask.progress import Reporter, Tally


def config_for(raw="raw", **kwargs) -> PreprocessConfig:
    cluster = kwargs.pop("cluster", ClusterConfig(workers=2))
    return PreprocessConfig.from_options(raw_dir=raw, cluster=cluster, **kwargs)


def sizes_for(config, uf50=10_000_000, uf90=25_000_000, mapping=2_000_000, val=50_000):
    return {config.mapping: mapping, config.uf50: uf50, config.uf90: uf90, config.val: val}


def test_plan_is_computed_from_sizes_alone():
    config = config_for(partition_size="4MB")
    plan = make_plan(config, sizes_for(config), cpu_count=2)
    ranges = {i.role: len(i.ranges) for i in plan.inputs}
    # ceil(size / 4 MB); the mapping at an eighth of the partition size
    assert ranges == {"mapping": 4, "uf50": 3, "uf90": 7, "val": 1}
    stages = {s.name: (s.tasks, s.read_bytes) for s in plan.stages if s.when == "always"}
    assert stages["fast-uf90"] == (7, 25_000_000) and stages["count-uf50"] == (3, 10_000_000)
    # uf50/train and uf90 are written in place: assemble makes the val and test shards only
    assert stages["assemble"] == (100, 0) and "count-test" not in stages  # test = val by default
    # every pass over an input is counted once: mapping, count ×3, convert-val, fast ×2
    assert plan.read_bytes() == 2_000_000 + 2 * (10_000_000 + 25_000_000) + 2 * 50_000
    assert plan.read_bytes("fallback-uf90") == 2 * 25_000_000  # index, then scatter
    assert plan.hash_buckets == {"uf50": 3, "uf90": 7}
    assert "uf50/train/x000.csv … x049.csv (50 files), counts.mmap, starts.mmap" in plan.output_files
    assert plan.workers == 2 and plan.estimate.seconds_shuffled > plan.estimate.seconds_in_order
    json.dumps(plan.to_dict())  # plain JSON values


def test_plan_refuses_too_many_ranges():
    from esm2dask.errors import ConfigError

    config = config_for(partition_size=1000)
    sizes = sizes_for(config, uf50=1_000_000, uf90=1000 * MAX_RANGES_PER_INPUT, mapping=125 * MAX_RANGES_PER_INPUT)
    make_plan(config, sizes)  # exactly at the limit, the mapping too (cut 8 times finer)
    with pytest.raises(ConfigError, match="10,001 ranges"):
        make_plan(config, {**sizes, config.uf90: 1000 * MAX_RANGES_PER_INPUT + 1})
    with pytest.raises(ConfigError, match="10,001 ranges .the mapping is cut 8 times finer"):
        make_plan(config, {**sizes, config.mapping: 125 * MAX_RANGES_PER_INPUT + 1})


def test_estimate_scales_with_workers_and_is_capped_by_cores():
    from esm2dask.plan import STARTUP_S

    one, four = estimate(10**9, 1), estimate(10**9, 4)
    assert one.seconds_in_order - STARTUP_S == pytest.approx(4 * (four.seconds_in_order - STARTUP_S))
    # ranges enough for 64 workers (fewer would cap them: test_errors_and_logs)
    config = config_for(cluster=ClusterConfig(workers=64), partition_size="256KB")
    plan = make_plan(config, sizes_for(config), cpu_count=2)
    assert plan.estimate.workers == 2 and "64 workers on 2 cores" in plan.notes[0]


class Recorder(Reporter):
    def __init__(self):
        super().__init__()
        self.stages: dict[str, int] = {}

    def stage(self, name, total):
        super().stage(name, total)
        self.stages[name] = total


ALL = ("esm2nv", "bionemo2", "hf")
#: every --format against every --split (and a --test FASTA of its own); the default run
#: takes the corners, `make drills` the whole matrix
MATRIX = [
    pytest.param(formats, split, unsorted, id=f"{'+'.join(formats)}-{split}-{'shuffled' if unsorted else 'in-order'}",
                 marks=() if default else pytest.mark.drill)
    for formats, split, unsorted, default in [
        (("esm2nv",), "fasta", False, True),
        (("esm2nv",), "fasta", True, True),
        (ALL, "random", True, True),
        (("bionemo2",), "own-test", False, True),
        (("hf",), "random", False, False),
        (("hf",), "own-test", True, False),
        (("bionemo2",), "random", True, False),
        (("bionemo2",), "fasta", False, False),
        (("esm2nv", "hf"), "fasta", False, False),
        (ALL, "fasta", False, False),
        (ALL, "own-test", False, False),
        (("esm2nv",), "random", False, False),
    ]
]


@pytest.mark.parametrize("formats, split, unsorted", MATRIX)
def test_the_run_runs_the_stages_the_plan_lists_and_counts_every_byte(formats, split, unsorted, tmp_path,
                                                                      cluster_config):
    """``--plan`` and the run share one stage table (esm2dask.stages): the run runs every
    stage the plan lists for these options, the hash join's too when the input is out of
    mapping order, and nothing else; tasks as planned (at most, where the data decides)."""
    import shutil

    from esm2dask.plan import input_sizes
    from esm2dask.preprocess import preprocess
    from esm2dask.synth import synth

    raw = tmp_path / "raw"
    synth(str(raw), 300, seed=4, unsorted=unsorted)
    options = dict(formats=formats, partition_size="40KB")
    if split == "random":
        options.update(split="random", val_size=40, test_size=30, seed=1)
    elif split == "own-test":
        shutil.copy(raw / "uniref50_valid.fasta", raw / "test.fasta")
        options.update(test=str(raw / "test.fasta"))
    config = PreprocessConfig.from_options(raw_dir=str(raw), output_dir=str(tmp_path / "out"),
                                           cluster=cluster_config, **options)
    plan = make_plan(config, input_sizes(config))
    recorder = Recorder()
    result = preprocess(config, recorder)
    whens = {"always"} | {f"fallback-{name}" for name, s in result.streams.items() if not s.fast_path}
    assert (len(whens) == 3) == unsorted
    planned = [s for s in plan.stages if s.when in whens]
    assert set(recorder.stages) == {s.name for s in planned}
    for s in planned:
        got = recorder.stages[s.name]
        assert got == s.tasks if s.exact else 1 <= got <= s.tasks, (s, got)
    # the bar ends full: every byte the tasks read was planned and counted
    assert recorder.tally.done == recorder.tally.total == sum(s.read_bytes for s in planned) == result.read_bytes
    assert result.skipped_tasks == 0 and result.done_here_share == 1.0


def test_plan_on_the_command_line_starts_nothing_and_writes_nothing(tmp_path, monkeypatch):
    import esm2dask.preprocess
    from esm2dask.synth import synth

    monkeypatch.setattr(esm2dask.preprocess, "preprocess", lambda *a, **k: pytest.fail("the run started"))
    raw = tmp_path / "raw"
    synth(str(raw), 300, seed=4)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["preprocess", str(raw), "-o", str(out), "--plan", "--workers", "3"])
    assert result.exit_code == 0, result.output
    for needle in ("Inputs:", "fast-uf90", "Workers: 3 local worker(s)", "uf90/uf90_csvs/x000.csv … x049.csv",
                   "esm2dask.log", "Estimate: ~", "benchmarks/results/input_order.md"):
        assert needle in result.output, needle
    as_json = CliRunner().invoke(cli, ["preprocess", str(raw), "-o", str(out), "--plan", "--json"])
    plan = json.loads(as_json.output)
    assert plan["inputs"][0]["role"] == "mapping" and plan["estimate"]["source"].startswith("benchmarks/")
    assert not out.exists()


def test_json_summary_is_one_object_on_stdout(tmp_path, dask_cluster):
    from esm2dask.synth import synth

    raw = tmp_path / "raw"
    synth(str(raw), 300, seed=4)
    result = CliRunner().invoke(cli, ["preprocess", str(raw), "-o", str(tmp_path / "out"), "--json", "--plain",
                                      "--scheduler-address", dask_cluster.scheduler_address])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows"]["uf50/train"] == 300 and summary["skipped_tasks"] == 0
    assert summary["log"].endswith("esm2dask.log") and summary["manifest"].endswith("esm2dask-manifest.json")


def test_tally_rate_counts_only_this_runs_work():
    t = Tally(total=1000, started=0.0)
    t.skipped = 600
    t.done = 100
    assert t.fraction() == 0.7
    assert t.rate(now=10.0) == 10.0  # the 600 skipped do not count
    assert t.eta(now=10.0) == 30.0
    assert t.line(now=10.0) == " 70% 700 B/1.0 KB, 10 B/s, ETA 30 s"


def test_result_rate_counts_only_this_runs_work():
    from esm2dask.preprocess import PreprocessResult

    r = PreprocessResult("o", {}, {}, input_bytes=100_000_000, wall_seconds=10.0, streams={},
                         read_bytes=200_000_000, skipped_read_bytes=150_000_000)
    assert r.mb_per_s == pytest.approx(2.5)  # a quarter of 100 MB in 10 s


def test_plain_progress_prints_a_line_every_few_seconds(capsys):
    import time

    from cli.progress import PlainReporter

    reporter = PlainReporter(interval_s=0.05)
    reporter.begin(1000)
    reporter.stage("fast-uf90", 4)
    reporter.advance("fast-uf90", 1)
    reporter.progress(250)
    time.sleep(0.3)
    reporter.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and all("250 B/1.0 KB" in line and "fast-uf90 1/4" in line for line in lines)


def test_synth_reports_every_record_and_refuses_an_existing_folder(tmp_path):
    from esm2dask.synth import synth

    reporter = Reporter()
    result = synth(str(tmp_path / "s"), 200, seed=1, reporter=reporter)
    mapping_lines = (tmp_path / "s" / "mapping.tsv").read_text().count("\n") - 1
    fasta_records = sum((tmp_path / "s" / n).read_text().count(">") for n in
                        ("uniref50_train_filt.fasta", "uniref90membersandreps_ur50trainfiltreps.fasta",
                         "uniref50_valid.fasta"))
    assert reporter.tally.done == reporter.tally.total == mapping_lines + fasta_records
    assert result.members + 200 <= fasta_records
    again = CliRunner().invoke(cli, ["synth", str(tmp_path / "s"), "--clusters", "10"])
    assert again.exit_code == 1 and "--overwrite" in again.output
    over = CliRunner().invoke(cli, ["synth", str(tmp_path / "s"), "--clusters", "10", "--overwrite"])
    assert over.exit_code == 0, over.output
    assert (tmp_path / "s" / "mapping.tsv").read_text().count("\n") == 11
