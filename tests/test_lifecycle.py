"""A run's life cycle: resume, overwrite, publish, input copies, bad bytes, receipts, secrets.

Each test reproduces one defect of issue 11 (see notes) against real parts: a LocalCluster,
real files, the command line in-process.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from conftest import run_preprocess, tree_digest
from esm2dask.config import MAPPING_TSV, UF50_FASTA, UF90_FASTA, VAL_FASTA, ClusterConfig, PreprocessConfig
from esm2dask.errors import Interrupted, ConfigError, OutputError
from esm2dask.layout import MANIFEST_NAME, STAGING_PREFIX
from esm2dask.preprocess import preprocess
from esm2dask.progress import Reporter
from test_ngc import fake_ngc  # noqa: F401  (the fixture: a fake `ngc` on PATH)

INPUTS = (UF50_FASTA, UF90_FASTA, MAPPING_TSV, VAL_FASTA, "README.md")


@pytest.fixture(scope="session")
def raw_set(synth_raw):
    return synth_raw


@pytest.fixture
def raw(raw_set, tmp_path):
    """A private copy: tests edit their inputs."""
    copy = tmp_path / "raw"
    shutil.copytree(raw_set, copy)
    return copy


@pytest.fixture
def done(synth_out, tmp_path) -> Path:
    """A finished output of ``raw``'s bytes with the default options (a private copy of the
    session's ``synth_out``), at ``tmp_path/out``."""
    out = tmp_path / "out"
    shutil.copytree(synth_out, out)
    return out


class StopAt(Reporter):
    """Interrupts the run (as Ctrl-C would) when ``stage`` begins; keeps the messages."""

    def __init__(self, stage: str | None = None):
        super().__init__()
        self.stop = stage
        self.messages: list[str] = []

    def message(self, text):
        self.messages.append(text)

    def advance(self, name, done=1):
        if name == self.stop:
            raise KeyboardInterrupt


def _config(raw, out, cluster_config, **kw) -> PreprocessConfig:
    return PreprocessConfig.from_options(raw_dir=str(raw), output_dir=str(out), cluster=cluster_config, **kw)


def _stagings(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.startswith(STAGING_PREFIX)) if out.exists() else []


def _interrupted_run(raw, out, cluster_config, stage="assemble", **kw) -> Path:
    with pytest.raises(Interrupted):
        preprocess(_config(raw, out, cluster_config, **kw), StopAt(stage))
    staged = _stagings(out)
    assert len(staged) == 1
    return staged[0]


