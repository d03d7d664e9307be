"""``flip``: the FLIP benchmark tasks as ESM2nv validation CSVs (``docs/flip.md``).

Files come from the public FLIP server (or a mirror, or a local folder) into a cache that
is reused when complete; a download lands in a temporary name beside its own (``*.tmp``)
and is renamed only when whole. Each task is converted into
``OUT/<task>/{train,val,test}/x000.csv`` in a staging folder and published with one rename.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field

from . import storage
from .errors import ConfigError, InputError, OutputError, reason
from .checks import VerifyReport, list_shards
from .layout import shard_bounds, shard_name

log = logging.getLogger("esm2dask")

DEFAULT_SOURCE = "http://data.bioembeddings.com/public/FLIP/fasta/"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "esm2dask", "flip")
SPLITS = ("train", "val", "test")

#: The reference's attribute pattern: it truncates some values (1.2e-05 → 1.2).
COMPAT_PATTERN = re.compile(r"([A-Z_]+)=(-?[A-z0-9]+-?[A-z0-9]*[.0-9]*)")
#: Values parsed whole: everything up to the next ``KEY=`` or the end.
EXACT_PATTERN = re.compile(r"([A-Z_]+)=(.*?)(?=\s+[A-Z_]+=|\s*$)")


@dataclass(frozen=True)
class FlipTask:
    name: str
    sequences: str
    labels: str | None
    resolved: str | None
    header: tuple[str, ...]

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.sequences, self.labels, self.resolved) if f)


TASKS = {
    t.name: t
    for t in (
        FlipTask("aav", "seven_vs_many.fasta", None, None, ("id", "sequence", "target")),
        FlipTask("bind", "sequences.fasta", "from_publication.fasta", None, ("id", "sequence", "target")),
        FlipTask("conservation", "sequences.fasta", "sampled.fasta", None, ("id", "sequence", "conservation")),
        FlipTask("gb1", "two_vs_rest.fasta", None, None, ("id", "sequence", "target")),
        FlipTask("meltome", "mixed_split.fasta", None, None, ("id", "sequence", "target")),
        FlipTask("sav", "mixed.fasta", None, None, ("id", "sequence", "target")),
        FlipTask("scl", "mixed_soft.fasta", None, None, ("id", "sequence", "scl_label")),
        FlipTask(
            "secondary_structure", "sequences.fasta", "sampled.fasta", "resolved.fasta",
            ("id", "sequence", "3state", "resolved"),
        ),
    )
}


def parse_tasks(text: str) -> list[FlipTask]:
    if text.strip() == "all":
        return list(TASKS.values())
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ConfigError(f"unknown FLIP task(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(TASKS)} or 'all'")
    return [TASKS[n] for n in names]


@dataclass(frozen=True)
class FlipConfig:
    tasks: tuple[FlipTask, ...]
    output_dir: str
    source: str = DEFAULT_SOURCE
    cache_dir: str = DEFAULT_CACHE
    num_csv_files: int = 1
    labels: str = "compat"
    checksums: str | None = None
    write_checksums: str | None = None
    retries: int = 3
    timeout_s: float = 60.0
    overwrite: bool = False
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "storage_options", storage.StorageOptions(self.storage_options))
        if self.labels not in ("compat", "exact"):
            raise ConfigError("--labels must be 'compat' or 'exact'")
        if not 1 <= self.num_csv_files <= 1000:
            raise ConfigError("--num-csv-files must be between 1 and 1000")
        if self.retries < 0:
            raise ConfigError("--retries must be 0 or more")


@dataclass
class FlipTaskResult:
    task: str
    rows: dict[str, int]
    truncated: int = 0
    truncated_examples: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- fetching


def fetch(config: FlipConfig, task: FlipTask, filename: str) -> str:
    """Local path of one source file: the local folder's, or the cache's (downloaded once)."""
    url = storage.join(config.source, task.name, filename)
    try:
        return storage.cached_local(url, _cache_path(config, task, filename),
                                    lambda: _download(config, task, url, _cache_path(config, task, filename)))
    except FileNotFoundError as err:
        raise InputError(err.filename, "", f"FLIP task {task.name}: file not found in --source") from None


def _cache_path(config: FlipConfig, task: FlipTask, filename: str) -> str:
    return os.path.join(config.cache_dir, source_key(config.source), task.name, filename)


def _download(config: FlipConfig, task: FlipTask, url: str, dest: str) -> None:
    if url.startswith(("http://", "https://")):
        fs, remote = _http_fs(config.timeout_s), url
    else:  # s3:// and any other fsspec URL
        fs, remote = storage.get_fs(url, config.storage_options)
    for attempt in range(config.retries + 1):
        try:
            with storage.built_in_place(dest) as part:  # removed again if the download fails
                fs.get_file(remote, part)
            return
        except FileNotFoundError:
            raise InputError(url, "", f"FLIP task {task.name}: not found on the server (HTTP 404 / no such key)") from None
        except Exception as err:  # connection errors, timeouts, 5xx answers
            if attempt == config.retries:
                raise InputError(
                    url, "", f"FLIP task {task.name}: download failed after {attempt + 1} attempt(s): "
                    f"{reason(err)}"
                ) from None
            delay = 0.5 * 2**attempt
            log.warning("download of %s failed (%s); retrying in %.1f s", url, err, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def source_key(source: str) -> str:
    """The cache folder of one source: readable, and unique per source URL (a second
    mirror never gets the first one's files).

    >>> source_key("http://data.bioembeddings.com/public/FLIP/fasta/")
    'data.bioembeddings.com-public-FLIP-fasta-fd81129e654d'
    """
    normalized = source.rstrip("/")
    readable = re.sub(r"[^A-Za-z0-9._]+", "-", normalized.split("://", 1)[-1]).strip("-")[:60]
    return f"{readable}-{hashlib.sha256(normalized.encode()).hexdigest()[:12]}"


def _http_fs(timeout_s: float):
    import aiohttp
    import fsspec

    return fsspec.filesystem(
        "http", skip_instance_cache=True,
        client_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout_s)},
    )


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_checksums(path: str) -> dict[str, str]:
    """``sha256  task/file`` per line (the format of ``sha256sum``)."""
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or len(parts[0]) != 64:
                raise InputError(path, f"line {n}", "expected '<sha256>  <task>/<file>'")
            out[parts[1]] = parts[0]
    return out


# ----------------------------------------------------------------------------- parsing


def read_fasta(path: str, task: str) -> list[tuple[str, str, str]]:
    """(id, header text after '>', sequence) per record, file order; upper-cased sequences."""
    records: list[tuple[str, str, list[str]]] = []
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:  # never replaced: a U+FFFD would reach the CSV unseen
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(path, f"line {line}, byte {err.start}",
                         f"FLIP task {task}: byte 0x{raw[err.start]:02x} is not UTF-8") from None
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if line.startswith(">"):
            header = line[1:]
            ident = header.split(maxsplit=1)[0] if header.strip() and not header[0].isspace() else ""
            if not ident:
                raise InputError(path, f"line {n}", f"FLIP task {task}: empty record id after '>'")
            if "," in ident or '"' in ident:  # the id is the CSV's first field, never quoted
                raise InputError(path, f"line {n}", f"FLIP task {task}: record id {ident!r} holds ',' or '\"', "
                                 f"which would corrupt the CSV")
            records.append((ident, header, []))
        elif line.strip():
            if not records:
                raise InputError(path, f"line {n}", f"FLIP task {task}: text before the first '>' header")
            records[-1][2].append(line.strip())
    return [(i, h, "".join(parts).upper()) for i, h, parts in records]


def attributes(header: str, mode: str) -> dict[str, str]:
    pattern = COMPAT_PATTERN if mode == "compat" else EXACT_PATTERN
    return {k: v for k, v in pattern.findall(header)}


def split_of(attrs: dict[str, str]) -> str | None:
    s, v = attrs.get("SET"), attrs.get("VALIDATION")
    if s == "train":
        return "val" if v == "True" else "train" if v == "False" else None
    return "test" if s == "test" else None


def _check_field(value: str, task: str, path: str, ident: str, what: str) -> str:
    if any(c in value for c in ',"\n\r') or value != value.strip():
        raise InputError(path, f"record {ident!r}", f"FLIP task {task}: {what} {value!r} would corrupt the CSV")
    return value


def convert_task(task: FlipTask, paths: dict[str, str], mode: str) -> tuple[dict[str, list[str]], FlipTaskResult]:
    """Rows per split for one task, and what was truncated (compat mode)."""
    seqs = read_fasta(paths[task.sequences], task.name)
    by_id = {}
    for ident, _, seq in seqs:
        by_id.setdefault(ident, seq)
    source_file = task.labels or task.sequences
    source = read_fasta(paths[source_file], task.name) if task.labels else seqs
    resolved = {}
    if task.resolved:
        for ident, _, mask in read_fasta(paths[task.resolved], task.name):
            resolved.setdefault(ident, mask)
    rows: dict[str, list[str]] = {s: [] for s in SPLITS}
    result = FlipTaskResult(task.name, {})
    for ident, header, label_seq in source:
        attrs = attributes(header, mode)
        split = split_of(attrs)
        if split is None:
            continue
        if mode == "compat":
            whole = attributes(header, "exact")
            for k, v in attrs.items():
                if whole.get(k, v) != v:
                    result.truncated += 1
                    if len(result.truncated_examples) < 2:
                        result.truncated_examples.append(f"{ident}: {k}={whole[k]!r} → {v!r}")
        if ident not in by_id:
            raise InputError(paths[task.sequences], f"record {ident!r}",
                             f"FLIP task {task.name}: {ident!r} is in {source_file} but not in {task.sequences}")
        seq = _check_field(by_id[ident], task.name, paths[task.sequences], ident, "sequence")
        if task.labels:
            label = _check_field(label_seq, task.name, paths[source_file], ident, "label")
            if len(label) != len(seq):
                raise InputError(
                    paths[source_file], f"record {ident!r}",
                    f"FLIP task {task.name}: per-residue label has {len(label)} characters but the sequence "
                    f"has {len(seq)}; a model would align residues to the wrong labels, so this is an error",
                )
        else:
            if "TARGET" not in attrs:
                raise InputError(paths[source_file], f"record {ident!r}", f"FLIP task {task.name}: no TARGET= in the header")
            label = _check_field(attrs["TARGET"], task.name, paths[source_file], ident, "TARGET value")
        fields = [ident, seq, label]
        if task.resolved:
            if ident not in resolved:
                raise InputError(paths[task.resolved], f"record {ident!r}",
                                 f"FLIP task {task.name}: {ident!r} is missing from {task.resolved}")
            mask = _check_field(resolved[ident], task.name, paths[task.resolved], ident, "resolved mask")
            if len(mask) != len(seq):
                raise InputError(paths[task.resolved], f"record {ident!r}",
                                 f"FLIP task {task.name}: resolved mask has {len(mask)} characters, sequence {len(seq)}")
            fields.append(mask)
        rows[split].append(",".join(fields) + "\n")
    result.rows = {s: len(r) for s, r in rows.items()}
    return rows, result


def write_split(folder: str, header: tuple[str, ...], rows: list[str], num_files: int) -> None:
    os.makedirs(folder, exist_ok=True)
    bounds = shard_bounds(len(rows), num_files)
    head = ",".join(header) + "\n"
    for k in range(num_files):
        with open(os.path.join(folder, shard_name(k)), "w", newline="\n") as f:
            f.write(head)
            f.writelines(rows[int(bounds[k]) : int(bounds[k + 1])])


def run_flip(config: FlipConfig) -> list[FlipTaskResult]:
    """Fetch, check, convert and publish every task of ``config``."""
    expected = read_checksums(config.checksums) if config.checksums else {}
    out = config.output_dir
    out_fs, out_path = storage.get_fs(out, config.storage_options)
    links = [(t.name, target) for t in config.tasks if (target := storage.link_target(storage.join(out, t.name)))]
    if links:  # never replaced, followed or emptied: the link may lead outside OUT
        name, target = links[0]
        raise OutputError(f"{storage.join(out, name)}: is a symbolic link (to {target}); "
                          f"esm2dask does not write through links: remove it, or choose another --output-dir")
    existing = [t.name for t in config.tasks if out_fs.exists(storage.join(out_path, t.name))]
    if existing and not config.overwrite:
        raise OutputError(f"{out}: task folder(s) {', '.join(existing)} exist; pass --overwrite to replace them")
    try:  # in OUT (published with renames), or for an object store a local folder (uploaded)
        staging = storage.build_folder(out, f".esm2dask-flip-staging-{os.getpid()}")
    except OSError as err:
        raise OutputError(f"{out}: cannot write the output folder ({err})") from None
    results, sums = [], {}
    try:
        for task in config.tasks:
            paths = {f: fetch(config, task, f) for f in task.files}
            for f, path in paths.items():
                key = f"{task.name}/{f}"
                digest = sha256(path) if (expected or config.write_checksums) else None
                sums[key] = digest
                if expected and key in expected and expected[key] != digest:
                    if path == _cache_path(config, task, f):
                        _unlink(path)  # a bad cached copy must not be reused
                    raise InputError(path, "", f"sha256 {digest} does not match {expected[key]} in {config.checksums}")
            rows, result = convert_task(task, paths, config.labels)
            for split in SPLITS:
                write_split(os.path.join(staging, task.name, split), task.header, rows[split], config.num_csv_files)
            if result.truncated:
                log.warning(
                    "%s: %d attribute value(s) truncated by the reference's pattern (--labels compat), e.g. %s; "
                    "--labels exact keeps them whole", task.name, result.truncated, "; ".join(result.truncated_examples),
                )
            results.append(result)
        for task in config.tasks:
            storage.replace_folder(os.path.join(staging, task.name), storage.join(out, task.name), config.storage_options)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if config.write_checksums:
        with open(config.write_checksums, "w") as f:
            for key in sorted(sums):
                f.write(f"{sums[key]}  {key}\n")
    return results


def _row_problem(line: str, task: FlipTask) -> str | None:
    """What is wrong with one CSV row of ``task``, or None."""
    if '"' in line:
        return "'\"' found (fields are never quoted)"
    if "\ufffd" in line:
        return "U+FFFD found (a byte of the source that was not UTF-8, replaced)"
    fields = line.split(",")
    if len(fields) != len(task.header):
        return f"{len(fields)} fields, expected {len(task.header)}"
    if fields[1] != fields[1].upper():
        return "sequence has lower case (sequences are upper-cased)"
    if task.labels and len(fields[2]) != len(fields[1]):
        return "label length differs from sequence length"
    return None


def verify_flip_tree(root: str, storage_options=None, num_csv_files=None):
    """Check a FLIP tree: task folders, split folders, headers, line ends, UTF-8, field
    counts, no quotes, upper-case sequences, per-residue label lengths."""
    report = VerifyReport(root)
    fs, root_path = storage.get_fs(root, storage_options or {})
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root_path, detail=False)] if fs.exists(root_path) else []
    tasks = sorted(d for d in names if d in TASKS)
    if not tasks:
        report.problems.append(f"{root}: no FLIP task folders ({', '.join(TASKS)}) and no uf50/")
        return report
    for name in tasks:
        task = TASKS[name]
        head = ",".join(task.header) + "\n"
        for split in SPLITS:
            label = f"{name}/{split}"
            paths = list_shards(fs, storage.join(root_path, name, split), label, report.problems, num_csv_files)
            n = 0
            for p in paths:
                with fs.open(p, "rb") as f:
                    data = f.read()
                if not data.startswith(head.encode()):
                    report.problems.append(f"{label}/{os.path.basename(p)}: header is not {head.strip()!r}")
                    continue
                file_label = f"{label}/{os.path.basename(p)}"
                if not data.endswith(b"\n") or b"\r" in data:
                    report.problems.append(f"{file_label}: lines must end with '\\n' only")
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as err:
                    line = data.count(b"\n", 0, err.start) + 1
                    report.problems.append(f"{file_label}: line {line}: not UTF-8 (byte {err.start})")
                    continue
                for i, line in enumerate(text.split("\n")[1:-1], 2):
                    problem = _row_problem(line, task)
                    if problem:
                        report.problems.append(f"{file_label}: line {i}: {problem}")
                        break
                    n += 1
            report.rows[label] = n
            report.checked.append(label)
    return report


__all__ = ["TASKS", "FlipConfig", "run_flip", "parse_tasks", "verify_flip_tree"]
