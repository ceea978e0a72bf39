"""Running totals and the last cycle, kept in the state store so that ``status`` and the metrics textfile
see them from any process, across restarts.

Totals count outcomes as :class:`~gitlab_log_shipper.shipper.CycleReport` names them (a pipeline that
keeps failing is counted once per attempt). ``fell_back_to_file`` is derived, not stored separately by the
shipper: in dual mode, a document that went to the outbox or the dead-letter folder had its files written
all the same — the file output is what the receiver's data falls back to.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Iterable, Mapping

from ..config.settings import Config
from ..counters import COUNTERS, SHIPPED_BYTES
from ..gitlab.rest import ProjectRef
from ..shipper import (
    DEAD_LETTERED,
    DUPLICATE,
    FAILED,
    FILTERED,
    GONE,
    OUTBOX_DEAD,
    OUTBOX_SENT,
    QUEUED_OUTCOME,
    GRAPHQL_FALLBACKS,
    REQUEST_LOG_FAILURES,
    REST_LISTED,
    SHIPPED,
    CycleReport,
)
from ..state.store import StateStore
from ..timeutil import format_ts

FELL_BACK_TO_FILE = "fell_back_to_file"
# In the order `status` shows them.
TOTALS = (SHIPPED, FILTERED, DUPLICATE, FAILED, FELL_BACK_TO_FILE, QUEUED_OUTCOME, DEAD_LETTERED, GONE,
          OUTBOX_SENT, OUTBOX_DEAD)
CYCLES, INCOMPLETE_CYCLES = "cycles", "cycles_incomplete"
SHIPPED_LOG_BYTES = "shipped_log_bytes"
# Cycle durations (seconds) as a histogram: from a sub-second idle cycle to a backlog that takes most of an hour.
CYCLE_BUCKETS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
CYCLE_BUCKET, CYCLE_SUM_MS, CYCLE_COUNT = "cycle_duration.bucket.", "cycle_duration.sum_ms", "cycle_duration.count"
# A pipeline on the retry list after this many failed attempts is "failing repeatedly" (the two quick retries
# before the backoff have not helped: see OPERATIONS.md, "Monitor").
REPEATED_ATTEMPTS = 3


def outcome_counts(config: Config, report: CycleReport) -> dict[str, int]:
    """The totals a run adds: its outcomes, the log bytes of the pipelines it shipped, and the requests (by
    target and status) and accepted document bytes counted since the last run was recorded (:mod:`counters`)."""
    counts = {name: report.counts[name] for name in (*TOTALS, REQUEST_LOG_FAILURES, GRAPHQL_FALLBACKS, REST_LISTED)
              if name != FELL_BACK_TO_FILE and report.counts[name]}
    counts[SHIPPED_LOG_BYTES] = sum(r.log_bytes for r in report.results if r.outcome == SHIPPED)
    counts.update(COUNTERS.take())
    if config.mode == "dual":
        fell_back = report.counts[QUEUED_OUTCOME] + report.counts[DEAD_LETTERED]
        if fell_back:
            counts[FELL_BACK_TO_FILE] = fell_back
    return counts


def record_run(state: StateStore, config: Config, report: CycleReport) -> None:
    """``backfill`` and ``post``: their outcomes count in the totals; they are not poll cycles."""
    state.record_stats(outcome_counts(config, report), {})


def record_cycle(state: StateStore, config: Config, report: CycleReport, *, started: datetime, finished: datetime,
                 rate_limit_remaining: int | None, projects: Iterable[ProjectRef],
                 detection: tuple[str | None, str] | None = None) -> None:
    """One poll cycle: totals, the cycle's time, duration and summary, the projects it polled, and how it found
    changes (``detection``: GITLAB_API's choice and its reason)."""
    counts = outcome_counts(config, report)
    counts[CYCLES] = 1
    counts.update(_cycle_duration(finished - started))
    if not report.complete:
        counts[INCOMPLETE_CYCLES] = 1
    values = {
        "last_cycle.started_at": format_ts(started),
        "last_cycle.finished_at": format_ts(finished),
        "last_cycle.duration_seconds": f"{(finished - started).total_seconds():.3f}",
        "last_cycle.summary": report.summary(),
        "last_cycle.complete": "1" if report.complete else "0",
        "last_cycle.project_errors": str(len(report.project_errors)),
        "last_cycle.outbox_full": "1" if report.outbox_full else "0",
        "last_cycle.first_error": report.project_errors[0][:300] if report.project_errors else "",
        # Configured projects or groups GitLab says are gone or invisible, one per line (every cycle, until fixed).
        "last_cycle.missing_projects": "\n".join(line[:300] for line in report.missing_projects[:50]),
    }
    if report.complete:
        values["last_success_at"] = format_ts(finished)
    if rate_limit_remaining is not None:
        values["gitlab.rate_limit_remaining"] = str(rate_limit_remaining)
    if detection is not None and detection[0] is not None:
        values["gitlab.detection"], values["gitlab.detection_reason"] = detection[0], detection[1][:300]
    names = {f"project.{p.id}": p.path_with_namespace or p.name or "" for p in projects}
    values.update(names)
    state.record_stats(counts, values, replace_prefix="project." if names else None)


def _cycle_duration(duration: timedelta) -> dict[str, int]:
    """One cycle's contribution to the duration histogram: its bucket (one count per bound, not cumulative: one
    write per cycle), its whole milliseconds (integers add exactly) and one to the count."""
    seconds = max(0.0, duration.total_seconds())
    bound = next((b for b in CYCLE_BUCKETS if seconds <= b), math.inf)
    return {f"{CYCLE_BUCKET}{'+Inf' if math.isinf(bound) else repr(float(bound))}": 1,
            CYCLE_SUM_MS: int(round(seconds * 1000)), CYCLE_COUNT: 1}


def metric_counters(stats: Mapping[str, str]) -> dict[str, object]:
    """What the metrics textfile shows beyond ``status``'s totals, from the state store's stats: ``requests``
    ({target: {code: count}}), ``shipped_bytes``, ``shipped_log_bytes`` and ``cycle_duration`` (cumulative
    ``buckets`` {le: count} ending with +Inf, ``sum_seconds``, ``count``)."""
    requests: dict[str, dict[str, int]] = {"gitlab": {}, "receiver": {}}
    for key, value in stats.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[:2] == ["count", "requests"] and parts[2] in requests and parts[3].isdigit():
            requests[parts[2]][parts[3]] = int(value)
    prefix = f"count.{CYCLE_BUCKET}"
    stored = {key[len(prefix):]: int(value) for key, value in stats.items() if key.startswith(prefix)}
    count = int(stats.get(f"count.{CYCLE_COUNT}", "0"))
    buckets = {repr(float(b)): sum(n for le, n in stored.items() if float(le) <= b) for b in CYCLE_BUCKETS}
    buckets["+Inf"] = count
    return {
        "requests": {target: dict(sorted(codes.items(), key=lambda item: int(item[0])))
                     for target, codes in requests.items()},
        "shipped_bytes": int(stats.get(f"count.{SHIPPED_BYTES}", "0")),
        "shipped_log_bytes": int(stats.get(f"count.{SHIPPED_LOG_BYTES}", "0")),
        "cycle_duration": {"buckets": buckets, "sum_seconds": int(stats.get(f"count.{CYCLE_SUM_MS}", "0")) / 1000,
                           "count": count},
    }
