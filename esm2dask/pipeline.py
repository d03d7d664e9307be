"""``pipeline``: the in-job workflow that replaces BioNeMo's ``preprocess_esm2_bcp.sh``.

Steps, each skipped when its result is already there and valid, so a job that hit the
24 h limit or was preempted resumes where it stopped:

1. ``download``: ``ngc registry resource download-version`` to local disk;
2. ``copy-raw``: the raw folder onto the workspace;
3. ``preprocess``: local → local (multi-node: workspace → workspace, on the job's cluster),
   with ``--resume --overwrite``: a preempted attempt is continued, not redone, and stale
   staging folders are removed;
4. ``flip`` (when asked);
5. ``verify``;
6. ``copy-back``: ``<name>_preproc`` onto the workspace.

The raw inputs are on the workspace once (``copy-raw``): the output folder there gets them
as reflinks of that copy where the file system has reflinks, and not at all otherwise (no
second 49 GB); ``verify`` checks the names against the raw ``mapping.tsv`` either way.

Everything is logged to ``<workspace>/logs/esm2dask-pipeline-<timestamp>.log``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

from . import storage
from .config import MAPPING_TSV, ClusterConfig, PreprocessConfig
from .errors import Esm2DaskError
from .layout import MANIFEST_NAME
from .ngc import RESOURCE, RESOURCE_FOLDER, Ngc, NgcSettings, resource_download_cmd

log = logging.getLogger("esm2dask")


@dataclass(frozen=True)
class PipelineConfig:
    workspace: str = "/ngc_workspace_mount"
    local_dir: str = "/workspace/data_from_ngc"
    resource: str = RESOURCE
    folder: str = RESOURCE_FOLDER
    flip: bool = False
    flip_source: str | None = None
    workers: int | None = None
    scheduler_file: str | None = None
    settings: NgcSettings = field(default_factory=NgcSettings)

    @property
    def local_raw(self) -> str:
        return os.path.join(self.local_dir, self.folder)

    @property
    def local_out(self) -> str:
        return self.local_raw + "_preproc"

    @property
    def workspace_raw(self) -> str:
        return os.path.join(self.workspace, "data_from_ngc", self.folder)

    @property
    def workspace_out(self) -> str:
        return self.workspace_raw + "_preproc"

    @property
    def download_marker(self) -> str:
        return os.path.join(self.local_dir, f".esm2dask-download-complete-{self.folder}")


@dataclass
class StepResult:
    name: str
    status: str  # "done" or "skipped"
    seconds: float
    detail: str = ""


def same_files(src: str, dest: str) -> bool:
    """Every file of ``src`` exists under ``dest`` with the same size."""
    if not os.path.isdir(dest):
        return False
    for root, _, files in os.walk(src):
        for name in files:
            a = os.path.join(root, name)
            b = os.path.join(dest, os.path.relpath(a, src))
            if not os.path.exists(b) or os.path.getsize(a) != os.path.getsize(b):
                return False
    return True


def copy_tree(src: str, dest: str) -> None:
    """Copy into ``dest`` through a temporary sibling; then switch: the previous ``dest``
    is renamed aside, the copy renamed into place, and only then is the previous one
    removed. A preemption at any point leaves a whole tree at ``dest`` or aside (put back
    by the next call), never none."""
    tmp, old = dest + ".esm2dask-partial", dest + ".esm2dask-previous"
    if os.path.lexists(old):
        if not os.path.lexists(dest):
            os.replace(old, dest)  # stopped between the two renames: the previous tree comes back
        else:
            shutil.rmtree(old)  # stopped after the switch: the previous tree is no longer needed
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".esm2dask-staging*", ".esm2dask.lock"))
    if os.path.lexists(dest):
        os.replace(dest, old)
    os.replace(tmp, dest)
    if os.path.lexists(old):
        shutil.rmtree(old)


def place_inputs(raw: str, out: str) -> str:
    """The raw inputs beside the output as reflinks of ``raw`` (same file system, blocks
    shared copy-on-write), never as a second full copy; says what was done."""
    names = sorted(n for n in os.listdir(raw) if os.path.isfile(os.path.join(raw, n)))
    placed = []
    for name in names:
        dest = os.path.join(out, name)
        if os.path.lexists(dest):
            continue
        if storage.place_copy(os.path.join(raw, name), dest, copy=False) == "reflink":
            placed.append(name)
        else:
            return f"inputs not copied beside the output (no reflinks here; they are in {raw})"
    return f"inputs reflinked from {raw}" if placed else "inputs already beside the output"


def _manifest(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MANIFEST_NAME)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


class Pipeline:
    def __init__(self, config: PipelineConfig, ngc: Ngc | None = None, multi_node: bool = False):
        self.config = config
        self.ngc = ngc or Ngc(config.settings, echo=log.info)
        self.multi_node = multi_node
        self.results: list[StepResult] = []

    def _step(self, name: str, done, run) -> None:
        start = time.perf_counter()
        if done():
            self.results.append(StepResult(name, "skipped", 0.0, "already complete"))
            log.info("[%s] skipped: already complete", name)
            return
        log.info("[%s] starting", name)
        detail = run() or ""
        seconds = time.perf_counter() - start
        self.results.append(StepResult(name, "done", seconds, detail))
        log.info("[%s] done in %.1f s %s", name, seconds, detail)

    def run(self) -> list[StepResult]:
        c = self.config
        src_raw = c.workspace_raw if self.multi_node else c.local_raw
        out = c.workspace_out if self.multi_node else c.local_out
        self._step("download", lambda: os.path.exists(c.download_marker) and os.path.isdir(c.local_raw), self._download)
        self._step("copy-raw", lambda: same_files(c.local_raw, c.workspace_raw),
                   lambda: copy_tree(c.local_raw, c.workspace_raw))
        self._step("preprocess", lambda: self._verified(out, src_raw), lambda: self._preprocess(src_raw, out))
        if c.flip:
            self._step("flip", lambda: self._flip_done(out), lambda: self._flip(out))
        self._step("verify", lambda: False, lambda: self._verify(out, src_raw))
        if not self.multi_node:
            self._step("copy-back", lambda: _manifest(c.local_out) is not None and _manifest(c.local_out) == _manifest(c.workspace_out)
                       and same_files(c.local_out, c.workspace_out), self._copy_back)
        return self.results

    def _copy_back(self) -> str:
        c = self.config
        copy_tree(c.local_out, c.workspace_out)
        return place_inputs(c.workspace_raw, c.workspace_out)

    def _download(self) -> str:
        c = self.config
        os.makedirs(c.local_dir, exist_ok=True)
        answer = self.ngc.call(resource_download_cmd(c.settings, c.local_dir, c.resource))
        status = (answer or {}).get("status")
        if status != "Completed":
            raise Esm2DaskError(f"download of {c.resource} ended with status {status!r}; rerun to resume")
        if not os.path.isdir(c.local_raw):
            raise Esm2DaskError(f"download finished but {c.local_raw} is missing")
        with open(c.download_marker, "w") as f:
            json.dump(answer, f)
        return f"{answer.get('files_downloaded', '?')} file(s)"

    def _verified(self, out: str, raw: str) -> bool:
        from .verify import verify_tree

        return _manifest(out) is not None and verify_tree(out, mapping=os.path.join(raw, MAPPING_TSV)).ok

    def _preprocess(self, raw: str, out: str) -> str:
        from .preprocess import preprocess

        # a DGX node has 128+ cores: one process per worker there, since in-process threads
        # were measured on 2 cores only (benchmarks/results/engines.md)
        cluster = ClusterConfig(workers=self.config.workers or storage.cpu_count(), processes=True,
                                scheduler_file=self.config.scheduler_file, dashboard_address=":8787")
        # resume what a preempted attempt finished; start over (and drop stale staging
        # folders) when the inputs changed; the inputs are placed by place_inputs
        config = PreprocessConfig.from_options(raw_dir=raw, output_dir=out, overwrite=True, resume=True,
                                               copy_inputs=False, cluster=cluster)
        result = preprocess(config)
        detail = f"{result.input_bytes / 1e6:,.0f} MB at {result.mb_per_s:.0f} MB/s"
        if self.multi_node:
            detail += "; " + place_inputs(raw, out)
        return detail

    def _flip_done(self, out: str) -> bool:
        from .flip import verify_flip_tree

        folder = os.path.join(out, "FLIP")
        return os.path.isdir(folder) and verify_flip_tree(folder).ok

    def _flip(self, out: str) -> str:
        from .flip import DEFAULT_SOURCE, FlipConfig, TASKS, run_flip

        config = FlipConfig(tasks=(TASKS["secondary_structure"],), output_dir=os.path.join(out, "FLIP"),
                            source=self.config.flip_source or DEFAULT_SOURCE, overwrite=True,
                            cache_dir=os.path.join(self.config.local_dir, ".flip-cache"))
        return ", ".join(f"{r.task}: {sum(r.rows.values())} rows" for r in run_flip(config))

    def _verify(self, out: str, raw: str) -> str:
        from .verify import verify_tree

        report = verify_tree(out, mapping=os.path.join(raw, MAPPING_TSV))
        if not report.ok:
            raise Esm2DaskError(f"verify {out}: " + "; ".join(report.problems[:5]))
        return "all checks hold"


def open_log(workspace: str) -> str:
    """Log to a timestamped file on the workspace; returns its path."""
    folder = os.path.join(workspace, "logs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"esm2dask-pipeline-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.log")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger("esm2dask").addHandler(handler)
    logging.getLogger("esm2dask").setLevel(logging.INFO)
    return path


# ----------------------------------------------------------------------------- multi-node


@dataclass(frozen=True)
class NodeRole:
    """What one replica of a multi-node job runs."""

    rank: int
    size: int
    role: str  # "driver" (scheduler + worker + pipeline) or "worker"
    scheduler_file: str
    commands: tuple[tuple[str, ...], ...]


def node_role(env: dict[str, str], workspace: str, workers_per_node: int, job_id: str | None = None) -> NodeRole:
    """Replica 0 runs the scheduler, a worker and the pipeline; the others run workers.

    NGC sets ``NGC_ARRAY_INDEX`` and ``NGC_ARRAY_SIZE`` in each replica; the scheduler file
    on the shared workspace tells the workers where the scheduler is.
    """
    try:
        rank = int(env.get("NGC_ARRAY_INDEX", "0"))
        size = int(env.get("NGC_ARRAY_SIZE", "1"))
    except ValueError:
        raise Esm2DaskError("NGC_ARRAY_INDEX / NGC_ARRAY_SIZE are not integers") from None
    if not 0 <= rank < size:
        raise Esm2DaskError(f"replica {rank} is outside an array of {size}")
    job = job_id or env.get("NGC_JOB_ID", "job")
    sched_file = os.path.join(workspace, ".esm2dask", f"scheduler-{job}.json")
    worker = ("dask", "worker", "--scheduler-file", sched_file, "--nworkers", str(workers_per_node),
              "--nthreads", "1", "--death-timeout", "120",
              "--preload", "esm2dask.workerenv")
    if rank == 0:
        commands = (("dask", "scheduler", "--scheduler-file", sched_file), worker)
        return NodeRole(rank, size, "driver", sched_file, commands)
    return NodeRole(rank, size, "worker", sched_file, (worker,))


def _runnable(command: tuple[str, ...]) -> list[str]:
    """``dask …`` with the ``dask`` of this Python's environment (it may not be on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), command[0])
    program = shutil.which(command[0]) or (beside if os.path.exists(beside) else command[0])
    return [program, *command[1:]]


