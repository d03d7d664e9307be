"""``esm2dask preprocess``, ``verify`` and ``synth``."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace

import click

from esm2dask.config import DEFAULT_DASHBOARD_ADDRESS, DEFAULT_PARTITION_SIZE, MAX_RANGES_PER_INPUT
from esm2dask.progress import human_amount, human_seconds

from .clusters import cluster_config
from .progress import make_reporter


def _human_bytes(n: int) -> str:
    return human_amount(n, "B")


@click.command()
@click.argument("raw_dir", required=False)
@click.option("--output-dir", "-o", help="Output folder [default: RAW_DIR_preproc].")
@click.option("--uf50", help="UniRef50 training FASTA [default: uniref50_train_filt.fasta in RAW_DIR].")
@click.option("--uf90", help="Member ('sampler') FASTA [default: uniref90membersandreps_ur50trainfiltreps.fasta in RAW_DIR].")
@click.option("--mapping", help="Cluster → members TSV [default: mapping.tsv in RAW_DIR].")
@click.option("--val", help="Validation FASTA [default: uniref50_valid.fasta in RAW_DIR].")
@click.option("--test", help="Test FASTA [default: the validation FASTA].")
@click.option("--split", type=click.Choice(["fasta", "random"]), default="fasta", show_default=True,
              help="fasta: val/test from their FASTAs (BioNeMo v1.10); random: v1.0's random split of the clusters.")
@click.option("--val-size", type=int, default=5000, show_default=True, help="Clusters in val (--split random).")
@click.option("--test-size", type=int, default=1_000_000, show_default=True, help="Clusters in test (--split random).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random split.")
@click.option("--num-csv-files", type=int, default=50, show_default=True, help="CSV files per output folder (1-1000).")
@click.option("--workers", type=int, help="Dask workers of the LocalCluster [default: the CPUs this process may use].")
@click.option("--processes/--no-processes", default=False, show_default=True,
              help="Run each LocalCluster worker as its own process, or (the default) as threads of this "
                   "process: nothing to start, and the FASTA kernel releases the GIL "
                   "(benchmarks/results/engines.md).")
@click.option("--threads-per-worker", type=int, default=1, show_default=True, help="Threads per worker process.")
@click.option("--memory-limit", help="Per worker: a size (at least 256MiB, e.g. 4GiB), a fraction of RAM (0.5) or auto [default: auto, RAM / workers].")
@click.option("--partition-size", default=DEFAULT_PARTITION_SIZE, show_default=True,
              help=f"Bytes of input per task (e.g. 64MiB); a size that would cut one input into more than "
                   f"{MAX_RANGES_PER_INPUT:,} ranges is refused.")
@click.option("--scheduler-address", help="Use a running Dask cluster (tcp://HOST:PORT) instead of a LocalCluster.")
@click.option("--scheduler-file", help="Use a running Dask cluster described by this scheduler file (waited for up to --scheduler-timeout).")
@click.option("--scheduler-timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for --scheduler-file to appear and the scheduler to answer.")
@click.option("--dashboard-address", default=DEFAULT_DASHBOARD_ADDRESS, show_default=True,
              help="LocalCluster dashboard: HOST:PORT (port 0: any free port; no HOST, e.g. :8787: every "
                   "interface), or 'none' for no dashboard and no HTTP listener at all.")
@click.option("--performance-report", type=click.Path(dir_okay=False), help="Write Dask's HTML performance report here.")
@click.option("--overwrite", is_flag=True,
              help="Replace the uf50/ and uf90/ of an earlier run (only files its manifest lists). With --resume: "
                   "resume if possible, else start over.")
@click.option("--resume", is_flag=True,
              help="Finish an interrupted run into the same output (refused if its inputs or options changed, "
                   "or if there is nothing to resume, unless --overwrite is given too).")
@click.option("--no-copy-inputs", is_flag=True, help="Do not copy the raw files into the output folder.")
@click.option("--link-inputs", is_flag=True,
              help="Hard-link the raw files into the output folder instead of copying them (by default a reflink where "
                   "the file system has them, else a copy): the two names are then ONE file, and writing to "
                   "either changes both.")
@click.option("--storage-options",
              help="JSON options for fsspec/s3fs (e.g. endpoint_url), or @FILE to read them from a JSON file. "
                   "Prefer AWS_* variables or a profile for keys: a command line shows in ps and shell history.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the plan (inputs, ranges, tasks, files, a time estimate) and exit; starts no cluster.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (or the --plan) as one JSON object on stdout.")
@click.option("--plain", is_flag=True, default=None, help="A plain progress line every few seconds instead of a bar.")
@click.option("--format", "formats", multiple=True, default=("esm2nv",), show_default="esm2nv",
              metavar="FORMAT[,FORMAT…]",
              help="Layouts to publish, repeated or comma-separated: esm2nv (the CSV tree at OUT's root), "
                   "bionemo2 (OUT/bionemo2/: parquet clusters + SQLite for BioNeMo 2), hf (OUT/hf/: "
                   "Hugging Face parquet). The FASTAs are read once; the esm2nv tree is always built "
                   "(the others derive from it) but published only when asked for.")
@click.option("--report", "with_report", is_flag=True,
              help="After a successful run, write OUTPUT_DIR/esm2dask-report/ as `esm2dask report` does "
                   "(with --json, the summary gains a 'report' key).")
def preprocess(raw_dir, output_dir, uf50, uf90, mapping, val, test, split, val_size, test_size, seed,
               num_csv_files, workers, processes, threads_per_worker, memory_limit, partition_size,
               scheduler_address, scheduler_file, scheduler_timeout, dashboard_address, performance_report,
               overwrite, resume, no_copy_inputs, link_inputs, storage_options, plan_only, as_json, plain, formats,
               with_report):
    """Convert RAW_DIR into the ESM2nv layout (uf50/{train,val,test}, uf90/uf90_csvs).

    RAW_DIR defaults to $ESM2DASK_RAW_DIR, else
    /workspace/data_from_ngc/uniref50_90_202104_esm2nv_v1.0 (where BioNeMo's seed
    workflow downloads the release). The full log of the run is kept in
    OUTPUT_DIR/esm2dask.log.
    """
    from esm2dask.config import PreprocessConfig
    from esm2dask.storage import parse_storage_options

    cluster = cluster_config(workers, threads_per_worker, processes, memory_limit, scheduler_address,
                             scheduler_file, scheduler_timeout, dashboard_address, performance_report)
    config = PreprocessConfig.from_options(
        raw_dir=raw_dir, output_dir=output_dir, uf50=uf50, uf90=uf90, mapping=mapping, val=val,
        test=test, partition_size=partition_size, split=split, val_size=val_size,
        test_size=test_size, seed=seed, num_csv_files=num_csv_files,
        overwrite=overwrite, resume=resume, copy_inputs=not no_copy_inputs, link_inputs=link_inputs,
        storage_options=parse_storage_options(storage_options), cluster=cluster, formats=formats,
    )
    if plan_only:
        _print_plan(config, as_json)
        return
    from esm2dask.preprocess import preprocess as run_preprocess

    report_config = None
    if with_report:  # checked before the run: a report needs a local output folder
        from esm2dask.report import ReportConfig

        # the report's own LocalCluster starts no dashboard, and one link is printed per run
        report_config = ReportConfig(output_dir=config.output_dir, cluster=replace(cluster, dashboard_address=None),
                                     announce_dashboard=False)
    reporter = make_reporter(plain)
    try:
        result = run_preprocess(config, reporter)
    finally:
        reporter.close()
    if as_json:
        summary = _summary(result)
        if report_config:
            from esm2dask.report import build_report

            reporter = make_reporter(plain)
            try:
                summary["report"], _ = build_report(report_config, reporter)
            finally:
                reporter.close()
        click.echo(json.dumps(summary, sort_keys=True))
        return
    click.echo(f"Output: {result.output_dir}")
    width = max(map(len, [*result.rows, *result.layouts, "x" * 16]))
    for d, n in result.rows.items():
        click.echo(f"  {d:<{width}} {n:>12,} rows  {_human_bytes(result.bytes[d]):>10}")
    for path, info in result.layouts.items():
        click.echo(f"  {path:<{width}} {info['rows']:>12,} rows  {_human_bytes(info['bytes']):>10}")
    for name, rep in result.streams.items():
        how = "fast path (mapping order)" if rep.fast_path else "hash join"
        click.echo(
            f"  {name}: {rep.records:,} records, {how}; {rep.unnamed_dropped:,} not in the mapping "
            f"(dropped), {rep.duplicates:,} duplicate ids (first kept)"
        )
    rate = f"{result.mb_per_s:.0f} MB/s"
    if result.skipped_tasks:
        share = result.done_here_share
        click.echo(
            f"  resumed: skipped {result.skipped_tasks:,} task(s) an earlier run had finished, "
            f"{(1 - share) * 100:.0f}% of the input reading"
        )
        rate = (f"{rate} for the {share * 100:.0f}% of the reading done in this run" if share > 0
                else "no input left to read in this run")
    click.echo(
        f"  {_human_bytes(result.input_bytes)} in {result.wall_seconds:.1f} s ({rate}); "
        f"manifest: {result.manifest_url}; log: {result.log_url}"
    )
    if report_config:
        from .report_cmd import run_and_print

        run_and_print(report_config, plain, as_json=False)


def _summary(result) -> dict:
    """The run's summary as plain JSON values."""
    return {
        "output_dir": result.output_dir,
        "rows": result.rows,
        "bytes": result.bytes,
        "streams": {name: asdict(rep) for name, rep in result.streams.items()},
        "input_bytes": result.input_bytes,
        "wall_seconds": round(result.wall_seconds, 3),
        "mb_per_s": round(result.mb_per_s, 1),
        "skipped_tasks": result.skipped_tasks,
        "skipped_share": round(1 - result.done_here_share, 4),
        "stage_seconds": {k: round(v, 3) for k, v in result.stage_seconds.items()},
        "tasks": sum(result.stage_tasks.values()),
        "stage_tasks": result.stage_tasks,
        "manifest": result.manifest_url,
        "log": result.log_url,
    }


