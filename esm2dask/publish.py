"""Staging, publishing, resuming and the manifest.

On a file system a run builds everything in ``OUT/.esm2dask-staging-<token>/`` (``work/``
for pieces, intermediate Arrow files and task receipts; ``tree/`` for the finished
``uf50/`` and ``uf90/``), then moves the finished folders into OUT with one rename each.

Object stores have no rename. There the staging prefix holds only the work files, the
shards are assembled straight into ``OUT/uf50/…`` and ``OUT/uf90/…``, and the manifest,
which lists every file with its size, is deleted first and written last: a reader (and
``esm2dask verify``) trusts a tree on an object store only when its manifest is there
and matches.

``--resume`` picks up the newest staging folder whose plan (parameters and input sizes)
matches the current one; tasks whose receipts are there are not run again.
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
from .errors import OutputError
from .layout import MANIFEST_NAME, STAGING_PREFIX, TOP_DIRS

PLAN_NAME = "plan.json"


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def run_plan(config, inputs: dict[str, int]) -> dict:
    """What a resumed run must share with the run it resumes."""
    params = asdict(config)
    for key in ("cluster", "overwrite", "resume", "storage_options", "copy_inputs"):
        params.pop(key, None)
    return json.loads(json.dumps({"parameters": params, "inputs": inputs}))  # as read back (tuples → lists)


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
        self.tree_dir = storage.join(self.root, "tree") if self.local else output_dir
        self.fs, _ = storage.get_fs(output_dir, storage_options)

    @classmethod
    def create(cls, config, inputs: dict[str, int]) -> "Staging":
        out = config.output_dir
        fs, out_path = storage.get_fs(out, config.storage_options)
        if storage.is_local(out) and storage.is_local(config.raw_dir):
            if _inside(storage.local_path(out), storage.local_path(config.raw_dir)):
                raise OutputError(
                    f"{out}: the output folder may not be the input folder or inside it "
                    f"(esm2dask never writes into {config.raw_dir}); choose another --output-dir"
                )
        try:
            listing = fs.ls(out_path, detail=False) if fs.exists(out_path) else []
        except (PermissionError, OSError) as err:
            raise OutputError(f"{out}: cannot read the output location ({err.__class__.__name__}: {err})") from None
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in listing]
        stagings = sorted(n for n in names if n.startswith(STAGING_PREFIX))
        existing = [n for n in names if not n.startswith(STAGING_PREFIX)]
        plan = run_plan(config, inputs)
        if config.resume:
            for name in reversed(stagings):
                candidate = cls(out, name[len(STAGING_PREFIX) + 1 :], config.storage_options, False, resumed=True)
                if candidate.read_plan() == plan:
                    return candidate
        if existing and not (config.overwrite or config.resume):
            raise OutputError(
                f"{out}: output folder exists and is not empty; pass --overwrite to replace "
                f"its uf50/ and uf90/ (or --resume to finish an interrupted run)"
            )
        created = not listing and not fs.exists(out_path)
        token = _dt.datetime.now().strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)
        staging = cls(out, token, config.storage_options, created)
        try:
            fs.makedirs(staging._path(staging.work_dir), exist_ok=True)
            with storage.open_for_write(storage.join(staging.work_dir, PLAN_NAME), config.storage_options, "w") as f:
                json.dump(plan, f, sort_keys=True)
        except (PermissionError, OSError) as err:
            if created:
                _remove_quietly(fs, out_path)
            raise OutputError(f"{out}: cannot write the output folder ({err.__class__.__name__}: {err})") from None
        if not staging.local:
            # a reader must not trust an older tree while this run rewrites it
            for name in (MANIFEST_NAME, *TOP_DIRS):
                _remove_quietly(fs, staging._path(storage.join(out, name)))
        return staging

    def _path(self, url: str) -> str:
        return storage.get_fs(url, self.so)[1]

    def read_plan(self) -> dict | None:
        try:
            with self.fs.open(self._path(storage.join(self.work_dir, PLAN_NAME)), "r") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None

    def receipt_url(self, stage: str, index: int) -> str:
        return storage.join(self.work_dir, "receipts", stage, f"{index:05d}.pkl")

    def receipts_present(self, stage: str) -> set[str]:
        path = self._path(storage.join(self.work_dir, "receipts", stage))
        if not self.resumed or not self.fs.exists(path):
            return set()
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)}

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
                if p.rstrip("/").rsplit("/", 1)[-1].isdigit():
                    self.fs.rm(p, recursive=True)

    def make_split_dirs(self, split_dirs) -> None:
        for d in split_dirs:
            self.fs.makedirs(self._path(storage.join(self.tree_dir, d)), exist_ok=True)

    def publish(self, config) -> None:
        """Move ``uf50/`` and ``uf90/`` into OUT (on a file system), copy the raw inputs."""
        out = self._path(self.output_dir)
        if self.local:
            for top in (*TOP_DIRS, MANIFEST_NAME):
                target = storage.join(out, top)
                if self.fs.exists(target):
                    self.fs.rm(target, recursive=True)
            for top in TOP_DIRS:
                staged = self._path(storage.join(self.tree_dir, top))
                if os.path.exists(staged):  # a layout --format did not ask for is not there
                    os.replace(staged, storage.join(out, top))
        if config.copy_inputs:
            self._copy_inputs(config)
        _remove_quietly(self.fs, self._path(self.root))

    def _copy_inputs(self, config) -> None:
        raw_readme = storage.join(config.raw_dir, RAW_README)
        candidates = [config.uf50, config.uf90, config.mapping, config.val, config.test, raw_readme]
        seen: set[str] = set()
        for url in dict.fromkeys(candidates):
            name = url.rstrip("/").rsplit("/", 1)[-1]
            if name in seen:
                continue
            src_fs, src = storage.get_fs(url, config.storage_options)
            if not src_fs.exists(src):
                continue
            seen.add(name)
            dest_url = storage.join(self.output_dir, name)
            dest = self._path(dest_url)
            if storage.is_local(url) and self.local:
                src, dest = storage.local_path(src), storage.local_path(dest)
                if os.path.exists(dest):
                    if os.path.samefile(src, dest):
                        continue
                    os.unlink(dest)
                try:
                    os.link(src, dest)
                except OSError:
                    shutil.copyfile(src, dest)
            elif type(src_fs) is type(self.fs):
                self.fs.copy(src, dest)  # server-side on an object store
            else:
                with src_fs.open(src, "rb") as fin, self.fs.open(dest, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 8 * 1024 * 1024)

    def discard(self) -> None:
        _remove_quietly(self.fs, self._path(self.root))
        if self.created_output and self.local:
            out = self._path(self.output_dir)
            try:
                if self.fs.exists(out) and not self.fs.ls(out, detail=False):
                    self.fs.rmdir(out)
            except OSError:
                pass


def _remove_quietly(fs, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except OSError:
        pass


def list_output_files(output_dir: str, storage_options: dict) -> dict[str, int]:
    """Every file of every layout (the folders of ``TOP_DIRS``) with its size, by path relative to OUT."""
    fs, root = storage.get_fs(output_dir, storage_options)
    files = {}
    for top in TOP_DIRS:
        base = storage.join(root, top)
        if fs.exists(base):
            for path, info in fs.find(base, detail=True).items():
                files[path[len(root.rstrip("/")) + 1 :]] = int(info["size"])
    return dict(sorted(files.items()))


def write_manifest(config, result, inputs: dict[str, int], version: str) -> str:
    """``OUT/esm2dask-manifest.json``: inputs, parameters, rows, bytes, files, timings. Last."""
    params = asdict(config)
    params.pop("storage_options", None)
    manifest = {
        "tool": "esm2dask",
        "version": version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": {url: {"bytes": size} for url, size in inputs.items()},
        "parameters": params,
        "outputs": {
            d: {"rows": result.rows[d], "bytes": result.bytes[d], "files": config.num_csv_files}
            for d in result.rows
        },
        "files": list_output_files(config.output_dir, config.storage_options),
        "streams": {name: asdict(rep) for name, rep in result.streams.items()},
        "wall_seconds": round(result.wall_seconds, 3),
        "input_bytes": result.input_bytes,
        "mb_per_s": round(result.mb_per_s, 1),
        "stage_seconds": {k: round(v, 3) for k, v in result.stage_seconds.items()},
        "layouts": result.layouts,
    }
    url = storage.join(config.output_dir, MANIFEST_NAME)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    fs, path = storage.get_fs(url, config.storage_options)
    if storage.is_local(url):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    else:
        with fs.open(path, "w") as f:  # one PUT: appears whole or not at all
            f.write(text)
    return url
