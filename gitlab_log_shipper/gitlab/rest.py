"""Reading GitLab through python-gitlab. The only module that imports ``gitlab``.

Every python-gitlab or transport error is translated here, once, into :class:`GitLabSourceError`
(``gone=True`` for a 404: the object was deleted, which is final). See ``gitlab-api-notes.md`` for the
behaviours this relies on.

Answers are checked here too: a 2xx whose JSON lacks a field the shipper relies on, or has it with the
wrong type (an id that is a string, a list where an object belongs), is a GitLabSourceError like any
other failed read, so the pipeline is tried again on a later cycle instead of ending in a KeyError.
"""

from __future__ import annotations

import email.utils
import logging
import ssl
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, BinaryIO, Callable, Iterator, TypeVar
from urllib.parse import quote, urlsplit

import gitlab
import gitlab.exceptions
import requests
import requests.adapters
import urllib3
from urllib3.exceptions import InsecureRequestWarning

from .. import __version__
from ..config.settings import Config
from ..counters import GITLAB, NO_ANSWER, count_request
from ..errors import GitLabSourceError
from ..security import escape_controls, mask_secrets
from ..timeutil import format_ts, parse_ts
from .download import BodyCopy, DeadlineExceeded, DeadlinePassed, DeadlinePool, LogSink, RequestDeadline, format_seconds
from .download import restart as restart_sink
from .throttle import Throttle

log = logging.getLogger(__name__)

T = TypeVar("T")
PER_PAGE = 100  # GitLab's maximum
TRACE_ATTEMPTS = 3  # a trace has no Range support: a broken stream is fetched again from the start
COMMIT_CACHE_SIZE = 1024
MAX_ID = 2**63 - 1  # GitLab ids are bigint
# Headers that carry a GitLab credential; none of them may follow a redirect to another origin.
CREDENTIAL_HEADERS = ("PRIVATE-TOKEN", "JOB-TOKEN", "Authorization")
# What a python-gitlab call can raise on a bad answer; MalformedAnswer (a ValueError) is ours.
_ERRORS = (gitlab.exceptions.GitlabError, requests.RequestException, ValueError, KeyError, TypeError)


@dataclass(frozen=True)
class ProjectRef:
    id: int
    name: str | None
    path_with_namespace: str | None


@dataclass
class Listing:
    """What one listing of a project's pipelines found.

    ``rows``: id → the newest version of its row (a row listed twice, because it moved while we paged or sits on a
    page boundary, keeps its latest ``updated_at``). ``gitlab_now``: GitLab's own clock (the ``Date`` header of the
    first answer, truncated to the second), None when GitLab sent none. ``future``: rows whose ``updated_at`` was
    ahead of the ``Date`` of the answer that carried them (GitLab nodes stamp rows with their own clocks)."""

    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    gitlab_now: datetime | None = None
    future: list[tuple[int, str, str]] = field(default_factory=list)  # (id, updated_at, Date)
    requests: int = 0

    def add(self, row: dict[str, Any]) -> None:
        pipeline_id = int(row["id"])
        known = self.rows.get(pipeline_id)
        if known is None or parse_ts(row["updated_at"]) >= parse_ts(known["updated_at"]):
            self.rows[pipeline_id] = row


@dataclass(frozen=True)
class DiscoveryProblem:
    """A configured project or group that could not be read (deleted, renamed, no access): reported every cycle,
    while every other project is polled as usual."""

    ref: str
    reason: str


class MalformedAnswer(ValueError):
    """GitLab answered 2xx with JSON that lacks a field we rely on or has it with the wrong type."""


class RedirectRefused(requests.RequestException):
    """GitLab redirected to another host, port or scheme; the token is not sent there."""


class TLSFailure(requests.RequestException):
    """GitLab's certificate was not trusted. A configuration problem, so never retried as transient."""


class GitLabUnreachable(requests.RequestException):
    """GitLab has not answered for longer than the retry budget: not a ConnectionError, so python-gitlab does not
    retry it (it retries ConnectionError, ChunkedEncodingError and Timeout: gitlab/client.py, http_request)."""


