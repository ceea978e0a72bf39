"""Application logging: one readable line per event on stderr (journald) and in ``LOG_DIR``.

Every line goes through :class:`SafeFormatter`: the message is escaped so that one event is one line
whatever GitLab or the receiver put in it, and the configured tokens are masked in the whole output
(tracebacks included) — a second line of defence behind the code that never logs them.
"""

from __future__ import annotations

import http.client
import logging
import logging.handlers
from typing import Sequence

from .config import Config
from .errors import ConfigError
from .security import escape_controls, mask_secrets, open_private, private_mkdir

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
APP_LOG_MAX_BYTES = 10 * 1024 * 1024
APP_LOG_BACKUPS = 5


class SafeFormatter(logging.Formatter):
    """Escapes control characters in the message and masks ``secrets`` everywhere in the record."""

    def __init__(self, fmt: str, secrets: Sequence[str] = ()) -> None:
        super().__init__(fmt)
        self.secrets = tuple(s for s in secrets if s)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record), self.secrets)


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files (the first and each one after a rotation) are created 0600."""

    def _open(self):  # type: ignore[no-untyped-def]
        return open_private(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors)


def setup_logging(config: Config, *, to_file: bool = True) -> None:
    """Configure the root logger once. urllib3 and python-gitlab log URLs only, never headers, but are kept
    at WARNING unless LOG_LEVEL=DEBUG so connection chatter does not drown the shipper's own lines.

    Raises ConfigError naming LOG_DIR when the application log cannot be opened."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(config.log_level)
    formatter = SafeFormatter(FORMAT, config.secrets())
    stderr = logging.StreamHandler()
    stderr.setFormatter(formatter)
    root.addHandler(stderr)
    if to_file:
        try:
            private_mkdir(config.log_dir)
            handler = PrivateRotatingFileHandler(
                config.app_log, maxBytes=APP_LOG_MAX_BYTES, backupCount=APP_LOG_BACKUPS, encoding="utf-8"
            )
        except OSError as exc:
            root.removeHandler(stderr)
            raise ConfigError("LOG_DIR", f"cannot write {str(config.app_log)!r}: {exc.strerror or exc}") from None
        handler.setFormatter(formatter)
        root.addHandler(handler)
    quiet = logging.DEBUG if config.log_level == "DEBUG" else logging.WARNING
    for name in ("urllib3", "gitlab", "requests"):
        logging.getLogger(name).setLevel(quiet)
    # http.client prints every request and response header (tokens included) to stdout when its debuglevel
    # is raised; whatever a library or a debugging session did, keep it off.
    http.client.HTTPConnection.debuglevel = 0
