"""The env file: one parser for the systemd unit and the commands run by hand, and systemd's reading beside it.

The unit passes the file with ``--env-file`` (no ``EnvironmentFile=``), so what ``check`` reads is what ``run``
reads under systemd. systemd's own reading (``parse_systemd``, transcribed from ``parse_env_file_internal`` in
systemd's src/basic/env-file.c) is pinned with the cases of systemd's src/test/test-env-file.c, and ``check``
names the lines where the two differ. No systemd runs here (no PID 1 systemd in the test machine): the unit is
checked as text and with ``systemd-analyze verify`` (tests/service/test_notify.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gitlab_log_shipper.cli import main
from gitlab_log_shipper.config.envfile import parse_env_text, parse_systemd, read_env_file, systemd_differences
from gitlab_log_shipper.config.settings import load_config
from gitlab_log_shipper.errors import ConfigError
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.world import JobSpec, World

from repo_paths import REPO_ROOT
from shipper_helpers import make_env

ROOT = REPO_ROOT
UNIT = ROOT / "packaging" / "systemd" / "gitlab-log-shipper.service"


def values(text: str) -> dict[str, str]:
    return parse_env_text(text)[0]


def test_the_syntax_written_in_the_docstring() -> None:
    text = ("\ufeffA=1\r\n"
            "export B=two words   # a comment\n"
            "  C = spaced  \n"
            "; a comment too\n"
            "# and this\n"
            "D='literal \\d+ \"x\" # not a comment'  # but this is\n"
            'E="a \\" b \\\\ c \\$HOME \\n"\n'
            "F=\n"
            "G=x#y\n"
            "A=last wins\n")
    assert values(text) == {"A": "last wins", "B": "two words", "C": "spaced", "D": 'literal \\d+ "x" # not a comment',
                            "E": 'a " b \\ c $HOME \\n', "F": "", "G": "x#y"}
    assert parse_env_text(text)[1]["A"] == 10


@pytest.mark.parametrize("line, where, problem", [
    ("JUST_A_NAME", "env file line 2", "expected NAME=value"),
    ("1X=1", "env file line 2", "not a variable name"),
    ("X='open", "X (env file line 2)", "single quote does not close"),
    ('X="open', "X (env file line 2)", "double quote does not close"),
    ("X='a' b", "X (env file line 2)", "after the closing quote"),
    ("X=continued \\", "X (env file line 2)", "line continuations are not supported"),
])
def test_what_it_refuses_names_the_line_and_the_variable(line: str, where: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_env_text(f"OK=1\n{line}\nNEXT=2\n")
    assert caught.value.variable == where and problem in caught.value.problem


# systemd's own test cases (src/test/test-env-file.c); case 3 as systemd >= v254 reads it (a comment line ending
# in a backslash no longer swallows the next line).
@pytest.mark.parametrize("text, expected", [
    ("a=a\nb=b\\\nc\nd=d\\\ne\\\nf\ng=g\\ \nh=h\ni=i\\", {"a": "a", "b": "bc", "d": "def", "g": "g ", "h": "h", "i": "i"}),
    ("a=a\\\n", {"a": "a"}),
    ('#SPAMD_ARGS="-d --socketpath=/var/lib/bulwark/spamd \\\n#--nouser-config        \\\nnormal=line',
     {"normal": "line"}),
    ('# Generated\n\nHWMON_MODULES="coretemp f71882fg"\n\n# For compatibility reasons\n\nMODULE_0=coretemp\n'
     "MODULE_1=f71882fg", {"HWMON_MODULES": "coretemp f71882fg", "MODULE_0": "coretemp", "MODULE_1": "f71882fg"}),
    ("a=\nb=", {"a": "", "b": ""}),
])
def test_systemds_reading_matches_systemds_own_tests(text: str, expected: dict[str, str]) -> None:
    assert parse_systemd(text) == expected


def test_systemd_reads_bom_export_and_inline_comments_differently() -> None:
    text = "\ufeffGITLAB_URL=https://g\nexport POLL_INTERVAL=5\nRETRY_DELAY=60   # one minute\nPATH_X=a\\b\n"
    assert parse_systemd(text) == {"RETRY_DELAY": "60   # one minute", "PATH_X": "ab"}
    assert values(text) == {"GITLAB_URL": "https://g", "POLL_INTERVAL": "5", "RETRY_DELAY": "60", "PATH_X": "a\\b"}


def _pipeline(world: World) -> None:
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("build", "build", "success", log="ok\n")])


def _env_text(env_values: dict[str, str]) -> str:
    """The test's settings as a hand-written env file would have them: a BOM, export and inline comments."""
    lines = [f"export {name}={value}   # set by the test" for name, value in env_values.items()]
    return "\ufeff" + "\n".join(lines) + "\nGITLAB_TIMEOUT=60   # one minute\n"


