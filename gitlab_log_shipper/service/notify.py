"""A small sd_notify(3) client: readiness, status and watchdog messages to systemd, without libsystemd.

The protocol: systemd passes ``$NOTIFY_SOCKET``, the path of an ``AF_UNIX`` datagram socket (or, starting
with ``@``, a name in the abstract namespace, where the ``@`` stands for a leading NUL byte). Each
datagram holds newline-separated ``KEY=value`` assignments: ``READY=1`` (start-up finished; with
``Type=notify``, ``systemctl start`` returns only now), ``STATUS=…`` (one line shown by ``systemctl
status``), ``WATCHDOG=1`` (keep-alive; with ``WatchdogSec=`` systemd passes ``$WATCHDOG_USEC`` and expects
one at least that often — send it every half of it), ``STOPPING=1`` (shutdown has begun).

``$WATCHDOG_PID``, when set, names the process that must send keep-alives; another process (a child
that inherited the environment) must not. Without ``$NOTIFY_SOCKET`` (not under systemd, or
``Type=simple``) every call does nothing. Sending never raises: a notification that cannot be delivered
must not stop the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int | None = None) -> "Notifier":
        """Read ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` (systemd's, not our configuration)."""
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket name; not notifying systemd", address)
            address = None
        usec: int | None = None
        raw = environ.get("WATCHDOG_USEC", "").strip()
        owner = environ.get("WATCHDOG_PID", "").strip()
        if raw.isdigit() and int(raw) > 0 and (not owner or owner == str(pid if pid is not None else os.getpid())):
            usec = int(raw)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between keep-alives (half of ``WATCHDOG_USEC``), None when no watchdog is armed."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def send(self, *assignments: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; False when there is no socket or it failed."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        message = "\n".join(assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(target)
                sock.sendall(message)
            return True
        except OSError as exc:
            log.debug("could not notify systemd at %s: %s", self.address, exc)
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", _status(status))

    def status(self, text: str) -> bool:
        return self.send(_status(text))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", _status(status))


def _status(text: str) -> str:
    """``STATUS=`` takes a single line."""
    return "STATUS=" + " ".join(text.split())[:400]
