"""--dry-run on run, backfill and post: shows what would be sent, changes nothing."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from pathlib import Path

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import VALIDATOR, make_env


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders with a hash of its bytes."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders if folder.exists() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_dry_run_on_a_fresh_setup_creates_nothing(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                      receiver: Receiver) -> None:
    project = world.add_project("team/app", name="App")
    first = world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    second = world.add_pipeline(project.id, status="failed", jobs=[JobSpec("b", "test", "failed", log="b\n")])
    env = make_env(tmp_path, gitlab_sim, receiver, API_POST_SAVE_TO_FILE="true")
    result = env.invoke("run", "--dry-run")  # --once implied: it returns
    assert result.exit_code == 0, result.output
    for pipeline in (first, second):
        line = next(l for l in result.stdout.splitlines() if l.startswith(f"pipeline {pipeline.id} "))
        assert ": would_ship, 1 job(s), 2 log bytes: would POST " in line
        assert f"to {receiver.url} (Idempotency-Key " in line
        assert f"and write {tmp_path / 'logs' / 'pipeline-logs' / f'App_{project.id}' / f'pipeline_{pipeline.id}'}" in line
    assert "summary: would_ship=2" in result.stdout
    assert receiver.requests == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.env"]  # no STATE_DIR, LOG_DIR or file output


def test_dry_run_after_real_runs_changes_no_byte(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                 receiver: Receiver) -> None:
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    env = make_env(tmp_path, gitlab_sim, receiver, API_POST_SAVE_TO_FILE="true")
    assert env.invoke("run", "--once").exit_code == 0
    new = world.add_pipeline(project.id, status="failed", jobs=[JobSpec("b", "test", "failed", log="b\n")])
    before = snapshot(tmp_path / "state", tmp_path / "logs")
    requests_before = len(receiver.requests)

    result = env.invoke("run", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "summary: would_ship=1 unchanged=1" in result.stdout and f"pipeline {new.id} " in result.stdout
    backfill = env.invoke("backfill", "--since", "1d", "--dry-run", "--force")
    assert backfill.exit_code == 0 and "summary: would_ship=2" in backfill.stdout
    post = env.invoke("post", "--pipeline-id", str(new.id), "--dry-run")
    assert post.exit_code == 0 and "would_ship" in post.stdout

    assert snapshot(tmp_path / "state", tmp_path / "logs") == before  # state, outbox, files, both logs
    assert len(receiver.requests) == requests_before
    # and the real cycle still ships the new pipeline: the dry run moved no cursor
    assert env.invoke("run", "--once").exit_code == 0
    assert [r.json()["pipeline_id"] for r in receiver.accepted()][-1] == new.id


def test_show_document_prints_exactly_what_post_would_send(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                           receiver: Receiver) -> None:
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, status="success", jobs=[
        JobSpec("build", "build", "success", log="compiling\n"),
        JobSpec("test", "test", "failed", log=b"\x1b[31mFAIL\x1b[0m \xff\n"),
    ])
    env = make_env(tmp_path, gitlab_sim, receiver)
    dry = env.invoke("post", "--pipeline-id", str(pipeline.id), "--dry-run", "--show-document")
    assert dry.exit_code == 0, dry.output
    [document_line] = dry.stdout.splitlines()  # stdout holds the document only; the summary is on stderr
    document = json.loads(document_line)
    VALIDATOR.validate(document)
    assert [j["log_content"] for j in document["jobs"]] == ["compiling\n", "\x1b[31mFAIL\x1b[0m \ufffd\n"]
    assert "would_ship" in dry.stderr

    real = env.invoke("post", "--pipeline-id", str(pipeline.id))
    assert real.exit_code == 0
    [request] = receiver.accepted()
    assert request.body == document_line.encode("utf-8")  # byte for byte
    assert request.idempotency_key in dry.stderr


def test_backfill_dry_run_show_document_is_json_lines(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    project = world.add_project("team/app")
    now = world.now()
    ids = [world.add_pipeline(project.id, status="success", created_at=now - timedelta(days=2, minutes=i),
                              jobs=[JobSpec("a", "test", "success", log=f"{i}\n")]).id for i in range(3)]
    env = make_env(tmp_path, gitlab_sim, None)  # file mode: the document is what the files would hold
    result = env.invoke("backfill", "--since", "3d", "--dry-run", "--show-document")
    assert result.exit_code == 0, result.output
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(d["pipeline_id"] for d in docs) == sorted(ids)
    assert re.search(r"^\[3/3\+?\] pipeline", result.stderr, re.M) and "would write " in result.stderr
    assert not (tmp_path / "logs").exists() and not (tmp_path / "state").exists()


def test_show_document_needs_dry_run(tmp_path: Path, gitlab_sim: GitLabSimulator) -> None:
    env = make_env(tmp_path, gitlab_sim, None)
    for args in (("run", "--show-document"), ("post", "--pipeline-id", "1", "--show-document"),
                 ("backfill", "--since", "1d", "--show-document")):
        result = env.invoke(*args)
        assert result.exit_code == 2 and "--show-document needs --dry-run" in result.output
