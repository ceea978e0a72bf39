"""Security hardening: transport (TLS, plain http, redirects), log injection, file modes, path escapes.

Everything that can be is tested through the real CLI against the loopback GitLab simulator and
receiver, over plain http or https with the test CA in ``tests/tls``.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import stat
import time
from pathlib import Path


import pytest

from gitlab_log_shipper.config.settings import load_config, prepare_directories, startup_warnings
from gitlab_log_shipper.delivery.files import FileOutput, atomic_write
from gitlab_log_shipper.delivery.poster import RequestLog
from gitlab_log_shipper.document.payload import JobLog, document_header, job_fields
from gitlab_log_shipper.document.redact import Redactor, parse_patterns
from gitlab_log_shipper.errors import ConfigError, DeliveryError
from gitlab_log_shipper.security import (
    escape_for_log,
    is_loopback,
    open_private,
    private_mkdir,
    tightened_umask,
)
from gitlab_log_shipper.service.logsetup import PrivateRotatingFileHandler
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver, Reply
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import documents, make_env

TLS = Path(__file__).resolve().parent / "tls"
CA = str(TLS / "ca.pem")
BASE = {"GITLAB_URL": "https://gitlab.example.com", "GITLAB_TOKEN": "glpat-abcdefghijklmnop"}
APP_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def server_tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TLS / "server.pem", TLS / "server-key.pem")
    return context



def one_pipeline(world: World, name: str = "team/app") -> tuple[int, int]:
    project = world.add_project(name)
    pipeline = world.add_pipeline(project.id, status="success", jobs=[JobSpec("build", "build", "success", log="ok\n")])
    return project.id, pipeline.id


# -- log injection ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["a\nb", "a\r\nb", "\x1b[31mred", "nul\x00", "nel\x85", "ls\u2028ps\u2029",
                                  "fs\x1c\x1d\x1e", "vt\x0bff\x0c", "del\x7f", "back\\slash\n"])
def test_escape_for_log_always_gives_one_line(text: str) -> None:
    escaped = escape_for_log(text)
    assert escaped.splitlines() == [escaped]
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", escaped)


def test_whatever_receiver_and_gitlab_answer_stays_one_line_per_event(tmp_path: Path) -> None:
    world = World()
    _, pipeline_id = one_pipeline(world)
    hostile = "first line\nSTATUS=200 forged\r\n\x1b[2J\x85next\u2028sep\x00"
    with GitLabSimulator(world) as sim, Receiver(script=[Reply(502, body=hostile)]) as rec:
        sim.inject("pipeline", 400, body='{"message": "bad\\n2026-01-01 00:00:00,000 INFO forged: line\\u001b[0m"}')
        env = make_env(tmp_path, sim, rec, RETRY_ATTEMPTS="0")
        assert env.invoke("run", "--once").exit_code == 1  # GitLab's 400
        assert env.invoke("run", "--once").exit_code == 1  # the receiver's 502
        [line] = env.requests_log.read_text("utf-8").split("\n")[:-1]  # exactly one line, however it is split
        assert f"PIPELINE_ID={pipeline_id} " in line and " STATUS=502 " in line
        assert "RESPONSE=first line\\nSTATUS=200 forged\\r\\n\\x1b[2J" in line
        assert line.count("STATUS=") == 2 and not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", line)
        app_log = (tmp_path / "logs" / "gitlab-log-shipper.log").read_text("utf-8").splitlines()
        assert app_log and all(APP_LOG_LINE.match(entry) for entry in app_log), app_log
        assert any("bad\\n2026-01-01" in entry for entry in app_log)


# -- plain http and TLS -------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("LOCALHOST", True), ("api.localhost", True), ("127.0.0.1", True), ("127.8.9.10", True),
    ("::1", True), ("[::1]", True), ("localhost.example.com", False), ("10.0.0.1", False), ("example.com", False),
    ("", False), (None, False), ("127.0.0.1.nip.io", False),
])
def test_is_loopback(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_bearer_token_never_goes_over_plain_http_to_another_host_unless_allowed() -> None:
    api = {"API_POST_ENABLED": "true", "API_POST_AUTH_TOKEN": "receiver-token-123"}
    with pytest.raises(ConfigError) as info:
        load_config(None, {**BASE, **api, "API_POST_URL": "http://logs.example.com/in"})
    assert info.value.variable == "API_POST_URL" and "API_POST_ALLOW_INSECURE" in info.value.problem
    allowed = load_config(None, {**BASE, **api, "API_POST_URL": "http://logs.example.com/in",
                                 "API_POST_ALLOW_INSECURE": "true"})
    assert any("API_POST_ALLOW_INSECURE=true" in w for w in startup_warnings(allowed))
    for fine in ("https://logs.example.com/in", "http://127.0.0.1:8080/in", "http://localhost/in", "http://[::1]/in"):
        assert startup_warnings(load_config(None, {**BASE, **api, "API_POST_URL": fine})) == []
    no_token = load_config(None, {**BASE, "API_POST_ENABLED": "true", "API_POST_URL": "http://logs.example.com/in"})
    assert [w for w in startup_warnings(no_token) if "unencrypted" in w]  # no token to protect: a warning only
    plain_gitlab = load_config(None, {**BASE, "GITLAB_URL": "http://gitlab.example.com"})
    assert [w for w in startup_warnings(plain_gitlab) if w.startswith("GITLAB_URL uses plain http")]
    assert startup_warnings(load_config(None, BASE)) == []


def test_tls_to_the_receiver_verified_by_default_private_ca_and_explicit_opt_out(tmp_path: Path) -> None:
    world = World()
    _, pipeline_id = one_pipeline(world)
    with GitLabSimulator(world) as sim, Receiver(tls=server_tls()) as rec:
        assert rec.url.startswith("https://127.0.0.1:")
        env = make_env(tmp_path, sim, rec)
        untrusted = env.invoke("run", "--once")
        assert untrusted.exit_code == 1
        [line] = env.request_lines()
        assert "STATUS=0" in line and "SSLError" in line and "CERTIFICATE_VERIFY_FAILED" in line
        assert rec.requests == []  # the handshake failed: no request, no token, was ever sent

        time.sleep(1.05)  # the document waits in the outbox; its next attempt is due within 1 s (POLL_INTERVAL=1)
        assert env.invoke("run", "--once", API_POST_CA_BUNDLE=CA).exit_code == 0
        assert [d["pipeline_id"] for d in documents(rec)] == [pipeline_id]

        for _ in range(2):  # the opt-out is warned about at every start
            result = env.invoke("post", "--pipeline-id", str(pipeline_id), API_POST_TLS_VERIFY="false")
            assert result.exit_code == 0, result.output
            assert "WARNING" in result.output and "API_POST_TLS_VERIFY=false" in result.output
            assert "InsecureRequestWarning" not in result.output
        assert len(rec.accepted()) == 3


def test_tls_to_gitlab_verified_by_default_private_ca_and_explicit_opt_out(tmp_path: Path, receiver: Receiver) -> None:
    world = World()
    _, pipeline_id = one_pipeline(world)
    with GitLabSimulator(world, tls=server_tls()) as sim:
        env = make_env(tmp_path, sim, receiver)
        started = time.monotonic()
        untrusted = env.invoke("run", "--once")
        assert untrusted.exit_code == 1
        assert "certificate was rejected" in untrusted.output and "GITLAB_CA_BUNDLE" in untrusted.output
        assert time.monotonic() - started < 10  # not retried ten times as if it were a network blip
        assert sim.counters.total() == 0

        assert env.invoke("run", "--once", GITLAB_CA_BUNDLE=CA).exit_code == 0
        assert [d["pipeline_id"] for d in documents(receiver)] == [pipeline_id]

        result = env.invoke("post", "--pipeline-id", str(pipeline_id), GITLAB_TLS_VERIFY="false")
        assert result.exit_code == 0, result.output
        assert "WARNING" in result.output and "GITLAB_TLS_VERIFY=false" in result.output


@pytest.mark.parametrize(("overrides", "variable"), [
    ({"GITLAB_CA_BUNDLE": "/nonexistent/ca.pem"}, "GITLAB_CA_BUNDLE"),
    ({"API_POST_CA_BUNDLE": str(TLS / "README.md")}, "API_POST_CA_BUNDLE"),
    ({"GITLAB_CA_BUNDLE": CA, "GITLAB_TLS_VERIFY": "false"}, "GITLAB_CA_BUNDLE"),
    ({"API_POST_TLS_VERIFY": "sometimes"}, "API_POST_TLS_VERIFY"),
])
def test_bad_tls_settings_name_the_variable(overrides: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {**BASE, **overrides})
    assert info.value.variable == variable


# -- redirects ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_receiver_redirects_are_not_followed(status: int, tmp_path: Path) -> None:
    world = World()
    _, pipeline_id = one_pipeline(world)
    with GitLabSimulator(world) as sim, Receiver(host="127.0.0.2") as elsewhere, \
            Receiver(script=lambda req: Reply(status, body="", headers={"Location": elsewhere.url})) as rec:
        env = make_env(tmp_path, sim, rec)
        assert env.invoke("run", "--once").exit_code == 1
        assert elsewhere.requests == []  # neither the token nor the document went to the other host
        [line] = env.request_lines()
        assert f"PIPELINE_ID={pipeline_id} " in line and f"STATUS={status}" in line
        assert len(rec.requests) == 1  # a redirect is not retried either


def test_gitlab_redirect_to_another_host_is_refused_without_sending_the_token(tmp_path: Path, receiver: Receiver) -> None:
    world = World()
    project_id, pipeline_id = one_pipeline(world)
    path = f"/api/v4/projects/{project_id}/pipelines/{pipeline_id}"
    with GitLabSimulator(world) as sim, GitLabSimulator(world, host="127.0.0.2") as elsewhere:
        env = make_env(tmp_path, sim, receiver)
        # requests strips Authorization on such a redirect, but PRIVATE-TOKEN is a custom header it would keep
        sim.inject("pipeline", 302, headers={"Location": f"{elsewhere.url}{path}"})
        result = env.invoke("run", "--once")
        assert result.exit_code == 1
        assert "another origin than GITLAB_URL" in result.output
        assert elsewhere.counters.total() == 0
        # another port on the same host is another origin too
        sim.inject("pipeline", 301, headers={"Location": f"http://127.0.0.1:{elsewhere.port}{path}"})
        assert env.invoke("run", "--once").exit_code == 1
        assert elsewhere.counters.total() == 0
        # a redirect within GitLab itself is followed as before
        sim.inject("pipeline", 301, headers={"Location": f"{sim.url}{path}"})
        assert env.invoke("run", "--once").exit_code == 0
        assert [d["pipeline_id"] for d in documents(receiver)] == [pipeline_id]


# -- file modes -------------------------------------------------------------------------------------------


def _modes(root: Path) -> dict[str, int]:
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_private(root: Path) -> None:
    modes = _modes(root)
    assert modes
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o700 if (root / name).is_dir() else 0o600)}
    assert not wrong, wrong


def test_every_writer_creates_private_files_and_folders(tmp_path: Path, loose_umask: None) -> None:
    root = tmp_path / "root"
    private_mkdir(root / "a" / "b" / "c")
    with open_private(root / "a" / "app.log") as handle:
        handle.write("x\n")
    RequestLog(root / "logs" / "deep" / "api-requests.log").write("line")
    handler = PrivateRotatingFileHandler(root / "logs" / "rot.log", maxBytes=50, backupCount=2, encoding="utf-8")
    for n in range(5):
        handler.emit(logging.LogRecord("t", logging.INFO, __file__, 1, "message %d " + "x" * 40, (n,), None))
    handler.close()
    assert (root / "logs" / "rot.log.1").exists()  # rotation happened, new files private too
    atomic_write(root / "out" / "x" / "f.json", b"{}")
    spool = root / "spool.log"
    spool.write_bytes(b"token glpat-abcdefghijklmnopqrstuv\n")
    Redactor(list(parse_patterns("default"))).redact_file(spool)
    config = load_config(None, {**BASE, "STATE_DIR": str(root / "s" / "t"), "LOG_DIR": str(root / "l"),
                                "LOG_OUTPUT_DIR": str(root / "l" / "out")})
    prepare_directories(config)
    folder = FileOutput(root / "files").write_pipeline(_header("proj"), [JobLog(job_fields(_job(1, "j")), None)], _NOW)
    assert folder.is_dir()
    assert_private(root)


def test_whole_run_leaves_only_private_files_even_with_a_loose_umask(
        tmp_path: Path, loose_umask: None, receiver: Receiver) -> None:
    world = World()
    one_pipeline(world)
    with GitLabSimulator(world) as sim:
        env = make_env(tmp_path / "run", sim, receiver, API_POST_SAVE_TO_FILE="true")
        assert env.invoke("run", "--once").exit_code == 0
    assert os.umask(0o022) == 0o022  # the command restored the process umask when it ended
    for folder in ("state", "logs"):
        assert_private(tmp_path / "run" / folder)
    assert (tmp_path / "run" / "state" / "state.sqlite3").exists()
    assert list((tmp_path / "run" / "logs" / "pipeline-logs").rglob("*.log"))


def test_a_stricter_umask_is_kept(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        with tightened_umask() as inside:
            assert inside == 0o077
        os.umask(0o277)
        with tightened_umask() as inside:
            assert inside == 0o277
            private_mkdir(tmp_path / "strict")
        assert stat.S_IMODE((tmp_path / "strict").stat().st_mode) == 0o500
    finally:
        os.umask(old)


# -- names from GitLab data stay inside LOG_OUTPUT_DIR ---------------------------------------------------

NASTY_NAMES = ["../../../../tmp/escaped", "/etc/passwd", "..", ".", "...", "a\x00b", "x" * 5000, "../" * 50,
               "..\\..\\windows", "name\nwith\nlines", "ünïcødé/../..", "", "~root", "$HOME", "-rf *",
               "con", "a/../../b", ".hidden", "\u202eevil"]


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_names_from_gitlab_never_escape_the_output_folder(name: str, tmp_path: Path) -> None:
    root = tmp_path / "out"
    log = tmp_path / "log"
    log.write_bytes(b"raw\n")
    folder = FileOutput(root).write_pipeline(
        _header(name), [JobLog(job_fields(_job(7, name)), log), JobLog(job_fields(_job(8, name)), None)], _NOW)
    assert folder.resolve().is_relative_to(root.resolve())
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != log]
    assert len(written) == 3  # metadata.json and two logs, nothing anywhere else
    for path in written:
        relative = path.relative_to(root)  # raises if outside
        assert len(relative.parts) == 3 and relative.parts[0].endswith("_5") and relative.parts[1] == "pipeline_77"
        assert all(len(part) <= 130 and part not in (".", "..") and re.fullmatch(r"[A-Za-z0-9._-]+", part)
                   for part in relative.parts)


def test_output_paths_are_checked_even_if_a_name_slipped_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gitlab_log_shipper.delivery.files as fileout

    monkeypatch.setattr(fileout, "project_dir_name", lambda name, pid: "../../outside")
    with pytest.raises(DeliveryError, match="outside LOG_OUTPUT_DIR"):
        FileOutput(tmp_path / "a" / "out").write_pipeline(_header("x"), [], _NOW)
    assert not (tmp_path / "outside").exists()


def test_nasty_names_end_to_end(tmp_path: Path) -> None:
    world = World()
    project = world.add_project("team/app", name="../../../../escaped-project")
    world.add_pipeline(project.id, status="success", jobs=[
        JobSpec(name, "test", "success", log=f"log of {i}\n") for i, name in enumerate(
            ["../../../../escaped-job", "/etc/passwd", "..", "a\x00b", "z" * 3000])])
    with GitLabSimulator(world) as sim:
        env = make_env(tmp_path / "t", sim, None)
        result = env.invoke("run", "--once")
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["empty.env", "logs", "state"]
    assert not list(tmp_path.glob("escaped*")) and not list((tmp_path / "t").glob("escaped*"))
    logs = sorted(env.output.rglob("job_*.log"))
    assert len(logs) == 5 and all(env.output in p.parents for p in logs)


_NOW = __import__("datetime").datetime(2026, 11, 1, tzinfo=__import__("datetime").timezone.utc)


def _header(project_name: str) -> dict:
    return document_header(project_name, {"id": 77, "project_id": 5, "status": "failed"}, None, ["test"])


def _job(job_id: int, name: str) -> dict:
    return {"id": job_id, "name": name, "status": "success", "stage": "test"}
