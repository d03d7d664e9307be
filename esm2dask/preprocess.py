"""``preprocess``: the BioNeMo ESM2nv layout (and ``--format``'s others) from a raw
UniRef50/90 folder, on Dask.

The driver plans byte ranges from file sizes (:mod:`esm2dask.plan`), and the runner
(:mod:`esm2dask.runner`) submits the stages of the stage table (:mod:`esm2dask.stages`):
tasks (:mod:`esm2dask.tasks`, :mod:`esm2dask.formats`) that read and write their own data
and hand back only receipts: counts, offsets, paths. Output is built in a hidden staging
folder inside OUT and published whole at the end. The phases, in order (:func:`execute`):

1. :func:`scan`: the mapping (ids, member counts, sorted id hashes) and the records of
   every FASTA range; on ``--resume`` the ranges already read are checked unchanged;
2. :func:`split_targets`: which folders the uf50 rows go to (``--split random`` labels);
3. :func:`convert`: ``counts``/``starts`` pieces, the val/test rows, and uf50/uf90 on the
   fast path when their records already stand in mapping order and no mapping id repeats;
   the uf90 tasks write the other layouts' uf90 parts from the same rows;
4. :func:`join`: otherwise, the hash join and position blocks (any input order);
5. :func:`assemble`: each shard from its pieces;
6. the other layouts' last stages (:class:`esm2dask.formats.Layouts`), :func:`checksums`;
   then the switch into place and the manifest (:mod:`esm2dask.publish`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np

from . import __version__, storage, tasks
from .cluster import dashboard_link, dask_client, hold_interrupts, maybe_performance_report
from .config import PreprocessConfig
from .errors import ConfigError, Esm2DaskError
from .formats import Layouts, SplitLabels, hf_part_name
from .layout import CSV_HEADER, SPLIT_DIRS, UF50_TEST, UF50_TRAIN, UF50_VAL, UF90, shard_bounds, shard_name
from .logs import RunLog
from .progress import Reporter
from .plan import RunPlan, input_sizes, make_plan
from .publish import (FailedRun, OutputLock, Publisher, StaleStaging, StagingFolder, copied_by_task, decide_failure,
                      input_copies, refuse_output_in_input)
from .ranges import ByteRange
from .runner import Runner
from .stages import PLACED_DIRS, placed_streams, routed_streams, staged_csv_dirs
from .tasks import Routing, Slice, Target

LABEL_TRAIN, LABEL_VAL, LABEL_TEST = 0, 1, 2

log = logging.getLogger("esm2dask")


@dataclass
class StreamReport:
    """What happened to one FASTA: how it was joined, what was left out."""

    fasta: str
    records: int = 0
    fast_path: bool = False
    unnamed_dropped: int = 0
    duplicates: int = 0
    fallback_reason: str = ""


@dataclass
class PreprocessResult:
    output_dir: str
    rows: dict[str, int]
    bytes: dict[str, int]
    input_bytes: int
    wall_seconds: float
    streams: dict[str, StreamReport]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    manifest_url: str = ""
    #: the other layouts' files (``--format``): rows and bytes by path relative to OUT
    layouts: dict[str, dict[str, int]] = field(default_factory=dict)
    log_url: str = ""
    #: input bytes read by all passes of the run, and the part of them an earlier,
    #: interrupted run had done (its tasks were skipped)
    read_bytes: int = 0
    skipped_read_bytes: int = 0
    skipped_tasks: int = 0
    stage_tasks: dict[str, int] = field(default_factory=dict)

    @property
    def done_here_share(self) -> float:
        """The share of the work done by this run (1.0 unless it resumed another)."""
        return 1.0 - self.skipped_read_bytes / self.read_bytes if self.read_bytes else 1.0

    @property
    def mb_per_s(self) -> float:
        """Input MB per second, counting only the work done in this run."""
        return self.input_bytes * self.done_here_share / 1e6 / self.wall_seconds if self.wall_seconds else 0.0


def random_split_labels(n_clusters: int, val_size: int, test_size: int, seed: int) -> np.ndarray:
    """BioNeMo v1.0 split: label of each cluster position (0 train, 1 val, 2 test).

    >>> random_split_labels(5, 1, 1, 0).tolist()
    [0, 1, 0, 2, 0]
    """
    if val_size + test_size >= n_clusters:
        raise ConfigError(
            f"--val-size {val_size} + --test-size {test_size} must be below the number of "
            f"clusters ({n_clusters})"
        )
    shuffled = np.arange(n_clusters)
    np.random.default_rng(seed).shuffle(shuffled)
    labels = np.zeros(n_clusters, dtype=np.int8)
    labels[shuffled[:val_size]] = LABEL_VAL
    labels[shuffled[val_size : val_size + test_size]] = LABEL_TEST
    return labels


def _slices_for(pieces: list[tuple[str, int, int]], lo: int, hi: int) -> list[Slice]:
    """The parts of consecutive pieces ``(url, first, count)`` covering ``[lo, hi)``."""
    out = []
    for url, first, count in pieces:
        a, b = max(lo, first), min(hi, first + count)
        if a < b:
            out.append(Slice(url, a - first, b - first))
    return out


def _first_positions(counts: list[int]) -> np.ndarray:
    """The first position of each of consecutive parts of ``counts`` rows, and the total."""
    return np.concatenate(([0], np.cumsum(counts))).astype(np.int64)


# ----------------------------------------------------------------------------- what the phases pass on


@dataclass
class Run:
    """One attempt's fixed parts, handed to every phase."""

    config: PreprocessConfig
    plan: RunPlan
    runner: Runner
    staging: StagingFolder

    @property
    def storage_options(self) -> dict:
        return self.config.storage_options

    @property
    def work(self) -> str:
        return self.staging.work_dir

    def ranges(self, role: str) -> list[ByteRange]:
        return self.plan.ranges(role)


