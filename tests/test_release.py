"""Releases (issue 14, defect 8): a version the changelog names, a wheel with what --help points to, and the
upgrade and rollback steps of OPERATIONS.md ("Upgrade and roll back") walked with real wheels in a fresh venv.
Also the group's --log-level/-v and the variables each command's --help names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from gitlab_log_shipper import __version__
from gitlab_log_shipper.cli import READS, main
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import make_env

ROOT = Path(__file__).resolve().parent.parent
# Variables read from the environment outside Config: systemd's (service/notify.py, service/logsetup.py).
SYSTEMD_VARIABLES = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"}
VARIABLE = re.compile(r"\b[A-Z][A-Z0-9_]{3,}\b")


def example_variables() -> set[str]:
    """Every variable .env.example explains (commented out or not)."""
    text = (ROOT / ".env.example").read_text("utf-8")
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))


def test_changelog_names_the_version() -> None:
    """The version is bumped by hand: the release commit must say what changed under the same number."""
    headings = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text("utf-8"), flags=re.MULTILINE)
    assert headings and headings[0] == __version__, f"CHANGELOG.md's newest section {headings[:1]} != {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__) and __version__ != "0.1.0"


def test_share_files_are_the_packaged_ones() -> None:
    """share/ holds links to the files operators edit, not copies that would drift."""
    share = ROOT / "gitlab_log_shipper" / "share"
    assert (share / "env.example").read_bytes() == (ROOT / ".env.example").read_bytes()
    assert (share / "gitlab-log-shipper.service").read_bytes() == \
        (ROOT / "packaging" / "systemd" / "gitlab-log-shipper.service").read_bytes()


def _help(*args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--help"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_help_names_the_variables_it_reads() -> None:
    known = example_variables() | SYSTEMD_VARIABLES
    named: set[str] = set()
    assert set(main.commands) <= set(READS), f"commands without a READS entry: {set(main.commands) - set(READS)}"
    for name in main.commands:
        text = " ".join(_help(name).split())  # click rewraps; a name is never split
        assert "Variables read: " in text, name
        listed = set(VARIABLE.findall(text.split("Variables read: ", 1)[1].split(" Options:", 1)[0]))
        assert listed and listed <= known, f"{name}: unknown names {listed - known}"
        named |= listed
    unnamed = example_variables() - named - {"WEBHOOK_PORT", "WEBHOOK_SECRET"}  # the old collector's, ignored
    assert not unnamed, f".env.example variables no command's --help names: {sorted(unnamed)}"
    assert "POLL_INTERVAL" in _help("run") and "METRICS_TEXTFILE" in _help("run")


def test_group_help_names_installed_files_and_completion() -> None:
    text = _help()
    paths = re.findall(r"^\s+(/\S+)$", text, flags=re.MULTILINE)
    assert {Path(p).name for p in paths} == {"env.example", "gitlab-log-shipper.service"}
    assert all(Path(p).is_file() for p in paths)
    assert "_GITLAB_LOG_SHIPPER_COMPLETE=bash_source gitlab-log-shipper" in text


def _pipeline(world: World, project_id: int, name: str) -> None:
    world.add_pipeline(project_id, status="success", jobs=[JobSpec(name, "test", "success", log=f"{name}\n")])


def test_log_level_and_verbose_override_log_level(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                  receiver: Receiver) -> None:
    project = world.add_project("team/app")
    _pipeline(world, project.id, "a")
    env = make_env(tmp_path, gitlab_sim, receiver, LOG_LEVEL="ERROR")
    log = Path(env.values["LOG_DIR"]) / "gitlab-log-shipper.log"
    assert env.invoke("-v", "run", "--once").exit_code == 0
    assert " DEBUG " in log.read_text("utf-8")  # LOG_LEVEL=ERROR alone would write nothing at all
    log.unlink()
    _pipeline(world, project.id, "b")
    assert env.invoke("--log-level", "warning", "run", "--once", LOG_LEVEL="DEBUG").exit_code == 0
    assert not re.search(r" (DEBUG|INFO) ", log.read_text("utf-8") if log.exists() else "")
    contradiction = env.invoke("-v", "--log-level", "ERROR", "status")
    assert contradiction.exit_code == 2 and "contradicts --log-level ERROR" in contradiction.output


# -- build, install, upgrade, roll back -------------------------------------------------------------------------

OLD, NEW = __version__, __version__ + ".post1"  # "new" is this tree with a bumped version
_ANYWHERE = shutil.ignore_patterns(".git", ".venv*", "*.egg-info", "__pycache__", ".pytest_cache")
# Only at the top: the package has folders of these names too (gitlab_log_shipper/state/ is a layer).
_AT_ROOT = {"build", "dist", "tests", "bench", "logs", "state", "demo"}


def _IGNORE(folder: str, names: list[str]) -> set[str]:
    ignored = set(_ANYWHERE(folder, names))
    if Path(folder).resolve() == ROOT.resolve():
        ignored |= _AT_ROOT & set(names)
    return ignored


def _build(tmp: Path, version: str, wheels: Path) -> Path:
    """The wheel of a copy of this tree whose __version__ is ``version``, built as OPERATIONS.md says (offline:
    no build isolation, with the setuptools and wheel of the test venv)."""
    tree = tmp / f"src-{version}"
    shutil.copytree(ROOT, tree, symlinks=True, ignore=_IGNORE)
    init = tree / "gitlab_log_shipper" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]+"', f'__version__ = "{version}"', init.read_text("utf-8")), "utf-8")
    _pip("wheel", str(tree), "--no-deps", "--no-build-isolation", "-w", str(wheels))
    wheel = wheels / f"gitlab_log_shipper-{version}-py3-none-any.whl"
    assert wheel.is_file(), sorted(p.name for p in wheels.iterdir())
    return wheel


def _pip(*args: str, python: Path | None = None) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    command += [*(["--python", str(python)] if python else []), *args]
    subprocess.run(command, check=True, timeout=120, capture_output=True, env=_clean_env())


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the PYTHONPATH that points the test run at the checkout."""
    return {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}, **extra}


