"""Finish → delivered latency: how long users waited between a pipeline coming to rest and the receiver's 2xx.

The start is GitLab's clock: the pipeline's ``finished_at``, or ``updated_at`` for a pipeline that rests without
one (``skipped``, ``manual``: GitLab stamps ``finished_at`` only on the transitions to success, failed and
canceled, see :data:`payload._RESTS_WITHOUT_FINISH`). The end is this machine's clock when the receiver answered
2xx. Two clocks: a negative difference is clock skew, clamped to 0 and counted (never a crash, and the histogram's
``_sum`` stays monotonic for ``rate()``).

Measured for every document first handed over by ``run`` (daemon or ``--once``), whichever way it reached the
receiver: posted at once (:data:`DIRECT`), sent from the outbox after an outage (:data:`OUTBOX`) or sent again by
``redeliver`` after it was dead-lettered (:data:`REDELIVERED`). Not measured: ``backfill`` and ``post`` (history
and operators' resends: their "latency" is the age of the window or the operator's reaction, not the shipper's),
file-only mode (no receiver), and documents queued or dead-lettered by a version that did not record their time.

This module is pure: the state store persists the samples, ``status`` and the metrics textfile read them.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterable, Mapping, Sequence

from ..timeutil import parse_ts

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the histogram buckets, suited to near-webhook polling (a 10-15 s interval) and to
# outages of up to an hour; +Inf is implied. Prometheus' ``le``: an observation equal to a bound is in its bucket.
BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 1800, 3600)
# `status` reports the deliveries of the last hour, at most the newest RECENT_CAPACITY of them (a fixed-size table).
RECENT_WINDOW = timedelta(hours=1)
RECENT_CAPACITY = 10_000

DIRECT, OUTBOX, REDELIVERED = "direct", "outbox", "redelivered"
PATHS = (DIRECT, OUTBOX, REDELIVERED)
# The state store's stats keys: one count per bucket bound (not cumulative: one write per delivery), the sum in
# whole milliseconds (integers add exactly), the count and the clamped samples.
BUCKET_KEY, SUM_MS_KEY, COUNT_KEY, CLAMPED_KEY = "latency.bucket.", "latency.sum_ms", "latency.count", "latency.clamped"

# GitLab statuses whose finished_at is absent or stale (a manual pipeline keeps an earlier finish's finished_at).
_RESTS_WITHOUT_FINISH = frozenset({"manual", "skipped"})


def rest_time(status: str | None, finished_at: str | None, updated_at: str | None) -> str | None:
    """When the pipeline came to rest by GitLab's clock: ``finished_at``; ``updated_at`` for skipped and manual
    pipelines (no finished_at, or a stale one) and whenever finished_at is missing."""
    if status in _RESTS_WITHOUT_FINISH:
        return updated_at or None
    return finished_at or updated_at or None


@dataclass(frozen=True)
class Sample:
    """One delivery's latency. ``skew`` is how far (seconds) GitLab's stamp lay after our 2xx, when it did."""

    seconds: float
    delivered_at: datetime
    path: str
    skew: float = 0.0

    @property
    def clamped(self) -> bool:
        return self.skew > 0

    @property
    def millis(self) -> int:
        """The latency in whole milliseconds: the histogram's sum is kept as an integer, exact across restarts."""
        return int(round(self.seconds * 1000))


def measure(rest_at: str | None, delivered_at: datetime, path: str) -> Sample | None:
    """The latency of a document whose pipeline came to rest at ``rest_at`` (GitLab's time, ISO 8601) and that the
    receiver accepted at ``delivered_at``; None when there is no usable start (not measured, see the module)."""
    if not rest_at:
        return None
    try:
        start = parse_ts(rest_at)
    except ValueError:
        log.debug("latency not measured: unreadable rest time %r", rest_at)
        return None
    seconds = (delivered_at - start).total_seconds()
    if seconds < 0:
        return Sample(0.0, delivered_at, path, skew=-seconds)
    return Sample(seconds, delivered_at, path)


def bucket_label(bound: float) -> str:
    """The ``le`` label of a bound as Prometheus' client libraries write it (``1.0``, ``+Inf``)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def bucket_of(seconds: float) -> str:
    """The label of the smallest bucket holding ``seconds``."""
    return bucket_label(next((bound for bound in BUCKETS if seconds <= bound), math.inf))


class SkewReporter:
    """Logs clock skew once per poll cycle (the first clamped sample of the cycle, with how far apart the clocks
    were); the rest of the cycle's are only counted (``gitlab_log_shipper_delivery_latency_clamped_total``).
    Thread-safe: deliveries run concurrently."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._logged = False

    def new_cycle(self) -> None:
        with self._lock:
            self._logged = False

    def note(self, sample: Sample | None, pipeline_id: int, project_id: int) -> None:
        if sample is None or not sample.clamped:
            return
        with self._lock:
            if self._logged:
                return
            self._logged = True
        log.warning("pipeline %s (project %s): GitLab's finish time is %.3f s after the receiver's 2xx by this "
                    "machine's clock: GitLab's clock and this one disagree (check NTP on both); its latency counts "
                    "as 0 (further ones this cycle are only counted, in "
                    "gitlab_log_shipper_delivery_latency_clamped_total)", pipeline_id, project_id, sample.skew)


# -- reading back ------------------------------------------------------------------------------------------------

def histogram(stats: Mapping[str, str]) -> dict[str, object]:
    """The cumulative histogram from the state store's ``latency.*`` keys: ``buckets`` ({le: count}, cumulative,
    +Inf last), ``sum_seconds``, ``count`` and ``clamped``. Buckets are stored one count per bound; a stored bound
    that is not in :data:`BUCKETS` (another version's) still counts in every bucket at or above it."""
    stored = {float(key[len(BUCKET_KEY):]): int(value) for key, value in stats.items() if key.startswith(BUCKET_KEY)}
    count = int(stats.get(COUNT_KEY, "0"))
    buckets = {bucket_label(bound): sum(n for le, n in stored.items() if le <= bound) for bound in BUCKETS}
    buckets["+Inf"] = count
    return {"buckets": buckets, "sum_seconds": int(stats.get(SUM_MS_KEY, "0")) / 1000, "count": count,
            "clamped": int(stats.get(CLAMPED_KEY, "0"))}


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence: always a value that was observed."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summary(rows: Iterable[tuple[float, str]], *, full: bool) -> dict[str, object]:
    """p50 / p95 / max and counts (total and by path) of ``rows`` ((seconds, path) of the window). ``full``: the
    fixed-size table was full and its oldest row is inside the window, so the window holds only the newest
    RECENT_CAPACITY deliveries."""
    values: list[float] = []
    by_path = dict.fromkeys(PATHS, 0)
    for seconds, path in rows:
        values.append(seconds)
        by_path[path] = by_path.get(path, 0) + 1
    values.sort()
    return {
        "window_seconds": int(RECENT_WINDOW.total_seconds()),
        "count": len(values),
        "p50_seconds": round(percentile(values, 0.50), 3) if values else None,
        "p95_seconds": round(percentile(values, 0.95), 3) if values else None,
        "max_seconds": round(values[-1], 3) if values else None,
        "by_path": by_path,
        "only_latest": RECENT_CAPACITY if full else None,
    }
