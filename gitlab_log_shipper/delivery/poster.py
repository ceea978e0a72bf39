"""HTTP delivery to the receiving API: one POST per document, retries by a urllib3 ``Retry`` policy.

This module knows HTTP and nothing of GitLab. "What happens on a 429 from the receiver" is answered
here, in :func:`build_retry`. Every POST (after its retries) is written as one line to
``api-requests.log`` in the design's format; tokens never appear there (they live only in headers).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import InsecureRequestWarning
from urllib3.util.retry import Retry

from .. import __version__
from ..config.settings import Config
from ..counters import COUNTERS, NO_ANSWER, RECEIVER, SHIPPED_BYTES, count_request
from ..security import escape_for_log, mask_secrets, open_private, private_mkdir

log = logging.getLogger(__name__)

USER_AGENT = f"gitlab-log-shipper/{__version__}"
RESPONSE_LOG_LIMIT = 1000
# While api-requests.log cannot be written, the same problem is reported again at most this often (seconds).
REQUEST_LOG_REPORT_EVERY = 300.0
# The longest we let one Retry-After hold the daemon inside a single POST; beyond that the document is
# left for a later cycle instead (a receiver asking for an hour must not freeze every other project).
MAX_RETRY_AFTER = 120.0

# Statuses worth another try, and why:
#   408 Request Timeout      - the server gave up waiting for us; transient by definition.
#   429 Too Many Requests    - the receiver is throttling; wait (Retry-After) and try again.
#   500-599                  - the receiver or a proxy in front of it failed; the document was not stored.
# Not retried: every other 4xx (400 bad document, 401/403 auth, 404 wrong URL, 413 too large, 422 ...):
# sending the same bytes again gives the same answer, and retrying only hides the cause.
RETRY_STATUSES = frozenset({408, 429, *range(500, 600)})


class _CappedRetry(Retry):
    """urllib3 Retry whose Retry-After sleep is capped at :data:`MAX_RETRY_AFTER`."""

    def get_retry_after(self, response):  # type: ignore[no-untyped-def]
        value = super().get_retry_after(response)
        return None if value is None else min(value, MAX_RETRY_AFTER)


# -- the overall deadline of a POST attempt -----------------------------------------------------------
#
# ``API_POST_TIMEOUT`` as a socket timeout bounds each read and each send only: a receiver (or a proxy in
# front of it) that sends its answer one byte every few seconds would hold a POST, and with it a worker
# or the whole outbox drain, for as long as it likes. So every attempt (the first and each retry) also
# has two deadlines, enforced by a watchdog thread that shuts the attempt's socket down when one passes:
#
# * connecting and sending the document: API_POST_TIMEOUT plus one second per MIN_UPLOAD_RATE bytes of it;
# * the answer, from the moment the document was sent: API_POST_TIMEOUT for the status line, the headers
#   and the part of the body that is read (the first few KB).
#
# An attempt cut before its status line is a failure with no answer (retried like a timeout); one cut while
# its body trickles keeps its status (a 2xx means the receiver has the document).

MIN_UPLOAD_RATE = 256 * 1024  # bytes/s: the slowest upload accepted, 2 Mbit/s (a 50 MB document: 200 s)
_WATCH_RETRY = 0.1  # seconds between tries to cut an attempt whose socket is not connected yet


class _Post:
    """One ``post_file`` call: its deadlines, and whether the watchdog had to cut one of its attempts."""

    def __init__(self, watchdog: "_Watchdog", send_seconds: float, answer_seconds: float) -> None:
        self.watchdog = watchdog
        self.send_seconds = send_seconds
        self.answer_seconds = answer_seconds
        self.cut = 0


_current = threading.local()  # .post: the _Post the calling thread is in (urllib3 runs in the caller's thread)


class _Watchdog:
    """Shuts down the socket of every attempt whose deadline passed. One thread per poster, started on the
    first POST; connections are armed while an attempt owns them and disarmed when they go back to the
    pool, so a connection reused by another thread's POST is never cut for this one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[HTTPConnection, float, _Post]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, conn: HTTPConnection, post: _Post, seconds: float) -> None:
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="post-deadline", daemon=True)
                self._thread.start()
            self._armed[id(conn)] = (conn, time.monotonic() + seconds, post)
            conn._gls_watchdog = self  # type: ignore[attr-defined]
            self._cond.notify()

    def answer_phase(self, conn: HTTPConnection) -> None:
        """The document is sent: from now on the answer has API_POST_TIMEOUT in all."""
        with self._cond:
            entry = self._armed.get(id(conn))
            if entry is not None and entry[0] is conn:
                post = entry[2]
                self._armed[id(conn)] = (conn, time.monotonic() + post.answer_seconds, post)
                self._cond.notify()

    def disarm(self, conn: HTTPConnection) -> None:
        with self._cond:
            entry = self._armed.get(id(conn))
            if entry is not None and entry[0] is conn:
                del self._armed[id(conn)]

    def disarm_post(self, post: _Post) -> None:
        with self._cond:
            for key in [key for key, entry in self._armed.items() if entry[2] is post]:
                del self._armed[key]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._armed.clear()
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                wake: float | None = None
                for key, (conn, deadline, post) in list(self._armed.items()):
                    if deadline > now:
                        wake = deadline if wake is None else min(wake, deadline)
                        continue
                    sock = getattr(conn, "sock", None)
                    if sock is None:  # still connecting (bounded by the connect timeout): try again shortly
                        wake = now + _WATCH_RETRY if wake is None else min(wake, now + _WATCH_RETRY)
                        continue
                    # Under the lock, so the connection cannot go back to the pool (and to another POST)
                    # meanwhile. The plain socket's shutdown, also for TLS: the SSL object stays with the
                    # reading thread, whose read returns at once.
                    try:
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    except (OSError, TypeError):
                        pass
                    post.cut += 1
                    del self._armed[key]
                self._cond.wait(None if wake is None else max(0.0, wake - now))


