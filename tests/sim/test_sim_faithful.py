"""Where the simulator used to be convenient rather than faithful (issue 11's review), checked against
what GitLab's source and the real GitLab.com samples say. Each test names its source."""

from __future__ import annotations

import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import gitlab
import pytest
import requests

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.world import JobSpec, Project, World

from shipper_helpers import ManualClock

T0 = datetime(2026, 10, 1, 10, 0, 0, 123456, tzinfo=timezone.utc)


Clock = ManualClock


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def frozen(clock: Clock) -> World:
    return World(clock=clock)


@pytest.fixture
def sim(frozen: World) -> Any:
    with GitLabSimulator(frozen) as simulator:
        yield simulator


def get(sim: GitLabSimulator, path: str, **params: Any) -> requests.Response:
    return requests.get(f"{sim.url}/api/v4{path}", params=params, timeout=10,
                        headers={"PRIVATE-TOKEN": sim.world.token})


def make_project(world: World, path: str = "app") -> Project:
    group = world.find_group("acme") or world.add_group("acme")
    return world.add_project(path, group_id=group.id)


def link_query(response: requests.Response, rel: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(response.links[rel]["url"]).query, keep_blank_values=True)


# -- 1. finished_at null for skipped and manual -------------------------------------------------------


def test_skipped_and_manual_pipelines_have_no_finished_at(frozen: World, clock: Clock, sim: GitLabSimulator) -> None:
    # app/models/ci/pipeline.rb: before_transition any => [:success, :failed, :canceled] stamps finished_at
    # and the duration; any => [:manual] only the duration; nothing for skipped.
    project = make_project(frozen)
    made_manual = frozen.add_pipeline(project.id, status="manual", jobs=[JobSpec("deploy", "deploy", "manual")])
    made_skipped = frozen.add_pipeline(project.id, status="skipped", jobs=[JobSpec("lint", status="skipped")])
    running = [frozen.add_pipeline(project.id, status="running", jobs=[JobSpec("build")]) for _ in range(4)]
    clock.advance(120)
    finished = {status: frozen.finish_pipeline(p.id, status) for status, p in
                zip(("manual", "skipped", "success", "canceled"), running)}
    for status in ("manual", "skipped"):
        assert finished[status].finished_at is None and finished[status].updated_at == clock.now
    assert finished["manual"].duration is not None and finished["manual"].started_at is not None
    for status in ("success", "canceled"):
        assert finished[status].finished_at == clock.now == finished[status].updated_at

    def single(pipeline_id: int) -> dict[str, Any]:
        return get(sim, f"/projects/{project.id}/pipelines/{pipeline_id}").json()

    manual = single(made_manual.id)
    assert (manual["status"], manual["finished_at"]) == ("manual", None)
    assert isinstance(manual["duration"], int) and manual["started_at"] is not None
    skipped = single(made_skipped.id)
    assert (skipped["status"], skipped["finished_at"], skipped["started_at"], skipped["duration"]) == (
        "skipped", None, None, None)
    assert single(finished["manual"].id)["finished_at"] is None
    assert single(finished["success"].id)["finished_at"] is not None


# -- 2. user null ---------------------------------------------------------------------------------


def test_pipeline_without_user_and_deleted_user_render_null(frozen: World, sim: GitLabSimulator) -> None:
    project = make_project(frozen)
    nobody = frozen.add_pipeline(project.id, user=None, jobs=[JobSpec("build")])
    someone = frozen.add_user("leaver")
    theirs = frozen.add_pipeline(project.id, user=someone, jobs=[JobSpec("build")])
    mine = frozen.add_pipeline(project.id)
    before = theirs.updated_at
    assert get(sim, f"/projects/{project.id}/pipelines/{theirs.id}").json()["user"]["username"] == "leaver"
    # ci_pipelines.user_id and p_ci_builds.user_id: on_delete async_nullify (gitlab_loose_foreign_keys.yml).
    frozen.delete_user(someone["id"])
    for pipeline in (nobody, theirs):
        assert get(sim, f"/projects/{project.id}/pipelines/{pipeline.id}").json()["user"] is None
        jobs = get(sim, f"/projects/{project.id}/pipelines/{pipeline.id}/jobs").json()
        assert jobs and all(job["user"] is None for job in jobs)
    assert theirs.updated_at == before  # a nullify does not touch updated_at
    assert get(sim, f"/projects/{project.id}/pipelines/{mine.id}").json()["user"]["id"] == frozen.current_user["id"]
    with pytest.raises(ValueError):
        frozen.delete_user(frozen.current_user["id"])


