"""The plan of one ``preprocess`` run, computed from the options and the input sizes alone
(no cluster, no reading of the inputs): the byte ranges of every input, the stages with
their task counts and the bytes each reads, the files the run writes, and a time estimate
from measured rates. ``esm2dask preprocess --plan`` prints it; the run itself takes its
ranges and hash-bucket counts from here, so what ``--plan`` shows is what runs.

A partition size that would cut one input into more than :data:`MAX_RANGES_PER_INPUT`
ranges is refused here, before a cluster starts: each range is several tasks, and a few
hundred thousand tiny tasks swamp the scheduler and the workers' memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from . import storage
from .config import DEFAULT_RAW_DIR, MAX_RANGES_PER_INPUT, PreprocessConfig
from .errors import ConfigError, InputError
from .layout import MANIFEST_NAME, UF50_TEST, UF50_TRAIN, UF50_VAL, UF90, eval_splits, shard_name
from .logs import RunLog
from .publish import copied_by_task, input_copies
from .ranges import ByteRange, plan_ranges
from .stages import Stage, stage_table

#: The mapping is cut into ranges this many times smaller than the FASTAs': mapping lines
#: cost more per byte than FASTA (polars splits and hashes them), and smaller ranges keep
#: the first stage from waiting on one long task.
MAPPING_PARTITION_DIVISOR = 8

#: Measured rates behind the estimate: ``benchmarks/results/input_order.md`` (2026-11-29;
#: 1190 MB of ``esm2dask synth`` input, 2 in-process workers on this project's 2-vCPU
#: machine, 64 MiB partitions, the FASTA kernel). Wall clock of the whole command.
MEASURED = {
    "source": "benchmarks/results/input_order.md",
    "input_mb": 1190.0,
    "workers": 2,
    "wall_s_mapping_order": 7.86,
    "wall_s_shuffled": 17.16,
}
#: Imports and the in-process LocalCluster: about a second on that machine (a LocalCluster
#: of worker processes adds ~3 s).
STARTUP_S = 1.0


@dataclass(frozen=True)
class InputPlan:
    role: str  # mapping, uf50, uf90, val, test
    url: str
    size_bytes: int
    ranges: tuple[ByteRange, ...]


@dataclass(frozen=True)
class Estimate:
    seconds_in_order: float  # the FASTAs in mapping order (the release as published)
    seconds_shuffled: float  # any other order (hash join)
    workers: int
    source: str


@dataclass(frozen=True)
class RunPlan:
    inputs: tuple[InputPlan, ...]
    hash_buckets: dict[str, int]
    stages: tuple[Stage, ...]  # the stage table (esm2dask.stages)
    workers: int | None  # None: a running cluster, whose size --plan does not ask
    output_dir: str
    output_files: tuple[str, ...]  # groups of files, relative to output_dir
    estimate: Estimate
    partition_bytes: int
    notes: tuple[str, ...] = field(default=())

    @property
    def input_bytes(self) -> int:
        return sum(i.size_bytes for i in self.inputs)

    def ranges(self, role: str) -> list[ByteRange]:
        return list(next(i.ranges for i in self.inputs if i.role == role))

    def read_bytes(self, when: str = "always") -> int:
        return sum(s.read_bytes for s in self.stages if s.when == when)

    def tasks(self, when: str = "always") -> int:
        return sum(s.tasks for s in self.stages if s.when == when)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = [s.to_dict() for s in self.stages]
        for i in d["inputs"]:
            i["ranges"] = len(i["ranges"])
        d["input_bytes"] = self.input_bytes
        return d


def input_sizes(config: PreprocessConfig) -> dict[str, int]:
    """The size of every input (each checked: there, not empty, not compressed).

    Without a RAW_DIR argument a missing folder is explained: where it was looked for, why.
    """
    raw = config.raw_dir
    if storage.folder_missing(raw):
        missing = [u for u in config.input_roles().values() if u.startswith(raw + "/")]
        if missing:
            if raw == os.environ.get("ESM2DASK_RAW_DIR", "").rstrip("/"):
                why = "RAW_DIR was not given, so it came from $ESM2DASK_RAW_DIR"
            elif raw == DEFAULT_RAW_DIR:
                why = ("RAW_DIR was not given and $ESM2DASK_RAW_DIR is not set, so esm2dask looked where "
                       "the BioNeMo seed workflow downloads the release")
            else:
                why = "the RAW_DIR argument"
            raise InputError(raw, "", f"no such folder ({why}); pass the raw folder: esm2dask preprocess RAW_DIR")
    return {url: storage.check_input_file(url, config.storage_options) for url in dict.fromkeys(config.input_roles().values())}


def _checked_ranges(role: str, url: str, size: int, partition_bytes: int) -> list[ByteRange]:
    divisor = MAPPING_PARTITION_DIVISOR if role == "mapping" else 1
    part = max(1, partition_bytes // divisor)
    n = max(1, math.ceil(size / part))
    if n > MAX_RANGES_PER_INPUT:
        smallest = math.ceil(size * divisor / MAX_RANGES_PER_INPUT / 2**20)
        finer = f" (the mapping is cut {divisor} times finer)" if divisor > 1 else ""
        raise ConfigError(
            f"--partition-size {partition_bytes} bytes would cut {url} ({size:,} bytes) into {n:,} ranges{finer}, "
            f"{n * 4:,}+ tasks; at most {MAX_RANGES_PER_INPUT:,} ranges per input: use --partition-size "
            f"{smallest}MiB or more (default 64MiB)"
        )
    return plan_ranges(url, size, part)


def _shard_files(folder: str, num_csv_files: int, with_arrays: bool) -> str:
    last = shard_name(num_csv_files - 1)
    names = f"{shard_name(0)} … {last} ({num_csv_files} files)" if num_csv_files > 1 else shard_name(0)
    return f"{folder}/{names}" + (", counts.mmap, starts.mmap" if with_arrays else "")


def make_plan(config: PreprocessConfig, sizes: dict[str, int], cpu_count: int | None = None) -> RunPlan:
    """The plan from the options and the input sizes (``{url: bytes}``); pure.

    Raises :class:`ConfigError` when the partition size would make too many tasks.
    """
    cpu_count = cpu_count or storage.cpu_count()
    part = config.partition_bytes
    roles = config.input_roles()
    inputs = tuple(
        InputPlan(role, url, sizes[url], tuple(_checked_ranges(role, url, sizes[url], part)))
        for role, url in roles.items()
    )
    by_role = {i.role: i for i in inputs}
    # Hash buckets of the join (and of the repeated-id check): one partition of FASTA each.
    buckets = {name: max(1, math.ceil(by_role[name].size_bytes / part)) for name in ("uf50", "uf90")}
    copies = input_copies(config)
    stages = stage_table(config, {role: len(i.ranges) for role, i in by_role.items()},
                         {role: i.size_bytes for role, i in by_role.items()}, buckets,
                         len(copies), sum(copied_by_task(config, url) for url, _ in copies))
    uf50_dirs = (UF50_TRAIN, UF50_VAL, UF50_TEST)

    files = [_shard_files(d, config.num_csv_files, with_arrays=d == UF50_TRAIN or config.split == "random")
             for d in uf50_dirs]
    files.append(_shard_files(UF90, config.num_csv_files, with_arrays=False))
    if "esm2nv" not in config.formats:
        files = []  # built in the staging folder for the other layouts, not published
    evals = eval_splits(config.has_own_test_split)
    if "bionemo2" in config.formats:
        files.append(", ".join(["bionemo2/train_clusters.parquet, train.db", *(f"{c}, {db}" for *_, c, db in evals)]))
    if "hf" in config.formats:
        files.append(", ".join(f"hf/{split}/part-NNNNN.parquet" for split in ["train", *(e[1] for e in evals)]))
    files += [MANIFEST_NAME, RunLog.NAME]
    if config.copy_inputs:
        names = sorted({u.rstrip("/").rsplit("/", 1)[-1] for u in roles.values()})
        how = "hard-linked (--link-inputs)" if config.link_inputs else "reflinked where the file system can, else copied"
        files.append(f"the inputs, {how}: " + ", ".join(names) + " (and README.md)")

    external = config.cluster.external
    workers = None if external else config.cluster.workers
    notes = []
    n_ranges = sum(len(i.ranges) for i in inputs)
    useful = max(1, math.ceil(n_ranges / config.cluster.threads_per_worker))
    if workers is not None and workers > useful:
        # each worker of a LocalCluster costs time to start and memory; past one thread per
        # byte range the extra ones only wait (500 of them made no progress for minutes)
        notes.append(f"--workers {workers}: capped at {useful}, one per byte range of the input "
                     f"(a smaller --partition-size makes more ranges)")
        workers = useful
    effective = min(workers or config.cluster.workers, cpu_count) if not external else config.cluster.workers
    if not external and workers > cpu_count:
        notes.append(f"{workers} workers on {cpu_count} cores: the estimate counts {cpu_count}")
    if external:
        notes.append(f"a running cluster: --plan does not contact it; the estimate assumes {effective} worker(s)")
    return RunPlan(
        inputs=inputs,
        hash_buckets=buckets,
        stages=tuple(stages),
        workers=workers,
        output_dir=config.output_dir,
        output_files=tuple(files),
        estimate=estimate(sum(i.size_bytes for i in inputs), effective, startup=not external),
        partition_bytes=part,
        notes=tuple(notes),
    )


def estimate(input_bytes: int, workers: int, startup: bool = True) -> Estimate:
    """Seconds for ``input_bytes`` on ``workers`` workers, scaling the measured per-worker
    rates linearly (a disk or network slower than the workers' parsing is not modelled)."""
    m = MEASURED
    mb = input_bytes / 1e6

    def seconds(wall: float) -> float:
        per_worker_mb_s = m["input_mb"] / (wall - STARTUP_S) / m["workers"]
        return (STARTUP_S if startup else 0.0) + mb / (per_worker_mb_s * max(1, workers))

    return Estimate(seconds(m["wall_s_mapping_order"]), seconds(m["wall_s_shuffled"]), workers, m["source"])
