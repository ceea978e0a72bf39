"""Second adversarial review of issue 11's change: each test proves one defect found in the newest code (retry list,
cursor, upgrade from an older STATE_DIR). Real shipper, GitLab simulator and receiver over loopback HTTP, one
virtual clock for GitLab (its ``Date`` header) and the shipper.

These tests fail on the code as reviewed; they are marked ``xfail(strict=True)`` with the cause, so the suite
stays green and each flips to a failure (XPASS) the moment its fix lands, when its marker is to be removed.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest
import urllib3.response

from gitlab_log_shipper.config import load_config
from gitlab_log_shipper.shipper import FAILED, SHIPPED, Shipper
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World
from gitlab_log_shipper.source import GitLabSource
from gitlab_log_shipper.state import StateStore
from gitlab_log_shipper.timeutil import format_ts

from shipper_helpers import ManualClock, documents, make_env

T0 = datetime(2026, 11, 2, 9, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def world(clock: ManualClock) -> World:
    return World(clock=clock)


@pytest.fixture
def sim(world: World) -> Iterator[GitLabSimulator]:
    with GitLabSimulator(world) as simulator:
        yield simulator


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as rec:
        yield rec


def _shipper(tmp: Path, sim: GitLabSimulator, receiver: Receiver | None, clock: ManualClock, **overrides: str) -> Shipper:
    values = make_env(tmp, sim, receiver, **{"INITIAL_LOOKBACK": "1h", "POLL_OVERLAP": "5m", "POLL_INTERVAL": "60",
                                             "RETRY_ATTEMPTS": "0", **overrides}).values
    return Shipper(load_config(None, values), clock=clock)


def _posts_of(receiver: Receiver, pipeline_id: int) -> int:
    return sum(1 for doc in documents(receiver) if doc["pipeline_id"] == pipeline_id)


def _blocked_output(tmp: Path) -> Path:
    blocked = tmp / "not-a-folder"
    blocked.write_text("a file where the output folder should be")
    return blocked


# -- 1. dual mode: the retry entry is re-created from scratch on every attempt --------------------------------


@pytest.mark.xfail(strict=True, reason="review2-1: delivery.send's record_shipped clears the retry entry before "
                                       "_keep_for_retry counts the attempt, so attempts stay 1 and the backoff never starts")
def test_dual_mode_file_failure_backs_off_instead_of_posting_every_cycle(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: ManualClock) -> None:
    """In dual mode a pipeline whose files cannot be written is POSTed (case 13) and kept on the retry list (first
    review). But ``_deliver`` → ``Delivery.send`` → ``StateStore.record_shipped`` deletes the retry entry, and only then
    ``_keep_for_retry`` reads it (``before`` is None) and inserts a fresh one: attempts=1, first_failed_at=now, delay 0.
    With a LOG_OUTPUT_DIR that stays broken, the whole document is POSTed again on every cycle, for ever, and
    `status` shows "1 attempt(s)" failing "since" the last cycle (the age metric never grows, so no alert fires)."""
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("build", log="ok\n")])
    blocked = _blocked_output(tmp_path)
    shipper = _shipper(tmp_path, sim, receiver, clock, API_POST_SAVE_TO_FILE="true", LOG_OUTPUT_DIR=str(blocked / "out"))
    try:
        for _ in range(6):
            report = shipper.run_cycle()
            assert report.counts[SHIPPED] == 0
            clock.advance(minutes=1)
        entry = shipper.state.retry_entry(project.id, pipeline.id)
    finally:
        shipper.close()
    assert entry is not None
    # the next two cycles, then after POLL_INTERVAL (60 s), 120 s, ...: 5 attempts in these 6 cycles, not 6
    assert (entry.attempts, entry.first_failed_at) == (5, format_ts(T0)), entry
    assert _posts_of(receiver, pipeline.id) == 5


# -- 2. `post --pipeline-id` takes a dual-mode pipeline off the retry list although its files still failed --------


@pytest.mark.xfail(strict=True, reason="review2-2: post_pipeline does not keep a FAILED result on the retry list, "
                                       "and record_shipped (the API took it) already removed the entry")
def test_post_by_hand_in_dual_mode_keeps_the_pipeline_on_the_retry_list_while_its_files_fail(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: ManualClock) -> None:
    """OPERATIONS.md and `status` tell the operator to retry a pipeline by hand with `post --pipeline-id`. In dual
    mode, with the output folder still broken, that POST is accepted, ``record_shipped`` clears the retry entry, the
    command reports the file failure (exit 1) but nothing keeps the pipeline for another attempt: once the folder
    works again its files are never written (the first review's loss, reached through `post`)."""
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("build", log="ok\n")])
    blocked = _blocked_output(tmp_path)
    output = blocked / "out"
    shipper = _shipper(tmp_path, sim, receiver, clock, API_POST_SAVE_TO_FILE="true", LOG_OUTPUT_DIR=str(output))
    try:
        shipper.run_cycle()
        assert shipper.state.retry_entry(project.id, pipeline.id) is not None
        clock.advance(minutes=1)
        result = shipper.post_pipeline(pipeline.id, None)  # the folder is still broken
        assert result.outcome == FAILED
        kept = shipper.state.retry_entry(project.id, pipeline.id)
        blocked.unlink()  # the operator fixes the folder
        for _ in range(3):
            clock.advance(minutes=1)
            shipper.run_cycle()
    finally:
        shipper.close()
    written = sorted(p.name for p in output.glob("*/pipeline_*")) if output.exists() else []
    assert kept is not None and written == [f"pipeline_{pipeline.id}"], (kept, written)


