"""Job sections and failure details, read from a job log while it streams (one pass, bounded memory).

GitLab Runner marks the steps of a job in its log with collapsible-section markers::

    section_start:<unix seconds>:<name>[<options>]\\r\\e[0K<header text>
    ...
    section_end:<unix seconds>:<name>\\r\\e[0K

and closes a failed job with ``ERROR: Job failed: exit code N``. :class:`LogScanner` turns the log
into the list of sections (name, times, duration, header, parent) and, for a failed job, the exit
code and the last lines of the failing section, without holding the log: the integration feeds it
the chunks it writes to the spool.

Where the formats come from:

- The marker syntax is GitLab's own ``Gitlab::Regex.build_trace_section_regex`` (gitlabhq
  ``lib/gitlab/regex.rb``): ``section_(start|end):(\\d+):([a-zA-Z0-9_.-]+)`` + optional
  ``[key=value, ...]`` options + the mandatory ``\\r\\e[0K``. Without that suffix it is plain text
  (a job that merely echoes ``section_start:1:x`` opens nothing).
- An end whose section is not open is ignored, as GitLab's ansi2json does
  (``lib/gitlab/ci/ansi2json/converter.rb``, ``handle_section_end``).
- Runner timestamps (``FF_TIMESTAMPS``, runner 17+): every line starts with
  ``YYYY-MM-DDTHH:MM:SS.ffffffZ `` + 2 hex digits (stream id) + ``O``/``E`` (stdout/stderr) + ``' '``
  (new line) or ``'+'`` (continues the previous line: the runner flushes a write that holds a
  ``\\r`` but no ``\\n`` as its own line, then marks what follows as a continuation) — gitlab-runner
  ``common/buildlogger/internal/timestamper/timestamper.go``. Like GitLab (ansi2json converter,
  ``has_timestamps`` from the first line) we decide from the first line whether a log has them, drop
  each prefix and join ``+`` continuations to their line before anything else is read.
"""

from __future__ import annotations

import functools

import re
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

__all__ = ["LogScanner", "ScanResult"]

HEADER_MAX_CHARS = 500
"""A section's header is cut to this many characters."""

_NAME_MAX = 255
"""Longer section names are not markers (runner names are short; this bounds what a marker can hold)."""

_MARKER_RE = re.compile(
    rb"section_(start|end):(\d{1,20}):([a-zA-Z0-9_.-]{1,%d})" % _NAME_MAX
    + rb"(?:\[\w+=\w+(?:, ?\w+=\w+)*\])?\r\x1b\[0K"
)
_MARKER_MAX = 14 + 20 + 1 + _NAME_MAX + 256 + 4
"""Generous bound on one marker's length (options are short in practice); used only to place forced cuts."""

# ANSI escape sequences: CSI (colours, erase line) and two-byte escapes. GitLab strips every control
# sequence except colours when rendering (ansi2json ``handle_sequence``); we strip all of them.
_ANSI_RE = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")

_TS_PREFIX = rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z [0-9a-f]{2}[OE]"
_TS_FIRST_RE = re.compile(_TS_PREFIX + rb"[ +]")
_TS_CONTINUATION_RE = re.compile(rb"\n" + _TS_PREFIX + rb"\+")
_TS_NEWLINE_RE = re.compile(rb"\n" + _TS_PREFIX + rb" ")
_TS_LEN = 32

# The runner's closing line of a failed job, as in the real logs the tests use:
# "ERROR: Job failed: exit code 1"; Kubernetes: "ERROR: Job failed: command terminated with exit code 1";
# system failures, timeouts and cancellations have no exit code ("ERROR: Job failed (system failure): ...").
_FAILED_RE = re.compile(rb"ERROR: Job failed[^\n]*")
_EXIT_CODE_RE = re.compile(rb"exit code (\d{1,10})")

