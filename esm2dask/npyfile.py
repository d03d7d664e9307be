"""Reading the ``.npy`` files esm2dask writes (split labels, id hashes, row indexes) without
numpy's header parser.

numpy reads a ``.npy`` header, a Python dict literal, with ``ast.literal_eval``; CPython
3.11's AST constructor is not thread-safe, and in-process thread workers that read headers
at the same moment failed with "SystemError: AST constructor recursion depth mismatch". The
headers ``numpy.save`` writes for our arrays have one fixed form
(``{'descr': '<u8', 'fortran_order': False, 'shape': (5,), }``), parsed here with a regular
expression (:func:`parse_header`); :func:`esm2dask.storage.read_npy` then memory-maps the
data or takes it from the bytes, as numpy would.
"""

from __future__ import annotations

import re

import numpy as np

from .errors import Esm2DaskError

MAGIC = b"\x93NUMPY"
_HEADER = re.compile(
    r"\{'descr': '(?P<descr>[<>|=]?[a-zA-Z]\d*)', 'fortran_order': (?P<fortran>False|True), "
    r"'shape': \((?P<shape>[0-9, ]*)\), ?\}"
)


def parse_header(head: bytes, url: str = "") -> tuple[np.dtype, tuple[int, ...], int]:
    """``(dtype, shape, data offset)`` of a ``.npy`` file from its first bytes.

    >>> import io
    >>> buf = io.BytesIO(); np.save(buf, np.zeros((3, 2), "<i8"))
    >>> parse_header(buf.getvalue())
    (dtype('int64'), (3, 2), 128)
    """
    if not head.startswith(MAGIC) or len(head) < 10:
        raise Esm2DaskError(f"{url}: not a .npy file (esm2dask wrote it: is the staging folder damaged?)")
    major = head[6]
    size_bytes = 2 if major == 1 else 4
    start = 8 + size_bytes
    header_len = int.from_bytes(head[8:start], "little")
    if len(head) < start + header_len:
        raise EOFError(start + header_len)
    match = _HEADER.fullmatch(head[start : start + header_len].decode("latin-1").strip())
    if match is None or match["fortran"] == "True":
        raise Esm2DaskError(f"{url}: a .npy header esm2dask does not write (is the staging folder damaged?)")
    shape = tuple(int(x) for x in match["shape"].replace(" ", "").split(",") if x)
    return np.dtype(match["descr"]), shape, start + header_len
