"""``verify``: check an output tree against the layout contract.

Checks the invariants of ``docs/esm2-layout.md`` that can be seen from the output
alone (file names and count, header, line endings, field shape, record_id order, row
spread across files, legal characters in every name and sequence, upper case in
``uf50/train`` and ``uf90``, ``sequence_length``, ``counts``/``starts`` against the uf90
row count and as running sums) and, when the tree holds ``mapping.tsv``, the record names
and each cluster's count against it. Every file, input copies included, is checked
against the manifest's size and SHA-256; the contract is checked whatever the digests
say. Each file is read once. Every problem is listed, with the file and the line.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl

from . import storage
from .errors import InputError
from .layout import CSV_HEADER, MANIFEST_NAME, SPLIT_DIRS, TOP_DIRS, UF50_TEST, UF50_TRAIN, UF50_VAL, UF90, shard_bounds
from .checks import VerifyReport, list_shards  # noqa: F401  (the verifiers' shared parts)
from .verify_formats import HASH_SEED, ILLEGAL, check_layouts, first_illegal, layouts_present, sequence_problems, such_rows

_SCHEMA = {"record_id": pl.Int64, "record_name": pl.String, "sequence_length": pl.Int64, "sequence": pl.String}


def read_csv_checked(fs, path: str, header: bytes, problems: list[str], label: str,
                     digests: dict[str, str] | None = None):
    """Read one shard; returns a DataFrame or None (after adding problems). With
    ``digests``, records the file's SHA-256 there (the bytes are read once)."""
    with fs.open(path, "rb") as f:
        data = f.read()
    if digests is not None:
        digests[path] = hashlib.sha256(data).hexdigest()
    if not data.startswith(header):
        first = data.split(b"\n", 1)[0][:80]
        problems.append(f"{label}: header is {first!r}, expected {header.rstrip()!r}")
        return None
    if not data.endswith(b"\n"):
        problems.append(f"{label}: last line does not end with '\\n'")
    if b"\r" in data:
        line = data[: data.index(b"\r")].count(b"\n") + 1
        problems.append(f"{label}: line {line}: '\\r' found (line ends must be '\\n')")
    if b'"' in data:
        line = data[: data.index(b'"')].count(b"\n") + 1
        problems.append(f"{label}: line {line}: '\"' found (fields are never quoted)")
    columns = header.rstrip(b"\n").decode().split(",")
    try:
        return pl.read_csv(
            io.BytesIO(data),
            has_header=True,
            quote_char=None,
            schema={c: _SCHEMA.get(c, pl.String) for c in columns},
        ).with_columns(pl.col(pl.String).fill_null(""))
    except Exception as err:  # polars raises several kinds for malformed rows
        problems.append(f"{label}: cannot be read as {len(columns)}-column CSV ({str(err).splitlines()[0]})")
        return None


def _check_rows(frame: pl.DataFrame, label: str, upper: bool, report: VerifyReport) -> None:
    """The per-row checks of one file; ``label`` is the file, a row's line is its index + 2."""
    names = frame["record_name"]
    lengths = frame["sequence"].str.len_chars()
    bad = (lengths != frame["sequence_length"]).arg_true()
    if len(bad):
        i = int(bad[0])
        report.problems.append(
            f"{label}: line {i + 2} (record {names[i]!r}): sequence_length "
            f"{frame['sequence_length'][i]} but the sequence has {lengths[i]} characters{such_rows(len(bad))}"
        )
    bad_names = (names.str.contains(ILLEGAL) | (names.str.len_bytes() == 0)).arg_true()
    if len(bad_names):
        i = int(bad_names[0])
        what = "is empty" if not names[i] else "has {1} at position {0}".format(*first_illegal(names[i]))
        report.problems.append(f"{label}: line {i + 2}: record_name {names[i]!r} {what}, not a legal name "
                               f"(printable ASCII but ',', '\"' and space){such_rows(len(bad_names))}")
    for i, what in sequence_problems(frame["sequence"], upper):
        report.problems.append(f"{label}: line {i + 2} (record {names[i]!r}): {what}")


