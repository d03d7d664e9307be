"""``esm2dask ngc …`` (provisioning through the ``ngc`` CLI) and ``esm2dask pipeline`` (in a job)."""

from __future__ import annotations

import os
from pathlib import Path

import click


def _note(text: str) -> None:
    click.echo(text, err=True)


def _set_dry_run(ctx, param, value):
    """``--dry-run`` after a leaf command, as well as on the ``ngc`` group."""
    if value and ctx.obj and not ctx.obj["ngc"].settings.dry_run:
        from dataclasses import replace

        from esm2dask.ngc import Ngc

        ctx.obj["ngc"] = Ngc(replace(ctx.obj["ngc"].settings, dry_run=True), echo=click.echo)


DRY_RUN_HELP = "Print the ngc commands (secrets masked) and run nothing."


def add_dry_run_to_leaves(group: click.Group) -> None:
    for command in group.commands.values():
        if isinstance(command, click.Group):
            add_dry_run_to_leaves(command)
        else:
            command.params.append(click.Option(["--dry-run"], is_flag=True, expose_value=False,
                                               callback=_set_dry_run, help=DRY_RUN_HELP))


@click.group()
@click.option("--org", help="NGC org [default: $NGC_CLI_ORG].")
@click.option("--team", help="NGC team [default: $NGC_CLI_TEAM].")
@click.option("--ace", help="NGC ACE [default: $NGC_CLI_ACE or $ACE].")
@click.option("--image", help="Container image [default: $BIONEMO_IMAGE, else the BioNeMo framework image].")
@click.option("--instance", help="Instance type [default: dgxa100.80g.1.norm].")
@click.option("--state-file", help="Where ids are remembered [default: $ESM2DASK_NGC_STATE, else ~/.esm2dask/ngc-state.json].")
@click.option("--dry-run", is_flag=True, help=DRY_RUN_HELP)
@click.pass_context
def ngc(ctx, org, team, ace, image, instance, state_file, dry_run):
    """Provision NGC: workspace, job, and the whole unattended run (needs the `ngc` CLI)."""
    from esm2dask.ngc import Ngc, NgcSettings, NgcState

    settings = NgcSettings.resolve(org, team, ace, image, instance, state_file, dry_run)
    ctx.obj = {"ngc": Ngc(settings, echo=click.echo), "state": NgcState.load(settings.state_file)}


@ngc.command("check")
@click.option("--mount", is_flag=True, help="Also check what mounting a workspace needs (sshfs).")
@click.pass_obj
def ngc_check(obj, mount):
    """Preflight: ngc installed and configured, org/team/ACE known (offline)."""
    from esm2dask.errors import Esm2DaskError
    from esm2dask.ngc import preflight

    findings = preflight(obj["ngc"].settings, need_sshfs=mount)
    for f in findings:
        click.echo(f"{'ok  ' if f.ok else 'FAIL'} {f.text}")
    if not all(f.ok for f in findings):
        raise Esm2DaskError("preflight failed: fix the FAIL lines above")


@ngc.group("workspace")
def ngc_workspace():
    """Create (or reuse), mount and inspect the workspace."""


@ngc_workspace.command("create")
@click.argument("name")
@click.pass_obj
def workspace_create(obj, name):
    """Create workspace NAME, or reuse the one with that name."""
    from esm2dask.ngc import ensure_workspace

    ws = ensure_workspace(obj["ngc"], obj["state"], name)
    if not obj["ngc"].settings.dry_run:
        click.echo(f"workspace {name}: {ws}")


def _remembered(obj, given, field: str, how: str):
    """``given``, else the id remembered in the state file, else an error saying ``how``."""
    from esm2dask.errors import ConfigError

    value = given or getattr(obj["state"], field)
    if not value:
        raise ConfigError(f"no {field.replace('_', ' ')} given and none remembered; run `{how}` first")
    return value


def _workspace_arg(obj, workspace):
    return _remembered(obj, workspace, "workspace_id", "esm2dask ngc workspace create NAME")


@ngc_workspace.command("mount")
@click.argument("workspace", required=False)
@click.argument("mountpoint", required=False)
@click.option("--mode", type=click.Choice(["RW", "RO"]), default="RW", show_default=True, help="Read-write or read-only.")
@click.pass_obj
def workspace_mount(obj, workspace, mountpoint, mode):
    """Mount WORKSPACE (name or id; default: the remembered one) at MOUNTPOINT (default ~/ngc_workspace_mount)."""
    from esm2dask.errors import Esm2DaskError
    from esm2dask.ngc import preflight, workspace_mount_cmd

    workspace = _workspace_arg(obj, workspace)
    mountpoint = mountpoint or os.path.expanduser("~/ngc_workspace_mount")
    if not obj["ngc"].settings.dry_run:
        sshfs = [f for f in preflight(obj["ngc"].settings, need_sshfs=True) if "sshfs" in f.text]
        if sshfs and not sshfs[0].ok:
            raise Esm2DaskError(sshfs[0].text)
        os.makedirs(mountpoint, exist_ok=True)
    obj["ngc"].call(workspace_mount_cmd(obj["ngc"].settings, workspace, mountpoint, mode), parse_json=False)
    if not obj["ngc"].settings.dry_run:
        click.echo(f"mounted {workspace} at {mountpoint} ({mode})")


