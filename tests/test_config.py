"""Configuration: defaults, predecessor compatibility, and a clear error naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from gitlab_log_shipper.config import Config, load_config
from gitlab_log_shipper.errors import ConfigError

BASE = {"GITLAB_URL": "https://gitlab.example.com/", "GITLAB_TOKEN": "glpat-abcdefghijklmnop"}


def load(**overrides: str) -> Config:
    return load_config(env_file=None, environ={**BASE, **overrides})


def test_defaults_are_the_predecessors_and_the_designs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./.env
    config = load()
    assert config.gitlab_url == "https://gitlab.example.com"  # trailing / ignored
    assert config.log_output_dir == Path("./logs/pipeline-logs")
    assert (config.retry_attempts, config.retry_delay) == (3, 2.0)
    assert config.log_level == "INFO"
    assert config.save_pipeline_status is None and config.save_job_status is None
    assert config.save_projects == frozenset() and config.exclude_projects == frozenset()
    assert config.save_metadata_always is True
    assert (config.api_post_enabled, config.api_post_timeout, config.api_post_retry_enabled, config.api_post_save_to_file) == (False, 30.0, True, False)
    assert config.mode == "file"
    assert (config.poll_interval, config.initial_lookback, config.state_dir, config.log_dir) == (60.0, 3600.0, Path("./state"), Path("./logs"))
    assert config.api_requests_log == Path("./logs/api-requests.log")


def test_modes() -> None:
    api = {"API_POST_ENABLED": "true", "API_POST_URL": "https://logs.example.com/in"}
    assert load(**api).mode == "api"
    assert load(**api, API_POST_SAVE_TO_FILE="TRUE").mode == "dual"
    assert load(API_POST_ENABLED="false").mode == "file"


def test_filters_are_case_insensitive_lists() -> None:
    config = load(LOG_SAVE_PIPELINE_STATUS="Success, FAILED", LOG_SAVE_JOB_STATUS="failed",
                  LOG_SAVE_PROJECTS="12, 34", LOG_EXCLUDE_PROJECTS="56")
    assert config.save_pipeline_status == {"success", "failed"}
    assert config.save_job_status == {"failed"}
    assert config.save_projects == {12, 34} and config.exclude_projects == {56}


def test_env_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    env = tmp_path / "shipper.env"
    env.write_text("GITLAB_URL=https://from-file.example.com\nGITLAB_TOKEN=glpat-fromfile123\nPOLL_INTERVAL=15m\n")
    config = load_config(env_file=env, environ={"POLL_INTERVAL": "30"})
    assert config.gitlab_url == "https://from-file.example.com"
    assert config.poll_interval == 30.0


def test_sizes_accept_units() -> None:
    assert load(OUTBOX_MAX_BYTES="500M").outbox_max_bytes == 500 * 1024**2
    assert load(OUTBOX_MAX_BYTES="2GiB").outbox_max_bytes == 2 * 1024**3
    assert load().outbox_max_bytes == 5 * 1024**3


def test_durations_accept_units() -> None:
    assert load(INITIAL_LOOKBACK="2d").initial_lookback == 172800
    assert load(INITIAL_LOOKBACK="90").initial_lookback == 90
    assert load(POLL_INTERVAL="1m").poll_interval == 60


def test_webhook_settings_are_accepted_and_reported_as_ignored() -> None:
    config = load(WEBHOOK_PORT="8080", WEBHOOK_SECRET="whatever")
    assert config.ignored_variables == ("WEBHOOK_PORT", "WEBHOOK_SECRET")


def test_repr_hides_secrets() -> None:
    config = load(API_POST_ENABLED="true", API_POST_URL="https://x.example.com", API_POST_AUTH_TOKEN="bearer-secret-42")
    text = repr(config)
    assert "glpat-abcdefghijklmnop" not in text and "bearer-secret-42" not in text
    assert "gitlab.example.com" in text


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"GITLAB_URL": ""}, "GITLAB_URL"),
        ({"GITLAB_URL": "ftp://gitlab.example.com"}, "GITLAB_URL"),
        ({"GITLAB_URL": "gitlab.example.com"}, "GITLAB_URL"),
        ({"GITLAB_URL": "https://user:pw@gitlab.example.com"}, "GITLAB_URL"),
        ({"GITLAB_TOKEN": "short"}, "GITLAB_TOKEN"),
        ({"RETRY_ATTEMPTS": "three"}, "RETRY_ATTEMPTS"),
        ({"RETRY_ATTEMPTS": "-1"}, "RETRY_ATTEMPTS"),
        ({"RETRY_DELAY": "nan"}, "RETRY_DELAY"),
        ({"POLL_INTERVAL": "0"}, "POLL_INTERVAL"),
        ({"INITIAL_LOOKBACK": "yesterday"}, "INITIAL_LOOKBACK"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
        ({"LOG_SAVE_PIPELINE_STATUS": "succes"}, "LOG_SAVE_PIPELINE_STATUS"),
        ({"LOG_SAVE_PIPELINE_STATUS": "all,failed"}, "LOG_SAVE_PIPELINE_STATUS"),
        ({"LOG_SAVE_JOB_STATUS": "passed"}, "LOG_SAVE_JOB_STATUS"),
        ({"LOG_SAVE_PROJECTS": "12,abc"}, "LOG_SAVE_PROJECTS"),
        ({"LOG_EXCLUDE_PROJECTS": "-4"}, "LOG_EXCLUDE_PROJECTS"),
        ({"API_POST_ENABLED": "maybe"}, "API_POST_ENABLED"),
        ({"API_POST_ENABLED": "true"}, "API_POST_URL"),
        ({"API_POST_ENABLED": "true", "API_POST_URL": "not a url"}, "API_POST_URL"),
        ({"API_POST_TIMEOUT": "0"}, "API_POST_TIMEOUT"),
        ({"GITLAB_PROJECTS": "group//proj"}, "GITLAB_PROJECTS"),
        ({"LOG_SAVE_METADATA_ALWAYS": "2"}, "LOG_SAVE_METADATA_ALWAYS"),
        ({"OUTBOX_MAX_BYTES": "lots"}, "OUTBOX_MAX_BYTES"),
        ({"OUTBOX_MAX_BYTES": "10"}, "OUTBOX_MAX_BYTES"),
        ({"OUTBOX_MAX_AGE": "-1d"}, "OUTBOX_MAX_AGE"),
        ({"OUTBOX_RETRY_MAX": "0"}, "OUTBOX_RETRY_MAX"),
    ],
)
def test_bad_values_name_the_variable(overrides: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**overrides)
    assert info.value.variable == variable
    assert str(info.value).startswith(variable + ":")


def test_missing_env_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--env-file"):
        load_config(env_file=tmp_path / "nope.env", environ=BASE)
