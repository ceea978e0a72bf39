"""The SQLite state store: survives reopening, refuses a corrupt file, stays bounded."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from gitlab_log_shipper.errors import StateError
from gitlab_log_shipper.state import StateStore

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
