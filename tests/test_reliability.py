"""Nothing lost: outbox, dead letters, crash safety, the instance lock, shutdown, GitLab faults."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from gitlab_log_shipper.config.settings import load_config
from gitlab_log_shipper.delivery.outbox import Delivery
from gitlab_log_shipper.delivery.poster import ApiPoster, PostResult, RequestLog
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.logs import LogSpec
from gitlab_log_shipper.sim.receiver import Receiver, Reply
from gitlab_log_shipper.sim.world import JobSpec, World
from gitlab_log_shipper.state.store import StateStore

from shipper_helpers import documents, make_env, start_daemon, stop_daemon


def test_permanent_rejection_goes_to_dead_letters_and_redeliver_sends_it(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator
) -> None:
    project = world.add_project("team/app")
    big = world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log=LogSpec(50_000))])
    small = world.add_pipeline(project.id, status="success", jobs=[JobSpec("b", "test", "success", log="b\n")])
    with Receiver(max_bytes=20_000) as rec:
        env = make_env(tmp_path, gitlab_sim, rec, API_POST_SAVE_TO_FILE="true")
        result = env.invoke("run", "--once")
        assert result.exit_code == 1
        assert "dead_lettered=1" in result.output and "shipped=1" in result.output
        assert len(rec.requests) == 2  # the 413 was not retried
        dead = tmp_path / "state" / "dead-letter"
        [meta_path] = dead.glob("*.meta.json")
        meta = json.loads(meta_path.read_text("utf-8"))
        assert (meta["pipeline_id"], meta["status"]) == (big.id, 413)
        assert "413 Request Entity Too Large" in meta["response"]
        assert json.loads(meta_path.with_name(meta_path.name.replace(".meta", "")).read_text("utf-8"))["pipeline_id"] == big.id
        assert list(env.output.glob(f"*/pipeline_{big.id}/metadata.json"))  # dual mode: files written anyway
        # not retried in a loop
        assert env.invoke("run", "--once").exit_code == 0
        assert len(rec.requests) == 2

        redeliver = env.invoke("redeliver")
        assert redeliver.exit_code == 1 and "still failing: 413" in redeliver.output
        assert len(list(dead.iterdir())) == 2
    with Receiver() as fixed:  # the body limit was raised
        env.values["API_POST_URL"] = fixed.url
        redeliver = env.invoke("redeliver")
        assert redeliver.exit_code == 0, redeliver.output
        assert [d["pipeline_id"] for d in documents(fixed)] == [big.id]
        assert fixed.requests[0].idempotency_key == meta["idempotency_key"]
        assert list(dead.iterdir()) == []
    assert small.id != big.id


def test_backlog_drains_after_a_long_receiver_outage(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    project = world.add_project("team/app")
    with Receiver(script=lambda req: Reply(503, body="down")) as rec:
        env = make_env(tmp_path, gitlab_sim, rec, POLL_INTERVAL="1", RETRY_ATTEMPTS="2", OUTBOX_RETRY_MAX="2")
        proc = start_daemon(env)
        try:
            expected = []
            for i in range(6):
                expected.append(world.add_pipeline(project.id, status="success",
                                                   jobs=[JobSpec("j", "test", "success", log=f"{i}\n")]).id)
                time.sleep(0.4)
            deadline = time.monotonic() + 20
            store_path = tmp_path / "state" / "state.sqlite3"
            while time.monotonic() < deadline:
                with sqlite3.connect(store_path) as db:
                    queued = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
                if queued == 6:
                    break
                time.sleep(0.2)
            assert queued == 6, "every pipeline waits in the outbox while the receiver is down"
            assert rec.accepted() == []
            attempts_while_down = len(rec.requests)
            rec.set_script(None)  # the receiver comes back
            rec.wait_for(6, timeout=30)
            assert sorted(d["pipeline_id"] for d in documents(rec)) == sorted(expected)
            # backoff: far fewer POSTs than one per pipeline per cycle while it was down
            assert attempts_while_down < 40
        finally:
            code, output = stop_daemon(proc)
    assert code == 0, output
    assert "receiver unavailable" in output and "receiver accepts documents again" in output
    with sqlite3.connect(tmp_path / "state" / "state.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0


def test_receiver_wide_backoff_probes_once_per_poll_interval_and_honours_retry_after(tmp_path: Path) -> None:
    now = [datetime(2026, 1, 1, tzinfo=timezone.utc)]
    config = load_config(None, {"GITLAB_URL": "https://g.example.com", "GITLAB_TOKEN": "glpat-0123456789",
                                "API_POST_ENABLED": "true", "API_POST_URL": "http://127.0.0.1:9/x",
                                "STATE_DIR": str(tmp_path), "POLL_INTERVAL": "60", "OUTBOX_RETRY_MAX": "10m"})
    delivery = Delivery(config, StateStore(tmp_path), ApiPoster(config, RequestLog(tmp_path / "r.log")),
                        clock=lambda: now[0], jitter=lambda: 1.0)
    delays = []
    for _ in range(6):
        delivery._failed(PostResult(503, 1, "", "Service Unavailable"))
        delays.append(None if delivery.backoff_until is None else (delivery.backoff_until - now[0]).total_seconds())
    # one or two failing documents may be their own fault; from the third in a row the receiver is "down",
    # and it is probed once per poll cycle (half of POLL_INTERVAL at most, so the next cycle probes), however
    # long the outage: not once per OUTBOX_RETRY_MAX
    assert delays == [None, None, 30, 30, 30, 30]
    assert delivery.receiver_up is False
    assert [delivery._delay(n, None) for n in (1, 2, 3, 5, 9)] == [60, 120, 240, 600, 600]  # a document's own
    delivery._recovered()
    delivery._failed(PostResult(429, 1, "", "Too Many Requests", retry_after=300))
    assert (delivery.backoff_until - now[0]).total_seconds() == 300  # a 429 holds everything, for its Retry-After
    assert delivery.backing_off()
    now[0] += timedelta(seconds=301)
    assert not delivery.backing_off()


def test_one_poisonous_document_does_not_hold_the_others_back(tmp_path: Path, world: World,
                                                               gitlab_sim: GitLabSimulator) -> None:
    project = world.add_project("team/app")
    poison = world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    with Receiver(script=lambda req: Reply(500, body="crash") if req.json()["pipeline_id"] == poison.id else Reply()) as rec:
        env = make_env(tmp_path, gitlab_sim, rec, RETRY_ATTEMPTS="0", POLL_INTERVAL="1")
        assert env.invoke("run", "--once").exit_code == 1
        later = []
        for i in range(3):
            later.append(world.add_pipeline(project.id, status="success",
                                            jobs=[JobSpec("b", "test", "success", log=f"{i}\n")]).id)
            time.sleep(1.05)  # the poisonous document is due again every cycle or two
            env.invoke("run", "--once")
        assert sorted(d["pipeline_id"] for d in documents(rec)) == sorted(later)
        with sqlite3.connect(tmp_path / "state" / "state.sqlite3") as db:
            rows = db.execute("SELECT pipeline_id, attempts FROM outbox").fetchall()
        assert rows and rows[0][0] == poison.id and rows[0][1] >= 2


def test_orphan_outbox_files_are_removed_and_the_pipeline_shipped_again(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver
) -> None:
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    env = make_env(tmp_path, gitlab_sim, receiver)
    outbox = tmp_path / "state" / "outbox"
    outbox.mkdir(parents=True)
    orphan = outbox / "123-crashed-between-rename-and-commit.json"
    orphan.write_text("{}")
    old = time.time() - 120
    os.utime(orphan, (old, old))
    assert env.invoke("run", "--once").exit_code == 0
    assert not orphan.exists()
    assert [d["pipeline_id"] for d in documents(receiver)] == [pipeline.id]


def test_corrupt_state_store_stops_with_a_clear_error(tmp_path: Path, gitlab_sim: GitLabSimulator) -> None:
    env = make_env(tmp_path, gitlab_sim, None)
    (tmp_path / "state").mkdir(parents=True)
    (tmp_path / "state" / "state.sqlite3").write_bytes(b"\x00garbage" * 512)
    result = env.invoke("run", "--once")
    assert result.exit_code == 3  # a store that cannot be used: systemd does not restart on 3
    assert "state store" in result.output and "corrupt" in result.output and "OPERATIONS.md" in result.output
    assert "Traceback" not in result.output
    assert (tmp_path / "state" / "state.sqlite3").read_bytes().startswith(b"\x00garbage")  # not replaced


def test_second_instance_on_the_same_state_dir_exits_2(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                       receiver: Receiver) -> None:
    env = make_env(tmp_path, gitlab_sim, receiver, POLL_INTERVAL="60")
    proc = start_daemon(env)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "state" / "lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        second = env.invoke("run", "--once")
        assert second.exit_code == 2
        assert f"pid {proc.pid}" in second.output and "already running" in second.output
    finally:
        code, output = stop_daemon(proc)
    assert code == 0, output
    assert env.invoke("run", "--once").exit_code == 0  # the lock is gone with the process


def test_sigterm_during_a_slow_post_exits_0_within_10_seconds(tmp_path: Path, world: World,
                                                              gitlab_sim: GitLabSimulator) -> None:
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    with Receiver(delay=60) as rec:
        env = make_env(tmp_path, gitlab_sim, rec, API_POST_TIMEOUT="120")
        proc = start_daemon(env)
        try:
            deadline = time.monotonic() + 10
            while not rec.requests and time.monotonic() < deadline:
                time.sleep(0.05)
            assert rec.requests, "the POST is in flight"
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code, output = stop_daemon(proc, timeout=12)
            assert time.monotonic() - started < 10
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 0, output
    assert "did not finish within" in output


def test_invalid_token_keeps_polling_with_backoff(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                  receiver: Receiver) -> None:
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    env = make_env(tmp_path, gitlab_sim, receiver, GITLAB_TOKEN="glpat-revoked-0000000", POLL_INTERVAL="1")
    proc = start_daemon(env)
    try:
        time.sleep(3.5)
        assert proc.poll() is None, "no crash loop: the daemon keeps running"
        user_requests = gitlab_sim.counters["projects"]
        assert 2 <= user_requests <= 3  # 1 s, then 2 s, then 4 s apart: not once a second
    finally:
        code, output = stop_daemon(proc)
    assert code == 0
    assert "GitLab rejected the token (401)" in output
    assert "next attempt in 2 s" in output and "next attempt in 4 s" in output
    assert "Traceback" not in output
    assert receiver.accepted() == [] and pipeline.id


@pytest.mark.parametrize("fault", ["429", "bare429", "5xx", "reset_mid_trace", "timeout"])
def test_gitlab_faults_are_survived(fault: str, tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                    receiver: Receiver) -> None:
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, status="success",
                                  jobs=[JobSpec("a", "test", "success", log=LogSpec(300_000, seed=3))])
    erased = world.add_pipeline(project.id, status="failed", jobs=[JobSpec("b", "test", "failed", log="secret\n")])
    world.erase_job(world.pipeline_jobs(erased.id)[0].id)
    overrides = {}
    if fault == "429":
        gitlab_sim.inject("pipeline", 429, count=2)
    elif fault == "bare429":
        gitlab_sim.inject("pipeline_jobs", 429, count=2, headers={})
    elif fault == "5xx":
        gitlab_sim.inject(None, 502, count=3)
        gitlab_sim.inject("trace", 503, count=1)
    elif fault == "reset_mid_trace":
        gitlab_sim.faults.drop_trace_after = 100_000
    elif fault == "timeout":
        # GitLab hangs for a while: every request times out until it recovers 2.5 s later
        gitlab_sim.faults.latency = 1.5
        overrides["GITLAB_TIMEOUT"] = "1"
        threading.Timer(2.5, lambda: setattr(gitlab_sim.faults, "latency", 0.0)).start()
    env = make_env(tmp_path, gitlab_sim, receiver, **overrides)
    result = env.invoke("run", "--once")
    assert result.exit_code == 0, result.output
    docs = {d["pipeline_id"]: d for d in documents(receiver)}
    assert set(docs) == {pipeline.id, erased.id}
    assert docs[pipeline.id]["jobs"][0]["log_content"] == LogSpec(300_000, seed=3).read_all().decode("utf-8", "replace")
    assert docs[erased.id]["jobs"][0]["log_content"] == ""  # an erased log is empty, not an error
