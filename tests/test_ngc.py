"""`esm2dask ngc …` and `esm2dask pipeline` against a fake `ngc` on PATH."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli

FAKE = Path(__file__).resolve().parent / "fake_ngc"
KEY = "nvapi-SECRET-KEY-123"


@pytest.fixture
def fake_ngc(tmp_path, monkeypatch):
    state = tmp_path / "fake-ngc"
    state.mkdir()
    monkeypatch.setenv("PATH", f"{FAKE}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NGC_DIR", str(state))
    monkeypatch.setenv("NGC_CLI_ORG", "myorg")
    monkeypatch.setenv("NGC_CLI_ACE", "nv-us-east-2")
    monkeypatch.setenv("NGC_CLI_API_KEY", KEY)
    monkeypatch.setenv("NGC_CLI_HOME", str(tmp_path / "ngc-home"))
    monkeypatch.setenv("ESM2DASK_NGC_STATE", str(tmp_path / "state.json"))
    monkeypatch.delenv("NGC_CLI_TEAM", raising=False)
    monkeypatch.delenv("BIONEMO_IMAGE", raising=False)

    class Fake:
        dir = state
        state_file = tmp_path / "state.json"

        @staticmethod
        def calls():
            path = state / "calls.jsonl"
            return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

    return Fake


def ngc(*args, **kw):
    return CliRunner().invoke(cli, ["ngc", *map(str, args)], catch_exceptions=False, **kw)


GOLDEN = {
    ("workspace", "create", "bionemo-ws"): [
        "ngc workspace list --name bionemo-ws --org myorg --ace nv-us-east-2 --format_type json",
        "ngc workspace create --name bionemo-ws --org myorg --ace nv-us-east-2 --format_type json",
    ],
    ("workspace", "mount", "bionemo-ws", "/mnt/ws"): [
        "ngc workspace mount bionemo-ws /mnt/ws --mode RW --org myorg --ace nv-us-east-2",
    ],
    ("workspace", "info", "WsId0001xyz"): [
        "ngc workspace info WsId0001xyz --org myorg --ace nv-us-east-2 --format_type json",
    ],
    ("job", "start", "--workspace", "WsId0001xyz"): [
        "ngc batch run --name esm2dask-preprocess --image nvcr.io/nvidia/clara/bionemo-framework:latest "
        "--instance dgxa100.80g.1.norm --commandline 'sleep infinity' --result /results --priority HIGH "
        "--order 1 --preempt RESUMABLE --min-timeslice 0s --total-runtime 86400s "
        "--workspace WsId0001xyz:/ngc_workspace_mount:RW --org myorg --ace nv-us-east-2 --format_type json",
    ],
    ("job", "status", "7000001"): [
        "ngc batch info 7000001 --org myorg --ace nv-us-east-2 --format_type json",
    ],
    ("job", "stop", "7000001"): [
        "ngc batch kill 7000001 --org myorg --ace nv-us-east-2 --format_type json",
    ],
    ("job", "exec", "7000001", "--command", "nvidia-smi"): [
        "ngc batch exec 7000001 --commandline nvidia-smi --org myorg --ace nv-us-east-2",
    ],
}


@pytest.mark.parametrize("command", list(GOLDEN), ids=lambda c: " ".join(c))
def test_dry_run_golden(command, fake_ngc):
    result = ngc("--dry-run", *command)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == GOLDEN[command]
    assert fake_ngc.calls() == []  # nothing ran
    assert not fake_ngc.state_file.exists()  # nothing written


def test_dry_run_up_golden(fake_ngc, tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text("[project]\nname='esm2dask'\n")
    result = ngc("--dry-run", "up", "--secret", "ngc-api-key", "--replicas", "2", "--package", pkg)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(line.startswith("ngc ") for line in lines)
    assert lines[0] == "ngc workspace list --name esm2dask --org myorg --ace nv-us-east-2 --format_type json"
    assert lines[2].startswith(f"ngc workspace upload '<id of esm2dask>' --source {pkg} --destination esm2dask-package")
    run = lines[3]
    assert "--commandline 'pip install --quiet /ngc_workspace_mount/esm2dask-package && esm2dask pipeline --workspace /ngc_workspace_mount --flip --multi-node'" in run
    assert "--secret ngc-api-key" in run and "--replicas 2 --array-type PYTORCH --network INFINIBAND" in run
    assert "--env-var" not in run and KEY not in result.output
    assert fake_ngc.calls() == []


def test_workspace_reused_by_name_and_state_round_trip(fake_ngc):
    assert ngc("workspace", "create", "ws-a").exit_code == 0
    state = json.loads(fake_ngc.state_file.read_text())
    assert state["workspace_id"] == "WsId0001xyz" and state["workspace_name"] == "ws-a"
    assert state["org"] == "myorg" and state["ace"] == "nv-us-east-2"
    result = ngc("workspace", "create", "ws-a")
    assert "WsId0001xyz" in result.output
    verbs = [c[:2] for c in fake_ngc.calls()]
    assert verbs.count(["workspace", "create"]) == 1
    assert verbs[-1] == ["workspace", "info"]  # the remembered id was checked, not trusted
    # forget the state: found by name through `workspace list`
    fake_ngc.state_file.unlink()
    assert "WsId0001xyz" in ngc("workspace", "create", "ws-a").output
    assert [c[:2] for c in fake_ngc.calls()].count(["workspace", "create"]) == 1


def test_several_workspaces_with_one_name_is_an_error(fake_ngc):
    fake_ngc.dir.joinpath("state.json").write_text(json.dumps({
        "workspaces": [{"id": "A1", "name": "dup"}, {"id": "B2", "name": "dup"}], "jobs": {}, "next_job": 1}))
    result = ngc("workspace", "create", "dup")
    assert result.exit_code == 1 and "2 workspaces are named 'dup' (A1, B2)" in result.output


def test_job_reused_while_active_not_after_it_ended(fake_ngc):
    assert ngc("workspace", "create", "ws-a").exit_code == 0
    assert ngc("job", "start").exit_code == 0
    result = ngc("job", "start")
    assert "7000001" in result.output
    assert [c[:2] for c in fake_ngc.calls()].count(["batch", "run"]) == 1
    assert ngc("job", "stop").exit_code == 0
    result = ngc("job", "start")
    assert "7000002" in result.output  # a killed job is not reused
    result = ngc("job", "start", "--new")
    assert "7000003" in result.output


def test_job_status_and_time_left(fake_ngc, monkeypatch):
    assert ngc("job", "start", "--workspace", "WsId0001xyz").exit_code == 0
    monkeypatch.setenv("FAKE_NGC_STARTED", "2099-01-01T00:00:00Z")  # "started" now or later: 24 h left
    assert "QUEUED (not started)" in ngc("job", "status").output
    assert "RUNNING (24h00m left of 24h)" in ngc("job", "status").output


def test_up_polls_until_the_job_ends(fake_ngc, tmp_path):
    result = ngc("up", "--secret", "my-key", "--poll", "0", "--package", str(Path(__file__).resolve().parents[1]))
    assert result.exit_code == 0, result.output
    assert "job 7000001: FINISHED_SUCCESS" in result.output
    assert "data_from_ngc/uniref50_90_202104_esm2nv_v1.0_preproc" in result.output
    run = next(c for c in fake_ngc.calls() if c[:2] == ["batch", "run"])
    assert run[run.index("--secret") + 1] == "my-key"
    assert not any(KEY in " ".join(c) for c in fake_ngc.calls())


def test_up_reports_a_failed_job(fake_ngc, monkeypatch):
    monkeypatch.setenv("FAKE_NGC_END", "FAILED")
    result = ngc("up", "--secret", "k", "--poll", "0", "--package", str(Path(__file__).resolve().parents[1]))
    assert result.exit_code == 1 and "ended FAILED" in result.output


def test_errors_carry_exit_meaning_and_mask_the_key(fake_ngc, monkeypatch):
    monkeypatch.setenv("FAKE_NGC_SCENARIO", "auth")
    result = ngc("workspace", "info", "x")
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("esm2dask: error: ngc workspace info x")
    assert "(exit 1): error: Invalid apikey ****" in line
    assert KEY not in result.output


def test_preflight(fake_ngc, monkeypatch, tmp_path):
    assert ngc("check").exit_code == 0
    monkeypatch.delenv("NGC_CLI_API_KEY")
    monkeypatch.delenv("NGC_CLI_ACE")
    result = ngc("check", "--mount")
    assert result.exit_code == 1
    assert "FAIL no API key" in result.output and "FAIL ace unknown" in result.output
    home = tmp_path / "ngc-home"
    home.mkdir()
    (home / "config").write_text("[CURRENT]\napikey = abc\nace = nv-us-west-1\norg = myorg\n")
    result = ngc("check")
    assert result.exit_code == 0, result.output
    assert "ace: nv-us-west-1" in result.output
    monkeypatch.setenv("PATH", "/nonexistent")
    result = ngc("check")
    assert result.exit_code == 1 and "ngc not found" in result.output and "installers" in result.output


def test_missing_ngc_binary_is_a_clear_error(fake_ngc, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    result = ngc("workspace", "info", "x")
    assert result.exit_code == 1 and "`ngc` not found on PATH" in result.output


def test_settings_never_hard_code_an_org(fake_ngc, monkeypatch):
    monkeypatch.delenv("NGC_CLI_ORG")
    result = ngc("workspace", "create", "w")
    assert result.exit_code == 1 and "--org (or NGC_CLI_ORG)" in result.output
    result = ngc("--org", "flagorg", "--dry-run", "workspace", "info", "w")
    assert "--org flagorg" in result.output


def test_multi_node_roles():
    from esm2dask.pipeline import node_role

    roles = [node_role({"NGC_ARRAY_INDEX": str(r), "NGC_ARRAY_SIZE": "3", "NGC_JOB_ID": "42"}, "/ws", 8) for r in range(3)]
    assert [r.role for r in roles] == ["driver", "worker", "worker"]
    assert {r.scheduler_file for r in roles} == {"/ws/.esm2dask/scheduler-42.json"}
    assert roles[0].commands[0] == ("dask", "scheduler", "--scheduler-file", "/ws/.esm2dask/scheduler-42.json")
    assert roles[1].commands == ((
        "dask", "worker", "--scheduler-file", "/ws/.esm2dask/scheduler-42.json", "--nworkers", "8",
        "--nthreads", "1", "--death-timeout", "120", "--preload", "esm2dask.workerenv"),)
    assert roles[0].commands[1] == roles[1].commands[0]
    with pytest.raises(Exception, match="outside an array"):
        node_role({"NGC_ARRAY_INDEX": "3", "NGC_ARRAY_SIZE": "3"}, "/ws", 8)


@pytest.mark.drill  # a kill after each pipeline step
def test_pipeline_runs_and_resumes_after_each_step(fake_ngc, tmp_path, monkeypatch):
    from esm2dask.synth import synth

    src = tmp_path / "resource"
    synth(str(src), 200, seed=4)
    monkeypatch.setenv("FAKE_NGC_RESOURCE_SRC", str(src))
    ws, local = tmp_path / "ws", tmp_path / "local"
    args = ["pipeline", "--workspace", ws, "--local-dir", local, "--workers", "1"]

    def run():
        result = CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        steps = {"download", "copy-raw", "preprocess", "flip", "verify", "copy-back"}
        return {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()
                if line.split() and line.split()[0] in steps}

    first = run()
    assert first == {"download": "done", "copy-raw": "done", "preprocess": "done", "verify": "done", "copy-back": "done"}
    out = ws / "data_from_ngc" / "uniref50_90_202104_esm2nv_v1.0_preproc"
    assert (out / "uf90/uf90_csvs/x049.csv").exists() and (out / "esm2dask-manifest.json").exists()
    assert list((ws / "logs").glob("esm2dask-pipeline-*.log"))
    assert run() == {**{k: "skipped" for k in first}, "verify": "done"}
    # lose the workspace copy of the raw data: only that step is redone
    import shutil

    shutil.rmtree(ws / "data_from_ngc" / "uniref50_90_202104_esm2nv_v1.0")
    assert run()["copy-raw"] == "done"
    # a tampered local output is rebuilt and copied back
    (local / "uniref50_90_202104_esm2nv_v1.0_preproc/uf50/train/x000.csv").write_text("broken\n")
    again = run()
    assert again["preprocess"] == "done" and again["copy-back"] == "done" and again["download"] == "skipped"
    downloads = [c for c in fake_ngc.calls() if c[:3] == ["registry", "resource", "download-version"]]
    assert len(downloads) == 1


def test_pipeline_download_incomplete(fake_ngc, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_NGC_SCENARIO", "incomplete")
    result = CliRunner().invoke(cli, ["pipeline", "--workspace", str(tmp_path / "ws"), "--local-dir", str(tmp_path / "l")])
    assert result.exit_code == 1
    assert "(exit 5): transfer incomplete: Download incomplete" in result.output


def test_stale_workspace_id_in_state_is_not_trusted(fake_ngc):
    """The remembered id no longer exists (`info` answers not found): look up by name."""
    fake_ngc.state_file.write_text(json.dumps({"workspace_id": "GoneId", "workspace_name": "ws-a"}))
    result = ngc("workspace", "create", "ws-a")
    assert result.exit_code == 0, result.output
    assert "WsId0001xyz" in result.output
    verbs = [c[:3] for c in fake_ngc.calls()]
    assert verbs[:3] == [["workspace", "info", "GoneId"], ["workspace", "list", "--name"], ["workspace", "create", "--name"]]
    assert json.loads(fake_ngc.state_file.read_text())["workspace_id"] == "WsId0001xyz"
    assert KEY not in fake_ngc.state_file.read_text()


@pytest.mark.drill  # a kill after each pipeline step
def test_multi_node_pipeline_with_two_simulated_replicas(fake_ngc, tmp_path, monkeypatch):
    """Two `esm2dask pipeline --multi-node` processes, as replicas 0 and 1 of one job: replica 0
    runs the scheduler, a worker and the pipeline; replica 1 a worker that leaves when the
    scheduler closes. The output lands on the (shared) workspace and verifies."""
    import subprocess
    import sys

    from esm2dask.synth import synth

    src = tmp_path / "resource"
    synth(str(src), 300, seed=6)
    ws = tmp_path / "ws"
    env = {**os.environ, "FAKE_NGC_RESOURCE_SRC": str(src), "NGC_ARRAY_SIZE": "2", "NGC_JOB_ID": "77",
           "DASK_LOGGING__DISTRIBUTED": "error"}
    repo = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cli", "pipeline", "--multi-node", "--workspace", str(ws),
             "--local-dir", str(tmp_path / f"local{rank}"), "--workers", "1"],
            env={**env, "NGC_ARRAY_INDEX": str(rank)}, cwd=repo,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "preprocess  done" in outputs[0]
    out = ws / "data_from_ngc" / "uniref50_90_202104_esm2nv_v1.0_preproc"
    check = CliRunner().invoke(cli, ["verify", str(out)])
    assert check.exit_code == 0, check.output
    assert (ws / ".esm2dask").is_dir()  # the scheduler file lived there (dask removes it on close)


@pytest.mark.parametrize("command", list(GOLDEN), ids=lambda c: " ".join(c))
def test_dry_run_after_the_leaf_command_too(command, fake_ngc):
    result = ngc(*command, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == GOLDEN[command]
    assert fake_ngc.calls() == [] and not fake_ngc.state_file.exists()


def test_every_ngc_leaf_accepts_dry_run():
    from cli.ngc_cmd import ngc as group

    def leaves(g):
        for c in g.commands.values():
            yield from leaves(c) if hasattr(c, "commands") else [c]

    for leaf in leaves(group):
        assert "--dry-run" in [o for p in leaf.params for o in getattr(p, "opts", [])], leaf.name


def test_job_start_without_a_workspace_is_refused(fake_ngc):
    for args in (("job", "start"), ("--dry-run", "job", "start"), ("job", "start", "--dry-run")):
        result = ngc(*args)
        assert result.exit_code == 1, result.output
        assert "--workspace" in result.output and "ngc batch run" not in result.output
    assert fake_ngc.calls() == []
    # a remembered workspace is enough
    assert ngc("workspace", "create", "ws-a").exit_code == 0
    result = ngc("job", "start")
    assert result.exit_code == 0 and "--workspace WsId0001xyz:/ngc_workspace_mount:RW" in " ".join(fake_ngc.calls()[-1])


@pytest.mark.parametrize("reply, remembered", [({"id": 7123, "status": "QUEUED"}, 7123), ({"accepted": True}, None)],
                         ids=["id-at-top", "no-id"])
def test_a_reply_without_the_job_key_is_a_clear_error(reply, remembered, fake_ngc, tmp_path, monkeypatch):
    """`ngc batch run` answers in another shape: one error line; an id in it is kept."""
    real = FAKE / "ngc"
    wrapper = tmp_path / "odd-ngc" / "ngc"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/usr/bin/env python3\nimport json, subprocess, sys\n"
        f"if sys.argv[1:3] == ['batch', 'run']:\n    print(json.dumps({reply!r})); sys.exit(0)\n"
        f"sys.exit(subprocess.call([{str(real)!r}, *sys.argv[1:]]))\n"
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    result = ngc("job", "start", "--workspace", "WsId0001xyz")
    assert result.exit_code == 1
    errors = [l for l in result.output.splitlines() if l.startswith("esm2dask: error:")]
    assert len(errors) == 1 and "without the expected 'job' object" in errors[0], result.output
    state = json.loads(fake_ngc.state_file.read_text()) if fake_ngc.state_file.exists() else {}
    assert state.get("job_id") == remembered
    if remembered:
        assert f"job id {remembered} remembered" in errors[0]
