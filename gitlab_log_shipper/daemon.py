"""The daemon loop: a poll cycle every ``POLL_INTERVAL`` on a ``schedule`` scheduler, until a signal."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Callable

import schedule

from .errors import StateError
from .shipper import CycleReport, Shipper

log = logging.getLogger(__name__)


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT ask the loop to stop; the cycle in flight gets SHUTDOWN_GRACE seconds to finish."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; finishing the work in flight and stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


class CycleHooks:
    """Observers of the loop (systemd notifications, statistics, metrics: see ``ops.py``). Every method is
    a no-op here; they run in the main thread and must not raise."""

    def cycle_started(self) -> None:
        """A cycle is about to run."""

    def cycle_finished(self, report: CycleReport) -> None:
        """A cycle ran to its end."""

    def cycle_failed(self, error: BaseException) -> None:
        """A cycle ended with an unexpected error (the daemon goes on)."""

    def tick(self) -> None:
        """Called at least once a second, also while a cycle runs in its worker thread (the watchdog)."""


SHUTDOWN_GRACE = 8.0  # seconds the work in flight gets after SIGTERM (systemd's TimeoutStopSec is 30)
MAX_BACKOFF = 900.0  # the longest pause between cycles while GitLab cannot be reached


def _run_cycle(shipper: Shipper, hooks: CycleHooks | None = None) -> CycleReport | None:
    """One cycle in a worker thread, so that a signal is answered within SHUTDOWN_GRACE even while a
    trace download or a POST is in flight. None when the daemon is stopping and the cycle was cut short."""
    hooks = hooks or CycleHooks()
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["report"] = shipper.run_cycle()
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="poll-cycle", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        hooks.tick()
        if shipper.stop.is_set():
            worker.join(SHUTDOWN_GRACE)
            if worker.is_alive():
                # Every state change is a transaction and every file an atomic rename, so leaving now is
                # safe: what was in flight is done again after the restart.
                log.warning("work in flight did not finish within %.0f s; exiting anyway", SHUTDOWN_GRACE)
                logging.shutdown()
                os._exit(0)
            return None
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("report")  # type: ignore[return-value]


def run_forever(shipper: Shipper, interval: float, *, on_cycle: Callable[[CycleReport], None] | None = None,
                hooks: CycleHooks | None = None) -> None:
    """Run a cycle now, then every ``interval`` seconds, until ``shipper.stop`` is set.

    While GitLab cannot be reached at all (down, or the token rejected), the pause doubles each cycle up
    to MAX_BACKOFF instead of hammering it; the first good cycle restores the interval.
    """
    stop = shipper.stop
    scheduler = schedule.Scheduler()
    failures = 0
    hooks = hooks or CycleHooks()

    def cycle() -> None:
        nonlocal failures
        hooks.cycle_started()
        try:
            report = _run_cycle(shipper, hooks)
        except StateError:
            raise  # the record of what was shipped is unusable: stop rather than guess
        except Exception as exc:  # a bug or an answer nobody foresaw must not end the daemon
            log.exception("poll cycle failed unexpectedly; trying again in %s s", interval)
            hooks.cycle_failed(exc)
            return
        if report is None:
            return
        hooks.cycle_finished(report)
        if on_cycle:
            on_cycle(report)
        failures = failures + 1 if report.gitlab_unreachable else 0
        delay = interval if not failures else min(MAX_BACKOFF, interval * 2**failures)
        if failures:
            log.warning("GitLab could not be polled (%d cycle(s) in a row); next attempt in %.0f s", failures, delay)
        scheduler.clear()
        scheduler.every(max(1, round(delay))).seconds.do(cycle)

    cycle()
    while not stop.is_set():
        scheduler.run_pending()
        hooks.tick()
        idle = scheduler.idle_seconds
        stop.wait(timeout=max(0.05, min(idle if idle is not None else 1.0, 1.0)))
    log.info("stopped")