@dataclass
class Scan:
    """What the first pass found: the mapping ranges' receipts, the records of every FASTA
    range, and where each range's clusters, members and records begin."""

    mapping: list
    counts: dict[str, list[int]]  # role -> records of each range
    sizes_urls: dict[str, list[str]]  # role -> where each range's row sizes are (placed streams)
    first: dict[str, np.ndarray]  # role -> first record position of each range, then the total
    cluster_first: np.ndarray
    member_first: np.ndarray
    copying: list  # the copy-inputs tasks, still running beside the conversion

    @property
    def n_clusters(self) -> int:
        return int(self.cluster_first[-1])

    @property
    def n_members(self) -> int:
        return int(self.member_first[-1])


@dataclass
class Stream:
    """One FASTA joined to the mapping: ``uf50`` (one record per cluster) or ``uf90`` (one
    per member), with where its rows go and what happened to it."""

    name: str
    kind: str  # the mapping's "clusters" or "members"
    key_first: np.ndarray  # the first position of each mapping range's ids, then the total
    routing: Routing
    report: StreamReport
    placed: bool = False  # its rows written once, in place (esm2dask.stages.placed_streams)

    @property
    def n_keys(self) -> int:
        return int(self.key_first[-1])


# ----------------------------------------------------------------------------- the phases


def scan(run: Run) -> Scan:
    """Scan the mapping and count every FASTA range; on ``--resume``, check the inputs."""
    buckets = run.plan.hash_buckets
    hash_buckets = {"clusters": buckets["uf50"], "members": buckets["uf90"]}
    roles = [i.role for i in run.plan.inputs if i.role != "mapping"]
    mapping_handles = run.runner.submit(
        "scan-mapping", [(r, run.work, run.storage_options, hash_buckets) for r in run.ranges("mapping")])
    placed = placed_streams(run.config)
    count_handles = {role: run.runner.submit(f"count-{role}", [
        (r, run.storage_options, storage.join(run.work, "sizes", role, f"{r.index:05d}.npy") if role in placed else None)
        for r in run.ranges(role)]) for role in roles}
    copying = copy_inputs(run)  # beside the rest of the run; waited for before the checksums
    mapping = run.runner.wait("scan-mapping", mapping_handles)
    counted = {role: run.runner.wait(f"count-{role}", handles) for role, handles in count_handles.items()}
    check_unchanged(run, {"mapping": (mapping_handles, mapping),
                          **{role: (count_handles[role], got) for role, got in counted.items()}})
    counts = {role: [c.n_records for c in got] for role, got in counted.items()}
    sizes_urls = {role: [c.sizes_url for c in got] for role, got in counted.items()}
    found = Scan(mapping, counts, sizes_urls, {role: _first_positions(c) for role, c in counts.items()},
                 _first_positions([m.n_clusters for m in mapping]), _first_positions([m.n_members for m in mapping]),
                 copying)
    if found.n_clusters == 0:
        raise Esm2DaskError(f"{run.config.mapping}: the mapping lists no clusters")
    return found


