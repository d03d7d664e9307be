"""The frozen configuration of one ``preprocess`` run, resolved once from flags,
environment and defaults, validated in ``__post_init__``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dask.utils import parse_bytes

from .errors import ConfigError
from .layout import FORMATS
from .storage import StorageOptions, cpu_count, join

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


def has_own_test_split(split: str, val: str, test: str) -> bool:
    """Whether a run writes test data of its own, beside validation: a random split
    draws both; a FASTA split converts one FASTA into both unless ``--test`` names
    another. The rule every layout (and ``verify``, and ``--plan``) follows.

    >>> has_own_test_split("fasta", "v.fasta", "v.fasta"), has_own_test_split("random", "v", "v")
    (False, True)
    """
    return split == "random" or test != val


#: The smallest --memory-limit that leaves a worker room to work (a worker process alone
#: takes ~150 MB; a 64 MiB range needs ~0.5 GB at its peak, benchmarks/results/partition_sweep.md).
MIN_MEMORY_LIMIT = 256 * 2**20
DEFAULT_DASHBOARD_ADDRESS = "127.0.0.1:8787"
#: At most this many byte ranges per input file (at the default 64 MiB: 640 GiB of FASTA);
#: :mod:`esm2dask.plan` enforces it. Here so that the CLI's help needs no heavy import.
MAX_RANGES_PER_INPUT = 10_000
SCHEDULER_SCHEMES = ("tcp", "tls", "ucx", "ws", "wss", "inproc")


def _port_ok(text: str) -> bool:
    return text.isdigit() and 0 <= int(text) <= 65535


def _host_ok(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):  # [IPv6]
        return all(c in "0123456789abcdefABCDEF:." for c in host[1:-1])
    return all(c.isalnum() or c in ".-_" for c in host)


def check_dashboard_address(text: str | None) -> None:
    """``:8787``, ``127.0.0.1:0`` (any free port), ``8787``, or None (no dashboard)."""
    if text is None:
        return
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if not (_port_ok(port) and _host_ok(host)):
        raise ConfigError(
            f"--dashboard-address {text!r}: expected [HOST]:PORT, e.g. :8787, 127.0.0.1:0 (any free port), "
            f"or 'none' for no dashboard"
        )


def check_scheduler_address(text: str) -> None:
    """``tcp://HOST:PORT`` (the scheme may be left out: tcp)."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "tcp", text
    host, sep, port = rest.rpartition(":")
    if scheme not in SCHEDULER_SCHEMES or not sep or not host or not _host_ok(host) or not _port_ok(port):
        raise ConfigError(f"--scheduler-address {text!r}: expected tcp://HOST:PORT, e.g. tcp://10.0.0.5:8786")


def check_memory_limit(text: str | None) -> None:
    """``auto``, a fraction of the machine's memory (0 < f <= 1), or a size of at least 256 MiB."""
    if text is None or str(text).lower() == "auto":
        return
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and 0 < value <= 1:
        return
    try:
        size = parse_bytes(str(text))
    except (ValueError, KeyError):
        raise ConfigError(
            f"--memory-limit {text!r}: expected a size per worker (e.g. 4GiB), a fraction of the "
            f"machine's memory (e.g. 0.5), or auto"
        ) from None
    if size < MIN_MEMORY_LIMIT:
        raise ConfigError(f"--memory-limit {text!r}: at least 256MiB per worker (a worker alone takes ~150 MB)")


