"""File access through fsspec, so that every path may also be a URL (``s3://…``).

Only small, picklable descriptions of files travel to the workers; each task opens
its own file here. This module is the storage seam: what differs between a local file
system and an object store is decided here, behind calls that read the same either way.

- Writing whole or not at all: :func:`built_in_place` (a temporary beside the file, then
  a rename), :func:`write_whole`, :func:`local_build` (a local path to build a URL at),
  :func:`copy_hashed` (an input copy, hashed as it is copied).
- Reading: :func:`read_head`, :func:`local_source`, the Arrow files' :func:`read_arrow`
  and :func:`read_arrow_slices` (a slice reads only its record batches), the ``.npy``
  files' :func:`read_npy` (memory-mapped where local; no ``ast``).
- Object stores: :func:`get_fs`, :func:`input_identity`, :func:`retrying` for transient
  errors, and :func:`check_output_location` (a bucket is never created) before a run starts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from typing import Any

import fsspec
import numpy as np
from fsspec.core import url_to_fs

from . import npyfile
from .errors import ConfigError, Esm2DaskError, InputError, OutputError, reason
from .layout import TMP_SUFFIX

#: Magic numbers of compressed formats we refuse (byte ranges need plain text).
COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}


def get_fs(url: str, storage_options: dict[str, Any] | None = None):
    """The filesystem and the path within it for ``url`` (a local path or any fsspec URL).

    A path without ``://`` is a local path taken literally: fsspec would read ``a::b`` as
    the chained URL ``b`` seen through a filesystem ``a`` (and ``[`` as a glob elsewhere),
    which is never what a local file name means."""
    if "://" not in url:
        fs = fsspec.filesystem("file")
        return fs, fs._strip_protocol(url)
    return url_to_fs(url, **(storage_options or {}))


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join path parts the way both local paths and URLs expect (always ``/``)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


#: Keys of storage options whose values are never shown (repr, logs, error messages).
SECRET_KEYS = ("secret", "key", "token", "password", "session", "credential", "sas", "signature")


class StorageOptions(dict):
    """fsspec storage options whose ``repr`` masks credentials.

    Task arguments are shown by Dask (worker logs of a failed task, the dashboard's task
    pages); the options travel as task arguments, so their repr must not carry a secret.
    """

    def __repr__(self) -> str:
        return repr(mask_secrets(dict(self)))

    __str__ = __repr__


def mask_secrets(value):
    """``value`` with every secret-looking option replaced by ``'***'`` (recursively)."""
    if isinstance(value, dict):
        return {
            k: "***" if any(word in str(k).lower() for word in SECRET_KEYS) and v else mask_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(mask_secrets(v) for v in value)
    return value


def parse_storage_options(text: str | None) -> StorageOptions:
    """``--storage-options``: a JSON object, or ``@FILE`` naming a file that holds one
    (keeps keys off the command line, where ``ps`` and the shell history show them)."""
    if not text:
        return StorageOptions()
    source = "--storage-options"
    if text.startswith("@"):
        source = text[1:]
        try:
            with open(os.path.expanduser(source), encoding="utf-8") as f:
                text = f.read()
        except OSError as err:
            raise ConfigError(f"--storage-options {source}: cannot read it ({err.strerror or err})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{source} must hold a JSON object")
    for botocore_name, s3fs_name in BOTOCORE_NAMES.items():
        if botocore_name in value:
            raise ConfigError(
                f"{source}: {botocore_name!r} is botocore's name; s3fs takes it as {s3fs_name!r} "
                f"(write {{\"{s3fs_name}\": …}}), or leave the keys out and set AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
    _register_secrets(value)
    return StorageOptions(value)


#: botocore's names of the credentials, and what s3fs calls them in its options.
BOTOCORE_NAMES = {"aws_access_key_id": "key", "aws_secret_access_key": "secret", "aws_session_token": "token"}


def _register_secrets(value) -> None:
    """Every secret option's value is masked in all output (logs, error lines)."""
    from .redaction import register_secret

    if isinstance(value, dict):
        for k, v in value.items():
            if any(word in str(k).lower() for word in SECRET_KEYS) and isinstance(v, str):
                register_secret(v)
            else:
                _register_secrets(v)
    elif isinstance(value, list):
        for v in value:
            _register_secrets(v)


def file_size(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Size in bytes; a missing file is an :class:`InputError`."""
    fs, path = get_fs(url, storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise InputError(url, "", "no such file (or no such bucket)") from None
    except PermissionError:
        raise InputError(url, "", "access denied: this user may not read it (check its permissions, or the "
                                  "bucket's policy)") from None
    if info.get("type") == "directory":
        raise InputError(url, "", "is a directory, expected a file")
    if info.get("type") not in (None, "file"):
        raise InputError(url, "", "is not a regular file (a FIFO, socket or device?): esm2dask reads inputs "
                                  "in byte ranges, from several workers, so each must be a regular file")
    return int(info["size"])


def read_head(url: str, n_bytes: int, storage_options: dict[str, Any] | None = None) -> bytes:
    """The first bytes of a file: proof, before a cluster starts, that it can be read."""
    fs, path = get_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            return f.read(n_bytes)
    except PermissionError:
        raise InputError(url, "", "not readable by this user (check its permissions: "
                                  "`chmod a+r` or run as its owner)") from None
    except IsADirectoryError:
        raise InputError(url, "", "is a directory, expected a file") from None
    except FileNotFoundError:
        raise InputError(url, "", "no such file (or no such bucket)") from None


def check_input_file(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Size of an input file after checking it exists, is not empty and is not compressed."""
    size = file_size(url, storage_options)
    if size == 0:
        raise InputError(url, "byte 0", "file is empty")
    head = read_head(url, 8, storage_options)
    for magic, name in COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise InputError(
                url,
                "byte 0",
                f"{name}-compressed input is not supported (byte ranges need plain text); "
                f"decompress it first",
            )
    return size


def open_file(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None):
    fs, path = get_fs(url, storage_options)
    return fs.open(path, mode)


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def check_output_location(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Before anything is written: an object-store output's bucket must exist already.
    fsspec's ``makedirs`` would create a missing bucket (in whatever region and with
    whatever policy the credentials allow), and a typo would then "succeed"."""
    if is_local(url):
        return
    fs, path = get_fs(url, storage_options)
    bucket = path.split("/", 1)[0]
    try:
        fs.invalidate_cache(bucket)
        fs.info(bucket)
    except FileNotFoundError:
        raise OutputError(f"{url}: no bucket {bucket!r} (esm2dask never creates buckets): create it first, "
                          f"or fix the URL") from None
    except PermissionError:
        return  # credentials for a prefix only may not look at the bucket: the writes will tell
    except Exception as err:  # botocore's and aiohttp's errors are no OSError
        raise OutputError(f"{url}: cannot reach the object store ({reason(err)})") from None


def makedirs(url: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = get_fs(url, storage_options)
    fs.makedirs(path, exist_ok=True)


def cpu_count() -> int:
    """The CPUs this process may run on (a job's cgroup/affinity), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: fs.info keys that change when an object store's object is replaced, in order of trust.
_OBJECT_VERSION_KEYS = ("VersionId", "generation", "ETag", "etag", "md5Hash", "LastModified", "mtime", "last_modified")


def input_identity(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies one state of an input file: size, mtime and inode on a file system;
    size with ETag / version on an object store. An input edited in place, even to the
    same size, gets another identity, so a resumed run never mixes old and new bytes."""
    if is_local(url):
        st = os.stat(local_path(url))
        return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "device": st.st_dev}
    fs, path = get_fs(url, storage_options)
    fs.invalidate_cache(path)
    info = fs.info(path)
    identity: dict[str, Any] = {"bytes": int(info["size"])}
    for key in _OBJECT_VERSION_KEYS:
        if info.get(key) not in (None, ""):
            identity[key] = str(info[key])
    return identity


def sha256_file(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Hex SHA-256 of a file (SHA-NI makes it the fastest of hashlib's here, ~1.2 GB/s/core;
    ``sha256sum`` checks it independently)."""
    fs, path = get_fs(url, storage_options)
    with (open(local_path(url), "rb") if is_local(url) else fs.open(path, "rb")) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


#: ioctl(2) FICLONE: make ``dest`` share ``src``'s blocks, copy-on-write (btrfs, XFS, …).
FICLONE = 0x40049409


def reflink(src: str, dest: str) -> bool:
    """Clone ``src`` into a new ``dest`` if the file system has reflinks; False if it has
    not (``dest`` is then not left behind)."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return True
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM):
                raise
    os.unlink(dest)
    return False


def place_copy(src: str, dest: str, hard_link: bool = False, copy: bool = True) -> str:
    """Put a copy of local file ``src`` at the new name ``dest``; says how.

    ``"reflink"`` where the file system shares blocks copy-on-write (free, and still two
    files), else ``"copy"`` (the kernel copies, ``copy_file_range``). ``hard_link=True``:
    ``"hardlink"`` — one file under two names, so writing one changes the other; only on
    request. ``copy=False``: ``"skipped"`` when no reflink is possible.
    """
    if hard_link:
        try:
            os.link(src, dest)
            return "hardlink"
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise
    if reflink(src, dest):
        return "reflink"
    if not copy:
        return "skipped"
    shutil.copyfile(src, dest)
    return "copy"


def temporary_beside(path: str) -> str:
    """A name to build ``path`` at, unique to this writer (process and thread): a task
    re-run elsewhere (a lost worker, a resumed run) never shares it. It ends in
    ``.tmp``, which publishing never takes for a file of the tree."""
    return f"{path}.{os.getpid()}-{threading.get_ident()}{TMP_SUFFIX}"


@contextlib.contextmanager
def built_in_place(path: str):
    """Yield a temporary name beside the local ``path``; when the block ends without an
    error it is renamed to ``path`` (which appears whole or not at all), otherwise it is
    removed. An ``OSError`` that names no file (a full disk's) names ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temporary_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        err.filename = err.filename or path
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def write_whole(url: str, parts, storage_options: dict[str, Any] | None = None) -> None:
    """The bytes of ``parts`` (buffers, written one after the other) as the file ``url``,
    there whole or not at all: :func:`built_in_place` on a file system, one upload (an
    object appears only when its PUT completes) on object storage."""
    if is_local(url):
        with built_in_place(local_path(url)) as tmp, open(tmp, "wb", buffering=0) as f:
            for part in parts:
                f.write(part)
        return
    with open_for_write(url, storage_options) as f:
        f.write(b"".join(bytes(part) for part in parts))


@contextlib.contextmanager
def local_build(url: str, storage_options: dict[str, Any] | None = None):
    """Yield a local path to build ``url`` at: :func:`built_in_place` for a local ``url``;
    for object storage a file in a temporary folder, uploaded when the block ends."""
    if is_local(url):
        with built_in_place(local_path(url)) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="esm2dask-") as folder:
        tmp = os.path.join(folder, url.rsplit("/", 1)[-1])
        yield tmp
        fs, path = get_fs(url, storage_options)
        fs.makedirs(fs._parent(path), exist_ok=True)
        fs.put_file(tmp, path)


@contextlib.contextmanager
def local_source(url: str, storage_options: dict[str, Any] | None = None):
    """Yield a local path holding ``url``'s bytes: the file itself on a file system, a
    downloaded copy in a temporary folder for object storage."""
    if is_local(url):
        yield local_path(url)
        return
    with tempfile.TemporaryDirectory(prefix="esm2dask-") as folder:
        tmp = os.path.join(folder, url.rsplit("/", 1)[-1])
        fs, path = get_fs(url, storage_options)
        fs.get_file(path, tmp)
        yield tmp


def copy_hashed(src: str, dest: str, hard_link: bool = False) -> tuple[str, str]:
    """:func:`place_copy`, and the SHA-256 of the bytes placed, reading ``src`` once.

    A plain copy is read, hashed and written in one loop (measured on an 806 MB FASTA:
    1.3 s, against 1.6 s for ``copy_file_range`` followed by a hashing read); a hard link
    or reflink shares the blocks, which are hashed by reading ``src``. ``dest`` appears
    whole or not at all (a temporary beside it, then a rename); no link is followed there.
    """
    tmp = temporary_beside(dest)
    digest = hashlib.sha256()
    try:
        how = "copy"
        if hard_link:
            try:
                os.link(src, tmp, follow_symlinks=False)
                how = "hardlink"
            except OSError as err:
                if err.errno != errno.EXDEV:
                    raise
        if how == "copy" and reflink(src, tmp):
            how = "reflink"
        with open(src, "rb", buffering=0) as fin:
            if how == "copy":
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
                with open(fd, "wb", buffering=0) as fout:
                    _copy_and_hash(fin, fout, digest)
            else:
                _copy_and_hash(fin, None, digest)
        os.replace(tmp, dest)
    except OSError as err:
        err.filename = err.filename or dest
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return how, digest.hexdigest()


def _copy_and_hash(fin, fout, digest, chunk: int = 8 << 20) -> None:
    buf = bytearray(chunk)
    view = memoryview(buf)
    while n := fin.readinto(buf):
        digest.update(view[:n])
        left = view[:n]
        while fout is not None and left:  # an unbuffered write may take part of it
            left = left[fout.write(left):]


#: errno values that mean the output location is full: retrying cannot help.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(err: BaseException) -> bool:
    """The output location is full. polars and pyarrow report it in their own exception
    types, with the OS's words, so the text counts too."""
    if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
        return True
    text = str(err)
    return any(words in text for words in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT),
                                           f"os error {errno.ENOSPC}", f"os error {errno.EDQUOT}"))


def open_for_write(url: str, storage_options: dict[str, Any] | None = None, mode: str = "wb"):
    """Open ``url`` for writing, creating its parent folder where folders exist."""
    fs, path = get_fs(url, storage_options)
    fs.makedirs(fs._parent(path), exist_ok=True)
    return fs.open(path, mode)


#: Errors that say something is wrong for good: retrying cannot help.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 0.5


def retrying(fn):
    """Retry ``fn`` with exponential backoff on transient I/O errors (a dropped
    connection, a timeout, a throttled request); permanent ones are raised at once."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for attempt in range(RETRY_ATTEMPTS):
            try:
                return fn(*args, **kwargs)
            except PERMANENT_ERRORS:
                raise
            except OSError as err:  # ConnectionError and TimeoutError too
                if is_no_space(err) or err.errno == errno.EROFS or attempt == RETRY_ATTEMPTS - 1:
                    raise
                _log_retry(fn, err, attempt)

    return wrapper


def _log_retry(fn, err: BaseException, attempt: int) -> None:
    delay = RETRY_BASE_DELAY_S * 2**attempt
    logging.getLogger("esm2dask").warning(
        "%s failed (%s: %s); retrying in %.1f s", fn.__name__, type(err).__name__, err, delay
    )
    time.sleep(delay)


#: Rows per record batch of the Arrow files esm2dask writes: a reader of a slice on an
#: object store fetches only the batches it needs (ranged reads), not the whole file.
ARROW_BATCH_ROWS = 1 << 16


def write_arrow(url: str, table, storage_options: dict[str, Any] | None = None) -> None:
    """A pyarrow table as an Arrow IPC file, in batches of :data:`ARROW_BATCH_ROWS`."""
    import pyarrow.ipc as ipc

    table = table.combine_chunks()
    with open_for_write(url, storage_options) as f, ipc.new_file(f, table.schema) as writer:
        writer.write_table(table, max_chunksize=ARROW_BATCH_ROWS)


@retrying
def read_arrow(url: str, storage_options: dict[str, Any] | None = None):
    """The whole Arrow IPC file ``url`` as a pyarrow table (memory-mapped where local)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    if is_local(url):
        with pa.memory_map(local_path(url)) as src:
            return ipc.open_file(src).read_all()
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        return ipc.open_file(pa.BufferReader(f.read())).read_all()


def read_arrow_slices(slices, storage_options: dict[str, Any] | None = None):
    """Rows ``[lo, hi)`` of each Arrow file (``slices``: objects with ``url``, ``lo`` and
    ``hi``), concatenated as one pyarrow table; None if there are none. Local files are
    memory-mapped and remote ones read batch by batch, so a slice costs what it holds,
    not the whole file."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    tables = []
    for s in slices:
        if s.hi <= s.lo:
            continue
        if is_local(s.url):
            with pa.memory_map(local_path(s.url)) as src:
                tables.append(ipc.open_file(src).read_all().slice(s.lo, s.hi - s.lo))
        else:
            tables.append(_read_remote_slice(s.url, s.lo, s.hi, storage_options))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


@retrying
def _read_remote_slice(url: str, lo: int, hi: int, storage_options: dict[str, Any] | None):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    fs, path = get_fs(url, storage_options)
    first, last = lo // ARROW_BATCH_ROWS, (hi - 1) // ARROW_BATCH_ROWS
    with fs.open(path, "rb") as f:
        reader = ipc.open_file(f)
        table = pa.Table.from_batches([reader.get_batch(i) for i in range(first, last + 1)], reader.schema)
    return table.slice(lo - first * ARROW_BATCH_ROWS, hi - lo)


def write_npy(url: str, array, storage_options: dict[str, Any] | None = None) -> None:
    """``array`` as a ``.npy`` file (read back with :func:`read_npy`)."""
    with open_for_write(url, storage_options) as f:
        np.save(f, array, allow_pickle=False)


def read_npy(url: str, storage_options: dict[str, Any] | None = None, mmap: bool = True):
    """The array in the ``.npy`` file ``url`` (``numpy.load``'s result, ``mmap_mode="r"``
    for a local file when ``mmap``), its header read without ``ast`` (see
    :mod:`esm2dask.npyfile`)."""
    if is_local(url):
        path = local_path(url)
        with open(path, "rb") as f:
            head = f.read(4096)
            try:
                dtype, shape, offset = npyfile.parse_header(head, url)
            except EOFError as short:
                f.seek(0)
                dtype, shape, offset = npyfile.parse_header(f.read(short.args[0]), url)
            if not mmap or math.prod(shape) == 0:
                f.seek(offset)
                return np.fromfile(f, dtype=dtype, count=math.prod(shape)).reshape(shape)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        dtype, shape, offset = npyfile.parse_header(data, url)
    except EOFError:
        raise Esm2DaskError(f"{url}: a .npy file cut short (is the staging folder damaged?)") from None
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