def check_unchanged(run: Run, first_pass: dict[str, tuple[list, list]]) -> None:
    """``--resume``: every range whose first-pass receipt an interrupted run left is read
    again, and the digest of its bytes compared with the one that run recorded as it
    read them. Any difference (an edit in place, whatever its size and mtime) refuses the
    staging folder before anything of it is reused."""
    jobs = []
    for role, (handles, results) in first_pass.items():
        for rng, handle, result in zip(run.ranges(role), handles, results):
            if run.runner.finished(handle) and result.digest:
                jobs.append((rng, result.digest, b"" if role == "mapping" else b">"))
    if not jobs:
        return
    run.runner.grow(sum(rng.length for rng, _, _ in jobs))
    handles = run.runner.submit("check-inputs", [(rng, run.storage_options, marker) for rng, _, marker in jobs],
                                keep_receipts=False)
    now = run.runner.wait("check-inputs", handles)
    changed = [rng for (rng, digest, _), digest_now in zip(jobs, now) if digest_now != digest]
    if changed:
        rng = changed[0]
        raise StaleStaging(
            f"{run.config.output_dir}: cannot resume {run.staging.root}: {rng.url} changed since "
            f"(bytes {rng.start}-{rng.stop} differ from what the interrupted run read, though size and "
            f"mtime are the same); restore it, or pass --overwrite as well to start over"
        )


def split_targets(run: Run, found: Scan) -> tuple[tuple[Target, ...], str | None]:
    """The folders the uf50 rows go to, and (``--split random``) the staged cluster labels."""
    cfg = run.config
    if cfg.split != "random":
        return (Target(UF50_TRAIN, found.n_clusters),), None
    labels = random_split_labels(found.n_clusters, cfg.val_size, cfg.test_size, cfg.seed)
    n_by_label = np.bincount(labels, minlength=3)
    targets = tuple(Target(d, int(n_by_label[lab]), lab)
                    for d, lab in ((UF50_TRAIN, LABEL_TRAIN), (UF50_VAL, LABEL_VAL), (UF50_TEST, LABEL_TEST)))
    return targets, run.staging.write_labels(labels)


def place(run: Run, found: Scan, streams: list[Stream]) -> dict[str, list[list]]:
    """Where each range's rows go, for each of ``streams``: ``[shard, offset, bytes]`` of each
    of its cuts, from the row sizes the count pass saved; the streams' shards are made at
    their final size (the header in place), so that each range writes its rows once,
    straight into them. All streams' place tasks run together, before any conversion."""
    handles, bounds = {}, {}
    for stream in streams:
        (target,) = stream.routing.targets
        bounds[stream.name] = shard_bounds(target.n_rows, run.config.num_csv_files)
        first = found.first[stream.name]
        handles[stream.name] = run.runner.submit(f"place-{stream.name}", [
            (url, int(first[i]), bounds[stream.name].tolist(), run.storage_options)
            for i, url in enumerate(found.sizes_urls[stream.name])
        ])
    placements = {}
    for stream in streams:
        receipts = run.runner.wait(f"place-{stream.name}", handles[stream.name])
        cuts = iter(_placed_cuts(run, stream, [cut for r in receipts for cut in r.shard_bytes]))
        placements[stream.name] = [[next(cuts) for _ in r.shard_bytes] for r in receipts]
    return placements


def _placed_cuts(run: Run, stream: Stream, cuts: list) -> list[list]:
    """``[shard, offset, bytes]`` of each ``(shard, bytes)`` of ``cuts`` (in row order): each
    shard's rows one after another, after the header. The stream's shards are made at their
    final size (the header in place), so that every cut is written once, straight into them."""
    ends = [len(CSV_HEADER)] * run.config.num_csv_files
    placed = []
    for shard, size in cuts:
        placed.append([shard, ends[shard], size])
        ends[shard] += size
    run.staging.make_shards(stream.routing.targets[0].split_dir, ends)
    return placed


