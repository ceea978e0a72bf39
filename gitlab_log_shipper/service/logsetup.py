"""Application logging: one line per event on stderr (journald) and in ``LOG_DIR/gitlab-log-shipper.log``.

* ``LOG_FORMAT=text`` (default): ``2026-11-26T20:02:05.123Z INFO gitlab_log_shipper.shipper: message`` (UTC, like
  every other time the shipper writes).
  A traceback or a message with line breaks stays one line (breaks become `` | ``), so one event is one
  journal entry and ``grep`` finds it whole.
* ``LOG_FORMAT=json``: one JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
  ``message`` and, for errors with a traceback, ``exception``.
* Under systemd (stderr connected to the journal, ``$JOURNAL_STREAM``) each stderr line starts with its
  syslog priority (``<3>``), which journald strips and records: ``journalctl -p warning`` works.
* Every secret of the configuration (the tokens, the ``API_POST_HEADERS`` values) is replaced by ``[MASKED]``
  wherever it would appear, tracebacks included, as a last line of defence: the code never logs them on
  purpose. Control characters in messages (whatever GitLab or the receiver sent) are escaped.
* The log file is created 0600 (``security.open_private``).
"""

from __future__ import annotations

import http.client
import json
import logging
import logging.handlers
import os
import sys
from datetime import datetime, timezone
from typing import IO, Iterable, Mapping

from ..config.settings import Config
from ..errors import ConfigError
from ..security import escape_controls, open_private, private_mkdir, redact_secrets

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
APP_LOG_MAX_BYTES = 10 * 1024 * 1024
APP_LOG_BACKUPS = 5
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def utc_millis(created: float) -> str:
    """A log record's time as ``2026-12-01T13:36:04.551Z``."""
    return datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _one_line(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", " | ")


class TextFormatter(logging.Formatter):
    """The readable line: secrets redacted, line breaks folded, optionally prefixed with ``<priority>``."""

    def __init__(self, secrets: Iterable[str] = (), *, syslog_prefix: bool = False) -> None:
        super().__init__(FORMAT)
        self.secrets = tuple(secrets)
        self.syslog_prefix = syslog_prefix

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        """UTC with an explicit ``Z`` (logging's default is local time without a zone): a line read on another
        machine, or next to the JSON log and the documents, means the same instant."""
        return utc_millis(record.created)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape_controls(_one_line(record.message))
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = _one_line(redact_secrets(self.render(record), self.secrets))
        if self.syslog_prefix:
            line = f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{line}"
        return line

    def render(self, record: logging.LogRecord) -> str:
        return super().format(record)


class JsonFormatter(TextFormatter):
    """``LOG_FORMAT=json``: one object per line (line breaks inside strings are JSON-escaped anyway)."""

    def render(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "time": utc_millis(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": escape_controls(record.getMessage()),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False)


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files (the first and each one after a rotation) are created 0600."""

    def _open(self):  # type: ignore[no-untyped-def]
        return open_private(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors)


def stderr_is_journal(environ: Mapping[str, str], stream: IO[str] | None = None) -> bool:
    """True when stderr is systemd's journal stream: ``$JOURNAL_STREAM`` is ``device:inode`` of it."""
    value = environ.get("JOURNAL_STREAM", "")
    stream = stream or sys.stderr
    try:
        device, inode = (int(part) for part in value.split(":"))
        stat = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


class RetryChatterFilter(logging.Filter):
    """Drops urllib3's ``Retrying (Retry(total=…)) after connection broken by …`` WARNING, logged at every retry of
    a receiver POST (urllib3/connectionpool.py, urlopen): one line of ours says it instead, once (the POST's
    outcome in api-requests.log and the shipper's "receiver unavailable" line; for GitLab, "GitLab unreachable").
    Kept at LOG_LEVEL=DEBUG, where the urllib3 logger is let through for debugging."""

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger("urllib3").getEffectiveLevel() <= logging.DEBUG:
            return True
        return not str(record.msg).startswith("Retrying (")


def setup_logging(config: Config, *, to_file: bool = True, journald: bool = False) -> None:
    """Configure the root logger once. urllib3 and python-gitlab log URLs only, never headers, but are kept
    at WARNING unless LOG_LEVEL=DEBUG so connection chatter does not drown the shipper's own lines."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(config.log_level)
    kind = JsonFormatter if config.log_format == "json" else TextFormatter
    stderr = logging.StreamHandler()
    stderr.setFormatter(kind(config.secrets(), syslog_prefix=journald))
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
        handler.setFormatter(kind(config.secrets()))
        root.addHandler(handler)
    quiet = logging.DEBUG if config.log_level == "DEBUG" else logging.WARNING
    for name in ("urllib3", "gitlab", "requests"):
        logging.getLogger(name).setLevel(quiet)
    pool_logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, RetryChatterFilter) for f in pool_logger.filters):
        pool_logger.addFilter(RetryChatterFilter())
    # http.client prints every request and response header (tokens included) to stdout when its debuglevel
    # is raised; whatever a library or a debugging session did, keep it off.
    http.client.HTTPConnection.debuglevel = 0
