"""File access through fsspec, so that every path may also be a URL (``s3://…``).

Only small, picklable descriptions of files travel to the workers; each task opens
its own file here. This module is the storage seam: what differs between a local file
system and an object store is decided here, behind calls that read the same either way;
:func:`is_local` is the one test of which it is, and callers outside this module ask it
only for policy (the few places that say why).

- Writing whole or not at all: :func:`built_in_place` (a temporary beside the file, then
  a rename), :func:`write_whole` (also the manifest, its temporary in the staging folder),
  :func:`local_build` (a local path to build a URL at), :func:`copy_hashed` (an input
  copy, hashed as it is copied), :func:`ensure_parent`.
- Pieces into files: :func:`write_at` (``pwrite`` into a shard made at its final size),
  :func:`concatenate` and :func:`concatenate_pieces` (on a file system the first piece
  becomes the file, the others appended in the kernel; copied on an object store).
- Reading: :func:`read_head`, :func:`open_input` and :func:`range_view` (a byte range,
  memory-mapped where local), :func:`content_digest`, :func:`read_csv_rows`, the Arrow
  files' :func:`read_arrow` and :func:`read_arrow_slices` (a slice reads only its record
  batches), the ``.npy`` files' :func:`read_npy` (memory-mapped where local; no ``ast``).
- Local copies: :func:`local_source` and :func:`local_copy` (a local path holding a file),
  :func:`cached_local` (a download kept in a cache), :class:`WorkingCopy` (a local file
  standing for a URL while it is written, the run's log), :func:`build_folder` and
  :func:`replace_folder` (a tree built locally, then renamed or uploaded into place).
- Safety under the output folder, each a no-op on an object store (no links, no
  temporaries, no folders of its own): :func:`refuse_links_on_the_way`,
  :func:`refuse_links_in`, :func:`link_target`, :func:`is_plain_file`,
  :func:`is_plain_folder`, :func:`remove_temporaries`, :func:`remove_empty_folders`;
  questions about folders: :func:`exists`, :func:`folder_missing`, :func:`blocks_folder`,
  :func:`is_inside`, :func:`copies_locally`.
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
import io
import math
import mmap
import os
import shutil
import stat
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import xxhash
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


def _file_system_path(url: str, what: str) -> str:
    """``url``'s path, for a call that works on a file system only (``what``): an object
    store's key would be opened as a relative path under the working folder."""
    if not is_local(url):
        raise ValueError(f"{what} needs a file on a file system, not {url}")
    return local_path(url)


