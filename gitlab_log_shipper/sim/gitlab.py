"""A GitLab REST API simulator: the endpoints a log shipper uses, served over real HTTP from a World.

It also serves GitLab's GraphQL API at ``/api/graphql`` (:mod:`.graphql`, with graphql-core from the ``sim``
extra) from the same World, behind the same authentication, rate-limit window, faults and ``Date`` header.

Integration tests talk to it with unmodified python-gitlab, so it reproduces what decides whether a
poller is correct (see ``gitlab-api-notes.md``): offset pagination with GitLab's headers (and their
absence above 10,000 rows) and Link URLs rebuilt from the coerced params, inclusive ``updated_*`` and
exclusive ``created_*`` bounds, child pipelines listed only with
``source=parent_pipeline``, list rows without ``finished_at``, jobs newest first with retried attempts
hidden, bridges kept out of the jobs list, the raw ``text/plain`` trace with no charset and no Range,
404 for deleted pipelines, Grape's 400s for bad parameters, 401 for a bad token, and JSON objects with
the same keys and value types as real GitLab.com responses (``../gitlab-samples``).

It also reproduces the transport failures a poller must survive, via :class:`Faults` (latency, random
5xx pages from the CDN, rate limiting with or without headers, connections dropped mid-trace) and
:meth:`GitLabSimulator.inject` (answer the next N requests to an endpoint with a given status).

Standard library only: ``ThreadingHTTPServer`` with daemon threads, HTTP/1.1 keep-alive. Traces are
streamed in 64 KiB chunks from :class:`~gitlab_log_shipper.sim.logs.LogSpec`, so a 200 MB log costs
no memory. Client disconnects are normal here and are never printed.
"""

from __future__ import annotations

import collections
import email.utils
import hashlib
import json
import logging
import math
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl, quote_plus, unquote, urlsplit

from ._loopback import DISCONNECTS as _DISCONNECTS
from ._loopback import LoopbackHandler, LoopbackServer, LoopbackService
from .graphql import (
    GraphQLBadRequest,
    GraphQLFaults,
    GraphQLRequest,
    GraphQLService,
    GraphQLUnavailable,
    read_request,
)
from .logs import iter_log, log_size
from .world import (
    AVAILABLE_STATUSES,
    DEFAULT_GITLAB_VERSION,
    PIPELINE_SOURCES,
    Bridge,
    Commit,
    Group,
    Job,
    Pipeline,
    Project,
    World,
)

__all__ = ["ENDPOINTS", "Faults", "GitLabSimulator", "RequestHook"]

logger = logging.getLogger(__name__)

RequestHook = Callable[[str, list[str], dict[str, str]], None]
"""``callback(endpoint, args, params)`` given to :meth:`GitLabSimulator.on_request`."""

ENDPOINTS: tuple[str, ...] = (
    "version", "user", "projects", "project", "group", "group_projects", "pipelines", "pipeline",
    "pipeline_jobs", "pipeline_bridges", "job", "trace", "commit", "token_self", "graphql",
)
"""Endpoint names used by :attr:`GitLabSimulator.counters` and :meth:`GitLabSimulator.inject`.
Requests to anything else are counted as ``"unknown"``."""

GITLAB_VERSION = DEFAULT_GITLAB_VERSION  # what a World reports unless given another (World.gitlab_version)
# The largest GraphQL request body accepted (a query is at most 10,000 characters; variables add a little);
# a bigger one is read and dropped in chunks, then refused with a 413.
_MAX_GRAPHQL_BODY = 1 << 20
_TRACE_CHUNK = 64 * 1024
# GitLab.com's authenticated API limit, shown in RateLimit-* headers when no limit is enforced.
_DISPLAY_RATE_LIMIT = 2000
_EMPTY_SHA = "0" * 40


# -- faults -----------------------------------------------------------------------------------------


@dataclass
class Faults:
    """Transport failures to produce; change any field while the simulator runs.

    Each field is read once per request, so plain assignment is enough to change behaviour between
    requests; :meth:`update` changes several at once atomically.
    """

    latency: float = 0.0
    error_rate: float = 0.0
    error_statuses: tuple[int, ...] = (500, 502, 503)
    rate_limit: int | None = None
    rate_limit_window: float = 60.0
    bare_429: bool = False
    drop_trace_after: int | None = None
    drop_trace_always: bool = False
    # A trickling job log: (bytes, delay_s) sends the trace body ``bytes`` at a time with ``delay_s``
    # between writes (headers at once, Content-Length as usual). ``trace_trickle_jobs``: only these job
    # ids (None: every job). It stops when the client hangs up or the simulator stops.
    trace_trickle: tuple[int, float] | None = None
    trace_trickle_jobs: frozenset[int] | None = None
    seed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    _rng: random.Random = field(default_factory=random.Random, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._rng.seed(self.seed)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name == "seed" and "_rng" in self.__dict__:
            with self._lock:
                self._rng.seed(value)

    def update(self, **changes: Any) -> None:
        """Set several fields at once (under the lock, so no request sees half of the change)."""
        unknown = set(changes) - {f for f in self.__dataclass_fields__ if not f.startswith("_")}
        if unknown:
            raise TypeError(f"unknown fault field(s): {sorted(unknown)}")
        with self._lock:
            for name, value in changes.items():
                object.__setattr__(self, name, value)
            if "seed" in changes:
                self._rng.seed(changes["seed"])

    def pick_error(self) -> int | None:
        """A status from ``error_statuses`` for a share ``error_rate`` of calls, else None (seeded)."""
        with self._lock:
            if self.error_rate <= 0 or not self.error_statuses:
                return None
            if self._rng.random() >= self.error_rate:
                return None
            return int(self._rng.choice(self.error_statuses))


@dataclass
class _Injection:
    endpoint: str | None
    status: int
    remaining: int
    headers: dict[str, str] | None
    body: str | None


@dataclass
class _RateState:
    limit: int
    observed: int
    reset_at: float
    throttled: bool

    def headers(self, now: float) -> dict[str, str]:
        """The RateLimit-* headers GitLab.com sends on ordinary responses."""
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Name": "throttle_authenticated_api",
            "RateLimit-Observed": str(self.observed),
            "RateLimit-Remaining": str(max(0, self.limit - self.observed)),
            # A Unix timestamp, not a delay (python-gitlab subtracts time.time()).
            "RateLimit-Reset": str(math.ceil(self.reset_at)),
        }

    def throttled_headers(self, now: float) -> dict[str, str]:
        """The headers of Rack::Attack's 429: Retry-After in whole seconds plus RateLimit-*."""
        headers = self.headers(now)
        headers["RateLimit-Remaining"] = "0"
        headers["RateLimit-ResetTime"] = formatdate(math.ceil(self.reset_at), usegmt=True)
        headers["Retry-After"] = str(max(1, math.ceil(self.reset_at - now)))
        return headers


class _ApiError(Exception):
    """An error answer in GitLab's shape: ``{"message": ...}`` from the app, ``{"error": ...}`` from
    Grape's parameter validation."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {body}")
        self.status = status
        self.body = body


def _not_found(what: str | None = None) -> _ApiError:
    # ActiveRecord::RecordNotFound → "404 Not found"; not_found!('Project') → "404 Project Not Found".
    return _ApiError(404, {"message": f"404 {what} Not Found" if what else "404 Not found"})


def _invalid(param: str, problem: str = "is invalid") -> _ApiError:
    return _ApiError(400, {"error": f"{param} {problem}"})


# -- formatting -------------------------------------------------------------------------------------


def _ts(value: datetime | None) -> str | None:
    """GitLab's database timestamps: UTC, millisecond precision (truncated), ``Z``."""
    if value is None:
        return None
    value = value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _git_ts(value: datetime) -> str:
    """Git dates: second precision with the committer's offset (UTC here), as GitLab renders them."""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000+00:00")


