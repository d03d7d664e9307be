"""The output layout of ``docs/esm2-layout.md``: names, header, shard boundaries."""

from __future__ import annotations

import numpy as np

CSV_HEADER = b"record_id,record_name,sequence_length,sequence\n"
CSV_COLUMNS = ("record_id", "record_name", "sequence_length", "sequence")

UF50_TRAIN = "uf50/train"
UF50_VAL = "uf50/val"
UF50_TEST = "uf50/test"
UF90 = "uf90/uf90_csvs"
#: Output directories in the order they are reported.
SPLIT_DIRS = (UF50_TRAIN, UF50_VAL, UF50_TEST, UF90)
#: The layouts ``--format`` can write; ``esm2nv`` is the tree above, at OUT's root.
FORMATS = ("esm2nv", "bionemo2", "hf")
BIONEMO2_DIR = "bionemo2"
HF_DIR = "hf"
#: Every top-level output folder, of every layout: staged, published and listed together.
TOP_DIRS = ("uf50", "uf90", BIONEMO2_DIR, HF_DIR)

MANIFEST_NAME = "esm2dask-manifest.json"
STAGING_PREFIX = ".esm2dask-staging"
#: held while a run writes OUT (a lock file, or a lease object on an object store)
LOCK_NAME = ".esm2dask.lock"
#: the ending of a file being written under a temporary name (``NAME.<pid>-<thread>.tmp``)
TMP_SUFFIX = ".tmp"


def eval_splits(with_test: bool) -> list[tuple[str, str, str, str]]:
    """``(esm2nv folder, hf split, bionemo2 clusters file, bionemo2 database)`` of each
    evaluation split: validation, and test where the run has a test split of its own
    (``PreprocessConfig.has_own_test_split``; otherwise ``uf50/test`` repeats validation
    and the other layouts leave it out)."""
    splits = [(UF50_VAL, "validation", "valid_clusters.parquet", "validation.db")]
    if with_test:
        splits.append((UF50_TEST, "test", "test_clusters.parquet", "test.db"))
    return splits


def shard_name(index: int) -> str:
    """``x007.csv``: three digits keep name order equal to numeric order (K ≤ 1000)."""
    return f"x{index:03d}.csv"


def shard_bounds(n_rows: int, n_files: int) -> np.ndarray:
    """Row boundaries of ``n_files`` shards, like ``numpy.array_split``.

    The first ``n_rows % n_files`` shards get one row more.

    >>> shard_bounds(5001, 50)[:3].tolist(), int(shard_bounds(5001, 50)[-1])
    ([0, 101, 201], 5001)
    """
    q, r = divmod(n_rows, n_files)
    k = np.arange(n_files + 1, dtype=np.int64)
    return k * q + np.minimum(k, r)
