"""NGC provisioning through the ``ngc`` CLI (``docs/ngc.md``).

Command builders are pure functions returning argument lists (tested as text); every
call goes through :meth:`Ngc.call`, the one place that runs ``ngc``. ``--dry-run`` prints
each command, shell-quoted with secrets masked, and runs nothing. A small state file
remembers workspace and job ids; they are checked with ``info`` before reuse.
"""

from __future__ import annotations

import configparser
import datetime as _dt
import json
import logging
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import storage
from .errors import ConfigError, Esm2DaskError, ExternalCommandError
from .logs import redact

log = logging.getLogger("esm2dask")

RESOURCE = "nvidia/clara/uniref50_90_202104_esm2nv:1.0"
RESOURCE_FOLDER = "uniref50_90_202104_esm2nv_v1.0"
DEFAULT_IMAGE = "nvcr.io/nvidia/clara/bionemo-framework:latest"
DEFAULT_INSTANCE = "dgxa100.80g.1.norm"
WORKSPACE_MOUNT = "/ngc_workspace_mount"
JOB_LIMIT_S = 24 * 3600
ACTIVE_STATES = {"CREATED", "QUEUED", "STARTING", "RUNNING", "PENDING_STORAGE_CREATION",
                 "REQUESTING_RESOURCE", "RESOURCE_GRANTED", "RESOURCE_CONSUMPTION_REQUEST_IN_PROGRESS"}
DONE_OK = {"FINISHED_SUCCESS"}
EXIT_MEANING = {1: "error", 2: "bad arguments", 3: "transfer failed", 4: "transfer terminated",
                5: "transfer incomplete", 130: "interrupted"}
NGC_DOWNLOAD_HINT = "install the NGC CLI (https://org.ngc.nvidia.com/setup/installers/cli) and put `ngc` on PATH"


@dataclass(frozen=True)
class NgcSettings:
    """Resolved once: flags, then NGC_CLI_ORG / NGC_CLI_TEAM / NGC_CLI_ACE (or ACE) /
    BIONEMO_IMAGE, then defaults. There is no default org."""

    org: str | None = None
    team: str | None = None
    ace: str | None = None
    image: str = DEFAULT_IMAGE
    instance: str = DEFAULT_INSTANCE
    state_file: str = field(default_factory=lambda: os.path.expanduser("~/.esm2dask/ngc-state.json"))
    dry_run: bool = False

    @classmethod
    def resolve(cls, org=None, team=None, ace=None, image=None, instance=None, state_file=None,
                dry_run=False, env: dict[str, str] | None = None) -> "NgcSettings":
        env = os.environ if env is None else env
        return cls(
            org=org or env.get("NGC_CLI_ORG") or None,
            team=team or env.get("NGC_CLI_TEAM") or None,
            ace=ace or env.get("NGC_CLI_ACE") or env.get("ACE") or None,
            image=image or env.get("BIONEMO_IMAGE") or DEFAULT_IMAGE,
            instance=instance or DEFAULT_INSTANCE,
            state_file=state_file or env.get("ESM2DASK_NGC_STATE") or os.path.expanduser("~/.esm2dask/ngc-state.json"),
            dry_run=dry_run,
        )

    def require(self, *names: str) -> None:
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            flags = ", ".join(f"--{n} (or NGC_CLI_{n.upper()})" for n in missing)
            raise ConfigError(f"NGC settings missing: {flags}")

    def scope(self) -> list[str]:
        """The global --org/--team/--ace flags, where known."""
        out = []
        for name in ("org", "team", "ace"):
            if getattr(self, name):
                out += [f"--{name}", getattr(self, name)]
        return out


# ----------------------------------------------------------------------------- builders


def _json(args: list[str]) -> list[str]:
    return ["ngc", *args, "--format_type", "json"]


def workspace_create_cmd(s: NgcSettings, name: str) -> list[str]:
    return _json(["workspace", "create", "--name", name, *s.scope()])


def workspace_list_cmd(s: NgcSettings, name: str) -> list[str]:
    return _json(["workspace", "list", "--name", name, *s.scope()])


def workspace_info_cmd(s: NgcSettings, workspace: str) -> list[str]:
    return _json(["workspace", "info", workspace, *s.scope()])


def workspace_mount_cmd(s: NgcSettings, workspace: str, mountpoint: str, mode: str = "RW") -> list[str]:
    return ["ngc", "workspace", "mount", workspace, mountpoint, "--mode", mode, *s.scope()]


