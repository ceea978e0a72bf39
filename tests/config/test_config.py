"""Configuration: defaults, predecessor compatibility, and a clear error naming the variable."""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from gitlab_log_shipper.config import settings as config_module
from gitlab_log_shipper.config.settings import KNOWN_PREFIXES, KNOWN_VARIABLES, Config, load_config, unknown_variables
from gitlab_log_shipper.errors import ConfigError
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.world import World

from shipper_helpers import make_env

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


# -- issue 14: misspellings, units, plain-http headers, secrets from files -----------------------------------


def test_unknown_variables_with_our_prefixes_get_the_closest_known_name() -> None:
    env = {**BASE, "POLL_INTERVALL": "5", "API_POST_ENABLE": "true", "OUTBOX_MAXBYTES": "1G", "GITLAB_TOKEM": "x",
           "LOG_SOMETHING_ELSE": "1", "PATH": "/bin", "HOME": "/root", "SHARD": "0/1", "WEBHOOK_PORT": "80",
           "GITLAB_CI": "true", "GITLAB_USER_LOGIN": "bob",  # GitLab CI's own variables are not misspellings,
           "STATE_DIRECTORY": "/var/lib/gitlab-log-shipper"}  # nor what systemd sets for StateDirectory=
    assert unknown_variables(env) == [("API_POST_ENABLE", "API_POST_ENABLED"), ("GITLAB_TOKEM", "GITLAB_TOKEN"),
                                      ("LOG_SOMETHING_ELSE", None), ("OUTBOX_MAXBYTES", "OUTBOX_MAX_BYTES"),
                                      ("POLL_INTERVALL", "POLL_INTERVAL")]
    assert {"GITLAB_", "API_POST_", "LOG_", "POLL_", "OUTBOX_", "RETRY_"} <= set(KNOWN_PREFIXES)
    warnings = load(POLL_INTERVALL="5").warnings
    assert warnings == ("POLL_INTERVALL is not a setting of gitlab-log-shipper and is ignored; did you mean "
                        "POLL_INTERVAL?",)


def test_misspellings_are_a_warning_line_in_check_and_a_log_line_at_start(tmp_path: Path, world: World,
                                                                         gitlab_sim: GitLabSimulator) -> None:
    env = make_env(tmp_path, gitlab_sim, None)
    check = env.invoke("check", POLL_INTERVALL="5", API_POST_ENABLE="true")
    assert check.exit_code == 0, check.output
    assert "! configuration: API_POST_ENABLE is not a setting of gitlab-log-shipper and is ignored; did you mean " \
           "API_POST_ENABLED?" in check.output
    assert "! configuration: POLL_INTERVALL is not a setting" in check.output
    run = env.invoke("run", "--once", POLL_INTERVALL="5")
    assert run.exit_code == 0
    lines = [line for line in run.output.splitlines() if "POLL_INTERVALL" in line]
    assert len(lines) == 1 and " WARNING " in lines[0] and "did you mean POLL_INTERVAL?" in lines[0]


def test_the_loader_reads_only_names_of_the_one_list() -> None:
    source = Path(config_module.__file__).read_text("utf-8")
    read = set(re.findall(r'(?:get|opt|required)\("([A-Z][A-Z0-9_]+)"', source))
    assert read and read <= KNOWN_VARIABLES


@pytest.mark.parametrize("name, attribute", [("GITLAB_TIMEOUT", "gitlab_timeout"),
                                             ("API_POST_TIMEOUT", "api_post_timeout"),
                                             ("RETRY_DELAY", "retry_delay")])
def test_every_duration_accepts_the_same_units(name: str, attribute: str) -> None:
    for raw, seconds in (("30s", 30.0), ("2m", 120.0), ("45", 45.0), ("1.5", 1.5)):
        assert getattr(load(**{name: raw}), attribute) == seconds
    with pytest.raises(ConfigError, match=f"^{name}: expected seconds or a duration"):
        load(**{name: "soon"})
    with pytest.raises(ConfigError, match=f"^{name}: must be at most"):
        load(**{name: "2d"})
    assert load(GITLAB_TIMEOUT="1h").gitlab_timeout == 3600.0 and load(RETRY_DELAY="0").retry_delay == 0.0