def _has_reflinks(folder: Path) -> bool:
    """Whether ``folder``'s file system clones files (ioctl FICLONE), asked directly."""
    import fcntl

    (folder / "probe").write_bytes(b"x")
    with open(folder / "probe", "rb") as src, open(folder / "probe2", "wb") as dest:
        try:
            fcntl.ioctl(dest.fileno(), 0x40049409, src.fileno())
            return True
        except OSError:
            return False


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("esm2dask: error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# ----------------------------------------------------------------------------- resume


def test_resume_refuses_an_input_edited_in_place_and_changed_options(raw, tmp_path, cluster_config):
    out = tmp_path / "out"
    staged = _interrupted_run(raw, out, cluster_config)
    # one residue changed in place: same size, same inode
    path = raw / UF90_FASTA
    with open(path, "r+b") as f:
        data = f.read()
        at = data.index(b"\n", data.index(b">")) + 1
        f.seek(at)
        f.write(b"W" if data[at : at + 1] != b"W" else b"Y")
    assert path.stat().st_size == len(data)
    with pytest.raises(OutputError) as err:
        preprocess(_config(raw, out, cluster_config, resume=True))
    message = str(err.value)
    assert f"{path} changed since" in message and "mtime_ns" in message and "--overwrite" in message
    assert _stagings(out) == [staged]
    with pytest.raises(OutputError, match="--num-csv-files was 50, now 10"):
        preprocess(_config(raw, out, cluster_config, resume=True, num_csv_files=10))
    # --resume --overwrite: nothing to resume from these inputs, so a fresh run; the stale folder goes
    preprocess(_config(raw, out, cluster_config, resume=True, overwrite=True))
    assert not _stagings(out)
    fresh = tmp_path / "fresh"
    run_preprocess(raw, fresh, cluster_config)
    assert tree_digest(out) == tree_digest(fresh)


def test_resume_refuses_a_staging_folder_of_an_earlier_format(raw, tmp_path, cluster_config, synth_digest):
    """Its receipts may mean other things (an earlier merge wrote pieces, not rows in place):
    the plan of an earlier esm2dask (no ``staging_format``, or another one) is not resumed."""
    import json

    from esm2dask.publish import STAGING_FORMAT

    out = tmp_path / "out"
    staged = _interrupted_run(raw, out, cluster_config)
    plan_path = staged / "work" / "plan.json"
    plan = json.loads(plan_path.read_text())
    assert plan["staging_format"] == STAGING_FORMAT
    for earlier in ({k: v for k, v in plan.items() if k != "staging_format"}, {**plan, "staging_format": 1}):
        plan_path.write_text(json.dumps(earlier))
        with pytest.raises(OutputError, match="an earlier version of esm2dask staged it") as err:
            preprocess(_config(raw, out, cluster_config, resume=True))
        assert "--overwrite" in str(err.value) and _stagings(out) == [staged]
    preprocess(_config(raw, out, cluster_config, resume=True, overwrite=True))  # starts over
    assert tree_digest(out) == synth_digest and not _stagings(out)


def test_resume_continues_the_matching_run(raw, tmp_path, cluster_config, synth_digest):
    out = tmp_path / "out"
    _interrupted_run(raw, out, cluster_config)
    reporter = StopAt()
    preprocess(_config(raw, out, cluster_config, resume=True), reporter)
    assert any(m.startswith("resuming the run staged in") for m in reporter.messages)
    assert tree_digest(out) == synth_digest and not _stagings(out)  # what a fresh run gives


def test_resume_with_nothing_to_resume_touches_nothing(done, tmp_path, cluster_config):
    from esm2dask.synth import synth

    out = done
    notes = out / "uf50" / "train" / "notes.txt"
    notes.write_text("mine\n")
    before = tree_digest(out)
    other = tmp_path / "other"
    synth(str(other), 200, seed=77)
    with pytest.raises(OutputError, match="nothing to resume"):
        run_preprocess(other, out, cluster_config, resume=True)
    assert tree_digest(out) == before
    # --overwrite too: still refused, since publishing would remove a file no manifest lists
    with pytest.raises(OutputError, match="uf50/train/notes.txt: not written by esm2dask"):
        run_preprocess(other, out, cluster_config, resume=True, overwrite=True)
    assert tree_digest(out) == before and notes.read_text() == "mine\n"
    notes.unlink()
    run_preprocess(other, out, cluster_config, resume=True, overwrite=True)
    fresh = tmp_path / "fresh"
    run_preprocess(other, fresh, cluster_config)
    assert tree_digest(out) == tree_digest(fresh)
    assert _invoke("verify", out).exit_code == 0


def test_overwrite_never_unlinks_a_file_it_did_not_write(raw, tmp_path, cluster_config):
    out = tmp_path / "out"
    run_preprocess(raw, out, cluster_config, copy_inputs=False)
    mine = out / MAPPING_TSV
    mine.write_text("my own notes\n")
    with pytest.raises(OutputError, match="mapping.tsv: not written by esm2dask"):
        run_preprocess(raw, out, cluster_config, overwrite=True)
    assert mine.read_text() == "my own notes\n"


def test_overwrite_replaces_exactly_what_the_manifest_lists(raw, done, cluster_config):
    """A 50-file tree replaced by a 10-file one: x010…x049 go (the manifest listed them),
    the input copies are replaced, a FLIP folder beside them stays."""
    out = done
    (out / "FLIP").mkdir()
    (out / "FLIP" / "keep.txt").write_text("stays\n")
    run_preprocess(raw, out, cluster_config, overwrite=True, num_csv_files=10)
    assert sorted(p.name for p in (out / "uf90/uf90_csvs").iterdir()) == [f"x{i:03d}.csv" for i in range(10)]
    assert (out / "FLIP" / "keep.txt").read_text() == "stays\n"
    assert _invoke("verify", out).exit_code == 0
    assert not _stagings(out)


# ----------------------------------------------------------------------------- publishing


def _same_size_edit(path: Path) -> None:
    """Change one residue of the first data row, in place, keeping the size."""
    data = bytearray(path.read_bytes())
    row = data.index(b"\n") + 1
    at = data.index(b"\n", row) - 1  # last residue of the row
    data[at] = ord("W") if data[at] != ord("W") else ord("Y")
    with open(path, "r+b") as f:
        f.write(bytes(data))


def test_manifest_checksums_every_file_and_verify_checks_them(done):
    out = done
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    files = manifest["files"]
    assert len(files) == 4 * 50 + 2
    # an independent oracle: coreutils' sha256sum
    listing = subprocess.run(["sha256sum", *files], cwd=out, capture_output=True, text=True, check=True).stdout
    oracle = {name: digest for digest, name in (line.split() for line in listing.splitlines())}
    assert {rel: entry["sha256"] for rel, entry in files.items()} == oracle
    assert _invoke("verify", out).exit_code == 0
    _same_size_edit(out / "uf90/uf90_csvs/x003.csv")
    result = _invoke("verify", out)
    assert result.exit_code == 1
    assert "uf90/uf90_csvs/x003.csv: SHA-256 differs from the manifest's" in result.output


def test_failed_switch_restores_the_previous_output(raw, done, cluster_config, monkeypatch):
    """The manifest, the last write of a run, fails: the previous tree and manifest are back,
    unchanged; the converted tree is kept and --resume publishes it."""
    from esm2dask import publish

    out = done
    before, manifest_before = tree_digest(out), (out / MANIFEST_NAME).read_bytes()

    def fail(url, text, *a, **kw):
        raise OSError("simulated: the manifest write failed")

    monkeypatch.setattr(publish, "write_manifest_file", fail)
    with pytest.raises(OutputError, match="publishing failed .*the previous output and its manifest are unchanged"):
        run_preprocess(raw, out, cluster_config, overwrite=True, num_csv_files=10)
    assert tree_digest(out) == before and (out / MANIFEST_NAME).read_bytes() == manifest_before
    assert _invoke("verify", out).exit_code == 0
    assert len(_stagings(out)) == 1
    monkeypatch.undo()
    run_preprocess(raw, out, cluster_config, resume=True, num_csv_files=10)
    assert not _stagings(out)
    assert len(list((out / "uf90/uf90_csvs").iterdir())) == 10
    assert _invoke("verify", out).exit_code == 0


def test_driver_killed_during_the_switch_is_undone_by_resume(raw, done, tmp_path, cluster_config, monkeypatch):
    """Simulated: the switch stops after a few renames and nothing undoes it (the driver
    died); the next --resume finds the journal, puts the previous files back, publishes."""
    from esm2dask import publish

    out = done
    installed = []
    real_move = publish._move

    def dying_move(src, dest):
        if "/tree/" in src:  # the new files going in
            if len(installed) == 3:
                raise SystemExit("killed")
            installed.append(dest)
        real_move(src, dest)

    monkeypatch.setattr(publish, "_move", dying_move)
    monkeypatch.setattr(publish.Publisher, "_undo", lambda self, journal: None)
    with pytest.raises(SystemExit):
        run_preprocess(raw, out, cluster_config, overwrite=True, num_csv_files=7)
    assert not (out / MANIFEST_NAME).exists()  # half switched: not to be trusted
    monkeypatch.undo()
    run_preprocess(raw, out, cluster_config, resume=True, num_csv_files=7)
    fresh = tmp_path / "fresh"
    run_preprocess(raw, fresh, cluster_config, num_csv_files=7)
    assert tree_digest(out) == tree_digest(fresh)
    assert _invoke("verify", out).exit_code == 0 and not _stagings(out)


# ----------------------------------------------------------------------------- inputs in OUT


def test_inputs_in_the_output_are_copies_not_links(raw, tmp_path, cluster_config):
    from esm2dask.synth import synth

    out = tmp_path / "out"
    run_preprocess(raw, out, cluster_config)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert sorted(manifest["copied_inputs"]) == sorted(INPUTS)
    for name in INPUTS:
        assert not os.path.samefile(raw / name, out / name)
        assert (raw / name).stat().st_nlink == 1
        assert manifest["copied_inputs"][name]["how"] in ("reflink", "copy")
        assert (out / name).read_bytes() == (raw / name).read_bytes()
    raw_mapping = (raw / MAPPING_TSV).read_bytes()
    with open(out / MAPPING_TSV, "ab") as f:
        f.write(b"UniRef50_X\tUniRef90_X\n")
    assert (raw / MAPPING_TSV).read_bytes() == raw_mapping
    with open(out / MAPPING_TSV, "r+b") as f:
        f.truncate(len(raw_mapping))  # the copy as the run wrote it (verify below checks its digest)
    # re-running synth over the raw folder leaves an earlier output alone
    kept = {name: (out / name).read_bytes() for name in INPUTS}
    synth(str(raw), 300, seed=99, overwrite=True)
    assert {name: (out / name).read_bytes() for name in INPUTS} == kept
    assert _invoke("verify", out).exit_code == 0


def test_hard_links_only_on_request(raw, tmp_path, cluster_config):
    out = tmp_path / "out"
    run_preprocess(raw, out, cluster_config, link_inputs=True)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for name in INPUTS:
        assert os.path.samefile(raw / name, out / name)
        assert manifest["copied_inputs"][name]["how"] == "hardlink"
    help_text = " ".join(_invoke("preprocess", "--help").output.split())
    assert "--link-inputs" in help_text and "the two names are then ONE file" in help_text
    with pytest.raises(ConfigError, match="exclude each other"):
        _config(raw, out, None, link_inputs=True, copy_inputs=False)


def test_place_copy_is_a_new_file(tmp_path):
    from esm2dask.storage import place_copy

    src = tmp_path / "a"
    src.write_bytes(os.urandom(100_000))
    how = place_copy(str(src), str(tmp_path / "b"))
    assert how in ("reflink", "copy")
    assert (tmp_path / "b").read_bytes() == src.read_bytes() and not os.path.samefile(src, tmp_path / "b")
    assert place_copy(str(src), str(tmp_path / "c"), hard_link=True) == "hardlink"
    assert os.path.samefile(src, tmp_path / "c")
    if how == "copy":  # no reflinks here: with copy=False nothing is left behind
        assert place_copy(str(src), str(tmp_path / "d"), copy=False) == "skipped"
        assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("size", [0, 1, 8 << 20, (8 << 20) + 12_345, (24 << 20) + 4097])
def test_copy_hashed_copies_and_hashes_in_one_read(tmp_path, size):
    """The copy-inputs stage's copy: the same bytes, a new file, and the SHA-256 that the
    coreutils' sha256sum finds in the source (chunk edges: empty, one byte, 8 MiB, past it;
    and four blocks, so that each of the two buffers is written while the other is read)."""
    from esm2dask.storage import _copy_direct, copy_hashed

    src = tmp_path / "src"
    src.write_bytes(os.urandom(size))
    oracle = subprocess.run(["sha256sum", str(src)], capture_output=True, text=True, check=True).stdout.split()[0]
    how, digest = copy_hashed(str(src), str(tmp_path / "copy"))
    assert how in ("reflink", "copy") and digest == oracle
    assert (tmp_path / "copy").read_bytes() == src.read_bytes()
    assert not os.path.samefile(src, tmp_path / "copy")
    assert copy_hashed(str(src), str(tmp_path / "link"), hard_link=True) == ("hardlink", oracle)
    assert os.path.samefile(src, tmp_path / "link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "link", "src"]  # no temporary left
    direct = _copy_direct(str(src), str(tmp_path / "direct"))  # None where the file system refuses O_DIRECT
    if direct is not None:
        assert direct == oracle and (tmp_path / "direct").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("refused_after", [0, 1 << 20])
def test_copy_hashed_finishes_a_copy_the_kernel_refuses(tmp_path, monkeypatch, refused_after):
    """Where ``copy_file_range`` fails (another file system, an old kernel), at once or after
    part of the file, the rest is read and written: the same bytes, the same digest."""
    from esm2dask.storage import copy_hashed

    src = tmp_path / "src"
    src.write_bytes(os.urandom((3 << 20) + 7))
    oracle = subprocess.run(["sha256sum", str(src)], capture_output=True, text=True, check=True).stdout.split()[0]
    real, calls = os.copy_file_range, []

    def refusing(fd_in, fd_out, count, *args):
        calls.append(count)
        if len(calls) == 1 and refused_after:
            return real(fd_in, fd_out, min(count, refused_after), *args)
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    real_open = os.open

    def no_direct(path, flags, *args, **kwargs):  # as tmpfs answers O_DIRECT
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    monkeypatch.setattr(os, "copy_file_range", refusing)
    how, digest = copy_hashed(str(src), str(tmp_path / "copy"))
    assert calls and digest == oracle and (tmp_path / "copy").read_bytes() == src.read_bytes()
    assert how in ("copy", "reflink")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "src"]  # no temporary left


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_copy_hashed_falls_back_where_a_direct_write_is_refused(tmp_path, monkeypatch):
    """A file system that takes O_DIRECT at open but refuses the write (EINVAL): the copy is
    made again through the kernel, whole, with the source's digest."""
    from esm2dask.storage import copy_hashed

    src = tmp_path / "src"
    src.write_bytes(os.urandom((9 << 20) + 5))
    oracle = subprocess.run(["sha256sum", str(src)], capture_output=True, text=True, check=True).stdout.split()[0]
    real, refused = os.pwrite, []

    def refusing(fd, data, offset):
        if not refused:
            refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing)
    how, digest = copy_hashed(str(src), str(tmp_path / "copy"))
    assert refused and digest == oracle and (tmp_path / "copy").read_bytes() == src.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "src"]


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_a_direct_copy_reads_on_after_a_short_read(tmp_path, monkeypatch):
    """A file system whose reads return less than asked (some FUSE and network ones): the
    copy reads on until a buffer is full or the file ends, so it is whole, not cut short."""
    from esm2dask import storage

    src = tmp_path / "src"
    src.write_bytes(os.urandom((17 << 20) + 5))
    oracle = subprocess.run(["sha256sum", str(src)], capture_output=True, text=True, check=True).stdout.split()[0]

    class Short:
        def __init__(self, f):
            self.f = f

        def readinto(self, view):
            with memoryview(view)[: (1 << 20) + 3] as part:
                return self.f.readinto(part)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_open = open
    monkeypatch.setattr(storage, "open", lambda *a, **k: Short(real_open(*a, **k)), raising=False)
    digest = storage._copy_direct(str(src), str(tmp_path / "copy"))
    if digest is not None:  # None where the file system refuses O_DIRECT
        assert digest == oracle and (tmp_path / "copy").read_bytes() == src.read_bytes()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
