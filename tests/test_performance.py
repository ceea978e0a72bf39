"""Fast and lean, checked by behaviour (not by timing): request economy, rate limits, gzip, size limits,
sharding, concurrency, and memory that does not grow with log size."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gitlab_log_shipper.gitlab.throttle import Throttle
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.logs import LogSpec
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import documents, make_env


def test_requests_per_pipeline_are_the_minimum(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                               receiver: Receiver) -> None:
    user = world.add_user("pub", name="Pub", public_email="pub@example.com")
    project = world.add_project("team/app")
    for _ in range(5):
        world.add_pipeline(project.id, status="success", user=user, jobs=[
            JobSpec(f"j{j}", "test", "success", log=f"{j}\n") for j in range(8)
        ] + [JobSpec("manual", "deploy", "manual")])
    env = make_env(tmp_path, gitlab_sim, receiver, GITLAB_PROJECTS=str(project.id))
    gitlab_sim.reset_counters()
    assert env.invoke("run", "--once").exit_code == 0
    counts = gitlab_sim.counters
    # per pipeline: its detail, one jobs page, one log per job that ran (not the manual one), no commit lookup
    assert (counts["pipeline"], counts["pipeline_jobs"], counts["trace"], counts["commit"]) == (5, 5, 40, 0)
    assert counts["pipelines"] == 2 and counts["project"] == 1  # the list (+ child pipelines), discovery

    gitlab_sim.reset_counters()
    assert env.invoke("run", "--once").exit_code == 0
    assert sum(gitlab_sim.counters.values()) == 3  # idle: discovery (a new process) + the two lists

    no_children = make_env(tmp_path / "b", gitlab_sim, receiver, GITLAB_PROJECTS=str(project.id),
                           POLL_CHILD_PIPELINES="false")
    assert no_children.invoke("run", "--once").exit_code == 0
    gitlab_sim.reset_counters()
    assert no_children.invoke("run", "--once").exit_code == 0
    assert gitlab_sim.counters["pipelines"] == 1


def test_throttle_caps_the_rate_and_waits_for_the_reset(caplog: pytest.LogCaptureFixture) -> None:
    clock = [1000.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    throttle = Throttle(5, reserve=10, monotonic=lambda: clock[0], wall=lambda: clock[0], sleep=sleep)
    for _ in range(5):
        throttle.before_request()
    assert slept == pytest.approx([0.2, 0.2, 0.2, 0.2])  # 5 per second: one every 0.2 s

    slept.clear()
    throttle = Throttle(0, reserve=10, monotonic=lambda: clock[0], wall=lambda: clock[0], sleep=sleep)
    throttle.observe({"RateLimit-Remaining": "500", "RateLimit-Limit": "2000", "RateLimit-Reset": str(int(clock[0]) + 30)})
    throttle.before_request()
    assert slept == []  # plenty left
    throttle.observe({"RateLimit-Remaining": "3", "RateLimit-Reset": str(int(clock[0]) + 30)})
    with caplog.at_level(logging.WARNING, logger="gitlab_log_shipper.gitlab.throttle"):
        throttle.before_request()
    assert slept == [pytest.approx(30, abs=1)]  # nearly out: wait for the window to reset instead of earning a 429
    # a pause of half a minute is said, with its reason (found when a benchmark run stalled 55 s without a word)
    assert [r.getMessage() for r in caplog.records] == [
        f"GitLab rate limit: 3 of 2000 requests left in this window; pausing {slept[0]:.0f} s until it resets"]
    # another worker's answer from before the reset says 2 left, same window: it waits too, without a second line
    reset_at = int(clock[0] - slept[0]) + 30
    clock[0] -= slept[0]
    throttle.observe({"RateLimit-Remaining": "2", "RateLimit-Reset": str(reset_at)})
    with caplog.at_level(logging.WARNING, logger="gitlab_log_shipper.gitlab.throttle"):
        throttle.before_request()
    assert len(slept) == 2 and len(caplog.records) == 1
    clock[0] += slept[-1]
    slept[:] = slept[:1]
    throttle.before_request()
    assert len(slept) == 1  # the next answer tells the new budget; no second wait on stale numbers
    throttle.observe({"RateLimit-Remaining": "1", "RateLimit-Reset": str(int(clock[0]) + 3600)})
    throttle.before_request()
    assert slept[-1] == pytest.approx(60)  # never more than a minute at a time


def test_rate_limit_headers_slow_the_shipper_down_before_a_429(tmp_path: Path, world: World,
                                                                gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    project = world.add_project("team/app")
    for _ in range(3):
        world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    # GitLab allows 8 requests a second; the shipper is told so and must pause instead of meeting a 429
    gitlab_sim.faults.update(rate_limit=8, rate_limit_window=1.0)
    env = make_env(tmp_path, gitlab_sim, receiver, CONCURRENCY="4", GITLAB_MAX_REQUESTS_PER_SECOND="6")
    assert env.invoke("run", "--once").exit_code == 0
    assert len(documents(receiver)) == 3
    assert gitlab_sim.faults_served.get("rate_limited", 0) == 0


def test_gzip_body(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    project = world.add_project("team/app")
    spec = LogSpec(400_000, seed=9)
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log=spec)])
    env = make_env(tmp_path, gitlab_sim, receiver, API_POST_COMPRESSION="gzip")
    assert env.invoke("run", "--once").exit_code == 0
    [request] = receiver.accepted()
    assert request.header("Content-Encoding") == "gzip"
    assert request.wire_size < request.body_size / 3  # logs compress well
    [doc] = documents(receiver)
    assert doc["jobs"][0]["log_content"] == spec.read_all().decode("utf-8", "replace")


def test_gzip_documents_wait_in_the_outbox_compressed(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    with Receiver(script=lambda req: __import__("gitlab_log_shipper.sim.receiver", fromlist=["Reply"]).Reply(503)) as rec:
        env = make_env(tmp_path, gitlab_sim, rec, API_POST_COMPRESSION="gzip", RETRY_ATTEMPTS="0")
        assert env.invoke("run", "--once").exit_code == 1
    [queued] = (tmp_path / "state" / "outbox").iterdir()
    assert queued.name.endswith(".json.gz")
    assert json.loads(gzip.decompress(queued.read_bytes()))["jobs"][0]["log_content"] == "a\n"


def test_max_job_log_bytes_keeps_head_and_tail(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                               receiver: Receiver) -> None:
    project = world.add_project("team/app")
    spec = LogSpec(300_000, seed=4)
    small = LogSpec(2_000, seed=5)
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("big", "test", "success", log=spec),
                                                           JobSpec("small", "test", "success", log=small)])
    env = make_env(tmp_path, gitlab_sim, receiver, MAX_JOB_LOG_BYTES="100K", API_POST_SAVE_TO_FILE="true")
    assert env.invoke("run", "--once").exit_code == 0
    [doc] = documents(receiver)
    jobs = {j["job_name"]: j for j in doc["jobs"]}
    original = spec.read_all().decode("utf-8", "replace")
    big = jobs["big"]
    assert (big["log_bytes"], big["log_truncated"]) == (300_000, True)
    assert "bytes cut from the middle of this log (MAX_JOB_LOG_BYTES)" in big["log_content"]
    head, _, tail = big["log_content"].partition("\n[... gitlab-log-shipper: ")
    assert original.startswith(head) and len(head) > 40_000
    assert original.endswith(tail.split(" ...]\n", 1)[1])
    assert (jobs["small"]["log_bytes"], jobs["small"]["log_truncated"]) == (2_000, False)
    [big_file] = env.output.glob("*/pipeline_*/job_*_big.log")
    assert big_file.stat().st_size <= 100 * 1024 + 200  # the files hold the same cut log


def test_api_post_max_bytes_cuts_the_largest_logs_to_fit(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                         receiver: Receiver) -> None:
    project = world.add_project("team/app")
    logs = {"huge": LogSpec(900_000, seed=1), "mid": LogSpec(200_000, seed=2), "tiny": LogSpec(3_000, seed=3)}
    world.add_pipeline(project.id, status="success",
                       jobs=[JobSpec(name, "test", "success", log=spec) for name, spec in logs.items()])
    env = make_env(tmp_path, gitlab_sim, receiver, API_POST_MAX_BYTES="512K")
    assert env.invoke("run", "--once").exit_code == 0
    [request] = receiver.accepted()
    assert request.body_size <= 512 * 1024
    [doc] = documents(receiver)
    jobs = {j["job_name"]: j for j in doc["jobs"]}
    assert jobs["tiny"]["log_truncated"] is False  # small logs stay whole
    assert jobs["tiny"]["log_content"] == logs["tiny"].read_all().decode("utf-8", "replace")
    assert jobs["huge"]["log_truncated"] is True and jobs["huge"]["log_bytes"] == 900_000
    assert "(API_POST_MAX_BYTES)" in jobs["huge"]["log_content"]


def test_shards_split_projects_without_overlap(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                               receiver: Receiver) -> None:
    projects = [world.add_project(f"team/p{i}") for i in range(6)]
    for project in projects:
        world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    seen: list[set[int]] = []
    for index in range(3):
        receiver.clear()
        env = make_env(tmp_path / f"shard{index}", gitlab_sim, receiver, SHARD=f"{index}/3")
        assert env.invoke("run", "--once").exit_code == 0
        seen.append({d["project_id"] for d in documents(receiver)})
        assert all(pid % 3 == index for pid in seen[-1])
    assert set().union(*seen) == {p.id for p in projects}
    assert sum(len(s) for s in seen) == len(projects)


LAUNCHER = ("import os, subprocess, sys\n"
            "proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
            "_, status, usage = os.wait4(proc.pid, 0)\n"
            "print(usage.ru_maxrss)\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def test_memory_stays_flat_shipping_big_logs(tmp_path: Path) -> None:
    """One pipeline with 3 x 60 MB logs, in a subprocess so its peak RSS can be read: well under the logs'
    size, because logs stream to a spool and the document streams from there into the POST."""
    world = World()
    project = world.add_project("team/big")
    size = 60 * 1024 * 1024
    world.add_pipeline(project.id, status="success",
                       jobs=[JobSpec(f"huge-{j}", "test", "success", log=LogSpec(size, seed=j)) for j in range(3)])
    with GitLabSimulator(world) as sim, Receiver(store_bodies=False) as receiver:
        env = make_env(tmp_path, sim, receiver)
        (tmp_path / "empty.env").touch()
        # Started by a small launcher that reports its child's peak: Linux keeps ru_maxrss across exec, so a child
        # of this (large, long-lived) pytest process would report pytest's own size (178 MB late in a full run).
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, sys.executable, "-m", "gitlab_log_shipper", "--env-file",
             str(tmp_path / "empty.env"), "run", "--once"],
            env={**os.environ, **env.values}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode("utf-8", "replace")
        [request] = receiver.accepted()
        assert request.body_size > 3 * size  # the whole logs went out (escaped, so a bit more)
    peak_mb = int(out.decode().strip().splitlines()[-1]) / 1024
    print(f"\npeak RSS shipping 180 MB of logs: {peak_mb:.0f} MB")
    assert peak_mb < 150
