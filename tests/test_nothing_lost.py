"""Issue 11, "Nothing lost, for real": one regression test per loss path that adversarial testing found.

Each runs the real shipper in-process against the GitLab simulator and the receiver over loopback HTTP, with one
virtual clock for GitLab (``World(clock=...)``, whose ``Date`` header follows it) and for the shipper.
The two adversarial reviews of the change added the tests at the end. Interleavings inside a cycle (a deletion while page 2 is fetched, a retry between the pipeline GET and the jobs
GET) use the simulator's request hook (``GitLabSimulator.on_request``); manual plays and rows stamped by a node whose
clock runs ahead use the World's own mutations (``play_job``, ``finish_job``, ``skew=``).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
import urllib3.response

from gitlab_log_shipper.config.settings import load_config
from gitlab_log_shipper.errors import GitLabSourceError
from gitlab_log_shipper.gitlab.rest import GitLabSource
from gitlab_log_shipper.service.status import collect, render
from gitlab_log_shipper.shipper import CHANGED, FAILED, SHIPPED, Shipper
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World
from gitlab_log_shipper.state.store import StateStore
from gitlab_log_shipper.timeutil import format_ts

from shipper_helpers import ManualClock, by_pipeline, documents, make_env, within

T0 = datetime(2026, 11, 2, 9, 0, 0, tzinfo=timezone.utc)


Clock = ManualClock


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def world(clock: Clock) -> World:
    return World(clock=clock)


@pytest.fixture
def sim(world: World) -> Iterator[GitLabSimulator]:
    with GitLabSimulator(world) as simulator:
        yield simulator


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as rec:
        yield rec


def _shipper(tmp: Path, sim: GitLabSimulator, receiver: Receiver | None, clock: Clock, **overrides: str) -> Shipper:
    values = make_env(tmp, sim, receiver, **{"INITIAL_LOOKBACK": "1h", "POLL_OVERLAP": "5m", "POLL_INTERVAL": "60",
                                             "RETRY_ATTEMPTS": "0", **overrides}).values
    return Shipper(load_config(None, values), clock=clock)


def _cycle(tmp: Path, sim: GitLabSimulator, receiver: Receiver | None, clock: Clock, **overrides: str):  # type: ignore[no-untyped-def]
    shipper = _shipper(tmp, sim, receiver, clock, **overrides)
    try:
        return shipper.run_cycle()
    finally:
        shipper.close()


def _job_logs(doc: dict[str, Any]) -> dict[str, str]:
    return {job["job_name"]: job["log_content"] for job in doc["jobs"]}


# -- 1. offset paging and deletions ------------------------------------------------------------------


def test_a_deletion_while_page_two_is_fetched_skips_no_row(tmp_path: Path, world: World, sim: GitLabSimulator,
                                                           receiver: Receiver, clock: Clock) -> None:
    project = world.add_project("team/busy")
    ids = []
    for _ in range(230):  # three pages of 100
        ids.append(world.add_pipeline(project.id, jobs=[JobSpec("build", log="ok\n")]).id)
        clock.advance(seconds=1)
    lists = []

    def delete_first_while_paging(endpoint: str, args: list[str], params: dict[str, str]) -> None:
        if endpoint == "pipelines":
            lists.append(params)
            if len(lists) == 2:  # page 2 is being fetched: auto-cleanup deletes the oldest pipeline
                world.delete_pipeline(ids[0])

    sim.on_request(delete_first_while_paging)
    report = _cycle(tmp_path, sim, receiver, clock, INITIAL_LOOKBACK="1d")
    shipped = set(by_pipeline(documents(receiver)))
    assert len(lists) >= 3
    assert shipped == set(ids[1:]) or shipped == set(ids), f"missing: {sorted(set(ids[1:]) - shipped)}"
    assert report.counts[SHIPPED] == len(shipped)


def test_a_deletion_while_the_one_instant_pass_fetches_page_two_skips_no_row(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: Clock) -> None:
    project = world.add_project("team/bulk")
    # 130 pipelines whose rows carry one updated_at (a bulk update; here: created at one instant), an hour ago
    ids = [world.add_pipeline(project.id, jobs=[JobSpec("build", log="ok\n")]).id for _ in range(130)]
    clock.advance(hours=1)

    def delete_first_while_paging_the_instant(endpoint: str, args: list[str], params: dict[str, str]) -> None:
        if endpoint == "pipelines" and params.get("order_by") == "id" and params.get("page") == "2":
            if world.live_pipeline(ids[0]) is not None:
                world.delete_pipeline(ids[0])

    sim.on_request(delete_first_while_paging_the_instant)
    _cycle(tmp_path, sim, receiver, clock, INITIAL_LOOKBACK="1d")
    clock.advance(minutes=1)
    _cycle(tmp_path, sim, receiver, clock, INITIAL_LOOKBACK="1d")  # the instant is outside POLL_OVERLAP by now
    shipped = set(by_pipeline(documents(receiver)))
    assert shipped >= set(ids[1:]), f"missing: {sorted(set(ids[1:]) - shipped)}"


# -- 2. idle projects --------------------------------------------------------------------------------


def test_an_idle_project_keeps_its_window_across_a_downtime_longer_than_the_lookback(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: Clock) -> None:
    project = world.add_project("team/quiet")
    _cycle(tmp_path, sim, receiver, clock)  # nothing there: the project must still remember this poll
    shipper = _shipper(tmp_path, sim, receiver, clock)
    assert shipper.state.get_cursor(project.id) is not None
    shipper.close()
    clock.advance(minutes=30)  # the shipper is down from here ...
    late = world.add_pipeline(project.id, jobs=[JobSpec("build", log="late\n")])
    clock.advance(hours=3)  # ... for longer than INITIAL_LOOKBACK + POLL_OVERLAP
    _cycle(tmp_path, sim, receiver, clock)
    assert late.id in by_pipeline(documents(receiver))


def test_a_project_created_while_the_shipper_is_down_keeps_what_finished_meanwhile(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: Clock) -> None:
    world.add_project("team/old")
    _cycle(tmp_path, sim, receiver, clock)  # the shipper polls the token's projects, then is down from here ...
    clock.advance(minutes=10)
    new = world.add_project("team/new")
    meanwhile = world.add_pipeline(new.id, jobs=[JobSpec("build", log="meanwhile\n")])
    clock.advance(hours=3)  # ... for longer than INITIAL_LOOKBACK + POLL_OVERLAP
    _cycle(tmp_path, sim, receiver, clock)
    assert meanwhile.id in by_pipeline(documents(receiver))


def test_a_project_whose_first_polls_fail_keeps_its_first_window(tmp_path: Path, world: World, sim: GitLabSimulator,
                                                                 receiver: Receiver, clock: Clock) -> None:
    project = world.add_project("team/flaky")
    early = world.add_pipeline(project.id, jobs=[JobSpec("build", log="early\n")])
    sim.inject("pipelines", 403, count=3)  # the listing fails for three cycles (a 403 is not retried within one)
    for _ in range(3):
        report = _cycle(tmp_path, sim, receiver, clock)
        assert report.project_errors
        clock.advance(minutes=40)
    sim._injections.clear()
    _cycle(tmp_path, sim, receiver, clock)
    assert early.id in by_pipeline(documents(receiver))


# -- 3. clocks that disagree --------------------------------------------------------------------------


def test_a_row_from_the_future_does_not_move_the_cursor_past_gitlabs_now(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    project = world.add_project("team/skewed")
    skewed = world.add_pipeline(project.id, status="running", jobs=[JobSpec("build", "build", "running", log="skewed\n")])
    world.finish_pipeline(skewed.id, "success", skew=timedelta(hours=2))  # on a GitLab node two hours ahead
    assert skewed.updated_at == clock() + timedelta(hours=2)
    with caplog.at_level(logging.WARNING, logger="gitlab_log_shipper"):
        _cycle(tmp_path, sim, receiver, clock)
    assert any("ahead of GitLab's clock" in r.getMessage() for r in caplog.records)
    shipper = _shipper(tmp_path, sim, receiver, clock)
    assert shipper.state.get_cursor(project.id) <= clock()
    shipper.close()
    clock.advance(minutes=20)
    meanwhile = world.add_pipeline(project.id, jobs=[JobSpec("build", log="meanwhile\n")])
    clock.advance(minutes=2)
    _cycle(tmp_path, sim, receiver, clock)
    assert {skewed.id, meanwhile.id} <= set(by_pipeline(documents(receiver)))


# -- 4. backfill and pipelines without finished_at -----------------------------------------------------


def test_backfill_ships_skipped_and_manual_pipelines(tmp_path: Path, world: World, sim: GitLabSimulator,
                                                      receiver: Receiver, clock: Clock) -> None:
    project = world.add_project("team/app")
    skipped = world.add_pipeline(project.id, status="skipped", jobs=[JobSpec("build", status="skipped")])
    manual = world.add_pipeline(project.id, status="manual",
                                jobs=[JobSpec("build", log="built\n"), JobSpec("deploy", "deploy", "manual")])
    done = world.add_pipeline(project.id, status="success", jobs=[JobSpec("build", log="ok\n")])
    # GitLab stamps finished_at only on success/failed/canceled (the World does the same)
    assert skipped.finished_at is None and manual.finished_at is None
    clock.advance(hours=2)
    shipper = _shipper(tmp_path, sim, receiver, clock)
    try:
        report = shipper.backfill(T0 - timedelta(hours=1), clock(), shipper.projects())
    finally:
        shipper.close()
    docs = by_pipeline(documents(receiver))
    assert set(docs) == {skipped.id, manual.id, done.id}, report.summary()
    assert docs[manual.id]["finished_at"] is None and docs[manual.id]["status"] == "manual"


# -- 5. a manual pipeline that blocks again ------------------------------------------------------------


def test_a_pipeline_blocking_on_its_next_manual_job_is_a_new_finish(tmp_path: Path, world: World, sim: GitLabSimulator,
                                                                    receiver: Receiver, clock: Clock) -> None:
    project = world.add_project("team/deploys")
    # blocked on production (a manual job not allowed to fail); staging is an optional manual job
    pipeline = world.add_pipeline(project.id, status="manual", jobs=[
        JobSpec("build", "build", log="built\n"), JobSpec("staging", "deploy", "manual"),
        JobSpec("production", "release", "manual", allow_failure=False)])
    assert pipeline.finished_at is None
    _cycle(tmp_path, sim, receiver, clock)
    clock.advance(minutes=2)
    # staging is played, runs, succeeds; the pipeline blocks on production again
    staging = next(j for j in world.pipeline_jobs(pipeline.id) if j.name == "staging")
    world.set_job_log(staging.id, "deployed to staging\n")
    world.play_job(staging.id)
    clock.advance(seconds=50)
    world.finish_job(staging.id, "success")
    assert pipeline.status == "manual" and pipeline.finished_at is None
    clock.advance(minutes=1)
    _cycle(tmp_path, sim, receiver, clock)
    posts = [r for r in receiver.accepted() if r.json()["pipeline_id"] == pipeline.id]
    assert len(posts) == 2
    keys = {r.headers["Idempotency-Key"] for r in posts}
    assert len(keys) == 2
    assert _job_logs(posts[1].json())["staging"] == "deployed to staging\n"
    _cycle(tmp_path, sim, receiver, clock)  # the same state again: nothing more
    assert len([r for r in receiver.accepted() if r.json()["pipeline_id"] == pipeline.id]) == 2


# -- 6. one job's log is gone, the pipeline is not ----------------------------------------------------


def test_a_404_on_one_job_log_ships_the_pipeline_with_that_log_flagged(tmp_path: Path, world: World,
                                                                       sim: GitLabSimulator, receiver: Receiver,
                                                                       clock: Clock) -> None:
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("build", "build", log="b\n"),
                                                    JobSpec("test", "test", log="t\n")])
    sim.inject("trace", 404, count=1)
    report = _cycle(tmp_path, sim, receiver, clock, CONCURRENCY="1")
    doc = by_pipeline(documents(receiver))[pipeline.id]
    flagged = [job for job in doc["jobs"] if "log_error" in job]
    assert report.counts[SHIPPED] == 1
    assert len(flagged) == 1 and "404" in flagged[0]["log_error"] and flagged[0]["log_content"] == ""
    assert any("log_error" in w or "404" in w for w in doc["warnings"])


def test_a_404_on_a_log_of_a_deleted_pipeline_is_gone(tmp_path: Path, world: World, sim: GitLabSimulator,
                                                      receiver: Receiver, clock: Clock) -> None:
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("build", log="b\n")])

    def delete_on_trace(endpoint: str, args: list[str], params: dict[str, str]) -> None:
        if endpoint == "trace":
            world.delete_pipeline(pipeline.id)

    sim.on_request(delete_on_trace)
    report = _cycle(tmp_path, sim, receiver, clock)
    assert report.counts["gone"] == 1 and not receiver.accepted()


# -- 7. a retry between the pipeline GET and the jobs GET ------------------------------------------------


def test_a_retry_between_the_pipeline_and_the_jobs_get_ships_no_mixed_document(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: Clock) -> None:
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, status="failed", jobs=[JobSpec("build", "build", log="b\n"),
                                                                    JobSpec("test", "test", "failed", log="boom\n")])
    retried = threading.Event()

    def retry_once(endpoint: str, args: list[str], params: dict[str, str]) -> None:
        if endpoint == "pipeline_jobs" and not retried.is_set():
            retried.set()
            world.retry_pipeline(pipeline.id)

    sim.on_request(retry_once)
    report = _cycle(tmp_path, sim, receiver, clock)
    assert report.counts[CHANGED] == 1 and not receiver.accepted(), report.summary()
    clock.advance(minutes=3)
    world.finish_pipeline(pipeline.id, "success")
    clock.advance(minutes=1)
    _cycle(tmp_path, sim, receiver, clock)
    doc = by_pipeline(documents(receiver))[pipeline.id]
    assert doc["status"] == "success"
    assert all(job["status"] in ("success", "failed") for job in doc["jobs"])
    assert all(job["log_content"] for job in doc["jobs"])


# -- 11. a configured project that no longer exists ----------------------------------------------------


def test_a_vanished_project_does_not_stop_the_others(tmp_path: Path, world: World, sim: GitLabSimulator,
                                                     receiver: Receiver, clock: Clock) -> None:
    project = world.add_project("team/alive")
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("build", log="ok\n")])
    shipper = _shipper(tmp_path, sim, receiver, clock, GITLAB_PROJECTS=f"{project.id},team/deleted-last-week")
    try:
        report = shipper.run_cycle()
        from gitlab_log_shipper.service.stats import record_cycle
        record_cycle(shipper.state, shipper.config, report, started=clock(), finished=clock(),
                     rate_limit_remaining=None, projects=shipper.known_projects)
        snapshot = collect(shipper.config, shipper.state, clock())
    finally:
        shipper.close()
    assert pipeline.id in by_pipeline(documents(receiver))
    assert not report.gitlab_unreachable and not report.complete
    assert report.missing_projects and "team/deleted-last-week" in report.missing_projects[0]
    assert any("team/deleted-last-week" in line for line in render(snapshot, clock()))


# -- 13. dual mode: the files fail, the API still gets the document --------------------------------------


def test_dual_mode_posts_even_when_the_file_output_fails(tmp_path: Path, world: World, sim: GitLabSimulator,
                                                          receiver: Receiver, clock: Clock) -> None:
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("build", log="ok\n")])
    blocked = _blocked_output(tmp_path)
    report = _cycle(tmp_path, sim, receiver, clock, API_POST_SAVE_TO_FILE="true", LOG_OUTPUT_DIR=str(blocked / "out"))
    assert pipeline.id in by_pipeline(documents(receiver))
    # delivered to the API; kept on the retry list until its files are written too (test_review_findings)
    assert report.counts[FAILED] == 1 and "delivered to the API, but cannot write files" in report.results[0].reason


# -- 14. the commit-email cache under threads ---------------------------------------------------------


def test_the_commit_email_cache_is_safe_under_threads(tmp_path: Path, world: World, sim: GitLabSimulator,
                                                      clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    import gitlab_log_shipper.gitlab.rest as source_module

    project = world.add_project("team/app")
    shas = [world.add_pipeline(project.id, author_email=f"a{i}@example.com").sha for i in range(40)]
    monkeypatch.setattr(source_module, "COMMIT_CACHE_SIZE", 3)
    config = load_config(None, make_env(tmp_path, sim, None).values)
    source = GitLabSource(config)
    errors: list[BaseException] = []

    def hammer(offset: int) -> None:
        try:
            for i in range(200):
                source.commit_author_email(project.id, shas[(i * 7 + offset) % 5])
        except BaseException as exc:  # noqa: BLE001 - any escape is the defect
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    source.close()
    assert not errors, errors[:3]
    assert len(source._commit_cache) <= 3


# -- 17. a pipeline that fails every cycle -------------------------------------------------------------


def test_a_pipeline_that_keeps_failing_does_not_pin_the_cursor_and_is_retried_with_backoff(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: Clock) -> None:
    project = world.add_project("team/app")
    bad = world.add_pipeline(project.id, jobs=[JobSpec("build", log="bad\n")])
    jobs_requests = []

    def fail_jobs_of_bad(endpoint: str, args: list[str], params: dict[str, str]) -> None:
        if endpoint == "pipeline_jobs" and int(args[1]) == bad.id:
            jobs_requests.append(clock())
            sim.inject("pipeline_jobs", 400)  # not retried within the cycle: the pipeline fails

    sim.on_request(fail_jobs_of_bad)
    cursors = []
    for _ in range(8):
        _cycle(tmp_path, sim, receiver, clock)
        shipper = _shipper(tmp_path, sim, receiver, clock)
        cursors.append(shipper.state.get_cursor(project.id))
        snapshot = collect(shipper.config, shipper.state, clock())
        shipper.close()
        clock.advance(minutes=1)
    assert snapshot["retrying"]["entries"][0]["attempts"] >= 3
    assert cursors[-1] > cursors[0] + timedelta(minutes=5), "the cursor must not wait for the failing pipeline"
    assert snapshot["retrying"]["pipelines"] == 1 and "400" in snapshot["retrying"]["entries"][0]["reason"]
    assert len(jobs_requests) < 8, "retried with backoff, not on every cycle"
    # The fault clears; the pipeline has long left the listing window (cursor - overlap) and still ships.
    sim.remove_request_hook(fail_jobs_of_bad)
    sim._injections.clear()
    clock.advance(hours=2)
    _cycle(tmp_path, sim, receiver, clock)
    assert bad.id in by_pipeline(documents(receiver))
    shipper = _shipper(tmp_path, sim, receiver, clock)
    assert shipper.state.retries() == []
    shipper.close()

# -- found by the review: JOB_LOG_TIMEOUT must cover the answer's head too ------------------------------------------------


class HeadTrickleSimulator(GitLabSimulator):
    """The simulator, but the logs of the jobs in :attr:`slow` answer with a status line and then trickle a header
    line, a byte every 0.2 s (well within GITLAB_TIMEOUT=1), until :attr:`release` is set: a proxy that stalls
    the same way as the body trickles test_trace_limits covers, only one step earlier."""

    def __init__(self, world: World, **kwargs: Any) -> None:
        super().__init__(world, **kwargs)
        self.slow: set[int] = set()
        self.release = threading.Event()

    def _serve_trace(self, handler: Any, args: list[str], rate_headers: dict[str, str]) -> None:
        if int(args[1]) not in self.slow or self.release.is_set():
            super()._serve_trace(handler, args, rate_headers)
            return
        handler.close_connection = True
        try:
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Slow: ")
            handler.wfile.flush()
            while not self.release.wait(0.2):
                handler.wfile.write(b"x")
                handler.wfile.flush()
        except OSError:
            pass  # the client gave up: what the test wants


def test_job_log_timeout_bounds_a_log_whose_headers_trickle(tmp_path: Path, world: World) -> None:
    """``fetch_trace`` promises that JOB_LOG_TIMEOUT "bounds the whole download", but the deadline is only checked
    before the request and the watchdog is armed after ``http_get`` returned, i.e. after the status line and the
    headers came. A GitLab or proxy that trickles its headers holds the trace worker (and, through
    ``_all_results``, the project's poll and the whole cycle) for ever: GITLAB_TIMEOUT is per read."""
    project = world.add_project("team/slow")
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("slow", "test", "success", log="slow log\n")])
    with HeadTrickleSimulator(world) as sim:
        sim.slow.add(pipeline.job_ids[0])
        try:
            config = load_config(None, {**make_env(tmp_path, sim, None).values, "GITLAB_TIMEOUT": "1",
                                        "JOB_LOG_TIMEOUT": "2s"})
            source = GitLabSource(config)
            out = tmp_path / "trace.log"
            try:
                with open(out, "wb") as sink:
                    started = time.monotonic()
                    outcome = within(8, lambda: source.fetch_trace(project.id, pipeline.job_ids[0], sink,
                                                                     timeout=config.job_log_timeout))
                    elapsed = time.monotonic() - started
            finally:
                source.close()
            assert isinstance(outcome, GitLabSourceError), outcome
            assert "JOB_LOG_TIMEOUT" in str(outcome)
            assert elapsed <= 2.0 + config.gitlab_timeout + 1.0, elapsed
        finally:
            sim.release.set()