@ngc_workspace.command("info")
@click.argument("workspace", required=False)
@click.pass_obj
def workspace_info(obj, workspace):
    """Show WORKSPACE (default: the remembered one)."""
    from esm2dask.ngc import workspace_info_cmd

    info = obj["ngc"].call(workspace_info_cmd(obj["ngc"].settings, _workspace_arg(obj, workspace)))
    if info:
        for key in ("id", "name", "aceName", "orgName", "sizeInBytes"):
            if key in info:
                click.echo(f"{key}: {info[key]}")


@ngc.group("job")
def ngc_job():
    """Start (or reuse), enter, watch and stop the job."""


def _job_options(f):
    for opt in reversed([
        click.option("--name", "job_name", default="esm2dask-preprocess", show_default=True,
                     help="Job name; an active job with this name is reused."),
        click.option("--workspace", help="Workspace name or id to mount (required unless one is remembered)."),
        click.option("--commandline", default="sleep infinity", show_default=True,
                     help="What the job runs (the seed's interactive job sleeps; enter it with `job exec`)."),
        click.option("--priority", default="HIGH", show_default=True, help="ngc batch run --priority."),
        click.option("--order", type=int, default=1, show_default=True, help="ngc batch run --order (1-99)."),
        click.option("--preempt", default="RESUMABLE", show_default=True, help="ngc batch run --preempt class."),
        click.option("--min-timeslice", default="0s", show_default=True, help="ngc batch run --min-timeslice."),
        click.option("--total-runtime", default="86400s", show_default=True,
                     help="Wall-clock limit of the job (NGC's maximum is 24 h)."),
        click.option("--result", default="/results", show_default=True, help="The job's result folder."),
        click.option("--new", is_flag=True, help="Always submit a new job (no reuse by name)."),
    ]):
        f = opt(f)
    return f


@ngc_job.command("start")
@_job_options
@click.pass_obj
def job_start(obj, job_name, workspace, commandline, priority, order, preempt, min_timeslice, total_runtime, result, new):
    """Start the seed's interactive job (BioNeMo image, workspace at /ngc_workspace_mount)."""
    from esm2dask.errors import ConfigError
    from esm2dask.ngc import JobSpec, ensure_job

    ws = workspace or obj["state"].workspace_id
    if not ws:
        raise ConfigError(
            "no workspace given and none remembered: pass --workspace NAME_OR_ID (or run "
            "`esm2dask ngc workspace create NAME` first); a job without the workspace mount cannot see the data"
        )
    spec = JobSpec(name=job_name, commandline=commandline, workspace=ws, priority=priority, order=order,
                   preempt=preempt, min_timeslice=min_timeslice, total_runtime=total_runtime, result=result)
    job_id = ensure_job(obj["ngc"], obj["state"], spec, reuse=not new)
    if not obj["ngc"].settings.dry_run:
        click.echo(f"job {job_name}: {job_id}")


def _job_arg(obj, job_id):
    return _remembered(obj, job_id, "job_id", "esm2dask ngc job start")


@ngc_job.command("exec")
@click.argument("job_id", required=False)
@click.option("--command", help="Run this instead of an interactive shell.")
@click.pass_obj
def job_exec(obj, job_id, command):
    """Open a shell (or run --command) in the job's container."""
    from esm2dask.ngc import job_exec_cmd

    obj["ngc"].call(job_exec_cmd(obj["ngc"].settings, _job_arg(obj, job_id), command), interactive=True)


@ngc_job.command("status")
@click.argument("job_id", required=False)
@click.pass_obj
def job_status_cmd(obj, job_id):
    """The job's status and how long it has left of its 24 h."""
    from esm2dask.ngc import job_info_cmd, job_status, time_left_s

    info = obj["ngc"].call(job_info_cmd(obj["ngc"].settings, _job_arg(obj, job_id)))
    if info is None:
        return
    left = time_left_s(info)
    left_text = "not started" if left is None else f"{int(left // 3600)}h{int(left % 3600 // 60):02d}m left of 24h"
    click.echo(f"job {_job_arg(obj, job_id)}: {job_status(info)} ({left_text})")


