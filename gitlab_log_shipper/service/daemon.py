"""The daemon loop: a poll cycle every ``POLL_INTERVAL`` on a ``schedule`` scheduler, until a signal; and
the signal handling that every command doing real work shares (:class:`StopSignals`, :func:`run_in_worker`).

Signals (OPERATIONS.md, "Signals"): SIGTERM, SIGINT and SIGHUP all stop gracefully — no new work starts,
the work in flight gets SHUTDOWN_GRACE seconds, the spool is removed. There is no in-place reload: SIGHUP
says so and exits 129, so that systemd's ``Restart=on-failure`` starts the daemon again with its current
settings. The daemon exits 0 after SIGTERM/SIGINT (a requested stop); a command (``run --once``,
``backfill``, ``post``, ``redeliver``) exits 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
A second SIGINT (Ctrl-C twice) stops at once, without waiting for the work in flight.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable, TypeVar

import schedule

from ..errors import StateError, StateUnavailable
from ..shipper import CycleReport, Shipper

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_T = TypeVar("_T")


class StopSignals:
    """While entered (in the main thread): the stop signals set ``stop`` and are remembered; a second
    SIGINT sets ``hurry`` too. The handlers that were there before come back on exit."""

    def __init__(self, stop: threading.Event | None = None, *, daemon: bool = False) -> None:
        self.stop = stop or threading.Event()
        self.hurry = threading.Event()
        self.daemon = daemon
        self.received: signal.Signals | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal.signal() works nowhere else
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is signal.SIG_IGN:
                    continue  # ignored by whoever started us (nohup: SIGHUP; `cmd &` in a script: SIGINT)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if signum == signal.SIGINT:  # Ctrl-C twice: the person at the terminal does not want to wait
                log.warning("received SIGINT again; stopping now, without waiting for the work in flight")
                self.hurry.set()
            else:  # a supervisor repeating SIGTERM does not cut the grace short
                log.info("received %s again; still finishing the work in flight", name)
            return
        self.received = signal.Signals(signum)
        if signum == signal.SIGHUP:
            log.warning("received SIGHUP: gitlab-log-shipper has no reload; finishing the work in flight and "
                        "stopping (exit 129; under systemd, Restart=on-failure starts it again with the current settings)")
        else:
            log.info("received %s; finishing the work in flight and stopping", name)
        self.stop.set()

    def farewell(self) -> str | None:
        """The line a command prints when a signal stopped it (the daemon has logged it already)."""
        if self.received is None or self.daemon:
            return None
        return f"gitlab-log-shipper: stopped by {self.received.name}; what was cut short is done again by the next run"

    def exit_code(self) -> int:
        """0 without a signal; the daemon 0 after SIGTERM/SIGINT; else 128 + the signal (129 for SIGHUP)."""
        if self.received is None or (self.daemon and self.received != signal.SIGHUP):
            return 0
        return 128 + int(self.received)


class CycleHooks:
    """Observers of the loop (systemd notifications, statistics, metrics: see :mod:`.supervision`). Every method is
    a no-op here; they run in the main thread and must not raise."""

    def cycle_started(self) -> None:
        """A cycle is about to run."""

    def cycle_finished(self, report: CycleReport) -> None:
        """A cycle ran to its end."""

    def cycle_failed(self, error: BaseException) -> None:
        """A cycle ended with an error (unexpected, or a busy or full state store); the daemon goes on."""

    def cycle_scheduled(self, delay: float) -> None:
        """The next cycle starts in ``delay`` seconds (longer than POLL_INTERVAL while GitLab cannot be reached)."""

    def tick(self) -> None:
        """Called at least once a second, also while a cycle runs in its worker thread (the watchdog)."""


SHUTDOWN_GRACE = 8.0  # seconds the work in flight gets after SIGTERM (systemd's TimeoutStopSec is 30)
MAX_BACKOFF = 900.0  # the longest pause between cycles while GitLab cannot be reached


def run_in_worker(shipper: Shipper, work: Callable[[], _T], hooks: CycleHooks | None = None,
                  signals: StopSignals | None = None) -> _T | None:
    """``work()`` in a worker thread, so that the main thread answers signals within SHUTDOWN_GRACE even
    while a trace download or a POST is in flight. None when ``shipper.stop`` was set and the work was cut
    short. Work still running when the grace is over (or at a second SIGINT) is abandoned: the spool is
    removed and the process exits with ``signals.exit_code()``."""
    hooks = hooks or CycleHooks()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc

    worker = threading.Thread(target=target, name=getattr(work, "__name__", "work"), daemon=True)
    worker.start()
    stopping = False
    while worker.is_alive():
        worker.join(0.2)
        hooks.tick()
        if shipper.stop.is_set():
            stopping = True
            deadline = time.monotonic() + SHUTDOWN_GRACE
            while worker.is_alive() and time.monotonic() < deadline and not (signals and signals.hurry.is_set()):
                worker.join(0.1)
            if worker.is_alive():
                # Every state change is a transaction and every file an atomic rename, so leaving now is
                # safe: what was in flight is done again after the restart.
                if not (signals and signals.hurry.is_set()):
                    log.warning("work in flight did not finish within %.0f s; exiting anyway", SHUTDOWN_GRACE)
                exit_now(shipper.spool_root, signals.exit_code() if signals else 0,
                          signals.farewell() if signals else None)
    if "error" in box:
        raise box["error"]
    return None if stopping else box.get("result")


def exit_now(spool: Path, code: int, farewell: str | None) -> None:
    """End the process with worker threads still running: no interpreter shutdown (it would wait for them),
    but the spool removed (it holds copies of job logs) and what was printed flushed. The kernel releases
    STATE_DIR/lock; an SQLite transaction in flight is rolled back on the next open."""
    shutil.rmtree(spool, ignore_errors=True)
    logging.shutdown()
    try:
        if farewell:
            print(farewell, file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except (OSError, ValueError):
        pass  # a closed or broken stream: nothing more to tell
    os._exit(code)


def run_forever(shipper: Shipper, interval: float | None = None, *, on_cycle: Callable[[CycleReport], None] | None = None,
                hooks: CycleHooks | None = None, signals: StopSignals | None = None) -> None:
    """Run a cycle now, then every ``interval`` seconds (None: ``shipper.poll_interval``, read after each cycle: its
    default depends on how changes are found), until ``shipper.stop`` is set.

    A cycle that fails — an unexpected error, a busy state store, a full disk — is logged and the next one
    runs on schedule, the first cycle included. Only a state store that cannot be used (StateError) ends
    the loop: the record of what was shipped is unusable, so stop rather than guess.

    While GitLab cannot be reached at all (down, or the token rejected), the pause doubles each cycle up
    to MAX_BACKOFF instead of hammering it; the first good cycle restores the interval.
    """
    stop = shipper.stop
    scheduler = schedule.Scheduler()
    failures = 0
    hooks = hooks or CycleHooks()

    def cycle() -> None:
        nonlocal failures
        delay = base = interval if interval is not None else shipper.poll_interval
        hooks.cycle_started()
        try:
            report = run_in_worker(shipper, shipper.run_cycle, hooks, signals)
        except StateUnavailable as exc:  # busy or full: nothing was written, the next cycle tries again
            log.error("poll cycle stopped: %s; next cycle in %.0f s", exc, delay)
            hooks.cycle_failed(exc)
        except StateError:
            raise
        except Exception as exc:  # a bug or an answer nobody foresaw must not end the daemon
            log.exception("poll cycle failed unexpectedly; trying again in %.0f s", delay)
            hooks.cycle_failed(exc)
        else:
            if report is not None:
                hooks.cycle_finished(report)
                if on_cycle:
                    on_cycle(report)
                failures = failures + 1 if report.gitlab_unreachable else 0
                if interval is None:
                    delay = base = shipper.poll_interval  # the first cycle may have decided REST or GraphQL
                if failures:
                    delay = min(MAX_BACKOFF, base * 2**failures)
                    log.warning("GitLab could not be polled (%d cycle(s) in a row); next attempt in %.0f s",
                                failures, delay)
        scheduler.clear()
        scheduler.every(max(1, round(delay))).seconds.do(cycle)
        hooks.cycle_scheduled(max(1, round(delay)))

    if not stop.is_set():
        cycle()
    while not stop.is_set():
        scheduler.run_pending()
        hooks.tick()
        idle = scheduler.idle_seconds
        stop.wait(timeout=max(0.05, min(idle if idle is not None else 1.0, 1.0)))
    log.info("stopped")
