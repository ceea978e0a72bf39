"""Process-wide request counters for the metrics textfile: HTTP answers of GitLab and of the receiver by status,
and the document bytes the receiver accepted.

They are process-wide because one process runs one command: the sessions that make the requests
(:class:`~gitlab_log_shipper.gitlab.rest.GitLabSession`, :class:`~gitlab_log_shipper.delivery.poster.ApiPoster`) add to
them, and :mod:`stats` takes what was added since the last time into the state store's totals with every cycle
(and every ``backfill``/``post``), where ``status`` and the textfile read them across restarts. Requests of
commands that record nothing (``check``, dry runs) are not counted; the CLI group starts every command from zero,
so that in-process callers running several commands (tests, CliRunner) see what a process would. This module
imports nothing of the package so that any layer may count.
"""

from __future__ import annotations

import threading
from collections import Counter

# Status code 0: no HTTP answer at all (refused, reset, timed out, TLS failure).
NO_ANSWER = 0
GITLAB, RECEIVER = "gitlab", "receiver"
SHIPPED_BYTES = "shipped_bytes"


class Counters:
    """Thread-safe counts keyed by name; :meth:`take` hands them over and starts again from zero."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def take(self) -> dict[str, int]:
        with self._lock:
            counts, self._counts = dict(self._counts), Counter()
        return counts


COUNTERS = Counters()


def request_key(target: str, status: int | None) -> str:
    """The totals' key of one answer: ``requests.gitlab.200``, ``requests.receiver.0`` (no answer)."""
    return f"requests.{target}.{int(status or NO_ANSWER)}"


def count_request(target: str, status: int | None) -> None:
    COUNTERS.add(request_key(target, status))