@ngc_job.command("stop")
@click.argument("job_id", required=False)
@click.pass_obj
def job_stop(obj, job_id):
    """Kill the job."""
    from esm2dask.ngc import job_kill_cmd

    obj["ngc"].call(job_kill_cmd(obj["ngc"].settings, _job_arg(obj, job_id)))
    if not obj["ngc"].settings.dry_run:
        click.echo(f"job {_job_arg(obj, job_id)}: stop requested")


@ngc.command("up")
@click.option("--workspace", "workspace_name", default="esm2dask", show_default=True, help="Workspace name (reused).")
@click.option("--job-name", default="esm2dask-pipeline", show_default=True, help="Batch job name (an active one is reused).")
@click.option("--secret", required=True, help="NGC secret holding NGC_CLI_API_KEY for the job (never passed as an env var).")
@click.option("--replicas", type=int, default=1, show_default=True, help="Nodes; >1 runs one Dask cluster across them.")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Also convert the FLIP secondary-structure task.")
@click.option("--package", type=click.Path(exists=True), help="esm2dask source folder or wheel to upload [default: this checkout].")
@click.option("--waitend", is_flag=True, help="Let `ngc batch run --waitend` block instead of polling.")
@click.option("--poll", type=float, default=60.0, show_default=True, help="Seconds between status checks.")
@click.option("--no-wait", is_flag=True, help="Submit and return.")
@click.pass_obj
def ngc_up(obj, workspace_name, job_name, secret, replicas, flip, package, waitend, poll, no_wait):
    """The whole unattended flow: workspace, one batch job running `esm2dask pipeline`, the summary."""
    from esm2dask.errors import ConfigError
    from esm2dask.ngc import (JobSpec, RESOURCE_FOLDER, WORKSPACE_MOUNT, ensure_job, ensure_workspace, job_info_cmd,
                              job_status, pipeline_command, upload_cmd, wait_for_job)

    n = obj["ngc"]
    package = package or str(Path(__file__).resolve().parents[1])
    if not (Path(package).is_file() or (Path(package) / "pyproject.toml").exists()):
        raise ConfigError(f"--package {package}: not a wheel or a source folder with pyproject.toml")
    ws = ensure_workspace(n, obj["state"], workspace_name)
    n.call(upload_cmd(n.settings, ws, package), parse_json=False)
    spec = JobSpec(name=job_name, commandline=pipeline_command(WORKSPACE_MOUNT, flip, replicas, package),
                   workspace=ws, secrets=(secret,), replicas=replicas, waitend=waitend,
                   preempt="RESUMABLE", labels=("esm2dask",))
    job_id = ensure_job(n, obj["state"], spec)
    if n.settings.dry_run:
        n.call(job_info_cmd(n.settings, job_id))
        return
    _note(f"job {job_name}: {job_id}")
    if no_wait:
        return
    info = wait_for_job(n, job_id, poll_s=poll, on_status=lambda s: _note(f"job {job_id}: {s}"))
    status = job_status(info)
    click.echo(f"job {job_id}: {status}")
    click.echo(f"output: workspace {workspace_name} ({ws}) at data_from_ngc/{RESOURCE_FOLDER}_preproc "
               f"(logs in logs/); mount it with `esm2dask ngc workspace mount`")
    if status != "FINISHED_SUCCESS":
        raise ConfigError(f"job {job_id} ended {status}; `esm2dask ngc up` again resumes where it stopped")


@click.command()
@click.option("--workspace", default="/ngc_workspace_mount", show_default=True, help="The workspace mount inside the job.")
@click.option("--local-dir", default="/workspace/data_from_ngc", show_default=True, help="Fast local disk for download and processing.")
@click.option("--flip", is_flag=True, help="Also convert the FLIP secondary-structure task.")
@click.option("--flip-source", help="FLIP mirror URL or folder.")
@click.option("--workers", type=int, help="Dask workers on this node [default: the CPUs this job may use].")
@click.option("--multi-node", is_flag=True, help="Part of a multi-node job: replica 0 drives, the others run workers.")
def pipeline(workspace, local_dir, flip, flip_source, workers, multi_node):
    """Inside an NGC job: download, copy, preprocess, FLIP, verify, copy back (resumable)."""
    from esm2dask.ngc import NgcSettings
    from esm2dask.pipeline import Pipeline, PipelineConfig, open_log, run_multi_node
    from esm2dask.storage import cpu_count

    log_path = open_log(workspace)
    _note(f"log: {log_path}")
    config = PipelineConfig(workspace=workspace, local_dir=local_dir, flip=flip, flip_source=flip_source,
                            workers=workers, settings=NgcSettings.resolve())
    if multi_node:
        results = run_multi_node(config, dict(os.environ), workers or cpu_count())
    else:
        results = Pipeline(config).run()
    for r in results:
        click.echo(f"{r.name:<11} {r.status:<8} {r.seconds:8.1f} s  {r.detail}")


add_dry_run_to_leaves(ngc)