def convert(run: Run, found: Scan, streams: dict[str, Stream], uf50_routing: Routing,
            rows: dict[str, int]) -> dict[str, list]:
    """``counts``/``starts``, the val/test files in file order, and each stream on the fast
    path where its records stand in mapping order and no mapping id repeats (written in
    place where :func:`esm2dask.stages.placed_streams` says). Returns the fast path's
    results of each stream that took it (see :func:`join` for the others)."""
    cfg, runner = run.config, run.runner
    for name, stream in streams.items():
        stream.report.records = int(found.first[name][-1])
    # placed, where the fast path can hold, unless an interrupted run found the order broken
    # (then every fast task's receipt is there: none runs again)
    placements = place(run, found, [
        s for name, s in streams.items() if s.placed and s.report.records == s.n_keys
        and not run.staging.marker(f"fallback-{name}")
    ])
    handles: dict[str, list] = {}
    if "write-counts" in runner.table:  # with esm2nv
        handles["write-counts"] = runner.submit("write-counts", [
            (m.clusters_url, int(found.cluster_first[i]), int(found.member_first[i]), uf50_routing)
            for i, m in enumerate(found.mapping)
        ])
    if cfg.split == "fasta":
        n_val = int(found.first["val"][-1])
        file_order = {"val": [Target(UF50_VAL, n_val)]}
        rows[UF50_VAL] = n_val
        if cfg.test == cfg.val:
            file_order["val"].append(Target(UF50_TEST, n_val))
            rows[UF50_TEST] = n_val
        else:
            n_test = int(found.first["test"][-1])
            file_order["test"] = [Target(UF50_TEST, n_test)]
            rows[UF50_TEST] = n_test
        for role, targets in file_order.items():
            routing = replace(uf50_routing, targets=tuple(targets), labels_url=None)
            first = found.first[role]
            handles[f"convert-{role}"] = runner.submit(f"convert-{role}", [
                (rng, int(first[i]), int(found.counts[role][i]), False, routing)
                for i, rng in enumerate(run.ranges(role))
            ])
    fast, checks = {}, {}
    for name, stream in streams.items():
        n_records = stream.report.records
        if n_records != stream.n_keys:
            stream.report.fallback_reason = f"{n_records} records for {stream.n_keys} mapping ids"
            continue
        pieces = [(getattr(m, f"{stream.kind}_url"), int(stream.key_first[i]),
                   int(stream.key_first[i + 1] - stream.key_first[i])) for i, m in enumerate(found.mapping)]
        first = found.first[name]
        placement = placements.get(name) or [None] * len(run.ranges(name))
        fast[name] = runner.submit(f"fast-{name}", [
            (rng, int(first[i]), int(found.counts[name][i]), _slices_for(pieces, int(first[i]), int(first[i + 1])),
             stream.routing, placement[i])
            for i, rng in enumerate(run.ranges(name))
        ])
        # A repeated mapping id would make the fast path differ from "first occurrence
        # wins"; hashes of the ids, bucketed by the mapping scan, tell.
        checks[name] = runner.submit(f"check-ids-{name}", [
            ([Slice(m.hash_urls[stream.kind], m.hash_bounds[stream.kind][b], m.hash_bounds[stream.kind][b + 1])
              for m in found.mapping], run.storage_options)
            for b in range(run.plan.hash_buckets[name])
        ])
    for stage, stage_handles in handles.items():
        runner.wait(stage, stage_handles)
    done = {}
    for name, stage_handles in fast.items():
        results = runner.wait(f"fast-{name}", stage_handles)
        repeated = sum(runner.wait(f"check-ids-{name}", checks[name]))
        bad = next((r for r in results if not r.ok), None)
        if bad is None and repeated == 0:
            streams[name].report.fast_path = True
            done[name] = results
        elif bad is None:
            streams[name].report.fallback_reason = "the mapping may name an id more than once"
        else:
            streams[name].report.fallback_reason = f"not in mapping order: {bad.mismatch}"
    return done


def join(run: Run, found: Scan, streams: list[Stream]) -> dict[str, list]:
    """Any input order: join ids by hash bucket, then move each record once, for every
    stream out of mapping order side by side (each round's tasks of all of them are in
    flight before the driver waits on any: one stream's short stages fill the other's
    idle cores). Returns by stream what each position block's task wrote of the other
    layouts."""
    steps = {stream.name: _join_steps(run, found, stream) for stream in streams}
    done: dict[str, list] = {}
    while steps:
        for name, step in list(steps.items()):
            try:
                next(step)
            except StopIteration as finished:
                done[name] = finished.value
                del steps[name]
    return done


