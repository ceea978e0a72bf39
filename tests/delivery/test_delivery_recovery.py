"""Delivery that survives its side channels and recovers fast (issue 11, cases 12 and 18).

* Case 12: ``api-requests.log`` is a side channel. A failed write after an accepted POST must not turn the
  delivery into a failure (the pipeline would be POSTed again on every cycle).
* Case 18: after a receiver outage the backlog is delivered within two poll intervals of the receiver's
  return, concurrently; while it is down about one probe per poll interval reaches it.

Real HTTP to the recording receiver (``sim/receiver.py``), an injected clock for the cycles.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from gitlab_log_shipper.config.settings import load_config
from gitlab_log_shipper.delivery.outbox import QUEUED, SENT, Delivery, DocumentInfo
from gitlab_log_shipper.delivery.poster import ApiPoster
from gitlab_log_shipper.delivery.request_log import ManagedRequestLog
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver, RecordedRequest, Reply
from gitlab_log_shipper.sim.world import JobSpec, World
from gitlab_log_shipper.state.store import StateStore

from shipper_helpers import documents, make_env

POLL = 60.0
BACKLOG = 60


# -- case 12: the request log is a side channel --------------------------------------------------


def break_file(path: Path) -> None:
    """Make ``path`` unwritable even for root (tests run as root, so permission bits stop nothing): a
    folder where the file should be. Every append then fails with EISDIR, as a root-owned file fails
    for the service user."""
    if path.exists():
        path.unlink()
    path.mkdir(parents=True)


def test_an_unwritable_request_log_does_not_undo_an_accepted_post(tmp_path: Path, world: World,
                                                                 gitlab_sim: GitLabSimulator) -> None:
    project = world.add_project("team/app")
    queued = world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    with Receiver(script=[Reply(503, body="down")]) as rec:
        env = make_env(tmp_path, gitlab_sim, rec, RETRY_ATTEMPTS="0")
        first = env.invoke("run", "--once")
        assert first.exit_code == 1 and "queued=1" in first.output, first.output  # waits in the outbox
        break_file(env.requests_log)
        fresh = world.add_pipeline(project.id, status="success", jobs=[JobSpec("b", "test", "success", log="b\n")])
        time.sleep(1.1)  # the queued document is due again (POLL_INTERVAL=1)
        second = env.invoke("run", "--once")
        assert second.exit_code == 0, second.output
        assert "outbox_delivered=1" in second.output and "shipped=1" in second.output, second.output
        assert sorted(d["pipeline_id"] for d in documents(rec)) == sorted([queued.id, fresh.id])
        # loud, but once per distinct problem, not once per POST
        errors = [line for line in second.output.splitlines() if " ERROR " in line and "api-requests.log" in line]
        assert len(errors) == 1, second.output
        assert "not logged" in errors[0] and "Is a directory" in errors[0]
        posts = len(rec.requests)
        third = env.invoke("run", "--once")
        assert third.exit_code == 0, third.output
        assert len(rec.requests) == posts, "an accepted document is never POSTed again"


def test_request_log_failures_are_counted_and_reported_once_per_problem(tmp_path: Path, caplog) -> None:
    path = tmp_path / "logs" / "api-requests.log"
    log = ManagedRequestLog(path, max_bytes=10_000, backups=1)
    log.write("line 1")
    break_file(path)
    with caplog.at_level(logging.ERROR):
        for n in range(50):
            log.write(f"lost {n}")
    assert log.write_failures == 50
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "Is a directory" in errors[0].getMessage()
    path.rmdir()  # repaired: lines are written again, and the recovery is said
    caplog.clear()
    with caplog.at_level(logging.INFO):
        log.write("line 2")
    assert path.read_text("utf-8") == "line 2\n"
    assert any("written again" in r.getMessage() and "50" in r.getMessage() for r in caplog.records)
    # a different problem (the rotated backup cannot be replaced) is reported again
    path.write_text("x" * 20_000)
    break_file(path.with_name("api-requests.log.1"))
    (path.with_name("api-requests.log.1") / "keep").write_text("so os.replace cannot overwrite it")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        log.write("line 3")
        log.write("line 4")
    assert log.write_failures == 52
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1


# -- case 18: recovery after a receiver outage ---------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def make_delivery(tmp_path: Path, url: str, clock: Clock, **env: str) -> Delivery:
    config = load_config(None, {
        "GITLAB_URL": "https://gitlab.example.com", "GITLAB_TOKEN": "glpat-0123456789",
        "API_POST_ENABLED": "true", "API_POST_URL": url, "STATE_DIR": str(tmp_path / "state"),
        "LOG_DIR": str(tmp_path / "logs"), "POLL_INTERVAL": str(POLL), "RETRY_ATTEMPTS": "0", "RETRY_DELAY": "0",
        "CONCURRENCY": "8", **env,
    })
    poster = ApiPoster(config, ManagedRequestLog.for_config(config), clock=clock)
    return Delivery(config, StateStore(config.state_dir), poster, clock=clock, jitter=lambda: 1.0)


def new_document(delivery: Delivery, n: int) -> tuple[Path, DocumentInfo]:
    spool = delivery.config.state_dir / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    path = spool / f"document-{n}.json"
    path.write_text(f'{{"pipeline_id": {1000 + n}, "project_id": 7, "jobs": []}}')
    return path, DocumentInfo(7, 1000 + n, f"success|2026-03-01T12:00:{n % 60:02d}.000Z", f"key-{n:03d}")


def queue_backlog(delivery: Delivery, rec: Receiver) -> list[str]:
    """60 new documents while the receiver is down: the first few are tried, the rest queued at once."""
    keys = []
    for n in range(BACKLOG):
        document, info = new_document(delivery, n)
        assert delivery.send(document, info, None)[0] == QUEUED
        keys.append(info.idempotency_key)
    assert len(rec.requests) <= 3, "once the receiver looks down, new documents are queued without a try"
    return keys


class InFlight:
    """A receiver script that answers 200 after ``latency`` and records how many POSTs overlapped."""

    def __init__(self, latency: float = 0.02) -> None:
        self.latency = latency
        self.current = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, request: RecordedRequest) -> Reply:
        with self.lock:
            self.current += 1
            self.most = max(self.most, self.current)
        time.sleep(self.latency)
        with self.lock:
            self.current -= 1
        return Reply()


def test_while_the_receiver_is_down_about_one_probe_per_poll_interval_reaches_it(tmp_path: Path) -> None:
    clock = Clock()
    with Receiver(script=lambda request: Reply(503, body="down")) as rec:
        delivery = make_delivery(tmp_path, rec.url, clock)
        queue_backlog(delivery, rec)
        per_cycle = []
        for cycle in range(20):  # 20 poll intervals of an outage
            clock.advance(POLL)
            before = len(rec.requests)
            delivery.drain(POLL)
            document, info = new_document(delivery, 100 + cycle)  # fresh pipelines of the cycle
            assert delivery.send(document, info, None)[0] == QUEUED
            per_cycle.append(len(rec.requests) - before)
    # not one per document, and not one per OUTBOX_RETRY_MAX (15 min): one per poll interval
    assert per_cycle == [1] * 20, per_cycle
    assert delivery.state.outbox_stats()[0] == BACKLOG + 20


def test_after_an_outage_the_backlog_is_delivered_within_two_poll_intervals(tmp_path: Path) -> None:
    clock = Clock()
    script = InFlight()
    with Receiver(script=lambda request: Reply(503, body="down")) as rec:
        delivery = make_delivery(tmp_path, rec.url, clock)
        keys = queue_backlog(delivery, rec)
        for _ in range(20):
            clock.advance(POLL)
            delivery.drain(POLL)
        clock.advance(POLL * 0.3)
        returned = clock.now
        rec.set_script(script)  # the receiver is back
        first_delivered = None
        cycles = 0
        while delivery.state.outbox_stats()[0] and cycles < 30:
            clock.advance(POLL)
            cycles += 1
            started = time.monotonic()
            counts = delivery.drain(POLL)
            took = time.monotonic() - started
            if first_delivered is None and keys[0] in {r.idempotency_key for r in rec.accepted()}:
                first_delivered = clock.now
                print(f"\n[bench] backlog of {BACKLOG}: {counts[SENT]} delivered by the first drain after the "
                      f"receiver's return, in {took:.2f} s wall time (receiver latency {script.latency * 1000:.0f} ms, "
                      f"at most {script.most} POSTs in flight)")
        assert first_delivered is not None, "the backlog was never delivered"
        assert first_delivered - returned <= timedelta(seconds=2 * POLL)
        assert delivery.state.outbox_stats()[0] == 0
        assert cycles == 1, "after the first accepted document everything waiting is due at once"
        assert {r.idempotency_key for r in rec.accepted()} == set(keys)  # keys unchanged by the outbox
        assert 1 < script.most <= 8, "drained with CONCURRENCY POSTs at a time"


def test_a_fresh_process_probes_a_backlog_whose_backoff_has_grown(tmp_path: Path) -> None:
    """``run --once`` from cron: a new process does not know that the receiver was down; it probes once and
    then sends everything, whatever the documents' own backoff says."""
    clock = Clock()
    with Receiver(script=lambda request: Reply(503, body="down")) as rec:
        first = make_delivery(tmp_path, rec.url, clock)
        queue_backlog(first, rec)
        for _ in range(10):
            clock.advance(POLL)
            first.drain(POLL)
        # every document has been tried and waits on its own backoff (as after a long run of 5xx answers)
        for entry in first.state.outbox():
            first.state.outbox_attempt_failed(entry.idempotency_key, 503, "Service Unavailable",
                                              clock.now + timedelta(seconds=first.config.outbox_retry_max))
        assert first.state.outbox(due_at=clock.now + timedelta(seconds=POLL)) == []
        first.poster.close()
        first.state.close()
        rec.set_script(InFlight())
        clock.advance(POLL)
        later = make_delivery(tmp_path, rec.url, clock)
        counts = later.drain(POLL)
        assert counts[SENT] == BACKLOG and later.state.outbox_stats()[0] == 0


def test_benchmark_draining_60_queued_documents(tmp_path: Path) -> None:
    """Benchmark-style: the wall time to drain 60 documents that are all due (no timed assertion)."""
    clock = Clock()
    script = InFlight()
    with Receiver(script=lambda request: Reply(503, body="down")) as rec:
        delivery = make_delivery(tmp_path, rec.url, clock)
        queue_backlog(delivery, rec)
        rec.set_script(script)
        clock.advance(delivery.config.outbox_retry_max + POLL)  # every document is due, whatever its backoff
        started = time.monotonic()
        calls = 0
        while delivery.state.outbox_stats()[0] and calls < 100:
            delivery.drain(POLL)
            calls += 1
        took = time.monotonic() - started
        print(f"\n[bench] {BACKLOG} queued documents drained in {took:.2f} s wall time, {calls} drain call(s), "
              f"at most {script.most} POST(s) in flight (receiver latency {script.latency * 1000:.0f} ms)")
        assert delivery.state.outbox_stats()[0] == 0
        assert len(rec.accepted()) == BACKLOG
