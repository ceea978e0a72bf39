"""Reading a streamed HTTP body (a job log) against an overall deadline.

``GITLAB_TIMEOUT`` is a timeout per socket read: a GitLab, or a proxy in front of it, that sends a byte
every few seconds never trips it, and ``iter_content(256 KiB)`` over urllib3 waits until 256 KiB came
(``_safe_read`` of a chunk, ``read(amt)`` of a Content-Length body). Two things end such a download:

* :class:`BodyCopy` reads with ``read1`` (urllib3 >= 2.1), which returns whatever one socket read gave,
  and checks the deadline after each: a trickle ends at most one GITLAB_TIMEOUT after the deadline;
* :data:`WATCHDOG` shuts the connection's socket down at the deadline, for the reads no check between
  reads can interrupt: http.client's readline of the status line, a header, a chunk-size line or the
  trailers, which a trickle can keep going for ever. The blocked read then returns, and the download
  fails. Connections are armed when they leave the pool inside a :class:`RequestDeadline` and disarmed
  when they go back (:class:`DeadlinePool`).

requests' iter_content turns urllib3's errors into requests' own; BodyCopy does the same, so callers
keep catching ChunkedEncodingError / ConnectionError for a broken stream.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import socket
import threading
import time
from typing import Any, BinaryIO, Protocol, Union

import requests
import urllib3.exceptions

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024  # largest single read; writes are batched up to this size as well


class LogSink(Protocol):
    """What :meth:`GitLabSource.fetch_trace` writes a log to (a binary file will do as well); the spool's
    :class:`~gitlab_log_shipper.document.spool.CappedLog` is one. Defined here, by its user, so that the GitLab
    layer does not import the document layer (``tests/test_layers.py``)."""

    def write(self, data: bytes) -> object: ...

    def flush(self) -> None: ...

    def restart(self) -> None:
        """Throw away what was written: the download starts over from the first byte."""


class DeadlineExceeded(Exception):
    """The overall deadline passed before the body was complete; ``received`` bytes had come."""

    def __init__(self, received: int) -> None:
        super().__init__(f"deadline passed after {received} bytes")
        self.received = received


def restart(out: Union[BinaryIO, LogSink]) -> None:
    """Empty ``out`` for a download that starts over."""
    again = getattr(out, "restart", None)
    if again is not None:
        again()
    else:
        out.seek(0)  # type: ignore[union-attr]
        out.truncate()  # type: ignore[union-attr]


def format_seconds(seconds: float | None) -> str:
    """600 → ``10m``, 90 → ``90s``, 7200 → ``2h``: a duration as it would be written in the .env file."""
    if seconds is None:
        return "none"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


class BodyCopy:
    """Copies a streamed urllib3 response body (``requests.Response.raw``) to ``out``, decoded as requests
    would (gzip/deflate), in writes of up to :data:`READ_SIZE`; ``received`` counts the bytes so far."""

    def __init__(self, raw: Any, deadline: float | None) -> None:
        self.raw = raw
        self.deadline = deadline
        self.received = 0

    def into(self, out: Union[BinaryIO, LogSink]) -> int:
        read = getattr(self.raw, "read1", None) or self.raw.read  # read1: urllib3 >= 2.1
        pending: list[bytes] = []
        pending_size = 0
        while True:
            data = self._read(read)
            if data:
                pending.append(data)
                pending_size += len(data)
                self.received += len(data)
            if pending and (not data or pending_size >= READ_SIZE):
                out.write(pending[0] if len(pending) == 1 else b"".join(pending))
                pending, pending_size = [], 0
            if not data:
                return self.received
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise DeadlineExceeded(self.received)

    def _read(self, read: Any) -> bytes:
        try:
            return read(READ_SIZE, decode_content=True) or b""
        except urllib3.exceptions.ProtocolError as exc:
            raise requests.exceptions.ChunkedEncodingError(exc) from exc
        except urllib3.exceptions.DecodeError as exc:
            raise requests.exceptions.ContentDecodingError(exc) from exc
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise requests.exceptions.ConnectionError(exc) from exc
        except urllib3.exceptions.SSLError as exc:
            raise requests.exceptions.SSLError(exc) from exc


class DeadlinePassed(Exception):
    """A request was about to take a connection after its download's deadline had passed. Not an OSError nor a
    requests error on purpose: python-gitlab would retry those (with its own sleeps), past the deadline."""


_request_deadline = threading.local()  # .at: monotonic deadline of the download this thread is making


class RequestDeadline:
    """``with RequestDeadline(at):`` every connection this thread takes from a :class:`DeadlinePool` meanwhile is
    shut down at ``at``, also before the answer's headers came (a GitLab or proxy that trickles its status line or
    headers a byte at a time is bounded too, not only the body)."""

    def __init__(self, at: float | None) -> None:
        self.at = at

    def __enter__(self) -> "RequestDeadline":
        self._before = getattr(_request_deadline, "at", None)
        _request_deadline.at = self.at
        return self

    def __exit__(self, *exc: object) -> None:
        _request_deadline.at = self._before


class DeadlinePool:
    """Mixed into urllib3's connection pools (see ``source.GitLabSession``): arms :data:`WATCHDOG` on each connection
    taken while a :class:`RequestDeadline` is in force, disarms it when the connection goes back to the pool."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        at = getattr(_request_deadline, "at", None)
        if at is not None and time.monotonic() >= at:
            raise DeadlinePassed()
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        if at is not None:
            conn._gls_watch = WATCHDOG.arm(at, conn)
        return conn

    def _put_conn(self, conn: Any) -> None:
        watch = getattr(conn, "_gls_watch", None)
        if watch is not None:
            conn._gls_watch = None
            watch.cancel()
        super()._put_conn(conn)  # type: ignore[misc]


