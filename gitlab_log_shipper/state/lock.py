"""One daemon per STATE_DIR: an advisory lock (flock) on ``STATE_DIR/lock``, released by the kernel when
the process ends, however it ends (kill -9 included), so a stale lock never blocks a restart."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import StateError


class InstanceLocked(StateError):
    """Another process holds the lock; starting a second daemon is a usage error (exit 2)."""

    exit_code = 2


class InstanceLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "lock"
        self._fd: int | None = None

    def acquire(self) -> "InstanceLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise InstanceLocked(
                f"another gitlab-log-shipper (pid {holder}) is already running with STATE_DIR={self.path.parent}; "
                "stop it first, or give this instance its own STATE_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "InstanceLock":
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
