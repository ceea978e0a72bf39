"""Operating it: extra POST headers (secret values), api-requests.log rotation, LOG_FORMAT=json, one line
per event, journald priorities — through the CLI against the simulator and the receiver."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest

from gitlab_log_shipper.config.settings import load_config
from gitlab_log_shipper.delivery.request_log import ManagedRequestLog
from gitlab_log_shipper.errors import ConfigError
from gitlab_log_shipper.service.logsetup import JsonFormatter, TextFormatter, stderr_is_journal
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver, Reply
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import API_TOKEN, documents, make_env

BASE = {"GITLAB_URL": "https://gitlab.example.com", "GITLAB_TOKEN": "glpat-abcdefghijklmnop"}
GATEWAY_KEY = "gw-key-5f1e2d3c4b"


def test_api_post_headers_both_spellings() -> None:
    semi = load_config(None, {**BASE, "API_POST_HEADERS": f"X-Api-Key: {GATEWAY_KEY}; X-Tenant:acme ;"})
    assert semi.api_post_headers == (("X-Api-Key", GATEWAY_KEY), ("X-Tenant", "acme"))
    as_json = load_config(None, {**BASE, "API_POST_HEADERS": json.dumps({"X-Api-Key": GATEWAY_KEY})})
    assert as_json.api_post_headers == (("X-Api-Key", GATEWAY_KEY),)
    assert GATEWAY_KEY in semi.secrets() and GATEWAY_KEY not in repr(semi)
    assert load_config(None, BASE).api_post_headers == ()


@pytest.mark.parametrize("raw, problem", [
    (f"X Api Key: {GATEWAY_KEY}", "is not a valid header name"),
    (GATEWAY_KEY, "entry 1 has no ':'"),
    ("Content-Type: text/plain", "set by the shipper itself"),
    ("Idempotency-Key: fixed", "set by the shipper itself"),
    (f"X-A: {GATEWAY_KEY}; x-a: other", "given twice"),
    ("X-A:", "empty value"),
    ('{"X-A": 5}', "string values"),
    ("{not json", "does not parse"),
    (f"Authorization: ApiKey {GATEWAY_KEY}", "already set by API_POST_AUTH_TOKEN"),
])
def test_bad_api_post_headers_name_the_variable_never_the_value(raw: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, {**BASE, "API_POST_HEADERS": raw, "API_POST_AUTH_TOKEN": "bearer-0123456"})
    assert err.value.variable == "API_POST_HEADERS"
    assert problem in str(err.value)
    assert GATEWAY_KEY not in str(err.value)


def test_header_value_with_a_line_break_is_refused() -> None:
    with pytest.raises(ConfigError, match="control or non-ASCII"):
        load_config(None, {**BASE, "API_POST_HEADERS": json.dumps({"X-A": "abc\r\nX-Injected: 1"})})


def test_other_new_variables_are_validated() -> None:
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        load_config(None, {**BASE, "LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match=r"METRICS_TEXTFILE: must end in \.prom"):
        load_config(None, {**BASE, "METRICS_TEXTFILE": "/tmp/metrics.txt"})
    with pytest.raises(ConfigError, match="API_REQUESTS_LOG_BACKUPS"):
        load_config(None, {**BASE, "API_REQUESTS_LOG_BACKUPS": "0"})
    config = load_config(None, {**BASE, "API_REQUESTS_LOG_MAX_BYTES": "0", "LOG_FORMAT": "JSON",
                                "METRICS_TEXTFILE": "/var/lib/node_exporter/gls.prom"})
    assert (config.api_requests_log_max_bytes, config.log_format) == (0, "json")
    assert config.metrics_textfile == Path("/var/lib/node_exporter/gls.prom")
    defaults = load_config(None, BASE)
    assert (defaults.api_requests_log_max_bytes, defaults.api_requests_log_backups) == (50 * 1024**2, 5)
    assert defaults.log_format == "text" and defaults.metrics_textfile is None


def test_extra_headers_are_sent_and_their_values_never_logged(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator
) -> None:
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    # a careless receiver that echoes the request's headers back in its answer
    echo = lambda req: Reply(200, body=json.dumps({"key": req.header("X-Api-Key"), "auth": req.header("Authorization")}))
    with Receiver(script=echo) as rec:
        env = make_env(tmp_path, gitlab_sim, rec, API_POST_HEADERS=f"X-Api-Key: {GATEWAY_KEY}; X-Tenant: acme-corp",
                       LOG_LEVEL="DEBUG")
        result = env.invoke("run", "--once")
        assert result.exit_code == 0, result.output
        [request] = rec.accepted()
        assert request.header("X-Api-Key") == GATEWAY_KEY and request.header("X-Tenant") == "acme-corp"
        assert request.header("Authorization") == f"Bearer {API_TOKEN}"
    [line] = env.request_lines()
    assert 'RESPONSE={"key": "[MASKED]", "auth": "Bearer [MASKED]"}' in line
    logs = "\n".join(p.read_text("utf-8") for p in (tmp_path / "logs").glob("*.log*"))
    for secret in (GATEWAY_KEY, API_TOKEN, world.token, "acme-corp"):
        assert secret not in logs and secret not in result.output


def test_bad_header_config_exits_2(tmp_path: Path, gitlab_sim: GitLabSimulator) -> None:
    env = make_env(tmp_path, gitlab_sim, None, API_POST_HEADERS="X-Api-Key")
    result = env.invoke("run", "--once")
    assert result.exit_code == 2
    assert "configuration error: API_POST_HEADERS: entry 1 has no ':'" in result.output


def test_api_requests_log_rotates_by_size(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                          receiver: Receiver) -> None:
    project = world.add_project("team/app")
    for i in range(7):
        world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log=f"{i}\n")])
    env = make_env(tmp_path, gitlab_sim, receiver, API_REQUESTS_LOG_MAX_BYTES="300", API_REQUESTS_LOG_BACKUPS="2")
    assert env.invoke("run", "--once").exit_code == 0
    log_dir = tmp_path / "logs"
    names = sorted(p.name for p in log_dir.glob("api-requests.log*"))
    assert names == ["api-requests.log", "api-requests.log.1", "api-requests.log.2"]  # the oldest beyond 2 dropped
    for path in log_dir.glob("api-requests.log*"):
        lines = path.read_text("utf-8").splitlines()
        assert 1 <= len(lines) <= 2  # one line (~230 bytes) fits under 300 bytes, the second one tips it over
    kept = [line for p in log_dir.glob("api-requests.log*") for line in p.read_text("utf-8").splitlines()]
    assert len(kept) < 7 and len(documents(receiver)) == 7


def test_rotation_off_and_logrotate_renames_are_followed(tmp_path: Path) -> None:
    path = tmp_path / "api-requests.log"
    log = ManagedRequestLog(path, max_bytes=0)
    for i in range(50):
        log.write(f"line {i} " + "x" * 100)
    assert len(path.read_text().splitlines()) == 50 and not list(tmp_path.glob("*.1"))
    os.rename(path, tmp_path / "api-requests.log-20261126")  # what logrotate does (no copytruncate)
    log.write("after logrotate")
    assert path.read_text() == "after logrotate\n"


def test_two_writers_rotate_once(tmp_path: Path) -> None:
    path = tmp_path / "api-requests.log"
    first = ManagedRequestLog(path, max_bytes=100, backups=3)
    second = ManagedRequestLog(path, max_bytes=100, backups=3)
    first.write("a" * 150)
    assert first.rotate_if_full() is True
    assert second.rotate_if_full() is False  # the file is fresh: nothing to do
    assert (tmp_path / "api-requests.log.1").read_text() == "a" * 150 + "\n"


def test_log_format_json_one_object_per_line(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    env = make_env(tmp_path, gitlab_sim, None, LOG_FORMAT="json")
    assert env.invoke("run", "--once").exit_code == 0
    lines = (tmp_path / "logs" / "gitlab-log-shipper.log").read_text("utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    assert events and all(set(e) >= {"time", "level", "logger", "message"} for e in events)
    assert any(e["message"].startswith("cycle done: shipped=1") for e in events)
    assert all(e["time"].endswith("Z") for e in events)


def _record(message: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            import sys
            exc_info = sys.exc_info()
    return logging.LogRecord("gitlab_log_shipper.x", logging.ERROR, __file__, 1, message, (), exc_info)


def test_text_lines_stay_one_line_and_redacted() -> None:
    formatter = TextFormatter(["s3cr3t-token"], syslog_prefix=True)
    line = formatter.format(_record("token s3cr3t-token failed\nnext line", exc=True))
    assert "\n" not in line and line.startswith("<3>")
    assert "s3cr3t-token" not in line and "token [MASKED] failed | next line" in line
    assert "Traceback (most recent call last): | " in line and "ValueError: boom | second line" in line
    event = json.loads(JsonFormatter(["s3cr3t-token"]).format(_record("uses s3cr3t-token", exc=True)))
    assert event["message"] == "uses [MASKED]" and "ValueError: boom" in event["exception"]


def test_journal_stream_detection(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as stream:
        stat = os.fstat(stream.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}, stream)
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"}, stream)
        assert not stderr_is_journal({}, stream)
    assert not stderr_is_journal({"JOURNAL_STREAM": "1:2"}, io.StringIO())
