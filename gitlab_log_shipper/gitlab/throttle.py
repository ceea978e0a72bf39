"""Staying under GitLab's rate limit instead of bumping into it.

GitLab.com allows 2,000 authenticated API requests a minute per user and tells every response how many
are left (``RateLimit-Remaining``) and when the window resets (``RateLimit-Reset``, a Unix time). A 429
costs a wait *and* a wasted request, and python-gitlab's answer to one is to sleep; with several workers
in flight it is better to slow down before the budget is gone. :class:`Throttle` does both:

* ``GITLAB_MAX_REQUESTS_PER_SECOND`` (0 = off) caps our own rate with a token bucket, for shared instances
  where the shipper must leave room for people;
* when GitLab says fewer than ``reserve`` requests are left in the window, requests wait for the reset
  (at most :data:`MAX_WAIT` seconds at a time).

It is thread-safe; time and sleep are injected so tests need not wait.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping

MAX_WAIT = 60.0
LOG_WAIT = 1.0
"""A wait for GitLab's window to reset of at least this many seconds is logged (a pause is never silent)."""

log = logging.getLogger(__name__)


class Throttle:
    def __init__(
        self,
        max_per_second: float = 0.0,
        *,
        reserve: int = 10,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.max_per_second = max_per_second
        self.reserve = reserve
        self._monotonic = monotonic
        self._wall = wall
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_slot = 0.0
        self.remaining: int | None = None  # GitLab's RateLimit-Remaining from the latest answer
        self.limit: int | None = None
        self.reset_at: float | None = None  # Unix time
        self._announced: float | None = None  # the reset whose pause was logged (one line per window, not per worker)

    def before_request(self) -> None:
        """Block until this request may go out."""
        delay = 0.0
        budget_wait = 0.0
        with self._lock:
            now = self._monotonic()
            if self.max_per_second > 0:
                slot = max(now, self._next_slot)
                self._next_slot = slot + 1.0 / self.max_per_second
                delay = slot - now
            if self.remaining is not None and self.reset_at is not None and self.remaining <= self.reserve:
                until_reset = self.reset_at - self._wall()
                if until_reset > 0:
                    budget_wait = min(until_reset, MAX_WAIT)
                    left, limit = self.remaining, self.limit
                    delay = max(delay, budget_wait)
                    if self._announced == self.reset_at:
                        budget_wait = 0.0  # said already for this window
                    else:
                        self._announced = self.reset_at
                    # assume the window resets: later requests should not all wait for the same reset
                    self.remaining = None
        if budget_wait >= LOG_WAIT:
            log.warning("GitLab rate limit: %s of %s requests left in this window; pausing %.0f s until it resets",
                        left, limit if limit is not None else "?", budget_wait)
        if delay > 0:
            self._sleep(delay)

    def observe(self, headers: Mapping[str, str]) -> None:
        """Read RateLimit-* from a response (GitLab.com sends them on ordinary 200s too)."""
        remaining = _int(headers.get("RateLimit-Remaining"))
        if remaining is None:
            return
        with self._lock:
            self.remaining = remaining
            self.limit = _int(headers.get("RateLimit-Limit")) or self.limit
            reset = _int(headers.get("RateLimit-Reset"))
            self.reset_at = float(reset) if reset is not None else None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