def test_sizes_are_binary_with_or_without_the_i() -> None:
    for raw, size in (("50M", 50 * 1024**2), ("50MiB", 50 * 1024**2), ("512K", 512 * 1024), ("512KiB", 512 * 1024),
                      ("1G", 1024**3), ("1GiB", 1024**3), ("2097152", 2 * 1024**2)):
        assert load(MAX_JOB_LOG_BYTES=raw).max_job_log_bytes == size, raw


def test_headers_follow_the_tokens_plain_http_rule() -> None:
    remote = {"API_POST_ENABLED": "true", "API_POST_URL": "http://logs.example.com/in",
              "API_POST_HEADERS": "X-Api-Key: gateway-secret-123"}
    with pytest.raises(ConfigError) as caught:
        load(**remote)
    assert caught.value.variable == "API_POST_URL" and "API_POST_HEADERS" in caught.value.problem
    assert "gateway-secret-123" not in str(caught.value)
    assert load(**remote, API_POST_ALLOW_INSECURE="true").api_post_headers == (("X-Api-Key", "gateway-secret-123"),)
    assert load(**{**remote, "API_POST_URL": "https://logs.example.com/in"}).api_post_headers
    assert load(**{**remote, "API_POST_URL": "http://127.0.0.1:8080/in"}).api_post_headers


