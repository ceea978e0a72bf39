"""Application logging: one readable line per event on stderr (journald) and in ``LOG_DIR``."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

from .config import Config

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
APP_LOG_MAX_BYTES = 10 * 1024 * 1024
APP_LOG_BACKUPS = 5


def setup_logging(config: Config, *, to_file: bool = True) -> None:
    """Configure the root logger once. urllib3 and python-gitlab log URLs only, never headers, but are kept
    at WARNING unless LOG_LEVEL=DEBUG so connection chatter does not drown the shipper's own lines."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(config.log_level)
    formatter = logging.Formatter(FORMAT)
    stderr = logging.StreamHandler()
    stderr.setFormatter(formatter)
    root.addHandler(stderr)
    if to_file:
        Path(config.log_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            config.app_log, maxBytes=APP_LOG_MAX_BYTES, backupCount=APP_LOG_BACKUPS, encoding="utf-8"
        )
        handler.setFormatter(formatter)
        root.addHandler(handler)
    quiet = logging.DEBUG if config.log_level == "DEBUG" else logging.WARNING
    for name in ("urllib3", "gitlab", "requests"):
        logging.getLogger(name).setLevel(quiet)
