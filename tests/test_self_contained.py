"""A clone of the repository is the whole product: nothing tracked points outside it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# spelled in two parts so that this file does not match itself
OUTSIDE = ("../" + "shared", "shared" + "/spec", "shared" + "/data", "shared" + "/reference")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_refers_outside_the_repository():
    offenders = []
    for path in tracked_files():
        if not path.is_file() or path.suffix in (".png", ".mmap", ".gz", ".arrow"):
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        offenders += [f"{path.relative_to(REPO)}: {needle}" for needle in OUTSIDE if needle in text]
    assert offenders == []


def test_the_documents_the_code_cites_are_here():
    cited = set()
    for path in tracked_files():
        if path.suffix == ".py":
            text = path.read_text()
            words = (word.strip("`'\"(),.:") for word in text.split())
            cited |= {w for w in words if w.startswith("docs/") and w.endswith(".md")}
    assert cited, "no docs/ citation found"
    for doc in cited:
        assert (REPO / doc).is_file(), doc
