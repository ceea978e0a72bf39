"""A scriptable stand-in for the log-analysis API: a loopback HTTP server that records every POST.

The shipper's delivery code is tested against real HTTP, not mocks of ``requests``, because retries,
streaming uploads, gzip, timeouts and dropped connections only behave truthfully on a socket. This
server accepts what the real API would (``POST <path>`` with a JSON body and a bearer token), rejects
what its front proxy would (401 on a bad token, an nginx-style 413 above a size cap) and otherwise
answers from a *script*: a list of :class:`Reply` consumed one per request, or a function deciding per
request. Everything it received is kept as :class:`RecordedRequest` values for assertions.

Bodies are read in bounded chunks (``Content-Length`` or ``Transfer-Encoding: chunked``) and gunzipped
incrementally, so with ``store_bodies=False`` a 500 MB upload costs a few hundred kilobytes: only the
size and the SHA-256 are kept. Standard library only, so it can run anywhere the shipper runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union
from urllib.parse import urlsplit

from ._loopback import DISCONNECTS as _DISCONNECTS
from ._loopback import LoopbackHandler, LoopbackServer, LoopbackService

__all__ = ["Headers", "Receiver", "RecordedRequest", "Reply", "Script"]

logger = logging.getLogger(__name__)

DEFAULT_BODY = '{"success": true, "message": "Logs received"}'
"""What the real API answers to an accepted document (see spec/api-post-design.md)."""

# nginx's stock error page: what a client really gets when the API's front proxy refuses a big body.
_NGINX_413 = (
    "<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
    "<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)

_READ_CHUNK = 64 * 1024
"""Largest single read from the socket; bounds memory whatever the request size."""

_INFLATE_STEP = 1024 * 1024
"""Largest piece of decompressed output produced at once, so a highly compressible body stays flat too."""

_MAX_LINE = 64 * 1024
"""Longest chunk-size or trailer line accepted in a chunked body."""


@dataclass(frozen=True)
class Reply:
    """One scripted answer.

    ``delay`` is added to the receiver's own per-request ``delay`` before answering (to provoke client
    timeouts); ``drop=True`` closes the connection after reading the request without sending anything,
    which a client sees as a connection error.
    """

    status: int = 200
    body: str | bytes = DEFAULT_BODY
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False


class Headers(MutableMapping[str, str]):
    """HTTP headers: case-insensitive lookup, original spelling kept for iteration and display.

    A repeated header is folded into one comma-separated value, as RFC 9110 allows.
    """

    def __init__(self, items: Mapping[str, str] | Sequence[tuple[str, str]] = ()) -> None:
        self._store: dict[str, tuple[str, str]] = {}
        pairs = items.items() if isinstance(items, Mapping) else items
        for name, value in pairs:
            key = name.lower()
            if key in self._store:
                self._store[key] = (self._store[key][0], f"{self._store[key][1]}, {value}")
            else:
                self._store[key] = (name, value)

    def __getitem__(self, name: str) -> str:
        return self._store[name.lower()][1]

    def __setitem__(self, name: str, value: str) -> None:
        self._store[name.lower()] = (name, value)

    def __delitem__(self, name: str) -> None:
        del self._store[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._store.values())

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


@dataclass
class RecordedRequest:
    """One request as the receiver saw it.

    ``body`` is the decoded body (gunzipped when ``Content-Encoding: gzip``); it is ``None`` when the
    receiver runs with ``store_bodies=False`` and when the body was refused for its size (413), since
    such a body is discarded unread. ``wire_size`` counts the body bytes as sent (compressed, without
    chunked framing); ``body_size`` and ``sha256`` describe the decoded body (0 and ``""`` for a 413).
    ``status`` is what the receiver answered: 0 while a reply is still pending and for a dropped
    connection. ``received_at`` is ``time.time()`` once the body was read.
    """

    method: str
    path: str
    headers: Headers
    body: bytes | None
    body_size: int
    wire_size: int
    sha256: str
    status: int
    received_at: float

    def header(self, name: str, default: str | None = None) -> str | None:
        """The value of header ``name`` (case-insensitive), or ``default``."""
        return self.headers.get(name, default)

    @property
    def idempotency_key(self) -> str | None:
        """The ``Idempotency-Key`` header, which lets the API de-duplicate a retried delivery."""
        return self.header("Idempotency-Key")

    def json(self) -> Any:
        """The body parsed as JSON; raises ``ValueError`` if it was not stored or is not JSON."""
        if self.body is None:
            raise ValueError(
                f"body of {self.method} {self.path} was not stored "
                f"(store_bodies=False or refused with {self.status}); only size and sha256 are known"
            )
        return json.loads(self.body)


Script = Union[Sequence[Reply], Callable[[RecordedRequest], Reply]]
"""A list of replies consumed in order (then the default 200), or a function choosing each reply."""


class _ClientGone(Exception):
    """The client closed the connection or sent a malformed body; nothing can be answered."""


class _BodyReader:
    """Consumes one request body piece by piece: counts, gunzips, hashes and (optionally) keeps it.

    Past ``limit`` wire bytes it stops decoding and keeping and only counts, so an oversized body is
    drained (letting the client read our 413 instead of a reset) without being held in memory.
    """

    def __init__(self, content_encoding: str, *, store: bool, limit: int | None) -> None:
        encoding = content_encoding.strip().lower()
        self.unsupported_encoding = encoding not in ("", "identity", "gzip", "x-gzip")
        self._gzip = encoding in ("gzip", "x-gzip")
        # 16 + MAX_WBITS: expect the gzip wrapper (header and CRC), not a raw zlib stream.
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if self._gzip else None
        self._store = store
        self._limit = limit
        self._parts: list[bytes] = []
        self._hash = hashlib.sha256()
        self.wire_size = 0
        self.body_size = 0
        self.too_large = False
        self.decode_error: str | None = None

    def feed(self, data: bytes) -> None:
        """Account for the next piece of the body as it came off the wire."""
        self.wire_size += len(data)
        if self._limit is not None and self.wire_size > self._limit:
            if not self.too_large:
                self.too_large = True
                self._parts.clear()
            return
        if self.too_large or self.decode_error or self.unsupported_encoding:
            return
        if self._inflater is None:
            self._consume(data)
            return
        try:
            self._inflate(data)
        except zlib.error as exc:
            self.decode_error = f"invalid gzip body: {exc}"
            self._parts.clear()

    def _inflate(self, data: bytes) -> None:
        assert self._inflater is not None
        while data:
            out = self._inflater.decompress(data, _INFLATE_STEP)
            self._consume(out)
            data = self._inflater.unconsumed_tail
            if self._inflater.eof and self._inflater.unused_data:
                # Concatenated gzip members are one valid gzip stream (RFC 1952 §2.2).
                data = self._inflater.unused_data + data
                self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def _consume(self, decoded: bytes) -> None:
        if not decoded:
            return
        self.body_size += len(decoded)
        self._hash.update(decoded)
        if self._store:
            self._parts.append(decoded)

    def finish(self) -> None:
        """Note a truncated gzip stream once the whole body has arrived."""
        if self._inflater is not None and not (self.too_large or self.decode_error):
            if self.wire_size and not self._inflater.eof:
                self.decode_error = "invalid gzip body: stream ends before the gzip trailer"
                self._parts.clear()

    @property
    def body(self) -> bytes | None:
        if not self._store or self.too_large:
            return None
        return b"".join(self._parts)

    @property
    def sha256(self) -> str:
        return "" if self.too_large else self._hash.hexdigest()


class _Handler(LoopbackHandler):
    """Turns one HTTP request into a RecordedRequest and an answer; all policy lives in Receiver."""

    # HTTP/1.1 keep-alive (a retrying client reuses its connection, as in production), Nagle off.
    server_version = "gitlab-log-shipper-receiver"
    server: LoopbackServer[Receiver]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        logger.debug("receiver: " + format, *args)

    def do_GET(self) -> None:
        route = urlsplit(self.path).path
        if route == "/health":
            self._send(Reply(200, '{"status": "ok"}'))
        elif route == self.server.owner.path:
            self._send(Reply(405, '{"error": "method not allowed"}', {"Allow": "POST"}))
        else:
            self._send(Reply(404, '{"error": "not found"}'))

    def do_POST(self) -> None:
        try:
            self._serve_post()
        except (_ClientGone, *_DISCONNECTS) as exc:
            logger.debug("receiver: connection from %s ended early: %r", self.client_address, exc)
            self.close_connection = True

    def _refuse_other_methods(self) -> None:
        if urlsplit(self.path).path == self.server.owner.path:
            reply = Reply(405, '{"error": "method not allowed"}', {"Allow": "POST"})
        else:
            reply = Reply(404, '{"error": "not found"}')
        try:
            self._drain_quietly()
        except (_ClientGone, *_DISCONNECTS):
            self.close_connection = True
            return
        self._send(reply)

    do_PUT = do_PATCH = do_DELETE = _refuse_other_methods

    def _drain_quietly(self) -> None:
        reader = _BodyReader("", store=False, limit=0)
        for piece in self._body_pieces():
            reader.feed(piece)

    def _serve_post(self) -> None:
        receiver = self.server.owner
        reader = _BodyReader(
            self.headers.get("Content-Encoding", ""),
            store=receiver.store_bodies,
            limit=receiver.max_bytes,
        )
        declared = self.headers.get("Content-Length")
        if declared is not None and receiver.max_bytes is not None:
            if declared.strip().isdigit() and int(declared) > receiver.max_bytes:
                reader.too_large = True  # known from the headers; the body is still drained, unread
        for piece in self._body_pieces():
            reader.feed(piece)
        reader.finish()
        recorded = RecordedRequest(
            method=self.command,
            path=self.path,
            headers=Headers(list(self.headers.items())),
            body=reader.body,
            body_size=reader.body_size if not reader.too_large else 0,
            wire_size=reader.wire_size,
            sha256=reader.sha256,
            status=0,
            received_at=time.time(),
        )
        reply = receiver._decide(recorded, self._rejection(recorded, reader))
        if not receiver._pause(receiver.delay + reply.delay):
            self.close_connection = True  # the receiver is stopping: hang up like a dying server
            receiver._settle(recorded, 0)
            return
        if reply.drop:
            receiver._settle(recorded, 0)
            self._drop()
            return
        if 200 <= reply.status < 300:
            receiver._dump(recorded)
        receiver._settle(recorded, reply.status)
        self._send(reply, close=reader.too_large or reply.status == 413)

    def _rejection(self, recorded: RecordedRequest, reader: _BodyReader) -> Reply | None:
        """What the API's front end answers before any script is consulted, or None to let it decide."""
        receiver = self.server.owner
        if urlsplit(self.path).path != receiver.path:
            return Reply(404, '{"error": "not found"}')
        if receiver.token is not None and recorded.header("Authorization") != f"Bearer {receiver.token}":
            return Reply(401, '{"error": "invalid token"}')
        if reader.too_large:
            return Reply(413, _NGINX_413, {"Content-Type": "text/html"})
        if reader.unsupported_encoding:
            encoding = recorded.header("Content-Encoding")
            return Reply(415, json.dumps({"error": f"unsupported Content-Encoding: {encoding}"}))
        if reader.decode_error:
            return Reply(400, json.dumps({"error": reader.decode_error}))
        return None

    def _body_pieces(self) -> Iterator[bytes]:
        """Yield the request body in bounded pieces, de-chunked; raise _ClientGone if it is cut short."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            yield from self._chunked_pieces()
            return
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return  # HTTP/1.1: no length and not chunked means no body
        try:
            remaining = int(length_header)
        except ValueError:
            raise _ClientGone(f"bad Content-Length {length_header!r}") from None
        while remaining > 0:
            piece = self.rfile.read(min(remaining, _READ_CHUNK))
            if not piece:
                raise _ClientGone(f"body ended {remaining} bytes early")
            remaining -= len(piece)
            yield piece

    def _chunked_pieces(self) -> Iterator[bytes]:
        while True:
            line = self.rfile.readline(_MAX_LINE)
            if not line:
                raise _ClientGone("chunked body ended without the last chunk")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _ClientGone(f"bad chunk size line {line[:40]!r}") from None
            if size == 0:
                while True:  # optional trailer fields, then the empty line
                    trailer = self.rfile.readline(_MAX_LINE)
                    if not trailer:
                        raise _ClientGone("chunked body ended inside the trailer")
                    if trailer in (b"\r\n", b"\n"):
                        return
            remaining = size
            while remaining > 0:
                piece = self.rfile.read(min(remaining, _READ_CHUNK))
                if not piece:
                    raise _ClientGone("chunked body ended inside a chunk")
                remaining -= len(piece)
                yield piece
            if self.rfile.readline(_MAX_LINE) not in (b"\r\n", b"\n"):
                raise _ClientGone("chunk not followed by CRLF")

    def _send(self, reply: Reply, *, close: bool = False) -> None:
        body = reply.body.encode("utf-8") if isinstance(reply.body, str) else reply.body
        headers = Headers(reply.headers)
        if "Content-Type" not in headers:
            headers["Content-Type"] = _guess_content_type(body)
        headers.setdefault("Content-Length", str(len(body)))
        if close:
            headers["Connection"] = "close"
            self.close_connection = True
        try:
            self.send_response(reply.status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except _DISCONNECTS as exc:
            logger.debug("receiver: client %s left before the answer: %r", self.client_address, exc)
            self.close_connection = True

    def _drop(self) -> None:
        """Close the connection with no answer at all: the client sees 'connection closed/reset'."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _guess_content_type(body: bytes) -> str:
    head = body.lstrip()[:1]
    if head in (b"{", b"["):
        return "application/json"
    if head == b"<":
        return "text/html"
    return "text/plain; charset=utf-8"


