"""Shared fixtures: NVIDIA's QC sample, one real Dask LocalCluster for the session, the
runs that many modules only read (each made once per session), and helpers that
fingerprint an output tree.

A shared output is read, never changed: a test that edits one, or runs into it, works on
``shutil.copytree`` of it in its own ``tmp_path``."""

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


#: Dask's own diagnostics sampled less often on the session's cluster, which idles between
#: the tests that use it: with the defaults (event-loop ticks every 20 ms in each process, the
#: profiler every 10 ms in each worker) its scheduler and two workers take ~13% of one core
#: while idle, ~4% with these; task scheduling is unchanged.
SESSION_CLUSTER_CONFIG = {
    "distributed.admin.tick.interval": "200ms",
    "distributed.worker.profile.interval": "100ms",
    "distributed.admin.system-monitor.interval": "2s",
}


@pytest.fixture(scope="session")
def dask_cluster():
    """A real LocalCluster with 2 worker processes, shared by the tests that need one."""
    import dask
    from distributed import LocalCluster

    with dask.config.set(SESSION_CLUSTER_CONFIG):  # read when the scheduler and workers start
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
            memory_limit="4GiB",
        )
    yield cluster
    cluster.close()


def _session_cluster(dask_cluster):
    from esm2dask.config import ClusterConfig

    return ClusterConfig(scheduler_address=dask_cluster.scheduler_address, dashboard_address=None)


@pytest.fixture
def cluster_config(dask_cluster):
    return _session_cluster(dask_cluster)


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory) -> Path:
    """A small synthetic raw folder (300 clusters, seed 5), shared: copy it before editing."""
    from esm2dask.synth import synth

    folder = tmp_path_factory.mktemp("synth") / "raw"
    synth(str(folder), 300, seed=5)
    return folder


def kept_unchanged(out: Path, value):
    """Yields ``value`` (a shared output); at the end of the session, an error if any test
    added, removed or rewrote a file under ``out`` instead of working on a copy."""
    def state():
        return {str(p.relative_to(out)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(out.rglob("*"))}

    before = state()
    yield value
    assert state() == before, f"a test changed the shared output {out}; copy it (shutil.copytree) before editing"


@pytest.fixture(scope="session")
def synth_out(synth_raw, tmp_path_factory, dask_cluster) -> Path:
    """``synth_raw`` converted with the default options, shared: copy it before editing."""
    out = tmp_path_factory.mktemp("synth-out") / "out"
    run_preprocess(synth_raw, out, _session_cluster(dask_cluster))
    yield from kept_unchanged(out, out)


@pytest.fixture(scope="session")
def synth_digest(synth_out) -> dict[str, str]:
    """:func:`tree_digest` of ``synth_out``: what any default run of ``synth_raw``'s bytes gives."""
    return tree_digest(synth_out)


def qc_fasta_options(qc_dir: Path) -> dict[str, str]:
    """The QC sample's FASTA split: its training FASTA is the validation and test FASTA too."""
    train = str(qc_dir / "uniref50_train_filt.fasta")
    return dict(uf90=str(qc_dir / "ur90_ur50_sampler.fasta"), val=train, test=train)


@pytest.fixture(scope="session")
def qc_esm2nv(qc_dir, tmp_path_factory, dask_cluster):
    """NVIDIA's QC sample with the default layout and :func:`qc_fasta_options` (the tree
    whose fingerprints docs/esm2-layout.md gives): ``(out, result)``, shared: copy it
    before editing."""
    out = tmp_path_factory.mktemp("qc-esm2nv") / "out"
    result = run_preprocess(qc_dir, out, _session_cluster(dask_cluster), **qc_fasta_options(qc_dir))
    yield from kept_unchanged(out, (out, result))


@pytest.fixture(scope="session")
def qc_random_all_formats(qc_dir, tmp_path_factory, dask_cluster):
    """The QC folder as NVIDIA ships it (no uniref50_valid.fasta), split at random (500
    validation, 100 test clusters, seed 0), in every layout: ``(out, result)``, shared."""
    assert not (qc_dir / "uniref50_valid.fasta").exists()
    out = tmp_path_factory.mktemp("qc-random") / "out"
    result = run_preprocess(
        qc_dir, out, _session_cluster(dask_cluster), uf90=str(qc_dir / "ur90_ur50_sampler.fasta"),
        split="random", val_size=500, test_size=100, seed=0, formats=("esm2nv", "bionemo2", "hf"),
    )
    yield from kept_unchanged(out, (out, result))


@pytest.fixture
def no_cluster(monkeypatch):
    """Fails the test if a command gets as far as starting or joining a cluster."""
    import esm2dask.cluster
    import esm2dask.preprocess

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(esm2dask.preprocess, "dask_client", refuse)
    monkeypatch.setattr(esm2dask.cluster, "dask_client", refuse)


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
