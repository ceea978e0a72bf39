"""The document's pure parts and its streaming writer."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from gitlab_log_shipper.document.payload import (
    JobLog,
    document_size,
    escape_utf8,
    escaped_size,
    fit_budgets,
    truncate_log,
    document_header,
    finish_key,
    idempotency_key,
    job_fields,
    latest_attempts,
    pipeline_type,
    stage_order,
    user_of,
    write_document,
    _write_log_string,
)


@pytest.mark.parametrize(
    ("source", "expected"),
    [("merge_request_event", "merge_request"), ("parent_pipeline", "child"), ("push", "main"), ("web", "main"),
     ("schedule", "main"), ("trigger", "main"), ("api", "main"), ("pipeline", "unknown"), (None, "unknown")],
)
def test_pipeline_type(source: str | None, expected: str) -> None:
    assert pipeline_type(source) == expected


def test_latest_attempts_and_stage_order_survive_retries() -> None:
    # GitLab lists newest first; "build" was retried, so its newest attempt has the highest id.
    jobs = [
        {"id": 40, "name": "build", "stage": "build", "status": "success"},
        {"id": 31, "name": "deploy", "stage": "deploy", "status": "success"},
        {"id": 30, "name": "unit", "stage": "test", "status": "success"},
        {"id": 20, "name": "build", "stage": "build", "status": "failed"},
    ]
    latest = latest_attempts(jobs)
    assert [j["id"] for j in latest] == [40, 30, 31]  # pipeline order, newest attempt of build
    assert stage_order(jobs) == ["build", "test", "deploy"]


def test_finish_and_idempotency_keys_are_stable_per_finish() -> None:
    first = finish_key("failed", "2026-10-01T10:45:42.636Z")
    again = finish_key("failed", "2026-10-01T10:45:42.636Z")
    retried = finish_key("success", "2026-10-01T11:00:00.000Z")
    url = "https://gitlab.example.com"
    assert idempotency_key(url, 1, 2, first) == idempotency_key(url + "/", 1, 2, again)
    assert idempotency_key(url, 1, 2, first) != idempotency_key(url, 1, 2, retried)
    assert idempotency_key(url, 1, 2, first) != idempotency_key(url, 1, 3, first)


def test_user_email_falls_back_to_commit_author() -> None:
    assert user_of({"user": {"name": "A", "public_email": "a@x"}}, "c@x") == {"name": "A", "email": "a@x"}
    assert user_of({"user": {"name": "A", "public_email": ""}}, "c@x") == {"name": "A", "email": "c@x"}
    assert user_of({"user": {"name": "A", "public_email": ""}}, None) == {"name": "A", "email": None}
    assert user_of({"user": None}, "c@x") is None


def test_write_document_streams_valid_json_in_design_order(tmp_path: Path) -> None:
    log1 = tmp_path / "a.log"
    # invalid UTF-8, a multi-byte char split across the writer's chunk boundary, quotes, control chars
    content = b"\x1b[0Ksection_start:1:x\r\x1b[0K\"quoted\" \xff\xfe end " + "é".encode() * 200_000
    log1.write_bytes(content)
    header = document_header("app", {"id": 9, "project_id": 7, "status": "success", "ref": "main", "sha": "abc",
                                      "source": "push", "created_at": "c", "finished_at": "f", "duration": 3},
                             {"name": "N", "email": None}, ["build"])
    job = {"id": 5, "name": "build:prod", "status": "success", "stage": "build", "created_at": "c",
           "started_at": "s", "finished_at": "f", "duration": 1.5, "ref": "main"}
    out = io.BytesIO()
    jobs = [JobLog(job_fields(job), log1, len(content)), JobLog(job_fields({**job, "id": 6}), None)]
    write_document(out, header, jobs)
    assert document_size(header, jobs) == len(out.getvalue())
    assert escaped_size(log1) == len(json.dumps(content.decode("utf-8", "replace"), ensure_ascii=False).encode()) - 2
    doc = json.loads(out.getvalue())
    assert list(doc) == ["pipeline_id", "project_id", "project_name", "status", "ref", "sha", "source", "pipeline_type",
                         "created_at", "finished_at", "duration", "user", "stages", "jobs"]
    assert list(doc["jobs"][0]) == ["job_id", "job_name", "log_content", "status", "stage", "created_at", "started_at",
                                    "finished_at", "duration", "ref", "log_bytes", "log_truncated"]
    assert doc["jobs"][0]["log_content"] == content.decode("utf-8", errors="replace")
    assert doc["jobs"][1]["log_content"] == ""
    assert doc["pipeline_type"] == "main"
    assert (doc["jobs"][0]["log_bytes"], doc["jobs"][0]["log_truncated"]) == (len(content), False)


def test_log_escaping_is_byte_for_byte_json_dumps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes-level escaper against json.dumps(ensure_ascii=False): every byte value, invalid and truncated
    UTF-8, multi-byte characters and escapes split across small chunk boundaries, U+2028 left alone."""
    every_char = "".join(map(chr, range(0x300))) + "\u2028\u2029\U0001f600"
    assert escape_utf8(every_char.encode()) == json.dumps(every_char, ensure_ascii=False)[1:-1].encode()
    monkeypatch.setattr("gitlab_log_shipper.document.payload.CHUNK", 7)
    rng = random.Random(5)
    pieces = [b"\\", b'"', b"\n", b"\r\n", b"\t", b"\x1b[0;32m", b"\x00", b"\x7f", b"\xff", b"\xe2\x82", "é€😀".encode(),
              b"plain text ", b"\x0b\x0c\x1f"]
    for case in range(200):
        content = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        if case % 3 == 0:
            content = bytes(rng.randrange(256) for _ in range(rng.randint(0, 80)))
        log = tmp_path / f"{case}.log"
        log.write_bytes(content)
        out = io.BytesIO()
        _write_log_string(out, log)
        expected = json.dumps(content.decode("utf-8", "replace"), ensure_ascii=False).encode()
        assert out.getvalue() == expected, content
        assert escaped_size(log) == len(expected) - 2


def test_truncate_keeps_head_and_tail_at_line_ends(tmp_path: Path) -> None:
    source = tmp_path / "big.log"
    lines = [f"line {i:06d}\n".encode() for i in range(100_000)]  # 1.2 MB
    source.write_bytes(b"".join(lines))
    target = tmp_path / "cut.log"
    assert truncate_log(source, target, 100_000, "MAX_JOB_LOG_BYTES") is True
    data = target.read_bytes()
    assert data.startswith(b"line 000000\n") and data.endswith(b"line 099999\n")
    head, marker, tail = data.partition(b"\n[... gitlab-log-shipper: ")
    assert head.endswith(b"\n") and len(head.split(b"\n")[-2]) == len(b"line 000000")  # whole lines only
    assert tail.split(b"\n", 1)[1].startswith(b"line ")  # the tail starts at a line start too
    assert b"bytes cut from the middle of this log (MAX_JOB_LOG_BYTES) ...]\n" in tail
    assert len(data) <= 100_000 + 120
    assert truncate_log(target, tmp_path / "again.log", 10**9, "x") is False


def test_fit_budgets_keeps_small_logs_whole() -> None:
    assert fit_budgets([10, 1000, 5000], 3010) == [10, 1000, 2000]
    assert fit_budgets([10, 1000, 5000], 99) == [10, 44, 44]
    assert fit_budgets([10, 20], 1000) == [10, 20]
    assert fit_budgets([], 5) == []