@dataclass(frozen=True)
class JobSpec:
    """One ``ngc batch run``: the seed's interactive job by default, every value overridable."""

    name: str = "esm2dask-preprocess"
    commandline: str = "sleep infinity"
    workspace: str = ""
    workspace_mount: str = WORKSPACE_MOUNT
    result: str = "/results"
    priority: str = "HIGH"
    order: int = 1
    preempt: str = "RESUMABLE"
    min_timeslice: str = "0s"
    total_runtime: str = "86400s"
    replicas: int = 1
    array_type: str = "PYTORCH"
    secrets: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    waitend: bool = False


def job_run_cmd(s: NgcSettings, spec: JobSpec) -> list[str]:
    args = [
        "batch", "run", "--name", spec.name, "--image", s.image, "--instance", s.instance,
        "--commandline", spec.commandline, "--result", spec.result,
        "--priority", spec.priority, "--order", str(spec.order), "--preempt", spec.preempt,
        "--min-timeslice", spec.min_timeslice, "--total-runtime", spec.total_runtime,
    ]
    if spec.workspace:
        args += ["--workspace", f"{spec.workspace}:{spec.workspace_mount}:RW"]
    if spec.replicas > 1:
        args += ["--replicas", str(spec.replicas), "--array-type", spec.array_type,
                 "--network", "INFINIBAND", "--topology-constraint", "pack"]
    for secret in spec.secrets:
        args += ["--secret", secret]
    for label in spec.labels:
        args += ["--label", label]
    if spec.waitend:
        args.append("--waitend")
    return _json([*args, *s.scope()])


def job_info_cmd(s: NgcSettings, job_id: int | str) -> list[str]:
    return _json(["batch", "info", str(job_id), *s.scope()])


def job_list_cmd(s: NgcSettings) -> list[str]:
    return _json(["batch", "list", *s.scope()])


def job_exec_cmd(s: NgcSettings, job_id: int | str, command: str | None = None) -> list[str]:
    args = ["ngc", "batch", "exec", str(job_id)]
    if command:
        args += ["--commandline", command]
    return [*args, *s.scope()]


def job_kill_cmd(s: NgcSettings, job_id: int | str) -> list[str]:
    return _json(["batch", "kill", str(job_id), *s.scope()])


def resource_download_cmd(s: NgcSettings, dest: str, resource: str = RESOURCE) -> list[str]:
    return _json(["registry", "resource", "download-version", resource, "--dest", dest, *s.scope()])


# ----------------------------------------------------------------------------- running


