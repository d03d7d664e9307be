"""Staging, resuming, publishing and the manifest: a run's life cycle in OUT.

A record's way out: its task writes its row into the run's :class:`StagingFolder`, and
:class:`Publisher` switches the finished tree into OUT; if the run fails instead,
:func:`decide_failure` says what of the staging folder is kept and what the one error line
says.

A run builds everything under ``OUT/.esm2dask-staging-<token>/`` (:class:`StagingFolder`,
a new one or the one ``--resume`` continues): ``work/`` (pieces, intermediate Arrow files,
task receipts as JSON, ``plan.json``), ``tree/`` (the finished ``uf50/`` and ``uf90/``),
``inputs/`` (the copies of the raw inputs). OUT itself is not touched until everything is
built, checksummed and the manifest is ready. Then the *switch* (:class:`Publisher`):

1. a journal (``switch.json``) records which files leave and which arrive;
2. the previous manifest and every file it lists are set aside in ``previous/`` (a rename
   on a file system, a server-side copy on an object store);
3. the new files are put in place (renames; server-side copies), files only the previous
   tree had are removed;
4. the new manifest is written, last, in one rename or one PUT.

If any step fails, the previous files are put back from ``previous/`` and the converted
tree back into staging: OUT holds the previous tree and its manifest, unchanged, and
``--resume`` publishes the new one. A driver killed during the switch leaves the journal;
the next ``--resume`` undoes the half switch first (:meth:`Publisher.recover`).

What a failed run leaves is :func:`decide_failure`'s answer, a pure function of the error:
bad input or options, or a full output file system, remove the staging folder; a failed
switch, an interruption or any other failure keeps it, for ``--resume``.

Files that no manifest lists (a user's notes in ``uf50/train/``, a folder written by
something else) are never removed or replaced: the run refuses before it starts.

Nothing outside OUT is touched: every name read back from an output (the manifest, the
journal, the record of input copies, a receipt's files) is checked to be a plain relative
path inside it (:func:`checked_name`), and no symbolic link under OUT is followed (each part
``lstat``-ed; a staging folder holding a link is never resumed). One run at a time holds OUT
(:class:`OutputLock`); a half switch left by a killed run is undone before anything else.

``--resume`` picks up the newest staging folder whose plan (parameters, and each input's
identity: size, mtime and inode, or ETag/version) equals the current one. One whose plan
differs is refused with what changed; ``--resume`` with nothing to resume is refused unless
``--overwrite`` is given too (then: resume if possible, else start over).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import shutil
import stat
from dataclasses import asdict, dataclass, replace

import numpy as np

from . import storage
from .config import MANIFEST, RAW_README, RESUME, options_where
from .errors import Esm2DaskError, Interrupted, OutputError, UnexpectedError, describe_os_error, reason
from .layout import LOCK_NAME, MANIFEST_NAME, STAGING_PREFIX, TMP_SUFFIX, TOP_DIRS
from .logs import RunLog

PLAN_NAME = "plan.json"
JOURNAL_NAME = "switch.json"
CHECKSUM = "sha256"


class PublishError(OutputError):
    """The switch into OUT failed; the previous output is back and the staging folder is kept."""


class StaleStaging(OutputError):
    """The staging folder ``--resume`` chose was built from other bytes: refused, and kept."""


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def checked_name(name, where: str) -> str:
    """``name`` if it is a plain relative path (``uf50/train/x000.csv``): no ``..``, ``.``
    or empty part, not absolute, no backslash or NUL. Every name read back from an output
    (manifest, journal, input record) passes here before anything is moved or removed;
    ``where`` names the file it came from.

    >>> checked_name("uf50/train/x000.csv", "m")
    'uf50/train/x000.csv'
    >>> checked_name("../victim.txt", "OUT/esm2dask-manifest.json")
    Traceback (most recent call last):
    ...
    esm2dask.errors.OutputError: OUT/esm2dask-manifest.json: entry '../victim.txt' is not a plain relative path inside the output folder; esm2dask never touches anything outside it: remove the entry (or the whole file) and run again
    """
    parts = name.split("/") if isinstance(name, str) else []
    if (not parts or "\\" in name or "\0" in name or name.startswith("/")
            or any(p in ("", ".", "..") for p in parts)):
        raise OutputError(
            f"{where}: entry {name!r} is not a plain relative path inside the output folder; esm2dask "
            f"never touches anything outside it: remove the entry (or the whole file) and run again"
        )
    return name


#: What the staging folder's receipts and intermediate files mean. A resumed run trusts
#: the receipts of the run it resumes; when a version of esm2dask changes what a task
#: leaves behind (2: the hash join's merge writes uf90 and uf50/train in place, not as
#: pieces; 3: a local FASTA's scatter routes records unread, its merge converts them; 4:
#: ``train.db``'s runs hold places in the uf90 shards, and parquet receipts their digests),
#: this number changes with it, and an older staging folder is not resumed.
STAGING_FORMAT = 4


def run_plan(config, identities: dict[str, dict]) -> dict:
    """What a resumed run must share with the run it resumes (JSON-normalised)."""
    params = options_where(config, RESUME)
    plan = {"parameters": params, "inputs": identities, "staging_format": STAGING_FORMAT}
    return json.loads(json.dumps(plan, sort_keys=True))


def describe_plan_change(old: dict | None, new: dict) -> str:
    """What differs between a staged plan and this run's, in the words of the options."""
    if not isinstance(old, dict) or "parameters" not in old or "inputs" not in old:
        return "its plan.json is missing or unreadable"
    if old.get("staging_format") != new.get("staging_format"):
        return "an earlier version of esm2dask staged it, and its intermediate files mean other things now"
    changes = []
    for key in sorted(set(old["parameters"]) | set(new["parameters"])):
        a, b = old["parameters"].get(key), new["parameters"].get(key)
        if a != b:
            option = {"raw_dir": "RAW_DIR", "partition_bytes": "--partition-size"}.get(key, "--" + key.replace("_", "-"))
            changes.append(f"{option} was {a!r}, now {b!r}")
    for url in sorted(set(old["inputs"]) | set(new["inputs"])):
        a, b = old["inputs"].get(url), new["inputs"].get(url)
        if a is None or b is None:
            changes.append(f"{url} was {'not ' if a is None else ''}an input then")
        elif a != b:
            fields = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            what = ", ".join(f"{k} {_shown(k, a.get(k))} → {_shown(k, b.get(k))}" for k in fields)
            changes.append(f"{url} changed since ({what})")
    return "; ".join(changes) or "the plans differ"


