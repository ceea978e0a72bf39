"""The simulator's JSON has the same keys, key order and value types as real GitLab.com responses.

The samples in ``../shared/gitlab-samples`` were recorded from GitLab.com (October 2026). Each is compared
with the simulator's answer for an object in the same situation (a failed job with the failed sample
job, a never-ran manual job with the manual sample, ...), recursively through nested objects. A sample
``null`` says nothing about the type, so anything goes there; the simulator may answer ``null`` where a
sample has a value only if some sample of that file has ``null`` at the same place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import SAMPLES_DIR

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.world import JobSpec, World

pytestmark = pytest.mark.skipif(
    not SAMPLES_DIR.is_dir(),
    reason=f"GitLab.com samples not found at {SAMPLES_DIR} (CI copies them to ../shared/gitlab-samples)",
)


def load(name: str) -> Any:
    return json.loads((SAMPLES_DIR / name).read_text(encoding="utf-8"))


def nullable_paths(value: Any, path: str = "") -> set[str]:
    """Dotted key paths (list indices dropped) where a sample holds null."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else key
            if item is None:
                found.add(sub)
            found |= nullable_paths(item, sub)
    elif isinstance(value, list):
        for item in value:
            found |= nullable_paths(item, path)
    return found


def json_type(value: Any) -> str:
    # bool before int: in Python a bool is an int, in JSON they differ.
    for name, kind in (("boolean", bool), ("integer", int), ("number", float), ("string", str),
                       ("array", list), ("object", dict)):
        if isinstance(value, kind):
            return name
    return "null"


def shape_problems(sample: Any, ours: Any, nullable: set[str], path: str = "",
                   allowed_extra: frozenset[str] = frozenset()) -> list[str]:
    """Differences in keys, key order and JSON types between a sample and our object."""
    where = path or "$"
    if sample is None:
        return []
    if ours is None:
        return [] if path in nullable else [f"{where}: null where GitLab sends {json_type(sample)}"]
    if json_type(sample) != json_type(ours):
        return [f"{where}: {json_type(ours)} where GitLab sends {json_type(sample)}"]
    problems: list[str] = []
    if isinstance(sample, dict):
        ours_keys = [k for k in ours if k not in allowed_extra]
        if ours_keys != list(sample):
            missing = [k for k in sample if k not in ours]
            extra = [k for k in ours_keys if k not in sample]
            problems.append(f"{where}: keys differ (missing {missing}, extra {extra}, or order)")
        for key in sample:
            if key in ours:
                problems += shape_problems(sample[key], ours[key], nullable, f"{path}.{key}" if path else key)
    elif isinstance(sample, list) and sample:
        for item in ours:
            problems += shape_problems(sample[0], item, nullable, path)
    return problems


def assert_same_shape(sample: Any, ours: Any, nullable: set[str], allowed_extra: frozenset[str] = frozenset()) -> None:
    problems = shape_problems(sample, ours, nullable, allowed_extra=allowed_extra)
    assert not problems, "\n".join(problems)


@pytest.fixture
def recorded(world: World) -> dict[str, int]:
    """A world in the situations the samples were recorded in; returns the ids to look at."""
    project = world.add_project("agentry", group_id=world.add_group("example-user").id)
    failed = world.add_pipeline(project.id, status="failed", source="merge_request_event",
                                ref="refs/merge-requests/12/head", jobs=[
                                    JobSpec("probe-sleep", "test", "success", log="slept\n"),
                                    JobSpec("probe-fail", "test", "failed", log="boom\n"),
                                    JobSpec("probe-allowed", "test", "failed", log="meh\n", allow_failure=True),
                                    JobSpec("probe-manual", "test", "manual"),
                                ])
    lone = world.add_bridge(failed.id, "probe-child", status="failed")
    child = world.add_child_pipeline(failed.id, bridge_name="probe-child", status="failed",
                                     jobs=[JobSpec("child-job", status="failed", log="x")])
    running = world.add_pipeline(project.id, status="failed", source="merge_request_event",
                                 ref="refs/merge-requests/12/head", jobs=[JobSpec("flaky", status="failed", log="1")])
    world.retry_pipeline(running.id)
    return {"project": project.id, "failed": failed.id, "child": child.id, "running": running.id,
            "lone_bridge": lone.id}


def get(sim: GitLabSimulator, path: str, **params: Any) -> requests.Response:
    r = requests.get(f"{sim.url}/api/v4{path}", params=params, headers={"PRIVATE-TOKEN": sim.world.token},
                     timeout=10)
    assert r.status_code == 200, r.text
    return r


def by_status(items: list[dict[str, Any]], status: str, **match: Any) -> dict[str, Any]:
    return next(i for i in items if i["status"] == status and all(i.get(k) == v for k, v in match.items()))


