"""The GitLab simulator over raw HTTP (``requests``): routes, auth, errors, pagination, filters, traces
and fault injection, checked against what ``gitlab-api-notes.md`` says GitLab does."""

from __future__ import annotations

import re
import socket
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import requests

from gitlab_log_shipper.sim.gitlab import Faults, GitLabSimulator
from gitlab_log_shipper.sim.logs import LogSpec
from gitlab_log_shipper.sim.world import JobSpec, Pipeline, Project, World

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
T0 = datetime(2026, 10, 1, 10, 0, 0, tzinfo=timezone.utc)


class Api:
    """A tiny authenticated client for one simulator."""

    def __init__(self, sim: GitLabSimulator, token: str | None = None) -> None:
        self.sim = sim
        self.session = requests.Session()
        self.session.headers["PRIVATE-TOKEN"] = token if token is not None else sim.world.token

    def get(self, path: str, **params: Any) -> requests.Response:
        return self.session.get(f"{self.sim.url}/api/v4{path}", params=params, timeout=10)


@pytest.fixture
def api(gitlab_sim: GitLabSimulator) -> Api:
    return Api(gitlab_sim)


def make_project(world: World, path: str = "app") -> Project:
    group = world.find_group("acme") or world.add_group("acme")
    return world.add_project(path, group_id=group.id)


# -- auth, routing, errors --------------------------------------------------------------------------


def test_token_is_required_and_three_ways_accepted(gitlab_sim: GitLabSimulator) -> None:
    url = f"{gitlab_sim.url}/api/v4/version"
    for headers in ({}, {"PRIVATE-TOKEN": "glpat-wrong"}, {"Authorization": "Bearer glpat-wrong"}):
        r = requests.get(url, headers=headers, timeout=5)
        assert r.status_code == 401 and r.json() == {"message": "401 Unauthorized"}
    token = gitlab_sim.world.token
    assert requests.get(url, headers={"PRIVATE-TOKEN": token}, timeout=5).json()["version"]
    assert requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code == 200
    assert requests.get(url, params={"private_token": token}, timeout=5).status_code == 200


def test_not_found_messages_are_gitlabs(world: World, api: Api) -> None:
    project = make_project(world)
    assert api.get("/nope").json() == {"error": "404 Not Found"}
    assert api.get("/projects/1").json() == {"message": "404 Project Not Found"}
    assert api.get("/groups/nobody").json() == {"message": "404 Group Not Found"}
    assert api.get(f"/projects/{project.id}/pipelines/1").json() == {"message": "404 Not found"}
    assert api.get(f"/projects/{project.id}/jobs/1/trace").status_code == 404
    assert api.get(f"/projects/{project.id}/repository/commits/deadbeef").json() == {"message": "404 Commit Not Found"}
    r = api.get(f"/projects/{project.id}/pipelines/latest-ish")
    assert r.status_code == 400 and r.json() == {"error": "pipeline_id is invalid"}
    r = api.session.post(f"{api.sim.url}/api/v4/projects/{project.id}/pipelines", json={}, timeout=5)
    assert r.status_code == 405


def test_project_and_group_by_encoded_path(world: World, api: Api) -> None:
    top = world.add_group("acme")
    sub = world.add_group("platform", parent_id=top.id)
    project = world.add_project("app", group_id=sub.id)
    r = api.get("/projects/acme%2Fplatform%2Fapp")
    assert r.status_code == 200 and r.json()["id"] == project.id
    assert r.json()["namespace"]["full_path"] == "acme/platform"
    assert api.get(f"/projects/{project.id}").json()["path_with_namespace"] == "acme/platform/app"
    assert api.get("/groups/acme%2Fplatform").json()["id"] == sub.id
    assert api.get(f"/groups/{top.id}").json()["full_path"] == "acme"


def test_version_user_and_ratelimit_headers(api: Api) -> None:
    r = api.get("/version")
    assert set(r.json()) >= {"version", "revision"}
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["RateLimit-Limit"] == "2000" and int(r.headers["RateLimit-Remaining"]) <= 1999
    assert int(r.headers["RateLimit-Reset"]) >= int(time.time())  # a Unix timestamp, not a delay
    user = api.get("/user").json()
    assert user["id"] == 1 and user["username"] == "sim-user"
    assert user["web_url"] == f"{api.sim.url}/sim-user"  # python-gitlab's auth() checks this prefix


