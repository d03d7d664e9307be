"""``preprocess``: the BioNeMo ESM2nv layout from a raw UniRef50/90 folder, on Dask.

The driver plans byte ranges from file sizes, submits tasks (:mod:`esm2dask.tasks`) that
read and write their own data, and keeps only receipts: counts, offsets, paths. Output is
built in a hidden staging folder inside OUT and published whole at the end.

Stages (each a set of parallel tasks):

1. scan the mapping (ids, member counts, sorted id hashes) and count the records of
   every FASTA range;
2. from the counts, each range's first position; write ``counts``/``starts`` pieces and
   the val/test shards; convert uf50/uf90 on the fast path when their records already
   stand in mapping order and no mapping id repeats;
3. otherwise join by hash bucket and gather position blocks (any input order);
4. assemble each shard from its pieces;
5. derive the other layouts of ``--format`` from the staged tree (:mod:`esm2dask.formats`);
   publish, write the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import time
from dataclasses import dataclass, field, replace

import numpy as np
from distributed import as_completed

from . import __version__, receipts, storage, tasks
from .cluster import dashboard_link, dask_client, hold_interrupts, maybe_performance_report, settle
from .config import PreprocessConfig
from .errors import ConfigError, Esm2DaskError, Interrupted, UnexpectedError
from .formats import SplitLabels, derive_layouts, hf_part_name
from .layout import SPLIT_DIRS, UF50_TEST, UF50_TRAIN, UF50_VAL, UF90, shard_name
from .logs import RunLog
from .progress import Reporter
from .plan import RunPlan, input_sizes, make_plan
from .publish import OutputLock, StaleStaging, Staging, input_copies, refuse_output_in_input
from .ranges import ByteRange
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


def task_key(stage: str, token: str, index: int) -> tuple[str, int]:
    """``("fast_uf90-<run token>", 3)``: the dashboard groups keys by the part before the
    first ``-`` followed by a word with digits (``distributed.utils.key_split``), so the
    stage's own dashes become underscores and the panel reads ``fast_uf90``; the run
    token keeps the keys of two runs apart and lets the driver find its own tasks."""
    return (f"{stage.replace('-', '_')}-{token}", index)


def stage_of_key(key) -> str:
    """The stage name back from a task key (or its ``str``), e.g. for the task stream."""
    from dask.utils import key_split

    return key_split(key).replace("_", "-")


@dataclass
class _Done:
    """A task finished by an earlier, interrupted run (its receipt was loaded)."""

    result: object


class _Run:
    """One run's driver state: the plan, the client, the receipts."""

    def __init__(self, config: PreprocessConfig, client, staging: Staging, reporter: Reporter):
        self.config = config
        self.client = client
        self.staging = staging
        self.reporter = reporter
        self.so = config.storage_options
        self.work = staging.work_dir
        self.stage_seconds: dict[str, float] = {}
        self.stage_tasks: dict[str, int] = {}
        # the staging token and this attempt's own number: a resumed run on a long-lived
        # cluster must not reuse the keys of the attempt it resumes, which the scheduler
        # may still be cancelling (the new futures would be cancelled with them)
        self._token = f"{staging.token}-{secrets.randbelow(10**6):06d}"
        self._submitted = False
        self.layouts: dict[str, dict[str, int]] = {}
        self._read_bytes: dict = {}  # task key -> input bytes it reads, for progress
        self.read_bytes = 0  # planned passes, plus the hash join's if a stream needs it
        self.skipped_read_bytes = 0
        self.skipped_tasks = 0

    def settle(self) -> None:
        """After a failure: wait until no task of this attempt can still write."""
        if self._submitted:
            settle(self.client, self._token)

    # ------------------------------------------------------------------ task plumbing

    def _submit(self, name: str, fn, args_list: list[tuple]) -> list:
        """One task per argument tuple; each keeps a receipt. A resumed run loads the
        receipts that are already there instead of running those tasks again."""
        self._submitted = True
        present = self.staging.receipts_present(name)
        handles = []
        for i, args in enumerate(args_list):
            receipt = self.staging.receipt_url(name, i)
            # progress counts the input bytes a task reads: those of its byte range
            read = args[0].length if isinstance(args[0], ByteRange) else 0
            if receipt.rsplit("/", 1)[-1] in present:
                handles.append(_Done(receipts.load(receipt, self.so, inside=self.staging.root)))
                self.reporter.skip(read)
                self.skipped_read_bytes += read
                self.skipped_tasks += 1
                continue
            key = task_key(name, self._token, i)
            self._read_bytes[key] = read
            handles.append(self.client.submit(receipts.recorded, fn, receipt, self.so, *args, key=key, pure=False))
        return handles

    def _wait(self, name: str, handles: list) -> list:
        """Results in submission order; the first failure cancels the rest and is raised."""
        start = time.perf_counter()
        self.reporter.stage(name, len(handles))
        futures = [h for h in handles if not isinstance(h, _Done)]
        try:
            self.reporter.advance(name, len(handles) - len(futures))
            for future in as_completed(futures):
                if future.status == "error":
                    future.result()  # raises the task's exception here
                self.reporter.progress(self._read_bytes.pop(future.key, 0))
                self.reporter.advance(name)
            gathered = iter(self.client.gather(futures))
            results = [h.result if isinstance(h, _Done) else next(gathered) for h in handles]
        except BaseException:
            self.client.cancel(futures)
            raise
        seconds = time.perf_counter() - start
        self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + seconds
        self.stage_tasks[name] = self.stage_tasks.get(name, 0) + len(handles)
        self.reporter.stage_done(name, seconds)
        return results

    def _run(self, name: str, fn, args_list: list[tuple]) -> list:
        return self._wait(name, self._submit(name, fn, args_list))

    # ------------------------------------------------------------------ the run

    def execute(self, plan: RunPlan) -> tuple[dict, dict, dict]:
        cfg = self.config
        plans = {i.role: list(i.ranges) for i in plan.inputs}
        same_test = cfg.test == cfg.val
        n_buckets = plan.hash_buckets
        self.read_bytes = plan.read_bytes()
        self.reporter.begin(self.read_bytes)
        hash_buckets = {"clusters": n_buckets["uf50"], "members": n_buckets["uf90"]}

        # Stage 1: scan the mapping, count every FASTA range.
        mapping_futures = self._submit(
            "scan-mapping", tasks.scan_mapping,
            [(r, self.work, self.so, hash_buckets) for r in plans["mapping"]],
        )
        count_futures = {
            name: self._submit(f"count-{name}", tasks.count_fasta, [(r, self.so) for r in plans[name]])
            for name in plans
            if name != "mapping"
        }
        mapping = self._wait("scan-mapping", mapping_futures)
        counted = {name: self._wait(f"count-{name}", futs) for name, futs in count_futures.items()}
        self._check_unchanged(plans, {"mapping": (mapping_futures, mapping),
                                      **{name: (count_futures[name], got) for name, got in counted.items()}})
        counts = {name: [c.n_records for c in got] for name, got in counted.items()}

        cluster_first = np.concatenate(([0], np.cumsum([m.n_clusters for m in mapping])))
        member_first = np.concatenate(([0], np.cumsum([m.n_members for m in mapping])))
        n_clusters, n_members = int(cluster_first[-1]), int(member_first[-1])
        if n_clusters == 0:
            raise Esm2DaskError(f"{cfg.mapping}: the mapping lists no clusters")
        first_positions = {name: np.concatenate(([0], np.cumsum(c))) for name, c in counts.items()}

        # Targets: which output folders each stream fills.
        labels_url = None
        if cfg.split == "random":
            labels = random_split_labels(n_clusters, cfg.val_size, cfg.test_size, cfg.seed)
            labels_url = self.staging.write_labels(labels)
            n_by_label = np.bincount(labels, minlength=3)
            uf50_targets = tuple(
                Target(d, int(n_by_label[lab]), lab)
                for d, lab in ((UF50_TRAIN, LABEL_TRAIN), (UF50_VAL, LABEL_VAL), (UF50_TEST, LABEL_TEST))
            )
        else:
            uf50_targets = (Target(UF50_TRAIN, n_clusters),)

        def routing(targets, with_labels=False):
            return Routing(
                targets, cfg.num_csv_files, self.work, labels_url if with_labels else None, self.so
            )

        uf50_routing = routing(uf50_targets, with_labels=True)
        uf90_routing = routing((Target(UF90, n_members),))
        rows = {UF50_TRAIN: 0, UF50_VAL: 0, UF50_TEST: 0, UF90: n_members}
        for t in uf50_targets:
            rows[t.split_dir] = t.n_rows

        # Stage 2: counts/starts, val/test, fast-path attempts, the repeated-id check.
        futures: dict[str, list] = {}
        futures["write-counts"] = self._submit(
            "write-counts",
            tasks.write_counts,
            [
                (m.clusters_url, int(cluster_first[i]), int(member_first[i]), uf50_routing)
                for i, m in enumerate(mapping)
            ],
        )
        if cfg.split == "fasta":
            n_val = int(first_positions["val"][-1])
            file_order = {"val": [Target(UF50_VAL, n_val)]}
            rows[UF50_VAL] = n_val
            if same_test:
                file_order["val"].append(Target(UF50_TEST, n_val))
                rows[UF50_TEST] = n_val
            else:
                n_test = int(first_positions["test"][-1])
                file_order["test"] = [Target(UF50_TEST, n_test)]
                rows[UF50_TEST] = n_test
            for name, targets in file_order.items():
                r = routing(tuple(targets))
                futures[f"convert-{name}"] = self._submit(
                    f"convert-{name}",
                    tasks.convert_in_file_order,
                    [
                        (rng, int(first_positions[name][i]), int(counts[name][i]), False, r)
                        for i, rng in enumerate(plans[name])
                    ],
                )

        streams = {
            "uf50": (cfg.uf50, "clusters", cluster_first, n_clusters, uf50_routing),
            "uf90": (cfg.uf90, "members", member_first, n_members, uf90_routing),
        }
        reports: dict[str, StreamReport] = {}
        fast = {}
        for name, (url, kind, key_first, n_keys, rt) in streams.items():
            reports[name] = StreamReport(url, records=int(first_positions[name][-1]))
            if first_positions[name][-1] != n_keys:
                reports[name].fallback_reason = (
                    f"{int(first_positions[name][-1])} records for {n_keys} mapping ids"
                )
                continue
            pieces = [
                (getattr(m, f"{kind}_url"), int(key_first[i]), int(key_first[i + 1] - key_first[i]))
                for i, m in enumerate(mapping)
            ]
            fp = first_positions[name]
            fast[name] = self._submit(
                f"fast-{name}",
                tasks.convert_in_order,
                [
                    (rng, int(fp[i]), int(counts[name][i]), _slices_for(pieces, int(fp[i]), int(fp[i + 1])), rt)
                    for i, rng in enumerate(plans[name])
                ],
            )
        # A repeated mapping id would make the fast path differ from "first occurrence
        # wins"; hashes of the ids, bucketed by the mapping scan, tell.
        checks = {
            name: self._submit(
                f"check-ids-{name}",
                tasks.count_duplicate_hashes,
                [
                    ([Slice(m.hash_urls[streams[name][1]], m.hash_bounds[streams[name][1]][b],
                            m.hash_bounds[streams[name][1]][b + 1]) for m in mapping], self.so)
                    for b in range(n_buckets[name])
                ],
            )
            for name in fast
        }

        for name, futs in futures.items():
            self._wait(f"{name}", futs)

        for name, futs in fast.items():
            results = self._wait(f"fast-{name}", futs)
            repeated = sum(self._wait(f"check-ids-{name}", checks[name]))
            bad = next((r for r in results if not r.ok), None)
            if bad is None and repeated == 0:
                reports[name].fast_path = True
                continue
            if bad is None:
                reports[name].fallback_reason = "the mapping may name an id more than once"
            else:
                reports[name].fallback_reason = f"not in mapping order: {bad.mismatch}"
            if not self.staging.marker(f"fallback-{name}"):
                self.staging.remove_pieces([t.split_dir for t in streams[name][4].targets])
                self.staging.set_marker(f"fallback-{name}")

        # Stage 3: the hash join, for streams whose order does not hold.
        for name, (url, kind, key_first, n_keys, rt) in streams.items():
            if reports[name].fast_path:
                continue
            self.reporter.message(f"{name}: joining by hash ({reports[name].fallback_reason})")
            extra = plan.read_bytes(f"fallback-{name}")
            self.read_bytes += extra
            self.reporter.grow(extra)
            self._join(name, plans[name], counts[name], mapping, kind, key_first, n_buckets[name], n_keys, rt,
                       reports[name])

        # Stage 4: assemble.
        sizes_out = self._assemble(uf50_targets)
        # Stage 5: the other layouts, from the staged tree.
        labels = SplitLabels(labels_url, LABEL_TRAIN) if labels_url else None
        self.layouts = derive_layouts(self, mapping, labels, rows, sizes_out)
        if "esm2nv" not in cfg.formats:  # built for the others, not published
            rows, sizes_out = {}, {}
            self.esm2nv_files = []
        # what is published: the files the run built, named from the plan (never a listing)
        self.staging.expected = self.esm2nv_files + [
            f"{rel}/{hf_part_name(i)}" for rel, entry in self.layouts.items() if "files" in entry
            for i in range(entry["files"])
        ] + [rel for rel, entry in self.layouts.items() if "files" not in entry]
        return rows, sizes_out, reports

    def _check_unchanged(self, plans: dict[str, list[ByteRange]], stage1: dict[str, tuple[list, list]]) -> None:
        """``--resume``: every range whose first-stage receipt an interrupted run left is read
        again, and the digest of its bytes compared with the one that run recorded as it
        read them. Any difference (an edit in place, whatever its size and mtime) refuses the
        staging folder before anything of it is reused."""
        jobs = []
        for name, (handles, results) in stage1.items():
            for rng, handle, result in zip(plans[name], handles, results):
                if isinstance(handle, _Done) and result.digest:
                    jobs.append((rng, result.digest, b"" if name == "mapping" else b">"))
        if not jobs:
            return
        futures = []
        for i, (rng, _, marker) in enumerate(jobs):
            key = task_key("check-inputs", self._token, i)
            self._read_bytes[key] = rng.length
            futures.append(self.client.submit(tasks.range_digest, rng, self.so, marker, key=key, pure=False))
        extra = sum(rng.length for rng, _, _ in jobs)
        self.read_bytes += extra
        self.reporter.grow(extra)
        now = self._wait("check-inputs", futures)
        changed = [rng for (rng, digest, _), digest_now in zip(jobs, now) if digest_now != digest]
        if changed:
            rng = changed[0]
            raise StaleStaging(
                f"{self.config.output_dir}: cannot resume {self.staging.root}: {rng.url} changed since "
                f"(bytes {rng.start}-{rng.stop} differ from what the interrupted run read, though size and "
                f"mtime are the same); restore it, or pass --overwrite as well to start over"
            )

    def _join(self, name, ranges: list[ByteRange], counts, mapping, kind, key_first, n_buckets, n_keys, rt,
              report: StreamReport):
        """Any input order: join ids by hash bucket, then move each record once."""
        id_receipts = self._run(
            f"bucket-ids-{name}",
            tasks.bucket_ids,
            [
                (
                    getattr(m, f"{kind}_url"),
                    int(key_first[i]),
                    n_buckets,
                    storage.join(self.work, "buckets", f"{name}-ids", f"{i:05d}.arrow"),
                    self.so,
                )
                for i, m in enumerate(mapping)
            ],
        )
        name_receipts = self._run(
            f"index-{name}",
            tasks.index_fasta,
            [
                (r, int(counts[i]), n_buckets, storage.join(self.work, "buckets", name, f"{r.index:05d}.arrow"), self.so)
                for i, r in enumerate(ranges)
            ],
        )
        joins = self._run(
            f"join-{name}",
            tasks.join_ids,
            [
                (
                    [Slice(r.url, r.bounds[b], r.bounds[b + 1]) for r in id_receipts],
                    [Slice(r.url, r.bounds[b], r.bounds[b + 1]) for r in name_receipts],
                    len(ranges),
                    storage.join(self.work, "joined", name, f"{b:05d}.arrow"),
                    self.so,
                )
                for b in range(n_buckets)
            ],
        )
        n_missing = sum(j.n_missing for j in joins)
        if n_missing:
            examples = sorted((x for j in joins for x in j.missing))[:5]
            tasks.raise_missing(report.fasta, "cluster" if name == "uf50" else "member", n_missing, examples)
        report.duplicates = sum(j.n_duplicates for j in joins)
        report.unnamed_dropped = sum(j.n_unnamed for j in joins)
        # blocks of consecutive positions, about one range's worth each
        block_rows = max(1, math.ceil(n_keys / max(1, len(ranges))))
        blocks = np.append(np.arange(0, n_keys, block_rows), n_keys).astype(np.int64)
        scattered = self._run(
            f"scatter-{name}",
            tasks.scatter_fasta,
            [
                (
                    r,
                    int(counts[i]),
                    [Slice(j.url, j.range_bounds[i], j.range_bounds[i + 1]) for j in joins],
                    blocks.tolist(),
                    storage.join(self.work, "scattered", name, f"{r.index:05d}.csv"),
                    self.so,
                )
                for i, r in enumerate(ranges)
            ],
        )
        self._run(
            f"gather-{name}",
            tasks.gather_block,
            [
                (
                    [(s.url, s.index_url, s.rows[g], s.rows[g + 1], s.bytes[g], s.bytes[g + 1]) for s in scattered],
                    int(blocks[g]),
                    int(blocks[g + 1] - blocks[g]),
                    rt,
                )
                for g in range(len(blocks) - 1)
            ],
        )

    def _assemble(self, uf50_targets) -> dict[str, int]:
        cfg = self.config
        jobs = [(d, k) for d in SPLIT_DIRS for k in range(cfg.num_csv_files)]
        self.staging.make_split_dirs(SPLIT_DIRS)
        sizes = self._run(
            "assemble",
            tasks.assemble_shard,
            [(self.work, self.staging.tree_dir, d, k, self.so) for d, k in jobs],
        )
        out: dict[str, int] = {d: 0 for d in SPLIT_DIRS}
        for (d, _), size in zip(jobs, sizes):
            out[d] += size
        arrays = [(t.split_dir, name) for t in uf50_targets for name in ("counts", "starts")]
        array_sizes = self._run(
            "assemble-mmap",
            tasks.assemble_array,
            [(self.work, self.staging.tree_dir, d, name, self.so) for d, name in arrays],
        )
        for (d, _), size in zip(arrays, array_sizes):
            out[d] += size
        self.esm2nv_files = [f"{d}/{shard_name(k)}" for d, k in jobs] + [f"{d}/{name}.mmap" for d, name in arrays]
        return out

    def checksums(self) -> dict[str, str]:
        """SHA-256 of every staged output file and of every raw input copied beside the
        tree (by the copy's name: the copy holds the input's bytes), one task per file,
        for the manifest."""
        files = list(self.staging.staged_files())
        urls = [(storage.join(self.staging.tree_dir, rel), self.so) for rel in files]
        copies = input_copies(self.config)
        urls += [(url, self.so) for url, _ in copies]
        names = files + [name for _, name in copies]
        return dict(zip(names, self._run("checksum", storage.sha256_file, urls)))