def _dumps(payload: Any) -> bytes:
    """Compact JSON as Rails writes it, including its HTML-safe escaping of ``& < >``."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    # These characters can only occur inside JSON strings, so a plain replace is safe.
    text = text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    return text.encode("utf-8")


def _error_page(status: int) -> bytes:
    """The HTML a CDN or load balancer answers with (GitLab.com: Cloudflare, 5xx and 52x)."""
    reason = _REASONS.get(status, "Error")
    return (
        f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {reason}</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode("ascii")


# Rails' public/404.html, shortened: what a path without a route answers.
_NOT_FOUND_PAGE = (
    b"<!DOCTYPE html>\n<html>\n<head><title>The page you're looking for could not be found (404)</title></head>\n"
    b"<body><h1>404</h1><p>The page could not be found or you don't have permission to view it.</p></body>\n"
    b"</html>\n"
)

_REASONS = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    409: "Conflict", 413: "Request Entity Too Large", 429: "Too Many Requests", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Time-out", 520: "Web Server Returned an Unknown Error",
    521: "Web Server Is Down", 522: "Connection Timed Out", 523: "Origin Is Unreachable", 524: "A Timeout Occurred",
}

# Pipeline detailed_status: (icon, text, label, group) per status, as GitLab's status presenters say.
_DETAILED_STATUS: dict[str, tuple[str, str, str, str]] = {
    "created": ("status_created", "Created", "created", "created"),
    "waiting_for_resource": ("status_pending", "Waiting", "waiting for resource", "waiting-for-resource"),
    "preparing": ("status_preparing", "Preparing", "preparing", "preparing"),
    "waiting_for_callback": ("status_pending", "Waiting", "waiting for callback", "waiting-for-callback"),
    "pending": ("status_pending", "Pending", "pending", "pending"),
    "running": ("status_running", "Running", "running", "running"),
    "success": ("status_success", "Passed", "passed", "success"),
    "failed": ("status_failed", "Failed", "failed", "failed"),
    "canceling": ("status_canceled", "Canceling", "canceling", "canceling"),
    "canceled": ("status_canceled", "Canceled", "canceled", "canceled"),
    "skipped": ("status_skipped", "Skipped", "skipped", "skipped"),
    "manual": ("status_manual", "Blocked", "waiting for manual action", "manual"),
    "scheduled": ("status_scheduled", "Scheduled", "delayed", "scheduled"),
}
_WARNING_STATUS = ("status_warning", "Warning", "passed with warnings", "success-with-warnings")

_RUNNER_ADMIN = {
    "id": 6515150, "username": "runner-admin", "public_email": "", "name": "Runner Admin", "state": "active",
    "locked": False,
    "avatar_url": "https://secure.gravatar.com/avatar/f666d7b03304319b77d3e0eef49a7ea0?s=80&d=identicon",
    "web_url": "https://gitlab.example.com/runner-admin",
}


# -- request parameters -----------------------------------------------------------------------------


class _Params:
    """Query parameters with Grape's coercions and error messages."""

    _TRUE = {"true", "1", "t", "yes", "y", "on"}
    _FALSE = {"false", "0", "f", "no", "n", "off"}

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def get(self, name: str) -> str | None:
        # Rack keeps the last of repeated scalar parameters.
        values = [v for k, v in self.pairs if k == name]
        return values[-1] if values else None

    def getlist(self, name: str) -> list[str] | None:
        """``name[]=a&name[]=b`` or ``name=a`` (Grape coerces a single value to a list)."""
        values = [v for k, v in self.pairs if k in (name, f"{name}[]")]
        return values or None

    def boolean(self, name: str, default: bool | None) -> bool | None:
        raw = self.get(name)
        if raw is None or raw == "":
            return default
        lowered = raw.lower()
        if lowered in self._TRUE:
            return True
        if lowered in self._FALSE:
            return False
        raise _invalid(name)

    def integer(self, name: str, default: int) -> int:
        raw = self.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise _invalid(name) from None

    def choice(self, name: str, allowed: Iterable[str], default: str | None) -> str | None:
        raw = self.get(name)
        if raw is None:
            return default
        if raw not in allowed:
            raise _invalid(name, "does not have a valid value")
        return raw

    def moment(self, name: str, *, keep_offset: bool = False) -> datetime | None:
        """Grape's DateTime: ISO 8601; naive means UTC. Note that an unencoded ``+`` in an offset
        arrives as a space (form decoding) and makes the value invalid, as on GitLab."""
        raw = self.get(name)
        if raw is None or raw == "":
            return None
        text = raw.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise _invalid(name) from None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value if keep_offset else value.astimezone(timezone.utc)


# -- rendering --------------------------------------------------------------------------------------


