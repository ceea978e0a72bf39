"""Keeping secrets secret and files private: helpers every writer and logger of the shipper uses.

* :func:`mask_secrets` / :func:`escape_for_log`: what reaches a log line, an exception message or the
  terminal never carries ``GITLAB_TOKEN`` or ``API_POST_AUTH_TOKEN`` and is always one line, whatever
  GitLab or the receiver answered.
* :func:`private_mkdir`, :func:`open_private`, :func:`tightened_umask`: the state, the logs and the
  file output are created 0600 (folders 0700) unless the umask is stricter still.
* :func:`is_loopback`, :func:`plain_http_to_remote`: the transport decisions an operator must hear about
  at every start (TLS checks switched off, tokens over plain http; the warnings themselves are
  :func:`~gitlab_log_shipper.config.settings.startup_warnings`).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterable, Iterator
from urllib.parse import urlsplit

MASK = "[MASKED]"
MIN_SECRET_LENGTH = 4  # shorter values would blank out ordinary words (redact_secrets)
FILE_MODE = 0o600
DIR_MODE = 0o700
PRIVATE_UMASK = 0o077

# C0 and C1 control characters, DEL, and the Unicode line/paragraph separators: everything that can end
# a line (str.splitlines splits on \x1c-\x1e and \x85 too) or repaint a terminal (\x1b).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """One event is one line: newlines and every other control character become ``\\n``, ``\\x1b``, ...

    For the application log, where readability wins over reversibility (a backslash stays one)."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def escape_for_log(text: str) -> str:
    """:func:`escape_controls`, reversibly: backslashes are doubled first (``api-requests.log``)."""
    return escape_controls(text.replace("\\", "\\\\"))


def redact_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret of :data:`MIN_SECRET_LENGTH` or more characters (longest first, so one that
    contains another goes whole) replaced with ``[MASKED]``: the application log and ``api-requests.log``."""
    for secret in sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each secret with ``[MASKED]``."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    return text


def is_loopback(host: str | None) -> bool:
    """``localhost`` (and ``*.localhost``) or a loopback IP literal. No DNS lookup: a name that merely
    resolves to 127.0.0.1 today is not trusted to do so tomorrow."""
    if not host:
        return False
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def plain_http_to_remote(url: str | None) -> bool:
    """True for an ``http://`` URL whose host is not loopback: what travels there can be read on the way."""
    if not url:
        return False
    parts = urlsplit(url)
    return parts.scheme == "http" and not is_loopback(parts.hostname)


# -- private files and folders ----------------------------------------------------------------------


def private_mkdir(path: str | os.PathLike[str]) -> Path:
    """``mkdir -p`` where every folder it creates gets mode 0700 (minus the umask).

    ``Path.mkdir(parents=True, mode=...)`` applies ``mode`` to the last folder only; the parents get the
    default 0777-minus-umask. Folders that already exist are left as the operator made them.
    """
    target = Path(path)
    missing: list[Path] = []
    current = target
    while not os.path.lexists(current) and current.parent != current:
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):  # a file in the way fails here with "Not a directory"
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:  # created meanwhile by another process: fine if it is a folder
            if not folder.is_dir():
                raise
    if not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(target))
    return target


def open_private(path: str | os.PathLike[str], mode: str = "a", encoding: str | None = "utf-8",
                 errors: str | None = None) -> IO:
    """``open(path, mode)`` for writing, but a file it creates gets mode 0600 (minus the umask)."""
    flags = os.O_WRONLY | os.O_CREAT
    if "a" in mode:
        flags |= os.O_APPEND
    elif "w" in mode:
        flags |= os.O_TRUNC
    else:
        raise ValueError(f"open_private writes only ('a' or 'w' modes), got {mode!r}")
    if "+" in mode:
        flags = (flags & ~os.O_WRONLY) | os.O_RDWR
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    try:
        if "b" in mode:
            return os.fdopen(fd, mode)
        return os.fdopen(fd, mode, encoding=encoding, errors=errors)
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def tightened_umask() -> Iterator[int]:
    """Within the block the process umask also masks every group and other bit (the old umask's bits
    stay, so a stricter umask is kept). Catches files that third-party code (SQLite's WAL, spool files)
    creates with the default mode. Yields the umask in force."""
    old = os.umask(PRIVATE_UMASK)
    new = old | PRIVATE_UMASK
    os.umask(new)
    try:
        yield new
    finally:
        os.umask(old)
