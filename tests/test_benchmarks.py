"""Smoke runs of the benchmark studies on a tiny input, so that they do not rot.
No timing is asserted: benchmarks are measured apart from the tests."""

from __future__ import annotations

import pytest

# The studies need the bench extras (pip install -e ".[bench]"); without them, skip cleanly.
pytest.importorskip("matplotlib")
pytest.importorskip("psutil")

#: each study end to end on a tiny input: long, so `make test` skips them and `make drills` (CI) runs them
pytestmark = pytest.mark.drill


@pytest.fixture
def bench(tmp_path, monkeypatch):
    from benchmarks import common

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common, "CACHE", tmp_path / "cache")
    return tmp_path / "results"


def test_partition_sweep_smoke(bench):
    from benchmarks import partition_sweep

    partition_sweep.main(["--clusters", "300", "--sizes", "1,4", "--workers", "1", "--name", "sweep"])
    table = (bench / "sweep.md").read_text()
    assert "| 1 MiB, 1 worker(s) |" in table and "byte-identical: yes" in table
    assert (bench / "sweep.png").stat().st_size > 0


def test_input_order_and_engines_smoke(bench):
    from benchmarks import engines, input_order

    input_order.main(["--clusters", "300", "--workers", "1"])
    table = (bench / "input_order.md").read_text()
    assert "Same output bytes for both orders: yes" in table and "Study run time:" in table
    assert (bench / "input_order.png").stat().st_size > 0
    pytest.importorskip("pyfastx")  # the baseline the kernel is compared with (bench extras)
    engines.main(["--clusters", "300", "--block-size", "16KiB", "--repeats", "1"])
    table = (bench / "engines.md").read_text()
    assert "byte-identical across configurations: yes" in table and "Study run time:" in table
    assert table.count("| yes |") == 2  # the kernel's rows equal pyfastx + polars on the same blocks


def test_storage_and_cluster_smoke(bench):
    from benchmarks import storage_and_cluster

    storage_and_cluster.main(["--clusters", "300", "--workers", "1"])
    table = (bench / "storage_and_cluster.md").read_text()
    assert "s3 → s3 (moto)" in table and "external `dask scheduler`" in table


def test_small_presets_apply_and_rename_the_results():
    import argparse

    from benchmarks.common import add_small, apply_small

    ap = argparse.ArgumentParser()
    ap.add_argument("--clusters", type=int, default=800_000)
    add_small(ap, clusters=20_000)
    full, small = ap.parse_args([]), ap.parse_args(["--small"])
    assert (apply_small(full), full.clusters) == ("", 800_000)
    assert (apply_small(small), small.clusters) == ("-small", 20_000)
    assert "--clusters 20000" in ap.format_help()


def test_formats_smoke(bench):
    from benchmarks import formats

    formats.main(["--clusters", "300", "--workers", "1", "--repeats", "1", "--writer-rows", "2000"])
    table = (bench / "formats.md").read_text()
    assert "| esm2nv + bionemo2 + hf |" in table and "byte-identical in every run: yes" in table
    assert "merge, the single writer" in table and (bench / "formats.png").stat().st_size > 0


def test_kernel_study_smoke(bench):
    """The kernel before and now on the same tiny blocks: identical rows and counts."""
    from benchmarks import kernel

    kernel.main(["--clusters", "300", "--block-size", "16KiB", "--blocks", "2", "--repeats", "1"])
    table = (bench / "kernel.md").read_text()
    assert "Rows and counts identical between before and now: yes" in table and "Study run time:" in table
    assert "| 60 columns | convert, now |" in table and (bench / "kernel.png").stat().st_size > 0


def test_report_smoke(bench):
    from benchmarks import report

    report.main(["--clusters", "300", "--workers", "1", "--repeats", "1", "--format", "esm2nv,hf"])
    table = (bench / "report.md").read_text()
    assert "| report | esm2nv |" in table and "| report | hf |" in table and "Study run time:" in table


def test_train_db_smoke(bench, monkeypatch, tmp_path):
    from benchmarks import formats

    monkeypatch.setattr(formats, "RESULTS", bench)
    monkeypatch.setattr(formats, "SETTLE_S", 0)
    formats.main(["--train-db", "--train-db-rows", "3000", "--workers", "1", "--page-sizes", "4096,65536",
                  "--scratch", str(tmp_path)])
    table = (bench / "train_db.md").read_text()
    assert "| page writer: layout → pages (`pwrite`) → final step | 65536 |" in table
    assert "today: bucket databases" in table and "Projection" in table and "integrity_check` of the 65536-byte database: ok" in table
    assert "integrity_check` of the 4096-byte database: ok" in table
    assert (bench / "train_db.png").stat().st_size > 0


def test_stage_costs_smoke(bench):
    """Both configurations, wall and compute per stage, on a tiny input."""
    from benchmarks import stage_costs

    stage_costs.main(["--clusters", "300", "--workers", "1", "--repeats", "1"])
    table = (bench / "stage_costs.md").read_text()
    assert "| esm2nv | " in table and "| all three | " in table
    assert "| bionemo2-train-pages | 0.00 | " in table and "| **total** |" in table
    assert (bench / "stage_costs.png").stat().st_size > 0
