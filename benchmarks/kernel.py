"""The FASTA kernel alone, before and after issue 16, side by side in one run.

    python -m benchmarks.kernel [--clusters 200000] [--block-size 64MiB] [--blocks 3] [--repeats 5] [--small]

One core (one thread; the kernel releases the GIL but runs on one), in-memory blocks of
``--block-size`` cut at record starts from the member FASTA of ``synth --clusters N
--seed 1`` (80 columns), and the same records re-wrapped at 60 columns (UniProt's width)
and on one line each. For each input, interleaved, best of ``--repeats``:

- the convert pass: ``convert_block`` (upper-casing, with ids: the uf90 path) of the kernel
  before issue 16 (``benchmarks/kernel_before.py``, a scalar table lookup per byte) and of
  the kernel now (``esm2dask/kernel.py``); the rows must be identical, byte for byte;
- the count pass on the block in memory: both kernels' ``count_records`` and
  ``bytes.count(b"\\n>")``;
- the count pass as the task runs it (``tasks.count_fasta``, synth file only, page cache
  warm): before, ``read()`` of the range then a count; now, a local file is mapped;
- floors: a copy of the block (numpy, into fresh memory and into memory already touched).

Each time is taken twice: wall clock and the thread's CPU time (``time.thread_time``).
This project's machine is shared (2 vCPUs, often a load of 10-20): CPU time is the
steadier of the two there, and the ratio between rows of one run is what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from . import common, kernel_before
from .common import StudyClock, add_small, apply_small, bars, dataset

MEMBER_FASTA = "uniref90membersandreps_ur50trainfiltreps.fasta"


def _blocks(path, block_bytes: int, limit: int) -> list[bytes]:
    """Up to ``limit`` blocks of whole records, each about ``block_bytes`` long."""
    blocks, carry = [], b""
    with open(path, "rb") as f:
        while len(blocks) < limit:
            chunk = f.read(block_bytes)
            if not chunk:
                if carry:
                    blocks.append(carry)
                break
            data = carry + chunk
            cut = data.rfind(b"\n>") + 1
            blocks.append(data[:cut])
            carry = data[cut:]
    return blocks


def rewrap(block: bytes, width: int) -> bytes:
    """The same records with their sequences wrapped at ``width`` (0: one line)."""
    out = []
    for record in block[1:].split(b"\n>"):
        head, _, body = record.partition(b"\n")
        seq = body.replace(b"\n", b"")
        out.append(b">" + head + b"\n")
        if width:
            out.append(b"\n".join(seq[i : i + width] for i in range(0, len(seq), width)))
        else:
            out.append(seq)
        out.append(b"\n")
    return b"".join(out)


def _timed(fn, arg):
    wall, cpu = time.perf_counter(), time.thread_time()
    result = fn(arg)
    return result, time.perf_counter() - wall, time.thread_time() - cpu


def _convert_old(block):
    return kernel_before.convert_block(block, 0, "bench", uppercase=True, first_id=1).rows.data


def _convert_new(block):
    from esm2dask.kernel import convert_block

    return convert_block(block, 0, "bench", uppercase=True, first_id=1).rows.data


def _count_old(block):
    return kernel_before.count_records(kernel_before.as_array(block))


def _count_new(block):
    from esm2dask.kernel import as_array, count_records

    return count_records(as_array(block))


def _count_bytes(block):
    return block.count(b"\n>") + (block[:1] == b">")


def _copy_fresh(block):
    return np.array(np.frombuffer(block, dtype=np.uint8))


def _copy_warm(block, _out={}):
    src = np.frombuffer(block, dtype=np.uint8)
    out = _out.get(len(src))
    if out is None:
        out = _out[len(src)] = np.ones(len(src), dtype=np.uint8)
    np.copyto(out, src)
    return out


def _count_read(byte_range):
    """The count task before issue 16: ``read()`` the owned bytes, then count."""
    from esm2dask.ranges import read_owned_bytes

    with open(byte_range.url, "rb") as f:
        _, data = read_owned_bytes(f, byte_range)
    return kernel_before.count_records(kernel_before.as_array(data))


def _count_task(byte_range):
    from esm2dask.tasks import count_fasta

    return count_fasta(byte_range, {}).n_records  # the digest rides along (see digest_cost)


def measure(cases: dict, inputs: list, repeats: int) -> dict[str, dict]:
    """Best wall and CPU seconds of each case over ``inputs``, cases interleaved per repeat."""
    best = {label: {"wall_s": float("inf"), "cpu_s": float("inf"), "results": None} for label in cases}
    for _ in range(repeats):
        for label, fn in cases.items():
            wall = cpu = 0.0
            results = []
            for item in inputs:
                result, w, c = _timed(fn, item)
                results.append(result)
                wall += w
                cpu += c
            b = best[label]
            b["wall_s"], b["cpu_s"] = min(b["wall_s"], wall), min(b["cpu_s"], cpu)
            b["results"] = results
            del results, result
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", type=int, default=200_000)
    ap.add_argument("--block-size", default="64MiB")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    add_small(ap, clusters=20_000, block_size="4MiB", blocks=4, repeats=3)
    args = ap.parse_args(argv)
    clock, suffix = StudyClock(), apply_small(args)
    from dask.utils import parse_bytes

    from esm2dask.kernel import CHUNK_BYTES
    from esm2dask.ranges import plan_ranges

    command = ("python -m benchmarks.kernel " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    path = dataset(args.clusters) / MEMBER_FASTA
    block_bytes = parse_bytes(args.block_size)
    synth_blocks = _blocks(path, block_bytes, args.blocks)
    inputs = {"synth, 80 columns": synth_blocks,
              "60 columns": [rewrap(b, 60) for b in synth_blocks],
              "one line per sequence": [rewrap(b, 0) for b in synth_blocks]}
    # compiled (or loaded from numba's cache) before any timing
    warm = synth_blocks[0][:20_000].rsplit(b"\n>", 1)[0]
    for fn in (_convert_old, _convert_new, _count_old, _count_new):
        fn(warm)

    rows = []
    identical = True
    for name, blocks in inputs.items():
        mb = sum(map(len, blocks)) / 1e6
        convert = measure({"convert, before": _convert_old, "convert, now": _convert_new}, blocks, args.repeats)
        same = [bytes(a) == bytes(b) for a, b in zip(convert["convert, before"]["results"], convert["convert, now"]["results"])]
        identical &= all(same)
        count = measure({"count in memory, before": _count_old, "count in memory, now": _count_new,
                         "count in memory, bytes.count": _count_bytes,
                         "copy into fresh memory (floor)": _copy_fresh,
                         "copy into touched memory (floor)": _copy_warm}, blocks, args.repeats)
        counts = {label: count[label]["results"] for label in list(count)[:3]}
        identical &= len({tuple(v) for v in counts.values()}) == 1
        for label, b in {**convert, **count}.items():
            rows.append({"input": name, "case": label, "mb": round(mb, 1), "wall_s": round(b["wall_s"], 4),
                         "cpu_s": round(b["cpu_s"], 4), "mb_per_s_wall": round(mb / b["wall_s"]),
                         "mb_per_s_cpu": round(mb / max(b["cpu_s"], 1e-6))})
        del convert, count
    # the count task on the file itself (page cache warm after the reads above)
    ranges = plan_ranges(str(path), os.path.getsize(path), block_bytes)[: args.blocks]
    with open(path, "rb") as f:
        owned_mb = sum(len(f.read(r.length)) for r in ranges) / 1e6  # and warms the page cache
    task = measure({"count task from the file, before (read + count)": _count_read,
                    "count task from the file, now (tasks.count_fasta)": _count_task}, ranges, args.repeats)
    identical &= task["count task from the file, before (read + count)"]["results"] == \
        task["count task from the file, now (tasks.count_fasta)"]["results"]
    for label, b in task.items():
        rows.append({"input": "synth, 80 columns, file", "case": label, "mb": round(owned_mb, 1),
                     "wall_s": round(b["wall_s"], 4), "cpu_s": round(b["cpu_s"], 4),
                     "mb_per_s_wall": round(owned_mb / b["wall_s"]), "mb_per_s_cpu": round(owned_mb / max(b["cpu_s"], 1e-6))})
    for r in rows:
        print(r)

    def speedup(inp, before, now):
        get = {(r["input"], r["case"]): r for r in rows}
        # a smoke-sized input can take less CPU time than the clock resolves
        return max(get[(inp, before)]["cpu_s"], 1e-6) / max(get[(inp, now)]["cpu_s"], 1e-6)

    lines = [
        "# The FASTA kernel alone: before and after issue 16", "",
        f"Reproduce: `{command}`", "",
        f"Machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; one thread; "
        f"measured {time.strftime('%Y-%m-%d %H:%M')}. Blocks of {args.block_size} cut at record starts, "
        f"{len(synth_blocks)} of them per input, from `{MEMBER_FASTA}` of `synth --clusters {args.clusters} --seed 1`; "
        f"chunk width {CHUNK_BYTES} bytes. Best of {args.repeats}, cases interleaved. "
        f"Rows and counts identical between before and now: {'yes' if identical else 'NO'}.", "",
        "| input | case | MB | best wall s | best CPU s | MB/s (wall) | MB/s (CPU time) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['input']} | {r['case']} | {r['mb']} | {r['wall_s']} | {r['cpu_s']} | {r['mb_per_s_wall']} | "
              f"{r['mb_per_s_cpu']} |" for r in rows]
    lines += ["", "Speed-up of the convert pass (CPU time, now ÷ before): " + ", ".join(
        f"{inp} {speedup(inp, 'convert, before', 'convert, now'):.2f}×" for inp in inputs) + "; of the count "
        f"task from the file: {speedup('synth, 80 columns, file', *task.keys()):.2f}×.", "", clock.line()]
    results = common.RESULTS  # looked up now: the smoke test points it elsewhere
    results.mkdir(parents=True, exist_ok=True)
    (results / f"kernel{suffix}.md").write_text("\n".join(lines) + "\n")
    (results / f"kernel{suffix}.json").write_text(json.dumps(
        {"command": command, "identical": identical, "rows": rows}, indent=2) + "\n")
    picked = [r for r in rows if r["case"].startswith(("convert", "count task"))]
    bars("kernel" + suffix, "the FASTA kernel alone, one core (MB/s of input, CPU time)",
         [f"{r['input'].split(',')[0]}\n{r['case'].replace('count task from the file, ', 'count task ')}" for r in picked],
         {"MB/s": [r["mb_per_s_cpu"] for r in picked]}, "input and case", "MB/s")
    if not identical:
        raise SystemExit("the kernels' outputs differ")


if __name__ == "__main__":
    main()
