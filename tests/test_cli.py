"""The CLI surface: help on every command, version, and clean usage errors."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from gitlab_log_shipper import __version__
from gitlab_log_shipper.cli import main

COMMANDS = sorted(main.commands)


def test_the_documented_commands_exist() -> None:
    assert {"run", "backfill", "post"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name: str) -> None:
    command = main.commands[name]
    assert command.help and len(command.help) > 20
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{name} {param.opts} has no help text"
    result = CliRunner().invoke(main, [name, "--help"], catch_exceptions=False)
    assert result.exit_code == 0 and "Usage:" in result.output


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"], catch_exceptions=False)
    assert result.exit_code == 0 and __version__ in result.output


def test_usage_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    env_file = tmp_path / "e.env"
    env_file.write_text("GITLAB_URL=https://gitlab.example.com\nGITLAB_TOKEN=glpat-0123456789\n")
    runner = CliRunner()
    for args in (["post"], ["post", "--pipeline-id", "x"], ["backfill"], ["backfill", "--since", "someday"],
                 ["backfill", "--since", "1d", "--until", "2d"], ["nonsense"]):
        result = runner.invoke(main, ["--env-file", str(env_file), *args], catch_exceptions=False)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output


def test_missing_required_setting_names_it(tmp_path: Path) -> None:
    env_file = tmp_path / "e.env"
    env_file.write_text("GITLAB_TOKEN=glpat-0123456789\n")
    result = CliRunner().invoke(main, ["--env-file", str(env_file), "run", "--once"], env={"GITLAB_URL": None},
                                catch_exceptions=False)
    assert result.exit_code == 2
    assert result.output.strip() == "gitlab-log-shipper: configuration error: GITLAB_URL: is required but not set"
