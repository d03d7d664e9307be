"""``esm2dask flip``."""

from __future__ import annotations

import click



@click.command()
@click.option("--tasks", default="secondary_structure", show_default=True,
              help="Comma-separated FLIP tasks, or 'all' (aav, bind, conservation, gb1, meltome, sav, scl, secondary_structure).")
@click.option("--output-dir", "-o", default="FLIP", show_default=True,
              help="Writes OUT/<task>/{train,val,test}/x000.csv (a folder or an fsspec URL).")
@click.option("--source", help="Base URL of a FLIP mirror, or a local folder with <task>/<file> [default: the public FLIP server].")
@click.option("--cache-dir", help="Where downloads are kept and reused [default: ~/.cache/esm2dask/flip].")
@click.option("--num-csv-files", type=int, default=1, show_default=True, help="CSV files per split folder.")
@click.option("--labels", type=click.Choice(["compat", "exact"]), default="compat", show_default=True,
              help="compat: the reference's attribute pattern (byte-compatible, truncates e.g. 1.2e-05 → 1.2); exact: values whole.")
@click.option("--checksums", type=click.Path(exists=True, dir_okay=False), help="Verify sha256 per file ('<sha256>  <task>/<file>' lines).")
@click.option("--write-checksums", type=click.Path(dir_okay=False), help="Record the sha256 of every file used.")
@click.option("--retries", type=int, default=3, show_default=True, help="Retries per download, with backoff.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds per download attempt.")
@click.option("--overwrite", is_flag=True, help="Replace existing task folders.")
@click.option("--storage-options", help="JSON options for fsspec/s3fs, for s3:// sources and outputs, or @FILE holding them.")
def flip(tasks, output_dir, source, cache_dir, num_csv_files, labels, checksums, write_checksums, retries, timeout,
         overwrite, storage_options):
    """Convert FLIP benchmark tasks into ESM2nv validation CSVs."""
    from esm2dask.flip import DEFAULT_CACHE, DEFAULT_SOURCE, FlipConfig, parse_tasks, run_flip
    from esm2dask.storage import parse_storage_options

    config = FlipConfig(
        tasks=tuple(parse_tasks(tasks)), output_dir=output_dir, source=source or DEFAULT_SOURCE,
        cache_dir=cache_dir or DEFAULT_CACHE, num_csv_files=num_csv_files, labels=labels,
        checksums=checksums, write_checksums=write_checksums, retries=retries, timeout_s=timeout,
        overwrite=overwrite, storage_options=parse_storage_options(storage_options),
    )
    for result in run_flip(config):
        counts = ", ".join(f"{s} {n:,}" for s, n in result.rows.items())
        extra = f"; {result.truncated} value(s) truncated (compat)" if result.truncated else ""
        click.echo(f"{result.task}: {counts}{extra}")
    click.echo(f"Output: {output_dir}")