def _print_plan(config, as_json: bool) -> None:
    from esm2dask.plan import input_sizes, make_plan

    plan = make_plan(config, input_sizes(config))
    if as_json:
        click.echo(json.dumps(plan.to_dict(), sort_keys=True))
        return
    part = plan.partition_bytes
    part_text = f"{part / 2**20:g} MiB" if part % 2**20 == 0 else _human_bytes(part)
    click.echo(f"Plan: {config.raw_dir} -> {plan.output_dir} (nothing runs; drop --plan to run it)")
    click.echo(f"Inputs: {_human_bytes(plan.input_bytes)}, cut into ranges of {part_text}")
    for i in plan.inputs:
        click.echo(f"  {i.role:<8} {_human_bytes(i.size_bytes):>10} {len(i.ranges):>7,} range(s)  {i.url}")
    click.echo(f"Stages: {plan.tasks():,} tasks reading {_human_bytes(plan.read_bytes())} "
               f"when the FASTAs are in mapping order")
    click.echo(f"  {'stage':<23} {'tasks':>9}  reads")
    for s in plan.stages:
        if s.when == "always":
            tasks = f"{s.tasks:,}" if s.exact else f"<= {s.tasks:,}"  # the data decides: at most
            click.echo(f"  {s.name:<23} {tasks:>9}  {_human_bytes(s.read_bytes) if s.read_bytes else '-'}")
    for name in ("uf50", "uf90"):
        when = f"fallback-{name}"
        click.echo(f"  if {name} is not in mapping order (hash join): + {plan.tasks(when):,} tasks reading "
                   f"{_human_bytes(plan.read_bytes(when))}")
    kind = "as worker processes" if config.cluster.processes else "as threads of this process"
    where = (f"{plan.workers} local worker(s) x {config.cluster.threads_per_worker} thread(s), {kind}" if plan.workers
             else f"the running cluster at {config.cluster.scheduler_address or config.cluster.scheduler_file}")
    click.echo(f"Workers: {where}")
    click.echo(f"Writes, in {plan.output_dir}:")
    for f in plan.output_files:
        click.echo(f"  {f}")
    e = plan.estimate
    click.echo(
        f"Estimate: ~{human_seconds(e.seconds_in_order)} in mapping order (the release as published), "
        f"~{human_seconds(e.seconds_shuffled)} otherwise, with {e.workers} worker(s); from the rates "
        f"measured in {e.source} (2 workers, 2 vCPUs), scaled linearly with workers"
    )
    for note in plan.notes:
        click.echo(f"Note: {note}")


