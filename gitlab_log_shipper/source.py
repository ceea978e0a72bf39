"""Reading GitLab through python-gitlab. The only module that imports ``gitlab``.

Every python-gitlab or transport error is translated here, once, into :class:`GitLabSourceError`
(``gone=True`` for a 404: the object was deleted, which is final). See ``gitlab-api-notes.md`` for the
behaviours this relies on.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

import gitlab
import gitlab.exceptions
import requests

from . import __version__
from .config import Config
from .errors import GitLabSourceError
from .timeutil import format_ts

log = logging.getLogger(__name__)

T = TypeVar("T")
PER_PAGE = 100  # GitLab's maximum
TRACE_ATTEMPTS = 3  # a trace has no Range support: a broken stream is fetched again from the start
COMMIT_CACHE_SIZE = 1024


@dataclass(frozen=True)
class ProjectRef:
    id: int
    name: str | None
    path_with_namespace: str | None


def _translate(what: str, exc: Exception) -> GitLabSourceError:
    """python-gitlab / requests error → GitLabSourceError with a reason an operator can act on."""
    if isinstance(exc, gitlab.exceptions.GitlabAuthenticationError):
        return GitLabSourceError(f"{what}: GitLab rejected the token (401); check GITLAB_TOKEN and its read_api scope", status=401)
    if isinstance(exc, gitlab.exceptions.GitlabError):
        code = exc.response_code
        message = str(exc.error_message)[:200] if exc.error_message else exc.__class__.__name__
        if code == 404:
            return GitLabSourceError(f"{what}: not found (404)", status=404, gone=True)
        if code == 403:
            return GitLabSourceError(f"{what}: forbidden (403); the token lacks access", status=403)
        return GitLabSourceError(f"{what}: GitLab answered {code or 'invalid data'}: {message}", status=code)
    if isinstance(exc, requests.RequestException):
        return GitLabSourceError(f"{what}: cannot reach GitLab ({exc.__class__.__name__})")
    if isinstance(exc, (ValueError, KeyError, TypeError)):
        return GitLabSourceError(f"{what}: unexpected answer from GitLab ({exc.__class__.__name__})")
    return GitLabSourceError(f"{what}: {exc.__class__.__name__}")


def _call(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (gitlab.exceptions.GitlabError, requests.RequestException, ValueError, KeyError, TypeError) as exc:
        raise _translate(what, exc) from exc


def _attrs(obj: Any) -> dict[str, Any]:
    """A python-gitlab object's attributes as a plain dict (the JSON GitLab sent)."""
    data = obj.asdict() if hasattr(obj, "asdict") else dict(obj)
    if not isinstance(data, dict) or "id" not in data:
        raise ValueError("object without id")
    return data


