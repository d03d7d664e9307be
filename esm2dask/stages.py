"""Every stage a ``preprocess`` run can run, as data: one table for the run and for ``--plan``.

A stage is a set of parallel tasks of one function. :func:`stage_table` lists, for one
run's options and input sizes, each stage the run will run: its name (the dashboard's and
the progress line's), its task function, when it runs, how many tasks it has and how many
input bytes they read. ``--plan`` prints the table; the runner (:mod:`esm2dask.runner`)
takes each stage's function from it by name and refuses a stage the table does not list,
so the two cannot drift apart.

``when`` is one of

- ``always``: every run of these options;
- ``fallback-uf50`` / ``fallback-uf90``: only when that FASTA's records do not stand in
  mapping order (or a mapping id repeats): the hash join;
- ``resume``: only on ``--resume``, to re-read the ranges the interrupted run had read.

The order is the order in which the run starts them. Task counts are exact except where
they depend on the data (``exact=False``: the ``hf`` evaluation parts, one per million rows,
the ``train.db`` id ranges, of which equal sampled splitters may merge a few, and the hash
join's position blocks, fewer than the ranges when a FASTA has fewer ids than ranges).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import formats, storage, tasks
from .layout import SPLIT_DIRS, UF50_TEST, UF50_TRAIN, UF90

#: The stream names of the two FASTAs joined to the mapping.
STREAMS = ("uf50", "uf90")


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable
    tasks: int
    read_bytes: int = 0  # input bytes its tasks read (0: tasks over intermediate files)
    when: str = "always"
    exact: bool = True  # whether ``tasks`` is known before the run (see the module notes)

    def to_dict(self) -> dict:
        return {"name": self.name, "tasks": self.tasks, "read_bytes": self.read_bytes, "when": self.when,
                "exact": self.exact}


def staged_csv_dirs(config) -> tuple[str, ...]:
    """The ESM2nv folders whose CSV shards the run stages: all with esm2nv; without it only
    the evaluation splits the other layouts read back."""
    if "esm2nv" in config.formats:
        return SPLIT_DIRS
    return tuple(d for d in SPLIT_DIRS if d not in (UF50_TRAIN, UF90)
                 and (d != UF50_TEST or config.has_own_test_split))


def placed_streams(config) -> tuple[str, ...]:
    """The FASTAs whose ESM2nv rows are written once, each at its final place in its shard
    (in mapping order the count pass measures every row first, :func:`esm2dask.tasks.place_rows`;
    out of it the hash join's scatter does, and each position block's merge writes in place):
    on a local or POSIX output, uf90, and uf50 unless ``--split random`` spreads its rows
    over three folders. The others write pieces that are then assembled into the shards."""
    # policy, not access: rows placed with pwrite (storage.write_at) need a file system's output
    if "esm2nv" not in config.formats or not storage.is_local(config.output_dir):
        return ()
    return ("uf90",) if config.split == "random" else ("uf50", "uf90")


def routed_streams(config) -> tuple[str, ...]:
    """The FASTAs that the hash join, if it runs, moves without a copy: each range's records
    are routed to their position blocks unread (:func:`esm2dask.tasks.route_records`), and
    each block's merge copies them out of the mapped file in order and converts them once
    (:func:`esm2dask.tasks.merge_records`). A local FASTA's; one on an object store, read
    at random, is converted by ranges again and its rows scattered through the work folder."""
    return tuple(name for name in STREAMS if storage.is_local(getattr(config, name)))


#: the ESM2nv folder each placed stream fills
PLACED_DIRS = {"uf50": UF50_TRAIN, "uf90": UF90}


def n_arrays(config) -> int:
    """``counts.mmap`` and ``starts.mmap`` of each uf50 split that has them."""
    return 2 * (3 if config.split == "random" else 1) if "esm2nv" in config.formats else 0


def stage_table(config, ranges: dict[str, int], sizes: dict[str, int], hash_buckets: dict[str, int],
                n_copies: int, n_task_copies: int) -> tuple[Stage, ...]:
    """The stages of one run: ``ranges``/``sizes`` by input role (mapping, uf50, uf90, val,
    test), the join's hash buckets by stream, the inputs copied beside the tree, and how
    many of those the ``copy-inputs`` stage copies (and hashes on the way)."""
    fastas = [role for role in ranges if role != "mapping"]
    n_map = ranges["mapping"]
    esm2nv, bionemo2, hf = (f in config.formats for f in ("esm2nv", "bionemo2", "hf"))

    def over(role: str, name: str, fn, when: str = "always") -> Stage:
        return Stage(name, fn, ranges[role], sizes[role], when)

    table = [over("mapping", "scan-mapping", tasks.scan_mapping)]
    table += [over(role, f"count-{role}", tasks.count_fasta) for role in fastas]
    if n_task_copies:  # local inputs into a local OUT, beside the conversion; hashed as copied
        table.append(Stage("copy-inputs", tasks.copy_input, n_task_copies))
    placed = placed_streams(config)
    # --resume: the ranges the interrupted run had read are read again and compared
    table.append(Stage("check-inputs", tasks.range_digest, sum(ranges.values()), sum(sizes.values()), "resume",
                       exact=False))
    db_buckets = formats.train_db_buckets(config, sizes["uf90"])
    if bionemo2:  # needs the mapping alone: beside the conversion
        table.append(Stage("bionemo2-train-clusters", formats.write_train_clusters, 1))
    if bionemo2 and db_buckets > 1:
        table.append(Stage("bionemo2-sample-ids", formats.sample_member_ids, n_map))
    if esm2nv:
        table.append(Stage("write-counts", tasks.write_counts, n_map))
    table += [over(role, f"convert-{role}", tasks.convert_in_file_order) for role in ("val", "test")
              if role in ranges]
    for name in STREAMS:
        if name in placed:  # where each range's rows go in each shard, from the sizes counted
            table.append(Stage(f"place-{name}", tasks.place_rows, ranges[name]))
        table += [over(name, f"fast-{name}", tasks.convert_in_order),
                  Stage(f"check-ids-{name}", tasks.count_duplicate_hashes, hash_buckets[name])]
    # the hash join's rounds, both streams' side by side (esm2dask.preprocess.join)
    for name in STREAMS:
        when = f"fallback-{name}"
        table += [Stage(f"bucket-ids-{name}", tasks.bucket_ids, n_map, 0, when),
                  over(name, f"index-{name}", tasks.index_fasta, when)]
    table += [Stage(f"join-{name}", tasks.join_ids, hash_buckets[name], 0, f"fallback-{name}") for name in STREAMS]
    routed = routed_streams(config)
    # a routed stream's scatter reads no FASTA byte (its progress counts the range all the
    # same), its merge the records where they lie
    table += [over(name, f"scatter-{name}", tasks.route_records if name in routed else tasks.scatter_fasta,
                   f"fallback-{name}") for name in STREAMS]
    # blocks of about one range's rows each: as many as ranges (fewer if ids < ranges)
    table += [Stage(f"merge-{name}", tasks.merge_records if name in routed else tasks.merge_scattered_block,
                    ranges[name], 0, f"fallback-{name}", exact=False)
              for name in STREAMS]
    n_shards = len(staged_csv_dirs(config)) * config.num_csv_files
    # the placed folders' shards are written in place, in mapping order or not
    table.append(Stage("assemble", tasks.assemble_shard, n_shards - len(placed) * config.num_csv_files))
    if esm2nv:
        table.append(Stage("assemble-mmap", tasks.assemble_array, n_arrays(config)))
    evals = formats.eval_splits(config)
    n_layout_files = 0
    if bionemo2:
        table += [Stage(f"bionemo2-{db.split('.')[0]}", formats.write_bionemo2_eval, 1) for *_, db in evals]
        table += [Stage("bionemo2-train-layout", formats.layout_train_chunk, db_buckets, exact=False),
                  Stage("bionemo2-train-pages", formats.write_train_chunk, db_buckets, exact=False),
                  Stage("bionemo2-train-db", formats.finish_train_db, 1)]
        # train_clusters.parquet, train.db and each eval database; an eval split's
        # clusters parquet is hashed as it is written
        n_layout_files += 2 + len(evals)
    if hf:  # each part is hashed as it is written
        table += [Stage(f"hf-{split}", formats.write_hf_eval_part, 1, exact=False) for _, split, _, _ in evals]
    n_files = (n_shards if esm2nv else 0) + n_arrays(config) + n_layout_files + n_copies - n_task_copies
    # sha256 of every output file and of every input copied beside them (but those the
    # copy-inputs stage and the parquet writers hashed), for the manifest
    table.append(Stage("checksum", storage.sha256_file, n_files))
    return tuple(table)
