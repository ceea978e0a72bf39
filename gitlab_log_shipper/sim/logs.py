"""Deterministic, realistic GitLab job logs of any size, generated on the fly.

A real job log is not clean text: it carries ANSI colour codes, ``\\r`` progress lines, ``\\e[0K`` (erase to
end of line), ``section_start:<unix>:<name>\\r\\e[0K`` / ``section_end:...`` markers glued onto the next
line, sometimes invalid UTF-8 (binary tool output), and with newer runners a 32-character timestamp
header on every line. A shipper has to carry all of that byte for byte, and it has to do so for logs of
hundreds of megabytes without holding them in memory. :class:`LogSpec` describes such a log by its size
and a seed; the bytes are produced on demand, identically every time, in bounded memory.

Speed: the body of a log is a sequence of pre-rendered ~64 KiB blocks (picked from a small pool by a
seeded PRNG) whose only per-block work is two fixed-length ``bytes.replace`` calls for timestamps, so a
200 MB log streams in well under a second of CPU instead of minutes of per-line Python. A pool's blocks
are rendered one by one as logs need them, and only as far as needed, so a small log costs a few
milliseconds even in a fresh process.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ._block_words import BLOCK_WORDS_TABLE

__all__ = ["LogSpec", "Log", "iter_log", "log_bytes", "log_size"]

_BLOCK_TARGET = 64 * 1024
"""Approximate size of one pre-rendered body block."""

_POOL_SIZE = 16
"""Distinct body blocks per pool; enough variety that a log does not look like one block repeated."""

_POOL_SEEDS = 8
"""Seeds share a few block pools (1 MiB each, cached): a world of thousands of generated logs must not
hold a pool per log. Logs still differ per seed: the block sequence and the frame use the full seed."""

# Fixed-length placeholders, replaced per block with the block's own times. They must keep their
# length so every block keeps a known size (the log must be exactly ``size`` bytes).
_TS_PLACEHOLDER = b"\x01TS" + b"#" * 28 + b"\x01"  # 32 bytes, like "2026-10-01T10:38:11.123456Z 00O "
_UNIX_PLACEHOLDER = b"\x01UNIX####\x01"  # 10 bytes, like "1790851091"
assert len(_TS_PLACEHOLDER) == 32 and len(_UNIX_PLACEHOLDER) == 10

_BASE_TIME = datetime(2026, 10, 1, 10, 38, 11, 123456, tzinfo=timezone.utc)
"""Where the generated clock of a log starts (plus a per-seed offset)."""

# Byte sequences that are not valid UTF-8: a BOM-ish pair, a bad continuation, a lone surrogate,
# a truncated multi-byte character. Real logs get these from binary tool output.
_INVALID_UTF8 = (b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82")

_WORDS = (
    "bundle", "install", "compile", "assets", "webpack", "module", "resolve", "cache", "fetch", "layer",
    "docker", "image", "pull", "push", "spec", "model", "controller", "service", "worker", "queue",
    "migration", "schema", "table", "index", "request", "response", "timeout", "retry", "deploy", "helm",
    "chart", "release", "artifact", "upload", "download", "checksum", "verify", "lint", "format", "test",
)
_COMMANDS = (
    "bundle exec rspec spec/models", "yarn install --frozen-lockfile", "make -j4 all", "go test ./...",
    "pytest -q tests/", "docker build -t $CI_REGISTRY_IMAGE:$CI_COMMIT_SHA .", "npm run build",
    "./scripts/deploy.sh staging", "cargo build --release", "mvn -B verify",
)


@dataclass(frozen=True)
class LogSpec:
    """A deterministic generated job log of exactly ``size`` bytes.

    ``ansi`` adds colour codes, ``\\r`` progress lines and ``\\e[0K``; ``sections`` adds GitLab's
    collapsible-section markers (which always end in ``\\r\\e[0K``: that is their syntax, even without
    ``ansi``); ``invalid_utf8`` sprinkles bytes that do not decode; ``timestamps`` prefixes every line
    with the 32-character header of newer runners; ``failed`` ends the log as the runner ends a failed job's
    (``ERROR: Job failed: exit code 1`` instead of ``Job succeeded``). The same spec always yields the same bytes.
    """

    size: int
    seed: int = 0
    ansi: bool = True
    sections: bool = True
    invalid_utf8: bool = False
    timestamps: bool = False
    failed: bool = False

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"LogSpec.size must be >= 0, got {self.size}")

    # -- public ---------------------------------------------------------------------------------

    def iter_chunks(self, chunk_size: int = 65536) -> Iterator[bytes]:
        """The log as consecutive chunks of exactly ``chunk_size`` bytes (the last may be shorter).

        Memory stays at a few chunks whatever ``size`` is; the concatenation is identical every time.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        buf = bytearray()
        for piece in self._pieces():
            if not buf and len(piece) == chunk_size:
                yield piece
                continue
            buf += piece
            while len(buf) >= chunk_size:
                yield bytes(buf[:chunk_size])
                del buf[:chunk_size]
        if buf:
            yield bytes(buf)

    def read_all(self) -> bytes:
        """The whole log in memory: for tests on small logs."""
        return b"".join(self._pieces())

    def sha256(self) -> str:
        """Hex SHA-256 of the log, computed by streaming (never holds the log)."""
        digest = hashlib.sha256()
        for piece in self._pieces():
            digest.update(piece)
        return digest.hexdigest()

    # -- generation -----------------------------------------------------------------------------

    def _pieces(self) -> Iterator[bytes]:
        """Pieces of arbitrary length whose concatenation is the log (header, body blocks, footer)."""
        if self.size == 0:
            return
        header, footer = _frame(self.seed, self.ansi, self.sections, self.timestamps, self.failed)
        body_size = self.size - len(header) - len(footer)
        if body_size <= 0:
            # Too small for a whole job: the start of one, cut where the size says (a truncated log).
            yield (header + footer)[: self.size]
            return
        yield header
        pool = _block_pool(self.seed % _POOL_SEEDS, self.ansi, self.sections, self.invalid_utf8, self.timestamps)
        rng = random.Random(self.seed * 1_000_003 + 17)
        remaining = body_size - 1  # the body always ends with the newline that closes its last line
        index = 0
        while remaining > 0:
            # A beginning of the block is enough when it covers what is left plus any placeholder that
            # starts inside it (placeholders keep their length, so stamping then cutting is unchanged).
            block = pool.block(rng.randrange(_POOL_SIZE), at_least=remaining + len(_TS_PLACEHOLDER))
            block = _stamp(block, self.seed, index, self.timestamps, self.sections)
            index += 1
            if len(block) > remaining:
                block = block[:remaining]
            remaining -= len(block)
            yield block
        yield b"\n"
        yield footer


Log = str | bytes | LogSpec | None
"""What a job's log can be given as: text, raw bytes, a generated spec, or nothing (never ran)."""


def log_bytes(log: Log) -> bytes:
    """The log's bytes (``b""`` for None); str is encoded as UTF-8. Builds a LogSpec in memory."""
    if log is None:
        return b""
    if isinstance(log, LogSpec):
        return log.read_all()
    if isinstance(log, str):
        return log.encode("utf-8")
    return bytes(log)


def log_size(log: Log) -> int:
    """Size of the log in bytes, without generating it."""
    if log is None:
        return 0
    if isinstance(log, LogSpec):
        return log.size
    if isinstance(log, str):
        return len(log.encode("utf-8"))
    return len(log)


def iter_log(log: Log, chunk_size: int = 65536) -> Iterator[bytes]:
    """The log as chunks of at most ``chunk_size`` bytes, streaming a LogSpec."""
    if isinstance(log, LogSpec):
        yield from log.iter_chunks(chunk_size)
        return
    data = log_bytes(log)
    view = memoryview(data)
    for start in range(0, len(data), chunk_size):
        yield bytes(view[start : start + chunk_size])


# -- rendering helpers ----------------------------------------------------------------------------


def _clock_start(seed: int) -> datetime:
    return _BASE_TIME + timedelta(seconds=(seed % 86_400))


def _ts_prefix(moment: datetime) -> bytes:
    # Newer runners: "<RFC 3339 with microseconds>Z <stream 2 hex><O|E> " = 32 characters.
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ 00O ").encode("ascii")


def _stamp(block: bytes, seed: int, index: int, timestamps: bool, sections: bool) -> bytes:
    """Fill a pool block's time placeholders with the times of its position in the log.

    Every line of one block shares the block's time: times still only move forward through the log,
    and stamping costs one C-level ``replace`` per block instead of Python work per line.
    """
    moment = _clock_start(seed) + timedelta(seconds=5 + index * 0.37)
    if timestamps:
        block = block.replace(_TS_PLACEHOLDER, _ts_prefix(moment))
    if sections:
        block = block.replace(_UNIX_PLACEHOLDER, str(int(moment.timestamp())).encode("ascii"))
    return block


class _Style:
    """Line-building vocabulary for one combination of flags."""

    def __init__(self, ansi: bool, sections: bool) -> None:
        self.ansi = ansi
        self.sections = sections

    def color(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0;m" if self.ansi else text

    def erase(self) -> str:
        return "\x1b[0K" if self.ansi else ""

    def start(self, unix: str, name: str, options: str = "") -> str:
        # The marker's own syntax ends in \r\e[0K so terminals hide it; it is not "colour".
        return f"section_start:{unix}:{name}{options}\r\x1b[0K" if self.sections else ""

    def end(self, unix: str, name: str) -> str:
        return f"section_end:{unix}:{name}\r\x1b[0K" if self.sections else ""


def _join_lines(lines: list[str], prefix: str) -> bytes:
    return "".join(f"{prefix}{line}\n" for line in lines).encode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=64)
def _frame(seed: int, ansi: bool, sections: bool, timestamps: bool, failed: bool = False) -> tuple[bytes, bytes]:
    """The runner's preamble (up to the opening of step_script) and the closing lines of a job."""
    rng = random.Random(seed)
    style = _Style(ansi, sections)
    t0 = _clock_start(seed)
    unix0 = str(int(t0.timestamp()))
    unix1 = str(int(t0.timestamp()) + 3)
    runner = f"{rng.getrandbits(32):08x}"
    host = f"runner-{runner}-project-{87089000 + seed % 1000}-concurrent-0"
    k = style.erase()
    reset = "\x1b[0;m" if ansi else ""
    executor = style.color("36;1", 'Preparing the "docker+machine" executor')
    preparing = style.color("36;1", "Preparing environment")
    getting = style.color("36;1", "Getting source from Git repository")
    executing = style.color("36;1", 'Executing "step_script" stage of the job script')
    # As runners write it: the reset of one line's colour lands at the start of the next line.
    head = [
        f"{k}Running with gitlab-runner 17.5.0 (8ec04662)",
        f"{reset}{k}  on blue-{seed % 7}.saas-linux-small-amd64.runners-manager.gitlab.com/default {runner}, "
        f"system ID: s_{rng.getrandbits(48):012x}",
        f"{reset}{style.start(unix0, 'prepare_executor')}{k}{executor}",
        f"{k}Using Docker executor with image ruby:3.3 ...",
        f"{reset}{k}Pulling docker image ruby:3.3 ...",
        f"{reset}{style.end(unix0, 'prepare_executor')}{style.start(unix0, 'prepare_script')}{k}{preparing}",
        f"Running on {host} via runner-{runner}-s-l-s-amd64-{1790850000 + seed % 100000}-{runner[:8]}...",
        f"{style.end(unix0, 'prepare_script')}{style.start(unix0, 'get_sources')}{k}{getting}",
        style.color("32;1", "Fetching changes with git depth set to 20..."),
        f"Initialized empty Git repository in /builds/sim-group/project-{seed % 1000}/.git/",
        style.color("32;1", "Created fresh repository."),
        style.color("32;1", f"Checking out {rng.getrandbits(32):08x} as detached HEAD (ref is main)..."),
        "",
        style.color("32;1", "Skipping Git submodules setup"),
        f"{style.end(unix1, 'get_sources')}{style.start(unix1, 'step_script')}{k}{executing}",
    ]
    t_end = t0 + timedelta(hours=2)
    unix_end = str(int(t_end.timestamp()))
    cleaning = style.color("36;1", "Cleaning up project directory and file based variables")
    tail = [
        f"{style.end(unix_end, 'step_script')}{style.start(unix_end, 'cleanup_file_variables')}{k}{cleaning}",
        # A failed job: the runner's last line, in red (gitlab-runner: "ERROR: Job failed: exit code N").
        f"{style.end(unix_end, 'cleanup_file_variables')}"
        + (style.color("31;1", "ERROR: Job failed: exit code 1") if failed else style.color("32;1", "Job succeeded")),
    ]
    if timestamps:
        header = b"".join(
            _ts_prefix(t0 + timedelta(milliseconds=37 * i)) + line.encode("utf-8") + b"\n"
            for i, line in enumerate(head)
        )
        footer = b"".join(
            _ts_prefix(t_end + timedelta(milliseconds=11 * i)) + line.encode("utf-8") + b"\n"
            for i, line in enumerate(tail)
        )
    else:
        header = _join_lines(head, "")
        footer = _join_lines(tail, "")
    return header, footer


_PoolKey = tuple[int, bool, bool, bool, bool]
"""(pool seed, ansi, sections, invalid_utf8, timestamps)"""


@functools.lru_cache(maxsize=16)
def _block_pool(seed: int, ansi: bool, sections: bool, invalid_utf8: bool, timestamps: bool) -> _BlockPool:
    """The pool of body blocks for a pool seed and flag combination (its blocks rendered on demand)."""
    return _BlockPool((seed, ansi, sections, invalid_utf8, timestamps))


class _BlockPool:
    """A few ~64 KiB blocks of job output; placeholders stand where per-block times go.

    The blocks are defined as rendered in order from one PRNG seeded from the pool seed. Rendering all of
    them takes ~300 ms, too much when a small log needs one block or only its start. So each block is
    rendered on its own, from a PRNG fast-forwarded past the outputs the blocks before it consume
    (counted once and for all in ``_block_words``), and only as far as it has been needed:
    a block whose beginning was enough is resumed, not restarted, when more of it is needed.
    """

    def __init__(self, key: _PoolKey) -> None:
        self.key = key
        self._whole: list[bytes | None] = [None] * _POOL_SIZE
        self._started: dict[int, tuple[Iterator[bytes], bytearray]] = {}  # blocks rendered in part
        self._lock = threading.Lock()  # a partly rendered block is resumed by one thread at a time

    def block(self, index: int, at_least: int) -> bytes:
        """Block ``index``, or a beginning of it (whole lines) at least ``at_least`` bytes long."""
        whole = self._whole[index]
        if whole is not None:
            return whole
        with self._lock:
            whole = self._whole[index]
            if whole is not None:
                return whole
            if index not in self._started:
                self._started[index] = (_block_lines(self.key, index, _block_rng(self.key, index)), bytearray())
            lines, out = self._started[index]
            if len(out) >= at_least:
                return bytes(out)
            for line in lines:
                out += line
                if len(out) >= at_least:
                    return bytes(out)
            whole = self._whole[index] = bytes(out)
            del self._started[index]
            return whole


def _block_rng(key: _PoolKey, index: int) -> random.Random:
    """The pool's PRNG in the state in which block ``index`` starts."""
    rng = random.Random(key[0] * 7919 + 1)
    skip = _block_starts(key)[index]
    while skip > 0:
        # getrandbits(32 * n) draws exactly n 32-bit outputs of the Mersenne Twister, in C.
        step = min(skip, 4096)
        rng.getrandbits(32 * step)
        skip -= step
    return rng


def _block_lines(key: _PoolKey, index: int, rng: random.Random) -> Iterator[bytes]:
    """The lines of block ``index`` of pool ``key``, drawn from ``rng`` (in the block's starting state)."""
    _, ansi, sections, invalid_utf8, timestamps = key
    style = _Style(ansi, sections)
    unix = _UNIX_PLACEHOLDER.decode("latin-1")
    prefix = _TS_PLACEHOLDER if timestamps else b""
    size = 0
    name = f"step_{index}_{rng.choice(_WORDS)}"
    if sections:
        # A collapsed sub-section per block (user-defined sections look like this).
        line = prefix + (
            style.start(unix, name, "[collapsed=true]") + style.erase()
            + style.color("32;1", f"$ {rng.choice(_COMMANDS)}") + "\n"
        ).encode("utf-8")
        size += len(line)
        yield line
    while size < _BLOCK_TARGET:
        line = prefix + _random_line(rng, style, invalid_utf8) + b"\n"
        size += len(line)
        yield line
    if sections:
        yield prefix + style.end(unix, name).encode("utf-8") + b"\n"


class _CountingRandom(random.Random):
    """A PRNG that counts the 32-bit Mersenne Twister outputs drawn from it (every draw is whole ones)."""

    words = 0

    def random(self) -> float:
        self.words += 2
        return super().random()

    def getrandbits(self, k: int) -> int:
        self.words += (k + 31) // 32
        return super().getrandbits(k)


def _measure_block_words(key: _PoolKey) -> tuple[int, ...]:
    """How many PRNG outputs each block of pool ``key`` consumes, rendering the blocks in order from one
    PRNG as they are defined: the source of ``_block_words``, and its check."""
    rng = _CountingRandom(key[0] * 7919 + 1)
    counts = []
    for index in range(_POOL_SIZE):
        before = rng.words
        for _ in _block_lines(key, index, rng):
            pass
        counts.append(rng.words - before)
    return tuple(counts)


@functools.lru_cache(maxsize=None)
def _block_starts(key: _PoolKey) -> tuple[int, ...]:
    """Where each block of pool ``key`` starts in its PRNG's output, in 32-bit words (from its row of
    ``BLOCK_WORDS_TABLE``: only that row is parsed)."""
    label = "\n" + " ".join(str(int(v)) for v in key) + " |"
    start = BLOCK_WORDS_TABLE.index(label) + len(label)
    counts = BLOCK_WORDS_TABLE[start : BLOCK_WORDS_TABLE.index("\n", start)].split()
    return tuple(itertools.accumulate(map(int, counts), initial=0))


def _block_words_source() -> str:
    """The text of ``_block_words.py``; regenerate it (a minute) after changing how blocks are rendered::

        python -c "from gitlab_log_shipper.sim import logs; print(logs._block_words_source(), end='')" \\
            > gitlab_log_shipper/sim/_block_words.py
    """
    rows = []
    for key in itertools.product(range(_POOL_SEEDS), *[(False, True)] * 4):
        counts = _measure_block_words(key)  # type: ignore[arg-type]
        rows.append(" ".join(str(int(v)) for v in key) + " | " + " ".join(map(str, counts)))
    return "\n".join([
        '"""Generated by ``gitlab_log_shipper.sim.logs._block_words_source()``: do not edit.',
        "",
        "For each block pool of :mod:`gitlab_log_shipper.sim.logs`, one row: the pool seed and the flags ansi,",
        "sections, invalid_utf8 and timestamps (0/1), then how many 32-bit Mersenne Twister outputs each of",
        "its blocks consumes when the blocks are rendered in order, so that any one block can be rendered on",
        "its own. A string, not a dict literal: it compiles in microseconds instead of ~15 ms.",
        '"""',
        "",
        'BLOCK_WORDS_TABLE = """',
        *rows,
        '"""',
    ]) + "\n"


def _random_line(rng: random.Random, style: _Style, invalid_utf8: bool) -> bytes:
    """One line of plausible job output (no trailing newline)."""
    kind = rng.random()
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
    if kind < 0.08:
        return style.color("32;1", f"$ {rng.choice(_COMMANDS)}").encode("utf-8")
    if kind < 0.14 and style.ansi:
        # A progress bar redrawn with \r: a terminal shows the last state, the log keeps them all.
        steps = "\r".join(f"Downloading {words.split()[0]} {p:3d}%" for p in range(0, 101, 25))
        return steps.encode("utf-8")
    if kind < 0.20:
        return style.color("0;33", f"WARNING: {words}").encode("utf-8")
    if kind < 0.24:
        return style.color("31;1", f"ERROR: {words} (exit status {rng.randint(1, 2)})").encode("utf-8")
    if kind < 0.30:
        return f"  ✔ {words} — {rng.randint(1, 999)} ms (ünïcödé)".encode("utf-8")
    if kind < 0.33 and invalid_utf8:
        junk = rng.choice(_INVALID_UTF8)
        return b"binary output: " + junk + words.encode("ascii") + rng.choice(_INVALID_UTF8)
    return f"{rng.randint(1, 99999):>6} {words} ({rng.random():.4f}s)".encode("utf-8")