def _join_steps(run: Run, found: Scan, stream: Stream):
    """:func:`join`'s rounds for one stream: each ``yield`` leaves a round's tasks running;
    the next step waits on them and submits the round they feed."""
    name, runner, n_buckets = stream.name, run.runner, run.plan.hash_buckets[stream.name]
    ranges, counts = run.ranges(name), found.counts[name]
    runner.message(f"{name}: joining by hash ({stream.report.fallback_reason})")
    runner.grow(run.plan.read_bytes(f"fallback-{name}"))
    # the mapping's ids and the FASTA's names, each grouped by hash bucket (independent)
    ids_handles = runner.submit(f"bucket-ids-{name}", [
        (getattr(m, f"{stream.kind}_url"), int(stream.key_first[i]), n_buckets,
         storage.join(run.work, "buckets", f"{name}-ids", f"{i:05d}.arrow"), run.storage_options)
        for i, m in enumerate(found.mapping)
    ])
    # a local FASTA's records are read where they lie by the merge (esm2dask.stages.routed_streams)
    routed = name in routed_streams(run.config)
    spans = [storage.join(run.work, "spans", name, f"{r.index:05d}.npy") if routed else None for r in ranges]
    names_handles = runner.submit(f"index-{name}", [
        (r, int(counts[i]), n_buckets, storage.join(run.work, "buckets", name, f"{r.index:05d}.arrow"),
         run.storage_options, spans[i])
        for i, r in enumerate(ranges)
    ])
    yield
    id_receipts = runner.wait(f"bucket-ids-{name}", ids_handles)
    name_receipts = runner.wait(f"index-{name}", names_handles)
    join_handles = runner.submit(f"join-{name}", [
        ([Slice(r.url, r.bounds[b], r.bounds[b + 1]) for r in id_receipts],
         [Slice(r.url, r.bounds[b], r.bounds[b + 1]) for r in name_receipts],
         len(ranges), storage.join(run.work, "joined", name, f"{b:05d}.arrow"), run.storage_options)
        for b in range(n_buckets)
    ])
    yield
    joins = runner.wait(f"join-{name}", join_handles)
    n_missing = sum(j.n_missing for j in joins)
    if n_missing:
        examples = sorted(x for j in joins for x in j.missing)[:5]
        tasks.raise_missing(stream.report.fasta, "cluster" if name == "uf50" else "member", n_missing, examples)
    stream.report.duplicates = sum(j.n_duplicates for j in joins)
    stream.report.unnamed_dropped = sum(j.n_unnamed for j in joins)
    # blocks of consecutive positions, about one range's worth each; each range's sorted
    # rows are cut there, and (placed) at the shard boundaries too
    block_rows = max(1, math.ceil(stream.n_keys / max(1, len(ranges))))
    blocks = np.append(np.arange(0, stream.n_keys, block_rows), stream.n_keys).astype(np.int64)
    shards = shard_bounds(stream.routing.targets[0].n_rows, run.config.num_csv_files) if stream.placed else blocks[-1:]
    cuts = np.union1d(blocks, shards)
    pairs = [[Slice(j.url, j.range_bounds[i], j.range_bounds[i + 1]) for j in joins] for i in range(len(ranges))]
    if routed:  # each range's records sent to their blocks, unread
        scatter_handles = runner.submit(f"scatter-{name}", [
            (r, pairs[i], cuts.tolist(), spans[i], found.sizes_urls[name][i] if stream.placed else None,
             storage.join(run.work, "routed", name, f"{r.index:05d}.npy"), run.storage_options)
            for i, r in enumerate(ranges)
        ])
    else:  # each range converted again, its rows written sorted by position
        scatter_handles = runner.submit(f"scatter-{name}", [
            (r, int(counts[i]), pairs[i], cuts.tolist(), storage.join(run.work, "scattered", name, f"{r.index:05d}.csv"),
             run.storage_options)
            for i, r in enumerate(ranges)
        ])
    yield
    scattered = runner.wait(f"scatter-{name}", scatter_handles)
    at = np.searchsorted(cuts, blocks)  # block g is cuts at[g] … at[g + 1]
    placement = _joined_placement(run, stream, scattered, cuts, shards) if stream.placed else None

    def parts(g: int) -> list:
        if routed:
            return [(s.url, s.rows[at[g]], s.rows[at[g + 1]]) for s in scattered]
        return [(s.url, s.index_url, s.rows[at[g]], s.rows[at[g + 1]], s.bytes[at[g]], s.bytes[at[g + 1]])
                for s in scattered]

    merge_handles = runner.submit(f"merge-{name}", [
        ((ranges[0].url,) if routed else ()) + (
            parts(g), int(blocks[g]), int(blocks[g + 1] - blocks[g]), stream.routing, g,
            placement[at[g] : at[g + 1]] if placement is not None else None)
        for g in range(len(blocks) - 1)
    ])
    yield
    return runner.wait(f"merge-{name}", merge_handles)


