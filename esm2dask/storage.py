"""File access through fsspec, so that every path may also be a URL (``s3://…``).

Only small, picklable descriptions of files travel to the workers; each task opens
its own file here.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from .errors import ConfigError, InputError

#: Magic numbers of compressed formats we refuse (byte ranges need plain text).
COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}


def get_fs(url: str, storage_options: dict[str, Any] | None = None):
    """The filesystem and the path within it for ``url`` (a local path or any fsspec URL)."""
    return url_to_fs(url, **(storage_options or {}))


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join path parts the way both local paths and URLs expect (always ``/``)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def parse_storage_options(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--storage-options is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return value


def file_size(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Size in bytes; a missing file is an :class:`InputError`."""
    fs, path = get_fs(url, storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise InputError(url, "", "no such file (or no such bucket)") from None
    except PermissionError as err:
        raise InputError(url, "", f"access denied ({err})") from None
    if info.get("type") == "directory":
        raise InputError(url, "", "is a directory, expected a file")
    return int(info["size"])


def check_input_file(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Size of an input file after checking it exists, is not empty and is not compressed."""
    size = file_size(url, storage_options)
    if size == 0:
        raise InputError(url, "byte 0", "file is empty")
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        head = f.read(8)
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
    return fsspec.open(url, mode, **(storage_options or {})).open()


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def makedirs(url: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = get_fs(url, storage_options)
    fs.makedirs(path, exist_ok=True)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


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
            except (OSError, TimeoutError, ConnectionError) as err:
                if attempt == RETRY_ATTEMPTS - 1:
                    raise
                delay = RETRY_BASE_DELAY_S * 2**attempt
                logging.getLogger("esm2dask").warning(
                    "%s failed (%s: %s); retrying in %.1f s", fn.__name__, type(err).__name__, err, delay
                )
                time.sleep(delay)

    return wrapper
