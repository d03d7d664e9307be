"""Staging, resuming, publishing and the manifest: a run's life cycle in OUT.

A run builds everything under ``OUT/.esm2dask-staging-<token>/``: ``work/`` (pieces,
intermediate Arrow files, task receipts as JSON, ``plan.json``), ``tree/`` (the finished
``uf50/`` and ``uf90/``), ``inputs/`` (the copies of the raw inputs). OUT itself is not
touched until everything is built, checksummed and the manifest is ready. Then the
*switch*:

1. a journal (``switch.json``) records which files leave and which arrive;
2. the previous manifest and every file it lists are set aside in ``previous/`` (a rename
   on a file system, a server-side copy on an object store);
3. the new files are put in place (renames; server-side copies), files only the previous
   tree had are removed;
4. the new manifest is written, last, in one rename or one PUT.

If any step fails, the previous files are put back from ``previous/`` and the converted
tree back into staging: OUT holds the previous tree and its manifest, unchanged, and
``--resume`` publishes the new one. A driver killed during the switch leaves the journal;
the next ``--resume`` undoes the half switch first.

Files that no manifest lists (a user's notes in ``uf50/train/``, a folder written by
something else) are never removed or replaced: the run refuses before it starts.

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
from dataclasses import asdict

import numpy as np

from . import storage
from .config import RAW_README
from .errors import Esm2DaskError, OutputError
from .layout import MANIFEST_NAME, STAGING_PREFIX, TOP_DIRS

PLAN_NAME = "plan.json"
JOURNAL_NAME = "switch.json"
CHECKSUM = "sha256"


class PublishError(OutputError):
    """The switch into OUT failed; the previous output is back and the staging folder is kept."""


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def run_plan(config, identities: dict[str, dict]) -> dict:
    """What a resumed run must share with the run it resumes (JSON-normalised)."""
    params = asdict(config)
    for key in ("cluster", "overwrite", "resume", "storage_options", "copy_inputs", "link_inputs"):
        params.pop(key, None)
    return json.loads(json.dumps({"parameters": params, "inputs": identities}, sort_keys=True))


def describe_plan_change(old: dict | None, new: dict) -> str:
    """What differs between a staged plan and this run's, in the words of the options."""
    if not isinstance(old, dict) or "parameters" not in old or "inputs" not in old:
        return "its plan.json is missing or unreadable"
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


def manifest_listed(manifest: dict | None) -> set[str]:
    """Paths relative to OUT that a manifest says esm2dask wrote (tree and input copies)."""
    if not manifest:
        return set()
    return set(manifest.get("files") or {}) | set(manifest.get("copied_inputs") or {})


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


def input_copies(config) -> list[tuple[str, str]]:
    """(source URL, name in OUT) of each raw input this run copies beside the tree."""
    if not config.copy_inputs:
        return []
    inputs = [config.uf50, config.uf90, config.mapping, config.val, config.test]
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