def _joined_placement(run: Run, stream: Stream, scattered: list, cuts: np.ndarray, shards: np.ndarray) -> list[list]:
    """Where the rows between each two of ``cuts`` (each inside one shard) go (see
    :func:`_placed_cuts`), their bytes summed over every range's scattered rows."""
    sizes = np.zeros(len(cuts) - 1, dtype=np.int64)
    for s in scattered:
        sizes += np.diff(np.asarray(s.bytes, dtype=np.int64))
    shard_of = np.searchsorted(shards, cuts[:-1], side="right") - 1
    return _placed_cuts(run, stream, list(zip(shard_of.tolist(), sizes.tolist())))


def assemble(run: Run, uf50_targets: tuple[Target, ...], placed: list[str]) -> tuple[dict[str, int], list[str]]:
    """Each staged shard from its pieces (but those of the ``placed`` folders, written in
    place), and ``counts``/``starts`` (with esm2nv). Returns the bytes by folder and the
    files written, relative to the tree."""
    cfg = run.config
    jobs = [(d, k) for d in staged_csv_dirs(cfg) if d not in placed for k in range(cfg.num_csv_files)]
    run.staging.make_split_dirs([d for d in staged_csv_dirs(cfg)])
    sizes = run.runner.run("assemble", [(run.work, run.staging.tree_dir, d, k, run.storage_options) for d, k in jobs])
    out: dict[str, int] = {d: 0 for d in SPLIT_DIRS}
    for d in placed:
        out[d] = sum(run.staging.shard_sizes(d, cfg.num_csv_files))
    for (d, _), size in zip(jobs, sizes):
        out[d] += size
    arrays = []
    if "assemble-mmap" in run.runner.table:  # with esm2nv
        arrays = [(t.split_dir, name) for t in uf50_targets for name in ("counts", "starts")]
        array_sizes = run.runner.run("assemble-mmap", [(run.work, run.staging.tree_dir, d, name, run.storage_options)
                                                       for d, name in arrays])
        for (d, _), size in zip(arrays, array_sizes):
            out[d] += size
    shards = [f"{d}/{shard_name(k)}" for d in staged_csv_dirs(cfg) for k in range(cfg.num_csv_files)]
    return out, shards + [f"{d}/{name}.mmap" for d, name in arrays]


def copy_inputs(run: Run) -> list:
    """Submit the copies of the local raw inputs into a local staging folder, one task per
    input, each hashed as it is copied (the other copies are made at the switch)."""
    jobs = [(url, dest, run.config.link_inputs) for url, _, dest in _task_copies(run)]
    return run.runner.submit("copy-inputs", jobs) if jobs else []


def _task_copies(run: Run) -> list[tuple[str, str, str]]:
    """(input URL, name in OUT, copy's URL in staging) of each copy the copy-inputs stage makes."""
    return [(url, name, storage.join(run.staging.inputs_dir, name))
            for url, name in input_copies(run.config) if copied_by_task(run.config, url)]


def copied_inputs(run: Run, copying: list) -> dict[str, str]:
    """Wait for the copy-inputs stage; tell the staging folder what was copied and return
    each copy's SHA-256 by its name in OUT. A copy an interrupted run made that is no
    longer there whole, or was made from another source, is made again, here."""
    if not copying:
        return {}
    digests = {}
    for (url, name, dest), copy in zip(_task_copies(run), run.runner.wait("copy-inputs", copying)):
        if copy.source != url or copy.dest_url != dest or not _whole(dest, copy.bytes):
            copy = tasks.copy_input(url, dest, run.config.link_inputs)
        run.staging.copied[name] = {"source": url, "bytes": copy.bytes, "how": copy.how}
        digests[name] = copy.sha256
    return digests


def _whole(url: str, size: int) -> bool:
    return storage.is_plain_file(url) and storage.file_size(url) == size


def checksums(run: Run, copying: list, uncached: tuple[str, ...],
              hashed: dict[str, tuple[str, int, int]]) -> dict[str, str]:
    """SHA-256 of every staged output file and of every raw input copied beside the tree
    (by the copy's name: the copy holds the input's bytes), one task per file, for the
    manifest; those written past the page cache (``uncached``) are read the same way. The
    copy-inputs stage hashed its copies as it made them, and the tasks that built a file in
    memory hashed it there (``hashed``: SHA-256, size and modification time by path in OUT):
    neither is read again, but a file no longer at the size and time it was written with (an
    interrupted run's, changed since) is hashed here. The tasks are the same list on every
    attempt (receipts go by place)."""
    sizes = run.staging.staged_files()
    digests = copied_inputs(run, copying)
    for rel, (sha, size, mtime_ns) in hashed.items():
        url = storage.join(run.staging.tree_dir, rel)
        same = sizes.get(rel) == size and (not mtime_ns or os.stat(storage.local_path(url)).st_mtime_ns == mtime_ns)
        digests[rel] = sha if same else storage.sha256_file(url, run.storage_options)
    files = [rel for rel in sizes if rel not in hashed]
    urls = [(storage.join(run.staging.tree_dir, rel), run.storage_options, rel in uncached) for rel in files]
    copies = [(url, name) for url, name in input_copies(run.config) if name not in digests]
    urls += [(url, run.storage_options) for url, _ in copies]
    names = files + [name for _, name in copies]
    return {**digests, **dict(zip(names, run.runner.run("checksum", urls)))}


