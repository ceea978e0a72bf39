"""Supervision: what the daemon does around its poll cycles for whoever supervises it (systemd, a container
runtime, the people operating it).

* **systemd** (``Type=notify``, see :mod:`notify`): ``READY=1`` once started (state opened, lock held,
  outbox reconciled) — just before the first cycle; ``STATUS=`` with a one-line summary when a cycle
  starts and ends; ``STOPPING=1`` as soon as SIGTERM arrives; ``WATCHDOG=1`` every half
  ``WatchdogSec=``.
* **The watchdog and a wedged cycle.** Keep-alives are sent from the main thread (the scheduler loop,
  which also waits for the cycle's worker thread), never from the worker. So a stuck main loop stops
  them at once. A cycle may legitimately take long (the first poll of hundreds of projects, a 200 MB
  log), so its length is no sign of trouble; *no progress* is. Every answer from GitLab or from the
  receiver counts as progress (a response hook on both HTTP sessions), and so does every line the cycle
  logs (a project that failed after its retries is progress too: GitLab down is not a wedged daemon).
  When the cycle in flight has shown none for :data:`STALL_LIMIT` seconds, the keep-alives stop, systemd kills the daemon
  (``WatchdogSignal``, SIGABRT: ``faulthandler`` prints every thread's stack to the journal first) and
  restarts it (``Restart=on-failure``). That is safe: every state change is a transaction, work in
  flight is redone.
* **The self-watchdog**, for supervisors without one (Docker, a shell, Kubernetes without a liveness probe):
  when the cycle in flight has shown no progress for :func:`health.wedged_after` seconds (twice
  HEALTH_MAX_AGE, at least 3 × POLL_INTERVAL), the daemon logs an ERROR and exits 1 at once, whatever
  systemd's watchdog is doing (its STALL_LIMIT is longer). Every chunk of a body read counts as progress
  too, so a long download is not silence.
* **The heartbeat** for ``health`` (:mod:`health`): the time a cycle starts and, at most every
  HEARTBEAT_EVERY seconds while it shows progress, the time of its last progress, in the stats table.
  Written from the main thread in one short attempt (a busy store skips a beat, never waits).
* **Statistics** (:mod:`stats`) in the state store after every cycle, for ``status``.
* **Metrics** (:mod:`metrics`): the Prometheus textfile, when ``METRICS_TEXTFILE`` is set.

Failures here (a metrics folder that is not writable, a full disk) are logged and never end the daemon.
"""

from __future__ import annotations

import faulthandler
import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any, Callable, NoReturn

from ..config.settings import Config
from ..shipper import OUTBOX_WAITING, CycleReport, Shipper
from ..timeutil import format_ts, utcnow
from . import health
from .daemon import CycleHooks, exit_now
from .metrics import render as render_metrics, write_textfile
from .notify import Notifier
from .stats import record_cycle
from .status import collect

log = logging.getLogger(__name__)

STALL_LIMIT = 30 * 60.0  # seconds without any HTTP answer during a cycle before the watchdog gives up on it


