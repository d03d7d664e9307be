"""Staging, publishing and the manifest.

A run builds everything in ``OUT/.esm2dask-staging-<token>/`` (``work/`` for pieces and
intermediate Arrow files, ``tree/`` for the finished ``uf50/`` and ``uf90/``), then moves
the finished folders into OUT with one rename each and writes the manifest last. A failed
run removes its staging folder; OUT never holds a partial ``uf50/`` or ``uf90/``.
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
from .errors import OutputError
from .layout import MANIFEST_NAME, STAGING_PREFIX, TOP_DIRS
from .config import RAW_README


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip("/") + "/")


class Staging:
    """The hidden folder one run writes into before publishing."""

    def __init__(self, output_dir: str, token: str, storage_options: dict, created_output: bool):
        self.output_dir = output_dir
        self.token = token
        self.so = storage_options
        self.created_output = created_output
        self.root = storage.join(output_dir, f"{STAGING_PREFIX}-{token}")
        self.work_dir = storage.join(self.root, "work")
        self.tree_dir = storage.join(self.root, "tree")
        self.fs, _ = storage.get_fs(output_dir, storage_options)

    @classmethod
    def create(cls, config) -> "Staging":
        out = config.output_dir
        fs, out_path = storage.get_fs(out, config.storage_options)
        if storage.is_local(out) and storage.is_local(config.raw_dir):
            if _inside(storage.local_path(out), storage.local_path(config.raw_dir)):
                raise OutputError(
                    f"{out}: the output folder may not be the input folder or inside it "
                    f"(esm2dask never writes into {config.raw_dir}); choose another --output-dir"
                )
        existing = fs.exists(out_path) and [
            p for p in fs.ls(out_path, detail=False) if not os.path.basename(p).startswith(STAGING_PREFIX)
        ]
        if existing and not (config.overwrite or config.resume):
            raise OutputError(
                f"{out}: output folder exists and is not empty; pass --overwrite to replace "
                f"its uf50/ and uf90/"
            )
        created = not fs.exists(out_path)
        token = _dt.datetime.now().strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)
        staging = cls(out, token, config.storage_options, created)
        try:
            fs.makedirs(storage.get_fs(staging.work_dir, config.storage_options)[1], exist_ok=True)
            probe = storage.join(staging.root, ".write-test")
            with fs.open(storage.get_fs(probe, config.storage_options)[1], "wb") as f:
                f.write(b"ok")
        except (PermissionError, OSError) as err:
            if created:
                _remove_quietly(fs, out_path)
            raise OutputError(f"{out}: cannot write the output folder ({err.__class__.__name__}: {err})") from None
        return staging

    def _path(self, url: str) -> str:
        return storage.get_fs(url, self.so)[1]

    def write_labels(self, labels: np.ndarray) -> str:
        url = storage.join(self.work_dir, "labels.npy")
        with self.fs.open(self._path(url), "wb") as f:
            np.save(f, labels)
        return url

    def remove_pieces(self, split_dirs) -> None:
        """Drop a stream's CSV pieces (not its counts/starts pieces)."""
        for d in split_dirs:
            base = self._path(storage.join(self.work_dir, "pieces", d))
            if not self.fs.exists(base):
                continue
            for p in self.fs.ls(base, detail=False):
                if os.path.basename(p).isdigit():
                    self.fs.rm(p, recursive=True)

    def make_split_dirs(self, split_dirs) -> None:
        for d in split_dirs:
            self.fs.makedirs(self._path(storage.join(self.tree_dir, d)), exist_ok=True)

    def publish(self, config) -> None:
        """Move ``uf50/`` and ``uf90/`` into OUT, link the raw inputs beside them."""
        out = self._path(self.output_dir)
        for top in (*TOP_DIRS, MANIFEST_NAME):
            target = storage.join(out, top)
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)
        for top in TOP_DIRS:
            self.fs.mv(self._path(storage.join(self.tree_dir, top)), storage.join(out, top), recursive=True)
        if config.copy_inputs:
            self._copy_inputs(config)
        _remove_quietly(self.fs, self._path(self.root))

    def _copy_inputs(self, config) -> None:
        raw_readme = storage.join(config.raw_dir, RAW_README)
        candidates = [config.uf50, config.uf90, config.mapping, config.val, config.test, raw_readme]
        seen: set[str] = set()
        for url in dict.fromkeys(candidates):
            name = os.path.basename(url.rstrip("/"))
            if name in seen:
                continue
            src_fs, src = storage.get_fs(url, config.storage_options)
            if not src_fs.exists(src):
                continue
            seen.add(name)
            dest = storage.join(self._path(self.output_dir), name)
            if storage.is_local(url) and storage.is_local(self.output_dir):
                src, dest = storage.local_path(src), storage.local_path(dest)
                if os.path.exists(dest):
                    if os.path.samefile(src, dest):
                        continue
                    os.unlink(dest)
                try:
                    os.link(src, dest)
                except OSError:
                    shutil.copyfile(src, dest)
            else:
                with src_fs.open(src, "rb") as fin, self.fs.open(dest, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 8 * 1024 * 1024)

    def discard(self) -> None:
        _remove_quietly(self.fs, self._path(self.root))
        if self.created_output:
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


def write_manifest(config, result, inputs: dict[str, int], version: str) -> str:
    """``OUT/esm2dask-manifest.json``: inputs, parameters, rows, bytes, timings."""
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
        "streams": {name: asdict(rep) for name, rep in result.streams.items()},
        "wall_seconds": round(result.wall_seconds, 3),
        "input_bytes": result.input_bytes,
        "mb_per_s": round(result.mb_per_s, 1),
        "stage_seconds": {k: round(v, 3) for k, v in result.stage_seconds.items()},
    }
    url = storage.join(config.output_dir, MANIFEST_NAME)
    fs, path = storage.get_fs(url, config.storage_options)
    tmp = path + ".tmp"
    with fs.open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    fs.mv(tmp, path)
    return url
