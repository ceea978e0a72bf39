"""Bad input gets a clear answer.

* Malformed configuration, through the real CLI: exit code 2, exactly one line naming the variable,
  no traceback, no secret echoed.
* Malformed GitLab answers (2xx with invalid JSON, HTML, an empty body, wrong types, missing fields):
  logged, the pipeline is tried again on the next cycle, and the daemon keeps running.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from gitlab_log_shipper.cli import main
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import documents, make_env, start_daemon, stop_daemon

TOKEN = "glpat-BADINPUT0123456789"
API_TOKEN = "rcv-BADINPUT-secret"
UNSET = None
TS = "2026-11-26T10:00:00.000Z"

# Every variable the shipper reads, so that nothing from the test runner's environment leaks in.
VARIABLES = (
    "GITLAB_URL GITLAB_TOKEN GITLAB_PROJECTS GITLAB_GROUPS GITLAB_TIMEOUT GITLAB_TLS_VERIFY GITLAB_CA_BUNDLE "
    "POLL_INTERVAL POLL_OVERLAP INITIAL_LOOKBACK DISCOVERY_INTERVAL STATE_DIR LOG_DIR LOG_LEVEL "
    "LOG_SAVE_PIPELINE_STATUS LOG_SAVE_PROJECTS LOG_EXCLUDE_PROJECTS LOG_SAVE_JOB_STATUS LOG_SAVE_METADATA_ALWAYS "
    "LOG_OUTPUT_DIR LOG_REDACT_PATTERNS API_POST_ENABLED API_POST_URL API_POST_AUTH_TOKEN API_POST_TIMEOUT "
    "API_POST_RETRY_ENABLED API_POST_SAVE_TO_FILE API_POST_TLS_VERIFY API_POST_CA_BUNDLE API_POST_ALLOW_INSECURE "
    "RETRY_ATTEMPTS RETRY_DELAY"
).split()

API_ON = {"API_POST_ENABLED": "true", "API_POST_URL": "https://logs.example.com/in", "API_POST_AUTH_TOKEN": API_TOKEN}

# (case id, settings on top of a valid configuration, the variable the message must name).
# "{tmp}" is the test's temporary folder, holding a regular file "a_file" and "garbage.pem".
BAD_CONFIGS = [
    # missing and empty
    ("url-missing", {"GITLAB_URL": UNSET}, "GITLAB_URL"),
    ("url-empty", {"GITLAB_URL": "   "}, "GITLAB_URL"),
    ("token-missing", {"GITLAB_TOKEN": UNSET}, "GITLAB_TOKEN"),
    ("token-empty", {"GITLAB_TOKEN": ""}, "GITLAB_TOKEN"),
    ("api-url-missing", {"API_POST_ENABLED": "true"}, "API_POST_URL"),
    ("status-filter-empty-list", {"LOG_SAVE_PIPELINE_STATUS": " , "}, "LOG_SAVE_PIPELINE_STATUS"),
    # too short, whitespace
    ("token-truncated", {"GITLAB_TOKEN": "glpat-12"}, "GITLAB_TOKEN"),
    ("token-whitespace", {"GITLAB_TOKEN": "glpat-0123 456789"}, "GITLAB_TOKEN"),
    ("api-token-whitespace", {**API_ON, "API_POST_AUTH_TOKEN": "rcv secret"}, "API_POST_AUTH_TOKEN"),
    # non-numeric
    ("timeout-words", {"GITLAB_TIMEOUT": "thirty"}, "GITLAB_TIMEOUT"),
    ("retries-float", {"RETRY_ATTEMPTS": "2.5"}, "RETRY_ATTEMPTS"),
    ("retry-delay-nan", {"RETRY_DELAY": "nan"}, "RETRY_DELAY"),
    ("interval-words", {"POLL_INTERVAL": "soon"}, "POLL_INTERVAL"),
    ("lookback-words", {"INITIAL_LOOKBACK": "yesterday"}, "INITIAL_LOOKBACK"),
    ("project-ids-words", {"LOG_SAVE_PROJECTS": "12,abc"}, "LOG_SAVE_PROJECTS"),
    # negative
    ("retries-negative", {"RETRY_ATTEMPTS": "-1"}, "RETRY_ATTEMPTS"),
    ("interval-negative", {"POLL_INTERVAL": "-5"}, "POLL_INTERVAL"),
    ("overlap-negative", {"POLL_OVERLAP": "-1m"}, "POLL_OVERLAP"),
    ("exclude-negative", {"LOG_EXCLUDE_PROJECTS": "-4"}, "LOG_EXCLUDE_PROJECTS"),
    # out of range
    ("interval-zero", {"POLL_INTERVAL": "0"}, "POLL_INTERVAL"),
    ("api-timeout-zero", {"API_POST_TIMEOUT": "0"}, "API_POST_TIMEOUT"),
    ("discovery-zero", {"DISCOVERY_INTERVAL": "0s"}, "DISCOVERY_INTERVAL"),
    ("retry-delay-huge", {"RETRY_DELAY": "1e300"}, "RETRY_DELAY"),
    ("retries-huge", {"RETRY_ATTEMPTS": "1000000"}, "RETRY_ATTEMPTS"),
    ("timeout-huge", {"GITLAB_TIMEOUT": "1e9"}, "GITLAB_TIMEOUT"),
    ("interval-huge", {"POLL_INTERVAL": "99999999999999d"}, "POLL_INTERVAL"),
    ("lookback-huge", {"INITIAL_LOOKBACK": "1000000d"}, "INITIAL_LOOKBACK"),
    # booleans and levels
    ("bool-maybe", {"API_POST_ENABLED": "maybe"}, "API_POST_ENABLED"),
    ("bool-two", {"LOG_SAVE_METADATA_ALWAYS": "2"}, "LOG_SAVE_METADATA_ALWAYS"),
    ("tls-verify-word", {"GITLAB_TLS_VERIFY": "nope"}, "GITLAB_TLS_VERIFY"),
    ("insecure-word", {"API_POST_ALLOW_INSECURE": "perhaps"}, "API_POST_ALLOW_INSECURE"),
    ("log-level", {"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
    # URLs and schemes
    ("url-ftp", {"GITLAB_URL": "ftp://gitlab.example.com"}, "GITLAB_URL"),
    ("url-no-scheme", {"GITLAB_URL": "gitlab.example.com"}, "GITLAB_URL"),
    ("url-javascript", {"GITLAB_URL": "javascript:alert(1)"}, "GITLAB_URL"),
    ("url-no-host", {"GITLAB_URL": "https://"}, "GITLAB_URL"),
    ("url-credentials", {"GITLAB_URL": "https://root:hunter2@gitlab.example.com"}, "GITLAB_URL"),
    ("url-bad-port", {"GITLAB_URL": "https://gitlab.example.com:99999"}, "GITLAB_URL"),
    ("url-space", {"GITLAB_URL": "https://git lab.example.com"}, "GITLAB_URL"),
    ("url-query", {"GITLAB_URL": "https://gitlab.example.com/?private_token=hunter2"}, "GITLAB_URL"),
    ("url-broken-ipv6", {"GITLAB_URL": "http://[::1"}, "GITLAB_URL"),
    ("url-credentials-and-space", {"GITLAB_URL": "https://root:hunter2 @gitlab.example.com"}, "GITLAB_URL"),
    ("api-url-words", {**API_ON, "API_POST_URL": "not a url"}, "API_POST_URL"),
    ("api-url-file", {**API_ON, "API_POST_URL": "file:///etc/passwd"}, "API_POST_URL"),
    ("api-url-plain-http-remote", {**API_ON, "API_POST_URL": "http://logs.example.com/in"}, "API_POST_URL"),
    # filters
    ("status-typo", {"LOG_SAVE_PIPELINE_STATUS": "succes"}, "LOG_SAVE_PIPELINE_STATUS"),
    ("status-all-and-more", {"LOG_SAVE_PIPELINE_STATUS": "all,failed"}, "LOG_SAVE_PIPELINE_STATUS"),
    ("job-status-unknown", {"LOG_SAVE_JOB_STATUS": "passed"}, "LOG_SAVE_JOB_STATUS"),
    ("projects-path-traversal", {"GITLAB_PROJECTS": "group/../etc"}, "GITLAB_PROJECTS"),
    ("groups-double-slash", {"GITLAB_GROUPS": "acme//web"}, "GITLAB_GROUPS"),
    # contradictions
    ("status-never-finished", {"LOG_SAVE_PIPELINE_STATUS": "running,pending"}, "LOG_SAVE_PIPELINE_STATUS"),
    ("ca-bundle-without-verify", {"GITLAB_TLS_VERIFY": "false", "GITLAB_CA_BUNDLE": "{tmp}/ca.pem"}, "GITLAB_CA_BUNDLE"),
    ("api-ca-bundle-without-verify", {**API_ON, "API_POST_TLS_VERIFY": "false", "API_POST_CA_BUNDLE": "{tmp}/ca.pem"},
     "API_POST_CA_BUNDLE"),
    ("api-token-is-gitlab-token", {**API_ON, "API_POST_AUTH_TOKEN": TOKEN}, "API_POST_AUTH_TOKEN"),
    # CA bundles and redaction patterns
    ("ca-bundle-missing", {"GITLAB_CA_BUNDLE": "{tmp}/nope.pem"}, "GITLAB_CA_BUNDLE"),
    ("ca-bundle-garbage", {**API_ON, "API_POST_CA_BUNDLE": "{tmp}/garbage.pem"}, "API_POST_CA_BUNDLE"),
    ("redact-bad-regex", {"LOG_REDACT_PATTERNS": "default;;([unclosed"}, "LOG_REDACT_PATTERNS"),
    ("redact-empty-match", {"LOG_REDACT_PATTERNS": "x?"}, "LOG_REDACT_PATTERNS"),
    # folders that cannot be created, read or written
    ("state-dir-is-a-file", {"STATE_DIR": "{tmp}/a_file"}, "STATE_DIR"),
    ("log-dir-under-a-file", {"LOG_DIR": "{tmp}/a_file/logs"}, "LOG_DIR"),
    ("output-dir-is-a-file", {"LOG_OUTPUT_DIR": "{tmp}/a_file"}, "LOG_OUTPUT_DIR"),
    ("output-dir-under-a-file-dual", {**API_ON, "API_POST_SAVE_TO_FILE": "true", "LOG_OUTPUT_DIR": "{tmp}/a_file/x"},
     "LOG_OUTPUT_DIR"),
    ("state-dir-unwritable", {"STATE_DIR": "/proc/self"}, "STATE_DIR"),
    ("log-dir-uncreatable", {"LOG_DIR": "/proc/gitlab-log-shipper-test/logs"}, "LOG_DIR"),
    ("state-dir-name-too-long", {"STATE_DIR": "{tmp}/" + "s" * 300}, "STATE_DIR"),
    ("app-log-is-a-folder", {"LOG_DIR": "{tmp}/logdir-with-folder"}, "LOG_DIR"),
]


def _invoke(tmp: Path, overrides: dict[str, str | None]) -> tuple[int, str]:
    (tmp / "a_file").write_text("x")
    (tmp / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    (tmp / "ca.pem").write_bytes((Path(__file__).parent / "tls" / "ca.pem").read_bytes())
    (tmp / "logdir-with-folder" / "gitlab-log-shipper.log").mkdir(parents=True, exist_ok=True)
    env_file = tmp / "empty.env"
    env_file.touch()
    env: dict[str, str | None] = {name: None for name in VARIABLES}
    env.update({"GITLAB_URL": "http://127.0.0.1:9", "GITLAB_TOKEN": TOKEN, "STATE_DIR": str(tmp / "state"),
                "LOG_DIR": str(tmp / "logs"), "LOG_OUTPUT_DIR": str(tmp / "out")})
    env.update({k: v.replace("{tmp}", str(tmp)) if isinstance(v, str) else v for k, v in overrides.items()})
    result = CliRunner().invoke(main, ["--env-file", str(env_file), "run", "--once"], env=env, catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.parametrize(("overrides", "variable"), [case[1:] for case in BAD_CONFIGS], ids=[case[0] for case in BAD_CONFIGS])
def test_bad_configuration_exits_2_with_one_line_naming_the_variable(
        overrides: dict[str, str | None], variable: str, tmp_path: Path) -> None:
    code, output = _invoke(tmp_path, overrides)
    assert code == 2, output
    lines = output.splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith(f"gitlab-log-shipper: configuration error: {variable}: "), output
    assert "Traceback" not in output and TOKEN not in output and API_TOKEN not in output and "hunter2" not in output


def test_the_table_covers_at_least_twenty_cases_and_its_base_is_valid(tmp_path: Path) -> None:
    assert len(BAD_CONFIGS) >= 20
    assert len({case[0] for case in BAD_CONFIGS}) == len(BAD_CONFIGS)
    with GitLabSimulator(World(token=TOKEN)) as sim:  # the same base, nothing wrong: a normal (empty) cycle
        code, output = _invoke(tmp_path, {"GITLAB_URL": sim.url})
    assert code == 0, output


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes any folder")
@pytest.mark.parametrize("mode", [0o500, 0o000])
def test_folders_without_permission(mode: int, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=mode)
    try:
        code, output = _invoke(tmp_path, {"STATE_DIR": str(locked)})
    finally:
        locked.chmod(0o700)
    assert code == 2 and output.startswith("gitlab-log-shipper: configuration error: STATE_DIR: "), output


# -- malformed GitLab answers ------------------------------------------------------------------------------

ROW = '{"id": %s, "status": %s, "updated_at": %s}'
DETAIL = '{"id": 5, "project_id": 1, "status": "success", "finished_at": "%s", %%s}' % TS
MALFORMED = [
    # (endpoint, 200 body)
    ("pipelines", "{not json"),
    ("pipelines", "<html><body><h1>502 Bad Gateway</h1></body></html>"),
    ("pipelines", ""),
    ("pipelines", '{"message": "a dict, not a list"}'),
    ("pipelines", "[1, 2]"),
    ("pipelines", "[" + ROW % ('"abc"', '"success"', f'"{TS}"') + "]"),
    ("pipelines", "[" + ROW % ("true", '"success"', f'"{TS}"') + "]"),
    ("pipelines", "[" + ROW % ("-3", '"success"', f'"{TS}"') + "]"),
    ("pipelines", "[" + ROW % ("7", "null", f'"{TS}"') + "]"),
    ("pipelines", "[" + ROW % ("7", '"success"', '"yesterday"') + "]"),
    ("pipelines", '[{"id": 7}]'),
    ("pipeline", "{not json"),
    ("pipeline", '{"id": 5, "proj'),
    ("pipeline", ""),
    ("pipeline", "null"),
    ("pipeline", "[]"),
    ("pipeline", "<!DOCTYPE html><html><title>Sign in</title></html>"),
    ("pipeline", '{"id": 5, "project_id": 1}'),
    ("pipeline", '{"id": "5", "project_id": 1, "status": "success"}'),
    ("pipeline", '{"id": 5, "project_id": 1, "status": ["success"]}'),
    ("pipeline", DETAIL % '"duration": "long"'),
    ("pipeline", DETAIL % '"user": "alice"'),
    ("pipeline", '{"id": 5, "project_id": 1, "status": "success", "finished_at": 1700000000}'),
    ("pipeline_jobs", '{"jobs": []}'),
    ("pipeline_jobs", "[null]"),
    ("pipeline_jobs", '[{"id": 1, "status": "success"}]'),
    ("pipeline_jobs", '[{"id": "7", "name": "a", "status": "success"}]'),
    ("pipeline_jobs", '[{"id": 7, "name": "a", "status": "success", "started_at": "noon"}]'),
    ("projects", '{"not": "a list"}'),
    ("projects", '[{"id": "x", "name": "app"}]'),
    ("commit", '{"author_email": 5}'),
]


@pytest.mark.parametrize(("endpoint", "body"), MALFORMED, ids=[f"{e}:{b[:40]}" for e, b in MALFORMED])
def test_malformed_gitlab_answer_is_logged_and_the_pipeline_retried(endpoint: str, body: str, tmp_path: Path) -> None:
    world = World()
    author = world.add_user("bob", public_email="")  # no public email: the commit's author is looked up
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, status="success", user=author,
                                  jobs=[JobSpec("build", "build", "success", log="built\n")])
    with GitLabSimulator(world) as sim, Receiver() as receiver:
        env = make_env(tmp_path, sim, receiver)
        sim.inject(endpoint, 200, body=body)
        first = env.invoke("run", "--once")
        assert first.exit_code == 1, first.output
        assert "Traceback" not in first.output
        assert sim.faults_served["injected"] == 1
        assert "unexpected answer from GitLab" in first.output or "GitLab answered invalid data" in first.output
        assert "will retry next cycle" in first.output or "cannot discover projects" in first.output
        assert receiver.requests == []

        second = env.invoke("run", "--once")
        assert second.exit_code == 0, second.output
        assert [d["pipeline_id"] for d in documents(receiver)] == [pipeline.id]


def test_the_daemon_keeps_running_through_malformed_answers(tmp_path: Path) -> None:
    world = World()
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    with GitLabSimulator(world) as sim, Receiver() as receiver:
        env = make_env(tmp_path, sim, receiver, POLL_INTERVAL="1")
        sim.inject("pipelines", 200, body='[{"a": 1}]')  # once a KeyError in the shipper
        sim.inject("pipeline", 200, count=2, body="<html><body>maintenance</body></html>")
        sim.inject("pipeline_jobs", 200, body='[{"id": "x"}]')
        proc = start_daemon(env)
        try:
            receiver.wait_for(1, timeout=30)
            time.sleep(0.2)
        finally:
            code, output = stop_daemon(proc)
    assert code == 0, output
    assert sim.faults_served["injected"] == 4
    assert [d["pipeline_id"] for d in documents(receiver)] == [pipeline.id]
    assert output.count("unexpected answer from GitLab") >= 4  # each injected answer, logged with its reason
    assert "came as text/html" in output
    assert "Traceback" not in output and "failed unexpectedly" not in output
