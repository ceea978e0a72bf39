"""The predecessor's file layout ("file only" mode, and the backup of dual mode).

::

    {LOG_OUTPUT_DIR}/{sanitized project name}_{project_id}/pipeline_{pipeline_id}/
        metadata.json
        job_{job_id}_{sanitized job name}.log      # the raw log bytes

Every file is written to a temporary name in the same folder, fsynced and renamed into place, so a
reader (or a crash) never sees a half-written file; ``metadata.json`` is written last, so when it
lists a job, that job's log is complete. Files are created 0600 and folders 0700 (minus the umask).

Names come from GitLab data (project and job names) and are sanitised to ``[A-Za-z0-9._-]``, at most
100 characters, never ``.`` or ``..``; every path is also checked to stay inside ``LOG_OUTPUT_DIR``
before anything is written, whatever the name was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..document.payload import JobLog
from ..errors import DeliveryError
from ..security import private_mkdir
from ..timeutil import format_ts

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 100


def sanitize(name: str | None) -> str:
    """Letters, digits, ``-``, ``_``, ``.`` kept; anything else ``_``; runs collapsed; ends trimmed.

    ``build:production`` → ``build_production``, ``test/unit`` → ``test_unit``. Names made only of dots
    (``.``, ``..``) cannot name a folder safely and become empty; the result is at most 100 characters.
    """
    cleaned = _UNSAFE.sub("_", name or "")
    cleaned = re.sub(r"_+", "_", cleaned).strip("_")
    if set(cleaned) <= {"."}:
        return ""
    return cleaned[:MAX_NAME].strip("_")


def project_dir_name(project_name: str | None, project_id: int) -> str:
    safe = sanitize(project_name)
    return f"{safe}_{project_id}" if safe else f"project_{project_id}"


def job_log_name(job_id: int, job_name: str | None) -> str:
    safe = sanitize(job_name)
    return f"job_{job_id}_{safe}.log" if safe else f"job_{job_id}.log"


def atomic_write(path: Path, data: bytes | None = None, *, source: Path | None = None, mode: int = 0o600,
                 create_folders: bool = True) -> None:
    """Write ``data`` (or copy ``source``) to ``path`` via temp file + fsync + rename (+ fsync of the folder).

    The file is created 0600 (mkstemp) unless ``mode`` says otherwise, its missing folders 0700 (or, with
    ``create_folders=False``, a missing folder is an error)."""
    if create_folders:
        private_mkdir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            if source is not None:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out, 1024 * 1024)
            elif data is not None:
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if mode != 0o600:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# The extensions of an enriched document that metadata.json carries too (DOCUMENT_FIELDS=enriched), after the
# predecessor's fields: the pipeline's, and each job's (see docs/payload.schema.json).
ENRICHED_PIPELINE_KEYS = ("web_url", "name", "tag", "queued_duration", "coverage", "before_sha", "jobs_failed", "warnings")
ENRICHED_JOB_KEYS = ("allow_failure", "web_url", "runner", "tags", "queued_duration", "coverage")


class FileOutput:
    """Writes pipelines into ``LOG_OUTPUT_DIR`` in the predecessor's layout; ``enriched`` (DOCUMENT_FIELDS)
    adds the enriched document's fields to ``metadata.json``."""

    def __init__(self, root: Path, *, enriched: bool = False) -> None:
        self.root = Path(root)
        self.enriched = enriched

    def project_dir(self, project_name: str | None, project_id: int) -> Path:
        """The project's folder. An existing one is reused whatever its name prefix (the project may have
        been renamed, or written when its name was unknown) — the predecessor only looked for
        ``project_{id}`` and missed name-based folders."""
        for existing in self._existing_project_dirs(project_id):
            return existing
        return self.root / project_dir_name(project_name, project_id)

    def _existing_project_dirs(self, project_id: int) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        suffix = f"_{project_id}"
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and entry.name.endswith(suffix) and not entry.name.startswith("."):
                yield entry

    def pipeline_dir(self, project_name: str | None, project_id: int, pipeline_id: int) -> Path:
        folder = self.project_dir(project_name, project_id) / f"pipeline_{int(pipeline_id)}"
        self._check_inside(folder)
        return folder

    def _check_inside(self, path: Path) -> None:
        """Defence in depth behind :func:`sanitize`: nothing is written outside LOG_OUTPUT_DIR."""
        root = os.path.abspath(self.root)
        target = os.path.abspath(path)
        if os.path.commonpath([root, target]) != root or target == root:
            raise DeliveryError(f"refusing to write {target!r}: outside LOG_OUTPUT_DIR {root!r}")

    def write_pipeline(
        self,
        header: Mapping[str, Any],
        jobs: Sequence[JobLog],
        now: datetime,
    ) -> Path:
        """Write every job's raw log, then ``metadata.json``; returns the pipeline folder.

        A pipeline written before (e.g. retried and finished again) keeps its earlier jobs' entries and files;
        the new finish's fields and jobs are merged over them.
        """
        folder = self.pipeline_dir(header.get("project_name"), int(header["project_id"]), int(header["pipeline_id"]))
        saved_at = format_ts(now)
        entries: dict[str, Any] = {}
        meta_path = folder / "metadata.json"
        if meta_path.is_file():
            try:
                previous = json.loads(meta_path.read_text(encoding="utf-8"))
                if isinstance(previous.get("jobs"), dict):
                    entries.update(previous["jobs"])
            except (OSError, ValueError):
                pass  # unreadable old metadata is replaced whole
        for job in jobs:
            fields = dict(job.fields)
            name = job_log_name(int(fields["job_id"]), fields.get("job_name"))
            self._check_inside(folder / name)
            if job.log_path is not None:
                atomic_write(folder / name, source=job.log_path)
            else:
                atomic_write(folder / name, b"")
            entries[str(fields["job_id"])] = {
                "job_id": fields["job_id"],
                "job_name": fields.get("job_name"),
                "log_file": name,
                "saved_at": saved_at,
                "status": fields.get("status"),
                "stage": fields.get("stage"),
                "created_at": fields.get("created_at"),
                "started_at": fields.get("started_at"),
                "finished_at": fields.get("finished_at"),
                "duration": fields.get("duration"),
                "ref": fields.get("ref"),
            }
            if self.enriched:
                entry = entries[str(fields["job_id"])]
                entry.update({key: fields.get(key) for key in ENRICHED_JOB_KEYS})
                entry.update({"log_bytes": job.log_bytes, "log_truncated": job.truncated})
                for key, value in (("log_error", job.error), ("sections", job.sections), ("failure", job.failure)):
                    if value is not None:
                        entry[key] = value
        self.write_metadata(folder, header, entries, now)
        return folder

    def write_metadata(self, folder: Path, header: Mapping[str, Any], jobs: Mapping[str, Any], now: datetime) -> Path:
        """``metadata.json``: the document's header fields, ``last_updated`` and ``jobs`` keyed by job id."""
        metadata = {key: header.get(key) for key in (
            "pipeline_id", "project_id", "project_name", "status", "ref", "sha", "source", "pipeline_type",
            "created_at", "finished_at", "duration", "user", "stages",
        )}
        if self.enriched:
            metadata.update({key: header[key] for key in ENRICHED_PIPELINE_KEYS if key in header})
        metadata["last_updated"] = format_ts(now)
        metadata["jobs"] = dict(jobs)
        path = folder / "metadata.json"
        atomic_write(path, json.dumps(metadata, indent=2, ensure_ascii=False).encode("utf-8"))
        return path

    def write_metadata_only(self, header: Mapping[str, Any], now: datetime) -> Path:
        """For a pipeline whose logs the filters drop (``LOG_SAVE_METADATA_ALWAYS``)."""
        folder = self.pipeline_dir(header.get("project_name"), int(header["project_id"]), int(header["pipeline_id"]))
        return self.write_metadata(folder, header, {}, now)
