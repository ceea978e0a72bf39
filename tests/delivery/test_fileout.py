"""The predecessor's file layout, written atomically."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from gitlab_log_shipper.delivery.files import FileOutput, atomic_write, sanitize
from gitlab_log_shipper.document.payload import JobLog, document_header, job_fields

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("build:production", "build_production"), ("test/unit", "test_unit"), ("a  b//c", "a_b_c"),
     ("__x__", "x"), ("../../etc", ".._.._etc"), ("..", ""), ("rspec 1/3", "rspec_1_3"), ("ünï", "n"), ("v1.2-rc_3", "v1.2-rc_3")],
)
def test_sanitize(raw: str, expected: str) -> None:
    assert sanitize(raw) == expected


def _header(project_name: str | None = "My App") -> dict:
    return document_header(project_name, {"id": 77, "project_id": 5, "status": "failed", "ref": "main", "sha": "s",
                                          "source": "push", "created_at": "c", "finished_at": "f", "duration": 2},
                           {"name": "N", "email": "e"}, ["build", "test"])


def test_layout_and_metadata(tmp_path: Path) -> None:
    log = tmp_path / "spool.log"
    log.write_bytes(b"raw \xff bytes\n")
    out = FileOutput(tmp_path / "out")
    job = {"id": 9, "name": "build:production", "status": "failed", "stage": "build", "created_at": "c",
           "started_at": "s", "finished_at": "f", "duration": 1.0, "ref": "main"}
    folder = out.write_pipeline(_header(), [JobLog(job_fields(job), log), JobLog(job_fields({**job, "id": 10, "name": "never ran"}), None)], NOW)
    assert folder == tmp_path / "out" / "My_App_5" / "pipeline_77"
    assert (folder / "job_9_build_production.log").read_bytes() == b"raw \xff bytes\n"
    assert (folder / "job_10_never_ran.log").read_bytes() == b""
    meta = json.loads((folder / "metadata.json").read_text("utf-8"))
    assert list(meta) == ["pipeline_id", "project_id", "project_name", "status", "ref", "sha", "source", "pipeline_type",
                          "created_at", "finished_at", "duration", "user", "stages", "last_updated", "jobs"]
    assert meta["jobs"]["9"]["log_file"] == "job_9_build_production.log"
    assert set(meta["jobs"]["9"]) == {"job_id", "job_name", "log_file", "saved_at", "status", "stage", "created_at",
                                      "started_at", "finished_at", "duration", "ref"}
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_existing_name_based_or_id_folder_is_reused(tmp_path: Path) -> None:
    out = FileOutput(tmp_path)
    (tmp_path / "project_5").mkdir()
    assert out.project_dir("Renamed", 5) == tmp_path / "project_5"
    assert out.project_dir("Other", 15) == tmp_path / "Other_15"  # _5 must not match _15
    assert out.project_dir(None, 6) == tmp_path / "project_6"


def test_atomic_write_leaves_no_partial_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "f.log"
    target.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        atomic_write(target, source=tmp_path / "missing")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.log"]
