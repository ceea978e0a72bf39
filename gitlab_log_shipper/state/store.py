"""Durable state in ``STATE_DIR/state.sqlite3``: per-project cursors and what was shipped.

SQLite in WAL mode with ``synchronous=FULL``: every change is one transaction, so a kill -9 at any
instant leaves either the old or the new state, never a mix. A store that cannot be opened or fails its
integrity check raises :class:`StateError`; the daemon stops with that message rather than silently
starting over (which would re-ship or, worse, skip history).

What is stored:

* ``cursors``: per project, the ``updated_at`` high-water mark up to which every pipeline was handled.
* ``pipelines``: per pipeline, the list row (status, ``updated_at``) last handled — lets a poll skip a row
  seen again in the overlap window without another request — and the finish last shipped
  (``status|finished_at``), which is what makes "each distinct finish is shipped once" true.
* ``deliveries``: one row per shipped finish (idempotency key, outcome), for ``status`` and audits.
* ``stats``: running totals by outcome and the last cycle's time, duration and summary (``status``), and the
  finish → delivered latency histogram (``latency.*`` keys, see :mod:`latency`).
* ``latency_recent``: the newest :data:`~latency.RECENT_CAPACITY` latencies, for ``status``'s p50 / p95 / max;
  ``outbox_rest``: when each queued document's pipeline came to rest, so that its later delivery is measured.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Iterator, Mapping, TypeVar

from ..errors import StateBusy, StateError, StateFull
from ..timeutil import format_ts, parse_ts
from .latency import BUCKET_KEY, CLAMPED_KEY, COUNT_KEY, RECENT_CAPACITY, SUM_MS_KEY, Sample, bucket_of

SCHEMA_VERSION = 1
# Rows of pipelines not seen for this long are pruned: GitLab's list can only return them again if their
# updated_at moves, and then the finish key (status|finished_at) decides, which a new finish never matches.
PIPELINE_ROW_RETENTION = timedelta(days=30)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cursors (
    project_id INTEGER PRIMARY KEY,
    cursor TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pipelines (
    project_id INTEGER NOT NULL,
    pipeline_id INTEGER NOT NULL,
    list_status TEXT,
    list_updated_at TEXT,
    shipped_finish TEXT,
    touched_at TEXT NOT NULL,
    PRIMARY KEY (project_id, pipeline_id)
);
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL,
    pipeline_id INTEGER NOT NULL,
    finish TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    outcome TEXT NOT NULL,
    delivered_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_pipeline ON deliveries (project_id, pipeline_id);
CREATE TABLE IF NOT EXISTS outbox (
    idempotency_key TEXT PRIMARY KEY,
    project_id INTEGER NOT NULL,
    pipeline_id INTEGER NOT NULL,
    finish TEXT NOT NULL,
    file TEXT NOT NULL,
    size INTEGER NOT NULL,
    queued_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error TEXT,
    next_attempt_at TEXT NOT NULL
);
-- Running totals and the last cycle, for `status` and the metrics textfile. Added without a schema
-- version bump: an older shipper simply ignores the table, so a rollback keeps working.
CREATE TABLE IF NOT EXISTS stats (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Pipelines that could not be shipped (GitLab failed, a file could not be written, the pipeline changed while
-- it was read): retried by id on their own backoff, so that they never hold a project's cursor. Added without a
-- schema version bump, like stats: an older shipper ignores it (and then re-lists within its overlap only).
CREATE TABLE IF NOT EXISTS retries (
    project_id INTEGER NOT NULL,
    pipeline_id INTEGER NOT NULL,
    list_status TEXT,
    list_updated_at TEXT,
    attempts INTEGER NOT NULL,
    first_failed_at TEXT NOT NULL,
    last_failed_at TEXT NOT NULL,
    next_attempt_at TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (project_id, pipeline_id)
);
-- When (this machine's clock) each project's cursor was last set by a listing. A cursor without a row here was
-- written by an older version, which moved cursors to a row's updated_at (possibly from a node whose clock ran
-- ahead): such a cursor is checked against the local stamps before it is trusted. A table of its own, so that an
-- older version (INSERT INTO cursors VALUES (?, ?)) keeps working after a rollback.
CREATE TABLE IF NOT EXISTS polls (project_id INTEGER PRIMARY KEY, polled_at TEXT NOT NULL);
-- Finish -> delivered latency (issue 12). Added without a schema version bump, like stats: an older shipper ignores
-- both tables. latency_recent is a fixed-size table (the oldest rows go as new ones come, see _latency_statements);
-- outbox_rest is a table of its own rather than a column of outbox, so that an older version's
-- INSERT INTO outbox VALUES (...) keeps working after a rollback.
CREATE TABLE IF NOT EXISTS latency_recent (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    delivered_at TEXT NOT NULL,
    seconds REAL NOT NULL,
    path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_rest (idempotency_key TEXT PRIMARY KEY, rest_at TEXT NOT NULL);
"""