def _kept_tasks(staging: Staging) -> int:
    """How many finished tasks an interrupted run leaves receipts for."""
    fs, path = storage.get_fs(storage.join(staging.work_dir, "receipts"), staging.so)
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
    staging = Staging.create(config, inputs)
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
                run = _Run(config, client, staging, reporter)
                try:
                    rows, sizes, reports = run.execute(plan)
                    digests = run.checksums()
                except BaseException as err:
                    if isinstance(err, KeyboardInterrupt):
                        restore_interrupts = hold_interrupts()
                    # shut down in order: cancel this run's futures, let running tasks
                    # end, then (leaving the with blocks) close the client, the cluster
                    cancel = [f for f in list(client.futures.values()) if staging.token in str(f.key)]
                    client.cancel(cancel)
                    run.settle()
                    raise
        result = PreprocessResult(
            output_dir=config.output_dir,
            rows=rows,
            bytes=sizes,
            input_bytes=sum(inputs.values()),
            wall_seconds=time.perf_counter() - start,
            streams=reports,
            stage_seconds=run.stage_seconds,
            read_bytes=run.read_bytes,
            skipped_read_bytes=run.skipped_read_bytes,
            skipped_tasks=run.skipped_tasks,
            stage_tasks=run.stage_tasks,
            layouts=run.layouts,
        )
        run_log.seal()  # the switch moves it in with the tree, or leaves it in staging
        result.manifest_url = staging.publish(config, result, digests, __version__)
        result.log_url = run_log.final_url
    except KeyboardInterrupt as err:
        restore_interrupts = restore_interrupts or hold_interrupts()
        run_log.keep()
        failure = staging.failed(err, Reporter())  # undoes a half-done switch; keeps the work
        if failure is not err:
            raise failure from None
        raise Interrupted(
            f"{_kept_tasks(staging)} finished task(s) kept in {staging.root}; "
            f"run the same command with --resume to finish"
        ) from None
    except BaseException as err:
        if isinstance(err, Esm2DaskError):
            run_log.discard()
        else:
            if isinstance(err, Exception):  # its traceback goes to the log, never the terminal
                log.error("the run failed", exc_info=err)
            run_log.keep()
        failure = staging.failed(err, reporter)
        if failure is err:
            raise
        if isinstance(failure, UnexpectedError):
            raise UnexpectedError(f"{failure}; the traceback is in {run_log.staged_url}") from None
        raise failure from None
    finally:
        if restore_interrupts:
            restore_interrupts()
    return result
