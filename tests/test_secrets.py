"""Secrets stay secret: the whole flow with distinctive tokens, then every byte written is searched.

The real CLI runs in-process and as a subprocess with ``LOG_LEVEL=DEBUG`` (so urllib3's and
http.client's debug output is captured too), through success, receiver retries (503), a final failure
(500), a 401, the dual-mode fallback to files, GitLab errors (401 for a wrong token, a 400 and a 500
whose bodies echo the token back), backfill, post, ``--help``; receivers echoing the bearer token in
their answers included. Then every file under the test's folders (state store, logs, file output) and
everything printed on stdout and stderr must be free of the tokens: raw, base64 (any alignment),
URL-encoded or hex.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from click.testing import CliRunner

from gitlab_log_shipper.cli import main
from gitlab_log_shipper.config.settings import load_config
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import RecordedRequest, Receiver, Reply
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import documents, make_env
from test_security import assert_private

GITLAB_SECRET = "glpat-SECRETgitlab0123456789"
WRONG_GITLAB_SECRET = "glpat-SECRETwrongtoken987654"
API_SECRET = "receiver-SECRET-token-xyz"
SECRETS = (GITLAB_SECRET, WRONG_GITLAB_SECRET, API_SECRET)


def encodings(secret: str) -> Iterator[bytes]:
    """The secret as it could be written: raw, URL-encoded, hex, base64 and URL-safe base64 at any offset."""
    raw = secret.encode()
    yield raw
    yield quote(secret, safe="").encode()
    yield binascii.hexlify(raw)
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for pad in range(3):
            yield encode(b"\0" * pad + raw)[4:-4]  # the middle does not depend on the neighbouring bytes


def leaks(data: bytes) -> list[str]:
    return [secret for secret in SECRETS if any(form in data for form in encodings(secret))]



def test_no_token_ever_reaches_disk_stdout_or_stderr(tmp_path: Path, loose_umask: None) -> None:
    world = World(token=GITLAB_SECRET)
    project = world.add_project("team/app", name="App")
    author = world.add_user("bob", public_email="")

    def pipeline(log: str) -> int:
        return world.add_pipeline(project.id, status="success", user=author,
                                  jobs=[JobSpec("build", "build", "success", log=f"{log}\n")]).id

    ok, retried, failing, refused = (pipeline(name) for name in ("ok", "retried", "failing", "refused"))
    calls: dict[int, int] = {}

    def script(request: RecordedRequest) -> Reply:
        pipeline_id = request.json()["pipeline_id"]
        calls[pipeline_id] = calls.get(pipeline_id, 0) + 1
        echo = json.dumps({"error": "rejected", "you_sent": request.header("Authorization")})
        if pipeline_id == retried and calls[pipeline_id] <= 2:
            return Reply(503, body="busy")  # retried inside the POST
        if pipeline_id == failing:
            return Reply(500, body=echo)  # final failure: dual mode falls back to files
        if pipeline_id == refused:
            return Reply(401, body=f"invalid token {request.header('Authorization')}\nsecond line")
        return Reply(200, body=json.dumps({"success": True, "token_seen": request.header("Authorization")}))

    outputs: list[str] = []
    with GitLabSimulator(world) as sim, Receiver(script=script) as receiver:
        env = make_env(tmp_path, sim, receiver, GITLAB_TOKEN=GITLAB_SECRET, API_POST_AUTH_TOKEN=API_SECRET,
                       API_POST_SAVE_TO_FILE="true", RETRY_ATTEMPTS="2", GITLAB_PROJECTS=str(project.id))

        def run(*args: str, expect: int | None = None, **overrides: str) -> str:
            result = env.invoke(*args, **overrides)
            outputs.append(result.output)
            if expect is not None:
                assert result.exit_code == expect, result.output
            return result.output

        # GitLab: a transient 502 on the jobs list (retried by python-gitlab) and a 400 echoing the token
        sim.inject("pipeline_jobs", 502, count=1)
        sim.inject("pipeline", 400, count=1, body=json.dumps({"message": f"bad token {GITLAB_SECRET}"}))
        run("run", "--once", expect=1, LOG_LEVEL="DEBUG")
        run("run", "--once", expect=1)  # the pipeline refused by GitLab's 400 is shipped now; failures remain
        assert sorted(d["pipeline_id"] for d in documents(receiver)) == sorted([ok, retried])
        assert list(env.output.glob(f"*_{project.id}/pipeline_{failing}/metadata.json"))  # dual-mode fallback

        # GitLab rejects a wrong token; a 500 page echoing the token (python-gitlab retries it) and a 422
        run("run", "--once", expect=1, GITLAB_TOKEN=WRONG_GITLAB_SECRET)
        sim.inject("pipeline", 500, count=1, body=f"<html>upstream said: PRIVATE-TOKEN {GITLAB_SECRET}</html>")
        run("post", "--pipeline-id", str(ok), expect=0)
        sim.inject("pipeline", 422, count=1, body=f"<html>upstream said: PRIVATE-TOKEN {GITLAB_SECRET}</html>")
        run("post", "--pipeline-id", str(ok), expect=1)

        run("backfill", "--since", "2d", "--force", expect=1)
        run("post", "--pipeline-id", str(retried), "--project", str(project.id), expect=0)
        for args in ([], ["run"], ["backfill"], ["post"]):
            run(*args, "--help", expect=0)
        for command in ("check", "status"):  # read-only commands, where they exist
            if command in main.commands:
                run(command)
        assert len(receiver.accepted()) >= 3

        # As a separate process with every debug logger on: urllib3's and http.client's output included.
        (tmp_path / "empty.env").touch()
        calls.clear()
        proc = subprocess.run(
            [sys.executable, "-m", "gitlab_log_shipper", "--env-file", str(tmp_path / "empty.env"), "backfill",
             "--since", "2d", "--force"],
            env={**os.environ, **env.values, "LOG_LEVEL": "DEBUG"}, capture_output=True, timeout=120,
        )
        assert proc.returncode == 1, proc.stderr.decode(errors="replace")
        assert b"DEBUG urllib3.connectionpool" in proc.stderr and b'"POST /logs HTTP/1.1" 503' in proc.stderr

    # the masking was exercised, not merely never needed
    request_log = env.requests_log.read_text("utf-8")
    assert "[MASKED]" in request_log and "STATUS=401" in request_log and "STATUS=500" in request_log
    assert any("[MASKED]" in out for out in outputs)
    assert any("GitLab rejected the token (401)" in out for out in outputs)

    written = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert any(p.name == "state.sqlite3" for p in written) and any(p.name == "api-requests.log" for p in written)
    assert any(p.name == "gitlab-log-shipper.log" for p in written) and any(p.suffix == ".log" and "job_" in p.name
                                                                           for p in written)
    for path, data in written.items():
        assert not leaks(data), f"{leaks(data)} found in {path}"
    for out in outputs:
        assert not leaks(out.encode()), out
    assert not leaks(proc.stdout) and not leaks(proc.stderr), proc.stderr.decode(errors="replace")
    for folder in ("state", "logs"):
        assert_private(tmp_path / folder)


def test_repr_and_errors_of_the_configuration_hold_no_secret() -> None:
    config = load_config(None, {
        "GITLAB_URL": "https://gitlab.example.com", "GITLAB_TOKEN": GITLAB_SECRET, "API_POST_ENABLED": "true",
        "API_POST_URL": "https://logs.example.com/in", "API_POST_AUTH_TOKEN": API_SECRET,
        "LOG_REDACT_PATTERNS": f"default;;{API_SECRET}",
    })
    for text in (repr(config), str(config)):
        assert not leaks(text.encode()), text
    result = CliRunner().invoke(main, ["--help"], env={"GITLAB_TOKEN": GITLAB_SECRET, "API_POST_AUTH_TOKEN": API_SECRET})
    assert result.exit_code == 0 and not leaks(result.output.encode())


HEADER_SECRET = "gateway-SECRET-key-4242"


def test_secrets_from_files_and_credentials_never_reach_any_output(tmp_path: Path, loose_umask: None) -> None:
    """Issue 14: the tokens and a header value given as a systemd credential and as *_FILE files, through a
    debug-level run, check, and the configuration errors of such files (both set, too short, bad headers)."""
    world = World(token=GITLAB_SECRET)
    project = world.add_project("team/app", name="App")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("build", "build", "success", log="ok\n")])
    secrets_dir = tmp_path / "secrets"
    credentials = secrets_dir / "credentials"
    credentials.mkdir(parents=True)
    (credentials / "gitlab_token").write_text(GITLAB_SECRET + "\n")
    (secrets_dir / "api").write_text(API_SECRET + "\n")
    (secrets_dir / "headers").write_text(f"X-Api-Key: {HEADER_SECRET}\n")
    (secrets_dir / "short").write_text(API_SECRET[:3] + " " + API_SECRET[3:])
    for path in secrets_dir.rglob("*"):
        if path.is_file():
            path.chmod(0o644)  # world-readable: warned about, and the warning must not quote them either
    outputs: list[str] = []
    with GitLabSimulator(world) as sim, Receiver() as receiver:
        env = make_env(tmp_path, sim, receiver, GITLAB_TOKEN="", API_POST_AUTH_TOKEN="",
                       CREDENTIALS_DIRECTORY=str(credentials), API_POST_AUTH_TOKEN_FILE=str(secrets_dir / "api"),
                       API_POST_HEADERS_FILE=str(secrets_dir / "headers"))
        result = env.invoke("run", "--once", LOG_LEVEL="DEBUG")
        outputs.append(result.output)
        assert result.exit_code == 0, result.output
        accepted = receiver.accepted()
        assert accepted and accepted[0].header("Authorization") == f"Bearer {API_SECRET}"
        assert accepted[0].header("X-Api-Key") == HEADER_SECRET
        assert "can be read by every user" in result.output
        check = env.invoke("check")
        outputs.append(check.output)
        assert check.exit_code == 0 and "! configuration: the systemd credential gitlab_token:" in check.output
        for overrides, variable in (({"GITLAB_TOKEN": GITLAB_SECRET}, "GITLAB_TOKEN"),
                                    ({"API_POST_AUTH_TOKEN_FILE": str(secrets_dir / "short")}, "API_POST_AUTH_TOKEN_FILE"),
                                    ({"API_POST_HEADERS_FILE": str(secrets_dir / "api")}, "API_POST_HEADERS_FILE")):
            for command in (("run", "--once"), ("check",)):
                failed = env.invoke(*command, **overrides)
                outputs.append(failed.output)
                assert failed.exit_code == 2 and variable in failed.output, failed.output
    written = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file() and secrets_dir not in path.parents}
    assert any(p.name == "gitlab-log-shipper.log" for p in written)
    for path, data in written.items():
        assert not leaks(data) and HEADER_SECRET.encode() not in data, path
    for out in outputs:
        assert not leaks(out.encode()) and HEADER_SECRET not in out, out