@dataclass
class Converted:
    rows: dict[str, int]
    sizes: dict[str, int]
    streams: dict[str, StreamReport]
    layouts: dict[str, dict[str, int]]
    digests: dict[str, str]


def execute(run: Run) -> Converted:
    """The phases of one attempt, in order."""
    cfg = run.config
    run.runner.begin(run.plan.read_bytes())
    found = scan(run)
    uf50_targets, labels_url = split_targets(run, found)
    # the other layouts: the uf90 conversion feeds them (see esm2dask.formats)
    layouts = Layouts(run.runner, run.staging, cfg, found.mapping,
                      SplitLabels(labels_url, LABEL_TRAIN) if labels_url else None, run.plan)
    layouts.start()
    skip = tuple(d for d in SPLIT_DIRS if d not in staged_csv_dirs(cfg))
    routing = Routing((), cfg.num_csv_files, run.work, None, run.storage_options, skip, tree_dir=run.staging.tree_dir)
    placed = placed_streams(cfg)
    streams = {
        "uf50": Stream("uf50", "clusters", found.cluster_first,
                       replace(routing, targets=uf50_targets, labels_url=labels_url), StreamReport(cfg.uf50),
                       "uf50" in placed),
        "uf90": Stream("uf90", "members", found.member_first,
                       replace(routing, targets=(Target(UF90, found.n_members),), layouts=layouts.uf90_sink("uf90" in placed)),
                       StreamReport(cfg.uf90), "uf90" in placed),
    }
    rows = {UF50_TRAIN: 0, UF50_VAL: 0, UF50_TEST: 0, UF90: found.n_members}
    for t in uf50_targets:
        rows[t.split_dir] = t.n_rows
    fast = convert(run, found, streams, streams["uf50"].routing, rows)
    uf90_parts = [r.layouts for r in fast.get("uf90", [])]
    joined = [stream for name, stream in streams.items() if name not in fast]
    for stream in joined:
        name = stream.name
        if not run.staging.marker(f"fallback-{name}"):  # what the fast path wrote goes
            run.staging.remove_pieces([t.split_dir for t in stream.routing.targets])
            if stream.placed:
                run.staging.remove_shards(PLACED_DIRS[name])
            if name == "uf90":
                layouts.remove_uf90_parts()
            run.staging.set_marker(f"fallback-{name}")
    if joined:
        gathered = join(run, found, joined)
        uf90_parts = gathered.get("uf90", uf90_parts)
    sizes, esm2nv_files = assemble(run, uf50_targets, [PLACED_DIRS[n] for n, s in streams.items() if s.placed])
    written = layouts.finish(rows, uf90_parts) if layouts.wanted else {}
    if "esm2nv" not in cfg.formats:  # staged for the others, not published
        rows, sizes, esm2nv_files = {}, {}, []
    # what is published: the files the run built, named from the plan (never a listing)
    run.staging.expected = esm2nv_files + [
        f"{rel}/{hf_part_name(i)}" for rel, entry in written.items() if "files" in entry for i in range(entry["files"])
    ] + [rel for rel, entry in written.items() if "files" not in entry]
    return Converted(rows, sizes, {name: s.report for name, s in streams.items()}, written,
                     checksums(run, found.copying, layouts.uncached_files(),
                               layouts.hashed if layouts.wanted else {}))


def _kept_tasks(staging: StagingFolder) -> int:
    """How many finished tasks an interrupted run leaves receipts for."""
    fs, path = storage.get_fs(storage.join(staging.work_dir, "receipts"), staging.storage_options)
    try:
        suffix = "." + staging.receipt_url("stage", 0).rsplit(".", 1)[-1]
        return sum(1 for p in fs.find(path) if p.endswith(suffix))
    except OSError:
        return 0


