"""The command line's surface: help for every option, unbroken words, `esm2dask` alone,
-v after any command, readable task keys, and no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli.main import cli

REPO = Path(__file__).resolve().parents[1]


def all_commands(group=cli, prefix=()):
    yield prefix, group
    for name, cmd in getattr(group, "commands", {}).items():
        yield from all_commands(cmd, (*prefix, name))


COMMANDS = list(all_commands())


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) or "esm2dask" for p, _ in COMMANDS])
def test_every_option_has_help_and_no_word_is_cut(path, command):
    result = CliRunner().invoke(cli, [*path, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        assert param.help, f"{' '.join(path)} {param.opts[0]} has no help text"
        words = param.help.split()
        if isinstance(param.show_default, str):  # a default shown in words of its own
            words += param.show_default.split()
        elif param.show_default and param.default not in (None, False) and not param.is_flag:
            words += str(param.default).split()
        for word in words:
            assert word in flat, f"{' '.join(path)} {param.opts[0]}: {word!r} is cut in the help"
    assert any("-v" in p.opts for p in command.params if isinstance(p, click.Option)), "no -v"


def test_esm2dask_alone_prints_help_and_succeeds():
    result = CliRunner().invoke(cli, [])
    assert result.exit_code == 0
    assert "Usage:" in result.output and "preprocess" in result.output


def test_dask_logging_is_set_before_dask_is_imported():
    code = "import cli.main, dask; print(dask.config.get('logging')['root']['handlers'])"
    env = {k: v for k, v in __import__("os").environ.items() if k != "DASK_LOGGING"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == "['dispatch']", done.stderr


def test_command_modules_do_not_import_main():
    for path in (REPO / "cli").glob("*_cmd.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module == "main" and node.level == 1), f"{path.name} imports .main"
                assert node.module != "cli.main", f"{path.name} imports cli.main"


def test_task_keys_read_well_in_the_dashboard():
    from distributed.utils import key_split

    from esm2dask.runner import stage_of_key, task_key

    token = "20261129080742-ecc07c"
    for stage in ("convert-val", "fast-uf90", "check-ids-uf50", "bucket-fasta-uf90", "assemble", "scan-mapping"):
        key = task_key(stage, token, 12)
        assert key_split(key) == stage.replace("-", "_")  # what the progress panel shows
        assert stage_of_key(key) == stage == stage_of_key(str(key))
        assert token in str(key)  # settle() and cancel find a run's tasks by its token