@pytest.mark.parametrize("failing_write", [1, 3])
def test_a_direct_copy_that_fails_part_way_leaves_nothing(tmp_path, monkeypatch, failing_write):
    """A write that fails while the next block is being read (the disk full, on the helper
    thread): the error reaches the caller, and no copy or temporary is left."""
    from esm2dask.storage import copy_hashed

    src = tmp_path / "src"
    src.write_bytes(os.urandom((40 << 20) + 3))
    real, calls = os.pwrite, []

    def filling(fd, data, offset):
        calls.append(offset)
        if len(calls) == failing_write:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", filling)
    with pytest.raises(OSError) as err:
        copy_hashed(str(src), str(tmp_path / "copy"))
    assert err.value.errno == errno.ENOSPC and len(calls) == failing_write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _sha256sum(path) -> str:
    return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 8 << 20, (8 << 20) + 1, (16 << 20), (24 << 20) + 4097])
def test_a_file_built_in_memory_is_written_once_and_hashed_there(tmp_path, size):
    """``write_hashed`` (the parquet parts): the file holds the buffer's bytes, and the
    digest it returns is the one coreutils' sha256sum finds in the file (block edges: empty,
    one byte, a page, 8 MiB, past it, two blocks exactly, and four blocks and a bit)."""
    from esm2dask.storage import write_hashed

    data = os.urandom(size)
    digest = write_hashed(str(tmp_path / "part.parquet"), memoryview(data))
    assert (tmp_path / "part.parquet").read_bytes() == data
    assert digest == _sha256sum(tmp_path / "part.parquet")
    assert [p.name for p in tmp_path.iterdir()] == ["part.parquet"]  # no temporary left