def _check_split(fs, root, split_dir, expected_files, consecutive, report) -> pl.DataFrame | None:
    """Check one output folder file by file; returns its ``record_id``/``record_name`` columns
    (sequences are checked and dropped file by file, so memory stays near one file's)."""
    label = split_dir
    paths = list_shards(fs, storage.join(root, split_dir), label, report.problems, expected_files)
    if not paths:
        return None
    # val and test converted from their FASTAs keep its case (the other layouts hold them
    # upper-cased, so their sequences are compared upper-cased); drawn at random, they are
    # uf50 rows, upper-cased
    upper = split_dir in (UF50_TRAIN, UF90) or not consecutive
    frames, per_file = [], []
    for p in paths:
        file_label = f"{split_dir}/{p.rsplit('/', 1)[-1]}"
        frame = read_csv_checked(fs, p, CSV_HEADER, report.problems, file_label, report.digests)
        if frame is None:
            return None
        _check_rows(frame, file_label, upper, report)
        seqs = frame["sequence"] if upper else frame["sequence"].str.to_uppercase()
        frames.append(frame.select("record_id", "record_name").with_columns(seq_hash=seqs.hash(HASH_SEED)))
        per_file.append(len(frame))
    data = pl.concat(frames)
    n = len(data)
    report.rows[split_dir] = n
    report.shard_rows[split_dir] = per_file
    want = np.diff(shard_bounds(n, len(paths))).tolist()
    if per_file != want:
        report.problems.append(
            f"{label}: rows per file {per_file[:6]}… do not follow numpy.array_split of {n} rows "
            f"into {len(paths)} files ({want[:6]}…)"
        )
    ids = data["record_id"].to_numpy()
    if consecutive:
        bad = np.flatnonzero(ids != np.arange(1, n + 1))
        if len(bad):
            report.problems.append(
                f"{label}: record_id {ids[bad[0]]} at row {bad[0] + 1}, expected {bad[0] + 1} "
                f"(ids run 1…n across the files)"
            )
    elif n and (np.any(np.diff(ids) <= 0) or ids[0] < 1):
        report.problems.append(f"{label}: record_id values are not strictly increasing from ≥1")
    report.checked.append(split_dir)
    return data


def _read_array(fs, path: str, label: str, problems: list[str], digests: dict[str, str]) -> np.ndarray | None:
    if not fs.exists(path):
        problems.append(f"{label}: missing")
        return None
    with fs.open(path, "rb") as f:
        raw = f.read()
    digests[path] = hashlib.sha256(raw).hexdigest()
    if len(raw) % 8:
        problems.append(f"{label}: {len(raw)} bytes, not a whole number of uint64 values")
        return None
    return np.frombuffer(raw, dtype="<u8")


def verify_tree(root: str, storage_options: dict | None = None, num_csv_files: int | None = None,
                mapping: str | None = None) -> VerifyReport:
    """Check ``root`` (an esm2dask or BioNeMo output folder); never raises for content.

    Names are checked against ``mapping`` (a path or URL), else against the tree's own
    ``mapping.tsv`` when it holds one.
    """
    storage_options = storage_options or {}
    fs, root_path = storage.get_fs(root, storage_options)
    fs.invalidate_cache(root_path)  # a long-lived process may have listed it before
    report = VerifyReport(root)
    if not fs.exists(root_path):
        report.problems.append(f"{root}: no such folder")
        return report
    manifest = {}
    mpath = storage.join(root_path, MANIFEST_NAME)
    if fs.exists(mpath):
        manifest = _load_manifest(fs, mpath, storage.join(root, MANIFEST_NAME))
    params = manifest.get("parameters", {})
    # an object store's switch copies file by file: only the manifest, written last, says it ended
    if not manifest and not storage.is_local(root):
        report.problems.append(
            f"{root}: no {MANIFEST_NAME}: on an object store a tree is complete only once its manifest is written"
        )
    _check_manifest_files(root, manifest.get("files"), report, storage_options)
    copies = _plain_copies(root, manifest.get("copied_inputs"), report)
    copy_digests = _hash_copies(fs, root_path, copies)
    split = params.get("split", "fasta")
    expected_files = num_csv_files or params.get("num_csv_files")

    data = {}
    layouts = layouts_present(fs, root_path, params)
    if "esm2nv" not in layouts:  # only --format bionemo2 / hf
        check_layouts(fs, root_path, params, layouts, data, report)
        _check_copies(fs, root_path, copies, copy_digests, report)
        return report
    for d in SPLIT_DIRS:
        consecutive = d == UF90 or split == "fasta"
        data[d] = _check_split(fs, root_path, d, expected_files, consecutive, report)
    uf90_rows = report.rows.get(UF90)

    train_dirs = (UF50_TRAIN,) if split == "fasta" else (UF50_TRAIN, UF50_VAL, UF50_TEST)
    all_counts, all_starts, all_ids, all_dirs = [], [], [], []
    cluster_counts = None  # (counts in mapping order, the folder of each cluster)
    for d in train_dirs:
        counts = _read_array(fs, storage.join(root_path, d, "counts.mmap"), f"{d}/counts.mmap", report.problems,
                             report.digests)
        starts = _read_array(fs, storage.join(root_path, d, "starts.mmap"), f"{d}/starts.mmap", report.problems,
                             report.digests)
        if counts is None or starts is None:
            continue
        n = report.rows.get(d)
        for name, arr in (("counts", counts), ("starts", starts)):
            if n is not None and len(arr) != n:
                report.problems.append(f"{d}/{name}.mmap: {len(arr)} values for {n} rows")
        if data.get(d) is not None and len(counts) == len(starts) == len(data[d]):
            all_counts.append(counts)
            all_starts.append(starts)
            all_ids.append(data[d]["record_id"].to_numpy())
            all_dirs.append(np.full(len(counts), len(all_dirs), dtype=np.int8))
    if all_counts and len(all_counts) == len(train_dirs):
        ids = np.concatenate(all_ids)
        order = np.argsort(ids, kind="stable")
        counts = np.concatenate(all_counts)[order]
        starts = np.concatenate(all_starts)[order]
        cluster_counts = (counts, np.array(train_dirs)[np.concatenate(all_dirs)[order]])
        prefix = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.uint64)
        bad = np.flatnonzero(starts != prefix)
        if len(bad):
            report.problems.append(
                f"starts.mmap: value {starts[bad[0]]} at cluster {bad[0]}, expected {prefix[bad[0]]} "
                f"(the running sum of counts)"
            )
        if uf90_rows is not None and int(counts.sum()) != uf90_rows:
            report.problems.append(
                f"counts.mmap: counts add up to {int(counts.sum())}, but uf90 has {uf90_rows} rows"
            )
        report.checked.append("counts/starts")

    _check_checksums(fs, root_path, manifest.get("files"), report)
    mapping_fs, mapping_path = ((fs, storage.join(root_path, "mapping.tsv")) if mapping is None
                                else storage.get_fs(mapping, storage_options))
    if mapping_fs.exists(mapping_path) and all(data.get(d) is not None for d in train_dirs) and data.get(UF90) is not None:
        _check_names(mapping_fs, mapping_path, data, train_dirs, cluster_counts, report,
                     own_copy=mapping is None)
    check_layouts(fs, root_path, params, layouts, data, report)
    _check_copies(fs, root_path, copies, copy_digests, report)
    return report


