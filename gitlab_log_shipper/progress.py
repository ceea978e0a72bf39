"""Progress of a ``backfill``: pipelines done/total and an estimate of the time left.

On a terminal (stderr is a TTY) one status line is redrawn in place on stderr, and only pipelines that
did not go through are printed as lines of their own; the application log on stderr is limited to
warnings meanwhile (the full log still goes to ``LOG_DIR``), printed on a line of their own; elsewhere (a pipe, a file, a CI log, journald) every
pipeline gets one plain line on stdout, ``[3/40] pipeline …: shipped … (ETA 2 min)``, and no control
characters are written.
"""

from __future__ import annotations

import logging
import time
from typing import IO, Callable

from .shipper import SHIPPED, WOULD_SHIP, ShipResult


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "ETA …"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"ETA {seconds} s"
    if seconds < 3600:
        return f"ETA {seconds // 60} min {seconds % 60:02d} s"
    return f"ETA {seconds // 3600} h {seconds % 3600 // 60:02d} min"


class BackfillProgress:
    def __init__(self, out: IO[str], err: IO[str], *, describe: Callable[[ShipResult], str],
                 interactive: bool | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.err = err
        self.describe = describe
        self.interactive = _isatty(err) if interactive is None else interactive
        self.monotonic = monotonic
        self.total = 0
        self.done = 0
        self.started = monotonic()
        self._drawn = False
        self._quietened: list[tuple[logging.Handler, int]] = []
        if self.interactive:
            self._quieten_stderr_log()

    def planned(self, total: int) -> None:
        self.total = total
        self.started = self.monotonic()
        if not self.interactive:
            self.out.write(f"{total} pipeline(s) to ship\n")
            self.out.flush()
        else:
            self._draw("")

    def eta(self) -> float | None:
        if self.done >= self.total:
            return 0.0
        if not self.done:
            return None
        per_pipeline = (self.monotonic() - self.started) / self.done
        return per_pipeline * (self.total - self.done)

    def __call__(self, result: ShipResult) -> None:
        self.done += 1
        counter = f"[{self.done}/{self.total}]"
        if not self.interactive:
            left = f" ({eta_text(self.eta())})" if self.done < self.total else ""
            self.out.write(f"{counter} {self.describe(result)}{left}\n")
            self.out.flush()
            return
        if result.outcome not in (SHIPPED, WOULD_SHIP):
            self._clear()
            self.out.write(f"{counter} {self.describe(result)}\n")
            self.out.flush()
        self._draw(f"pipeline {result.pipeline_id}: {result.outcome}")

    def finish(self) -> None:
        if self.interactive:
            self._clear()
        for handler, level in self._quietened:
            handler.setLevel(level)
            handler.removeFilter(self._clear_before_log)
        self._quietened = []

    def _quieten_stderr_log(self) -> None:
        """INFO lines would tear the live line apart: stderr shows warnings only, each on a clean line."""
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                self._quietened.append((handler, handler.level))
                handler.setLevel(max(handler.level, logging.WARNING))
                handler.addFilter(self._clear_before_log)

    def _clear_before_log(self, record: logging.LogRecord) -> bool:
        self._clear()
        return True

    def _draw(self, last: str) -> None:
        percent = 100 * self.done // self.total if self.total else 100
        width = 24
        filled = width * self.done // self.total if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        line = f"[{bar}] {self.done}/{self.total} {percent:3d}%  {eta_text(self.eta())}"
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