def api_key(env: dict[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    return env.get("NGC_CLI_API_KEY") or env.get("NGC_API_KEY") or None


def mask(text: str, env: dict[str, str] | None = None) -> str:
    """``text`` without any secret value: both NGC key variables (either may be set, or
    both, to different keys) and every other secret :func:`esm2dask.logs.redact` knows."""
    return redact(text, env)


def render(cmd: list[str]) -> str:
    """The command as one pasteable shell line, secrets masked."""
    return mask(" ".join(shlex.quote(a) for a in cmd))


class Ngc:
    """The one place that runs ``ngc``; in dry-run mode it prints instead."""

    def __init__(self, settings: NgcSettings, echo=print):
        self.settings = settings
        self.echo = echo
        self.planned: list[str] = []

    def call(self, cmd: list[str], *, parse_json: bool = True, interactive: bool = False) -> Any:
        line = render(cmd)
        if self.settings.dry_run:
            self.planned.append(line)
            self.echo(line)
            return None
        if shutil.which(cmd[0]) is None:
            raise Esm2DaskError(f"`ngc` not found on PATH: {NGC_DOWNLOAD_HINT}")
        log.info("running: %s", line)
        if interactive:
            code = subprocess.call(cmd)
            if code:
                raise ExternalCommandError(line, code, EXIT_MEANING.get(code, "error"))
            return None
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise ExternalCommandError(line, proc.returncode, _error_message(proc))
        if not parse_json:
            return proc.stdout
        try:
            return json.loads(proc.stdout) if proc.stdout.strip() else None
        except json.JSONDecodeError:
            raise ExternalCommandError(line, 0, f"expected JSON, got {mask(proc.stdout[:200])!r}") from None


def _error_message(proc: subprocess.CompletedProcess) -> str:
    meaning = EXIT_MEANING.get(proc.returncode, "error")
    text = (proc.stderr or "").strip()
    try:
        text = json.loads(text)["error"]
    except (json.JSONDecodeError, KeyError, TypeError):
        text = text.splitlines()[-1] if text else ""
    return mask(f"{meaning}: {text}" if text else meaning)


# ----------------------------------------------------------------------------- state


@dataclass
class NgcState:
    org: str | None = None
    team: str | None = None
    ace: str | None = None
    workspace_id: str | None = None
    workspace_name: str | None = None
    job_id: int | None = None
    job_name: str | None = None
    job_submitted: str | None = None
    updated: str | None = None

    @classmethod
    def load(cls, path: str) -> "NgcState":
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return cls()
        except (OSError, json.JSONDecodeError) as err:
            raise Esm2DaskError(f"{path}: unreadable NGC state file ({err}); remove it to start over") from None
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save(self, path: str) -> None:
        """Atomic: a temporary file in the same folder, then a rename."""
        self.updated = _now()
        with storage.built_in_place(path) as tmp, open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=2, sort_keys=True)
            f.write("\n")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- operations


@dataclass
class Finding:
    ok: bool
    text: str


def preflight(settings: NgcSettings, need_sshfs: bool = False, env: dict[str, str] | None = None) -> list[Finding]:
    """Offline checks: ngc on PATH, configured (key in env or config file), org/team/ace, sshfs."""
    env = os.environ if env is None else env
    out = []
    path = shutil.which("ngc")
    out.append(Finding(bool(path), f"ngc on PATH: {path}" if path else f"ngc not found: {NGC_DOWNLOAD_HINT}"))
    home = env.get("NGC_CLI_HOME") or os.path.expanduser("~/.ngc")
    config_file = os.path.join(home, "config")
    has_key = bool(api_key(env))
    file_org = None
    if os.path.exists(config_file):
        parser = configparser.ConfigParser()
        try:
            parser.read(config_file)
        except configparser.Error:
            pass
        section = parser["CURRENT"] if parser.has_section("CURRENT") else {}
        has_key = has_key or bool(section.get("apikey"))
        file_org = section.get("org")
        settings = replace(
            settings, org=settings.org or file_org, team=settings.team or section.get("team"),
            ace=settings.ace or section.get("ace"),
        )
    out.append(Finding(has_key, "API key configured" if has_key else
                       f"no API key: set NGC_CLI_API_KEY or run `ngc config set` once (writes {config_file})"))
    for name, flag in (("org", "NGC_CLI_ORG"), ("ace", "NGC_CLI_ACE")):
        value = getattr(settings, name)
        out.append(Finding(bool(value), f"{name}: {value}" if value else f"{name} unknown: pass --{name} or set {flag}"))
    out.append(Finding(True, f"team: {settings.team}" if settings.team else "team: none (org-level)"))
    if need_sshfs:
        ok = shutil.which("sshfs") is not None
        out.append(Finding(ok, "sshfs on PATH" if ok else "sshfs missing (needed to mount a workspace): apt-get install sshfs"))
    return out


def ensure_workspace(ngc: Ngc, state: NgcState, name: str) -> str:
    """The id of workspace NAME: reused from state or by name, created if there is none."""
    s = ngc.settings
    s.require("org", "ace")
    if s.dry_run:
        ngc.call(workspace_list_cmd(s, name))
        ngc.call(workspace_create_cmd(s, name))
        return f"<id of {name}>"
    if state.workspace_id and state.workspace_name == name:
        try:
            info = ngc.call(workspace_info_cmd(s, state.workspace_id))
            if info and info.get("name") == name:
                return state.workspace_id
        except ExternalCommandError:
            pass  # stale: look it up again
    found = [w for w in (ngc.call(workspace_list_cmd(s, name)) or []) if w.get("name") == name]
    if len(found) > 1:
        ids = ", ".join(w["id"] for w in found)
        raise Esm2DaskError(f"{len(found)} workspaces are named {name!r} ({ids}); pass the id instead of the name")
    ws = found[0] if found else ngc.call(workspace_create_cmd(s, name))
    state.workspace_id, state.workspace_name = ws["id"], name
    state.org, state.team, state.ace = s.org, s.team, s.ace
    state.save(s.state_file)
    return ws["id"]


def job_status(info: dict) -> str:
    return (info.get("job") or {}).get("jobStatus", {}).get("status", "UNKNOWN")


def job_started(info: dict) -> _dt.datetime | None:
    for entry in info.get("jobStatusHistory") or []:
        if entry.get("status") == "RUNNING" and entry.get("createdDate"):
            return _parse_time(entry["createdDate"])
    return None


def _parse_time(text: str) -> _dt.datetime:
    t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def time_left_s(info: dict, now: _dt.datetime | None = None) -> float | None:
    started = job_started(info)
    if started is None:
        return None
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return min(float(JOB_LIMIT_S), max(0.0, JOB_LIMIT_S - (now - started).total_seconds()))


def ensure_job(ngc: Ngc, state: NgcState, spec: JobSpec, reuse: bool = True) -> int | str:
    """A queued or running job named ``spec.name`` (reused), else a new one."""
    s = ngc.settings
    s.require("org", "ace")
    if s.dry_run:
        ngc.call(job_run_cmd(s, spec))
        return "<job id>"
    if reuse:
        candidates = []
        if state.job_id and state.job_name == spec.name:
            try:
                candidates.append(ngc.call(job_info_cmd(s, state.job_id)))
            except ExternalCommandError:
                pass
        if not candidates:
            listed = ngc.call(job_list_cmd(s)) or []
            candidates = [{"job": j} if "job" not in j else j for j in listed]
        for info in candidates:
            job = info.get("job") or {}
            if (job.get("jobDefinition") or {}).get("name") == spec.name and job_status(info) in ACTIVE_STATES:
                _remember_job(state, s, job["id"], spec.name)
                return job["id"]
    created = ngc.call(job_run_cmd(s, spec))
    job = created.get("job") if isinstance(created, dict) else None
    if not isinstance(job, dict) or "id" not in job:
        # The job may exist all the same: remember any id the reply has, so that the
        # next `job start` finds it instead of submitting a second one.
        job_id = _any_job_id(created)
        if job_id is not None:
            _remember_job(state, s, job_id, spec.name)
        got = f"keys {', '.join(sorted(created))}" if isinstance(created, dict) else f"{type(created).__name__} {created!r:.80}"
        then = (f"job id {job_id} remembered; see it with `esm2dask ngc job status {job_id}`" if job_id is not None
                else "no job id in it; check `ngc batch list` before submitting again")
        raise Esm2DaskError(f"`ngc batch run` replied without the expected 'job' object (got {got}); {then}")
    job_id = job["id"]
    _remember_job(state, s, job_id, spec.name)
    return job_id


def _any_job_id(reply) -> int | str | None:
    """A job id from a reply of another shape (``{"id": …}``, ``{"jobId": …}``)."""
    if not isinstance(reply, dict):
        return None
    for key in ("id", "jobId", "job_id"):
        if isinstance(reply.get(key), (int, str)) and str(reply[key]).strip():
            return reply[key]
    return None


def _remember_job(state: NgcState, s: NgcSettings, job_id, name: str) -> None:
    state.job_id, state.job_name, state.job_submitted = job_id, name, state.job_submitted or _now()
    state.org, state.team, state.ace = s.org, s.team, s.ace
    state.save(s.state_file)


def wait_for_job(ngc: Ngc, job_id, poll_s: float = 30.0, timeout_s: float | None = None, on_status=None) -> dict:
    """Poll ``batch info`` until the job ends; returns the last info."""
    start = time.monotonic()
    last = None
    while True:
        info = ngc.call(job_info_cmd(ngc.settings, job_id))
        status = job_status(info)
        if status != last and on_status:
            on_status(status)
        last = status
        if status not in ACTIVE_STATES:
            return info
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise Esm2DaskError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


#: Where ``ngc up`` uploads the esm2dask package on the workspace.
PACKAGE_DEST = "esm2dask-package"


def upload_cmd(s: NgcSettings, workspace: str, package: str) -> list[str]:
    """Upload the esm2dask source (or wheel) so the job can install it."""
    return ["ngc", "workspace", "upload", workspace, "--source", package, "--destination", PACKAGE_DEST,
            "--exclude", ".venv", "--exclude", ".git", "--exclude", "sample", "--exclude", "*.pyc",
            "--exclude", ".cache", *s.scope()]


def pipeline_command(workspace_mount: str = WORKSPACE_MOUNT, flip: bool = True, replicas: int = 1,
                     package: str = "") -> str:
    """The in-job command of ``ngc up``: install the uploaded esm2dask, run the pipeline."""
    installed = f"{workspace_mount}/{PACKAGE_DEST}"
    if package.endswith(".whl"):
        installed += "/" + os.path.basename(package)
    args = ["esm2dask", "pipeline", "--workspace", workspace_mount]
    if flip:
        args.append("--flip")
    if replicas > 1:
        args.append("--multi-node")
    run = " ".join(shlex.quote(a) for a in args)
    return f"pip install --quiet {shlex.quote(installed)} && {run}"
