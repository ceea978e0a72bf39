"""GitLab.com's real response shapes, replayed through unmodified python-gitlab.

The cassettes in tests/cassettes/ are built from the recorded samples by tests/make_cassettes.py. These
tests make sure they cannot drift from the samples, hold no credentials, and still mean what our GitLab
client code assumes: list rows lack finish data, jobs come newest first, ``failure_reason`` is absent
rather than null, a never-run manual job has null times, bridges may have no downstream pipeline, and a
job log is raw bytes with ANSI escapes and carriage returns.

The replay tests need only the committed cassettes (and SOURCES.json); the samples folder is optional.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gitlab
import pytest
import vcr
import yaml

from repo_paths import SHARED_DIR, TESTS_DIR

CASSETTES = TESTS_DIR / "cassettes"
GENERATOR = TESTS_DIR / "make_cassettes.py"
# Same location as conftest.SAMPLES_DIR (../shared/gitlab-samples beside the checkout), computed here
# so this module does not depend on conftest importing the simulator.
SAMPLES_DIR = SHARED_DIR / "gitlab-samples"
SOURCES = json.loads((CASSETTES / "SOURCES.json").read_text(encoding="utf-8"))

PROJECT_ID = 87089091
FAKE_TOKEN = "glpat-xxxxxxxxxxxxxxxxxxxx"
CASSETTE_NAMES = sorted(p.name for p in CASSETTES.glob("*.yaml"))

replay = vcr.VCR(
    cassette_library_dir=str(CASSETTES),
    record_mode="none",  # never touch the network: an unmatched request is an error
    match_on=["method", "scheme", "host", "path", "query"],
    filter_headers=["PRIVATE-TOKEN", "Authorization"],  # in case anyone ever records with this config
)


@pytest.fixture
def gl() -> gitlab.Gitlab:
    """A stock python-gitlab client, as the shipper builds it; the token is a dummy."""
    return gitlab.Gitlab("https://gitlab.com", private_token=FAKE_TOKEN, timeout=10)


@contextmanager
def replaying(name: str) -> Iterator[Any]:
    """Replay cassette ``name`` and insist every interaction in it was requested."""
    with replay.use_cassette(name) as cas:
        yield cas
    assert cas.all_played, f"{name}: {len(cas.data) - cas.play_count} interaction(s) never requested"


def load_cassette(name: str) -> dict[str, Any]:
    return yaml.safe_load((CASSETTES / name).read_bytes())


def test_cassettes_are_exactly_what_the_generator_builds_from_the_samples(tmp_path: Path) -> None:
    if not SAMPLES_DIR.is_dir():
        pytest.skip(f"samples not available at {SAMPLES_DIR}; replay tests still run from the committed cassettes")
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--samples", str(SAMPLES_DIR), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr

    built = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in CASSETTES.iterdir() if p.is_file())
    assert committed == built, "a committed file is missing, or a stale one is left in tests/cassettes/"
    for name in built:
        assert (CASSETTES / name).read_bytes() == (tmp_path / name).read_bytes(), (
            f"tests/cassettes/{name} differs from the samples: run `python tests/make_cassettes.py`"
        )


def test_sources_lists_every_cassette_with_checksums() -> None:
    used = {cassette for entry in SOURCES["samples"].values() for cassette in entry["used_by"]}
    assert used == set(CASSETTE_NAMES) == set(SOURCES["cassettes"])
    for entry in SOURCES["samples"].values():
        assert len(entry["sha256"]) == 64 and entry["size"] > 0


@pytest.mark.parametrize("name", CASSETTE_NAMES)
def test_cassette_holds_no_credentials_and_only_gitlab_com(name: str) -> None:
    raw = (CASSETTES / name).read_bytes()
    assert b"glpat-" not in raw
    assert b"private-token" not in raw.lower()
    assert b"authorization" not in raw.lower()
    data = load_cassette(name)
    assert data["version"] == 1
    for interaction in data["interactions"]:
        assert interaction["request"]["uri"].startswith("https://gitlab.com/api/v4/projects/87089091/")
        assert interaction["request"]["method"] == "GET"
        assert interaction["response"]["status"] == {"code": 200, "message": "OK"}


def test_pipeline_list_rows_lack_finish_data_and_pages_follow_link(gl: gitlab.Gitlab) -> None:
    project = gl.projects.get(PROJECT_ID, lazy=True)

    with replaying("pipelines_list.yaml") as cassette:
        rows = project.pipelines.list(updated_after="2026-10-01T10:30:00Z", per_page=1, get_all=True)
        children = project.pipelines.list(
            source="parent_pipeline", updated_after="2026-10-01T10:30:00Z", get_all=True
        )

    assert [(p.id, p.status) for p in rows] == [(2900783081, "running"), (2900771578, "failed")]
    assert [(p.id, p.source) for p in children] == [(2900783186, "parent_pipeline")]
    for row in [*rows, *children]:
        attrs = row.asdict()
        # GitLab's list entity is the short one: finish data and user need the single GET.
        for absent in ("finished_at", "duration", "started_at", "user"):
            assert absent not in attrs, f"{absent} appeared in pipeline list rows"
        assert {"id", "iid", "project_id", "sha", "ref", "status", "source", "created_at", "updated_at"} <= set(attrs)
        assert attrs["updated_at"].endswith("Z") and len(attrs["updated_at"]) == len("2026-10-01T10:40:48.481Z")

    first_page = cassette.responses[0]["headers"]
    assert first_page["X-Next-Page"] == ["2"] and first_page["X-Total"] == ["2"]
    assert cassette.responses[1]["headers"]["X-Next-Page"] == [""]


def test_single_pipeline_has_finish_data_and_a_retry_reopens_it(gl: gitlab.Gitlab) -> None:
    project = gl.projects.get(PROJECT_ID, lazy=True)

    with replaying("pipeline_get.yaml"):
        failed = project.pipelines.get(2900799542)
        reopened = project.pipelines.get(2900783081)

    assert (failed.status, failed.source) == ("failed", "merge_request_event")
    assert failed.finished_at == "2026-10-01T10:45:42.636Z"
    assert failed.duration == 64
    assert failed.user["username"] == "example-user"
    assert "email" not in failed.user  # GitLab does not expose the e-mail here
    # Retrying a job reopened a finished pipeline: running, finish time cleared, duration kept.
    assert (reopened.status, reopened.finished_at, reopened.duration) == ("running", None, 140)


def test_pipeline_jobs_newest_first_failure_reason_absent_and_manual_job_null_times(gl: gitlab.Gitlab) -> None:
    pipeline = gl.projects.get(PROJECT_ID, lazy=True).pipelines.get(2900771578, lazy=True)

    with replaying("pipeline_jobs.yaml"):
        jobs = pipeline.jobs.list(get_all=True)

    ids = [job.id for job in jobs]
    assert ids == sorted(ids, reverse=True) and len(ids) == 4
    by_name = {job.name: job.asdict() for job in jobs}
    assert {name: job["status"] for name, job in by_name.items()} == {
        "probe-manual": "manual",
        "probe-allowed": "failed",
        "probe-fail": "failed",
        "probe-sleep": "success",
    }
    for job in by_name.values():
        if job["status"] == "failed":
            assert job["failure_reason"]
        else:
            assert "failure_reason" not in job  # absent, not null
    manual = by_name["probe-manual"]
    for key in ("started_at", "finished_at", "duration", "queued_duration", "runner"):
        assert manual[key] is None, key
    assert by_name["probe-allowed"]["allow_failure"] is True
    assert all(job["pipeline"]["id"] == 2900771578 for job in by_name.values())
    assert not hasattr(jobs[0], "trace")  # list objects cannot fetch logs; project.jobs.get(lazy=True) can


def test_bridges_downstream_pipeline_may_be_null(gl: gitlab.Gitlab) -> None:
    project = gl.projects.get(PROJECT_ID, lazy=True)

    with replaying("pipeline_bridges.yaml"):
        [with_child] = project.pipelines.get(2900783081, lazy=True).bridges.list(get_all=True)
        [without_child] = project.pipelines.get(2900771578, lazy=True).bridges.list(get_all=True)

    assert with_child.downstream_pipeline["id"] == 2900783186
    assert with_child.downstream_pipeline["source"] == "parent_pipeline"
    assert with_child.downstream_pipeline["project_id"] == PROJECT_ID
    assert without_child.downstream_pipeline is None
    assert without_child.failure_reason == "downstream_pipeline_creation_failed"


def test_job_trace_streams_the_exact_log_bytes(gl: gitlab.Gitlab) -> None:
    job = gl.projects.get(PROJECT_ID, lazy=True).jobs.get(16862533387, lazy=True)

    with replaying("job_trace.yaml") as cassette:
        chunks = list(job.trace(streamed=True, iterator=True))

    log = b"".join(chunks)
    assert all(isinstance(chunk, bytes) for chunk in chunks) and len(chunks) > 1  # really streamed
    assert b"\x1b[0K" in log and b"\r" in log and b"section_start:1554309375:prepare_script\r\x1b[0K" in log
    source = SAMPLES_DIR / "trace_runner11.9_success.log"
    recorded = SOURCES["samples"]["trace_runner11.9_success.log"]
    assert hashlib.sha256(log).hexdigest() == recorded["sha256"]
    assert len(log) == recorded["size"]
    if source.is_file():  # the sample itself, when it is beside the checkout
        assert log == source.read_bytes()
    headers = cassette.responses[0]["headers"]
    assert headers["Content-Type"] == ["text/plain"]  # no charset: the bytes are not promised to be UTF-8
    assert "Content-Length" not in headers