def preprocess(config: PreprocessConfig, reporter: Reporter | None = None) -> PreprocessResult:
    """Run the whole conversion and publish ``config.output_dir``; see the module doc.
    One run at a time per output folder: a second is refused (:class:`OutputLock`)."""
    reporter = reporter or Reporter()
    start = time.perf_counter()
    inputs = input_sizes(config)  # every input the run reads: there, readable, not empty
    for url, _ in input_copies(config):  # and what it copies beside the tree (the raw README)
        if url not in inputs:
            storage.read_head(url, 1, config.storage_options)
    plan = make_plan(config, inputs)  # refuses a partition size that makes too many tasks
    if plan.workers is not None and plan.workers < config.cluster.workers:
        reporter.message(plan.notes[0])  # more workers than byte ranges: capped
        config = replace(config, cluster=replace(config.cluster, workers=plan.workers))
    storage.check_output_location(config.output_dir, config.storage_options)
    refuse_output_in_input(config)  # before the lock file is made there
    with OutputLock.acquire(config.output_dir, config.storage_options):
        try:
            return _preprocess_locked(config, reporter, start, inputs, plan)
        except StaleStaging as err:
            if not (config.resume and config.overwrite):
                raise
            reporter.message(f"{err}; starting over")  # --resume --overwrite: resume if possible, else start over
            return _preprocess_locked(dataclasses.replace(config, resume=False), reporter, start, inputs, plan)


def _preprocess_locked(config: PreprocessConfig, reporter: Reporter, start: float, inputs: dict[str, int],
                       plan: RunPlan) -> PreprocessResult:
    staging = StagingFolder.create(config, inputs)
    run_log = RunLog(staging.root, config.output_dir, config.storage_options)
    log.info("esm2dask %s: %s -> %s", __version__, config.raw_dir, config.output_dir)
    if staging.resumed:
        reporter.message(f"resuming the run staged in {staging.root}: skipping the "
                         f"{_kept_tasks(staging):,} task(s) it finished")
    restore_interrupts = None
    try:
        with dask_client(config.cluster, reporter.message) as client:
            external = config.cluster.external
            link = (None if not external and config.cluster.dashboard_address is None  # none: no dashboard
                    else dashboard_link(client, None if external else config.cluster.dashboard_address))
            if link:
                reporter.message(f"Dask dashboard: {link}")
            with maybe_performance_report(config.cluster.performance_report):
                runner = Runner(client, staging, reporter, plan.stages, config.storage_options)
                try:
                    done = execute(Run(config, plan, runner, staging))
                except BaseException as err:
                    if isinstance(err, KeyboardInterrupt):
                        restore_interrupts = hold_interrupts()
                    # shut down in order: cancel this run's futures, let running tasks
                    # end, then (leaving the with blocks) close the client, the cluster
                    try:
                        runner.cancel_and_settle()
                    except Exception as cleanup:  # a Ctrl-C can land in Dask's own code and
                        # close the client's loop first: what failed is reported, not this
                        log.debug("cancelling after %r failed: %r", err, cleanup)
                    raise
        result = PreprocessResult(
            output_dir=config.output_dir,
            rows=done.rows,
            bytes=done.sizes,
            input_bytes=sum(inputs.values()),
            wall_seconds=time.perf_counter() - start,
            streams=done.streams,
            stage_seconds=runner.stage_seconds,
            read_bytes=runner.read_bytes,
            skipped_read_bytes=runner.skipped_read_bytes,
            skipped_tasks=runner.skipped_tasks,
            stage_tasks=runner.stage_tasks,
            layouts=done.layouts,
        )
        run_log.seal()  # the switch moves it in with the tree, or leaves it in staging
        result.manifest_url = Publisher(staging).publish(config, result, done.digests, __version__)
        result.log_url = run_log.final_url
    except BaseException as err:
        interrupted = isinstance(err, KeyboardInterrupt)
        if interrupted:
            restore_interrupts = restore_interrupts or hold_interrupts()
        outcome = decide_failure(err, FailedRun(
            config.output_dir, staging.root, run_log.staged_url,
            finished_tasks=_kept_tasks(staging) if interrupted else 0,
            created_output=staging.created_output and staging.local,
        ))
        if outcome.log_traceback:
            log.error("the run failed", exc_info=err)
        if outcome.keep_log:
            run_log.keep()
        else:
            run_log.discard()
        staging.clean_up(outcome)  # a half-done switch is already undone (Publisher.publish)
        if outcome.notice:
            reporter.message(outcome.notice)
        if outcome.raise_as is None:
            raise
        raise outcome.raise_as(outcome.message) from None
    finally:
        if restore_interrupts:
            restore_interrupts()
    return result
