"""Shared fixtures: NVIDIA's QC sample, one real Dask LocalCluster for the session,
and helpers that fingerprint an output tree."""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: NVIDIA's QC sample (UniProt data, CC BY 4.0), carried by the repository.
QC_DIR = REPO / "tests" / "data" / "esm2_qc"


@pytest.fixture(scope="session")
def qc_dir() -> Path:
    if not (QC_DIR / "mapping.tsv").exists():
        pytest.fail(f"NVIDIA's QC sample is missing from {QC_DIR}")
    return QC_DIR


@pytest.fixture(scope="session")
def dask_cluster():
    """A real LocalCluster with 2 worker processes, shared by the tests that need one."""
    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
        memory_limit="4GiB",
    )
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory) -> Path:
    """A small synthetic raw folder (300 clusters, seed 5), shared: copy it before editing."""
    from esm2dask.synth import synth

    folder = tmp_path_factory.mktemp("synth") / "raw"
    synth(str(folder), 300, seed=5)
    return folder


@pytest.fixture
def no_cluster(monkeypatch):
    """Fails the test if a command gets as far as starting or joining a cluster."""
    import esm2dask.cluster
    import esm2dask.preprocess

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(esm2dask.preprocess, "dask_client", refuse)
    monkeypatch.setattr(esm2dask.cluster, "dask_client", refuse)


@pytest.fixture
def cluster_config(dask_cluster):
    from esm2dask.config import ClusterConfig

    return ClusterConfig(scheduler_address=dask_cluster.scheduler_address, dashboard_address=None)


def concat_md5(folder: Path | str) -> str:
    h = hashlib.md5()
    for f in sorted(glob.glob(os.path.join(folder, "x*.csv"))):
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def file_md5(path: Path | str) -> str:
    with open(path, "rb") as fh:
        return hashlib.md5(fh.read()).hexdigest()


def tree_digest(out: Path | str) -> dict[str, str]:
    """md5 of every file under uf50/ and uf90/, by relative path."""
    out = Path(out)
    return {
        str(p.relative_to(out)): file_md5(p)
        for top in ("uf50", "uf90")
        for p in sorted((out / top).rglob("*"))
        if p.is_file()
    }


def run_preprocess(raw: Path, out: Path, cluster_config, **kwargs):
    from esm2dask.config import PreprocessConfig
    from esm2dask.preprocess import preprocess

    config = PreprocessConfig.from_options(
        raw_dir=str(raw), output_dir=str(out), cluster=cluster_config, **kwargs
    )
    return preprocess(config)


def assert_one_line_error(result, *needles: str) -> str:
    """A CLI result that failed cleanly: exit 1, no traceback, exactly one
    ``esm2dask: error:`` line, holding every needle. Returns that line."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("esm2dask: error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]