def _shown(field: str, value) -> str:
    if field == "mtime_ns" and isinstance(value, int):
        return _dt.datetime.fromtimestamp(value / 1e9, _dt.timezone.utc).isoformat(timespec="microseconds")
    return str(value)


def read_manifest(url: str, storage_options: dict | None = None) -> dict | None:
    """OUT's manifest, or None when there is none (or it is not a readable JSON object)."""
    fs, path = storage.get_fs(storage.join(url, MANIFEST_NAME), storage_options)
    try:
        fs.invalidate_cache(path)
        with fs.open(path, "rb") as f:
            value = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def manifest_listed(manifest: dict | None, where: str = MANIFEST_NAME) -> set[str]:
    """Paths relative to OUT that a manifest says esm2dask wrote (tree and input copies),
    each checked to be a plain relative path (:func:`checked_name`)."""
    if not manifest:
        return set()
    names = set()
    for key in ("files", "copied_inputs"):
        entries = manifest.get(key) or {}
        if not isinstance(entries, dict):
            raise OutputError(f"{where}: {key!r} is not a JSON object of file names; remove the manifest "
                              f"(or the output folder) and run again")
        names |= {checked_name(name, f"{where} ({key})") for name in entries}
    return names


def list_output_files(output_dir: str, storage_options: dict) -> dict[str, int]:
    """Every file of every layout (the folders of ``TOP_DIRS``) with its size, by path relative to OUT."""
    fs, root = storage.get_fs(output_dir, storage_options)
    fs.invalidate_cache(root)
    files = {}
    for top in TOP_DIRS:
        base = storage.join(root, top)
        if fs.exists(base):
            for path, info in fs.find(base, detail=True).items():
                files[path[len(root.rstrip("/")) + 1 :]] = int(info["size"])
    return dict(sorted(files.items()))


#: an object-store lease lasts this long unless its holder renews it (every third of it)
LEASE_SECONDS = 600