def _plain_copies(root: str, listed, report: VerifyReport) -> dict:
    """The manifest's input copies that are plain files directly inside the tree; any other
    name (a path, ``..``, a link) is a problem and is never opened."""
    copies = {}
    for name, entry in (listed or {}).items() if isinstance(listed, dict) else ():
        if not isinstance(entry, dict):
            continue
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            report.problems.append(f"{name!r}: an input copy must be a file name inside the tree; not read")
        elif storage.link_target(storage.join(root, name)) is not None:
            report.problems.append(f"{name}: input copy is a symbolic link; not followed")
        else:
            copies[name] = entry
    return copies


def _hash_copies(fs, root_path: str, copies: dict) -> dict:
    """SHA-256 of each input copy the manifest gives one for, hashed in threads while the
    tree is checked (hashlib releases the GIL); ``mapping.tsv`` is left to
    :func:`_check_names`, which reads it anyway. Returns name → future."""
    names = [n for n, e in copies.items() if isinstance(e, dict) and e.get("sha256") and n != "mapping.tsv"
             and fs.exists(storage.join(root_path, n))]
    if not names:
        return {}
    pool = ThreadPoolExecutor(max_workers=min(4, len(names)), thread_name_prefix="esm2dask-verify")
    futures = {n: pool.submit(_file_sha256, fs, storage.join(root_path, n)) for n in names}
    pool.shutdown(wait=False)
    return futures


def _file_sha256(fs, path: str) -> str:
    with fs.open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_copies(fs, root_path: str, copies: dict, futures: dict, report: VerifyReport) -> None:
    """Each input copy is there with the manifest's size and, where it gives one, SHA-256."""
    for name, entry in copies.items():
        path = storage.join(root_path, name)
        if not fs.exists(path):
            report.problems.append(f"{name}: input copy listed in the manifest but missing")
            continue
        if int(fs.info(path)["size"]) != entry.get("bytes"):
            report.problems.append(f"{name}: {fs.info(path)['size']} bytes, the manifest says {entry.get('bytes')}")
        want = entry.get("sha256")
        if want:
            try:
                got = futures[name].result() if name in futures else report.digests.get(path) or _file_sha256(fs, path)
            except OSError as err:
                report.problems.append(f"{name}: input copy cannot be read")
                continue
            if got != want:
                report.problems.append(f"{name}: SHA-256 differs from the manifest's (the input copy was "
                                       f"changed after it was written)")
    if copies:
        report.checked.append("input copies against the manifest")


