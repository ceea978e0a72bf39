"""Progress of a ``backfill``: pipelines done of those found, an estimate of the time left, a closing count.

A backfill lists and ships at the same time (``Shipper.backfill``), so the number of pipelines is not known at the
start: it grows while the projects are listed, shown as ``12/60+`` until the last page came, and it shrinks by the
listed pipelines that turn out to have come to rest outside the window. The time left is estimated only once
everything is listed (before that it is ``ETA …``).

On a terminal (stderr is a TTY) one status line is redrawn in place on stderr, and only pipelines that did not go
through (or were deleted in GitLab, or filtered) are printed as lines of their own; the application log on stderr
is limited to warnings meanwhile (the full log still goes to ``LOG_DIR``), printed on a line of their own.
Elsewhere (a pipe, a file, a CI log, journald) every pipeline gets one plain line on stdout,
``[3/40] pipeline …: shipped … (ETA 2 min)``, and no control characters are written. Pipelines skipped because
their finish was shipped before get no line in either case (a rerun over a year would print one per pipeline):
the closing line counts them. That line, on stdout in both cases, adds up:
``backfill: 60 pipeline(s) in the window: 57 shipped, 2 skipped, 1 failed``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import IO, Callable

from ..shipper import DUPLICATE, FILTERED, GONE, SHIPPED, WOULD_SHIP, BackfillListener, ShipResult

_DELIVERED = frozenset({SHIPPED, WOULD_SHIP})
_SKIPPED = frozenset({DUPLICATE, FILTERED, GONE})  # nothing to deliver: shipped before, filtered, deleted in GitLab


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "ETA …"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"ETA {seconds} s"
    if seconds < 3600:
        return f"ETA {seconds // 60} min {seconds % 60:02d} s"
    return f"ETA {seconds // 3600} h {seconds % 3600 // 60:02d} min"


class BackfillProgress(BackfillListener):
    """The :class:`~gitlab_log_shipper.shipper.BackfillListener` of the ``backfill`` command.

    Counts: ``found`` listed rows, of which ``outside_window`` came to rest outside the window; the others are
    the pipelines of the window (``total``), each ``shipped``, ``skipped`` or ``failed`` once handled (``done``).
    At the end ``total == done`` unless the backfill was stopped (the rest were not started, or cut short: a rerun
    does them)."""

    def __init__(self, out: IO[str], err: IO[str], *, describe: Callable[[ShipResult], str],
                 interactive: bool | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.err = err
        self.describe = describe
        self.interactive = _isatty(err) if interactive is None else interactive
        self.monotonic = monotonic
        self.found_rows = 0
        self.outside_window = 0
        self.shipped = self.skipped = self.failed = 0
        self.dry_run = False  # a WOULD_SHIP came: the closing line says "would ship"
        self.listing = True
        self.started = monotonic()
        self._lock = threading.RLock()  # called from the pool threads (and by the log filter, maybe inside)
        self._drawn = False
        self._quietened: list[tuple[logging.Handler, int]] = []
        if self.interactive:
            self._quieten_stderr_log()
            self._draw("")

    @property
    def total(self) -> int:
        """Pipelines of the window known so far."""
        return self.found_rows - self.outside_window

    @property
    def done(self) -> int:
        return self.shipped + self.skipped + self.failed

    # -- BackfillListener ----------------------------------------------------------------------------

    def found(self, count: int) -> None:
        if not count:
            return
        with self._lock:
            self.found_rows += count
            if self.interactive:
                self._draw("")

    def outside(self) -> None:
        with self._lock:
            self.outside_window += 1
            if self.interactive:
                self._draw("")

    def listed_all(self) -> None:
        with self._lock:
            self.listing = False
            if self.interactive:
                self._draw("")

    def handled(self, result: ShipResult) -> None:
        with self._lock:
            self._count(result)
            if not self.interactive:
                if result.outcome != DUPLICATE:
                    left = "" if self.done >= self.total and not self.listing else f" ({self._left()})"
                    self.out.write(f"{self._counter()} {self.describe(result)}{left}\n")
                    self.out.flush()
                return
            if result.outcome not in _DELIVERED and result.outcome != DUPLICATE:
                self._clear()
                self.out.write(f"{self._counter()} {self.describe(result)}\n")
                self.out.flush()
            self._draw(f"pipeline {result.pipeline_id}: {result.outcome}")

    # ------------------------------------------------------------------------------------------------

    def eta(self) -> float | None:
        """Seconds left: the time per handled row so far (a row outside the window costs its GET too) times the
        rows left; None while rows are still being listed or before the first is handled."""
        left = self.total - self.done
        if left <= 0 and not self.listing:
            return 0.0
        handled = self.done + self.outside_window
        if self.listing or not handled:
            return None
        return (self.monotonic() - self.started) / handled * left

    def summary_line(self, *, stopped: bool = False) -> str:
        """The closing count: ``backfill: 60 pipeline(s) in the window: 57 shipped, 2 skipped, 1 failed``."""
        word = "would ship" if self.dry_run else "shipped"
        line = (f"backfill: {self.total} pipeline(s) in the window: {self.shipped} {word}, {self.skipped} skipped, "
                f"{self.failed} failed")
        notes = []
        if stopped and self.total > self.done:
            notes.append(f"{self.total - self.done} not done, stopped: a rerun does them")
        if stopped and self.listing:
            notes.append("listing not finished")
        if self.outside_window:
            notes.append(f"{self.outside_window} more listed came to rest outside it")
        return line + (f" ({'; '.join(notes)})" if notes else "")

    def finish(self, *, stopped: bool = False) -> None:
        """Clear the live line, give the log its level back and print the closing count."""
        with self._lock:
            if self.interactive:
                self._clear()
            for handler, level in self._quietened:
                handler.setLevel(level)
                handler.removeFilter(self._clear_before_log)
            self._quietened = []
            self.out.write(self.summary_line(stopped=stopped) + "\n")
            self.out.flush()

    def _count(self, result: ShipResult) -> None:
        if result.outcome in _DELIVERED:
            self.shipped += 1
            self.dry_run = self.dry_run or result.outcome == WOULD_SHIP
        elif result.outcome in _SKIPPED:
            self.skipped += 1
        else:
            self.failed += 1

    def _counter(self) -> str:
        return f"[{self.done}/{self.total}{'+' if self.listing else ''}]"

    def _left(self) -> str:
        return "still listing" if self.listing else eta_text(self.eta())

    def _quieten_stderr_log(self) -> None:
        """INFO lines would tear the live line apart: stderr shows warnings only, each on a clean line."""
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                self._quietened.append((handler, handler.level))
                handler.setLevel(max(handler.level, logging.WARNING))
                handler.addFilter(self._clear_before_log)

    def _clear_before_log(self, record: logging.LogRecord) -> bool:
        with self._lock:
            self._clear()
        return True

    def _draw(self, last: str) -> None:
        total, done = self.total, self.done
        percent = 100 * done // total if total else (0 if self.listing else 100)
        width = 24
        filled = width * done // total if total else (0 if self.listing else width)
        bar = "#" * filled + "-" * (width - filled)
        line = f"[{bar}] {done}/{total}{'+' if self.listing else ''} {percent:3d}%  {eta_text(self.eta())}"
        if last:
            line += f"  {last}"
        self.err.write("\r\x1b[K" + line)
        self.err.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self._drawn = False


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