# python-gitlab's backoff between retries of a transient error: 0.1 s × 2**n, n = 0..9 (gitlab/utils.py,
# Retry.handle_retry, max_retries=10): 102.3 s of sleeping alone, silently, before the error surfaces.
_BACKOFF_FIRST = 0.1
_PYTHON_GITLAB_RETRIES = 10
# How long an outage is retried: 2 × GITLAB_TIMEOUT (a GitLab that hangs gets a second attempt), at least 10 s (a
# restart of GitLab's web server, or a short hang with a small GITLAB_TIMEOUT, is ridden out within the cycle).
MIN_OUTAGE_BUDGET = 10.0


def outage_budget(gitlab_timeout: float) -> float:
    """Seconds an unreachable GitLab is retried before a request gives up (see :class:`_Outage`)."""
    return max(2 * gitlab_timeout, MIN_OUTAGE_BUDGET)


class _Outage:
    """When GitLab stopped answering (connection refused or reset, DNS, timeouts), shared by every thread.

    The first failure logs one WARNING saying what is retried and for how long. A retry is allowed while the outage,
    plus python-gitlab's next backoff, stays within ``budget`` (:func:`outage_budget`): a request gives up within
    ``budget`` + GITLAB_TIMEOUT (its last attempt), and once the budget is spent every request of the cycle (and of
    the next cycles, until GitLab answers) fails at its first failure instead of sleeping through the backoff again.
    """

    def __init__(self, budget: float, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.timeout = timeout
        self.clock = clock
        self.since: float | None = None
        self._lock = threading.Lock()
        self._local = threading.local()  # this thread's consecutive failures: python-gitlab's retry number

    def retries(self) -> tuple[int, float]:
        """How many retries, over how many seconds of backoff, fit the budget when each attempt fails at once."""
        count, slept = 0, 0.0
        while count < _PYTHON_GITLAB_RETRIES and slept + _BACKOFF_FIRST * 2 ** count <= self.budget:
            slept += _BACKOFF_FIRST * 2 ** count
            count += 1
        return count, slept

    def failed(self, exc: BaseException, started: float) -> bool:
        """Note a failed attempt (started at ``started``); True when no retry fits the budget any more."""
        failures = getattr(self._local, "failures", 0)
        with self._lock:
            if self.since is None:
                self.since = started
                count, slept = self.retries()
                log.warning("GitLab unreachable (%s); retrying up to %d times over ~%.1f s (GITLAB_TIMEOUT=%s per "
                            "attempt, at most ~%.0f s in all), then this cycle reports it and the next cycle tries again",
                            _describe_failure(exc), count, slept, format_seconds(self.timeout), self.budget + self.timeout)
            give_up = self.clock() - self.since + _BACKOFF_FIRST * 2 ** failures > self.budget
        self._local.failures = 0 if give_up else failures + 1
        return give_up

    def answered(self) -> None:
        self._local.failures = 0
        if self.since is not None:
            with self._lock:
                if self.since is not None:
                    log.info("GitLab answers again after %.0f s", self.clock() - self.since)
                    self.since = None


def _describe_failure(exc: BaseException) -> str:
    """``ConnectionError: connection refused``: the class and the usual reason, short and on one line (requests'
    text nests urllib3's, with object addresses: not for a log line when a known reason is in it)."""
    text = escape_controls(str(exc))
    for marker in ("Connection refused", "Name or service not known", "timed out", "Connection reset",
                   "No route to host", "Network is unreachable", "Temporary failure in name resolution"):
        if marker.lower() in text.lower():
            return f"{exc.__class__.__name__}: {marker.lower()}"
    return f"{exc.__class__.__name__}: {text[:120]}"


class _DeadlineHTTPPool(DeadlinePool, urllib3.HTTPConnectionPool):
    pass


class _DeadlineHTTPSPool(DeadlinePool, urllib3.HTTPSConnectionPool):
    pass


class _GitLabAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter with pools whose connections honour a :class:`download.RequestDeadline` (job logs)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _DeadlineHTTPPool, "https": _DeadlineHTTPSPool}