# -- 3. run --once exits 0 while a pipeline waits on the retry list ---------------------------------------------


@pytest.mark.xfail(strict=True, reason="review2-3: CycleReport.complete counts only retry entries this cycle looked "
                                       "at; one not due and out of the listing window is invisible to `run --once`")
def test_run_once_is_not_complete_while_a_pipeline_waits_for_its_retry(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: ManualClock) -> None:
    """`run --once` exits ``0 if report.complete`` ("0 when every pipeline was delivered", its --help). A pipeline
    that keeps failing is counted (FAILED, or RETRY_WAITING while its row is still listed) only in the cycles that
    touch it; once its row left the listing window (POLL_OVERLAP after the cursor) and its next attempt is not due,
    ``poll_project`` does not look at it and the cycle reports complete: a cron job sees exit 0 while a pipeline has
    not been shipped for an hour."""
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("build", log="ok\n")])
    sim.inject("pipeline_jobs", 403, count=1000)  # the jobs of this pipeline cannot be read, every time
    shipper = _shipper(tmp_path, sim, receiver, clock)
    lies = []
    try:
        for minute in range(15):
            report = shipper.run_cycle()
            waiting = shipper.state.retries(project.id)
            if waiting and report.complete:
                lies.append((minute, waiting[0].attempts, waiting[0].next_attempt_at))
            clock.advance(minutes=1)
    finally:
        shipper.close()
    assert _posts_of(receiver, pipeline.id) == 0
    assert not lies, f"cycles reported complete (exit 0) while pipeline {pipeline.id} waited: {lies}"


# -- 4. backfill of a project the configuration does not poll: its failures are never retried -------------------


@pytest.mark.xfail(strict=True, reason="review2-4: backfill puts failures on the retry list, which only poll_project "
                                       "of a configured project works off")
def test_backfill_failure_in_an_unconfigured_project_is_retried(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: ManualClock) -> None:
    """``Shipper.backfill``: "What fails goes to the retry list, which the daemon works off". `backfill --project`
    accepts any project (``resolve_projects`` applies no filter, by design); the daemon polls only GITLAB_PROJECTS,
    so the entry of another project is never tried again, and `status` says "tried again on their own backoff" for
    ever."""
    polled = world.add_project("team/polled")
    other = world.add_project("team/other")
    pipeline = world.add_pipeline(other.id, jobs=[JobSpec("build", log="ok\n")])
    clock.advance(minutes=10)
    shipper = _shipper(tmp_path, sim, receiver, clock, GITLAB_PROJECTS=polled.path_with_namespace)
    try:
        sim.inject("pipeline_jobs", 403, count=1)  # one transient refusal during the backfill
        report = shipper.backfill(T0 - timedelta(hours=1), clock(), shipper.resolve_projects([str(other.id)]))
        assert report.counts[FAILED] == 1 and shipper.state.retry_entry(other.id, pipeline.id) is not None
        for _ in range(5):
            clock.advance(minutes=2)
            shipper.run_cycle()
        entry = shipper.state.retry_entry(other.id, pipeline.id)
    finally:
        shipper.close()
    assert _posts_of(receiver, pipeline.id) == 1, f"never retried; still on the retry list: {entry}"


# -- 5. a project removed from the configuration keeps its retry entries (and the age alert) for ever -------------


@pytest.mark.xfail(strict=True, reason="review2-5: retry entries of projects that are no longer polled are never "
                                       "dropped, nor told apart in status/metrics")
