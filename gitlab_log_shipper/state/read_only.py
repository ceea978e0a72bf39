"""``--dry-run``: a state store that reads the real one and writes nothing (what the dry run shows is
:mod:`gitlab_log_shipper.service.preview`).

With it (and without poster, delivery and file output, see :class:`~gitlab_log_shipper.shipper.Shipper`),
a cycle, a backfill or a post decides exactly as for real — same cursors, same record of what was
shipped — builds the documents, and shows them instead of delivering them. Nothing changes: no cursor, no
record, no outbox, no file output, no ``api-requests.log`` line, no POST.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from .store import _SCHEMA, MARKER_NAME, StateStore

log = logging.getLogger(__name__)


class ReadOnlyStateStore(StateStore):
    """The real store opened as usual (so reads see what the daemon wrote), every write dropped. When
    ``STATE_DIR`` has no store yet, an empty one in memory: nothing is created on disk."""

    def __init__(self, state_dir: Path) -> None:
        if (Path(state_dir) / "state.sqlite3").is_file() or (Path(state_dir) / MARKER_NAME).exists():
            super().__init__(state_dir)  # (a store that was in use and is now lost is refused, as for real)
            return
        self.path = Path(state_dir) / "state.sqlite3"
        self._lock = threading.RLock()
        self._db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self._db.executescript(_SCHEMA)

    def _write(self, statements: list[tuple[str, tuple]]) -> None:
        log.debug("dry run: %d state change(s) not written", len(statements))
