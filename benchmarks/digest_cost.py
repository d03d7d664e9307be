"""What identifying a local input by content costs: the digest each first-stage task now
takes of the bytes it read (``storage.content_digest``, XXH3-128), side by side with the
work that task already did on the same bytes (the kernel's record count), per 64 MiB range.

    python -m benchmarks.digest_cost [--mib 64] [--repeat 5]

Writes ``benchmarks/results/digest_cost.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import time
import zlib
from pathlib import Path

import numpy as np
import xxhash

from esm2dask.kernel import as_array, count_records

RESULTS = Path(__file__).parent / "results" / "digest_cost.md"


def fasta_bytes(mib: int, seed: int = 0) -> bytes:
    """UniRef-like records (300 aa, 60 per line) filling ``mib`` MiB."""
    rng = np.random.default_rng(seed)
    residues = np.frombuffer(b"ARNDCQEGHILKMFPSTWYV", dtype=np.uint8)
    seq = residues[rng.integers(0, len(residues), 300)].tobytes()
    record = b">UniRef90_A0A000000 n=1\n" + b"\n".join(seq[i : i + 60] for i in range(0, 300, 60)) + b"\n"
    return record * (mib * 2**20 // len(record))


def best_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    data = fasta_bytes(args.mib)
    array = as_array(data)
    count_records(array)  # compile
    rows = [
        ("count_records (the count task's own work)", best_seconds(lambda: count_records(array), args.repeat)),
        ("xxh3-128 (content_digest)", best_seconds(lambda: xxhash.xxh3_128(data).digest(), args.repeat)),
        ("sha256 (content_digest until 2026-12-02)", best_seconds(lambda: hashlib.sha256(data).digest(), args.repeat)),
        ("blake2b-128 (for comparison)", best_seconds(lambda: hashlib.blake2b(data, digest_size=16).digest(), args.repeat)),
        ("zlib.crc32 (for comparison; not a digest)", best_seconds(lambda: zlib.crc32(data), args.repeat)),
    ]
    mb = len(data) / 1e6
    lines = [
        "# Cost of the content digest (issue 20, item 12; XXH3 since issue 16)",
        "",
        f"One range of {len(data) / 2**20:.0f} MiB in memory, best of {args.repeat}, one thread; "
        f"command: `python -m benchmarks.digest_cost --mib {args.mib} --repeat {args.repeat}`.",
        "",
        "| step | seconds | MB/s |",
        "|---|---|---|",
        *[f"| {name} | {s:.4f} | {mb / s:,.0f} |" for name, s in rows],
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
