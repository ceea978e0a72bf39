"""The recording receiver, exercised with real HTTP from ``requests`` on loopback.

The shipper's delivery tests trust this server to behave like the real API and its nginx front end:
scripted statuses, pass-through headers, 401/413 rejections, gzip, latency, dropped connections,
and flat memory for very large bodies. These tests pin that behaviour.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from gitlab_log_shipper.sim.receiver import Receiver, RecordedRequest, Reply

DOCUMENT = {"pipeline_id": 2900771578, "project_id": 87089091, "jobs": [{"job_id": 1, "log_content": "ok\n"}]}
TOKEN = "s3cret-receiver-token"


def post(url: str, **kwargs: object) -> requests.Response:
    """One POST with a timeout, so a receiver bug fails the test instead of hanging it."""
    kwargs.setdefault("timeout", 10)
    return requests.post(url, **kwargs)  # type: ignore[arg-type]


def test_records_method_path_headers_body_and_json(receiver: Receiver) -> None:
    body = json.dumps(DOCUMENT).encode()
    before = time.time()
    response = post(
        receiver.url,
        data=body,
        headers={"Content-Type": "application/json", "Idempotency-Key": "pipeline-2900771578-v1", "X-Extra": "1"},
    )

    assert response.status_code == 200
    assert response.json() == {"success": True, "message": "Logs received"}
    assert response.headers["Content-Type"] == "application/json"
    [recorded] = receiver.requests
    assert (recorded.method, recorded.path, recorded.status) == ("POST", "/logs", 200)
    assert recorded.headers["content-type"] == "application/json"
    assert recorded.header("X-EXTRA") == "1"
    assert recorded.header("X-Missing") is None
    assert recorded.idempotency_key == "pipeline-2900771578-v1"
    assert recorded.body == body
    assert recorded.json() == DOCUMENT
    assert recorded.body_size == recorded.wire_size == len(body)
    assert recorded.sha256 == hashlib.sha256(body).hexdigest()
    assert before <= recorded.received_at <= time.time()
    assert receiver.accepted() == [recorded]
    assert receiver.url.startswith("http://127.0.0.1:") and receiver.url.endswith("/logs")


def test_list_script_is_consumed_in_order_then_defaults_to_200(receiver: Receiver) -> None:
    receiver.set_script([Reply(503, '{"error": "busy"}')] * 3 + [Reply(200, '{"success": true, "id": 7}')])

    answers = [post(receiver.url, json=DOCUMENT) for _ in range(5)]

    assert [a.status_code for a in answers] == [503, 503, 503, 200, 200]
    assert answers[0].json() == {"error": "busy"}
    assert answers[3].json() == {"success": True, "id": 7}
    assert answers[4].json() == {"success": True, "message": "Logs received"}
    assert [r.status for r in receiver.requests] == [503, 503, 503, 200, 200]
    assert len(receiver.accepted()) == 2


def test_429_passes_retry_after_and_body_through(receiver: Receiver) -> None:
    receiver.set_script([Reply(429, "Retry later", {"Retry-After": "7", "RateLimit-Remaining": "0"})])

    response = post(receiver.url, json=DOCUMENT)

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert response.headers["RateLimit-Remaining"] == "0"
    assert response.text == "Retry later"
    assert response.headers["Content-Type"].startswith("text/plain")
    assert receiver.accepted() == []


def test_callable_script_decides_per_request(receiver: Receiver) -> None:
    seen: list[RecordedRequest] = []

    def decide(request: RecordedRequest) -> Reply:
        seen.append(request)
        return Reply(201) if request.json()["pipeline_id"] % 2 else Reply(422, '{"error": "even"}')

    receiver.set_script(decide)
    statuses = [post(receiver.url, json={"pipeline_id": n}).status_code for n in (1, 2, 3)]

    assert statuses == [201, 422, 201]
    assert [r.json()["pipeline_id"] for r in seen] == [1, 2, 3]
    assert [r.status for r in receiver.requests] == [201, 422, 201]


def test_broken_callable_script_answers_500_instead_of_hanging_up(receiver: Receiver) -> None:
    receiver.set_script(lambda request: 1 / 0)  # type: ignore[arg-type,return-value]

    response = post(receiver.url, json=DOCUMENT)

    assert response.status_code == 500
    assert "ZeroDivisionError" in response.json()["error"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_413_above_max_bytes_without_consuming_the_script(chunked: bool) -> None:
    with Receiver(max_bytes=1000, script=[Reply(202)]) as rec:
        big = b"x" * 5000
        data = iter([big[:1500], big[1500:]]) if chunked else big
        refused = post(rec.url, data=data)
        exactly = post(rec.url, data=b"y" * 1000)

    assert refused.status_code == 413
    assert refused.headers["Content-Type"] == "text/html"
    assert refused.text.startswith("<html>")
    assert "<title>413 Request Entity Too Large</title>" in refused.text
    assert "nginx" in refused.text
    assert exactly.status_code == 202  # at the limit is allowed; the scripted reply was still there
    first, second = rec.requests
    assert first.header("Transfer-Encoding" if chunked else "Content-Length") == ("chunked" if chunked else "5000")
    assert (first.status, first.wire_size, first.body, first.body_size, first.sha256) == (413, 5000, None, 0, "")
    assert (second.status, second.wire_size, second.body) == (202, 1000, b"y" * 1000)


def test_token_checked_before_the_script() -> None:
    with Receiver(token=TOKEN, script=[Reply(201)]) as rec:
        missing = post(rec.url, json=DOCUMENT)
        wrong = post(rec.url, json=DOCUMENT, headers={"Authorization": "Bearer nope"})
        not_bearer = post(rec.url, json=DOCUMENT, headers={"Authorization": TOKEN})
        right = post(rec.url, json=DOCUMENT, headers={"Authorization": f"Bearer {TOKEN}"})

    for rejected in (missing, wrong, not_bearer):
        assert rejected.status_code == 401
        assert rejected.json() == {"error": "invalid token"}
    assert right.status_code == 201  # the 401s did not use up the scripted reply
    assert [r.status for r in rec.requests] == [401, 401, 401, 201]
    assert [r.header("Authorization") for r in rec.requests] == [None, "Bearer nope", TOKEN, f"Bearer {TOKEN}"]


def test_gzip_body_is_decoded_and_both_sizes_recorded(receiver: Receiver) -> None:
    document = {"pipeline_id": 5, "jobs": [{"log_content": "line\n" * 20_000}]}
    raw = json.dumps(document).encode()
    packed = gzip.compress(raw)

    response = post(
        receiver.url, data=packed, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )

    assert response.status_code == 200
    [recorded] = receiver.requests
    assert recorded.json() == document
    assert recorded.body == raw
    assert (recorded.body_size, recorded.wire_size) == (len(raw), len(packed))
    assert recorded.wire_size < recorded.body_size / 50
    assert recorded.sha256 == hashlib.sha256(raw).hexdigest()


def test_chunked_gzip_body_and_concatenated_members(receiver: Receiver) -> None:
    raw = b'{"pipeline_id": 6, "log": "' + b"abc" * 100_000 + b'"}'
    packed = gzip.compress(raw[:1000]) + gzip.compress(raw[1000:])  # two gzip members are one stream
    pieces = [packed[i : i + 777] for i in range(0, len(packed), 777)]

    response = post(receiver.url, data=iter(pieces), headers={"Content-Encoding": "gzip"})

    assert response.status_code == 200
    [recorded] = receiver.requests
    assert recorded.header("Transfer-Encoding") == "chunked"
    assert recorded.body == raw
    assert recorded.wire_size == len(packed)


def test_invalid_gzip_is_a_400(receiver: Receiver) -> None:
    response = post(receiver.url, data=b"this is not gzip", headers={"Content-Encoding": "gzip"})

    assert response.status_code == 400
    assert "invalid gzip" in response.json()["error"]
    assert receiver.requests[0].status == 400


def test_delay_holds_every_answer_and_reply_delay_adds_to_it() -> None:
    with Receiver(delay=0.3, script=[Reply(delay=0.2)]) as rec:
        started = time.monotonic()
        post(rec.url, json=DOCUMENT)
        first = time.monotonic() - started
        started = time.monotonic()
        post(rec.url, json=DOCUMENT)
        second = time.monotonic() - started

    assert 0.5 <= first < 3
    assert 0.3 <= second < 0.5 + 2


def test_client_timeout_during_delay_still_counts_as_delivered(receiver: Receiver) -> None:
    """The nasty case for any shipper: it gave up waiting, yet the API stored the document."""
    receiver.set_script([Reply(delay=0.6)])

    with pytest.raises(requests.ReadTimeout):
        requests.post(receiver.url, json=DOCUMENT, timeout=0.2)

    [accepted] = receiver.wait_for(1, timeout=5)
    assert accepted.status == 200


def test_drop_closes_the_connection_without_an_answer(receiver: Receiver) -> None:
    receiver.set_script([Reply(drop=True)])

    with pytest.raises(requests.ConnectionError):
        post(receiver.url, json=DOCUMENT)
    after = post(receiver.url, json=DOCUMENT)

    assert after.status_code == 200
    assert [r.status for r in receiver.requests] == [0, 200]  # the dropped one was read, never answered
    assert receiver.requests[0].json() == DOCUMENT


def test_urllib3_retry_adapter_rides_out_two_503s(receiver: Receiver) -> None:
    receiver.set_script([Reply(503), Reply(503), Reply(200)])
    retry = Retry(total=3, status_forcelist=[503], allowed_methods=None, backoff_factor=0)
    with requests.Session() as session:
        session.mount("http://", HTTPAdapter(max_retries=retry))
        response = session.post(receiver.url, json=DOCUMENT, timeout=10)

    assert response.status_code == 200
    assert [r.status for r in receiver.requests] == [503, 503, 200]
    assert len({r.sha256 for r in receiver.requests}) == 1  # the same document each time


@pytest.mark.slow
def test_store_bodies_false_streams_300_mb_in_flat_memory() -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    count = 300
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(chunk)

    def body() -> Iterator[bytes]:
        for _ in range(count):
            yield chunk

    with Receiver(store_bodies=False) as rec:
        tracemalloc.start()
        try:
            baseline, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            response = requests.post(rec.url, data=body(), timeout=120)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    assert response.status_code == 200
    [recorded] = rec.requests
    assert recorded.header("Transfer-Encoding") == "chunked"
    assert recorded.body is None
    assert recorded.body_size == recorded.wire_size == count * len(chunk)
    assert recorded.sha256 == expected.hexdigest()
    with pytest.raises(ValueError, match="not stored"):
        recorded.json()
    # Client and server share this process: both sides together must stay far below the body size.
    assert peak - baseline < 30 * 1024 * 1024, f"peak grew by {(peak - baseline) / 2**20:.1f} MiB"


def test_wait_for_blocks_until_enough_accepted_and_times_out_with_a_clue(receiver: Receiver) -> None:
    receiver.set_script([Reply(503)])

    def late_posts() -> None:
        time.sleep(0.2)
        for n in range(3):
            post(receiver.url, json={"pipeline_id": n})

    sender = threading.Thread(target=late_posts)
    sender.start()
    accepted = receiver.wait_for(2, timeout=5)
    sender.join()

    assert len(accepted) >= 2
    assert all(r.status == 200 for r in accepted)
    with pytest.raises(TimeoutError, match=r"statuses of all 3 POSTs: \[503, 200, 200\]"):
        receiver.wait_for(3, timeout=0.2)


def test_concurrent_posts_are_all_recorded_and_each_reply_used_once(receiver: Receiver) -> None:
    receiver.set_script([Reply(200 + n) for n in range(20)])
    statuses: list[int] = []
    lock = threading.Lock()

    def send(n: int) -> None:
        status = post(receiver.url, json={"pipeline_id": n}).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(statuses) == list(range(200, 220))
    assert sorted(r.json()["pipeline_id"] for r in receiver.requests) == list(range(20))
    assert [r.status for r in receiver.requests] == list(range(200, 220))  # replies follow arrival order


def test_dump_dir_gets_each_accepted_json_document(tmp_path: Path) -> None:
    dump = tmp_path / "received"
    with Receiver(token=TOKEN, dump_dir=dump, script=[Reply(200), Reply(500), Reply(200), Reply(200)]) as rec:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        post(rec.url, json={"pipeline_id": 11, "jobs": []}, headers=auth)
        post(rec.url, json={"pipeline_id": 12}, headers=auth)  # 500: not accepted, not dumped
        post(rec.url, json={"pipeline_id": 13})  # 401: not accepted, not dumped
        post(rec.url, json={"pipeline_id": 14}, headers=auth)
        post(rec.url, data=b"not json", headers=auth)  # accepted but not a document: skipped

    assert sorted(p.name for p in dump.iterdir()) == ["1-pipeline-11.json", "2-pipeline-14.json"]
    assert json.loads((dump / "1-pipeline-11.json").read_bytes()) == {"pipeline_id": 11, "jobs": []}
    assert (dump / "2-pipeline-14.json").read_bytes() == rec.requests[3].body


def test_dump_dir_needs_stored_bodies(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="store_bodies"):
        Receiver(dump_dir=tmp_path, store_bodies=False)


def test_get_on_the_path_is_405_health_is_200_other_paths_404(receiver: Receiver) -> None:
    base = receiver.url.rsplit("/", 1)[0]

    on_path = requests.get(receiver.url, timeout=5)
    health = requests.get(f"{base}/health", timeout=5)
    elsewhere = post(f"{base}/other", json=DOCUMENT)

    assert on_path.status_code == 405
    assert on_path.headers["Allow"] == "POST"
    assert health.status_code == 200
    assert elsewhere.status_code == 404
    assert [(r.path, r.status) for r in receiver.requests] == [("/other", 404)]  # GETs are not recorded


def test_custom_path_and_clear() -> None:
    with Receiver(path="/api/v1/pipeline-logs") as rec:
        assert rec.url.endswith("/api/v1/pipeline-logs")
        assert post(rec.url, json=DOCUMENT).status_code == 200
        rec.clear()
        assert rec.requests == []
        assert post(rec.url, json=DOCUMENT).status_code == 200
        assert len(rec.requests) == 1


def test_stop_does_not_wait_for_a_delayed_answer() -> None:
    rec = Receiver(script=[Reply(delay=30)]).start()
    client = threading.Thread(
        target=lambda: pytest.raises(requests.RequestException, post, rec.url, json=DOCUMENT, timeout=10)
    )
    client.start()
    deadline = time.monotonic() + 5
    while not rec.requests and time.monotonic() < deadline:
        time.sleep(0.01)

    started = time.monotonic()
    rec.stop()
    client.join(timeout=5)

    assert time.monotonic() - started < 2
    assert not client.is_alive()
    assert rec.requests[0].status == 0  # never answered
    with pytest.raises(RuntimeError, match="not started"):
        rec.url


def test_url_before_start_and_bad_arguments() -> None:
    with pytest.raises(RuntimeError):
        Receiver().url
    with pytest.raises(ValueError):
        Receiver(path="logs")
    with pytest.raises(TypeError):
        Receiver(script=[503])  # type: ignore[list-item]