# -- 3. Link URLs rebuilt by the server -------------------------------------------------------------


def test_link_urls_are_rebuilt_from_grape_params(frozen: World, sim: GitLabSimulator) -> None:
    # lib/gitlab/pagination/offset_header_builder.rb: page_href = params.merge(page:, per_page:).to_query,
    # params being Grape's (route id, coerced values, defaults order_by=id and sort=desc from
    # lib/api/ci/pipelines.rb); DateTime#to_s drops the milliseconds.
    project = make_project(frozen)
    for i in range(5):
        frozen.add_pipeline(project.id, finished_at=T0 + timedelta(seconds=i))
    r = get(sim, f"/projects/{project.id}/pipelines", per_page="02", updated_after="2026-10-01T09:00:00.123Z",
            yaml_errors="0", extra="kept")
    assert r.status_code == 200 and r.headers["X-Next-Page"] == "2"
    query = link_query(r, "next")
    assert query == sorted(query)  # to_query sorts
    assert dict(query) == {
        "extra": "kept", "id": str(project.id), "order_by": "id", "page": "2", "per_page": "2", "sort": "desc",
        "updated_after": "2026-10-01T09:00:00+00:00", "yaml_errors": "false",
    }
    assert "%2B00%3A00" in r.links["next"]["url"]  # CGI.escape of "+00:00"
    # An offset stays as sent; the project path as sent (one segment, escaped).
    by_path = get(sim, "/projects/acme%2Fapp/pipelines", per_page=2, created_after="2026-10-01T11:00:00.5+01:00")
    assert dict(link_query(by_path, "first"))["created_after"] == "2026-10-01T11:00:00+01:00"
    assert dict(link_query(by_path, "first"))["id"] == "acme/app"
    # Jobs: pipeline_id and include_retried's default; scope[] as an array.
    pipeline = frozen.add_pipeline(project.id, jobs=[JobSpec(f"j{i}") for i in range(3)])
    jobs = get(sim, f"/projects/{project.id}/pipelines/{pipeline.id}/jobs", per_page=1, **{"scope[]": ["success"]})
    assert link_query(jobs, "next") == [
        ("id", str(project.id)), ("include_retried", "false"), ("page", "2"), ("per_page", "1"),
        ("pipeline_id", str(pipeline.id)), ("scope[]", "success")]


def test_rebuilt_links_widen_the_window_python_gitlab_resends_its_filters(frozen: World, sim: GitLabSimulator) -> None:
    project = make_project(frozen)
    early = [frozen.add_pipeline(project.id, finished_at=T0 + timedelta(milliseconds=100 + i)) for i in range(3)]
    later = [frozen.add_pipeline(project.id, finished_at=T0 + timedelta(seconds=1 + i)) for i in range(5)]
    e, late = [p.id for p in early], [p.id for p in later]
    since = (T0 + timedelta(milliseconds=500)).isoformat()  # 10:00:00.623456, after the early rows
    # A client that follows rel="next" as given: page 2 onwards ask from 10:00:00 (milliseconds dropped),
    # so the three early rows join the window in front and shift the offsets: repeats and an extra row.
    followed: list[int] = []
    r = get(sim, f"/projects/{project.id}/pipelines", per_page=2, updated_after=since, order_by="id", sort="asc")
    while True:
        followed += [row["id"] for row in r.json()]
        if "next" not in r.links:
            break
        r = requests.get(r.links["next"]["url"], headers={"PRIVATE-TOKEN": frozen.token}, timeout=10)
    assert followed == [late[0], late[1], e[2], late[0], late[1], late[2], late[3], late[4]]
    # python-gitlab parses the next URL but copies the list() keyword arguments over its query
    # (Gitlab.http_request: copy_dict(src=kwargs, dest=params)): its own exact bound wins again.
    asked: list[dict[str, str]] = []
    sim.on_request(lambda endpoint, args, params: asked.append(params) if endpoint == "pipelines" else None)
    client = gitlab.Gitlab(sim.url, private_token=frozen.token, timeout=10)
    rows = list(client.projects.get(project.id, lazy=True).pipelines.list(
        iterator=True, per_page=2, updated_after=since, order_by="id", sort="asc"))
    assert [row.id for row in rows] == late
    assert [a["updated_after"] for a in asked] == [since] * 3 and [a.get("page") for a in asked] == [None, "2", "3"]
    assert asked[1]["id"] == str(project.id)  # the rest of the rebuilt query did come from the Link


