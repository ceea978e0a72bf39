"""Prometheus metrics without an inbound port: a textfile for node_exporter's textfile collector.

``METRICS_TEXTFILE=/var/lib/node_exporter/textfile_collector/gitlab_log_shipper.prom`` makes the daemon
rewrite that file after every cycle: written to a temporary file in the same folder and renamed, so the
collector never reads half of it; mode 0644 (node_exporter runs as another user; nothing secret is in it).
The collector adds ``node_textfile_mtime_seconds{file=...}``: alert on it too, it goes stale when the
daemon stops writing.

``gitlab_log_shipper_delivery_latency_seconds`` is a histogram (``_bucket{le}``, ``_sum``, ``_count``) of finish ->
delivered latency (see :mod:`latency`), cumulative since the state store was created: it is kept in the store, so
a restart does not reset it (a new state store does, which ``rate()`` takes as a counter reset). Absent in
file-only mode, where nothing is measured.

What an SRE alerts on (issue 14), cumulative in the store like the totals: ``gitlab_requests_total{code}`` and
``receiver_requests_total{code}`` (every HTTP attempt, retries included; code 0 when no answer came, see
:mod:`counters`), ``shipped_bytes_total`` (document bytes accepted with a 2xx) and ``shipped_log_bytes_total``,
the ``cycle_duration_seconds`` histogram next to the last cycle's gauge, and ``pipelines_failing_repeatedly``.
Names follow Prometheus' conventions (``_total`` counters, base units, HELP and TYPE lines), which
``promtool check metrics`` verifies in tests/service/test_metrics.py.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from ..delivery.files import atomic_write

from ..timeutil import parse_ts
from .stats import CYCLES, INCOMPLETE_CYCLES, REPEATED_ATTEMPTS, TOTALS

PREFIX = "gitlab_log_shipper"


def _timestamp(value: str | None) -> float | None:
    return parse_ts(value).timestamp() if value else None


def render(snapshot: dict[str, Any], now: datetime) -> str:
    """The snapshot of :func:`gitlab_log_shipper.service.status.collect` in the text exposition format."""
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float | None]]) -> None:
        samples = [(labels, value) for labels, value in samples if value is not None]
        if not samples:
            return  # unknown (e.g. GitLab sent no rate-limit header yet): absent rather than a made-up 0
        out.append(f"# HELP {PREFIX}_{name} {help_text}")
        out.append(f"# TYPE {PREFIX}_{name} {kind}")
        for labels, value in samples:
            number = repr(float(value)) if isinstance(value, float) else str(value)
            out.append(f"{PREFIX}_{name}{labels} {number}")

    totals = snapshot["totals"]
    cycle = snapshot["last_cycle"] or {}
    outbox = snapshot["outbox"]
    metric("info", "gauge", "Version and mode of the shipper.",
           [(f'{{version="{snapshot["version"]}",mode="{snapshot["mode"]}"}}', 1)])
    metric("pipelines_total", "counter",
           "Pipelines by outcome since the state store was created (failed counts every failed attempt).",
           [(f'{{outcome="{name}"}}', totals[name]) for name in TOTALS])
    metric("cycles_total", "counter", "Poll cycles run.", [("", totals[CYCLES])])
    metric("request_log_write_failures_total", "counter",
           "Lines that could not be written to api-requests.log (deliveries are not affected).",
           [("", totals.get("request_log_write_failures", 0))])
    metric("unknown_variables", "gauge",
           "Variables with the shipper's prefixes that are no setting (misspelled?): the start-up log names them.",
           [("", snapshot.get("unknown_variables"))])
    detection = snapshot.get("detection")
    metric("detection_info", "gauge", "How the latest poll cycle found changes (GITLAB_API): rest or graphql.",
           [(f'{{mode="{detection["mode"]}"}}', 1)] if detection else [])
    metric("graphql_fallbacks_total", "counter",
           "Cycles whose GraphQL detection failed as a whole, so that REST listed every project.",
           [("", totals.get("graphql_fallbacks", 0))])
    metric("rest_listed_projects_total", "counter",
           "Projects listed with REST in GraphQL mode because GraphQL's answer left them out (one per cycle).",
           [("", totals.get("rest_listed_projects", 0))])
    metric("cycles_incomplete_total", "counter", "Poll cycles that left something undelivered.",
           [("", totals[INCOMPLETE_CYCLES])])
    metric("outbox_documents", "gauge", "Documents waiting in the outbox for the receiver.", [("", outbox["documents"])])
    metric("outbox_bytes", "gauge", "Size of the outbox.", [("", outbox["bytes"])])
    metric("outbox_oldest_age_seconds", "gauge", "Age of the oldest document in the outbox (0 when empty).",
           [("", outbox["oldest_age_seconds"] or 0.0)])
    metric("dead_letters", "gauge", "Documents the receiver rejected for good, waiting for `redeliver`.",
           [("", snapshot["dead_letters"]["count"])])
    metric("last_cycle_duration_seconds", "gauge", "How long the last poll cycle took.",
           [("", cycle.get("duration_seconds"))])
    metric("last_cycle_timestamp_seconds", "gauge", "When the last poll cycle ended (Unix time).",
           [("", _timestamp(cycle.get("finished_at")))])
    metric("last_cycle_project_errors", "gauge", "Projects the last cycle could not poll.",
           [("", cycle.get("project_errors"))])
    metric("outbox_full", "gauge",
           "1 when the last cycle found the outbox at OUTBOX_MAX_BYTES and took no new pipelines (a receiver problem; "
           "not counted in last_cycle_project_errors).", [("", int(bool(cycle.get("outbox_full"))) if cycle else None)])
    metric("last_cycle_missing_projects", "gauge",
           "Configured projects or groups that GitLab reported deleted or invisible in the last cycle.",
           [("", len(cycle.get("missing_projects") or []) if cycle else None)])
    retrying = snapshot.get("retrying") or {}
    metric("pipelines_retrying", "gauge", "Pipelines that failed to ship and wait for another attempt.",
           [("", retrying.get("pipelines"))])
    metric("pipelines_retrying_oldest_age_seconds", "gauge",
           "How long the oldest pipeline waiting for another attempt has been failing (0 when none).",
           [("", retrying.get("oldest_age_seconds") or 0.0)])
    metric("last_success_timestamp_seconds", "gauge",
           "When a cycle last ended with everything it found delivered (Unix time).",
           [("", _timestamp(snapshot["last_success_at"]))])
    metric("gitlab_rate_limit_remaining", "gauge",
           "GitLab API requests left in the current rate-limit window (RateLimit-Remaining).",
           [("", snapshot["gitlab_rate_limit_remaining"])])
    metric("pipelines_failing_repeatedly", "gauge",
           f"Pipelines on the retry list that failed {REPEATED_ATTEMPTS} or more attempts.",
           [("", retrying.get("failing_repeatedly"))])
    counters = snapshot.get("counters") or {}
    requests = counters.get("requests") or {}
    metric("gitlab_requests_total", "counter",
           "HTTP requests to GitLab by status code (0: no answer), every attempt including python-gitlab's retries.",
           [(f'{{code="{code}"}}', n) for code, n in (requests.get("gitlab") or {}).items()])
    metric("receiver_requests_total", "counter",
           "POSTs to API_POST_URL by status code (0: no answer), every attempt including urllib3's retries.",
           [(f'{{code="{code}"}}', n) for code, n in (requests.get("receiver") or {}).items()])
    metric("shipped_bytes_total", "counter",
           "Document bytes the receiver answered 2xx for, as sent (gzip-compressed with API_POST_COMPRESSION=gzip).",
           [("", counters.get("shipped_bytes"))])
    metric("shipped_log_bytes_total", "counter", "Job-log bytes of the pipelines shipped (to the receiver or files).",
           [("", counters.get("shipped_log_bytes"))])
    out.extend(_histogram(f"{PREFIX}_cycle_duration_seconds", "How long poll cycles took.",
                          counters.get("cycle_duration")))
    out.extend(_latency(snapshot.get("latency")))
    metric("textfile_written_timestamp_seconds", "gauge", "When this file was written (Unix time).",
           [("", round(now.timestamp(), 3))])
    return "\n".join(out) + "\n"


def _histogram(name: str, help_text: str, values: dict[str, Any] | None) -> list[str]:
    """A histogram without labels from {buckets: {le: cumulative count}, sum_seconds, count}; nothing before
    its first observation."""
    if not values or not values["count"]:
        return []
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    lines += [f'{name}_bucket{{le="{le}"}} {count}' for le, count in values["buckets"].items()]
    return lines + [f"{name}_sum {values['sum_seconds']!r}", f"{name}_count {values['count']}"]


def _latency(timed: dict[str, Any] | None) -> list[str]:
    """The latency histogram and its clamp counter; nothing when not measured (file-only mode)."""
    if timed is None:
        return []
    total = timed["total"]
    name = f"{PREFIX}_delivery_latency_seconds"
    lines = [f"# HELP {name} Seconds from a pipeline's finished_at (GitLab's clock; updated_at for skipped and manual "
             "pipelines) to the receiver's 2xx (this machine's clock): direct, from the outbox, and redelivered.",
             f"# TYPE {name} histogram"]
    lines += [f'{name}_bucket{{le="{le}"}} {count}' for le, count in total["buckets"].items()]
    lines += [f"{name}_sum {total['sum_seconds']!r}", f"{name}_count {total['count']}"]
    clamped = f"{PREFIX}_delivery_latency_clamped_total"
    lines += [f"# HELP {clamped} Deliveries whose latency came out negative (GitLab's clock ahead of this machine's) "
              "and counted as 0.", f"# TYPE {clamped} counter", f"{clamped} {total['clamped']}"]
    return lines


TEXTFILE_FOLDER_MODE = 0o755  # node_exporter runs as another user: it must be able to enter and list the folder


def write_textfile(path: Path, text: str) -> None:
    """Atomically replace ``path`` (temporary file in the same folder, fsync, rename), mode 0644 so that
    node_exporter, running as another user, can read it. Missing folders are created, mode 0755 whatever the
    umask, like the shipper's other folders are created at start (and as ``check`` announces)."""
    make_public_folders(Path(path).parent)
    atomic_write(Path(path), text.encode("utf-8"), mode=0o644, create_folders=False)


def make_public_folders(folder: Path) -> None:
    """``mkdir -p`` with every folder it creates chmod-ed to 0755 (``mkdir``'s mode is cut by the umask, which
    the shipper tightens to 077)."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for created in reversed(missing):
        try:
            created.mkdir()
        except FileExistsError:  # made meanwhile by someone else, or a file: atomic_write then says so
            continue
        os.chmod(created, TEXTFILE_FOLDER_MODE)
