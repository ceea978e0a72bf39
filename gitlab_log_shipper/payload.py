"""The document: one JSON object per pipeline with every job and its whole log (``api-post-design.md``).

Pure functions of GitLab data, plus :func:`write_document`, which streams the JSON to a file so that a
200 MB log never has to sit in memory as one string: logs are read from spool files in chunks, decoded
as UTF-8 (invalid bytes replaced by U+FFFD) and JSON-escaped chunk by chunk.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping, Sequence

# predecessor.md: how the webhook collector named pipelines, kept for receivers that group on it.
_MAIN_SOURCES = frozenset({"push", "web", "schedule", "trigger", "api"})
CHUNK = 256 * 1024

# A stable namespace so the same (GitLab, project, pipeline, finish) always yields the same key.
_IDEMPOTENCY_NAMESPACE = uuid.UUID("5b0f1f6e-6f7a-4c1e-9a55-3f2b9e0c8a11")


def pipeline_type(source: str | None) -> str:
    """``merge_request`` / ``child`` / ``main`` / ``unknown`` from the pipeline's ``source``."""
    if source == "merge_request_event":
        return "merge_request"
    if source == "parent_pipeline":
        return "child"
    if source in _MAIN_SOURCES:
        return "main"
    return "unknown"


def finish_key(status: str, finished_at: str | None) -> str:
    """Identifies one finish of a pipeline. A retried pipeline that finishes again gets a new key."""
    return f"{status}|{finished_at or ''}"


def idempotency_key(gitlab_url: str, project_id: int, pipeline_id: int, finish: str) -> str:
    """Stable per (pipeline, finish): a resend of the same finish carries the same key, a new finish a new one."""
    return str(uuid.uuid5(_IDEMPOTENCY_NAMESPACE, f"{gitlab_url.rstrip('/')}|{project_id}|{pipeline_id}|{finish}"))


def latest_attempts(jobs: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Keep the newest attempt of every job name (GitLab: same name, higher id = later retry).

    ``include_retried=true`` lists old attempts with no flag telling them apart, so the id decides.
    Returned in pipeline order (by the id of the job's first attempt, i.e. creation order).
    """
    first_id: dict[str, int] = {}
    newest: dict[str, Mapping[str, Any]] = {}
    for job in jobs:
        name = job["name"]
        first_id[name] = min(first_id.get(name, job["id"]), job["id"])
        if name not in newest or job["id"] > newest[name]["id"]:
            newest[name] = job
    return [newest[name] for name in sorted(newest, key=lambda n: first_id[n])]


def stage_order(jobs: Iterable[Mapping[str, Any]]) -> list[str]:
    """Distinct stage names in pipeline order.

    GitLab creates a pipeline's jobs stage by stage, so the smallest job id seen in a stage (across all
    attempts, which is why retried attempts are listed too) orders the stages.
    """
    first: dict[str, int] = {}
    for job in jobs:
        stage = job.get("stage") or ""
        first[stage] = min(first.get(stage, job["id"]), job["id"])
    return sorted(first, key=lambda s: first[s])


def keep_job(job: Mapping[str, Any], save_job_status: frozenset[str] | None) -> bool:
    """``LOG_SAVE_JOB_STATUS``: None keeps every job."""
    return save_job_status is None or str(job.get("status", "")).lower() in save_job_status


def user_of(pipeline: Mapping[str, Any], commit_email: str | None) -> dict[str, Any] | None:
    """``{name, email}``: the user's public email, else the commit author's email, else null."""
    user = pipeline.get("user")
    if not user:
        return None
    email = user.get("public_email") or commit_email or None
    return {"name": user.get("name"), "email": email}


def document_header(project_name: str | None, pipeline: Mapping[str, Any], user: dict[str, Any] | None, stages: Sequence[str]) -> dict[str, Any]:
    """Every top-level field of the document except ``jobs``, in the design's order."""
    return {
        "pipeline_id": pipeline["id"],
        "project_id": pipeline["project_id"],
        "project_name": project_name,
        "status": pipeline.get("status"),
        "ref": pipeline.get("ref"),
        "sha": pipeline.get("sha"),
        "source": pipeline.get("source"),
        "pipeline_type": pipeline_type(pipeline.get("source")),
        "created_at": pipeline.get("created_at"),
        "finished_at": pipeline.get("finished_at"),
        "duration": pipeline.get("duration"),
        "user": user,
        "stages": list(stages),
    }


def job_fields(job: Mapping[str, Any]) -> dict[str, Any]:
    """A job entry's fields; ``log_content`` is streamed in between by :func:`write_document`."""
    return {
        "job_id": job["id"],
        "job_name": job.get("name"),
        "status": job.get("status"),
        "stage": job.get("stage"),
        "created_at": job.get("created_at"),
        "started_at": job.get("started_at"),
        "finished_at": job.get("finished_at"),
        "duration": job.get("duration"),
        "ref": job.get("ref"),
    }


@dataclass(frozen=True)
class JobLog:
    """One job of the document: its fields and the spool file holding its raw log (None = empty log)."""

    fields: Mapping[str, Any]
    log_path: Path | None


def _dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def _write_log_string(out: BinaryIO, log_path: Path | None) -> None:
    """Write the log as one JSON string literal, decoding and escaping chunk by chunk."""
    out.write(b'"')
    if log_path is not None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with open(log_path, "rb") as log:
            while chunk := log.read(CHUNK):
                text = decoder.decode(chunk)
                if text:
                    out.write(json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8"))
        tail = decoder.decode(b"", final=True)
        if tail:
            out.write(json.dumps(tail, ensure_ascii=False)[1:-1].encode("utf-8"))
    out.write(b'"')


def write_document(out: BinaryIO, header: Mapping[str, Any], jobs: Sequence[JobLog]) -> None:
    """Stream the whole document as UTF-8 JSON into ``out`` with memory bounded by :data:`CHUNK`."""
    out.write(b"{")
    for key, value in header.items():
        out.write(_dump(key) + b": " + _dump(value) + b", ")
    out.write(b'"jobs": [')
    for index, job in enumerate(jobs):
        if index:
            out.write(b", ")
        fields = dict(job.fields)
        out.write(b'{"job_id": ' + _dump(fields.pop("job_id")) + b', "job_name": ' + _dump(fields.pop("job_name")))
        out.write(b', "log_content": ')
        _write_log_string(out, job.log_path)
        for key, value in fields.items():
            out.write(b", " + _dump(key) + b": " + _dump(value))
        out.write(b"}")
    out.write(b"]}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
