"""Opt-in masking of secrets in job logs (``LOG_REDACT_PATTERNS``) before they are shipped or written.

Off by default: GitLab already masks CI/CD variables marked "masked". This is for what slips through
(a token printed by a script, a key pasted into a test). Matches are replaced by ``[MASKED]`` in the
spool file itself, so the document and the file output both see the masked log.

Logs are matched as raw bytes (they need not be valid UTF-8) in a single streaming pass, with memory
bounded whatever the log size: each pattern keeps a window of :data:`MAX_MATCH` bytes back, so a
secret straddling a read boundary is still found whole. A match longer than :data:`MAX_MATCH` bytes
may be masked only in part.

Syntax of ``LOG_REDACT_PATTERNS``: items separated by ``;;`` or newlines; each item is ``default`` (the
set below) or a Python regular expression. When a pattern has a group named ``secret``, only that group
is masked (``password=(?P<secret>\\S+)`` keeps ``password=``); otherwise the whole match is.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

log = logging.getLogger(__name__)

MASK = b"[MASKED]"
CHUNK = 256 * 1024
MAX_MATCH = 64 * 1024  # longest match guaranteed to be found whole
CONTEXT = 1024  # bytes kept before the unread part, for lookbehinds and \b at the boundary
SEPARATOR = re.compile(r";;|\r?\n")

# The documented default set (OPERATIONS.md, "Masking secrets in job logs"). Every pattern is bounded so
# that no match can exceed MAX_MATCH, and starts with literal text where it can: Python's re scans for a
# literal prefix quickly, while a leading \b or alternation makes it try every byte (~50x slower).
DEFAULT_PATTERNS: dict[str, str] = {
    # GitLab tokens by prefix: personal/project/group access (glpat-), OAuth app secret (gloas-), deploy
    # (gldt-), runner (glrt-, glrtr-), CI job (glcbt-), trigger (glptt-), feed (glft-), incoming mail
    # (glimt-), agent (glagent-), SCIM (glsoat-), feature-flag client (glffct-), service account (glsa-),
    # workspace (glwt-).
    "gitlab-token": r"gl(?:pat|oas|dt|rtr|rt|cbt|ptt|ft|imt|agent|soat|ffct|sa|wt)-[0-9A-Za-z_.\-]{20,512}",
    # Legacy runner registration tokens.
    "gitlab-runner-registration-token": r"GR1348941[0-9A-Za-z_\-]{20,512}",
    # AWS access key ids, and secret access keys written as an assignment (the value only is masked).
    "aws-access-key-id": r"(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}(?![A-Z0-9])",
    "aws-secret-access-key": r"(?i)aws_?secret_?access_?key[\"']?\s{0,16}[:=]\s{0,16}[\"']?"
                             r"(?P<secret>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])",
    # "Bearer <token>" wherever it appears (an Authorization header echoed by curl -v, for instance).
    "bearer-token": r"(?i)bearer[ \t]{1,16}(?P<secret>[A-Za-z0-9\-._~+/]{8,4096}=*)",
    # PEM/OpenSSH/PGP private-key blocks; a block whose END line never comes is masked as far as its
    # base64 body goes.
    "private-key": r"-----BEGIN[A-Z0-9 ]{0,40} PRIVATE KEY(?: BLOCK)?-----"
                   r"(?:(?s:.){0,60000}?-----END[A-Z0-9 ]{0,40} PRIVATE KEY(?: BLOCK)?-----"
                   r"|[A-Za-z0-9+/=\s:,\-]{0,60000})",
}


class PatternError(ValueError):
    """An item of LOG_REDACT_PATTERNS that is not a usable regular expression."""


def parse_patterns(raw: str) -> tuple[re.Pattern[bytes], ...]:
    """``LOG_REDACT_PATTERNS`` → compiled byte patterns (empty tuple = off). Raises PatternError."""
    items = [item.strip() for item in SEPARATOR.split(raw or "")]
    items = [item for item in items if item]
    if not items or (len(items) == 1 and items[0].lower() in ("off", "none", "false")):
        return ()
    patterns: dict[str, re.Pattern[bytes]] = {}
    for number, item in enumerate(items, 1):
        sources = list(DEFAULT_PATTERNS.values()) if item.lower() == "default" else [item]
        for source in sources:
            try:
                compiled = re.compile(source.encode("utf-8"))
            except re.error as exc:
                raise PatternError(f"item {number} is not a valid regular expression ({exc.msg} at position "
                                   f"{exc.pos}): {item!r}") from None
            if compiled.search(b"") is not None:
                raise PatternError(f"item {number} matches the empty string, which would mask nothing useful: {item!r}")
            patterns.setdefault(source, compiled)
    return tuple(patterns.values())


class StreamMasker:
    """Masks one pattern in a byte stream fed piece by piece (see the module docstring for the window)."""

    def __init__(self, pattern: re.Pattern[bytes], window: int = MAX_MATCH, context: int = CONTEXT) -> None:
        self.pattern = pattern
        self.window = window
        self.context = context
        self.masked = 0
        self._secret_group = "secret" in pattern.groupindex
        self._buf = b""
        self._start = 0  # bytes of _buf before this index were already emitted (kept as context)

    def feed(self, data: bytes, final: bool = False) -> bytes:
        buf = self._buf + data
        pos = self._start
        safe = len(buf) if final else len(buf) - self.window
        if safe <= pos:
            self._buf = buf
            return b""
        out: list[bytes] = []
        emitted = pos
        last_end = pos
        for match in self.pattern.finditer(buf, pos):
            if match.start() >= safe:
                break  # may continue past what we have: decided on the next feed
            if self._secret_group:
                start, end = match.span("secret")
            else:
                start, end = match.span()
            last_end = match.end()
            if start < 0 or start == end or start < emitted:
                continue
            out.append(buf[emitted:start])
            out.append(MASK)
            emitted = end
            self.masked += 1
        cut = len(buf) if final else max(safe, last_end)
        out.append(buf[emitted:cut])
        keep_from = max(0, cut - self.context)
        self._buf = buf[keep_from:]
        self._start = cut - keep_from
        return b"".join(out)


@dataclass
class Redactor:
    """The patterns of LOG_REDACT_PATTERNS (plus the configured tokens themselves), applied to spool files."""

    patterns: Sequence[re.Pattern[bytes]]

    @classmethod
    def from_settings(cls, patterns: Sequence[re.Pattern[bytes]], secrets: Iterable[str]) -> "Redactor | None":
        """None when LOG_REDACT_PATTERNS is off (no ``patterns``). When on, the shipper's own tokens
        (``secrets``, :meth:`Config.secrets`) are masked too."""
        if not patterns:
            return None
        literal = [re.compile(re.escape(secret.encode("utf-8"))) for secret in secrets]
        return cls([*patterns, *literal])

    def redact_bytes(self, data: bytes) -> tuple[bytes, int]:
        """Mask a whole byte string (for small inputs and tests); returns the result and the match count."""
        maskers = [StreamMasker(p) for p in self.patterns]
        for masker in maskers:
            data = masker.feed(data, final=True)
        return data, sum(m.masked for m in maskers)

    def redact_file(self, path: Path, *, what: str = "") -> int:
        """Rewrite ``path`` with every match masked (temp file 0600 + rename); returns the match count.

        One pass, chunk by chunk, each chunk flowing through one :class:`StreamMasker` per pattern."""
        path = Path(path)
        maskers = [StreamMasker(p) for p in self.patterns]
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".redact", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                while True:
                    chunk = src.read(CHUNK)
                    final = not chunk
                    data = chunk
                    for masker in maskers:
                        data = masker.feed(data, final=final)
                    if data:
                        out.write(data)
                    if final:
                        break
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        count = sum(m.masked for m in maskers)
        if count:
            log.info("%s: masked %d secret(s) (LOG_REDACT_PATTERNS)", what or path.name, count)
        return count