class Staging:
    """The hidden folder (or prefix) one run writes into before publishing."""

    def __init__(self, output_dir: str, token: str, storage_options: dict, created_output: bool,
                 resumed: bool = False):
        self.output_dir = output_dir
        self.token = token
        self.so = storage_options
        self.created_output = created_output
        self.resumed = resumed
        self.local = storage.is_local(output_dir)
        self.root = storage.join(output_dir, f"{STAGING_PREFIX}-{token}")
        self.work_dir = storage.join(self.root, "work")
        self.tree_dir = storage.join(self.root, "tree")
        self.inputs_dir = storage.join(self.root, "inputs")
        self.previous_dir = storage.join(self.root, "previous")
        self.fs, _ = storage.get_fs(output_dir, storage_options)
        self.identities: dict[str, dict] = {}

    # ------------------------------------------------------------------ starting a run

    @classmethod
    def create(cls, config, inputs: dict[str, int]) -> "Staging":
        """A new staging folder, or the one ``--resume`` continues; refuses what would lose data."""
        out = config.output_dir
        so = config.storage_options
        fs, out_path = storage.get_fs(out, so)
        if storage.is_local(out) and storage.is_local(config.raw_dir):
            if _inside(storage.local_path(out), storage.local_path(config.raw_dir)):
                raise OutputError(
                    f"{out}: the output folder may not be the input folder or inside it "
                    f"(esm2dask never writes into {config.raw_dir}); choose another --output-dir"
                )
        try:
            fs.invalidate_cache(out_path)
            listing = fs.ls(out_path, detail=False) if fs.exists(out_path) else []
        except (PermissionError, OSError) as err:
            raise OutputError(f"{out}: cannot read the output location ({err.__class__.__name__}: {err})") from None
        names = [_name(p) for p in listing]
        stagings = sorted(n for n in names if n.startswith(STAGING_PREFIX))
        existing = [n for n in names if not n.startswith(STAGING_PREFIX)]
        identities = {url: storage.input_identity(url, so) for url in inputs}
        plan = run_plan(config, identities)

        chosen = cls._resumable(config, stagings, plan) if config.resume else None
        if chosen is None and existing and not config.overwrite:
            raise OutputError(
                f"{out}: output folder exists and is not empty; pass --overwrite to replace "
                f"its uf50/ and uf90/ (or --resume to finish an interrupted run)"
            )
        if chosen is not None:
            chosen.recover()  # a driver killed while publishing left a half switch
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
        staging = cls(out, token, so, created)
        staging.identities = identities
        try:
            fs.makedirs(staging._path(staging.work_dir), exist_ok=True)
            with storage.open_for_write(storage.join(staging.work_dir, PLAN_NAME), so, "w") as f:
                json.dump(plan, f, sort_keys=True)
        except (PermissionError, OSError) as err:
            staging.discard()
            if storage.is_no_space(err):
                raise OutputError(f"{out}: no space left on the output file system") from None
            raise OutputError(f"{out}: cannot write the output folder ({err.__class__.__name__}: {err})") from None
        return staging

    @classmethod
    def _resumable(cls, config, stagings: list[str], plan: dict) -> "Staging | None":
        """The newest staging folder staged with ``plan``; None (with ``--overwrite``) or a
        refusal that says why when there is none."""
        out = config.output_dir
        candidates = [cls(out, n[len(STAGING_PREFIX) + 1 :], config.storage_options, False, resumed=True)
                      for n in reversed(stagings)]
        chosen = next((c for c in candidates if c.read_plan() == plan), None)
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
        return storage.get_fs(url, self.so)[1]

    def _out(self, rel: str) -> str:
        return self._path(storage.join(self.output_dir, rel))

    def read_plan(self) -> dict | None:
        try:
            with self.fs.open(self._path(storage.join(self.work_dir, PLAN_NAME)), "r") as f:
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
        with storage.open_for_write(storage.join(self.work_dir, "receipts", name), self.so) as f:
            f.write(b"done\n")

    def write_labels(self, labels: np.ndarray) -> str:
        url = storage.join(self.work_dir, "labels.npy")
        with storage.open_for_write(url, self.so) as f:
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

    def make_split_dirs(self, split_dirs) -> None:
        for d in split_dirs:
            self.fs.makedirs(self._path(storage.join(self.tree_dir, d)), exist_ok=True)

    def staged_files(self) -> dict[str, int]:
        """The finished tree in staging: size by path relative to OUT."""
        return list_output_files(self.tree_dir, self.so)

    # ------------------------------------------------------------------ publishing

    def publish(self, config, result, digests: dict[str, str], version: str) -> str:
        """Put the staged tree, the input copies and the manifest into OUT (see the module
        doc); returns the manifest's URL. Raises :class:`PublishError` after undoing a
        failed switch."""
        out = config.output_dir
        fs, out_path = storage.get_fs(out, self.so)
        _refuse_foreign_files(config, fs, out_path)
        tree = self.staged_files()
        copies = self._stage_inputs(config)
        for name, entry in copies.items():  # hashed from the inputs by the run's checksum stage
            if name in digests:
                entry[CHECKSUM] = digests[name]
        previous = read_manifest(out, self.so)
        manifest = build_manifest(config, result, self.identities, tree, digests, copies, version)
        # the manifest first: from its move on, OUT is not to be trusted until the new one is there
        old = [MANIFEST_NAME] if fs.exists(self._out(MANIFEST_NAME)) else []
        old += sorted(r for r in manifest_listed(previous) if fs.exists(self._out(r)))
        new = sorted(tree) + sorted(copies)
        journal = {"old": old, "new": new, "sources": {n: c["source"] for n, c in copies.items()}}
        with storage.open_for_write(storage.join(self.root, JOURNAL_NAME), self.so, "w") as f:
            json.dump(journal, f)
        try:
            self._switch(journal, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        except BaseException as err:
            try:
                self._undo(journal)
            except Exception as undo_err:
                raise PublishError(
                    f"{out}: publishing failed ({type(err).__name__}: {err}) and putting the previous output "
                    f"back failed too ({type(undo_err).__name__}: {undo_err}); its files are in "
                    f"{self.previous_dir}, the new tree in {self.tree_dir}; run the same command with --resume "
                    f"to finish"
                ) from None
            if not isinstance(err, Exception):
                raise
            raise PublishError(
                f"{out}: publishing failed ({type(err).__name__}: {_short(err)}); the previous output and its "
                f"manifest are unchanged; the converted tree is kept in {self.root}: run the same command "
                f"with --resume to publish it"
            ) from None
        _remove_quietly(self.fs, self._path(self.root))
        if self.local:
            _remove_empty_dirs(storage.local_path(out_path))
        fs.invalidate_cache(out_path)
        return storage.join(out, MANIFEST_NAME)

    def _source(self, rel: str, journal: dict) -> str:
        """Where a new file comes from: the staged tree, staged inputs or (object store,
        same store) the input itself."""
        if rel in journal["sources"]:
            staged = storage.join(self.inputs_dir, rel)
            if self.local or self.fs.exists(self._path(staged)):
                return self._path(staged)
            return self._path(journal["sources"][rel])
        return self._path(storage.join(self.tree_dir, rel))

    def _switch(self, journal: dict, manifest_text: str) -> None:
        fs = self.fs
        old_only = [r for r in journal["old"] if r not in journal["new"] and r != MANIFEST_NAME]
        if self.local:
            for rel in journal["old"]:
                _move(self._out(rel), self._path(storage.join(self.previous_dir, rel)))
            for rel in journal["new"]:
                _move(self._source(rel, journal), self._out(rel))
        else:
            if journal["old"]:
                fs.copy([self._out(r) for r in journal["old"]],
                        [self._path(storage.join(self.previous_dir, r)) for r in journal["old"]])
            if MANIFEST_NAME in journal["old"]:
                fs.rm(self._out(MANIFEST_NAME))
            fs.copy([self._source(r, journal) for r in journal["new"]], [self._out(r) for r in journal["new"]])
            for rel in old_only:
                fs.rm(self._out(rel))
        write_manifest_file(storage.join(self.output_dir, MANIFEST_NAME), manifest_text, self.so,
                            tmp_dir=self.root if self.local else None)

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
                kept = self._path(storage.join(self.previous_dir, rel))
                if os.path.exists(kept):
                    _move(kept, self._out(rel))
        else:
            for rel in [*journal["new"], MANIFEST_NAME]:
                if rel not in journal["old"] and fs.exists(self._out(rel)):
                    fs.rm(self._out(rel))
            kept = [r for r in journal["old"] if fs.exists(self._path(storage.join(self.previous_dir, r)))]
            if kept:
                fs.copy([self._path(storage.join(self.previous_dir, r)) for r in kept], [self._out(r) for r in kept])
            _remove_quietly(fs, self._path(self.previous_dir))
        _remove_quietly(fs, self._path(storage.join(self.root, JOURNAL_NAME)))

    def recover(self) -> None:
        """Undo the half switch of a driver killed while publishing (its journal is there)."""
        path = self._path(storage.join(self.root, JOURNAL_NAME))
        if not self.fs.exists(path):
            return
        with self.fs.open(path, "r") as f:
            journal = json.load(f)
        self._undo(journal)

    def _stage_inputs(self, config) -> dict[str, dict]:
        """Copy the raw inputs into staging (object store to the same store: copied at the
        switch, server-side); returns what the manifest says about each."""
        record = storage.join(self.work_dir, "inputs.json")
        fs = self.fs
        try:
            with fs.open(self._path(record), "r") as f:
                copies = json.load(f)  # placed by an earlier attempt of this run
        except (OSError, ValueError):
            copies = {}
        for url, name in input_copies(config):
            if name in copies:
                continue
            src_fs, src = storage.get_fs(url, config.storage_options)
            size = int(src_fs.info(src)["size"])
            dest_url = storage.join(self.inputs_dir, name)
            if storage.is_local(url) and self.local:
                dest = storage.local_path(dest_url)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                if os.path.exists(dest):
                    os.unlink(dest)
                how = storage.place_copy(storage.local_path(src), dest, hard_link=config.link_inputs)
            elif not self.local and type(src_fs) is type(fs) and src_fs.storage_options == fs.storage_options:
                how = "server-side copy"  # at the switch, straight from the input
            elif self.local:
                os.makedirs(os.path.dirname(storage.local_path(dest_url)), exist_ok=True)
                src_fs.get_file(src, storage.local_path(dest_url))
                how = "download"
            else:
                with src_fs.open(src, "rb") as fin, fs.open(self._path(dest_url), "wb") as fout:
                    shutil.copyfileobj(fin, fout, 8 * 1024 * 1024)
                how = "upload"
            copies[name] = {"source": url, "bytes": size, "how": how}
            with storage.open_for_write(record, self.so, "w") as f:
                json.dump(copies, f)
        return copies

    # ------------------------------------------------------------------ failures

    def failed(self, err: BaseException, reporter) -> BaseException:
        """Clean up after ``err`` as what it is; returns the exception to raise.

        Bad input or options: the staging folder is removed (nothing is left behind). A full
        output file system: the same, with one clear line. An interruption (Ctrl-C, a signal):
        the finished part is kept for ``--resume``. A failed switch: the previous output is
        back, the staging folder kept. Anything else is reported as the failure it is; its
        finished part is kept, since the cause may be passing (a lost connection).
        """
        if isinstance(err, PublishError):
            return err
        if isinstance(err, Esm2DaskError):
            self.discard()
            return err
        if storage.is_no_space(err):
            self.discard()
            where = f" (writing {err.filename})" if getattr(err, "filename", None) else ""
            return OutputError(
                f"{self.output_dir}: no space left on the output file system{where}; nothing was published "
                f"and the previous output is unchanged; free space (a run needs about twice its output "
                f"size there while it runs) and run again"
            )
        if not isinstance(err, Exception):
            reporter.message(
                f"interrupted; the finished part is kept in {self.root}: run the same command with "
                f"--resume to finish it"
            )
            return err
        kept = f"the finished part is kept in {self.root}: once the cause is fixed, --resume continues"
        if isinstance(err, OSError):  # an I/O failure: one line
            return OutputError(f"{self.output_dir}: {type(err).__name__}: {_short(err)}; nothing was published; {kept}")
        reporter.message(f"failed: {type(err).__name__}: {_short(err)}; nothing was published; {kept}")
        return err

    def discard(self) -> None:
        _remove_quietly(self.fs, self._path(self.root))
        if self.created_output and self.local:
            out = self._path(self.output_dir)
            try:
                if self.fs.exists(out) and not self.fs.ls(out, detail=False):
                    self.fs.rmdir(out)
            except OSError:
                pass


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


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
        for root, _, _ in sorted(os.walk(os.path.join(out, top)), key=lambda w: -len(w[0])):
            try:
                os.rmdir(root)
            except OSError:
                pass


def _refuse_foreign_files(config, fs, out_path: str) -> None:
    """Refuse to start when publishing would replace or remove a file no manifest lists."""
    listed = manifest_listed(read_manifest(config.output_dir, config.storage_options))
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
    params = asdict(config)
    params.pop("storage_options", None)
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
    fs, path = storage.get_fs(url, storage_options)
    if storage.is_local(url):
        tmp = os.path.join(storage.local_path(tmp_dir or os.path.dirname(path)), MANIFEST_NAME + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    else:
        with fs.open(path, "w") as f:
            f.write(text)
