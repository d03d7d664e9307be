"""Task receipts as plain JSON: what ``--resume`` reads back from the staging folder.

A receipt lives in OUT (a shared workspace, a bucket), so whoever can write there could
hand the driver a forged one. Receipts are therefore data, never code: JSON values, and
dataclasses rebuilt only from the types registered here, by name, field by field. An
unknown type is an error; nothing read back is unpickled or executed.

Registering a receipt type is one line, next to the classes (``esm2dask/tasks.py``)::

    receipts.register(MappingReceipt, FastReceipt, BucketReceipt, JoinReceipt)

>>> from dataclasses import dataclass
>>> @dataclass
... class Example:
...     n: int
...     urls: list
>>> _ = register(Example)
>>> decode(encode(Example(3, ["a", "b"])))
Example(n=3, urls=['a', 'b'])
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from . import storage
from .errors import Esm2DaskError

#: registered receipt types by name
_TYPES: dict[str, type] = {}
#: the key that marks an encoded dataclass
TYPE_KEY = "$receipt"


class ReceiptError(Esm2DaskError):
    """A receipt that cannot be read back (unknown type, bad fields, not JSON)."""


def register(*classes: type) -> type:
    """Allow these dataclasses as receipts (usable as a decorator too); returns the first."""
    for cls in classes:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass")
        known = _TYPES.get(cls.__name__)
        if known is not None and known is not cls and known.__qualname__ != cls.__qualname__:
            raise TypeError(f"two receipt types are named {cls.__name__}")
        _TYPES[cls.__name__] = cls
    return classes[0]


def _to_json(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if _TYPES.get(name) is not type(value):
            raise TypeError(f"{name} is not a registered receipt type (esm2dask.receipts.register)")
        fields = {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {TYPE_KEY: name, "fields": fields}
    if isinstance(value, dict):
        if TYPE_KEY in value:
            raise TypeError(f"a receipt's dict may not use the key {TYPE_KEY!r}")
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_to_json(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a receipt cannot hold {type(value).__name__} values")


def _from_json(value, where: str):
    if isinstance(value, list):
        return [_from_json(v, where) for v in value]
    if not isinstance(value, dict):
        return value
    if TYPE_KEY not in value:
        return {k: _from_json(v, where) for k, v in value.items()}
    name = value[TYPE_KEY]
    cls = _TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ReceiptError(f"{where}: unknown receipt type {name!r}; run without --resume to start over")
    fields = value.get("fields")
    known = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(fields, dict) or set(fields) - known:
        raise ReceiptError(f"{where}: the fields of this {name} receipt are not {cls.__name__}'s")
    try:
        return cls(**{k: _from_json(v, where) for k, v in fields.items()})
    except TypeError as err:
        raise ReceiptError(f"{where}: bad {name} receipt ({err})") from None


def encode(value) -> bytes:
    """JSON bytes of a task's result: JSON values and registered dataclasses, nested."""
    return json.dumps({"receipt": _to_json(value)}, sort_keys=True).encode()


def decode(data: bytes, where: str = "receipt"):
    """The value :func:`encode` wrote; a :class:`ReceiptError` for anything else."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReceiptError(f"{where}: not a JSON receipt ({err})") from None
    if not isinstance(document, dict) or "receipt" not in document:
        raise ReceiptError(f"{where}: not a JSON receipt")
    return _from_json(document["receipt"], where)


def recorded(fn, receipt_url: str, storage_options: dict, *args):
    """Run ``fn(*args)`` and keep its receipt, so that ``--resume`` can skip it next time."""
    result = fn(*args)
    data = encode(result)
    storage.write_whole(receipt_url, [data], storage_options)  # a receipt is there whole or not at all
    return result


def load(receipt_url: str, storage_options: dict, inside: str | None = None):
    """A receipt written by :func:`recorded`, decoded as data. With ``inside`` (the run's
    staging folder), every file a receipt names (fields ``url``, ``path``, ``*_url``,
    ``*_urls``) must lie in that folder, by a plain path: a receipt never sends a task to
    read or write anywhere else."""
    fs, path = storage.get_fs(receipt_url, storage_options)
    with fs.open(path, "rb") as f:
        value = decode(f.read(), receipt_url)
    if inside is not None:
        _check_urls(value, inside.rstrip("/") + "/", receipt_url)
    return value


def _is_file_field(name: str) -> bool:
    return name in ("url", "path") or name.endswith("_url") or name.endswith("_urls")


def _check_urls(value, prefix: str, where: str, field_name: str = "") -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _check_urls(getattr(value, f.name), prefix, where, f.name)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_urls(v, prefix, where, field_name)
    elif isinstance(value, dict):
        for v in value.values():
            _check_urls(v, prefix, where, field_name)
    elif _is_file_field(field_name) and value is not None:
        rest = value[len(prefix):] if isinstance(value, str) and value.startswith(prefix) else None
        if rest is None or any(p in ("", ".", "..") for p in rest.split("/")) or "\\" in rest:
            raise ReceiptError(f"{where}: names {value!r}, outside this run's staging folder; run without "
                               f"--resume (with --overwrite) to start over")