@click.command()
@click.argument("out")
@click.option("--num-csv-files", type=int, help="Expected files per folder [default: from the manifest, else as found].")
@click.option("--storage-options", help="JSON options for fsspec/s3fs, or @FILE holding them.")
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


@click.command()
@click.argument("out")
@click.option("--clusters", type=int, required=True, help="Number of UniRef50 clusters (20,000 make ~30 MB).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed: the same clusters and seed give the same bytes.")
@click.option("--unsorted", is_flag=True, help="Shuffle the FASTA records out of mapping order.")
@click.option("--overwrite", is_flag=True, help="Write into OUT even if it exists and is not empty (replaces the five files).")
@click.option("--plain", is_flag=True, default=None, help="A plain progress line every few seconds instead of a bar.")
def synth(out, clusters, seed, unsorted, overwrite, plain):
    """Write a synthetic raw dataset folder (UniRef-like, seeded) to OUT."""
    from esm2dask.synth import synth as run_synth

    reporter = make_reporter(plain)
    try:
        result = run_synth(out, clusters, seed, unsorted, overwrite=overwrite, reporter=reporter)
    finally:
        reporter.close()
    click.echo(
        f"{out}: {result.clusters:,} clusters, {result.members:,} members, "
        f"{_human_bytes(result.bytes)}"
    )
