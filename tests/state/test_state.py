"""The SQLite state store: survives reopening, refuses a corrupt, lost or unusable file, waits for and reports a busy
one, tells a full disk apart, stays bounded."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from gitlab_log_shipper.errors import StateBusy, StateError, StateFull
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.world import JobSpec, World
from gitlab_log_shipper.state.store import StateStore

from repo_paths import REPO_ROOT
from shipper_helpers import make_env

NOW = datetime(2026, 11, 1, 12, 0, 0, 123000, tzinfo=timezone.utc)


def test_cursor_and_shipped_finishes_survive_reopen(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.get_cursor(5) is None
    store.set_cursor(5, NOW)
    store.record_shipped(5, 100, "success|2026-11-01T11:00:00.000Z", "key-1", "api", NOW,
                         list_row=("success", "2026-11-01T11:00:01.000Z"))
    store.close()
    again = StateStore(tmp_path)
    assert again.get_cursor(5) == NOW
    assert again.is_shipped(5, 100, "success|2026-11-01T11:00:00.000Z")
    assert not again.is_shipped(5, 100, "failed|2026-11-01T12:00:00.000Z")
    seen = again.seen(5, 100)
    assert seen is not None and (seen.list_status, seen.list_updated_at) == ("success", "2026-11-01T11:00:01.000Z")
    with sqlite3.connect(tmp_path / "state.sqlite3") as db:
        assert db.execute("SELECT idempotency_key, outcome FROM deliveries").fetchall() == [("key-1", "api")]


def test_mark_handled_keeps_the_shipped_finish(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.record_shipped(5, 100, "success|t1", "k", "api", NOW)
    store.mark_handled(5, 100, "success", "t2", NOW)
    seen = store.seen(5, 100)
    assert seen is not None and seen.shipped_finish == "success|t1" and seen.list_updated_at == "t2"


def test_corrupt_store_stops_with_a_recovery_hint(tmp_path: Path) -> None:
    (tmp_path / "state.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError, match="OPERATIONS.md"):
        StateStore(tmp_path)


def test_prune_forgets_old_rows_only(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.record_shipped(5, 1, "success|a", "k1", "api", NOW - timedelta(days=40))
    store.record_shipped(5, 2, "success|b", "k2", "api", NOW)
    assert store.prune(NOW) == 2  # the old pipeline row and its delivery record
    assert store.seen(5, 1) is None and store.seen(5, 2) is not None


# -- a busy, full, lost or unusable store (issue 11, cases 8 and 16) -------------------------------


def hold_write_lock(state_dir: Path) -> sqlite3.Connection:
    """A second, real SQLite connection holding the write lock, as a backfill or an sqlite3 shell does."""
    holder = sqlite3.connect(state_dir / "state.sqlite3", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def in_thread(action, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    """Run ``action`` in another thread; fail (instead of hanging the suite) when it does not return."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = action()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), "the state store hung (its lock was never released)"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


def test_a_busy_store_is_reported_as_busy_and_stays_usable(tmp_path: Path) -> None:
    store = StateStore(tmp_path, busy_timeout=0.3)
    store.set_cursor(5, NOW)
    holder = hold_write_lock(tmp_path)
    started = time.monotonic()
    with pytest.raises(StateBusy) as caught:
        store.set_cursor(5, NOW + timedelta(hours=1))
    assert 0.3 <= time.monotonic() - started < 3  # waited for the busy timeout, not for ever
    message = str(caught.value)
    assert str(tmp_path / "state.sqlite3") in message and "busy" in message
    assert "aside" not in message and "corrupt" not in message  # a lock is no reason to give up the state
    assert caught.value.exit_code == 1
    # other threads (the daemon's workers, close() in the main thread) are not locked out afterwards
    assert in_thread(store.cursors) == {5: NOW}
    holder.execute("ROLLBACK")
    in_thread(lambda: store.set_cursor(5, NOW + timedelta(hours=2)))
    assert store.get_cursor(5) == NOW + timedelta(hours=2)
    in_thread(store.close)


def test_a_write_waits_for_a_short_lock_instead_of_failing(tmp_path: Path) -> None:
    store = StateStore(tmp_path, busy_timeout=5)
    holder = hold_write_lock(tmp_path)
    releaser = threading.Timer(0.3, lambda: holder.execute("ROLLBACK"))
    releaser.start()
    try:
        store.set_cursor(5, NOW)  # waits the 0.3 s, then succeeds
    finally:
        releaser.join()
    assert store.get_cursor(5) == NOW


