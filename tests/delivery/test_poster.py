"""Delivery over real HTTP to the recording receiver: retry policy, headers, and the request log line."""

from __future__ import annotations

import re
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from gitlab_log_shipper.config.settings import load_config
from gitlab_log_shipper.delivery.poster import ApiPoster, PostResult, RequestLog, escape_for_log, format_request_line
from gitlab_log_shipper.sim.receiver import Receiver, Reply

LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] PIPELINE_ID=(\d+) PROJECT_ID=(\d+) URL=(\S+) STATUS=(\d+) "
    r"DURATION=(\d+)ms(?: ERROR=(.*?))? RESPONSE=(.*)$"
)


def make_poster(tmp_path: Path, url: str, **env: str) -> ApiPoster:
    config = load_config(None, {
        "GITLAB_URL": "https://gitlab.example.com", "GITLAB_TOKEN": "glpat-0123456789",
        "API_POST_ENABLED": "true", "API_POST_URL": url, "API_POST_AUTH_TOKEN": "tok-SECRET-bearer",
        "RETRY_DELAY": "0", "API_POST_TIMEOUT": "5", **env,
    })
    return ApiPoster(config, RequestLog(tmp_path / "api-requests.log"))


def document(tmp_path: Path) -> Path:
    path = tmp_path / "doc.json"
    path.write_bytes(b'{"pipeline_id": 1, "jobs": []}')
    return path


def log_lines(tmp_path: Path) -> list[str]:
    return (tmp_path / "api-requests.log").read_text("utf-8").splitlines()


def test_success_sends_headers_and_logs_one_line(tmp_path: Path, receiver: Receiver) -> None:
    poster = make_poster(tmp_path, receiver.url)
    result = poster.post_file(document(tmp_path), pipeline_id=12345, project_id=123, idempotency_key="idem-1")
    assert result.ok and result.status == 200
    [req] = receiver.requests
    assert req.header("Authorization") == "Bearer tok-SECRET-bearer"
    assert req.header("Content-Type") == "application/json"
    assert req.header("Idempotency-Key") == "idem-1"
    assert req.header("User-Agent").startswith("gitlab-log-shipper/")
    assert req.json() == {"pipeline_id": 1, "jobs": []}
    [line] = log_lines(tmp_path)
    match = LINE.match(line)
    assert match, line
    assert match.group(1, 2, 3, 4) == ("12345", "123", receiver.url, "200")
    assert match.group(6) is None
    assert match.group(7) == '{"success": true, "message": "Logs received"}'
    assert "SECRET" not in line


def test_5xx_then_success_is_retried_with_the_same_body(tmp_path: Path) -> None:
    with Receiver(script=[Reply(503), Reply(502), Reply(500)]) as rec:
        result = make_poster(tmp_path, rec.url).post_file(document(tmp_path), pipeline_id=1, project_id=2, idempotency_key="k")
        assert result.status == 200
        assert [r.status for r in rec.requests] == [503, 502, 500, 200]
        assert len({r.sha256 for r in rec.requests}) == 1  # the file body was rewound for every retry
    assert len(log_lines(tmp_path)) == 1  # one POST, one line, whatever its retries


def test_429_honours_retry_after(tmp_path: Path) -> None:
    with Receiver(script=[Reply(429, body="slow down", headers={"Retry-After": "1"})]) as rec:
        result = make_poster(tmp_path, rec.url).post_file(document(tmp_path), pipeline_id=1, project_id=2, idempotency_key="k")
        assert result.ok
        first, second = rec.requests
        assert second.received_at - first.received_at >= 0.9


def test_final_failure_hands_back_the_last_response(tmp_path: Path) -> None:
    body = '{"error": "Database connection failed"}'
    with Receiver(script=[Reply(500, body=body)] * 4) as rec:
        result = make_poster(tmp_path, rec.url).post_file(document(tmp_path), pipeline_id=12346, project_id=123, idempotency_key="k")
        assert len(rec.requests) == 4  # first try + RETRY_ATTEMPTS=3
    assert (result.status, result.ok) == (500, False)
    [line] = log_lines(tmp_path)
    assert line.endswith(f"STATUS=500 DURATION={result.duration_ms}ms ERROR=Internal Server Error RESPONSE={body}")


def test_4xx_is_not_retried(tmp_path: Path) -> None:
    for status in (400, 401, 403, 404, 413, 422):
        with Receiver(script=[Reply(status, body="no")]) as rec:
            result = make_poster(tmp_path, rec.url).post_file(document(tmp_path), pipeline_id=1, project_id=2, idempotency_key="k")
            assert result.status == status and len(rec.requests) == 1


def test_retry_disabled_means_one_try(tmp_path: Path) -> None:
    with Receiver(script=[Reply(503)]) as rec:
        result = make_poster(tmp_path, rec.url, API_POST_RETRY_ENABLED="false").post_file(
            document(tmp_path), pipeline_id=1, project_id=2, idempotency_key="k")
        assert result.status == 503 and len(rec.requests) == 1