# -- 4. created_* exclusive, updated_* inclusive: see test_sim_gitlab.py --------------------------------
# -- 5. out-of-range paging --------------------------------------------------------------------------


def test_per_page_zero_is_400_and_other_values_as_kaminari(frozen: World, sim: GitLabSimulator) -> None:
    project = make_project(frozen)
    for i in range(3):
        frozen.add_pipeline(project.id, finished_at=T0 + timedelta(seconds=i))
    path = f"/projects/{project.id}/pipelines"
    zero = get(sim, path, per_page=0)
    # except_values: [0] in lib/api/concerns/pagination_params.rb; Grape's message.
    assert zero.status_code == 400 and zero.json() == {"error": "per_page has a value not allowed"}
    assert get(sim, path, per_page="x").json() == {"error": "per_page is invalid"}
    negative = get(sim, path, per_page=-5)
    assert negative.status_code == 200 and negative.headers["X-Per-Page"] == "20"
    capped = get(sim, path, per_page=500)
    assert capped.headers["X-Per-Page"] == "100" and dict(link_query(capped, "first"))["per_page"] == "500"
    page_zero = get(sim, path, page=0, per_page=1)
    assert page_zero.headers["X-Page"] == "1" and len(page_zero.json()) == 1
    past = get(sim, path, page=9, per_page=1)
    assert past.json() == [] and past.headers["X-Prev-Page"] == "" and past.headers["X-Next-Page"] == ""
    assert "prev" not in past.links and past.headers["X-Total-Pages"] == "3"


# -- 6. jobs hidden -----------------------------------------------------------------------------------


def test_token_that_cannot_read_jobs_gets_an_empty_list(frozen: World, sim: GitLabSimulator) -> None:
    project = make_project(frozen)
    pipeline = frozen.add_pipeline(project.id, jobs=[JobSpec("build"), JobSpec("test")])
    other = frozen.add_pipeline(project.id, jobs=[JobSpec("build")])
    project.jobs_hidden = True
    assert get(sim, f"/projects/{project.id}/pipelines/{pipeline.id}").json()["status"] == "success"
    r = get(sim, f"/projects/{project.id}/pipelines/{pipeline.id}/jobs")
    assert r.status_code == 200 and r.json() == [] and r.headers["X-Total"] == "0"
    project.jobs_hidden = False
    other.jobs_hidden = True
    assert len(get(sim, f"/projects/{project.id}/pipelines/{pipeline.id}/jobs").json()) == 2
    assert get(sim, f"/projects/{project.id}/pipelines/{other.id}/jobs").json() == []


# -- 7 and 12. the request hook; deletion while paging -------------------------------------------------


def test_request_hook_runs_before_the_answer_outside_the_lock(frozen: World, sim: GitLabSimulator) -> None:
    project = make_project(frozen)
    pipeline = frozen.add_pipeline(project.id, jobs=[JobSpec("build")])
    seen: list[tuple[str, list[str], dict[str, str]]] = []

    # The hook takes the world lock from another thread: it would deadlock if called under the lock.
    def probe(endpoint: str, args: list[str], params: dict[str, str]) -> None:
        got = threading.Event()

        def take() -> None:
            with frozen.lock:
                got.set()

        worker = threading.Thread(target=take)
        worker.start()
        worker.join(timeout=2)
        assert got.is_set()
        seen.append((endpoint, args, params))
        if endpoint == "pipeline":
            frozen.delete_pipeline(int(args[1]))

    assert sim.on_request(probe) is probe
    r = get(sim, f"/projects/{project.id}/pipelines/{pipeline.id}", foo="1")
    assert r.status_code == 404  # the hook ran before the answer was computed
    assert seen == [("pipeline", [str(project.id), str(pipeline.id)], {"foo": "1"})]
    sim.remove_request_hook(probe)
    sim.remove_request_hook(probe)  # twice is fine
    get(sim, "/version")
    assert len(seen) == 1


