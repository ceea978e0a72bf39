"""The shipping logic: which pipelines to ship, building their document, handing it to API and/or files.

Knows neither HTTP details (``poster``) nor python-gitlab (``gitlab.rest``); decides on time only through the
injected ``clock`` and GitLab's own clock (the ``Date`` of its answers). One poll of a project:

1. list pipelines updated since (cursor − ``POLL_OVERLAP``), keyset-paged so that deletions never make a row
   be skipped (see :meth:`GitLabSource.list_pipelines`);
2. skip rows seen before with the same status and ``updated_at`` (no request), unfinished rows (they come back
   with a newer ``updated_at`` when they finish), rows the status filter drops and rows waiting for a retry;
3. fetch the pipeline; a finish shipped before is not shipped again (:func:`payload.finish_of`: skipped and
   manual pipelines have no ``finished_at``, their finish is told by their jobs);
4. ship: jobs (checked to belong to the same state of the pipeline) → filter by status → stream traces to a
   spool → one document → POST and/or files;
5. anything that could not be shipped goes to the durable retry list (tried again by id, on its own backoff),
   so it never holds the cursor; the cursor moves to GitLab's "now" of this listing (never to a row's
   ``updated_at``, which another node's clock may have stamped in the future). An idle project's cursor moves too.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import shutil
import tempfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .config.settings import FINISHED_STATUSES, Config
from .delivery.files import FileOutput
from .delivery.outbox import DEAD_LETTER, QUEUED, SENT, Delivery, DocumentInfo
from .delivery.poster import ApiPoster
from .delivery.request_log import ManagedRequestLog
from .document.payload import (
    JobLog,
    document_header,
    document_size,
    escaped_size,
    finish_of,
    fit_budgets,
    is_legacy_finish,
    truncate_log,
    idempotency_key,
    rest_time,
    job_fields,
    keep_job,
    latest_attempts,
    stage_order,
    user_of,
    write_document,
)
from .document.redact import Redactor
from .document.sections import LogScanner, ScanResult
from .document.spool import CappedLog
from .errors import DeliveryError, GitLabSourceError, ShipperError
from .gitlab.graphql import Detected, GraphQLDetector, GraphQLUnusable, Probe, decide_api
from .gitlab.rest import DiscoveryProblem, GitLabSource, ProjectRef
from .state.latency import rest_time as latency_rest_time
from .state.read_only import ReadOnlyStateStore
from .state.store import RetryEntry, StateStore
from .timeutil import format_ts, parse_ts, utcnow

log = logging.getLogger(__name__)

# Outcomes of handling one pipeline, counted per cycle and in logs.
SHIPPED = "shipped"  # delivered to the API and/or written to files as the mode requires
FAILED = "failed"  # not delivered; tried again on a later cycle
FILTERED = "filtered"  # dropped by LOG_SAVE_PIPELINE_STATUS
DUPLICATE = "deduplicated"  # this finish was shipped before
UNCHANGED = "unchanged"  # list row identical to one handled before: no request made
UNFINISHED = "unfinished"  # not finished yet: waits for a later cycle
GONE = "gone"  # deleted in GitLab between listing and fetching
QUEUED_OUTCOME = "queued"  # the receiver did not take it yet: kept in the outbox, retried on later cycles
DEAD_LETTERED = "dead_lettered"  # the receiver rejected it for good: kept in the dead-letter folder
WOULD_SHIP = "would_ship"  # --dry-run: the document was built and shown; nothing sent, written or recorded
CHANGED = "changed"  # the pipeline changed while it was read (retried, a manual job played): read again next cycle
RETRY_WAITING = "retry_waiting"  # failed before; its next attempt is not due yet
# Counted when the outbox is drained at the start of a cycle.
OUTBOX_SENT, OUTBOX_DEAD, OUTBOX_WAITING = "outbox_delivered", "outbox_dead_lettered", "outbox_waiting"
OUTBOX_COUNTS = (OUTBOX_SENT, OUTBOX_DEAD, OUTBOX_WAITING)
REQUEST_LOG_FAILURES = "request_log_write_failures"  # api-requests.log lines that could not be written this cycle
GRAPHQL_FALLBACKS = "graphql_fallbacks"  # GraphQL detection failed as a whole this cycle: REST listed every project
REST_LISTED = "rest_listed_projects"  # GraphQL mode: projects listed through REST (absent from GraphQL's answer)
GRAPHQL_REPROBE = 3600.0  # after a fallback at run time, GraphQL is probed again this many seconds later
DETECTION_SHARE = 0.10  # of GITLAB_REQUEST_BUDGET, the most that GraphQL detection may use (the rest ships)
HANDED_OFF = frozenset({SHIPPED, QUEUED_OUTCOME, DEAD_LETTERED})  # durably somewhere
TRY_AGAIN = frozenset({FAILED, CHANGED})  # kept in the retry list (state.retries) until shipped or gone
# A pipeline that keeps failing is tried again at the next two cycles, then after POLL_INTERVAL, twice as long each
# time, at most this long.
PIPELINE_RETRY_MAX = 3600.0
# Latest job attempts in one of these mean the pipeline is not at rest any more, whatever its own status said.
# ("created" is not among them: the jobs behind a blocking manual job stay created while the pipeline is manual.)
_ACTIVE_JOB_STATUSES = frozenset({"waiting_for_resource", "preparing", "pending", "running", "canceling",
                                  "waiting_for_callback"})


@dataclass
class ShipResult:
    """What happened to one pipeline."""

    outcome: str
    project_id: int
    pipeline_id: int
    finish: str = ""
    idempotency_key: str = ""
    http_status: int | None = None
    jobs: int = 0
    log_bytes: int = 0
    folder: Path | None = None
    reason: str = ""



@dataclass
class CycleReport:
    """Counters of one poll cycle (or one backfill)."""

    counts: Counter = field(default_factory=Counter)
    project_errors: list[str] = field(default_factory=list)
    missing_projects: list[str] = field(default_factory=list)  # configured but deleted, renamed or not visible
    results: list[ShipResult] = field(default_factory=list)
    gitlab_unreachable: bool = False  # no project could be polled at all (GitLab down, token rejected)
    # The outbox reached OUTBOX_MAX_BYTES, so no project was polled: the receiver's problem, not GitLab's, so it is
    # not a project error (those page the GitLab-errors alert) but its own flag, metric and status line.
    outbox_full: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def complete(self) -> bool:
        """Everything found was delivered (or written) and nothing waits in the outbox."""
        return not (self.project_errors or self.missing_projects or self.outbox_full or self.counts[FAILED] or self.counts[CHANGED]
                    or self.counts[RETRY_WAITING] or self.counts[QUEUED_OUTCOME]
                    or self.counts[DEAD_LETTERED] or self.counts[OUTBOX_WAITING] or self.counts[OUTBOX_DEAD])

    def add(self, result: ShipResult) -> None:
        with self._lock:
            self.counts[result.outcome] += 1
            if result.outcome in (*HANDED_OFF, *TRY_AGAIN, GONE, WOULD_SHIP):
                self.results.append(result)

    def error(self, message: str) -> None:
        with self._lock:
            self.project_errors.append(message)

    def summary(self) -> str:
        parts = [f"{k}={self.counts[k]}" for k in (SHIPPED, WOULD_SHIP, QUEUED_OUTCOME, DEAD_LETTERED, FAILED, CHANGED,
                                                    RETRY_WAITING, FILTERED, DUPLICATE, UNCHANGED, UNFINISHED, GONE,
                                                    *OUTBOX_COUNTS)
                 if self.counts[k]]
        if self.outbox_full:
            parts.append("outbox_full=1")
        if self.project_errors:
            parts.append(f"project_errors={len(self.project_errors)}")
        if self.missing_projects:
            parts.append(f"missing_projects={len(self.missing_projects)}")
        return " ".join(parts) or "nothing to do"


def _remove_dead_spools(root: Path) -> None:
    """Spool folders (one per process id) of processes that are gone hold only copies of GitLab data."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            os.kill(int(entry.name), 0)
            continue  # that process is alive (another command on the same STATE_DIR)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(entry, ignore_errors=True)


