"""``esm2dask preprocess``, ``verify`` and ``synth``."""

from __future__ import annotations

import sys

import click

from esm2dask.config import DEFAULT_PARTITION_SIZE

from .main import cli
from .progress import make_reporter


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@cli.command()
@click.argument("raw_dir", required=False)
@click.option("--output-dir", "-o", help="Output folder [default: RAW_DIR_preproc].")
@click.option("--uf50", help="UniRef50 training FASTA [default: RAW_DIR/uniref50_train_filt.fasta].")
@click.option("--uf90", help="Member ('sampler') FASTA [default: RAW_DIR/uniref90membersandreps_ur50trainfiltreps.fasta].")
@click.option("--mapping", help="Cluster → members TSV [default: RAW_DIR/mapping.tsv].")
@click.option("--val", help="Validation FASTA [default: RAW_DIR/uniref50_valid.fasta].")
@click.option("--test", help="Test FASTA [default: the validation FASTA].")
@click.option("--split", type=click.Choice(["fasta", "random"]), default="fasta", show_default=True,
              help="fasta: val/test from their FASTAs (BioNeMo v1.10); random: v1.0's random split of the clusters.")
@click.option("--val-size", type=int, default=5000, show_default=True, help="Clusters in val (--split random).")
@click.option("--test-size", type=int, default=1_000_000, show_default=True, help="Clusters in test (--split random).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random split.")
@click.option("--num-csv-files", type=int, default=50, show_default=True, help="CSV files per output folder.")
@click.option("--workers", type=int, help="Dask worker processes [default: the machine's cores].")
@click.option("--threads-per-worker", type=int, default=1, show_default=True)
@click.option("--memory-limit", help="Per worker, e.g. 4GiB [default: RAM / workers].")
@click.option("--partition-size", default=DEFAULT_PARTITION_SIZE, show_default=True, help="Bytes of input per task.")
@click.option("--engine", type=click.Choice(["pyfastx", "numpy", "python"]), default="pyfastx", show_default=True,
              help="FASTA parser.")
@click.option("--scheduler-address", help="Use a running Dask cluster (tcp://HOST:PORT) instead of a LocalCluster.")
@click.option("--scheduler-file", help="Use a running Dask cluster described by this scheduler file.")
@click.option("--dashboard-address", default=":8787", show_default=True, help="LocalCluster dashboard address.")
@click.option("--performance-report", type=click.Path(dir_okay=False), help="Write Dask's HTML performance report here.")
@click.option("--overwrite", is_flag=True, help="Replace uf50/ and uf90/ of an existing output folder.")
@click.option("--resume", is_flag=True, help="Finish an interrupted run into the same output (same inputs and options).")
@click.option("--no-copy-inputs", is_flag=True, help="Do not hard-link/copy the raw files into the output folder.")
@click.option("--storage-options", help="JSON options for fsspec/s3fs (e.g. endpoint_url).")
@click.option("--plain", is_flag=True, default=None, help="Plain log lines instead of progress bars.")
@click.option("--format", "formats", multiple=True, default=("esm2nv",), show_default=True,
              metavar="FORMAT[,FORMAT…]",
              help="Layouts to publish, repeated or comma-separated: esm2nv (the CSV tree at OUT's root), "
                   "bionemo2 (OUT/bionemo2/: parquet clusters + SQLite for BioNeMo 2), hf (OUT/hf/: "
                   "Hugging Face parquet). The FASTAs are read once; the esm2nv tree is always built "
                   "(the others derive from it) but published only when asked for.")