def test_deletion_while_paging_shifts_offsets_and_skips_a_row(frozen: World, sim: GitLabSimulator) -> None:
    # Offset pagination (LIMIT/OFFSET): a row deleted before page 2 is computed shifts every later row
    # one place up, so the first row that page 2 would have had is never seen.
    project = make_project(frozen)
    pipelines = [frozen.add_pipeline(project.id, finished_at=T0 + timedelta(seconds=i)) for i in range(6)]
    victim = pipelines[0]

    def delete_on_page_2(endpoint: str, args: list[str], params: dict[str, str]) -> None:
        if endpoint == "pipelines" and params.get("page") == "2" and frozen.live_pipeline(victim.id):
            frozen.delete_pipeline(victim.id)

    sim.on_request(delete_on_page_2)
    client = gitlab.Gitlab(sim.url, private_token=frozen.token, timeout=10)
    rows = list(client.projects.get(project.id, lazy=True).pipelines.list(
        iterator=True, per_page=3, order_by="id", sort="asc"))
    seen = [r.id for r in rows]
    assert seen == [pipelines[i].id for i in (0, 1, 2, 4, 5)]  # pipelines[3] skipped
    sim.remove_request_hook(delete_on_page_2)


def test_retry_between_pipeline_get_and_jobs_get(frozen: World, sim: GitLabSimulator) -> None:
    project = make_project(frozen)
    pipeline = frozen.add_pipeline(project.id, status="failed", jobs=[JobSpec("test", status="failed")])
    retried = threading.Event()

    def retry_before_jobs(endpoint: str, args: list[str], params: dict[str, str]) -> None:
        if endpoint == "pipeline_jobs" and not retried.is_set():
            retried.set()
            frozen.retry_pipeline(int(args[1]))

    sim.on_request(retry_before_jobs)
    single = get(sim, f"/projects/{project.id}/pipelines/{pipeline.id}").json()
    jobs = get(sim, f"/projects/{project.id}/pipelines/{pipeline.id}/jobs").json()
    assert single["status"] == "failed" and [j["status"] for j in jobs] == ["running"]
    everything = get(sim, f"/projects/{project.id}/pipelines/{pipeline.id}/jobs", include_retried="true").json()
    assert [j["status"] for j in everything] == ["running", "failed"]  # the old attempt kept, older id


# -- 8. skewed clocks --------------------------------------------------------------------------------


def test_node_clock_skew_stamps_rows_but_not_the_date_header(frozen: World, clock: Clock, sim: GitLabSimulator) -> None:
    project = make_project(frozen)
    a = frozen.add_pipeline(project.id, status="running", jobs=[JobSpec("build", status="running")])
    b = frozen.add_pipeline(project.id, status="running")
    frozen.finish_pipeline(a.id, "success", skew=timedelta(minutes=10))
    assert a.updated_at == a.finished_at == clock.now + timedelta(minutes=10)
    assert frozen.jobs[a.job_ids[0]].finished_at == clock.now + timedelta(minutes=10)
    frozen.node_clock_offset = timedelta(seconds=-30)
    frozen.touch_pipeline(b.id)
    assert b.updated_at == clock.now - timedelta(seconds=30)
    frozen.retry_pipeline(a.id, skew=timedelta(0))
    assert a.updated_at == clock.now
    r = get(sim, f"/projects/{project.id}/pipelines/{a.id}")
    assert r.headers["Date"] == clock.now.strftime("%a, %d %b %Y %H:%M:%S GMT")


# -- 9. manual jobs played -----------------------------------------------------------------------------


def test_play_manual_job_reopens_and_reblocks_on_the_next(frozen: World, clock: Clock, sim: GitLabSimulator) -> None:
    project = make_project(frozen)
    pipeline = frozen.add_pipeline(project.id, status="manual", jobs=[
        JobSpec("build", "build"),
        JobSpec("deploy-eu", "deploy", "manual", allow_failure=False),
        JobSpec("deploy-us", "promote", "manual", allow_failure=False),
    ])
    build, eu, us = (frozen.jobs[i] for i in pipeline.job_ids)
    started, first_rest = pipeline.started_at, pipeline.updated_at
    assert pipeline.finished_at is None
    clock.advance(60)
    played = frozen.play_job(eu.id)
    assert played.id == eu.id and played.status == "running" and played.started_at == clock.now
    assert (pipeline.status, pipeline.finished_at, pipeline.started_at) == ("running", None, started)
    assert pipeline.updated_at == clock.now > first_rest
    api = get(sim, f"/projects/{project.id}/pipelines/{pipeline.id}").json()
    assert (api["status"], api["finished_at"]) == ("running", None)
    clock.advance(30)
    frozen.finish_job(eu.id, "success")
    # Blocked on the next manual job: manual again, finished_at still null, updated_at moved.
    assert (pipeline.status, pipeline.finished_at, pipeline.updated_at) == ("manual", None, clock.now)
    assert eu.finished_at == clock.now and eu.duration(clock.now) == 30.0
    with pytest.raises(ValueError):
        frozen.play_job(eu.id)  # no longer manual
    clock.advance(30)
    frozen.play_job(us.id)
    clock.advance(30)
    frozen.finish_job(us.id, "success")
    assert (pipeline.status, pipeline.finished_at, pipeline.updated_at) == ("success", clock.now, clock.now)
    assert build.status == "success"
    jobs = get(sim, f"/projects/{project.id}/pipelines/{pipeline.id}/jobs").json()
    assert {j["name"]: j["status"] for j in jobs} == {"build": "success", "deploy-eu": "success",
                                                      "deploy-us": "success"}
    assert len(jobs) == 3  # playing does not create new attempts