def test_connection_refused_is_logged_with_a_reason(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    result = make_poster(tmp_path, f"http://127.0.0.1:{port}/logs", RETRY_ATTEMPTS="1").post_file(
        document(tmp_path), pipeline_id=1, project_id=2, idempotency_key="k")
    assert result.status is None and not result.ok
    [line] = log_lines(tmp_path)
    assert "STATUS=0" in line and "ERROR=ConnectionError" in line and "RESPONSE=" in line


def test_no_authorization_header_without_a_token(tmp_path: Path, receiver: Receiver) -> None:
    poster = make_poster(tmp_path, receiver.url, API_POST_AUTH_TOKEN="")
    poster.post_file(document(tmp_path), pipeline_id=1, project_id=2, idempotency_key="k")
    assert receiver.requests[0].header("Authorization") is None


def test_log_line_escapes_and_truncates_the_response() -> None:
    result = PostResult(502, 10, "line1\nline2\r\x1b[31m" + "x" * 2000, "Bad Gateway")
    line = format_request_line(datetime(2024, 1, 1, tzinfo=timezone.utc), 1, 2, "http://h/logs", result)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.startswith("[2024-01-01 00:00:00] PIPELINE_ID=1 PROJECT_ID=2 URL=http://h/logs STATUS=502 DURATION=10ms ERROR=Bad Gateway RESPONSE=line1\\nline2\\r\\x1b[31m")
    assert escape_for_log("a\\nb") == "a\\\\nb"  # a literal backslash-n cannot pass for an escaped newline


class DripServer:
    """A loopback HTTP server that reads the whole request, then sends its answer one byte every ``every``
    seconds from byte ``drip_from`` on: a receiver (or a proxy in front of it) that never stalls long
    enough for a per-read timeout, yet never finishes. Counts the connections it was given."""

    def __init__(self, answer: bytes, *, drip_from: int = 0, every: float = 0.25) -> None:
        self.answer, self.drip_from, self.every = answer, drip_from, every
        self.connections = 0
        self.hung_up_after: list[float] = []  # seconds from the end of the request to the client's hang-up
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/logs"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, body = data.split(b"\r\n\r\n", 1)
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            while len(body) < length:
                body += conn.recv(65536)
            started = time.monotonic()
            try:
                conn.sendall(self.answer[:self.drip_from])
                for byte in self.answer[self.drip_from:]:
                    if self._stop.wait(self.every):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:  # the client hung up
                self.hung_up_after.append(time.monotonic() - started)
                return
            conn.settimeout(1)
            try:
                if conn.recv(1) == b"":
                    self.hung_up_after.append(time.monotonic() - started)
            except OSError:
                pass

    def __enter__(self) -> "DripServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()


ANSWER_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


def test_a_receiver_dripping_its_headers_cannot_hold_a_post_beyond_its_deadline(tmp_path: Path) -> None:
    body = b'{"success": true}'
    with DripServer(ANSWER_HEAD % len(body) + body, every=0.25) as server:  # ~25 s in all, 0.25 s per byte
        poster = make_poster(tmp_path, server.url, API_POST_TIMEOUT="1", RETRY_ATTEMPTS="0")
        started = time.monotonic()
        result = poster.post_file(document(tmp_path), pipeline_id=1, project_id=2, idempotency_key="k")
        took = time.monotonic() - started
    assert took < 3, f"the POST took {took:.1f} s with API_POST_TIMEOUT=1"
    assert result.status is None and not result.ok
    assert "no complete answer within 1 s (API_POST_TIMEOUT)" in result.error
    [line] = log_lines(tmp_path)
    assert "STATUS=0" in line and "API_POST_TIMEOUT" in line


def test_a_receiver_dripping_its_body_is_cut_at_the_deadline_and_its_status_kept(tmp_path: Path) -> None:
    body = b'{"success": true, "message": "' + b"x" * 200 + b'"}'
    with DripServer(ANSWER_HEAD % len(body) + body, drip_from=len(ANSWER_HEAD % len(body)) + 5, every=0.25) as server:
        poster = make_poster(tmp_path, server.url, API_POST_TIMEOUT="1", RETRY_ATTEMPTS="0")
        started = time.monotonic()
        result = poster.post_file(document(tmp_path), pipeline_id=1, project_id=2, idempotency_key="k")
        took = time.monotonic() - started
    assert took < 3, f"the POST took {took:.1f} s with API_POST_TIMEOUT=1"
    assert result.status == 200 and result.ok  # the status line came: the receiver took the document
    assert result.response_text.startswith('{"suc')  # what arrived before the cut is kept


def test_every_attempt_has_its_own_deadline(tmp_path: Path) -> None:
    body = b"{}"
    with DripServer(ANSWER_HEAD % len(body) + body, every=0.25) as server:
        poster = make_poster(tmp_path, server.url, API_POST_TIMEOUT="1", RETRY_ATTEMPTS="1")
        started = time.monotonic()
        result = poster.post_file(document(tmp_path), pipeline_id=1, project_id=2, idempotency_key="k")
        took = time.monotonic() - started
        time.sleep(0.3)
        assert server.connections == 2 and len(server.hung_up_after) == 2
    assert took < 5 and result.status is None
    assert all(0.8 < after < 2 for after in server.hung_up_after), server.hung_up_after  # cut at ~1 s each time