class _AnswerDeadline:
    def getresponse(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        watchdog = getattr(self, "_gls_watchdog", None)
        if watchdog is not None:
            watchdog.answer_phase(self)  # type: ignore[arg-type]
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class _DeadlineHTTPConnection(_AnswerDeadline, HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_AnswerDeadline, HTTPSConnection):
    pass


# urllib3 names the connection's class in its errors ("HTTPConnection(host=…, port=…): Failed to establish …"),
# which operators read in the log and in api-requests.log: keep urllib3's own names there.
_DeadlineHTTPConnection.__name__ = _DeadlineHTTPConnection.__qualname__ = "HTTPConnection"
_DeadlineHTTPSConnection.__name__ = _DeadlineHTTPSConnection.__qualname__ = "HTTPSConnection"


class _Armed:
    """A connection handed to an attempt of the current thread's POST is armed with its send deadline."""

    def _get_conn(self, timeout: float | None = None):  # type: ignore[no-untyped-def]
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        post: _Post | None = getattr(_current, "post", None)
        if post is not None:
            post.watchdog.arm(conn, post, post.send_seconds)
        return conn

    def _put_conn(self, conn) -> None:  # type: ignore[no-untyped-def]
        watchdog = getattr(conn, "_gls_watchdog", None)
        if watchdog is not None:
            watchdog.disarm(conn)
        super()._put_conn(conn)  # type: ignore[misc]


class _DeadlineHTTPPool(_Armed, HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _DeadlineHTTPSPool(_Armed, HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter, with connection pools whose attempts have the deadlines above."""

    def init_poolmanager(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _DeadlineHTTPPool, "https": _DeadlineHTTPSPool}


def build_retry(config: Config) -> Retry:
    """The one retry policy for POSTs: ``RETRY_ATTEMPTS`` retries after the first try (none when
    ``API_POST_RETRY_ENABLED=false``), delays ``RETRY_DELAY * 2**n`` (2, 4, 8 s with the defaults, as the
    predecessor), connection errors and :data:`RETRY_STATUSES` retried, ``Retry-After`` honoured.

    ``raise_on_status=False``: when retries run out the last response is handed back, so its status and
    body are logged instead of an opaque MaxRetryError.
    """
    attempts = config.retry_attempts if config.api_post_retry_enabled else 0
    return _CappedRetry(
        total=attempts,
        connect=attempts,
        read=attempts,
        status=attempts,
        other=0,
        redirect=0,
        allowed_methods=frozenset({"POST"}),  # POST is not idempotent for urllib3; the Idempotency-Key makes it so
        status_forcelist=RETRY_STATUSES,
        backoff_factor=config.retry_delay,  # urllib3: factor * 2**(n-1) -> RETRY_DELAY, 2x, 4x ...
        backoff_max=max(120.0, config.retry_delay),
        respect_retry_after_header=True,
        raise_on_status=False,
        raise_on_redirect=False,
    )


# What a final answer (after the adapter's retries) means for the document:
DELIVERED = "delivered"  # any 2xx: the receiver stored it
RETRY_LATER = "retry_later"  # keep it in the outbox and try again on a later cycle
REJECTED = "rejected"  # the receiver will never take these bytes: dead-letter them
# Kept for later cycles: no answer, 408/429/5xx (transient by nature) and 401/403 (an operator can fix the
# token without the document changing). Every other status (400, 404, 413, 422, 3xx ...) is final.
RETRY_LATER_STATUSES = frozenset({401, 403, 408, 429, *range(500, 600)})


@dataclass(frozen=True)
class PostResult:
    """What became of one POST after its retries."""

    status: int | None  # None: no HTTP answer at all (connection refused, timeout, ...)
    duration_ms: int
    response_text: str
    error: str | None
    retry_after: float | None = None  # seconds the receiver asked us to wait (Retry-After), if any

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def verdict(self) -> str:
        if self.ok:
            return DELIVERED
        if self.status is None or self.status in RETRY_LATER_STATUSES:
            return RETRY_LATER
        return REJECTED


def format_request_line(
    when: datetime, pipeline_id: int, project_id: int, url: str, result: PostResult
) -> str:
    """The design's line: ``[ts] PIPELINE_ID= PROJECT_ID= URL= STATUS= DURATION=ms [ERROR=] RESPONSE=``."""
    parts = [
        f"[{when.astimezone(timezone.utc).strftime('%Y-%m-%d %H:%M:%S')}]",
        f"PIPELINE_ID={pipeline_id}",
        f"PROJECT_ID={project_id}",
        f"URL={escape_for_log(url)}",
        f"STATUS={result.status if result.status is not None else 0}",
        f"DURATION={result.duration_ms}ms",
    ]
    if result.error:
        parts.append(f"ERROR={escape_for_log(result.error)}")
    parts.append(f"RESPONSE={escape_for_log(result.response_text[:RESPONSE_LOG_LIMIT])}")
    return " ".join(parts)


class RequestLog:
    """Appends lines to ``api-requests.log`` (created 0600); one write per line so lines never interleave.

    A side channel: :meth:`write` never raises for the file system. A line that cannot be written (a full
    disk, a file owned by another user or replaced by a folder, a backup that cannot be rotated) is
    counted in :attr:`write_failures` and reported at ERROR once per distinct problem, repeated at most
    every :data:`REQUEST_LOG_REPORT_EVERY` seconds while it lasts; the end of the problem is reported too.
    A POST the receiver accepted stays delivered whatever became of its line here.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        private_mkdir(path.parent)
        self.write_failures = 0  # lines not written (or rotations that failed) since the start; for stats
        self._report_lock = threading.Lock()
        self._problem: tuple[str, int | None, str | None] | None = None
        self._problem_failures = 0  # failures since the current problem began
        self._reported_at = 0.0
        self._unreported = 0  # failures since the last ERROR line

    def write(self, line: str) -> None:
        try:
            self._append(line)
        except OSError as exc:
            self._failed(exc)
            return
        if self._problem is not None:
            self._repaired()

    def _append(self, line: str) -> None:
        with open_private(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def _failed(self, exc: OSError) -> None:
        with self._report_lock:
            self.write_failures += 1
            self._problem_failures += 1
            self._unreported += 1
            problem = (type(exc).__name__, exc.errno, exc.filename)
            now = time.monotonic()
            if problem == self._problem and now - self._reported_at < REQUEST_LOG_REPORT_EVERY:
                return
            self._problem, self._reported_at = problem, now
            unreported, self._unreported = self._unreported, 0
        where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "") if exc.filename else str(self.path)
        log.error("%s: cannot write %s (%s): POST outcomes are not logged there until this is fixed; deliveries "
                  "are not affected (%d failed write(s) since the last report, %d in all)", self.path.name, where,
                  exc.strerror or exc, unreported, self.write_failures)

    def _repaired(self) -> None:
        with self._report_lock:
            if self._problem is None:
                return
            lost, self._problem, self._problem_failures, self._unreported = self._problem_failures, None, 0, 0
        log.warning("%s is written again (%d write(s) had failed)", self.path, lost)


class ApiPoster:
    """POSTs documents to ``API_POST_URL`` through one Session mounted with the retry adapter."""

    def __init__(self, config: Config, request_log: RequestLog, *, clock: Callable[[], datetime] | None = None) -> None:
        if not config.api_post_url:
            raise ValueError("ApiPoster needs API_POST_URL")
        self.url = config.api_post_url
        self.timeout = config.api_post_timeout
        self.request_log = request_log
        self._secrets = config.secrets()
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self.session = requests.Session()
        self._watchdog = _Watchdog()
        # As many pooled connections as POSTs can run at once (CONCURRENCY workers, the outbox drain too).
        adapter = _DeadlineAdapter(max_retries=build_retry(config), pool_maxsize=max(10, config.concurrency))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # Only our headers: no proxy credentials or .netrc passwords picked up from the environment.
        self.session.trust_env = False
        # TLS: verified against certifi's bundle by default, API_POST_CA_BUNDLE for a private CA; switching
        # it off (API_POST_TLS_VERIFY=false) is warned about at every start, not on every request.
        self.session.verify = config.api_post_verify
        if config.api_post_verify is False:
            warnings.filterwarnings("ignore", category=InsecureRequestWarning)
        self.session.headers.update({"User-Agent": USER_AGENT, "Content-Type": "application/json"})
        if config.api_post_auth_token:
            self.session.headers["Authorization"] = f"Bearer {config.api_post_auth_token}"
        # API_POST_HEADERS (validated in config/headers.py; their values are secrets, redacted from every log).
        self.session.headers.update(dict(config.api_post_headers))

    def __repr__(self) -> str:
        return f"ApiPoster(url={self.url!r})"

    def post_file(
        self,
        document: Path,
        *,
        pipeline_id: int,
        project_id: int,
        idempotency_key: str,
        extra_headers: Mapping[str, str] | None = None,
    ) -> PostResult:
        """POST the JSON document stored at ``document`` (streamed from disk, rewound by urllib3 on a retry)
        and log the outcome. Never raises for HTTP or network failures: they come back in the result.

        Redirects are never followed (``allow_redirects=False``, and ``redirect=0`` in the Retry policy): a
        3xx is a failure, so the bearer token cannot be carried to another URL, let alone another host."""
        headers = {"Idempotency-Key": idempotency_key, **(extra_headers or {})}
        if document.suffix == ".gz":  # API_POST_COMPRESSION=gzip wrote it compressed
            headers["Content-Encoding"] = "gzip"
        started = time.monotonic()
        status: int | None = None
        text = ""
        error: str | None = None
        retry_after: float | None = None
        post: _Post | None = None
        try:
            with open(document, "rb") as body:
                size = os.fstat(body.fileno()).st_size
                post = _Post(self._watchdog, self.timeout + size / MIN_UPLOAD_RATE, self.timeout)
                _current.post = post
                try:
                    response = self.session.post(
                        self.url, data=body, headers=headers, timeout=self.timeout, allow_redirects=False, stream=True
                    )
                    status = response.status_code
                    _count_answers(response, size)
                    retry_after = _retry_after(response)
                    text = _response_text(response)  # still under the answer's deadline
                finally:
                    _current.post = None
                    self._watchdog.disarm_post(post)
            if not 200 <= status < 300:
                error = response.reason or f"HTTP {status}"
        except requests.RequestException as exc:
            if status is None:  # no answer in the end (urllib3 keeps no history in its MaxRetryError): one 0
                count_request(RECEIVER, NO_ANSWER)
            error = _describe(exc)
            if post is not None and post.cut:
                error = (f"no complete answer within {self.timeout:g} s (API_POST_TIMEOUT) of sending the document, "
                         f"or the upload slower than {MIN_UPLOAD_RATE // 1024} KiB/s; the connection was closed ({error})")
        # What the receiver said is kept for the log and the reason, with our own tokens masked: a receiver
        # echoing the token back (in its body or reason phrase) must not get it written to disk.
        text = mask_secrets(text, self._secrets)
        error = mask_secrets(error, self._secrets) if error else error
        result = PostResult(status, int((time.monotonic() - started) * 1000), text, error, retry_after)
        line = format_request_line(self._clock(), pipeline_id, project_id, self.url, result)
        self.request_log.write(mask_secrets(line, self._secrets))
        return result

    def close(self) -> None:
        self._watchdog.close()
        self.session.close()


def _retry_after(response: requests.Response) -> float | None:
    """Retry-After in seconds (delta or HTTP date), None when absent or unparseable."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, Retry(0).parse_retry_after(value))
    except Exception:  # urllib3 raises InvalidHeader; a garbled header is no reason to fail
        return None


def _response_text(response: requests.Response) -> str:
    """The first bytes of the body as text, without reading a huge error page whole. Read piece by piece
    (``read1``), so that what arrived before the body broke off (or the POST's deadline cut it) is kept."""
    limit = RESPONSE_LOG_LIMIT * 4
    raw = b""
    try:
        while response.raw is not None and len(raw) < limit:
            piece = response.raw.read1(limit - len(raw), decode_content=True)
            if not piece:
                break
            raw += piece
    except Exception:  # a body that breaks while being read is still a response with a status
        pass
    finally:
        response.close()
    return raw.decode(response.encoding or "utf-8", errors="replace")[:RESPONSE_LOG_LIMIT]


def _count_answers(response: requests.Response, size: int) -> None:
    """Count every answer of this POST for the metrics: the ones urllib3's Retry retried (its history) and the
    last; the document's bytes when the receiver accepted it."""
    retries = getattr(response.raw, "retries", None)
    for attempt in getattr(retries, "history", ()) or ():
        count_request(RECEIVER, attempt.status)  # None (no answer, e.g. a reset) counts as 0
    count_request(RECEIVER, response.status_code)
    if 200 <= response.status_code < 300:
        COUNTERS.add(SHIPPED_BYTES, size)


def _describe(exc: requests.RequestException) -> str:
    """A short, token-free reason for a transport failure (URLs carry no secrets: tokens live in headers)."""
    reason = exc.__class__.__name__
    inner = exc.args[0] if exc.args else None
    detail = getattr(inner, "reason", None) or inner
    text = str(detail) if detail is not None else ""
    # urllib3 wraps the real cause: "Max retries exceeded ... (Caused by NewConnectionError(...))"
    match = re.search(r"Caused by (\w+)\((.*)\)\)?$", text)
    if match:
        text = f"{match.group(1)}: {match.group(2)}"
    return f"{reason}: {text}"[:300] if text else reason
