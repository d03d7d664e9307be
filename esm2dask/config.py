"""The frozen configuration of one ``preprocess`` run, resolved once from flags,
environment and defaults, validated in ``__post_init__``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dask.utils import parse_bytes

from .errors import ConfigError
from .fasta import ENGINES
from .layout import FORMATS
from .storage import cpu_count, join

#: The seed workflow's download location.
DEFAULT_RAW_DIR = "/workspace/data_from_ngc/uniref50_90_202104_esm2nv_v1.0"
#: Chosen by the partition-size sweep in ``benchmarks/results/partition_sweep.md``.
DEFAULT_PARTITION_SIZE = "64MiB"
DEFAULT_NUM_CSV_FILES = 50

UF50_FASTA = "uniref50_train_filt.fasta"
UF90_FASTA = "uniref90membersandreps_ur50trainfiltreps.fasta"
MAPPING_TSV = "mapping.tsv"
VAL_FASTA = "uniref50_valid.fasta"
RAW_README = "README.md"


def parse_size(text: str | int) -> int:
    """``"128MiB"`` → 134217728; a plain number is bytes."""
    if isinstance(text, int):
        return text
    try:
        value = parse_bytes(str(text))
    except (ValueError, KeyError):
        raise ConfigError(f"not a byte size: {text!r} (use e.g. 64MiB, 1GB, 1048576)") from None
    if value <= 0:
        raise ConfigError(f"size must be positive: {text!r}")
    return int(value)


def parse_formats(values: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``("esm2nv,hf", "bionemo2")`` → ``("esm2nv", "bionemo2", "hf")``: known names,
    each once, in the order of :data:`~esm2dask.layout.FORMATS`.

    >>> parse_formats(["hf, esm2nv", "hf"])
    ('esm2nv', 'hf')
    """
    names = {n.strip() for v in ([values] if isinstance(values, str) else values) for n in v.split(",")}
    names.discard("")
    unknown = sorted(names - set(FORMATS))
    if unknown:
        raise ConfigError(f"--format {unknown[0]!r} is not one of {', '.join(FORMATS)}")
    if not names:
        raise ConfigError(f"--format needs at least one of {', '.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in names)


@dataclass(frozen=True)
class ClusterConfig:
    """How to get a Dask cluster: start a LocalCluster, or connect to a running one."""

    workers: int = field(default_factory=cpu_count)
    threads_per_worker: int = 1
    memory_limit: str | None = None
    scheduler_address: str | None = None
    scheduler_file: str | None = None
    dashboard_address: str | None = ":8787"
    performance_report: str | None = None

    def __post_init__(self):
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.threads_per_worker < 1:
            raise ConfigError("--threads-per-worker must be at least 1")
        if self.scheduler_address and self.scheduler_file:
            raise ConfigError("give --scheduler-address or --scheduler-file, not both")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything one ``preprocess`` run needs; built once by :meth:`from_options`."""

    raw_dir: str
    output_dir: str
    uf50: str
    uf90: str
    mapping: str
    val: str
    test: str
    split: str = "fasta"
    val_size: int = 5000
    test_size: int = 1_000_000
    seed: int = 0
    num_csv_files: int = DEFAULT_NUM_CSV_FILES
    partition_bytes: int = parse_size(DEFAULT_PARTITION_SIZE)
    engine: str = "pyfastx"
    overwrite: bool = False
    resume: bool = False
    copy_inputs: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    #: layouts to publish (``--format``); given in any order, repeated or comma-separated
    formats: tuple[str, ...] = ("esm2nv",)

    def __post_init__(self):
        object.__setattr__(self, "formats", parse_formats(self.formats))
        if self.split not in ("fasta", "random"):
            raise ConfigError(f"--split must be 'fasta' or 'random', not {self.split!r}")
        if not 1 <= self.num_csv_files <= 1000:
            raise ConfigError("--num-csv-files must be between 1 and 1000 (names are x000…x999)")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}")
        if self.split == "random" and (self.val_size <= 0 or self.test_size <= 0):
            raise ConfigError("--split random needs --val-size and --test-size above 0")
        if not 1 <= self.partition_bytes <= 1 << 30:
            raise ConfigError("--partition-size must be between 1 byte and 1GiB")
        if self.overwrite and self.resume:
            raise ConfigError("--overwrite and --resume exclude each other")

    @classmethod
    def from_options(
        cls,
        raw_dir: str | None = None,
        output_dir: str | None = None,
        uf50: str | None = None,
        uf90: str | None = None,
        mapping: str | None = None,
        val: str | None = None,
        test: str | None = None,
        partition_size: str | int = DEFAULT_PARTITION_SIZE,
        **kwargs,
    ) -> "PreprocessConfig":
        """Fill in defaults: ``RAW_DIR`` from ``$ESM2DASK_RAW_DIR`` or the seed's path,
        inputs inside it, and the output beside it (``RAW_DIR_preproc``)."""
        raw = (raw_dir or os.environ.get("ESM2DASK_RAW_DIR") or DEFAULT_RAW_DIR).rstrip("/")
        val_url = val or join(raw, VAL_FASTA)
        return cls(
            raw_dir=raw,
            output_dir=(output_dir or raw + "_preproc").rstrip("/"),
            uf50=uf50 or join(raw, UF50_FASTA),
            uf90=uf90 or join(raw, UF90_FASTA),
            mapping=mapping or join(raw, MAPPING_TSV),
            val=val_url,
            test=test or val_url,
            partition_bytes=parse_size(partition_size),
            **kwargs,
        )