class OutputLock:
    """One run at a time per OUT: held from before the staging folder is chosen until the
    run has published or failed.

    On a file system, ``OUT/.esm2dask.lock`` locked with ``flock`` (on NFS Linux maps it to
    a POSIX byte-range lock, which NFS servers share between clients); the kernel releases
    it when the process dies, so a killed run never leaves a stale lock. On an object
    store, a lease object with its owner and expiry, created only if absent (a conditional
    PUT, ``If-None-Match: *``) and renewed while the run lives; a killed run's lease
    expires after :data:`LEASE_SECONDS`. A second run is refused with one line.
    """

    def __init__(self, output_dir: str, storage_options: dict | None = None):
        self.output_dir = output_dir
        self.storage_options = storage_options or {}
        self.url = storage.join(output_dir, LOCK_NAME)
        # the one choice of lock: flock in a file system's folder, else an object store's lease
        self.folder = storage.local_path(output_dir) if storage.is_local(output_dir) else None
        self.created_output = False
        self.owner = {"host": os.uname().nodename, "pid": os.getpid(), "token": secrets.token_hex(8),
                      "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        self._fd: int | None = None
        self._renewer = None

    @classmethod
    def acquire(cls, output_dir: str, storage_options: dict | None = None) -> "OutputLock":
        lock = cls(output_dir, storage_options)
        if lock.folder is not None:
            lock._lock_file()
        else:
            lock._take_lease()
        return lock

    def _refusal(self, holder: dict | None) -> OutputError:
        who = ""
        if isinstance(holder, dict) and holder.get("pid"):
            who = f" (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')})"
        return OutputError(
            f"{self.output_dir}: another esm2dask run{who} is writing this output folder; only one run at "
            f"a time may: wait for it to finish (or stop it), then run again"
        )

    def _lock_file(self) -> None:
        import fcntl

        out = self.folder
        path = os.path.join(out, LOCK_NAME)
        try:
            self.created_output = not os.path.lexists(out)
            os.makedirs(out, exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    try:
                        holder = json.loads(os.pread(fd, 4096, 0) or b"null")
                    except ValueError:
                        holder = None
                    os.close(fd)
                    raise self._refusal(holder) from None
                # the holder before us removes the file as it lets go: lock the file that is there
                held, now = os.fstat(fd), _lstat(path)
                if now is not None and (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
                    break
                os.close(fd)
            self._fd = fd
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self.owner).encode(), 0)
        except OSError as err:
            if self._fd is None and self.created_output:
                _rmdir_quietly(out)
            if os.path.lexists(out) and not os.path.isdir(out):
                why = "is a file, not a folder; --output-dir names the folder to write into"
            elif isinstance(err, PermissionError):
                why = "permission denied; choose a folder you may write"
            elif storage.is_no_space(err):
                why = "no space left on the output file system"
            else:
                why = f"cannot write the output folder (creating {path}: {reason(err)})"
            raise OutputError(f"{self.output_dir}: {why}") from None

    def _take_lease(self) -> None:
        fs, path = storage.get_fs(self.url, self.storage_options)
        try:
            for attempt in range(2):
                try:
                    self._put_lease(fs, path, create=True)
                    break
                except FileExistsError:
                    holder = _read_json(fs, path)
                    expired = not isinstance(holder, dict) or _float(holder.get("expires")) < _now()
                    if not expired or attempt:
                        raise self._refusal(holder) from None
                    fs.rm(path)  # best effort: a lease nobody renewed (its run was killed)
        except OSError as err:
            raise OutputError(f"{self.output_dir}: cannot write the output location's lease ({reason(err)}); "
                              f"does the bucket exist, and may these credentials write there?") from None
        self._renewer = _Renewer(self, fs, path)
        self._renewer.start()

    def _put_lease(self, fs, path: str, create: bool) -> None:
        body = json.dumps({**self.owner, "expires": _now() + LEASE_SECONDS}).encode()
        fs.pipe_file(path, body, mode="create" if create else "overwrite")

    def release(self) -> None:
        """Let go (the lock file or lease object is removed); a folder the lock created for
        a run that left nothing in it is removed too."""
        if self._fd is not None:
            out = self.folder
            try:
                os.unlink(os.path.join(out, LOCK_NAME))
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
            if self.created_output:
                _rmdir_quietly(out)
        if self._renewer is not None:
            self._renewer.stop()
            self._renewer = None
            fs, path = storage.get_fs(self.url, self.storage_options)
            try:
                if (_read_json(fs, path) or {}).get("token") == self.owner["token"]:
                    fs.rm(path)
            except OSError:
                pass

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Renewer:
    """Renews an object-store lease every third of its life, from a daemon thread."""

    def __init__(self, lock: OutputLock, fs, path: str):
        import threading

        self.lock, self.fs, self.path = lock, fs, path
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="esm2dask-lease", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(LEASE_SECONDS / 3):
            try:
                self.lock._put_lease(self.fs, self.path, create=False)
            except OSError:
                pass  # a passing outage; the next renewal tries again

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _now() -> float:
    import time

    return time.time()


def _lstat(path: str):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _read_json(fs, path: str):
    try:
        fs.invalidate_cache(path)
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def _rmdir_quietly(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def input_copies(config) -> list[tuple[str, str]]:
    """(source URL, name in OUT) of each raw input this run copies beside the tree."""
    if not config.copy_inputs:
        return []
    # the inputs this run reads, no others: a random split reads no validation FASTA
    roles = config.input_roles()
    inputs = [roles[r] for r in ("uf50", "uf90", "mapping", "val", "test") if r in roles]
    readme = storage.join(config.raw_dir, RAW_README)
    out, seen = [], set()
    for url in dict.fromkeys([*inputs, readme]):
        name = _name(url)
        if name in seen or name in (*TOP_DIRS, MANIFEST_NAME) or name.startswith(STAGING_PREFIX):
            continue
        if url not in inputs:  # the raw folder's README, when there is one
            fs, path = storage.get_fs(url, config.storage_options)
            if not fs.exists(path):
                continue
        seen.add(name)
        out.append((url, name))
    return out


def copied_by_task(config, url: str) -> bool:
    """Whether the run's ``copy-inputs`` stage copies (and hashes) this input, a local
    file into a local OUT; any other copy is made when the tree is published."""
    return storage.copies_locally(url, config.output_dir)


def refuse_output_in_input(config) -> None:
    """OUT may not be the input folder or inside it, nor a file (checked before the lock is
    taken there)."""
    out = config.output_dir
    if storage.is_inside(out, config.raw_dir):
        raise OutputError(
            f"{out}: the output folder may not be the input folder or inside it "
            f"(esm2dask never writes into {config.raw_dir}); choose another --output-dir"
        )
    if storage.blocks_folder(out):
        raise OutputError(f"{out}: is a file, not a folder; --output-dir names the folder to write into")


class StagingFolder:
    """The hidden folder (or prefix) one run writes into before publishing,
    ``OUT/.esm2dask-staging-<token>/``: choosing it (a new one, or the one ``--resume``
    continues), its layout (``work/``, ``tree/``, ``inputs/``, ``previous/``) and what the run
    keeps there (the plan, receipts, markers, the input copies). :class:`Publisher` switches
    its tree into OUT; :func:`decide_failure` says what a failed run leaves of it."""

    def __init__(self, output_dir: str, token: str, storage_options: dict, created_output: bool,
                 resumed: bool = False):
        self.output_dir = output_dir
        self.token = token
        self.storage_options = storage_options
        self.created_output = created_output
        self.resumed = resumed
        # how the switch moves files (renames, or an object store's server-side copies) and
        # what it can check (links, empty folders, a created OUT): decided once, here
        self.local = storage.is_local(output_dir)
        self.root = storage.join(output_dir, f"{STAGING_PREFIX}-{token}")
        self.work_dir = storage.join(self.root, "work")
        self.tree_dir = storage.join(self.root, "tree")
        self.inputs_dir = storage.join(self.root, "inputs")
        self.previous_dir = storage.join(self.root, "previous")
        self.fs, _ = storage.get_fs(output_dir, storage_options)
        self.identities: dict[str, dict] = {}
        #: the files the run builds, relative to the tree (set once they are built): what is
        #: published, whatever else the folder holds (a dead writer's ``*.tmp``)
        self.expected: list[str] | None = None
        #: the inputs the run's tasks copied into staging, by name in OUT: what the manifest
        #: says of each (``source``, ``bytes``, ``how``)
        self.copied: dict[str, dict] = {}

    # ------------------------------------------------------------------ starting a run

    @classmethod
    def create(cls, config, inputs: dict[str, int]) -> "StagingFolder":
        """A new staging folder, or the one ``--resume`` continues; refuses what would lose data."""
        out = config.output_dir
        storage_options = config.storage_options
        fs, out_path = storage.get_fs(out, storage_options)
        refuse_output_in_input(config)
        try:
            fs.invalidate_cache(out_path)
            listing = fs.ls(out_path, detail=False) if fs.exists(out_path) else []
        except (PermissionError, OSError) as err:
            raise OutputError(f"{out}: cannot read the output location ({reason(err)})") from None
        names = [_name(p) for p in listing if _name(p) != LOCK_NAME]
        stagings = sorted(n for n in names if n.startswith(STAGING_PREFIX))
        identities = {url: storage.input_identity(url, storage_options) for url in inputs}
        plan = run_plan(config, identities)
        # a driver killed while publishing left a half switch: undo it (from its journal)
        # before anything else looks at OUT or removes a staging folder
        for name in stagings:
            Publisher(cls(out, name[len(STAGING_PREFIX) + 1 :], storage_options, False)).recover()
        fs.invalidate_cache(out_path)
        names = [_name(p) for p in fs.ls(out_path, detail=False) if _name(p) != LOCK_NAME] if listing else []
        existing = [n for n in names if not n.startswith(STAGING_PREFIX)]

        chosen = cls._resumable(config, stagings, plan) if config.resume else None
        if chosen is None and existing and not config.overwrite:
            raise OutputError(
                f"{out}: output folder exists and is not empty; pass --overwrite to replace "
                f"its uf50/ and uf90/ (or --resume to finish an interrupted run)"
            )
        if chosen is not None:
            storage.remove_temporaries(chosen.root)  # of writers the kill stopped (this run holds the lock)
        _refuse_foreign_files(config, fs, out_path)
        if config.overwrite:  # stale attempts: this run does not need them
            for name in stagings:
                if chosen is None or name != _name(chosen.root):
                    _remove_quietly(fs, storage.join(out_path, name))
        if chosen is not None:
            chosen.identities = identities
            return chosen
        created = not listing and not fs.exists(out_path)
        token = _dt.datetime.now().strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)
        staging = cls(out, token, storage_options, created)
        staging.identities = identities
        try:
            fs.makedirs(staging._path(staging.work_dir), exist_ok=True)
            with storage.open_for_write(storage.join(staging.work_dir, PLAN_NAME), storage_options, "w") as f:
                json.dump(plan, f, sort_keys=True)
        except (PermissionError, OSError) as err:
            staging.discard()
            if storage.is_no_space(err):
                raise OutputError(f"{out}: no space left on the output file system") from None
            raise OutputError(f"{out}: cannot write the output folder ({reason(err)})") from None
        return staging

    @classmethod
    def _resumable(cls, config, stagings: list[str], plan: dict) -> "StagingFolder | None":
        """The newest staging folder staged with ``plan``; None (with ``--overwrite``) or a
        refusal that says why when there is none."""
        out = config.output_dir
        candidates = [cls(out, n[len(STAGING_PREFIX) + 1 :], config.storage_options, False, resumed=True)
                      for n in reversed(stagings)]
        chosen = next((c for c in candidates if c.read_plan() == plan), None)
        if chosen is not None:
            try:  # a link planted in it would make this run write (or read) outside OUT
                storage.refuse_links_in(chosen.root, "the staging folder of an interrupted run")
            except OutputError:
                if not config.overwrite:
                    raise
                chosen = None  # --overwrite: start over; the folder is removed as stale (links unfollowed)
        if chosen is not None or config.overwrite:
            return chosen
        if candidates:
            raise OutputError(
                f"{out}: cannot resume {candidates[0].root}: it was staged from other inputs or options "
                f"({describe_plan_change(candidates[0].read_plan(), plan)}); restore them, or pass "
                f"--overwrite as well to start over"
            )
        raise OutputError(
            f"{out}: nothing to resume (no staging folder of an interrupted run); run without "
            f"--resume, or pass --overwrite as well to start over"
        )

    def _path(self, url: str) -> str:
        return storage.get_fs(url, self.storage_options)[1]

    def read_plan(self) -> dict | None:
        url = storage.join(self.work_dir, PLAN_NAME)
        if not storage.is_plain_file(url, self.storage_options):
            return None  # missing, or a link: never followed
        path = self._path(url)
        try:
            with self.fs.open(path, "r") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None

    # ------------------------------------------------------------------ the run's files

    def receipt_url(self, stage: str, index: int) -> str:
        return storage.join(self.work_dir, "receipts", stage, f"{index:05d}.json")

    def receipts_present(self, stage: str) -> set[str]:
        path = self._path(storage.join(self.work_dir, "receipts", stage))
        if not self.resumed or not self.fs.exists(path):
            return set()
        return {_name(p) for p in self.fs.ls(path, detail=False)}

    def marker(self, name: str) -> bool:
        return self.fs.exists(self._path(storage.join(self.work_dir, "receipts", name)))

    def set_marker(self, name: str) -> None:
        with storage.open_for_write(storage.join(self.work_dir, "receipts", name), self.storage_options) as f:
            f.write(b"done\n")

    def write_labels(self, labels: np.ndarray) -> str:
        url = storage.join(self.work_dir, "labels.npy")
        with storage.open_for_write(url, self.storage_options) as f:
            np.save(f, labels)
        return url

    def remove_pieces(self, split_dirs) -> None:
        """Drop a stream's CSV pieces (not its counts/starts pieces)."""
        for d in split_dirs:
            base = self._path(storage.join(self.work_dir, "pieces", d))
            if not self.fs.exists(base):
                continue
            for p in self.fs.ls(base, detail=False):
                if _name(p).isdigit():
                    self.fs.rm(p, recursive=True)

    def make_shards(self, split_dir: str, sizes: list[int]) -> None:
        """The shards of a folder whose rows are written in place (local only), each at its
        final size with the CSV header at its start. A shard already that size is an
        interrupted run's, with the rows its finished tasks wrote: it is kept."""
        from .layout import CSV_HEADER, shard_name

        storage.refuse_links_on_the_way(self.tree_dir, split_dir, "the staged tree")
        folder = self._path(storage.join(self.tree_dir, split_dir))
        os.makedirs(folder, exist_ok=True)
        for k, size in enumerate(sizes):
            path = os.path.join(folder, shard_name(k))
            st = _lstat(path)
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == size:
                continue
            if st is not None and not stat.S_ISREG(st.st_mode):
                os.unlink(path)  # a link (or other) where a shard goes is replaced, never followed
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644), "wb") as f:
                f.write(CSV_HEADER)
                f.truncate(size)

    def shard_sizes(self, split_dir: str, num_files: int) -> list[int]:
        from .layout import shard_name

        folder = self._path(storage.join(self.tree_dir, split_dir))
        return [os.path.getsize(os.path.join(folder, shard_name(k))) for k in range(num_files)]

    def remove_shards(self, split_dir: str) -> None:
        """Drop a folder's shards written in place (its FASTA turned out to be out of order)."""
        path = self._path(storage.join(self.tree_dir, split_dir))
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def make_split_dirs(self, split_dirs) -> None:
        for d in split_dirs:
            self.fs.makedirs(self._path(storage.join(self.tree_dir, d)), exist_ok=True)

    def staged_files(self) -> dict[str, int]:
        """The finished tree in staging: size by path relative to OUT. Once the run has said
        which files it builds (:attr:`expected`), exactly those, each a plain file; before,
        what the tree holds, less temporary names."""
        if self.expected is None:
            return {rel: size for rel, size in list_output_files(self.tree_dir, self.storage_options).items()
                    if not rel.endswith(TMP_SUFFIX)}
        sizes = {}
        for rel in self.expected:
            path = self._path(storage.join(self.tree_dir, checked_name(rel, "the run's file list")))
            if self.local:
                st = _lstat(path)
                if st is None:
                    raise RuntimeError(f"{path}: the run built no such file")  # a defect, not bad input
                if not stat.S_ISREG(st.st_mode):
                    storage.refuse_links_on_the_way(self.tree_dir, rel, "the staged tree")
                sizes[rel] = st.st_size
            else:
                sizes[rel] = int(self.fs.info(path)["size"])
        return dict(sorted(sizes.items()))


    def stage_inputs(self, config) -> dict[str, dict]:
        """Copy the raw inputs into staging (object store to the same store: copied at the
        switch, server-side); returns what the manifest says about each."""
        record = storage.join(self.work_dir, "inputs.json")
        fs = self.fs
        wanted = dict((name, url) for url, name in input_copies(config))
        try:
            with fs.open(self._path(record), "r") as f:
                copies = json.load(f)  # placed by an earlier attempt of this run
        except (OSError, ValueError):
            copies = {}
        # read back from OUT: only the copies this run makes, of the inputs it names
        copies = {n: c for n, c in (copies.items() if isinstance(copies, dict) else ())
                  if n in wanted and isinstance(c, dict) and c.get("source") == wanted[n]
                  and isinstance(c.get("bytes"), int) and isinstance(c.get("how"), str)}
        copies.update({n: c for n, c in self.copied.items() if n in wanted})  # by copy-inputs
        for url, name in input_copies(config):
            if name in copies:
                continue
            src_fs, src = storage.get_fs(url, config.storage_options)
            size = int(src_fs.info(src)["size"])
            dest_url = storage.join(self.inputs_dir, name)
            # a local input into a local OUT: copied by the run's copy-inputs stage (above)
            if not self.local and type(src_fs) is type(fs) and src_fs.storage_options == fs.storage_options:
                how = "server-side copy"  # at the switch, straight from the input
            elif self.local:
                src_fs.get_file(src, storage.ensure_parent(dest_url))
                how = "download"
            else:
                with src_fs.open(src, "rb") as fin, fs.open(self._path(dest_url), "wb") as fout:
                    shutil.copyfileobj(fin, fout, 8 * 1024 * 1024)
                how = "upload"
            copies[name] = {"source": url, "bytes": size, "how": how}
            with storage.open_for_write(record, self.storage_options, "w") as f:
                json.dump(copies, f)
        return copies

    # ------------------------------------------------------------------ after a failure

    def remove(self) -> None:
        """Remove the staging folder (published, or not worth keeping)."""
        _remove_quietly(self.fs, self._path(self.root))

    def discard(self) -> None:
        """Remove the staging folder, and OUT itself when this run made it and it is empty."""
        self.remove()
        if self.created_output and self.local:
            self._remove_output_if_empty()

    def clean_up(self, outcome: FailureOutcome) -> None:
        """Leave what :func:`decide_failure` said a failed run leaves."""
        if outcome.remove_staging:
            self.remove()
        if outcome.remove_created_output:
            self._remove_output_if_empty()

    def _remove_output_if_empty(self) -> None:
        out = self._path(self.output_dir)
        try:
            if self.fs.exists(out) and not self.fs.ls(out, detail=False):
                self.fs.rmdir(out)
        except OSError:
            pass