class GitLabSource:
    """What the shipper needs from GitLab, each call translated to domain errors."""

    def __init__(self, config: Config) -> None:
        self.url = config.gitlab_url
        session = requests.Session()
        session.trust_env = False  # no proxy credentials or .netrc picked up behind the operator's back
        # python-gitlab retries 429 itself (Retry-After, then RateLimit-Reset) and, with
        # retry_transient_errors, 5xx too. No urllib3 Retry adapter here: it would stack a second layer.
        self.gl = gitlab.Gitlab(
            config.gitlab_url,
            private_token=config.gitlab_token,
            timeout=config.gitlab_timeout,  # python-gitlab's default is to wait forever
            retry_transient_errors=True,
            per_page=PER_PAGE,
            keep_base_url=True,  # Link headers may name another host (behind proxies)
            user_agent=f"gitlab-log-shipper/{__version__}",
            session=session,
        )
        self._commit_cache: OrderedDict[tuple[int, str], str | None] = OrderedDict()
        # RateLimit-Remaining of the latest GitLab answer that carried one (metrics); None until then.
        self.rate_limit_remaining: int | None = None
        session.hooks["response"].append(self._note_rate_limit)

    def __repr__(self) -> str:
        return f"GitLabSource(url={self.url!r})"

    def _note_rate_limit(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        value = response.headers.get("RateLimit-Remaining", "").strip()
        if value.isdigit():
            self.rate_limit_remaining = int(value)

    # -- projects -------------------------------------------------------------------------------

    def _project_ref(self, data: dict[str, Any]) -> ProjectRef:
        return ProjectRef(int(data["id"]), data.get("name"), data.get("path_with_namespace"))

    def get_project(self, ref: str | int) -> ProjectRef:
        return _call(f"project {ref}", lambda: self._project_ref(_attrs(self.gl.projects.get(ref))))

    def discover_projects(self, projects: tuple[str, ...], groups: tuple[str, ...]) -> list[ProjectRef]:
        """``GITLAB_PROJECTS`` and every project of ``GITLAB_GROUPS`` (subgroups included, projects merely
        shared with the group excluded); with neither, every project the token is a member of."""
        found: dict[int, ProjectRef] = {}
        for ref in projects:
            project = self.get_project(ref)
            found[project.id] = project
        for group_ref in groups:
            def list_group(g: str = group_ref) -> list[ProjectRef]:
                group = self.gl.groups.get(g, lazy=True)
                return [self._project_ref(_attrs(p)) for p in group.projects.list(
                    iterator=True, include_subgroups=True, with_shared=False, archived=False, per_page=PER_PAGE)]
            for project in _call(f"group {group_ref}", list_group):
                found.setdefault(project.id, project)
        if not projects and not groups:
            for project in _call("projects of the token's user", lambda: [
                self._project_ref(_attrs(p))
                for p in self.gl.projects.list(iterator=True, membership=True, archived=False, per_page=PER_PAGE)
            ]):
                found.setdefault(project.id, project)
        return sorted(found.values(), key=lambda p: p.id)

    # -- pipelines ------------------------------------------------------------------------------

    def iter_pipelines(self, project_id: int, updated_after: datetime) -> Iterator[dict[str, Any]]:
        """Every pipeline row updated at or after ``updated_after`` (inclusive), child pipelines included.

        ``order_by=id&sort=asc`` with a lower time bound is a set that only grows while we page through
        it, so offset pagination can show a row twice but never skip one (ordering by updated_at could).
        Child pipelines are only listed with ``source=parent_pipeline``, hence the second query.
        """
        base = {"updated_after": format_ts(updated_after), "order_by": "id", "sort": "asc", "per_page": PER_PAGE}
        project = self.gl.projects.get(project_id, lazy=True)
        for extra in ({}, {"source": "parent_pipeline"}):
            what = f"project {project_id}: listing {'child ' if extra else ''}pipelines"
            iterator = _call(what, lambda: project.pipelines.list(iterator=True, **base, **extra))
            while True:
                try:
                    row = next(iterator)
                except StopIteration:
                    break
                except (gitlab.exceptions.GitlabError, requests.RequestException, ValueError) as exc:
                    raise _translate(what, exc) from exc
                yield _call(what, lambda: _attrs(row))

    def get_pipeline(self, project_id: int, pipeline_id: int) -> dict[str, Any]:
        return _call(
            f"pipeline {pipeline_id} of project {project_id}",
            lambda: _attrs(self.gl.projects.get(project_id, lazy=True).pipelines.get(pipeline_id)),
        )

    def list_jobs(self, project_id: int, pipeline_id: int) -> list[dict[str, Any]]:
        """All jobs of a pipeline, every attempt (``include_retried``), all pages. Bridges are not jobs."""
        def fetch() -> list[dict[str, Any]]:
            pipeline = self.gl.projects.get(project_id, lazy=True).pipelines.get(pipeline_id, lazy=True)
            return [_attrs(j) for j in pipeline.jobs.list(iterator=True, include_retried=True, per_page=PER_PAGE)]
        return _call(f"jobs of pipeline {pipeline_id} (project {project_id})", fetch)

    def fetch_trace(self, project_id: int, job_id: int, out: BinaryIO) -> int:
        """Stream a job's raw log into ``out``; returns its size. A stream broken midway is fetched again
        from the start (GitLab has no Range support for traces), up to :data:`TRACE_ATTEMPTS` times."""
        what = f"log of job {job_id} (project {project_id})"
        last: Exception | None = None
        for attempt in range(1, TRACE_ATTEMPTS + 1):
            out.seek(0)
            out.truncate()
            size = 0
            try:
                job = self.gl.projects.get(project_id, lazy=True).jobs.get(job_id, lazy=True)
                for chunk in job.trace(streamed=True, iterator=True, chunk_size=256 * 1024):
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                return size
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError) as exc:
                last = exc
                log.warning("%s: stream broke after %d bytes (attempt %d/%d); fetching again",
                            what, size, attempt, TRACE_ATTEMPTS)
            except (gitlab.exceptions.GitlabError, requests.RequestException, ValueError) as exc:
                raise _translate(what, exc) from exc
        assert last is not None
        raise _translate(what, last) from last

    def commit_author_email(self, project_id: int, sha: str | None) -> str | None:
        """The commit author's email, cached (LRU) so a pipeline costs at most one extra request."""
        if not sha:
            return None
        key = (project_id, sha)
        if key in self._commit_cache:
            self._commit_cache.move_to_end(key)
            return self._commit_cache[key]
        try:
            commit = _call(f"commit {sha[:12]} of project {project_id}",
                           lambda: _attrs(self.gl.projects.get(project_id, lazy=True).commits.get(sha)))
            email = commit.get("author_email") or None
        except GitLabSourceError as exc:
            if not exc.gone:
                raise
            email = None  # commit gone (force-push + gc): the document says null rather than failing
        self._commit_cache[key] = email
        if len(self._commit_cache) > COMMIT_CACHE_SIZE:
            self._commit_cache.popitem(last=False)
        return email

    def find_pipeline(self, project_ids: list[int], pipeline_id: int) -> int | None:
        """Which of these projects holds the pipeline (pipeline ids are global in GitLab)."""
        for project_id in project_ids:
            try:
                self.get_pipeline(project_id, pipeline_id)
                return project_id
            except GitLabSourceError as exc:
                if not exc.gone and exc.status != 403:
                    raise
        return None

    def close(self) -> None:
        self.gl.session.close()
