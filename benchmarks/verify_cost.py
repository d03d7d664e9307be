"""What checking the contract costs: ``esm2dask verify`` of a tree in all three layouts, next
to the floor of reading every file once (SHA-256 of each, one thread), and what hashing the
copied inputs adds to ``preprocess`` (its checksum stage, with and without
``--no-copy-inputs``), side by side on the same input in one run.

    python -m benchmarks.verify_cost [--clusters 100000] [--workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .common import ESM2DASK, RESULTS, dataset, folder_bytes


def _preprocess(raw: Path, out: Path, workers: str, *extra: str) -> dict:
    cmd = [*ESM2DASK, "preprocess", str(raw), "-o", str(out), "--plain", "--workers", workers,
           "--dashboard-address", ":0", "--format", "esm2nv,bionemo2,hf", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - start
    manifest = json.loads((out / "esm2dask-manifest.json").read_text())
    return {"wall_s": round(wall, 2), "checksum_stage_s": round(manifest["stage_seconds"].get("checksum", 0.0), 2)}


def _verify(out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([*ESM2DASK, "verify", str(out)], check=True, capture_output=True)
    return round(time.perf_counter() - start, 2)


def _read_floor(out: Path) -> float:
    start = time.perf_counter()
    for p in sorted(out.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                hashlib.file_digest(f, "sha256")
    return round(time.perf_counter() - start, 2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clusters", type=int, default=100_000)
    ap.add_argument("--workers", default="2")
    args = ap.parse_args(argv)
    raw = dataset(args.clusters)
    work = Path(tempfile.mkdtemp(dir=raw.parent))
    try:
        copied, bare = work / "copied", work / "bare"
        run_copied = _preprocess(raw, copied, args.workers)
        run_bare = _preprocess(raw, bare, args.workers, "--no-copy-inputs")
        rows = {
            "verify, inputs copied (their SHA-256 checked)": _verify(copied),
            "verify, --no-copy-inputs": _verify(bare),
            "read floor: SHA-256 of every file, inputs copied": _read_floor(copied),
            "read floor: SHA-256 of every file, --no-copy-inputs": _read_floor(bare),
        }
        sizes = {"copied": folder_bytes(copied), "bare": folder_bytes(bare)}
    finally:
        shutil.rmtree(work)
    command = f"python -m benchmarks.verify_cost --clusters {args.clusters} --workers {args.workers}"
    lines = [
        "# verify: the cost of checking the contract", "", f"Reproduce: `{command}`", "",
        f"Machine: {os.cpu_count()} cores, shared; measured {time.strftime('%Y-%m-%d %H:%M')}. Input "
        f"{folder_bytes(raw) / 1e6:.0f} MB (`synth --clusters {args.clusters} --seed 1`); trees of "
        f"{sizes['copied'] / 1e6:.0f} MB (inputs copied) and {sizes['bare'] / 1e6:.0f} MB, all three layouts.", "",
        "| what | wall s |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows.items()], "",
        "| preprocess | wall s | checksum stage s |", "|---|---|---|",
        f"| inputs copied (hashed in the checksum stage) | {run_copied['wall_s']} | {run_copied['checksum_stage_s']} |",
        f"| --no-copy-inputs | {run_bare['wall_s']} | {run_bare['checksum_stage_s']} |",
    ]
    (RESULTS / "verify_cost.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "verify_cost.json").write_text(json.dumps({"verify": rows, "copied": run_copied, "bare": run_bare,
                                                          "bytes": sizes}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
