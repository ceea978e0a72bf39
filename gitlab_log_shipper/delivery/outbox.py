"""At-least-once delivery: POST a document now, or keep it on disk until the receiver takes it.

* **Outbox** (``STATE_DIR/outbox/``): a document the receiver did not accept after the HTTP adapter's
  retries (no answer, 401/403/408/429/5xx) is moved here and recorded in the state store in the same
  step that marks its pipeline finish as handed off, so the cursor can move on. Every cycle the outbox is
  drained oldest first, CONCURRENCY documents at a time, each document on its own exponential backoff
  (with jitter, at least the receiver's ``Retry-After``, at most OUTBOX_RETRY_MAX), so one document the
  receiver keeps failing on does not hold the others back.
* **The receiver as a whole** is taken to be down after no answer, a 429, or RECEIVER_DOWN_AFTER failures
  in a row. Then new documents go straight to the outbox instead of each waiting through the adapter's
  retries (new pipelines are never held back for more than one cycle), and the receiver is *probed*: one
  document (the one due soonest) per poll cycle — the pause before the next probe is a quarter to half of
  POLL_INTERVAL, or the receiver's ``Retry-After`` if longer (up to OUTBOX_RETRY_MAX). The documents' own
  backoff does not grow while they merely wait. As soon as one document is accepted after an outage, or
  by a new process that has not heard from the receiver yet (``run --once`` from cron), every queued
  document is due at once, whatever its backoff, and the outbox drains with CONCURRENCY POSTs at a time:
  the backlog arrives within two poll intervals of the receiver's return.
* **Dead letters** (``STATE_DIR/dead-letter/``): a document the receiver rejected for good (400, 404, 413,
  422, … — see :mod:`poster`) or that outlived ``OUTBOX_MAX_AGE`` is kept there with a ``.meta.json``
  saying why, and is not retried in a loop. ``redeliver`` sends them again once the cause is fixed.
* **Limits**: above ``OUTBOX_MAX_BYTES`` the shipper stops taking new pipelines (they stay in GitLab and
  the cursor waits) and says so at ERROR level every cycle; nothing is dropped.

Latency (:mod:`latency`): each 2xx is timed against the pipeline's rest time (``DocumentInfo.rest_at``), which
travels with a queued document (``outbox_rest``) and with a dead letter (its ``.meta.json``), so that the
delivery users waited for is measured however the document got there; the sample is written in the transaction
that records the delivery.

Crash safety: a document file is fsynced and renamed into the outbox before the transaction that records
it; a crash in between leaves an orphan file that :meth:`Delivery.reconcile` removes at start (its
pipeline was not recorded, so it is shipped again). A crash between a 2xx and the state update re-sends
the document later with the same ``Idempotency-Key``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from ..config.settings import Config
from ..state.latency import DIRECT, OUTBOX, REDELIVERED, Sample, SkewReporter, measure
from ..state.store import OutboxEntry, StateStore
from ..timeutil import format_ts, parse_ts
from .files import atomic_write, fsync_dir
from .poster import DELIVERED, REJECTED, ApiPoster, PostResult

log = logging.getLogger(__name__)

# Outcomes of handing a document over.
# Failed documents in a row after which the receiver as a whole is taken to be down.
RECEIVER_DOWN_AFTER = 3

SENT = "delivered"
QUEUED = "queued"
DEAD_LETTER = "dead_letter"


@dataclass(frozen=True)
class DocumentInfo:
    """Who a document is about; enough to log, queue, dead-letter and de-duplicate it."""

    project_id: int
    pipeline_id: int
    finish: str
    idempotency_key: str
    # When the pipeline came to rest by GitLab's clock (latency.rest_time: finished_at, updated_at for skipped and
    # manual pipelines); the start of its finish -> delivered latency. None: not measured.
    rest_at: str | None = None


class Delivery:
    """Owns the outbox, the dead-letter folder and the receiver's backoff state."""

    def __init__(
        self,
        config: Config,
        state: StateStore,
        poster: ApiPoster,
        *,
        clock: Callable[[], datetime],
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.state = state
        self.poster = poster
        self.clock = clock
        self.jitter = jitter
        self.outbox_dir = config.state_dir / "outbox"
        self.dead_letter_dir = config.state_dir / "dead-letter"
        self.outbox_dir.mkdir(parents=True, exist_ok=True)
        self.dead_letter_dir.mkdir(parents=True, exist_ok=True)
        self.consecutive_failures = 0
        self.backoff_until: datetime | None = None  # while the receiver is down: no POST before this time
        # What this process knows of the receiver: None nothing yet (a new process: it may have been down
        # for hours), True it accepts documents, False it is down (probed again at backoff_until).
        self.receiver_up: bool | None = None
        self._catch_up = False  # it came back: every queued document is due, whatever its own backoff
        # New documents (send) are timed from their rest time to the receiver's 2xx; backfill and post switch this
        # off (their latency would be the age of the window, or an operator's reaction: see state/latency.py).
        self.measure_new = True
        self.skew = SkewReporter()  # clock skew logged once per poll cycle (drain starts each cycle)
        self._lock = threading.Lock()  # the health above and drain's counts; documents are sent concurrently

    # -- receiver health ------------------------------------------------------------------------

    def backing_off(self) -> bool:
        """The receiver as a whole is considered down: new documents go straight to the outbox."""
        until = self.backoff_until
        return until is not None and self.clock() < until

    def _delay(self, attempts: int, retry_after: float | None) -> float:
        """Exponential backoff from min(POLL_INTERVAL, 60) s up to OUTBOX_RETRY_MAX, with "equal jitter"
        (between half and all of the step), and never shorter than the receiver's Retry-After."""
        base = min(self.config.poll_interval, 60.0)
        delay = min(self.config.outbox_retry_max, base * 2 ** (max(1, attempts) - 1))
        delay *= 0.5 + 0.5 * self.jitter()
        if retry_after:
            delay = max(delay, min(retry_after, self.config.outbox_retry_max))
        return delay

    def _probe_delay(self, retry_after: float | None) -> float:
        """While the receiver is down: the pause before the next probe. A quarter to half of POLL_INTERVAL
        (jittered), so that each poll cycle probes it once — not once per document, and not once per
        OUTBOX_RETRY_MAX; at least its Retry-After (honoured up to OUTBOX_RETRY_MAX)."""
        delay = self.config.poll_interval * (0.25 + 0.25 * self.jitter())
        if retry_after:
            delay = max(delay, min(retry_after, self.config.outbox_retry_max))
        return delay

    def _failed(self, result: PostResult) -> None:
        """Count a document the receiver did not take. One failing document may be the document's fault (a
        payload that crashes the receiver): only RECEIVER_DOWN_AFTER failures in a row, or a failure that
        speaks for the whole receiver (no answer, 429), put every delivery on hold until the next probe."""
        receiver_wide = result.status is None or result.status == 429
        with self._lock:
            self.consecutive_failures += 1
            if not receiver_wide and self.consecutive_failures < RECEIVER_DOWN_AFTER:
                return
            delay = self._probe_delay(result.retry_after)
            self.backoff_until = self.clock() + timedelta(seconds=delay)
            self.receiver_up = False
        log.warning("receiver unavailable (%s); documents wait in the outbox; next attempt in %.0f s",
                    _reason(result), delay)

    def _recovered(self) -> None:
        """A document was accepted. After an outage (or in a process that had not heard from the receiver
        yet) every queued document becomes due at once."""
        with self._lock:
            was = self.receiver_up
            self.consecutive_failures = 0
            self.backoff_until = None
            self.receiver_up = True
            if was is not True:
                self._catch_up = True
        if was is False:
            log.info("receiver accepts documents again; every document in the outbox is due now")

    def _latency(self, rest_at: str | None, path: str, pipeline_id: int, project_id: int) -> Sample | None:
        """The latency of a document the receiver just accepted (now, by our clock); skew is reported."""
        sample = measure(rest_at, self.clock(), path)
        self.skew.note(sample, pipeline_id, project_id)
        return sample

    # -- handing over a new document ------------------------------------------------------------

    def send(self, document: Path, info: DocumentInfo, list_row: tuple[str, str] | None) -> tuple[str, PostResult | None]:
        """POST a new document (or queue it at once while the receiver backs off) and record the outcome.

        ``document`` lives in the spool on the same file system as STATE_DIR; it is moved, not copied,
        into the outbox or dead-letter folder when it has to stay.
        """
        now = self.clock()
        if not self.measure_new:
            info = replace(info, rest_at=None)  # nor later, from the outbox or as a dead letter
        if self.backing_off():
            self._enqueue(document, info, list_row, None)
            return QUEUED, None
        result = self.poster.post_file(document, pipeline_id=info.pipeline_id, project_id=info.project_id,
                                       idempotency_key=info.idempotency_key)
        if result.verdict == DELIVERED:
            latency = self._latency(info.rest_at, DIRECT, info.pipeline_id, info.project_id)
            self._recovered()
            self.state.record_shipped(info.project_id, info.pipeline_id, info.finish, info.idempotency_key,
                                      SENT, now, list_row, latency=latency)
            return SENT, result
        if result.verdict == REJECTED:
            self._dead_letter(document, info, result, reason="rejected by the receiver")
            self.state.record_shipped(info.project_id, info.pipeline_id, info.finish, info.idempotency_key,
                                      DEAD_LETTER, now, list_row)
            return DEAD_LETTER, result
        self._enqueue(document, info, list_row, result)
        self._failed(result)
        return QUEUED, result

    def _enqueue(self, document: Path, info: DocumentInfo, list_row: tuple[str, str] | None,
                 result: PostResult | None) -> None:
        name = f"{info.pipeline_id}-{info.idempotency_key}{''.join(document.suffixes)}"  # .json or .json.gz
        target = self.outbox_dir / name
        size = document.stat().st_size
        _fsync_file(document)
        os.replace(document, target)
        fsync_dir(self.outbox_dir)
        now = self.clock()
        if result is None:  # queued without a try while the receiver backs off
            next_attempt = self.backoff_until or now
        else:
            next_attempt = now + timedelta(seconds=self._delay(1, result.retry_after))
        entry = OutboxEntry(info.idempotency_key, info.project_id, info.pipeline_id, info.finish, name, size,
                            format_ts(now), 0 if result is None else 1,
                            None if result is None else result.status, None if result is None else _reason(result),
                            format_ts(next_attempt), info.rest_at)
        self.state.enqueue(entry, self.clock(), list_row)
        log.info("pipeline %s (project %s): kept in the outbox (%d bytes)", info.pipeline_id, info.project_id, size)

    # -- the outbox -----------------------------------------------------------------------------

    def drain(self, budget_seconds: float, *, stop: threading.Event | None = None) -> dict[str, int]:
        """Send the queued documents that are due, CONCURRENCY at a time, oldest first, until none is left,
        the receiver looks down, ``stop`` is set or the budget is spent (so new pipelines wait at most about
        one cycle). A document that fails again waits longer (its own backoff) without holding the others
        back. While the receiver is down, or not heard from yet by this process, one document goes first as
        a probe; once one is accepted after an outage, every queued document is due, whatever its backoff.
        Returns how many were delivered, dead-lettered and left waiting after a failed attempt.

        Called once at the start of every poll cycle, which is also where the once-per-cycle report of clock
        skew starts over."""
        self.skew.new_cycle()
        counts = {SENT: 0, DEAD_LETTER: 0, QUEUED: 0}
        self.expire()
        if self.backing_off():
            return counts
        waiting = self.state.outbox()
        if not waiting:
            return counts
        deadline = self.clock() + timedelta(seconds=budget_seconds)
        if self.receiver_up is not True:
            # the probe: the document due soonest (ISO timestamps sort as times; ties keep the queue order)
            for probe in sorted(waiting, key=lambda entry: entry.next_attempt_at):
                waiting.remove(probe)
                if self._drain_one(probe, counts) is not None:
                    break  # a POST was made (None: its file was missing; take the next)
            if self.backing_off() or (stop is not None and stop.is_set()):
                return counts
        with self._lock:
            catch_up = self._catch_up
        if not catch_up:
            now = self.clock()
            waiting = [entry for entry in waiting if parse_ts(entry.next_attempt_at) <= now]
        if self._drain_all(waiting, counts, deadline, stop) and catch_up:
            with self._lock:
                self._catch_up = False  # everything that waited had its try
        return counts

    def _drain_all(self, entries: list[OutboxEntry], counts: dict[str, int], deadline: datetime,
                   stop: threading.Event | None) -> bool:
        """``entries`` in order, CONCURRENCY at a time (the same as fresh shipping); True when every one was
        tried, False when the receiver went down, ``stop`` was set or the budget ran out first."""
        todo = iter(entries)
        taking = threading.Lock()

        def worker() -> None:
            while not ((stop is not None and stop.is_set()) or self.clock() >= deadline or self.backing_off()):
                with taking:
                    entry = next(todo, None)
                if entry is None:
                    return
                self._drain_one(entry, counts)

        workers = min(self.config.concurrency, len(entries))
        if workers <= 1:
            worker()
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="outbox") as pool:
                futures = [pool.submit(worker) for _ in range(workers)]
            for future in futures:
                future.result()  # a state store error is raised here, after the others finished theirs
        with taking:
            return next(todo, None) is None

    def _drain_one(self, entry: OutboxEntry, counts: dict[str, int]) -> str | None:
        """POST one queued document and record the outcome; its verdict, None when its file was missing."""
        path = self.outbox_dir / entry.file
        if not path.is_file():
            self._lost(entry)
            return None
        result = self.poster.post_file(path, pipeline_id=entry.pipeline_id, project_id=entry.project_id,
                                       idempotency_key=entry.idempotency_key)
        if result.verdict == DELIVERED:
            latency = self._latency(entry.rest_at, OUTBOX, entry.pipeline_id, entry.project_id)
            self._recovered()
            self.state.outbox_done(entry, SENT, self.clock(), latency=latency)
            path.unlink(missing_ok=True)
            outcome = SENT
            log.info("pipeline %s (project %s): delivered from the outbox after %d earlier attempt(s)",
                     entry.pipeline_id, entry.project_id, entry.attempts)
        elif result.verdict == REJECTED:
            info = DocumentInfo(entry.project_id, entry.pipeline_id, entry.finish, entry.idempotency_key, entry.rest_at)
            self._dead_letter(path, info, result, reason="rejected by the receiver")
            self.state.outbox_done(entry, DEAD_LETTER, self.clock())
            outcome = DEAD_LETTER
        else:
            next_attempt = self.clock() + timedelta(seconds=self._delay(entry.attempts + 1, result.retry_after))
            self.state.outbox_attempt_failed(entry.idempotency_key, result.status, _reason(result), next_attempt)
            self._failed(result)
            outcome = QUEUED
        with self._lock:
            counts[outcome] += 1
        return result.verdict

    def expire(self) -> int:
        """Move documents older than OUTBOX_MAX_AGE to the dead-letter folder (kept, loudly)."""
        horizon = self.clock() - timedelta(seconds=self.config.outbox_max_age)
        moved = 0
        for entry in self.state.outbox():
            if parse_ts(entry.queued_at) >= horizon:
                break  # oldest first: the rest are younger
            path = self.outbox_dir / entry.file
            if path.is_file():
                info = DocumentInfo(entry.project_id, entry.pipeline_id, entry.finish, entry.idempotency_key,
                                    entry.rest_at)
                failure = PostResult(entry.last_status, 0, "", entry.last_error)
                self._dead_letter(path, info, failure, reason=f"undelivered for longer than OUTBOX_MAX_AGE "
                                  f"({self.config.outbox_max_age:.0f} s) after {entry.attempts} attempt(s)")
            self.state.outbox_done(entry, DEAD_LETTER, self.clock())
            moved += 1
        return moved

    def outbox_full(self) -> bool:
        """True when the outbox holds OUTBOX_MAX_BYTES or more: stop taking new pipelines (they wait in GitLab)."""
        count, size, _ = self.state.outbox_stats()
        if size < self.config.outbox_max_bytes:
            return False
        log.error("OUTBOX FULL: %d document(s), %d bytes >= OUTBOX_MAX_BYTES=%d; not taking new pipelines until "
                  "the receiver accepts documents again (nothing is dropped: they wait in GitLab)",
                  count, size, self.config.outbox_max_bytes)
        return True

    def _lost(self, entry: OutboxEntry) -> None:
        log.error("outbox file %s of pipeline %s (project %s) is missing; resend it with: gitlab-log-shipper post "
                  "--pipeline-id %s --project %s", entry.file, entry.pipeline_id, entry.project_id,
                  entry.pipeline_id, entry.project_id)
        self.state.outbox_done(entry, "lost", self.clock())

    def reconcile(self) -> None:
        """At start: remove outbox files no row refers to (a crash between rename and commit). Files younger
        than a minute are left alone: a concurrent ``post`` may be between its rename and its commit."""
        known = {entry.file for entry in self.state.outbox()}
        recent = self.clock().timestamp() - 60
        for path in self.outbox_dir.iterdir():
            if path.name not in known and path.stat().st_mtime < recent:
                log.info("removing orphan outbox file %s (its pipeline was never recorded and is shipped again)", path.name)
                path.unlink(missing_ok=True)

    # -- dead letters ---------------------------------------------------------------------------

    def _dead_letter(self, document: Path, info: DocumentInfo, result: PostResult, *, reason: str) -> Path:
        stem = f"{info.pipeline_id}-{info.idempotency_key}"
        target = self.dead_letter_dir / f"{stem}{''.join(document.suffixes)}"  # .json or .json.gz
        _fsync_file(document)
        os.replace(document, target)
        meta = {
            "pipeline_id": info.pipeline_id,
            "project_id": info.project_id,
            "finish": info.finish,
            "idempotency_key": info.idempotency_key,
            "reason": reason,
            "status": result.status,
            "error": result.error,
            "response": result.response_text[:1000],
            "dead_lettered_at": format_ts(self.clock()),
            "document": target.name,
            "rest_at": info.rest_at,  # when the pipeline came to rest: redeliver measures its latency from it
        }
        atomic_write(self.dead_letter_dir / f"{stem}.meta.json", json.dumps(meta, indent=2).encode("utf-8"))
        log.error("pipeline %s (project %s): %s (%s); kept in %s — fix the cause, then run "
                  "`gitlab-log-shipper redeliver`", info.pipeline_id, info.project_id, reason, _reason(result), target)
        return target

    def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead letter's metadata, oldest first."""
        letters = []
        for meta_path in sorted(self.dead_letter_dir.glob("*.meta.json")):
            try:
                letters.append({**json.loads(meta_path.read_text("utf-8")), "_meta": meta_path})
            except (OSError, ValueError) as exc:
                log.error("unreadable dead-letter metadata %s: %s", meta_path, exc)
        return sorted(letters, key=lambda m: str(m.get("dead_lettered_at", "")))

    def redeliver(self, pipeline_id: int | None = None) -> list[tuple[dict[str, Any], PostResult]]:
        """POST dead letters again (all, or one pipeline's). Delivered ones are removed; others stay, updated."""
        results = []
        for meta in self.dead_letters():
            if pipeline_id is not None and meta.get("pipeline_id") != pipeline_id:
                continue
            meta_path: Path = meta.pop("_meta")
            document = meta_path.with_name(str(meta.get("document") or meta_path.name.replace(".meta.json", ".json")))
            if not document.is_file():
                log.error("dead letter %s has no document next to it; skipped", meta_path.name)
                continue
            result = self.poster.post_file(document, pipeline_id=int(meta["pipeline_id"]),
                                           project_id=int(meta["project_id"]), idempotency_key=str(meta["idempotency_key"]))
            results.append((meta, result))
            if result.verdict == DELIVERED:
                rest_at = meta.get("rest_at")
                latency = self._latency(rest_at if isinstance(rest_at, str) else None, REDELIVERED,
                                        int(meta["pipeline_id"]), int(meta["project_id"]))
                self.state.record_shipped(int(meta["project_id"]), int(meta["pipeline_id"]), str(meta["finish"]),
                                          str(meta["idempotency_key"]), "redelivered", self.clock(), latency=latency)
                document.unlink(missing_ok=True)
                meta_path.unlink(missing_ok=True)
            else:
                meta.update(status=result.status, error=result.error, response=result.response_text[:1000],
                            last_redelivery_at=format_ts(self.clock()))
                atomic_write(meta_path, json.dumps(meta, indent=2).encode("utf-8"))
                if result.verdict != REJECTED:
                    break  # the receiver is down: the rest would fail the same way
        return results


def _reason(result: PostResult) -> str:
    if result.status is None:
        return result.error or "no answer"
    return f"HTTP {result.status}" + (f" {result.error}" if result.error else "")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