@dataclass(frozen=True)
class ClusterConfig:
    """How to get a Dask cluster: start a LocalCluster, or connect to a running one.
    Every value is checked here, before any cluster starts."""

    workers: int = field(default_factory=cpu_count)
    threads_per_worker: int = 1
    #: False: the LocalCluster's workers are threads of this process (nothing to start;
    #: the kernel releases the GIL; faster here, benchmarks/results/engines.md). True: one
    #: process per worker.
    processes: bool = False
    memory_limit: str | None = None
    scheduler_address: str | None = None
    scheduler_file: str | None = None
    #: loopback only by default: the dashboard shows task arguments and file names, and
    #: anyone who can reach the port sees it; ``:8787`` (no host) means every interface
    dashboard_address: str | None = DEFAULT_DASHBOARD_ADDRESS
    performance_report: str | None = None
    #: How long to wait for --scheduler-file to appear and for the scheduler to answer.
    scheduler_timeout_s: float = 60.0

    def __post_init__(self):
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, not {self.workers}")
        if self.threads_per_worker < 1:
            raise ConfigError(f"--threads-per-worker must be at least 1, not {self.threads_per_worker}")
        if self.scheduler_address and self.scheduler_file:
            raise ConfigError("give --scheduler-address or --scheduler-file, not both")
        if self.scheduler_address:
            check_scheduler_address(self.scheduler_address)
        if not self.scheduler_timeout_s > 0:
            raise ConfigError(f"--scheduler-timeout must be above 0 seconds, not {self.scheduler_timeout_s}")
        check_memory_limit(self.memory_limit)
        check_dashboard_address(self.dashboard_address)
        if self.performance_report:
            folder = os.path.dirname(os.path.abspath(self.performance_report))
            if not os.path.isdir(folder):
                raise ConfigError(f"--performance-report {self.performance_report}: no folder {folder}")

    @property
    def external(self) -> bool:
        """A running cluster (its workers are not this config's)."""
        return bool(self.scheduler_address or self.scheduler_file)


#: Field metadata of :class:`PreprocessConfig`: whether an option counts for ``--resume``
#: (a staging folder made with another value is not resumed) and whether it is written
#: into the manifest's ``parameters``.
RESUME, MANIFEST = "resume", "manifest"


def options_where(config, key: str) -> dict[str, Any]:
    """The options of ``config`` whose field metadata does not set ``key`` false, as plain
    values (``asdict``)."""
    import dataclasses

    values = dataclasses.asdict(config)
    return {f.name: values[f.name] for f in dataclasses.fields(config) if f.metadata.get(key, True)}


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
    # Each option says whether it is part of what a run makes (a resumed run must have the
    # same) and whether it is written into the manifest (RESUME, MANIFEST; both by default).
    overwrite: bool = field(default=False, metadata={RESUME: False})
    resume: bool = field(default=False, metadata={RESUME: False})
    copy_inputs: bool = field(default=True, metadata={RESUME: False})
    #: hard links instead of copies: the input and the output's name for it are one file
    link_inputs: bool = field(default=False, metadata={RESUME: False})
    #: credentials among them: never in the manifest, nor in a staging folder's plan
    storage_options: dict[str, Any] = field(default_factory=StorageOptions, metadata={RESUME: False, MANIFEST: False})
    #: where the run runs, not what it makes
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={RESUME: False})
    #: layouts to publish (``--format``); given in any order, repeated or comma-separated
    formats: tuple[str, ...] = ("esm2nv",)

    def __post_init__(self):
        object.__setattr__(self, "formats", parse_formats(self.formats))
        # credentials travel as task arguments: their repr (Dask's logs, dashboard) is masked
        object.__setattr__(self, "storage_options", StorageOptions(self.storage_options))
        if self.split not in ("fasta", "random"):
            raise ConfigError(f"--split must be 'fasta' or 'random', not {self.split!r}")
        if not 1 <= self.num_csv_files <= 1000:
            raise ConfigError("--num-csv-files must be between 1 and 1000 (names are x000…x999)")
        if self.split == "random" and (self.val_size <= 0 or self.test_size <= 0):
            raise ConfigError("--split random needs --val-size and --test-size above 0")
        if self.link_inputs and not self.copy_inputs:
            raise ConfigError("--link-inputs and --no-copy-inputs exclude each other")
        if not 1 <= self.partition_bytes <= 1 << 30:
            raise ConfigError("--partition-size must be between 1 byte and 1GiB")
        if self.seed < 0:
            raise ConfigError(f"--seed must be 0 or more, not {self.seed}")
        if self.val_size < 0 or self.test_size < 0:
            raise ConfigError("--val-size and --test-size must be 0 or more")

    @property
    def has_own_test_split(self) -> bool:
        """See :func:`has_own_test_split`."""
        return has_own_test_split(self.split, self.val, self.test)

    def input_roles(self) -> dict[str, str]:
        """The inputs this run reads, by role, in reading order: the mapping and both
        train FASTAs always; the validation FASTA (and a separate test FASTA) only with
        ``--split fasta``, since the random split draws val/test from the clusters."""
        roles = {"mapping": self.mapping, "uf50": self.uf50, "uf90": self.uf90}
        if self.split == "fasta":
            roles["val"] = self.val
            if self.test != self.val:
                roles["test"] = self.test
        return roles

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
