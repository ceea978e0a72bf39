"""The GraphQL detection's queries and decisions, checked without a server: every query the detector can build is
valid for a real GitLab (its own SDL, GitLab 16.x, in ../shared/gitlab-samples/graphql/), fits GitLab's limits,
and GITLAB_API's choice follows what the probe shows."""

from __future__ import annotations


import pytest

from gitlab_log_shipper.gitlab.graphql import (
    BLOCK_MAX, MAX_COMPLEXITY, MAX_QUERY_CHARS, PROBE_QUERY, Probe, block_sizes, complexity, decide_api, detection_query,
    judge_probe,
)

from repo_paths import SHARED_DIR

graphql = pytest.importorskip("graphql")  # graphql-core: a test extra

GITLAB_SDL = SHARED_DIR / "gitlab-samples" / "graphql" / "gitlab_schema_16.graphql"


@pytest.fixture(scope="module")
def gitlab_schema() -> "graphql.GraphQLSchema":
    if not GITLAB_SDL.exists():
        pytest.skip(f"GitLab's SDL is not at {GITLAB_SDL}")
    return graphql.build_schema(GITLAB_SDL.read_text("utf-8"), assume_valid=True)


@pytest.mark.parametrize("blocks", [1, 2, 3])
@pytest.mark.parametrize("children", [True, False])
def test_detection_queries_are_valid_for_gitlab(gitlab_schema: "graphql.GraphQLSchema", blocks: int, children: bool) -> None:
    query = detection_query(blocks, children=children)
    assert graphql.validate(gitlab_schema, graphql.parse(query)) == []
    assert len(query) < MAX_QUERY_CHARS


@pytest.mark.parametrize("follow", ["all", "children"])
def test_follow_up_page_queries_are_valid_for_gitlab(gitlab_schema: "graphql.GraphQLSchema", follow: str) -> None:
    query = detection_query(1, children=True, follow=follow)
    assert graphql.validate(gitlab_schema, graphql.parse(query)) == []
    assert query.count("pipelines(") == 1 and "after: $after" in query


def test_probe_is_valid_for_gitlab(gitlab_schema: "graphql.GraphQLSchema") -> None:
    assert graphql.validate(gitlab_schema, graphql.parse(PROBE_QUERY)) == []


def test_complexity_follows_gitlabs_formula() -> None:
    # base_field.rb: a connection costs (children + resolver cost) * (1 + 0.01 * limit), truncated. A pipeline node:
    # 8 fields + 1 (commit calls Gitaly) = 9; pipelines: (pageInfo 3 + nodes 10 + resolver 1 + Gitaly 1) * 2 = 30;
    # a project: nodes + id + two connections = 62; a block of 100: (pageInfo 3 + 62 + 1) * 2 = 132.
    assert complexity([100], children=True) == 132
    assert complexity([90, 90], children=True) == 250
    assert complexity([50], children=True) == int(66 * 1.5)
    assert complexity([100], children=False) == (3 + 32 + 1) * 2


@pytest.mark.parametrize("sizes", [[1], [37], [100], [90, 90], [67, 67, 66]])
@pytest.mark.parametrize("children", [True, False])
def test_our_complexity_is_the_simulators_count(sizes: list[int], children: bool) -> None:
    # The simulator counts the query it receives, walking graphql-core's AST with the costs read from GitLab's source
    # (written separately from this module): the two must agree, or batches would be refused or needlessly small.
    from gitlab_log_shipper.sim.graphql import query_complexity

    variables: dict = {}
    for b, n in enumerate(sizes):
        variables.update({f"ids{b}": [f"gid://gitlab/Project/{i}" for i in range(1, n + 1)], f"n{b}": n,
                          f"t{b}": "2026-12-01T00:00:00.000Z"})
    assert complexity(sizes, children=children) == query_complexity(detection_query(len(sizes), children=children), variables)


def test_batches_are_cut_into_even_blocks() -> None:
    assert block_sizes(0) == [] and block_sizes(1) == [1] and block_sizes(100) == [100]
    assert block_sizes(101) == [51, 50] and block_sizes(180) == [90, 90] and block_sizes(250) == [84, 83, 83]
    assert all(sum(block_sizes(n)) == n and max(block_sizes(n)) <= BLOCK_MAX for n in range(1, 1001))