# Sections the runner runs after the script whatever its outcome: they are not "the failing one".
# Order in a failed job (runner 17, e.g. the mesa log quoted in
# gitlab.freedesktop.org mesa/mesa bin/ci/test/test_pipeline_message.py, and gitlab-runner's build
# code, where executeAfterScript's error only logs that warning unless after_script errors are not
# ignored): step_script ends, then after_script ("WARNING: after_script failed,
# but job will continue unaffected" — after_script errors do not fail the job unless
# AFTER_SCRIPT_IGNORE_ERRORS=false), archive_cache(_on_failure), upload_artifacts_on_failure,
# cleanup_file_variables, then "ERROR: Job failed". So the failing section is the last top-level
# section before that line that is not one of these: step_script (build_script before runner 13),
# a step_<name> of run steps, or whichever preparation section (prepare_executor, get_sources, ...)
# the job died in. after_script is the failing one only when no other section ran before it.
_AFTER_SCRIPT_SECTIONS = frozenset({
    "after_script",
    "archive_cache",
    "archive_cache_on_failure",
    "archive_cache_on_success",
    "upload_artifacts_on_failure",
    "upload_artifacts_on_success",
    "cleanup_file_variables",
})

_MAX_LINE_PIECE = 64 * 1024
"""A line longer than this (no newline) is scanned in pieces so that memory stays bounded."""


@dataclass(frozen=True)
class ScanResult:
    """What a log says about its job.

    ``sections``: ``{"name", "started_at", "finished_at", "duration", "header", "parent"}`` in start
    order (plus ``"unterminated": True`` for a section the log never closed); ``exit_code``: from the
    runner's closing ``ERROR: Job failed ... exit code N`` line, None without one; ``excerpt``: the last
    lines of the failing section before that line (None when there is no such line);
    ``sections_dropped``: sections seen beyond ``max_sections`` (counted, not kept).
    """

    sections: list[dict[str, Any]]
    exit_code: int | None
    excerpt: str | None
    sections_dropped: int = 0


@dataclass
class _Open:
    """A section on the stack of open ones; ``index`` is its place in the kept list."""

    name: bytes
    started: int
    index: int


@dataclass
class _State:
    sections: list[dict[str, Any]] = field(default_factory=list)
    stack: list[_Open] = field(default_factory=list)
    dropped: int = 0
    # Timestamp-prefix stage.
    head: bytearray = field(default_factory=bytearray)  # the first bytes, until the format is known
    timestamps: bool | None = None
    ts_carry: bytes = b""
    drop_first_newline: bool = False
    # Line stage.
    carry: bytes = b""
    at_line_start: bool = True
    # Excerpt recording: raw (prefix-free) bytes of the candidate section, at most ``tail_max``.
    recording: bool = True  # lines before any section count, for logs without sections (off when failure=False)
    candidate: bytes | None = None  # name of the top-level section being recorded
    # Kept as the pieces that came (no copying while the section streams by), the oldest dropped once the
    # rest holds tail_max bytes; joined only when a "Job failed" line asks for the excerpt.
    tail: deque = field(default_factory=deque)
    tail_len: int = 0
    tail_trimmed: bool = False
    exit_code: int | None = None
    excerpt: str | None = None