# -- pagination -------------------------------------------------------------------------------------


def test_pagination_headers_and_links(world: World, api: Api) -> None:
    project = make_project(world)
    for _ in range(45):
        world.add_pipeline(project.id)
    r = api.get(f"/projects/{project.id}/pipelines", per_page=20, page=2, order_by="id", sort="asc")
    h = r.headers
    assert (h["X-Page"], h["X-Per-Page"], h["X-Prev-Page"], h["X-Next-Page"]) == ("2", "20", "1", "3")
    assert (h["X-Total"], h["X-Total-Pages"]) == ("45", "3")
    links = r.links
    assert set(links) == {"prev", "next", "first", "last"}
    assert links["next"]["url"].startswith(f"{api.sim.url}/api/v4/projects/{project.id}/pipelines?")
    assert "order_by=id" in links["next"]["url"] and "page=3" in links["next"]["url"]
    last = api.get(f"/projects/{project.id}/pipelines", per_page=20, page=3)
    assert len(last.json()) == 5 and last.headers["X-Next-Page"] == "" and "next" not in last.links
    assert api.get(f"/projects/{project.id}/pipelines").headers["X-Per-Page"] == "20"  # default
    big = api.get(f"/projects/{project.id}/pipelines", per_page=500)
    assert big.headers["X-Per-Page"] == "100" and len(big.json()) == 45  # capped at 100
    assert api.get(f"/projects/{project.id}/pipelines", page="x").status_code == 400


def test_above_ten_thousand_rows_totals_are_omitted(world: World, api: Api) -> None:
    project = make_project(world)
    for _ in range(10_000):
        world.add_pipeline(project.id, jobs=())
    counted = api.get(f"/projects/{project.id}/pipelines", per_page=100)
    assert counted.headers["X-Total"] == "10000" and "last" in counted.links
    world.add_pipeline(project.id)
    r = api.get(f"/projects/{project.id}/pipelines", per_page=100, page=2)
    assert "X-Total" not in r.headers and "X-Total-Pages" not in r.headers
    assert "last" not in r.links and r.headers["X-Next-Page"] == "3" and "next" in r.links
    assert len(r.json()) == 100


def test_link_base_url_can_differ_like_behind_a_proxy(world: World, api: Api) -> None:
    project = make_project(world)
    for _ in range(3):
        world.add_pipeline(project.id)
    api.sim.link_base_url = "https://gitlab.internal.example"
    r = api.get(f"/projects/{project.id}/pipelines", per_page=1)
    assert r.links["next"]["url"].startswith("https://gitlab.internal.example/api/v4/")


# -- pipelines --------------------------------------------------------------------------------------


def test_list_rows_have_no_finish_fields_and_ms_timestamps(world: World, api: Api) -> None:
    project = make_project(world)
    pipeline = world.add_pipeline(project.id, created_at=T0, finished_at=T0 + timedelta(seconds=75.123456))
    (row,) = api.get(f"/projects/{project.id}/pipelines").json()
    assert set(row) == {"id", "iid", "project_id", "sha", "ref", "status", "source", "created_at",
                        "updated_at", "web_url", "name"}
    assert row["updated_at"] == "2026-10-01T10:01:15.123Z"  # milliseconds, truncated, "Z"
    single = api.get(f"/projects/{project.id}/pipelines/{pipeline.id}").json()
    assert single["finished_at"] == "2026-10-01T10:01:15.123Z" and single["duration"] == 74
    assert all(TS.match(single[k]) for k in ("created_at", "updated_at", "started_at", "finished_at"))


