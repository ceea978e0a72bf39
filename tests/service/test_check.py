"""`check` through the CLI against the GitLab simulator and the receiver: one ✓/!/✗ line per check,
exit 0 only when nothing failed, nothing posted unless --send-test."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import VALIDATOR, make_env


def lines(output: str) -> dict[str, str]:
    """{check name: the whole line} for the ✓/!/✗ lines."""
    found = {}
    for line in output.splitlines():
        if line[:2] in ("✓ ", "! ", "✗ "):
            found[line[2:].split(":", 1)[0]] = line
    return found


def test_everything_passes_on_a_good_setup(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                           receiver: Receiver) -> None:
    group = world.add_group("acme")
    app = world.add_project("app", group_id=group.id)
    world.add_project("lib", group_id=group.id)
    other = world.add_project("tool")
    for _ in range(3):
        world.add_pipeline(other.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    env = make_env(tmp_path, gitlab_sim, receiver, GITLAB_GROUPS="acme", GITLAB_PROJECTS=other.path_with_namespace,
                   API_POST_SAVE_TO_FILE="true")
    result = env.invoke("check")
    assert result.exit_code == 0, result.output
    found = lines(result.output)
    assert set(found) == {"configuration", "GitLab", "token user", "token scopes and expiry", "change detection",
                          f"project {other.path_with_namespace}", "group acme", "receiver", "STATE_DIR", "LOG_DIR",
                          "LOG_OUTPUT_DIR", "state store"}
    assert all(line.startswith("✓ ") for line in found.values()), result.output
    assert "mode dual" in found["configuration"]
    assert "version 19.5.0-pre (Enterprise Edition)" in found["GitLab"]
    assert "the token acts as sim-user (Sim User, id 1)" in found["token user"]
    expires = (world.now() + timedelta(days=90)).date().isoformat()
    assert f"token 'gitlab-log-shipper': scopes read_api; expires {expires} (in 90 day(s))" in found["token scopes and expiry"]
    assert f": id {other.id}: 3 pipeline(s), Maintainer access" in found[f"project {other.path_with_namespace}"]
    assert "2 project(s), subgroups included" in found["group acme"]
    assert "HTTP 405 to a GET; no document posted" in found["receiver"]
    assert "does not exist yet; it will be created" in found["STATE_DIR"]
    assert result.output.rstrip().endswith("all 12 checks passed")
    assert receiver.requests == []  # nothing was posted
    assert not (tmp_path / "state").exists() and not (tmp_path / "logs").exists()  # nothing was created
    assert app.id


def test_send_test_posts_one_marked_document(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                             receiver: Receiver) -> None:
    world.add_project("app")
    env = make_env(tmp_path, gitlab_sim, receiver, API_POST_HEADERS="X-Api-Key: gw-0123456789")
    result = env.invoke("check", "--send-test")
    assert result.exit_code == 0, result.output
    assert "✓ test document: accepted (HTTP 200)" in result.output
    [request] = receiver.accepted()
    assert request.header("X-Gitlab-Log-Shipper-Test") == "1" and request.header("X-Api-Key") == "gw-0123456789"
    document = request.json()
    VALIDATOR.validate(document)  # a receiver that validates documents accepts it
    assert (document["pipeline_id"], document["project_id"], document["jobs"]) == (0, 0, [])
    assert "test document" in document["project_name"]
    [line] = env.request_lines()
    assert "PIPELINE_ID=0 PROJECT_ID=0" in line and "STATUS=200" in line


def test_failures_are_crosses_and_exit_1(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    app = world.add_project("app")
    world.token_info = {"name": "old", "scopes": ["read_repository"], "expires_at": world.now().date(), "active": True}
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{unused.getsockname()[1]}/logs"
    (tmp_path / "not-a-folder").write_text("x")
    env = make_env(tmp_path, gitlab_sim, None, API_POST_ENABLED="true", API_POST_URL=dead_url,
                   GITLAB_PROJECTS=f"{app.path_with_namespace},nobody/missing", STATE_DIR=str(tmp_path / "not-a-folder"),
                   LOG_DIR=str(tmp_path / "not-a-folder" / "logs"))
    result = env.invoke("check", "--send-test")
    assert result.exit_code == 1, result.output
    found = lines(result.output)
    assert found["token scopes and expiry"].startswith("✗ ") and "needs read_api" in found["token scopes and expiry"]
    assert found["project nobody/missing"].startswith("✗ ") and "not found (404)" in found["project nobody/missing"]
    assert found[f"project {app.path_with_namespace}"].startswith("✓ ")
    assert found["receiver"].startswith("✗ ") and "no HTTP answer (ConnectionError)" in found["receiver"]
    assert found["test document"].startswith("✗ ") and "no answer" in found["test document"]
    assert found["STATE_DIR"].startswith("✗ ") and "not a folder" in found["STATE_DIR"]
    assert found["LOG_DIR"].startswith("✗ ") and "is not a folder" in found["LOG_DIR"]
    assert "6 of 12 checks failed" in result.output


def test_rejected_token_stops_the_gitlab_checks(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    env = make_env(tmp_path, gitlab_sim, None)
    result = env.invoke("check", GITLAB_TOKEN="glpat-revoked-000000")
    assert result.exit_code == 1
    found = lines(result.output)
    assert found["GitLab"].startswith("✗ ") and "rejected the token (401)" in found["GitLab"]
    assert "token user" not in found and found["STATE_DIR"].startswith("✓ ")


def test_warnings_do_not_fail(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    project = world.add_project("app")
    world.token_info = {"name": "soon", "scopes": ["api"], "expires_at": (world.now() + timedelta(days=3)).date()}
    env = make_env(tmp_path, gitlab_sim, None, LOG_EXCLUDE_PROJECTS=str(project.id))
    result = env.invoke("check")
    assert result.exit_code == 0, result.output
    found = lines(result.output)
    assert found["token scopes and expiry"].startswith("! ") and "renew it" in found["token scopes and expiry"]
    assert found["memberships"].startswith("! ") and "0 after LOG_SAVE_PROJECTS/LOG_EXCLUDE_PROJECTS" in found["memberships"]
    assert "(2 with a warning)" in result.output
    world.token_info = None  # e.g. an OAuth token: GitLab does not say
    found = lines(env.invoke("check").output)
    assert found["token scopes and expiry"].startswith("! ") and "not revealed" in found["token scopes and expiry"]


def test_usage_and_configuration_errors_exit_2(tmp_path: Path, gitlab_sim: GitLabSimulator) -> None:
    env = make_env(tmp_path, gitlab_sim, None)
    bad = env.invoke("check", POLL_INTERVAL="often")
    assert bad.exit_code == 2 and bad.output.startswith("✗ configuration: POLL_INTERVAL")
    assert env.invoke("check", "--send-test").exit_code == 2  # file mode: nowhere to send it


def test_corrupt_state_store_fails_the_check(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    env = make_env(tmp_path, gitlab_sim, None)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.sqlite3").write_bytes(b"\x00garbage" * 512)
    result = env.invoke("check")
    assert result.exit_code == 1 and lines(result.output)["state store"].startswith("✗ ")


def test_log_files_that_cannot_be_written_fail_the_log_dir_check(tmp_path: Path, world: World,
                                                                  gitlab_sim: GitLabSimulator) -> None:
    """The folder being writable is not enough: an api-requests.log (or a rotated backup, or the shipper's
    own log) that the service user cannot write loses every line. Tests run as root, for whom permission
    bits stop nothing, so a folder stands where the file should be: every append fails, as for a
    root-owned file under the service user."""
    world.add_project("app")
    env = make_env(tmp_path, gitlab_sim, None)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "api-requests.log").write_text("an old line\n")
    (logs / "gitlab-log-shipper.log").write_text("an old line\n")
    (logs / "api-requests.log.2").mkdir()  # a backup that rotation cannot replace
    found = lines(env.invoke("check").output)
    assert found["LOG_DIR"].startswith("✗ ") and "api-requests.log.2 is not a file" in found["LOG_DIR"], found["LOG_DIR"]
    (logs / "api-requests.log.2").rmdir()
    (logs / "gitlab-log-shipper.log").unlink()
    (logs / "gitlab-log-shipper.log").mkdir()
    (logs / "gitlab-log-shipper.log" / "x").write_text("")
    result = env.invoke("check")
    found = lines(result.output)
    assert result.exit_code == 1
    assert found["LOG_DIR"].startswith("✗ ") and "gitlab-log-shipper.log is not a file" in found["LOG_DIR"]
    assert "api-requests.log" not in found["LOG_DIR"]
    (logs / "gitlab-log-shipper.log" / "x").unlink()
    (logs / "gitlab-log-shipper.log").rmdir()
    result = env.invoke("check")
    found = lines(result.output)
    assert result.exit_code == 0, result.output
    assert found["LOG_DIR"].startswith("✓ ") and "api-requests.log writable" in found["LOG_DIR"]
    assert (logs / "api-requests.log").read_text() == "an old line\n"  # checked, not changed
    assert sorted(p.name for p in logs.iterdir()) == ["api-requests.log"]  # nothing created