def test_retry_entries_of_a_project_no_longer_configured_do_not_stay_for_ever(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: ManualClock) -> None:
    """A project whose pipeline kept failing is taken out of GITLAB_PROJECTS (or LOG_EXCLUDE_PROJECTS, SHARD). Its
    entry stays in ``retries`` for ever: `status` keeps listing it as "tried again on their own backoff" and
    ``pipelines_retrying_oldest_age_seconds`` grows without end, so the alert OPERATIONS.md suggests cannot be
    cleared except by editing the SQLite file."""
    kept = world.add_project("team/kept")
    dropped = world.add_project("team/dropped")
    pipeline = world.add_pipeline(dropped.id, jobs=[JobSpec("build", log="ok\n")])
    sim.inject("pipeline_jobs", 403, count=1)
    first = _shipper(tmp_path, sim, receiver, clock,
                     GITLAB_PROJECTS=f"{kept.path_with_namespace},{dropped.path_with_namespace}")
    try:
        first.run_cycle()
        assert first.state.retry_entry(dropped.id, pipeline.id) is not None
    finally:
        first.close()
    later = _shipper(tmp_path, sim, receiver, clock, GITLAB_PROJECTS=kept.path_with_namespace)
    try:
        for _ in range(3):
            clock.advance(hours=2)
            later.run_cycle()
        left = later.state.retries()
    finally:
        later.close()
    assert not left, f"still 'retrying' a project that is not polled any more: {left}"


# -- 6. upgrade: a cursor that an older version pushed ahead, no longer ahead when the new version starts ---------


@pytest.mark.xfail(strict=True, reason="review2-6: only a cursor still ahead of GitLab's Date is re-listed; one that "
                                       "was ahead when written but is past by the upgrade keeps its hole")
def test_upgrade_from_a_store_whose_cursor_an_old_version_pushed_into_the_future(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: ManualClock) -> None:
    """Commit ea99c49 moved the cursor to the newest row's updated_at (case 3): a node whose clock ran 10 min ahead
    left cursor = last poll + 10 min. The new version re-lists only when ``cursor - POLL_OVERLAP`` is still ahead of
    GitLab's Date. Upgraded 12 minutes after the last old poll (a package upgrade, a reboot), the first window starts
    at last poll + 5 min and the next ones later: what finished between the old version's last poll and 5 minutes
    before the upgrade (here: 2 minutes after that poll) is never shipped. The store
    knows better: every ``pipelines.touched_at`` (and the last cycle in ``stats``) was stamped by the local clock,
    at or before that last poll."""
    project = world.add_project("team/app")
    last_old_poll = T0
    state_dir = tmp_path / "state"
    old = StateStore(state_dir)  # what ea99c49 left: the same tables, a cursor ahead of its last poll
    try:
        seen = world.add_pipeline(project.id, jobs=[JobSpec("build", log="ok\n")])
        old.mark_handled(project.id, seen.id, "success", format_ts(last_old_poll), last_old_poll)
        old.set_cursor(project.id, last_old_poll + timedelta(minutes=10))
    finally:
        old.close()
    clock.advance(minutes=2)
    missed = world.add_pipeline(project.id, jobs=[JobSpec("build", log="finished while the old version was stopped\n")])
    clock.advance(minutes=10)  # the new version starts at last poll + 12 min
    shipper = _shipper(tmp_path, sim, receiver, clock, GITLAB_PROJECTS=project.path_with_namespace)
    try:
        for _ in range(3):
            shipper.run_cycle()
            clock.advance(minutes=1)
    finally:
        shipper.close()
    assert _posts_of(receiver, missed.id) == 1, f"pipeline {missed.id} (finished 2 min after the last old poll) lost"


# -- 7. upgrade: a skipped or manual pipeline the old version shipped is shipped again under a new key by backfill --


@pytest.mark.xfail(strict=True, reason="review2-7: finish_of gives skipped/manual pipelines 'status|jobs:<digest>'; "
                                       "the 'skipped|' / 'manual|' finishes ea99c49 recorded never match it")
