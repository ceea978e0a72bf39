"""The shipping logic: which pipelines to ship, building their document, handing it to API and/or files.

Knows neither HTTP details (``poster``) nor python-gitlab (``source``); decides on time only through the
injected ``clock``. One poll of a project:

1. list pipelines updated since (cursor − ``POLL_OVERLAP``), ordered by id so paging never skips;
2. skip rows seen before with the same status and ``updated_at`` (no request), unfinished rows (they
   come back with a newer ``updated_at`` when they finish) and rows the status filter drops;
3. fetch the pipeline; a finish (``status|finished_at``) shipped before is not shipped again;
4. ship: jobs → filter by status → stream traces to a spool → one document → POST and/or files;
5. move the cursor to the newest ``updated_at`` seen, but never past a pipeline that was not delivered.
"""

from __future__ import annotations

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

from .config import FINISHED_STATUSES, Config
from .errors import DeliveryError, GitLabSourceError, ShipperError
from .fileout import FileOutput
from .payload import (
    JobLog,
    document_header,
    document_size,
    escaped_size,
    fit_budgets,
    truncate_log,
    finish_key,
    idempotency_key,
    job_fields,
    keep_job,
    latest_attempts,
    stage_order,
    user_of,
    write_document,
)
from .delivery import DEAD_LETTER, QUEUED, SENT, Delivery, DocumentInfo
from .dryrun import ReadOnlyStateStore
from .poster import ApiPoster
from .redact import Redactor
from .requestlog import ManagedRequestLog
from .source import GitLabSource, ProjectRef
from .state import StateStore
from .timeutil import parse_ts, utcnow

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
# Counted when the outbox is drained at the start of a cycle.
OUTBOX_SENT, OUTBOX_DEAD, OUTBOX_WAITING = "outbox_delivered", "outbox_dead_lettered", "outbox_waiting"
OUTBOX_COUNTS = (OUTBOX_SENT, OUTBOX_DEAD, OUTBOX_WAITING)
HANDED_OFF = frozenset({SHIPPED, QUEUED_OUTCOME, DEAD_LETTERED})  # durably somewhere: the cursor may pass


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
    results: list[ShipResult] = field(default_factory=list)
    gitlab_unreachable: bool = False  # no project could be polled at all (GitLab down, token rejected)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def complete(self) -> bool:
        """Everything found was delivered (or written) and nothing waits in the outbox."""
        return not (self.project_errors or self.counts[FAILED] or self.counts[QUEUED_OUTCOME]
                    or self.counts[DEAD_LETTERED] or self.counts[OUTBOX_WAITING] or self.counts[OUTBOX_DEAD])

    def add(self, result: ShipResult) -> None:
        with self._lock:
            self.counts[result.outcome] += 1
            if result.outcome in (*HANDED_OFF, FAILED, GONE, WOULD_SHIP):
                self.results.append(result)

    def error(self, message: str) -> None:
        with self._lock:
            self.project_errors.append(message)

    def summary(self) -> str:
        parts = [f"{k}={self.counts[k]}" for k in (SHIPPED, WOULD_SHIP, QUEUED_OUTCOME, DEAD_LETTERED, FAILED, FILTERED,
                                                    DUPLICATE, UNCHANGED, UNFINISHED, GONE, *OUTBOX_COUNTS)
                 if self.counts[k]]
        if self.project_errors:
            parts.append(f"project_errors={len(self.project_errors)}")
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
        self.files = FileOutput(config.log_output_dir) if writes_files else None
        self.delivery = Delivery(config, self.state, self.poster, clock=clock) if self.poster else None
        self.redactor = Redactor.from_config(config)  # LOG_REDACT_PATTERNS; None when off
        if dry_run:
            self.spool_root = Path(tempfile.mkdtemp(prefix="gitlab-log-shipper-dry-run-"))
        else:
            self.spool_root = config.state_dir / "spool" / str(os.getpid())
            _remove_dead_spools(config.state_dir / "spool")
        self._projects: list[ProjectRef] | None = None
        self._discovered_at: datetime | None = None
        # Three pools, so that no task ever waits for a task queued behind it in its own pool: projects
        # are polled, their pipelines shipped and each pipeline's logs fetched CONCURRENCY at a time.
        workers = config.concurrency
        self._project_pool = ThreadPoolExecutor(workers, thread_name_prefix="project")
        self._pipeline_pool = ThreadPoolExecutor(workers, thread_name_prefix="pipeline")
        self._trace_pool = ThreadPoolExecutor(workers, thread_name_prefix="trace")

    def __repr__(self) -> str:
        return f"Shipper(gitlab={self.config.gitlab_url!r}, mode={self.config.mode!r})"

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
            try:
                found = self.source.discover_projects(self.config.gitlab_projects, self.config.gitlab_groups)
            except GitLabSourceError:
                if self._projects is None:
                    raise
                log.warning("project discovery failed; keeping the %d known projects", len(self._projects), exc_info=False)
                return self._projects
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
        report = CycleReport()
        if self.delivery is not None:
            drained = self.delivery.drain(budget_seconds=self.config.poll_interval)
            report.counts[OUTBOX_SENT] += drained[SENT]
            report.counts[OUTBOX_DEAD] += drained[DEAD_LETTER]
            if self.delivery.outbox_full():
                report.counts[OUTBOX_WAITING] = self.state.outbox_stats()[0]
                report.project_errors.append("outbox full: new pipelines wait in GitLab")
                return report
        try:
            projects = self.projects()
        except GitLabSourceError as exc:
            log.error("cannot discover projects: %s", exc)
            report.project_errors.append(str(exc))
            report.gitlab_unreachable = True
            return report

        def poll(project: ProjectRef) -> bool:
            if self.stop.is_set():
                return False
            try:
                self.poll_project(project, report)
                return True
            except GitLabSourceError as exc:
                log.error("project %s: %s; will retry next cycle", project.id, exc)
                report.error(f"{project.id}: {exc}")
                return False

        polled = sum(self._project_pool.map(poll, projects))
        report.gitlab_unreachable = bool(projects) and polled == 0 and not self.stop.is_set()
        if self.delivery is not None:
            report.counts[OUTBOX_WAITING] = self.state.outbox_stats()[0]
        self.state.prune(self.clock())
        log.info("cycle done: %s", report.summary())
        return report

    def poll_project(self, project: ProjectRef, report: CycleReport) -> None:
        now = self.clock()
        cursor = self.state.get_cursor(project.id)
        if cursor is None:
            cursor = now - timedelta(seconds=self.config.initial_lookback)
            log.info("project %s: first poll, looking back to %s", project.id, cursor.isoformat())
        since = cursor - timedelta(seconds=self.config.poll_overlap)
        newest = cursor
        blocked: datetime | None = None
        rows: dict[int, Mapping[str, Any]] = {}
        for row in self.source.iter_pipelines(project.id, since, children=self.config.poll_child_pipelines):
            rows.setdefault(int(row["id"]), row)  # offset paging over a growing set can repeat a row
        results = list(self._pipeline_pool.map(lambda row: self._handle_row(project, row), rows.values()))
        if self.stop.is_set():
            return  # cursor untouched: what was cut short is polled again after the restart
        for row, result in zip(rows.values(), results):
            updated_at = parse_ts(row["updated_at"])
            report.add(result)
            if result.outcome == FAILED:
                blocked = updated_at if blocked is None else min(blocked, updated_at)
            newest = max(newest, updated_at)
        new_cursor = newest if blocked is None else min(newest, blocked)
        if new_cursor != cursor:
            self.state.set_cursor(project.id, new_cursor)

    def _handle_row(self, project: ProjectRef, row: Mapping[str, Any]) -> ShipResult:
        pipeline_id = int(row["id"])
        status = str(row.get("status"))
        updated_at = str(row["updated_at"])
        base = ShipResult(UNCHANGED, project.id, pipeline_id)
        if status not in FINISHED_STATUSES:
            base.outcome = UNFINISHED
            return base
        seen = self.state.seen(project.id, pipeline_id)
        if seen and seen.list_status == status and seen.list_updated_at == updated_at:
            return base
        if not self.status_allowed(status):
            base.outcome = FILTERED
            base.reason = f"status {status} not in LOG_SAVE_PIPELINE_STATUS"
            self._write_filtered_metadata(project, pipeline_id)
            self.state.mark_handled(project.id, pipeline_id, status, updated_at, self.clock())
            return base
        try:
            detail = self.source.get_pipeline(project.id, pipeline_id)
        except GitLabSourceError as exc:
            return self._source_failure(project, pipeline_id, exc, list_row=(status, updated_at))
        if detail.get("status") not in FINISHED_STATUSES:
            base.outcome = UNFINISHED  # reopened since it was listed: a newer updated_at will bring it back
            return base
        finish = finish_key(str(detail["status"]), detail.get("finished_at"))
        if seen and seen.shipped_finish == finish:
            self.state.mark_handled(project.id, pipeline_id, status, updated_at, self.clock())
            base.outcome = DUPLICATE
            return base
        return self.ship(project, detail, list_row=(status, updated_at))

    def status_allowed(self, status: str) -> bool:
        allowed = self.config.save_pipeline_status
        return allowed is None or status.lower() in allowed

    def _source_failure(self, project: ProjectRef, pipeline_id: int, exc: GitLabSourceError,
                        list_row: tuple[str, str] | None) -> ShipResult:
        if exc.gone:
            log.warning("pipeline %s (project %s) was deleted in GitLab before it could be shipped: %s",
                        pipeline_id, project.id, exc)
            if list_row:
                self.state.mark_handled(project.id, pipeline_id, list_row[0], list_row[1], self.clock())
            return ShipResult(GONE, project.id, pipeline_id, reason=str(exc))
        log.error("pipeline %s (project %s): %s; will retry next cycle", pipeline_id, project.id, exc)
        return ShipResult(FAILED, project.id, pipeline_id, reason=str(exc))

    def _write_filtered_metadata(self, project: ProjectRef, pipeline_id: int) -> None:
        """``LOG_SAVE_METADATA_ALWAYS``: a filtered pipeline still gets its metadata.json in the file output."""
        if not (self.files and self.config.save_metadata_always):
            return
        try:
            detail = self.source.get_pipeline(project.id, pipeline_id)
            jobs = self.source.list_jobs(project.id, pipeline_id)
            header = document_header(project.name, detail, user_of(detail, None), stage_order(jobs))
            self.files.write_metadata_only(header, self.clock())
        except (GitLabSourceError, OSError) as exc:
            log.warning("pipeline %s (project %s): metadata of a filtered pipeline not written: %s",
                        pipeline_id, project.id, exc)

    # -- shipping one pipeline ------------------------------------------------------------------

    def ship(self, project: ProjectRef, detail: Mapping[str, Any], *, list_row: tuple[str, str] | None = None) -> ShipResult:
        """Build the pipeline's document and hand it over as the mode says; record what became of it.

        Never raises for GitLab, receiver or file-system failures: GitLab and file failures come back as
        FAILED (the cursor waits, the pipeline is tried again next cycle) or GONE (deleted in GitLab); a
        receiver that does not take the document leaves it QUEUED in the outbox or as a DEAD_LETTER.
        """
        pipeline_id = int(detail["id"])
        finish = finish_key(str(detail["status"]), detail.get("finished_at"))
        key = idempotency_key(self.config.gitlab_url, project.id, pipeline_id, finish)
        result = ShipResult(FAILED, project.id, pipeline_id, finish=finish, idempotency_key=key)
        self.spool_root.mkdir(parents=True, exist_ok=True)
        spool = Path(tempfile.mkdtemp(prefix=f"pipeline-{pipeline_id}-", dir=self.spool_root))
        try:
            header, jobs = self._collect(project, detail, spool, result)
            self._deliver(header, jobs, spool, result, list_row)
        except GitLabSourceError as exc:
            failure = self._source_failure(project, pipeline_id, exc, list_row)
            failure.finish, failure.idempotency_key = finish, key
            return failure
        except (DeliveryError, OSError) as exc:
            result.outcome = FAILED
            result.reason = str(exc)
            log.error("pipeline %s (project %s): %s; will retry next cycle", pipeline_id, project.id, exc)
            return result
        finally:
            shutil.rmtree(spool, ignore_errors=True)
        if result.outcome == SHIPPED:
            log.info("pipeline %s (project %s, %s) shipped: %d job(s), %d log bytes, mode=%s%s",
                     pipeline_id, project.id, detail.get("status"), result.jobs, result.log_bytes, self.config.mode,
                     f", HTTP {result.http_status}" if result.http_status else "")
        return result

    def _collect(self, project: ProjectRef, detail: Mapping[str, Any], spool: Path, result: ShipResult) -> tuple[dict[str, Any], list[JobLog]]:
        """Jobs (latest attempts, filtered before any log is fetched), traces to the spool, the header."""
        pipeline_id = int(detail["id"])
        all_jobs = self.source.list_jobs(project.id, pipeline_id)
        latest = latest_attempts(all_jobs)
        kept = [job for job in latest if keep_job(job, self.config.save_job_status)]
        if len(kept) < len(latest):
            log.debug("pipeline %s: %d of %d job(s) left out by LOG_SAVE_JOB_STATUS", pipeline_id, len(latest) - len(kept), len(latest))
        jobs = list(self._trace_pool.map(lambda job: self._fetch_log(project, pipeline_id, job, spool), kept))
        result.log_bytes = sum(job.log_bytes for job in jobs)
        result.jobs = len(jobs)
        commit_email = None
        user = detail.get("user")
        if user and not user.get("public_email"):
            commit_email = self.source.commit_author_email(project.id, detail.get("sha"))
        header = document_header(project.name, detail, user_of(detail, commit_email), stage_order(all_jobs))
        return header, jobs

    def _fetch_log(self, project: ProjectRef, pipeline_id: int, job: Mapping[str, Any], spool: Path) -> JobLog:
        """One job's log into the spool, cut to MAX_JOB_LOG_BYTES (head and tail kept) when larger."""
        if self.stop.is_set():
            raise DeliveryError("shutting down")
        # A job that never started (manual, skipped, created) has no log: GitLab answers an empty 200.
        if job.get("started_at") is None:
            return JobLog(job_fields(job), None)
        from .spool import CappedLog  # (here while shipper.py is rewritten elsewhere; belongs with the imports)

        log_path = spool / f"job-{job['id']}.log"
        # Masked and cut while it streams in: the spool never holds more than MAX_JOB_LOG_BYTES of it.
        with CappedLog(log_path, self.config.max_job_log_bytes, "MAX_JOB_LOG_BYTES",
                       patterns=self.redactor.patterns if self.redactor else (),
                       what=f"pipeline {pipeline_id}: log of job {job['id']}") as sink:
            size = self.source.fetch_trace(project.id, int(job["id"]), sink, timeout=self.config.job_log_timeout)
            truncated = sink.finish()
        if truncated:
            log.warning("job %s (pipeline %s): log of %d bytes cut to MAX_JOB_LOG_BYTES=%d", job["id"], pipeline_id,
                        size, self.config.max_job_log_bytes)
        return JobLog(job_fields(job), log_path, size, truncated)

    def _fit(self, header: Mapping[str, Any], jobs: list[JobLog], spool: Path, pipeline_id: int) -> list[JobLog]:
        """Cut logs (head and tail kept, evenly across the big ones) so the document fits API_POST_MAX_BYTES."""
        cap = self.config.api_post_max_bytes
        if not cap:
            return jobs
        total = document_size(header, jobs)
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
                fitted.append(JobLog(job.fields, target, job.log_bytes, True))
            if document_size(header, fitted) <= cap:
                log.warning("pipeline %s: document of %d bytes cut to fit API_POST_MAX_BYTES=%d", pipeline_id, total, cap)
                return fitted
        log.error("pipeline %s: the document cannot be brought under API_POST_MAX_BYTES=%d (its fields alone take %d "
                  "bytes); sending it as it is", pipeline_id, cap, overhead)
        return fitted

    def _deliver(self, header: dict[str, Any], jobs: list[JobLog], spool: Path, result: ShipResult,
                 list_row: tuple[str, str] | None) -> None:
        """Files first (file and dual mode: they are written whatever the API says), then the API through
        the outbox-backed :class:`Delivery`. Sets ``result.outcome``; the state records every hand-over."""
        if self.dry_run:
            document = spool / "document.json"
            with open(document, "wb") as out:  # what would be POSTed (uncompressed, for reading)
                write_document(out, header, self._fit(header, jobs, spool, result.pipeline_id) if self.config.posts else jobs)
            result.outcome = WOULD_SHIP
            if self.preview:
                self.preview(document, header, result)
            return
        if self.files is not None:
            try:
                result.folder = self.files.write_pipeline(header, jobs, self.clock())
            except OSError as exc:
                raise DeliveryError(f"cannot write files under {self.config.log_output_dir}: {exc.strerror or exc}") from exc
        if self.delivery is None:
            self.state.record_shipped(result.project_id, result.pipeline_id, result.finish, result.idempotency_key,
                                      "file", self.clock(), list_row)
            result.outcome = SHIPPED
            return
        jobs = self._fit(header, jobs, spool, result.pipeline_id)
        if self.config.api_post_compression == "gzip":
            document = spool / "document.json.gz"
            with open(document, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as out:
                write_document(out, header, jobs)  # type: ignore[arg-type]
        else:
            document = spool / "document.json"
            with open(document, "wb") as out:
                write_document(out, header, jobs)
        info = DocumentInfo(result.project_id, result.pipeline_id, result.finish, result.idempotency_key)
        outcome, post = self.delivery.send(document, info, list_row)
        result.http_status = post.status if post else None
        result.outcome = {SENT: SHIPPED, QUEUED: QUEUED_OUTCOME, DEAD_LETTER: DEAD_LETTERED}[outcome]
        if post is not None and not post.ok:
            result.reason = f"receiver: {post.status or 'no answer'} {post.error or ''}".strip()
        elif post is None:
            result.reason = "receiver backing off"
        if result.folder is not None and result.outcome != SHIPPED:
            result.reason += f"; files written to {result.folder}"

    # -- backfill and one-off posts -------------------------------------------------------------

    def backfill(self, since: datetime, until: datetime, projects: list[ProjectRef], *, force: bool = False,
                 progress: Callable[[ShipResult], None] | None = None,
                 planned: Callable[[int], None] | None = None) -> CycleReport:
        """Ship what finished in [since, until], independent of the cursor; records what it shipped.

        Lists by ``updated_after=since`` (a pipeline's updated_at is never before its finish), then keeps
        those whose ``finished_at`` falls in the window. Finishes shipped before are skipped unless ``force``.
        First finds them all (``planned`` is told how many), then ships them (``progress`` after each), so
        that a terminal can show done/total and an ETA.
        """
        report = CycleReport()
        todo: list[tuple[ProjectRef, Mapping[str, Any]]] = []
        for project in projects:
            if self.stop.is_set():
                break
            try:
                self._backfill_project(project, since, until, force, report, todo)
            except GitLabSourceError as exc:
                log.error("project %s: %s", project.id, exc)
                report.project_errors.append(f"{project.id}: {exc}")
        if planned:
            planned(len(todo))
        for project, detail in todo:
            if self.stop.is_set():
                break
            result = self.ship(project, detail)
            report.add(result)
            if progress:
                progress(result)
        return report

    def _backfill_project(self, project: ProjectRef, since: datetime, until: datetime, force: bool,
                          report: CycleReport, todo: list[tuple[ProjectRef, Mapping[str, Any]]]) -> None:
        seen_ids: set[int] = set()
        for row in self.source.iter_pipelines(project.id, since):
            if self.stop.is_set():
                return
            pipeline_id = int(row["id"])
            if pipeline_id in seen_ids or row.get("status") not in FINISHED_STATUSES:
                continue
            seen_ids.add(pipeline_id)
            if not self.status_allowed(str(row["status"])):
                report.add(ShipResult(FILTERED, project.id, pipeline_id))
                continue
            try:
                detail = self.source.get_pipeline(project.id, pipeline_id)
            except GitLabSourceError as exc:
                report.add(self._source_failure(project, pipeline_id, exc, None))
                continue
            finished_at = detail.get("finished_at")
            if detail.get("status") not in FINISHED_STATUSES or not finished_at:
                continue
            if not since <= parse_ts(finished_at) <= until:
                continue
            finish = finish_key(str(detail["status"]), finished_at)
            if not force and self.state.is_shipped(project.id, pipeline_id, finish):
                report.add(ShipResult(DUPLICATE, project.id, pipeline_id, finish=finish))
                continue
            todo.append((project, detail))

    def post_pipeline(self, pipeline_id: int, project_ref: str | None) -> ShipResult:
        """Ship one pipeline now, even if it was shipped before (a resend carries the same Idempotency-Key)."""
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
        return self.ship(project, detail)
