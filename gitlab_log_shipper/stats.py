"""Running totals and the last cycle, kept in the state store so that ``status`` and the metrics textfile
see them from any process, across restarts.

Totals count outcomes as :class:`~gitlab_log_shipper.shipper.CycleReport` names them (a pipeline that
keeps failing is counted once per attempt). ``fell_back_to_file`` is derived, not stored separately by the
shipper: in dual mode, a document that went to the outbox or the dead-letter folder had its files written
all the same — the file output is what the receiver's data falls back to.
"""

from __future__ import annotations

from datetime import datetime
from typing import Iterable

from .config import Config
from .shipper import (
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
from .gitlab.rest import ProjectRef
from .state import StateStore
from .timeutil import format_ts

FELL_BACK_TO_FILE = "fell_back_to_file"
# In the order `status` shows them.
TOTALS = (SHIPPED, FILTERED, DUPLICATE, FAILED, FELL_BACK_TO_FILE, QUEUED_OUTCOME, DEAD_LETTERED, GONE,
          OUTBOX_SENT, OUTBOX_DEAD)
CYCLES, INCOMPLETE_CYCLES = "cycles", "cycles_incomplete"


def outcome_counts(config: Config, report: CycleReport) -> dict[str, int]:
    counts = {name: report.counts[name] for name in (*TOTALS, REQUEST_LOG_FAILURES, GRAPHQL_FALLBACKS, REST_LISTED)
              if name != FELL_BACK_TO_FILE and report.counts[name]}
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
