"""The daemon loop: a poll cycle every ``POLL_INTERVAL`` on a ``schedule`` scheduler, until a signal."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Callable

import schedule

from .errors import StateError
from .shipper import CycleReport, Shipper

log = logging.getLogger(__name__)


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT ask the loop to stop; the cycle in flight ends at the next pipeline boundary."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; finishing the work in flight and stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def run_forever(shipper: Shipper, interval: float, *, on_cycle: Callable[[CycleReport], None] | None = None) -> None:
    """Run a cycle now, then every ``interval`` seconds, until ``shipper.stop`` is set."""
    stop = shipper.stop
    scheduler = schedule.Scheduler()

    def cycle() -> None:
        try:
            report = shipper.run_cycle()
        except StateError:
            raise  # the record of what was shipped is unusable: stop rather than guess
        except Exception:  # a bug or an answer nobody foresaw must not end the daemon
            log.exception("poll cycle failed unexpectedly; trying again in %s s", interval)
            return
        if on_cycle:
            on_cycle(report)

    scheduler.every(max(1, round(interval))).seconds.do(cycle)
    cycle()
    while not stop.is_set():
        scheduler.run_pending()
        idle = scheduler.idle_seconds
        stop.wait(timeout=max(0.05, min(idle if idle is not None else 1.0, 1.0)))
    log.info("stopped")
