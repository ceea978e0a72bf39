"""The document: one JSON object per pipeline with every job and its whole log (``api-post-design.md``).

Pure functions of GitLab data, plus :func:`write_document`, which streams the JSON to a file so that a
200 MB log never has to sit in memory as one string: logs are read from spool files in chunks, decoded
as UTF-8 (invalid bytes replaced by U+FFFD) and JSON-escaped chunk by chunk.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping, Sequence

# predecessor.md: how the webhook collector named pipelines, kept for receivers that group on it.
_MAIN_SOURCES = frozenset({"push", "web", "schedule", "trigger", "api"})
CHUNK = 256 * 1024

# How json.dumps(..., ensure_ascii=False) escapes inside a string: the 32 control characters, quote and
# backslash; nothing else (UTF-8 passes through). Logs are escaped as UTF-8 bytes with these tables.
_ESCAPES = {i: f"\\u{i:04x}".encode() for i in range(0x20)} | {
    0x08: b"\\b", 0x09: b"\\t", 0x0A: b"\\n", 0x0C: b"\\f", 0x0D: b"\\r", 0x22: b'\\"', 0x5C: b"\\\\"}
# Backslash first, so that no backslash inserted by a later replacement is escaped again.
_COMMON = tuple(bytes([c]) for c in (0x5C, 0x22, 0x0A, 0x0D, 0x09, 0x1B))  # \ " LF CR TAB ESC (ANSI colours)
_RARE_BYTES = bytes(c for c in range(0x20) if bytes([c]) not in _COMMON)
_RARE = re.compile(b"[" + re.escape(_RARE_BYTES) + b"]")

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


# GitLab stamps finished_at on the transitions to success, failed and canceled only (Ci::Pipeline's state machine)
# and does not clear it on the way to manual: a manual pipeline may show the finished_at of an earlier finish.
_RESTS_WITHOUT_FINISH = frozenset({"manual", "skipped"})


def finish_of(pipeline: Mapping[str, Any], jobs: Sequence[Mapping[str, Any]] | None) -> str | None:
    """The finish a pipeline's current state is: ``status|finished_at``.

    GitLab stamps ``finished_at`` only on the way to success, failed or canceled; a pipeline that rests as
    ``skipped`` or ``manual`` (blocked on a manual job) has none. A manual pipeline can come to rest again and again
    (play one manual job, it runs, the pipeline blocks on the next one) with the same status and no finished_at, so
    such a finish is told apart by its jobs: every attempt's id and status, hashed (``manual|jobs:<digest>``), also
    when a stale finished_at of an earlier finish is still shown. The digest does not move when only ``updated_at``
    does, and moves when any job ran, was played or retried since.
    Returns None when the jobs are needed but not given."""
    status = str(pipeline.get("status"))
    finished_at = pipeline.get("finished_at")
    if finished_at and status not in _RESTS_WITHOUT_FINISH:
        return finish_key(status, finished_at)
    if jobs is None:
        return None
    digest = hashlib.sha256(",".join(f"{job['id']}:{job.get('status')}"
                                     for job in sorted(jobs, key=lambda j: j["id"])).encode()).hexdigest()[:20]
    return f"{status}|jobs:{digest}"


def is_legacy_finish(finish: str, pipeline: Mapping[str, Any]) -> bool:
    """``finish`` is what versions before the jobs digest recorded for this skipped or manual pipeline
    (``status|finished_at``, mostly ``status|``): it cannot be compared with :func:`finish_of`'s."""
    status = str(pipeline.get("status"))
    return status in _RESTS_WITHOUT_FINISH and "|jobs:" not in finish and finish.split("|", 1)[0] == status


def rest_time(pipeline: Mapping[str, Any]) -> str | None:
    """When the pipeline came to rest: ``finished_at``, else (skipped and manual pipelines, which GitLab leaves
    without one) ``updated_at``. This is the time ``backfill --since/--until`` windows are matched against."""
    return pipeline.get("finished_at") or pipeline.get("updated_at")


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


