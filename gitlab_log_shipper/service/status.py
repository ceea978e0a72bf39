"""``status``: what the shipper has done and what waits, read from ``STATE_DIR`` only (no network).

:func:`collect` gathers one JSON-ready snapshot (also the source of the metrics textfile);
:func:`render` turns it into the lines an operator reads.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from .. import __version__
from ..config.settings import Config
from ..errors import ShipperError
from ..shipper import GRAPHQL_FALLBACKS, REQUEST_LOG_FAILURES, REST_LISTED
from ..state import latency
from ..state.store import MARKER_NAME, StateStore
from ..timeutil import format_ts, parse_ts
from .stats import CYCLES, INCOMPLETE_CYCLES, REPEATED_ATTEMPTS, TOTALS, metric_counters


def collect(config: Config, state: StateStore, now: datetime) -> dict[str, Any]:
    stats = state.stats()
    cursors = state.cursors()
    last = state.last_deliveries()
    names = {int(key.split(".", 1)[1]): value for key, value in stats.items()
             if key.startswith("project.") and key.split(".", 1)[1].isdigit()}
    projects = [{
        "project_id": pid,
        "path": names.get(pid) or None,
        "cursor": format_ts(cursors[pid]) if pid in cursors else None,
        "last_shipped": last.get(pid),
    } for pid in sorted(set(cursors) | set(names) | set(last))]
    count, size, oldest = state.outbox_stats()
    dead_count, dead_oldest = _dead_letters(config.state_dir / "dead-letter")
    pid = daemon_pid(config.state_dir)
    finished = stats.get("last_cycle.finished_at")
    last_cycle = None
    if finished:
        last_cycle = {
            "started_at": stats.get("last_cycle.started_at"),
            "finished_at": finished,
            "age_seconds": _age(now, finished),
            "duration_seconds": float(stats.get("last_cycle.duration_seconds", "0")),
            "summary": stats.get("last_cycle.summary", ""),
            "complete": stats.get("last_cycle.complete") == "1",
            "project_errors": int(stats.get("last_cycle.project_errors", "0")),
            "outbox_full": stats.get("last_cycle.outbox_full") == "1",
            "first_error": stats.get("last_cycle.first_error") or None,
            "missing_projects": [line for line in stats.get("last_cycle.missing_projects", "").split("\n") if line],
        }
    retries = state.retries()
    rate = stats.get("gitlab.rate_limit_remaining")
    timed = _latency(config, state, stats, now)
    return {
        "version": __version__,
        "state_dir": str(config.state_dir),
        "mode": config.mode,
        "daemon": {"running": pid is not None, "pid": pid},
        "last_cycle": last_cycle,
        "last_success_at": stats.get("last_success_at"),
        "projects": projects,
        "outbox": {"documents": count, "bytes": size, "oldest_queued_at": oldest,
                   "oldest_age_seconds": _age(now, oldest) if oldest else None},
        "dead_letters": {"count": dead_count, "oldest_at": format_ts(dead_oldest) if dead_oldest else None,
                         "folder": str(config.state_dir / "dead-letter")},
        "totals": {name: int(stats.get(f"count.{name}", "0"))
                   for name in (*TOTALS, CYCLES, INCOMPLETE_CYCLES, REQUEST_LOG_FAILURES, GRAPHQL_FALLBACKS, REST_LISTED)},
        "gitlab_rate_limit_remaining": int(rate) if rate and rate.isdigit() else None,
        # How the daemon's latest cycle found changes (GITLAB_API), None before its first cycle.
        "detection": {"mode": stats["gitlab.detection"], "reason": stats.get("gitlab.detection_reason", "")}
        if stats.get("gitlab.detection") else None,
        # Pipelines that failed to ship and are tried again by id on their own backoff (oldest failure first).
        "retrying": {
            "pipelines": len(retries),
            "oldest_failed_at": retries[0].first_failed_at if retries else None,
            "oldest_age_seconds": _age(now, retries[0].first_failed_at) if retries else None,
            "failing_repeatedly": sum(1 for e in retries if e.attempts >= REPEATED_ATTEMPTS),
            "entries": [{"project_id": e.project_id, "pipeline_id": e.pipeline_id, "attempts": e.attempts,
                         "first_failed_at": e.first_failed_at, "next_attempt_at": e.next_attempt_at,
                         "reason": e.reason} for e in retries[:20]],
        },
        "latency": timed,
        "unknown_variables": len(config.unknown_names),
        # Request counts by status, bytes shipped, cycle-duration histogram (the metrics textfile's; issue 14).
        "counters": metric_counters(stats),
    }


def snapshot(config: Config, now: datetime) -> dict[str, Any]:
    """What `status` shows: :func:`empty` before the first run, else :func:`collect`. Every problem reading
    STATE_DIR (a relative one with an unreadable working folder, a folder this user may not enter, a broken
    store) is a :class:`ShipperError` saying which, never a traceback."""
    problem = working_folder_problem([("STATE_DIR", config.state_dir)])
    if problem:
        raise ShipperError(problem)
    try:
        fresh = not (config.state_dir / "state.sqlite3").is_file() and not (config.state_dir / MARKER_NAME).exists()
    except OSError as exc:  # is_file() lets EACCES through (only "does not exist" means False)
        raise ShipperError(f"cannot read STATE_DIR {config.state_dir}: {exc.strerror or exc}; run status as the "
                           "service user (or root)") from None
    if fresh:
        return empty(config)  # nothing ran yet (a store that was lost is an error: StateStore says so)
    state = StateStore(config.state_dir)
    try:
        return collect(config, state, now)
    finally:
        state.close()


def working_folder_problem(folders: Iterable[tuple[str, Path]]) -> str | None:
    """Why relative ``folders`` (name, path) cannot be resolved, or None. A relative STATE_DIR is found from the
    working folder: when that was deleted (``os.getcwd`` fails) or this user may not search it (mode 000, another
    user's home), every look at the folder fails; said once, with the way out, instead of a traceback."""
    relative = [name for name, path in folders if not Path(path).is_absolute()]
    if not relative:
        return None
    try:
        cwd = os.getcwd()
    except OSError as exc:
        why = f"it was deleted or cannot be read ({exc.strerror or exc})"
    else:
        if os.access(cwd, os.X_OK):
            return None
        why = f"{cwd} cannot be searched by this user (permission denied)"
    names = ", ".join(relative)
    return (f"{names} {'is' if len(relative) == 1 else 'are'} relative to the working folder, but {why}: set "
            f"{'it' if len(relative) == 1 else 'them'} to an absolute path (as the systemd unit does), or run from a "
            "folder this user can read")


def _latency(config: Config, state: StateStore, stats: dict[str, str], now: datetime) -> dict[str, Any] | None:
    """Finish -> delivered latency: the last hour's p50 / p95 / max and counts, and the histogram since the state
    store was created (``total``). None in file-only mode: there is no receiver whose 2xx ends it."""
    if not config.posts:
        return None
    rows, full = state.recent_latencies(now - latency.RECENT_WINDOW)
    return {**latency.summary(rows, full=full), "total": latency.histogram(stats)}


def empty(config: Config) -> dict[str, Any]:
    """The snapshot of a STATE_DIR the shipper has never run with."""
    return {"version": __version__, "state_dir": str(config.state_dir), "mode": config.mode, "state": None,
            "daemon": {"running": False, "pid": None}}


def _age(now: datetime, stamp: str) -> float:
    return round(max(0.0, (now - parse_ts(stamp)).total_seconds()), 1)


def _dead_letters(folder: Path) -> tuple[int, datetime | None]:
    """How many, and when the oldest was written (its metadata file's mtime: no need to read them all)."""
    times = []
    if folder.is_dir():
        for meta in folder.glob("*.meta.json"):
            try:
                times.append(meta.stat().st_mtime)
            except FileNotFoundError:
                continue  # redelivered while we looked
    oldest = datetime.fromtimestamp(min(times), timezone.utc) if times else None
    return len(times), oldest


def daemon_pid(state_dir: Path) -> int | None:
    """The pid of the process holding ``STATE_DIR/lock`` (the daemon), without touching the lock: taking it,
    even for a moment, could make a daemon that starts at that instant exit as a 'second instance'.

    Linux lists every flock in ``/proc/locks`` by inode. Elsewhere (or when it cannot be read): the pid
    the daemon wrote into the file, if that process is alive and looks like the shipper.
    """
    path = Path(state_dir) / "lock"
    try:
        st = path.stat()
        written = path.read_text("ascii", errors="replace").strip()
    except OSError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                if "->" not in fields and "FLOCK" in fields and device in fields:
                    holder = fields[fields.index(device) - 1]
                    return int(holder) if holder.isdigit() else None
        if Path("/proc/self").exists():
            return None  # /proc/locks was readable and names no holder
    except OSError:
        pass
    if not written.isdigit() or int(written) == os.getpid():
        return None
    try:
        os.kill(int(written), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return int(written)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min ago"
    if seconds < 36 * 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min ago"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h ago"


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"


def _bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _latency_line(timed: dict[str, Any] | None, mode: str) -> str:
    """``latency:`` finish (GitLab's finished_at) -> the receiver's 2xx, over the last hour."""
    if timed is None:
        return f"latency:       not measured in {mode} mode (no receiver: finish -> delivered ends at a receiver's 2xx)"
    total = timed["total"]
    since = f"{total['count']} since the state store was created"
    if total["clamped"]:
        since += f", {total['clamped']} clamped to 0 (GitLab's clock ahead of this one)"
    if not timed["count"]:
        return f"latency:       none delivered in the last hour (finish -> receiver 2xx); {since}"
    paths = ", ".join(f"{n} {path}" for path, n in timed["by_path"].items() if n)
    latest = f", the latest {timed['only_latest']}" if timed["only_latest"] else ""
    return (f"latency:       last hour{latest}: {timed['count']} delivered ({paths}), finish -> receiver 2xx p50 "
            f"{_seconds(timed['p50_seconds'])}, p95 {_seconds(timed['p95_seconds'])}, max "
            f"{_seconds(timed['max_seconds'])}; {since}")


def render(snapshot: dict[str, Any], now: datetime) -> list[str]:
    """The snapshot as aligned lines for a terminal (or a ticket)."""
    lines = [f"gitlab-log-shipper {snapshot['version']}: mode {snapshot['mode']}, STATE_DIR {snapshot['state_dir']}"]
    daemon = snapshot["daemon"]
    lines.append("daemon:        " + (f"running (pid {daemon['pid']})" if daemon["running"]
                                      else "not running (no process holds STATE_DIR/lock)"))
    if snapshot.get("state", True) is None:
        lines.append("state:         none yet: the shipper has not run with this STATE_DIR")
        return lines
    cycle = snapshot["last_cycle"]
    if cycle:
        lines.append(f"last cycle:    {cycle['finished_at']} ({_ago(cycle['age_seconds'])}), took "
                     f"{_seconds(cycle['duration_seconds'])}: {cycle['summary']}")
        if cycle["first_error"]:
            lines.append(f"               {cycle['project_errors']} project error(s), first: {cycle['first_error']}")
        for missing in cycle.get("missing_projects") or []:
            lines.append(f"missing:       {missing} (configured, but GitLab does not show it: fix GITLAB_PROJECTS/"
                         "GITLAB_GROUPS or the token's access)")
    else:
        lines.append("last cycle:    none recorded yet")
    success = snapshot["last_success_at"]
    lines.append("last success:  " + (f"{success} ({_ago(_age(now, success))}): everything found was delivered"
                                      if success else "never (no cycle has delivered everything it found yet)"))
    outbox = snapshot["outbox"]
    if cycle and cycle.get("outbox_full"):
        lines.append("outbox full:   the last cycle took no new pipelines (OUTBOX_MAX_BYTES reached): they wait in "
                     "GitLab until the receiver takes the outbox")
    if outbox["documents"]:
        lines.append(f"outbox:        {outbox['documents']} document(s), {_bytes(outbox['bytes'])}, oldest queued "
                     f"{outbox['oldest_queued_at']} ({_ago(outbox['oldest_age_seconds'])})")
    else:
        lines.append("outbox:        empty")
    dead = snapshot["dead_letters"]
    if dead["count"]:
        lines.append(f"dead letters:  {dead['count']}, oldest {dead['oldest_at']}, in {dead['folder']}: "
                     "read the .meta.json, fix the cause, run `gitlab-log-shipper redeliver`")
    else:
        lines.append("dead letters:  none")
    retrying = snapshot.get("retrying") or {"pipelines": 0}
    if retrying["pipelines"]:
        lines.append(f"retrying:      {retrying['pipelines']} pipeline(s) failed to ship, oldest since "
                     f"{retrying['oldest_failed_at']} ({_ago(retrying['oldest_age_seconds'])}); tried again on their "
                     "own backoff, or now with `gitlab-log-shipper post --pipeline-id N`")
        for entry in retrying["entries"][:5]:
            lines.append(f"  pipeline {entry['pipeline_id']} (project {entry['project_id']}): {entry['attempts']} "
                         f"attempt(s), next {entry['next_attempt_at']}: {entry['reason'][:200]}")
    else:
        lines.append("retrying:      none")
    totals = snapshot["totals"]
    lines.append("totals:        " + " ".join(f"{name}={totals[name]}" for name in TOTALS)
                 + f" ({totals[CYCLES]} cycle(s), {totals[INCOMPLETE_CYCLES]} incomplete)")
    if totals.get(REQUEST_LOG_FAILURES):
        lines.append(f"request log:   {totals[REQUEST_LOG_FAILURES]} line(s) could not be written to api-requests.log "
                     "(deliveries were not affected; see the ERROR lines in the log)")
    lines.append(_latency_line(snapshot.get("latency"), snapshot["mode"]))
    if snapshot.get("detection"):
        detection = snapshot["detection"]
        fallbacks = totals.get(GRAPHQL_FALLBACKS, 0)
        lines.append(f"detection:     {'GraphQL' if detection['mode'] == 'graphql' else 'REST'} ({detection['reason']})"
                     + (f"; GraphQL failed as a whole {fallbacks} time(s)" if fallbacks else ""))
    if snapshot["gitlab_rate_limit_remaining"] is not None:
        lines.append(f"GitLab API:    {snapshot['gitlab_rate_limit_remaining']} requests left in the rate-limit window "
                     "(at the last cycle)")
    projects = snapshot["projects"]
    lines.append(f"projects ({len(projects)}):" if projects else "projects:      none polled yet")
    for project in projects:
        label = f"{project['project_id']}" + (f" {project['path']}" if project["path"] else "")
        cursor = f"cursor {project['cursor']}" if project["cursor"] else "no cursor yet"
        shipped = project["last_shipped"]
        last = (f"last: pipeline {shipped['pipeline_id']} {shipped['outcome']} {shipped['at']}" if shipped
                else "nothing shipped in the last 30 days")
        lines.append(f"  {label:<32} {cursor}  {last}")
    return lines
