"""The project's exceptions: one base class, a few specific kinds.

The CLI catches :class:`Esm2DaskError` in one place and prints its message; every
message names what failed (a file, a byte offset or line) and, where there is one, the fix.
"""

from __future__ import annotations


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


def describe_os_error(err: OSError) -> str:
    """An I/O failure in words, naming the file: ``/out/x.csv: no space left on device``;
    never the exception's class name or its ``[Errno N]`` prefix.

    >>> describe_os_error(FileNotFoundError(2, "No such file or directory", "/raw/a.fasta"))
    '/raw/a.fasta: no such file or directory'
    >>> describe_os_error(OSError("connection reset"))
    'connection reset'
    """
    what = err.strerror or (str(err.args[0]) if err.args else "input/output error")
    what = what[:1].lower() + what[1:]
    where = err.filename if err.filename is not None else None
    if where is not None and err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    return f"{where}: {what}" if where is not None else what
