"""Reading a streamed HTTP body (a job log) against an overall deadline.

``GITLAB_TIMEOUT`` is a timeout per socket read: a GitLab, or a proxy in front of it, that sends a byte
every few seconds never trips it, and ``iter_content(256 KiB)`` over urllib3 waits until 256 KiB came
(``_safe_read`` of a chunk, ``read(amt)`` of a Content-Length body). Two things end such a download:

* :class:`BodyCopy` reads with ``read1`` (urllib3 >= 2.1), which returns whatever one socket read gave,
  and checks the deadline after each: a trickle ends at most one GITLAB_TIMEOUT after the deadline;
* :data:`WATCHDOG` shuts the socket's read side down at the deadline, for the reads no check between
  reads can interrupt: http.client's readline of a chunk-size line or of the trailers, which a
  trickle can keep going for ever. The blocked read then returns, and the download fails.

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
from typing import Any, BinaryIO, Union

import requests
import urllib3.exceptions

from .spool import LogSink

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024  # largest single read; writes are batched up to this size as well


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
            conn._gls_watch = WATCHDOG.arm(at, None, connection=conn)
        return conn

    def _put_conn(self, conn: Any) -> None:
        watch = getattr(conn, "_gls_watch", None)
        if watch is not None:
            conn._gls_watch = None
            watch.cancel()
        super()._put_conn(conn)  # type: ignore[misc]


class Watch:
    """One armed deadline; ``fired`` tells the download that its socket was shut down on purpose. It watches a
    response (``raw``, while the response holds its connection) or a connection taken from a pool (until it goes
    back there)."""

    def __init__(self, deadline: float, raw: Any, connection: Any = None) -> None:
        self.deadline = deadline
        self.raw = raw
        self.fired = False
        self.cancelled = False
        self.in_heap = True  # the watchdog's bookkeeping
        self._connection = getattr(raw, "_connection", None)
        self._pooled = connection

    def cancel(self) -> None:
        """The download ended (either way): the watchdog no longer touches its response."""
        WATCHDOG.disarm(self)

    def fire(self) -> None:
        """Called by the watchdog, with its lock held."""
        raw = self.raw
        if self.cancelled:
            return
        if self._pooled is not None:  # disarmed (under this lock) when it goes back to the pool
            sock = getattr(self._pooled, "sock", None)
            self.fired = True
            if sock is not None:
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, also under TLS
                except (OSError, TypeError):
                    pass
            return
        if raw is None:
            return
        # Only while the response still holds its connection: once the body is complete urllib3 returns
        # the connection to the pool, and another request may be using it.
        if self._connection is None or getattr(raw, "_connection", None) is not self._connection:
            return
        self.fired = True
        try:
            if hasattr(raw, "shutdown"):  # urllib3 >= 2.3: made for this (another thread stops a read)
                raw.shutdown()
            else:
                self._connection.sock.shutdown(socket.SHUT_RD)
        except (OSError, ValueError, RuntimeError, AttributeError):
            pass  # the connection closed meanwhile: nothing left to stop


class Watchdog:
    """A single daemon thread serving every armed deadline (a timer thread per log would cost more
    than the download of a small log)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._stale = 0  # cancelled watches still in the heap

    def arm(self, deadline: float, raw: Any, *, connection: Any = None) -> Watch:
        watch = Watch(deadline, raw, connection)
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
            watch.raw = None
            watch._pooled = None
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
