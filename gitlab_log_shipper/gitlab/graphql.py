"""Change detection through GitLab's GraphQL API: which pipelines moved, for many projects in one request.

REST lists pipelines per project (two requests per project and cycle, one more for child pipelines), so an idle
cycle over 1,000 projects costs 2,000 requests. Here one POST to ``/api/graphql`` covers up to a few hundred
projects: aliased ``projects(ids: …)`` blocks of up to 100 projects, each project with two aliased
``pipelines(updatedAfter: …)`` connections (the normal list, and ``source: "parent_pipeline"``, because GitLab
lists child pipelines only when asked, as in REST). What it finds becomes the same :class:`rest.Listing` the REST
list gives, so the seen-check, the filters and the cursor logic downstream do not fork. Job lists and logs still
come from REST (float durations, millisecond times: the document does not change).

GitLab behaviours this relies on (GitLab's source, ``gitlabhq/gitlabhq``):

* The complexity of a query is computed before it runs (``app/graphql/types/base_field.rb``): 1 per field (2 for
  one that calls Gitaly), and a connection field costs ``(child complexity + resolver cost) * (1 + 0.01 * limit)``,
  ``limit`` = ``first`` capped at the page size (100). A signed-in user may send 250 (``GitlabSchema::AUTHENTICATED_MAX_COMPLEXITY``), at most 10,000
  characters of query text (``GraphqlController``), and a query runs at most 30 s. :func:`complexity` computes
  the cost of our query the same way; when GitLab's error names another number, the estimate is corrected.
* Errors may come with HTTP 200: ``{"errors": [...], "data": {...}}``, a path naming the alias that failed.
* ``projects(ids:)`` takes global IDs (``gid://gitlab/Project/1``) and leaves out, silently, projects the token
  cannot see; the shipper polls those through REST and says so.
* Pipelines come newest id first, paged by keyset cursors on the id: a deletion between two pages shifts nothing,
  and a pipeline that moves while we page keeps its place (it comes again next cycle with its new state).
* Statuses are upper case (``SUCCESS``), times have whole seconds; REST's are lower case with milliseconds. The
  rows handed downstream carry REST's status spelling and GraphQL's time as GitLab wrote it.
* One POST is one request of the same rate-limit budget REST uses (``RateLimit-*`` headers are observed by the
  shared session's :class:`throttle.Throttle`).

Transport: python-gitlab's own ``http_request`` on the same session as REST (redirect protection, 429 handling,
timeouts), not python-gitlab's experimental GraphQL client, which neither retries nor sets a timeout.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import requests

from ..errors import GitLabSourceError
from ..timeutil import format_ts, parse_ts
from .rest import FUTURE_TOLERANCE, Listing, _date_header

if TYPE_CHECKING:
    from .rest import GitLabSource

log = logging.getLogger(__name__)

PROJECT_GID = "gid://gitlab/Project/"
PIPELINE_GID = "gid://gitlab/Ci::Pipeline/"
PAGE_SIZE = 100  # GitLab's default_max_page_size: the most `first` may ask for
MAX_COMPLEXITY = 250  # GitlabSchema::AUTHENTICATED_MAX_COMPLEXITY
MAX_QUERY_CHARS = 10_000  # GraphqlController: longer query texts are refused
BLOCK_MAX = PAGE_SIZE  # projects per projects(ids:) block: one page of that connection
START_BATCH = 50  # projects per POST at first; grows while answers are quick, shrinks when slow
SLOW = 10.0  # an answer slower than this (a third of GitLab's 30 s limit) halves the batch
QUICK = 3.0  # an answer quicker than this lets the batch grow
REQUEST_TIMEOUT = 40.0  # GitLab stops a query after 30 s; a little longer before we give up on the answer
REST_ONLY_CYCLES = 30  # a project GraphQL cannot answer for alone is listed with REST this many cycles (5 min at 10 s)
MAX_FOLLOW_PAGES = 1000  # pages of one project's connection in one cycle (100,000 rows): a bound, never reached

# The fields of one pipeline row: what the seen-check needs (id, status, updatedAt), and the two e-mails the
# document's user takes (the user's public e-mail, else the commit author's), so that no commit request is needed.
# (Not `source`: the rows downstream do not need it, and GitLab 16 has no Pipeline.source field.)
NODE_FIELDS = "id iid status updatedAt user { publicEmail } commit { authorEmail }"
NODE_FIELD_COUNT = 8  # id, iid, status, updatedAt, user, publicEmail, commit, authorEmail
CONNECTIONS = ("all", "children")

_COMPLEXITY_RE = re.compile(r"complexity of (\d+), which exceeds max complexity of (\d+)")


class GraphQLUnusable(GitLabSourceError):
    """GitLab's GraphQL API cannot serve the detection query at all (disabled, schema without the fields, query
    refused as invalid): the shipper falls back to REST, says so once, and counts it."""


@dataclass(frozen=True)
class Probe:
    """What ``/api/graphql`` answered to the probe: whether detection can use it and why (or why not)."""

    usable: bool
    reason: str
    version: str | None = None
    children: bool = False  # child pipelines can be listed (source: "parent_pipeline", GitLab 17.0+)


@dataclass
class Detected:
    """One project's result of a detection: its listing, or why it has none.

    ``listing`` is None when the project was absent from GitLab's answer (``missing``: not visible to the token,
    deleted) or its block failed (``error``). ``started``: our clock when the POST that found it went out."""

    project_id: int
    started: datetime
    listing: Listing | None = None
    missing: bool = False
    error: str | None = None
    rest_reason: str | None = None  # missing because GraphQL failed for this project alone (listed with REST a while)


@dataclass
class _Batch:
    wanted: list[tuple[int, datetime]]  # (project id, listed from)
    # Shared with its sibling after a split: [siblings that failed, answered batches when the first of them failed]
    family: list[int] | None = None

    def split(self) -> list["_Batch"]:
        half = len(self.wanted) // 2
        family = [0, 0]
        return [_Batch(self.wanted[:half], family), _Batch(self.wanted[half:], family)]


def complexity(blocks: list[int], *, children: bool) -> int:
    """GitLab's complexity of our detection query with blocks of these many projects.

    ``Types::BaseField``: a plain field costs 1, 2 when it calls Gitaly (``Pipeline.commit``); a connection with a
    resolver costs ``(children + resolver cost) * (1 + 0.01 * limit)``, truncated, ``limit`` = ``first`` capped at
    100; the resolver cost is 1, plus 1 for ``Project.pipelines`` (it calls Gitaly)."""
    def connection(child: int, resolver: int, limit: int) -> int:
        return int((child + resolver) * (1 + 0.01 * min(limit, PAGE_SIZE)))

    page_info = 3  # pageInfo { hasNextPage endCursor }
    node = NODE_FIELD_COUNT + 1  # + 1: commit calls Gitaly
    pipelines = connection(page_info + 1 + node, 2, PAGE_SIZE)  # + 1: nodes
    project = 1 + 1 + pipelines * (2 if children else 1)  # nodes { id all children }
    return sum(connection(page_info + project, 1, size) for size in blocks)


GROUP_SPAN_SECONDS = 1800.0
"""Projects whose window starts lie within this span share a projects(ids:) block (its updatedAfter is the earliest of
them). A project far behind (hours of failures, say) gets a block of its own: otherwise each busy block-mate would
be listed from that old start, and pay a follow-up page for rows it then drops."""


def blocks_of(wanted: list[tuple[int, datetime]]) -> list[list[tuple[int, datetime]]]:
    """``wanted`` (sorted by window start) cut into blocks: runs of close window starts, each run in even blocks
    of at most BLOCK_MAX projects."""
    runs: list[list[tuple[int, datetime]]] = []
    for item in wanted:
        if runs and (item[1] - runs[-1][0][1]).total_seconds() <= GROUP_SPAN_SECONDS:
            runs[-1].append(item)
        else:
            runs.append([item])
    blocks = []
    for run in runs:
        at = 0
        for size in block_sizes(len(run)):
            blocks.append(run[at : at + size])
            at += size
    return blocks


def block_sizes(projects: int) -> list[int]:
    """Projects per projects(ids:) block for a batch: as few blocks as 100 per block allows, evenly filled (the
    complexity of a block grows with its ``first``, so two blocks of 90 cost less than one of 100 and one of 80)."""
    if projects <= 0:
        return []
    count = -(-projects // BLOCK_MAX)
    base, extra = divmod(projects, count)
    return [base + 1] * extra + [base] * (count - extra)


def detection_query(blocks: int, *, children: bool, follow: str | None = None) -> str:
    """The query text for ``blocks`` projects(ids:) blocks; ``follow`` ("all"/"children"): one block, one
    connection, from ``$after`` on (the next page of one project)."""
    conns = [follow] if follow else list(CONNECTIONS if children else CONNECTIONS[:1])
    variables: list[str] = []
    parts: list[str] = []
    for b in range(blocks):
        variables += [f"$ids{b}: [ID!]", f"$n{b}: Int", f"$t{b}: Time"]
        inner = []
        for name in conns:
            args = [f"updatedAfter: $t{b}", f"first: {PAGE_SIZE}"]
            if name == "children":
                args.insert(1, 'source: "parent_pipeline"')
            if follow:
                args.append("after: $after")
            inner.append(f"{name}: pipelines({', '.join(args)}) {{ pageInfo {{ hasNextPage endCursor }} "
                         f"nodes {{ {NODE_FIELDS} }} }}")
        parts.append(f"b{b}: projects(ids: $ids{b}, first: $n{b}) {{ pageInfo {{ hasNextPage endCursor }} "
                     f"nodes {{ id {' '.join(inner)} }} }}")
    if follow:
        variables.append("$after: String")
    return f"query Detect({', '.join(variables)}) {{ {' '.join(parts)} }}"


PROBE_QUERY = ("query Probe { metadata { version } currentUser { username } "
               "pipelineType: __type(name: \"Pipeline\") { fields { name } } "
               "projectType: __type(name: \"Project\") { fields { name args { name } } } }")


def version_tuple(version: str | None) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def judge_probe(data: Mapping[str, Any] | None, *, want_children: bool) -> Probe:
    """Whether the probe's answer shows what detection needs. The version gate is on what GitLab shows:
    ``metadata.version`` for child listing (17.0+), the introspected fields and arguments for the rest."""
    if not isinstance(data, Mapping):
        return Probe(False, "the probe's answer has no data")
    if not data.get("currentUser"):
        return Probe(False, "GitLab's GraphQL API does not recognise the token (currentUser is null)")
    version = (data.get("metadata") or {}).get("version") if isinstance(data.get("metadata"), Mapping) else None
    pipeline_fields = {f.get("name") for f in ((data.get("pipelineType") or {}).get("fields") or [])
                       if isinstance(f, Mapping)}
    project_fields = {f.get("name"): {a.get("name") for a in (f.get("args") or []) if isinstance(a, Mapping)}
                      for f in ((data.get("projectType") or {}).get("fields") or []) if isinstance(f, Mapping)}
    missing = sorted({"id", "iid", "status", "updatedAt", "user", "commit"} - pipeline_fields)
    if missing:
        return Probe(False, f"GitLab {version or '(version unknown)'}: its GraphQL Pipeline type lacks "
                            f"{', '.join(missing)}", version)
    args = project_fields.get("pipelines")
    if args is None or not {"updatedAfter", "source", "first", "after"} <= args:
        return Probe(False, f"GitLab {version or '(version unknown)'}: Project.pipelines lacks updatedAfter/source "
                            "arguments", version)
    release = version_tuple(version)
    children = release is not None and release >= (17, 0)
    return Probe(True, f"GitLab {version}: GraphQL has every field detection needs", version, children)


@dataclass(frozen=True)
class ApiChoice:
    """How changes are found, and why. ``problem``: what an operator must know (GITLAB_API=graphql that cannot be
    honoured, or child pipelines that are not listed); ``children``: GraphQL lists child pipelines."""

    mode: str  # "rest" | "graphql"
    reason: str
    children: bool = False
    problem: str | None = None


def decide_api(wanted: str, probe: Probe | None, *, children: bool) -> ApiChoice:
    """GITLAB_API (``auto``/``rest``/``graphql``) and what the probe showed → REST or GraphQL detection.

    ``auto`` and ``graphql`` take GraphQL when the probe shows every field detection needs. Before GitLab 17.0
    neither API lists child pipelines (``Ci::PipelinesFinder`` drops them before it applies ``source``, in REST and
    GraphQL alike), so that is said, not a reason to pay REST's price. When GraphQL does not work, REST is used
    (polling with REST beats not polling); with ``graphql`` that is a problem to report."""
    if wanted == "rest" or probe is None:
        return ApiChoice("rest", "GITLAB_API=rest")
    if not probe.usable:
        reason = f"GraphQL cannot be used: {probe.reason}"
        return ApiChoice("rest", reason, problem=f"GITLAB_API=graphql, but {reason}" if wanted == "graphql" else None)
    reason = f"GITLAB_API={wanted}: {probe.reason}"
    if children and not probe.children:
        return ApiChoice("graphql", reason, children=False,
                         problem=f"GitLab {probe.version or '(version unknown)'} cannot list child pipelines (REST and "
                                 "GraphQL list them from GitLab 17.0 on), so they are not shipped")
    return ApiChoice("graphql", reason, children=children)


class GraphQLDetector:
    """Finds the pipelines updated since each project's window start, many projects per request.

    Thread-safe for :meth:`email_of` (read by the pipeline workers); :meth:`detect` runs on one thread."""

    def __init__(self, source: "GitLabSource", *, children: bool, clock: Callable[[], datetime],
                 url: str | None = None, batch: int = START_BATCH, max_complexity: int = MAX_COMPLEXITY,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.children = children
        self.clock = clock
        self.monotonic = monotonic
        self.batch = batch
        self.max_complexity = max_complexity
        self.scale = 1.0  # GitLab's complexity / ours, learnt from a complexity error
        self.url = f"{url if url is not None else source.url}/api/graphql"  # GITLAB_URL's /api/graphql
        self.requests = 0  # POSTs sent (tests and the benchmark read it)
        self.last_requests = 0  # POSTs of the latest detect(), follow-up pages included (the cycle plan reads it)
        self.timings: list[tuple[int, float]] = []  # (projects, seconds) of the latest detect()
        self._emails: dict[int, tuple[str | None, str | None]] = {}
        self._lock = threading.Lock()
        # Projects GraphQL failed for on their own (a query that always times out, say): project -> cycles left to
        # list them with REST instead, so that they are polled and do not cost a timeout at every level every cycle.
        self.rest_only: dict[int, int] = {}
        self._halved_from: int | None = None  # the batch size a slow answer halved; None when nothing is being tried
        self._halved_seconds = 0.0  # how long that slow answer took
        self._slow_anyway = False  # halving did not make answers quicker: GitLab is slow for any request
        self._stop: threading.Event | None = None  # the running detect()'s stop event

    def __repr__(self) -> str:
        return f"GraphQLDetector(url={self.url!r}, batch={self.batch})"

    # -- transport -------------------------------------------------------------------------------

    def post(self, query: str, variables: Mapping[str, Any] | None, what: str) -> tuple[dict[str, Any], datetime | None]:
        """One POST; the decoded answer and GitLab's Date. HTTP errors and unreadable answers raise
        GitLabSourceError (404: GraphQLUnusable: GitLab without the GraphQL API)."""
        body: dict[str, Any] = {"query": query}
        if variables:
            body["variables"] = dict(variables)

        def send() -> Any:
            # No retry of 5xx here: python-gitlab would wait for RateLimit-Reset (up to a minute, GitLab.com sends it
            # on every answer) before each retry, and a batch that fails is better split and sent again at once by
            # the caller. 429s are still waited for as python-gitlab does (obey_rate_limit).
            for attempt in (1, 2):
                try:
                    return self.source.gl.http_request("post", self.url, post_data=body, retry_transient_errors=False,
                                                       timeout=REQUEST_TIMEOUT)
                except requests.exceptions.ReadTimeout as exc:  # GitLab is there but slow with this batch
                    raise _Split(f"{what}: no answer within {REQUEST_TIMEOUT:g} s") from exc
                except requests.exceptions.ConnectionError:
                    # A kept-alive connection GitLab closed meanwhile fails at once: one new try (python-gitlab's own
                    # retry of this is off with retry_transient_errors). A second failure is GitLab unreachable.
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

        self.requests += 1
        try:
            response = self.source._call(what, send)
        except GitLabSourceError as exc:
            if exc.status == 404:
                raise GraphQLUnusable(f"{what}: GitLab has no GraphQL API at /api/graphql (404)", status=404) from exc
            raise
        try:
            data = response.json()
        except ValueError:
            raise GitLabSourceError(f"{what}: GitLab's GraphQL answer is not JSON") from None
        if not isinstance(data, dict):
            raise GitLabSourceError(f"{what}: GitLab's GraphQL answer is {type(data).__name__}, not an object")
        return data, _date_header(response)

    def probe(self) -> Probe:
        """Ask ``/api/graphql`` whether it can serve detection (``GITLAB_API=auto`` and ``check``)."""
        try:
            data, _ = self.post(PROBE_QUERY, None, "GraphQL probe")
        except GraphQLUnusable as exc:
            return Probe(False, str(exc))
        except _Split as exc:  # no answer in time: GitLab is slow or starting; a smaller probe does not exist
            raise GitLabSourceError(exc.reason) from None  # as unreachable: decided at a later cycle
        errors = _messages(data.get("errors"))
        if errors and not data.get("data"):
            return Probe(False, f"GraphQL probe refused: {errors[0]}")
        return judge_probe(data.get("data"), want_children=self.children)

    # -- detection -------------------------------------------------------------------------------

    def email_of(self, pipeline_id: int) -> tuple[str | None, str | None] | None:
        """(user's public e-mail, commit author's e-mail) of a pipeline the latest detection found, else None."""
        with self._lock:
            return self._emails.get(pipeline_id)

    def detect(self, wanted: Iterable[tuple[int, datetime]], stop: threading.Event | None = None) -> dict[int, Detected]:
        """Every pipeline updated since each project's window start. ``wanted``: (project id, window start).

        Projects with close window starts share a block (its ``updatedAfter`` is the earliest of them; rows before a
        project's own start are dropped). A batch that times out, answers 5xx or exceeds the complexity limit is
        split and sent again; a GraphQL error names the projects it costs (``error``), and only those wait for the
        next cycle. Raises GraphQLUnusable when GitLab cannot serve the query at all, GitLabSourceError when GitLab
        cannot be reached or rejects the token (as REST would)."""
        ordered = sorted(wanted, key=lambda item: item[1])
        self._stop = stop  # also looked at between a busy project's pages (_follow)
        before = self.requests
        with self._lock:
            self._emails = {}
        self.timings = []
        results: dict[int, Detected] = {}
        now = self.clock()
        for project_id in [p for p, _ in ordered if p in self.rest_only]:
            results[project_id] = Detected(project_id, now, missing=True,
                                           rest_reason="GraphQL could not answer for it on its own recently")
            self.rest_only[project_id] -= 1
            if self.rest_only[project_id] <= 0:
                del self.rest_only[project_id]  # GraphQL is tried again for it next cycle
        ordered = [item for item in ordered if item[0] not in results]
        pending = self._batches(ordered)
        answered = 0
        while pending:
            if stop is not None and stop.is_set():
                break
            batch = pending.pop(0)
            if len(batch.wanted) > 1 and not self._fits(batch.wanted):
                pending[:0] = batch.split()
                continue
            try:
                results.update(self._send(batch))
                answered += 1
            except GraphQLUnusable:
                raise
            except GitLabSourceError as exc:
                # GitLab unreachable, or the token refused: what was found so far stands; this batch and the rest
                # wait for the next cycle (as every REST listing would fail now too), without more requests.
                now = self.clock()
                for left in [batch, *pending]:
                    for project_id, _ in left.wanted:
                        results[project_id] = Detected(project_id, now, error=str(exc))
                break
            except _Split as split:
                results.update(self._after_failure(batch, split, pending, answered))
        self.last_requests = self.requests - before
        return results

    def _after_failure(self, batch: _Batch, split: "_Split", pending: list[_Batch], answered: int) -> dict[int, Detected]:
        """A batch GitLab could not answer (timeout, 5xx, too complex): split it and send the halves, unless its
        sibling failed too and no batch at all was answered since (GitLab failing whatever the size: halving further
        would only multiply the requests; its projects wait for the next cycle). When smaller batches were
        answered meanwhile, size was the trouble, and this one is split like its sibling was. One project that fails alone is listed with REST for the next
        REST_ONLY_CYCLES cycles, and at once (``missing``), so that nothing waits for GraphQL to get better."""
        now = self.clock()
        family = batch.family
        hopeless = family is not None and family[0] >= 1 and family[1] == answered
        if family is not None:
            family[0] += 1
            family[1] = answered
        if len(batch.wanted) == 1:
            project_id, _ = batch.wanted[0]
            self.rest_only[project_id] = REST_ONLY_CYCLES
            log.warning("GraphQL detection: project %s: %s; listed with REST for the next %d cycles", project_id,
                        split.reason, REST_ONLY_CYCLES)
            return {project_id: Detected(project_id, now, missing=True, rest_reason=split.reason)}
        if hopeless:
            return {project_id: Detected(project_id, now, error=f"{split.reason}; will retry next cycle")
                    for project_id, _ in batch.wanted}
        self.batch = max(1, len(batch.wanted) // 2)
        log.info("GraphQL detection: %s; batches of %d projects from now on", split.reason, self.batch)
        pending[:0] = batch.split()
        return {}

    def _batches(self, ordered: list[tuple[int, datetime]]) -> list[_Batch]:
        """Consecutive projects (sorted by window start) in batches of at most ``self.batch`` whose blocks fit the
        complexity limit (a project far behind adds a block of its own: see GROUP_SPAN_SECONDS)."""
        batches: list[_Batch] = []
        current: list[tuple[int, datetime]] = []
        for item in ordered:
            if current and (len(current) >= max(1, self.batch) or not self._fits([*current, item])):
                batches.append(_Batch(current))
                current = []
            current.append(item)
        if current:
            batches.append(_Batch(current))
        return batches

    def _cost(self, wanted: list[tuple[int, datetime]]) -> int:
        return sum(complexity([len(block)], children=self.children) for block in blocks_of(wanted))

    def _fits(self, wanted: list[tuple[int, datetime]]) -> bool:
        return self._cost(wanted) * self.scale <= self.max_complexity

    def max_batch(self) -> int:
        """The most projects one POST may carry: blocks of 100 while the complexity limit (corrected by what GitLab
        said) is not passed; at least one project."""
        def fits(projects: int) -> bool:
            return self._complexity(projects) * self.scale <= self.max_complexity

        low, high = 1, 10 * BLOCK_MAX
        while low < high:
            middle = (low + high + 1) // 2
            if fits(middle):
                low = middle
            else:
                high = middle - 1
        return low

    def _complexity(self, projects: int) -> int:
        return complexity(block_sizes(projects), children=self.children)

    def _send(self, batch: _Batch) -> dict[int, Detected]:
        blocks = blocks_of(batch.wanted)
        variables: dict[str, Any] = {}
        for b, block in enumerate(blocks):
            variables[f"ids{b}"] = [f"{PROJECT_GID}{project_id}" for project_id, _ in block]
            variables[f"n{b}"] = len(block)
            variables[f"t{b}"] = format_ts(min(since for _, since in block))
        query = detection_query(len(blocks), children=self.children)
        started = self.clock()
        began = self.monotonic()
        what = f"GraphQL detection for {len(batch.wanted)} project(s)"
        try:
            data, date = self.post(query, variables, what)
        except GraphQLUnusable:
            raise
        except GitLabSourceError as exc:
            if exc.status is None or exc.status in (401, 403, 429):
                # GitLab cannot be reached, refuses the token, or its rate limit held after python-gitlab's own
                # waits and retries (max_retries): smaller batches would not help, and sending both halves at once
                # would spend more of a budget that is gone. The rest waits for the next cycle.
                raise
            raise _Split(str(exc)) from exc  # 5xx, 413, 422 "Query too large": smaller batches may pass
        elapsed = self.monotonic() - began
        errors = data.get("errors")
        if errors:
            try:
                self._raise_for_query_errors(_messages(errors), what)
            except _Split as split:
                if split.actual is not None:  # GitLab counts differently from us: scale our estimates to its count
                    self.scale = max(self.scale, split.actual / max(1, self._cost(batch.wanted)))
                raise
        answer = data.get("data") if isinstance(data.get("data"), dict) else {}
        results: dict[int, Detected] = {}
        failed = _failed_aliases(errors)
        for b, block in enumerate(blocks):
            alias = f"b{b}"
            if alias in failed or not isinstance(answer.get(alias), dict):
                reason = failed.get(alias) or "GitLab's GraphQL answer has no data for this block"
                for project_id, _ in block:
                    results[project_id] = Detected(project_id, started, error=f"{what}: {reason}; will retry next cycle")
                continue
            results.update(self._read_block(answer[alias], block, started, date, what, _failed_nodes(errors, alias)))
        self.timings.append((len(batch.wanted), elapsed))  # answered batches only
        self._adapt(len(batch.wanted), elapsed)
        return results

    def _raise_for_query_errors(self, messages: list[str], what: str) -> None:
        """Errors that concern the whole query: too complex / too large / timed out → split; invalid → unusable."""
        for message in messages:
            match = _COMPLEXITY_RE.search(message)
            if match:
                actual, limit = int(match.group(1)), int(match.group(2))
                self.max_complexity = min(self.max_complexity, limit)
                raise _Split(f"GitLab counted complexity {actual} over its limit of {limit}", actual=actual)
            lowered = message.lower()
            if "query too large" in lowered or "too many characters" in lowered or "timeout" in lowered \
                    or "timed out" in lowered:
                raise _Split(f"GitLab refused the query: {message[:200]}")
            if "doesn't exist on type" in lowered or "doesn't accept argument" in lowered or "is not defined" in lowered:
                raise GraphQLUnusable(f"{what}: GitLab's GraphQL schema refuses the detection query: {message[:200]}")

    def _adapt(self, projects: int, elapsed: float) -> None:
        """Grow the batch while GitLab answers quickly; halve it when an answer is slow, and go back when smaller
        batches turn out just as slow (GitLab slow for any request: halving would only multiply the requests)."""
        if elapsed > SLOW and projects > 1:
            if self._halved_from is not None and projects < self._halved_from and elapsed > 0.75 * self._halved_seconds:
                self.batch, self._halved_from, self._slow_anyway = self._halved_from, None, True
                log.info("GraphQL detection: %d projects took %.1f s, as slow as more did; batches of %d projects "
                         "again", projects, elapsed, self.batch)
            elif not self._slow_anyway:
                self._halved_from, self._halved_seconds, self.batch = projects, elapsed, max(1, projects // 2)
                log.info("GraphQL detection: %d projects took %.1f s; batches of %d projects from now on",
                         projects, elapsed, self.batch)
        elif elapsed < QUICK and projects >= self.batch:
            self._halved_from, self._slow_anyway = None, False
            grown = min(self.batch * 2, self.max_batch())
            if grown > self.batch:
                log.debug("GraphQL detection: %d projects in %.1f s; batches of %d from now on", projects, elapsed, grown)
                self.batch = grown

    def _read_block(self, block: dict[str, Any], wanted: list[tuple[int, datetime]], started: datetime,
                    date: datetime | None, what: str, failed: Mapping[int, str]) -> dict[int, Detected]:
        """``failed``: index in ``nodes`` → GraphQL error inside that project's node (it waits for the next cycle)."""
        since_of = dict(wanted)
        results: dict[int, Detected] = {}
        _list(block.get("nodes"), f"{what}: projects")  # the shape checked
        for index, node in enumerate(block.get("nodes") or []):
            if not isinstance(node, dict):
                continue
            project_id = _gid(node.get("id"), PROJECT_GID, f"{what}: project id")
            if project_id not in since_of:
                continue  # GitLab answered for a project we did not ask about: ignored
            if index in failed:
                results[project_id] = Detected(project_id, started,
                                               error=f"{what}: {failed[index]}; will retry next cycle")
                continue
            listing = Listing(gitlab_now=date)
            try:
                for name in (CONNECTIONS if self.children else CONNECTIONS[:1]):
                    connection = node.get(name)
                    if not isinstance(connection, dict):
                        raise GitLabSourceError(f"{what}: project {project_id} has no {name!r} connection in the answer")
                    self._add_rows(listing, connection, since_of[project_id], date, f"{what}: project {project_id}")
                    self._follow(listing, project_id, name, connection, since_of[project_id])
            except GraphQLUnusable:
                raise
            except (GitLabSourceError, _Split) as exc:  # an odd answer or a failed next page: this project waits
                results[project_id] = Detected(project_id, started, error=f"{exc}; will retry next cycle")
                continue
            results[project_id] = Detected(project_id, started, listing)
        for project_id, _ in wanted:
            results.setdefault(project_id, Detected(project_id, started, missing=True))
        return results

    def _follow(self, listing: Listing, project_id: int, name: str, connection: dict[str, Any], since: datetime) -> None:
        """The further pages of one project's connection (a project with more than 100 rows in its window)."""
        what = f"GraphQL detection: project {project_id}, page after page"
        query = detection_query(1, children=self.children, follow=name)
        for _ in range(MAX_FOLLOW_PAGES):
            info = connection.get("pageInfo") if isinstance(connection.get("pageInfo"), dict) else {}
            if not info.get("hasNextPage"):
                return
            if self._stop is not None and self._stop.is_set():  # shutting down: the cursor stays, nothing is lost
                raise GitLabSourceError(f"{what}: stopping before its next page")
            cursor = info.get("endCursor")
            if not isinstance(cursor, str):
                raise GitLabSourceError(f"{what}: hasNextPage without an endCursor")
            data, date = self.post(query, {"ids0": [f"{PROJECT_GID}{project_id}"], "n0": 1, "t0": format_ts(since),
                                           "after": cursor}, what)
            listing.requests += 1
            messages = _messages(data.get("errors"))
            if messages:
                raise GitLabSourceError(f"{what}: {messages[0][:200]}")
            nodes = _list((((data.get("data") or {}).get("b0") or {}).get("nodes")), what)
            if not nodes:
                raise GitLabSourceError(f"{what}: the project is gone from the answer while its pipelines were paged")
            connection = nodes[0].get(name) if isinstance(nodes[0].get(name), dict) else {}
            self._add_rows(listing, connection, since, date, what)
        raise GitLabSourceError(f"{what}: more than {MAX_FOLLOW_PAGES} pages in one cycle")

    def _add_rows(self, listing: Listing, connection: dict[str, Any], since: datetime, date: datetime | None,
                  what: str) -> None:
        floor = since.replace(microsecond=0)  # GraphQL's times have whole seconds
        for node in _list(connection.get("nodes"), f"{what}: pipelines"):
            row = _row(node, what)
            updated = parse_ts(row["updated_at"])
            if updated < floor:
                continue  # listed for a block-mate with an earlier window start
            listing.add(row)
            if date is not None and updated > date + FUTURE_TOLERANCE:
                listing.future.append((int(row["id"]), str(row["updated_at"]), format_ts(date)))
            user = node.get("user") if isinstance(node.get("user"), dict) else {}
            commit = node.get("commit") if isinstance(node.get("commit"), dict) else {}
            with self._lock:
                self._emails[int(row["id"])] = (_text(user.get("publicEmail")), _text(commit.get("authorEmail")))


class _Split(Exception):
    """This batch must be sent in smaller pieces."""

    def __init__(self, reason: str, actual: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.actual = actual


def _messages(errors: Any) -> list[str]:
    if not isinstance(errors, list):
        return []
    return [str(e.get("message")) if isinstance(e, dict) else str(e) for e in errors]


def _error_paths(errors: Any) -> list[tuple[list[Any], str]]:
    return [(error["path"], str(error.get("message"))[:200]) for error in (errors if isinstance(errors, list) else [])
            if isinstance(error, dict) and isinstance(error.get("path"), list) and error["path"]]


def _node_index(path: list[Any]) -> int | None:
    """The project node an error's path points into (``[alias, "nodes", i, ...]``), else None."""
    if len(path) >= 3 and path[1] == "nodes" and isinstance(path[2], int) and not isinstance(path[2], bool):
        return path[2]
    return None


def _failed_aliases(errors: Any) -> dict[str, str]:
    """alias → message, for errors of a whole block (its path names the block, not one project node in it).

    graphql-ruby nulls the nearest nullable field of an error and names it in the path: an error inside one
    project (``["b0", "nodes", 3, "all"]``: ``Project.pipelines`` is nullable) leaves its block-mates answered,
    so it costs that project only (see :func:`_failed_nodes`)."""
    failed: dict[str, str] = {}
    for path, message in _error_paths(errors):
        if _node_index(path) is None:
            failed.setdefault(str(path[0]), message)
    return failed


def _failed_nodes(errors: Any, alias: str) -> dict[int, str]:
    """Index in the block's ``nodes`` → message, for errors inside one project node of that block."""
    failed: dict[int, str] = {}
    for path, message in _error_paths(errors):
        index = _node_index(path)
        if index is not None and str(path[0]) == alias:
            failed.setdefault(index, message)
    return failed


def _list(value: Any, what: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise GitLabSourceError(f"{what}: unexpected answer from GitLab (nodes is {type(value).__name__})")
    return [item for item in value if isinstance(item, dict)]


def _gid(value: Any, prefix: str, what: str) -> int:
    if isinstance(value, str) and value.startswith(prefix) and value[len(prefix):].isdigit():
        return int(value[len(prefix):])
    raise GitLabSourceError(f"{what}: unexpected answer from GitLab (not a {prefix}N id: {str(value)[:60]!r})")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _row(node: dict[str, Any], what: str) -> dict[str, Any]:
    """A GraphQL pipeline node as the REST list row the shipper knows: id, iid, status (REST's lower case),
    updated_at (as GitLab wrote it: whole seconds)."""
    pipeline_id = _gid(node.get("id"), PIPELINE_GID, f"{what}: pipeline id")
    status, updated = node.get("status"), node.get("updatedAt")
    if not isinstance(status, str) or not isinstance(updated, str):
        raise GitLabSourceError(f"{what}: pipeline {pipeline_id} without status or updatedAt")
    try:
        parse_ts(updated)
    except ValueError:
        raise GitLabSourceError(f"{what}: pipeline {pipeline_id} has no valid updatedAt ({updated[:40]!r})") from None
    return {"id": pipeline_id, "iid": node.get("iid"), "status": status.lower(), "updated_at": updated}


__all__ = ["ApiChoice", "block_sizes", "decide_api", "Detected", "GraphQLDetector", "GraphQLUnusable", "Probe", "complexity", "detection_query", "judge_probe"]
