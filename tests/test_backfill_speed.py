"""`backfill` at full speed (issue 12): as concurrent as `run`, listing while it ships with a bounded backlog,
counts that add up, Ctrl-C within seconds, resumable, nothing lost.

Everything runs over real HTTP on loopback against the GitLab simulator and the receiver. Concurrency is observed
from the simulator's side: its request hook holds every request of a pipeline for a moment and counts how many
different pipelines have a request open at once (one at a time was the old behaviour, so that number is what
fails against it; a wall time would depend on the machine).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from gitlab_log_shipper.config.settings import load_config
from gitlab_log_shipper.gitlab.rest import PER_PAGE
from gitlab_log_shipper.shipper import SHIPPED, BackfillListener, Shipper, ShipResult
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.logs import LogSpec
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, Pipeline, World
from gitlab_log_shipper.state.store import StateStore

from shipper_helpers import Env, by_pipeline, documents, make_env, wait_until


def recent(world: World, count: int, *, jobs: int = 2, project_id: int | None = None) -> list[Pipeline]:
    """``count`` pipelines that finished 50 to 40 minutes ago, ``jobs`` jobs with small logs each."""
    project = project_id if project_id is not None else world.add_project("team/app").id
    now = world.now()
    return [world.add_pipeline(project, status="failed" if i % 5 == 4 else "success",
                               finished_at=now - timedelta(minutes=50) + timedelta(seconds=i), jobs=[
                                   JobSpec(f"job-{j}", "test", "failed" if i % 5 == 4 and j == 0 else "success",
                                           log=f"pipeline {i} job {j}\n" * 30) for j in range(jobs)])
            for i in range(count)]


def finished_long_ago_updated_lately(world: World, project_id: int, count: int) -> list[Pipeline]:
    """Pipelines that came to rest three days ago and were updated 50 minutes ago (distinct updated_at each, as GitLab
    stamps them): a listing from an hour ago has them, the window does not."""
    now = world.now()
    made = []
    for i in range(count):
        pipeline = world.add_pipeline(project_id, status="success", finished_at=now - timedelta(days=3, seconds=i),
                                      jobs=[JobSpec("old", "test", "success", log="old\n")])
        with world.lock:
            pipeline.updated_at = now - timedelta(minutes=50) + timedelta(milliseconds=3 * i)
        made.append(pipeline)
    return made


class InFlight:
    """Request hook: holds each request of a pipeline (its GET, its jobs, its logs) ``hold`` seconds and records the
    most pipelines that had a request open at the same time."""

    def __init__(self, world: World, hold: float = 0.03) -> None:
        self.jobs = {job.id: job.pipeline_id for job in world.jobs.values()}
        self.hold = hold
        self.open: Counter[int] = Counter()
        self.peak = 0
        self._lock = threading.Lock()

    def __call__(self, endpoint: str, args: list[str], params: dict[str, str]) -> None:
        if endpoint in ("pipeline", "pipeline_jobs"):
            pipeline = int(args[1])
        elif endpoint == "trace":
            pipeline = self.jobs[int(args[1])]
        else:
            return
        with self._lock:
            self.open[pipeline] += 1
            self.peak = max(self.peak, len(self.open))
        time.sleep(self.hold)
        with self._lock:
            self.open[pipeline] -= 1
            if not self.open[pipeline]:
                del self.open[pipeline]


def closing_line(output: str) -> str:
    [line] = [line for line in output.splitlines() if line.startswith("backfill: ")]
    return line


def keys_by_pipeline(receiver: Receiver) -> dict[int, list[str | None]]:
    keys: dict[int, list[str | None]] = {}
    for request in receiver.accepted():
        keys.setdefault(request.json()["pipeline_id"], []).append(request.idempotency_key)
    return keys


# -- concurrency, and the same documents as one at a time ----------------------------------------------------------


def test_backfill_ships_several_pipelines_at_once_and_the_same_documents_as_one_at_a_time(
        tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    pipelines = recent(world, 16, jobs=3)
    in_flight = InFlight(world)
    gitlab_sim.on_request(in_flight)

    concurrent = make_env(tmp_path / "eight", gitlab_sim, receiver, CONCURRENCY="8")
    result = concurrent.invoke("backfill", "--since", "2h")
    assert result.exit_code == 0, result.output
    assert in_flight.peak > 1, "one pipeline at a time"
    assert in_flight.peak <= 8  # CONCURRENCY
    fast = by_pipeline(documents(receiver))
    fast_keys = keys_by_pipeline(receiver)

    receiver.clear()
    in_flight.peak = 0
    one = make_env(tmp_path / "one", gitlab_sim, receiver, CONCURRENCY="1")
    result = one.invoke("backfill", "--since", "2h")
    assert result.exit_code == 0, result.output
    assert in_flight.peak == 1  # the measure tells the two apart
    # whatever order they were shipped in, every pipeline once, with the same document and the same key
    assert set(fast) == {p.id for p in pipelines}
    assert fast == by_pipeline(documents(receiver))
    assert fast_keys == keys_by_pipeline(receiver) and all(len(k) == 1 for k in fast_keys.values())


# -- resume: a rerun ships nothing twice, reads no log; --force resends under the same keys --------------------------


def test_a_rerun_ships_nothing_and_reads_no_log_and_the_daemon_skips_what_backfill_recorded(
        tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    pipelines = recent(world, 10)
    project = pipelines[0].project_id
    # finishes told by their jobs (no finished_at): the rerun reads their jobs, never their logs
    world.add_pipeline(project, status="manual", jobs=[JobSpec("build", log="built\n"),
                                                       JobSpec("deploy", "deploy", "manual")])
    world.add_pipeline(project, status="skipped", jobs=[JobSpec("build", status="skipped")])
    env = make_env(tmp_path, gitlab_sim, receiver, CONCURRENCY="4")
    first = env.invoke("backfill", "--since", "2h")
    assert first.exit_code == 0, first.output
    keys = keys_by_pipeline(receiver)
    assert set(keys) == set(world.pipelines) and all(len(k) == 1 for k in keys.values())

    gitlab_sim.reset_counters()
    again = env.invoke("backfill", "--since", "2h")
    assert again.exit_code == 0, again.output
    assert closing_line(again.stdout) == "backfill: 12 pipeline(s) in the window: 0 shipped, 12 skipped, 0 failed"
    assert gitlab_sim.counters["trace"] == 0 and keys_by_pipeline(receiver) == keys

    # what backfill shipped is what the daemon knows: its listing of the same rows makes no request per pipeline
    gitlab_sim.reset_counters()
    daemon = env.invoke("run", "--once")
    assert daemon.exit_code == 0, daemon.output
    assert gitlab_sim.counters["pipeline"] == gitlab_sim.counters["trace"] == 0, gitlab_sim.counters
    assert keys_by_pipeline(receiver) == keys

    forced = env.invoke("backfill", "--since", "2h", "--force")
    assert forced.exit_code == 0, forced.output
    assert closing_line(forced.stdout) == "backfill: 12 pipeline(s) in the window: 12 shipped, 0 skipped, 0 failed"
    assert keys_by_pipeline(receiver) == {pipeline: key * 2 for pipeline, key in keys.items()}  # resent, same key


# -- the counts add up; what fails is on the retry list, exit 1, and the daemon delivers it ------------------------


def test_progress_counts_add_up_and_a_failure_is_kept_for_the_daemon(
        tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    pipelines = recent(world, 8)  # 6 success, 2 failed (i % 5 == 4)
    project = pipelines[0].project_id
    outside = finished_long_ago_updated_lately(world, project, 2)
    canceled = world.add_pipeline(project, status="canceled", jobs=[JobSpec("build", "build", "canceled")])
    world.add_pipeline(project, status="running", jobs=[JobSpec("build", "build", "running")])
    env = make_env(tmp_path, gitlab_sim, receiver, CONCURRENCY="4", LOG_SAVE_PIPELINE_STATUS="success,failed")
    for pipeline in pipelines[:2]:  # shipped before
        assert env.invoke("post", "--pipeline-id", str(pipeline.id)).exit_code == 0
    gitlab_sim.inject("pipeline_jobs", 403, count=1)  # one pipeline's jobs cannot be read this time

    result = env.invoke("backfill", "--since", "2h")
    assert result.exit_code == 1, result.output  # something was not delivered
    # 8 finished in the window; 2 more listed came to rest days ago; the canceled one is filtered by its row (no
    # request, not read, so not counted as found), the running one is not at rest
    assert closing_line(result.stdout) == ("backfill: 8 pipeline(s) in the window: 5 shipped, 2 skipped, 1 failed "
                                           "(2 more listed came to rest outside it)")
    assert "summary: shipped=5 failed=1 filtered=1 deduplicated=2" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    counters = [int(re.match(r"\[(\d+)/", line).group(1)) for line in lines]
    # a line for each of the 5 shipped and the failed one; the counter counts the 2 skipped too (they get no line)
    assert len(counters) == 6 and counters == sorted(set(counters)) and counters[-1] == 8, lines
    [failed_line] = [line for line in lines if ": failed" in line]
    failed = int(re.search(r"pipeline (\d+)", failed_line).group(1))
    state = StateStore(Path(env.values["STATE_DIR"]))
    try:
        assert [entry.pipeline_id for entry in state.retries()] == [failed]
    finally:
        state.close()
    delivered = keys_by_pipeline(receiver)
    assert failed not in delivered and set(delivered) == {p.id for p in pipelines} - {failed}
    assert not {p.id for p in outside} & set(delivered) and canceled.id not in delivered

    daemon = env.invoke("run", "--once", INITIAL_LOOKBACK="5m")  # its own window has none of them: the retry list
    assert daemon.exit_code == 0, daemon.output
    delivered = keys_by_pipeline(receiver)
    assert set(delivered) == {p.id for p in pipelines} and all(len(k) == 1 for k in delivered.values())
    state = StateStore(Path(env.values["STATE_DIR"]))
    try:
        assert state.retries() == []
    finally:
        state.close()


# -- memory: a long window is never held whole --------------------------------------------------------------------


class Recorder(BackfillListener):
    def __init__(self) -> None:
        self.found_rows = self.outside_rows = 0
        self.results: Counter[str] = Counter()
        self._lock = threading.Lock()

    def found(self, count: int) -> None:
        with self._lock:
            self.found_rows += count

    def outside(self) -> None:
        with self._lock:
            self.outside_rows += 1

    def handled(self, result: ShipResult) -> None:
        with self._lock:
            self.results[result.outcome] += 1


def test_a_listing_of_2000_pipelines_never_holds_more_than_a_page_and_the_backlog(
        tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    project = world.add_project("team/busy")
    finished_long_ago_updated_lately(world, project.id, 1990)
    shipped = recent(world, 10, project_id=project.id)
    concurrency = 4
    bound = PER_PAGE + 2 * concurrency  # the page being handed on, and the backlog behind the pool
    # Seen from GitLab: when a page is asked for, how many listed rows have not been asked about yet. (The rows
    # listed so far are at most PER_PAGE per page answered.)
    pages = details = 0
    ahead: list[int] = []
    lock = threading.Lock()

    def watch(endpoint: str, args: list[str], params: dict[str, str]) -> None:
        nonlocal pages, details
        with lock:
            if endpoint == "pipelines" and "source" not in params:
                ahead.append(pages * PER_PAGE - details)
                pages += 1
            elif endpoint == "pipeline":
                details += 1

    gitlab_sim.on_request(watch)
    # 2,000 GETs would spend GitLab.com's budget (2,000 a minute, which the shipper pauses for): a bigger one
    gitlab_sim.faults.rate_limit = 100_000
    env = make_env(tmp_path, gitlab_sim, receiver, CONCURRENCY=str(concurrency))
    shipper = Shipper(load_config(None, env.values))
    recorder = Recorder()
    try:
        report = shipper.backfill(world.now() - timedelta(hours=1), world.now(), shipper.projects(), listener=recorder)
    finally:
        shipper.close()
    assert pages >= 2000 // PER_PAGE and details == 2000
    assert max(ahead) <= bound, f"listed ahead of the pipelines started: {ahead}"
    assert 0 < report.peak_held <= bound, report.peak_held
    assert report.results == []  # no result kept per pipeline either
    assert (recorder.found_rows, recorder.outside_rows, dict(recorder.results)) == (2000, 1990, {SHIPPED: 10})
    assert report.counts[SHIPPED] == 10 and report.complete
    assert set(by_pipeline(documents(receiver))) == {p.id for p in shipped}


# -- Ctrl-C and SIGTERM: stopped within seconds, nothing half-shipped recorded, a rerun ships the rest -----------------


def start_backfill(env: Env, output: Path, *args: str) -> "subprocess.Popen[bytes]":
    (env.tmp / "empty.env").touch()
    with open(output, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "gitlab_log_shipper", "--env-file", str(env.tmp / "empty.env"),
                                 "backfill", *args], env={**os.environ, **env.values}, stdout=out,
                                stderr=subprocess.STDOUT)


STOP_BOUND = 5.0  # seconds from the signal to the exit: the requests in flight end (0.15 s each), no new one starts


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_backfill_within_seconds_and_a_rerun_ships_the_rest(
        tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver,
        signum: signal.Signals, code: int) -> None:
    pipelines = recent(world, 30)
    env = make_env(tmp_path, gitlab_sim, receiver, CONCURRENCY="4")
    gitlab_sim.faults.latency = 0.15  # a slow GitLab: the signal lands while pipelines are shipping
    first_read: dict[int, float] = {}

    def note(endpoint: str, args: list[str], params: dict[str, str]) -> None:
        if endpoint == "pipeline":
            first_read.setdefault(int(args[1]), time.monotonic())

    gitlab_sim.on_request(note)
    output = tmp_path / "backfill.out"
    proc = start_backfill(env, output, "--since", "2h")
    try:
        wait_until(lambda: len(receiver.accepted()) >= 3, 60, "the first deliveries")
        signalled = time.monotonic()
        proc.send_signal(signum)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    took = time.monotonic() - signalled
    printed = output.read_text("utf-8", "replace")
    assert proc.returncode == code, printed
    assert took < STOP_BOUND, (took, printed)
    name = signal.Signals(signum).name
    assert f"stopped by {name}" in printed and "Traceback" not in printed
    assert "not done, stopped: a rerun does them" in closing_line(printed), printed
    late = [pipeline for pipeline, at in first_read.items() if at > signalled + 0.5]
    assert late == [], "pipelines started after the signal"
    delivered = keys_by_pipeline(receiver)
    assert 0 < len(delivered) < len(pipelines)
    # nothing half-shipped is recorded as shipped: exactly what the receiver has counts as shipped
    state = StateStore(Path(env.values["STATE_DIR"]))
    try:
        recorded = {p.id for p in pipelines if (seen := state.seen(p.project_id, p.id)) and seen.shipped_finish}
    finally:
        state.close()
    assert recorded == set(delivered)

    gitlab_sim.faults.latency = 0.0
    rerun = env.invoke("backfill", "--since", "2h")
    assert rerun.exit_code == 0, rerun.output
    assert closing_line(rerun.stdout) == (f"backfill: 30 pipeline(s) in the window: {30 - len(delivered)} shipped, "
                                          f"{len(delivered)} skipped, 0 failed")
    keys = keys_by_pipeline(receiver)
    assert set(keys) == {p.id for p in pipelines}
    assert all(len(k) == 1 for k in keys.values()), "shipped twice"


def test_the_benchmark_backfill_row_is_printed() -> None:
    """bench/run.py runs `backfill` next to `run --once` and the naive loop (a smoke run: tiny, no latency)."""
    bench = Path(__file__).resolve().parent.parent / "bench" / "run.py"
    result = subprocess.run([sys.executable, str(bench), "--pipelines", "4", "--jobs", "2", "--log-size", "2000",
                             "--latency", "0", "--skip-big", "--field-runs", "0"],
                            capture_output=True, text=True, timeout=120, env={**os.environ})
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^backfill +[\d.]+ ", result.stdout, re.M), result.stdout
    assert re.search(r"^ratio: backfill is [\d.]+x the baseline's throughput", result.stdout, re.M), result.stdout


def test_a_concurrent_dry_run_shows_each_document_whole_on_its_own_line(
        tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    """Several pipelines are previewed at once now: each document (here ~0.5 MB, several write chunks) is still one
    line of its own, never interleaved with another's."""
    project = world.add_project("team/app").id
    now = world.now()
    ids = [world.add_pipeline(project, finished_at=now - timedelta(minutes=30, seconds=i), jobs=[
        JobSpec(f"job-{j}", "test", "success", log=LogSpec(120_000, seed=10 * i + j)) for j in range(4)]).id
        for i in range(8)]
    env = make_env(tmp_path, gitlab_sim, None, CONCURRENCY="8")
    result = env.invoke("backfill", "--since", "2h", "--dry-run", "--show-document")
    assert result.exit_code == 0, result.stderr
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(doc["pipeline_id"] for doc in docs) == sorted(ids)
    assert closing_line(result.stderr) == "backfill: 8 pipeline(s) in the window: 8 would ship, 0 skipped, 0 failed"