def test_bom_export_and_inline_comments_mean_the_same_in_check_and_run_and_check_names_systemds_lines(
        tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    _pipeline(world)
    env = make_env(tmp_path, gitlab_sim, None)
    env_file = tmp_path / "shipper.env"
    env_file.write_text(_env_text(env.values), "utf-8")
    runner = CliRunner()
    run = runner.invoke(main, ["run", "--once", "--env-file", str(env_file)], env={}, catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert list(env.output.rglob("metadata.json")), run.output
    assert load_config(env_file, {}).gitlab_timeout == 60.0
    check = runner.invoke(main, ["--env-file", str(env_file), "check"], env={}, catch_exceptions=False)
    assert "✗" not in check.output, check.output
    # Every line is read differently by EnvironmentFile= (BOM, export, inline comment): check says so, naming them.
    flagged = re.findall(r"(?m)^! env file: line (\d+): (\w+): ", check.output)
    assert ("1", "GITLAB_URL") in flagged and ("2", "GITLAB_TOKEN") in flagged
    assert (str(len(env.values) + 1), "GITLAB_TIMEOUT") in flagged
    assert env.values["GITLAB_TOKEN"] not in check.output + run.output


def test_a_bad_line_exits_2_naming_line_and_variable_without_a_traceback(tmp_path: Path) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("GITLAB_URL=https://g.example.com\nAPI_POST_HEADERS='X-Key: s3cr3t-value\n", "utf-8")
    for args in (["--env-file", str(env_file), "check"], ["run", "--once", "--env-file", str(env_file)]):
        result = CliRunner().invoke(main, args, env={}, catch_exceptions=False)
        assert result.exit_code == 2, result.output
        assert "API_POST_HEADERS (env file line 2): the single quote does not close" in result.output
        assert "Traceback" not in result.output and "s3cr3t" not in result.output


def test_env_file_after_the_command_and_from_a_pipe(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    _pipeline(world)
    env = make_env(tmp_path, gitlab_sim, None)
    text = "".join(f"{name}={value}\n" for name, value in env.values.items())
    # A real process, the file given as /dev/fd/N of a pipe (as `--env-file <(vault read ...)` does): read once.
    read_end, write_end = os.pipe()
    os.write(write_end, text.encode())
    os.close(write_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "gitlab_log_shipper", "run", "--once", "--env-file",
                               f"/dev/fd/{read_end}"], pass_fds=(read_end,), capture_output=True, text=True,
                              timeout=60, env={k: v for k, v in os.environ.items() if k not in env.values})
    finally:
        os.close(read_end)
    assert proc.returncode == 0, proc.stderr
    assert list(env.output.rglob("metadata.json"))


def test_an_env_file_that_is_not_a_file_is_a_clear_error(tmp_path: Path) -> None:
    for path, problem in ((tmp_path / "missing.env", "no such file"), (tmp_path, "is a directory")):
        result = CliRunner().invoke(main, ["status", "--env-file", str(path)], env={}, catch_exceptions=False)
        assert result.exit_code == 2 and problem in result.output and "Traceback" not in result.output
    (tmp_path / "latin1.env").write_bytes(b"GITLAB_URL=https://g\nX=caf\xe9\n")
    with pytest.raises(ConfigError, match="line 2: not UTF-8"):
        read_env_file(tmp_path / "latin1.env")


def test_the_unit_passes_the_file_to_the_program_and_its_secrets_as_credentials() -> None:
    unit = UNIT.read_text("utf-8")
    assert not re.search(r"(?m)^EnvironmentFile=", unit)
    assert re.search(r"(?m)^ExecStart=\S+ run --env-file /etc/gitlab-log-shipper/env$", unit)
    assert re.search(r"(?m)^LoadCredential=gitlab_token:/etc/gitlab-log-shipper/gitlab_token$", unit)
    assert "#LoadCredential=api_post_auth_token:" in unit and "#LoadCredential=api_post_headers:" in unit


def test_the_examples_folder_lines_do_not_override_the_units(tmp_path: Path) -> None:
    """Defect 2: the unit's Environment= folders (the real environment) win, and the example sets none."""
    example = (ROOT / ".env.example").read_text("utf-8")
    for name in ("STATE_DIR", "LOG_DIR", "LOG_OUTPUT_DIR", "METRICS_TEXTFILE"):
        assert not re.search(rf"(?m)^{name}=", example) and re.search(rf"(?m)^#{name}=", example), name
    unit = dict(re.findall(r"(?m)^Environment=(\w+)=(\S+)$", UNIT.read_text("utf-8")))
    env_file = tmp_path / "env"
    env_file.write_text(example + "\nSTATE_DIR=/srv/elsewhere\n", "utf-8")
    config = load_config(env_file, {**unit, "GITLAB_TOKEN": "glpat-0123456789abcdef"})
    assert str(config.state_dir) == unit["STATE_DIR"] == "/var/lib/gitlab-log-shipper"
    assert str(config.log_dir) == unit["LOG_DIR"] and str(config.log_output_dir) == unit["LOG_OUTPUT_DIR"]
    assert load_config(env_file, {"GITLAB_TOKEN": "glpat-0123456789abcdef"}).state_dir == Path("/srv/elsewhere")
    # The example itself means the same to systemd's EnvironmentFile= and to this parser.
    assert read_env_file(ROOT / ".env.example").differences == ()


def test_a_name_only_systemd_would_set_is_reported_with_its_line() -> None:
    text = "GITLAB_URL=https://g\n# a comment \\\nHIDDEN=1\n"  # systemd < v254 swallowed HIDDEN; >= v254 sets it
    assert values(text) == {"GITLAB_URL": "https://g", "HIDDEN": "1"}
    cont = "A=one \\\nB=2\n"
    with pytest.raises(ConfigError, match="line continuations"):
        values(cont)
    # What this parser refuses (Y's continuation) systemd reads as Y="aZ=3", and then has no Z.
    assert [str(d) for d in systemd_differences("X=1\nY=a\\\nZ=3\n", {"X": "1", "Z": "3"}, {"X": 1, "Z": 3})] == [
        "line 2: Y: systemd's EnvironmentFile= would set it, this parser does not (a line continued by a backslash)",
        "line 3: Z: systemd's EnvironmentFile= would not set it (export prefix, byte-order mark or odd quoting)"]


def test_env_file_without_a_value_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["status", "--env-file"], env={}, catch_exceptions=False)
    assert result.exit_code == 2 and "'--env-file' requires an argument" in result.output