class Shipper:
    """Owns one configuration's source, state, poster and file output."""

    def __init__(
        self,
        config: Config,
        *,
        state: StateStore | None = None,
        source: GitLabSource | None = None,
        clock: Callable[[], datetime] = utcnow,
        stop: threading.Event | None = None,
        dry_run: bool = False,
        preview: Callable[[Path, Mapping[str, Any], ShipResult], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.stop = stop or threading.Event()
        # --dry-run: decide as for real, build each document and hand it to ``preview`` (path, header,
        # result); no state is written (read-only store), no POST, no file output, nothing in STATE_DIR.
        self.dry_run = dry_run
        self.preview = preview
        self.state = state or (ReadOnlyStateStore(config.state_dir) if dry_run else StateStore(config.state_dir))
        self.source = source or GitLabSource(config)
        posts, writes_files = config.posts and not dry_run, config.writes_files and not dry_run
        self.poster = ApiPoster(config, ManagedRequestLog.for_config(config), clock=clock) if posts else None
        self.files = FileOutput(config.log_output_dir, enriched=config.document_fields == "enriched") if writes_files else None
        self.delivery = Delivery(config, self.state, self.poster, clock=clock) if self.poster else None
        self.redactor = Redactor.from_settings(config.log_redact_patterns, config.secrets())  # LOG_REDACT_PATTERNS; None when off
        # DOCUMENT_FIELDS: the enriched document (sections, failure details, links) or exactly the design's fields
        self.enriched = config.document_fields == "enriched"
        self.design = not self.enriched
        if dry_run:
            self.spool_root = Path(tempfile.mkdtemp(prefix="gitlab-log-shipper-dry-run-"))
        else:
            self.spool_root = config.state_dir / "spool" / str(os.getpid())
            _remove_dead_spools(config.state_dir / "spool")
        self._projects: list[ProjectRef] | None = None
        self._discovered_at: datetime | None = None
        # GITLAB_API: how changes are found. "rest" lists each project; "graphql" detects many projects per request
        # (gitlab/graphql.py). auto: decided by a probe of /api/graphql at the first cycle that reaches GitLab.
        self.detector = GraphQLDetector(self.source, children=config.poll_child_pipelines, clock=clock,
                                        url=config.gitlab_url)
        self.api_mode: str | None = "rest" if config.gitlab_api == "rest" else None
        self.api_reason = "GITLAB_API=rest" if config.gitlab_api == "rest" else "not probed yet"
        self._probe_again_at: datetime | None = None
        self._missing_in_graphql: set[int] = set()  # projects already said to be absent from GraphQL's answers
        self._rest_listing_requests = 0  # GraphQL mode: the latest cycle's REST listing requests (poll_interval)
        self._rest_listing_lock = threading.Lock()  # added to by the project pool
        self.missing_projects: list[DiscoveryProblem] = []  # of the latest discovery
        self._previous_poll: datetime | None = None  # the newest cursor at the start of the cycle
        # Three pools, so that no task ever waits for a task queued behind it in its own pool: projects
        # are polled, their pipelines shipped and each pipeline's logs fetched CONCURRENCY at a time.
        workers = config.concurrency
        self._project_pool = ThreadPoolExecutor(workers, thread_name_prefix="project")
        self._pipeline_pool = ThreadPoolExecutor(workers, thread_name_prefix="pipeline")
        self._trace_pool = ThreadPoolExecutor(workers, thread_name_prefix="trace")

    def __repr__(self) -> str:
        return f"Shipper(gitlab={self.config.gitlab_url!r}, mode={self.config.mode!r})"

    @property
    def poll_interval(self) -> float:
        """Seconds between two cycles: POLL_INTERVAL, whose default is shorter with GraphQL detection. With GraphQL,
        stretched when the last detection's requests at that pace would pass DETECTION_SHARE of
        GITLAB_REQUEST_BUDGET (a minute's requests): polling often must not eat the budget that shipping needs."""
        if self.api_mode != "graphql":
            return self.config.poll_interval
        # Projects absent from GraphQL's answers are listed with REST every cycle: that is detection's cost too.
        spent = self.detector.last_requests + self._rest_listing_requests
        planned = spent * 60.0 / (DETECTION_SHARE * self.config.gitlab_request_budget)
        return max(self.config.effective_poll_interval_graphql, planned)

    # -- how changes are found (GITLAB_API) ------------------------------------------------------

    def choose_api(self, probe: Probe | None = None) -> str:
        """Decide REST or GraphQL detection (GITLAB_API, :func:`graphql.decide_api`), probing /api/graphql unless
        ``probe`` is given or GITLAB_API=rest. Logged when it changes, with its reason. Raises GitLabSourceError when
        GitLab cannot be reached (the decision is then made at a later cycle)."""
        if self.config.gitlab_api != "rest" and probe is None:
            probe = self.detector.probe()
        choice = decide_api(self.config.gitlab_api, probe, children=self.config.poll_child_pipelines)
        if choice.problem:
            (log.error if choice.mode == "rest" else log.warning)("%s", choice.problem)
        if (choice.mode, choice.reason) != (self.api_mode, self.api_reason):
            log.info("detecting changes with %s (%s)", "GraphQL" if choice.mode == "graphql" else "REST", choice.reason)
        self.detector.children = choice.children
        self.api_mode, self.api_reason = choice.mode, choice.reason
        return choice.mode

    def _decide_api(self) -> None:
        """At the start of a cycle: probe when nothing is decided yet, or again an hour after a fallback."""
        due = self._probe_again_at is not None and self.clock() >= self._probe_again_at
        if self.api_mode is not None and not due:
            return
        try:
            self.choose_api()
            self._probe_again_at = None
        except GitLabSourceError as exc:
            if self.api_mode is None:
                log.warning("cannot probe GitLab's GraphQL API (%s); this cycle lists with REST", exc)
                self.api_reason = f"GraphQL could not be probed ({str(exc)[:200]}); REST until it can"

    def _detect(self, projects: list[ProjectRef], report: CycleReport) -> dict[int, Detected]:
        """GraphQL mode: every project's changes, a few POSTs for all of them. On a GraphQL failure as a whole
        (schema refused, API gone) every project is listed through REST this cycle, said once and counted."""
        started = self.clock()
        wanted = [(p.id, self._window_start(p, started) - timedelta(seconds=self.config.poll_overlap)) for p in projects]
        try:
            return self.detector.detect(wanted, self.stop)
        except GraphQLUnusable as exc:
            report.counts[GRAPHQL_FALLBACKS] += 1
            log.warning("GraphQL detection failed (%s); every project is listed with REST, and GraphQL is probed "
                        "again in %.0f min", exc, GRAPHQL_REPROBE / 60)
            self.api_mode, self.api_reason = "rest", f"fell back at run time: {exc}"
            self._probe_again_at = started + timedelta(seconds=GRAPHQL_REPROBE)
            return {}
        except GitLabSourceError as exc:  # unreachable, token rejected: every project fails as with REST
            return {p.id: Detected(p.id, started, error=str(exc)) for p in projects}

    def close(self) -> None:
        for pool in (self._project_pool, self._pipeline_pool, self._trace_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.spool_root, ignore_errors=True)
        if self.poster:
            self.poster.close()
        self.source.close()
        self.state.close()

    # -- projects -------------------------------------------------------------------------------

    def project_allowed(self, project_id: int) -> bool:
        """``SHARD``, then ``LOG_SAVE_PROJECTS`` (allow list) or else ``LOG_EXCLUDE_PROJECTS``, as the predecessor."""
        index, count = self.config.shard
        if project_id % count != index:
            return False
        if self.config.save_projects:
            return project_id in self.config.save_projects
        return project_id not in self.config.exclude_projects

    def projects(self, *, refresh: bool = False) -> list[ProjectRef]:
        """The projects to poll, re-discovered every ``DISCOVERY_INTERVAL`` (groups gain projects)."""
        now = self.clock()
        stale = self._discovered_at is None or now - self._discovered_at >= timedelta(seconds=self.config.discovery_interval)
        if self._projects is None or stale or refresh:
            problems: list[DiscoveryProblem] = []
            try:
                found = self.source.discover_projects(self.config.gitlab_projects, self.config.gitlab_groups, problems)
            except GitLabSourceError as exc:
                if self._projects is None:
                    raise
                log.warning("project discovery failed (%s); keeping the %d known projects", exc, len(self._projects))
                return self._projects
            self.missing_projects = problems
            allowed = [p for p in found if self.project_allowed(p.id)]
            dropped = len(found) - len(allowed)
            log.info("polling %d project(s)%s", len(allowed), f" ({dropped} excluded by project filters)" if dropped else "")
            self._projects = allowed
            self._discovered_at = now
        return self._projects

    @property
    def known_projects(self) -> list[ProjectRef]:
        """The projects of the latest discovery, without a request (empty before the first); for `status`."""
        return list(self._projects or [])

    def resolve_projects(self, refs: Iterable[str]) -> list[ProjectRef]:
        """``--project`` options (ids or paths) → projects, without applying the project filters."""
        return [self.source.get_project(ref) for ref in refs]

    # -- the poll cycle -------------------------------------------------------------------------

    def run_cycle(self) -> CycleReport:
        """Poll every project once. GitLab errors are logged per project and never end the cycle."""
        request_log = self.poster.request_log if self.poster is not None else None
        failures_before = request_log.write_failures if request_log is not None else 0
        report = CycleReport()
        try:
            self._poll_all(report)
        finally:
            if request_log is not None and request_log.write_failures > failures_before:
                report.counts[REQUEST_LOG_FAILURES] += request_log.write_failures - failures_before
        return report

    def _poll_all(self, report: CycleReport) -> None:
        if self.delivery is not None:
            drained = self.delivery.drain(budget_seconds=self.poll_interval, stop=self.stop)  # 10 s with GraphQL
            report.counts[OUTBOX_SENT] += drained[SENT]
            report.counts[OUTBOX_DEAD] += drained[DEAD_LETTER]
            if self.delivery.outbox_full():
                report.counts[OUTBOX_WAITING] = self.state.outbox_stats()[0]
                report.outbox_full = True  # DeliveryManager.outbox_full logged why, with the way out
                return
        try:
            projects = self.projects()
        except GitLabSourceError as exc:
            log.error("cannot discover projects: %s", exc)
            report.project_errors.append(str(exc))
            report.gitlab_unreachable = True
            return
        for problem in self.missing_projects:
            # Every cycle, so that it shows in the log, in `status` and in the metrics until someone acts.
            log.error("%s is configured but cannot be read: %s; the other projects are polled as usual",
                      problem.ref, _without_prefix(problem.reason, problem.ref))
            report.missing_projects.append(f"{problem.ref}: {_without_prefix(problem.reason, problem.ref)}")

        def poll(project: ProjectRef) -> bool:
            if self.stop.is_set():
                return False
            try:
                self.poll_project(project, report, detected.get(project.id))
                return True
            except GitLabSourceError as exc:
                log.error("project %s: %s; will retry next cycle", project.id, _without_prefix(str(exc), project.id))
                report.error(f"{project.id}: {_without_prefix(str(exc), project.id)}")
                return False

        # Taken before any project of this cycle moves its cursor (they are polled concurrently): when the last
        # cycle reached GitLab, for the first window of a project that appeared since (see poll_project).
        known = self.state.cursors()
        self._previous_poll = max(known.values()) if known else None
        self._decide_api()
        self._rest_listing_requests = 0
        detected = self._detect(projects, report) if self.api_mode == "graphql" and projects else {}
        polled = sum(_all_results(self._project_pool, poll, projects))
        report.gitlab_unreachable = bool(projects) and polled == 0 and not self.stop.is_set()
        if polled and not self.stop.is_set():
            self._retry_unpolled(projects, report)
        if self.delivery is not None:
            report.counts[OUTBOX_WAITING] = self.state.outbox_stats()[0]
        self.state.prune(self.clock())
        log.info("cycle done: %s", report.summary())

    def _retry_unpolled(self, projects: list[ProjectRef], report: CycleReport) -> None:
        """Retry-list entries of projects this cycle did not poll: put there by `backfill --project` or `post` for a
        project outside the configuration, or left by a project taken out of it. Those the project filters
        (LOG_SAVE_PROJECTS, LOG_EXCLUDE_PROJECTS, SHARD) now exclude are dropped, with a log line; the others are
        worked off like any, by id, so that what failed is not lost because the configuration changed."""
        polled = {project.id for project in projects}
        orphans: dict[int, list[RetryEntry]] = {}
        for entry in self.state.retries():
            if entry.project_id not in polled:
                orphans.setdefault(entry.project_id, []).append(entry)
        for project_id, entries in orphans.items():
            if not self.project_allowed(project_id):
                log.warning("project %s is excluded by the project filters now; dropping %d pipeline(s) from the "
                            "retry list (resend one with `post --pipeline-id N --project %s`)", project_id,
                            len(entries), project_id)
                for entry in entries:
                    self.state.clear_retry(project_id, entry.pipeline_id)
                continue
            now = self.clock()
            if all(parse_ts(entry.next_attempt_at) > now for entry in entries):
                for entry in entries:  # nothing due: no request, but the cycle is not complete either
                    report.add(ShipResult(RETRY_WAITING, project_id, entry.pipeline_id, reason=entry.reason))
                continue
            try:
                project = self.source.get_project(project_id)
            except GitLabSourceError as exc:
                if exc.gone:
                    log.warning("project %s is gone from GitLab; dropping its %d pipeline(s) from the retry list",
                                project_id, len(entries))
                    for entry in entries:
                        self.state.clear_retry(project_id, entry.pipeline_id)
                else:
                    report.error(f"{project_id}: {_without_prefix(str(exc), project_id)}")
                continue
            for result in _all_results(self._pipeline_pool, lambda task: task(), self._retry_tasks(project, entries)):
                report.add(result)

    def _window_start(self, project: ProjectRef, started: datetime) -> datetime:
        """The project's cursor: where its next listing starts (before POLL_OVERLAP)."""
        cursor = self.state.get_cursor(project.id)
        if cursor is None:
            # Stored at once, before the first listing: a project whose first polls fail (or that stays idle) keeps
            # this window start instead of recomputing "now - INITIAL_LOOKBACK" on every run (which, after a
            # downtime longer than the look-back, would skip what finished meanwhile). A project that appears on a
            # later run (created, shared or re-created while the shipper was down) starts no later than the last
            # successful poll of any project: what it ran since then was never looked at.
            cursor = started - timedelta(seconds=self.config.initial_lookback)
            if self._previous_poll is not None:
                cursor = min(cursor, self._previous_poll)
            log.info("project %s: first poll, looking back to %s", project.id, format_ts(cursor))
            self.state.set_cursor(project.id, cursor, started)
        else:
            bound = self.state.legacy_cursor_bound(project.id)
            if bound is not None and cursor > bound:
                # Written by an older version, which moved cursors to the newest row's updated_at (one stamped by a
                # GitLab node whose clock ran ahead could push it past pipelines finishing meanwhile): not trusted
                # past the last time this machine handled anything for the project.
                log.warning("project %s: its cursor %s (written by an older version) is later than anything this "
                            "machine stamped for it (%s); listing from there", project.id, format_ts(cursor),
                            format_ts(bound))
                cursor = bound
        return cursor

    def poll_project(self, project: ProjectRef, report: CycleReport, detected: Detected | None = None) -> None:
        """List what changed in the project since its cursor, ship it, move the cursor. ``detected``: what GraphQL
        detection found for it this cycle (its listing, or why it has none); None: listed through REST."""
        if detected is not None and detected.error is not None:
            raise GitLabSourceError(detected.error)  # that block failed: the cursor stays, next cycle tries again
        started = detected.started if detected is not None and detected.listing is not None else self.clock()
        cursor = self._window_start(project, started)
        since = cursor - timedelta(seconds=self.config.poll_overlap)
        if detected is not None and detected.listing is not None:
            listing = detected.listing
        else:
            if detected is not None and detected.missing:
                self._listed_through_rest(project, report, quiet=detected.rest_reason is not None)
            listing = self.source.list_pipelines(project.id, since, children=self.config.poll_child_pipelines)
            if detected is not None:
                with self._rest_listing_lock:
                    self._rest_listing_requests += listing.requests
        if listing.gitlab_now is not None and since > listing.gitlab_now:
            # A cursor ahead of GitLab's clock: set by an earlier version from a row stamped by a node whose clock
            # ran ahead, or by a clock that was wrong. What finished since the last real poll would be skipped.
            since = listing.gitlab_now - timedelta(seconds=max(self.config.initial_lookback, self.config.poll_overlap))
            log.warning("project %s: its cursor %s is ahead of GitLab's clock (%s); listing again from %s "
                        "(INITIAL_LOOKBACK); run `backfill` for anything older", project.id, format_ts(cursor),
                        format_ts(listing.gitlab_now), format_ts(since))
            listing = self.source.list_pipelines(project.id, since, children=self.config.poll_child_pipelines)
        for pipeline_id, updated_at, date in listing.future:
            log.warning("project %s: pipeline %s has updated_at %s, ahead of GitLab's clock (Date %s): GitLab's "
                        "nodes disagree on the time; the cursor stays at GitLab's now", project.id, pipeline_id,
                        updated_at, date)
        waiting = {entry.pipeline_id: entry for entry in self.state.retries(project.id)}
        tasks: list[Callable[[], ShipResult]] = [
            (lambda row=row: self._handle_row(project, row, waiting.get(int(row["id"])))) for row in listing.rows.values()]
        # Pipelines that failed before and are not in this listing any more (their rows left the window): by id.
        tasks += self._retry_tasks(project, [entry for entry in waiting.values() if entry.pipeline_id not in listing.rows])
        results = _all_results(self._pipeline_pool, lambda task: task(), tasks)
        if self.stop.is_set():
            return  # cursor untouched: what was cut short is polled again after the restart
        for result in results:
            report.add(result)
        # The next window starts POLL_OVERLAP before GitLab's "now" of this listing (the Date of its first answer,
        # whole seconds, so never ahead of GitLab), and never after our own clock at the start of the poll: of two
        # clocks that disagree, the earlier one is the safe one. Rows' updated_at are not used: a node whose clock
        # runs ahead could push the cursor into the future, past pipelines that finish meanwhile.
        new_cursor = started if listing.gitlab_now is None else min(listing.gitlab_now, started)
        if listing.gitlab_now is not None and abs((listing.gitlab_now - started).total_seconds()) > self.config.poll_overlap:
            log.warning("project %s: GitLab's clock (%s) and this machine's (%s) differ by more than POLL_OVERLAP; "
                        "check NTP on both", project.id, format_ts(listing.gitlab_now), format_ts(started))
        self.state.set_cursor(project.id, new_cursor, started)

    def _listed_through_rest(self, project: ProjectRef, report: CycleReport, *, quiet: bool = False) -> None:
        """A project GraphQL's answer left out (GitLab omits projects the token cannot see there): listed with REST,
        said once per project and process, counted every cycle."""
        report.counts[REST_LISTED] += 1
        if not quiet and project.id not in self._missing_in_graphql:
            self._missing_in_graphql.add(project.id)
            log.warning("project %s: absent from GitLab's GraphQL answer (not visible to the token there, or just "
                        "deleted); listed with REST instead, every cycle", project.id)

    def _retry_tasks(self, project: ProjectRef, entries: Iterable[RetryEntry]) -> list[Callable[[], ShipResult]]:
        """Retry-list entries whose rows are not in a listing: the due ones are read by id, the others are reported
        as waiting (so that a cycle with a pipeline still undelivered is never "complete")."""
        now = self.clock()
        tasks: list[Callable[[], ShipResult]] = []
        for entry in entries:
            if parse_ts(entry.next_attempt_at) <= now:
                tasks.append(lambda entry=entry: self._retry(project, entry))
            else:
                tasks.append(lambda entry=entry: ShipResult(RETRY_WAITING, project.id, entry.pipeline_id,
                                                            reason=entry.reason))
        return tasks

    def _handle_row(self, project: ProjectRef, row: Mapping[str, Any], waiting: RetryEntry | None = None) -> ShipResult:
        pipeline_id = int(row["id"])
        status = str(row.get("status"))
        updated_at = str(row["updated_at"])
        base = ShipResult(UNCHANGED, project.id, pipeline_id)
        if self.stop.is_set():
            return base  # shutting down: the cycle's results are dropped and the cursor stays, so it comes again
        if status not in FINISHED_STATUSES:
            if waiting is not None:  # reopened: the finish that failed is superseded; its next one is listed anew
                self.state.clear_retry(project.id, pipeline_id)
            base.outcome = UNFINISHED
            return base
        seen = self.state.seen(project.id, pipeline_id)
        if waiting is None and seen and seen.list_status == status and _same_time(seen.list_updated_at, updated_at):
            return base
        if (waiting is not None and waiting.list_row is not None and waiting.list_row[0] == status
                and _same_time(waiting.list_row[1], updated_at) and parse_ts(waiting.next_attempt_at) > self.clock()):
            base.outcome = RETRY_WAITING  # the same row failed before; a row that moved is a new state: tried now
            base.reason = waiting.reason
            return base
        # A pipeline on the retry list is shipped even if its finish was delivered: it is there because something
        # else failed (dual mode: its files), and a resend carries the same Idempotency-Key.
        shipped = seen.shipped_finish if seen and waiting is None else None
        return self._ship_listed(project, pipeline_id, (status, updated_at), shipped, waiting)

    def _retry(self, project: ProjectRef, entry: RetryEntry) -> ShipResult:
        """A pipeline that failed before and is no longer in the listing window: read it by id."""
        return self._ship_listed(project, entry.pipeline_id, entry.list_row, None, entry)

    def _ship_listed(self, project: ProjectRef, pipeline_id: int, list_row: tuple[str, str] | None,
                     shipped_finish: str | None, waiting: RetryEntry | None) -> ShipResult:
        """Filters, the pipeline GET, de-duplication, then :meth:`ship`; failures are kept for another attempt."""
        base = ShipResult(UNCHANGED, project.id, pipeline_id)
        status = list_row[0] if list_row else None
        if status is not None and not self.status_allowed(status):
            return self._filtered(project, pipeline_id, status, list_row)
        try:
            detail = self.source.get_pipeline(project.id, pipeline_id)
        except GitLabSourceError as exc:
            return self._keep_for_retry(self._source_failure(project, pipeline_id, exc, list_row), list_row, waiting)
        current = str(detail.get("status"))
        if current not in FINISHED_STATUSES:
            # Reopened since it was listed (a retry, a manual job played): its next finish gives it a newer
            # updated_at, which the listing brings back. Nothing to keep.
            self.state.clear_retry(project.id, pipeline_id)
            base.outcome = UNFINISHED
            return base
        row = (current, str(detail["updated_at"])) if detail.get("updated_at") else list_row
        if not self.status_allowed(current):
            return self._filtered(project, pipeline_id, current, row)
        finish = finish_of(detail, None)
        if finish is not None and shipped_finish == finish:
            if row:
                self.state.mark_handled(project.id, pipeline_id, row[0], row[1], self.clock())
            else:
                self.state.clear_retry(project.id, pipeline_id)
            base.outcome = DUPLICATE
            return base
        return self._keep_for_retry(self.ship(project, detail, list_row=row, shipped_finish=shipped_finish), row,
                                    waiting)

    def _filtered(self, project: ProjectRef, pipeline_id: int, status: str, list_row: tuple[str, str] | None) -> ShipResult:
        result = ShipResult(FILTERED, project.id, pipeline_id, reason=f"status {status} not in LOG_SAVE_PIPELINE_STATUS")
        self._write_filtered_metadata(project, pipeline_id)
        if list_row:
            self.state.mark_handled(project.id, pipeline_id, list_row[0], list_row[1], self.clock())
        else:
            self.state.clear_retry(project.id, pipeline_id)
        return result

    def _keep_for_retry(self, result: ShipResult, list_row: tuple[str, str] | None,
                        before: RetryEntry | None) -> ShipResult:
        """A pipeline that failed (or changed while it was read) goes to the durable retry list: tried again by id on
        its own backoff (the next two cycles, then POLL_INTERVAL doubling up to PIPELINE_RETRY_MAX), shown by
        `status`, never holding the project's cursor, so the listing window stays small however long it fails.

        ``before``: its entry as it was before this attempt (read by the caller: a delivery that succeeded while the
        files failed has dropped the entry on the way), so the attempts count on and the first failure stays."""
        if result.outcome not in TRY_AGAIN or self.dry_run or self.stop.is_set():
            return result  # (cut short by a shutdown: not the pipeline's fault, and the cursor has not moved)
        now = self.clock()
        attempts = (before.attempts if before else 0) + 1
        first = parse_ts(before.first_failed_at) if before else now
        # The first two retries are due at the next cycles (most faults, and most pipelines that changed while they
        # were read, are brief), then after 1, 2, 4, … poll intervals.
        delay = min(PIPELINE_RETRY_MAX, self.config.poll_interval * 2 ** (attempts - 3)) if attempts > 2 else 0.0
        self.state.record_failure(result.project_id, result.pipeline_id, list_row, result.reason, now,
                                  now + timedelta(seconds=delay), attempts=attempts, first_failed_at=first)
        if attempts >= 3:
            log.warning("pipeline %s (project %s) failed %d times since %s (%s); next attempt in %.0f s",
                        result.pipeline_id, result.project_id, attempts, format_ts(first), result.reason, delay)
        return result

    def status_allowed(self, status: str) -> bool:
        allowed = self.config.save_pipeline_status
        return allowed is None or status.lower() in allowed

    def _source_failure(self, project: ProjectRef, pipeline_id: int, exc: GitLabSourceError,
                        list_row: tuple[str, str] | None) -> ShipResult:
        reason = _without_prefix(str(exc), project.id, pipeline_id)  # the lines and `status` name the pipeline
        if exc.gone:
            log.warning("pipeline %s (project %s) was deleted in GitLab before it could be shipped: %s",
                        pipeline_id, project.id, reason)
            if list_row:
                self.state.mark_handled(project.id, pipeline_id, list_row[0], list_row[1], self.clock())
            else:
                self.state.clear_retry(project.id, pipeline_id)
            return ShipResult(GONE, project.id, pipeline_id, reason=reason)
        log.error("pipeline %s (project %s): %s; will retry next cycle", pipeline_id, project.id, reason)
        return ShipResult(FAILED, project.id, pipeline_id, reason=reason)

    def _write_filtered_metadata(self, project: ProjectRef, pipeline_id: int) -> None:
        """``LOG_SAVE_METADATA_ALWAYS``: a filtered pipeline still gets its metadata.json in the file output."""
        if not (self.files and self.config.save_metadata_always):
            return
        try:
            detail = self.source.get_pipeline(project.id, pipeline_id)
            jobs = self.source.list_jobs(project.id, pipeline_id)
            header = document_header(project.name, detail, user_of(detail, None), stage_order(jobs), jobs=jobs,
                                     enriched=self.enriched)
            self.files.write_metadata_only(header, self.clock())
        except (GitLabSourceError, OSError) as exc:
            log.warning("pipeline %s (project %s): metadata of a filtered pipeline not written: %s",
                        pipeline_id, project.id, exc)

    # -- shipping one pipeline ------------------------------------------------------------------

    def ship(self, project: ProjectRef, detail: Mapping[str, Any], *, list_row: tuple[str, str] | None = None,
             shipped_finish: str | None = None) -> ShipResult:
        """Build the pipeline's document and hand it over as the mode says; record what became of it.

        ``shipped_finish``: the finish shipped before, if any; a pipeline whose finish can only be told from its jobs
        (skipped, manual) is de-duplicated against it once the jobs are read (None ships whatever was shipped).

        Never raises for GitLab, receiver or file-system failures: GitLab and file failures come back as
        FAILED (kept in the retry list) or GONE (deleted in GitLab), a pipeline that changed while it was read as
        CHANGED; a receiver that does not take the document leaves it QUEUED in the outbox or as a DEAD_LETTER.
        """
        pipeline_id = int(detail["id"])
        result = ShipResult(FAILED, project.id, pipeline_id)
        self.spool_root.mkdir(parents=True, exist_ok=True)
        spool = Path(tempfile.mkdtemp(prefix=f"pipeline-{pipeline_id}-", dir=self.spool_root))
        try:
            all_jobs = self.source.list_jobs(project.id, pipeline_id)
            finish = finish_of(detail, all_jobs)
            assert finish is not None
            result.finish = finish
            result.idempotency_key = idempotency_key(self.config.gitlab_url, project.id, pipeline_id, finish)
            if shipped_finish is not None and shipped_finish == finish:
                if list_row:
                    self.state.mark_handled(project.id, pipeline_id, list_row[0], list_row[1], self.clock())
                result.outcome = DUPLICATE
                return result
            problem = _inconsistency(detail, all_jobs)
            if problem:
                log.info("pipeline %s (project %s): %s; reading it again next cycle", pipeline_id, project.id, problem)
                result.outcome = CHANGED
                result.reason = problem
                return result
            header, jobs = self._collect(project, detail, all_jobs, spool, result)
            self._deliver(header, jobs, spool, result, list_row, detail.get("updated_at"))
        except (GitLabSourceError, DeliveryError, OSError) as exc:
            if self.stop.is_set() and not getattr(exc, "gone", False):
                log.info("pipeline %s (project %s): cut short by the shutdown (%s); done again by the next run",
                         pipeline_id, project.id, exc)
                result.outcome, result.reason = FAILED, f"cut short by the shutdown: {exc}"
                return result
            if isinstance(exc, GitLabSourceError):
                failure = self._source_failure(project, pipeline_id, exc, list_row)
                failure.finish, failure.idempotency_key = result.finish, result.idempotency_key
                return failure
            result.outcome = FAILED
            result.reason = _without_prefix(str(exc), project.id, pipeline_id)
            log.error("pipeline %s (project %s): %s; will retry next cycle", pipeline_id, project.id, result.reason)
            return result
        finally:
            shutil.rmtree(spool, ignore_errors=True)
        if result.outcome == SHIPPED:
            log.info("pipeline %s (project %s, %s) shipped: %d job(s), %d log bytes, mode=%s%s",
                     pipeline_id, project.id, detail.get("status"), result.jobs, result.log_bytes, self.config.mode,
                     f", HTTP {result.http_status}" if result.http_status else "")
        return result

    def _collect(self, project: ProjectRef, detail: Mapping[str, Any], all_jobs: list[dict[str, Any]], spool: Path,
                 result: ShipResult) -> tuple[dict[str, Any], list[JobLog]]:
        """Jobs (latest attempts, filtered before any log is fetched), traces to the spool, the header."""
        pipeline_id = int(detail["id"])
        latest = latest_attempts(all_jobs)
        kept = [job for job in latest if keep_job(job, self.config.save_job_status)]
        if len(kept) < len(latest):
            log.debug("pipeline %s: %d of %d job(s) left out by LOG_SAVE_JOB_STATUS", pipeline_id, len(latest) - len(kept), len(latest))
        jobs = _all_results(self._trace_pool, lambda job: self._fetch_log_or_note(project, pipeline_id, job, spool), kept,
                            cancel_on_error=True)
        unreadable = [job for job in jobs if job.error is not None]
        if unreadable:
            # A log that GitLab does not serve (its job or the log was deleted, no access) is not the pipeline
            # being gone: only GitLab saying so about the pipeline itself is (this GET raises gone if it is).
            self.source.get_pipeline(project.id, pipeline_id)
            log.warning("pipeline %s (project %s): %d job log(s) could not be read (%s); shipped with log_error set",
                        pipeline_id, project.id, len(unreadable), unreadable[0].error)
        result.log_bytes = sum(job.log_bytes for job in jobs)
        result.jobs = len(jobs)
        commit_email = None
        user = detail.get("user")
        if user and not user.get("public_email"):
            commit_email = self._commit_email(project, detail)
        header = document_header(project.name, detail, user_of(detail, commit_email), stage_order(all_jobs),
                                 jobs=all_jobs, enriched=self.enriched)
        warnings = [f"job {job.fields['job_id']} ({job.fields.get('job_name')}): {job.error}" for job in unreadable]
        if not all_jobs:
            # A pipeline always has jobs (a trigger-only one has bridges, which the jobs list leaves out); an empty
            # list is also what a token that cannot read jobs gets. Say so rather than ship it as complete.
            log.warning("pipeline %s (project %s): GitLab lists no jobs for it; the token may lack read access to "
                        "jobs (Reporter role), or the pipeline holds only trigger jobs", pipeline_id, project.id)
            warnings.append("GitLab listed no jobs for this pipeline: the token may lack read access to jobs "
                            "(Reporter role needed), or the pipeline holds only trigger jobs")
        if warnings and self.enriched:
            header["warnings"] = warnings
        return header, jobs

    def _commit_email(self, project: ProjectRef, detail: Mapping[str, Any]) -> str | None:
        """The commit author's e-mail: from GraphQL's detection row when it found this pipeline (no request), else the
        commit through REST."""
        if self.api_mode == "graphql":
            emails = self.detector.email_of(int(detail["id"]))
            if emails is not None:
                return emails[1]
        return self.source.commit_author_email(project.id, detail.get("sha"))

    def _fetch_log_or_note(self, project: ProjectRef, pipeline_id: int, job: Mapping[str, Any], spool: Path) -> JobLog:
        """:meth:`_fetch_log`, with a log GitLab will not serve (404, 403) noted in the job instead of failing."""
        try:
            return self._fetch_log(project, pipeline_id, job, spool)
        except GitLabSourceError as exc:
            if exc.status not in (403, 404):
                raise
            return JobLog(job_fields(job, enriched=self.enriched), None, 0, False,
                          "log not found in GitLab (404)" if exc.status == 404 else "log not readable with this token (403)",
                          sections=[] if self.enriched else None, failure=self._failure(job, None))

    def _fetch_log(self, project: ProjectRef, pipeline_id: int, job: Mapping[str, Any], spool: Path) -> JobLog:
        """One job's log into the spool, cut to MAX_JOB_LOG_BYTES (head and tail kept) when larger."""
        if self.stop.is_set():
            raise DeliveryError("shutting down")
        # A job that never started (manual, skipped, created) has no log: GitLab answers an empty 200.
        fields = job_fields(job, enriched=self.enriched)
        if job.get("started_at") is None:
            return JobLog(fields, None, sections=[] if self.enriched else None, failure=self._failure(job, None))
        log_path = spool / f"job-{job['id']}.log"
        # Sections and the failure excerpt are read from the masked log as it streams in (no second read, nothing
        # held in memory), before MAX_JOB_LOG_BYTES cuts it: they describe the whole log.
        scanner = LogScanner(failure=job.get("status") == "failed") if self.enriched else None
        # Masked and cut while it streams in: the spool never holds more than MAX_JOB_LOG_BYTES of it.
        with CappedLog(log_path, self.config.max_job_log_bytes, "MAX_JOB_LOG_BYTES",
                       patterns=self.redactor.patterns if self.redactor else (),
                       what=f"pipeline {pipeline_id}: log of job {job['id']}", observer=scanner) as sink:
            size = self.source.fetch_trace(project.id, int(job["id"]), sink, timeout=self.config.job_log_timeout)
            truncated = sink.finish()
        if truncated:
            log.warning("job %s (pipeline %s): log of %d bytes cut to MAX_JOB_LOG_BYTES=%d", job["id"], pipeline_id,
                        size, self.config.max_job_log_bytes)
        scan = scanner.finish() if scanner is not None else None
        return JobLog(fields, log_path, size, truncated, sections=scan.sections if scan else None,
                      failure=self._failure(job, scan))

    def _failure(self, job: Mapping[str, Any], scan: ScanResult | None) -> dict[str, Any] | None:
        """``failure`` of a job that failed (enriched documents): GitLab's ``failure_reason``, the exit code from
        the runner's closing ``ERROR: Job failed`` line and the last lines of the failing section (both None when
        the log has no such line, or could not be read)."""
        if not self.enriched or job.get("status") != "failed":
            return None
        return {"reason": job.get("failure_reason"), "exit_code": scan.exit_code if scan else None,
                "excerpt": scan.excerpt if scan else None}

    def _fit(self, header: Mapping[str, Any], jobs: list[JobLog], spool: Path, pipeline_id: int) -> list[JobLog]:
        """Cut logs (head and tail kept, evenly across the big ones) so the document fits API_POST_MAX_BYTES."""
        cap = self.config.api_post_max_bytes
        if not cap:
            return jobs
        total = document_size(header, jobs, design=self.design)
        if total <= cap:
            return jobs
        sizes = [escaped_size(job.log_path) for job in jobs]
        overhead = total - sum(sizes)
        fitted = jobs
        for attempt in range(6):
            # escaped bytes per log, leaving room for the marker lines; shrink on each attempt in case
            # cutting at line ends or the escaping of the kept parts came out larger than estimated
            budget = int((cap - overhead - 200 * len(jobs)) * 0.9**attempt)
            fitted = []
            for job, escaped, allowance in zip(jobs, sizes, fit_budgets(sizes, budget)):
                if job.log_path is None or allowance >= escaped:
                    fitted.append(job)
                    continue
                keep = int(job.log_path.stat().st_size * allowance / escaped)
                target = spool / f"{job.log_path.stem}.fit{attempt}.log"
                truncate_log(job.log_path, target, keep, "API_POST_MAX_BYTES")
                fitted.append(dataclasses.replace(job, log_path=target, truncated=True))
            if document_size(header, fitted, design=self.design) <= cap:
                log.warning("pipeline %s: document of %d bytes cut to fit API_POST_MAX_BYTES=%d", pipeline_id, total, cap)
                return fitted
        log.error("pipeline %s: the document cannot be brought under API_POST_MAX_BYTES=%d (its fields alone take %d "
                  "bytes); sending it as it is", pipeline_id, cap, overhead)
        return fitted

    def _deliver(self, header: dict[str, Any], jobs: list[JobLog], spool: Path, result: ShipResult,
                 list_row: tuple[str, str] | None, updated_at: str | None = None) -> None:
        """Files first (file and dual mode: they are written whatever the API says), then the API through
        the outbox-backed :class:`Delivery`. Sets ``result.outcome``; the state records every hand-over."""
        if self.dry_run:
            document = spool / "document.json"
            with open(document, "wb") as out:  # what would be POSTed (uncompressed, for reading)
                write_document(out, header, self._fit(header, jobs, spool, result.pipeline_id) if self.config.posts else jobs,
                               design=self.design)
            result.outcome = WOULD_SHIP
            if self.preview:
                self.preview(document, header, result)
            return
        file_error: DeliveryError | None = None
        if self.files is not None:
            try:
                result.folder = self.files.write_pipeline(header, jobs, self.clock())
            except OSError as exc:
                file_error = DeliveryError(f"cannot write files under {self.config.log_output_dir}: {exc.strerror or exc}")
                if self.delivery is None:
                    raise file_error from exc
                # Dual mode: the files are the backup; the API still gets the document.
                log.error("pipeline %s (project %s): %s; posting it all the same", result.pipeline_id,
                          result.project_id, file_error)
        if self.delivery is None:
            self.state.record_shipped(result.project_id, result.pipeline_id, result.finish, result.idempotency_key,
                                      "file", self.clock(), list_row)
            result.outcome = SHIPPED
            return
        jobs = self._fit(header, jobs, spool, result.pipeline_id)
        if self.config.api_post_compression == "gzip":
            document = spool / "document.json.gz"
            with open(document, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as out:
                write_document(out, header, jobs, design=self.design)  # type: ignore[arg-type]
        else:
            document = spool / "document.json"
            with open(document, "wb") as out:
                write_document(out, header, jobs, design=self.design)
        # The start of its finish -> delivered latency: finished_at, or for skipped and manual pipelines the pipeline
        # GET's updated_at (milliseconds, whichever way the pipeline was found; the list row's as a last resort).
        rest_at = latency_rest_time(header.get("status"), header.get("finished_at"),
                                    updated_at or (list_row[1] if list_row else None))
        info = DocumentInfo(result.project_id, result.pipeline_id, result.finish, result.idempotency_key, rest_at)
        outcome, post = self.delivery.send(document, info, list_row)
        result.http_status = post.status if post else None
        result.outcome = {SENT: SHIPPED, QUEUED: QUEUED_OUTCOME, DEAD_LETTER: DEAD_LETTERED}[outcome]
        if post is not None and not post.ok:
            result.reason = f"receiver: {post.status or 'no answer'} {post.error or ''}".strip()
        elif post is None:
            result.reason = "receiver backing off"
        if result.folder is not None and result.outcome != SHIPPED:
            result.reason += f"; files written to {result.folder}"
        if file_error is not None:
            # The API has it (or the outbox does), the files do not: kept on the retry list, which ships it again
            # (same Idempotency-Key) with its files once they can be written.
            handed = {SHIPPED: "delivered to the API", QUEUED_OUTCOME: "queued for the API in the outbox",
                      DEAD_LETTERED: "rejected by the API (dead-lettered)"}.get(result.outcome, result.outcome)
            result.reason = f"{handed}, but {file_error}"
            result.outcome = FAILED

    # -- backfill and one-off posts -------------------------------------------------------------

    def backfill(self, since: datetime, until: datetime, projects: list[ProjectRef], *, force: bool = False,
                 listener: BackfillListener | None = None) -> BackfillReport:
        """Ship what came to rest in [since, until], independent of the cursor; records what it shipped.

        Lists by ``updated_after=since`` (a pipeline's updated_at is never before it came to rest), then keeps those
        whose :func:`payload.rest_time` — ``finished_at``, or ``updated_at`` for skipped and manual pipelines, which
        GitLab leaves without a finished_at — falls in the window. Finishes shipped before (the seen state the poll
        path keeps) are skipped unless ``force``; a resend carries the same Idempotency-Key.

        As fast as ``run``: the projects are listed on the project pool, a page at a time, while the rows listed
        before are shipped on the pipeline pool (their logs on the trace pool), CONCURRENCY at a time. Between the
        two sits a :class:`_Backlog` of ``2 × CONCURRENCY`` rows: a lister waits for room before it hands on a row,
        so the rows held at once (``report.peak_held``) do not grow with the window. ``listener`` is told what
        was found and what became of each pipeline (:class:`BackfillListener`).

        On ``self.stop`` (SIGINT, SIGTERM) no page is fetched and no pipeline started any more; those in flight end
        at their next log download (or by its deadline), are not recorded as shipped, and ship on a rerun. What
        fails goes to the retry list, which the daemon works off; the report is then not ``complete``."""
        report = BackfillReport()
        listener = listener or BackfillListener()
        backlog = _Backlog(2 * self.config.concurrency, self.stop)

        def list_project(project: ProjectRef) -> None:
            try:
                self._backfill_project(project, (since, until), force, report, listener, backlog)
            except GitLabSourceError as exc:
                log.error("project %s: %s", project.id, _without_prefix(str(exc), project.id))
                report.error(f"{project.id}: {_without_prefix(str(exc), project.id)}")
            except BaseException as exc:  # noqa: BLE001 - raised below, once the rest has stopped
                backlog.fail(exc)

        try:
            _all_results(self._project_pool, list_project, projects)
            if not self.stop.is_set() and backlog.error is None:
                listener.listed_all()
        finally:
            backlog.wait_idle()  # nothing of this backfill runs on after it returned
            report.peak_held = backlog.peak
        if backlog.error is not None:
            raise backlog.error
        return report

    def _backfill_project(self, project: ProjectRef, window: tuple[datetime, datetime], force: bool,
                          report: BackfillReport, listener: BackfillListener, backlog: _Backlog) -> None:
        """List one project's pipelines page by page (the next page only once this one's rows are handed on) and
        hand each finished row to the pipeline pool. Unfinished rows are left for a later run; rows of a status
        LOG_SAVE_PIPELINE_STATUS drops are counted as filtered without a request, as the poll path does."""
        pages = self.source.pipeline_pages(project.id, window[0], children=self.config.poll_child_pipelines)
        for page in pages:
            backlog.hold(len(page.rows))
            candidates: list[tuple[int, tuple[str, str]]] = []
            for row in page.rows.values():
                status = str(row.get("status"))
                if status in FINISHED_STATUSES and self.status_allowed(status):
                    candidates.append((int(row["id"]), (status, str(row["updated_at"]))))
                elif status in FINISHED_STATUSES:
                    report.add(ShipResult(FILTERED, project.id, int(row["id"])))
            backlog.drop(len(page.rows) - len(candidates))
            listener.found(len(candidates))
            handed = 0
            try:
                for pipeline_id, list_row in candidates:
                    if not backlog.admit((project.id, pipeline_id)):
                        return  # stopping (or a task failed): the rows not handed on are not started
                    handed += 1
                    try:
                        self._pipeline_pool.submit(self._backfill_task, project, pipeline_id, list_row, window, force,
                                                   report, listener, backlog)
                    except BaseException:  # the pool is shut down: its room back, or wait_idle would wait for ever
                        backlog.release((project.id, pipeline_id))
                        raise
            finally:
                backlog.drop(len(candidates) - handed)
            if self.stop.is_set() or backlog.error is not None:
                return

    def _backfill_task(self, project: ProjectRef, pipeline_id: int, list_row: tuple[str, str],
                       window: tuple[datetime, datetime], force: bool, report: BackfillReport,
                       listener: BackfillListener, backlog: _Backlog) -> None:
        """One listed row, on the pipeline pool. Its room in the backlog is given back whatever happens; an error
        no pipeline-level handling knows (a state store that cannot be written) stops the backfill."""
        try:
            if self.stop.is_set() or backlog.error is not None:
                return  # not started: shipped by the next run
            result = self._backfill_pipeline(project, pipeline_id, list_row, window, force)
            if result is None:
                if not self.stop.is_set():
                    listener.outside()
            elif not (self.stop.is_set() and result.outcome in TRY_AGAIN):
                report.add(result)
                listener.handled(result)
            # else: cut short by the shutdown, so not on the retry list either: not done, the next run does it
        except BaseException as exc:  # noqa: BLE001 - raised by backfill() once the others are done
            backlog.fail(exc)
        finally:
            backlog.release((project.id, pipeline_id))

    def _backfill_pipeline(self, project: ProjectRef, pipeline_id: int, list_row: tuple[str, str],
                           window: tuple[datetime, datetime], force: bool) -> ShipResult | None:
        """The pipeline GET, the window, de-duplication, then :meth:`ship`. None: it did not come to rest in the
        window (or is not at rest any more), or the backfill is stopping before it started."""
        before = self.state.retry_entry(project.id, pipeline_id)
        try:
            detail = self.source.get_pipeline(project.id, pipeline_id)
        except GitLabSourceError as exc:
            if self.stop.is_set():
                return None
            return self._keep_for_retry(self._source_failure(project, pipeline_id, exc, list_row), list_row, before)
        status, rested = str(detail.get("status")), rest_time(detail)
        if status not in FINISHED_STATUSES or not rested or not window[0] <= parse_ts(rested) <= window[1]:
            return None
        row = (status, str(detail["updated_at"])) if detail.get("updated_at") else None
        if not self.status_allowed(status):
            return self._filtered(project, pipeline_id, status, row)
        seen = self.state.seen(project.id, pipeline_id)
        shipped = None if force or seen is None else seen.shipped_finish
        finish = finish_of(detail, None)
        legacy = (shipped is not None and finish is None and seen is not None and is_legacy_finish(shipped, detail)
                  and seen.list_updated_at == detail.get("updated_at"))
        if shipped is not None and (finish == shipped or legacy):
            return ShipResult(DUPLICATE, project.id, pipeline_id, finish=finish or shipped)
        if self.stop.is_set():
            return None  # no new pipeline starts once stopping
        # The row as the pipeline GET shows it is recorded with the shipment (as the poll path does), so the
        # daemon's next listing of the same row makes no request for it.
        return self._keep_for_retry(self.ship(project, detail, list_row=row, shipped_finish=shipped), row, before)

    def post_pipeline(self, pipeline_id: int, project_ref: str | None) -> ShipResult:
        """Ship one pipeline now, even if it was shipped before (a resend carries the same Idempotency-Key).
        A pipeline waiting in the retry list is taken off it when this ships it."""
        if project_ref is not None:
            project = self.source.get_project(project_ref)
        else:
            candidates = self.projects()
            found = self.source.find_pipeline([p.id for p in candidates], pipeline_id)
            if found is None:
                raise ShipperError(
                    f"pipeline {pipeline_id} is in none of the {len(candidates)} configured project(s); "
                    "name its project with --project"
                )
            project = next(p for p in candidates if p.id == found)
        detail = self.source.get_pipeline(project.id, pipeline_id)
        status = str(detail.get("status"))
        if status not in FINISHED_STATUSES:
            raise ShipperError(f"pipeline {pipeline_id} is {status}; only finished pipelines are shipped")
        if not self.status_allowed(status):
            raise ShipperError(f"pipeline {pipeline_id} is {status}, which LOG_SAVE_PIPELINE_STATUS filters out")
        row = (status, str(detail["updated_at"])) if detail.get("updated_at") else None
        before = self.state.retry_entry(project.id, pipeline_id)
        return self._keep_for_retry(self.ship(project, detail), row, before)


@dataclass
class BackfillReport(CycleReport):
    """A backfill's counters. Unlike a cycle's report it keeps no :class:`ShipResult` per pipeline (a window of a
    year would hold them all): the counts, the project errors and, for the retry list, the state store are what
    is left. ``peak_held``: the most listed rows the backfill held at once (see :class:`_Backlog`)."""

    peak_held: int = 0

    def add(self, result: ShipResult) -> None:
        with self._lock:
            self.counts[result.outcome] += 1


class BackfillListener:
    """Told how a backfill goes (``progress.BackfillProgress`` draws it); every method is a no-op here. Called from
    the pool threads, so an implementation must be thread-safe, quick, and must not raise.

    Every ``found`` row ends in exactly one ``handled`` or ``outside`` call, unless the backfill was stopped first."""

    def found(self, count: int) -> None:
        """``count`` more listed rows are finished pipelines of an allowed status: each is read and, if it came to
        rest in the window, shipped."""

    def outside(self) -> None:
        """One found row came to rest outside the window (or is not at rest any more): nothing to do for it."""

    def handled(self, result: ShipResult) -> None:
        """One found pipeline of the window was handled: shipped, skipped (shipped before, filtered, deleted in
        GitLab) or not delivered (on the retry list, in the outbox, dead-lettered)."""

    def listed_all(self) -> None:
        """Every project was listed to its end: no more ``found``."""


class _Backlog:
    """Between a backfill's listers and its pipeline pool: at most ``limit`` rows handed on and not finished, so
    that a lister waits (and fetches no further page) while the pool is busy, and memory does not grow with the
    window. ``held`` counts the rows listed and not handled yet (a page waiting to be handed on included), ``peak``
    its maximum. One pipeline is never handled twice at once: a row listed again while its first listing is still
    handled (it moved while we paged) waits for it, and is then de-duplicated against what that one shipped."""

    def __init__(self, limit: int, stop: threading.Event) -> None:
        self._room = threading.Condition()
        self._limit = limit
        self._stop = stop
        self._busy: set[tuple[int, int]] = set()
        self.held = 0
        self.peak = 0
        self.error: BaseException | None = None

    def hold(self, rows: int) -> None:
        with self._room:
            self.held += rows
            self.peak = max(self.peak, self.held)

    def drop(self, rows: int = 1) -> None:
        with self._room:
            self.held -= rows

    def admit(self, key: tuple[int, int]) -> bool:
        """Wait for room (and for another handling of the same pipeline to end); False when stopping."""
        with self._room:
            while len(self._busy) >= self._limit or key in self._busy:
                if self._stop.is_set() or self.error is not None:
                    return False
                self._room.wait(0.1)  # the stop event cannot notify this condition: look again now and then
            if self._stop.is_set() or self.error is not None:
                return False
            self._busy.add(key)
            return True

    def release(self, key: tuple[int, int]) -> None:
        with self._room:
            self._busy.discard(key)
            self.held -= 1
            self._room.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._room:
            self.error = self.error or error
            self._room.notify_all()

    def wait_idle(self) -> None:
        """Until every row handed on is finished (each ends by itself: reads and downloads have deadlines)."""
        with self._room:
            while self._busy:
                self._room.wait(0.1)


def _all_results(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], *,
                 cancel_on_error: bool = False) -> list[Any]:
    """``pool.map``, except that no task outlives the call: when one raises, the others are waited for (or, with
    ``cancel_on_error``, those not started yet are cancelled) before the first error is raised, so nothing of this
    cycle keeps running into the next one."""
    futures = [pool.submit(fn, item) for item in items]
    results: list[Any] = []
    error: BaseException | None = None
    for future in futures:
        if error is not None and cancel_on_error and future.cancel():
            continue
        try:
            results.append(future.result())
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others
            error = error or exc
    if error is not None:
        raise error
    return results


def _same_time(recorded: str | None, listed: str) -> bool:
    """Whether a listed ``updated_at`` is the one recorded. What is recorded comes from the pipeline GET (milliseconds);
    GraphQL lists whole seconds (GitLab's ``Time`` type drops the fraction), so a listed time without a fraction
    matches the recorded one's second. (Two updates within one second that leave the status as it was cannot be
    told apart that way; GraphQL shows nothing finer.)"""
    if recorded is None:
        return False
    if recorded == listed:
        return True
    try:
        then, now = parse_ts(recorded), parse_ts(listed)
    except ValueError:
        return False
    return now.microsecond == 0 and then.replace(microsecond=0) == now


def _without_prefix(message: str, ref: object, pipeline: object | None = None) -> str:
    """The error without what the line it goes into already names (``ref``, the project, and ``pipeline``).

    GitLabSource's errors start with what was asked for (``listing pipelines of project 12: …``, ``jobs of
    pipeline 7 (project 12): …``), and the shipper's lines start with the project or pipeline: written as they are,
    a line names them twice (``project 12: listing pipelines of project 12: …``). Dropped: a leading ``project 12:``
    (or ``12:``), and in the leading "what" the ``of project 12``, ``(project 12)`` and ``of pipeline 7``; a "what"
    left as just ``pipeline 7`` goes as a whole."""
    for prefix in (f"project {ref}: ", f"{ref}: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
            break
    what, sep, rest = message.partition(": ")
    if not sep:
        return message
    repeats = [f" of project {ref}", f" (project {ref})"] + ([f" of pipeline {pipeline}"] if pipeline is not None else [])
    for repeat in repeats:
        what = what.replace(repeat, "")
    if pipeline is not None and what == f"pipeline {pipeline}":
        return rest
    return f"{what}: {rest}"


def _inconsistency(detail: Mapping[str, Any], jobs: list[dict[str, Any]]) -> str | None:
    """Why these jobs may not belong to the state of the pipeline ``detail`` shows, or None.

    The pipeline and its jobs are two GETs; a retry or a played manual job between them would give a document
    keyed by the old finish holding the new attempt (pending, with no log). GitLab's job entity embeds its
    pipeline's status and updated_at as of the jobs query: if those equal the pipeline GET's, both answers show
    the same state (every state change moves updated_at). And no latest attempt of a pipeline at rest is active."""
    for job in jobs:
        embedded = job.get("pipeline")
        if not isinstance(embedded, dict):
            continue
        if embedded.get("status") != detail.get("status") or embedded.get("updated_at") != detail.get("updated_at"):
            return (f"the pipeline changed while its jobs were read (now {embedded.get('status')}, updated "
                    f"{embedded.get('updated_at')})")
    for job in latest_attempts(jobs):
        if job.get("status") in _ACTIVE_JOB_STATUSES:
            return f"job {job['id']} ({job.get('name')}) is {job.get('status')} although the pipeline is {detail.get('status')}"
    return None
