"""``--dry-run``: a state store that reads the real one and writes nothing.

With it (and without poster, delivery and file output, see :class:`~gitlab_log_shipper.shipper.Shipper`),
a cycle, a backfill or a post decides exactly as for real — same cursors, same record of what was
shipped — builds the documents, and shows them instead of delivering them. Nothing changes: no cursor, no
record, no outbox, no file output, no ``api-requests.log`` line, no POST.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Mapping

from .config import Config
from .fileout import FileOutput
from .state import _SCHEMA, MARKER_NAME, StateStore

if TYPE_CHECKING:  # shipper imports this module
    from .shipper import ShipResult

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


class Preview:
    """What a dry run shows for each document: where it would go (set as the result's reason, which the
    per-pipeline line prints) and, with ``--show-document``, the document itself, byte for byte what would
    be POSTed, one per line on ``out``."""

    def __init__(self, config: Config, *, show_document: bool, out: IO[str]) -> None:
        self.config = config
        self.show_document = show_document
        self.out = out
        # Pipelines are previewed from the pool threads at once (run, and backfill since issue 12): one document is
        # written in many chunks, which must not interleave with another's.
        self._writing = threading.Lock()

    def __call__(self, document: Path, header: Mapping[str, Any], result: "ShipResult") -> None:
        size = document.stat().st_size
        targets = []
        if self.config.posts:
            targets.append(f"POST {size} bytes to {self.config.api_post_url} (Idempotency-Key {result.idempotency_key})")
        if self.config.writes_files:
            folder = FileOutput(self.config.log_output_dir).pipeline_dir(header.get("project_name"), result.project_id,
                                                                         result.pipeline_id)
            targets.append(f"write {folder}")
        result.reason = " and ".join(targets)
        if self.show_document:
            with self._writing, open(document, encoding="utf-8") as source:
                self.out.flush()
                shutil.copyfileobj(source, self.out)
                self.out.write("\n")
                self.out.flush()
