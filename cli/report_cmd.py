"""``esm2dask report``: distributions, cropping and leakage of an output tree."""

from __future__ import annotations

import json
import sys

import click

from .progress import make_reporter

#: ``--fail-on-leakage`` exits with this when a sequence or an id is shared by two splits
#: (1 is an error, 130 an interrupt).
LEAKAGE_EXIT = 3


def run_and_print(config, plain: bool | None, as_json: bool, plotter=None) -> dict:
    """Build the report, print its summary (or its JSON); return the report. ``plotter``:
    the plot process, if the caller started it already (it is closed here)."""
    try:
        from esm2dask.report import build_report

        reporter = make_reporter(plain)
        try:
            report, folder = build_report(config, reporter, plotter)
        finally:
            reporter.close()
    finally:
        if plotter is not None:
            plotter.close()
    if as_json:
        click.echo(json.dumps(report))
        return report
    click.echo(report["headline"])
    click.echo(f"Report: {folder}/report.html (layout {report['layout']})")
    width = max(map(len, report["splits"]))
    for split, s in report["splits"].items():
        b = s["beyond_crop"]
        same = f", same records as {s['same_as']}" if "same_as" in s else ""
        click.echo(
            f"  {split:<{width}} {s['rows']:>12,} rows {s['residues']:>15,} residues; beyond "
            f"{b['crop_residues']}: {b['rows_share'] * 100:.2f}% of rows, {b['residues_share'] * 100:.2f}% of "
            f"residues; {s['nonstandard']['residues']:,} non-standard{same}"
        )
    c = report.get("clusters")
    if c:
        click.echo(f"  clusters: {c['clusters']:,}, {c['members']:,} members, largest {c['max_members']:,}")
    click.echo(f"  {report['bytes_read'] / 1e6:.1f} MB read in {report['seconds']:.1f} s")
    return report


@click.command()
@click.argument("out")
@click.option("--layout", type=click.Choice(["esm2nv", "bionemo2", "hf"]),
              help="Layout to read [default: the first present of esm2nv, bionemo2, hf].")
@click.option("--fail-on-leakage", is_flag=True,
              help=f"Exit {LEAKAGE_EXIT} (after writing the report) when a sequence or an id is shared by "
                   f"training and validation/test, or by validation and test.")
@click.option("--workers", type=int, help="Dask workers of the LocalCluster [default: the CPUs this process may use].")
@click.option("--processes/--no-processes", default=False, show_default=True,
              help="Run each LocalCluster worker as its own process, or (the default) as threads of this process.")
@click.option("--threads-per-worker", type=int, default=1, show_default=True, help="Threads per worker.")
@click.option("--memory-limit", help="Per worker: a size (e.g. 4GiB), a fraction of RAM (0.5) or auto.")
@click.option("--scheduler-address", help="Use a running Dask cluster (tcp://HOST:PORT) instead of a LocalCluster.")
@click.option("--scheduler-file", help="Use a running Dask cluster described by this scheduler file.")
@click.option("--scheduler-timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for --scheduler-file to appear and the scheduler to answer.")
@click.option("--dashboard-address", default="none",
              help="LocalCluster dashboard: [HOST]:PORT (port 0: any free port), or 'none' [default: none: a "
                   "report lasts seconds, and the dashboard's start is a tenth of them; give an address to "
                   "watch it, its link is printed].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on stdout.")
@click.option("--plain", is_flag=True, default=None, help="A plain progress line every few seconds instead of a bar.")
def report(out, layout, fail_on_leakage, workers, processes, threads_per_worker, memory_limit, scheduler_address,
           scheduler_file, scheduler_timeout, dashboard_address, as_json, plain):
    """Look at an output tree: lengths, cropping, composition, clusters, leakage.

    Writes OUT/esm2dask-report/ (report.html, one PNG per plot, report.json) and
    touches nothing else in OUT. Exits 0 even when leakage is found (the first line
    says so), unless --fail-on-leakage is given.
    """
    from esm2dask.report_html import PlotProcess

    # first of all: the child imports matplotlib on another core while this process imports
    # numba and distributed and starts the cluster (benchmarks/results/report.md)
    plotter = PlotProcess()
    try:
        from esm2dask.report import ReportConfig

        from .clusters import cluster_config

        cluster = cluster_config(workers, threads_per_worker, processes, memory_limit, scheduler_address,
                                 scheduler_file, scheduler_timeout, dashboard_address)
    except BaseException:
        plotter.close()
        raise
    result = run_and_print(ReportConfig(output_dir=out, cluster=cluster, layout=layout), plain, as_json, plotter)
    if fail_on_leakage and result["leakage"]["found"]:
        click.echo(f"esm2dask: leakage found; exit {LEAKAGE_EXIT} (--fail-on-leakage)", err=True)
        sys.exit(LEAKAGE_EXIT)