class Watch:
    """One armed deadline on a connection taken from a pool. It is disarmed (under the watchdog's lock) when the connection goes back to the pool, so it never touches a
    connection another request took since."""

    def __init__(self, deadline: float, connection: Any) -> None:
        self.deadline = deadline
        self.connection = connection
        self.cancelled = False
        self.in_heap = True  # the watchdog's bookkeeping

    def cancel(self) -> None:
        """The connection went back to the pool (or the request is over): the watchdog no longer touches it."""
        WATCHDOG.disarm(self)

    def fire(self) -> None:
        """Called by the watchdog, with its lock held."""
        if self.cancelled or self.connection is None:
            return
        sock = getattr(self.connection, "sock", None)
        if sock is None:
            return  # not connected (yet, or any more): the connect timeout bounds it, DeadlinePool refuses a retry
        try:
            # The plain socket's shutdown, also under TLS: the reading thread's blocked read returns at once.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except (OSError, TypeError):
            pass  # closed meanwhile: nothing left to stop


class Watchdog:
    """A single daemon thread serving every armed deadline (a timer thread per log would cost more
    than the download of a small log)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._stale = 0  # cancelled watches still in the heap

    def arm(self, deadline: float, connection: Any) -> Watch:
        watch = Watch(deadline, connection)
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._order), watch))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="log-download-deadline", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is watch:
                self._cond.notify()
        return watch

    def disarm(self, watch: Watch) -> None:
        with self._cond:
            if watch.cancelled:
                return
            watch.cancelled = True
            watch.connection = None
            if not watch.in_heap:
                return
            self._stale += 1
            # A download is usually over long before its deadline: drop the dead entries now and then
            # rather than let the heap hold every download of the last JOB_LOG_TIMEOUT.
            if self._stale > 64 and 2 * self._stale > len(self._heap):
                for entry in self._heap:
                    entry[2].in_heap = not entry[2].cancelled
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._stale = 0

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)[2].in_heap = False
                    self._stale -= 1
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                _, _, watch = heapq.heappop(self._heap)
                watch.in_heap = False
                # fired under the lock, so a download that just ended (disarm) is never shut down
                try:
                    watch.fire()
                except Exception:  # noqa: BLE001 - the watchdog must outlive any one download
                    log.exception("stopping a log download at its deadline failed")


WATCHDOG = Watchdog()
