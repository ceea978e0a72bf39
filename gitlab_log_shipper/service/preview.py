"""``--dry-run``'s output: where each document would go and, with ``--show-document``, the document itself.

The dry run's other half, the state store that writes nothing, is :mod:`gitlab_log_shipper.state.read_only`.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import IO, Any, Mapping

from ..config.settings import Config
from ..delivery.files import FileOutput
from ..shipper import ShipResult


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

    def __call__(self, document: Path, header: Mapping[str, Any], result: ShipResult) -> None:
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
