"""The documentation keeps up with the code: every variable in .env.example and the README table, every
command in the README and OPERATIONS.md, and .env.example loads as it stands."""

from __future__ import annotations

import re
from pathlib import Path

from gitlab_log_shipper.cli import main
from gitlab_log_shipper.config.settings import IGNORED_VARIABLES, KNOWN_VARIABLES, load_config

from repo_paths import REPO_ROOT

ROOT = REPO_ROOT
CONFIG_SOURCE = (ROOT / "gitlab_log_shipper" / "config" / "settings.py").read_text("utf-8")
READ = set(re.findall(r'(?:get|opt|required)\("([A-Z][A-Z0-9_]+)"', CONFIG_SOURCE))
VARIABLES = sorted(KNOWN_VARIABLES - set(IGNORED_VARIABLES))


def test_every_variable_is_documented() -> None:
    example = (ROOT / ".env.example").read_text("utf-8")
    readme = (ROOT / "README.md").read_text("utf-8")
    assert len(VARIABLES) > 30 and READ <= KNOWN_VARIABLES  # the loader reads only names of the one list
    for name in VARIABLES:
        assert re.search(rf"(?m)^#?{name}=", example), f"{name} missing from .env.example"
        assert f"| `{name}` |" in readme, f"{name} missing from the README's configuration table"


def test_env_example_loads(tmp_path: Path) -> None:
    # The token is commented out in the example (the unit passes it as a credential): give it as systemd would.
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "gitlab_token").write_text("glpat-0123456789abcdef\n")
    (credentials / "gitlab_token").chmod(0o600)
    config = load_config(ROOT / ".env.example", {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.gitlab_token == "glpat-0123456789abcdef" and config.warnings == ()
    assert config.gitlab_url == "https://gitlab.example.com" and config.metrics_textfile is None


def test_every_command_is_documented() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    operations = (ROOT / "OPERATIONS.md").read_text("utf-8")
    for name in main.commands:
        assert f"gitlab-log-shipper {name}" in readme, name
        assert f"gls {name}" in operations or f"gitlab-log-shipper {name}" in operations, name


# A path of the repository written in its text: docs, comments, help texts. Project names and log lines that merely
# look like one are listed in NOT_PATHS.
REPO_PATH = re.compile(r"(?<![\w./-])((?:tests|gitlab_log_shipper|bench|scripts|docs|packaging|deploy|\.ci)/[\w./-]*\w)")
NOT_PATHS = {"bench/app", "bench/big",  # simulated GitLab projects in bench/run.py
             "scripts/utils.sh"}  # a command inside a job log of tests/document/test_sections.py
NOT_SCANNED = {".git", ".venv", "build", "dist", "logs", "state", "demo", "__pycache__", ".pytest_cache", "cassettes"}
TEXT_SUFFIXES = {".py", ".md", ".cfg", ".toml", ".sh", ".service", ".yaml", ".yml", ".txt", ".example", ""}


def test_every_path_the_repository_names_exists() -> None:
    """The layout moved files (issue 15): a doc, comment or help text naming a test module or a module of the
    package by its path must name where it is now."""
    missing = []
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT)
        if path.is_dir() or path.suffix not in TEXT_SUFFIXES or path.is_symlink():
            continue
        if any(part in NOT_SCANNED or part.endswith(".egg-info") or part.startswith(".venv") for part in relative.parts):
            continue
        try:
            text = path.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for match in REPO_PATH.finditer(text):
            named = match.group(1).rstrip(".")
            if "*" not in named and named not in NOT_PATHS and not (ROOT / named).exists():
                missing.append(f"{relative}:{text.count(chr(10), 0, match.start()) + 1}: {named}")
    assert missing == []