def preprocess(raw_dir, output_dir, uf50, uf90, mapping, val, test, split, val_size, test_size, seed,
               num_csv_files, workers, threads_per_worker, memory_limit, partition_size, engine,
               scheduler_address, scheduler_file, dashboard_address, performance_report, overwrite,
               resume, no_copy_inputs, storage_options, plain, formats):
    """Convert RAW_DIR into the ESM2nv layout (uf50/{train,val,test}, uf90/uf90_csvs).

    RAW_DIR defaults to $ESM2DASK_RAW_DIR, else
    /workspace/data_from_ngc/uniref50_90_202104_esm2nv_v1.0.
    """
    from esm2dask.config import ClusterConfig, PreprocessConfig
    from esm2dask.preprocess import preprocess as run_preprocess
    from esm2dask.storage import cpu_count, parse_storage_options

    cluster = ClusterConfig(
        workers=workers or cpu_count(),
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit,
        scheduler_address=scheduler_address,
        scheduler_file=scheduler_file,
        dashboard_address=dashboard_address,
        performance_report=performance_report,
    )
    config = PreprocessConfig.from_options(
        raw_dir=raw_dir, output_dir=output_dir, uf50=uf50, uf90=uf90, mapping=mapping, val=val,
        test=test, partition_size=partition_size, split=split, val_size=val_size,
        test_size=test_size, seed=seed, num_csv_files=num_csv_files, engine=engine,
        overwrite=overwrite, resume=resume, copy_inputs=not no_copy_inputs,
        storage_options=parse_storage_options(storage_options), cluster=cluster, formats=formats,
    )
    reporter = make_reporter(plain)
    try:
        result = run_preprocess(config, reporter)
    finally:
        reporter.close()
    click.echo(f"Output: {result.output_dir}")
    for d, n in result.rows.items():
        click.echo(f"  {d:<16} {n:>12,} rows  {_human_bytes(result.bytes[d]):>10}")
    for path, info in result.layouts.items():
        click.echo(f"  {path:<16} {info['rows']:>12,} rows  {_human_bytes(info['bytes']):>10}")
    for name, rep in result.streams.items():
        how = "fast path (mapping order)" if rep.fast_path else "hash join"
        click.echo(
            f"  {name}: {rep.records:,} records, {how}; {rep.unnamed_dropped:,} not in the mapping "
            f"(dropped), {rep.duplicates:,} duplicate ids (first kept)"
        )
    click.echo(
        f"  {_human_bytes(result.input_bytes)} in {result.wall_seconds:.1f} s "
        f"({result.mb_per_s:.0f} MB/s); manifest: {result.manifest_url}"
    )


@cli.command()
@click.argument("out")
@click.option("--num-csv-files", type=int, help="Expected files per folder [default: from the manifest, else as found].")
@click.option("--storage-options", help="JSON options for fsspec/s3fs.")
def verify(out, num_csv_files, storage_options):
    """Check an output tree against the layout contract; exit 0 only if all holds."""
    from esm2dask.storage import parse_storage_options
    from esm2dask.verify import verify_any

    report = verify_any(out, parse_storage_options(storage_options), num_csv_files)
    for line in report.checked:
        click.echo(f"checked: {line}")
    for d, n in report.rows.items():
        click.echo(f"rows: {d} {n:,}")
    if report.ok:
        click.echo(f"OK: {out}")
        return
    for problem in report.problems:
        click.echo(f"PROBLEM: {problem}", err=True)
    click.echo(f"esm2dask: error: {len(report.problems)} problem(s) in {out}", err=True)
    sys.exit(1)


@cli.command()
@click.argument("out")
@click.option("--clusters", type=int, required=True, help="Number of UniRef50 clusters.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--unsorted", is_flag=True, help="Shuffle the FASTA records out of mapping order.")
def synth(out, clusters, seed, unsorted):
    """Write a synthetic raw dataset folder (UniRef-like, seeded) to OUT."""
    from esm2dask.errors import ConfigError
    from esm2dask.synth import synth as run_synth

    if clusters < 1:
        raise ConfigError("--clusters must be at least 1")
    result = run_synth(out, clusters, seed, unsorted)
    click.echo(
        f"{out}: {result.clusters:,} clusters, {result.members:,} members, "
        f"{_human_bytes(result.bytes)}"
    )
