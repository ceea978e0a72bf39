"""Unmodified python-gitlab 8.x against the simulator: the calls the shipper makes, and GitLab's traps.

If python-gitlab can page, retry, authenticate and stream against the simulator exactly as it does
against GitLab.com, the shipper's integration tests exercise the real client code paths.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import gitlab
import gitlab.exceptions
import pytest

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.logs import LogSpec
from gitlab_log_shipper.sim.world import JobSpec, Project, World

T0 = datetime(2026, 10, 1, 10, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def gl(gitlab_sim: GitLabSimulator) -> Iterator[gitlab.Gitlab]:
    client = gitlab.Gitlab(gitlab_sim.url, private_token=gitlab_sim.world.token, timeout=10)
    yield client
    client.session.close()


@pytest.fixture
def project(world: World) -> Project:
    top = world.add_group("acme", "ACME")
    return world.add_project("app", group_id=top.id)


def test_auth_version_and_project_by_id_and_path(gl: gitlab.Gitlab, project: Project) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. python-gitlab's "base URL differs" warning
        gl.auth()
    assert gl.user is not None and gl.user.username == "sim-user"
    assert gl.version()[0].startswith("19.")
    assert gl.projects.get(project.id).path_with_namespace == "acme/app"
    assert gl.projects.get("acme/app").id == project.id


def test_wrong_token_raises_authentication_error(gitlab_sim: GitLabSimulator) -> None:
    bad = gitlab.Gitlab(gitlab_sim.url, private_token="glpat-not-the-token", timeout=5)
    with pytest.raises(gitlab.exceptions.GitlabAuthenticationError) as info:
        bad.auth()
    assert info.value.response_code == 401


def test_project_discovery(gl: gitlab.Gitlab, world: World, project: Project) -> None:
    top = world.find_group("acme")
    assert top is not None
    sub = world.add_group("platform", parent_id=top.id)
    other = world.add_group("other")
    in_sub = world.add_project("svc", group_id=sub.id)
    shared = world.add_project("lib", group_id=other.id, shared_with_group_ids=[top.id])
    outsider = world.add_project("public-thing", group_id=other.id, member=False)
    mine = {p.id for p in gl.projects.list(membership=True, iterator=True)}
    assert mine == {project.id, in_sub.id, shared.id}
    assert outsider.id in {p.id for p in gl.projects.list(iterator=True)}
    group = gl.groups.get("acme")
    assert {p.id for p in group.projects.list(include_subgroups=True, get_all=True)} == {project.id, in_sub.id, shared.id}
    assert {p.id for p in group.projects.list(get_all=True)} == {project.id, shared.id}
    assert {p.id for p in group.projects.list(include_subgroups=True, with_shared=False, get_all=True)} == {
        project.id, in_sub.id}


def test_pipelines_iterator_pages_and_the_first_page_trap(gitlab_sim: GitLabSimulator, gl: gitlab.Gitlab,
                                                          world: World, project: Project) -> None:
    created = [world.add_pipeline(project.id, finished_at=T0 + timedelta(seconds=i)) for i in range(250)]
    api_project = gl.projects.get(project.id, lazy=True)
    since = (T0 + timedelta(seconds=10)).isoformat()
    rows = list(api_project.pipelines.list(iterator=True, per_page=100, updated_after=since, order_by="id", sort="asc"))
    assert [r.id for r in rows] == [p.id for p in created[10:]]  # inclusive lower bound
    assert gitlab_sim.counters["pipelines"] == 3  # 240 rows: pages of 100, 100, 40 via rel="next"
    with pytest.warns(UserWarning, match="get_all=True"):
        first_page = api_project.pipelines.list()
    assert len(first_page) == 20  # silently only the first page


def test_bad_order_by_is_a_400_list_error(gl: gitlab.Gitlab, project: Project) -> None:
    with pytest.raises(gitlab.exceptions.GitlabListError) as info:
        gl.projects.get(project.id, lazy=True).pipelines.list(order_by="created_at", get_all=True)
    assert info.value.response_code == 400
    assert "order_by does not have a valid value" in str(info.value)


def test_inclusive_bounds_and_child_pipelines(gl: gitlab.Gitlab, world: World, project: Project) -> None:
    first = world.add_pipeline(project.id, finished_at=T0)
    second = world.add_pipeline(project.id, finished_at=T0 + timedelta(minutes=1))
    child = world.add_child_pipeline(second.id)
    api_project = gl.projects.get(project.id, lazy=True)
    bounded = api_project.pipelines.list(get_all=True, updated_after=T0.isoformat(),
                                         updated_before=second.updated_at.isoformat())
    assert {p.id for p in bounded} == {first.id, second.id}
    assert child.id not in {p.id for p in api_project.pipelines.list(get_all=True)}
    assert [p.id for p in api_project.pipelines.list(get_all=True, source="parent_pipeline")] == [child.id]
    bridges = api_project.pipelines.get(second.id, lazy=True).bridges.list(get_all=True)
    assert [b.downstream_pipeline["id"] for b in bridges] == [child.id]


def test_jobs_newest_first_with_retried_attempts(gl: gitlab.Gitlab, world: World, project: Project) -> None:
    pipeline = world.add_pipeline(project.id, status="failed", jobs=[
        JobSpec("build", "build"), JobSpec("test", "test", "failed"), JobSpec("deploy", "deploy", "manual"),
    ])
    old_test = pipeline.job_ids[1]
    new_test = world.add_job(pipeline.id, "test", "test", "success", retried_from=old_test)
    api_pipeline = gl.projects.get(project.id, lazy=True).pipelines.get(pipeline.id, lazy=True)
    latest = api_pipeline.jobs.list(get_all=True)
    assert [j.id for j in latest] == [new_test.id, pipeline.job_ids[2], pipeline.job_ids[0]]
    every = api_pipeline.jobs.list(get_all=True, include_retried=True)
    assert [j.id for j in every] == sorted(pipeline.job_ids, reverse=True)  # 4 attempts, newest first
    assert len(every) == 4
    assert [j.name for j in api_pipeline.jobs.list(get_all=True, scope=["manual"])] == ["deploy"]


def test_trace_streams_exactly_the_log_bytes(gl: gitlab.Gitlab, world: World, project: Project) -> None:
    spec = LogSpec(3 * 1024 * 1024 + 17, seed=4, invalid_utf8=True, timestamps=True)
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("big", log=spec), JobSpec("later", status="manual")])
    api_project = gl.projects.get(project.id, lazy=True)
    chunks = api_project.jobs.get(pipeline.job_ids[0], lazy=True).trace(streamed=True, iterator=True,
                                                                         chunk_size=256 * 1024)
    assert b"".join(chunks) == spec.read_all()
    assert api_project.jobs.get(pipeline.job_ids[1], lazy=True).trace() == b""


def test_429_with_retry_after_is_retried_by_python_gitlab(gitlab_sim: GitLabSimulator, gl: gitlab.Gitlab,
                                                          project: Project) -> None:
    gitlab_sim.inject("project", 429)  # Retry-After: 1
    started = time.monotonic()
    assert gl.projects.get(project.id).id == project.id
    assert time.monotonic() - started >= 1.0
    assert gitlab_sim.counters["project"] == 2


def test_transient_5xx_retried_only_when_asked(gitlab_sim: GitLabSimulator, project: Project) -> None:
    gitlab_sim.inject("project", 502)
    plain = gitlab.Gitlab(gitlab_sim.url, private_token=gitlab_sim.world.token, timeout=5)
    with pytest.raises(gitlab.exceptions.GitlabGetError) as info:
        plain.projects.get(project.id)
    assert info.value.response_code == 502
    gitlab_sim.inject("project", 503)
    retrying = gitlab.Gitlab(gitlab_sim.url, private_token=gitlab_sim.world.token, timeout=5,
                             retry_transient_errors=True)
    assert retrying.projects.get(project.id).id == project.id


def test_keep_base_url_follows_links_naming_another_host(gitlab_sim: GitLabSimulator, world: World,
                                                         project: Project) -> None:
    for _ in range(5):
        world.add_pipeline(project.id)
    gitlab_sim.link_base_url = "http://gitlab.proxy.invalid:8443"
    client = gitlab.Gitlab(gitlab_sim.url, private_token=world.token, timeout=5, keep_base_url=True)
    rows = list(client.projects.get(project.id, lazy=True).pipelines.list(iterator=True, per_page=2))
    assert len(rows) == 5


def test_mutations_are_visible_through_the_api(gl: gitlab.Gitlab, world: World, project: Project) -> None:
    pipeline = world.add_pipeline(project.id, status="running", jobs=[
        JobSpec("build", "build", "success", log="b\n"), JobSpec("test", "test", "running", log="t\n"),
    ])
    api_project = gl.projects.get(project.id, lazy=True)
    assert api_project.pipelines.get(pipeline.id).finished_at is None
    world.finish_pipeline(pipeline.id, "failed")
    first = api_project.pipelines.get(pipeline.id)
    assert first.status == "failed" and first.finished_at is not None and isinstance(first.duration, int)
    time.sleep(0.01)
    world.retry_pipeline(pipeline.id)
    reopened = api_project.pipelines.get(pipeline.id)
    assert reopened.status == "running" and reopened.finished_at is None
    assert reopened.updated_at > first.updated_at
    time.sleep(0.01)
    world.finish_pipeline(pipeline.id, "success")
    second = api_project.pipelines.get(pipeline.id)
    assert second.status == "success" and second.finished_at > first.finished_at
    jobs = api_project.pipelines.get(pipeline.id, lazy=True).jobs.list(get_all=True, include_retried=True)
    assert sorted(j.status for j in jobs) == ["failed", "success", "success"]
    time.sleep(0.01)
    world.touch_pipeline(pipeline.id)
    touched = api_project.pipelines.get(pipeline.id)
    assert touched.updated_at > second.updated_at and touched.status == "success"
    world.delete_pipeline(pipeline.id)
    with pytest.raises(gitlab.exceptions.GitlabGetError) as info:
        api_project.pipelines.get(pipeline.id)
    assert info.value.response_code == 404
    with pytest.raises(gitlab.exceptions.GitlabGetError):
        api_project.jobs.get(jobs[0].id, lazy=True).trace()