def test_updated_bounds_are_inclusive_created_bounds_exclusive(world: World, api: Api) -> None:
    # updated_*: UpdatedAtFilterable's gteq/lteq; created_*: Ci::Pipeline's own gt/lt scopes.
    project = make_project(world)
    times = [T0 + timedelta(minutes=i, microseconds=456789) for i in range(5)]
    pipelines = [world.add_pipeline(project.id, finished_at=t) for t in times]
    path = f"/projects/{project.id}/pipelines"

    def ids(**params: Any) -> list[int]:
        return [p["id"] for p in api.get(path, order_by="id", sort="asc", **params).json()]

    exact = [t.isoformat() for t in times]
    assert ids(updated_after=exact[1], updated_before=exact[3]) == [p.id for p in pipelines[1:4]]
    # Stored with microseconds, served with milliseconds: a bound copied from the API's own
    # (truncated) text includes the row as a lower bound but excludes it as an upper bound.
    listed = {p["id"]: p["updated_at"] for p in api.get(path).json()}
    assert ids(updated_after=listed[pipelines[2].id]) == [p.id for p in pipelines[2:]]
    assert ids(updated_before=listed[pipelines[2].id]) == [p.id for p in pipelines[:2]]
    created = [p.created_at.isoformat() for p in pipelines]
    # The exact created_at is excluded by both created bounds; a microsecond either side includes it.
    assert ids(created_after=created[3]) == [pipelines[4].id]
    assert ids(created_after=created[4]) == []
    assert ids(created_before=created[1]) == [pipelines[0].id]
    assert ids(created_before=created[0]) == []
    assert ids(created_after=(pipelines[4].created_at - timedelta(microseconds=1)).isoformat()) == [pipelines[4].id]
    assert ids(created_after=created[1], created_before=created[3]) == [pipelines[2].id]
    # An unencoded "+" in an offset arrives as a space: GitLab answers 400.
    r = api.session.get(f"{api.sim.url}/api/v4{path}?updated_after=2026-10-01T10:00:00+00:00", timeout=5)
    assert r.status_code == 400 and r.json() == {"error": "updated_after is invalid"}


def test_filters_scopes_and_ordering(world: World, api: Api) -> None:
    project = make_project(world)
    alice = world.add_user("alice")
    ok = world.add_pipeline(project.id, status="success", ref="main")
    failed = world.add_pipeline(project.id, status="failed", ref="feature", user=alice)
    running = world.add_pipeline(project.id, status="running", ref="main")
    manual = world.add_pipeline(project.id, status="manual", ref="main")
    mr = world.add_pipeline(project.id, status="success", ref="refs/merge-requests/1/head",
                            source="merge_request_event")
    path = f"/projects/{project.id}/pipelines"

    def ids(**params: Any) -> list[int]:
        r = api.get(path, **params)
        assert r.status_code == 200, r.text
        return [p["id"] for p in r.json()]

    assert ids() == [mr.id, manual.id, running.id, failed.id, ok.id]  # default: id desc
    # scope=finished is GitLab's COMPLETED statuses: success, failed, canceled, skipped (not manual).
    assert ids(scope="finished", sort="asc") == [ok.id, failed.id, mr.id]
    assert ids(scope="running") == [running.id]
    assert ids(scope="branches") == [manual.id, failed.id]  # newest per branch; MR refs are not branches
    assert ids(status="manual") == [manual.id]
    assert ids(ref="feature") == [failed.id] == ids(username="alice") == ids(sha=failed.sha)
    assert ids(source="merge_request_event") == [mr.id]
    assert ids(order_by="status", sort="asc")[0] == failed.id
    assert ids(order_by="ref", sort="desc")[0] == mr.id
    assert ids(order_by="user_id", sort="desc")[0] == failed.id
    touched = world.touch_pipeline(ok.id)
    assert ids(order_by="updated_at")[0] == touched.id
    for bad in ({"order_by": "created_at"}, {"sort": "up"}, {"scope": "done"}, {"status": "ok"}, {"source": "cron"}):
        r = api.get(path, **bad)
        assert r.status_code == 400 and r.json() == {"error": f"{next(iter(bad))} does not have a valid value"}


def test_child_pipelines_only_with_source_parent_pipeline(world: World, api: Api) -> None:
    project = make_project(world)
    parent = world.add_pipeline(project.id)
    child = world.add_child_pipeline(parent.id)
    path = f"/projects/{project.id}/pipelines"
    assert [p["id"] for p in api.get(path).json()] == [parent.id]
    assert [p["id"] for p in api.get(path, scope="finished").json()] == [parent.id]
    assert [p["id"] for p in api.get(path, source="parent_pipeline").json()] == [child.id]
    # ...but the single GET answers for any pipeline.
    assert api.get(f"{path}/{child.id}").json()["source"] == "parent_pipeline"