# -- found by the review: dual mode makes a file-output failure good ---------------------------------------------


def test_dual_mode_writes_the_files_once_the_output_folder_works_again(tmp_path: Path, world: World, clock: Clock,
                                                                       receiver: Receiver) -> None:
    """Issue 11 case 13 made dual mode POST when the files cannot be written; but the pipeline is then recorded
    as shipped (``Shipper._deliver``: ``delivery.send`` → SHIPPED, the finish recorded, the retry entry cleared),
    so its files are never written: once the folder works again the row is UNCHANGED and skipped. In dual mode
    the files are an output the operator asked for (OPERATIONS.md calls them the backup): one full disk or
    wrong owner for one cycle loses them for good, silently (the cycle even counts as complete, exit 0)."""
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("build", log="ok\n")])
    blocked = _blocked_output(tmp_path)
    output = blocked / "out"
    with GitLabSimulator(world) as sim:
        values = make_env(tmp_path, sim, receiver, INITIAL_LOOKBACK="1h", POLL_OVERLAP="5m", POLL_INTERVAL="60",
                          API_POST_SAVE_TO_FILE="true", LOG_OUTPUT_DIR=str(output)).values
        shipper = Shipper(load_config(None, values), clock=clock)
        try:
            first = shipper.run_cycle()
            assert pipeline.id in by_pipeline(documents(receiver))  # the API got it (case 13)
            blocked.unlink()  # the operator fixes the folder
            for _ in range(3):
                clock.advance(minutes=1)
                shipper.run_cycle()
        finally:
            shipper.close()
    written = sorted(p.name for p in output.glob("*/pipeline_*")) if output.exists() else []
    assert written == [f"pipeline_{pipeline.id}"], (
        f"files of pipeline {pipeline.id} never written (first cycle complete={first.complete}, "
        f"counts={dict(first.counts)})")


