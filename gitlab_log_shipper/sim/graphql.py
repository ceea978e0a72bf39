"""GitLab's GraphQL API (``/api/graphql``) for the simulator, answered from the same World as its REST API.

Queries are parsed, validated and executed by graphql-core against ``graphql_schema.graphql``, a hand-written
subset of GitLab's own schema. Around that sits what makes GitLab's GraphQL GitLab's, each taken from its
source (named where it is implemented):

- global IDs (``gid://gitlab/Project/1``, ``gid://gitlab/Ci::Pipeline/2``) and GitLab's words for bad ones;
- upper-case enums, ``Time`` written with whole seconds and read with fractions, ``source`` as REST writes it;
- the keyset connections of ``Gitlab::Graphql::Pagination::Keyset::Connection`` (opaque base64 cursors on
  the id, so a deletion between pages skips nothing) with GitLab's ``hasNextPage`` rules;
- ``Ci::PipelinesFinder`` through :meth:`World.find_pipelines`, the finder the REST list uses too;
- projects the token cannot see silently left out of ``projects(ids:)``;
- GitLab's limits and their messages: query text size, depth, and complexity computed as
  ``Types::BaseField`` does (:func:`query_complexity`);
- faults for tests (:class:`GraphQLFaults`): a timeout for big batches, an error on one alias with partial
  data, fields an older GitLab lacks.

graphql-core is imported lazily (the ``sim`` extra): the shipper never needs it, and a simulator without it
answers ``/api/graphql`` with 404, like a GitLab that does not serve GraphQL.

The HTTP side (authentication, rate limit, headers, counters) is the simulator's (:mod:`.gitlab`); this
module turns one request into one answer.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from .world import Commit, Pipeline, Project, World

if TYPE_CHECKING:  # graphql-core is optional at run time
    from graphql import GraphQLError, GraphQLSchema

__all__ = [
    "GraphQLAnswer",
    "GraphQLBadRequest",
    "GraphQLFaults",
    "GraphQLLimits",
    "GraphQLRequest",
    "GraphQLService",
    "GraphQLUnavailable",
    "decode_cursor",
    "encode_cursor",
    "query_complexity",
    "read_request",
]

SCHEMA_FILE = "graphql_schema.graphql"
_REVISION = "a8432a3e1f2"
# ActiveRecord::QueryAborted in GraphqlController (app/controllers/graphql_controller.rb): a 503.
_TIMED_OUT = "Request timed out. Please try a less complex query or a smaller set of records."
# GraphqlController's `rescue_from StandardError` in production.
_INTERNAL = "Internal server error"


class GraphQLUnavailable(RuntimeError):
    """graphql-core is not installed (``pip install gitlab-log-shipper[sim]``)."""


# -- settings -----------------------------------------------------------------------------------------


@dataclass
class GraphQLLimits:
    """GitLab's limits, as attributes so a test can lower them.

    From app/graphql/gitlab_schema.rb (``AUTHENTICATED_COMPLEXITY = 250``, ``DEFAULT_MAX_COMPLEXITY = 200``
    for anonymous requests, ``AUTHENTICATED_MAX_DEPTH = 20``, ``DEFAULT_MAX_DEPTH = 15``,
    ``default_max_page_size 100``) and app/controllers/graphql_controller.rb (``MAX_QUERY_SIZE = 10_000``
    characters of query text).
    """

    max_complexity: int = 250
    max_complexity_anonymous: int = 200
    max_depth: int = 20
    max_depth_anonymous: int = 15
    max_query_size: int = 10_000
    max_page_size: int = 100


_TIMEOUT_ANSWERS = ("database", "graphql")


@dataclass
class GraphQLFaults:
    """GraphQL failures to produce; change any field while the simulator runs (read once per request).

    - ``disabled``: ``/api/graphql`` answers 404, as on a GitLab that does not serve GraphQL.
    - ``timeout_above_projects``: a request whose ``projects(ids:)`` blocks name more than this many ids in
      all is held ``timeout_seconds`` (GitLab's ``graphql_timeout`` default, 30 s) and then answered as GitLab
      answers a timeout: ``timeout_answer="database"`` (a statement timeout: 503 with GitLab's message,
      nothing executed) or ``"graphql"`` (graphql-ruby's Timeout: 200, each top-level field null with an
      error ``Timeout on Query.projects``).
    - ``error_aliases``: top-level fields with these response keys (aliases) fail with ``error_message``;
      the others are answered: 200 with partial data.
    - ``hidden_fields``: ``"Type.field"`` names the schema leaves out, as an older GitLab would (its
      introspection does not show them and a query asking for one fails validation).
    """

    disabled: bool = False
    timeout_above_projects: int | None = None
    timeout_seconds: float = 30.0
    timeout_answer: str = "database"
    error_aliases: frozenset[str] = frozenset()
    error_message: str = _INTERNAL
    hidden_fields: frozenset[str] = frozenset()


# -- requests and answers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphQLRequest:
    """One GraphQL request as GraphqlController reads it: ``query``, ``variables``, ``operationName``."""

    query: str
    variables: Any = None
    operation_name: str | None = None

    def hook_params(self) -> dict[str, str]:
        """What :meth:`GitLabSimulator.on_request` hooks see: the query text and the variables as JSON."""
        params = {"query": self.query, "variables": json.dumps(self.variables)}
        if self.operation_name:
            params["operationName"] = self.operation_name
        return params


@dataclass(frozen=True)
class GraphQLAnswer:
    """The HTTP status and JSON body of an answer; ``fault`` names a fault that was served, if any."""

    status: int
    payload: dict[str, Any]
    fault: str | None = None


class GraphQLBadRequest(Exception):
    """A request body that cannot be read as a GraphQL request; carries the answer to give."""

    def __init__(self, answer: GraphQLAnswer) -> None:
        super().__init__(answer.payload)
        self.answer = answer


def _errors(*messages: str) -> dict[str, Any]:
    """GraphqlController#render_error's shape: ``{"errors": [{"message": ...}]}``."""
    return {"errors": [{"message": m} for m in messages]}


def read_request(body: bytes | None, content_type: str, query_pairs: list[tuple[str, str]]) -> GraphQLRequest:
    """The request from a POST body (JSON object or form) or, for GET, from the query string.

    Rails merges both into ``params``; a JSON array is Apollo-style batching (``_json``), which the
    simulator does not implement (it answers 422 saying so).
    """
    params: dict[str, Any] = dict(query_pairs)
    if body:
        if content_type.split(";", 1)[0].strip().lower() == "application/json":
            try:
                decoded = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise GraphQLBadRequest(GraphQLAnswer(400, _errors("The request body is not valid JSON"))) from None
            if isinstance(decoded, list):
                raise GraphQLBadRequest(GraphQLAnswer(
                    422, _errors("Multiplexed (batched) queries are not implemented by the simulator")))
            if not isinstance(decoded, dict):
                raise GraphQLBadRequest(GraphQLAnswer(400, _errors("The request body is not a JSON object")))
            params.update(decoded)
        else:
            params.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    query = params.get("query")
    operation = params.get("operationName")
    return GraphQLRequest(
        query=query if isinstance(query, str) else "",
        variables=params.get("variables"),
        operation_name=operation if isinstance(operation, str) and operation else None,
    )


def _variables(raw: Any) -> dict[str, Any]:
    """Gitlab::Graphql::Variables#to_h: a Hash, a JSON string of one, or nothing; else a 422."""
    value = raw
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise GraphQLBadRequest(GraphQLAnswer(422, _errors(str(exc)))) from None
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    raise GraphQLBadRequest(GraphQLAnswer(422, _errors(f"Unexpected parameter: {value}")))


# -- values: global IDs, cursors, times ---------------------------------------------------------------

_GID = re.compile(r"^gid://([^/\s]+)/([A-Za-z][A-Za-z0-9_]*(?:::[A-Za-z][A-Za-z0-9_]*)*)/([^/?#\s]+)(?:\?.*)?$")
# Model classes the simulated GitLab knows; another name in a GID makes GitLab's parse_gid fail with a
# NoMethodError (GlobalID#model_class is nil), which GraphqlController answers with a 500.
_KNOWN_MODELS = frozenset({
    "Project", "Group", "Namespace", "User", "Ci::Pipeline", "Ci::Build", "Ci::Bridge", "CommitStatus",
    "Ci::Runner", "Issue", "MergeRequest", "Milestone", "Label", "Note", "Snippet", "Environment",
})


class _InternalServerError(Exception):
    """A failure GitLab does not turn into a GraphQL error: the whole answer becomes a 500."""


def gid(model: str, model_id: int | str) -> str:
    """A GitLab global ID: ``object.to_global_id`` (Types::BaseObject#id)."""
    return f"gid://gitlab/{model}/{model_id}"


def _parse_project_gid(value: str) -> int | None:
    """GitlabSchema.parse_gid(value, expected_type: ::Project).model_id (app/graphql/gitlab_schema.rb) as
    ProjectsResolver#parse_gids calls it; None for an id no row can have (``where(id: 'abc')`` finds none).
    """
    from graphql import GraphQLError

    match = _GID.match(value)
    if match is None:
        raise GraphQLError(f"{value} is not a valid GitLab ID.")
    model, model_id = match.group(2), match.group(3)
    if model not in _KNOWN_MODELS:
        raise _InternalServerError(f"unknown model class {model}")
    if model != "Project":
        raise GraphQLError(f"{value} is not a valid ID for Project.")
    return int(model_id) if model_id.isdigit() else None


def encode_cursor(row_id: int) -> str:
    """Keyset::Connection#cursor_for: the order's cursor attributes as JSON (``{"id":"123"}``, values as
    strings), through graphql-ruby's Base64Encoder (urlsafe, no padding)."""
    text = json.dumps({"id": str(row_id)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The id in a cursor, with graphql-ruby's error for bad base64 (``Invalid cursor: "..."``) and
    GitLab's for anything else (Keyset::Connection#ordering_from_encoded_json)."""
    from graphql import GraphQLError

    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise GraphQLError(f"Invalid cursor: {json.dumps(cursor)}") from None
    try:
        value = json.loads(raw.decode("utf-8"))["id"]
        return int(value)
    except (UnicodeDecodeError, ValueError, TypeError, KeyError):
        raise GraphQLError("Please provide a valid cursor") from None


def _serialize_time(value: Any) -> str:
    """Types::TimeType.coerce_result: ``value.iso8601``, i.e. whole seconds (truncated) and ``Z`` in UTC."""
    if not isinstance(value, datetime):
        raise TypeError(f"not a time: {value!r}")
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_ISO_TIME = re.compile(
    r"^(\d{4}-\d{2}-\d{2})(?:[T ](\d{2}:\d{2}(?::\d{2})?)(?:\.(\d+))?)?\s*(Z|z|[+-]\d{2}(?::?\d{2})?)?$"
)


def _parse_time(value: Any) -> datetime:
    """Types::TimeType.coerce_input: ``Time.zone.parse(value)`` (zone UTC), keeping fractions of a second
    (to the microsecond, as PostgreSQL stores them); GitLab's message when nothing can be read."""
    from graphql import GraphQLError

    match = _ISO_TIME.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise GraphQLError(f"Can not coerce {value} to a time")
    day, clock, fraction, zone = match.groups()
    text = day + "T" + (clock or "00:00")
    if fraction:
        text += "." + (fraction + "000000")[:6]
    if zone and zone not in ("Z", "z"):
        text += zone if ":" in zone else f"{zone[:3]}:{zone[3:] or '00'}"  # Python 3.10 needs +HH:MM
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:  # Ruby: ArgumentError "argument out of range"
        raise GraphQLError(str(exc)) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _parse_time_literal(node: Any, _variables: Any = None) -> datetime:
    from graphql import GraphQLError, StringValueNode

    if not isinstance(node, StringValueNode):
        raise GraphQLError("Time must be a string")
    return _parse_time(node.value)


# -- connections --------------------------------------------------------------------------------------


def _cap(value: int | None, max_page_size: int) -> int | None:
    """graphql-ruby's limit_pagination_argument: below 0 is 0, above the max page size is the max."""
    if value is None:
        return None
    return max(0, min(value, max_page_size))


def _connection(
    rows: list[Any], args: dict[str, Any], max_page_size: int, *, descending: bool = True
) -> dict[str, Any]:
    """A keyset connection over ``rows`` (sorted by id, descending unless told), as
    Gitlab::Graphql::Pagination::Keyset::Connection pages it (lib/gitlab/graphql/pagination/keyset/
    connection.rb): ``after``/``before`` compare ids, so rows deleted between two requests shift nothing;
    ``first`` defaults to the max page size when ``last`` is absent (graphql-ruby's Connection#first);
    ``hasNextPage`` is true with ``before``, else (with ``first``) whether a row beyond the page exists;
    ``hasPreviousPage`` is true with ``after``, else (with ``last``) whether a row before it exists.
    """
    from graphql import GraphQLError

    if args.get("first") is not None and args.get("last") is not None:
        raise GraphQLError("Can only provide either `first` or `last`, not both")
    first, last = _cap(args.get("first"), max_page_size), _cap(args.get("last"), max_page_size)
    if first is None and last is None:
        first = max_page_size
    before, after = args.get("before"), args.get("after")
    sliced = rows
    if before:
        edge = decode_cursor(before)
        sliced = [r for r in sliced if (r.id > edge if descending else r.id < edge)]
    if after:
        edge = decode_cursor(after)
        sliced = [r for r in sliced if (r.id < edge if descending else r.id > edge)]
    limit = min(v for v in (first, last, max_page_size) if v is not None)
    has_previous = False
    if last is not None:
        window = sliced[max(0, len(sliced) - limit - 1):]
        has_previous = len(window) > limit
        nodes = window[len(window) - limit:] if has_previous else window
    else:
        window = sliced[: limit + 1]
        nodes = window[:limit]
    has_next = True if before else (len(window) > limit if first is not None else False)
    edges = [{"cursor": encode_cursor(n.id), "node": n} for n in nodes]
    return {
        "nodes": nodes,
        "edges": edges,
        "pageInfo": {
            "hasNextPage": has_next,
            "hasPreviousPage": True if after else has_previous,
            "startCursor": edges[0]["cursor"] if edges else None,
            "endCursor": edges[-1]["cursor"] if edges else None,
        },
    }


# -- resolvers ----------------------------------------------------------------------------------------


@dataclass
class _Context:
    """What the resolvers of one request share (graphql-core's ``info.context``)."""

    world: World
    anonymous: bool
    base_url: str
    limits: GraphQLLimits
    faults: GraphQLFaults
    max_complexity: int
    score: int = 0
    timed_out: bool = False
    failed_aliases: list[str] = field(default_factory=list)
    schema: Any = None  # the GraphQLSchema this request is answered with

    def can_see(self, project: Project) -> bool:
        """ProjectsFinder's visibility: readable by the token, and public when there is no token."""
        return self.world.readable(project) and (not self.anonymous or project.visibility == "public")

    def enter_root(self, info: Any) -> None:
        """Faults that strike top-level fields: a graphql-ruby timeout, an error for chosen aliases."""
        from graphql import GraphQLError

        if self.timed_out:
            # GraphQL::Schema::Timeout::TimeoutError: "Timeout on #{parent_type.graphql_name}.#{field}".
            raise GraphQLError(f"Timeout on Query.{info.field_name}")
        if info.path.key in self.faults.error_aliases:
            self.failed_aliases.append(str(info.path.key))
            raise GraphQLError(self.faults.error_message)


def _root(resolve: Callable[..., Any]) -> Callable[..., Any]:
    """A top-level resolver that first gives the root faults their chance."""

    def wrapped(root: Any, info: Any, **args: Any) -> Any:
        info.context.enter_root(info)
        return resolve(root, info, **args)

    return wrapped


def _user(info: Any, user: dict[str, Any] | None) -> dict[str, Any] | None:
    """The UserCore object for a pipeline's (or the token's) user, from the same record REST renders."""
    if user is None:
        return None
    ctx: _Context = info.context
    return ctx.world.basic_user(user, ctx.base_url)


def _resolve_projects(_root_value: Any, info: Any, **args: Any) -> dict[str, Any]:
    """Query.projects (Resolvers::ProjectsResolver → ProjectsFinder): projects visible to the user, those
    in ``ids`` only when given (an invisible or deleted one is simply not found), ``id_desc`` by default."""
    ctx: _Context = info.context
    wanted = None if args.get("ids") is None else {_parse_project_gid(str(v)) for v in args["ids"]}
    projects = [p for p in ctx.world.readable_projects() if ctx.can_see(p)]
    if wanted is not None:
        projects = [p for p in projects if p.id in wanted]
    if args.get("membership"):
        projects = [p for p in projects if p.member]
    if args.get("search"):
        needle = str(args["search"]).lower()
        projects = [p for p in projects if needle in p.name.lower() or needle in p.path_with_namespace.lower()]
    descending = args.get("sort") != "id_asc"
    projects.sort(key=lambda p: p.id, reverse=descending)
    return _connection(projects, args, ctx.limits.max_page_size, descending=descending)


def _resolve_project(_root_value: Any, info: Any, fullPath: str) -> Project | None:  # noqa: N803 - GraphQL name
    ctx: _Context = info.context
    project = ctx.world.find_project(fullPath) if not fullPath.isdigit() else None
    return project if project is not None and ctx.can_see(project) else None


def _resolve_pipelines(project: Project, info: Any, **args: Any) -> dict[str, Any]:
    """Project.pipelines (Resolvers::Ci::ProjectPipelinesResolver → ResolvesPipelines → Ci::PipelinesFinder),
    newest first (the finder's default ``order(id: :desc)``), keyset-paginated."""
    ctx: _Context = info.context
    items = ctx.world.find_pipelines(
        project.id, scope=args.get("scope"), status=args.get("status"), ref=args.get("ref"),
        sha=args.get("sha"), username=args.get("username"), updated_after=args.get("updatedAfter"),
        updated_before=args.get("updatedBefore"), source=args.get("source"),
    )
    items.sort(key=lambda p: p.id, reverse=True)
    return _connection(items, args, ctx.limits.max_page_size)


def _resolve_commit(pipeline: Pipeline, info: Any) -> Commit | None:
    """Pipeline.commit: null when the repository no longer has it (as REST's commit endpoint 404s)."""
    return info.context.world.commits.get((pipeline.project_id, pipeline.sha))


def _attr(name: str) -> Callable[[Any, Any], Any]:
    return lambda obj, _info: getattr(obj, name)


def _key(name: str) -> Callable[[Any, Any], Any]:
    return lambda obj, _info: obj.get(name)


def _web(path: Callable[[Any], str]) -> Callable[[Any, Any], str]:
    return lambda obj, info: f"{info.context.base_url}/{path(obj)}"


_RESOLVERS: dict[tuple[str, str], Callable[..., Any]] = {
    ("Query", "projects"): _root(_resolve_projects),
    ("Query", "project"): _root(_resolve_project),
    ("Query", "currentUser"): _root(
        lambda _r, info: None if info.context.anonymous else _user(info, info.context.world.current_user)),
    ("Query", "metadata"): _root(lambda _r, info: {
        "version": info.context.world.gitlab_version, "revision": _REVISION, "enterprise": True}),
    ("Query", "queryComplexity"): _root(
        lambda _r, info: {"limit": info.context.max_complexity, "score": info.context.score}),
    ("Project", "id"): lambda p, _i: gid("Project", p.id),
    ("Project", "fullPath"): _attr("path_with_namespace"),
    ("Project", "nameWithNamespace"): _attr("name_with_namespace"),
    ("Project", "webUrl"): _web(lambda p: p.path_with_namespace),
    ("Project", "pipelines"): _resolve_pipelines,
    ("Pipeline", "id"): lambda p, _i: gid("Ci::Pipeline", p.id),
    ("Pipeline", "iid"): lambda p, _i: str(p.iid),
    ("Pipeline", "createdAt"): _attr("created_at"),
    ("Pipeline", "updatedAt"): _attr("updated_at"),
    ("Pipeline", "startedAt"): _attr("started_at"),
    ("Pipeline", "finishedAt"): _attr("finished_at"),
    ("Pipeline", "user"): lambda p, info: _user(info, p.user),
    ("Pipeline", "commit"): _resolve_commit,
    ("Pipeline", "project"): lambda p, info: info.context.world.find_project(p.project_id),
    ("UserCore", "id"): lambda u, _i: gid("User", u["id"]),
    # A user without a public e-mail has none (GitLab stores NULL since 14.x; older rows may hold "").
    ("UserCore", "publicEmail"): lambda u, _i: u.get("public_email") or None,
    ("UserCore", "webUrl"): _key("web_url"),
    ("Commit", "shortId"): lambda c, _i: c.sha[:8],
    ("Commit", "authorEmail"): _attr("author_email"),
    ("Commit", "authorName"): _attr("author_name"),
    ("Commit", "authoredDate"): _attr("authored_date"),
    ("Commit", "webUrl"): lambda c, info: (
        f"{info.context.base_url}/{info.context.world.projects[c.project_id].path_with_namespace}"
        f"/-/commit/{c.sha}"),
}


# -- the schema ---------------------------------------------------------------------------------------

_SCHEMAS: dict[frozenset[str], GraphQLSchema] = {}
_SCHEMAS_LOCK = threading.Lock()


def _schema(hidden_fields: frozenset[str]) -> GraphQLSchema:
    """The simulator's schema (cached), without the ``Type.field`` names in ``hidden_fields``."""
    with _SCHEMAS_LOCK:
        schema = _SCHEMAS.get(hidden_fields)
        if schema is None:
            schema = _build_schema(hidden_fields)
            _SCHEMAS[hidden_fields] = schema
        return schema


def _build_schema(hidden_fields: frozenset[str]) -> GraphQLSchema:
    try:
        from graphql import build_schema
    except ImportError as exc:
        raise GraphQLUnavailable("graphql-core is not installed: pip install 'gitlab-log-shipper[sim]'") from exc
    text = resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    schema = build_schema(text)
    for name in hidden_fields:
        type_name, _, field_name = name.partition(".")
        owner = schema.type_map.get(type_name)
        fields = getattr(owner, "fields", None)
        if not fields or field_name not in fields:
            raise ValueError(f"hidden_fields: the simulator's schema has no field {name!r}")
        del fields[field_name]
    for (type_name, field_name), resolve in _RESOLVERS.items():
        owner_fields = schema.type_map[type_name].fields  # type: ignore[union-attr]
        if field_name in owner_fields:
            owner_fields[field_name].resolve = resolve
    # Enums carry GitLab's lower-case values (Types::Ci::PipelineStatusEnum: ``value: state.to_s``).
    for enum_name in ("PipelineStatusEnum", "PipelineScopeEnum"):
        for value_name, value in schema.type_map[enum_name].values.items():  # type: ignore[union-attr]
            value.value = value_name.lower()
    time = schema.type_map["Time"]
    time.serialize = _serialize_time  # type: ignore[union-attr]
    time.parse_value = _parse_time  # type: ignore[union-attr]
    time.parse_literal = _parse_time_literal  # type: ignore[union-attr]
    return schema


# -- analysis: complexity and depth -------------------------------------------------------------------

# Connection fields with a resolver: (parent, field) -> the resolver's own complexity for the arguments.
# Resolvers::BaseResolver.resolver_complexity (app/graphql/resolvers/base_resolver.rb): 1, +1 with ``sort``,
# +5 with ``search``; ResolvesPipelines (app/graphql/resolvers/concerns/resolves_pipelines.rb) adds 2 for
# ``sha`` and 2 for ``ref``, and declares ``calls_gitaly!`` (+1 in Types::BaseField#field_resolver_complexity).
_RESOLVER_COMPLEXITY: dict[tuple[str, str], Callable[[dict[str, Any]], int]] = {
    ("Query", "projects"): lambda a: 1 + (1 if a.get("sort") else 0) + (5 if a.get("search") else 0),
    ("Project", "pipelines"): lambda a: 1 + (2 if a.get("sha") else 0) + (2 if a.get("ref") else 0) + 1,
}
# Plain fields declared ``calls_gitaly: true`` (Types::BaseField#base_complexity: 1 + 1):
# app/graphql/types/ci/pipeline_type.rb ``field :commit, ..., calls_gitaly: true``.
_GITALY_FIELDS = frozenset({("Pipeline", "commit")})


def _field_complexity(parent: str, name: str, args: dict[str, Any], child: int, max_page_size: int) -> int:
    """One field's complexity, as Types::BaseField computes it (app/graphql/types/base_field.rb; its
    ``complexity_for`` makes graphql-ruby use it for connections too):

    - a connection with a resolver: ``c = child + resolver_complexity``; ``c += c * limit * 0.01`` with
      ``limit = min(first, last, max page size)``; truncated to an integer (``to_i``);
    - any other field: its base complexity (1, or 2 when it calls Gitaly) plus its children.
    """
    resolver = _RESOLVER_COMPLEXITY.get((parent, name))
    if resolver is None:
        return (2 if (parent, name) in _GITALY_FIELDS else 1) + child
    cost = child + resolver(args)
    limit = min(v for v in (args.get("first"), args.get("last"), max_page_size) if v is not None)
    return int(cost + cost * (limit * 0.01))


@dataclass
class _Analysis:
    """The operation's complexity and depth, and how many project ids its ``projects`` fields name."""

    complexity: int
    depth: int
    project_ids: int


def _analyse(schema: GraphQLSchema, exe: Any, max_page_size: int) -> _Analysis:
    """Walk the operation as graphql-ruby's analyzers do: fields merged by response key, fragments
    inlined, ``@skip``/``@include`` honoured, introspection fields counted like any other (1 each)."""
    from graphql.execution.collect_fields import collect_fields

    root = schema.query_type
    fields = collect_fields(schema, exe.fragments, exe.variable_values, root, exe.operation.selection_set)
    ids = 0
    complexity = depth = 0
    for nodes in fields.values():
        cost, deep = _walk(schema, exe, root, nodes, max_page_size)
        complexity += cost
        depth = max(depth, deep)
        if nodes[0].name.value == "projects":
            args = _arguments(root, nodes[0], exe.variable_values)
            ids += len(args.get("ids") or ())
    return _Analysis(complexity, depth, ids)


def _field_def(schema: GraphQLSchema, parent: Any, name: str) -> Any:
    from graphql import SchemaMetaFieldDef, TypeMetaFieldDef, TypeNameMetaFieldDef

    if name == "__typename":
        return TypeNameMetaFieldDef
    if parent is schema.query_type and name == "__schema":
        return SchemaMetaFieldDef
    if parent is schema.query_type and name == "__type":
        return TypeMetaFieldDef
    return parent.fields[name]


def _arguments(parent: Any, node: Any, variables: dict[str, Any]) -> dict[str, Any]:
    from graphql import SchemaMetaFieldDef, TypeMetaFieldDef, TypeNameMetaFieldDef
    from graphql.execution.values import get_argument_values

    name = node.name.value
    meta = {"__typename": TypeNameMetaFieldDef, "__schema": SchemaMetaFieldDef, "__type": TypeMetaFieldDef}
    definition = meta.get(name) or parent.fields[name]
    return get_argument_values(definition, node, variables)


def _walk(schema: GraphQLSchema, exe: Any, parent: Any, nodes: list[Any], max_page_size: int) -> tuple[int, int]:
    """(complexity, depth) of one field (all its merged nodes) and everything below it."""
    from graphql import get_named_type, is_abstract_type, is_object_type
    from graphql.execution.collect_fields import collect_sub_fields

    name = nodes[0].name.value
    named = get_named_type(_field_def(schema, parent, name).type)
    targets: Iterable[Any] = ()
    if is_object_type(named):
        targets = (named,)
    elif is_abstract_type(named):
        targets = schema.get_possible_types(named)
    child = deep = 0
    for target in targets:  # an abstract type costs what its most expensive possible type costs
        sub = collect_sub_fields(schema, exe.fragments, exe.variable_values, target, nodes)
        costs = [_walk(schema, exe, target, sub_nodes, max_page_size) for sub_nodes in sub.values()]
        child = max(child, sum(c for c, _ in costs))
        deep = max([deep, *(d for _, d in costs)])
    args = _arguments(parent, nodes[0], exe.variable_values)
    return _field_complexity(parent.name, name, args, child, max_page_size), deep + 1


def query_complexity(query: str, variables: dict[str, Any] | None = None, *, max_page_size: int = 100) -> int:
    """The complexity GitLab's limit applies to, for a query valid against the simulator's schema.

    For tests and for the report of what a detection query costs; raises ValueError for an invalid query.
    """
    from graphql import parse, validate
    from graphql.execution import ExecutionContext

    schema = _schema(frozenset())
    document = parse(query)
    problems = validate(schema, document)
    exe = ExecutionContext.build(schema, document, raw_variable_values=variables or {}) if not problems else None
    if problems or isinstance(exe, list):
        raise ValueError(f"invalid query: {problems or exe}")
    return _analyse(schema, exe, max_page_size).complexity


# -- errors in graphql-ruby's words -------------------------------------------------------------------

_UNDEFINED_FIELD = re.compile(r"^Cannot query field '([^']+)' on type '([^']+)'\.")
_UNKNOWN_ARGUMENT = re.compile(r"^Unknown argument '([^']+)' on field '([^'.]+)\.([^']+)'\.")
_UNKNOWN_OPERATION = re.compile(r"^Unknown operation named '(.*)'\.$")
_OPERATION_NAME_NEEDED = "Must provide operation name if query contains multiple operations."
_BAD_VARIABLE = re.compile(r"^Variable '\$([^']+)' (?:got invalid value .*?; (.*)|of (?:required|non-null) type .*)$",
                           re.S)


def _formatted(error: GraphQLError, operation: Any = None, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """An error as graphql-ruby words the common validation failures; others in graphql-core's words."""
    out = dict(error.formatted)
    message = error.message
    if match := _UNDEFINED_FIELD.match(message):
        out["message"] = f"Field '{match.group(1)}' doesn't exist on type '{match.group(2)}'"
        out["extensions"] = {"code": "undefinedField", "typeName": match.group(2), "fieldName": match.group(1)}
    elif match := _UNKNOWN_ARGUMENT.match(message):
        out["message"] = f"Field '{match.group(3)}' doesn't accept argument '{match.group(1)}'"
        out["extensions"] = {"code": "argumentNotAccepted", "name": match.group(3), "typeName": "Field",
                             "argumentName": match.group(1)}
    elif message == _OPERATION_NAME_NEEDED:
        out["message"] = "An operation name is required"  # GraphQL::Query::OperationNameMissingError
    elif match := _UNKNOWN_OPERATION.match(message):
        out["message"] = f'No operation named "{match.group(1)}"'
    elif (match := _BAD_VARIABLE.match(message)) and operation is not None:
        out.update(_variable_error(operation, match.group(1), match.group(2), variables or {}))
    return out


def _variable_error(operation: Any, name: str, explanation: str | None, variables: dict[str, Any]) -> dict[str, Any]:
    """graphql-ruby's ``Variable $x of type T was provided invalid value`` with its ``problems``."""
    from graphql import print_ast

    type_text = next((print_ast(d.type) for d in operation.variable_definitions or ()
                      if d.variable.name.value == name), "?")
    return {
        "message": f"Variable ${name} of type {type_text} was provided invalid value",
        "extensions": {
            "value": variables.get(name),
            "problems": [{"path": [], "explanation": explanation or "Expected value to not be null"}],
        },
    }


# -- the service --------------------------------------------------------------------------------------


class GraphQLService:
    """Answers GraphQL requests from a World with GitLab's semantics, limits and (optional) faults.

    ``limits`` and ``faults`` are plain attributes: tests change them between requests. ``stopping`` ends a
    held (timeout) request early when the simulator stops.
    """

    def __init__(self, world: World, stopping: threading.Event, limits: GraphQLLimits | None = None,
                 faults: GraphQLFaults | None = None) -> None:
        self.world = world
        self.limits = limits or GraphQLLimits()
        self.faults = faults or GraphQLFaults()
        self._stopping = stopping

    def schema(self) -> GraphQLSchema:
        """The schema served now (without ``faults.hidden_fields``); GraphQLUnavailable without graphql-core."""
        return _schema(frozenset(self.faults.hidden_fields))

    def answer(self, request: GraphQLRequest, *, anonymous: bool, base_url: str) -> GraphQLAnswer:
        """The answer to one request from an authenticated (or, without a token, anonymous) client.

        The order is GitlabController's and graphql-ruby's: the query-size limit (422), the variables
        (422), parsing and validation (200 with ``errors``), the variables' values, depth and complexity
        (200 with ``errors``, nothing executed), then execution (200 with ``data`` and maybe ``errors``).
        """
        if len(request.query) > self.limits.max_query_size:
            # GraphqlController#limit_query_size raises Gitlab::Graphql::Errors::ArgumentError → 422.
            return GraphQLAnswer(422, _errors("Query too large"))
        try:
            variables = _variables(request.variables)
        except GraphQLBadRequest as bad:
            return bad.answer
        if not request.query.strip():
            return GraphQLAnswer(200, _errors("No query string was present"))
        faults = self.faults
        ctx = _Context(self.world, anonymous, base_url, self.limits, faults,
                       self.limits.max_complexity_anonymous if anonymous else self.limits.max_complexity)
        prepared = self._prepare(request, variables, ctx, frozenset(faults.hidden_fields))
        if isinstance(prepared, GraphQLAnswer):
            return prepared
        document, analysis = prepared
        fault = None
        if faults.timeout_answer not in _TIMEOUT_ANSWERS:
            raise ValueError(f"GraphQLFaults.timeout_answer must be one of {_TIMEOUT_ANSWERS}")
        if faults.timeout_above_projects is not None and analysis.project_ids > faults.timeout_above_projects:
            self._stopping.wait(max(0.0, faults.timeout_seconds))
            fault = f"graphql_timeout ({analysis.project_ids} project ids)"
            if faults.timeout_answer == "database":
                return GraphQLAnswer(503, _errors(_TIMED_OUT), fault)
            ctx.timed_out = True
        return self._execute(document, request, variables, ctx, fault)

    def _prepare(
        self, request: GraphQLRequest, variables: dict[str, Any], ctx: _Context, hidden: frozenset[str]
    ) -> GraphQLAnswer | tuple[Any, _Analysis]:
        """Parse, validate, coerce the variables and run the analyzers; an answer when one of them fails."""
        from graphql import GraphQLError, parse, validate
        from graphql.execution import ExecutionContext

        schema = _schema(hidden)
        ctx.schema = schema
        try:
            document = parse(request.query)
        except GraphQLError as exc:
            return GraphQLAnswer(200, {"errors": [_formatted(exc)]})
        problems = validate(schema, document)
        if problems:
            return GraphQLAnswer(200, {"errors": [_formatted(e) for e in problems]})
        exe = ExecutionContext.build(schema, document, context_value=ctx, raw_variable_values=variables,
                                     operation_name=request.operation_name)
        if isinstance(exe, list):
            operation = _operation(document, request.operation_name)
            return GraphQLAnswer(200, {"errors": [_formatted(e, operation, variables) for e in exe]})
        analysis = _analyse(schema, exe, self.limits.max_page_size)
        ctx.score = analysis.complexity
        max_depth = self.limits.max_depth_anonymous if ctx.anonymous else self.limits.max_depth
        errors = []
        if analysis.depth > max_depth:
            # GraphQL::Analysis::AST::MaxQueryDepth's message.
            errors.append(f"Query has depth of {analysis.depth}, which exceeds max depth of {max_depth}")
        if analysis.complexity > ctx.max_complexity:
            # GraphQL::Analysis::AST::MaxQueryComplexity's message.
            errors.append(f"Query has complexity of {analysis.complexity}, "
                          f"which exceeds max complexity of {ctx.max_complexity}")
        if errors:
            return GraphQLAnswer(200, _errors(*errors))
        return document, analysis

    def _execute(
        self, document: Any, request: GraphQLRequest, variables: dict[str, Any], ctx: _Context, fault: str | None
    ) -> GraphQLAnswer:
        """Run the operation under the world's lock (one consistent snapshot, as one database read)."""
        from graphql import execute

        with self.world.lock:
            result = execute(ctx.schema, document, context_value=ctx, variable_values=variables,
                             operation_name=request.operation_name)
        errors = result.errors or []
        if any(isinstance(e.original_error, _InternalServerError) for e in errors):
            return GraphQLAnswer(500, _errors(_INTERNAL), fault)
        if ctx.failed_aliases and fault is None:
            fault = f"graphql_alias_error ({', '.join(ctx.failed_aliases)})"
        payload: dict[str, Any] = {"data": result.data}
        if errors:
            payload["errors"] = [_formatted(e) for e in errors]
        return GraphQLAnswer(200, payload, fault)


def _operation(document: Any, name: str | None) -> Any:
    from graphql.utilities import get_operation_ast

    return get_operation_ast(document, name)