def document_header(project_name: str | None, pipeline: Mapping[str, Any], user: dict[str, Any] | None,
                    stages: Sequence[str], *, jobs: Sequence[Mapping[str, Any]] | None = None,
                    enriched: bool = False) -> dict[str, Any]:
    """Every top-level field of the document except ``jobs``, in the design's order; with ``enriched``
    (DOCUMENT_FIELDS=enriched) followed by the extensions, all from answers the shipper reads anyway: the
    pipeline GET (links, name, tag, queued_duration, coverage, before_sha) and its jobs list (``jobs_failed``:
    the names of the latest attempts that failed and were not allowed to)."""
    header = {
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
    if enriched:
        header.update({
            "web_url": pipeline.get("web_url"),
            "name": pipeline.get("name"),
            "tag": pipeline.get("tag"),
            "queued_duration": pipeline.get("queued_duration"),
            "coverage": pipeline.get("coverage"),
            "before_sha": pipeline.get("before_sha"),
            "jobs_failed": [job.get("name") for job in latest_attempts(jobs or ())
                            if job.get("status") == "failed" and not job.get("allow_failure")],
        })
    return header


def job_fields(job: Mapping[str, Any], *, enriched: bool = False) -> dict[str, Any]:
    """A job entry's fields; ``log_content`` is streamed in between by :func:`write_document`. With ``enriched``,
    the extensions from the jobs list: ``allow_failure``, ``web_url``, ``runner`` (``{id, description}`` when GitLab
    shows one), ``tags`` (the job's ``tag_list``), ``queued_duration``, ``coverage``."""
    fields = {
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
    if enriched:
        runner = job.get("runner")
        fields.update({
            "allow_failure": job.get("allow_failure"),
            "web_url": job.get("web_url"),
            "runner": ({"id": runner.get("id"), "description": runner.get("description")}
                       if isinstance(runner, dict) else None),
            "tags": list(job.get("tag_list") or []),
            "queued_duration": job.get("queued_duration"),
            "coverage": job.get("coverage"),
        })
    return fields


@dataclass(frozen=True)
class JobLog:
    """One job of the document: its fields and the spool file holding its raw log (None = empty log).

    ``log_bytes`` is the size of the log GitLab holds; ``truncated`` says the spool file keeps only its head
    and tail (MAX_JOB_LOG_BYTES or API_POST_MAX_BYTES). Both go into the document as ``log_bytes`` and
    ``log_truncated``; ``error`` as ``log_error``, present only when the log could not be read (all documented in
    ``docs/payload.schema.json``).
    """

    fields: Mapping[str, Any]
    log_path: Path | None
    log_bytes: int = 0
    truncated: bool = False
    error: str | None = None  # the log could not be read (GitLab answered 404/403 for it): ``log_error``
    sections: list[dict[str, Any]] | None = None  # the runner's collapsible sections (enriched documents)
    failure: dict[str, Any] | None = None  # a failed job's reason, exit code and excerpt (enriched documents)


def _dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def escape_utf8(data: bytes) -> bytes:
    """Valid UTF-8 → the inside of a JSON string, byte for byte what ``json.dumps(text, ensure_ascii=False)``
    writes. Done on bytes with ``bytes.replace`` (memchr-fast) because escaping the decoded ``str`` runs at a
    third of the speed on CI logs (ANSI colours and newlines everywhere, a few non-ASCII characters)."""
    for raw in _COMMON:
        data = data.replace(raw, _ESCAPES[raw[0]])
    if len(data.translate(None, _RARE_BYTES)) != len(data):  # a C loop; the regex scan is only paid when needed
        data = _RARE.sub(lambda match: _ESCAPES[match.group()[0]], data)
    return data


def _write_log_string(out: BinaryIO, log_path: Path | None) -> None:
    """Write the log as one JSON string literal, chunk by chunk: invalid UTF-8 becomes U+FFFD (the incremental
    decoder keeps a character split across chunks whole), then the valid UTF-8 is escaped."""
    out.write(b'"')
    if log_path is not None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with open(log_path, "rb") as log:
            while chunk := log.read(CHUNK):
                out.write(escape_utf8(decoder.decode(chunk).encode("utf-8")))
        out.write(escape_utf8(decoder.decode(b"", final=True).encode("utf-8")))
    out.write(b'"')


def write_document(out: BinaryIO, header: Mapping[str, Any], jobs: Sequence[JobLog], *, design: bool = False) -> None:
    """Stream the whole document as UTF-8 JSON into ``out`` with memory bounded by :data:`CHUNK`. ``design``
    (DOCUMENT_FIELDS=design): exactly the approved design's job fields, none of the extensions."""
    # Fields go out as whole JSON objects with their braces cut off (one json.dumps per object, not two per field:
    # a third of the cost of writing the document's fields; the bytes are the same, json.dumps' ", " and ": ").
    out.write(b"{")
    if header:
        out.write(_members(header) + b", ")
    out.write(b'"jobs": [')
    for index, job in enumerate(jobs):
        if index:
            out.write(b", ")
        fields = dict(job.fields)
        out.write(b'{"job_id": ' + _dump(fields.pop("job_id")) + b', "job_name": ' + _dump(fields.pop("job_name")))
        out.write(b', "log_content": ')
        _write_log_string(out, job.log_path)
        if not design:
            fields["log_bytes"], fields["log_truncated"] = job.log_bytes, job.truncated
            for key, value in (("log_error", job.error), ("sections", job.sections), ("failure", job.failure)):
                if value is not None:
                    fields[key] = value
        if fields:
            out.write(b", " + _members(fields))
        out.write(b"}")
    out.write(b"]}")


def _members(fields: Mapping[str, Any]) -> bytes:
    """``"a": 1, "b": 2``: the members of a JSON object, as json.dumps writes them."""
    return json.dumps(fields, ensure_ascii=False).encode("utf-8")[1:-1]


# -- size limits ------------------------------------------------------------------------------------

MARKER = "\n[... gitlab-log-shipper: {removed} bytes cut from the middle of this log ({why}) ...]\n"
_NEWLINE_SEARCH = 4096  # cut at a line end when one is this close to the cut point


def truncate_log(source: Path, target: Path, keep: int, why: str) -> bool:
    """Write ``source``'s head and tail (``keep`` bytes in all, cut at line ends where possible) with a
    visible marker line between them to ``target``. Returns False (and copies nothing) when it already fits.
    Streams: memory stays at one chunk whatever the log's size."""
    size = source.stat().st_size
    if size <= keep:
        return False
    head_len, tail_len = keep // 2, keep - keep // 2
    with open(source, "rb") as src:
        src.seek(max(0, head_len - _NEWLINE_SEARCH))
        near_head = src.read(min(head_len, _NEWLINE_SEARCH))
        cut = near_head.rfind(b"\n")
        if cut >= 0:
            head_len = max(0, head_len - len(near_head) + cut + 1)
        tail_start = size - tail_len
        src.seek(tail_start)
        near_tail = src.read(min(tail_len, _NEWLINE_SEARCH))
        cut = near_tail.find(b"\n")
        if cut >= 0:
            tail_start += cut + 1
        removed = tail_start - head_len
        with open(target, "wb") as out:
            src.seek(0)
            _copy(src, out, head_len)
            out.write(MARKER.format(removed=removed, why=why).encode("utf-8"))
            src.seek(tail_start)
            _copy(src, out, size - tail_start)
    return True


def _copy(src: BinaryIO, out: BinaryIO, length: int) -> None:
    while length > 0:
        chunk = src.read(min(CHUNK, length))
        if not chunk:
            break
        out.write(chunk)
        length -= len(chunk)


def escaped_size(log_path: Path | None) -> int:
    """How many bytes the log takes inside the document's JSON string (escapes included), by streaming."""
    if log_path is None:
        return 0
    counter = _Counter()
    _write_log_string(counter, log_path)  # type: ignore[arg-type]
    return counter.count - 2  # the quotes


def document_size(header: Mapping[str, Any], jobs: Sequence[JobLog], *, design: bool = False) -> int:
    """Size in bytes of the document :func:`write_document` would write, computed without storing it."""
    counter = _Counter()
    write_document(counter, header, jobs, design=design)  # type: ignore[arg-type]
    return counter.count


class _Counter:
    """A write-only sink that only counts bytes."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)


def fit_budgets(sizes: Sequence[int], budget: int) -> list[int]:
    """Share ``budget`` among logs of these sizes so that small logs stay whole and big ones are cut evenly
    ("water filling"): returns each log's allowance (never more than its size)."""
    allowance = [0] * len(sizes)
    remaining = max(0, budget)
    pending = sorted(range(len(sizes)), key=lambda i: sizes[i])
    while pending:
        share = remaining // len(pending)
        index = pending[0]
        if sizes[index] <= share:
            allowance[index] = sizes[index]
            remaining -= sizes[index]
            pending.pop(0)
            continue
        for index in pending:
            allowance[index] = share
        break
    return allowance