class _Renderer:
    """Turns world objects into GitLab's JSON entities (key for key, type for type)."""

    def __init__(self, world: World, base_url: str) -> None:
        self.world = world
        self.base = (world.external_url or base_url).rstrip("/")

    # users ----------------------------------------------------------------------------------------

    def user_basic(self, user: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if user is None else self.world.basic_user(user, self.base)

    def user_extended(self, user: dict[str, Any] | None) -> dict[str, Any] | None:
        """The fuller user object embedded in jobs and bridges."""
        if user is None:
            return None
        basic = self.world.basic_user(user, self.base)
        record = self.world.users.get(basic["id"], {})
        created = record.get("created_at") or datetime(2022, 8, 19, 18, 56, 54, 757000, tzinfo=timezone.utc)
        return {
            **basic,
            "created_at": _ts(created),
            "bio": "",
            "location": "",
            "linkedin": "",
            "twitter": "",
            "discord": "",
            "website_url": "",
            "github": "",
            "job_title": "",
            "pronouns": "",
            "organization": "",
            "bot": False,
            "work_information": None,
            "followers": 0,
            "following": 0,
            "local_time": self.world.now().strftime("%I:%M %p").lstrip("0"),
        }

    def current_user(self) -> dict[str, Any]:
        record = self.world.users[self.world.current_user["id"]]
        extended = self.user_extended(record) or {}
        for key in ("followers", "following"):
            extended.pop(key, None)
        now = self.world.now()
        return {
            **extended,
            "last_sign_in_at": _ts(now - timedelta(days=1)),
            "confirmed_at": _ts(record["created_at"]),
            "last_activity_on": now.date().isoformat(),
            "email": record["email"],
            "theme_id": 3,
            "color_scheme_id": 1,
            "projects_limit": 100000,
            "current_sign_in_at": _ts(now - timedelta(hours=2)),
            "identities": [],
            "can_create_group": True,
            "can_create_project": True,
            "two_factor_enabled": False,
            "external": False,
            "private_profile": False,
            "commit_email": record["email"],
            "preferred_language": "en",
            "shared_runners_minutes_limit": None,
            "extra_shared_runners_minutes_limit": None,
            "scim_identities": [],
        }

    # groups and projects --------------------------------------------------------------------------

    def namespace(self, project: Project) -> dict[str, Any]:
        if project.namespace_kind == "group" and project.group_id is not None:
            group = self.world.groups[project.group_id]
            return {
                "id": group.id, "name": group.name, "path": group.path, "kind": "group",
                "full_path": group.full_path, "parent_id": group.parent_id, "avatar_url": None,
                "web_url": f"{self.base}/groups/{group.full_path}",
            }
        owner = self.world.users[1]
        return {
            "id": project.namespace_id, "name": owner["name"], "path": owner["username"], "kind": "user",
            "full_path": owner["username"], "parent_id": None, "avatar_url": owner["avatar_url"],
            "web_url": f"{self.base}/{owner['username']}",
        }

    def project_simple(self, project: Project) -> dict[str, Any]:
        web = f"{self.base}/{project.path_with_namespace}"
        host = urlsplit(self.base).hostname or "gitlab.example.com"
        return {
            "id": project.id,
            "description": project.description or None,
            "name": project.name,
            "name_with_namespace": project.name_with_namespace,
            "path": project.path,
            "path_with_namespace": project.path_with_namespace,
            "created_at": _ts(project.created_at),
            "default_branch": project.default_branch,
            "tag_list": [],
            "topics": [],
            "ssh_url_to_repo": f"git@{host}:{project.path_with_namespace}.git",
            "http_url_to_repo": f"{web}.git",
            "web_url": web,
            "readme_url": f"{web}/-/blob/{project.default_branch}/README.md",
            "forks_count": 0,
            "avatar_url": None,
            "star_count": 0,
            "last_activity_at": _ts(project.last_activity_at),
            "visibility": project.visibility,
            "namespace": self.namespace(project),
        }

    def project(self, project: Project, *, single: bool = False) -> dict[str, Any]:
        """The full project entity (``single`` adds ``permissions``, as only GET /projects/:id has)."""
        api = f"{self.base}/api/v4/projects/{project.id}"
        host = urlsplit(self.base).hostname or "gitlab.example.com"
        data = self.project_simple(project)
        data.update({
            "container_registry_image_prefix": f"registry.{host}/{project.path_with_namespace.lower()}",
            "_links": {
                "self": api, "issues": f"{api}/issues", "merge_requests": f"{api}/merge_requests",
                "repo_branches": f"{api}/repository/branches", "labels": f"{api}/labels",
                "events": f"{api}/events", "members": f"{api}/members", "cluster_agents": f"{api}/cluster_agents",
            },
            "marked_for_deletion_at": None,
            "marked_for_deletion_on": None,
            "packages_enabled": True,
            "empty_repo": False,
            "archived": project.archived,
            "resolve_outdated_diff_discussions": False,
            "repository_object_format": "sha1",
            "issues_enabled": True,
            "merge_requests_enabled": True,
            "wiki_enabled": True,
            "jobs_enabled": True,
            "snippets_enabled": True,
            "container_registry_enabled": True,
            "service_desk_enabled": False,
            "can_create_merge_request_in": True,
            "issues_access_level": "enabled",
            "repository_access_level": "enabled",
            "merge_requests_access_level": "enabled",
            "forking_access_level": "enabled",
            "wiki_access_level": "enabled",
            "builds_access_level": "enabled",
            "snippets_access_level": "enabled",
            "pages_access_level": "private",
            "analytics_access_level": "enabled",
            "container_registry_access_level": "enabled",
            "security_and_compliance_access_level": "private",
            "releases_access_level": "enabled",
            "environments_access_level": "enabled",
            "emails_disabled": False,
            "emails_enabled": True,
            "shared_runners_enabled": True,
            "lfs_enabled": True,
            "creator_id": 1,
            "import_status": "none",
            "open_issues_count": 0,
            "updated_at": _ts(project.last_activity_at),
            "ci_config_path": None,
            "public_jobs": True,
            "shared_with_groups": [
                {
                    "group_id": gid,
                    "group_name": self.world.groups[gid].name,
                    "group_full_path": self.world.groups[gid].full_path,
                    "group_access_level": 30,
                    "expires_at": None,
                }
                for gid in project.shared_with_group_ids
            ],
            "only_allow_merge_if_pipeline_succeeds": False,
            "allow_merge_on_skipped_pipeline": None,
            "request_access_enabled": True,
            "only_allow_merge_if_all_discussions_are_resolved": False,
            "remove_source_branch_after_merge": True,
            "merge_method": "merge",
            "squash_option": "default_off",
            "ci_default_git_depth": 20,
            "ci_job_token_scope_enabled": False,
            "build_timeout": 3600,
            "auto_cancel_pending_pipelines": "enabled",
            "max_artifacts_size": None,
        })
        if single:
            data["permissions"] = {
                "project_access": {"access_level": 40, "notification_level": 3} if project.member else None,
                "group_access": None,
            }
        return data

    def group(self, group: Group) -> dict[str, Any]:
        return {
            "id": group.id,
            "web_url": f"{self.base}/groups/{group.full_path}",
            "name": group.name,
            "path": group.path,
            "description": group.description,
            "visibility": group.visibility,
            "share_with_group_lock": False,
            "require_two_factor_authentication": False,
            "two_factor_grace_period": 48,
            "project_creation_level": "developer",
            "auto_devops_enabled": None,
            "subgroup_creation_level": "maintainer",
            "emails_disabled": False,
            "emails_enabled": True,
            "mentions_disabled": None,
            "lfs_enabled": True,
            "default_branch": None,
            "default_branch_protection": 2,
            "avatar_url": None,
            "request_access_enabled": True,
            "full_name": group.full_name,
            "full_path": group.full_path,
            "created_at": _ts(group.created_at),
            "parent_id": group.parent_id,
            "organization_id": 1,
            "shared_runners_setting": "enabled",
            "ldap_cn": None,
            "ldap_access": None,
            "wiki_access_level": "enabled",
            "archived": False,
            "marked_for_deletion_on": None,
        }

    # pipelines ------------------------------------------------------------------------------------

    def _project_of(self, project_id: int) -> Project:
        return self.world.projects[project_id]

    def pipeline_basic(self, pipeline: Pipeline) -> dict[str, Any]:
        """Entities::Ci::PipelineBasic: the object inside jobs and bridges (no ``name``)."""
        project = self._project_of(pipeline.project_id)
        return {
            "id": pipeline.id,
            "iid": pipeline.iid,
            "project_id": pipeline.project_id,
            "sha": pipeline.sha,
            "ref": pipeline.ref,
            "status": pipeline.status,
            "source": pipeline.source,
            "created_at": _ts(pipeline.created_at),
            "updated_at": _ts(pipeline.updated_at),
            "web_url": f"{self.base}/{project.path_with_namespace}/-/pipelines/{pipeline.id}",
        }

    def pipeline_list_item(self, pipeline: Pipeline) -> dict[str, Any]:
        """A row of GET /pipelines: NO finished_at, duration, started_at or user."""
        return {**self.pipeline_basic(pipeline), "name": pipeline.name}

    def pipeline_single(self, pipeline: Pipeline) -> dict[str, Any]:
        """GET /pipelines/:id (Entities::Ci::PipelineWithMetadata)."""
        project = self._project_of(pipeline.project_id)
        icon, text, label, group = self._detailed(pipeline)
        favicon_hash = hashlib.sha256(group.encode()).hexdigest()
        data = self.pipeline_basic(pipeline)
        data.update({
            "before_sha": pipeline.before_sha,
            "tag": pipeline.tag,
            "yaml_errors": pipeline.yaml_errors,
            "user": self.user_basic(pipeline.user),
            "started_at": _ts(pipeline.started_at),
            "finished_at": _ts(pipeline.finished_at),
            "committed_at": None,
            "duration": pipeline.duration,
            "queued_duration": pipeline.queued_duration,
            "coverage": pipeline.coverage,
            "detailed_status": {
                "icon": icon,
                "text": text,
                "label": label,
                "group": group,
                "tooltip": label,
                "has_details": False,
                "details_path": f"/{project.path_with_namespace}/-/pipelines/{pipeline.id}",
                "illustration": None,
                "favicon": f"/assets/ci_favicons/favicon_{icon}-{favicon_hash}.png",
            },
            "archived": False,
            "name": pipeline.name,
        })
        return data

    def _detailed(self, pipeline: Pipeline) -> tuple[str, str, str, str]:
        if pipeline.status == "success":
            # "passed with warnings": an allowed-to-fail job failed.
            if any(
                j.status == "failed" and j.allow_failure and not j.retried
                for j in (self.world.jobs[i] for i in pipeline.job_ids)
            ):
                return _WARNING_STATUS
        return _DETAILED_STATUS.get(pipeline.status, _DETAILED_STATUS["created"])

    # jobs -----------------------------------------------------------------------------------------

    def commit_short(self, project: Project, sha: str) -> dict[str, Any]:
        commit = self.world.commits.get((project.id, sha))
        if commit is None:  # a sha given without a commit record: still answer like GitLab would
            commit = Commit(sha, project.id, "Unknown commit", "Unknown commit\n", "unknown", "unknown@example.com",
                            datetime(2026, 1, 1, tzinfo=timezone.utc), "unknown", "unknown@example.com",
                            datetime(2026, 1, 1, tzinfo=timezone.utc), [])
        return {
            "id": commit.sha,
            "short_id": commit.sha[:8],
            "created_at": _git_ts(commit.committed_date),
            "parent_ids": list(commit.parent_ids),
            "title": commit.title,
            "message": commit.message,
            "author_name": commit.author_name,
            "author_email": commit.author_email,
            "authored_date": _git_ts(commit.authored_date),
            "committer_name": commit.committer_name,
            "committer_email": commit.committer_email,
            "committed_date": _git_ts(commit.committed_date),
            "trailers": {},
            "extended_trailers": {},
            "web_url": f"{self.base}/{project.path_with_namespace}/-/commit/{commit.sha}",
        }

    def commit_detail(self, project: Project, commit: Commit) -> dict[str, Any]:
        data = self.commit_short(project, commit.sha)
        last = max(
            (p for p in self.world.project_pipelines(project.id) if p.sha == commit.sha),
            key=lambda p: p.id,
            default=None,
        )
        data.update({
            "stats": {"additions": 12, "deletions": 3, "total": 15},
            "status": last.status if last else None,
            "project_id": project.id,
            "last_pipeline": self.pipeline_basic(last) if last else None,
        })
        return data

    def _processable(self, item: Job | Bridge, pipeline: Pipeline) -> dict[str, Any]:
        """The keys jobs and bridges share, in GitLab's order, up to ``pipeline``."""
        project = self._project_of(pipeline.project_id)
        now = self.world.now()
        return {
            "id": item.id,
            "status": item.status,
            "stage": item.stage,
            "name": item.name,
            "ref": pipeline.ref,
            "tag": pipeline.tag,
            "coverage": item.coverage if isinstance(item, Job) else None,
            "allow_failure": item.allow_failure,
            "created_at": _ts(item.created_at),
            "started_at": _ts(item.started_at),
            "finished_at": _ts(item.finished_at),
            "erased_at": _ts(item.erased_at) if isinstance(item, Job) else None,
            "duration": item.duration(now),
            "queued_duration": item.queued_duration,
            "user": self.user_extended(pipeline.user),
            "commit": self.commit_short(project, pipeline.sha),
            "pipeline": self.pipeline_basic(pipeline),
        }

    def job(self, job: Job) -> dict[str, Any]:
        """Entities::Ci::Job, as in GET .../pipelines/:id/jobs and GET .../jobs/:id."""
        pipeline = self.world.pipelines[job.pipeline_id]
        project = self._project_of(pipeline.project_id)
        data = self._processable(job, pipeline)
        if job.status == "failed":
            # Absent, not null, on jobs that did not fail.
            data["failure_reason"] = job.failure_reason or "script_failure"
        size = log_size(job.log) if job.ran and not job.erased else 0
        # The archived log shows as a "trace" artifact once the job finished (a running job's log is
        # still live, not archived).
        has_trace = size > 0 and job.finished_at is not None
        data.update({
            "web_url": f"{self.base}/{project.path_with_namespace}/-/jobs/{job.id}",
            "project": {"ci_job_token_scope_enabled": False},
            "artifacts": (
                [{"file_type": "trace", "size": size, "filename": "job.log", "file_format": None}]
                if has_trace else []
            ),
            "runner": self._runner(job) if job.ran else None,
            "runner_manager": self._runner_manager(job) if job.ran else None,
            "artifacts_expire_at": None,
            "archived": False,
            "tag_list": [],
        })
        return data

    def bridge(self, bridge: Bridge) -> dict[str, Any]:
        """Entities::Ci::Bridge with ``downstream_pipeline`` (null, or the downstream's basic object)."""
        pipeline = self.world.pipelines[bridge.pipeline_id]
        project = self._project_of(pipeline.project_id)
        data = self._processable(bridge, pipeline)
        if bridge.status == "failed":
            data["failure_reason"] = bridge.failure_reason or "unknown_failure"
        downstream = (
            self.world.live_pipeline(bridge.downstream_pipeline_id)
            if bridge.downstream_pipeline_id is not None else None
        )
        data.update({
            "web_url": f"{self.base}/{project.path_with_namespace}/-/jobs/{bridge.id}",
            "project": {"ci_job_token_scope_enabled": False},
            "downstream_pipeline": self.pipeline_basic(downstream) if downstream else None,
        })
        return data

    def _runner(self, job: Job) -> dict[str, Any]:
        index = job.runner_index
        return {
            "id": 54907241 + index,
            "description": f"blue-{index}.saas-linux-small-amd64.runners-manager.gitlab.com/default ",
            "ip_address": None,
            "active": True,
            "paused": False,
            "is_shared": True,
            "runner_type": "instance_type",
            "name": None,
            "online": True,
            "created_by": {**_RUNNER_ADMIN, "web_url": f"{self.base}/{_RUNNER_ADMIN['username']}"},
            "created_at": "2026-08-06T11:12:30.404Z",
            "status": "online",
            "job_execution_status": "active",
        }

    def _runner_manager(self, job: Job) -> dict[str, Any]:
        index = job.runner_index
        contacted = job.finished_at or job.started_at or self.world.now()
        return {
            "id": 159294362 + index,
            "system_id": f"r_{hashlib.sha1(str(index).encode()).hexdigest()[:12]}",
            "version": "19.5.0~pre.2159.ga8432a3e",
            "revision": "a8432a3e",
            "platform": "linux",
            "architecture": "amd64",
            "created_at": "2026-09-29T08:09:44.249Z",
            "contacted_at": _ts(contacted),
            "ip_address": f"10.223.152.{29 + index}",
            "status": "online",
            "job_execution_status": "active",
        }


# -- the HTTP side ----------------------------------------------------------------------------------


def _route(path: str) -> tuple[str, list[str]]:
    """(endpoint name, path arguments) for a raw request path; ``"unknown"`` when no route matches.

    Splitting happens before percent-decoding: a project path is ONE segment (``group%2Fsub%2Fproj``),
    exactly as GitLab's routes require.
    """
    if path.rstrip("/") == "/api/graphql":
        return "graphql", []
    if not path.startswith("/api/v4/"):
        return "unknown", []
    parts = [unquote(p) for p in path[len("/api/v4/"):].split("/")]
    if parts and parts[-1] == "":
        parts.pop()
    n = len(parts)
    if n == 1 and parts[0] in ("version", "user", "projects"):
        return parts[0], []
    if parts == ["personal_access_tokens", "self"]:
        return "token_self", []
    if n >= 2 and parts[0] == "projects":
        pid, rest = parts[1], parts[2:]
        if not rest:
            return "project", [pid]
        if rest[0] == "pipelines":
            if len(rest) == 1:
                return "pipelines", [pid]
            if len(rest) == 2:
                return "pipeline", [pid, rest[1]]
            if len(rest) == 3 and rest[2] == "jobs":
                return "pipeline_jobs", [pid, rest[1]]
            if len(rest) == 3 and rest[2] == "bridges":
                return "pipeline_bridges", [pid, rest[1]]
        if rest[0] == "jobs" and len(rest) == 2:
            return "job", [pid, rest[1]]
        if rest[0] == "jobs" and len(rest) == 3 and rest[2] == "trace":
            return "trace", [pid, rest[1]]
        if rest[:2] == ["repository", "commits"] and len(rest) == 3:
            return "commit", [pid, rest[2]]
    if n >= 2 and parts[0] == "groups":
        if n == 2:
            return "group", [parts[1]]
        if n == 3 and parts[2] == "projects":
            return "group_projects", [parts[1]]
    return "unknown", []


class _Handler(LoopbackHandler):
    """One connection; requests are answered per :class:`GitLabSimulator`'s rules."""

    # HTTP/1.1 keep-alive (as python-gitlab's session expects) and Nagle off come from LoopbackHandler.
    server: LoopbackServer[GitLabSimulator]
    server_version = "nginx"
    timeout = 120  # an idle keep-alive connection is closed after this many seconds

    def version_string(self) -> str:
        return self.server_version

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header from the world's clock, so tests that step time see GitLab's "now" move with it
        (a poller caps its cursor at this header: it is the only clock of GitLab's a client can read)."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        return email.utils.format_datetime(self.server.owner.world.now(), usegmt=True)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class signature
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_POST(self) -> None:
        if self.command == "POST" and _route(urlsplit(self.path).path)[0] == "graphql":
            self._serve(head=False)
        else:
            self._other_method()

    do_PUT = do_PATCH = do_DELETE = do_POST

    # -- plumbing ---------------------------------------------------------------------------------

    def _serve(self, head: bool) -> None:
        self._started = time.monotonic()
        self._head = head
        self._headers_sent = False
        try:
            self.server.owner._answer(self)
        except _DISCONNECTS:
            self.close_connection = True
        except Exception:
            logger.exception("GitLab simulator: error answering %s", self.path)
            self.close_connection = True
            if not self._headers_sent:
                try:
                    self.send_json(500, {"message": "500 Internal Server Error"})
                except OSError:
                    pass

    def _other_method(self) -> None:
        # The simulator is read-only. Drain the body so the connection stays usable.
        length = int(self.headers.get("Content-Length") or 0)
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                break
            length -= len(chunk)
        self._started = time.monotonic()
        self._head = False
        self._headers_sent = False
        endpoint, _ = _route(urlsplit(self.path).path)
        self.server.owner._count(endpoint)
        if endpoint == "unknown":
            self.send_json(404, {"error": "404 Not Found"})
        elif endpoint == "graphql":  # Rails routes only GET and POST to GraphqlController#execute
            self.send_body(404, _NOT_FOUND_PAGE, {"Content-Type": "text/html; charset=utf-8"})
        else:
            self.send_json(405, {"error": "405 Not Allowed"}, {"Allow": "GET, HEAD"})

    def _common_headers(self) -> dict[str, str]:
        request_id = uuid.uuid4().hex[:26].upper()
        return {
            "Cache-Control": "max-age=0, private, must-revalidate",
            "Vary": "Origin",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "SAMEORIGIN",
            "X-Request-Id": request_id,
            "X-Gitlab-Meta": json.dumps({"correlation_id": request_id, "version": "1"}, separators=(",", ":")),
            "X-Runtime": f"{time.monotonic() - self._started:.6f}",
        }

    def send_head_only(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status, _REASONS.get(status))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self._headers_sent = True

    def send_body(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        """A complete answer with Content-Length (keep-alive friendly)."""
        headers = {**headers, "Content-Length": str(len(body))}
        self.send_head_only(status, headers)
        if not self._head and body:
            self.wfile.write(body)
            self.server.owner._add_bytes(len(body))

    def send_json(self, status: int, payload: Any, extra: dict[str, str] | None = None) -> None:
        body = _dumps(payload)
        headers = self._common_headers()
        headers["Content-Type"] = "application/json"
        headers["Etag"] = f'W/"{hashlib.md5(body).hexdigest()}"'
        headers.update(extra or {})
        self.send_body(status, body, headers)


class GitLabSimulator(LoopbackService):
    """GitLab's REST API over HTTP on loopback, answering from a :class:`World`.

    Use as a context manager (or :meth:`start` / :meth:`stop`). ``url`` is the base, e.g.
    ``http://127.0.0.1:PORT`` (the API is under ``/api/v4``), what you give python-gitlab. Requests are
    answered in this order: counted, delayed by ``faults.latency``, an :meth:`inject`-ed answer if one
    matches, 429 if over ``faults.rate_limit``, a random error page per ``faults.error_rate``, 401 on a
    bad token, then the API itself.
    """

    _handler = _Handler
    _label = "GitLab simulator"
    _thread_name = "gitlab-sim"
    # Clients hanging up (timeouts, resets, our own dropped traces) are normal: so is any socket error.
    _quiet_errors = (OSError,)
    _logger = logger

    COUNT_LIMIT = 10_000
    """Above this many rows GitLab stops counting: no X-Total, X-Total-Pages or rel="last"."""

    MAX_PER_PAGE = 100

    def __init__(self, world: World, host: str = "127.0.0.1", port: int = 0, faults: Faults | None = None,
                 tls: ssl.SSLContext | None = None, graphql_faults: GraphQLFaults | None = None) -> None:
        super().__init__(host, port, tls)
        self.world = world
        self.faults = faults or Faults()
        self.counters: collections.Counter[str] = collections.Counter()
        # Faults actually served, by kind: "injected", "rate_limited", "error_page", "unauthorized",
        # "dropped_trace", "trickled_trace", "graphql_disabled", "graphql_timeout", "graphql_alias_error".
        # Lets a test check that the failure it set up really happened.
        self.faults_served: collections.Counter[str] = collections.Counter()
        self.bytes_sent = 0
        # Base of pagination Link URLs when it must differ from ``url`` (GitLab behind a proxy that
        # rewrites hosts: python-gitlab's keep_base_url case). None: the simulator's own url.
        self.link_base_url: str | None = None
        self._stats_lock = threading.Lock()
        self._injections: list[_Injection] = []
        self._rate_window_start = 0.0
        self._rate_count = 0
        self._dropped_jobs: set[int] = set()
        self._request_hooks: list[RequestHook] = []
        self._stopping = threading.Event()  # ends trickling traces (and held GraphQL answers) on stop
        # POST /api/graphql: ``graphql.limits`` and ``graphql.faults`` are the knobs (see .graphql).
        self.graphql = GraphQLService(world, self._stopping, faults=graphql_faults)
        self._graphql_missing_logged = False

    # -- test controls ----------------------------------------------------------------------------

    def inject(
        self,
        endpoint: str | None,
        status: int,
        count: int = 1,
        headers: dict[str, str] | None = None,
        body: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests to ``endpoint`` (None: any) with ``status``.

        ``headers=None`` sends the status's usual headers (for 429: Retry-After 1 and RateLimit-*);
        a dict, even empty, sends exactly those (``{}`` makes a bare 429). ``body=None`` sends the
        usual body for the status (GitLab's JSON message, "Retry later", or a CDN error page).
        """
        if endpoint is not None and endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {ENDPOINTS}")
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._stats_lock:
            self._injections.append(_Injection(endpoint, status, count, headers, body))

    def on_request(self, callback: RequestHook) -> RequestHook:
        """Call ``callback(endpoint, args, params)`` for every request, before the answer is computed
        (before faults, authentication and the world are consulted) and outside ``world.lock``, on the
        request's own thread: a test can change the world between two requests of a client, e.g. delete
        a pipeline while page 2 is fetched, or retry one between the pipeline GET and the jobs GET.

        ``endpoint`` is one of :data:`ENDPOINTS` (or ``"unknown"``), ``args`` the path arguments
        (project, then pipeline or job id, as sent), ``params`` the query parameters (last value of a
        repeated one); for ``"graphql"`` also ``query``, ``variables`` (as JSON) and ``operationName``.
        An exception in the callback answers the request with a 500. Returns
        ``callback``, for :meth:`remove_request_hook`.
        """
        with self._stats_lock:
            self._request_hooks.append(callback)
        return callback

    def remove_request_hook(self, callback: RequestHook) -> None:
        """Stop calling a callback given to :meth:`on_request` (no error if it is not registered)."""
        with self._stats_lock:
            if callback in self._request_hooks:
                self._request_hooks.remove(callback)

    def _on_stop(self) -> None:
        self._stopping.set()

    def _on_start(self) -> None:
        self._stopping.clear()

    def reset_counters(self) -> None:
        """Zero :attr:`counters`, :attr:`faults_served` and :attr:`bytes_sent`."""
        with self._stats_lock:
            self.counters.clear()
            self.faults_served.clear()
            self.bytes_sent = 0

    def reset_rate_window(self) -> None:
        """Start a new rate-limit window now (as if a minute had passed): for runs that must not share a budget."""
        with self._stats_lock:
            self._rate_window_start = None
            self._rate_count = 0

    # -- bookkeeping ------------------------------------------------------------------------------

    def _count(self, endpoint: str) -> None:
        with self._stats_lock:
            self.counters[endpoint] += 1

    def _note_fault(self, kind: str, endpoint: str, detail: object) -> None:
        with self._stats_lock:
            self.faults_served[kind] += 1
        logger.debug("GitLab simulator: %s on %s (%s)", kind, endpoint, detail)

    def _add_bytes(self, n: int) -> None:
        with self._stats_lock:
            self.bytes_sent += n

    def _take_injection(self, endpoint: str) -> _Injection | None:
        with self._stats_lock:
            for rule in self._injections:
                if rule.endpoint is None or rule.endpoint == endpoint:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self._injections.remove(rule)
                    return rule
        return None

    def _rate_tick(self, now: float) -> _RateState:
        """Count this request in the current fixed window (windows aligned to the epoch, like
        Rack::Attack's). Throttled requests count too."""
        window = max(self.faults.rate_limit_window, 0.001)
        limit = self.faults.rate_limit
        start = math.floor(now / window) * window
        with self._stats_lock:
            if start != self._rate_window_start:
                self._rate_window_start = start
                self._rate_count = 0
            self._rate_count += 1
            observed = self._rate_count
        shown = limit if limit is not None else _DISPLAY_RATE_LIMIT
        return _RateState(shown, observed, start + window, limit is not None and observed > limit)

    def _should_drop(self, job_id: int, size: int) -> int | None:
        """Bytes to send before hanging up on this trace, or None to send it whole."""
        after = self.faults.drop_trace_after
        if after is None or after >= size:
            return None
        with self._stats_lock:
            if not self.faults.drop_trace_always and job_id in self._dropped_jobs:
                return None
            self._dropped_jobs.add(job_id)
        return max(0, after)

    # -- answering --------------------------------------------------------------------------------

    def _answer(self, handler: _Handler) -> None:
        split = urlsplit(handler.path)
        endpoint, args = _route(split.path)
        self._count(endpoint)
        params = _Params(parse_qsl(split.query, keep_blank_values=True))
        graphql_request: GraphQLRequest | None = None
        hook_params = {k: v for k, v in params.pairs}
        if endpoint == "graphql":
            graphql_request = self._read_graphql(handler, params)
            if graphql_request is None:
                return
            hook_params.update(graphql_request.hook_params())
        with self._stats_lock:
            hooks = list(self._request_hooks)
        for hook in hooks:
            hook(endpoint, list(args), hook_params)
        rate_headers = self._edge(handler, endpoint)
        if rate_headers is None:
            return
        if graphql_request is not None:
            self._answer_graphql(handler, graphql_request, params, rate_headers)
            return
        if endpoint == "unknown":
            # Grape's catch-all route answers before any authentication.
            handler.send_json(404, {"error": "404 Not Found"}, rate_headers)
            return
        if not self._authorized(handler, params):
            self._note_fault("unauthorized", endpoint, "bad or missing token")
            handler.send_json(401, {"message": "401 Unauthorized"}, rate_headers)
            return
        try:
            if endpoint == "trace":
                self._serve_trace(handler, args, rate_headers)
                return
            payload, extra = self._api(endpoint, args, params, split.path, split.query)
        except _ApiError as exc:
            handler.send_json(exc.status, exc.body, rate_headers)
            return
        handler.send_json(200, payload, {**rate_headers, **extra})

    def _edge(self, handler: _Handler, endpoint: str) -> dict[str, str] | None:
        """What happens before GitLab's application sees a request (REST and GraphQL alike): the latency,
        one count in the shared rate-limit window, an injected answer, Rack::Attack's 429, a CDN error page.
        Returns the RateLimit-* headers for the answer, or None when the request was answered here."""
        if self.faults.latency > 0:
            time.sleep(self.faults.latency)
        now = time.time()
        rate = self._rate_tick(now)
        injection = self._take_injection(endpoint)
        if injection is not None:
            self._note_fault("injected", endpoint, injection.status)
            self._send_injected(handler, injection, rate, now)
            return None
        if rate.throttled:
            self._note_fault("rate_limited", endpoint, f"{rate.observed} > {rate.limit}")
            self._send_429(handler, rate, now, bare=self.faults.bare_429)
            return None
        error = self.faults.pick_error()
        if error is not None:
            self._note_fault("error_page", endpoint, error)
            handler.send_body(error, _error_page(error), {"Content-Type": "text/html"})
            return None
        return rate.headers(now)

    def _token(self, handler: _Handler, params: _Params) -> str | None:
        """The token a request carries: PRIVATE-TOKEN, ``Authorization: Bearer``, or ``private_token``."""
        token = handler.headers.get("PRIVATE-TOKEN")
        if token is None:
            auth = handler.headers.get("Authorization", "")
            if auth[:7].lower() == "bearer ":
                token = auth[7:].strip()
        if token is None:
            token = params.get("private_token")  # GitLab also accepts the token as a parameter
        return token

    def _authorized(self, handler: _Handler, params: _Params) -> bool:
        token = self._token(handler, params)
        return token is not None and token == self.world.token

    # -- GraphQL ----------------------------------------------------------------------------------

    def _read_graphql(self, handler: _Handler, params: _Params) -> GraphQLRequest | None:
        """The GraphQL request of a POST body (or a GET's query string); None when it was answered
        (a body too big or without a length, or not readable as a request)."""
        body = b""
        if handler.command == "POST":
            raw_length = handler.headers.get("Content-Length")
            if raw_length is None or not raw_length.strip().isdigit():
                handler.close_connection = True
                handler.send_json(411, {"errors": [{"message": "Length Required"}]})
                return None
            length = int(raw_length)
            if length > _MAX_GRAPHQL_BODY:
                _drain(handler, length)  # read and dropped in chunks: memory stays bounded
                handler.send_json(413, {"errors": [{"message": "Request Entity Too Large"}]})
                return None
            body = handler.rfile.read(length)
        try:
            return read_request(body, handler.headers.get("Content-Type", ""), params.pairs)
        except GraphQLBadRequest as bad:
            handler.send_json(bad.answer.status, bad.answer.payload)
            return None

    def _answer_graphql(
        self, handler: _Handler, request: GraphQLRequest, params: _Params, rate_headers: dict[str, str]
    ) -> None:
        """GraphqlController#execute (app/controllers/graphql_controller.rb): no route when GraphQL is off
        (Rails' 404 page), a present but unknown token is a 401 ``Invalid token``, no token at all is an
        anonymous request; then the query itself (:meth:`GraphQLService.answer`)."""
        if self.graphql.faults.disabled or not self._graphql_ready():
            self._note_fault("graphql_disabled", "graphql", "no /api/graphql route")
            headers = {**rate_headers, "Content-Type": "text/html; charset=utf-8"}
            handler.send_body(404, _NOT_FOUND_PAGE, headers)
            return
        token = self._token(handler, params)
        if token is not None and token != self.world.token:
            self._note_fault("unauthorized", "graphql", "bad token")
            handler.send_json(401, {"errors": [{"message": "Invalid token"}]}, rate_headers)
            return
        base = (self.world.external_url or self.url).rstrip("/")
        answer = self.graphql.answer(request, anonymous=token is None, base_url=base)
        if answer.fault is not None:
            self._note_fault(answer.fault.split(" ", 1)[0], "graphql", answer.fault)
        handler.send_json(answer.status, answer.payload, rate_headers)

    def _graphql_ready(self) -> bool:
        """Whether graphql-core is installed; without it /api/graphql is absent (said once in the log)."""
        try:
            self.graphql.schema()
        except GraphQLUnavailable as exc:
            if not self._graphql_missing_logged:
                self._graphql_missing_logged = True
                logger.warning("GitLab simulator: /api/graphql answers 404: %s", exc)
            return False
        return True

    def _send_429(self, handler: _Handler, rate: _RateState, now: float, *, bare: bool) -> None:
        headers = {"Content-Type": "text/plain"}
        if not bare:
            headers.update(rate.throttled_headers(now))
        handler.send_body(429, b"Retry later\n", headers)

    def _send_injected(self, handler: _Handler, rule: _Injection, rate: _RateState, now: float) -> None:
        status = rule.status
        if rule.body is not None:
            body = rule.body.encode("utf-8")
            stripped = rule.body.lstrip()
            if stripped.startswith(("{", "[")):
                content_type = "application/json"
            elif stripped.startswith("<"):
                content_type = "text/html"
            else:
                content_type = "text/plain"
        elif status == 429:
            body, content_type = b"Retry later\n", "text/plain"
        elif status >= 500:
            body, content_type = _error_page(status), "text/html"
        else:
            message = {401: "401 Unauthorized", 403: "403 Forbidden", 404: "404 Not Found"}.get(status)
            body = _dumps({"message": message} if message else {"error": f"{status} {_REASONS.get(status, 'Error')}"})
            content_type = "application/json"
        if rule.headers is not None:
            headers = dict(rule.headers)
        elif status == 429:
            headers = rate.throttled_headers(now)
            headers["Retry-After"] = "1"
        else:
            headers = {}
        headers.setdefault("Content-Type", content_type)
        handler.send_body(status, body, headers)

    # -- the API ----------------------------------------------------------------------------------

    def _api(self, endpoint: str, args: list[str], params: _Params, path: str, query: str) -> tuple[Any, dict[str, str]]:
        """JSON payload and extra headers for a JSON endpoint; raises _ApiError for error answers."""
        world = self.world
        with world.lock:
            render = _Renderer(world, self.url)
            if endpoint == "version":
                return {
                    "version": world.gitlab_version,
                    "revision": "a8432a3e1f2",
                    "kas": {"enabled": True, "externalUrl": "wss://kas.gitlab.example.com",
                            "externalK8sProxyUrl": "https://kas.gitlab.example.com/k8s-proxy", "version": "19.5.0"},
                    "enterprise": True,
                }, {}
            if endpoint == "user":
                return render.current_user(), {}
            if endpoint == "token_self":
                return self._token_self(), {}
            if endpoint == "projects":
                return self._list_projects(render, params, path, {})
            if endpoint == "group":
                group = self._group(args[0])
                data = render.group(group)
                data["shared_with_groups"] = []
                data["prevent_sharing_groups_outside_hierarchy"] = False
                # Deprecated but still sent by default: the group's own projects (not subgroups').
                if params.boolean("with_projects", True):
                    data["projects"] = [render.project(p) for p in world.readable_projects()
                                        if p.group_id == group.id][:100]
                    data["shared_projects"] = [render.project(p) for p in world.readable_projects()
                                               if group.id in p.shared_with_group_ids][:100]
                return data, {}
            if endpoint == "group_projects":
                return self._list_group_projects(render, self._group(args[0]), params, path, {"id": args[0]})
            project = self._project(args[0])
            if endpoint == "project":
                return render.project(project, single=True), {}
            if endpoint == "pipelines":
                return self._list_pipelines(render, project, params, path, {"id": args[0]})
            if endpoint == "pipeline":
                return render.pipeline_single(self._pipeline(project, args[1])), {}
            if endpoint == "pipeline_jobs":
                pipeline = self._pipeline(project, args[1])
                include_retried = params.boolean("include_retried", False)
                jobs = world.pipeline_jobs(pipeline.id, include_retried=bool(include_retried))
                jobs = _filter_scope(jobs, params)
                if project.jobs_hidden or pipeline.jobs_hidden:
                    # Ci::JobsFinder#pipeline_jobs raises AccessDeniedError unless
                    # can?(current_user, :read_build, pipeline); #execute rescues it as type.none:
                    # 200 with an empty list (app/finders/ci/jobs_finder.rb), the pipeline still visible.
                    jobs = []
                page, headers = self._paginate(jobs, params, path, _JOBS_DECLARED,
                                               {"id": args[0], "pipeline_id": args[1]})
                return [render.job(j) for j in page], headers
            if endpoint == "pipeline_bridges":
                pipeline = self._pipeline(project, args[1])
                bridges = _filter_scope(world.pipeline_bridges(pipeline.id), params)
                page, headers = self._paginate(bridges, params, path, _BRIDGES_DECLARED,
                                               {"id": args[0], "pipeline_id": args[1]})
                return [render.bridge(b) for b in page], headers
            if endpoint == "job":
                return render.job(self._job(project, args[1])), {}
            if endpoint == "commit":
                return render.commit_detail(project, self._commit(project, args[1])), {}
        raise _not_found()

    def _token_self(self) -> dict[str, Any]:
        """GET /personal_access_tokens/self: the token the request authenticated with (GitLab 15.5+)."""
        info = self.world.token_info
        if info is None:
            raise _not_found()
        now = self.world.now()
        expires = info.get("expires_at")
        return {
            "id": 42,
            "name": info.get("name"),
            "revoked": bool(info.get("revoked")),
            "created_at": _ts(now - timedelta(days=30)),
            "description": "",
            "scopes": list(info.get("scopes") or []),
            "user_id": self.world.current_user["id"],
            "last_used_at": _ts(now),
            "active": bool(info.get("active", True)),
            "expires_at": expires.isoformat() if expires is not None else None,
        }

    # lookups (404s as GitLab words them) ----------------------------------------------------------

    def _project(self, ref: str) -> Project:
        project = self.world.find_project(ref)
        if project is None:
            raise _not_found("Project")
        return project

    def _group(self, ref: str) -> Group:
        group = self.world.find_group(ref)
        if group is None:
            raise _not_found("Group")
        return group

    def _pipeline(self, project: Project, raw_id: str) -> Pipeline:
        if not raw_id.isdigit():
            raise _invalid("pipeline_id")
        pipeline = self.world.live_pipeline(int(raw_id))
        # Pipelines are found through the project: another project's id is "not found".
        if pipeline is None or pipeline.project_id != project.id:
            raise _not_found()
        return pipeline

    def _job(self, project: Project, raw_id: str) -> Job:
        if not raw_id.isdigit():
            raise _invalid("job_id")
        # Bridges are not builds: their ids are "not found" here, as on GitLab.
        job = self.world.live_job(int(raw_id))
        if job is None or job.project_id != project.id:
            raise _not_found()
        return job

    def _commit(self, project: Project, ref: str) -> Commit:
        commit = self.world.commits.get((project.id, ref))
        if commit is None and len(ref) >= 4:
            matches = [c for (pid, sha), c in self.world.commits.items() if pid == project.id and sha.startswith(ref)]
            commit = matches[0] if len(matches) == 1 else None
        if commit is None:
            # A branch name resolves to the newest pipeline's commit on it.
            on_ref = [p for p in self.world.project_pipelines(project.id) if p.ref == ref]
            if on_ref:
                commit = self.world.commits.get((project.id, max(on_ref, key=lambda p: p.id).sha))
        if commit is None:
            raise _not_found("Commit")
        return commit

    # lists ----------------------------------------------------------------------------------------

    def _list_projects(
        self, render: _Renderer, params: _Params, path: str, route: dict[str, str]
    ) -> tuple[Any, dict[str, str]]:
        projects = self.world.readable_projects()
        if params.boolean("membership", False) or params.boolean("owned", False):
            projects = [p for p in projects if p.member]
        if params.boolean("owned", False):
            projects = [p for p in projects if p.namespace_kind == "user"]
        return self._project_page(render, projects, params, path, route)

    def _list_group_projects(
        self, render: _Renderer, group: Group, params: _Params, path: str, route: dict[str, str]
    ) -> tuple[Any, dict[str, str]]:
        ids = set(self.world.subgroup_ids(group.id)) if params.boolean("include_subgroups", False) else {group.id}
        projects = [p for p in self.world.readable_projects() if p.group_id in ids]
        if params.boolean("with_shared", True):
            # Projects shared with this group (not with its subgroups).
            seen = {p.id for p in projects}
            projects += [p for p in self.world.readable_projects()
                         if group.id in p.shared_with_group_ids and p.id not in seen]
        return self._project_page(render, projects, params, path, route)

    def _project_page(
        self, render: _Renderer, projects: list[Project], params: _Params, path: str, route: dict[str, str]
    ) -> tuple[Any, dict[str, str]]:
        archived = params.boolean("archived", None)
        if archived is not None:
            projects = [p for p in projects if p.archived == archived]
        search = params.get("search")
        if search:
            needle = search.lower()
            projects = [p for p in projects if needle in p.name.lower() or needle in p.path_with_namespace.lower()]
        visibility = params.choice("visibility", ("private", "internal", "public"), None)
        if visibility:
            projects = [p for p in projects if p.visibility == visibility]
        order_by = params.choice(
            "order_by",
            ("id", "name", "path", "created_at", "updated_at", "last_activity_at", "similarity", "star_count"),
            "created_at",
        )
        sort = params.choice("sort", ("asc", "desc"), "desc")
        keys = {
            "id": lambda p: p.id,
            "name": lambda p: p.name.lower(),
            "path": lambda p: p.path.lower(),
            "created_at": lambda p: p.created_at,
            "updated_at": lambda p: p.last_activity_at,
            "last_activity_at": lambda p: p.last_activity_at,
            "similarity": lambda p: p.id,
            "star_count": lambda p: 0,
        }
        key = keys[order_by or "created_at"]
        projects.sort(key=lambda p: (key(p), p.id), reverse=(sort == "desc"))
        simple = params.boolean("simple", False)
        page, headers = self._paginate(projects, params, path, _PROJECTS_DECLARED, route)
        return [render.project_simple(p) if simple else render.project(p) for p in page], headers

    def _list_pipelines(
        self, render: _Renderer, project: Project, params: _Params, path: str, route: dict[str, str]
    ) -> tuple[Any, dict[str, str]]:
        """GET /projects/:id/pipelines: Grape's parameter checks, then Ci::PipelinesFinder
        (:meth:`World.find_pipelines`, shared with GraphQL)."""
        scope = params.choice("scope", ("running", "pending", "finished", "branches", "tags"), None)
        status = params.choice("status", AVAILABLE_STATUSES, None)
        source = params.choice("source", PIPELINE_SOURCES, None)
        order_by = params.choice("order_by", ("id", "status", "ref", "updated_at", "user_id"), "id") or "id"
        sort = params.choice("sort", ("asc", "desc"), "desc")
        yaml_errors = params.boolean("yaml_errors", None)
        updated_after = params.moment("updated_after")
        updated_before = params.moment("updated_before")
        created_after = params.moment("created_after")
        created_before = params.moment("created_before")
        items = self.world.find_pipelines(
            project.id, scope=scope, status=status, ref=params.get("ref"), sha=params.get("sha"),
            username=params.get("username"), yaml_errors=yaml_errors, updated_after=updated_after,
            updated_before=updated_before, created_after=created_after, created_before=created_before,
            source=source, name=params.get("name"),
        )

        def sort_key(p: Pipeline) -> tuple[Any, ...]:
            value: Any = {
                "id": p.id,
                "status": p.status,
                "ref": p.ref,
                "updated_at": p.updated_at,
                "user_id": p.user.get("id") if p.user else None,
            }[order_by]
            # PostgreSQL puts NULLs last ascending and first descending: (is_null, value) does that.
            return (value is None, value if value is not None else 0, p.id)

        items.sort(key=sort_key, reverse=(sort == "desc"))
        page, headers = self._paginate(items, params, path, _PIPELINES_DECLARED, route)
        return [render.pipeline_list_item(p) for p in page], headers

    def _paginate(
        self, items: list[Any], params: _Params, path: str, declared: dict[str, tuple[str, Any]], route: dict[str, str]
    ) -> tuple[list[Any], dict[str, str]]:
        """Offset pagination with GitLab's headers; totals and rel="last" left out above COUNT_LIMIT.

        As Gitlab::Pagination::OffsetPagination + OffsetHeaderBuilder (lib/gitlab/pagination/) and
        Kaminari do: ``per_page`` 0 is a 400 (``except_values: [0]`` in lib/api/concerns/
        pagination_params.rb), a negative one falls back to the default (Kaminari's ``per`` ignores it),
        above MAX_PER_PAGE it is capped (Kaminari's max_per_page); a page below 1 is page 1; a page
        past the end is empty with neither X-Next-Page nor X-Prev-Page (Kaminari's ``out_of_range?``).
        The Link URLs are rebuilt from the request's Grape params (see :func:`_link_query`), not echoed.
        """
        if params.get("per_page") not in (None, "") and params.integer("per_page", 20) == 0:
            raise _ApiError(400, {"error": "per_page has a value not allowed"})
        page = params.integer("page", 1)
        per_page = params.integer("per_page", 20)
        page = max(page, 1)
        per_page = min(per_page if per_page >= 1 else 20, self.MAX_PER_PAGE)
        total = len(items)
        start = (page - 1) * per_page
        chunk = items[start : start + per_page]
        counted = total <= self.COUNT_LIMIT
        total_pages = math.ceil(total / per_page)
        out_of_range = (page > total_pages) if counted else not chunk
        has_next = total > start + per_page and not out_of_range
        has_prev = page > 1 and not out_of_range
        base = (self.link_base_url or self.url).rstrip("/")
        grape = _grape_params(params, declared, route)

        def link(target: int, rel: str) -> str:
            # page_href: params.merge(page: target, per_page: params[:per_page]).to_query
            return f'<{base}{path}?{_link_query({**grape, "page": str(target)})}>; rel="{rel}"'

        links = []
        if has_prev:
            links.append(link(page - 1, "prev"))
        if has_next:
            links.append(link(page + 1, "next"))
        links.append(link(1, "first"))
        headers = {
            "X-Page": str(page),
            "X-Per-Page": str(per_page),
            "X-Prev-Page": str(page - 1) if has_prev else "",
            "X-Next-Page": str(page + 1) if has_next else "",
        }
        if counted:
            links.append(link(max(1, total_pages), "last"))
            headers["X-Total"] = str(total)
            headers["X-Total-Pages"] = str(max(1, total_pages))
        headers["Link"] = ", ".join(links)
        return chunk, headers

    # -- the trace --------------------------------------------------------------------------------

    def _serve_trace(self, handler: _Handler, args: list[str], rate_headers: dict[str, str]) -> None:
        """The raw log: text/plain without charset, Content-Length, streamed; no Range support.

        A job that never ran or was erased answers 200 with an empty body; a bridge id or a deleted
        pipeline's job is 404. The world lock is held only to look the job up, not while streaming.
        """
        with self.world.lock:
            project = self._project(args[0])
            job = self._job(project, args[1])
            log = job.log if job.ran and not job.erased else None
            size = log_size(log)
            job_id = job.id
        drop_at = self._should_drop(job_id, size)
        trickle = self.faults.trace_trickle
        trickle_jobs = self.faults.trace_trickle_jobs
        if trickle is not None and (trickle_jobs is None or job_id in trickle_jobs):
            self._note_fault("trickled_trace", "trace", f"job {job_id}: {trickle[0]} bytes every {trickle[1]} s")
        else:
            trickle = None
        if drop_at is not None:
            self._note_fault("dropped_trace", "trace", f"job {job_id} after {drop_at} of {size} bytes")
        headers = handler._common_headers()
        headers.update(rate_headers)
        headers.update({
            "Content-Type": "text/plain",
            "Content-Disposition": f'infile; filename="{job_id}.log"',
            "Content-Length": str(size),
        })
        handler.send_head_only(200, headers)
        if handler._head or size == 0:
            return
        sent = 0
        for chunk in _trace_chunks(log, drop_at):
            if trickle is None:
                handler.wfile.write(chunk)
                sent += len(chunk)
                self._add_bytes(len(chunk))
                continue
            step, delay = max(1, int(trickle[0])), max(0.0, float(trickle[1]))
            for at in range(0, len(chunk), step):
                # A hung-up client makes this write raise (a disconnect, quiet); the wait is bounded.
                handler.wfile.write(chunk[at : at + step])
                handler.wfile.flush()
                sent += min(step, len(chunk) - at)
                self._add_bytes(min(step, len(chunk) - at))
                if self._stopping.wait(delay):
                    handler.close_connection = True
                    return
        if drop_at is not None:
            # Hang up mid-body: the client sees fewer bytes than Content-Length promised.
            handler.wfile.flush()
            handler.close_connection = True
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _drain(handler: _Handler, length: int) -> None:
    """Read and drop ``length`` bytes of request body, so the connection stays usable."""
    while length > 0:
        chunk = handler.rfile.read(min(length, 65536))
        if not chunk:
            break
        length -= len(chunk)


def _trace_chunks(log: Any, stop_after: int | None) -> Iterator[bytes]:
    """The log's chunks, cut after ``stop_after`` bytes when given."""
    remaining = stop_after
    for chunk in iter_log(log, _TRACE_CHUNK):
        if remaining is not None:
            if remaining <= 0:
                return
            if len(chunk) > remaining:
                chunk = chunk[:remaining]
            remaining -= len(chunk)
        yield chunk


# The declared parameters of each paginated endpoint: name -> (Grape type, default). From
# lib/api/ci/pipelines.rb (pipelines: order_by default 'id', sort default 'desc'; jobs:
# include_retried default false, ``use :optional_scope``) and lib/api/concerns/pagination_params.rb
# (page default 1, per_page default 20). For the project lists only the defaults the simulator relies on
# are declared (order_by 'created_at', sort 'desc', lib/api/projects.rb); their other params are echoed
# as sent.
_PAGINATION: dict[str, tuple[str, Any]] = {"page": ("integer", 1), "per_page": ("integer", 20)}
_PIPELINES_DECLARED: dict[str, tuple[str, Any]] = {
    **_PAGINATION,
    "scope": ("string", None), "status": ("string", None), "ref": ("string", None), "sha": ("string", None),
    "yaml_errors": ("boolean", None), "username": ("string", None),
    "updated_before": ("datetime", None), "updated_after": ("datetime", None),
    "created_before": ("datetime", None), "created_after": ("datetime", None),
    "order_by": ("string", "id"), "sort": ("string", "desc"), "source": ("string", None), "name": ("string", None),
}
_JOBS_DECLARED: dict[str, tuple[str, Any]] = {
    **_PAGINATION, "pipeline_id": ("integer", None), "include_retried": ("boolean", False), "scope": ("array", None),
}
_BRIDGES_DECLARED: dict[str, tuple[str, Any]] = {**_PAGINATION, "pipeline_id": ("integer", None), "scope": ("array", None)}
_PROJECTS_DECLARED: dict[str, tuple[str, Any]] = {
    **_PAGINATION, "order_by": ("string", "created_at"), "sort": ("string", "desc"),
    "archived": ("boolean", None), "simple": ("boolean", None), "owned": ("boolean", None),
    "membership": ("boolean", None), "include_subgroups": ("boolean", None), "with_shared": ("boolean", None),
}


def _grape_params(params: _Params, declared: dict[str, tuple[str, Any]], route: dict[str, str]) -> dict[str, Any]:
    """What Grape's ``params`` holds after validation: every query parameter (Rack keeps the last of a
    repeated scalar, collects ``name[]``), declared ones coerced (Integer, Boolean, DateTime), missing
    ones with a default filled in, and the route parameters (``id``, ``pipeline_id``) merged in.
    Values are the strings Rails' ``to_query`` writes: ``true``/``false``, integers normalised, and
    DateTime as ``DateTime#to_s`` (``2026-10-01T10:40:48+00:00``: seconds only, the offset as sent)."""
    out: dict[str, Any] = {}
    for key, value in params.pairs:
        if key.endswith("[]"):
            current = out.get(key[:-2])
            out[key[:-2]] = [*(current if isinstance(current, list) else []), value]
        else:
            out[key] = value
    for name, (kind, default) in declared.items():
        raw = out.get(name)
        if raw is None or raw == "":
            if default is not None:
                out[name] = _to_param(default)
            continue
        if kind == "array":
            out[name] = raw if isinstance(raw, list) else [raw]
        elif kind == "integer" and isinstance(raw, str):
            out[name] = str(params.integer(name, 0))
        elif kind == "boolean" and isinstance(raw, str):
            out[name] = _to_param(params.boolean(name, None))
        elif kind == "datetime" and isinstance(raw, str):
            out[name] = _datetime_to_s(params.moment(name, keep_offset=True))
    for name, value in route.items():
        out[name] = str(int(value)) if name == "pipeline_id" and value.isdigit() else value
    return out


def _to_param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _datetime_to_s(value: datetime | None) -> str:
    """Ruby's ``DateTime#to_s``: ``%Y-%m-%dT%H:%M:%S%:z`` (fractions of a second dropped)."""
    if value is None:
        return ""
    offset = value.utcoffset() or timedelta(0)
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return value.strftime("%Y-%m-%dT%H:%M:%S") + f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _link_query(grape: dict[str, Any]) -> str:
    """Rails' ``Hash#to_query``: ``CGI.escape(key)=CGI.escape(value)`` per key (an array as
    ``key[]=v`` for each element, an empty one left out), the pieces sorted as strings, joined by &."""
    pieces = []
    for key, value in grape.items():
        if isinstance(value, list):
            if value:
                pieces.append("&".join(f"{quote_plus(key + '[]', safe='')}={quote_plus(str(v), safe='')}"
                                       for v in value))
        else:
            pieces.append(f"{quote_plus(key, safe='')}={quote_plus(str(value), safe='')}")
    return "&".join(sorted(pieces))


def _filter_scope(items: list[Any], params: _Params) -> list[Any]:
    """Jobs/bridges ``scope`` (``scope=x`` or ``scope[]=x&scope[]=y``): statuses; unknown ones → 400."""
    scope = params.getlist("scope")
    if not scope:
        return items
    if any(s not in AVAILABLE_STATUSES for s in scope):
        raise _invalid("scope", "does not have a valid value")
    wanted = set(scope)
    return [i for i in items if i.status in wanted]
