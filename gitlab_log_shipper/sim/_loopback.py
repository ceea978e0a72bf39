"""The HTTP plumbing shared by the simulators: a loopback server run from a daemon thread.

:class:`LoopbackService` is the lifecycle (``start``/``stop``, context manager, ``url``) and
:class:`LoopbackServer` the listening socket behind it: one daemon thread per connection, open
connections tracked so ``stop()`` can hang up idle keep-alive clients, and client disconnects kept out
of stderr. The GitLab simulator and the log receiver subclass the service and bring their own handler.
Standard library only.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Generic, TypeVar

__all__ = ["DISCONNECTS", "LoopbackHandler", "LoopbackServer", "LoopbackService"]

DISCONNECTS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
"""A client hanging up (timeout on its side, reset, broken pipe): routine on loopback, not an error."""

OwnerT = TypeVar("OwnerT", bound="LoopbackService")
ServiceT = TypeVar("ServiceT", bound="LoopbackService")


class LoopbackServer(ThreadingHTTPServer, Generic[OwnerT]):
    """The listening socket of a :class:`LoopbackService` (its ``owner``), IPv4 or IPv6 by host."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # socketserver's 5 drops SYNs under a burst; the client then stalls ~1 s

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], owner: OwnerT
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host with getfqdn(), which can stall for seconds on a
        # machine without working reverse DNS; the name is only used for logging.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr for everything; a client hanging up is routine here,
        # anything else (a bug, a dump folder that cannot be written) is worth one logged error.
        owner = self.owner
        if isinstance(sys.exc_info()[1], owner._quiet_errors):
            owner._logger.debug("%s: client %s disconnected", owner._label, client_address, exc_info=True)
        else:
            owner._logger.error("%s: error while serving %s", owner._label, client_address, exc_info=True)

    def close_connections(self) -> None:
        """Hang up on every open connection, so idle keep-alive threads end with the server."""
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class LoopbackHandler(BaseHTTPRequestHandler):
    """Base of the services' request handlers: HTTP/1.1 keep-alive, no Nagle."""

    protocol_version = "HTTP/1.1"  # keep-alive, so a client reuses its connection as in production
    # Headers and body go out in separate writes; with Nagle on, a keep-alive client waits ~40 ms for
    # the delayed ACK on every request.
    disable_nagle_algorithm = True


class LoopbackService:
    """An HTTP service on loopback, served from a daemon thread; use as a context manager.

    Subclasses set ``_handler`` (whose ``self.server.owner`` is the service), ``_label`` (for log
    messages and errors), ``_thread_name`` (prefix of the serving thread's name) and optionally
    ``_quiet_errors`` (exceptions escaping a handler that are logged at debug level only) and
    ``_logger``; they may extend :meth:`_on_start` / :meth:`_on_stop`.
    """

    _handler: ClassVar[type[BaseHTTPRequestHandler]]
    _label: ClassVar[str] = "loopback service"
    _thread_name: ClassVar[str] = "loopback"
    _quiet_errors: ClassVar[tuple[type[BaseException], ...]] = DISCONNECTS
    _logger: ClassVar[logging.Logger] = logging.getLogger(__name__)

    def __init__(self, host: str, port: int, tls: "ssl.SSLContext | None" = None) -> None:
        self.host = host
        self.port = port
        # A server-side SSLContext serves https (TLS tests: a private CA, verification switched off).
        self.tls = tls
        self._server: LoopbackServer[Any] | None = None
        self._thread: threading.Thread | None = None

    def start(self: ServiceT) -> ServiceT:
        """Bind (port 0 picks a free port) and serve from a daemon thread; returns self."""
        if self._server is not None:
            raise RuntimeError(f"{self._label} already started")
        self._on_start()
        self._server = LoopbackServer((self.host, self.port), self._handler, self)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self._thread_name}-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and hang up open connections; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        self._on_stop()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _on_start(self) -> None:
        """Called by :meth:`start` just before binding."""

    def _on_stop(self) -> None:
        """Called by :meth:`stop` before the server shuts down (not when it was not running)."""

    def __enter__(self: ServiceT) -> ServiceT:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (``https`` with ``tls``; IPv6 hosts in brackets); the port is known once started."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"