RECOVERY_HINT = (
    "Stop the shipper, move the state folder aside (keep it for inspection) and start again with "
    "INITIAL_LOOKBACK covering the time since the last good run; pipelines shipped twice carry the same "
    "Idempotency-Key. See OPERATIONS.md, 'Recovering the state store'."
)
# How long a change waits for another process's write lock on the store (a `backfill` or `post` next to
# the daemon holds it for milliseconds; an sqlite3 shell or a backup tool may hold it for long) before
# it fails with StateBusy, which the daemon treats as a failed cycle and tries again on the next one.
BUSY_TIMEOUT = 15.0
_BUSY_POLL = 0.05  # seconds between attempts while busy; SQLite's own wait is kept as short (see _retrying)
# Written beside the store once it exists: while it is there, a missing or empty state.sqlite3 is lost
# state (refused), not a first start. Removing it with the store is the deliberate way to start over.
MARKER_NAME = "state.created"
START_OVER_HINT = (
    "Restore state.sqlite3 from a backup, or, to start over on purpose (pipelines in INITIAL_LOOKBACK are "
    "shipped again with the same Idempotency-Key, older ones are not), stop the shipper and move "
    "state.sqlite3*, outbox/ and {marker} aside. See OPERATIONS.md, 'Recovering the state store'."
)
_T = TypeVar("_T")


