"""What every verifier shares (``verify`` of an ESM2 tree, of a FLIP tree): the report
it fills and the listing of a folder's shards. A leaf, so that the verifiers import it and
never each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

_SHARD_RE = re.compile(r"^x(\d{3})\.csv$")


@dataclass
class VerifyReport:
    root: str
    problems: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    checked: list[str] = field(default_factory=list)
    #: SHA-256 of each file read while checking, by path (checked against the manifest)
    digests: dict[str, str] = field(default_factory=dict)
    #: rows of each shard of each ESM2nv folder, in file order (to name a row's file and line)
    shard_rows: dict[str, list[int]] = field(default_factory=dict)

    def place(self, split_dir: str, row: int) -> str:
        """``uf90/uf90_csvs/x003.csv line 17`` for 0-based ``row`` of a folder."""
        ends = np.cumsum(self.shard_rows[split_dir])
        k = int(np.searchsorted(ends, row, side="right"))
        first = int(ends[k - 1]) if k else 0
        return f"{split_dir}/x{k:03d}.csv line {row - first + 2}"

    @property
    def ok(self) -> bool:
        return not self.problems


def list_shards(fs, path: str, label: str, problems: list[str], expected_files: int | None) -> list[str]:
    if not fs.exists(path):
        problems.append(f"{label}/: missing")
        return []
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    shards = [n for n in names if _SHARD_RE.match(n)]
    others = [n for n in names if not _SHARD_RE.match(n) and not n.endswith(".mmap")]
    if others:
        problems.append(f"{label}/: unexpected file(s) {', '.join(others[:5])}")
    want = expected_files or len(shards)
    expected = [f"x{i:03d}.csv" for i in range(want)]
    if shards != expected:
        missing = sorted(set(expected) - set(shards))
        extra = sorted(set(shards) - set(expected))
        if missing:
            problems.append(f"{label}/: missing {', '.join(missing[:5])}")
        if extra:
            problems.append(f"{label}/: extra {', '.join(extra[:5])} (training would shift every offset)")
    return [f"{path}/{n}" for n in expected if n in shards]