class Receiver(LoopbackService):
    """A recording, scriptable log-analysis API on loopback; use as a context manager.

    Before the script is consulted, a wrong or missing bearer token (when ``token`` is set) gets
    401 and a body above ``max_bytes`` wire bytes gets nginx's 413 page; neither consumes a scripted
    reply. ``delay`` is latency added to every answer. With ``dump_dir`` set, each accepted JSON body is
    also written to ``dump_dir/<n>-pipeline-<pipeline_id>.json`` (n counts dumps from 1).
    """

    _handler = _Handler
    _label = "receiver"
    _thread_name = "receiver"
    _logger = logger

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        script: Script | None = None,
        max_bytes: int | None = None,
        delay: float = 0.0,
        store_bodies: bool = True,
        path: str = "/logs",
        dump_dir: str | Path | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay}")
        if dump_dir is not None and not store_bodies:
            raise ValueError("dump_dir needs the bodies: it cannot be combined with store_bodies=False")
        super().__init__(host, port, tls)
        self.token = token
        self.max_bytes = max_bytes
        self.delay = delay
        self.store_bodies = store_bodies
        self.path = path
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self._lock = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._queue: deque[Reply] = deque()
        self._decider: Callable[[RecordedRequest], Reply] | None = None
        self._dumps = 0
        self._stopping = threading.Event()
        self.set_script(script)

    # -- lifecycle ---------------------------------------------------------------------------------
    # start(), stop(), the context manager: LoopbackService. stop() also wakes delayed answers.

    def _on_start(self) -> None:
        self._stopping.clear()

    def _on_stop(self) -> None:
        self._stopping.set()  # delayed answers wake up and hang up instead of answering

    @property
    def url(self) -> str:
        """The full POST URL, e.g. ``http://127.0.0.1:41234/logs`` (known once started)."""
        if self._server is None:
            raise RuntimeError("receiver not started: its port is not known yet")
        return f"{super().url}{self.path}"

    # -- what the tests read -----------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every POST in arrival order, rejected ones included (a snapshot copy)."""
        with self._lock:
            return list(self._requests)

    def accepted(self) -> list[RecordedRequest]:
        """The recorded POSTs that were answered 2xx."""
        with self._lock:
            return [r for r in self._requests if 200 <= r.status < 300]

    def wait_for(self, n: int, timeout: float = 10.0) -> list[RecordedRequest]:
        """Block until at least ``n`` POSTs were accepted; return all accepted so far.

        Raises TimeoutError naming what did arrive, which is usually the clue to a failing test.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                accepted = [r for r in self._requests if 200 <= r.status < 300]
                if len(accepted) >= n:
                    return accepted
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [r.status for r in self._requests]
                    raise TimeoutError(
                        f"waited {timeout}s for {n} accepted POSTs; got {len(accepted)} "
                        f"(statuses of all {len(seen)} POSTs: {seen})"
                    )
                self._lock.wait(remaining)

    def clear(self) -> None:
        """Forget recorded requests (the script and the dump counter are kept)."""
        with self._lock:
            self._requests.clear()

    def set_script(self, script: Script | None) -> None:
        """Replace the script; a list starts from its first reply again."""
        with self._lock:
            if script is None:
                self._queue, self._decider = deque(), None
            elif callable(script):
                self._queue, self._decider = deque(), script
            else:
                replies = list(script)
                for reply in replies:
                    if not isinstance(reply, Reply):
                        raise TypeError(f"script items must be Reply, got {type(reply).__name__}")
                self._queue, self._decider = deque(replies), None

    # -- called by the handler threads -------------------------------------------------------------

    def _decide(self, recorded: RecordedRequest, rejection: Reply | None) -> Reply:
        """Record the request and pick its reply; list replies are taken in arrival order."""
        with self._lock:
            self._requests.append(recorded)
            if rejection is not None:
                return rejection
            if self._queue:
                return self._queue.popleft()
            decider = self._decider
        if decider is None:
            return Reply()
        # Called outside the lock: a script may block or inspect the receiver.
        try:
            reply = decider(recorded)
            if not isinstance(reply, Reply):
                raise TypeError(f"script function must return a Reply, got {type(reply).__name__}")
        except Exception as exc:
            # A broken script is a bug in the test: answer 500 loudly rather than hang up mysteriously.
            logger.exception("receiver: script function failed")
            return Reply(500, json.dumps({"error": f"receiver script failed: {exc!r}"}))
        return reply

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``; False if the receiver is stopping meanwhile."""
        if seconds > 0:
            return not self._stopping.wait(seconds)
        return not self._stopping.is_set()

    def _settle(self, recorded: RecordedRequest, status: int) -> None:
        with self._lock:
            recorded.status = status
            self._lock.notify_all()

    def _dump(self, recorded: RecordedRequest) -> None:
        """Write an accepted JSON body to dump_dir, atomically, before the client hears 2xx."""
        if self.dump_dir is None or recorded.body is None:
            return
        try:
            document = json.loads(recorded.body)
        except ValueError:
            logger.warning("receiver: accepted body is not JSON; not dumped (%d bytes)", recorded.body_size)
            return
        pipeline_id = document.get("pipeline_id", "unknown") if isinstance(document, dict) else "unknown"
        with self._lock:
            self._dumps += 1
            number = self._dumps
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        target = self.dump_dir / f"{number}-pipeline-{pipeline_id}.json"
        fd, tmp = tempfile.mkstemp(dir=self.dump_dir, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(recorded.body)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