def _is_busy(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


# Python 3.10's sqlite3 errors carry no code (``sqlite_errorcode`` is 3.11+): SQLite's own messages then tell.
_CODES_BY_MESSAGE = (("database is locked", sqlite3.SQLITE_BUSY), ("database table is locked", sqlite3.SQLITE_LOCKED),
                     ("disk is full", sqlite3.SQLITE_FULL), ("readonly database", sqlite3.SQLITE_READONLY),
                     ("unable to open database", sqlite3.SQLITE_CANTOPEN))


def _primary_code(exc: sqlite3.Error) -> int:
    """SQLite's primary result code of ``exc`` (SQLITE_BUSY, not SQLITE_BUSY_SNAPSHOT), 0 when unknown."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return int(code) & 0xFF
    text = str(exc).lower()
    return next((value for phrase, value in _CODES_BY_MESSAGE if phrase in text), 0)


@dataclass(frozen=True)
class OutboxEntry:
    """A document that the receiver has not accepted yet; its bytes are in ``STATE_DIR/outbox/<file>``."""

    idempotency_key: str
    project_id: int
    pipeline_id: int
    finish: str
    file: str
    size: int
    queued_at: str
    attempts: int
    last_status: int | None
    last_error: str | None
    next_attempt_at: str
    rest_at: str | None = None  # when its pipeline came to rest (GitLab's time), for its latency; None: not measured


@dataclass(frozen=True)
class RetryEntry:
    """A pipeline that failed to ship and is tried again by id at ``next_attempt_at``."""

    project_id: int
    pipeline_id: int
    list_status: str | None
    list_updated_at: str | None
    attempts: int
    first_failed_at: str
    last_failed_at: str
    next_attempt_at: str
    reason: str

    @property
    def list_row(self) -> tuple[str, str] | None:
        return (self.list_status, self.list_updated_at) if self.list_status and self.list_updated_at else None


_CLEAR_RETRY = "DELETE FROM retries WHERE project_id=? AND pipeline_id=?"
# Adds an integer to a stats key (created at the value when absent).
_ADD_STAT = ("INSERT INTO stats VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
             "value = CAST(value AS INTEGER) + CAST(excluded.value AS INTEGER)")
_OUTBOX_ROWS = ("SELECT o.*, r.rest_at FROM outbox o LEFT JOIN outbox_rest r ON r.idempotency_key = o.idempotency_key")


def _latency_statements(sample: Sample | None) -> list[tuple[str, tuple]]:
    """A delivery's latency, written in the transaction that records the delivery (a crash never counts it without
    the delivery, nor twice): its bucket, the count, the sum, a clamp; and a row of ``latency_recent``, whose rows
    beyond RECENT_CAPACITY go in the same step, so that the table never grows with uptime."""
    if sample is None:
        return []
    counts = [(f"{BUCKET_KEY}{bucket_of(sample.seconds)}", 1), (COUNT_KEY, 1), (SUM_MS_KEY, sample.millis)]
    if sample.clamped:
        counts.append((CLAMPED_KEY, 1))
    return [
        *((_ADD_STAT, (key, str(n))) for key, n in counts),
        ("INSERT INTO latency_recent (delivered_at, seconds, path) VALUES (?, ?, ?)",
         (format_ts(sample.delivered_at), sample.seconds, sample.path)),
        ("DELETE FROM latency_recent WHERE seq <= (SELECT MAX(seq) FROM latency_recent) - ?", (RECENT_CAPACITY,)),
    ]


@dataclass(frozen=True)
class SeenRow:
    list_status: str | None
    list_updated_at: str | None
    shipped_finish: str | None


class StateStore:
    """The shipper's persistent memory. Safe to share between threads (one connection, one lock)."""

    def __init__(self, state_dir: Path, *, busy_timeout: float | None = None) -> None:
        self.path = Path(state_dir) / "state.sqlite3"
        self.marker = Path(state_dir) / MARKER_NAME
        self._busy_timeout = busy_timeout
        self._lock = threading.RLock()
        try:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            self._refuse_lost_store()
            # SQLite's own busy wait holds our lock and cannot be interrupted; keep it short and wait in
            # _retrying instead, without the lock, up to busy_timeout.
            self._db = sqlite3.connect(self.path, timeout=_BUSY_POLL, isolation_level=None, check_same_thread=False)
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from exc
        except OSError as exc:
            raise self._os_error(exc) from exc
        try:
            self._retrying(self._open)
            self._write_marker()
        except BaseException:
            self._db.close()
            raise

    _busy_timeout: float | None = None

    @property
    def busy_timeout(self) -> float:
        """Seconds a change waits for another process's write lock (BUSY_TIMEOUT unless given)."""
        return BUSY_TIMEOUT if self._busy_timeout is None else self._busy_timeout

    def _open(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StateError(f"state store {self.path} failed its integrity check ({check}). {RECOVERY_HINT}")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StateError(
                    f"state store {self.path} was written by a newer gitlab-log-shipper "
                    f"(schema {row[0]} > {SCHEMA_VERSION}); upgrade, or roll back the state folder too"
                )

    # -- plumbing -------------------------------------------------------------------------------

    def _refuse_lost_store(self) -> None:
        """A store that existed (its marker says so) and is now missing or empty is lost state: starting
        over silently would ship history again or skip it."""
        if not self.marker.exists():
            return
        try:
            if self.path.stat().st_size > 0:
                return
            what = "is empty (0 bytes)"
        except FileNotFoundError:
            what = "is missing"
        raise StateError(f"state store {self.path} {what}, but {self.marker} shows that one was in use here; "
                         f"refusing to start over without cursors. {START_OVER_HINT.format(marker=MARKER_NAME)}")

    def _write_marker(self) -> None:
        if self.marker.exists():
            return
        text = ("gitlab-log-shipper keeps its state in state.sqlite3 beside this file. While this file exists, a\n"
                "missing or empty state.sqlite3 is refused instead of silently starting over.\n"
                "See OPERATIONS.md, 'Recovering the state store'.\n")
        temporary = self.marker.with_name(f".{MARKER_NAME}.{os.getpid()}")
        try:
            with open(temporary, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.marker)
            directory = os.open(self.marker.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise self._os_error(exc) from exc

    def _error(self, exc: sqlite3.Error) -> StateError:
        """The StateError that tells the operator what an SQLite error means for them."""
        code = _primary_code(exc)
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return StateBusy(
                f"state store {self.path} is busy: another process held its write lock for more than "
                f"{self.busy_timeout:g} s (a backfill or post, an sqlite3 shell, a backup). Nothing was written; "
                "the daemon tries again on its next cycle, a command can simply be run again")
        if code == sqlite3.SQLITE_FULL:
            return self._full(str(exc))
        if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_AUTH):
            return StateError(
                f"state store {self.path} cannot be opened for writing ({exc}): check that STATE_DIR and the "
                "files in it belong to the user the shipper runs as, and that the file system is mounted read-write")
        if code == sqlite3.SQLITE_IOERR:
            return StateError(f"state store {self.path}: the disk or file system reported an I/O error ({exc}); "
                              f"check it (dmesg) before anything else. If the store itself is damaged: {RECOVERY_HINT}")
        if code == 0:  # not from the SQLite library (a closed connection, a misuse): no advice to give
            return StateError(f"state store {self.path}: {exc}")
        return StateError(f"state store {self.path} is unreadable or corrupt ({exc}). {RECOVERY_HINT}")

    def _os_error(self, exc: OSError) -> StateError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return self._full(exc.strerror or str(exc))
        return StateError(f"cannot open state store {self.path}: {exc.strerror or exc}")

    def _full(self, detail: str) -> StateFull:
        return StateFull(
            f"state store {self.path}: the file system is full ({detail}). Nothing was written and the store is "
            "intact; free space where STATE_DIR lives (spool/ and outbox/ in it can be large). The daemon tries "
            "again on its next cycle")

    def _retrying(self, action: Callable[[], _T]) -> _T:
        """``action`` (which takes the lock itself), tried again while SQLite answers busy, for up to
        busy_timeout; every SQLite error leaves as a StateError. The waits happen without the lock, so a
        thread waiting here never blocks the others (nor close()) for longer than one short attempt."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                return action()
            except sqlite3.Error as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise self._error(exc) from exc
            time.sleep(_BUSY_POLL)

    class _Tx:
        """``with store._tx() as db:`` one write transaction (BEGIN IMMEDIATE … COMMIT), under the store's
        lock; an error rolls it back and leaves as a StateError, and the lock is released however it ends."""

        def __init__(self, store: "StateStore") -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._retrying(self._begin)
            return self.store._db

        def _begin(self) -> None:
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()  # not held while waiting, never leaked when BEGIN fails
                raise

        def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
            db = self.store._db
            try:
                if exc_type is None:
                    try:
                        db.execute("COMMIT")
                        return
                    except sqlite3.Error as commit_error:
                        exc = commit_error
                self._rollback()
            finally:
                self.store._lock.release()
            if isinstance(exc, sqlite3.Error):
                raise self.store._error(exc) from exc

        def _rollback(self) -> None:
            db = self.store._db
            if db.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL, an I/O error)
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # nothing more to undo; the next BEGIN will say if the connection is unusable

    def _tx(self) -> "StateStore._Tx":
        return StateStore._Tx(self)

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        def read() -> list[tuple]:
            with self._lock:
                return self._db.execute(sql, params).fetchall()
        return self._retrying(read)

    def _write(self, statements: list[tuple[str, tuple]]) -> None:
        with self._tx() as db:
            for sql, params in statements:
                db.execute(sql, params)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- cursors --------------------------------------------------------------------------------

    def get_cursor(self, project_id: int) -> datetime | None:
        rows = self._query("SELECT cursor FROM cursors WHERE project_id=?", (project_id,))
        return parse_ts(rows[0][0]) if rows else None

    def set_cursor(self, project_id: int, cursor: datetime, polled_at: datetime | None = None) -> None:
        statements: list[tuple[str, tuple]] = [(
            "INSERT INTO cursors VALUES (?, ?) ON CONFLICT(project_id) DO UPDATE SET cursor=excluded.cursor",
            (project_id, format_ts(cursor)))]
        if polled_at is not None:
            statements.append(("INSERT INTO polls VALUES (?, ?) ON CONFLICT(project_id) DO UPDATE SET "
                               "polled_at=excluded.polled_at", (project_id, format_ts(polled_at))))
        self._write(statements)

    def legacy_cursor_bound(self, project_id: int) -> datetime | None:
        """For a cursor an older version wrote (no ``polls`` row): the latest time this machine's clock stamped
        anything for the project (a handled pipeline row, else the last cycle), which the cursor cannot rightly
        pass. None when the cursor is not a legacy one or nothing is known."""
        if self._query("SELECT 1 FROM polls WHERE project_id=?", (project_id,)):
            return None
        row = self._query("SELECT MAX(touched_at) FROM pipelines WHERE project_id=?", (project_id,))
        stamp = row[0][0] if row else None
        if stamp is None:
            stamp = self.stats().get("last_cycle.started_at")
        return parse_ts(stamp) if stamp else None

    def cursors(self) -> dict[int, datetime]:
        return {pid: parse_ts(c) for pid, c in self._query("SELECT project_id, cursor FROM cursors")}

    # -- pipelines ------------------------------------------------------------------------------

    def seen(self, project_id: int, pipeline_id: int) -> SeenRow | None:
        rows = self._query(
            "SELECT list_status, list_updated_at, shipped_finish FROM pipelines WHERE project_id=? AND pipeline_id=?",
            (project_id, pipeline_id),
        )
        return SeenRow(*rows[0]) if rows else None

    def mark_handled(self, project_id: int, pipeline_id: int, list_status: str, list_updated_at: str, now: datetime) -> None:
        """The list row (status, updated_at) needs nothing more: skip it while it looks the same."""
        self._write([(
            "INSERT INTO pipelines (project_id, pipeline_id, list_status, list_updated_at, touched_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(project_id, pipeline_id) DO UPDATE SET "
            "list_status=excluded.list_status, list_updated_at=excluded.list_updated_at, touched_at=excluded.touched_at",
            (project_id, pipeline_id, list_status, list_updated_at, format_ts(now)),
        ), (_CLEAR_RETRY, (project_id, pipeline_id))])

    def record_shipped(
        self,
        project_id: int,
        pipeline_id: int,
        finish: str,
        idempotency_key: str,
        outcome: str,
        now: datetime,
        list_row: tuple[str, str] | None = None,
        *,
        latency: Sample | None = None,
    ) -> None:
        """One transaction: the finish counts as shipped, (optionally) the list row as handled and the delivery's
        latency as measured."""
        shipped = self._shipped_statements(project_id, pipeline_id, finish, idempotency_key, outcome, now, list_row)
        self._write([*shipped, *_latency_statements(latency)])

    def _shipped_statements(self, project_id: int, pipeline_id: int, finish: str, idempotency_key: str, outcome: str,
                            now: datetime, list_row: tuple[str, str] | None) -> list[tuple[str, tuple]]:
        status, updated_at = list_row if list_row else (None, None)
        return [
            (
                "INSERT INTO pipelines (project_id, pipeline_id, list_status, list_updated_at, shipped_finish, touched_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(project_id, pipeline_id) DO UPDATE SET "
                "shipped_finish=excluded.shipped_finish, touched_at=excluded.touched_at, "
                "list_status=COALESCE(excluded.list_status, list_status), "
                "list_updated_at=COALESCE(excluded.list_updated_at, list_updated_at)",
                (project_id, pipeline_id, status, updated_at, finish, format_ts(now)),
            ),
            (
                "INSERT INTO deliveries (project_id, pipeline_id, finish, idempotency_key, outcome, delivered_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (project_id, pipeline_id, finish, idempotency_key, outcome, format_ts(now)),
            ),
            (_CLEAR_RETRY, (project_id, pipeline_id)),
        ]

    # -- outbox ---------------------------------------------------------------------------------

    def enqueue(self, entry: OutboxEntry, now: datetime, list_row: tuple[str, str] | None) -> None:
        """One transaction: the document is in the outbox and its finish counts as handed off (the cursor may
        pass it). Its file must already be durably in place."""
        self._write([
            ("INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
             (entry.idempotency_key, entry.project_id, entry.pipeline_id, entry.finish, entry.file, entry.size,
              entry.queued_at, entry.attempts, entry.last_status, entry.last_error, entry.next_attempt_at)),
            *self._shipped_statements(entry.project_id, entry.pipeline_id, entry.finish, entry.idempotency_key,
                                      "queued", now, list_row),
            *([("INSERT OR REPLACE INTO outbox_rest VALUES (?, ?)", (entry.idempotency_key, entry.rest_at))]
              if entry.rest_at else [("DELETE FROM outbox_rest WHERE idempotency_key=?", (entry.idempotency_key,))]),
        ])

    def outbox(self, due_at: datetime | None = None) -> list[OutboxEntry]:
        """Every queued document (or those due for another attempt at ``due_at``), oldest first."""
        if due_at is None:
            rows = self._query(f"{_OUTBOX_ROWS} ORDER BY o.queued_at, o.rowid")
        else:
            rows = self._query(f"{_OUTBOX_ROWS} WHERE o.next_attempt_at <= ? ORDER BY o.queued_at, o.rowid",
                               (format_ts(due_at),))
        return [OutboxEntry(*row) for row in rows]

    def outbox_stats(self) -> tuple[int, int, str | None]:
        """(count, total bytes, queued_at of the oldest)."""
        count, size, oldest = self._query("SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(queued_at) FROM outbox")[0]
        return int(count), int(size), oldest

    def outbox_attempt_failed(self, key: str, status: int | None, error: str | None, next_attempt_at: datetime) -> None:
        self._write([("UPDATE outbox SET attempts=attempts+1, last_status=?, last_error=?, next_attempt_at=? "
                      "WHERE idempotency_key=?", (status, error, format_ts(next_attempt_at), key))])

    def outbox_done(self, entry: OutboxEntry, outcome: str, now: datetime, *, latency: Sample | None = None) -> None:
        """The queued document reached its end (delivered or dead-lettered): drop it from the outbox, log it, count
        its latency when it was delivered and measured."""
        self._write([
            ("DELETE FROM outbox WHERE idempotency_key=?", (entry.idempotency_key,)),
            ("DELETE FROM outbox_rest WHERE idempotency_key=?", (entry.idempotency_key,)),
            ("INSERT INTO deliveries (project_id, pipeline_id, finish, idempotency_key, outcome, delivered_at) "
             "VALUES (?, ?, ?, ?, ?, ?)",
             (entry.project_id, entry.pipeline_id, entry.finish, entry.idempotency_key, outcome, format_ts(now))),
            *_latency_statements(latency),
        ])

    # -- pipelines to try again ----------------------------------------------------------------

    def record_failure(self, project_id: int, pipeline_id: int, list_row: tuple[str, str] | None, reason: str,
                       now: datetime, next_attempt_at: datetime, *, attempts: int, first_failed_at: datetime) -> None:
        """The pipeline could not be shipped: keep it for another attempt. ``attempts`` and ``first_failed_at`` are
        given whole (the caller read the entry before its attempt, which may have dropped it on the way)."""
        self._write([(
            "INSERT INTO retries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(project_id, pipeline_id) DO UPDATE SET "
            "list_status=COALESCE(excluded.list_status, list_status), "
            "list_updated_at=COALESCE(excluded.list_updated_at, list_updated_at), "
            "attempts=excluded.attempts, first_failed_at=excluded.first_failed_at, "
            "last_failed_at=excluded.last_failed_at, next_attempt_at=excluded.next_attempt_at, reason=excluded.reason",
            (project_id, pipeline_id, *(list_row or (None, None)), attempts, format_ts(first_failed_at),
             format_ts(now), format_ts(next_attempt_at), reason[:1000]),
        )])

    def retry_entry(self, project_id: int, pipeline_id: int) -> RetryEntry | None:
        rows = self._query("SELECT * FROM retries WHERE project_id=? AND pipeline_id=?", (project_id, pipeline_id))
        return RetryEntry(*rows[0]) if rows else None

    def retries(self, project_id: int | None = None) -> list[RetryEntry]:
        """Every pipeline waiting for another attempt (of one project), oldest failure first."""
        if project_id is None:
            rows = self._query("SELECT * FROM retries ORDER BY first_failed_at, pipeline_id")
        else:
            rows = self._query("SELECT * FROM retries WHERE project_id=? ORDER BY first_failed_at, pipeline_id",
                               (project_id,))
        return [RetryEntry(*row) for row in rows]

    def clear_retry(self, project_id: int, pipeline_id: int) -> None:
        self._write([(_CLEAR_RETRY, (project_id, pipeline_id))])

    def is_shipped(self, project_id: int, pipeline_id: int, finish: str) -> bool:
        row = self.seen(project_id, pipeline_id)
        return row is not None and row.shipped_finish == finish

    def prune(self, now: datetime) -> int:
        """Forget pipeline rows and delivery records older than the retention; keeps the store bounded."""
        horizon = format_ts(now - PIPELINE_ROW_RETENTION)
        with self._lock:
            before = self._db.total_changes
            self._write([
                ("DELETE FROM pipelines WHERE touched_at < ?", (horizon,)),
                ("DELETE FROM deliveries WHERE delivered_at < ?", (horizon,)),
                # left behind only by an older version's outbox_done (after a rollback)
                ("DELETE FROM outbox_rest WHERE idempotency_key NOT IN (SELECT idempotency_key FROM outbox)", ()),
            ])
            return self._db.total_changes - before

    def iter_pipelines(self) -> Iterator[tuple]:
        yield from self._query("SELECT project_id, pipeline_id, list_status, list_updated_at, shipped_finish FROM pipelines")

    # -- statistics (status, metrics) -----------------------------------------------------------

    def record_stats(self, counts: Mapping[str, int], values: Mapping[str, str], *,
                     replace_prefix: str | None = None) -> None:
        """One transaction: add ``counts`` to the running totals (keys ``count.<name>``), set ``values``,
        and first drop every key starting with ``replace_prefix`` (a set that is written whole)."""
        statements: list[tuple[str, tuple]] = []
        if replace_prefix:
            statements.append(("DELETE FROM stats WHERE substr(key, 1, ?) = ?", (len(replace_prefix), replace_prefix)))
        statements += [(_ADD_STAT, (f"count.{name}", str(int(n)))) for name, n in counts.items() if n]
        statements += [("INSERT INTO stats VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (key, value)) for key, value in values.items()]
        if statements:
            self._write(statements)

    def set_stats_nowait(self, values: Mapping[str, str]) -> bool:
        """Set ``values`` in one short attempt; False (nothing written) when the store's lock or SQLite's write
        lock is taken. For the daemon's heartbeat: it is written from the main thread, which answers signals and
        feeds the watchdogs, so it must never wait up to busy_timeout; a missed beat is written at the next one."""
        if not self._lock.acquire(timeout=_BUSY_POLL * 10):
            return False
        try:
            try:
                self._db.execute("BEGIN IMMEDIATE")  # SQLite itself waits at most _BUSY_POLL
            except sqlite3.Error as exc:
                if _is_busy(exc):
                    return False
                raise self._error(exc) from exc
            try:
                self._db.executemany("INSERT INTO stats VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                                     list(values.items()))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite rolled back already; the next BEGIN says if the connection is unusable
                raise self._error(exc) from exc
            return True
        finally:
            self._lock.release()

    def stats(self) -> dict[str, str]:
        return dict(self._query("SELECT key, value FROM stats"))

    def last_deliveries(self) -> dict[int, dict[str, object]]:
        """Per project, its newest delivery record: which pipeline was handed over last, how and when."""
        rows = self._query(
            "SELECT project_id, pipeline_id, outcome, delivered_at FROM deliveries "
            "WHERE seq IN (SELECT MAX(seq) FROM deliveries GROUP BY project_id)"
        )
        return {row[0]: {"pipeline_id": row[1], "outcome": row[2], "at": row[3]} for row in rows}

    def recent_latencies(self, since: datetime) -> tuple[list[tuple[float, str]], bool]:
        """(seconds, path) of the deliveries measured since ``since`` (of the newest RECENT_CAPACITY), and whether
        the table is full with its oldest row inside the window (then the window holds only the newest ones)."""
        stamp = format_ts(since)
        rows = self._query("SELECT seconds, path FROM latency_recent WHERE delivered_at >= ?", (stamp,))
        count, oldest = self._query("SELECT COUNT(*), MIN(delivered_at) FROM latency_recent")[0]
        return [(float(seconds), str(path)) for seconds, path in rows], count >= RECENT_CAPACITY and oldest >= stamp
