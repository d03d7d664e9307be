"""publish.decide_failure: what a failed run leaves and says, every branch, without a run."""

import doctest
import errno

import pytest

from esm2dask import publish
from esm2dask.errors import ConfigError, InputError, Interrupted, OutputError, UnexpectedError, describe_os_error
from esm2dask.publish import FailedRun, FailureOutcome, PublishError, StaleStaging, decide_failure

ROOT = "out/.esm2dask-staging-1"
RUN = FailedRun("out", ROOT, f"{ROOT}/esm2dask.log", finished_tasks=7, created_output=True)
KEPT = "the finished part is kept in out/.esm2dask-staging-1: once the cause is fixed, --resume continues"
FULL = ("; nothing was published and the previous output is unchanged; free space (a run needs about "
        "twice its output size there while it runs) and run again")


class BotocoreError(Exception):
    pass


BotocoreError.__module__ = "botocore.exceptions"


def test_the_doc_examples_hold():
    assert doctest.testmod(publish).failed == 0


@pytest.mark.parametrize("err", [PublishError("out: publishing failed"), StaleStaging("out: cannot resume")])
def test_a_failed_switch_or_a_stale_resume_keeps_the_staging_folder_and_goes_on_as_itself(err):
    assert decide_failure(err, RUN) == FailureOutcome(
        remove_staging=False, remove_created_output=False, keep_log=False, log_traceback=False)


@pytest.mark.parametrize("err", [InputError("in.fasta", "byte 3", "bad record"), ConfigError("bad option"), OutputError("not empty")])
@pytest.mark.parametrize("created", [True, False])
def test_bad_input_or_options_remove_what_the_run_made(err, created):
    run = FailedRun("out", ROOT, f"{ROOT}/esm2dask.log", created_output=created)
    assert decide_failure(err, run) == FailureOutcome(
        remove_staging=True, remove_created_output=created, keep_log=False, log_traceback=False)


@pytest.mark.parametrize("err, where", [
    (OSError(errno.ENOSPC, "No space left on device", "in.fasta", None, "out/x.csv"), " (writing out/x.csv)"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "out/y.csv"), " (writing out/y.csv)"),
    (OSError(errno.ENOSPC, "No space left on device"), f" (writing in {ROOT})"),
    (RuntimeError("polars: No space left on device (os error 28)"), f" (writing in {ROOT})"),
])
def test_a_full_output_removes_what_the_run_made_and_says_so_in_one_line(err, where):
    assert decide_failure(err, RUN) == FailureOutcome(
        remove_staging=True, remove_created_output=True, keep_log=True, log_traceback=True,
        raise_as=OutputError, message=f"out: no space left on the output file system{where}{FULL}")


def test_ctrl_c_keeps_the_finished_part_and_says_how_many_tasks():
    assert decide_failure(KeyboardInterrupt(), RUN) == FailureOutcome(
        remove_staging=False, remove_created_output=False, keep_log=True, log_traceback=False,
        raise_as=Interrupted,
        message=f"7 finished task(s) kept in {ROOT}; run the same command with --resume to finish")


@pytest.mark.parametrize("err", [SystemExit("killed"), GeneratorExit()])
def test_another_interruption_keeps_the_finished_part_and_goes_on_as_itself(err):
    assert decide_failure(err, RUN) == FailureOutcome(
        remove_staging=False, remove_created_output=False, keep_log=True, log_traceback=False,
        notice=f"interrupted; the finished part is kept in {ROOT}: run the same command with --resume to finish it")


def test_an_io_failure_keeps_the_finished_part_and_says_it_in_words():
    err = PermissionError(errno.EACCES, "Permission denied", "out/x.csv")
    outcome = decide_failure(err, RUN)
    assert outcome == FailureOutcome(
        remove_staging=False, remove_created_output=False, keep_log=True, log_traceback=True,
        raise_as=OutputError, message=f"out: {describe_os_error(err)}; nothing was published; {KEPT}")
    assert "Errno" not in outcome.message and "PermissionError" not in outcome.message


def test_a_failed_object_storage_request_keeps_the_finished_part():
    assert decide_failure(BotocoreError("connection reset"), RUN) == FailureOutcome(
        remove_staging=False, remove_created_output=False, keep_log=True, log_traceback=True,
        raise_as=OutputError,
        message=f"out: object storage request failed (connection reset); nothing was published; {KEPT}")


def test_an_unforeseen_failure_keeps_the_finished_part_and_points_at_the_traceback():
    assert decide_failure(ValueError("boom"), RUN) == FailureOutcome(
        remove_staging=False, remove_created_output=False, keep_log=True, log_traceback=True,
        raise_as=UnexpectedError,
        message=f"out: the run failed (boom); nothing was published; {KEPT}; the traceback is in {ROOT}/esm2dask.log")