def run_multi_node(config: PipelineConfig, env: dict[str, str], workers_per_node: int) -> list[StepResult]:
    """Start this replica's Dask processes; on replica 0 also run the pipeline on them."""
    role = node_role(env, config.workspace, workers_per_node)
    os.makedirs(os.path.dirname(role.scheduler_file), exist_ok=True)
    if role.role == "worker":
        while not os.path.exists(role.scheduler_file):
            time.sleep(2)
        subprocess.run(_runnable(role.commands[0]), check=False)
        return []
    if os.path.exists(role.scheduler_file):
        os.unlink(role.scheduler_file)
    procs = [subprocess.Popen(_runnable(role.commands[0]))]
    try:
        while not os.path.exists(role.scheduler_file):
            time.sleep(0.5)
        procs.append(subprocess.Popen(_runnable(role.commands[1])))
        from distributed import Client

        with Client(scheduler_file=role.scheduler_file) as client:
            client.wait_for_workers(role.size * workers_per_node, timeout=600)
        cfg = PipelineConfig(**{**config.__dict__, "scheduler_file": role.scheduler_file})
        return Pipeline(cfg, multi_node=True).run()
    finally:
        try:
            # closes the scheduler and every worker, on all replicas, so their jobs end too
            with Client(scheduler_file=role.scheduler_file, timeout="10s") as client:
                client.shutdown()
        except (OSError, TimeoutError):
            pass
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