@pytest.mark.parametrize("refused", ["open", "write"])
def test_a_file_built_in_memory_is_written_where_direct_writes_are_refused(tmp_path, monkeypatch, refused):
    """A file system that refuses ``O_DIRECT`` at open (tmpfs) or at the first write: the
    bytes are written plainly, whole, with their digest."""
    from esm2dask.storage import write_hashed

    data = os.urandom((9 << 20) + 5)
    real_open, real_pwrite, calls = os.open, os.pwrite, []

    def opening(path, flags, *args, **kwargs):
        if refused == "open" and flags & getattr(os, "O_DIRECT", 0):
            calls.append(path)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return real_open(path, flags, *args, **kwargs)

    def writing(fd, buf, offset):
        if refused == "write" and not calls:
            calls.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwrite(fd, buf, offset)

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "pwrite", writing)
    digest = write_hashed(str(tmp_path / "part.parquet"), data)
    assert (calls or not hasattr(os, "O_DIRECT")) and (tmp_path / "part.parquet").read_bytes() == data
    assert digest == _sha256sum(tmp_path / "part.parquet")
    assert [p.name for p in tmp_path.iterdir()] == ["part.parquet"]


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_a_file_built_in_memory_that_fails_part_way_leaves_nothing(tmp_path, monkeypatch):
    """The disk full on the second block's write: the error reaches the task, and neither
    the file nor a temporary is left (the file appears whole or not at all)."""
    from esm2dask.storage import write_hashed

    real, calls = os.pwrite, []

    def filling(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", filling)
    with pytest.raises(OSError) as err:
        write_hashed(str(tmp_path / "part.parquet"), os.urandom(20 << 20))
    assert err.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 8 << 20, (8 << 20) + 1, (24 << 20) - 1, (24 << 20) + 4097])
