"""``python -m gitlab_log_shipper.sim``: the standalone servers, their worlds and their command line.

The serving commands are tested as scripts use them: in a subprocess, reading the printed variables,
then stopping them with SIGTERM (exit 0). World building and argument errors are tested in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from gitlab_log_shipper.sim.__main__ import ScenarioError, build_world, generate_world, main
from gitlab_log_shipper.sim.logs import LogSpec

from repo_paths import REPO_ROOT



class Server:
    """A simulator subprocess and the variables it printed."""

    def __init__(self, *args: str, expect: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gitlab_log_shipper.sim", *args],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        self.env: dict[str, str] = {}
        self.lines: list[str] = []
        while len(self.env) < expect:
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if not line:
                self.proc.wait(timeout=10)
                raise AssertionError(f"exited early: {self.proc.stderr.read() if self.proc.stderr else ''}")
            self.lines.append(line.rstrip("\n"))
            key, _, value = line.strip().partition("=")
            self.env[key] = value

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)


def test_gitlab_command_serves_until_sigterm(servers: list[Server]) -> None:
    server = Server("gitlab", "--port", "0", "--projects", "2", "--pipelines", "2", "--jobs", "4",
                    "--log-size", "2000", "--print-env", expect=4)
    servers.append(server)
    assert server.lines[0].startswith("GITLAB_URL=http://127.0.0.1:") and server.lines[1].startswith("GITLAB_TOKEN=")
    assert server.env["GITLAB_GROUPS"] == "sim-group"
    assert server.env["SIM_EXPECTED_PIPELINES"] == "6"  # 2 × 2 pipelines + 2 child pipelines
    headers = {"PRIVATE-TOKEN": server.env["GITLAB_TOKEN"]}
    r = requests.get(f"{server.env['GITLAB_URL']}/api/v4/version", headers=headers, timeout=5)
    assert r.status_code == 200 and r.json()["version"]
    projects = requests.get(f"{server.env['GITLAB_URL']}/api/v4/groups/sim-group/projects",
                            params={"include_subgroups": "true"}, headers=headers, timeout=5).json()
    assert len(projects) == 2
    code, err = server.stop()
    assert code == 0 and err == ""


def test_gitlab_command_faults_and_sigint(servers: list[Server]) -> None:
    server = Server("gitlab", "--port", "0", "--projects", "1", "--error-rate", "1", "--error-statuses", "503",
                    "--token", "glpat-cli-token-123", expect=2)
    servers.append(server)
    assert server.env["GITLAB_TOKEN"] == "glpat-cli-token-123"
    r = requests.get(f"{server.env['GITLAB_URL']}/api/v4/version", timeout=5)
    assert r.status_code == 503
    code, err = server.stop(signal.SIGINT)
    assert code == 0 and err == ""


def test_gitlab_command_version_and_graphql_switches(servers: list[Server]) -> None:
    server = Server("gitlab", "--port", "0", "--projects", "1", "--gitlab-version", "16.11.2-ee", expect=2)
    servers.append(server)
    headers = {"PRIVATE-TOKEN": server.env["GITLAB_TOKEN"]}
    assert requests.get(f"{server.env['GITLAB_URL']}/api/v4/version", headers=headers, timeout=5).json()["version"] \
        == "16.11.2-ee"
    answer = requests.post(f"{server.env['GITLAB_URL']}/api/graphql", json={"query": "{ metadata { version } }"},
                           headers=headers, timeout=5)
    assert answer.status_code == 200 and answer.json()["data"]["metadata"]["version"] == "16.11.2-ee"
    off = Server("gitlab", "--port", "0", "--projects", "1", "--no-graphql", expect=2)
    servers.append(off)
    answer = requests.post(f"{off.env['GITLAB_URL']}/api/graphql", json={"query": "{ metadata { version } }"},
                           headers={"PRIVATE-TOKEN": off.env["GITLAB_TOKEN"]}, timeout=5)
    assert answer.status_code == 404


def test_receiver_command(servers: list[Server], tmp_path: Path) -> None:
    server = Server("receiver", "--port", "0", "--token", "rcv-token", "--dump-dir", str(tmp_path / "dump"),
                    expect=2)
    servers.append(server)
    assert server.env["API_POST_URL"].endswith("/logs") and server.env["API_POST_AUTH_TOKEN"] == "rcv-token"
    url = server.env["API_POST_URL"]
    assert requests.post(url, json={"pipeline_id": 1}, timeout=5).status_code == 401
    ok = requests.post(url, json={"pipeline_id": 1}, headers={"Authorization": "Bearer rcv-token"}, timeout=5)
    assert ok.status_code == 200
    code, err = server.stop()
    assert code == 0 and err == ""
    assert [json.loads(p.read_text()) for p in (tmp_path / "dump").iterdir()] == [{"pipeline_id": 1}]


# -- in-process: arguments and worlds --------------------------------------------------------------


def test_every_command_has_help() -> None:
    runner = CliRunner()
    for args in ([], ["gitlab"], ["receiver"]):
        result = runner.invoke(main, [*args, "--help"], catch_exceptions=False)
        assert result.exit_code == 0 and "Usage:" in result.output
        assert result.output.count("\n") > 3


def test_argument_errors_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    scenario = tmp_path / "s.json"
    scenario.write_text(json.dumps({"projects": [{"path": "x", "group": "missing"}]}))
    result = runner.invoke(main, ["gitlab", "--scenario", str(scenario), "--projects", "3"])
    assert result.exit_code == 2 and "cannot be combined" in result.output
    result = runner.invoke(main, ["gitlab", "--scenario", str(scenario)])
    assert result.exit_code == 2 and "unknown group 'missing'" in result.output
    scenario.write_text("{not json")
    assert runner.invoke(main, ["gitlab", "--scenario", str(scenario)]).exit_code == 2
    assert runner.invoke(main, ["gitlab", "--error-statuses", "5xx"]).exit_code == 2


def test_generated_world_shape() -> None:
    world = generate_world(projects=3, pipelines=4, jobs=5, log_size=1234, seed=9)
    again = generate_world(projects=3, pipelines=4, jobs=5, log_size=1234, seed=9)
    now = world.now()
    assert sorted(world.pipelines) == sorted(again.pipelines)
    assert [p.sha for p in world.pipelines.values()] == [p.sha for p in again.pipelines.values()]
    assert [j.log for j in world.jobs.values()] == [j.log for j in again.jobs.values()]
    tops = [p for p in world.pipelines.values() if p.source != "parent_pipeline"]
    children = [p for p in world.pipelines.values() if p.source == "parent_pipeline"]
    assert len(tops) == 12 and len(children) == 3
    assert {g.full_path for g in world.groups.values()} == {"sim-group", "sim-group/backend"}
    assert {p.status for p in tops} == {"success", "failed"}
    for pipeline in tops:
        assert now - timedelta(minutes=30) <= pipeline.created_at < pipeline.finished_at <= now  # type: ignore[operator]
        latest = world.pipeline_jobs(pipeline.id)
        every = world.pipeline_jobs(pipeline.id, include_retried=True)
        assert len(latest) == 5 and len(every) == 6  # one retried attempt
        assert {j.stage for j in latest} == {"build", "test", "deploy"}
        manual = [j for j in latest if j.status == "manual"]
        assert len(manual) == 1 and not manual[0].ran and manual[0].log is None
        assert all(isinstance(j.log, LogSpec) and j.log.size == 1234 for j in every if j.ran)
        old = next(j for j in every if j.retried)
        assert old.status == "failed" and old.finished_at <= pipeline.finished_at  # type: ignore[operator]
    for child in children:
        bridge = next(b for b in world.bridges.values() if b.downstream_pipeline_id == child.id)
        assert world.pipelines[bridge.pipeline_id].project_id == child.project_id


SCENARIO: dict[str, Any] = {
    "token": "glpat-scenario-123456",
    "users": [{"username": "alice", "name": "Alice"}],
    "groups": [{"path": "acme", "name": "ACME"}, {"path": "platform", "parent": "acme"}, {"path": "other"}],
    "projects": [
        {"path": "app", "group": "acme/platform", "shared_with": ["other"], "pipelines": [
            {"status": "failed", "user": "alice", "author_email": "alice@example.com",
             "created_at": "2026-10-01T10:00:00Z", "finished_at": "2026-10-01T10:05:00.250Z",
             "jobs": [
                 {"name": "build", "stage": "build", "log": "built\n"},
                 {"name": "test", "status": "failed", "log": {"size": 5000, "seed": 2, "timestamps": True},
                  "retries": [{"status": "failed", "log": "again\n"}]},
             ],
             "bridges": [{"name": "downstream", "stage": "deploy", "status": "failed"}],
             "children": [{"status": "success", "jobs": [{"name": "child-test"}]}]},
            {"status": "running", "created_ago": 120},
        ]},
        {"path": "personal", "member": False},
    ],
}


def test_scenario_builds_the_described_world() -> None:
    world = build_world(SCENARIO)
    assert world.token == "glpat-scenario-123456"
    app = world.find_project("acme/platform/app")
    personal = world.find_project("sim-user/personal")
    assert app is not None and personal is not None and not personal.member
    other = world.find_group("other")
    assert other is not None and app.shared_with_group_ids == [other.id]
    failed, running = [p for p in world.project_pipelines(app.id) if p.source != "parent_pipeline"]
    assert failed.user is not None and failed.user["username"] == "alice"
    assert failed.finished_at is not None and failed.finished_at.microsecond == 250_000
    assert world.commits[(app.id, failed.sha)].author_email == "alice@example.com"
    every = world.pipeline_jobs(failed.id, include_retried=True)
    assert [j.name for j in every] == ["test", "test", "build"]
    assert every[0].log == "again\n" and every[1].retried and isinstance(every[1].log, LogSpec)
    (child,) = [p for p in world.project_pipelines(app.id) if p.source == "parent_pipeline"]
    bridges = world.pipeline_bridges(failed.id)
    assert {b.downstream_pipeline_id for b in bridges} == {None, child.id}
    assert running.status == "running" and (world.now() - running.created_at).total_seconds() >= 120


def test_scenario_errors_say_where() -> None:
    with pytest.raises(ScenarioError, match=r"projects\[0\]\.pipelines\[0\]\.user: unknown user 'bob'"):
        build_world({"projects": [{"path": "a", "pipelines": [{"user": "bob"}]}]})
    with pytest.raises(ScenarioError, match=r"projects\[0\]\.pipelines\[0\]\.jobs\[0\]\.log"):
        build_world({"projects": [{"path": "a", "pipelines": [{"jobs": [{"name": "j", "log": {"bytes": 1}}]}]}]})
    with pytest.raises(ScenarioError, match=r"groups\[0\]: parent 'nope'"):
        build_world({"groups": [{"path": "x", "parent": "nope"}]})
    with pytest.raises(ScenarioError, match=r"projects\[0\]\.pipelines\[0\]: unknown status"):
        build_world({"projects": [{"path": "a", "pipelines": [{"status": "done"}]}]})