def test_backfill_after_the_upgrade_does_not_ship_again_what_the_old_version_shipped(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: ManualClock) -> None:
    """ea99c49 keyed every finish ``status|finished_at``: a skipped pipeline (no finished_at on GitLab) shipped by its
    daemon was recorded as ``skipped|``. The new ``finish_of`` says ``skipped|jobs:<digest>``, so `backfill` (which
    skips "finishes shipped before") ships every such pipeline of the window again, under another Idempotency-Key:
    the receiver cannot tell it is the same document. (The daemon is spared only because the list row is unchanged.)"""
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, status="skipped", jobs=[JobSpec("build", status="skipped")])
    old = StateStore(tmp_path / "state")
    try:  # what ea99c49's daemon recorded for it
        old.record_shipped(project.id, pipeline.id, "skipped|", "key-of-ea99c49", "sent", clock(),
                           ("skipped", format_ts(pipeline.updated_at)))
    finally:
        old.close()
    clock.advance(minutes=10)
    shipper = _shipper(tmp_path, sim, receiver, clock, GITLAB_PROJECTS=project.path_with_namespace)
    try:
        shipper.run_cycle()
        assert _posts_of(receiver, pipeline.id) == 0  # the daemon: its row is unchanged
        shipper.backfill(T0 - timedelta(hours=1), clock(), shipper.resolve_projects([str(project.id)]))
    finally:
        shipper.close()
    assert _posts_of(receiver, pipeline.id) == 0, "shipped again under a new Idempotency-Key"


# -- 8. the job-log deadline can shut down a connection another download is using by then -----------------------


@pytest.mark.xfail(strict=True, reason="review2-8: Watch.fire for a response checks raw._connection, which urllib3's "
                                       "release_conn clears only after _put_conn handed the connection to the pool")
def test_a_log_deadline_never_shuts_a_connection_another_download_took_from_the_pool(
        tmp_path: Path, world: World, sim: GitLabSimulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fetch_trace`` arms two watches: one on the pooled connection (disarmed in ``DeadlinePool._put_conn``, under
    the watchdog's lock, before the connection is back in the pool: safe) and one on the response (``Watch.raw``).
    The second fires "only while the response still holds its connection", tested as ``raw._connection is
    self._connection``. But urllib3's ``HTTPResponse.release_conn`` is ``self._pool._put_conn(conn)`` *then*
    ``self._connection = None`` (urllib3 2.x response.py): in between, the connection is in the pool, another worker
    may take it (the pool is LIFO: the next request gets exactly this one), and a deadline that passes then makes the
    watchdog call ``raw.shutdown()`` on the socket that worker is reading. The window is a few bytecodes wide in
    production; here the first download is held in it (only the timing is changed, no request is faked) so that the
    deadline passes there. The other download's stream breaks and is fetched again (or fails), though nothing was
    wrong with it."""
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("a", log="short log\n"),
                                                    JobSpec("b", log="".join(f"line {i}\n" for i in range(40)))])
    job_a, job_b = pipeline.job_ids
    sim.faults.update(trace_trickle=(16, 0.05), trace_trickle_jobs=frozenset({job_b}))  # b takes ~1.5 s to send
    source = GitLabSource(load_config(None, make_env(tmp_path, sim, None, RETRY_ATTEMPTS="0").values))
    in_window, b_started = threading.Event(), threading.Event()
    original = urllib3.response.HTTPResponse.release_conn

    def release_conn_slowly(self: urllib3.response.HTTPResponse) -> None:
        if threading.current_thread().name != "download-a" or in_window.is_set() or not self._connection:
            return original(self)
        self._pool._put_conn(self._connection)  # as urllib3 does: back in the pool first ...
        in_window.set()
        b_started.wait(5)
        time.sleep(1.0)  # ... the deadline (0.5 s) passes while the response still names the connection ...
        self._connection = None  # ... and only then forgets it

    monkeypatch.setattr(urllib3.response.HTTPResponse, "release_conn", release_conn_slowly)
    errors: list[BaseException] = []

    def download_a() -> None:
        try:
            with open(tmp_path / "a.log", "wb") as out:
                source.fetch_trace(project.id, job_a, out, timeout=0.5)
        except Exception as exc:  # noqa: BLE001 - a's own fate is not what this test is about
            errors.append(exc)

    a = threading.Thread(target=download_a, name="download-a")
    try:
        sim.reset_counters()
        a.start()
        assert in_window.wait(5)
        b_started.set()
        with open(tmp_path / "b.log", "wb") as out:  # no deadline of its own; takes a's connection from the pool
            source.fetch_trace(project.id, job_b, out, timeout=None)
        a.join(10)
    finally:
        source.close()
    assert (tmp_path / "b.log").read_text() == "".join(f"line {i}\n" for i in range(40))
    assert sim.counters["trace"] == 2, f"b's download was broken by a's deadline and fetched again ({sim.counters['trace']} trace requests)"