def test_sha256_of_a_file_written_past_the_page_cache(tmp_path, size):
    """``sha256_file(uncached=True)`` (``train.db``'s checksum): read with ``O_DIRECT``, two
    blocks in flight; the digest coreutils' sha256sum finds (block edges: empty, one byte, a
    page, 8 MiB, one past it, three blocks and a partial fourth), also of a file the page writer
    wrote with ``O_DIRECT`` itself."""
    from esm2dask import storage

    src = tmp_path / "src"
    src.write_bytes(os.urandom(size))
    oracle = subprocess.run(["sha256sum", str(src)], capture_output=True, text=True, check=True).stdout.split()[0]
    assert storage.sha256_file(str(src), uncached=True) == oracle
    direct = storage._sha256_direct(str(src))  # None where the file system refuses O_DIRECT
    assert direct in (None, oracle)
    copy = tmp_path / "copy"
    if storage._copy_direct(str(src), str(copy)) is not None:  # written with O_DIRECT, not in the page cache
        assert storage.sha256_file(str(copy), uncached=True) == oracle


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
@pytest.mark.parametrize("refused", ["open", "read", "short read", "end before the size"])
def test_sha256_falls_back_where_direct_reads_are_refused(tmp_path, monkeypatch, refused):
    """A file system that refuses ``O_DIRECT`` at open (tmpfs on older kernels), takes it at
    open but not the read (EINVAL), returns a short read part way (the next offset is then
    unaligned) or an end before the size it said: the file is read through the page cache
    instead, the digest the same."""
    from esm2dask import storage

    src = tmp_path / "src"
    src.write_bytes(os.urandom((17 << 20) + 5))
    oracle = subprocess.run(["sha256sum", str(src)], capture_output=True, text=True, check=True).stdout.split()[0]
    real_open, real_preadv, calls = os.open, os.preadv, []

    def no_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return real_open(path, flags, *args, **kwargs)

    def preadv(fd, buffers, offset):
        calls.append(offset)
        if refused == "read":
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if refused == "end before the size" and offset:
            return 0
        if offset % 4096:  # what O_DIRECT answers an unaligned offset
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if offset == 0 and refused == "short read":  # the first read comes back short
            with memoryview(buffers[0]) as view, view[:(1 << 20) + 3] as part:
                return real_preadv(fd, [part], offset)
        return real_preadv(fd, buffers, offset)

    if refused == "open":
        monkeypatch.setattr(os, "open", no_direct)
    else:
        monkeypatch.setattr(os, "preadv", preadv)
    assert storage.sha256_file(str(src), uncached=True) == oracle
    assert storage._sha256_direct(str(src)) is None
    assert refused == "open" or calls


def test_copy_hashed_replaces_a_link_at_the_destination_never_follows_it(tmp_path):
    from esm2dask.storage import copy_hashed

    outside = tmp_path / "outside"
    outside.write_bytes(b"keep me")
    src = tmp_path / "src"
    src.write_bytes(b">a\nACGT\n")
    (tmp_path / "dest").symlink_to(outside)
    copy_hashed(str(src), str(tmp_path / "dest"))
    assert outside.read_bytes() == b"keep me"
    assert not (tmp_path / "dest").is_symlink() and (tmp_path / "dest").read_bytes() == src.read_bytes()