def test_pipeline_of_another_project_and_deleted_pipeline_are_404(world: World, api: Api) -> None:
    one, two = make_project(world, "one"), make_project(world, "two")
    pipeline = world.add_pipeline(one.id, jobs=[JobSpec("build", log="x")])
    job_id = pipeline.job_ids[0]
    assert api.get(f"/projects/{two.id}/pipelines/{pipeline.id}").status_code == 404
    assert api.get(f"/projects/{two.id}/jobs/{job_id}").status_code == 404
    assert api.get(f"/projects/{two.id}/jobs/{job_id}/trace").status_code == 404
    world.delete_pipeline(pipeline.id)
    for path in (f"/pipelines/{pipeline.id}", f"/pipelines/{pipeline.id}/jobs", f"/jobs/{job_id}",
                 f"/jobs/{job_id}/trace"):
        assert api.get(f"/projects/{one.id}{path}").status_code == 404, path
    assert api.get(f"/projects/{one.id}/pipelines").json() == []


# -- jobs and bridges -------------------------------------------------------------------------------


def failed_pipeline(world: World, project: Project) -> Pipeline:
    return world.add_pipeline(project.id, status="failed", jobs=[
        JobSpec("build", "build", log="built\n"),
        JobSpec("unit", "test", "failed", log=LogSpec(2000, seed=1)),
        JobSpec("lint", "test", "failed", log="lint\n", allow_failure=True),
        JobSpec("deploy", "deploy", "manual"),
    ])


def test_jobs_newest_first_retried_hidden_and_scopes(world: World, api: Api) -> None:
    project = make_project(world)
    pipeline = failed_pipeline(world, project)
    world.add_bridge(pipeline.id, "trigger", "deploy")
    path = f"/projects/{project.id}/pipelines/{pipeline.id}/jobs"
    jobs = api.get(path).json()
    assert [j["name"] for j in jobs] == ["deploy", "lint", "unit", "build"]  # newest first, no bridge
    assert [j["id"] for j in jobs] == sorted(pipeline.job_ids, reverse=True)
    unit = next(j for j in jobs if j["name"] == "unit")
    build = next(j for j in jobs if j["name"] == "build")
    deploy = next(j for j in jobs if j["name"] == "deploy")
    assert unit["failure_reason"] == "script_failure" and "failure_reason" not in build  # absent, not null
    assert unit["artifacts"] == [{"file_type": "trace", "size": 2000, "filename": "job.log", "file_format": None}]
    assert deploy["artifacts"] == [] and deploy["runner"] is None and deploy["duration"] is None
    assert isinstance(build["duration"], float) and build["runner"]["runner_type"] == "instance_type"
    world.retry_pipeline(pipeline.id)
    latest = api.get(path).json()
    everything = api.get(path, include_retried="true").json()
    assert len(latest) == 4 and len(everything) == 6
    assert [j["status"] for j in latest[:2]] == ["running", "running"]
    assert api.get(path, **{"scope[]": ["manual", "success"]}).json()[0]["name"] == "deploy"
    assert [j["name"] for j in api.get(path, scope="success").json()] == ["build"]
    r = api.get(path, scope="finished")  # not a job status: Grape refuses it
    assert r.status_code == 400 and r.json() == {"error": "scope does not have a valid value"}


def test_bridges_and_downstream(world: World, api: Api) -> None:
    project = make_project(world)
    parent = world.add_pipeline(project.id, status="failed")
    child = world.add_child_pipeline(parent.id, status="failed")
    lone = world.add_bridge(parent.id, "probe-child", status="failed")
    path = f"/projects/{project.id}/pipelines/{parent.id}/bridges"
    bridges = api.get(path).json()
    assert [b["id"] for b in bridges] == [lone.id, lone.id - 1]
    assert bridges[0]["downstream_pipeline"] is None
    assert bridges[0]["failure_reason"] == "downstream_pipeline_creation_failed"
    assert bridges[1]["downstream_pipeline"]["id"] == child.id
    assert bridges[1]["downstream_pipeline"]["source"] == "parent_pipeline"
    # A bridge is not a build: the single-job and trace endpoints do not know it.
    assert api.get(f"/projects/{project.id}/jobs/{lone.id}").status_code == 404
    assert api.get(f"/projects/{project.id}/jobs/{lone.id}/trace").status_code == 404
    world.delete_pipeline(child.id)
    assert api.get(path).json()[1]["downstream_pipeline"] is None


