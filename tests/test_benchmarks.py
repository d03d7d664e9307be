"""Smoke runs of the benchmark studies on a tiny input, so that they do not rot.
No timing is asserted: benchmarks are measured apart from the tests."""

from __future__ import annotations

import pytest


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
    assert "Same output bytes for both orders: yes" in (bench / "input_order.md").read_text()
    engines.main(["--clusters", "300", "--workers", "1", "--engines", "pyfastx,python"])
    assert "byte-identical across engines: yes" in (bench / "engines.md").read_text()


def test_storage_and_cluster_smoke(bench):
    from benchmarks import storage_and_cluster

    storage_and_cluster.main(["--clusters", "300", "--workers", "1"])
    table = (bench / "storage_and_cluster.md").read_text()
    assert "s3 → s3 (moto)" in table and "external `dask scheduler`" in table


def test_formats_smoke(bench):
    from benchmarks import formats

    formats.main(["--clusters", "300", "--workers", "1", "--repeats", "1", "--writer-rows", "2000"])
    table = (bench / "formats.md").read_text()
    assert "| esm2nv + bionemo2 + hf |" in table and "byte-identical in every run: yes" in table
    assert "merge, the single writer" in table and (bench / "formats.png").stat().st_size > 0
