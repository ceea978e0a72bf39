"""Timestamps as GitLab writes them: ISO 8601, UTC, millisecond precision, ``Z``."""

from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    """The real clock; everything that decides on time takes a ``now`` callable defaulting to this."""
    return datetime.now(timezone.utc)


def parse_ts(value: str) -> datetime:
    """Parse GitLab's ``2026-10-01T10:40:48.481Z`` (or any ISO 8601 with offset) to an aware UTC datetime."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def format_ts(value: datetime) -> str:
    """Aware datetime → ``2026-10-01T10:40:48.481Z`` (GitLab's own format, so strings sort like times)."""
    value = value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