def test_pipeline_list_rows(gitlab_sim: GitLabSimulator, recorded: dict[str, int]) -> None:
    sample = load("pipelines_list.json")
    ours = get(gitlab_sim, f"/projects/{recorded['project']}/pipelines").json()
    nullable = nullable_paths(sample)
    assert_same_shape(by_status(sample, "running"), by_status(ours, "running"), nullable)
    assert_same_shape(by_status(sample, "failed"), by_status(ours, "failed"), nullable)


def test_child_pipeline_list_rows(gitlab_sim: GitLabSimulator, recorded: dict[str, int]) -> None:
    (sample,) = load("pipelines_list_source_parent_pipeline.json")
    (ours,) = get(gitlab_sim, f"/projects/{recorded['project']}/pipelines", source="parent_pipeline").json()
    assert ours["id"] == recorded["child"]
    assert_same_shape(sample, ours, nullable_paths(sample))


def test_single_pipelines(gitlab_sim: GitLabSimulator, recorded: dict[str, int]) -> None:
    failed = load("pipeline_single_failed.json")
    running = load("pipeline_single_running_after_retry.json")
    nullable = nullable_paths([failed, running])
    base = f"/projects/{recorded['project']}/pipelines"
    assert_same_shape(failed, get(gitlab_sim, f"{base}/{recorded['failed']}").json(), nullable)
    # The running sample was recorded without "name" (which the failed one, minutes later, has).
    ours = get(gitlab_sim, f"{base}/{recorded['running']}").json()
    assert ours["status"] == "running" and ours["finished_at"] is None
    assert_same_shape(running, ours, nullable, allowed_extra=frozenset({"name"}))


def test_pipeline_jobs(gitlab_sim: GitLabSimulator, recorded: dict[str, int]) -> None:
    sample = load("pipeline_jobs_list.json")
    ours = get(gitlab_sim, f"/projects/{recorded['project']}/pipelines/{recorded['failed']}/jobs").json()
    nullable = nullable_paths(sample)
    assert [j["name"] for j in ours] == [j["name"] for j in sample]  # same jobs, newest first
    for status, match in (("manual", {}), ("failed", {"allow_failure": True}), ("failed", {"allow_failure": False}),
                          ("success", {})):
        assert_same_shape(by_status(sample, status, **match), by_status(ours, status, **match), nullable)
    never_ran = by_status(ours, "manual")
    assert all(never_ran[k] is None for k in ("started_at", "finished_at", "duration", "queued_duration", "runner"))
    single = get(gitlab_sim, f"/projects/{recorded['project']}/jobs/{by_status(ours, 'success')['id']}").json()
    assert_same_shape(by_status(sample, "success"), single, nullable)


@pytest.mark.parametrize("name", ["bridges_list_downstream_null.json", "bridges_list_with_downstream.json"])
def test_bridges(gitlab_sim: GitLabSimulator, recorded: dict[str, int], name: str) -> None:
    (sample,) = load(name)
    ours = get(gitlab_sim, f"/projects/{recorded['project']}/pipelines/{recorded['failed']}/bridges").json()
    with_downstream = sample["downstream_pipeline"] is not None
    (bridge,) = [b for b in ours if (b["downstream_pipeline"] is not None) == with_downstream]
    assert bridge["failure_reason"] == sample["failure_reason"]
    nullable = nullable_paths([load("bridges_list_downstream_null.json"), load("bridges_list_with_downstream.json")])
    assert_same_shape(sample, bridge, nullable)


def test_trace_headers(gitlab_sim: GitLabSimulator, recorded: dict[str, int], world: World) -> None:
    lines = (SAMPLES_DIR / "trace_response_headers_running_job.http").read_text().splitlines()[1:]
    sample = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
    job_id = world.pipelines[recorded["failed"]].job_ids[0]
    r = get(gitlab_sim, f"/projects/{recorded['project']}/jobs/{job_id}/trace")
    assert r.headers["Content-Type"] == sample["content-type"] == "text/plain"
    assert r.headers["Content-Disposition"] == f'infile; filename="{job_id}.log"'
    assert sample["content-disposition"].startswith('infile; filename="')
    for name in ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "x-request-id", "cache-control"):
        assert name in sample and name in {k.lower() for k in r.headers}, name


def test_samples_are_all_covered() -> None:
    covered = {
        "pipelines_list.json", "pipelines_list_source_parent_pipeline.json", "pipeline_single_failed.json",
        "pipeline_single_running_after_retry.json", "pipeline_jobs_list.json", "bridges_list_downstream_null.json",
        "bridges_list_with_downstream.json", "trace_response_headers_running_job.http",
        "trace_runner11.9_success.log",  # a real log: LogSpec imitates its markers (see test_sim_world)
    }
    present = {p.name for p in Path(SAMPLES_DIR).iterdir() if p.is_file()}
    assert present <= covered, f"new samples without a shape test: {sorted(present - covered)}"
