"""The simulated GitLab's state (``sim.world``) and its generated logs (``sim.logs``), without HTTP.

Integration tests elsewhere trust these objects to behave like GitLab's: ids in GitLab's ranges and
order, consistent times, and mutations that reopen, touch and delete pipelines the way GitLab does.
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timedelta, timezone

import pytest

from gitlab_log_shipper.sim.logs import LogSpec, iter_log, log_bytes, log_size
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import ManualClock

T0 = datetime(2026, 10, 1, 10, 0, 0, 123456, tzinfo=timezone.utc)


Clock = ManualClock


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def frozen(clock: Clock) -> World:
    return World(clock=clock)


# -- users, groups, projects ------------------------------------------------------------------------


def test_default_user_owns_the_token() -> None:
    world = World()
    assert world.token == "glpat-sim-0123456789abcdef"
    assert world.current_user["id"] == 1 and world.current_user["username"] == "sim-user"
    assert set(world.current_user) == {"id", "username", "public_email", "name", "state", "locked",
                                       "avatar_url", "web_url"}
    assert World(token="glpat-other-123456").token == "glpat-other-123456"


def test_groups_and_projects_build_full_paths() -> None:
    world = World()
    top = world.add_group("acme", "ACME")
    sub = world.add_group("platform", parent_id=top.id)
    project = world.add_project("app", group_id=sub.id)
    personal = world.add_project("scratch")
    assert sub.full_path == "acme/platform" and sub.full_name == "ACME / platform"
    assert project.id == 87089000 and personal.id == 87089001
    assert project.path_with_namespace == "acme/platform/app"
    assert personal.path_with_namespace == "sim-user/scratch" and personal.namespace_kind == "user"
    assert world.find_project("ACME/Platform/App") is project  # routes are case-insensitive
    assert world.find_project(str(project.id)) is project
    assert world.find_group("acme/platform") is sub
    assert world.subgroup_ids(top.id) == [top.id, sub.id]
    with pytest.raises(ValueError):
        world.add_project("app", group_id=sub.id)


# -- pipelines and jobs -----------------------------------------------------------------------------


def test_pipeline_defaults_are_a_consistent_finished_run(frozen: World, clock: Clock) -> None:
    project = frozen.add_project("app")
    pipeline = frozen.add_pipeline(project.id, jobs=[
        JobSpec("build", "build"), JobSpec("test", "test", log="ok\n"), JobSpec("deploy", "deploy", "manual"),
    ])
    assert pipeline.id == 2900000000 and pipeline.iid == 1
    assert pipeline.created_at < pipeline.started_at <= pipeline.finished_at <= clock.now  # type: ignore[operator]
    assert pipeline.updated_at == pipeline.finished_at
    assert pipeline.duration == int((pipeline.finished_at - pipeline.started_at).total_seconds())  # type: ignore[operator]
    assert len(pipeline.sha) == 40
    build, test, deploy = (frozen.jobs[i] for i in pipeline.job_ids)
    assert [build.id, test.id, deploy.id] == [16860000000, 16860000001, 16860000002]
    assert pipeline.started_at <= build.started_at < build.finished_at <= test.started_at  # type: ignore[operator]
    assert test.finished_at <= pipeline.finished_at  # type: ignore[operator]
    # A manual job that never ran: no times, allowed to fail (GitLab's default for manual jobs).
    assert deploy.started_at is None and deploy.finished_at is None and deploy.duration(clock.now) is None
    assert deploy.allow_failure and not deploy.ran
    commit = frozen.commits[(project.id, pipeline.sha)]
    assert commit.author_email == "author@example.com"


def test_job_ids_ascend_in_stage_order(frozen: World) -> None:
    project = frozen.add_project("app")
    pipeline = frozen.add_pipeline(project.id, jobs=[
        JobSpec("unit", "test"), JobSpec("compile", "build"), JobSpec("lint", "test"),
    ])
    assert [frozen.jobs[i].name for i in sorted(pipeline.job_ids)] == ["unit", "lint", "compile"]
    assert pipeline.stages == ["test", "build"]


def test_explicit_times_and_bad_arguments(frozen: World) -> None:
    project = frozen.add_project("app")
    created, finished = T0 - timedelta(hours=1), T0 - timedelta(minutes=50)
    pipeline = frozen.add_pipeline(project.id, created_at=created, finished_at=finished, status="failed")
    assert (pipeline.created_at, pipeline.finished_at, pipeline.updated_at) == (created, finished, finished)
    running = frozen.add_pipeline(project.id, status="running")
    assert running.finished_at is None and running.duration is None and running.started_at is not None
    with pytest.raises(ValueError):
        frozen.add_pipeline(project.id, status="running", finished_at=T0)
    with pytest.raises(ValueError):
        frozen.add_pipeline(project.id, status="succeeded")
    with pytest.raises(ValueError):
        frozen.add_pipeline(project.id, source="cron")
    with pytest.raises(KeyError):
        frozen.add_pipeline(1)


def test_child_pipeline_and_bridge(frozen: World) -> None:
    project = frozen.add_project("app")
    parent = frozen.add_pipeline(project.id, ref="feature", jobs=[JobSpec("build", "build")])
    child = frozen.add_child_pipeline(parent.id, status="failed", jobs=[JobSpec("child-test")])
    (bridge,) = frozen.pipeline_bridges(parent.id)
    assert child.source == "parent_pipeline" and child.parent_pipeline_id == parent.id
    assert (child.project_id, child.ref, child.sha) == (project.id, parent.ref, parent.sha)
    assert bridge.downstream_pipeline_id == child.id and bridge.status == "failed"
    assert bridge.failure_reason == "unknown_failure"
    assert bridge.id not in frozen.jobs  # bridges are not builds
    assert [j.name for j in frozen.pipeline_jobs(parent.id)] == ["build"]
    lone = frozen.add_bridge(parent.id, "downstream", status="failed")
    assert lone.downstream_pipeline_id is None and lone.failure_reason == "downstream_pipeline_creation_failed"


# -- mutations --------------------------------------------------------------------------------------


def test_finish_pipeline_settles_jobs_but_not_manual_ones(frozen: World, clock: Clock) -> None:
    project = frozen.add_project("app")
    pipeline = frozen.add_pipeline(project.id, status="running", jobs=[
        JobSpec("build", "build", "success"), JobSpec("test", "test", "running"),
        JobSpec("later", "test", "created"), JobSpec("deploy", "deploy", "manual"),
    ])
    finished_at = clock.advance(90)
    frozen.finish_pipeline(pipeline.id, "failed")
    assert pipeline.status == "failed" and pipeline.finished_at == finished_at == pipeline.updated_at
    assert pipeline.duration == int((finished_at - pipeline.started_at).total_seconds())  # type: ignore[operator]
    statuses = {j.name: j.status for j in frozen.pipeline_jobs(pipeline.id)}
    assert statuses == {"build": "success", "test": "failed", "later": "failed", "deploy": "manual"}
    test = next(j for j in frozen.pipeline_jobs(pipeline.id) if j.name == "test")
    assert test.finished_at == finished_at and test.failure_reason == "script_failure"
    with pytest.raises(ValueError):
        frozen.finish_pipeline(pipeline.id, "running")


def test_retry_reopens_and_a_second_finish_moves_finished_at(frozen: World, clock: Clock) -> None:
    project = frozen.add_project("app")
    pipeline = frozen.add_pipeline(project.id, status="failed", jobs=[
        JobSpec("build", "build"), JobSpec("flaky", "test", "failed", log=LogSpec(500, seed=3)),
        JobSpec("stopped", "test", "canceled"),
    ])
    first_finish = pipeline.finished_at
    old_ids = {j.name: j.id for j in frozen.pipeline_jobs(pipeline.id)}
    retried_at = clock.advance(60)
    frozen.retry_pipeline(pipeline.id)
    assert pipeline.status == "running" and pipeline.finished_at is None and pipeline.updated_at == retried_at
    assert pipeline.duration is not None  # kept, as in the recorded pipeline_single_running_after_retry
    latest = {j.name: j for j in frozen.pipeline_jobs(pipeline.id)}
    assert latest["build"].id == old_ids["build"]
    for name in ("flaky", "stopped"):
        assert latest[name].id > max(old_ids.values()) and latest[name].status == "running"
        assert latest[name].retried_from == old_ids[name] and frozen.jobs[old_ids[name]].retried
    assert latest["flaky"].log == LogSpec(500, seed=4)  # a new attempt writes a new log
    assert len(frozen.pipeline_jobs(pipeline.id, include_retried=True)) == 5
    second_finish = clock.advance(30)
    frozen.finish_pipeline(pipeline.id)
    assert pipeline.finished_at == second_finish != first_finish and pipeline.status == "success"


def test_touch_delete_set_log_erase(frozen: World, clock: Clock) -> None:
    project = frozen.add_project("app")
    pipeline = frozen.add_pipeline(project.id, jobs=[JobSpec("build", log="one")])
    job_id = pipeline.job_ids[0]
    touched = clock.advance(55)
    frozen.touch_pipeline(pipeline.id)
    assert pipeline.updated_at == touched and pipeline.status == "success"
    frozen.set_job_log(job_id, b"two\xff")
    assert frozen.jobs[job_id].log == b"two\xff"
    frozen.erase_job(job_id)
    assert frozen.jobs[job_id].erased and frozen.jobs[job_id].erased_at == touched and frozen.jobs[job_id].log is None
    assert frozen.finished_pipelines() == [pipeline]
    frozen.delete_pipeline(pipeline.id)
    assert frozen.live_pipeline(pipeline.id) is None and frozen.live_job(job_id) is None
    assert frozen.finished_pipelines() == [] and frozen.project_pipelines(project.id) == []
    with pytest.raises(KeyError):
        frozen.touch_pipeline(pipeline.id)


def test_add_job_retried_from_hides_the_old_attempt(frozen: World) -> None:
    project = frozen.add_project("app")
    pipeline = frozen.add_pipeline(project.id, jobs=[JobSpec("test", status="failed")])
    old = pipeline.job_ids[0]
    new = frozen.add_job(pipeline.id, "test", status="success", log="passed\n", retried_from=old)
    assert new.id > old and [j.id for j in frozen.pipeline_jobs(pipeline.id)] == [new.id]
    assert [j.id for j in frozen.pipeline_jobs(pipeline.id, include_retried=True)] == [new.id, old]


# -- logs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [
    {}, {"timestamps": True}, {"ansi": False}, {"sections": False}, {"invalid_utf8": True},
    {"ansi": False, "sections": False},
])
@pytest.mark.parametrize("size", [0, 1, 100, 1500, 65536, 300_001])
def test_logspec_is_exact_deterministic_and_chunked(flags: dict[str, bool], size: int) -> None:
    spec = LogSpec(size, seed=11, **flags)
    data = spec.read_all()
    assert len(data) == size == log_size(spec)
    assert data == LogSpec(size, seed=11, **flags).read_all()
    chunks = list(spec.iter_chunks(4096))
    assert b"".join(chunks) == data and all(len(c) == 4096 for c in chunks[:-1])
    assert spec.sha256() == hashlib.sha256(data).hexdigest()
    assert b"".join(iter_log(spec, 1000)) == data


def test_logspec_content_looks_like_a_gitlab_log() -> None:
    full = LogSpec(200_000, seed=1, invalid_utf8=True).read_all()
    assert b"section_start:" in full and b"section_end:" in full and b"\r\x1b[0K" in full
    assert b"\x1b[32;1m" in full and b"\r" in full.replace(b"\r\x1b[0K", b"")
    assert full.endswith(b"Job succeeded\x1b[0;m\n")
    with pytest.raises(UnicodeDecodeError):
        full.decode("utf-8")
    plain = LogSpec(200_000, seed=1, ansi=False, sections=False).read_all()
    assert b"\x1b" not in plain and b"\r" not in plain and b"section_" not in plain
    plain.decode("utf-8")
    stamped = LogSpec(200_000, seed=1, timestamps=True).read_all()
    lines = stamped.split(b"\n")[:-1]
    assert all(len(line) >= 32 and line[26:32] == b"Z 00O " for line in lines)
    stamps = [line[:26] for line in lines]
    assert stamps == sorted(stamps)  # times only move forward
    assert LogSpec(200_000, seed=2).read_all() != LogSpec(200_000, seed=1).read_all()


def test_logspec_streams_fast_in_bounded_chunks() -> None:
    spec = LogSpec(50 * 1024 * 1024, seed=5, timestamps=True)
    started = time.monotonic()
    total = biggest = 0
    for chunk in spec.iter_chunks():
        total += len(chunk)
        biggest = max(biggest, len(chunk))
    assert total == spec.size and biggest == 65536
    assert time.monotonic() - started < 5  # ~0.2 s here; 200 MB must stream in a few seconds


def test_log_helpers_accept_every_log_form() -> None:
    assert log_bytes(None) == b"" and log_size(None) == 0
    assert log_bytes("naïve") == "naïve".encode() and log_size("naïve") == 6
    assert log_bytes(b"\xff") == b"\xff" and list(iter_log(b"abcde", 2)) == [b"ab", b"cd", b"e"]
    with pytest.raises(ValueError):
        LogSpec(-1)


@pytest.mark.parametrize("key", [(0, True, True, False, False), (5, True, True, True, True)])
def test_block_words_table_is_not_stale(key: tuple[int, bool, bool, bool, bool]) -> None:
    """The precomputed PRNG offsets must match how blocks are rendered now (regenerate them if not)."""
    from itertools import accumulate

    from gitlab_log_shipper.sim.logs import _block_starts, _measure_block_words

    assert _block_starts(key) == tuple(accumulate(_measure_block_words(key), initial=0))
