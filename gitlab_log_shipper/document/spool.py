"""A job log written into the spool as GitLab streams it, cut to ``MAX_JOB_LOG_BYTES`` on the way in.

Until now the whole log was downloaded to the spool and cut afterwards (:func:`payload.truncate_log`),
so a 10 GB log took 10 GB of disk first. :class:`CappedLog` keeps only what the cut keeps: the first
half of the allowance is written in place, the last half goes round a ring in the same file, so one log
never occupies more than ``keep`` bytes (plus one chunk while the cut is assembled), and memory stays at
one chunk. The result is byte for byte what ``truncate_log`` makes of the whole log: head and tail cut
at line ends when one is within 4096 bytes, and the marker line between them.

Secrets (``LOG_REDACT_PATTERNS``) are masked on the way in, before the cut, as they were masked in the
whole spool file before: masking changes the length, and a cut must never split a secret into two
halves that no longer match.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Protocol, Sequence

from .payload import _NEWLINE_SEARCH, CHUNK, MARKER
from .redact import StreamMasker

log = logging.getLogger(__name__)


class LogObserver(Protocol):
    """Sees a log stream as it is stored (see :class:`CappedLog`)."""

    def feed(self, chunk: bytes) -> None: ...

    def restart(self) -> None: ...


class CappedLog:
    """Spool file ``path`` receiving one job log; at most ``keep`` bytes of it are ever on disk.

    ``write`` the log as it arrives (any chunking), ``restart`` when the download starts over, then
    ``finish``: ``path`` holds the log as :func:`payload.truncate_log` would have cut it. ``size`` is the
    length of the (masked) log that came in, ``masked`` the number of secrets masked. ``observer`` (a
    :class:`sections.LogScanner`) sees the whole masked log as it passes, before any cut, and is restarted with it.
    """

    def __init__(self, path: Path, keep: int, why: str, *, patterns: Sequence[re.Pattern[bytes]] = (),
                 what: str = "", observer: "LogObserver | None" = None) -> None:
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.path = Path(path)
        self.keep = keep
        self.why = why
        self.what = what or self.path.name
        self.patterns = tuple(patterns)
        self.size = 0
        self.masked = 0
        self._head = keep // 2  # bytes [0, _head) of the log stay where they are
        self._ring = keep - self._head  # the latest _ring bytes go round [_head, _head + _ring)
        self._maskers = [StreamMasker(p) for p in self.patterns]
        self.observer = observer
        # Not truncated on open: the file is new (see GitLabSource.fetch_trace on ext4 and truncation).
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._finished = False

    def __enter__(self) -> "CappedLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CappedLog({str(self.path)!r}, keep={self.keep}, size={self.size})"

    # -- receiving -------------------------------------------------------------------------------

    def write(self, data: bytes) -> int:
        if self._finished:
            raise ValueError("write after finish")
        for masker in self._maskers:
            data = masker.feed(data)
        self._store(data)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered here (every write goes to the file at once)."""

    def restart(self) -> None:
        self.size = 0
        self.masked = 0
        if self.observer is not None:
            self.observer.restart()
        self._maskers = [StreamMasker(p) for p in self.patterns]
        os.ftruncate(self._fd, 0)

    def _store(self, data: bytes) -> None:
        if not data:
            return
        if self.observer is not None:
            self.observer.feed(data)
        at = self.size
        self.size += len(data)
        view = memoryview(data)
        if at < self._head:
            n = min(len(view), self._head - at)
            _pwrite(self._fd, view[:n], at)
            view, at = view[n:], at + n
        if not view or not self._ring:
            return
        if len(view) > self._ring:  # only its last _ring bytes can survive
            at += len(view) - self._ring
            view = view[-self._ring:]
        pos = (at - self._head) % self._ring
        n = min(len(view), self._ring - pos)
        _pwrite(self._fd, view[:n], self._head + pos)
        if n < len(view):
            _pwrite(self._fd, view[n:], self._head)

    # -- the end ---------------------------------------------------------------------------------

    def finish(self) -> bool:
        """Flush the maskers and, when the log was longer than ``keep``, write the cut log to ``path``.
        Returns whether it was cut."""
        if self._maskers:
            data = b""
            for masker in self._maskers:
                data = masker.feed(data, final=True)
            self._store(data)
            self.masked = sum(m.masked for m in self._maskers)
            if self.masked:
                log.info("%s: masked %d secret(s) (LOG_REDACT_PATTERNS)", self.what, self.masked)
        self._finished = True
        if self.size <= self.keep:
            return False  # the ring never went round: the file is the log as it came
        self._write_cut()
        return True

    def _write_cut(self) -> None:
        """head (to its last line end) + marker + the ring in order (from its first line end), written
        to a new file while the spool file shrinks behind it, so the two never take more than ``keep``
        bytes plus one chunk: pieces are copied from the end of the spool file backwards, and the file
        is truncated below each piece copied."""
        fd, head, ring, size = self._fd, self._head, self._ring, self.size
        # The same cut points as payload.truncate_log, computed from what is kept.
        near = min(head, _NEWLINE_SEARCH)
        near_head = os.pread(fd, near, head - near)
        cut = near_head.rfind(b"\n")
        head_len = max(0, head - len(near_head) + cut + 1) if cut >= 0 else head
        oldest = (size - head) % ring if ring else 0  # ring position of the oldest byte kept
        pieces = _ring_pieces(head, ring, oldest, 0, min(ring, _NEWLINE_SEARCH))
        near_tail = b"".join(os.pread(fd, length, src) for src, length in pieces)
        cut = near_tail.find(b"\n")
        skip = cut + 1 if cut >= 0 else 0
        marker = MARKER.format(removed=size - ring + skip - head_len, why=self.why).encode("utf-8")
        # (source offset, length, target offset) of everything the cut log is made of
        copies = [(0, head_len, 0)]
        target = head_len + len(marker)
        for src, length in _ring_pieces(head, ring, oldest, skip, ring - skip):
            copies.append((src, length, target))
            target += length
        cut_path = self.path.with_name(f"{self.path.stem}.cut{self.path.suffix}")
        out = os.open(cut_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _pwrite(out, memoryview(marker), head_len)
            for src, length, dst in sorted(copies, reverse=True):
                end = src + length
                while end > src:
                    start = max(src, end - CHUNK)
                    _pwrite(out, memoryview(os.pread(fd, end - start, start)), dst + start - src)
                    if start:  # (never to zero: ext4 would then flush the file on close; it is deleted anyway)
                        os.ftruncate(fd, start)
                    end = start
        except BaseException:
            os.close(out)
            cut_path.unlink(missing_ok=True)
            raise
        os.close(out)
        os.replace(cut_path, self.path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _ring_pieces(head: int, ring: int, oldest: int, start: int, length: int) -> list[tuple[int, int]]:
    """File ranges (offset, length) holding bytes ``start`` to ``start + length`` of the ring in order
    (the oldest byte first): at most two, as the ring wraps at its end."""
    pieces = []
    first = oldest + start
    if first < ring and length > 0:
        n = min(length, ring - first)
        pieces.append((head + first, n))
        start, length = start + n, length - n
    if length > 0:
        pieces.append((head + (oldest + start) % ring, length))
    return pieces


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written
