"""The one parser of the shipper's env file, for hand commands and for the systemd unit alike.

Why one parser: systemd's ``EnvironmentFile=`` and python-dotenv read the same file differently (a UTF-8 BOM,
``export X=1`` and ``X=60   # one minute`` passed ``check`` and stopped the service). The unit now passes the file
to the program (``run --env-file /etc/gitlab-log-shipper/env``), so this module alone decides what it means; and
:func:`systemd_differences` reports the lines systemd would read differently, for anyone who still points
``EnvironmentFile=`` at it.

Accepted syntax (anything else is a :class:`ConfigError` naming the line, and the variable when known):

* UTF-8 text; a byte-order mark at the start is ignored; ``\\r\\n`` line ends are accepted.
* Blank lines, and lines whose first non-blank character is ``#`` or ``;``, are comments.
* ``NAME=value`` with NAME a shell name (``[A-Za-z_][A-Za-z0-9_]*``), optionally preceded by ``export``;
  blanks around ``=`` are ignored. A later line for the same NAME wins.
* Unquoted value: leading and trailing blanks are dropped; a ``#`` preceded by a blank starts a comment
  (``X=60   # one minute`` is ``60``); a backslash is an ordinary character; a value ending in a backslash
  (a line continuation) is refused: each value lives on one line.
* ``'single quoted'``: every character literal up to the next ``'`` (for regexes and JSON).
* ``"double quoted"``: ``\\"``, ``\\\\``, ``\\$`` and ``\\``` stand for the character; any other backslash stays,
  as in systemd and the shell. No ``${VAR}`` expansion anywhere.
* After a closing quote only blanks or a ``# comment`` may follow. A quote must close on its own line.

systemd's rules, implemented in :func:`parse_systemd` after ``parse_env_file_internal`` in systemd's
``src/basic/env-file.c`` and the name check of ``src/basic/env-util.c`` (systemd.exec(5), ``EnvironmentFile=``):
comments only at the start of a line, no inline comments, no ``export`` (the name ``export X`` is invalid and
the line dropped), a BOM becomes part of the first name (dropped), a backslash in an unquoted value escapes the
next character and a backslash-newline continues the line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..errors import ConfigError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGNMENT = re.compile(r"^(?:export[ \t]+)?([^=]*?)[ \t]*=[ \t]*(.*)$")
_BOM = "\ufeff"
_DOUBLE_QUOTE_ESCAPES = '"\\`$'  # systemd's SHELL_NEED_ESCAPE
MAX_ENV_FILE_BYTES = 1024 * 1024  # an env file is a few KiB; a bigger "file" is a mistake (or /dev/zero)


@dataclass(frozen=True)
class Difference:
    """A line that systemd's ``EnvironmentFile=`` would read differently: what it would get, never the value."""

    line: int
    name: str
    problem: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.name}: {self.problem}"


@dataclass(frozen=True)
class EnvFile:
    """An env file read once (a pipe or ``/dev/fd/N`` cannot be read twice): its values and where they are."""

    path: str
    values: dict[str, str] = field(repr=False)
    lines: dict[str, int] = field(default_factory=dict)
    differences: tuple[Difference, ...] = ()