class LogScanner:
    """Streaming scanner: ``feed`` the log in chunks of any size, ``finish`` for the result.

    The log is expected already masked (``LOG_REDACT_PATTERNS``), so the excerpt carries nothing the
    log itself would not. Work per chunk is a few C-level regex scans; Python runs per marker and per
    ``Job failed`` line, never per byte or per line. Memory: a carry of at most one line piece, the
    open-section stack, at most ``max_sections`` section dicts and a raw tail of the candidate section.
    """

    def __init__(self, *, failure: bool = True, excerpt_lines: int = 40, excerpt_bytes: int = 8192,
                 max_sections: int = 1000) -> None:
        if excerpt_lines < 1 or excerpt_bytes < 1 or max_sections < 0:
            raise ValueError("excerpt_lines and excerpt_bytes must be >= 1, max_sections >= 0")
        # failure=False (a job that did not fail): sections only; no "Job failed" search, nothing recorded
        # for an excerpt, exit_code and excerpt stay None.
        self._failure = failure
        self._excerpt_lines = excerpt_lines
        self._excerpt_bytes = excerpt_bytes
        self._max_sections = max_sections
        # Raw bytes carry colour codes and \r progress redraws: keep generously more than the excerpt.
        self._tail_max = max(16 * excerpt_bytes, 128 * 1024)
        self._s = self._new_state()

    def _new_state(self) -> _State:
        return _State(recording=self._failure)

    # -- public ---------------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """Scan the next bytes of the log (any chunking gives the same result)."""
        if chunk:
            self._feed_timestamps(chunk if type(chunk) is bytes else bytes(chunk))

    def restart(self) -> None:
        """The download starts over from byte 0: forget everything seen so far."""
        self._s = self._new_state()

    def finish(self) -> ScanResult:
        """The log ended: flush what is buffered and return the result (the scanner is reset)."""
        s = self._s
        if s.timestamps is None:
            self._decide_format(final=True)
        if s.ts_carry:
            data, s.ts_carry = s.ts_carry, b""
            out = self._strip_prefixes(data)
            if s.drop_first_newline and out.startswith(b"\n"):
                out = out[1:]
            self._feed_lines(out)
        if s.carry:
            data, s.carry = s.carry, b""
            self._scan(data, 0, len(data), final=True)
        sections = [self._render(entry) for entry in s.sections]
        result = ScanResult(sections=sections, exit_code=s.exit_code, excerpt=s.excerpt, sections_dropped=s.dropped)
        self._s = self._new_state()
        return result

    # -- stage 1: runner timestamp prefixes -------------------------------------------------------

    def _feed_timestamps(self, chunk: bytes) -> None:
        s = self._s
        if s.timestamps is None:
            s.head += chunk
            self._decide_format(final=False)
            return
        if not s.timestamps:
            self._feed_lines(chunk)
            return
        data = s.ts_carry + chunk if s.ts_carry else chunk
        # Keep back a newline whose following prefix is not complete yet: whether it ends a line or
        # is joined to the next one ("+") is only known with that prefix.
        last_nl = data.rfind(b"\n")
        if last_nl != -1 and len(data) - last_nl <= _TS_LEN:
            s.ts_carry = data[last_nl:]
            data = data[:last_nl]
        else:
            s.ts_carry = b""
        if data:
            out = self._strip_prefixes(data)
            if s.drop_first_newline and out.startswith(b"\n"):
                s.drop_first_newline = False
                out = out[1:]
            self._feed_lines(out)

    def _decide_format(self, *, final: bool) -> bool:
        """Decide from the first line whether the log has timestamp prefixes; True once decided."""
        s = self._s
        head = bytes(s.head)
        if len(head) < _TS_LEN and not final:
            return False
        s.head = bytearray()
        s.timestamps = _TS_FIRST_RE.match(head) is not None
        if s.timestamps:
            # The first prefix has no newline before it: give it one (dropped again in _feed_ts).
            s.ts_carry = b"\n"
            s.drop_first_newline = True
            self._feed_timestamps(head)
        elif head:
            self._feed_lines(head)
        return True

    @staticmethod
    def _strip_prefixes(data: bytes) -> bytes:
        data = _TS_CONTINUATION_RE.sub(b"", data)
        return _TS_NEWLINE_RE.sub(b"\n", data)

    # -- stage 2: lines -------------------------------------------------------------------------

    def _feed_lines(self, data: bytes) -> None:
        s = self._s
        start = 0
        if s.carry:
            # Finish the carried line on its own (markers never span a newline), so the rest of the chunk is
            # scanned where it is instead of being copied behind the carry.
            first_nl = data.find(b"\n")
            if first_nl == -1:
                data = s.carry + data
            else:
                line = s.carry + data[: first_nl + 1]
                s.carry = b""
                self._scan(line, 0, len(line), final=False)
                start = first_nl + 1
        last_nl = data.rfind(b"\n", start)
        if last_nl == -1:
            s.carry = data[start:] if start else data
        else:
            s.carry = data[last_nl + 1 :]
            if last_nl + 1 > start:
                self._scan(data, start, last_nl + 1, final=False)
        # A line without newline must not grow without bound: scan it in pieces cut at places that
        # depend on the content only (so any chunking cuts at the same places) and never through a
        # marker or the header window after one.
        while len(s.carry) > _MAX_LINE_PIECE + _MARKER_MAX + HEADER_MAX_CHARS * 4:
            cut = _MAX_LINE_PIECE
            window = _MARKER_MAX + HEADER_MAX_CHARS * 4
            while True:
                k = s.carry.find(b"section_", max(0, cut - window), cut)
                if k <= 0:
                    break
                cut = k
            piece, s.carry = s.carry[:cut], s.carry[cut:]
            self._scan(piece, 0, len(piece), final=False, line_open=True)

    def _scan(self, block: bytes, start: int, end: int, *, final: bool, line_open: bool = False) -> None:
        """Scan ``block[start:end]`` (``start`` is 0 or follows a newline; whole lines, or a piece of a long line when ``line_open``/``final``).

        Markers and ``Job failed`` lines are found with ``bytes.find`` (C speed, no copy of the
        block); Python runs once per candidate only.
        """
        s = self._s
        events = _find_all(block, b"section_", start, end, _MARKER_RE, True)
        failed = _find_all(block, b"ERROR: Job failed", start, end, _FAILED_RE, False) if self._failure else None
        if failed:
            events.extend(failed)
            events.sort(key=lambda e: e[0])
        rec_from = start
        for pos, match, is_marker in events:
            if is_marker:
                action, unix, name = match.group(1), match.group(2), match.group(3)
                if action == b"start":
                    if s.recording:
                        self._record(block, rec_from, pos)
                    if not s.stack:
                        self._top_level_start(name)
                    rec_from = match.end()
                    self._start(name, int(unix), self._header(block, match.end(), end))
                else:
                    self._end(name, int(unix))
            else:
                self._failed(block, pos, match, rec_from)
        if s.recording:
            self._record(block, rec_from, end)
        s.at_line_start = not (line_open or (final and block[end - 1 : end] != b"\n"))

    def _top_level_start(self, name: bytes) -> None:
        """A section opens at the top level: is it a new candidate for "the failing one"?"""
        s = self._s
        if not self._failure:
            return
        if name in _AFTER_SCRIPT_NAMES and s.candidate is not None:
            s.recording = False
            return
        s.recording = True
        s.candidate = name
        s.tail = deque()
        s.tail_len = 0
        s.tail_trimmed = False

    def _record(self, block: bytes, start: int, end: int) -> None:
        """Keep ``block[start:end]`` in the tail; only its last ``tail_max`` bytes can ever be used."""
        if start >= end:
            return
        s = self._s
        if end - start > self._tail_max:
            start = end - self._tail_max
            s.tail_trimmed = True
        data = block[start:end]
        s.tail.append(data)
        s.tail_len += len(data)
        while s.tail_len - len(s.tail[0]) >= self._tail_max:
            s.tail_len -= len(s.tail.popleft())
            s.tail_trimmed = True

    @staticmethod
    def _header(block: bytes, at: int, limit: int) -> bytes:
        end = block.find(b"\n", at, limit)
        if end == -1:
            end = limit
        end = min(end, at + HEADER_MAX_CHARS * 4)
        nxt = block.find(b"section_", at, end)
        while nxt != -1:
            if _MARKER_RE.match(block, nxt):
                end = nxt
                break
            nxt = block.find(b"section_", nxt + 1, end)
        return block[at:end]

    def _start(self, name: bytes, unix: int, header: bytes) -> None:
        s = self._s
        if not _valid_unix(unix):
            return  # a number no clock gives: malformed, ignored
        if len(s.sections) >= self._max_sections or len(s.stack) >= self._max_sections:
            s.dropped += 1
            return
        s.sections.append({
            "name": name,
            "started": unix,
            "finished": None,
            "header": _clean_line(header)[:HEADER_MAX_CHARS],
            "parent": s.stack[-1].name if s.stack else None,
        })
        s.stack.append(_Open(name, unix, len(s.sections) - 1))

    def _end(self, name: bytes, unix: int) -> None:
        s = self._s
        if not _valid_unix(unix):
            return
        for depth in range(len(s.stack) - 1, -1, -1):
            if s.stack[depth].name == name:
                break
        else:
            return  # an end without its start: ignored, as GitLab does
        # The end of an enclosing section closes the sections still open inside it, at the same
        # time: a child cannot outlive its parent in a tree. (GitLab's ansi2json keeps rendering
        # them as open; the runner itself never nests its own sections, so this only happens with a
        # user section the script forgot to end before the runner's step_script end.)
        for entry in s.stack[depth:]:
            s.sections[entry.index]["finished"] = unix
        del s.stack[depth:]

    def _failed(self, block: bytes, pos: int, match: re.Match[bytes], rec_from: int) -> None:
        """A ``Job failed`` text: the runner's closing line if nothing but markers/ANSI precede it."""
        s = self._s
        line_start = block.rfind(b"\n", 0, pos) + 1
        if line_start == 0 and not s.at_line_start:
            return
        before = block[line_start:pos]
        if before and _clean_line(before, strip=True):
            return  # "ERROR: Job failed" in the middle of some output line: not the runner's
        code = _EXIT_CODE_RE.search(match.group(0))
        s.exit_code = int(code.group(1)) if code else None
        tail = b"".join(s.tail)
        trimmed = s.tail_trimmed
        if len(tail) > self._tail_max:
            tail, trimmed = tail[len(tail) - self._tail_max :], True
        if s.recording:
            upto = block[max(rec_from, line_start - self._tail_max, 0) : line_start]
            tail = tail + upto
            if len(tail) > self._tail_max:
                tail = tail[len(tail) - self._tail_max :]
                trimmed = True
        s.excerpt = self._excerpt(bytes(tail), trimmed)

    def _excerpt(self, raw: bytes, trimmed: bool) -> str:
        # Only the last lines can be kept: clean just those (cleaning never adds a newline; twice the count,
        # and more, leaves room for the blank lines dropped at the end and the start).
        want = 2 * self._excerpt_lines + 8
        at = len(raw)
        for _ in range(want):
            at = raw.rfind(b"\n", 0, at)
            if at == -1:
                break
        if at != -1:
            raw, trimmed = raw[at + 1 :], False
        if trimmed:
            # The first line may be a cut one: start at a line start.
            nl = raw.find(b"\n")
            if nl != -1:
                raw = raw[nl + 1 :]
        lines = [_clean_line(line, strip=False) for line in raw.split(b"\n")]
        while lines and not lines[-1].strip():
            lines.pop()
        lines = lines[-self._excerpt_lines :]
        while lines and not lines[0].strip():
            lines.pop(0)
        kept: deque[str] = deque()
        size = 0
        for line in reversed(lines):
            cost = len(line.encode("utf-8")) + (1 if kept else 0)
            if size + cost > self._excerpt_bytes:
                if not kept:
                    # One line longer than the bound: its end (the last state), on a character boundary.
                    encoded = line.encode("utf-8")[-self._excerpt_bytes :]
                    kept.appendleft(encoded.decode("utf-8", "ignore"))
                break
            kept.appendleft(line)
            size += cost
        return "\n".join(kept)

    # -- result ---------------------------------------------------------------------------------

    def _render(self, entry: dict[str, Any]) -> dict[str, Any]:
        finished = entry["finished"]
        out: dict[str, Any] = {
            "name": entry["name"].decode("ascii"),
            "started_at": _iso(entry["started"]),
            "finished_at": _iso(finished) if finished is not None else None,
            "duration": finished - entry["started"] if finished is not None else None,
            "header": entry["header"],
            "parent": entry["parent"].decode("ascii") if entry["parent"] is not None else None,
        }
        if finished is None:
            out["unterminated"] = True
        return out


