"""The shipper end to end: the real CLI polls the GitLab simulator and POSTs to the receiver over HTTP."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver, Reply
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import API_TOKEN, by_pipeline, documents, make_env

CI_JOBS = [
    JobSpec("build:production", "build", "success", log="building\n"),
    JobSpec("test/unit", "test", "failed", log=b"\x1b[31mFAIL\x1b[0m \xff\xfe broken utf-8\r\n"),
    JobSpec("lint", "test", "success", log="lint ok\n"),
    JobSpec("deploy", "deploy", "manual"),  # never ran: no log
]


def test_ships_every_finished_pipeline_once_with_every_field(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver
) -> None:
    user = world.add_user("alice", name="Alice Example", public_email="")
    project = world.add_project("team/app", name="My App")
    main_pl = world.add_pipeline(project.id, status="failed", source="push", user=user,
                                 author_email="alice@commits.example", jobs=CI_JOBS)
    # a retried job: the newest attempt is the one shipped
    first_try = world.add_job(main_pl.id, "flaky", "test", "failed", log="first try\n")
    retried = world.add_job(main_pl.id, "flaky", "test", "success", log="second try\n", retried_from=first_try.id)
    mr = world.add_pipeline(project.id, status="success", source="merge_request_event",
                            jobs=[JobSpec("mr-check", "test", "success", log="ok\n")])
    child = world.add_child_pipeline(mr.id, jobs=[JobSpec("child-job", "test", "success", log="child log\n")])
    running = world.add_pipeline(project.id, status="running", jobs=[JobSpec("slow", "test", "running")])
    env = make_env(tmp_path, gitlab_sim, receiver)

    result = env.invoke("run", "--once")
    assert result.exit_code == 0, result.output
    docs = by_pipeline(documents(receiver))
    assert set(docs) == {main_pl.id, mr.id, child.id}  # not the running one
    assert running.id not in docs

    doc = docs[main_pl.id]
    assert doc["project_id"] == project.id and doc["project_name"] == "My App"
    assert (doc["status"], doc["source"], doc["pipeline_type"], doc["ref"]) == ("failed", "push", "main", "main")
    assert doc["finished_at"] and doc["created_at"] and doc["duration"] is not None
    assert doc["user"] == {"name": "Alice Example", "email": "alice@commits.example"}  # no public email: commit author's
    assert doc["stages"] == ["build", "test", "deploy"]
    jobs = {j["job_name"]: j for j in doc["jobs"]}
    assert set(jobs) == {"build:production", "test/unit", "lint", "deploy", "flaky"}
    assert jobs["build:production"]["log_content"] == "building\n"
    assert jobs["test/unit"]["log_content"] == "\x1b[31mFAIL\x1b[0m \ufffd\ufffd broken utf-8\r\n"
    assert jobs["deploy"]["log_content"] == "" and jobs["deploy"]["started_at"] is None
    assert jobs["flaky"]["job_id"] == retried.id and jobs["flaky"]["log_content"] == "second try\n"
    assert docs[mr.id]["pipeline_type"] == "merge_request"
    assert docs[child.id]["pipeline_type"] == "child" and docs[child.id]["jobs"][0]["log_content"] == "child log\n"

    # headers a receiver relies on
    for request in receiver.accepted():
        assert request.header("Authorization") == f"Bearer {API_TOKEN}"
        assert request.idempotency_key

    # one api-requests.log line per POST, in the design's format
    lines = env.request_lines()
    assert len(lines) == 3
    for line in lines:
        assert re.match(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] PIPELINE_ID=\d+ PROJECT_ID=%d URL=%s STATUS=200 "
                        r"DURATION=\d+ms RESPONSE=\{\"success\": true, \"message\": \"Logs received\"\}$"
                        % (project.id, re.escape(receiver.url)), line), line

    # a second cycle ships nothing new, and costs no pipeline detail request
    gitlab_sim.reset_counters()
    again = env.invoke("run", "--once")
    assert again.exit_code == 0
    assert len(receiver.accepted()) == 3
    assert gitlab_sim.counters["pipeline"] == 0 and gitlab_sim.counters["trace"] == 0


def test_retried_pipeline_ships_again_and_late_finisher_is_not_missed(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver
) -> None:
    project = world.add_project("team/svc")
    done = world.add_pipeline(project.id, status="failed", jobs=[JobSpec("t", "test", "failed", log="boom\n")])
    # created long before the cursor, still running when first polled
    slow = world.add_pipeline(project.id, status="running", jobs=[JobSpec("long", "test", "running", log="...\n")])
    env = make_env(tmp_path, gitlab_sim, receiver)
    assert env.invoke("run", "--once").exit_code == 0
    assert [d["pipeline_id"] for d in documents(receiver)] == [done.id]

    world.finish_pipeline(slow.id, "success")
    world.retry_pipeline(done.id)
    world.touch_pipeline(done.id)  # still running after the retry: nothing to ship yet
    assert env.invoke("run", "--once").exit_code == 0
    assert [d["pipeline_id"] for d in documents(receiver)] == [done.id, slow.id]

    world.finish_pipeline(done.id, "success")
    assert env.invoke("run", "--once").exit_code == 0
    docs = documents(receiver)
    assert [d["pipeline_id"] for d in docs] == [done.id, slow.id, done.id]
    assert (docs[0]["status"], docs[2]["status"]) == ("failed", "success")
    keys = [r.idempotency_key for r in receiver.accepted()]
    assert keys[0] != keys[2]  # a new finish is a new delivery, not a duplicate

    # updated_at moving without a status change (GitLab does that ~55 s after finishing) is not a new finish
    world.touch_pipeline(done.id)
    assert env.invoke("run", "--once").exit_code == 0
    assert len(receiver.accepted()) == 3


def test_pagination_over_100_pipelines_and_100_jobs(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver
) -> None:
    project = world.add_project("team/big")
    many = [world.add_pipeline(project.id, status="success", jobs=[JobSpec("j", "test", "success", log=f"{i}\n")])
            for i in range(130)]
    wide = world.add_pipeline(project.id, status="success",
                              jobs=[JobSpec(f"job-{i:03d}", f"s{i // 50}", "success", log=f"log {i}\n") for i in range(120)])
    env = make_env(tmp_path, gitlab_sim, receiver)
    assert env.invoke("run", "--once").exit_code == 0
    docs = by_pipeline(documents(receiver))
    assert set(docs) == {p.id for p in many} | {wide.id}
    assert len(receiver.accepted()) == 131
    assert [j["job_name"] for j in docs[wide.id]["jobs"]] == [f"job-{i:03d}" for i in range(120)]
    assert docs[wide.id]["stages"] == ["s0", "s1", "s2"]
    assert docs[wide.id]["jobs"][119]["log_content"] == "log 119\n"


def test_filters(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    keep = world.add_project("team/keep")
    drop = world.add_project("team/drop")
    ok = world.add_pipeline(keep.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n"),
                                                           JobSpec("b", "test", "failed", log="b\n")])
    failed = world.add_pipeline(keep.id, status="failed", jobs=[JobSpec("c", "test", "failed", log="c\n")])
    canceled = world.add_pipeline(keep.id, status="canceled", jobs=[JobSpec("d", "test", "canceled", log="d\n")])
    world.add_pipeline(drop.id, status="success", jobs=[JobSpec("e", "test", "success", log="e\n")])
    env = make_env(tmp_path, gitlab_sim, receiver, LOG_SAVE_PIPELINE_STATUS="success,FAILED",
                   LOG_SAVE_JOB_STATUS="failed", LOG_EXCLUDE_PROJECTS=str(drop.id))
    gitlab_sim.reset_counters()
    assert env.invoke("run", "--once").exit_code == 0
    docs = by_pipeline(documents(receiver))
    assert set(docs) == {ok.id, failed.id}
    assert [j["job_name"] for j in docs[ok.id]["jobs"]] == ["b"]
    assert docs[ok.id]["stages"] == ["test"]
    # the job filter runs before logs are fetched: only the two failed jobs' traces were requested
    assert gitlab_sim.counters["trace"] == 2
    assert canceled.id not in docs

    # allow list wins over the exclude list
    env2 = make_env(tmp_path / "2", gitlab_sim, receiver, LOG_SAVE_PROJECTS=str(drop.id), LOG_EXCLUDE_PROJECTS=str(drop.id))
    receiver.clear()
    assert env2.invoke("run", "--once").exit_code == 0
    assert {d["project_id"] for d in documents(receiver)} == {drop.id}


@pytest.mark.parametrize("mode", ["file", "dual", "api"])
def test_modes_and_file_layout(mode: str, tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    project = world.add_project("team/app", name="My App")
    pipeline = world.add_pipeline(project.id, status="success", jobs=[JobSpec("build:production", "build", "success", log=b"raw \xff\n")])
    env = make_env(tmp_path, gitlab_sim, None if mode == "file" else receiver,
                   API_POST_SAVE_TO_FILE="true" if mode == "dual" else "false")
    assert env.invoke("run", "--once").exit_code == 0
    folder = env.output / f"My_App_{project.id}" / f"pipeline_{pipeline.id}"
    if mode == "api":
        assert not env.output.exists()
    else:
        meta = json.loads((folder / "metadata.json").read_text("utf-8"))
        assert meta["pipeline_id"] == pipeline.id and meta["status"] == "success" and meta["last_updated"]
        [(job_id, entry)] = meta["jobs"].items()
        assert entry["log_file"] == f"job_{job_id}_build_production.log"
        assert (folder / entry["log_file"]).read_bytes() == b"raw \xff\n"  # the raw bytes, not the decoded text
    assert len(receiver.accepted()) == (0 if mode == "file" else 1)
    assert env.requests_log.exists() == (mode != "file")


def test_receiver_failure_keeps_documents_in_the_outbox_until_it_recovers(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator
) -> None:
    project = world.add_project("team/app")
    first = world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    second = world.add_pipeline(project.id, status="failed", jobs=[JobSpec("b", "test", "failed", log="b\n")])
    body = '{"error": "Database connection failed"}'
    with Receiver(script=lambda req: Reply(500, body=body)) as rec:
        env = make_env(tmp_path, gitlab_sim, rec, API_POST_SAVE_TO_FILE="true", RETRY_ATTEMPTS="1", POLL_INTERVAL="1")
        result = env.invoke("run", "--once")
        assert result.exit_code == 1, result.output  # not everything was delivered
        assert "summary: queued=2 outbox_waiting=2" in result.output
        # each document: one POST and its retry, then into the outbox
        assert sorted(r.json()["pipeline_id"] for r in rec.requests) == [first.id, first.id, second.id, second.id]
        lines = env.request_lines()
        assert len(lines) == 2
        for line in lines:
            assert "STATUS=500" in line and line.endswith(f"ERROR=Internal Server Error RESPONSE={body}")
        # dual mode: the files exist although the API failed
        assert len(list(env.output.glob(f"*_{project.id}/pipeline_*/metadata.json"))) == 2
        assert len(list((tmp_path / "state" / "outbox").iterdir())) == 2

        rec.set_script(None)
        time.sleep(1.05)  # their first retry is due after 0.5-1 s (POLL_INTERVAL=1)
        result = env.invoke("run", "--once")
        assert result.exit_code == 0, result.output
        assert "outbox_delivered=2" in result.output
        docs = documents(rec)
        assert sorted(d["pipeline_id"] for d in docs) == sorted([first.id, second.id])
        keys = {r.json()["pipeline_id"]: r.idempotency_key for r in rec.requests if r.status == 500}
        assert {d.json()["pipeline_id"]: d.idempotency_key for d in rec.accepted()} == keys
        assert list((tmp_path / "state" / "outbox").iterdir()) == []
        assert env.invoke("run", "--once").exit_code == 0
        assert len(rec.accepted()) == 2


def test_backfill_and_post(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    from datetime import timedelta

    project = world.add_project("team/app")
    now = world.now()
    old = world.add_pipeline(project.id, status="success", created_at=now - timedelta(days=3),
                             finished_at=now - timedelta(days=3) + timedelta(minutes=5),
                             jobs=[JobSpec("a", "test", "success", log="old\n")])
    older = world.add_pipeline(project.id, status="success", created_at=now - timedelta(days=10),
                               finished_at=now - timedelta(days=10) + timedelta(minutes=5),
                               jobs=[JobSpec("a", "test", "success", log="older\n")])
    env = make_env(tmp_path, gitlab_sim, receiver, INITIAL_LOOKBACK="1h")
    assert env.invoke("run", "--once").exit_code == 0
    assert receiver.accepted() == []  # outside the first run's look-back

    result = env.invoke("backfill", "--since", "5d", "--project", project.path_with_namespace)
    assert result.exit_code == 0, result.output
    assert [d["pipeline_id"] for d in documents(receiver)] == [old.id]
    assert env.invoke("backfill", "--since", "5d").exit_code == 0  # already shipped: not again
    assert len(receiver.accepted()) == 1

    result = env.invoke("post", "--pipeline-id", str(older.id))
    assert result.exit_code == 0, result.output
    result = env.invoke("post", "--pipeline-id", str(old.id), "--project", str(project.id))
    assert result.exit_code == 0
    docs = documents(receiver)
    assert [d["pipeline_id"] for d in docs] == [old.id, older.id, old.id]
    keys = [r.idempotency_key for r in receiver.accepted()]
    assert keys[0] == keys[2]  # a resend of the same finish is recognisable as a duplicate

    missing = env.invoke("post", "--pipeline-id", "99")
    assert missing.exit_code == 1
    assert "pipeline 99 is in none of the 1 configured project(s)" in missing.output


def test_bad_config_exits_2_naming_the_variable(tmp_path: Path, gitlab_sim: GitLabSimulator) -> None:
    env = make_env(tmp_path, gitlab_sim, None, POLL_INTERVAL="soon")
    result = env.invoke("run", "--once")
    assert result.exit_code == 2
    assert "configuration error: POLL_INTERVAL" in result.output
    assert "Traceback" not in result.output


def test_gitlab_errors_are_logged_and_the_cycle_goes_on(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    env = make_env(tmp_path, gitlab_sim, receiver)
    bad = env.invoke("run", "--once", GITLAB_TOKEN="glpat-wrong-token-000")
    assert bad.exit_code == 1
    assert "401" in bad.output and "Traceback" not in bad.output
    assert env.invoke("run", "--once").exit_code == 0
    assert [d["pipeline_id"] for d in documents(receiver)] == [pipeline.id]


@pytest.mark.parametrize("always", ["true", "false"])
def test_metadata_always_for_status_filtered_pipelines(always: str, tmp_path: Path, world: World,
                                                       gitlab_sim: GitLabSimulator) -> None:
    project = world.add_project("team/app", name="app")
    kept = world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    dropped = world.add_pipeline(project.id, status="failed", jobs=[JobSpec("b", "build", "failed", log="b\n")])
    env = make_env(tmp_path, gitlab_sim, None, LOG_SAVE_PIPELINE_STATUS="success", LOG_SAVE_METADATA_ALWAYS=always)
    gitlab_sim.reset_counters()
    assert env.invoke("run", "--once").exit_code == 0
    project_dir = env.output / f"app_{project.id}"
    assert (project_dir / f"pipeline_{kept.id}" / "metadata.json").is_file()
    dropped_dir = project_dir / f"pipeline_{dropped.id}"
    if always == "true":
        meta = json.loads((dropped_dir / "metadata.json").read_text("utf-8"))
        assert meta["status"] == "failed" and meta["jobs"] == {} and meta["stages"] == ["build"]
        assert sorted(p.name for p in dropped_dir.iterdir()) == ["metadata.json"]  # no logs
    else:
        assert not dropped_dir.exists()
    assert gitlab_sim.counters["trace"] == 1  # only the kept pipeline's log was fetched


def test_groups_and_projects_select_what_is_polled(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                   receiver: Receiver) -> None:
    acme = world.add_group("acme")
    sub = world.add_group("platform", parent_id=acme.id)
    other = world.add_group("other")
    in_group = world.add_project("web", group_id=acme.id)
    in_subgroup = world.add_project("api", group_id=sub.id)
    elsewhere = world.add_project("tool", group_id=other.id)
    named = world.add_project("named", group_id=other.id)
    not_member = world.add_project("foreign", member=False)
    ids = {}
    for project in (in_group, in_subgroup, elsewhere, named, not_member):
        ids[project.id] = world.add_pipeline(project.id, status="success", jobs=[JobSpec("j", "test", "success", log="x\n")]).id

    env = make_env(tmp_path / "groups", gitlab_sim, receiver, GITLAB_GROUPS="acme",
                   GITLAB_PROJECTS=named.path_with_namespace)
    assert env.invoke("run", "--once").exit_code == 0
    assert {d["project_id"] for d in documents(receiver)} == {in_group.id, in_subgroup.id, named.id}

    receiver.clear()
    members = make_env(tmp_path / "members", gitlab_sim, receiver)  # neither set: the token's memberships
    assert members.invoke("run", "--once").exit_code == 0
    assert {d["project_id"] for d in documents(receiver)} == {in_group.id, in_subgroup.id, elsewhere.id, named.id}


def test_pipeline_deleted_between_listing_and_fetching_is_skipped(tmp_path: Path, world: World,
                                                                 gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    project = world.add_project("team/app")
    doomed = world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    fine = world.add_pipeline(project.id, status="success", jobs=[JobSpec("b", "test", "success", log="b\n")])
    gitlab_sim.inject("pipeline", 404, count=1, body='{"message": "404 Not found"}')
    env = make_env(tmp_path, gitlab_sim, receiver)
    result = env.invoke("run", "--once")
    assert result.exit_code == 0, result.output
    assert "deleted in GitLab" in result.output
    assert [d["pipeline_id"] for d in documents(receiver)] == [fine.id]
    assert f"pipeline {doomed.id} " in result.output
