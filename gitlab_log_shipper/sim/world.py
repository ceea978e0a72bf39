"""The state behind the simulated GitLab: users, groups, projects, pipelines, jobs, bridges, commits.

A :class:`World` is plain data plus the mutations a poller must survive (a pipeline finishing late,
being retried and finishing again, being touched without a status change, being deleted). It knows
nothing of HTTP: :mod:`gitlab_log_shipper.sim.gitlab` renders it as GitLab's REST API and
:mod:`gitlab_log_shipper.sim.graphql` as its GraphQL API, both through the same finder
(:meth:`World.find_pipelines`). Tests build a world, start a simulator on it, and change it while the
shipper runs; every mutation holds :attr:`World.lock`, which the HTTP handlers also hold while they read.

Ids are big realistic integers (pipelines from 2,900,000,000, jobs from 16,860,000,000, projects from
87,089,000) so code that squeezes ids into 32 bits or floats fails here as it would on GitLab.com. Jobs
and bridges share one id sequence, as they share one table in GitLab.

Time comes from an injectable ``clock`` so tests can freeze or step it; all times are aware UTC and
keep microseconds (GitLab stores microseconds but serialises milliseconds, see the simulator).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from .logs import Log, LogSpec

__all__ = [
    "AVAILABLE_STATUSES",
    "COMPLETED_STATUSES",
    "DEFAULT_GITLAB_VERSION",
    "FINISHED_STATUSES",
    "NEVER_RAN_STATUSES",
    "PIPELINE_SOURCES",
    "STAMPS_FINISHED_AT",
    "Bridge",
    "Commit",
    "Group",
    "Job",
    "JobSpec",
    "Pipeline",
    "Project",
    "World",
    "version_at_least",
]

# Every status a pipeline or job can have (GitLab's Ci::HasStatus::AVAILABLE_STATUSES).
AVAILABLE_STATUSES: tuple[str, ...] = (
    "created", "waiting_for_resource", "preparing", "waiting_for_callback", "pending", "running",
    "success", "failed", "canceling", "canceled", "skipped", "manual", "scheduled",
)
# What GitLab's ``scope=finished`` means (Ci::HasStatus::COMPLETED_STATUSES). Note: no "manual".
COMPLETED_STATUSES: frozenset[str] = frozenset({"success", "failed", "canceled", "skipped"})
# Statuses a pipeline can come to rest in; finish_pipeline() accepts these. "manual" (blocked on a
# manual job) is included for the tests' sake although GitLab's scope=finished leaves it out.
FINISHED_STATUSES: frozenset[str] = COMPLETED_STATUSES | {"manual"}
# The statuses whose transition stamps finished_at. GitLab's Ci::Pipeline state machine
# (app/models/ci/pipeline.rb): ``before_transition any => [:success, :failed, :canceled]`` sets
# ``finished_at = Time.current`` and updates the duration; ``before_transition any => [:manual]`` only
# updates the duration; nothing stamps ``skipped``. So a skipped or manual pipeline has
# ``finished_at: null`` (and a skipped one, which never started, no started_at or duration either).
STAMPS_FINISHED_AT: frozenset[str] = frozenset({"success", "failed", "canceled"})
# A job in one of these never started: no times, no duration, no runner, an empty trace.
NEVER_RAN_STATUSES: frozenset[str] = frozenset(
    {"created", "waiting_for_resource", "preparing", "pending", "manual", "scheduled", "skipped"}
)
# Started but not finished.
_ACTIVE_STATUSES = frozenset({"running", "canceling", "waiting_for_callback"})
# A pipeline in one of these has not started (no started_at).
_PIPELINE_NOT_STARTED = frozenset({"created", "waiting_for_resource", "preparing", "pending", "scheduled", "skipped"})

# Ci::Pipeline.sources: anything else in ?source= is a 400.
PIPELINE_SOURCES: tuple[str, ...] = (
    "unknown", "push", "web", "trigger", "schedule", "api", "external", "pipeline", "chat", "webide",
    "merge_request_event", "external_pull_request_event", "parent_pipeline", "ondemand_dast_scan",
    "ondemand_dast_validation", "security_orchestration_policy", "container_registry_push",
    "duo_workflow", "pipeline_execution_policy_schedule",
)

PIPELINE_ID_START = 2_900_000_000
JOB_ID_START = 16_860_000_000
PROJECT_ID_START = 87_089_000
GROUP_ID_START = 118_000_000
USER_NAMESPACE_ID_START = 12_000_000
DEFAULT_TOKEN = "glpat-sim-0123456789abcdef"
# What GET /api/v4/version and GraphQL's ``metadata { version }`` report unless a World is given another.
DEFAULT_GITLAB_VERSION = "19.5.0-pre"
# GitLab 17.0 made Ci::PipelinesFinder list child pipelines for ``source=parent_pipeline`` (before, its
# ``items.no_child`` ran unconditionally, so that filter found nothing): see World.find_pipelines.
CHILD_LISTING_SINCE = (17, 0)
_FALLBACK_EXTERNAL_URL = "https://gitlab.example.com"  # for user objects made before any server exists
# add_pipeline(user=...) default: the world's current user (``user=None`` means a pipeline with no user).
_CURRENT_USER: Any = object()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(value: datetime) -> datetime:
    """Naive datetimes are taken as UTC (GitLab.com's server time zone)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _hex(*parts: object, length: int = 40) -> str:
    return hashlib.sha1(":".join(str(p) for p in parts).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class JobSpec:
    """A job to create with :meth:`World.add_pipeline`. Manual jobs get ``allow_failure`` like GitLab's."""

    name: str
    stage: str = "test"
    status: str = "success"
    log: Log = None
    allow_failure: bool | None = None  # None: True for manual jobs, else False (GitLab's defaults)


@dataclass
class Group:
    id: int
    name: str
    path: str
    full_path: str
    full_name: str
    parent_id: int | None
    created_at: datetime
    description: str = ""
    visibility: str = "private"


@dataclass
class Project:
    id: int
    name: str
    path: str
    path_with_namespace: str
    name_with_namespace: str
    namespace_id: int
    namespace_kind: str  # "group" or "user"
    group_id: int | None
    created_at: datetime
    last_activity_at: datetime
    shared_with_group_ids: list[int] = field(default_factory=list)
    member: bool = True
    archived: bool = False
    default_branch: str = "main"
    visibility: str = "private"
    description: str = ""
    # The token may read the project's pipelines but not their jobs: GET .../pipelines/:id/jobs answers
    # 200 with an empty list (GitLab's Ci::JobsFinder returns ``type.none`` when
    # ``can?(current_user, :read_build, pipeline)`` fails; app/finders/ci/jobs_finder.rb).
    jobs_hidden: bool = False
    deleted: bool = False  # World.delete_project(): 404 everywhere afterwards
    # The token's user cannot read it (a private project of someone else's): REST answers 404 "Project Not
    # Found" as GitLab does for a project you may not see, lists leave it out, and GraphQL's
    # ``projects(ids:)`` silently omits it (ProjectsFinder only returns projects visible to the user).
    hidden: bool = False


@dataclass
class Commit:
    sha: str
    project_id: int
    title: str
    message: str
    author_name: str
    author_email: str
    authored_date: datetime
    committer_name: str
    committer_email: str
    committed_date: datetime
    parent_ids: list[str]


@dataclass
class Pipeline:
    id: int
    iid: int
    project_id: int
    status: str
    source: str
    ref: str
    sha: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    user: dict[str, Any] | None
    name: str | None
    deleted: bool = False
    before_sha: str = "0" * 40
    tag: bool = False
    duration: int | None = None
    queued_duration: int | None = None
    yaml_errors: str | None = None
    coverage: str | None = None
    parent_pipeline_id: int | None = None
    jobs_hidden: bool = False  # as Project.jobs_hidden, for this pipeline only
    stages: list[str] = field(default_factory=list)
    job_ids: list[int] = field(default_factory=list)
    bridge_ids: list[int] = field(default_factory=list)


@dataclass
class Job:
    id: int
    pipeline_id: int
    name: str
    stage: str
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    log: Log
    erased: bool = False
    project_id: int = 0
    erased_at: datetime | None = None
    queued_duration: float | None = None
    allow_failure: bool = False
    failure_reason: str | None = None
    retried: bool = False  # superseded by a newer attempt: hidden unless include_retried=true
    retried_from: int | None = None
    runner_index: int = 0
    coverage: float | None = None

    @property
    def ran(self) -> bool:
        """Whether the job ever started (a never-ran job has no times, runner or log)."""
        return self.started_at is not None

    def duration(self, now: datetime) -> float | None:
        """Seconds it ran; a running job's duration grows with the clock, as in GitLab."""
        if self.started_at is None:
            return None
        end = self.finished_at or now
        return round(max(0.0, (end - self.started_at).total_seconds()), 6)


@dataclass
class Bridge:
    id: int
    pipeline_id: int
    name: str
    stage: str
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    downstream_pipeline_id: int | None
    project_id: int = 0
    queued_duration: float | None = None
    allow_failure: bool = False
    failure_reason: str | None = None

    def duration(self, now: datetime) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or now
        return round(max(0.0, (end - self.started_at).total_seconds()), 6)


class World:
    """Everything the simulated GitLab knows. Mutations hold :attr:`lock` and stamp ``updated_at``."""

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        clock: Callable[[], datetime] | None = None,
        gitlab_version: str = DEFAULT_GITLAB_VERSION,
    ) -> None:
        self.token: str = token
        # The version this GitLab reports (REST /version, GraphQL metadata). Behaviour that changed between
        # releases follows it: child pipelines are listed with source=parent_pipeline from 17.0 only.
        self.gitlab_version: str = gitlab_version
        self.lock = threading.RLock()
        self._clock: Callable[[], datetime] = clock or _utcnow
        # GitLab's external_url: the base of every web_url in the API. None: the simulator's own url,
        # as on a correctly configured GitLab (python-gitlab's auth() warns when the user's web_url
        # does not start with the client's base URL). Set it to reproduce a misconfigured instance.
        self.external_url: str | None = None
        # Skewed clocks: GitLab nodes stamp rows with their own clocks. While this is set, mutations stamp
        # updated_at / finished_at (and the job times they set) with now() + this offset; a mutation's
        # ``skew=`` keyword overrides it for one call. The HTTP Date header stays now() ("GitLab's now").
        self.node_clock_offset: timedelta = timedelta(0)
        self.users: dict[int, dict[str, Any]] = {}
        self.groups: dict[int, Group] = {}
        self.projects: dict[int, Project] = {}
        self.pipelines: dict[int, Pipeline] = {}
        self.jobs: dict[int, Job] = {}
        self.bridges: dict[int, Bridge] = {}
        self.commits: dict[tuple[int, str], Commit] = {}
        self._project_pipelines: dict[int, list[int]] = {}
        self._next_user = 1
        self._next_group = GROUP_ID_START
        self._next_project = PROJECT_ID_START
        self._next_pipeline = PIPELINE_ID_START
        self._next_job = JOB_ID_START
        self._next_iid: dict[int, int] = {}
        self.current_user: dict[str, Any] = self.add_user("sim-user", "Sim User", "sim-user@example.com")
        # What GET /personal_access_tokens/self reveals about ``token`` (None: answer 404, as for a token
        # that is not a personal, project or group access token). ``expires_at`` is a date or None.
        self.token_info: dict[str, Any] | None = {
            "name": "gitlab-log-shipper",
            "scopes": ["read_api"],
            "expires_at": (self.now() + timedelta(days=90)).date(),
            "revoked": False,
            "active": True,
        }

    # -- time -----------------------------------------------------------------------------------

    def now(self) -> datetime:
        """The world's clock (aware UTC)."""
        return _aware(self._clock())

    def stamp(self, skew: timedelta | None = None) -> datetime:
        """The time a GitLab node writes into a row now: now() + ``skew`` (default
        :attr:`node_clock_offset`)."""
        return self.now() + (self.node_clock_offset if skew is None else skew)

    # -- users, groups, projects ----------------------------------------------------------------

    def add_user(self, username: str, name: str | None = None, public_email: str = "") -> dict[str, Any]:
        """Create a user; returns its basic object (what GitLab puts in ``pipeline.user``)."""
        with self.lock:
            user_id = self._next_user
            self._next_user += 1
            record = {
                "id": user_id,
                "username": username,
                "public_email": public_email,
                "name": name or username.replace("-", " ").title(),
                "state": "active",
                "locked": False,
                "avatar_url": (
                    "https://secure.gravatar.com/avatar/"
                    f"{hashlib.sha256(username.encode()).hexdigest()}?s=80&d=identicon"
                ),
                "web_url": f"{self.external_url or _FALLBACK_EXTERNAL_URL}/{username}",
                # Not in the basic object; rendered in jobs' fuller "user" and in GET /user.
                "created_at": self.now() - timedelta(days=400 + user_id),
                "namespace_id": USER_NAMESPACE_ID_START + user_id,
                "email": public_email or f"{username}@example.com",
            }
            self.users[user_id] = record
            return self.basic_user(record)

    def basic_user(self, user: dict[str, Any], base_url: str | None = None) -> dict[str, Any]:
        """The 8-key UserBasic object for a known user, or a given dict completed with defaults.

        ``base_url``: the instance URL to build a known user's ``web_url`` from (rendering time).
        """
        known = self.users.get(user.get("id", -1)) if isinstance(user.get("id"), int) else None
        source = {**known, **user} if known else dict(user)
        if base_url is not None and (known is not None or not source.get("web_url")):
            source["web_url"] = f"{base_url}/{source.get('username')}"
        username = str(source.get("username") or f"user{source.get('id', 0)}")
        return {
            "id": int(source.get("id", 0)),
            "username": username,
            "public_email": source.get("public_email", ""),
            "name": source.get("name") or username,
            "state": source.get("state", "active"),
            "locked": bool(source.get("locked", False)),
            "avatar_url": source.get("avatar_url")
            or f"https://secure.gravatar.com/avatar/{hashlib.sha256(username.encode()).hexdigest()}?s=80&d=identicon",
            "web_url": source.get("web_url") or f"{self.external_url or _FALLBACK_EXTERNAL_URL}/{username}",
        }

    def add_group(self, path: str, name: str | None = None, parent_id: int | None = None) -> Group:
        """Create a group (or a subgroup of ``parent_id``); full_path is built from the parents."""
        with self.lock:
            parent = self._group(parent_id) if parent_id is not None else None
            full_path = f"{parent.full_path}/{path}" if parent else path
            if any(g.full_path.lower() == full_path.lower() for g in self.groups.values()):
                raise ValueError(f"group {full_path!r} exists")
            display = name or path
            group = Group(
                id=self._next_group,
                name=display,
                path=path,
                full_path=full_path,
                full_name=f"{parent.full_name} / {display}" if parent else display,
                parent_id=parent_id,
                created_at=self.now() - timedelta(days=300),
            )
            self._next_group += 1
            self.groups[group.id] = group
            return group

    def add_project(
        self,
        path: str,
        name: str | None = None,
        group_id: int | None = None,
        shared_with_group_ids: Sequence[int] = (),
        member: bool = True,
    ) -> Project:
        """Create a project in a group (or in the default user's namespace).

        ``shared_with_group_ids``: groups it is shared with (listed by their group projects unless
        ``with_shared=false``). ``member=False``: visible, but not in ``/projects?membership=true``.
        """
        with self.lock:
            display = name or path
            if group_id is not None:
                group = self._group(group_id)
                path_with_namespace = f"{group.full_path}/{path}"
                name_with_namespace = f"{group.full_name} / {display}"
                namespace_id, kind = group.id, "group"
            else:
                owner = self.users[1]
                path_with_namespace = f"{owner['username']}/{path}"
                name_with_namespace = f"{owner['name']} / {display}"
                namespace_id, kind = owner["namespace_id"], "user"
            if self._lookup_project(path_with_namespace) is not None:
                raise ValueError(f"project {path_with_namespace!r} exists")
            for gid in shared_with_group_ids:
                self._group(gid)
            # Staggered so that GitLab's default project order (created_at desc) is well defined.
            created = self.now() - timedelta(days=100) + timedelta(minutes=len(self.projects))
            project = Project(
                id=self._next_project,
                name=display,
                path=path,
                path_with_namespace=path_with_namespace,
                name_with_namespace=name_with_namespace,
                namespace_id=namespace_id,
                namespace_kind=kind,
                group_id=group_id,
                created_at=created,
                last_activity_at=created,
                shared_with_group_ids=list(shared_with_group_ids),
                member=member,
            )
            self._next_project += 1
            self.projects[project.id] = project
            self._project_pipelines[project.id] = []
            return project

    def find_project(self, ref: str | int) -> Project | None:
        """A project the token may read, by id or by full path (case-insensitive, as GitLab routes are);
        None for an unknown, deleted or hidden one (GitLab answers all three with the same 404)."""
        project = self._lookup_project(ref)
        return project if project is not None and self.readable(project) else None

    def readable(self, project: Project) -> bool:
        """Whether the token may read the project: it exists (not deleted) and is not hidden."""
        return not project.deleted and not project.hidden

    def readable_projects(self) -> list[Project]:
        """The projects the token may read, in creation order."""
        with self.lock:
            return [p for p in self.projects.values() if self.readable(p)]

    def hide_project(self, project_id: int, hidden: bool = True) -> None:
        """Take the project out of the token's sight (or give it back): see :attr:`Project.hidden`."""
        with self.lock:
            self._project(project_id).hidden = hidden

    def _lookup_project(self, ref: str | int) -> Project | None:
        with self.lock:
            if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
                project = self.projects.get(int(ref))
                return None if project is None or project.deleted else project
            wanted = ref.lower()
            return next((p for p in self.projects.values()
                         if p.path_with_namespace.lower() == wanted and not p.deleted), None)

    def find_group(self, ref: str | int) -> Group | None:
        """A group by id or by full path (case-insensitive)."""
        with self.lock:
            if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
                return self.groups.get(int(ref))
            wanted = ref.lower()
            return next((g for g in self.groups.values() if g.full_path.lower() == wanted), None)

    def subgroup_ids(self, group_id: int) -> list[int]:
        """The group and all its descendants."""
        with self.lock:
            found = [group_id]
            frontier = [group_id]
            while frontier:
                children = [g.id for g in self.groups.values() if g.parent_id in frontier]
                found.extend(children)
                frontier = children
            return found

    # -- pipelines and jobs ---------------------------------------------------------------------

    def add_pipeline(
        self,
        project_id: int,
        *,
        status: str = "success",
        source: str = "push",
        ref: str = "main",
        sha: str | None = None,
        user: dict[str, Any] | None = _CURRENT_USER,
        author_email: str = "author@example.com",
        created_at: datetime | None = None,
        finished_at: datetime | None = None,
        jobs: Sequence[JobSpec] = (),
        name: str | None = None,
    ) -> Pipeline:
        """Create a pipeline with its jobs (ids ascending in stage order, as GitLab creates them).

        Times default to a plausible run: a finished pipeline ended now (or at ``finished_at``) and
        started a minute or a few earlier; jobs of stage *i* of *n* ran in the *i*-th slice of it.
        ``author_email`` is the commit's author (``GET .../repository/commits/:sha``).

        ``user``: the user who triggered it (default: the world's current user); ``None`` for a pipeline
        without one (GitLab renders ``"user": null``, e.g. after the user was deleted).

        A ``skipped`` or ``manual`` pipeline has ``finished_at`` null, as on GitLab (see
        :data:`STAMPS_FINISHED_AT`); for those, ``finished_at`` here is only the moment it came to rest
        (its ``updated_at``, and for ``manual`` the end of its duration). A skipped pipeline never
        started: no started_at, no duration.
        """
        _check_status(status)
        if source not in PIPELINE_SOURCES:
            raise ValueError(f"unknown pipeline source {source!r}")
        with self.lock:
            project = self._project(project_id)
            now = self.now()
            specs = _stage_sorted(jobs)
            stages = list(dict.fromkeys(s.stage for s in specs))
            finished = status in FINISHED_STATUSES
            started = status not in _PIPELINE_NOT_STARTED
            span = timedelta(seconds=60 + 45 * max(1, len(stages)))
            if finished_at is not None and not finished:
                raise ValueError(f"finished_at given for a pipeline with status {status!r}")
            created_at = _aware(created_at) if created_at is not None else None
            finished_at = _aware(finished_at) if finished_at is not None else None
            if created_at is None:
                if finished_at is not None:
                    created_at = finished_at - span
                elif finished:
                    created_at = now - span
                else:
                    created_at = now - timedelta(seconds=30) if started else now
            if finished and finished_at is None:
                finished_at = min(created_at + span, max(now, created_at + timedelta(seconds=1)))
            started_at = created_at + timedelta(milliseconds=800) if started else None
            if started_at is not None and finished_at is not None and started_at > finished_at:
                started_at = created_at
            rest_at = finished_at  # when it came to rest (updated_at); finished_at only if stamped
            if status not in STAMPS_FINISHED_AT:
                finished_at = None
            iid = self._next_iid.get(project_id, 0) + 1
            self._next_iid[project_id] = iid
            sha = sha or _hex(project_id, ref, iid)
            previous = self._project_pipelines[project_id]
            before_sha = self.pipelines[previous[-1]].sha if previous else "0" * 40
            pipeline = Pipeline(
                id=self._next_pipeline,
                iid=iid,
                project_id=project_id,
                status=status,
                source=source,
                ref=ref,
                sha=sha,
                created_at=created_at,
                updated_at=rest_at or started_at or created_at,
                started_at=started_at,
                finished_at=finished_at,
                user=(dict(self.current_user) if user is _CURRENT_USER
                      else None if user is None else self.basic_user(user)),
                name=name,
                before_sha=before_sha if source == "push" else "0" * 40,
                # update_duration runs on the transitions to success/failed/canceled AND manual.
                duration=_whole_seconds(started_at, rest_at) if status != "skipped" else None,
                stages=stages,
            )
            self._next_pipeline += 1
            self.pipelines[pipeline.id] = pipeline
            previous.append(pipeline.id)
            self._ensure_commit(project, sha, author_email, created_at, before_sha)
            slots: dict[str, int] = {}
            for spec in specs:
                slot = slots.get(spec.stage, 0)
                slots[spec.stage] = slot + 1
                self._create_job(pipeline, spec.name, spec.stage, spec.status, spec.log, slot, spec.allow_failure)
            return pipeline

    def add_job(
        self,
        pipeline_id: int,
        name: str,
        stage: str = "test",
        status: str = "success",
        log: Log = None,
        retried_from: int | None = None,
    ) -> Job:
        """Add a job to a pipeline. ``retried_from``: the older attempt this one replaces (then hidden
        from the jobs list unless ``include_retried=true``); the new attempt is timed now."""
        _check_status(status)
        with self.lock:
            pipeline = self._pipeline(pipeline_id)
            if stage not in pipeline.stages:
                pipeline.stages.append(stage)
            if retried_from is not None:
                old = self._job(retried_from)
                if old.pipeline_id != pipeline_id:
                    raise ValueError(f"job {retried_from} is not in pipeline {pipeline_id}")
                old.retried = True
                return self._create_job(pipeline, name, stage, status, log, 0, old.allow_failure,
                                        retried_from=retried_from, at=self.now())
            slot = sum(1 for j in pipeline.job_ids if self.jobs[j].stage == stage)
            return self._create_job(pipeline, name, stage, status, log, slot, None)

    def add_bridge(
        self,
        pipeline_id: int,
        name: str,
        stage: str = "child",
        downstream_pipeline_id: int | None = None,
        status: str = "success",
    ) -> Bridge:
        """Add a trigger job. Bridges are not in the jobs list; ``downstream_pipeline_id`` may be any
        project's pipeline (multi-project) or None (downstream never created)."""
        _check_status(status)
        with self.lock:
            pipeline = self._pipeline(pipeline_id)
            if downstream_pipeline_id is not None:
                self._pipeline(downstream_pipeline_id)
            if stage not in pipeline.stages:
                pipeline.stages.append(stage)
            created, started, finished, queued = self._job_times(pipeline, stage, 0, status)
            bridge = Bridge(
                id=self._take_job_id(),
                pipeline_id=pipeline.id,
                name=name,
                stage=stage,
                status=status,
                created_at=created,
                started_at=started,
                finished_at=finished,
                downstream_pipeline_id=downstream_pipeline_id,
                project_id=pipeline.project_id,
                queued_duration=queued,
                failure_reason=_bridge_failure(status, downstream_pipeline_id),
            )
            self.bridges[bridge.id] = bridge
            pipeline.bridge_ids.append(bridge.id)
            return bridge

    def add_child_pipeline(
        self,
        parent_pipeline_id: int,
        *,
        bridge_name: str = "trigger-child",
        stage: str = "child",
        status: str = "success",
        jobs: Sequence[JobSpec] = (),
    ) -> Pipeline:
        """A child pipeline (``source=parent_pipeline``, same project, ref and sha) and the bridge in
        the parent whose ``downstream_pipeline`` it is. The bridge takes the child's status."""
        with self.lock:
            parent = self._pipeline(parent_pipeline_id)
            bridge = self.add_bridge(parent.id, bridge_name, stage, None, status)
            child_created = (bridge.started_at or self.now()) + timedelta(milliseconds=150)
            child_finished = None
            if status in FINISHED_STATUSES and bridge.finished_at is not None and bridge.finished_at > child_created:
                child_finished = bridge.finished_at - timedelta(milliseconds=20)
            child = self.add_pipeline(
                parent.project_id,
                status=status,
                source="parent_pipeline",
                ref=parent.ref,
                sha=parent.sha,
                user=parent.user,
                created_at=child_created,
                finished_at=child_finished,
                jobs=jobs,
            )
            child.parent_pipeline_id = parent.id
            bridge.downstream_pipeline_id = child.id
            bridge.failure_reason = _bridge_failure(status, child.id)
            return child

    # -- mutations ------------------------------------------------------------------------------

    def finish_pipeline(self, pipeline_id: int, status: str = "success", *, skew: timedelta | None = None) -> Pipeline:
        """Bring a (running) pipeline to rest in ``status`` now, as GitLab's state machine does.

        updated_at = now; for success/failed/canceled also finished_at = now and the duration
        (``before_transition any => [:success, :failed, :canceled]`` in app/models/ci/pipeline.rb);
        for ``manual`` only the duration (``before_transition any => [:manual]``), finished_at stays
        null; for ``skipped`` neither. "Now" is :meth:`stamp` (``skew`` or :attr:`node_clock_offset`).

        Unfinished jobs take ``status`` (``success`` when finishing as ``manual``); manual jobs stay
        manual. A bridge triggering this pipeline takes its status too.
        """
        if status not in FINISHED_STATUSES:
            raise ValueError(f"{status!r} is not a finished status ({sorted(FINISHED_STATUSES)})")
        with self.lock:
            pipeline = self._pipeline(pipeline_id)
            now = self.stamp(skew)
            job_status = status if status in COMPLETED_STATUSES else "success"
            for job in self._latest_jobs(pipeline):
                if job.status in COMPLETED_STATUSES or job.status == "manual":
                    continue
                self._settle(job, job_status, now)
            for bridge_id in pipeline.bridge_ids:
                bridge = self.bridges[bridge_id]
                if bridge.status not in COMPLETED_STATUSES and bridge.status != "manual":
                    self._settle(bridge, job_status, now)
            self._come_to_rest(pipeline, status, now)
            for bridge in self.bridges.values():
                if bridge.downstream_pipeline_id == pipeline.id:
                    self._settle(bridge, job_status, now)
                    bridge.failure_reason = _bridge_failure(bridge.status, pipeline.id)
            return pipeline

    def retry_pipeline(self, pipeline_id: int, *, skew: timedelta | None = None) -> Pipeline:
        """Reopen a pipeline as GitLab's "Retry" does: every failed or canceled job gets a new attempt
        (new higher id, same name and stage, ``running``); the old attempt is hidden unless
        ``include_retried``. The pipeline is ``running`` again with ``finished_at`` null; its duration
        keeps the old value (as in the real recording ``pipeline_single_running_after_retry.json``)."""
        with self.lock:
            pipeline = self._pipeline(pipeline_id)
            now = self.stamp(skew)
            for job in sorted(self._latest_jobs(pipeline), key=lambda j: j.id):
                if job.status not in ("failed", "canceled"):
                    continue
                job.retried = True
                self._create_job(pipeline, job.name, job.stage, "running", _next_attempt_log(job.log), 0,
                                 job.allow_failure, retried_from=job.id, at=now)
            self._reopen(pipeline, now)
            return pipeline

    def play_job(self, job_id: int, *, skew: timedelta | None = None) -> Job:
        """Play a manual job (Ci::PlayBuildService): the job is enqueued and picked up by a runner, so
        it is ``running`` (started now, same id: playing a manual job does not create a new attempt,
        unlike a retry). The pipeline reopens: ``running``, ``finished_at`` null, updated_at now
        (the same reopening the retry recording shows; its started_at is kept: ``started_at ||=``).
        Bring it to rest with :meth:`finish_job`."""
        with self.lock:
            job = self._job(job_id)
            pipeline = self._pipeline(job.pipeline_id)
            if job.status != "manual" or job.retried:
                raise ValueError(f"job {job_id} is {job.status!r}, not a playable manual job")
            now = self.stamp(skew)
            job.status = "running"
            job.started_at = now
            job.finished_at = None
            job.queued_duration = 0.0
            self._reopen(pipeline, now)
            return job

    def finish_job(self, job_id: int, status: str = "success", *, skew: timedelta | None = None) -> Pipeline:
        """Finish a running job in ``status`` now; when no job of the pipeline is still active, the
        pipeline comes to rest in the status of its latest jobs, as Gitlab::Ci::Status::Composite
        computes it: ``manual`` (finished_at null) if a blocking manual job is left, else
        failed/canceled/success (finished_at stamped). Returns the pipeline."""
        if status not in COMPLETED_STATUSES - {"skipped"}:
            raise ValueError(f"{status!r}: a job finishes as success, failed or canceled")
        with self.lock:
            job = self._job(job_id)
            pipeline = self._pipeline(job.pipeline_id)
            if job.status not in _ACTIVE_STATUSES | {"pending", "created"}:
                raise ValueError(f"job {job_id} is {job.status!r}, not running")
            now = self.stamp(skew)
            self._settle(job, status, now)
            latest = self._latest_jobs(pipeline)
            if any(j.status not in COMPLETED_STATUSES | {"manual"} for j in latest):
                pipeline.updated_at = now
                return pipeline
            self._come_to_rest(pipeline, _composite_status(latest), now)
            return pipeline

    def touch_pipeline(self, pipeline_id: int, *, skew: timedelta | None = None) -> Pipeline:
        """Move updated_at to now without any status change (GitLab does this, e.g. ~55 s after a
        pipeline finished, in a real recording)."""
        with self.lock:
            pipeline = self._pipeline(pipeline_id)
            pipeline.updated_at = self.stamp(skew)
            return pipeline

    def delete_pipeline(self, pipeline_id: int) -> None:
        """Delete a pipeline: 404 afterwards for it, its jobs and their traces; gone from lists."""
        with self.lock:
            self._pipeline(pipeline_id).deleted = True

    def delete_project(self, project_id: int) -> None:
        """Delete a project: 404 ``Project Not Found`` afterwards on ``GET /projects/:id`` and everything
        under it; gone from project lists. (ci_pipelines.project_id is ``async_delete`` in
        config/gitlab_loose_foreign_keys.yml: its pipelines go with it.)"""
        with self.lock:
            project = self._project(project_id)
            project.deleted = True
            for pipeline_id in self._project_pipelines.get(project_id, ()):
                self.pipelines[pipeline_id].deleted = True

    def delete_user(self, user_id: int) -> None:
        """Delete a user. Their pipelines stay, with ``"user": null`` (ci_pipelines.user_id and
        p_ci_builds.user_id are ``async_nullify`` in config/gitlab_loose_foreign_keys.yml; a nullify
        does not move updated_at)."""
        with self.lock:
            if user_id not in self.users:
                raise KeyError(f"no user {user_id}")
            if user_id == self.current_user["id"]:
                raise ValueError("the token's own user cannot be deleted (every request would be a 401)")
            del self.users[user_id]
            for pipeline in self.pipelines.values():
                if pipeline.user is not None and pipeline.user.get("id") == user_id:
                    pipeline.user = None

    def set_job_log(self, job_id: int, log: Log) -> None:
        """Replace a job's log."""
        with self.lock:
            self._job(job_id).log = log

    def erase_job(self, job_id: int) -> Job:
        """Erase a job's log and artifacts (``erased_at`` set; the trace answers 200 with no body)."""
        with self.lock:
            job = self._job(job_id)
            job.erased = True
            job.erased_at = self.now()
            job.log = None
            return job

    # -- reading helpers ------------------------------------------------------------------------

    def finished_pipelines(self) -> list[Pipeline]:
        """Non-deleted pipelines in a finished status (including ``manual``), by id."""
        with self.lock:
            return sorted(
                (p for p in self.pipelines.values() if not p.deleted and p.status in FINISHED_STATUSES),
                key=lambda p: p.id,
            )

    def project_pipelines(self, project_id: int) -> list[Pipeline]:
        """A project's non-deleted pipelines (children included), oldest first."""
        with self.lock:
            return [self.pipelines[i] for i in self._project_pipelines.get(project_id, ())
                    if not self.pipelines[i].deleted]

    @property
    def lists_child_pipelines(self) -> bool:
        """Whether this GitLab lists child pipelines for ``source=parent_pipeline`` (17.0 and newer)."""
        return version_at_least(self.gitlab_version, CHILD_LISTING_SINCE)

    def find_pipelines(
        self,
        project_id: int,
        *,
        scope: str | None = None,
        status: str | None = None,
        ref: str | None = None,
        sha: str | None = None,
        username: str | None = None,
        yaml_errors: bool | None = None,
        updated_after: datetime | None = None,
        updated_before: datetime | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        source: str | None = None,
        name: str | None = None,
    ) -> list[Pipeline]:
        """A project's pipelines as ``Ci::PipelinesFinder#execute`` filters them (unsorted: oldest first).

        The one finder behind both the REST list and GraphQL's ``Project.pipelines``, so the two always
        agree. Its steps follow app/finders/ci/pipelines_finder.rb: ``prefiltered_pipelines`` drops child
        pipelines (``no_child``) unless ``source == 'parent_pipeline'`` on GitLab 17.0+ (before 17.0 it
        dropped them unconditionally, so that source filter found nothing); ``by_status`` and
        ``by_source`` ignore a value that is not a known status or source (the REST API rejects those
        with a 400 before calling the finder; GraphQL passes its String ``source`` through unchecked).
        ``updated_*`` are INCLUSIVE: Ci::Pipeline includes UpdatedAtFilterable
        (app/models/concerns/updated_at_filterable.rb: ``updated_at.gteq`` / ``.lteq``), reached through
        UpdatedAtFilter (app/finders/concerns/updated_at_filter.rb), which finds nothing when
        updated_before < updated_after. ``created_*`` are EXCLUSIVE (REST only): Ci::Pipeline's own scopes
        (``created_after: arel_table[:created_at].gt(time)``, ``created_before: ....lt(time)``). Times
        compare at the stored microsecond precision.
        """
        with self.lock:
            items = self.project_pipelines(project_id)
            if not (source == "parent_pipeline" and self.lists_child_pipelines):
                items = [p for p in items if p.source != "parent_pipeline"]
            items = _by_scope(items, scope)
            if status in AVAILABLE_STATUSES:
                items = [p for p in items if p.status == status]
            if ref:
                items = [p for p in items if p.ref == ref]
            if sha:
                items = [p for p in items if p.sha == sha]
            if username:
                items = [p for p in items if p.user is not None and p.user.get("username") == username]
            if yaml_errors is not None:
                items = [p for p in items if (p.yaml_errors is not None) == yaml_errors]
            if updated_after is not None and updated_before is not None and updated_before < updated_after:
                return []
            if updated_after is not None:
                items = [p for p in items if p.updated_at >= updated_after]
            if updated_before is not None:
                items = [p for p in items if p.updated_at <= updated_before]
            if created_after is not None:
                items = [p for p in items if p.created_at > created_after]
            if created_before is not None:
                items = [p for p in items if p.created_at < created_before]
            if source in PIPELINE_SOURCES:
                items = [p for p in items if p.source == source]
            if name:
                items = [p for p in items if p.name == name]
            return items

    def pipeline_jobs(self, pipeline_id: int, include_retried: bool = False) -> list[Job]:
        """A pipeline's jobs, newest first (as GitLab lists them); only latest attempts by default."""
        with self.lock:
            pipeline = self._pipeline(pipeline_id)
            jobs = [self.jobs[i] for i in pipeline.job_ids]
            if not include_retried:
                jobs = [j for j in jobs if not j.retried]
            return sorted(jobs, key=lambda j: j.id, reverse=True)

    def pipeline_bridges(self, pipeline_id: int) -> list[Bridge]:
        """A pipeline's bridges, newest first."""
        with self.lock:
            pipeline = self._pipeline(pipeline_id)
            return sorted((self.bridges[i] for i in pipeline.bridge_ids), key=lambda b: b.id, reverse=True)

    def live_pipeline(self, pipeline_id: int) -> Pipeline | None:
        """The pipeline unless unknown or deleted."""
        with self.lock:
            pipeline = self.pipelines.get(pipeline_id)
            return None if pipeline is None or pipeline.deleted else pipeline

    def live_job(self, job_id: int) -> Job | None:
        """The job unless unknown or its pipeline was deleted."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or self.live_pipeline(job.pipeline_id) is None:
                return None
            return job

    # -- internals ------------------------------------------------------------------------------

    def _group(self, group_id: int) -> Group:
        try:
            return self.groups[group_id]
        except KeyError:
            raise KeyError(f"no group {group_id}") from None

    def _project(self, project_id: int) -> Project:
        try:
            return self.projects[project_id]
        except KeyError:
            raise KeyError(f"no project {project_id}") from None

    def _pipeline(self, pipeline_id: int) -> Pipeline:
        pipeline = self.pipelines.get(pipeline_id)
        if pipeline is None:
            raise KeyError(f"no pipeline {pipeline_id}")
        if pipeline.deleted:
            raise KeyError(f"pipeline {pipeline_id} was deleted")
        return pipeline

    def _job(self, job_id: int) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise KeyError(f"no job {job_id}") from None

    def _latest_jobs(self, pipeline: Pipeline) -> list[Job]:
        return [self.jobs[i] for i in pipeline.job_ids if not self.jobs[i].retried]

    def _take_job_id(self) -> int:
        job_id = self._next_job
        self._next_job += 1
        return job_id

    def _ensure_commit(self, project: Project, sha: str, author_email: str, created: datetime, parent: str) -> None:
        if (project.id, sha) in self.commits:
            return
        author = author_email.split("@", 1)[0] or "author"
        authored = created - timedelta(minutes=2)
        title = f"Simulated change {sha[:8]}"
        self.commits[(project.id, sha)] = Commit(
            sha=sha,
            project_id=project.id,
            title=title,
            message=f"{title}\n",
            author_name=author,
            author_email=author_email,
            authored_date=authored,
            committer_name=author,
            committer_email=author_email,
            committed_date=authored,
            parent_ids=[parent] if parent != "0" * 40 else [_hex("parent", project.id, sha)],
        )

    def _job_times(
        self, pipeline: Pipeline, stage: str, slot: int, status: str
    ) -> tuple[datetime, datetime | None, datetime | None, float | None]:
        """(created, started, finished, queued seconds) for a job of ``stage`` in the pipeline's run.

        Stage *i* of *n* runs in the *i*-th slice of [started_at, finished_at or now].
        """
        created = pipeline.created_at
        if status in NEVER_RAN_STATUSES:
            return created, None, None, None
        start = pipeline.started_at or pipeline.created_at
        rested = pipeline.updated_at if pipeline.status in FINISHED_STATUSES else None
        end = pipeline.finished_at or rested or max(self.now(), start + timedelta(seconds=1))
        n_stages = max(1, len(pipeline.stages))
        index = pipeline.stages.index(stage) if stage in pipeline.stages else n_stages - 1
        width = (end - start) / n_stages
        window_start = start + width * index
        window_end = window_start + width
        queued = round(0.25 + 0.05 * (slot % 5), 6)
        started = min(window_start + timedelta(seconds=queued), window_end)
        if status in _ACTIVE_STATUSES:
            return created, started, None, queued
        finished = max(started, window_end - timedelta(milliseconds=10 * (slot + 1)))
        return created, started, finished, queued

    def _create_job(
        self,
        pipeline: Pipeline,
        name: str,
        stage: str,
        status: str,
        log: Log,
        slot: int,
        allow_failure: bool | None,
        *,
        retried_from: int | None = None,
        at: datetime | None = None,
    ) -> Job:
        if at is None:
            created, started, finished, queued = self._job_times(pipeline, stage, slot, status)
        else:
            # A new attempt: created now, started right away unless it never runs.
            created = at
            ran = status not in NEVER_RAN_STATUSES
            started = at if ran else None
            finished = at if ran and status not in _ACTIVE_STATUSES else None
            queued = 0.0 if ran else None
        job = Job(
            id=self._take_job_id(),
            pipeline_id=pipeline.id,
            name=name,
            stage=stage,
            status=status,
            created_at=created,
            started_at=started,
            finished_at=finished,
            log=log,
            project_id=pipeline.project_id,
            queued_duration=queued,
            allow_failure=(status == "manual") if allow_failure is None else allow_failure,
            failure_reason="script_failure" if status == "failed" else None,
            retried_from=retried_from,
            runner_index=len(self.jobs) % 3,
        )
        self.jobs[job.id] = job
        pipeline.job_ids.append(job.id)
        return job

    def _reopen(self, pipeline: Pipeline, now: datetime) -> None:
        """Back to ``running``: finished_at null (recorded after a retry), duration and started_at kept."""
        pipeline.status = "running"
        pipeline.started_at = pipeline.started_at or now
        pipeline.finished_at = None
        pipeline.updated_at = now

    def _come_to_rest(self, pipeline: Pipeline, status: str, now: datetime) -> None:
        """The pipeline's transition to a resting ``status`` at ``now``, per GitLab's state machine."""
        pipeline.status = status
        pipeline.updated_at = now
        if status == "skipped":
            return  # no before_transition for skipped: finished_at, started_at, duration untouched
        pipeline.started_at = pipeline.started_at or pipeline.created_at
        pipeline.duration = _whole_seconds(pipeline.started_at, now)  # update_duration
        if status in STAMPS_FINISHED_AT:
            pipeline.finished_at = now

    def _settle(self, item: Job | Bridge, status: str, now: datetime) -> None:
        """Bring an unfinished job or bridge to rest in ``status`` at ``now``."""
        never_started = item.started_at is None
        item.status = status
        if never_started and status in ("skipped", "canceled"):
            return  # it never ran: no times
        item.started_at = item.started_at or now
        item.finished_at = now
        if item.queued_duration is None:
            item.queued_duration = 0.0
        if isinstance(item, Job):
            item.failure_reason = "script_failure" if status == "failed" else None
        else:
            item.failure_reason = _bridge_failure(status, item.downstream_pipeline_id)


def version_at_least(version: str, minimum: tuple[int, int]) -> bool:
    """Whether a GitLab version string (``17.5.0``, ``16.11.2-ee``, ``19.5.0-pre``) is at least
    ``(major, minor)``. An unreadable version counts as new: the simulator's default behaviour."""
    parts = version.split("-", 1)[0].split(".")
    try:
        major, minor = int(parts[0]), (int(parts[1]) if len(parts) > 1 else 0)
    except ValueError:
        return True
    return (major, minor) >= minimum


def _by_scope(items: list[Pipeline], scope: str | None) -> list[Pipeline]:
    """Ci::PipelinesFinder#by_scope: running, pending, finished (Ci::HasStatus::COMPLETED_STATUSES, no
    ``manual``), or the newest pipeline per branch / per tag; anything else leaves the list alone."""
    if scope == "running":
        return [p for p in items if p.status == "running"]
    if scope == "pending":
        return [p for p in items if p.status == "pending"]
    if scope == "finished":
        return [p for p in items if p.status in COMPLETED_STATUSES]
    if scope in ("branches", "tags"):
        # Merge-request refs are not branches.
        newest: dict[str, Pipeline] = {}
        for p in items:
            is_branch = not p.tag and not p.ref.startswith("refs/")
            if (scope == "tags" and p.tag) or (scope == "branches" and is_branch):
                if p.ref not in newest or p.id > newest[p.ref].id:
                    newest[p.ref] = p
        return list(newest.values())
    return items


def _check_status(status: str) -> None:
    if status not in AVAILABLE_STATUSES:
        raise ValueError(f"unknown status {status!r}")


def _stage_sorted(specs: Sequence[JobSpec]) -> list[JobSpec]:
    """Specs grouped by stage in order of first appearance (stable): GitLab creates a pipeline's jobs
    stage by stage, so ids ascend in stage order."""
    order = {stage: i for i, stage in enumerate(dict.fromkeys(s.stage for s in specs))}
    return sorted(specs, key=lambda s: order[s.stage])


def _composite_status(jobs: Sequence[Job]) -> str:
    """A resting pipeline's status from its latest jobs, after Gitlab::Ci::Status::Composite: jobs
    allowed to fail count as success; a blocking manual job (not allowed to fail) makes it ``manual``;
    otherwise failed beats canceled beats success; only skipped jobs: skipped."""
    statuses = ["success" if j.status == "failed" and j.allow_failure else j.status
                for j in jobs if not (j.status == "manual" and j.allow_failure)]
    if not statuses or all(s == "skipped" for s in statuses):
        return "skipped" if statuses else "success"
    if "manual" in statuses:
        return "manual"
    if "failed" in statuses:
        return "failed"
    if "canceled" in statuses:
        return "canceled"
    return "success"


def _whole_seconds(start: datetime | None, end: datetime | None) -> int | None:
    # A pipeline's duration is whole seconds (an integer in the API), a job's is a float.
    if start is None or end is None:
        return None
    return max(0, int((end - start).total_seconds()))


def _bridge_failure(status: str, downstream_id: int | None) -> str | None:
    # As recorded: a bridge whose downstream was never created fails with
    # downstream_pipeline_creation_failed; one whose downstream failed says unknown_failure.
    if status != "failed":
        return None
    return "downstream_pipeline_creation_failed" if downstream_id is None else "unknown_failure"


def _next_attempt_log(log: Log) -> Log:
    """A retried job writes a new log: a generated one gets a new seed, a literal one is reused."""
    if isinstance(log, LogSpec):
        return dataclasses.replace(log, seed=log.seed + 1)
    return log
