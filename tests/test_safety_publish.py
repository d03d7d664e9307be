"""Nothing outside OUT touched, nothing lost: the staging/publish/resume life cycle under
attack and under kills (issue 20, items 1, 2, 5, 6, 7, 8, 9, 12).

Real folders, real symlinks, real processes: a forged manifest, journal or receipt, links
planted in a staging folder or in OUT, a kill in the middle of the switch, two runs racing
for one OUT, a preemption during the NGC copy-back, a dead writer's ``*.tmp``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, run_preprocess, tree_digest
from esm2dask.config import UF90_FASTA
from esm2dask.errors import Interrupted, OutputError
from esm2dask.layout import LOCK_NAME, MANIFEST_NAME
from esm2dask.preprocess import preprocess
from test_lifecycle import (  # noqa: F401  (raw_set, raw: fixtures)
    StopAt, _config, _interrupted_run, _invoke, _one_error_line, _stagings, raw, raw_set,
)
from test_s3 import s3_server  # noqa: F401  (the fixture: moto's S3 server on loopback)

LOG = "esm2dask.log"


@pytest.fixture(scope="module")
def published(synth_out):
    """One finished output of ``raw_set`` (the session's: conftest); tests work on copies of it."""
    return synth_out


@pytest.fixture
def out(published, tmp_path):
    """A private copy of the published output, in its own folder (``tmp_path/site/out``)."""
    copy = tmp_path / "site" / "out"
    shutil.copytree(published, copy)
    return copy


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file (and link) under ``folder``, by relative path: bytes, or the link's target."""
    result = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            result[rel] = b"-> " + os.readlink(p).encode()
        elif p.is_file():
            result[rel] = p.read_bytes()
    return result


def _outside_staging(snapshot: dict[str, bytes]) -> dict[str, bytes]:
    """A snapshot less the staging folders (an interrupted run's last tasks may still be
    finishing there)."""
    return {k: v for k, v in snapshot.items() if ".esm2dask-staging-" not in k}


def _links(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_symlink()]


def _preprocess_cli(raw, out, dask_cluster, *extra):
    return _invoke("preprocess", raw, "-o", out, "--scheduler-address", dask_cluster.scheduler_address,
                   "--plain", *extra)


# ----------------------------------------------------------------------------- 1. names read back


BAD_NAMES = ["../victim.txt", "uf50/../../victim.txt", "/ABS/victim.txt", "uf50/./x000.csv", "uf50//x000.csv",
             "..\\victim.txt", ""]


@pytest.mark.parametrize("key", ["files", "copied_inputs"])
@pytest.mark.parametrize("bad", BAD_NAMES)
def test_a_manifest_naming_a_path_outside_out_is_refused(raw, out, dask_cluster, key, bad):
    victim = out.parent / "victim.txt"
    victim.write_text("not esm2dask's\n")
    (out.parent / "victimdir").mkdir()
    (out.parent / "victimdir" / "f").write_text("mine\n")
    bad = bad.replace("/ABS", str(out.parent))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest[key][bad] = {"bytes": 15, "sha256": "0" * 64, "source": "x", "how": "copy"}
    if key == "copied_inputs":
        manifest[key]["../victimdir"] = manifest[key][bad]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    before, outside = _snapshot(out), _snapshot(out.parent)
    line = _one_error_line(_preprocess_cli(raw, out, dask_cluster, "--overwrite"))
    assert f"{out / MANIFEST_NAME} ({key}): entry " in line and "not a plain relative path" in line, line
    assert _snapshot(out) == before and _snapshot(out.parent) == outside


def test_a_forged_journal_moves_nothing(raw, tmp_path, cluster_config):
    """A staging folder's switch.json naming files beside OUT: --resume refuses, nothing moves."""
    out = tmp_path / "site" / "out"
    staged = _interrupted_run(raw, out, cluster_config)
    victim = out.parent / "victim.txt"
    victim.write_text("mine\n")
    (staged / "switch.json").write_text(json.dumps({"old": [], "new": ["../victim.txt"], "sources": {}}))
    outside = _outside_staging(_snapshot(out.parent))
    with pytest.raises(OutputError, match=r"switch.json: entry '\.\./victim.txt' is not a plain relative path"):
        preprocess(_config(raw, out, cluster_config, resume=True))
    with pytest.raises(OutputError, match="not a plain relative path"):
        preprocess(_config(raw, out, cluster_config, resume=True, overwrite=True))
    assert _outside_staging(_snapshot(out.parent)) == outside and victim.read_text() == "mine\n"


def test_a_receipt_naming_a_file_outside_the_staging_folder_is_refused(raw, tmp_path, cluster_config):
    out = tmp_path / "out"
    staged = _interrupted_run(raw, out, cluster_config)
    receipt = sorted((staged / "work" / "receipts" / "scan-mapping").iterdir())[0]
    document = json.loads(receipt.read_text())
    secret = tmp_path / "secret.arrow"
    secret.write_bytes(b"x" * 100)
    document["receipt"]["fields"]["clusters_url"] = str(secret)
    receipt.write_text(json.dumps(document))
    with pytest.raises(Exception, match="outside this run's staging folder"):
        preprocess(_config(raw, out, cluster_config, resume=True))


def test_a_link_on_the_way_in_out_is_never_followed(raw, out, dask_cluster):
    """OUT/uf90 replaced by a link to a folder elsewhere: --overwrite would move files out
    of (and into) that folder; it is refused, with nothing touched on either side."""
    elsewhere = out.parent / "elsewhere"
    shutil.move(str(out / "uf90"), elsewhere)
    os.symlink(elsewhere, out / "uf90")
    before, outside = _snapshot(out), _snapshot(elsewhere)
    line = _one_error_line(_preprocess_cli(raw, out, dask_cluster, "--overwrite"))
    assert f"{out / 'uf90'}: a symbolic link" in line, line
    assert _snapshot(out) == before and _snapshot(elsewhere) == outside


# ----------------------------------------------------------------------------- 2. links in staging


def _first_piece(staged: Path) -> Path:
    """A file the interrupted run wrote that a resumed run would write to again: the first
    uf90 shard, whose rows the fast path writes in place."""
    return staged / "tree" / "uf90" / "uf90_csvs" / "x000.csv"


def test_resume_never_writes_through_links_planted_in_staging(raw, tmp_path, cluster_config, synth_digest):
    out = tmp_path / "site" / "out"
    staged = _interrupted_run(raw, out, cluster_config)
    victim, victim_log = tmp_path / "victim.csv", tmp_path / "victim.log"
    piece = _first_piece(staged)
    victim.write_bytes(piece.read_bytes() + b"precious bytes beyond the piece\n")
    victim_log.write_text("my own log\n")
    piece.unlink()
    os.symlink(victim, piece)
    (staged / LOG).unlink()
    os.symlink(victim_log, staged / LOG)
    outside = (victim.read_bytes(), victim_log.read_bytes())
    with pytest.raises(OutputError, match="a symbolic link in the staging folder of an interrupted run") as err:
        preprocess(_config(raw, out, cluster_config, resume=True))
    assert str(err.value).startswith((f"{piece}:", f"{staged / LOG}:")), err.value
    assert (victim.read_bytes(), victim_log.read_bytes()) == outside
    # --overwrite too: that folder is not resumed but removed (its links unfollowed), the run starts over
    preprocess(_config(raw, out, cluster_config, resume=True, overwrite=True))
    assert (victim.read_bytes(), victim_log.read_bytes()) == outside
    assert not _links(out) and not _stagings(out)
    assert tree_digest(out) == synth_digest  # what a fresh run gives


def test_a_link_in_the_staged_tree_is_never_published(raw, tmp_path, cluster_config, monkeypatch):
    """A link appearing in the tree after it was checked (planted during the run): the
    switch refuses before it moves anything."""
    from esm2dask import publish

    out = tmp_path / "out"
    victim = tmp_path / "victim.csv"
    victim.write_text("mine\n")
    real_stage_inputs = publish.StagingFolder.stage_inputs

    def plant(self, config):
        shard = Path(self.tree_dir) / "uf90" / "uf90_csvs" / "x001.csv"
        shard.unlink()
        os.symlink(victim, shard)
        return real_stage_inputs(self, config)

    monkeypatch.setattr(publish.StagingFolder, "stage_inputs", plant)
    with pytest.raises(OutputError, match="x001.csv: a symbolic link"):
        run_preprocess(raw, out, cluster_config)
    assert victim.read_text() == "mine\n" and not (out / "uf90").exists()


# ----------------------------------------------------------------------------- 5. a kill mid-switch


def _kill_after_setting_aside(monkeypatch):
    """The driver dies (as with kill -9: nothing undoes the switch) just after the previous
    files went into previous/, before the first new file is in place."""
    from esm2dask import publish

    real_move = publish._move

    def dying_move(src, dest):
        if "/tree/" in src:
            raise SystemExit("killed")
        real_move(src, dest)

    monkeypatch.setattr(publish, "_move", dying_move)
    monkeypatch.setattr(publish.Publisher, "_undo", lambda self, journal: None)


def test_a_half_switch_is_undone_before_any_staging_folder_is_removed(raw, out, cluster_config, monkeypatch):
    before, manifest, log = tree_digest(out), (out / MANIFEST_NAME).read_bytes(), (out / LOG).read_bytes()
    _kill_after_setting_aside(monkeypatch)
    with pytest.raises(SystemExit):
        run_preprocess(raw, out, cluster_config, overwrite=True, num_csv_files=7)
    monkeypatch.undo()
    assert not (out / MANIFEST_NAME).exists()  # the tree and its manifest in previous/
    assert not [p for p in (out / "uf50").rglob("*") if p.is_file()]
    # a changed option (nothing to resume) on an input that fails: --overwrite removes stale staging
    fasta = raw / UF90_FASTA
    data = fasta.read_bytes()
    at = data.index(b"\n", data.index(b">")) + 1
    fasta.write_bytes(data[:at] + b"," + data[at + 1 :])
    with pytest.raises(Exception, match="would corrupt the CSV"):
        run_preprocess(raw, out, cluster_config, overwrite=True, resume=True, num_csv_files=9)
    assert tree_digest(out) == before
    assert (out / MANIFEST_NAME).read_bytes() == manifest and (out / LOG).read_bytes() == log
    assert not _stagings(out)
    assert _invoke("verify", out).exit_code == 0


# ----------------------------------------------------------------------------- 6. one run at a time


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path[:0] = [sys.argv[4], sys.argv[4] + "/tests"]
    from esm2dask.config import ClusterConfig, PreprocessConfig
    from esm2dask.preprocess import preprocess
    from esm2dask.progress import Reporter

    class Hold(Reporter):
        def advance(self, name, done=1):
            if name == "assemble":
                Path(sys.argv[3] + ".held").touch()
                while not Path(sys.argv[3] + ".go").exists():
                    time.sleep(0.05)

    raw, out, flag, repo, address = sys.argv[1:6]
    config = PreprocessConfig.from_options(raw_dir=raw, output_dir=out, cluster=ClusterConfig(
        scheduler_address=address, dashboard_address=None), **({"resume": True} if len(sys.argv) > 6 else {}))
    preprocess(config, Hold())
""")


def _esm2dask(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "esm2dask"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def _refused(result: subprocess.CompletedProcess, out: Path) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("esm2dask: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{out}: another esm2dask run (pid " in lines[0] and "is writing this output folder" in lines[0], lines


@pytest.mark.drill
def test_one_run_at_a_time_per_output_folder(raw, tmp_path, dask_cluster, cluster_config):
    """A real run in a second process holds OUT (stopped at assembly): a run into the same
    new OUT, --overwrite, --resume (taking over its live staging folder) are each refused
    with one line and touch nothing; once it ends, its output is whole and the next run goes."""
    out, flag = tmp_path / "out", tmp_path / "flag"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), raw, out, flag, REPO, dask_cluster.scheduler_address],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{flag}.held").exists():
            assert holder.poll() is None, holder.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        staged = _stagings(out)
        address = ("--scheduler-address", dask_cluster.scheduler_address)
        for extra in ((), ("--overwrite",), ("--resume",), ("--resume", "--overwrite")):
            _refused(_esm2dask("preprocess", raw, "-o", out, *address, "--plain", *extra), out)
        # (the holder's own tasks still write into its staging folder)
        assert _stagings(out) == staged and sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, staged[0].name])
        Path(f"{flag}.go").touch()
        assert holder.wait(timeout=120) == 0, holder.stdout.read()
    finally:
        if holder.poll() is None:
            holder.kill()
    assert not (out / LOCK_NAME).exists()
    assert _invoke("verify", out).exit_code == 0
    fresh = tmp_path / "fresh"
    run_preprocess(raw, fresh, cluster_config)
    assert tree_digest(out) == tree_digest(fresh)
    result = _esm2dask("preprocess", raw, "-o", out, "--scheduler-address", dask_cluster.scheduler_address,
                       "--plain", "--overwrite", "--num-csv-files", "5")
    assert result.returncode == 0, result.stderr


def test_a_second_process_is_refused_and_a_killed_holder_leaves_no_stale_lock(raw, out, dask_cluster):
    """Another process holds OUT: a run into it (plain, --overwrite, --resume, both) is
    refused with one line and touches nothing. flock dies with its holder: after kill -9
    the next run takes the folder."""
    from esm2dask.publish import OutputLock

    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from esm2dask.publish import OutputLock; "
            f"lock = OutputLock.acquire({str(out)!r}); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        before = _snapshot(out)
        for extra in ((), ("--overwrite",), ("--resume",), ("--resume", "--overwrite")):
            line = _one_error_line(_preprocess_cli(raw, out, dask_cluster, *extra))
            assert f"{out}: another esm2dask run (pid {proc.pid} on " in line, line
        assert _snapshot(out) == before
        with pytest.raises(OutputError, match=r"another esm2dask run \(pid \d+ on .*is writing this output folder"):
            OutputLock.acquire(str(out))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with OutputLock.acquire(str(out)):
        assert (out / LOCK_NAME).exists()
    assert not (out / LOCK_NAME).exists()


def test_a_failed_first_run_leaves_no_folder_behind(raw, tmp_path, dask_cluster):
    """The lock creates OUT; a run that fails on bad input leaves neither OUT nor the lock."""
    (raw / UF90_FASTA).write_bytes(b">X\nAC,GT\n")
    out = tmp_path / "new"
    _one_error_line(_preprocess_cli(raw, out, dask_cluster))
    assert not out.exists()


# ----------------------------------------------------------------------------- 7. NGC copy-back


def _tree(folder: Path, tag: str, n: int) -> None:
    for i in range(n):
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        (folder / "sub" / f"f{i}").write_text(f"{tag} {i}\n")
    (folder / MANIFEST_NAME).write_text(tag)


@pytest.mark.parametrize("kill_at", range(7))
def test_copy_back_keeps_a_whole_tree_at_every_kill_point(tmp_path, monkeypatch, kill_at):
    """A preemption at any step of the copy-back leaves the previous tree or the new one,
    whole, and the next copy-back finishes; never no output."""
    from esm2dask import pipeline

    src, dest = tmp_path / "local" / "out", tmp_path / "ws" / "out"
    _tree(src, "new", 3)
    _tree(dest, "old", 4)
    new, old = _snapshot(src), _snapshot(dest)
    calls = {"n": 0}

    class Preempted(BaseException):
        pass

    def dying(real):
        def step(*a, **kw):
            calls["n"] += 1
            if calls["n"] == kill_at + 1:
                raise Preempted
            return real(*a, **kw)
        return step

    monkeypatch.setattr(pipeline.os, "replace", dying(os.replace))
    monkeypatch.setattr(pipeline.shutil, "rmtree", dying(shutil.rmtree))
    monkeypatch.setattr(pipeline.shutil, "copytree", dying(shutil.copytree))
    try:
        pipeline.copy_tree(str(src), str(dest))
        killed = False
    except Preempted:
        killed = True
    monkeypatch.undo()
    assert killed == (kill_at < 6)  # 6 steps: rmtree, copytree (twice: it recurses), replace, replace, rmtree
    whole = [_snapshot(p) for p in (dest, Path(f"{dest}.esm2dask-previous")) if p.exists()]
    assert any(s in (new, old) for s in whole), f"no whole tree left: {whole}"
    if dest.exists():
        assert _snapshot(dest) in (new, old)
    pipeline.copy_tree(str(src), str(dest))
    assert _snapshot(dest) == new
    assert not Path(f"{dest}.esm2dask-previous").exists() and not Path(f"{dest}.esm2dask-partial").exists()


# ----------------------------------------------------------------------------- 8. the run's log


def _failing_manifest_write(monkeypatch):
    from esm2dask import publish

    def fail(url, text, *a, **kw):
        raise OSError("simulated: the manifest write failed")

    monkeypatch.setattr(publish, "write_manifest_file", fail)


def test_a_failed_overwrite_keeps_the_previous_log(raw, out, cluster_config, monkeypatch):
    log = (out / LOG).read_bytes()
    _failing_manifest_write(monkeypatch)
    with pytest.raises(OutputError, match="the converted tree and this run's log are kept in") as err:
        run_preprocess(raw, out, cluster_config, overwrite=True, num_csv_files=10)
    assert (out / LOG).read_bytes() == log
    (staged,) = _stagings(out)
    assert str(staged) in str(err.value) and b"esm2dask" in (staged / LOG).read_bytes()
    monkeypatch.undo()
    run_preprocess(raw, out, cluster_config, resume=True, num_csv_files=10)
    assert (out / LOG).read_bytes() != log and not _stagings(out)


def test_a_failed_first_run_leaves_no_log_in_out(raw, tmp_path, cluster_config, monkeypatch):
    out = tmp_path / "out"
    _failing_manifest_write(monkeypatch)
    with pytest.raises(OutputError, match="publishing failed"):
        run_preprocess(raw, out, cluster_config)
    assert not (out / LOG).exists() and not (out / "uf50").exists()
    (staged,) = _stagings(out)
    assert (staged / LOG).exists()


# ----------------------------------------------------------------------------- 9. temporaries


def test_a_dead_writers_tmp_is_never_published(raw, tmp_path, cluster_config):
    out = tmp_path / "out"
    staged = _interrupted_run(raw, out, cluster_config, stage="bionemo2-train-layout", formats=("bionemo2",))
    stale = [staged / "tree" / "bionemo2" / "train_clusters.parquet.4242-1.tmp",
             staged / "tree" / "bionemo2" / "x.1-2.tmp", staged / "work" / "pieces" / "x.csv.7-7.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"PAR1")
    preprocess(_config(raw, out, cluster_config, resume=True, formats=("bionemo2",)))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert not [name for name in manifest["files"] if name.endswith(".tmp")]
    assert not list(out.rglob("*.tmp"))
    assert sorted(manifest["files"]) == sorted(str(p.relative_to(out)) for p in (out / "bionemo2").rglob("*"))
    assert _invoke("verify", out).exit_code == 0


def test_an_object_store_output_is_held_by_a_lease(s3_server):
    """On S3 (moto's server): the lease object is created only if absent, so a second run is
    refused; it is removed on release; a lapsed lease (its run was killed) is taken over."""
    import s3fs

    from esm2dask.publish import OutputLock

    import boto3

    boto3.client("s3", endpoint_url=s3_server["endpoint_url"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="esm2dask-lease")
    fs = s3fs.S3FileSystem(**s3_server)
    out = "s3://esm2dask-lease/out"
    with OutputLock.acquire(out, s3_server):
        lease = json.loads(fs.cat(f"esm2dask-lease/out/{LOCK_NAME}"))
        assert lease["pid"] == os.getpid() and lease["expires"] > time.time()
        with pytest.raises(OutputError, match=f"{out}: another esm2dask run \\(pid {os.getpid()} on "):
            OutputLock.acquire(out, s3_server)
    assert not fs.exists(f"esm2dask-lease/out/{LOCK_NAME}")
    fs.pipe_file(f"esm2dask-lease/out/{LOCK_NAME}", json.dumps({"pid": 1, "host": "gone", "expires": 0}).encode())
    with OutputLock.acquire(out, s3_server):
        assert json.loads(fs.cat(f"esm2dask-lease/out/{LOCK_NAME}"))["pid"] == os.getpid()


# ----------------------------------------------------------------------------- 12. content identity


def test_resume_refuses_an_input_edited_in_place_with_its_mtime_put_back(raw, tmp_path, cluster_config):
    out = tmp_path / "out"
    staged = _interrupted_run(raw, out, cluster_config)
    path = raw / UF90_FASTA
    st = path.stat()
    data = path.read_bytes()
    at = data.index(b"\n", data.index(b">", len(data) // 2)) + 1  # a residue in the second half
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"W" if data[at : at + 1] != b"W" else b"Y")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    with pytest.raises(OutputError, match=f"{path} changed since \\(bytes \\d+-\\d+ differ from what the "
                                          "interrupted run read"):
        preprocess(_config(raw, out, cluster_config, resume=True))
    assert _stagings(out) == [staged]  # refused, kept
    preprocess(_config(raw, out, cluster_config, resume=True, overwrite=True))  # starts over
    fresh = tmp_path / "fresh"
    run_preprocess(raw, fresh, cluster_config)
    assert tree_digest(out) == tree_digest(fresh) and not _stagings(out)


def test_the_lock_is_never_made_in_the_input_folder_or_over_a_file(raw, tmp_path, dask_cluster):
    before = _snapshot(raw)
    line = _one_error_line(_preprocess_cli(raw, raw / "out", dask_cluster))
    assert "may not be the input folder or inside it" in line
    assert _snapshot(raw) == before and not (raw / LOCK_NAME).exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    line = _one_error_line(_preprocess_cli(raw, a_file, dask_cluster))
    assert f"{a_file}: is a file, not a folder" in line, line
    assert a_file.read_text() == "mine\n"