def test_built_in_place_appears_whole_or_not_at_all(tmp_path):
    """The one atomic write: on success the file is there; on any failure the previous file
    is untouched, no temporary is left, and a full disk's error (no file named) names it."""
    import errno

    from esm2dask.storage import built_in_place

    path = tmp_path / "sub" / "file"
    with built_in_place(str(path)) as tmp, open(tmp, "wb") as f:
        f.write(b"first")
    assert path.read_bytes() == b"first"
    with pytest.raises(OSError) as caught:
        with built_in_place(str(path)) as tmp, open(tmp, "wb") as f:
            f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.filename == str(path)
    with pytest.raises(ValueError):
        with built_in_place(str(path)) as tmp, open(tmp, "wb") as f:
            f.write(b"half")
            raise ValueError("not an OSError")
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file"]


def test_a_resumed_run_makes_again_an_input_copy_that_is_gone_or_cut_short(raw, tmp_path, cluster_config):
    """The copy-inputs receipts of an interrupted run are reused only while the staged copy is
    there whole: one removed, or cut short, is made again, and the manifest's digest is its own."""
    out = tmp_path / "out"
    staged = _interrupted_run(raw, out, cluster_config, stage="checksum")  # after the copies
    copies = staged / "inputs"
    assert sorted(p.name for p in copies.iterdir()) == sorted(INPUTS)
    (copies / MAPPING_TSV).unlink()
    with open(copies / UF90_FASTA, "r+b") as f:
        f.truncate(100)
    preprocess(_config(raw, out, cluster_config, resume=True))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for name in INPUTS:
        assert (out / name).read_bytes() == (raw / name).read_bytes()
        oracle = subprocess.run(["sha256sum", str(raw / name)], capture_output=True, text=True).stdout.split()[0]
        assert manifest["copied_inputs"][name]["sha256"] == oracle
    assert _invoke("verify", out).exit_code == 0



@pytest.mark.parametrize("stage, change", [("checksum", "appended"), ("assemble", "one byte flipped")])
def test_a_resumed_run_hashes_again_a_part_no_longer_as_written(raw, tmp_path, cluster_config, stage, change):
    """The parquet parts are hashed as they are written and the digests kept in the tasks'
    receipts; a resumed run takes a kept digest only while the staged file has the size and
    the modification time it was written with: a part changed since (longer, or one byte
    flipped in place before the parts were named) is hashed again, and the manifest's
    digest is its own."""
    out = tmp_path / "out"
    staged = _interrupted_run(raw, out, cluster_config, stage=stage, formats="esm2nv,hf")
    parts = sorted(staged.glob("**/hf/train/part-00000.parquet")) or sorted(staged.glob("**/hf-train/*.parquet"))
    part = parts[0]
    with open(part, "r+b") as f:
        if change == "appended":
            f.seek(0, os.SEEK_END)
            f.write(b"changed")
        else:
            f.seek(part.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 1]))
    preprocess(_config(raw, out, cluster_config, resume=True, formats="esm2nv,hf"))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    hf_files = sorted(p for p in (out / "hf").rglob("*.parquet"))
    assert hf_files and all(manifest["files"][str(p.relative_to(out))]["sha256"] == _sha256sum(p) for p in hf_files)


