"""``health``: is the daemon alive and getting its work done? One line and an exit code, for a container's
``HEALTHCHECK`` and Kubernetes' exec probes (the shipper has no inbound port to probe).

Healthy (exit 0) when the last poll cycle ended less than ``HEALTH_MAX_AGE`` ago, or when a cycle is running
and showed progress (an answer or a chunk of one from GitLab or the receiver, a line the cycle logged) less than
``HEALTH_MAX_AGE`` ago. ``HEALTH_MAX_AGE`` defaults to 5 × the POLL_INTERVAL the daemon uses, which depends on
how it finds changes (``gitlab.detection`` in the statistics: REST 60 s, GraphQL 10 s unless POLL_INTERVAL is
set). Otherwise exit 1, with the reason in one line.

It reads ``STATE_DIR`` only — no GitLab, no receiver — and writes nothing: the store is opened read-only
(``mode=ro`` while the daemon has it open, so its ``-wal`` and ``-shm`` files exist; ``immutable=1`` when no
process has it open, since a read-only open of a WAL database would create those files otherwise). It never
takes ``STATE_DIR/lock``, so it works while the daemon holds it.

The daemon's side: :class:`~gitlab_log_shipper.service.supervision.Supervision` writes the heartbeat keys below into the
``stats`` table when a cycle starts and, while it runs, at most every :data:`HEARTBEAT_EVERY` seconds when
there was progress; it also exits by itself when a cycle shows no progress for :func:`wedged_after`.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Mapping

from ..config.settings import Config
from ..timeutil import parse_ts

CYCLE_STARTED = "heartbeat.cycle_started_at"  # when the cycle in flight (or the last one) started
PROGRESS = "heartbeat.progress_at"  # the last sign of progress of that cycle
CYCLE_FAILED = "heartbeat.cycle_failed_at"  # when a cycle last ended in an error (it did not finish)
NEXT_CYCLE = "heartbeat.next_cycle_at"  # when the daemon scheduled the next cycle, after the last one ended
FINISHED = "last_cycle.finished_at"  # written by stats.record_cycle
DETECTION = "gitlab.detection"  # rest | graphql, written by stats.record_cycle
INTERVAL = "heartbeat.poll_interval_seconds"  # the pause the daemon used when the cycle started (GraphQL may stretch it)
HEARTBEAT_EVERY = 5.0  # seconds between two heartbeat writes while a cycle makes progress
HEALTH_FACTOR = 5  # HEALTH_MAX_AGE's default, in POLL_INTERVALs


@dataclass(frozen=True)
class Health:
    ok: bool
    line: str


def poll_interval(config: Config, detection: str | None, recorded: str | None = None) -> float:
    """The POLL_INTERVAL the daemon uses: the one it recorded, else by how it finds changes — GraphQL detection
    has its own default (``Config.poll_interval`` is REST's). Before the first cycle recorded its choice,
    GITLAB_API=graphql means GraphQL; auto may end as either, so REST's (longer) interval is the lenient guess."""
    try:
        if recorded and float(recorded) > 0:
            return float(recorded)
    except ValueError:
        pass  # not ours to repair: decide from the settings
    graphql = detection == "graphql" or (detection is None and config.gitlab_api == "graphql")
    return config.effective_poll_interval_graphql if graphql else config.poll_interval


def max_age(config: Config, interval: float) -> float:
    """HEALTH_MAX_AGE, or its default: 5 × the POLL_INTERVAL in use."""
    return config.health_max_age if config.health_max_age is not None else HEALTH_FACTOR * interval


# python-gitlab retries a connection that fails (refused, timed out) 10 times, sleeping 0.1 x 2**n s in between
# (gitlab/utils.py, Retry.handle_retry: 102.3 s in all), without an answer or a line logged: the longest silence
# of one GitLab request is 11 attempts of GITLAB_TIMEOUT plus those sleeps.
SILENT_RETRIES_SLEEP = 102.3
SILENT_ATTEMPTS = 11


def silent_request(config: Config) -> float:
    """The longest a GitLab request may legitimately show nothing: its silent retries (see above)."""
    return SILENT_ATTEMPTS * config.gitlab_timeout + SILENT_RETRIES_SLEEP


def wedged_after(config: Config, interval: float) -> float:
    """Seconds without progress in a running cycle after which the daemon exits by itself (the self-watchdog,
    for supervisors without one: Docker, a plain shell, Kubernetes when the probe is missing): twice
    HEALTH_MAX_AGE, so that ``health`` (and a liveness probe) says so first, and at least 3 × POLL_INTERVAL.
    With HEALTH_MAX_AGE's default, also at least :func:`silent_request` (7.2 min with GITLAB_TIMEOUT=30), so that
    an unreachable GitLab is never taken for a wedged cycle; a HEALTH_MAX_AGE that is set is the operator's
    word (OPERATIONS.md says to keep it above half that). Progress includes every chunk of a body read
    (supervision.py), so a long download is not silence."""
    limit = max(2 * max_age(config, interval), 3 * interval)
    return limit if config.health_max_age is not None else max(limit, silent_request(config))


def read_stats(state_dir: Path) -> dict[str, str] | None:
    """The ``stats`` table, read without writing anything (see the module's docstring); None when the store does
    not exist. sqlite3.Error when it cannot be read."""
    path = Path(state_dir) / "state.sqlite3"
    if not path.is_file():
        return None
    in_use = path.with_name(path.name + "-wal").exists()
    # immutable=1 is only right while nobody writes; if the daemon opened the store in between, read again
    # the way one reads a store in use.
    modes = ("mode=ro",) if in_use else ("immutable=1", "mode=ro")
    error: sqlite3.Error | None = None
    for mode in modes:
        uri = f"{path.resolve().as_uri()}?{mode}"
        try:
            db = sqlite3.connect(uri, uri=True, timeout=0.2)
            try:
                return dict(db.execute("SELECT key, value FROM stats").fetchall())
            finally:
                db.close()
        except sqlite3.Error as exc:
            error = exc
    assert error is not None
    raise error


def evaluate(config: Config, stats: Mapping[str, str] | None, now: datetime) -> Health:
    """The verdict on ``stats`` (from :func:`read_stats`) at ``now``."""
    if stats is None:
        return Health(False, f"unhealthy: no state store in STATE_DIR={config.state_dir} (no poll cycle has run here)")
    interval = poll_interval(config, stats.get(DETECTION) or None, stats.get(INTERVAL))
    limit = max_age(config, interval)
    finished, started = _stamp(stats, FINISHED), _stamp(stats, CYCLE_STARTED)
    failed = _stamp(stats, CYCLE_FAILED)
    ended = max((t for t in (finished, failed) if t is not None), default=None)
    allowed = f"HEALTH_MAX_AGE {limit:.0f} s"
    if started is not None and (ended is None or started > ended):
        progress = max(started, _stamp(stats, PROGRESS) or started)
        quiet = _seconds(now, progress)
        since = f"the poll cycle running since {started:%Y-%m-%dT%H:%M:%SZ}"
        if quiet < limit:
            return Health(True, f"healthy: {since} showed progress {quiet:.0f} s ago ({allowed})")
        return Health(False, f"unhealthy: {since} has shown no progress for {quiet:.0f} s ({allowed})")
    if finished is None:
        what = "the last one failed" if failed is not None else "none has run yet"
        return Health(False, f"unhealthy: no poll cycle has finished in STATE_DIR={config.state_dir} ({what})")
    age = _seconds(now, finished)
    if age < limit:
        return Health(True, f"healthy: the last poll cycle finished {age:.0f} s ago ({allowed})")
    # Backing off (GitLab unreachable: the pause doubles up to 15 min) is waiting, not a stall: the pause beyond
    # POLL_INTERVAL is added to the allowance. Only a plan made after the last cycle ended counts.
    planned = _stamp(stats, NEXT_CYCLE)
    if planned is not None and ended is not None and planned > ended:
        backoff = _seconds(planned, ended) - interval
        if backoff > 0 and age < limit + backoff:
            return Health(True, f"healthy: the last poll cycle finished {age:.0f} s ago; the daemon is backing off, next "
                                f"cycle at {planned:%Y-%m-%dT%H:%M:%SZ} (the pause beyond POLL_INTERVAL is added to {allowed})")
    why = "; cycles since then failed" if failed is not None and failed > finished else ""
    return Health(False, f"unhealthy: the last poll cycle finished {age:.0f} s ago, more than {allowed}{why}")


def _stamp(stats: Mapping[str, str], key: str) -> datetime | None:
    value = stats.get(key)
    if not value:
        return None
    try:
        return parse_ts(value)
    except ValueError:
        return None  # not ours to repair; treated as never written


def _seconds(now: datetime, then: datetime) -> float:
    return max(0.0, (now - then).total_seconds())


def check(config: Config, now: datetime) -> Health:
    """Read STATE_DIR and judge; a store that cannot be read is unhealthy, with SQLite's reason."""
    try:
        stats = read_stats(config.state_dir)
    except (sqlite3.Error, OSError) as exc:
        return Health(False, f"unhealthy: cannot read the state store in STATE_DIR={config.state_dir}: {exc}")
    return evaluate(config, stats, now)
