"""The one place that talks to Dask for a run: submission, keys, receipts, progress, timings.

A phase of :mod:`esm2dask.preprocess` (or :mod:`esm2dask.formats`) hands the runner a
stage name and one argument tuple per task; the runner takes the stage's function from the
stage table (:mod:`esm2dask.stages`), refusing a name the table does not list, and

- gives each task a key that names its stage and this attempt (:func:`task_key`);
- wraps it so that it leaves a receipt in the staging folder (:func:`receipts.recorded`),
  and on ``--resume`` loads the receipt of a task the interrupted run finished instead of
  running it again;
- reports progress (input bytes read, tasks done) and the seconds each stage was waited on;
- on a failure or a Ctrl-C, cancels what is queued and waits until nothing of this attempt
  can still write (:meth:`settle`).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from distributed import as_completed

from . import receipts
from .cluster import interruptible, task_result, settle
from .errors import Esm2DaskError
from .progress import Reporter
from .publish import StagingFolder
from .ranges import ByteRange
from .stages import Stage


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
class Finished:
    """A task finished by an earlier, interrupted run (its receipt was loaded)."""

    result: object


class Runner:
    """Runs the stages of one attempt on ``client``; see the module notes."""

    def __init__(self, client, staging: StagingFolder, reporter: Reporter, table: tuple[Stage, ...],
                 storage_options: dict):
        self.client = client
        self.staging = staging
        self.reporter = reporter
        self.storage_options = storage_options
        self.table = {s.name: s for s in table}
        # the staging token and this attempt's own number: a resumed run on a long-lived
        # cluster must not reuse the keys of the attempt it resumes, which the scheduler
        # may still be cancelling (the new futures would be cancelled with them)
        self.token = f"{staging.token}-{secrets.randbelow(10**6):06d}"
        self._submitted = False
        self._read_bytes: dict = {}  # task key -> input bytes it reads, for progress
        self.stage_seconds: dict[str, float] = {}
        self.stage_tasks: dict[str, int] = {}
        self.read_bytes = 0  # planned passes, plus the hash join's if a stream needs it
        self.skipped_read_bytes = 0
        self.skipped_tasks = 0

    def begin(self, read_bytes: int) -> None:
        self.read_bytes = read_bytes
        self.reporter.begin(read_bytes)

    def grow(self, extra: int) -> None:
        """A pass the plan left to the data (the hash join, the resume check) is run."""
        self.read_bytes += extra
        self.reporter.grow(extra)

    def message(self, text: str) -> None:
        self.reporter.message(text)

    def _stage(self, name: str) -> Stage:
        stage = self.table.get(name)
        if stage is None:
            raise Esm2DaskError(f"internal: stage {name!r} is not in this run's stage table")
        return stage

    def submit(self, name: str, args_list: list[tuple], keep_receipts: bool = True) -> list:
        """One task of stage ``name`` per argument tuple; each keeps a receipt (unless
        ``keep_receipts`` is false: a check that must run every time). A resumed run loads
        the receipts that are already there instead of running those tasks again."""
        fn = self._stage(name).fn
        self._submitted = True
        present = self.staging.receipts_present(name) if keep_receipts else set()
        handles = []
        for i, args in enumerate(args_list):
            # progress counts the input bytes a task reads: those of its byte range
            read = args[0].length if args and isinstance(args[0], ByteRange) else 0
            key = task_key(name, self.token, i)
            if not keep_receipts:
                self._read_bytes[key] = read
                handles.append(self.client.submit(interruptible, fn, *args, key=key, pure=False))
                continue
            receipt = self.staging.receipt_url(name, i)
            if receipt.rsplit("/", 1)[-1] in present:
                handles.append(Finished(receipts.load(receipt, self.storage_options, inside=self.staging.root)))
                self.reporter.skip(read)
                self.skipped_read_bytes += read
                self.skipped_tasks += 1
                continue
            self._read_bytes[key] = read
            handles.append(self.client.submit(interruptible, receipts.recorded, fn, receipt, self.storage_options, *args,
                                              key=key, pure=False))
        return handles

    def wait(self, name: str, handles: list) -> list:
        """Results in submission order; the first failure cancels the rest and is raised."""
        start = time.perf_counter()
        self.reporter.stage(name, len(handles))
        futures = [h for h in handles if not isinstance(h, Finished)]
        try:
            self.reporter.advance(name, len(handles) - len(futures))
            for future in as_completed(futures):
                if future.status == "error":
                    task_result(future)
                self.reporter.progress(self._read_bytes.pop(future.key, 0))
                self.reporter.advance(name)
            gathered = iter(self.client.gather(futures))
            results = [h.result if isinstance(h, Finished) else next(gathered) for h in handles]
        except BaseException:
            self.client.cancel(futures)
            raise
        seconds = time.perf_counter() - start
        self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + seconds
        self.stage_tasks[name] = self.stage_tasks.get(name, 0) + len(handles)
        self.reporter.stage_done(name, seconds)
        return results

    def run(self, name: str, args_list: list[tuple]) -> list:
        return self.wait(name, self.submit(name, args_list))

    @staticmethod
    def finished(handle) -> bool:
        """Whether a handle is a task an interrupted run had finished (its receipt loaded)."""
        return isinstance(handle, Finished)

    def cancel_and_settle(self) -> None:
        """After a failure: cancel this attempt's futures, wait until none can still write."""
        if not self._submitted:
            return
        self.client.cancel([f for f in list(self.client.futures.values()) if self.token in str(f.key)])
        settle(self.client, self.token)