def _fresh_venv(tmp: Path) -> Path:
    """A venv that has the shipper's dependencies but not the shipper. The dependencies are this test venv's
    own, linked into a folder on the new venv's path (offline: /opt/wheels holds none of them, and no index is
    needed); pip sees them as installed and resolves the wheel's requirements against them."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    deps = tmp / "deps"
    deps.mkdir()
    ours = re.compile(r"^(gitlab_log_shipper|__editable__|_distutils_hack|distutils-precedence|pip|setuptools|"
                      r"pkg_resources|wheel)\b", re.IGNORECASE)
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not ours.match(entry.name) and not entry.name.endswith(".pth"):
            (deps / entry.name).symlink_to(entry)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    (site / "shipper-deps.pth").write_text(f"{deps}\n", "utf-8")
    return venv


def _cli(venv: Path, env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "gitlab-log-shipper"), *args], env=_clean_env(**env), cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def _installed(venv: Path, env: dict[str, str], cwd: Path, version: str) -> None:
    """``--version`` says ``version``, and the unit and .env.example --help names exist in the venv."""
    assert _cli(venv, env, cwd, "--version").stdout.strip() == f"gitlab-log-shipper, version {version}"
    paths = re.findall(r"^\s+(/\S+)$", _cli(venv, env, cwd, "--help").stdout, flags=re.MULTILINE)
    assert len(paths) == 2 and all(p.startswith(str(venv)) and Path(p).is_file() for p in paths), paths


def _ship_one(world: World, project_id: int, receiver: Receiver, venv: Path, env: dict[str, str], cwd: Path,
              name: str, expected_total: int) -> dict[str, object]:
    """One new pipeline shipped by ``run --once``, nothing shipped twice; ``status --json`` afterwards."""
    _pipeline(world, project_id, name)
    result = _cli(venv, env, cwd, "--env-file", str(cwd / "empty.env"), "run", "--once")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(receiver.accepted()) == expected_total
    status = _cli(venv, env, cwd, "--env-file", str(cwd / "empty.env"), "status", "--json")
    assert status.returncode == 0, status.stderr
    return json.loads(status.stdout)


@pytest.mark.timeout(120)
def test_build_upgrade_and_roll_back(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                     receiver: Receiver) -> None:
    wheels = tmp_path / "wheels"
    old_wheel, _ = _build(tmp_path, OLD, wheels), _build(tmp_path, NEW, wheels)
    with zipfile.ZipFile(old_wheel) as wheel:
        names = set(wheel.namelist())
    assert {"gitlab_log_shipper/share/env.example", "gitlab_log_shipper/share/gitlab-log-shipper.service"} <= names
    # setuptools < 77 writes dist-info/LICENSE, later ones dist-info/licenses/LICENSE
    assert any(n.startswith(f"gitlab_log_shipper-{OLD}.dist-info/") and n.endswith("/LICENSE") for n in names), names
    venv, cwd = _fresh_venv(tmp_path), tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "empty.env").touch()
    project = world.add_project("team/app")
    env = make_env(tmp_path / "shipper", gitlab_sim, receiver).values

    def install(version: str) -> None:
        _pip("install", "--no-index", "--find-links", str(wheels), f"gitlab-log-shipper=={version}", python=venv)
        _installed(venv, env, cwd, version)

    install(OLD)
    completion = _cli(venv, {**env, "_GITLAB_LOG_SHIPPER_COMPLETE": "bash_complete",
                             "COMP_WORDS": "gitlab-log-shipper re", "COMP_CWORD": "1"}, cwd)
    assert completion.stdout.split() == ["plain,redeliver"], completion  # OPERATIONS.md's "Shell completion"
    before = _ship_one(world, project.id, receiver, venv, env, cwd, "a", 1)
    install(NEW)  # the upgrade: the old version's state store is the new one's (nothing shipped again)
    after = _ship_one(world, project.id, receiver, venv, env, cwd, "b", 2)
    assert after["version"] == NEW and after["totals"]["shipped"] == 2 and after["totals"]["cycles"] == 2  # type: ignore[index]
    install(OLD)  # the rollback
    back = _ship_one(world, project.id, receiver, venv, env, cwd, "c", 3)
    assert back["version"] == OLD and back["totals"]["shipped"] == 3  # type: ignore[index]
    assert before["totals"]["shipped"] == 1  # type: ignore[index]