def _secret_file(tmp_path: Path, name: str, content: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(content, "utf-8")
    path.chmod(mode)
    return path


def test_secrets_from_files_and_systemd_credentials(tmp_path: Path) -> None:
    token = _secret_file(tmp_path, "token", "glpat-fromafile0123\n")
    headers = _secret_file(tmp_path, "headers", '{"X-Api-Key": "gateway-key-42"}\n')
    api = _secret_file(tmp_path, "api", "bearer-from-file-99")
    config = load_config(None, {"GITLAB_URL": BASE["GITLAB_URL"], "GITLAB_TOKEN_FILE": str(token),
                                "API_POST_AUTH_TOKEN_FILE": str(api), "API_POST_HEADERS_FILE": str(headers)})
    assert (config.gitlab_token, config.api_post_auth_token) == ("glpat-fromafile0123", "bearer-from-file-99")
    assert config.api_post_headers == (("X-Api-Key", "gateway-key-42"),) and config.warnings == ()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    _secret_file(credentials, "gitlab_token", "glpat-credential0123\n")
    _secret_file(credentials, "api_post_headers", "X-Tenant: acme\n")
    config = load_config(None, {"GITLAB_URL": BASE["GITLAB_URL"], "CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.gitlab_token == "glpat-credential0123" and config.api_post_headers == (("X-Tenant", "acme"),)
    assert config.api_post_auth_token is None  # no credential file: not set


@pytest.mark.parametrize("extra, variable, problem", [
    ({"GITLAB_TOKEN": BASE["GITLAB_TOKEN"]}, "GITLAB_TOKEN", "given twice, by GITLAB_TOKEN and by GITLAB_TOKEN_FILE"),
    ({"GITLAB_TOKEN_FILE": "/nonexistent/token"}, "GITLAB_TOKEN_FILE", "no such file: '/nonexistent/token'"),
    ({"GITLAB_TOKEN_FILE": "{tmp}"}, "GITLAB_TOKEN_FILE", "is not a regular file"),
    ({"GITLAB_TOKEN_FILE": "{tmp}/short"}, "GITLAB_TOKEN_FILE", "looks truncated"),
    ({"GITLAB_TOKEN_FILE": "{tmp}/spaced"}, "GITLAB_TOKEN_FILE", "contains whitespace"),
    ({"GITLAB_TOKEN_FILE": "{tmp}/empty"}, "GITLAB_TOKEN_FILE", "is empty"),
    ({"GITLAB_TOKEN_FILE": "{tmp}/fifo"}, "GITLAB_TOKEN_FILE", "is not a regular file"),
    ({"GITLAB_TOKEN_FILE": "{tmp}/token/inside"}, "GITLAB_TOKEN_FILE", "cannot read"),
    ({"GITLAB_TOKEN_FILE": "{tmp}/unreadable"}, "GITLAB_TOKEN_FILE", "cannot read"),
    ({"API_POST_AUTH_TOKEN_FILE": "{tmp}/same"}, "API_POST_AUTH_TOKEN_FILE", "is GITLAB_TOKEN itself"),
    ({"API_POST_HEADERS_FILE": "{tmp}/badheaders"}, "API_POST_HEADERS_FILE", ""),
    ({"CREDENTIALS_DIRECTORY": "{tmp}/creds", "GITLAB_TOKEN_FILE": ""}, "GITLAB_TOKEN",
     "given twice, by GITLAB_TOKEN and by the systemd credential gitlab_token"),
])
def test_secret_file_errors_name_the_variable_never_the_content(tmp_path: Path, extra: dict[str, str],
                                                                variable: str, problem: str) -> None:
    _secret_file(tmp_path, "token", "glpat-fromafile0123\n")
    _secret_file(tmp_path, "short", "glpat-x\n")
    _secret_file(tmp_path, "spaced", "glpat-has space 0123\n")
    _secret_file(tmp_path, "empty", "\n")
    _secret_file(tmp_path, "unreadable", "glpat-unreadable0123\n", mode=0o000)
    _secret_file(tmp_path, "same", "glpat-fromafile0123\n")
    _secret_file(tmp_path, "badheaders", "not-a-header-glpat-headersecret\n")
    (tmp_path / "creds").mkdir()
    _secret_file(tmp_path / "creds", "gitlab_token", "glpat-credential0123")
    os.mkfifo(tmp_path / "fifo")  # no writer: opening it must not hang
    if os.geteuid() == 0 and "unreadable" in str(extra):
        pytest.skip("root reads a file of mode 0000")
    environ = {"GITLAB_URL": BASE["GITLAB_URL"], "GITLAB_TOKEN_FILE": str(tmp_path / "token")}
    environ.update({k: v.format(tmp=tmp_path) for k, v in extra.items()})
    if "CREDENTIALS_DIRECTORY" in extra:
        environ["GITLAB_TOKEN"] = BASE["GITLAB_TOKEN"]
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ)
    assert caught.value.variable == variable and problem in caught.value.problem, str(caught.value)
    for content in ("fromafile0123", "glpat-x", "has space", "unreadable0123", "headersecret", "credential0123"):
        assert content not in str(caught.value)


def test_a_world_readable_secret_file_is_warned_about_in_check(tmp_path: Path, world: World,
                                                              gitlab_sim: GitLabSimulator) -> None:
    env = make_env(tmp_path, gitlab_sim, None)
    token = _secret_file(tmp_path, "token", env.values["GITLAB_TOKEN"] + "\n", mode=0o644)
    check = env.invoke("check", GITLAB_TOKEN="", GITLAB_TOKEN_FILE=str(token))
    assert check.exit_code == 0, check.output
    assert f"! configuration: GITLAB_TOKEN_FILE: '{token}' can be read by every user of this machine" in check.output
    assert env.values["GITLAB_TOKEN"] not in check.output
    token.chmod(0o640)
    assert "can be read by every user" not in env.invoke("check", GITLAB_TOKEN="", GITLAB_TOKEN_FILE=str(token)).output


def test_bad_config_from_the_cli_exits_2_without_a_traceback(tmp_path: Path, world: World,
                                                             gitlab_sim: GitLabSimulator) -> None:
    env = make_env(tmp_path, gitlab_sim, None)
    for overrides in ({"GITLAB_TOKEN_FILE": str(tmp_path / "missing")}, {"RETRY_DELAY": "a while"},
                      {"GITLAB_TIMEOUT": "2d"}):
        for command in (("run", "--once"), ("check",)):
            result = env.invoke(*command, **overrides)
            assert result.exit_code == 2 and "Traceback" not in result.output, result.output
            assert next(iter(overrides)) in result.output
            assert env.values["GITLAB_TOKEN"] not in result.output


def test_real_environment_beats_env_file_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("POLL_OVERLAP=10m\nDISCOVERY_INTERVAL=20m\n", "utf-8")
    config = load_config(None, {**BASE, "POLL_OVERLAP": "1m"})
    assert (config.poll_overlap, config.discovery_interval, config.initial_lookback) == (60.0, 1200.0, 3600.0)


def test_text_log_lines_carry_an_explicit_utc_time(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    env = make_env(tmp_path, gitlab_sim, None)
    result = env.invoke("run", "--once", POLL_INTERVALL="5", TZ="America/New_York")
    assert result.exit_code == 0
    app_log = (Path(env.values["LOG_DIR"]) / "gitlab-log-shipper.log").read_text("utf-8").splitlines()
    assert app_log and all(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ [\w.]+: ", line) for line in app_log)
    stamp = datetime.strptime(app_log[0].split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 120