def _find_all(block: bytes, literal: bytes, start: int, end: int, pattern: re.Pattern[bytes],
              is_marker: bool) -> list[tuple[int, re.Match[bytes], bool]]:
    """The non-overlapping matches of ``pattern`` (which starts with ``literal``) in ``block[start:end]``.

    Same matches as ``pattern.finditer``, but the block is searched with ``bytes.find``, many times
    faster than the regex engine's own search for its literal prefix.
    """
    found: list[tuple[int, re.Match[bytes], bool]] = []
    at = block.find(literal, start, end)
    while at != -1:
        match = pattern.match(block, at, end)
        if match is None:
            at = block.find(literal, at + 1, end)
        else:
            found.append((at, match, is_marker))
            at = block.find(literal, match.end(), end)
    return found


_AFTER_SCRIPT_NAMES = frozenset(name.encode("ascii") for name in _AFTER_SCRIPT_SECTIONS)

_MAX_UNIX = 253402300799  # 9999-12-31T23:59:59Z, the last second datetime can write


def _valid_unix(value: int) -> bool:
    return 0 <= value <= _MAX_UNIX


@functools.lru_cache(maxsize=4096)  # markers of one log share few seconds; a section has two
def _iso(unix: int) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clean_line(raw: bytes, *, strip: bool = True) -> str:
    """One line as a terminal shows it: markers and ANSI codes gone, the last ``\\r`` redraw kept."""
    if b"section_" in raw:
        raw = _MARKER_RE.sub(b"", raw)
    if b"\x1b" in raw:
        raw = _ANSI_RE.sub(b"", raw)
    raw = raw.rstrip(b"\r")
    cr = raw.rfind(b"\r")
    if cr != -1:
        raw = raw[cr + 1 :]
    text = raw.decode("utf-8", "replace")
    return text.strip() if strip else text.rstrip()
