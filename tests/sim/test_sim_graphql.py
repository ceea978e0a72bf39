"""The simulator's GraphQL API (``/api/graphql``), over real HTTP on loopback, checked against what GitLab's
source and its 16.x SDL say. Each test names the GitLab behaviour it pins down."""

from __future__ import annotations

import base64
import json
import random
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import gitlab
import graphql
import pytest
import requests

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.graphql import SCHEMA_FILE, decode_cursor, encode_cursor, query_complexity
from gitlab_log_shipper.sim.world import AVAILABLE_STATUSES, JobSpec, Pipeline, Project, World

from conftest import REPO_ROOT, SAMPLES_DIR
from shipper_helpers import ManualClock

T0 = datetime(2026, 10, 1, 10, 0, 0, 123456, tzinfo=timezone.utc)
GITLAB_SDL = SAMPLES_DIR / "graphql" / "gitlab_schema_16.graphql"
OUR_SDL = REPO_ROOT / "gitlab_log_shipper" / "sim" / SCHEMA_FILE

# What the simulator's SDL marks NEWER than GitLab's 16.x file.
NEWER_FIELDS = {"Pipeline.source"}
NEWER_ENUM_VALUES = {"PipelineStatusEnum.CANCELING", "PipelineStatusEnum.WAITING_FOR_CALLBACK"}

PIPELINE_FIELDS = "id iid status source updatedAt user { publicEmail } commit { authorEmail }"


def block(alias: str, ids_var: str, after_var: str, first: int = 100) -> str:
    """One aliased projects block of the shipper's detection query (the contract in the task)."""
    connection = f"pageInfo {{ hasNextPage endCursor }} nodes {{ {PIPELINE_FIELDS} }}"
    return (
        f"{alias}: projects(ids: ${ids_var}, first: {first}) {{ pageInfo {{ hasNextPage endCursor }} nodes {{ id "
        f"all: pipelines(updatedAfter: ${after_var}, first: 100) {{ {connection} }} "
        f'children: pipelines(updatedAfter: ${after_var}, source: "parent_pipeline", first: 100) {{ {connection} }} '
        "} }"
    )


def detect_query(blocks: int, first: int = 100) -> str:
    """The detection query with ``blocks`` aliased ``projects(ids:)`` blocks b0, b1, ..."""
    params = ", ".join(f"$ids{i}: [ID!], $after{i}: Time" for i in range(blocks))
    body = "\n".join(block(f"b{i}", f"ids{i}", f"after{i}", first) for i in range(blocks))
    return f"query Detect({params}) {{\n{body}\n}}"


PROBE = """{ metadata { version } currentUser { username }
  pipelineType: __type(name: "Pipeline") { fields { name } }
  projectType: __type(name: "Project") { fields { name args { name } } } }"""


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def world(clock: ManualClock) -> World:
    return World(clock=clock, gitlab_version="17.5.0")


@pytest.fixture
def sim(world: World) -> Any:
    with GitLabSimulator(world) as simulator:
        yield simulator


def post(sim: GitLabSimulator, query: str, variables: dict[str, Any] | None = None, *,
         token: str | None = "default", headers: dict[str, str] | None = None) -> requests.Response:
    sent = dict(headers or {})
    if token == "default":
        sent["PRIVATE-TOKEN"] = sim.world.token
    elif token is not None:
        sent["PRIVATE-TOKEN"] = token
    return requests.post(f"{sim.url}/api/graphql", json={"query": query, "variables": variables or {}},
                         headers=sent, timeout=30)