def fill_up(store: StateStore) -> StateFull:
    """Write until SQLite itself answers SQLITE_FULL (a page limit on this connection, as a full disk does)."""
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 2}")
    for n in range(10_000):
        try:
            store.record_shipped(5, n, "success|" + "x" * 500, f"key-{n}", "api", NOW)
        except StateFull as exc:
            return exc
    raise AssertionError("SQLite never reported a full database")


def test_a_full_disk_has_its_own_message_and_nothing_half_written(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    error = fill_up(store)
    message = str(error)
    assert "full" in message and str(tmp_path / "state.sqlite3") in message
    assert "aside" not in message and "corrupt" not in message
    assert error.exit_code == 1
    shipped = len(list(store.iter_pipelines()))
    # the failed transaction was rolled back, not left open: once there is room again, writes work
    store._db.execute("PRAGMA max_page_count = 1073741823")
    in_thread(lambda: store.record_shipped(5, 99_999, "success|t", "key-last", "api", NOW))
    assert len(list(store.iter_pipelines())) == shipped + 1
    store.close()


@pytest.mark.parametrize("loss", ["deleted", "zero-length"])
def test_a_lost_store_is_refused_instead_of_starting_over(tmp_path: Path, loss: str) -> None:
    store = StateStore(tmp_path)
    store.set_cursor(5, NOW)
    store.close()
    path = tmp_path / "state.sqlite3"
    for extra in (tmp_path / "state.sqlite3-wal", tmp_path / "state.sqlite3-shm"):
        extra.unlink(missing_ok=True)
    if loss == "deleted":
        path.unlink()
    else:
        path.write_bytes(b"")
    with pytest.raises(StateError) as caught:
        StateStore(tmp_path)
    message = str(caught.value)
    assert str(path) in message and ("missing" in message or "empty" in message)
    assert "state.created" in message and "OPERATIONS.md" in message  # how to start over on purpose
    assert caught.value.exit_code == 3
    assert not path.exists() or path.stat().st_size == 0  # nothing was created in its place

    # starting over is deliberate: the marker goes too
    (tmp_path / "state.created").unlink()
    again = StateStore(tmp_path)
    assert again.get_cursor(5) is None
    assert (tmp_path / "state.created").is_file()


def test_a_fresh_folder_starts_and_an_older_store_gets_its_marker(tmp_path: Path) -> None:
    fresh = StateStore(tmp_path / "fresh")
    assert (tmp_path / "fresh" / "state.created").is_file()
    fresh.close()
    older = tmp_path / "older"
    store = StateStore(older)
    store.set_cursor(5, NOW)
    store.close()
    (older / "state.created").unlink()  # a store written before markers existed
    reopened = StateStore(older)
    assert reopened.get_cursor(5) == NOW and (older / "state.created").is_file()
    reopened.close()


def test_a_corrupt_store_exits_with_the_code_systemd_does_not_restart_on(tmp_path: Path) -> None:
    (tmp_path / "state.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError) as caught:
        StateStore(tmp_path)
    assert caught.value.exit_code == 3
    unit = (REPO_ROOT / "packaging" / "systemd" / "gitlab-log-shipper.service").read_text()
    prevented = {int(code) for line in unit.splitlines() if line.startswith("RestartPreventExitStatus=")
                 for code in line.split("=", 1)[1].split()}
    assert {2, 3} <= prevented
    operations = (REPO_ROOT / "OPERATIONS.md").read_text()
    assert "| 3 |" in operations


def test_commands_refuse_a_deleted_store_with_exit_3(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    env = make_env(tmp_path, gitlab_sim, None)
    assert env.invoke("run", "--once").exit_code == 0
    state_dir = Path(env.values["STATE_DIR"])
    for path in state_dir.glob("state.sqlite3*"):
        path.unlink()
    for args in (["run", "--once"], ["status"], ["backfill", "--since", "1d"]):
        result = env.invoke(*args)
        assert result.exit_code == 3, (args, result.output)
        assert f"state store {state_dir / 'state.sqlite3'} is missing" in result.output, result.output
        assert "Traceback" not in result.output
    assert not (state_dir / "state.sqlite3").exists()