class Supervision(CycleHooks):
    def __init__(
        self,
        config: Config,
        shipper: Shipper,
        notifier: Notifier | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        stall_limit: float = STALL_LIMIT,
    ) -> None:
        self.config = config
        self.shipper = shipper
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.monotonic = monotonic
        self.stall_limit = stall_limit
        self._started_at: datetime | None = None
        self._in_flight = False
        self._progress = monotonic()
        self._last_keepalive: float | None = None
        self._stall_reported = False
        self._stopping_sent = False
        self._beat_written: float | None = None  # monotonic time of the progress the last heartbeat recorded
        self._beat_at = monotonic()  # when the last heartbeat was written
        self._unwritten: dict[str, str] = {}  # stamps a busy store did not take yet (retried about once a second)
        for session in self._sessions():
            session.hooks["response"].append(self._on_response)

    def _sessions(self) -> list[Any]:
        sessions = [self.shipper.source.gl.session] if hasattr(self.shipper.source, "gl") else []
        if self.shipper.poster is not None:
            sessions.append(self.shipper.poster.session)
        return sessions

    def _on_response(self, response: Any, *args: Any, **kwargs: Any) -> None:
        """requests response hook (runs in the worker thread): a sign of progress, and so is every chunk of its
        body read later (the hook runs before the body is read, streamed or not)."""
        self._progress = self.monotonic()
        raw = getattr(response, "raw", None)
        if raw is not None and hasattr(raw, "read"):
            _count_reads(raw, self._beat)

    def _beat(self) -> None:
        self._progress = self.monotonic()

    # -- the daemon's life ----------------------------------------------------------------------

    def ready(self) -> None:
        """The daemon is about to run its first cycle (not called for ``run --once``)."""
        logging.getLogger().addHandler(_LogProgress(self._on_response))
        self.notifier.ready("started; first poll cycle running")
        self._last_keepalive = self.monotonic()
        config = self.config
        log.info("gitlab-log-shipper started (mode %s, %s)%s", config.mode, config.poll_interval_text,
                 "; notifying systemd" if self.notifier.enabled else "")

    def cycle_started(self) -> None:
        self._started_at = self.clock()
        self._progress = self.monotonic()
        self._in_flight = True
        self._stall_reported = False
        stamp = format_ts(self._started_at)
        self._write_heartbeat({health.CYCLE_STARTED: stamp, health.PROGRESS: stamp,
                               health.INTERVAL: f"{self.shipper.poll_interval:g}"}, self._progress)
        self.notifier.status(f"poll cycle running since {self._started_at:%H:%M:%S} UTC")

    def cycle_finished(self, report: CycleReport) -> None:
        self._in_flight = False
        finished = self.clock()
        started = self._started_at or finished
        duration = (finished - started).total_seconds()
        self._guarded("recording the cycle's statistics", lambda: record_cycle(
            self.shipper.state, self.config, report, started=started, finished=finished,
            rate_limit_remaining=getattr(self.shipper.source, "rate_limit_remaining", None),
            projects=self.shipper.known_projects,
            # api_mode None: not decided yet (the probe failed), and this cycle listed with REST
            detection=(getattr(self.shipper, "api_mode", None) or "rest", getattr(self.shipper, "api_reason", ""))))
        self.write_metrics()
        outbox = f"; outbox {report.counts[OUTBOX_WAITING]}" if self.shipper.delivery is not None else ""
        errors = f"; {len(report.project_errors)} project error(s)" if report.project_errors else ""
        self.notifier.status(f"last cycle {finished:%H:%M:%S} UTC, {duration:.1f} s: {report.summary()}{outbox}{errors}")

    def cycle_failed(self, error: BaseException) -> None:
        self._in_flight = False
        self._write_heartbeat({health.CYCLE_FAILED: format_ts(self.clock())}, self._progress)
        self.notifier.status(f"last cycle failed unexpectedly ({error.__class__.__name__}); retrying on schedule")

    def cycle_scheduled(self, delay: float) -> None:
        """For ``health``: a pause longer than POLL_INTERVAL (backing off from an unreachable GitLab) is no stall."""
        self._write_heartbeat({health.NEXT_CYCLE: format_ts(self.clock() + timedelta(seconds=delay))}, self._progress)

    def stopping(self) -> None:
        """Shutdown has begun (SIGTERM): tell systemd once."""
        if not self._stopping_sent:
            self._stopping_sent = True
            self.notifier.stopping("stopping: finishing the work in flight")

    def tick(self) -> None:
        if self.shipper.stop.is_set():
            self.stopping()
            return
        self._watch_self()
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        now = self.monotonic()
        if self._last_keepalive is not None and now - self._last_keepalive < interval:
            return
        if self._in_flight and now - self._progress >= self.stall_limit:
            if not self._stall_reported:
                self._stall_reported = True
                log.error("the poll cycle has shown no progress (no answer from GitLab or the receiver, nothing logged) for %.0f s; "
                          "no longer feeding the systemd watchdog, which will restart the daemon", now - self._progress)
            return
        self._last_keepalive = now
        self.notifier.watchdog()

    # -- heartbeat and self-watchdog ------------------------------------------------------------

    def wedged_after(self) -> float:
        """The self-watchdog's limit, for the POLL_INTERVAL in use (it may change after the first cycle)."""
        return health.wedged_after(self.config, self.shipper.poll_interval)

    def _watch_self(self) -> None:
        """In the main thread, about once a second: record progress for ``health``; exit when wedged."""
        if self._unwritten and self.monotonic() - self._beat_at >= 1.0:
            # A stamp the store was too busy for (a heartbeat never waits): the next cycle's time is written once per
            # pause, so without this a busy moment would leave `health` blind to a long back-off.
            self._write_heartbeat({}, self._beat_written or self._progress)
        if not self._in_flight:
            return
        now, progress = self.monotonic(), self._progress
        quiet, limit = now - progress, self.wedged_after()
        if quiet >= limit:
            self._exit_wedged(f"the poll cycle has shown no progress (no answer from GitLab or the receiver, nothing logged) "
                       f"for {quiet:.0f} s, the self-watchdog's limit (2 x HEALTH_MAX_AGE, at least 3 x POLL_INTERVAL: "
                       f"{limit:.0f} s; OPERATIONS.md, 'Containers and Kubernetes'); exiting 1 so that the supervisor starts it again")
            return
        every = min(health.HEARTBEAT_EVERY, health.max_age(self.config, self.shipper.poll_interval) / 3)
        if progress != self._beat_written and now - self._beat_at >= every:
            at = self.clock() - timedelta(seconds=max(0.0, quiet))
            self._write_heartbeat({health.PROGRESS: format_ts(at)}, progress)

    def _write_heartbeat(self, values: dict[str, str], progress: float) -> None:
        """Write these stamps (and any the store was too busy for before) without waiting; kept for a retry."""
        self._beat_at = self.monotonic()
        values = {**self._unwritten, **values}
        try:
            if self.shipper.state.set_stats_nowait(values):
                self._beat_written = progress
                self._unwritten = {}
                return
        except Exception as exc:  # a full disk or a broken store: the cycle itself will say so
            log.debug("heartbeat not written: %s", exc)
        self._unwritten = values

    def _exit_wedged(self, why: str) -> NoReturn:
        """Log why, print every thread's stack (where the cycle is stuck, as systemd's SIGABRT would), exit 1."""
        log.error("%s", why)
        try:
            faulthandler.dump_traceback(all_threads=True)
        except (AttributeError, ValueError, OSError):
            pass  # stderr is not a real file: no stacks, the ERROR line says enough
        exit_now(self.shipper.spool_root, 1, None)
        raise SystemExit(1)  # not reached: exit_now ends the process

    # -- metrics --------------------------------------------------------------------------------

    def write_metrics(self) -> None:
        path = self.config.metrics_textfile
        if path is None:
            return
        def write() -> None:
            now = self.clock()
            write_textfile(path, render_metrics(collect(self.config, self.shipper.state, now), now))
        self._guarded(f"writing METRICS_TEXTFILE={path}", write)

    def _guarded(self, what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:  # operators' extras must never end the daemon
            log.error("%s failed: %s", what, exc)


def _count_reads(raw: Any, beat: Callable[[], None]) -> None:
    """Make every read of this urllib3 response's body call ``beat``. Instance attributes shadow the methods:
    ``read1`` is what job-log downloads use (gitlab/download.py), ``read`` what ``stream()`` and requests'
    ``content`` use, ``read_chunked`` what ``stream()`` uses for a chunked body."""
    for name in ("read", "read1"):
        method = getattr(raw, name, None)
        if method is not None:
            setattr(raw, name, _beating(method, beat))
    chunked = getattr(raw, "read_chunked", None)
    if chunked is not None:
        def counted_chunks(*args: Any, **kwargs: Any) -> Any:
            for chunk in chunked(*args, **kwargs):
                beat()
                yield chunk
        raw.read_chunked = counted_chunks


def _beating(method: Callable[..., Any], beat: Callable[[], None]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        data = method(*args, **kwargs)
        beat()
        return data
    return counted


class _LogProgress(logging.Handler):
    """Every log record from a thread other than the main one (the cycle's worker) is a sign of progress."""

    def __init__(self, beat: Callable[..., None]) -> None:
        super().__init__(logging.NOTSET)
        self.beat = beat
        self.main = threading.main_thread().ident

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.main:
            self.beat(None)