def test_single_job_and_commit(world: World, api: Api) -> None:
    project = make_project(world)
    pipeline = world.add_pipeline(project.id, author_email="dev@example.com", jobs=[JobSpec("build", log="x")])
    job = api.get(f"/projects/{project.id}/jobs/{pipeline.job_ids[0]}").json()
    assert job["pipeline"]["id"] == pipeline.id and job["commit"]["author_email"] == "dev@example.com"
    commit = api.get(f"/projects/{project.id}/repository/commits/{pipeline.sha}").json()
    assert commit["author_email"] == "dev@example.com" and commit["last_pipeline"]["id"] == pipeline.id
    assert api.get(f"/projects/{project.id}/repository/commits/{pipeline.sha[:8]}").json()["id"] == pipeline.sha
    assert api.get(f"/projects/{project.id}/repository/commits/main").json()["id"] == pipeline.sha


def test_rails_escapes_html_characters_in_json(world: World, api: Api) -> None:
    project = make_project(world)
    world.add_pipeline(project.id, name="a & <b>")
    r = api.get(f"/projects/{project.id}/pipelines")
    assert "\\u0026 \\u003cb\\u003e" in r.text and r.json()[0]["name"] == "a & <b>"


# -- traces -----------------------------------------------------------------------------------------


def test_trace_is_raw_bytes_as_text_plain(world: World, api: Api) -> None:
    project = make_project(world)
    raw = b"\x1b[32;1mok\x1b[0;m\r\nbad bytes: \xff\xfe\n"
    pipeline = world.add_pipeline(project.id, jobs=[
        JobSpec("raw", log=raw), JobSpec("gen", log=LogSpec(300_000, seed=9, invalid_utf8=True)),
        JobSpec("later", status="manual", log="never shown"),
    ])
    raw_id, gen_id, manual_id = pipeline.job_ids
    r = api.get(f"/projects/{project.id}/jobs/{raw_id}/trace")
    assert r.status_code == 200 and r.content == raw
    assert r.headers["Content-Type"] == "text/plain"  # no charset
    assert r.headers["Content-Length"] == str(len(raw))
    assert r.headers["Content-Disposition"] == f'infile; filename="{raw_id}.log"'
    r = api.get(f"/projects/{project.id}/jobs/{gen_id}/trace")
    assert r.content == LogSpec(300_000, seed=9, invalid_utf8=True).read_all()
    never = api.get(f"/projects/{project.id}/jobs/{manual_id}/trace")
    assert never.status_code == 200 and never.content == b""
    world.erase_job(raw_id)
    erased = api.get(f"/projects/{project.id}/jobs/{raw_id}/trace")
    assert erased.status_code == 200 and erased.content == b""
    # No Range support: the whole log every time.
    ranged = api.session.get(f"{api.sim.url}/api/v4/projects/{project.id}/jobs/{gen_id}/trace",
                             headers={"Range": "bytes=100-"}, timeout=10)
    assert ranged.status_code == 200 and len(ranged.content) == 300_000


def test_client_hanging_up_mid_trace_is_quiet(world: World, api: Api, capfd: pytest.CaptureFixture[str]) -> None:
    project = make_project(world)
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("big", log=LogSpec(20 * 1024 * 1024))])
    host, port = api.sim.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            f"GET /api/v4/projects/{project.id}/jobs/{pipeline.job_ids[0]}/trace HTTP/1.1\r\n"
            f"Host: x\r\nPRIVATE-TOKEN: {world.token}\r\n\r\n".encode()
        )
        assert sock.recv(65536)
    time.sleep(0.3)
    assert api.get("/version").status_code == 200
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and captured.err == ""


# -- faults -----------------------------------------------------------------------------------------


def test_latency_is_added(world: World, api: Api) -> None:
    api.sim.faults.latency = 0.3
    started = time.monotonic()
    assert api.get("/version").status_code == 200
    assert time.monotonic() - started >= 0.3
    api.sim.faults.latency = 0.0


def test_error_rate_answers_listed_statuses_with_an_html_page() -> None:
    world = World()
    with GitLabSimulator(world, faults=Faults(error_rate=0.5, error_statuses=(502, 503), seed=3)) as sim:
        api = Api(sim)
        statuses = [api.get("/version").status_code for _ in range(40)]
        assert set(statuses) == {200, 502, 503}
        sim.faults.error_rate = 1.0
        r = api.get("/version")
        assert r.status_code in (502, 503) and r.headers["Content-Type"] == "text/html"
        assert "<html>" in r.text
        assert sim.counters["version"] == 41
        assert sim.faults_served["error_page"] == 41 - statuses.count(200)