# == found by the second review: the retry list, the cursor, an upgrade from an older STATE_DIR ===============


def _posts_of(receiver: Receiver, pipeline_id: int) -> int:
    return sum(1 for doc in documents(receiver) if doc["pipeline_id"] == pipeline_id)


def _blocked_output(tmp: Path) -> Path:
    blocked = tmp / "not-a-folder"
    blocked.write_text("a file where the output folder should be")
    return blocked


# -- 1. dual mode: the retry entry is re-created from scratch on every attempt --------------------------------


def test_dual_mode_file_failure_backs_off_instead_of_posting_every_cycle(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: Clock) -> None:
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


def test_post_by_hand_in_dual_mode_keeps_the_pipeline_on_the_retry_list_while_its_files_fail(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: Clock) -> None:
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


def test_run_once_is_not_complete_while_a_pipeline_waits_for_its_retry(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: Clock) -> None:
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


def test_backfill_failure_in_an_unconfigured_project_is_retried(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: Clock) -> None:
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


def test_retry_entries_of_a_project_no_longer_configured_do_not_stay_for_ever(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: Clock) -> None:
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


def test_upgrade_from_a_store_whose_cursor_an_old_version_pushed_into_the_future(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: Clock) -> None:
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


def test_backfill_after_the_upgrade_does_not_ship_again_what_the_old_version_shipped(
        tmp_path: Path, world: World, sim: GitLabSimulator, receiver: Receiver, clock: Clock) -> None:
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