def test_a_resumed_run_never_writes_through_a_link_where_a_shard_goes(raw, tmp_path, cluster_config):
    """A shard written in place that an interrupted run left, replaced by a link to a file
    outside OUT: the resumed run refuses the staging folder, naming the link, and the file
    outside keeps its bytes (the shards are also made and written without following a link,
    ``StagingFolder.make_shards`` and ``storage.write_at``)."""
    out, outside = tmp_path / "out", tmp_path / "outside.csv"
    staged = _interrupted_run(raw, out, cluster_config, stage="fast-uf90")
    (shard,) = staged.glob("**/uf90/uf90_csvs/x000.csv")
    outside.write_bytes(b"not yours\n" * (shard.stat().st_size // 10 + 1))
    before = outside.read_bytes()
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(OutputError, match="x000.csv: a symbolic link"):
        preprocess(_config(raw, out, cluster_config, resume=True))
    assert outside.read_bytes() == before


# ----------------------------------------------------------------------------- bad bytes, failures


def test_non_utf8_byte_in_mapping_is_one_error_and_leaves_nothing(raw, tmp_path, dask_cluster):
    path = raw / MAPPING_TSV
    data = path.read_bytes()
    lines = data.split(b"\n")
    lines[2] = lines[2].replace(b"\t", b"\t\xff", 1)
    path.write_bytes(b"\n".join(lines))
    offset = path.read_bytes().index(b"\xff")
    out = tmp_path / "out"
    result = _invoke("preprocess", raw, "-o", out, "--scheduler-address", dask_cluster.scheduler_address, "--plain")
    line = _one_error_line(result)
    assert f"{path} (line 3, byte {offset}):" in line and "0xff is not valid UTF-8" in line
    assert "interrupted" not in result.output and "--resume" not in result.output
    assert not out.exists()


def test_a_failure_is_reported_as_what_it_is(raw, tmp_path, cluster_config, monkeypatch):
    from esm2dask import preprocess as module

    def broken(*a, **kw):
        raise RuntimeError("a bug in assembly")

    monkeypatch.setattr(module, "assemble", broken)
    from esm2dask.errors import UnexpectedError

    reporter = StopAt()
    # one line for the terminal, without the class name; the traceback is in the kept log
    with pytest.raises(UnexpectedError, match=r"the run failed \(a bug in assembly\).*the traceback is in") as err:
        preprocess(_config(raw, tmp_path / "out", cluster_config), reporter)
    assert "RuntimeError" not in str(err.value)
    assert not any("interrupted" in m for m in reporter.messages), reporter.messages
    logs = list((tmp_path / "out").glob(".esm2dask-staging-*/esm2dask.log"))
    assert len(logs) == 1 and "RuntimeError: a bug in assembly" in logs[0].read_text()


# ----------------------------------------------------------------------------- receipts


def test_receipts_are_json_and_never_unpickled(raw, tmp_path, cluster_config):
    out = tmp_path / "out"
    staged = _interrupted_run(raw, out, cluster_config)
    receipts = [p for p in (staged / "work" / "receipts").rglob("*") if p.is_file()]
    assert receipts and not [p for p in receipts if p.suffix == ".pkl"]
    for p in receipts:
        if p.suffix == ".json":
            json.loads(p.read_bytes())
    # a forged receipt that would run code if it were unpickled
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    target = sorted((staged / "work" / "receipts" / "scan-mapping").iterdir())[0]
    target.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(Exception, match="not a JSON receipt"):
        preprocess(_config(raw, out, cluster_config, resume=True))
    assert not marker.exists()


def test_receipt_codec():
    from esm2dask import receipts, tasks

    examples = [
        tasks.MappingReceipt(3, "a.arrow", "b.arrow", 10, 25, {"clusters": "h.npy"}, {"clusters": [0, 4, 10]}),
        tasks.FastReceipt(False, 7, "record 'X' at byte 9"),
        tasks.BucketReceipt("u", [0, 1, 2]),
        tasks.JoinReceipt("j", [0, 5], 9, 1, 2, ["A", "B"], 2),
        12, "digest", None, [1, 2],
    ]
    for value in examples:
        assert receipts.decode(receipts.encode(value)) == value
    with pytest.raises(receipts.ReceiptError, match="unknown receipt type 'Popen'"):
        receipts.decode(json.dumps({"receipt": {"$receipt": "Popen", "fields": {"args": ["true"]}}}).encode())
    with pytest.raises(receipts.ReceiptError, match="not FastReceipt's"):
        receipts.decode(json.dumps({"receipt": {"$receipt": "FastReceipt", "fields": {"__init__": 1}}}).encode())
    from dataclasses import dataclass

    @dataclass
    class Unregistered:
        n: int

    with pytest.raises(TypeError, match="not a registered receipt type"):
        receipts.encode(Unregistered(1))


# ----------------------------------------------------------------------------- secrets, CPUs, FLIP


def test_storage_options_from_a_file_and_masked(tmp_path):
    from esm2dask.storage import parse_storage_options

    path = tmp_path / "s3.json"
    path.write_text(json.dumps({"key": "AKIAEXAMPLE", "secret": "s3cr3t-value", "endpoint_url": "http://x"}))
    options = parse_storage_options(f"@{path}")
    assert options == {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value", "endpoint_url": "http://x"}
    assert "s3cr3t-value" not in repr(options) and "AKIAEXAMPLE" not in str(options)
    assert "http://x" in repr(options)
    # what Dask shows of a task's arguments (worker logs, the dashboard's task pages)
    from esm2dask.tasks import Routing

    config = PreprocessConfig.from_options(raw_dir="/raw", storage_options=dict(options))
    routing = Routing((), 50, "s3://b/work", None, config.storage_options)
    assert "s3cr3t-value" not in repr(config) and "s3cr3t-value" not in repr(routing)
    with pytest.raises(ConfigError, match=f"--storage-options {tmp_path}/missing.json: cannot read it"):
        parse_storage_options(f"@{tmp_path}/missing.json")
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        parse_storage_options(f"@{path}")


def test_workers_follow_the_cpus_this_process_may_use(monkeypatch, tmp_path):
    """A job limited to 2 CPUs of a 64-core node gets 2 workers, in preprocess and the pipeline."""
    import esm2dask.pipeline as pipeline_module
    import esm2dask.preprocess as preprocess_module
    from esm2dask.pipeline import Pipeline, PipelineConfig

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5})
    assert ClusterConfig().workers == 2
    seen = []

    class Stop(BaseException):  # not an Exception: the CLI turns those into one error line
        pass

    def capture(config, *a, **kw):
        seen.append(config.cluster.workers)
        raise Stop

    monkeypatch.setattr(preprocess_module, "preprocess", capture)
    with pytest.raises(Stop):
        Pipeline(PipelineConfig(workspace=str(tmp_path / "ws"), local_dir=str(tmp_path)), ngc=object())._preprocess(
            str(tmp_path / "raw"), str(tmp_path / "out"))
    with pytest.raises(Stop):
        CliRunner().invoke(cli, ["preprocess", str(tmp_path / "raw"), "-o", str(tmp_path / "o")],
                           catch_exceptions=False)
    monkeypatch.setattr(pipeline_module, "run_multi_node", lambda config, env, n: seen.append(n) or [])
    monkeypatch.setenv("NGC_CLI_ORG", "org")
    result = CliRunner().invoke(cli, ["pipeline", "--multi-node", "--workspace", str(tmp_path / "ws")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert seen == [2, 2, 2]


def test_flip_cache_is_kept_per_source(tmp_path):
    from test_flip import _Server, flip, make_flip_tree

    first, second = tmp_path / "one", tmp_path / "two"
    make_flip_tree(first / "fasta")
    make_flip_tree(second / "fasta")
    scl = second / "fasta" / "scl" / "mixed_soft.fasta"
    scl.write_text(scl.read_text().replace("Lysosome/Vacuole", "Mitochondrion"))
    servers = [_Server(first), _Server(second)]
    cache = tmp_path / "cache"
    try:
        a = flip("--tasks", "scl", "-o", tmp_path / "A", "--source", servers[0].url, "--cache-dir", cache)
        b = flip("--tasks", "scl", "-o", tmp_path / "B", "--source", servers[1].url, "--cache-dir", cache)
    finally:
        for s in servers:
            s.close()
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert (tmp_path / "A/scl/test/x000.csv").read_text().splitlines()[1] == "scl_2,PQRS,Lysosome"
    assert (tmp_path / "B/scl/test/x000.csv").read_text().splitlines()[1] == "scl_2,PQRS,Mitochondrion"
    assert servers[1].requests  # the second mirror was asked, not the first one's cache


# ----------------------------------------------------------------------------- the NGC pipeline


@pytest.mark.drill  # the whole pipeline twice
def test_pipeline_resumes_preprocess_and_keeps_one_copy_of_the_inputs(fake_ngc, tmp_path, monkeypatch, caplog):
    """A preempted preprocess is resumed (not redone), stale staging folders are removed, and
    the workspace holds the raw inputs once (reflinks beside the output, or nothing)."""
    import logging

    import esm2dask.preprocess as preprocess_module
    from esm2dask.ngc import NgcSettings
    from esm2dask.pipeline import Pipeline, PipelineConfig
    from esm2dask.synth import synth

    src = tmp_path / "resource"
    synth(str(src), 200, seed=4)
    monkeypatch.setenv("FAKE_NGC_RESOURCE_SRC", str(src))
    ws, local = tmp_path / "ws", tmp_path / "local"
    config = PipelineConfig(workspace=str(ws), local_dir=str(local), workers=1, settings=NgcSettings.resolve())

    monkeypatch.setattr(preprocess_module, "Reporter", lambda: StopAt("assemble"))
    with pytest.raises(Interrupted):
        Pipeline(config).run()
    monkeypatch.setattr(preprocess_module, "Reporter", Reporter)
    out = Path(config.local_out)
    assert len(_stagings(out)) == 1
    stale = out / f"{STAGING_PREFIX}-20000101000000-abcdef" / "work"
    stale.mkdir(parents=True)
    (stale / "plan.json").write_text(json.dumps({"parameters": {}, "inputs": {}}))

    caplog.set_level(logging.INFO, logger="esm2dask")
    results = {r.name: r.status for r in Pipeline(config).run()}
    assert results["preprocess"] == "done" and results["copy-back"] == "done"
    assert any(m.startswith("resuming the run staged in") for m in caplog.messages), caplog.messages
    assert not _stagings(out)
    ws_raw, ws_out = Path(config.workspace_raw), Path(config.workspace_out)
    assert _invoke("verify", ws_out).exit_code == 0
    reflinks = _has_reflinks(tmp_path / "ws")
    for name in INPUTS:
        assert (ws_raw / name).exists()
        if reflinks:
            assert not os.path.samefile(ws_raw / name, ws_out / name)
        else:
            assert not (ws_out / name).exists(), f"a second full copy of {name} on the workspace"


def test_shards_are_made_and_written_without_following_a_link(tmp_path):
    """Defence in depth under the resume check above: ``make_shards`` replaces a link where
    a shard goes instead of truncating through it, refuses a linked split folder, and
    ``write_at`` (the rows' ``pwrite``) refuses to open a link."""
    from esm2dask.layout import CSV_HEADER
    from esm2dask.publish import StagingFolder
    from esm2dask.storage import write_at

    staging = StagingFolder(str(tmp_path / "out"), "t", {}, created_output=True)
    outside = tmp_path / "outside.csv"
    outside.write_bytes(b"keep me\n")
    folder = Path(staging.tree_dir) / "uf90" / "uf90_csvs"
    folder.mkdir(parents=True)
    (folder / "x000.csv").symlink_to(outside)
    staging.make_shards("uf90/uf90_csvs", [len(CSV_HEADER) + 5, len(CSV_HEADER)])
    assert outside.read_bytes() == b"keep me\n" and not (folder / "x000.csv").is_symlink()
    assert (folder / "x000.csv").read_bytes() == CSV_HEADER + b"\0" * 5
    (folder / "x001.csv").unlink()
    (folder / "x001.csv").symlink_to(outside)
    with pytest.raises(OSError):
        write_at(str(folder / "x001.csv"), 0, b"written")
    assert outside.read_bytes() == b"keep me\n"
    linked = Path(staging.tree_dir) / "uf50"
    linked.symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(OutputError, match="symbolic link"):
        staging.make_shards("uf50/train", [len(CSV_HEADER)])
