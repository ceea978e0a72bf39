"""The documentation keeps up with the code: every variable in .env.example and the README table, every
command in the README and OPERATIONS.md, and .env.example loads as it stands."""

from __future__ import annotations

import re
from pathlib import Path

from gitlab_log_shipper.cli import main
from gitlab_log_shipper.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG_SOURCE = (ROOT / "gitlab_log_shipper" / "config.py").read_text("utf-8")
VARIABLES = sorted(set(re.findall(r'(?:get|opt|required)\("([A-Z][A-Z0-9_]+)"', CONFIG_SOURCE)))


def test_every_variable_is_documented() -> None:
    example = (ROOT / ".env.example").read_text("utf-8")
    readme = (ROOT / "README.md").read_text("utf-8")
    assert len(VARIABLES) > 30
    for name in VARIABLES:
        assert re.search(rf"(?m)^{name}=", example), f"{name} missing from .env.example"
        assert f"| `{name}` |" in readme, f"{name} missing from the README's configuration table"


def test_env_example_loads() -> None:
    config = load_config(ROOT / ".env.example", {})
    assert config.gitlab_url == "https://gitlab.example.com" and config.metrics_textfile is None


def test_every_command_is_documented() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    operations = (ROOT / "OPERATIONS.md").read_text("utf-8")
    for name in main.commands:
        assert f"gitlab-log-shipper {name}" in readme, name
        assert f"gls {name}" in operations or f"gitlab-log-shipper {name}" in operations, name
