"""GraphQL change detection (GITLAB_API) end to end: the real shipper over loopback HTTP against the simulator, whose
/api/graphql follows GitLab (gitlab_log_shipper/sim/graphql.py: GIDs, upper-case statuses, whole-second times,
id-descending keyset pages, GitLab's complexity count, partial answers with errors)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gitlab_log_shipper.config.settings import load_config, prepare_directories
from gitlab_log_shipper.gitlab import graphql as graphql_module
from gitlab_log_shipper.shipper import GRAPHQL_FALLBACKS, REST_LISTED, SHIPPED, Shipper
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.logs import LogSpec
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import make_env

pytest.importorskip("graphql")  # the simulator's GraphQL API needs graphql-core (a test extra)


def _jobs(n: int = 2, *, failed: bool = False) -> list[JobSpec]:
    return [JobSpec(f"job-{i}", "build" if i == 0 else "test", "failed" if failed and i == n - 1 else "success",
                    log=LogSpec(3000, seed=i, failed=failed and i == n - 1)) for i in range(n)]


def _varied_world(world: World) -> list[int]:
    """Pipelines of every kind the document and the finish key treat differently."""
    quiet = world.add_user("quiet", name="Quiet User", public_email="")  # no public e-mail: the commit's is used
    loud = world.add_user("loud", name="Loud User", public_email="loud@example.com")
    a = world.add_project("team/a")
    b = world.add_project("team/b")
    ids = [
        world.add_pipeline(a.id, status="success", user=loud, jobs=_jobs()).id,
        world.add_pipeline(a.id, status="failed", user=quiet, author_email="quiet-author@example.com",
                           jobs=_jobs(3, failed=True)).id,
        world.add_pipeline(b.id, status="success", user=None, jobs=_jobs(1)).id,
        world.add_pipeline(b.id, status="manual", user=quiet, jobs=[JobSpec("build", "build", "success", log="ok\n"),
                                                                     JobSpec("deploy", "deploy", "manual")]).id,
        world.add_pipeline(b.id, status="skipped", user=loud, jobs=[JobSpec("x", "test", "skipped")]).id,
    ]
    parent = world.add_pipeline(a.id, status="success", user=quiet, author_email="parent@example.com", jobs=_jobs(1))
    ids.append(parent.id)
    ids.append(world.add_child_pipeline(parent.id, jobs=_jobs(1)).id)
    return ids


def _shipper(values: dict[str, str]) -> Shipper:
    config = load_config(None, values)
    prepare_directories(config)
    return Shipper(config)


def _bodies(receiver: Receiver) -> dict[int, tuple[bytes, str]]:
    out = {}
    for request in receiver.accepted():
        out[int(request.json()["pipeline_id"])] = (request.body, request.headers.get("Idempotency-Key", ""))
    return out


def test_rest_and_graphql_ship_byte_identical_documents(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                        receiver: Receiver) -> None:
    ids = _varied_world(world)
    shipped: dict[str, dict[int, tuple[bytes, str]]] = {}
    counters: dict[str, dict[str, int]] = {}
    for api in ("rest", "graphql"):
        receiver.clear()
        gitlab_sim.reset_counters()
        env = make_env(tmp_path / api, gitlab_sim, receiver, GITLAB_API=api)
        result = env.invoke("run", "--once")
        assert result.exit_code == 0, result.output
        shipped[api] = _bodies(receiver)
        counters[api] = dict(gitlab_sim.counters)
    assert sorted(shipped["rest"]) == sorted(ids)  # child, manual and skipped pipelines included
    assert shipped["graphql"] == shipped["rest"]  # every byte, and every Idempotency-Key
    # GraphQL found them without a single REST listing, and the commit e-mails came with the detection
    assert counters["graphql"].get("pipelines", 0) == 0 and counters["graphql"].get("commit", 0) == 0
    assert counters["rest"]["commit"] >= 2 and counters["graphql"]["graphql"] >= 1
    assert b"quiet-author@example.com" in shipped["graphql"][ids[1]][0]


def test_switching_gitlab_api_on_a_state_dir_ships_nothing_twice(tmp_path: Path, world: World,
                                                                 gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    ids = _varied_world(world)
    env = make_env(tmp_path, gitlab_sim, receiver, GITLAB_API="rest")
    assert env.invoke("run", "--once").exit_code == 0
    first = [r.headers["Idempotency-Key"] for r in receiver.accepted()]
    assert len(first) == len(ids)
    late = world.add_pipeline(world.pipelines[ids[0]].project_id, status="success", jobs=_jobs(1)).id
    for api in ("graphql", "rest", "graphql"):
        result = env.invoke("run", "--once", GITLAB_API=api)
        assert result.exit_code == 0, result.output
    keys = [r.headers["Idempotency-Key"] for r in receiver.accepted()]
    assert len(keys) == len(set(keys)) == len(ids) + 1  # the new one once, nothing again
    assert late in _bodies(receiver)


def test_an_idle_cycle_costs_a_post_per_180_projects(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                     receiver: Receiver) -> None:
    group = world.add_group("fleet")
    projects = [world.add_project(f"p{i}", group_id=group.id) for i in range(250)]
    world.add_pipeline(projects[7].id, status="success", jobs=_jobs(1))
    env = make_env(tmp_path, gitlab_sim, receiver, GITLAB_API="graphql", GITLAB_GROUPS="fleet")
    shipper = _shipper(env.values)
    try:
        shipper.detector.batch = 180  # what the adaptation reaches after a few quick answers (tested below)
        report = shipper.run_cycle()
        assert report.counts[SHIPPED] == 1
        gitlab_sim.reset_counters()
        shipper.run_cycle()
        assert dict(gitlab_sim.counters) == {"graphql": 2}  # 250 projects: 180 + 70; no REST listing at all
    finally:
        shipper.close()


def test_batches_grow_while_gitlab_answers_quickly(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                   receiver: Receiver) -> None:
    group = world.add_group("fleet")
    for i in range(400):
        world.add_project(f"p{i}", group_id=group.id)
    env = make_env(tmp_path, gitlab_sim, receiver, GITLAB_API="graphql", GITLAB_GROUPS="fleet")
    shipper = _shipper(env.values)
    try:
        sizes = []
        for _ in range(3):
            shipper.run_cycle()
            sizes.append([projects for projects, _ in shipper.detector.timings])
        assert sizes[0][0] == graphql_module.START_BATCH
        assert max(sizes[-1]) == 180 and sum(sizes[-1]) == 400  # grown to what the complexity limit allows
    finally:
        shipper.close()


@pytest.mark.parametrize("answer", ["database", "graphql"])
def test_a_batch_that_times_out_is_split_and_everything_is_found(tmp_path: Path, world: World,
                                                                 gitlab_sim: GitLabSimulator, receiver: Receiver,
                                                                 answer: str, caplog: pytest.LogCaptureFixture) -> None:
    projects = [world.add_project(f"team/p{i}") for i in range(6)]
    for project in projects:
        world.add_pipeline(project.id, status="success", jobs=_jobs(1))
    # GitLab gives up on queries naming more than 2 projects (as its 30 s limit would with slow ones)
    gitlab_sim.graphql.faults.timeout_above_projects = 2
    gitlab_sim.graphql.faults.timeout_seconds = 0.2
    gitlab_sim.graphql.faults.timeout_answer = answer
    shipper = _shipper(make_env(tmp_path, gitlab_sim, receiver, GITLAB_API="graphql").values)
    try:
        with caplog.at_level(logging.INFO, logger="gitlab_log_shipper.gitlab.graphql"):
            report = shipper.run_cycle()
    finally:
        shipper.close()
    assert report.counts[SHIPPED] == 6 and not report.project_errors
    assert len(receiver.accepted()) == 6
    assert any("batches of 3 projects from now on" in r.getMessage() for r in caplog.records)
    assert max(projects for projects, _ in shipper.detector.timings) <= 2  # only batches GitLab could answer


def test_503_answers_are_split_and_sent_again(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                              receiver: Receiver) -> None:
    projects = [world.add_project(f"team/p{i}") for i in range(4)]
    for project in projects:
        world.add_pipeline(project.id, status="success", jobs=_jobs(1))
    gitlab_sim.inject("graphql", 503, count=3)
    env = make_env(tmp_path, gitlab_sim, receiver, GITLAB_API="graphql")
    result = env.invoke("run", "--once")
    assert result.exit_code == 0, result.output
    assert len(receiver.accepted()) == 4


def test_a_graphql_error_on_one_block_costs_only_its_projects(tmp_path: Path, world: World,
                                                              gitlab_sim: GitLabSimulator, receiver: Receiver,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graphql_module, "BLOCK_MAX", 2)  # blocks b0 (2 projects) and b1 (2 projects)
    projects = [world.add_project(f"team/p{i}") for i in range(4)]
    for project in projects:
        world.add_pipeline(project.id, status="success", jobs=_jobs(1))
    gitlab_sim.graphql.faults.error_aliases = frozenset({"b1"})
    env = make_env(tmp_path, gitlab_sim, receiver, GITLAB_API="graphql")
    shipper = _shipper(env.values)
    try:
        report = shipper.run_cycle()
        assert report.counts[SHIPPED] == 2 and len(report.project_errors) == 2
        assert all("will retry next cycle" in error for error in report.project_errors)
        gitlab_sim.graphql.faults.error_aliases = frozenset()
        report = shipper.run_cycle()  # their cursors stayed: the next cycle finds them
        assert report.counts[SHIPPED] == 2 and not report.project_errors
    finally:
        shipper.close()
    assert len(receiver.accepted()) == 4


def test_a_project_gone_from_graphqls_answer_is_listed_with_rest(tmp_path: Path, world: World,
                                                                 gitlab_sim: GitLabSimulator, receiver: Receiver,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    kept, hidden = world.add_project("team/kept"), world.add_project("team/hidden")
    env = make_env(tmp_path, gitlab_sim, receiver, GITLAB_API="graphql")
    shipper = _shipper(env.values)
    try:
        shipper.run_cycle()  # both discovered
        world.add_pipeline(kept.id, status="success", jobs=_jobs(1))
        world.hide_project(hidden.id)  # the token lost access: GraphQL leaves it out silently, REST answers 404
        with caplog.at_level(logging.WARNING):
            report = shipper.run_cycle()
        assert report.counts[SHIPPED] == 1 and report.counts[REST_LISTED] == 1
        assert any(str(hidden.id) in error and "404" in error for error in report.project_errors)
        assert any("absent from GitLab's GraphQL answer" in r.getMessage() for r in caplog.records)
    finally:
        shipper.close()


def test_graphql_disappearing_at_run_time_falls_back_to_rest_said_and_counted(
        tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver,
        caplog: pytest.LogCaptureFixture) -> None:
    project = world.add_project("team/app")
    env = make_env(tmp_path, gitlab_sim, receiver, GITLAB_API="auto")
    shipper = _shipper(env.values)
    try:
        shipper.run_cycle()
        assert shipper.api_mode == "graphql"
        gitlab_sim.graphql.faults.disabled = True  # GitLab downgraded, or GraphQL switched off
        world.add_pipeline(project.id, status="success", jobs=_jobs(1))
        with caplog.at_level(logging.WARNING):
            report = shipper.run_cycle()
        assert report.counts[SHIPPED] == 1 and report.counts[GRAPHQL_FALLBACKS] == 1
        assert shipper.api_mode == "rest" and "fell back" in shipper.api_reason
        assert [r for r in caplog.records if "GraphQL detection failed" in r.getMessage()]
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            report = shipper.run_cycle()  # REST from now on, without saying it again every cycle
        assert not report.counts[GRAPHQL_FALLBACKS] and not [r for r in caplog.records if "GraphQL" in r.getMessage()]
    finally:
        shipper.close()


def test_older_gitlab_without_child_listing(tmp_path: Path, receiver: Receiver) -> None:
    # Before GitLab 17.0 neither REST nor GraphQL lists child pipelines (the finder drops them before `source`
    # applies): detection uses GraphQL all the same, and check and the log say that child pipelines are not shipped.
    world = World(gitlab_version="16.11.2-ee")
    project = world.add_project("team/app")
    parent = world.add_pipeline(project.id, status="success", jobs=_jobs(1))
    world.add_child_pipeline(parent.id, jobs=_jobs(1))
    with GitLabSimulator(world) as sim:
        auto = make_env(tmp_path / "auto", sim, receiver, GITLAB_API="auto")
        checked = auto.invoke("check")
        line = next(line for line in checked.output.splitlines() if "change detection" in line)
        assert line.startswith("! change detection: GraphQL") and "cannot list child pipelines" in line, line
        result = auto.invoke("run", "--once")
        assert result.exit_code == 0 and "cannot list child pipelines" in result.output, result.output
        assert len(receiver.accepted()) == 1
        sim.reset_counters()
        assert auto.invoke("run", "--once").exit_code == 0
        assert dict(sim.counters).keys() <= {"graphql", "group_projects", "project", "projects"}
        no_children = make_env(tmp_path / "parents", sim, receiver, GITLAB_API="auto", POLL_CHILD_PIPELINES="false")
        checked = no_children.invoke("check")
        assert "✓ change detection: GraphQL" in checked.output and "child" not in checked.output.split("change detection")[1].split("\n")[0]


def test_check_says_graphql_and_why(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                    receiver: Receiver) -> None:
    world.add_project("team/app")
    env = make_env(tmp_path, gitlab_sim, receiver, GITLAB_API="auto")
    result = env.invoke("check")
    line = next(line for line in result.output.splitlines() if "change detection" in line)
    assert line.startswith("✓ change detection: GraphQL (GITLAB_API=auto: GitLab 19.5.0-pre"), line
    gitlab_sim.graphql.faults.disabled = True
    result = env.invoke("check")
    line = next(line for line in result.output.splitlines() if "change detection" in line)
    assert line.startswith("✓ change detection: REST (GraphQL cannot be used:") and "404" in line, line
    result = env.invoke("check", GITLAB_API="graphql")
    assert result.exit_code == 1
    assert "✗ change detection: REST" in result.output and "GITLAB_API=graphql, but" in result.output


def test_a_project_with_hundreds_of_changes_is_paged(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                     receiver: Receiver) -> None:
    project = world.add_project("team/busy")
    ids = {world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="x\n")]).id
           for _ in range(230)}
    seen_posts: list[dict] = []
    deleted: list[int] = []

    def hook(endpoint: str, args: list[str], params: dict) -> None:
        if endpoint == "graphql" and "query Detect" in str(params):
            seen_posts.append(params)
            if len(seen_posts) == 2 and not deleted:  # between page 1 and page 2: one of page 1's rows is deleted
                victim = max(ids)
                world.delete_pipeline(victim)
                deleted.append(victim)

    gitlab_sim.on_request(hook)
    env = make_env(tmp_path, gitlab_sim, receiver, GITLAB_API="graphql", CONCURRENCY="4")
    result = env.invoke("run", "--once")
    assert result.exit_code == 0, result.output
    shipped = set(_bodies(receiver))
    assert len(seen_posts) == 3  # the batch, then page 2 and page 3 of this project's pipelines
    assert shipped == ids - set(deleted)  # the deletion between two pages cost no other row


_P = "gid://gitlab/Project/{pid}"
_MALFORMED = [
    "{not json",
    "<html><body><h1>502 Bad Gateway</h1></body></html>",
    "[1, 2]",
    '{"errors": [{"message": "Internal server error"}]}',
    '{"data": {"b0": {"nodes": "a string"}}}',
    '{"data": {"b0": {"nodes": [{"id": "gid://gitlab/Project/{pid}", "all": {"nodes": [{"id": 5}]}}]}}}',
    '{"data": {"b0": {"nodes": [{"id": "gid://gitlab/Project/{pid}", "all": {"nodes": [{"id": "gid://gitlab/Ci::Pipeline/7", '
    '"status": null, "updatedAt": "yesterday"}]}, "children": {"nodes": []}}]}}}',
    '{"data": {"b0": {"nodes": [{"id": "gid://gitlab/Project/{pid}", "all": "nothing", "children": {"nodes": []}}]}}}',
    '{"data": {"b0": {"nodes": [{"id": "gid://gitlab/Project/{pid}", "all": {"pageInfo": {"hasNextPage": true}, '
    '"nodes": []}, "children": {"nodes": []}}]}}}',
]


@pytest.mark.parametrize("body", _MALFORMED, ids=[b[:40] for b in _MALFORMED])
def test_a_malformed_graphql_answer_is_logged_and_the_pipeline_found_next_cycle(
        tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver, body: str) -> None:
    project = world.add_project("team/app")
    shipper = _shipper(make_env(tmp_path, gitlab_sim, receiver, GITLAB_API="graphql").values)
    try:
        shipper.run_cycle()  # probe and first window
        world.add_pipeline(project.id, status="success", jobs=_jobs(1))
        gitlab_sim.inject("graphql", 200, count=1, headers={"Content-Type": "application/json"},
                          body=body.replace("{pid}", str(project.id)))
        report = shipper.run_cycle()
        assert report.counts[SHIPPED] == 0 and len(report.project_errors) == 1, report.project_errors
        [error] = report.project_errors
        assert "\n" not in error and "Traceback" not in error
        assert shipper.api_mode == "graphql"  # one odd answer is not GraphQL failing as a whole
        report = shipper.run_cycle()  # its cursor stayed: found now
        assert report.counts[SHIPPED] == 1 and not report.project_errors
    finally:
        shipper.close()