def _load_manifest(fs, path: str, shown: str) -> dict:
    """The manifest as esm2dask writes it: a JSON object whose ``files`` and
    ``copied_inputs`` map names to objects with ``bytes``; anything else is one error."""
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        manifest = json.loads(data)
    except ValueError as err:  # not JSON, or not UTF-8
        where = f"line {err.lineno}, column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise InputError(shown, where, "not valid JSON: not a manifest esm2dask wrote") from None
    if not isinstance(manifest, dict):
        kind = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(type(manifest), "a number")
        raise InputError(shown, "", f"holds {kind}, expected a JSON object (not a manifest esm2dask wrote)")
    for section in ("files", "copied_inputs"):
        entries = manifest.get(section)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise InputError(shown, f"'{section}'", "expected an object mapping names to entries")
        for name, entry in entries.items():
            size = entry.get("bytes") if isinstance(entry, dict) else entry if section == "files" else None
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InputError(shown, f"'{section}' entry {name!r}",
                                 "has no 'bytes' (a whole number of bytes)")
    return manifest


def _check_checksums(fs, root_path: str, files: dict | None, report: VerifyReport) -> None:
    """Each file's SHA-256 against the manifest's: a byte changed in place is found too."""
    listed = {rel: entry["sha256"] for rel, entry in (files or {}).items()
              if isinstance(entry, dict) and entry.get("sha256")}
    if not listed:
        return
    for rel, want in listed.items():
        path = storage.join(root_path, rel)
        got = report.digests.get(path)
        if got is None:
            if not fs.exists(path):
                continue  # reported as missing already
            with fs.open(path, "rb") as f:
                got = hashlib.file_digest(f, "sha256").hexdigest()
        if got != want:
            report.problems.append(f"{rel}: SHA-256 differs from the manifest's (changed after it was written)")
    report.checked.append("checksums against the manifest")


def _check_manifest_files(root: str, files: dict | None, report: VerifyReport, storage_options: dict) -> None:
    """Every file the manifest lists is there with its size, and no other shard is."""
    if not files:
        return
    from .publish import list_output_files

    present = list_output_files(root, storage_options)
    for name, entry in files.items():
        size = entry["bytes"] if isinstance(entry, dict) else entry
        if name not in present:
            report.problems.append(f"{name}: listed in the manifest but missing")
        elif present[name] != size:
            report.problems.append(f"{name}: {present[name]} bytes, the manifest says {size}")
    extra = sorted(set(present) - set(files))
    if extra:
        report.problems.append(f"not in the manifest: {', '.join(extra[:5])}")
    report.checked.append("files against the manifest")


def _first_difference(got: pl.Series, want: pl.Series) -> str | None:
    """None when equal; else where they first differ."""
    if len(got) != len(want):
        return f"{len(got)} rows for {len(want)} mapping ids"
    differs = (got != want).arg_true()
    if len(differs) == 0:
        return None
    i = int(differs[0])
    return f"first difference at row {i + 1}: {got[i]!r}, mapping has {want[i]!r}"


def _check_names(fs, mapping_path, data, train_dirs, cluster_counts, report, own_copy: bool) -> None:
    """Names in mapping order, and each cluster's count against its member list."""
    with fs.open(mapping_path, "rb") as f:
        raw = f.read()
    if own_copy:
        report.digests[mapping_path] = hashlib.sha256(raw).hexdigest()
    table = pl.read_csv(
        io.BytesIO(raw), has_header=True, separator="\t", quote_char=None,
        truncate_ragged_lines=True, infer_schema=False,
    )
    clusters = table[:, 0]
    member_lists = table[:, 1].str.split(",")
    members = member_lists.explode()
    uf50 = pl.concat([data[d].select("record_id", "record_name") for d in train_dirs]).sort("record_id")
    for label, got, want in (
        ("uf50", uf50["record_name"], clusters),
        ("uf90", data[UF90]["record_name"], members),
    ):
        where = _first_difference(got, want)
        if where:
            report.problems.append(f"{label} names do not follow mapping.tsv ({where})")
    if cluster_counts is not None and len(cluster_counts[0]) == len(member_lists):
        counts, dirs = cluster_counts
        listed = member_lists.list.len().fill_null(0).to_numpy().astype(np.uint64)
        bad = np.flatnonzero(counts != listed)
        if len(bad):
            i = int(bad[0])
            report.problems.append(
                f"{dirs[i]}/counts.mmap: cluster {i} ({clusters[i]}) has count {counts[i]}, but mapping.tsv "
                f"line {i + 2} lists {listed[i]} member(s){such_rows(len(bad), 'clusters')}"
            )
        report.checked.append("counts against mapping.tsv")
    report.checked.append("names against mapping.tsv")


def verify_any(root: str, storage_options: dict | None = None, num_csv_files: int | None = None) -> VerifyReport:
    """Verify an ESM2 tree, or a FLIP tree (``<task>/{train,val,test}``) if that is what it is."""
    fs, path = storage.get_fs(root, storage_options or {})
    if any(fs.exists(storage.join(path, top)) for top in TOP_DIRS) or not fs.exists(path):
        return verify_tree(root, storage_options, num_csv_files)
    from .flip import verify_flip_tree

    return verify_flip_tree(root, storage_options, num_csv_files)