def ensure_parent(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Make ``url``'s parent folder where the store has folders; returns the path to open
    (a file system's own path; the path within the store elsewhere)."""
    if is_local(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return path
    fs, path = get_fs(url, storage_options)
    fs.makedirs(fs._parent(path), exist_ok=True)
    return path


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether anything is at ``url`` (a local link counts, and is not followed)."""
    if is_local(url):
        return os.path.lexists(local_path(url))
    fs, path = get_fs(url, storage_options)
    return fs.exists(path)


def folder_missing(url: str) -> bool:
    """Whether the folder ``url`` is not there (nothing, or not a folder) on a file system;
    never on an object store, where a prefix is no thing of its own (its objects are looked
    for one by one)."""
    return is_local(url) and not os.path.isdir(local_path(url))


def blocks_folder(url: str) -> bool:
    """Whether something other than a folder stands at ``url``, where a folder is to be
    (a file, a link to one); never on an object store, where an object and a prefix of
    the same name live side by side."""
    path = local_path(url)
    return is_local(url) and os.path.lexists(path) and not os.path.isdir(path)


def is_inside(child: str, parent: str) -> bool:
    """Whether the folder ``child`` is ``parent`` or inside it, links resolved, both on a
    file system (never for an object store's URL)."""
    if not (is_local(child) and is_local(parent)):
        return False
    child, parent = os.path.realpath(local_path(child)), os.path.realpath(local_path(parent))
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def copies_locally(src: str, dest: str) -> bool:
    """Whether :func:`copy_hashed` can copy ``src`` to ``dest``: both on a file system."""
    return is_local(src) and is_local(dest)


def link_target(url: str) -> str | None:
    """Where the symbolic link ``url`` leads; None where it is no link (always on an object
    store, which has none)."""
    if not is_local(url) or not os.path.islink(local_path(url)):
        return None
    return os.readlink(local_path(url))


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


def sha256_file(url: str, storage_options: dict[str, Any] | None = None, uncached: bool = False) -> str:
    """Hex SHA-256 of a file (SHA-NI makes it the fastest of hashlib's here, ~1.2 GB/s/core;
    ``sha256sum`` checks it independently). ``uncached``: a local file written past the page
    cache (``O_DIRECT``, as ``train.db``'s pages are) is read the same way where it can be,
    two blocks in flight (:func:`_sha256_direct`)."""
    if uncached and is_local(url):
        digest = _sha256_direct(local_path(url))
        if digest is not None:
            return digest
    fs, path = get_fs(url, storage_options)
    with (open(local_path(url), "rb") if is_local(url) else fs.open(path, "rb")) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha256_direct(path: str) -> str | None:
    """SHA-256 of a file not in the page cache, read with ``O_DIRECT``: a helper thread reads
    the next 8 MiB block while this one hashes the last (0.55 → 0.97 GB/s on a 728 MB file
    just written with ``O_DIRECT``, where the page cache's read-ahead waits on the disk
    block by block). None where the platform or file system refuses direct reads."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECT)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    blocks = _direct_buffers()
    digest, reading = hashlib.sha256(), None
    pool = ThreadPoolExecutor(1, thread_name_prefix="esm2dask-hash")
    try:
        size, offset, k = os.fstat(fd).st_size, 0, 0
        reading = pool.submit(os.preadv, fd, [blocks[0]], 0) if size else None
        while reading is not None:
            n = reading.result()
            if n == 0:
                break  # cut short since: read as any file is, below
            offset += n
            # a short read before the end leaves the next offset unaligned: EINVAL, below
            reading = pool.submit(os.preadv, fd, [blocks[1 - k]], offset) if offset < size else None
            with memoryview(blocks[k]) as view, view[:n] as data:
                digest.update(data)
            k = 1 - k
        if offset != size or os.fstat(fd).st_size != size:
            return None
    except OSError as err:
        if err.errno == errno.EINVAL:  # took the flag at open, not the read
            return None
        raise
    finally:
        _settled(reading)
        pool.shutdown(wait=True)
        os.close(fd)
    return digest.hexdigest()


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
def built_in_place(path: str, tmp_beside: str | None = None):
    """Yield a temporary name beside the local ``path`` (or beside ``tmp_beside``, a name on
    the same file system); when the block ends without an error it is renamed to ``path``
    (which appears whole or not at all), otherwise it is removed. An ``OSError`` that names
    no file (a full disk's) names ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temporary_beside(tmp_beside or path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        err.filename = err.filename or path
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def write_whole(url: str, parts, storage_options: dict[str, Any] | None = None, tmp_dir: str | None = None) -> None:
    """The bytes of ``parts`` (buffers, written one after the other) as the file ``url``,
    there whole or not at all: :func:`built_in_place` on a file system (the temporary in
    the folder ``tmp_dir`` of the same file system when given, else beside the file), one
    upload (an object appears only when its PUT completes) on object storage."""
    if is_local(url):
        tmp_path = None if tmp_dir is None else os.path.join(local_path(tmp_dir), os.path.basename(local_path(url)))
        with built_in_place(local_path(url), tmp_path) as tmp, open(tmp, "wb", buffering=0) as f:
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
    """:func:`place_copy`, and the SHA-256 of the bytes placed.

    Both are files on a file system (paths or ``file://`` URLs); ``dest``'s folder is made.
    A plain copy is read, hashed and written in one loop with ``O_DIRECT`` writes
    (:func:`_copy_direct`): the copy takes no page cache, which on these VMs is new memory
    that costs more than the copy, and which a node needs for the files the run reads
    next. Where direct writes are refused, the kernel copies (``copy_file_range``; a
    read-and-write loop where that is refused too) and the placed file is hashed after.
    Measured on the 806 MB synth FASTA, side by side: direct 1.0 s every time; kernel copy
    and hash 0.7-1.4 s (with the memory's state); one buffered Python loop 2.3 s. A hard link
    or reflink shares the blocks, which are hashed. ``dest`` appears whole or not at all (a
    temporary beside it, then a rename); no link is followed there.
    """
    src, dest = _file_system_path(src, "copy_hashed"), ensure_parent(_file_system_path(dest, "copy_hashed"))
    tmp = temporary_beside(dest)
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
        digest = None
        if how == "copy":
            digest = _copy_direct(src, tmp)
            if digest is None:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
                with open(src, "rb", buffering=0) as fin, open(fd, "wb", buffering=0) as fout:
                    _copy_file(fin, fout)
        if digest is None:
            with open(tmp, "rb") as placed:
                digest = hashlib.file_digest(placed, "sha256").hexdigest()
        os.replace(tmp, dest)
    except OSError as err:
        err.filename = err.filename or dest
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return how, digest


#: bytes per read and direct write of :func:`_copy_direct` (a multiple of any block size)
DIRECT_CHUNK_BYTES = 8 << 20


_DIRECT = threading.local()


def _direct_buffers() -> list[mmap.mmap]:
    """This thread's two page-aligned buffers (as ``O_DIRECT`` wants) of ``DIRECT_CHUNK_BYTES``
    for the direct reads and writes, made on first use and kept: memory a process frees goes
    back to a VM's host within seconds, and taking it again costs ~0.4 GB/s in page faults
    (benchmarks/README.md), as much as the writes themselves. Each user is done with them
    (its helper thread's last read or write waited for) before it returns."""
    blocks = getattr(_DIRECT, "blocks", None)
    if blocks is None:
        blocks = _DIRECT.blocks = [mmap.mmap(-1, DIRECT_CHUNK_BYTES) for _ in range(2)]
    return blocks


def _copy_direct(src: str, dest: str) -> str | None:
    """``src`` copied to the new file ``dest`` with ``O_DIRECT`` writes, read and hashed in
    one loop; its SHA-256, or None where the platform or file system refuses direct writes
    (``dest`` then removed). The copy takes no page cache (a run never reads it again)."""
    with open(src, "rb", buffering=0) as fin:
        return _write_direct(dest, lambda view: _read_full(fin, view))


def _bytes_filler(data):
    """A ``fill`` for :func:`_write_direct` that hands out the bytes of the buffer ``data``."""
    source, done = memoryview(data).cast("B"), 0

    def fill(view: memoryview) -> int:
        nonlocal done
        n = min(len(view), len(source) - done)
        view[:n] = source[done : done + n]
        done += n
        return n

    return fill


def _write_direct(dest: str, fill) -> str | None:
    """The new file ``dest`` written with ``O_DIRECT`` from what ``fill(view)`` puts into each
    page-aligned buffer (it returns how many bytes; fewer than the buffer holds at the end),
    hashed as it goes; its SHA-256, or None where the platform or file system refuses
    direct writes (``dest`` then removed). Two buffers: while one is written (by a helper
    thread; the write waits on the disk and holds no GIL), the next is filled and hashed."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_DIRECT, 0o644)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    views = [memoryview(b) for b in _direct_buffers()]
    digest, offset, writing = hashlib.sha256(), 0, None
    pool = ThreadPoolExecutor(1, thread_name_prefix="esm2dask-copy")
    try:
        k = 0
        while n := fill(views[k]):  # the other buffer may still be being written
            digest.update(views[k][:n])
            padded = -(-n // 4096) * 4096  # the last block written whole, the file cut back after
            if writing is not None:
                writing.result()
            writing = pool.submit(pwrite_all, fd, views[k], offset, padded)
            offset += n
            k = 1 - k
            if n < DIRECT_CHUNK_BYTES:
                break  # the buffer not filled: the end (if a file grows, it is copied as it was)
        if writing is not None:
            writing.result()
            writing = None
        os.ftruncate(fd, offset)
    except BaseException as err:
        _settled(writing)
        os.close(fd)
        if isinstance(err, OSError) and err.errno == errno.EINVAL:  # took the flag at open, not the write
            os.unlink(dest)
            return None
        raise
    finally:
        pool.shutdown(wait=True)
        for v in views:
            v.release()
    os.close(fd)
    return digest.hexdigest()


def write_hashed(url: str, data, storage_options: dict[str, Any] | None = None) -> str:
    """The bytes of the buffer ``data`` as the file ``url`` (there whole or not at all, as
    :func:`local_build` makes it), and their SHA-256: a file built in memory is hashed
    there, never read back. On a file system it is written with ``O_DIRECT`` where that is
    allowed (no page cache: the run never reads it again), else with plain writes."""
    with local_build(url, storage_options) as path:
        digest = _write_direct(path, _bytes_filler(data))
        if digest is None:
            with open(path, "wb") as f:  # buffered: its write() writes all, however long
                f.write(data)
            digest = hashlib.sha256(data).hexdigest()
    return digest


def _read_full(fin, view: memoryview) -> int:
    """Bytes read into ``view``: all of it unless the file ends first (a read may return
    less than asked on some file systems, FUSE and network ones among them)."""
    got = 0
    while got < len(view):
        with view[got:] as rest:
            n = fin.readinto(rest)
        if not n:
            break
        got += n
    return got


def pwrite_all(fd: int, data, offset: int, length: int | None = None) -> None:
    """All of ``data`` (any contiguous buffer; its first ``length`` bytes if given) at byte
    ``offset`` of ``fd``, however little each ``pwrite`` takes. Every view of ``data`` made
    here is released as it is done with, even on an error, so that its buffer (an ``mmap``)
    can be closed after."""
    with memoryview(data) as whole, whole.cast("B") as view:
        end = len(view) if length is None else length
        done = 0
        while done < end:
            with view[done:end] as part:
                done += os.pwrite(fd, part, offset + done)


def _settled(writing) -> None:
    """Wait for a write still in flight (its own error is the one already raised, or lost to
    the one being raised), so that its buffer and descriptor can be closed."""
    if writing is not None:
        try:
            writing.result()
        except BaseException:
            pass


#: what ``copy_file_range`` answers where the kernel or the file systems cannot copy
_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


def _copy_file(fin, fout, chunk: int = 8 << 20) -> None:
    """All of the open file ``fin`` to the new, empty ``fout``: in the kernel where it can,
    else (from where the kernel stopped) read and written ``chunk`` bytes at a time."""
    remaining = os.fstat(fin.fileno()).st_size
    try:
        while remaining > 0:
            sent = os.copy_file_range(fin.fileno(), fout.fileno(), remaining)
            if sent == 0:
                break
            remaining -= sent
    except OSError as err:
        if err.errno not in _NO_KERNEL_COPY:
            raise
    buf = bytearray(chunk)
    view = memoryview(buf)
    while n := fin.readinto(buf):  # a file that grew, or a kernel that refused
        left = view[:n]
        while left:  # an unbuffered write may take part of it
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


def read_npy(url: str, storage_options: dict[str, Any] | None = None, mapped: bool = True):
    """The array in the ``.npy`` file ``url`` (``numpy.load``'s result, ``mmap_mode="r"``
    for a local file when ``mapped``), its header read without ``ast`` (see
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
            if not mapped or math.prod(shape) == 0:
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


# ----------------------------------------------------------------------------- ranges and pieces


def open_input(url: str, storage_options: dict[str, Any] | None = None):
    """``url`` opened for reading in binary: the file itself on a file system (so that
    :func:`range_view` can map it), an fsspec file on an object store."""
    if is_local(url):
        return open(local_path(url), "rb")
    fs, path = get_fs(url, storage_options)
    return fs.open(path, "rb")


@contextlib.contextmanager
def range_view(f, url: str, begin: int, end: int, random: bool = False):
    """Yield bytes ``[begin, end)`` of ``f`` (from :func:`open_input`) as a ``uint8`` array:
    a local file is memory-mapped, not read (the page cache in place, no copy), an object
    store's bytes are read. A file shorter than ``end`` is an ``OSError`` (changed during
    the run)."""
    if not is_local(url):
        f.seek(begin)
        data = f.read(end - begin)
        if len(data) != end - begin:
            raise OSError(f"{url}: short read at byte {begin} ({len(data)} of {end - begin} bytes); "
                          "was the file changed during the run?")
        yield np.frombuffer(data, dtype=np.uint8)
        return
    size = os.fstat(f.fileno()).st_size
    if size < end:
        raise OSError(
            f"{url}: short read at byte {begin} ({max(size - begin, 0)} of {end - begin} "
            "bytes); was the file changed during the run?"
        )
    mapped = mmap.mmap(f.fileno(), end, access=mmap.ACCESS_READ)
    if random:  # records read at random (the join's merge): no read-ahead of the whole file
        mapped.madvise(mmap.MADV_RANDOM)
    else:
        mapped.madvise(mmap.MADV_SEQUENTIAL, begin - begin % mmap.PAGESIZE)
    view = np.frombuffer(mapped, dtype=np.uint8, count=end - begin, offset=begin)
    try:
        yield view
    finally:
        del view
        try:
            mapped.close()
        except BufferError:  # a library still holds a view (numba frees its own later):
            pass  # the map goes with the last reference to it


#: what :func:`content_digest` writes before the hex digits of a range's hash
DIGEST_PREFIX = "xxh3-128:"


def content_digest(url: str, data) -> str:
    """A 128-bit hash of bytes read from ``url`` (XXH3, 13–27 GB/s a core here against SHA-256's
    1.4–1.9 GB/s: ``benchmarks/results/digest_cost.md``), for a file on a file system: what
    ``--resume`` compares to know that the bytes earlier tasks read are the bytes there now (an
    edit in place, even of the same size and with the mtime put back, changes it). Not a
    defence against someone who can write the inputs: they choose the output anyway. (A
    staging folder whose digests were SHA-256 is of an earlier format and is not resumed:
    ``publish.STAGING_FORMAT``.) Empty for an object store, whose ETag/version
    (:func:`input_identity`) already changes with every write."""
    if not is_local(url):
        return ""
    return DIGEST_PREFIX + xxhash.xxh3_128_hexdigest(data)


@retrying
def write_at(url: str, offset: int, payload) -> None:
    """``payload`` at byte ``offset`` of the existing file ``url`` (``pwrite``; a file
    system's file only: an object store has no writes at an offset). A task run again
    writes the same bytes at the same place."""
    path = _file_system_path(url, "write_at")
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)  # a shard the run made: never a link
    try:
        done = 0
        while done < len(payload):
            done += os.pwrite(fd, payload[done:], offset + done)
    except OSError as err:  # name the file (a full disk is said with the file being written)
        raise OSError(err.errno, err.strerror, path) from None
    finally:
        os.close(fd)


#: bytes per read when an object store's pieces are copied into one object
COPY_CHUNK_BYTES = 8 * 1024 * 1024


def _append(out, paths: list[str]) -> None:
    """Append local files to the open unbuffered file ``out``, in the kernel."""
    for path in paths:
        with open(path, "rb") as src:
            remaining = os.fstat(src.fileno()).st_size
            while remaining > 0:
                sent = os.copy_file_range(src.fileno(), out.fileno(), remaining)
                if sent == 0:
                    break
                remaining -= sent


@retrying
def concatenate(url: str, head: bytes, pieces: list[str], storage_options: dict[str, Any] | None = None) -> int:
    """Write ``head`` then every piece (paths on ``url``'s file system), in order, to
    ``url``; returns bytes written. On a file system the pieces are appended in the kernel
    (``copy_file_range``)."""
    if is_local(url):
        with open(local_path(url), "wb", buffering=0) as out:
            out.write(head)
            _append(out, pieces)
            return out.tell()
    fs, out_path = get_fs(url, storage_options)
    size = len(head)
    with fs.open(out_path, "wb") as out:
        out.write(head)
        for piece in pieces:
            with fs.open(piece, "rb") as src:
                while chunk := src.read(COPY_CHUNK_BYTES):
                    out.write(chunk)
                    size += len(chunk)
    return size


def concatenate_pieces(url: str, head: bytes, pieces: list[str], first_bytes: int,
                       storage_options: dict[str, Any] | None = None) -> int:
    """``url`` made of ``pieces`` in order (the first begins with ``head``; only ``head``
    when there are none); returns its size. Safe to repeat after an attempt that finished.

    On a file system the first piece becomes the file itself: cut back to ``first_bytes``
    (which makes a repeated attempt exact), the others appended in the kernel, then
    renamed to ``url``; a file already there is an earlier attempt's. Elsewhere the pieces
    are copied into the object (:func:`concatenate`)."""
    if not is_local(url):
        return concatenate(url, b"" if pieces else head, pieces, storage_options)
    out_path = local_path(url)
    if not pieces:
        if os.path.exists(out_path):
            return os.path.getsize(out_path)  # finished by an earlier attempt
        return concatenate(url, head, [], storage_options)
    first = pieces[0]
    with open(first, "rb") as f:
        carries_header = f.read(len(head)) == head
    if not carries_header and os.path.exists(out_path):
        return os.path.getsize(out_path)  # an earlier attempt finished (its first piece became the file)
    with open(first, "r+b", buffering=0) as out:
        out.truncate(first_bytes)
        out.seek(0, os.SEEK_END)
        _append(out, pieces[1:])
        size = out.tell()
    os.replace(first, out_path)
    return size


def read_csv_rows(url: str, row_lo: int, n_rows: int | None, columns: list[str],
                  storage_options: dict[str, Any] | None = None, **options):
    """Columns ``columns`` of rows ``[row_lo, row_lo + n_rows)`` of the CSV file ``url`` (all
    rows when ``n_rows`` is None) as a polars frame; ``options`` go to polars. A local file
    is scanned (only the rows asked for are parsed); an object store's is read whole."""
    import polars as pl

    if is_local(url):
        frame = pl.scan_csv(local_path(url), glob=False, **options)
        if n_rows is not None:
            frame = frame.slice(row_lo, n_rows)
        return frame.select(columns).collect()
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        data = f.read()
    return pl.read_csv(io.BytesIO(data), columns=columns, **options).slice(row_lo, n_rows)


# ----------------------------------------------------------------------------- local copies


def _is_local_fs(fs) -> bool:
    """Whether the fsspec filesystem ``fs`` is the local one (its paths open as they are)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


@contextlib.contextmanager
def local_copy(fs, path: str):
    """Yield a local path holding the file ``path`` of ``fs`` (for readers of local files
    only, SQLite): the file itself on the local file system, a downloaded copy in a
    temporary folder elsewhere."""
    if _is_local_fs(fs):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="esm2dask-") as folder:
        tmp = os.path.join(folder, path.rstrip("/").rsplit("/", 1)[-1])
        fs.get_file(path, tmp)
        yield tmp


def cached_local(url: str, cache_path: str, download) -> str:
    """A local path holding ``url``'s bytes, for as long as it is needed: the file itself on a
    file system (``FileNotFoundError`` naming it when there is none); elsewhere the local
    ``cache_path``, filled by ``download()`` the first time (which should build it with
    :func:`built_in_place`, so that a cached file is always whole)."""
    if is_local(url):
        path = local_path(url)
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return path
    if not os.path.exists(cache_path):
        download()
    return cache_path


class WorkingCopy:
    """A local file that stands for ``url`` while it is written (a log a handler appends
    to): ``url``'s own file on a file system; elsewhere a temporary file, starting with
    ``url``'s bytes if it exists, sent to its place by :meth:`move_to`."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url, self.storage_options = url, storage_options
        self.in_place = is_local(url)
        if self.in_place:
            self.path = local_path(url)
            return
        fd, self.path = tempfile.mkstemp(prefix="esm2dask-", suffix=f"-{url.rsplit('/', 1)[-1]}")
        os.close(fd)
        fs, path = get_fs(url, storage_options)
        if fs.exists(path):  # e.g. the log of the run this one resumes
            with fs.open(path, "rb") as src, open(self.path, "wb") as dst:
                dst.write(src.read())

    def move_to(self, url: str) -> None:
        """The file is done: put it at ``url`` (a rename on a file system, nothing to do
        for its own ``url`` there; an upload elsewhere, and the temporary file is removed)."""
        if self.in_place:
            if url != self.url:
                os.replace(self.path, local_path(url))
            return
        fs, path = get_fs(url, self.storage_options)
        fs.put_file(self.path, path)
        os.unlink(self.path)

    def drop(self) -> None:
        """Forget the temporary file of an object store's (a file system's file stays)."""
        if not self.in_place:
            os.unlink(self.path)


def build_folder(url: str, name: str) -> str:
    """A new local folder to build a tree in, for :func:`replace_folder` to put under
    ``url``: the folder ``name`` inside ``url`` on a file system (so that the rename stays
    on one file system; ``url`` is made), a temporary folder elsewhere."""
    if is_local(url):
        folder = os.path.join(local_path(url), name)
        os.makedirs(folder, exist_ok=True)
        return folder
    return tempfile.mkdtemp(prefix="esm2dask-")


def replace_folder(folder: str, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """The local ``folder`` becomes ``url``, replacing what is there: a rename on a file
    system, an upload of every file elsewhere (after the old objects are removed)."""
    if is_local(url):
        dest = local_path(url)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(folder, dest)
        return
    fs, dest = get_fs(url, storage_options)
    if fs.exists(dest):
        fs.rm(dest, recursive=True)
    fs.put(folder.rstrip("/") + "/", dest + "/", recursive=True)


# ----------------------------------------------------------------------------- links and leftovers


def _fs_path(url: str) -> str:
    return get_fs(url)[1]


def refuse_links_on_the_way(base: str, rel: str, where: str) -> None:
    """No symbolic link (nor anything but folders and, last, a regular file) from folder
    ``base`` down to ``base/rel``: each part is checked with ``lstat``, never followed. A
    part that does not exist ends the check. Nothing to check on an object store, which
    has no links."""
    if not is_local(base):
        return
    path = _fs_path(base)
    parts = rel.split("/")
    for i, part in enumerate(parts):
        path = os.path.join(path, part)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        last = i == len(parts) - 1
        if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or (last and stat.S_ISREG(mode))):
            what = "a symbolic link" if stat.S_ISLNK(mode) else "not a plain file or folder"
            raise OutputError(
                f"{path}: {what} ({where} names {rel!r}); esm2dask never follows links under the "
                f"output folder: remove it and run again"
            )


def refuse_links_in(url: str, what: str) -> None:
    """No symbolic link (or FIFO, device, socket) anywhere in the folder ``url``: a staging
    folder, or a tree about to be published, holds plain files and folders only. Nothing
    to check on an object store, which has no links."""
    if not is_local(url):
        return
    folder = _fs_path(url)
    try:
        top = os.lstat(folder).st_mode
    except FileNotFoundError:
        return
    entries = [folder] if stat.S_ISLNK(top) or not stat.S_ISDIR(top) else []
    if not entries:
        for root, dirs, files in os.walk(folder):
            for name in (*dirs, *files):
                mode = os.lstat(os.path.join(root, name)).st_mode
                if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                    entries.append(os.path.join(root, name))
    if entries:
        kind = "a symbolic link" if os.path.islink(entries[0]) else "not a plain file or folder"
        raise OutputError(
            f"{entries[0]}: {kind} in {what}; esm2dask never follows links under the output folder: "
            f"remove {folder} and run again"
        )


def is_plain_file(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``url`` is a regular file, not a link (``lstat``, never followed); on an
    object store, whether the object exists."""
    if not is_local(url):
        fs, path = get_fs(url, storage_options)
        try:  # not fs.isfile, which answers False on any error (a throttled request too)
            return fs.info(path)["type"] == "file"
        except FileNotFoundError:
            return False
    try:
        return stat.S_ISREG(os.lstat(_fs_path(url)).st_mode)
    except FileNotFoundError:
        return False


def is_plain_folder(url: str) -> bool:
    """Whether ``url`` is a folder, not a link (``lstat``, never followed); an object
    store's prefix always is (it has no links, and its folders are only names)."""
    if not is_local(url):
        return True
    try:
        return stat.S_ISDIR(os.lstat(_fs_path(url)).st_mode)
    except FileNotFoundError:
        return False


def remove_temporaries(url: str) -> int:
    """Remove the ``*.tmp`` files of writers that died under the folder ``url`` (the caller
    knows no live writer has one); returns how many. An object store has none: an object
    appears only when its upload completes."""
    if not is_local(url):
        return 0
    removed = 0
    for root, _, files in os.walk(_fs_path(url)):
        for name in files:
            if name.endswith(TMP_SUFFIX):
                try:
                    os.unlink(os.path.join(root, name))
                    removed += 1
                except FileNotFoundError:  # its writer just renamed it
                    pass
    return removed


def remove_empty_folders(url: str) -> None:
    """Remove every empty folder under ``url``, deepest first, and ``url`` itself if it is
    left empty (never a file, never through a link). Nothing to do on an object store,
    whose folders are prefixes of objects."""
    if not is_local(url) or not is_plain_folder(url):  # os.walk would follow a link at the top
        return
    for root, _, _ in sorted(os.walk(_fs_path(url)), key=lambda w: -len(w[0])):
        try:
            os.rmdir(root)
        except OSError:
            pass