def read_env_file(path: str | os.PathLike[str]) -> EnvFile:
    """Read and parse ``path`` once; any file-like path works (a FIFO, ``/dev/fd/N``, process substitution)."""
    shown = str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_ENV_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError("--env-file", f"no such file: {shown!r}") from None
    except IsADirectoryError:
        raise ConfigError("--env-file", f"{shown!r} is a folder, not a file") from None
    except OSError as exc:
        raise ConfigError("--env-file", f"cannot read {shown!r}: {exc.strerror or exc.__class__.__name__}") from None
    if len(data) > MAX_ENV_FILE_BYTES:
        raise ConfigError("--env-file", f"{shown!r} is larger than {MAX_ENV_FILE_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError("--env-file", f"{shown!r} line {line}: not UTF-8 text") from None
    values, lines = parse_env_text(text)
    return EnvFile(shown, values, lines, tuple(systemd_differences(text, values, lines)))


def parse_env_text(text: str) -> tuple[dict[str, str], dict[str, int]]:
    """The file's text → (values, line number of each name's winning assignment). Raises ConfigError."""
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, raw in enumerate(text.removeprefix(_BOM).split("\n"), start=1):
        line = raw.removesuffix("\r").strip(" \t")
        if not line or line[0] in "#;":
            continue
        name, value = _assignment(number, line)
        values[name] = value
        lines[name] = number
    return values, lines


def _assignment(number: int, line: str) -> tuple[str, str]:
    match = _ASSIGNMENT.match(line)
    if not match:
        raise ConfigError(f"env file line {number}", "expected NAME=value")
    name = match.group(1)
    if not _NAME.fullmatch(name):
        raise ConfigError(f"env file line {number}", f"{name[:40]!r} is not a variable name")
    return name, _value(f"{name} (env file line {number})", match.group(2))


def _value(where: str, text: str) -> str:
    if text.startswith("'"):
        end = text.find("'", 1)
        if end < 0:
            raise ConfigError(where, "the single quote does not close on this line")
        return _after_quote(where, text[1:end], text[end + 1:])
    if text.startswith('"'):
        return _double_quoted(where, text)
    value = re.split(r"[ \t]#", text, maxsplit=1)[0].rstrip(" \t")
    if value.endswith("\\"):
        raise ConfigError(where, "ends in a backslash: line continuations are not supported, keep the value on one line")
    return value


def _double_quoted(where: str, text: str) -> str:
    out: list[str] = []
    index = 1
    while index < len(text):
        char = text[index]
        if char == '"':
            return _after_quote(where, "".join(out), text[index + 1:])
        if char == "\\" and index + 1 < len(text):
            following = text[index + 1]
            out.append(following if following in _DOUBLE_QUOTE_ESCAPES else "\\" + following)
            index += 2
            continue
        out.append(char)
        index += 1
    raise ConfigError(where, "the double quote does not close on this line")


def _after_quote(where: str, value: str, rest: str) -> str:
    rest = rest.strip(" \t")
    if rest and not rest.startswith("#"):
        raise ConfigError(where, "unexpected text after the closing quote (quote the whole value)")
    return value


# --------------------------------------------------------------------------------------------------
# systemd's reading, for `check`.

_WHITESPACE = " \t\n\r"
_NEWLINE = "\n\r"


class _SystemdReader:
    """A transcription of the state machine of systemd's ``parse_env_file_internal`` (src/basic/env-file.c)."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.state = "PRE_KEY"
        self.key: list[str] = []
        self.value: list[str] = []
        self.key_ws: int | None = None
        self.value_ws: int | None = None

    def push(self) -> None:
        key = "".join(self.key[: self.key_ws] if self.key_ws is not None else self.key)
        value = "".join(self.value)
        # load_env_file keeps everything; exec's strv_env_clean then drops names that are not valid shell names.
        if _NAME.fullmatch(key):
            self.values[key] = value
        self.key, self.value, self.key_ws, self.value_ws = [], [], None, None

    def feed(self, c: str) -> None:
        getattr(self, "_" + self.state.lower())(c)

    def _pre_key(self, c: str) -> None:
        if c in "#;":
            self.state = "COMMENT"
        elif c not in _WHITESPACE:
            self.state, self.key_ws, self.key = "KEY", None, [c]

    def _key(self, c: str) -> None:
        if c in _NEWLINE:
            self.state, self.key = "PRE_KEY", []
        elif c == "=":
            self.state, self.value_ws = "PRE_VALUE", None
        else:
            if c not in _WHITESPACE:
                self.key_ws = None
            elif self.key_ws is None:
                self.key_ws = len(self.key)
            self.key.append(c)

    def _pre_value(self, c: str) -> None:
        if c in _NEWLINE:
            self.state = "PRE_KEY"
            self.push()
        elif c == "'":
            self.state = "SINGLE_QUOTE_VALUE"
        elif c == '"':
            self.state = "DOUBLE_QUOTE_VALUE"
        elif c == "\\":
            self.state = "VALUE_ESCAPE"
        elif c not in _WHITESPACE:
            self.state = "VALUE"
            self.value.append(c)

    def _value(self, c: str) -> None:
        if c in _NEWLINE:
            self.state = "PRE_KEY"
            self._chomp()
            self.push()
        elif c == "\\":
            self.state, self.value_ws = "VALUE_ESCAPE", None
        else:
            if c not in _WHITESPACE:
                self.value_ws = None
            elif self.value_ws is None:
                self.value_ws = len(self.value)
            self.value.append(c)

    def _chomp(self) -> None:
        if self.value_ws is not None:
            del self.value[self.value_ws:]

    def _value_escape(self, c: str) -> None:
        self.state = "VALUE"
        if c not in _NEWLINE:
            self.value.append(c)

    def _single_quote_value(self, c: str) -> None:
        if c == "'":
            self.state = "PRE_VALUE"
        else:
            self.value.append(c)

    def _double_quote_value(self, c: str) -> None:
        if c == '"':
            self.state = "PRE_VALUE"
        elif c == "\\":
            self.state = "DOUBLE_QUOTE_VALUE_ESCAPE"
        else:
            self.value.append(c)

    def _double_quote_value_escape(self, c: str) -> None:
        self.state = "DOUBLE_QUOTE_VALUE"
        if c in _DOUBLE_QUOTE_ESCAPES:
            self.value.append(c)
        elif c != "\n":
            self.value.extend(("\\", c))

    def _comment(self, c: str) -> None:
        if c == "\\":
            self.state = "COMMENT_ESCAPE"
        elif c in _NEWLINE:
            self.state = "PRE_KEY"

    def _comment_escape(self, c: str) -> None:
        self.state = "PRE_KEY" if c in _NEWLINE else "COMMENT"

    def finish(self) -> dict[str, str]:
        if self.state not in ("PRE_KEY", "KEY", "COMMENT", "COMMENT_ESCAPE"):
            if self.state == "VALUE":
                self._chomp()
            self.push()
        return self.values


def parse_systemd(text: str) -> dict[str, str]:
    """What ``EnvironmentFile=`` would put into the service's environment from ``text``."""
    reader = _SystemdReader()
    for char in text:
        reader.feed(char)
    return reader.finish()


def _line_of(text: str, name: str) -> int:
    """The last line assigning ``name`` as systemd sees it (0 when none starts with it)."""
    found = 0
    for number, line in enumerate(text.split("\n"), start=1):
        if re.match(rf"[ \t]*{re.escape(name)}[ \t]*=", line):
            found = number
    return found


def systemd_differences(text: str, values: dict[str, str], lines: dict[str, int]) -> list[Difference]:
    """Each variable whose value under ``EnvironmentFile=`` would not be ours (values are never shown)."""
    theirs = parse_systemd(text)
    found: list[Difference] = []
    for name, value in values.items():
        if name not in theirs:
            found.append(Difference(lines[name], name, "systemd's EnvironmentFile= would not set it "
                                                       "(export prefix, byte-order mark or odd quoting)"))
        elif theirs[name] != value:
            found.append(Difference(lines[name], name, "systemd's EnvironmentFile= would read another value "
                                                       "(inline # comment, backslash or quotes)"))
    for name in sorted(set(theirs) - set(values)):
        found.append(Difference(_line_of(text, name), name, "systemd's EnvironmentFile= would set it, this parser "
                                                            "does not (a line continued by a backslash)"))
    return sorted(found, key=lambda d: (d.line, d.name))