def test_rate_limit_answers_429_with_headers_then_recovers(api: Api) -> None:
    api.sim.faults.update(rate_limit=3, rate_limit_window=1.0)
    # 8 requests: however they straddle a window boundary, one window sees more than 3.
    statuses = [api.get("/version") for _ in range(8)]
    throttled = [r for r in statuses if r.status_code == 429]
    assert throttled, [r.status_code for r in statuses]
    r = throttled[0]
    assert r.text == "Retry later\n" and r.headers["Content-Type"] == "text/plain"
    assert r.headers["Retry-After"] == "1" and r.headers["RateLimit-Remaining"] == "0"
    assert r.headers["RateLimit-Limit"] == "3" and int(r.headers["RateLimit-Reset"]) > time.time() - 1
    assert r.headers["RateLimit-ResetTime"].endswith("GMT")
    api.sim.faults.bare_429 = True
    bare = [api.get("/version") for _ in range(8)]
    bare429 = [r for r in bare if r.status_code == 429]
    assert bare429 and all("Retry-After" not in r.headers and "RateLimit-Limit" not in r.headers for r in bare429)
    api.sim.faults.rate_limit = None
    assert api.get("/version").status_code == 200


def test_drop_trace_after_breaks_the_stream_once_per_job(world: World, api: Api) -> None:
    project = make_project(world)
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("log", log=LogSpec(500_000, seed=2))])
    path = f"/projects/{project.id}/jobs/{pipeline.job_ids[0]}/trace"
    api.sim.faults.drop_trace_after = 100_000
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        api.get(path)
    again = api.get(path)  # once per job: the retry gets the whole log
    assert len(again.content) == 500_000
    assert api.sim.faults_served["dropped_trace"] == 1
    api.sim.faults.drop_trace_always = True
    for _ in range(2):
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            api.get(path)
    # A log shorter than the cut point is never cut.
    small = world.add_pipeline(project.id, jobs=[JobSpec("small", log="tiny\n")])
    assert api.get(f"/projects/{project.id}/jobs/{small.job_ids[0]}/trace").content == b"tiny\n"


def test_counters_bytes_and_reset(world: World, api: Api) -> None:
    project = make_project(world)
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("log", log=LogSpec(10_000))])
    api.sim.reset_counters()
    api.get(f"/projects/{project.id}/pipelines")
    api.get(f"/projects/{project.id}/pipelines/{pipeline.id}")
    trace = api.get(f"/projects/{project.id}/jobs/{pipeline.job_ids[0]}/trace")
    api.get("/nowhere")
    Api(api.sim, token="glpat-wrong").get("/version")
    assert api.sim.counters == {"pipelines": 1, "pipeline": 1, "trace": 1, "unknown": 1, "version": 1}
    assert api.sim.faults_served == {"unauthorized": 1}
    assert api.sim.bytes_sent > len(trace.content) == 10_000
    api.sim.reset_counters()
    assert api.sim.counters == {} and api.sim.faults_served == {} and api.sim.bytes_sent == 0


def test_inject_answers_the_next_requests(world: World, api: Api) -> None:
    project = make_project(world)
    api.sim.inject("pipelines", 503, count=2)
    api.sim.inject(None, 404, body='{"message":"404 Project Not Found"}')
    api.sim.inject("version", 429, headers={})
    path = f"/projects/{project.id}/pipelines"
    assert api.get("/version").status_code == 404  # the any-endpoint rule matched first
    r = api.get("/version")
    assert r.status_code == 429 and "Retry-After" not in r.headers  # headers={}: a bare 429
    assert [api.get(path).status_code for _ in range(3)] == [503, 503, 200]
    api.sim.inject("trace", 429)
    r = api.get(f"/projects/{project.id}/jobs/1/trace")
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert api.sim.counters["pipelines"] == 3 and api.sim.counters["version"] == 2
    assert api.sim.faults_served["injected"] == 5
    with pytest.raises(ValueError):
        api.sim.inject("pipelinez", 500)
