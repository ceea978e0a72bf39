"""The daemon as operators run it: a real process, polling on its schedule, stopped by SIGTERM."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from gitlab_log_shipper.config.settings import load_config, prepare_directories
from gitlab_log_shipper.errors import StateBusy, StateError, StateFull
from gitlab_log_shipper.service.daemon import run_forever
from gitlab_log_shipper.shipper import CycleReport, Shipper
from gitlab_log_shipper.state.store import StateStore
from gitlab_log_shipper.timeutil import utcnow

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import documents, make_env, start_daemon, stop_daemon


def test_run_polls_on_schedule_and_stops_cleanly_on_sigterm(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver
) -> None:
    project = world.add_project("team/app")
    first = world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    env = make_env(tmp_path, gitlab_sim, receiver, POLL_INTERVAL="1")
    proc = start_daemon(env)
    try:
        receiver.wait_for(1, timeout=20)
        second = world.add_pipeline(project.id, status="failed", jobs=[JobSpec("b", "test", "failed", log="b\n")])
        receiver.wait_for(2, timeout=20)  # picked up by a later scheduled cycle, no restart
        assert [d["pipeline_id"] for d in documents(receiver)] == [first.id, second.id]
        time.sleep(0.2)
    finally:
        code, output = stop_daemon(proc)
    assert code == 0, output
    assert "received SIGTERM" in output and "stopped" in output
    assert "Traceback" not in output


class FlakyShipper:
    """Just what the loop touches of a Shipper: ``stop`` and ``run_cycle``. Fails the cycles it is told to."""

    def __init__(self, failures: dict[int, BaseException], stop_after: int) -> None:
        self.stop = threading.Event()
        self.failures = failures
        self.stop_after = stop_after
        self.cycles: list[float] = []
        self.spool_root = Path("/nonexistent/spool")

    def run_cycle(self) -> CycleReport:
        self.cycles.append(time.monotonic())
        if len(self.cycles) >= self.stop_after:
            self.stop.set()
        failure = self.failures.get(len(self.cycles))
        if failure is not None:
            raise failure
        return CycleReport()


def run_loop(shipper: FlakyShipper, timeout: float = 20) -> None:
    loop = threading.Thread(target=run_forever, args=(shipper, 1), daemon=True)
    loop.start()
    loop.join(timeout)
    assert not loop.is_alive(), f"the loop stopped polling after {len(shipper.cycles)} cycle(s)"


def test_a_failed_first_cycle_is_retried_on_schedule(caplog: pytest.LogCaptureFixture) -> None:
    shipper = FlakyShipper({1: RuntimeError("boom"), 2: KeyError("x")}, stop_after=4)
    with caplog.at_level(logging.INFO):
        run_loop(shipper)
    assert len(shipper.cycles) == 4  # the first two failed, polling went on
    gaps = [b - a for a, b in zip(shipper.cycles, shipper.cycles[1:])]
    assert all(0.5 < gap < 3 for gap in gaps), gaps  # on the schedule (POLL_INTERVAL 1 s), not in a tight loop
    assert "poll cycle failed unexpectedly" in caplog.text


def test_a_busy_or_full_store_fails_the_cycle_not_the_daemon(caplog: pytest.LogCaptureFixture) -> None:
    shipper = FlakyShipper({1: StateBusy("state store /x/state.sqlite3 is busy"),
                            2: StateFull("state store /x/state.sqlite3: the file system is full")}, stop_after=3)
    with caplog.at_level(logging.INFO):
        run_loop(shipper)
    assert len(shipper.cycles) == 3
    assert "is busy" in caplog.text and "is full" in caplog.text
    assert "Traceback" not in caplog.text  # an expected condition, told in one line


def test_an_unusable_store_ends_the_daemon() -> None:
    shipper = FlakyShipper({1: StateError("state store /x/state.sqlite3 is corrupt")}, stop_after=5)
    with pytest.raises(StateError):
        run_forever(shipper, 1)  # type: ignore[arg-type]
    assert len(shipper.cycles) == 1


def test_a_full_disk_fails_cycles_until_there_is_room_again(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    env = make_env(tmp_path, gitlab_sim, receiver)
    config = load_config(None, env.values)
    prepare_directories(config)
    store = StateStore(config.state_dir)
    # No page left and no room in the shipped-pipelines pages: SQLite answers SQLITE_FULL to the next
    # record of a shipped pipeline, as on a full disk.
    store._db.execute(f"PRAGMA max_page_count = {store._db.execute('PRAGMA page_count').fetchone()[0] + 4}")
    filler = iter(range(1_000_000, 2_000_000))
    for size in (2000, 200, 20, 1):
        try:
            while True:
                store.record_shipped(1, next(filler), "x" * size, "k", "api", utcnow())
        except StateFull:
            pass
    shipper = Shipper(config, state=store)
    loop = threading.Thread(target=run_forever, args=(shipper, 1), daemon=True)
    try:
        with caplog.at_level(logging.INFO):
            loop.start()
            deadline = time.monotonic() + 20
            while caplog.text.count("the file system is full") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert caplog.text.count("the file system is full") >= 2  # the cycle failed, the next one ran too
            assert loop.is_alive() and store.seen(project.id, pipeline.id) is None

            def shipped() -> bool:
                seen = store.seen(project.id, pipeline.id)
                return seen is not None and seen.shipped_finish is not None

            store._db.execute("PRAGMA max_page_count = 1073741823")  # room again
            while not shipped() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert shipped()  # caught up without a restart
    finally:
        shipper.stop.set()
        loop.join(10)
        shipper.close()
    assert not loop.is_alive()
    assert "Traceback" not in caplog.text and "aside" not in caplog.text