def test_finish_job_failed_fails_the_pipeline(frozen: World, clock: Clock) -> None:
    project = make_project(frozen)
    pipeline = frozen.add_pipeline(project.id, status="manual", jobs=[
        JobSpec("deploy", "deploy", "manual", allow_failure=False)])
    frozen.play_job(pipeline.job_ids[0])
    clock.advance(5)
    frozen.finish_job(pipeline.job_ids[0], "failed")
    assert (pipeline.status, pipeline.finished_at) == ("failed", clock.now)
    assert frozen.jobs[pipeline.job_ids[0]].failure_reason == "script_failure"


# -- 10. a trickling trace -----------------------------------------------------------------------------


def test_trickling_trace_is_slow_for_its_job_only_and_stops_when_the_client_hangs_up(
    frozen: World, sim: GitLabSimulator
) -> None:
    project = make_project(frozen)
    pipeline = frozen.add_pipeline(project.id, jobs=[JobSpec("slow", log="x" * 4000), JobSpec("fast", log="y" * 4000)])
    slow_id, fast_id = pipeline.job_ids
    sim.faults.update(trace_trickle=(100, 0.05), trace_trickle_jobs=frozenset({slow_id}))
    started = time.monotonic()
    assert get(sim, f"/projects/{project.id}/jobs/{fast_id}/trace").content == b"y" * 4000
    assert time.monotonic() - started < 1.0
    # Read a few bytes of the slow one, then hang up: the server stops writing (its next write fails).
    sock = socket.create_connection((sim.host, sim.port), timeout=5)
    sock.sendall(f"GET /api/v4/projects/{project.id}/jobs/{slow_id}/trace HTTP/1.1\r\nHost: x\r\n"
                 f"PRIVATE-TOKEN: {frozen.token}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1024)
    assert b"Content-Length: 4000" in head
    sock.close()
    time.sleep(0.3)
    sent_after_hangup = sim.bytes_sent
    time.sleep(0.3)
    assert sim.bytes_sent == sent_after_hangup < 8000 and sim.faults_served["trickled_trace"] == 1
    # Whole, but slowly: 40 writes 50 ms apart.
    started = time.monotonic()
    assert get(sim, f"/projects/{project.id}/jobs/{slow_id}/trace").content == b"x" * 4000
    assert time.monotonic() - started >= 1.5


# -- 11. a project that vanished -----------------------------------------------------------------------


def test_deleted_project_is_404_everywhere(frozen: World, sim: GitLabSimulator) -> None:
    project = make_project(frozen)
    keep = make_project(frozen, "keep")
    pipeline = frozen.add_pipeline(project.id, jobs=[JobSpec("build", log="hello\n")])
    frozen.delete_project(project.id)
    gone = {"message": "404 Project Not Found"}
    for path in ("", "/pipelines", f"/pipelines/{pipeline.id}", f"/pipelines/{pipeline.id}/jobs",
                 f"/jobs/{pipeline.job_ids[0]}/trace"):
        for ref in (str(project.id), "acme%2Fapp"):
            r = get(sim, f"/projects/{ref}{path}")
            assert (r.status_code, r.json()) == (404, gone), path
    group = frozen.find_group("acme")
    assert group is not None
    listed = [p["id"] for p in get(sim, f"/groups/{group.id}/projects").json()]
    assert listed == [keep.id]
    assert [p["id"] for p in get(sim, "/projects", membership="true").json()] == [keep.id]
    assert get(sim, f"/projects/{keep.id}").status_code == 200