def data(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    payload = response.json()
    assert "errors" not in payload, payload["errors"]
    return payload["data"]


def project_gid(project: Project) -> str:
    return f"gid://gitlab/Project/{project.id}"


def make_project(world: World, path: str = "app") -> Project:
    group = world.find_group("acme") or world.add_group("acme")
    return world.add_project(path, group_id=group.id)


def pipelines_page(sim: GitLabSimulator, project: Project, args: str) -> dict[str, Any]:
    query = (f"query($ids: [ID!]) {{ projects(ids: $ids) {{ nodes {{ pipelines({args}) {{ "
             "pageInfo { hasNextPage hasPreviousPage startCursor endCursor } nodes { id } } } } }")
    nodes = data(post(sim, query, {"ids": [project_gid(project)]}))["projects"]["nodes"]
    assert len(nodes) == 1
    return nodes[0]["pipelines"]


def ids_of(connection: dict[str, Any]) -> list[int]:
    return [int(n["id"].rsplit("/", 1)[1]) for n in connection["nodes"]]


def rest(sim: GitLabSimulator, path: str, **params: Any) -> requests.Response:
    return requests.get(f"{sim.url}/api/v4{path}", params=params, headers={"PRIVATE-TOKEN": sim.world.token},
                        timeout=10)


# -- the schema is GitLab's ---------------------------------------------------------------------------


def _type_text(t: Any) -> str:
    return str(t)


def test_every_type_field_and_argument_is_gitlabs_with_the_same_type() -> None:
    """The simulator's SDL is a subset of GitLab's 16.x SDL (names and types), apart from the fields and
    enum values it marks NEWER, which must really be absent there (so the marks are honest)."""
    ours = graphql.build_schema(OUR_SDL.read_text(encoding="utf-8"))
    theirs = graphql.build_schema(GITLAB_SDL.read_text(encoding="utf-8"), assume_valid=True)
    newer_seen: set[str] = set()
    checked = 0
    for name, our_type in ours.type_map.items():
        if name.startswith("__") or name in ("String", "Int", "Boolean", "ID", "Float"):
            continue
        their_type = theirs.type_map.get(name)
        assert their_type is not None, f"type {name} is not GitLab's"
        assert type(their_type) is type(our_type), f"{name} is a {type(their_type).__name__} on GitLab"
        if isinstance(our_type, graphql.GraphQLEnumType):
            for value in our_type.values:
                if f"{name}.{value}" in NEWER_ENUM_VALUES:
                    assert value not in their_type.values
                    newer_seen.add(f"{name}.{value}")
                else:
                    assert value in their_type.values, f"{name}.{value} is not GitLab's"
        if not isinstance(our_type, graphql.GraphQLObjectType):
            continue
        for field_name, our_field in our_type.fields.items():
            qualified = f"{name}.{field_name}"
            if qualified in NEWER_FIELDS:
                assert field_name not in their_type.fields, f"{qualified} is in the 16.x file: not NEWER"
                newer_seen.add(qualified)
                continue
            their_field = their_type.fields.get(field_name)
            assert their_field is not None, f"{qualified} is not GitLab's"
            assert _type_text(our_field.type) == _type_text(their_field.type), qualified
            for arg_name, our_arg in our_field.args.items():
                their_arg = their_field.args.get(arg_name)
                assert their_arg is not None, f"{qualified}({arg_name}:) is not GitLab's"
                assert _type_text(our_arg.type) == _type_text(their_arg.type), f"{qualified}({arg_name}:)"
            checked += 1
    assert newer_seen == NEWER_FIELDS | NEWER_ENUM_VALUES
    assert checked > 40
    sdl = OUR_SDL.read_text(encoding="utf-8")
    assert sdl.count("# NEWER:") == 2  # one comment per NEWER group, each saying where it comes from


# -- values: global IDs, enums, times -----------------------------------------------------------------


def test_global_ids_upper_case_enums_string_iids_and_whole_second_times(sim: GitLabSimulator, world: World) -> None:
    """Types::BaseObject#id is ``to_global_id``; PipelineStatusEnum is upper case; iid is a String;
    Types::TimeType writes ``iso8601``: whole seconds, ``Z``; finishedAt is null for skipped and manual."""
    project = make_project(world)
    made = {status: world.add_pipeline(project.id, status=status)
            for status in ("success", "failed", "canceled", "skipped", "manual", "running")}
    query = ("query($ids: [ID!]) { projects(ids: $ids) { nodes { id fullPath pipelines { nodes { "
             "id iid status source createdAt updatedAt finishedAt } } } } }")
    answer = data(post(sim, query, {"ids": [project_gid(project)]}))
    node = answer["projects"]["nodes"][0]
    assert node["id"] == f"gid://gitlab/Project/{project.id}"
    assert node["fullPath"] == "acme/app"
    by_id = {n["id"]: n for n in node["pipelines"]["nodes"]}
    for status, pipeline in made.items():
        row = by_id[f"gid://gitlab/Ci::Pipeline/{pipeline.id}"]
        assert row["status"] == status.upper()
        assert row["iid"] == str(pipeline.iid)
        assert row["source"] == "push"
        assert row["updatedAt"] == pipeline.updated_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert row["createdAt"].endswith("Z") and "." not in row["createdAt"]
        if status in ("success", "failed", "canceled"):
            assert row["finishedAt"] == pipeline.finished_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        else:
            assert row["finishedAt"] is None
    assert world.pipelines[made["success"].id].updated_at.microsecond != 0  # whole seconds were a choice


def test_a_malformed_gid_fails_its_block_in_gitlabs_words_and_the_others_are_answered(
    sim: GitLabSimulator, world: World
) -> None:
    """GitlabSchema.parse_gid: ``X is not a valid GitLab ID.`` / ``X is not a valid ID for Project.``, raised
    as Gitlab::Graphql::Errors::ArgumentError (an ExecutionError): that field is null, the rest answered."""
    project = make_project(world)
    query = ("query($a: [ID!], $b: [ID!], $c: [ID!]) { a: projects(ids: $a) { nodes { id } } "
             "b: projects(ids: $b) { nodes { id } } c: projects(ids: $c) { nodes { id } } }")
    response = post(sim, query, {"a": [str(project.id)], "b": ["gid://gitlab/Ci::Pipeline/5"],
                                 "c": [project_gid(project)]})
    assert response.status_code == 200
    payload = response.json()
    assert payload["data"]["a"] is None and payload["data"]["b"] is None
    assert payload["data"]["c"] == {"nodes": [{"id": project_gid(project)}]}
    messages = {tuple(e["path"]): e["message"] for e in payload["errors"]}
    assert messages == {("a",): f"{project.id} is not a valid GitLab ID.",
                        ("b",): "gid://gitlab/Ci::Pipeline/5 is not a valid ID for Project."}
    assert all(e["locations"] for e in payload["errors"])


# -- order and keyset pagination ----------------------------------------------------------------------


def test_pipelines_come_newest_first_and_a_deletion_between_pages_skips_nothing(
    sim: GitLabSimulator, world: World
) -> None:
    """Keyset::Connection slices on the id (``WHERE id < cursor`` for id desc), not an offset: deleting a
    row of page 1 before page 2 is read must not push a row out of sight."""
    project = make_project(world)
    made = [world.add_pipeline(project.id).id for _ in range(7)]
    newest_first = sorted(made, reverse=True)
    page1 = pipelines_page(sim, project, "first: 3")
    assert ids_of(page1) == newest_first[:3]
    assert page1["pageInfo"]["hasNextPage"] is True and page1["pageInfo"]["hasPreviousPage"] is False
    assert decode_cursor(page1["pageInfo"]["endCursor"]) == newest_first[2]
    raw = base64.urlsafe_b64decode(page1["pageInfo"]["endCursor"] + "==")
    assert json.loads(raw) == {"id": str(newest_first[2])}  # {"id":"..."}, urlsafe base64 like GitLab's
    world.delete_pipeline(newest_first[0])
    world.delete_pipeline(newest_first[2])  # the very row the cursor points at
    after = page1["pageInfo"]["endCursor"]
    page2 = pipelines_page(sim, project, f'first: 3, after: "{after}"')
    assert ids_of(page2) == newest_first[3:6]
    assert page2["pageInfo"]["hasNextPage"] is True and page2["pageInfo"]["hasPreviousPage"] is True
    page3 = pipelines_page(sim, project, f'first: 3, after: "{page2["pageInfo"]["endCursor"]}"')
    assert ids_of(page3) == newest_first[6:]
    assert page3["pageInfo"]["hasNextPage"] is False
    back = pipelines_page(sim, project, f'last: 2, before: "{page3["pageInfo"]["startCursor"]}"')
    assert ids_of(back) == newest_first[4:6]
    assert back["pageInfo"]["hasNextPage"] is True and back["pageInfo"]["hasPreviousPage"] is True
    # GitLab's rules, not a count: with ``before`` there is always a next page; without ``first`` (only
    # ``last``) and no row before, no previous one.
    top = pipelines_page(sim, project, f'last: 10, before: "{page3["pageInfo"]["startCursor"]}"')
    assert ids_of(top) == [newest_first[1], *newest_first[3:6]]
    assert top["pageInfo"]["hasNextPage"] is True and top["pageInfo"]["hasPreviousPage"] is False


def test_page_size_is_capped_at_100_and_first_defaults_to_it(sim: GitLabSimulator, world: World) -> None:
    """``default_max_page_size 100`` (app/graphql/gitlab_schema.rb); graphql-ruby caps ``first`` at it and
    uses it when neither ``first`` nor ``last`` is given; ``first`` with ``last`` is GitLab's error."""
    project = make_project(world)
    for _ in range(105):
        world.add_pipeline(project.id)
    for args in ("first: 500", "updatedAfter: null"):
        page = pipelines_page(sim, project, args)
        assert len(page["nodes"]) == 100 and page["pageInfo"]["hasNextPage"] is True
    rest_of_it = pipelines_page(sim, project, f'first: 500, after: "{page["pageInfo"]["endCursor"]}"')
    assert len(rest_of_it["nodes"]) == 5 and rest_of_it["pageInfo"]["hasNextPage"] is False
    both = post(sim, "query($ids: [ID!]) { projects(ids: $ids) { nodes { pipelines(first: 1, last: 1) { "
                     "nodes { id } } } } }", {"ids": [project_gid(project)]})
    assert both.json()["errors"][0]["message"] == "Can only provide either `first` or `last`, not both"
    bad = pipelines_page_raw(sim, project, 'after: "not base64!"')
    assert bad["errors"][0]["message"] == 'Invalid cursor: "not base64!"'
    junk = base64.urlsafe_b64encode(b"[1,2").decode().rstrip("=")
    assert pipelines_page_raw(sim, project, f'after: "{junk}"')["errors"][0]["message"] == \
        "Please provide a valid cursor"


def pipelines_page_raw(sim: GitLabSimulator, project: Project, args: str) -> dict[str, Any]:
    query = f"query($ids: [ID!]) {{ projects(ids: $ids) {{ nodes {{ pipelines({args}) {{ nodes {{ id }} }} }} }} }}"
    response = post(sim, query, {"ids": [project_gid(project)]})
    assert response.status_code == 200
    return response.json()


def test_projects_ids_page_like_pipelines_and_leave_out_what_the_token_cannot_see(
    sim: GitLabSimulator, world: World
) -> None:
    """ProjectsFinder only returns projects visible to the user: a project the token cannot read, or a
    deleted one, is simply not in the answer (no error); REST answers 404 for the same projects."""
    projects = [make_project(world, f"p{i}") for i in range(5)]
    world.hide_project(projects[1].id)
    world.delete_project(projects[3].id)
    query = ("query($ids: [ID!], $after: String) { projects(ids: $ids, first: 2, after: $after) { "
             "pageInfo { hasNextPage endCursor } nodes { id } } }")
    variables: dict[str, Any] = {"ids": [project_gid(p) for p in projects] + ["gid://gitlab/Project/1"]}
    seen: list[str] = []
    for _ in range(5):
        page = data(post(sim, query, variables))["projects"]
        seen += [n["id"] for n in page["nodes"]]
        if not page["pageInfo"]["hasNextPage"]:
            break
        variables["after"] = page["pageInfo"]["endCursor"]
    assert seen == [project_gid(p) for p in sorted((projects[0], projects[2], projects[4]),
                                                    key=lambda p: p.id, reverse=True)]
    assert rest(sim, f"/projects/{projects[1].id}").status_code == 404
    assert rest(sim, f"/projects/{projects[1].id}/pipelines").json() == {"message": "404 Project Not Found"}
    assert projects[1].id not in [p["id"] for p in rest(sim, "/projects").json()]


# -- the same pipelines as REST -----------------------------------------------------------------------


def test_updated_after_is_inclusive_at_full_precision_like_rest(
    sim: GitLabSimulator, world: World, clock: ManualClock
) -> None:
    """Ci::PipelinesFinder → UpdatedAtFilter → UpdatedAtFilterable ``updated_at.gteq(time)``: a pipeline
    updated exactly at ``updatedAfter`` is in, one microsecond later it is out; fractions of the input
    count (Time.zone.parse keeps them) although the output shows whole seconds. REST says the same."""
    project = make_project(world)
    pipeline = world.add_pipeline(project.id)
    stamp = pipeline.updated_at
    assert stamp.microsecond == T0.microsecond != 0
    for bound, listed in ((stamp, True), (stamp + timedelta(microseconds=1), False),
                          (stamp - timedelta(microseconds=1), True)):
        text = bound.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        page = pipelines_page(sim, project, f'updatedAfter: "{text}"')
        assert (ids_of(page) == [pipeline.id]) is listed, text
        rest_ids = [p["id"] for p in rest(sim, f"/projects/{project.id}/pipelines", updated_after=text).json()]
        assert (rest_ids == [pipeline.id]) is listed, text
    offset = (stamp + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S.%f+02:00")  # the same instant
    assert ids_of(pipelines_page(sim, project, f'updatedAfter: "{offset}"')) == [pipeline.id]
    before = pipelines_page(sim, project, f'updatedBefore: "{(stamp - timedelta(seconds=1)).isoformat()}"')
    assert ids_of(before) == []


def test_child_pipelines_only_with_source_parent_pipeline(sim: GitLabSimulator, world: World) -> None:
    """``prefiltered_pipelines`` in app/finders/ci/pipelines_finder.rb (GitLab 17.0+): ``no_child`` unless
    ``source == 'parent_pipeline'``; an unknown source string is ignored (``by_source`` checks
    ``Ci::Pipeline.sources.key?``)."""
    project = make_project(world)
    parent = world.add_pipeline(project.id)
    child = world.add_child_pipeline(parent.id)
    assert ids_of(pipelines_page(sim, project, "first: 10")) == [parent.id]
    assert ids_of(pipelines_page(sim, project, 'source: "parent_pipeline"')) == [child.id]
    assert ids_of(pipelines_page(sim, project, 'source: "push"')) == [parent.id]
    assert ids_of(pipelines_page(sim, project, 'source: "no-such-source"')) == [parent.id]
    assert [p["id"] for p in rest(sim, f"/projects/{project.id}/pipelines", source="parent_pipeline").json()] \
        == [child.id]


def test_before_gitlab_17_source_parent_pipeline_lists_nothing(clock: ManualClock) -> None:
    """GitLab < 17.0's Ci::PipelinesFinder ran ``items.no_child`` unconditionally and then ``by_source``:
    ``source: "parent_pipeline"`` is accepted (the 16.x SDL has the argument) and finds nothing, on
    GraphQL as on REST; the version shows in ``metadata`` and ``/version``."""
    world = World(clock=clock, gitlab_version="16.11.0")
    project = make_project(world)
    parent = world.add_pipeline(project.id)
    world.add_child_pipeline(parent.id)
    with GitLabSimulator(world) as sim:
        assert ids_of(pipelines_page(sim, project, 'source: "parent_pipeline"')) == []
        assert ids_of(pipelines_page(sim, project, "first: 10")) == [parent.id]
        assert rest(sim, f"/projects/{project.id}/pipelines", source="parent_pipeline").json() == []
        assert data(post(sim, "{ metadata { version } }"))["metadata"]["version"] == "16.11.0"
        assert rest(sim, "/version").json()["version"] == "16.11.0"


def test_user_public_email_and_commit_author_email_follow_the_world(sim: GitLabSimulator, world: World) -> None:
    """``user { publicEmail }`` is the pipeline user's public e-mail (null without one, and ``user`` null
    once the user is deleted); ``commit { authorEmail }`` is null when the repository lost the commit.
    REST shows the same user and the same commit."""
    project = make_project(world)
    alice = world.add_user("alice", public_email="alice@example.com")
    bob = world.add_user("bob")
    carol = world.add_user("carol", public_email="carol@example.com")
    with_email = world.add_pipeline(project.id, user=alice, author_email="a@dev.example")
    without = world.add_pipeline(project.id, user=bob, author_email="b@dev.example")
    deleted_user = world.add_pipeline(project.id, user=carol, author_email="c@dev.example")
    lost_commit = world.add_pipeline(project.id, user=alice, sha="f" * 40)
    world.delete_user(carol["id"])
    del world.commits[(project.id, "f" * 40)]
    query = (f"query($ids: [ID!]) {{ projects(ids: $ids) {{ nodes {{ pipelines {{ nodes {{ {PIPELINE_FIELDS} }} }} "
             "} } }")
    rows = data(post(sim, query, {"ids": [project_gid(project)]}))["projects"]["nodes"][0]["pipelines"]["nodes"]
    got = {int(r["id"].rsplit("/", 1)[1]): (r["user"], r["commit"]) for r in rows}
    assert got[with_email.id] == ({"publicEmail": "alice@example.com"}, {"authorEmail": "a@dev.example"})
    assert got[without.id] == ({"publicEmail": None}, {"authorEmail": "b@dev.example"})
    assert got[deleted_user.id] == (None, {"authorEmail": "c@dev.example"})
    assert got[lost_commit.id] == ({"publicEmail": "alice@example.com"}, None)
    assert rest(sim, f"/projects/{project.id}/pipelines/{with_email.id}").json()["user"]["public_email"] \
        == "alice@example.com"
    assert rest(sim, f"/projects/{project.id}/pipelines/{deleted_user.id}").json()["user"] is None
    assert rest(sim, f"/projects/{project.id}/repository/commits/{'f' * 40}").status_code == 404


def _random_world(seed: int, clock: ManualClock) -> World:
    """Projects whose pipelines start, finish, are retried, touched and deleted at random moments."""
    rng = random.Random(seed)
    world = World(clock=clock, gitlab_version="17.5.0")
    projects = [make_project(world, f"p{i}") for i in range(4)]
    live: list[Pipeline] = []
    for _ in range(90):
        clock.advance(rng.uniform(0.0, 40.0))
        roll = rng.random()
        if roll < 0.45 or not live:
            status = rng.choice(AVAILABLE_STATUSES)
            live.append(world.add_pipeline(rng.choice(projects).id, status=status, jobs=[JobSpec("build")]))
        elif roll < 0.6:
            live.append(world.add_child_pipeline(rng.choice(live).id, status=rng.choice(("success", "failed"))))
        elif roll < 0.75:
            world.touch_pipeline(rng.choice(live).id)
        elif roll < 0.85:
            target = rng.choice(live)
            if target.status in ("failed", "canceled"):
                world.retry_pipeline(target.id)
                world.finish_pipeline(target.id, "success")
        else:
            target = live.pop(rng.randrange(len(live)))
            world.delete_pipeline(target.id)
    return world


def _rest_window(sim: GitLabSimulator, project: Project, since: str, source: str | None) -> dict[int, tuple[str, str]]:
    rows: dict[int, tuple[str, str]] = {}
    page = 1
    while page:
        params: dict[str, Any] = {"updated_after": since, "per_page": 100, "page": page}
        if source:
            params["source"] = source
        response = rest(sim, f"/projects/{project.id}/pipelines", **params)
        for row in response.json():
            rows[row["id"]] = (row["status"].upper(), row["updated_at"][:19] + "Z")
        page = int(response.headers["X-Next-Page"] or 0)
    return rows


def _graphql_window(sim: GitLabSimulator, projects: list[Project], since: str) -> dict[int, tuple[str, str]]:
    """Every pipeline the detection query (one block, pages followed per project) returns for the window."""
    rows: dict[int, tuple[str, str]] = {}
    first = data(post(sim, detect_query(1, first=100), {"ids0": [project_gid(p) for p in projects],
                                                        "after0": since}))["b0"]
    assert first["pageInfo"]["hasNextPage"] is False
    for node in first["nodes"]:
        for alias in ("all", "children"):
            connection = node[alias]
            while True:
                for row in connection["nodes"]:
                    rows[int(row["id"].rsplit("/", 1)[1])] = (row["status"], row["updatedAt"])
                if not connection["pageInfo"]["hasNextPage"]:
                    break
                source = ', source: "parent_pipeline"' if alias == "children" else ""
                follow = (f"query($ids: [ID!], $t: Time, $c: String) {{ projects(ids: $ids) {{ nodes {{ "
                          f"pipelines(updatedAfter: $t, first: 100, after: $c{source}) {{ "
                          f"pageInfo {{ hasNextPage endCursor }} nodes {{ {PIPELINE_FIELDS} }} }} }} }} }}")
                answer = data(post(sim, follow, {"ids": [node["id"]], "t": since,
                                                 "c": connection["pageInfo"]["endCursor"]}))
                connection = answer["projects"]["nodes"][0]["pipelines"]
    return rows


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rest_and_graphql_find_the_same_pipelines_in_a_random_world(clock: ManualClock, seed: int) -> None:
    """For a seeded random world, every pipeline REST lists for a window (normal list and
    ``source=parent_pipeline``) is in the GraphQL answer with the same id, status and updated_at (to the
    second), and GraphQL finds nothing REST does not."""
    world = _random_world(seed, clock)
    projects = list(world.projects.values())
    stamps = sorted(p.updated_at for p in world.pipelines.values())
    since = stamps[len(stamps) // 3].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with GitLabSimulator(world) as sim:
        expected: dict[int, tuple[str, str]] = {}
        for project in projects:
            expected.update(_rest_window(sim, project, since, None))
            expected.update(_rest_window(sim, project, since, "parent_pipeline"))
        found = _graphql_window(sim, projects, since)
    assert len(expected) > 10
    assert found == expected


# -- limits -------------------------------------------------------------------------------------------


def test_complexity_of_the_detection_query_is_gitlabs_formula() -> None:
    """Types::BaseField: a resolver connection costs ``(children + resolver) * (1 + 0.01 * limit)``; plain
    fields 1 (``commit`` 2: ``calls_gitaly``). Pipelines: children 14 (nodes 1 + 5 scalars + user 2 +
    commit 3, pageInfo 3), resolver 1 + calls_gitaly 1 → 16 × 2 = 32; a project node 1 + 2 × 32 = 65,
    nodes 66, pageInfo 3 → projects (69 + 1) × 2 = 140 per block (× 1.5 = 105 with ``first: 50``)."""
    assert [query_complexity(detect_query(n)) for n in (1, 2, 5)] == [140, 280, 700]
    assert query_complexity(detect_query(1, first=50)) == 105
    assert query_complexity("{ metadata { version } }") == 2
    assert query_complexity('{ projects(search: "x", first: 10) { nodes { id } } }') == int((2 + 6) * 1.1)
    pipelines = ('query($ids: [ID!]) { projects(ids: $ids, first: 1) { nodes { pipelines(first: 20, ref: "main") '
                 "{ nodes { id } } } } }")
    # pipelines: (nodes 2 + resolver 1 + ref 2 + gitaly 1) × 1.2 = 7.2 → 7; nodes 1 + 7 → (8 + 1) × 1.01 → 9
    assert query_complexity(pipelines) == 9


def test_complexity_above_250_is_refused_with_graphql_rubys_message(sim: GitLabSimulator, world: World) -> None:
    """AUTHENTICATED_COMPLEXITY = 250: 250 runs, 251 answers 200 with only
    ``Query has complexity of 251, which exceeds max complexity of 250`` and no data; the limit is an
    attribute; ``queryComplexity`` reports the score."""
    make_project(world)
    filler = " ".join(f"m{i}: metadata {{ version }}" for i in range(55))  # 55 × 2 = 110
    at_250 = f"query($ids0: [ID!], $after0: Time) {{ {block('b0', 'ids0', 'after0')} {filler} }}"  # 140 + 110
    at_251 = at_250[:-1] + " __typename }"
    assert query_complexity(at_250) == 250 and query_complexity(at_251) == 251
    ok = post(sim, at_250, {"ids0": [], "after0": None})
    assert ok.status_code == 200 and "errors" not in ok.json()
    refused = post(sim, at_251, {"ids0": [], "after0": None})
    assert refused.status_code == 200
    assert refused.json() == {
        "errors": [{"message": "Query has complexity of 251, which exceeds max complexity of 250"}]}
    two_blocks = post(sim, detect_query(2), {"ids0": [], "ids1": []}).json()
    assert two_blocks == {"errors": [{"message": "Query has complexity of 280, which exceeds max complexity of 250"}]}
    assert data(post(sim, "{ queryComplexity { score limit } }"))["queryComplexity"] == {"score": 3, "limit": 250}
    sim.graphql.limits.max_complexity = 100
    assert post(sim, detect_query(1)).json()["errors"][0]["message"].endswith("exceeds max complexity of 100")
    anonymous = post(sim, "{ queryComplexity { limit } }", token=None)
    assert data(anonymous)["queryComplexity"]["limit"] == 200  # DEFAULT_MAX_COMPLEXITY without a token


def test_query_text_above_10000_characters_is_a_422(sim: GitLabSimulator) -> None:
    """GraphqlController#limit_query_size: ``MAX_QUERY_SIZE = 10_000`` characters, else
    ``Query too large`` as Gitlab::Graphql::Errors::ArgumentError, rendered with status 422."""
    base = "{ metadata { version } }"
    exactly = base + " " * (10_000 - len(base))
    assert post(sim, exactly).status_code == 200
    too_big = post(sim, exactly + " ")
    assert too_big.status_code == 422
    assert too_big.json() == {"errors": [{"message": "Query too large"}]}
    sim.graphql.limits.max_query_size = 10
    assert post(sim, base).status_code == 422


def test_depth_above_the_limit_is_refused(sim: GitLabSimulator) -> None:
    """AUTHENTICATED_MAX_DEPTH = 20 (DEFAULT_MAX_DEPTH = 15 without a token), graphql-ruby's message."""
    def nested(levels: int) -> str:
        inner = "name"
        for _ in range(levels):
            inner = f"ofType {{ {inner} }}"
        return f'{{ __type(name: "Pipeline") {{ {inner} }} }}'

    assert post(sim, nested(18)).json().get("errors") is None  # depth 20
    assert post(sim, nested(19)).json() == {
        "errors": [{"message": "Query has depth of 21, which exceeds max depth of 20"}]}
    assert post(sim, nested(14), token=None).json() == {
        "errors": [{"message": "Query has depth of 16, which exceeds max depth of 15"}]}


def test_validation_and_variable_errors_are_200_with_graphql_rubys_words(sim: GitLabSimulator, world: World) -> None:
    """Static validation fails the whole query (200, ``errors`` only): an unknown field or argument, and a
    variable Types::TimeType cannot read (``Can not coerce X to a time``)."""
    project = make_project(world)
    unknown = post(sim, "{ metadata { nope } }").json()
    assert unknown["errors"][0]["message"] == "Field 'nope' doesn't exist on type 'Metadata'"
    assert "data" not in unknown
    bad_arg = post(sim, "{ projects(nope: 1) { nodes { id } } }").json()
    assert bad_arg["errors"][0]["message"] == "Field 'projects' doesn't accept argument 'nope'"
    bad_time = post(sim, "query($ids: [ID!], $t: Time) { projects(ids: $ids) { nodes { pipelines(updatedAfter: $t) "
                         "{ nodes { id } } } } }", {"ids": [project_gid(project)], "t": "yesterday"}).json()
    assert bad_time == {"errors": [{
        "message": "Variable $t of type Time was provided invalid value",
        "locations": [{"line": 1, "column": 20}],
        "extensions": {"value": "yesterday",
                       "problems": [{"path": [], "explanation": "Can not coerce yesterday to a time"}]},
    }]}
    assert post(sim, "").json() == {"errors": [{"message": "No query string was present"}]}


# -- HTTP: auth, rate limit, headers, counters --------------------------------------------------------


def test_one_post_is_one_request_in_the_rate_limit_window_shared_with_rest(sim: GitLabSimulator) -> None:
    """GitLab.com's authenticated API limit covers ``/api/graphql`` too: a REST call and a POST count 2,
    the POST gets the same RateLimit-* headers, and over the limit it gets Rack::Attack's 429."""
    sim.reset_rate_window()
    assert rest(sim, "/version").headers["RateLimit-Observed"] == "1"
    answer = post(sim, "{ metadata { version } }")
    assert answer.headers["RateLimit-Observed"] == "2"
    assert answer.headers["RateLimit-Name"] == "throttle_authenticated_api"
    assert sim.counters["graphql"] == 1 and sim.counters["version"] == 1
    sim.faults.rate_limit = 2
    throttled = post(sim, "{ metadata { version } }")
    assert throttled.status_code == 429 and throttled.headers["Retry-After"]
    assert sim.counters["graphql"] == 2


def test_tokens_as_gitlabs_graphql_endpoint_reads_them(sim: GitLabSimulator, world: World) -> None:
    """GraphqlController#authorize_access_api!: a token that matches no user is a 401 ``Invalid token``;
    no token at all is an anonymous request (public projects only, ``currentUser`` null); PRIVATE-TOKEN
    and ``Authorization: Bearer`` both authenticate."""
    private = make_project(world, "private")
    public = make_project(world, "public")
    public.visibility = "public"
    query = "query($ids: [ID!]) { currentUser { username } projects(ids: $ids) { nodes { id } } }"
    variables = {"ids": [project_gid(private), project_gid(public)]}
    wrong = post(sim, query, variables, token="glpat-wrong")
    assert wrong.status_code == 401 and wrong.json() == {"errors": [{"message": "Invalid token"}]}
    anonymous = data(post(sim, query, variables, token=None))
    assert anonymous == {"currentUser": None, "projects": {"nodes": [{"id": project_gid(public)}]}}
    bearer = data(post(sim, query, variables, token=None, headers={"Authorization": f"Bearer {world.token}"}))
    assert bearer["currentUser"] == {"username": "sim-user"} and len(bearer["projects"]["nodes"]) == 2


def test_the_date_header_follows_the_worlds_clock(sim: GitLabSimulator, clock: ManualClock) -> None:
    clock.advance(hours=5)
    assert post(sim, "{ metadata { version } }").headers["Date"] == "Thu, 01 Oct 2026 15:00:00 GMT"


def test_python_gitlabs_http_post_on_the_same_session_reaches_it(sim: GitLabSimulator, world: World) -> None:
    """The shipper posts through python-gitlab's HTTP layer: its url is ``<sim>/api/v4`` and GraphQL is at
    ``<sim>/api/graphql``, so it gives the full URL."""
    make_project(world)
    gl = gitlab.Gitlab(sim.url, private_token=world.token)
    answer = gl.http_post(f"{sim.url}/api/graphql", post_data={"query": "{ projects { nodes { fullPath } } }"})
    assert answer == {"data": {"projects": {"nodes": [{"fullPath": "acme/app"}]}}}


def test_oversized_bodies_are_refused_without_being_read(sim: GitLabSimulator) -> None:
    answer = requests.post(f"{sim.url}/api/graphql", data=b"x" * (2 << 20), timeout=30,
                           headers={"PRIVATE-TOKEN": sim.world.token, "Content-Type": "application/json"})
    assert answer.status_code == 413


# -- faults -------------------------------------------------------------------------------------------


def test_injected_503s_answer_the_next_posts(sim: GitLabSimulator) -> None:
    """``inject("graphql", 503, count=N)``: the next N POSTs get the CDN's 503 page, then GraphQL answers."""
    sim.inject("graphql", 503, count=2)
    statuses = [post(sim, "{ metadata { version } }").status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert sim.faults_served["injected"] == 2


def test_a_batch_above_k_projects_times_out(sim: GitLabSimulator, world: World) -> None:
    """``timeout_above_projects``: held for ``timeout_seconds``, then GitLab's statement-timeout answer (503,
    ``Request timed out...``) or graphql-ruby's Timeout (200, the block null, ``Timeout on Query.projects``).
    A batch at or below K is answered at once."""
    projects = [make_project(world, f"p{i}") for i in range(3)]
    faults = sim.graphql.faults
    faults.timeout_above_projects = 2
    faults.timeout_seconds = 0.4
    small = {"ids0": [project_gid(p) for p in projects[:2]]}
    big = {"ids0": [project_gid(p) for p in projects]}
    started = time.monotonic()
    assert post(sim, detect_query(1), small).status_code == 200
    assert time.monotonic() - started < 0.4
    started = time.monotonic()
    held = post(sim, detect_query(1), big)
    assert time.monotonic() - started >= 0.4
    assert held.status_code == 503
    assert held.json() == {"errors": [{"message": "Request timed out. Please try a less complex query or a "
                                                  "smaller set of records."}]}
    faults.timeout_answer = "graphql"
    partial = post(sim, detect_query(1), big).json()
    assert partial["data"] == {"b0": None}
    assert [(e["message"], e["path"]) for e in partial["errors"]] == [("Timeout on Query.projects", ["b0"])]
    assert sim.faults_served["graphql_timeout"] == 2


def test_an_error_on_one_alias_leaves_partial_data(sim: GitLabSimulator, world: World) -> None:
    """GitLab answers a field's ExecutionError with 200, that field null, the error (with its path) in
    ``errors`` and every other field answered."""
    project = make_project(world)
    world.add_pipeline(project.id)
    sim.graphql.faults.error_aliases = frozenset({"b1"})
    answer = post(sim, detect_query(2, first=50), {"ids0": [project_gid(project)], "ids1": [project_gid(project)]})
    assert answer.status_code == 200
    payload = answer.json()
    assert payload["data"]["b1"] is None
    assert len(payload["data"]["b0"]["nodes"][0]["all"]["nodes"]) == 1
    assert [(e["message"], e["path"]) for e in payload["errors"]] == [("Internal server error", ["b1"])]
    assert sim.faults_served["graphql_alias_error"] == 1


def test_graphql_can_be_absent(sim: GitLabSimulator) -> None:
    """A GitLab that does not serve GraphQL has no ``/api/graphql`` route: Rails' 404 page; REST works."""
    sim.graphql.faults.disabled = True
    answer = post(sim, "{ metadata { version } }")
    assert answer.status_code == 404 and answer.headers["Content-Type"].startswith("text/html")
    assert rest(sim, "/version").status_code == 200
    assert sim.faults_served["graphql_disabled"] == 1


# -- the probe ----------------------------------------------------------------------------------------


def test_the_probe_sees_the_version_the_user_and_the_fields(sim: GitLabSimulator) -> None:
    """The shipper's probe (``GITLAB_API=auto`` and ``check``) works through introspection, and a GitLab
    without ``Pipeline.source`` (``hidden_fields``) shows its absence there and refuses a query for it."""
    answer = data(post(sim, PROBE))
    assert answer["metadata"] == {"version": "17.5.0"}
    assert answer["currentUser"] == {"username": "sim-user"}
    assert {"id", "iid", "status", "source", "updatedAt", "user", "commit"} <= \
        {f["name"] for f in answer["pipelineType"]["fields"]}
    pipelines = next(f for f in answer["projectType"]["fields"] if f["name"] == "pipelines")
    assert {"updatedAfter", "source", "first", "after"} <= {a["name"] for a in pipelines["args"]}
    sim.graphql.faults.hidden_fields = frozenset({"Pipeline.source"})
    older = data(post(sim, PROBE))
    assert "source" not in {f["name"] for f in older["pipelineType"]["fields"]}
    refused = post(sim, "{ projects { nodes { pipelines { nodes { source } } } } }").json()
    assert refused["errors"][0]["message"] == "Field 'source' doesn't exist on type 'Pipeline'"


def test_cursor_helpers_round_trip() -> None:
    assert decode_cursor(encode_cursor(2_900_000_123)) == 2_900_000_123
    assert "=" not in encode_cursor(7)


def test_without_graphql_core_the_route_is_absent_and_the_log_says_why(
    sim: GitLabSimulator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """graphql-core is optional (the ``sim`` extra): without it ``/api/graphql`` answers 404, like a GitLab
    without GraphQL (so a shipper on ``auto`` falls back to REST), said once in the log; REST works."""
    import sys

    import gitlab_log_shipper.sim.graphql as sim_graphql

    monkeypatch.setattr(sim_graphql, "_SCHEMAS", {})
    monkeypatch.setitem(sys.modules, "graphql", None)  # an import of it now fails
    with caplog.at_level("WARNING", logger="gitlab_log_shipper.sim.gitlab"):
        assert [post(sim, "{ metadata { version } }").status_code for _ in range(2)] == [404, 404]
    assert [r.getMessage() for r in caplog.records].count(
        "GitLab simulator: /api/graphql answers 404: graphql-core is not installed: "
        "pip install 'gitlab-log-shipper[sim]'") == 1
    assert rest(sim, "/version").status_code == 200


@pytest.mark.parametrize("form", [
    "{:%Y-%m-%dT%H:%M:%S}.{:%f}Z", "{:%Y-%m-%d %H:%M:%S}.{:%f}", "{:%Y-%m-%dT%H:%M:%S}.{:%f}+00:00",
    "{:%Y-%m-%dT%H:%M:%S}.{:%f}+0000",
])
def test_time_input_is_read_as_time_zone_parse_reads_it(sim: GitLabSimulator, world: World, form: str) -> None:
    """Types::TimeType.coerce_input is ``Time.zone.parse`` (UTC): ``T`` or a space, ``Z``, an offset with
    or without a colon, no zone at all; the fraction of a second is kept (here: the exact stamp, included,
    and one microsecond later, excluded)."""
    project = make_project(world)
    pipeline = world.add_pipeline(project.id)
    stamp = pipeline.updated_at
    later = stamp + timedelta(microseconds=1)
    assert ids_of(pipelines_page(sim, project, f'updatedAfter: "{form.format(stamp, stamp)}"')) == [pipeline.id]
    assert ids_of(pipelines_page(sim, project, f'updatedAfter: "{form.format(later, later)}"')) == []
    day = pipelines_page(sim, project, f'updatedAfter: "{stamp:%Y-%m-%d}"')  # a date: midnight UTC
    assert ids_of(day) == [pipeline.id]


def test_projects_pages_are_capped_at_100_too(sim: GitLabSimulator, world: World) -> None:
    """``projects(ids:)`` is a keyset connection with the same ``default_max_page_size``: 101 ids asked with
    ``first: 200`` give 100 projects and a next page holding the last one."""
    projects = [world.add_project(f"p{i}") for i in range(101)]
    query = ("query($ids: [ID!], $after: String) { projects(ids: $ids, first: 200, after: $after) { "
             "pageInfo { hasNextPage endCursor } nodes { id } } }")
    variables: dict[str, Any] = {"ids": [project_gid(p) for p in projects]}
    page = data(post(sim, query, variables))["projects"]
    assert len(page["nodes"]) == 100 and page["pageInfo"]["hasNextPage"] is True
    variables["after"] = page["pageInfo"]["endCursor"]
    last = data(post(sim, query, variables))["projects"]
    assert last["nodes"] == [{"id": project_gid(projects[0])}] and last["pageInfo"]["hasNextPage"] is False
