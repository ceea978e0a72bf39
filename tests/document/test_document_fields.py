"""Issue 13: documents that explain themselves — job sections, failure details and links, at no extra request;
``DOCUMENT_FIELDS=design`` sends exactly the approved design's fields. Real shipper, simulator and receiver over
loopback HTTP; every document validated against docs/payload.schema.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.logs import LogSpec
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import by_pipeline, documents, make_env

# api-post-design.md: the document's fields and each job's, exactly.
DESIGN_FIELDS = ["pipeline_id", "project_id", "project_name", "status", "ref", "sha", "source", "pipeline_type",
                 "created_at", "finished_at", "duration", "user", "stages", "jobs"]
DESIGN_JOB_FIELDS = ["job_id", "job_name", "log_content", "status", "stage", "created_at", "started_at", "finished_at",
                     "duration", "ref"]
SECRET = "hunter2-deploy-token-XYZ"


def _world() -> tuple[World, int, int]:
    world = World()
    project = world.add_project("team/app")
    failing = LogSpec(6000, seed=3, failed=True)
    pipeline = world.add_pipeline(project.id, status="failed", jobs=[
        JobSpec("build", "build", "success", log=LogSpec(5000, seed=1)),
        JobSpec("lint", "test", "failed", log=LogSpec(4000, seed=2, failed=True), allow_failure=True),
        JobSpec("unit", "test", "failed", log=f"{failing.read_all().decode('utf-8', 'replace')}"),
        JobSpec("deploy", "deploy", "manual"),
    ])
    return world, project.id, pipeline.id


def _ship(tmp: Path, world: World, **overrides: str) -> tuple[dict[str, Any], dict[str, int], Path]:
    with GitLabSimulator(world) as sim, Receiver() as receiver:
        env = make_env(tmp, sim, receiver, API_POST_SAVE_TO_FILE="true", **overrides)
        result = env.invoke("run", "--once")
        assert result.exit_code == 0, result.output
        docs = documents(receiver)
        assert len(docs) == 1
        return docs[0], dict(sim.counters), env.output


def test_the_enriched_document_explains_itself(tmp_path: Path) -> None:
    world, project_id, pipeline_id = _world()
    doc, _, output = _ship(tmp_path, world)
    assert list(doc)[:len(DESIGN_FIELDS) - 1] == DESIGN_FIELDS[:-1]  # the design's fields first, in its order
    assert doc["web_url"].endswith(f"/-/pipelines/{pipeline_id}")
    assert {"name", "tag", "queued_duration", "coverage", "before_sha"} <= set(doc)
    assert doc["jobs_failed"] == ["unit"]  # lint failed too, but was allowed to
    jobs = {job["job_name"]: job for job in doc["jobs"]}
    unit, build, deploy = jobs["unit"], jobs["build"], jobs["deploy"]
    assert unit["failure"]["exit_code"] == 1 and unit["failure"]["reason"] == "script_failure"
    assert unit["failure"]["excerpt"] and "\x1b" not in unit["failure"]["excerpt"]
    assert "failure" not in build and build["allow_failure"] is False and jobs["lint"]["allow_failure"] is True
    assert build["web_url"].endswith(f"/-/jobs/{build['job_id']}") and isinstance(build["tags"], list)
    names = [section["name"] for section in build["sections"]]
    assert names[:4] == ["prepare_executor", "prepare_script", "get_sources", "step_script"]
    assert all(section["finished_at"] for section in build["sections"])
    assert deploy["sections"] == [] and "failure" not in deploy  # a manual job that never ran has no log
    # metadata.json carries the same fields
    meta = json.loads(next(output.glob("*/pipeline_*/metadata.json")).read_text("utf-8"))
    assert meta["jobs_failed"] == ["unit"] and meta["web_url"] == doc["web_url"]
    meta_unit = meta["jobs"][str(unit["job_id"])]
    assert meta_unit["failure"] == unit["failure"] and meta_unit["sections"] == unit["sections"]


def test_design_sends_exactly_the_approved_fields(tmp_path: Path) -> None:
    world, _, _ = _world()
    doc, _, output = _ship(tmp_path, world, DOCUMENT_FIELDS="design")
    assert list(doc) == DESIGN_FIELDS
    assert all(list(job) == DESIGN_JOB_FIELDS for job in doc["jobs"])
    meta = json.loads(next(output.glob("*/pipeline_*/metadata.json")).read_text("utf-8"))
    assert "web_url" not in meta and all("sections" not in job for job in meta["jobs"].values())


def test_enriching_costs_no_gitlab_request(tmp_path: Path) -> None:
    _, design_requests, _ = _ship(tmp_path / "design", _world()[0], DOCUMENT_FIELDS="design")
    _, enriched_requests, _ = _ship(tmp_path / "enriched", _world()[0])
    assert enriched_requests == design_requests


def test_the_excerpt_is_masked_like_the_log(tmp_path: Path) -> None:
    world = World()
    project = world.add_project("team/app")
    log = (f"section_start:1790850000:step_script\r\x1b[0K\x1b[36;1mExecuting step_script\x1b[0;m\n"
           f"$ ./deploy.sh --token {SECRET}\ncurl: (22) 401 Unauthorized for {SECRET}\n"
           f"section_end:1790850060:step_script\r\x1b[0K\x1b[31;1mERROR: Job failed: exit code 22\x1b[0;m\n")
    world.add_pipeline(project.id, status="failed", jobs=[JobSpec("deploy", "deploy", "failed", log=log)])
    doc, _, _ = _ship(tmp_path, world, LOG_REDACT_PATTERNS=r"hunter2-[A-Za-z0-9-]+")
    job = doc["jobs"][0]
    assert SECRET not in json.dumps(doc)
    assert job["failure"]["exit_code"] == 22 and "401 Unauthorized" in job["failure"]["excerpt"]
    assert job["sections"][0]["name"] == "step_script" and job["sections"][0]["duration"] == 60


@pytest.mark.parametrize("timestamps", [False, True])
def test_sections_survive_a_log_cut_by_max_job_log_bytes(tmp_path: Path, timestamps: bool) -> None:
    world = World()
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, status="failed", jobs=[
        JobSpec("big", "test", "failed", log=LogSpec(300_000, seed=5, failed=True, timestamps=timestamps))])
    doc, _, _ = _ship(tmp_path, world, MAX_JOB_LOG_BYTES="20000")
    job = by_pipeline([doc])[pipeline.id]["jobs"][0]
    assert job["log_truncated"] is True
    names = [s["name"] for s in job["sections"]]  # of the whole log, also the part the cut removed
    assert "step_script" in names and names[-1] == "cleanup_file_variables"
    assert all(s["finished_at"] for s in job["sections"]) and len(names) > 6
    assert job["failure"]["exit_code"] == 1
