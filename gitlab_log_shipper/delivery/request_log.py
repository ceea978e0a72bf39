"""``api-requests.log`` as operated: secrets redacted, rotated by size, and logrotate-friendly.

* **Rotation by size** (default): before a line would be appended to a file of
  ``API_REQUESTS_LOG_MAX_BYTES`` or more, the file becomes ``api-requests.log.1`` (``.1`` → ``.2`` …, the
  oldest beyond ``API_REQUESTS_LOG_BACKUPS`` is deleted). Several processes may append (the daemon, a
  ``backfill``): the rotation is done under an exclusive ``flock`` of the full file and re-checked by inode,
  so two processes never rotate the same file twice; lines are single ``O_APPEND`` writes and never mix.
* **logrotate**: the file is opened for every line, so after logrotate renames it the next line creates a
  new one. ``copytruncate`` is not needed, no signal either. Set ``API_REQUESTS_LOG_MAX_BYTES=0`` to leave
  rotation to logrotate alone.
* **A side channel**: a line that cannot be written never fails a delivery; it is counted
  (``write_failures``) and reported at ERROR once per distinct problem (see :class:`~.poster.RequestLog`).
* **Redaction**: a receiver that echoes request headers in its answer must not put the bearer token or
  an ``API_POST_HEADERS`` value into the log; every secret of the configuration becomes ``[MASKED]``.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Iterable

from ..config.settings import Config
from ..security import redact_secrets
from .poster import RequestLog


class ManagedRequestLog(RequestLog):
    def __init__(self, path: Path, *, max_bytes: int = 0, backups: int = 5, secrets: Iterable[str] = ()) -> None:
        super().__init__(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.secrets = tuple(secrets)
        # Pipelines are shipped by several threads: the size check and the append must not interleave.
        self._lock = threading.Lock()

    @classmethod
    def for_config(cls, config: Config) -> "ManagedRequestLog":
        return cls(config.api_requests_log, max_bytes=config.api_requests_log_max_bytes,
                   backups=config.api_requests_log_backups, secrets=config.secrets())

    def _append(self, line: str) -> None:
        """Rotate if due, then append. A rotation that fails does not cost the line: it is appended to the
        full file all the same, and the rotation's error is reported (see :class:`RequestLog`)."""
        with self._lock:
            rotation_error: OSError | None = None
            if self.max_bytes:
                try:
                    self.rotate_if_full()
                except OSError as exc:
                    rotation_error = exc
            super()._append(redact_secrets(line, self.secrets))
            if rotation_error is not None:
                raise rotation_error

    def rotate_if_full(self) -> bool:
        """Rotate when the file has reached ``max_bytes``; True when this call rotated it."""
        try:
            if self.path.stat().st_size < self.max_bytes:
                return False
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = self.path.stat()
            except FileNotFoundError:
                return False
            mine = os.fstat(fd)
            if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino) or current.st_size < self.max_bytes:
                return False  # another process rotated it while we waited for the lock
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            return True
        finally:
            os.close(fd)  # releases the lock