class Publisher:
    """The switch of one staging folder's tree into OUT (see the module doc): the journal
    first, the previous files set aside in ``previous/``, the new ones put in place, the
    manifest last; undone from the journal when a step fails, and by the next run when the
    driver was killed half way."""

    def __init__(self, folder: StagingFolder):
        self.folder = folder
        self.output_dir = folder.output_dir
        self.storage_options = folder.storage_options
        self.fs = folder.fs
        self.local = folder.local
        self._path = folder._path

    def _out(self, rel: str) -> str:
        return self._path(storage.join(self.output_dir, rel))

    def publish(self, config, result, digests: dict[str, str], version: str) -> str:
        """Put the staged tree, the input copies and the manifest into OUT (see the module
        doc); returns the manifest's URL. Raises :class:`PublishError` after undoing a
        failed switch."""
        out = config.output_dir
        fs, out_path = storage.get_fs(out, self.storage_options)
        _refuse_foreign_files(config, fs, out_path)
        tree = self.folder.staged_files()
        copies = self.folder.stage_inputs(config)
        for name, entry in copies.items():  # hashed from the inputs by the run's checksum stage
            if name in digests:
                entry[CHECKSUM] = digests[name]
        previous = read_manifest(out, self.storage_options)
        manifest = build_manifest(config, result, self.folder.identities, tree, digests, copies, version)
        # the manifest first: from its move on, OUT is not to be trusted until the new one is there
        old = [MANIFEST_NAME] if fs.exists(self._out(MANIFEST_NAME)) else []
        # the run's log goes in with the tree (and the previous one is put back if that fails)
        at_root = [RunLog.NAME] if fs.exists(self._path(storage.join(self.folder.root, RunLog.NAME))) else []
        if at_root and fs.exists(self._out(RunLog.NAME)):
            old.append(RunLog.NAME)
        where = storage.join(out, MANIFEST_NAME)
        old += sorted(r for r in manifest_listed(previous, where) if fs.exists(self._out(r)))
        new = sorted(tree) + sorted(copies) + at_root
        journal = {"old": old, "new": new, "sources": {n: c["source"] for n, c in copies.items()},
                   "at_root": at_root}
        storage.refuse_links_in(self.folder.root, "the staging folder")
        for rel in old + new:
            storage.refuse_links_on_the_way(self.output_dir, rel, where)
        with storage.open_for_write(storage.join(self.folder.root, JOURNAL_NAME), self.storage_options, "w") as f:
            json.dump(journal, f)
        try:
            self._switch(journal, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        except BaseException as err:
            try:
                self._undo(journal)
            except Exception as undo_err:
                raise PublishError(
                    f"{out}: publishing failed ({reason(err)}) and putting the previous output "
                    f"back failed too ({reason(undo_err)}); its files are in "
                    f"{self.folder.previous_dir}, the new tree in {self.folder.tree_dir}; run the same command with --resume "
                    f"to finish"
                ) from None
            _remove_empty_dirs(out)  # folders the switch made for new files
            if not isinstance(err, Exception):
                raise
            raise PublishError(
                f"{out}: publishing failed ({reason(err)}); the previous output and its "
                f"manifest are unchanged; the converted tree and this run's log are kept in {self.folder.root}: run "
                f"the same command with --resume to publish it"
            ) from None
        self.folder.remove()
        _remove_empty_dirs(out)
        fs.invalidate_cache(out_path)
        return storage.join(out, MANIFEST_NAME)

    def _source(self, rel: str, journal: dict) -> str:
        """Where a new file comes from: the staged tree, staged inputs or (object store,
        same store) the input itself."""
        if rel in journal.get("at_root", ()):
            return self._path(storage.join(self.folder.root, rel))
        if rel in journal["sources"]:
            staged = storage.join(self.folder.inputs_dir, rel)
            if self.local or self.fs.exists(self._path(staged)):
                return self._path(staged)
            return self._path(journal["sources"][rel])
        return self._path(storage.join(self.folder.tree_dir, rel))

    def _switch(self, journal: dict, manifest_text: str) -> None:
        fs = self.fs
        old_only = [r for r in journal["old"] if r not in journal["new"] and r != MANIFEST_NAME]
        if self.local:
            for rel in journal["old"]:
                _move(self._out(rel), self._path(storage.join(self.folder.previous_dir, rel)))
            for rel in journal["new"]:
                _move(self._source(rel, journal), self._out(rel))
        else:
            if journal["old"]:
                fs.copy([self._out(r) for r in journal["old"]],
                        [self._path(storage.join(self.folder.previous_dir, r)) for r in journal["old"]])
            if MANIFEST_NAME in journal["old"]:
                fs.rm(self._out(MANIFEST_NAME))
            fs.copy([self._source(r, journal) for r in journal["new"]], [self._out(r) for r in journal["new"]])
            for rel in old_only:
                fs.rm(self._out(rel))
        write_manifest_file(storage.join(self.output_dir, MANIFEST_NAME), manifest_text, self.storage_options,
                            tmp_dir=self.folder.root)

    def _undo(self, journal: dict) -> None:
        """Put OUT back as the journal found it; safe to repeat (each step checks first)."""
        fs = self.fs
        fs.invalidate_cache(self._path(self.output_dir))
        if self.local:
            manifest = self._out(MANIFEST_NAME)
            if MANIFEST_NAME not in journal["old"] and os.path.exists(manifest):
                os.unlink(manifest)  # written by this run
            for rel in reversed(journal["new"]):
                src = self._source(rel, journal)
                if not os.path.exists(src) and os.path.exists(self._out(rel)):
                    _move(self._out(rel), src)
            for rel in journal["old"]:
                kept = self._path(storage.join(self.folder.previous_dir, rel))
                if os.path.exists(kept):
                    _move(kept, self._out(rel))
        else:
            for rel in [*journal["new"], MANIFEST_NAME]:
                if rel not in journal["old"] and fs.exists(self._out(rel)):
                    fs.rm(self._out(rel))
            kept = [r for r in journal["old"] if fs.exists(self._path(storage.join(self.folder.previous_dir, r)))]
            if kept:
                fs.copy([self._path(storage.join(self.folder.previous_dir, r)) for r in kept], [self._out(r) for r in kept])
            _remove_quietly(fs, self._path(self.folder.previous_dir))
        _remove_quietly(fs, self._path(storage.join(self.folder.root, JOURNAL_NAME)))

    def recover(self) -> None:
        """Undo the half switch of a driver killed while publishing (its journal is there).

        Every name in the journal is checked first (a plain relative path; no link on the
        way in OUT, none in the staging folder): a bad one is an error and nothing moves."""
        where = storage.join(self.folder.root, JOURNAL_NAME)
        path = self._path(where)
        # not a folder (a link named like one is never followed), or no journal: nothing to undo
        if not storage.is_plain_folder(self.folder.root) or not storage.exists(where, self.storage_options):
            return
        storage.refuse_links_in(self.folder.root, "the staging folder of a half-done switch")
        try:
            with self.fs.open(path, "r") as f:
                journal = json.load(f)
        except (OSError, ValueError):
            journal = None
        if (not isinstance(journal, dict) or not isinstance(journal.get("old"), list)
                or not isinstance(journal.get("new"), list) or not isinstance(journal.get("sources", {}), dict)
                or not isinstance(journal.get("at_root", []), list)):
            raise OutputError(f"{where}: not a journal esm2dask wrote; nothing was moved: move OUT's files back "
                              f"from {self.folder.previous_dir} by hand, or remove the staging folder")
        journal = {"old": [checked_name(r, where) for r in journal["old"]],
                   "new": [checked_name(r, where) for r in journal["new"]],
                   "sources": {checked_name(k, where): str(v) for k, v in journal.get("sources", {}).items()},
                   "at_root": [r for r in journal.get("at_root", []) if r == RunLog.NAME]}
        for rel in journal["old"] + journal["new"]:
            storage.refuse_links_on_the_way(self.output_dir, rel, where)
        self._undo(journal)


# ----------------------------------------------------------------------------- what a failure leaves


@dataclass(frozen=True)
class FailedRun:
    """What :func:`decide_failure` is told of a run that stopped (read before, never by it)."""

    output_dir: str
    staging_root: str
    log_url: str  # where the run's log stays (an unforeseen failure's traceback is in it)
    finished_tasks: int = 0  # the receipts an interrupted run leaves (counted for an interrupt)
    created_output: bool = False  # this run made OUT, a local folder


@dataclass(frozen=True)
class FailureOutcome:
    """What a failed run leaves and says: :meth:`StagingFolder.clean_up` acts on the first
    two, the run's log on the next two; then ``notice`` is printed and the error raised."""

    remove_staging: bool
    remove_created_output: bool
    keep_log: bool  # the run's log stays in the staging folder (else it is closed, not uploaded)
    log_traceback: bool  # the traceback goes to the log, never the terminal
    notice: str | None = None  # one line said before the error goes on
    raise_as: type[Esm2DaskError] | None = None  # None: the error itself goes on
    message: str = ""


def decide_failure(err: BaseException, run: FailedRun) -> FailureOutcome:
    """What a run that stopped on ``err`` leaves and says (no I/O).

    Bad input or options: the staging folder is removed (nothing is left behind). A full
    output file system: the same, with one clear line. An interruption (Ctrl-C, a signal):
    the finished part is kept for ``--resume``. A failed switch: the previous output is
    back, the staging folder kept. Anything else is reported as the failure it is; its
    finished part is kept, since the cause may be passing (a lost connection).

    >>> run = FailedRun("out", "out/.esm2dask-staging-1", "out/.esm2dask-staging-1/esm2dask.log", 7)
    >>> decide_failure(KeyboardInterrupt(), run).message
    '7 finished task(s) kept in out/.esm2dask-staging-1; run the same command with --resume to finish'
    >>> decide_failure(OutputError("out: bad"), run).remove_staging
    True
    """
    ours = isinstance(err, Esm2DaskError)
    logged = {"keep_log": not ours, "log_traceback": isinstance(err, Exception) and not ours}
    kept = FailureOutcome(remove_staging=False, remove_created_output=False, **logged)
    if isinstance(err, (PublishError, StaleStaging)):
        return kept
    removed = FailureOutcome(remove_staging=True, remove_created_output=run.created_output, **logged)
    if ours:
        return removed
    out, root = run.output_dir, run.staging_root
    if storage.is_no_space(err):
        # a copy's error names its source first: the file being written is the second name
        written = getattr(err, "filename2", None) or getattr(err, "filename", None)
        where = f" (writing {written})" if written else f" (writing in {root})"
        return replace(removed, raise_as=OutputError, message=(
            f"{out}: no space left on the output file system{where}; nothing was published "
            f"and the previous output is unchanged; free space (a run needs about twice its output "
            f"size there while it runs) and run again"
        ))
    if isinstance(err, KeyboardInterrupt):
        return replace(kept, raise_as=Interrupted, message=(
            f"{run.finished_tasks} finished task(s) kept in {root}; run the same command with --resume to finish"
        ))
    if not isinstance(err, Exception):
        return replace(kept, notice=(
            f"interrupted; the finished part is kept in {root}: run the same command with --resume to finish it"
        ))
    kept_part = f"the finished part is kept in {root}: once the cause is fixed, --resume continues"
    if isinstance(err, OSError):  # an I/O failure: one line, in words
        return replace(kept, raise_as=OutputError,
                       message=f"{out}: {describe_os_error(err)}; nothing was published; {kept_part}")
    if type(err).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs"):
        return replace(kept, raise_as=OutputError, message=(
            f"{out}: object storage request failed ({reason(err)}); nothing was published; {kept_part}"
        ))
    return replace(kept, raise_as=UnexpectedError, message=(
        f"{out}: the run failed ({reason(err)}); nothing was published; {kept_part}; the traceback is in {run.log_url}"
    ))


def _move(src: str, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    os.replace(src, dest)


def _remove_quietly(fs, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except OSError:
        pass


def _remove_empty_dirs(out: str) -> None:
    """Folders under the layouts' top folders emptied by the switch (never a file)."""
    for top in TOP_DIRS:
        storage.remove_empty_folders(storage.join(out, top))


def _refuse_foreign_files(config, fs, out_path: str) -> None:
    """Refuse to start when publishing would replace or remove a file no manifest lists,
    or a file the manifest lists lies behind a link (local)."""
    where = storage.join(config.output_dir, MANIFEST_NAME)
    listed = manifest_listed(read_manifest(config.output_dir, config.storage_options), where)
    for rel in (*TOP_DIRS, *sorted(listed)):
        storage.refuse_links_on_the_way(config.output_dir, rel, where)
    present = set(list_output_files(config.output_dir, config.storage_options))
    for _, name in input_copies(config):
        if fs.exists(storage.join(out_path, name)):
            present.add(name)
    foreign = sorted(present - listed)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(
            f"{config.output_dir}: {shown}: not written by esm2dask (its manifest does not list "
            f"{'them' if len(foreign) > 1 else 'it'}); esm2dask never replaces or removes such files: move "
            f"{'them' if len(foreign) > 1 else 'it'} away, or choose another --output-dir"
        )


def build_manifest(config, result, identities: dict, tree: dict[str, int], digests: dict[str, str],
                   copies: dict[str, dict], version: str) -> dict:
    """``esm2dask-manifest.json``: inputs, parameters, rows, every file with its size and
    SHA-256, the input copies, timings. No storage option (credentials) is ever in it."""
    params = options_where(config, MANIFEST)
    return {
        "tool": "esm2dask",
        "version": version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": identities,
        "parameters": params,
        "outputs": {
            d: {"rows": result.rows[d], "bytes": result.bytes[d], "files": config.num_csv_files}
            for d in result.rows
        },
        "checksum": CHECKSUM,
        "files": {rel: {"bytes": size, CHECKSUM: digests[rel]} for rel, size in tree.items()},
        "copied_inputs": copies,
        "streams": {name: asdict(rep) for name, rep in result.streams.items()},
        "wall_seconds": round(result.wall_seconds, 3),
        "input_bytes": result.input_bytes,
        "mb_per_s": round(result.mb_per_s, 1),
        "stage_seconds": {k: round(v, 3) for k, v in result.stage_seconds.items()},
        "layouts": result.layouts,
    }


def write_manifest_file(url: str, text: str, storage_options: dict, tmp_dir: str | None = None) -> None:
    """The last write of a run: a rename on a file system, one PUT on an object store
    (which appears whole or not at all)."""
    storage.write_whole(url, [text.encode()], storage_options, tmp_dir=tmp_dir)
