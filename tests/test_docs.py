"""The documentation keeps up with the code: every variable in .env.example and the README table, every
command in the README and OPERATIONS.md, and .env.example loads as it stands."""

from __future__ import annotations

import re
from pathlib import Path

from gitlab_log_shipper.cli import main
from gitlab_log_shipper.config.settings import IGNORED_VARIABLES, KNOWN_VARIABLES, load_config

ROOT = Path(__file__).resolve().parent.parent
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