class GitLabSession(requests.Session):
    """The requests Session python-gitlab uses, hardened.

    * ``PRIVATE-TOKEN`` is a custom header: requests drops ``Authorization`` when a redirect leaves the
      origin but keeps every other header, so python-gitlab would hand the token to whatever host a
      redirect names. Here a redirect to another origin strips every credential header and is refused
      (an https upgrade on the same host is allowed, as requests allows it for Authorization).
      Nothing legitimate needs a cross-origin redirect: the API serves even job logs in the body
      (``build.trace.raw``), never as a redirect to object storage.
    * A certificate-verification failure would otherwise be retried by python-gitlab as a transient
      connection error (up to ten times, about 100 s); it fails at once with a message naming the setting.
    """

    def __init__(self, throttle: Throttle | None = None, pool_size: int = 10, timeout: float = 30.0) -> None:
        super().__init__()
        self.outage = _Outage(outage_budget(timeout), timeout)
        self.trust_env = False  # no proxy credentials or .netrc picked up behind the operator's back
        self.throttle = throttle or Throttle()
        # Enough pooled connections for every worker; no urllib3 Retry here (python-gitlab retries).
        adapter = _GitLabAdapter(pool_connections=2, pool_maxsize=pool_size)
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    def rebuild_auth(self, prepared_request: requests.PreparedRequest, response: requests.Response) -> None:
        if self.should_strip_auth(response.request.url, prepared_request.url):
            for name in CREDENTIAL_HEADERS:
                prepared_request.headers.pop(name, None)
            target = urlsplit(prepared_request.url or "")
            raise RedirectRefused(
                f"GitLab redirected to {target.scheme}://{target.netloc}, another origin than GITLAB_URL; the token "
                "is not sent there. Set GITLAB_URL to GitLab's own address"
            )
        super().rebuild_auth(prepared_request, response)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        started = time.monotonic()
        try:
            response = self._send(request, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:  # (TLSFailure and GitLabUnreachable are neither)
            if self.outage.failed(exc, started):
                raise GitLabUnreachable(f"GitLab unreachable ({_describe_failure(exc)}); gave up after retrying for "
                                        f"{format_seconds(self.outage.budget)} (2 × GITLAB_TIMEOUT, at least "
                                        f"{format_seconds(MIN_OUTAGE_BUDGET)})") from exc
            raise
        self.outage.answered()
        return response

    def _send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.throttle.before_request()
        try:
            try:
                response = super().send(request, **kwargs)
            except requests.RequestException:
                count_request(GITLAB, NO_ANSWER)  # every attempt python-gitlab makes passes here, retries too
                raise
            count_request(GITLAB, response.status_code)
            if response.status_code != 429:  # on a 429 python-gitlab already waits (Retry-After / RateLimit-Reset)
                self.throttle.observe(response.headers)
            return response
        except requests.exceptions.SSLError as exc:
            problem = _certificate_problem(exc)
            if problem is None:
                raise  # a handshake broken by the network: transient, python-gitlab may retry it
            raise TLSFailure(f"GitLab's TLS certificate was rejected ({problem}); if GitLab uses a private CA, "
                             "set GITLAB_CA_BUNDLE") from exc


def _certificate_problem(exc: BaseException) -> str | None:
    """The verification message of an ssl.SSLCertVerificationError somewhere in ``exc``'s wrappers."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLCertVerificationError):
            return item.verify_message or "certificate verify failed"
        stack.extend([*item.args, getattr(item, "reason", None), item.__cause__, item.__context__])
    return None


def _translate(what: str, exc: Exception) -> GitLabSourceError:
    """python-gitlab / requests error → GitLabSourceError with a reason an operator can act on.

    Whatever GitLab's answer contributes is escaped: one error is one log line."""
    if isinstance(exc, gitlab.exceptions.GitlabAuthenticationError):
        return GitLabSourceError(f"{what}: GitLab rejected the token (401); check GITLAB_TOKEN and its read_api scope", status=401)
    if isinstance(exc, gitlab.exceptions.GitlabError):
        code = exc.response_code
        message = escape_controls(str(exc.error_message))[:200] if exc.error_message else exc.__class__.__name__
        if code == 404:
            return GitLabSourceError(f"{what}: not found (404)", status=404, gone=True)
        if code == 403:
            return GitLabSourceError(f"{what}: forbidden (403); the token lacks access", status=403)
        return GitLabSourceError(f"{what}: GitLab answered {code or 'invalid data'}: {message}", status=code)
    if isinstance(exc, (RedirectRefused, TLSFailure, GitLabUnreachable)):
        return GitLabSourceError(f"{what}: {exc}")
    if isinstance(exc, requests.RequestException):
        return GitLabSourceError(f"{what}: cannot reach GitLab ({exc.__class__.__name__})")
    if isinstance(exc, MalformedAnswer):
        return GitLabSourceError(f"{what}: unexpected answer from GitLab: {escape_controls(str(exc))[:200]}")
    if isinstance(exc, (ValueError, KeyError, TypeError)):
        return GitLabSourceError(f"{what}: unexpected answer from GitLab ({exc.__class__.__name__})")
    return GitLabSourceError(f"{what}: {exc.__class__.__name__}")


# -- the shapes we rely on, checked at this boundary so the rest of the shipper can trust them -------


def _attrs(obj: Any, kind: str) -> dict[str, Any]:
    """The JSON object GitLab sent, from a python-gitlab object or a plain ``http_get``/``http_list`` answer.

    The hot paths (pipelines, jobs, logs, commits) use python-gitlab's ``http_*`` layer, which keeps its
    retries, rate-limit handling and error types but returns plain dicts: building RESTObjects and
    their deep-copying ``asdict()`` cost a third of the shipper's CPU in the benchmark."""
    if isinstance(obj, requests.Response):  # http_get hands back non-JSON answers (an HTML page) as they came
        kind_of = obj.headers.get("Content-Type") or "no content type"
        raise MalformedAnswer(f"{kind} came as {escape_controls(kind_of)[:60]}, not JSON")
    data = obj.asdict() if hasattr(obj, "asdict") else obj
    if not isinstance(data, dict):
        raise MalformedAnswer(f"{kind} is {type(data).__name__}, not an object")
    return data


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _check_id(data: dict[str, Any], key: str, kind: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_ID:
        raise MalformedAnswer(f"{kind} has no valid {key!r} (a positive integer expected, got {_show(value)})")
    return value


def _check_text(data: dict[str, Any], key: str, kind: str, *, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise MalformedAnswer(f"{kind} has no valid {key!r} (a string expected, got {_show(value)})")
    return value


def _check_time(data: dict[str, Any], key: str, kind: str, *, required: bool = False) -> None:
    value = _check_text(data, key, kind, required=required)
    if value is not None:
        try:
            parse_ts(value)
        except ValueError:
            raise MalformedAnswer(f"{kind} has no valid {key!r} (an ISO 8601 time expected, got {_show(value)})") from None


def _check_number(data: dict[str, Any], key: str, kind: str) -> None:
    value = data.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise MalformedAnswer(f"{kind} has no valid {key!r} (a number expected, got {_show(value)})")


def _project(obj: Any) -> ProjectRef:
    data = _attrs(obj, "project")
    return ProjectRef(_check_id(data, "id", "project"), _check_text(data, "name", "project"),
                      _check_text(data, "path_with_namespace", "project"))


def _pipeline_row(obj: Any) -> dict[str, Any]:
    """A row of the pipelines list: the shipper uses id, status and updated_at."""
    data = _attrs(obj, "pipeline list row")
    kind = f"pipeline {data.get('id')!r} in the list"
    _check_id(data, "id", kind)
    _check_text(data, "status", kind, required=True)
    _check_time(data, "updated_at", kind, required=True)
    return data


def _pipeline(obj: Any) -> dict[str, Any]:
    """A single pipeline: every field the document and the shipping decision take from it."""
    data = _attrs(obj, "pipeline")
    kind = f"pipeline {data.get('id')!r}"
    _check_id(data, "id", kind)
    _check_id(data, "project_id", kind)
    _check_text(data, "status", kind, required=True)
    for key in ("created_at", "updated_at", "finished_at"):
        _check_time(data, key, kind)
    for key in ("ref", "sha", "source"):
        _check_text(data, key, kind)
    _check_number(data, "duration", kind)
    user = data.get("user")
    if user is not None:
        if not isinstance(user, dict):
            raise MalformedAnswer(f"{kind} has no valid 'user' (an object expected, got {_show(user)})")
        _check_text(user, "name", f"{kind} user")
        _check_text(user, "public_email", f"{kind} user")
    return data


def _job(obj: Any) -> dict[str, Any]:
    data = _attrs(obj, "job")
    kind = f"job {data.get('id')!r}"
    _check_id(data, "id", kind)
    _check_text(data, "name", kind, required=True)
    _check_text(data, "status", kind, required=True)
    for key in ("stage", "ref"):
        _check_text(data, key, kind)
    for key in ("created_at", "started_at", "finished_at"):
        _check_time(data, key, kind)
    _check_number(data, "duration", kind)
    embedded = data.get("pipeline")
    if embedded is not None:
        if not isinstance(embedded, dict):
            raise MalformedAnswer(f"{kind} has no valid 'pipeline' (an object expected, got {_show(embedded)})")
        _check_text(embedded, "status", f"{kind} pipeline")
        _check_time(embedded, "updated_at", f"{kind} pipeline")
    return data


def _date_header(response: requests.Response) -> datetime | None:
    """GitLab's clock from an answer's ``Date`` header (RFC 7231, whole seconds); None when absent or unreadable."""
    raw = response.headers.get("Date")
    if not raw:
        return None
    try:
        value = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# Rows whose updated_at is ahead of the Date of their answer by more than this are "from the future": the Date
# header has whole seconds and is taken when the answer starts, so up to about a second ahead is ordinary.
FUTURE_TOLERANCE = timedelta(seconds=2)
# A page of this many rows that all carry one updated_at (bulk updates) cannot move the keyset bound forward:
# that one instant is then listed with offset pages (see list_pipelines).
_ONE_INSTANT = timedelta(microseconds=999)
_INSTANT_PASSES = 5


class GitLabSource:
    """What the shipper needs from GitLab, each call translated to domain errors."""

    def __init__(self, config: Config) -> None:
        self.url = config.gitlab_url
        self._secrets = config.secrets()
        # GITLAB_MAX_REQUESTS_PER_SECOND, and a pause before GitLab's own budget (RateLimit-Remaining) is gone
        self.throttle = Throttle(config.gitlab_max_requests_per_second, reserve=max(10, 2 * config.concurrency))
        if config.gitlab_verify is False:
            warnings.filterwarnings("ignore", category=InsecureRequestWarning)  # warned once at start instead
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
            session=GitLabSession(self.throttle, pool_size=3 * config.concurrency + 2, timeout=config.gitlab_timeout),
            ssl_verify=config.gitlab_verify,  # certifi's bundle, GITLAB_CA_BUNDLE, or off (warned at start)
        )
        self._commit_cache: OrderedDict[tuple[int, str], str | None] = OrderedDict()
        self._commit_lock = threading.Lock()  # the pipeline workers share the cache

    def __repr__(self) -> str:
        return f"GitLabSource(url={self.url!r})"

    @property
    def rate_limit_remaining(self) -> int | None:
        """GitLab's RateLimit-Remaining from the latest answer (None when GitLab sends none)."""
        return self.throttle.remaining

    def _error(self, what: str, exc: Exception) -> GitLabSourceError:
        """:func:`_translate`, with our own token masked should GitLab ever echo it back."""
        error = _translate(what, exc)
        text = str(error)
        masked = mask_secrets(text, self._secrets)
        if masked != text:
            error = GitLabSourceError(masked, status=error.status, gone=error.gone)
        return error

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except _ERRORS as exc:
            raise self._error(what, exc) from exc

    # -- projects -------------------------------------------------------------------------------

    def get_project(self, ref: str | int) -> ProjectRef:
        return self._call(f"project {ref}", lambda: _project(self.gl.projects.get(ref)))

    def discover_projects(self, projects: tuple[str, ...], groups: tuple[str, ...],
                          problems: list[DiscoveryProblem] | None = None) -> list[ProjectRef]:
        """``GITLAB_PROJECTS`` and every project of ``GITLAB_GROUPS`` (subgroups included, projects merely
        shared with the group excluded); with neither, every project the token is a member of.

        A project or group that GitLab says does not exist or is not visible (404, 403) is appended to ``problems``
        and left out, so that one deleted or renamed project does not stop the others from shipping. Any other
        failure (GitLab down, token rejected) raises: then nothing can be polled."""
        found: dict[int, ProjectRef] = {}

        def unless_missing(ref: str, read: Callable[[], T]) -> T | None:
            try:
                return read()
            except GitLabSourceError as exc:
                if exc.status not in (403, 404):
                    raise
                if problems is not None:
                    problems.append(DiscoveryProblem(ref, str(exc)))
                return None

        for ref in projects:
            project = unless_missing(f"project {ref}", lambda r=ref: self.get_project(r))  # type: ignore[misc]
            if project is not None:
                found[project.id] = project
        for group_ref in groups:
            def list_group(g: str = group_ref) -> list[ProjectRef]:
                group = self.gl.groups.get(g, lazy=True)
                return [_project(p) for p in group.projects.list(
                    iterator=True, include_subgroups=True, with_shared=False, archived=False, per_page=PER_PAGE)]
            members = unless_missing(f"group {group_ref}",
                                     lambda g=group_ref, f=list_group: self._call(f"group {g}", f))  # type: ignore[misc]
            for project in members or []:
                found.setdefault(project.id, project)
        if not projects and not groups:
            for project in self._call("projects of the token's user", lambda: [
                _project(p)
                for p in self.gl.projects.list(iterator=True, membership=True, archived=False, per_page=PER_PAGE)
            ]):
                found.setdefault(project.id, project)
        return sorted(found.values(), key=lambda p: p.id)

    # -- pipelines ------------------------------------------------------------------------------

    def list_pipelines(self, project_id: int, updated_after: datetime, *, children: bool = True) -> Listing:
        """Every pipeline row updated at or after ``updated_after`` (inclusive), child pipelines included unless
        ``children=False`` (POLL_CHILD_PIPELINES; saves one request per project and cycle): the pages of
        :meth:`pipeline_pages` merged into one :class:`Listing` (``gitlab_now`` is the Date of the first answer)."""
        listing = Listing()
        for page in self.pipeline_pages(project_id, updated_after, children=children):
            for row in page.rows.values():
                listing.add(row)
            if listing.gitlab_now is None:
                listing.gitlab_now = page.gitlab_now
            listing.future += page.future
            listing.requests += page.requests
        return listing

    def pipeline_pages(self, project_id: int, updated_after: datetime, *,
                       children: bool = True) -> Iterator[Listing]:
        """The rows of :meth:`list_pipelines` one page at a time, each page a :class:`Listing` of its own, fetched
        only when the caller asks for it: a walk over a long window (``backfill`` over a year) holds one page, not
        the window. A row that ends one page and starts the next (the bound is inclusive) is given once; a row
        that moves while we page comes again on a later page with its newer ``updated_at`` (list_pipelines merges
        the two, a walk over the pages sees both).

        Paged by keyset, not by offset: each request is the first page of ``updated_after=<bound>&order_by=updated_at
        &sort=asc``, and the next bound is the newest ``updated_at`` of that page. With offsets, a row deleted while
        a later page is fetched shifts every row behind it one place forward and the first row of the next page is
        never seen (GitLab's pipelines list has offset pagination only; ``Ci::PipelinesFinder#sort_items`` orders by
        the one column asked for). Here a deletion shifts nothing we rely on, and a row that moves while we page
        gets a newer ``updated_at`` and comes again on a later page. Only when a whole page shares one ``updated_at``
        (a bulk update of more than PER_PAGE pipelines in the same millisecond) is that instant listed with offset
        pages, ordered by id, and given as one page. Child pipelines are only listed with ``source=parent_pipeline``
        (GitLab 17.0+), hence the second query.
        """
        queries: list[dict[str, str]] = [{}, {"source": "parent_pipeline"}] if children else [{}]
        for extra in queries:
            what = f"listing {'child ' if extra else ''}pipelines of project {project_id}"
            bound = updated_after
            given: dict[int, str] = {}  # id -> updated_at of the rows of the previous page (given already)
            while True:
                page = Listing()
                rows = self._pipelines_page(project_id, {**extra, "updated_after": format_ts(bound)}, page, what)
                for row in rows:
                    if given.get(int(row["id"])) != row["updated_at"]:
                        page.add(row)
                if len(rows) < PER_PAGE:
                    yield page
                    break
                newest = max(parse_ts(row["updated_at"]) for row in rows)
                if newest > bound:
                    given = {int(row["id"]): str(row["updated_at"]) for row in rows}
                    bound = newest
                    yield page
                    continue
                self._list_one_instant(project_id, extra, bound, page, what)
                for pipeline_id, updated_at in given.items():  # the previous page's rows of this instant
                    if page.rows.get(pipeline_id, {}).get("updated_at") == updated_at:
                        del page.rows[pipeline_id]
                given = {}  # the next bound is past this instant: no row of it is listed again
                bound += timedelta(milliseconds=1)
                yield page

    def _pipelines_page(self, project_id: int, query: dict[str, str], listing: Listing, what: str) -> list[dict[str, Any]]:
        """One page of the pipelines list (the first unless ``query`` names one); notes GitLab's clock and rows
        from the future."""
        params = {"order_by": "updated_at", "sort": "asc", "per_page": PER_PAGE, **query}

        def fetch() -> tuple[list[dict[str, Any]], datetime | None]:
            response = self.gl.http_request("get", f"/projects/{project_id}/pipelines", query_data=params)
            try:
                data = response.json()
            except ValueError:  # requests' JSONDecodeError is a RequestException too: not "cannot reach GitLab"
                kind = response.headers.get("Content-Type") or "no content type"
                raise MalformedAnswer(f"the pipelines list is not JSON ({escape_controls(kind)[:60]})") from None
            if not isinstance(data, list):
                raise MalformedAnswer(f"the pipelines list is {type(data).__name__}, not a list")
            return [_pipeline_row(row) for row in data], _date_header(response)

        rows, date = self._call(what, fetch)
        listing.requests += 1
        if listing.gitlab_now is None:
            listing.gitlab_now = date
        if date is not None:
            for row in rows:
                if parse_ts(row["updated_at"]) > date + FUTURE_TOLERANCE:
                    listing.future.append((int(row["id"]), str(row["updated_at"]), format_ts(date)))
        return rows

    def _list_one_instant(self, project_id: int, extra: dict[str, str], instant: datetime, listing: Listing,
                          what: str) -> None:
        """Every row updated within the millisecond ``instant``: offset pages ordered by id, each asked for with our
        own query and an explicit ``page``. Not by following ``Link``/``X-Next-Page``: GitLab rebuilds those URLs from
        its coerced params, and a time there loses its fraction (``…T07:18:30+00:00``), which would turn this
        one-millisecond window into an empty one from page 2 on (``OffsetHeaderBuilder#page_href``)."""
        query = {**extra, "updated_after": format_ts(instant),
                 "updated_before": (instant + _ONE_INSTANT).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "order_by": "id"}
        # Offset pages skip a row when one before it is deleted meanwhile (rows only ever leave this window: a row
        # updated again moves past it and comes with the keyset pages). So the pass is repeated until one finds
        # no row the earlier ones had not: a deletion during a pass shifts rows, the next pass sees them.
        found: set[int] = set()
        for attempt in range(1, _INSTANT_PASSES + 1):
            new = 0
            page = 1
            while True:
                rows = self._pipelines_page(project_id, {**query, "page": str(page)}, listing, what)
                for row in rows:
                    if int(row["id"]) not in found:
                        found.add(int(row["id"]))
                        new += 1
                    listing.add(row)
                if len(rows) < PER_PAGE:
                    break
                page += 1
            if attempt > 1 and not new:
                return
        log.warning("%s: the %d pipelines updated at %s kept changing over %d passes; the rest come with the "
                    "overlap of the next cycle", what, len(found), format_ts(instant), _INSTANT_PASSES)

    def get_pipeline(self, project_id: int, pipeline_id: int) -> dict[str, Any]:
        return self._call(
            f"pipeline {pipeline_id} of project {project_id}",
            lambda: _pipeline(self.gl.http_get(f"/projects/{project_id}/pipelines/{pipeline_id}")),
        )

    def list_jobs(self, project_id: int, pipeline_id: int) -> list[dict[str, Any]]:
        """All jobs of a pipeline, every attempt (``include_retried``), all pages. Bridges are not jobs."""
        def fetch() -> list[dict[str, Any]]:
            rows = self.gl.http_list(f"/projects/{project_id}/pipelines/{pipeline_id}/jobs",
                                     {"include_retried": "true", "per_page": PER_PAGE}, iterator=True)
            return [_job(j) for j in rows]
        return self._call(f"jobs of pipeline {pipeline_id} (project {project_id})", fetch)

    def fetch_trace(self, project_id: int, job_id: int, out: BinaryIO | LogSink, *, timeout: float | None = None) -> int:
        """Stream a job's raw log into ``out`` (an empty file, or a :class:`~.download.LogSink` such as
        :class:`spool.CappedLog`); returns how many bytes GitLab sent. A stream broken midway is fetched
        again from the start (GitLab has no Range support for traces), up to :data:`TRACE_ATTEMPTS` times.

        ``timeout`` (JOB_LOG_TIMEOUT) bounds the whole download, every attempt included: GITLAB_TIMEOUT
        only bounds each read, and a GitLab (or a proxy) that trickles a byte every few seconds would
        otherwise hold this worker for ever. When it passes, the download fails with a GitLabSourceError
        (not ``gone``: the pipeline is tried again on a later cycle)."""
        what = f"log of job {job_id} (project {project_id})"
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Exception | None = None
        for attempt in range(1, TRACE_ATTEMPTS + 1):
            if attempt > 1:  # not on the first: on ext4 a truncate makes close() start writing the file to disk
                restart_sink(out)  # (auto_da_alloc), and a spool file written to disk costs ~1.5 ms more to delete
            body: BodyCopy | None = None
            try:
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExceeded(0)
                # GitLab answers with the whole log in the body (lib/api/ci/jobs.rb: `body build.trace.raw`),
                # never a redirect, so this one response is the whole download.
                with RequestDeadline(deadline):  # from the first byte sent: the answer's head is bounded too
                    response = self.gl.http_get(f"/projects/{project_id}/jobs/{job_id}/trace", streamed=True, raw=True)
                # The connection under this response was armed when it left the pool (RequestDeadline) and is disarmed
                # when it goes back, under the watchdog's lock: a deadline never cuts a connection another request
                # took by then. A body without a length that the watchdog cut ends like a complete one, hence the
                # check of the clock after it.
                with response:
                    body = BodyCopy(response.raw, deadline)
                    size = body.into(out)
                    if deadline is not None and time.monotonic() >= deadline:
                        raise DeadlineExceeded(size)
                out.flush()
                return size
            except DeadlineExceeded as exc:
                raise self._expired(what, timeout, exc.received) from None
            except DeadlinePassed:
                raise self._expired(what, timeout, body.received if body else 0) from None
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError) as exc:
                received = body.received if body else 0
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._expired(what, timeout, received) from None
                last = exc
                log.warning("%s: stream broke after %d bytes (attempt %d/%d); fetching again",
                            what, received, attempt, TRACE_ATTEMPTS)
            except _ERRORS as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._expired(what, timeout, body.received if body else 0) from None
                raise self._error(what, exc) from exc
        assert last is not None
        raise self._error(what, last) from last

    @staticmethod
    def _expired(what: str, timeout: float | None, received: int) -> GitLabSourceError:
        return GitLabSourceError(f"{what}: log download exceeded JOB_LOG_TIMEOUT={format_seconds(timeout)} "
                                 f"({received} bytes received); will try again on a later cycle")

    def commit_author_email(self, project_id: int, sha: str | None) -> str | None:
        """The commit author's email, cached (LRU) so a pipeline costs at most one extra request."""
        if not sha:
            return None
        key = (project_id, sha)
        with self._commit_lock:
            if key in self._commit_cache:
                self._commit_cache.move_to_end(key)
                return self._commit_cache[key]
        try:
            what = f"commit {sha[:12]} of project {project_id}"
            commit = self._call(what, lambda: _attrs(
                self.gl.http_get(f"/projects/{project_id}/repository/commits/{quote(sha, safe='')}"), "commit"))
            email = self._call(what, lambda: _check_text(commit, "author_email", "commit")) or None
        except GitLabSourceError as exc:
            if not exc.gone:
                raise
            email = None  # commit gone (force-push + gc): the document says null rather than failing
        with self._commit_lock:
            self._commit_cache[key] = email
            self._commit_cache.move_to_end(key)
            while len(self._commit_cache) > COMMIT_CACHE_SIZE:
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
