"""``synth``: a raw dataset folder shaped like NVIDIA's UniRef50/90 release.

UniRef-like headers, sequence lengths log-normal around 300 aa, cluster sizes mostly
singletons with a long tail (Zipf), amino acids at UniProt background frequencies.
The same ``(clusters, seed)`` always gives the same bytes. With ``unsorted`` the FASTA
records are shuffled out of mapping order (the mapping is unchanged).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .config import MAPPING_TSV, RAW_README, UF50_FASTA, UF90_FASTA, VAL_FASTA
from .errors import ConfigError, OutputError
from .progress import Reporter

AMINO_ACIDS = b"ARNDCQEGHILKMFPSTWYV"
# UniProtKB/Swiss-Prot background frequencies (%), in the order above.
AA_PERCENT = [8.25, 5.53, 4.06, 5.45, 1.37, 3.93, 6.75, 7.07, 2.27, 5.96,
              9.66, 5.84, 2.42, 3.86, 4.70, 6.56, 5.34, 1.08, 2.92, 6.87]
SPECIES = ["HUMAN", "MOUSE", "ECOLI", "YEAST", "ARATH", "STRVD", "ACIBA", "BACSU",
           "DROME", "CAEEL", "DANRE", "9BACT", "9ACTN", "9GAMM", "MYCTU", "PSEAE"]
WRAP = 80


@dataclass
class SynthResult:
    raw_dir: str
    clusters: int
    members: int
    bytes: int


def _residues(rng: np.random.Generator, total: int, chunk: int = 1 << 26) -> bytes:
    """``total`` amino acids at background frequencies, one byte each, made in chunks so
    that memory stays near the output size (a 4 GB set needs ~3 GB of residues)."""
    cumulative = np.cumsum(AA_PERCENT) / sum(AA_PERCENT)
    table = np.frombuffer(AMINO_ACIDS, np.uint8)[
        np.minimum(np.searchsorted(cumulative, (np.arange(65536) + 0.5) / 65536), 19)
    ]
    out = bytearray(total)
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        out[start : start + n] = table[rng.integers(0, 65536, n, dtype=np.uint16)].tobytes()
    return bytes(out)


def _wrap(seq: bytes) -> bytes:
    return b"\n".join(seq[i : i + WRAP] for i in range(0, len(seq), WRAP))


def synth(out_dir: str, clusters: int, seed: int = 0, unsorted: bool = False, overwrite: bool = False,
          reporter: Reporter | None = None) -> SynthResult:
    """Write ``out_dir`` with the five files of the release; returns what it wrote.

    An existing, non-empty ``out_dir`` is refused unless ``overwrite`` (which replaces the
    five files and leaves anything else there alone). Progress counts records written.
    """
    if clusters < 1:
        raise ConfigError(f"--clusters must be at least 1, not {clusters}")
    if seed < 0:
        raise ConfigError(f"--seed must be 0 or more, not {seed}")
    if os.path.isfile(out_dir):
        raise OutputError(f"{out_dir}: exists and is a file; choose a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise OutputError(f"{out_dir}: folder exists and is not empty; pass --overwrite to replace its files")
    reporter = reporter or Reporter()
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.zipf(2.3, clusters), 500).astype(np.int64)
    n_members = int(sizes.sum())
    n_val = max(3, clusters // 1000)
    n_seqs = n_members + n_val
    lengths = np.clip(rng.lognormal(np.log(270), 0.55, n_seqs), 12, 8000).astype(np.int64)
    residues = _residues(rng, int(lengths.sum()))
    starts = np.concatenate(([0], np.cumsum(lengths)))
    species = rng.integers(0, len(SPECIES), n_seqs)
    taxids = rng.integers(1000, 2_000_000, n_seqs)

    def acc(i: int) -> str:
        return f"A0A{i:07X}"

    def seq(i: int) -> bytes:
        return residues[starts[i] : starts[i + 1]]

    os.makedirs(out_dir, exist_ok=True)
    first_member = np.concatenate(([0], np.cumsum(sizes)))
    member_ids = [f"{acc(i)}_{SPECIES[species[i]]}" for i in range(n_seqs)]

    def uf50_record(c: int) -> bytes:
        rep = int(first_member[c])
        head = (f">UniRef50_{acc(rep)} Uncharacterized protein n={sizes[c]} "
                f"Tax=Synthetic TaxID={taxids[rep]} RepID={member_ids[rep]}\n")
        return head.encode() + _wrap(seq(rep)) + b"\n"

    def uf90_record(i: int) -> bytes:
        head = (f">{member_ids[i]} ClusterName=UniRef90_{acc(i)} TaxID={taxids[i]}.0 "
                f"RepID={member_ids[i]}\n")
        return head.encode() + _wrap(seq(i)) + b"\n"

    reporter.begin(2 * clusters + n_members + n_val, unit="records")
    uf50_order = rng.permutation(clusters) if unsorted else range(clusters)
    uf90_order = rng.permutation(n_members) if unsorted else range(n_members)
    _write(os.path.join(out_dir, UF50_FASTA), (uf50_record(int(c)) for c in uf50_order), reporter)
    _write(os.path.join(out_dir, UF90_FASTA), (uf90_record(int(i)) for i in uf90_order), reporter)

    def mapping_lines():
        yield b"UR50_cluster_name\tmapped_id\n"
        for c in range(clusters):
            a, b = int(first_member[c]), int(first_member[c + 1])
            yield f"UniRef50_{acc(a)}\t{','.join(member_ids[a:b])}\n".encode()

    _write(os.path.join(out_dir, MAPPING_TSV), mapping_lines(), reporter, header_lines=1)

    def val_record(i: int) -> bytes:
        head = f">UniRef50_{acc(i)} Validation protein n=1 Tax=Synthetic TaxID={taxids[i]}\n"
        return head.encode() + _wrap(seq(i)) + b"\n"

    _write(os.path.join(out_dir, VAL_FASTA), (val_record(i) for i in range(n_members, n_seqs)), reporter)
    with open(os.path.join(out_dir, RAW_README), "w") as f:
        f.write(
            f"Synthetic UniRef50/90-shaped data written by esm2dask synth "
            f"(clusters={clusters}, seed={seed}, unsorted={unsorted}).\n"
            f"{clusters} clusters, {n_members} members, {n_val} validation sequences. "
            f"Not real proteins.\n"
        )
    total = sum(os.path.getsize(os.path.join(out_dir, n)) for n in os.listdir(out_dir))
    return SynthResult(out_dir, clusters, n_members, total)


def _write(path: str, chunks, reporter: Reporter, header_lines: int = 0) -> None:
    """Write ``chunks`` (one record each, after ``header_lines`` others) in 8 MB writes."""
    name = os.path.basename(path)
    reporter.stage(name, 1)
    buf, size = [], 0
    with open(path, "wb") as f:
        for chunk in chunks:
            buf.append(chunk)
            size += len(chunk)
            if size > 8 << 20:
                f.write(b"".join(buf))
                reporter.progress(len(buf) - header_lines)
                buf, size, header_lines = [], 0, 0
        f.write(b"".join(buf))
        reporter.progress(len(buf) - header_lines)
        reporter.advance(name)
