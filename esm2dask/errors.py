"""The project's exceptions: one base class, a few specific kinds.

The CLI catches :class:`Esm2DaskError` in one place and prints its message; every
message names what failed (a file, a byte offset or line) and, where there is one, the fix.
"""

from __future__ import annotations

import errno


class Esm2DaskError(Exception):
    """Base class: a failure the user can act on. Printed without a traceback."""


class InputError(Esm2DaskError):
    """Bad input data: names the file and the place (byte offset, line or record)."""

    def __init__(self, path: str, where: str, message: str):
        self.path = path
        self.where = where
        self.message = message
        super().__init__(path, where, message)

    def __str__(self) -> str:
        place = f" ({self.where})" if self.where else ""
        return f"{self.path}{place}: {self.message}"


class ConfigError(Esm2DaskError):
    """Options that cannot work together, or a value out of range."""


class OutputError(Esm2DaskError):
    """The output location is unusable (exists, unwritable, …)."""


class ExternalCommandError(Esm2DaskError):
    """An external command (``ngc``) failed; carries its exit code and message."""

    def __init__(self, command: str, returncode: int, message: str):
        self.command = command
        self.returncode = returncode
        self.message = message
        super().__init__(command, returncode, message)

    def __str__(self) -> str:
        return f"{self.command} failed (exit {self.returncode}): {self.message}"


class Interrupted(Esm2DaskError):
    """Ctrl-C: the run stopped; the message says what was kept and how to go on."""

    exit_code = 130


class UnexpectedError(Esm2DaskError):
    """A failure esm2dask did not foresee (a library's or its own): one line on the terminal;
    its traceback goes to the run's log file."""


#: How an OSError reads in a message: words, never ``[Errno 13]`` or a class name.
_OS_ERROR_WORDS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "is a folder",
    errno.ENOSPC: "no space left on the file system",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.ELOOP: "too many symbolic links",
    errno.ENAMETOOLONG: "name too long",
    errno.EIO: "input/output error",
    errno.ETIMEDOUT: "timed out",
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
}


def reason(err: BaseException) -> str:
    """What went wrong, in words for a message: no class name, no errno number."""
    if isinstance(err, OSError) and err.errno in _OS_ERROR_WORDS:
        return _OS_ERROR_WORDS[err.errno]
    if isinstance(err, OSError) and err.strerror:
        return err.strerror[:1].lower() + err.strerror[1:]
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if text.startswith("[Errno") and "] " in text:
        text = text.split("] ", 1)[1]
    return text or "no message"


def describe_os_error(err: OSError) -> str:
    """An I/O failure in words, naming the file: ``/out/x.csv: no space left on the file
    system``; never the exception's class name or its ``[Errno N]`` prefix.

    >>> describe_os_error(FileNotFoundError(2, "No such file or directory", "/raw/a.fasta"))
    '/raw/a.fasta: no such file or folder'
    >>> describe_os_error(OSError("connection reset"))
    'connection reset'
    """
    where = err.filename
    if where is not None and err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    return f"{where}: {reason(err)}" if where is not None else reason(err)