def test_detection_queries_of_the_largest_batch_fit_gitlabs_limits() -> None:
    from gitlab_log_shipper.gitlab.graphql import GraphQLDetector

    detector = GraphQLDetector.__new__(GraphQLDetector)  # max_batch needs no server
    detector.children, detector.scale, detector.max_complexity = True, 1.0, MAX_COMPLEXITY
    most = detector.max_batch()
    assert most == 180  # two blocks of 90: 250; 181 projects would cost 251
    assert complexity(block_sizes(most), children=True) <= MAX_COMPLEXITY < complexity(block_sizes(most + 1), children=True)
    assert len(detection_query(len(block_sizes(most)), children=True)) < MAX_QUERY_CHARS
    detector.scale = 1.5  # GitLab said it counts more than we do: fewer projects per POST
    assert detector.max_batch() < most
    assert complexity(block_sizes(detector.max_batch()), children=True) * 1.5 <= MAX_COMPLEXITY


def _probe_answer(version: str | None = "17.5.0", *, pipeline_fields=("id", "iid", "status", "updatedAt", "user", "commit"),
                  pipelines_args=("updatedAfter", "source", "first", "after"), user: bool = True) -> dict:
    return {
        "metadata": {"version": version},
        "currentUser": {"username": "bot"} if user else None,
        "pipelineType": {"fields": [{"name": n} for n in pipeline_fields]},
        "projectType": {"fields": [{"name": "pipelines", "args": [{"name": a} for a in pipelines_args]}]},
    }


def test_the_probe_gates_on_what_gitlab_shows() -> None:
    assert judge_probe(_probe_answer(), want_children=True) == Probe(
        True, "GitLab 17.5.0: GraphQL has every field detection needs", "17.5.0", True)
    old = judge_probe(_probe_answer("16.11.3-ee"), want_children=True)
    assert old.usable and not old.children
    assert not judge_probe(_probe_answer(pipeline_fields=("id", "status")), want_children=True).usable
    assert not judge_probe(_probe_answer(pipelines_args=("first",)), want_children=True).usable
    assert "token" in judge_probe(_probe_answer(user=False), want_children=True).reason
    assert not judge_probe(None, want_children=True).usable
    unknown = judge_probe(_probe_answer(None), want_children=True)
    assert unknown.usable and not unknown.children  # no version shown: child listing is not assumed


def test_gitlab_api_choice() -> None:
    new = judge_probe(_probe_answer(), want_children=True)
    old = judge_probe(_probe_answer("16.11.0"), want_children=True)
    broken = Probe(False, "GitLab has no GraphQL API at /api/graphql (404)")
    assert decide_api("rest", new, children=True).mode == "rest"
    assert decide_api("auto", new, children=True).mode == decide_api("graphql", new, children=True).mode == "graphql"
    assert decide_api("auto", new, children=True).children and decide_api("auto", new, children=True).problem is None
    # Before 17.0 neither API lists child pipelines: GraphQL all the same, and the operator is told
    for wanted in ("auto", "graphql"):
        choice = decide_api(wanted, old, children=True)
        assert choice.mode == "graphql" and not choice.children and "not shipped" in (choice.problem or "")
    assert decide_api("auto", old, children=False).problem is None
    assert decide_api("auto", broken, children=True).mode == "rest"
    assert decide_api("auto", broken, children=True).problem is None
    forced_broken = decide_api("graphql", broken, children=True)
    assert forced_broken.mode == "rest" and "GITLAB_API=graphql, but" in (forced_broken.problem or "")


def test_projects_far_behind_get_blocks_of_their_own() -> None:
    from datetime import datetime, timedelta, timezone

    from gitlab_log_shipper.gitlab.graphql import blocks_of

    now = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)
    lagging = [(1, now - timedelta(hours=6))]
    steady = [(i, now - timedelta(seconds=i)) for i in range(2, 150)]
    wanted = sorted(lagging + steady, key=lambda item: item[1])
    blocks = blocks_of(wanted)
    assert blocks[0] == lagging  # its old start is not every block-mate's
    assert [len(b) for b in blocks[1:]] == [74, 74] and sum(map(len, blocks)) == len(wanted)
    assert blocks_of(steady[::-1]) == [steady[::-1][:74], steady[::-1][74:]]  # close starts share blocks
