"""Issue 11 case 10: a job log that trickles in must not hold a worker (or the daemon) for ever, and
MAX_JOB_LOG_BYTES applies while the log streams in, not after a 10 GB download filled the disk.

Everything runs over real HTTP on loopback: the GitLab simulator, subclassed here so that chosen jobs'
logs trickle (a few bytes at a time, each read well within GITLAB_TIMEOUT, so only an overall deadline
can end the download).
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gitlab_log_shipper.config.settings import load_config
from gitlab_log_shipper.document import spool
from gitlab_log_shipper.document.payload import truncate_log
from gitlab_log_shipper.document.redact import Redactor, parse_patterns
from gitlab_log_shipper.document.spool import CappedLog
from gitlab_log_shipper.errors import GitLabSourceError
from gitlab_log_shipper.gitlab.rest import GitLabSource
from gitlab_log_shipper.shipper import FAILED, SHIPPED, Shipper
from gitlab_log_shipper.sim.gitlab import Faults, GitLabSimulator
from gitlab_log_shipper.sim.logs import LogSpec
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import make_env, within

TRICKLE_EVERY = 0.2  # seconds between two trickled bytes: far below GITLAB_TIMEOUT=1


class TrickleSimulator(GitLabSimulator):
    """The simulator, but the logs of the jobs in :attr:`slow` trickle until :attr:`release` is set.

    Modes (how a proxy in front of GitLab could stall): ``length`` promises a huge Content-Length and
    sends a byte at a time; ``chunked`` announces a 1 MiB chunk and sends it a byte at a time (a client
    that reads 256 KiB blocks until they all came); ``chunk-line`` trickles the chunk-size line itself, so
    the HTTP client sits in a readline that no check between reads can interrupt.
    """

    def __init__(self, world: World, **kwargs: Any) -> None:
        super().__init__(world, **kwargs)
        self.slow: dict[int, str] = {}
        self.release = threading.Event()
        self.trickling = 0

    def _serve_trace(self, handler: Any, args: list[str], rate_headers: dict[str, str]) -> None:
        mode = self.slow.get(int(args[1]))
        if mode is None or self.release.is_set():
            super()._serve_trace(handler, args, rate_headers)
            return
        headers = {**handler._common_headers(), **rate_headers, "Content-Type": "text/plain"}
        if mode == "length":
            headers["Content-Length"] = str(10**10)
        else:
            headers["Transfer-Encoding"] = "chunked"
        handler.send_head_only(200, headers)
        handler.close_connection = True
        if mode == "chunked":
            handler.wfile.write(b"100000\r\n")
        byte = b"0" if mode == "chunk-line" else b"x"
        with self._stats_lock:
            self.trickling += 1
        try:
            while not self.release.wait(TRICKLE_EVERY):
                handler.wfile.write(byte)
                handler.wfile.flush()
        except OSError:
            pass  # the client gave up: what the test wants
        finally:
            with self._stats_lock:
                self.trickling -= 1


@pytest.fixture
def trickle_sim(world: World) -> Iterator[TrickleSimulator]:
    with TrickleSimulator(world) as sim:
        try:
            yield sim
        finally:
            sim.release.set()  # let a download that did not give up end, so the server can stop


def _config(tmp_path: Path, sim: GitLabSimulator, **extra: str) -> Any:
    return load_config(None, {**make_env(tmp_path, sim, None).values, "GITLAB_TIMEOUT": "1", **extra})


# -- the deadline -------------------------------------------------------------------------------------


def test_job_log_timeout_is_a_duration_with_a_default() -> None:
    base = {"GITLAB_URL": "https://gitlab.example.com", "GITLAB_TOKEN": "glpat-0123456789abcdef"}
    assert load_config(None, base).job_log_timeout == 600.0
    assert load_config(None, {**base, "JOB_LOG_TIMEOUT": "30s"}).job_log_timeout == 30.0
    assert load_config(None, {**base, "JOB_LOG_TIMEOUT": "5m"}).job_log_timeout == 300.0
    from gitlab_log_shipper.errors import ConfigError
    with pytest.raises(ConfigError, match="JOB_LOG_TIMEOUT"):
        load_config(None, {**base, "JOB_LOG_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="JOB_LOG_TIMEOUT"):
        load_config(None, {**base, "JOB_LOG_TIMEOUT": "0"})


@pytest.mark.parametrize("mode", ["length", "chunked", "chunk-line"])
def test_a_trickling_log_fails_within_job_log_timeout(tmp_path: Path, world: World, trickle_sim: TrickleSimulator,
                                                      mode: str) -> None:
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("slow", "test", "success", log="done\n")])
    [job_id] = pipeline.job_ids
    trickle_sim.slow[job_id] = mode
    config = _config(tmp_path, trickle_sim, JOB_LOG_TIMEOUT="2s")
    source = GitLabSource(config)
    out = tmp_path / "job.log"
    try:
        with open(out, "w+b") as sink:
            started = time.monotonic()
            error = within(15, lambda: source.fetch_trace(project.id, job_id, sink, timeout=config.job_log_timeout))
            elapsed = time.monotonic() - started
    finally:
        source.close()
    assert isinstance(error, GitLabSourceError), error
    assert not error.gone  # tried again on a later cycle, never dropped
    assert f"log of job {job_id} (project {project.id}): log download exceeded JOB_LOG_TIMEOUT=2s" in str(error)
    assert 2.0 <= elapsed <= 2.0 + config.gitlab_timeout + 0.5, elapsed
    assert trickle_sim.counters["trace"] == 1  # a deadline is not a broken stream: no second attempt
    assert out.stat().st_size < 100


def test_a_trickling_log_delays_only_its_own_pipeline(tmp_path: Path, world: World,
                                                      trickle_sim: TrickleSimulator) -> None:
    slow_project = world.add_project("team/slow")
    fast_project = world.add_project("team/fast")
    slow = world.add_pipeline(slow_project.id, jobs=[JobSpec("slow", "test", "success", log="slow log\n")])
    fast = world.add_pipeline(fast_project.id, jobs=[JobSpec("fast", "test", "success", log="fast log\n")])
    trickle_sim.slow[slow.job_ids[0]] = "length"
    # One worker per pool: before the fix the slow project held the only one, and the cycle never ended.
    config = _config(tmp_path, trickle_sim, JOB_LOG_TIMEOUT="2s", CONCURRENCY="1")
    shipper = Shipper(config)
    try:
        started = time.monotonic()
        report = within(20, shipper.run_cycle)
        elapsed = time.monotonic() - started
        outcomes = {r.pipeline_id: r for r in report.results}
        assert outcomes[fast.id].outcome == SHIPPED
        assert outcomes[slow.id].outcome == FAILED
        assert "exceeded JOB_LOG_TIMEOUT=2s" in outcomes[slow.id].reason
        assert elapsed <= 2.0 + config.gitlab_timeout + 3, elapsed
        assert [p.name for p in config.log_output_dir.glob("*/pipeline_*")] == [f"pipeline_{fast.id}"]

        trickle_sim.release.set()  # GitLab serves the log normally again: the next cycle ships it
        report = within(20, shipper.run_cycle)
        assert [(r.pipeline_id, r.outcome) for r in report.results] == [(slow.id, SHIPPED)]
        [log_file] = config.log_output_dir.glob(f"*/pipeline_{slow.id}/job_*_slow.log")
        assert log_file.read_bytes() == b"slow log\n"
    finally:
        shipper.close()


# -- the size cap while streaming ---------------------------------------------------------------------


def _disk_use(root: Path) -> int:
    """Bytes the files under ``root`` occupy on disk (allocated blocks: a sparse file counts what it holds)."""
    used = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                used += os.stat(os.path.join(folder, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return used


class _SpoolWatcher:
    """Watches how much disk the spool takes: sampled from another thread (whatever writes the files),
    and measured after every write of spool.CappedLog (so a short peak while the cut is assembled is
    not missed between two samples)."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.peak = 0
        self.samples = 0
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        real_pwrite = spool._pwrite

        def measured_pwrite(fd: int, data: memoryview, offset: int) -> None:
            real_pwrite(fd, data, offset)
            self.writes += 1
            self.peak = max(self.peak, _disk_use(self.root))

        monkeypatch.setattr(spool, "_pwrite", measured_pwrite)

    def __enter__(self) -> "_SpoolWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _disk_use(self.root))
            self.samples += 1
            time.sleep(0.001)


def _cut_reference(tmp_path: Path, data_chunks: Iterator[bytes], keep: int) -> bytes:
    """What ``truncate_log`` makes of the whole log (how the shipper cut logs before this change)."""
    full, cut = tmp_path / "reference.full", tmp_path / "reference.cut"
    with open(full, "wb") as out:
        for chunk in data_chunks:
            out.write(chunk)
    if not truncate_log(full, cut, keep, "MAX_JOB_LOG_BYTES"):
        return full.read_bytes()
    full.unlink()
    return cut.read_bytes()


def test_a_50_mb_log_never_takes_more_than_the_cap_in_the_spool(tmp_path: Path, world: World,
                                                                trickle_sim: TrickleSimulator,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    project = world.add_project("team/app")
    spec = LogSpec(50_000_000, seed=11)
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("big", "test", "success", log=spec)])
    config = _config(tmp_path, trickle_sim, MAX_JOB_LOG_BYTES="1MiB", GITLAB_TIMEOUT="10")
    shipper = Shipper(config)
    try:
        with _SpoolWatcher(shipper.spool_root, monkeypatch) as watcher:
            report = within(60, shipper.run_cycle)
    finally:
        shipper.close()
    assert [(r.pipeline_id, r.outcome, r.log_bytes) for r in report.results] == [(pipeline.id, SHIPPED, 50_000_000)]
    assert watcher.samples > 20 and watcher.writes > 150, (watcher.samples, watcher.writes)
    # the cap, plus one 256 KiB chunk being moved while the cut is written, plus block rounding
    assert watcher.peak <= 1024**2 + 256 * 1024 + 64 * 1024, watcher.peak
    [log_file] = config.log_output_dir.glob(f"*/pipeline_{pipeline.id}/job_*_big.log")
    assert log_file.read_bytes() == _cut_reference(tmp_path, spec.iter_chunks(), 1024**2)


def test_a_stream_broken_midway_is_fetched_again_and_cut_the_same(tmp_path: Path, world: World) -> None:
    project = world.add_project("team/app")
    spec = LogSpec(3_000_000, seed=3)
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("big", "test", "success", log=spec)])
    # 2.5 MB arrive, then GitLab hangs up: the ring already wrapped when the second attempt starts over
    with GitLabSimulator(world, faults=Faults(drop_trace_after=2_500_000)) as sim:
        config = _config(tmp_path, sim, MAX_JOB_LOG_BYTES="1MiB")
        shipper = Shipper(config)
        try:
            report = shipper.run_cycle()
        finally:
            shipper.close()
        assert sim.faults_served["dropped_trace"] == 1 and sim.counters["trace"] == 2
    assert [(r.outcome, r.log_bytes) for r in report.results] == [(SHIPPED, 3_000_000)]
    [log_file] = config.log_output_dir.glob(f"*/pipeline_{pipeline.id}/job_*_big.log")
    assert log_file.read_bytes() == _cut_reference(tmp_path, spec.iter_chunks(), 1024**2)


def test_secrets_are_masked_before_the_cut(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    """Masking changes the log's length, so the cut is made on the masked log, as before: a secret is
    never split by the cut into two halves that no longer match."""
    secret = "glpat-" + "A1b2C3d4E5f6G7h8I9j0K"
    lines = [f"line {i} {'x' * (i % 70)}\n" for i in range(40_000)]
    lines[10] = f"export TOKEN={secret}\n"
    lines[-10] = f"curl -H 'PRIVATE-TOKEN: {secret}'\n"
    raw = "".join(lines).encode()
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("job", "test", "success", log=raw)])
    config = _config(tmp_path, gitlab_sim, MAX_JOB_LOG_BYTES="64K", LOG_REDACT_PATTERNS="default")
    shipper = Shipper(config)
    try:
        report = shipper.run_cycle()
    finally:
        shipper.close()
    assert [(r.outcome, r.log_bytes) for r in report.results] == [(SHIPPED, len(raw))]
    [log_file] = config.log_output_dir.glob(f"*/pipeline_{pipeline.id}/job_*_job.log")
    masked, count = Redactor(parse_patterns("default")).redact_bytes(raw)
    assert count == 2
    shipped = log_file.read_bytes()
    assert shipped == _cut_reference(tmp_path, iter([masked]), 64 * 1024)
    assert secret.encode() not in shipped and shipped.count(b"[MASKED]") == 2


# -- the streamed cut equals truncate_log ---------------------------------------------------------------


@st.composite
def _logs(draw: st.DrawFn) -> tuple[bytes, int, list[int]]:
    """A log (lines of random lengths, some longer than the 4096-byte newline search), a cap, a chunking."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    size = draw(st.integers(0, 40_000))
    line = draw(st.sampled_from([3, 40, 500, 5000, 100_000]))  # mean line length
    parts, total = [], 0
    while total < size:
        text = bytes([0x61 + rng.randrange(26)]) * rng.randrange(2 * line) + b"\n"
        parts.append(text)
        total += len(text)
    data = b"".join(parts)[:size]
    keep = draw(st.one_of(st.integers(0, 64), st.integers(0, 50_000)))
    chunks = draw(st.lists(st.integers(1, 20_000), min_size=1, max_size=8))
    return data, keep, chunks


def _feed(sink: CappedLog, data: bytes, chunks: list[int]) -> None:
    pos, i = 0, 0
    while pos < len(data):
        step = chunks[i % len(chunks)]
        sink.write(data[pos:pos + step])
        pos += step
        i += 1


@settings(max_examples=300, deadline=None)
@given(_logs(), st.booleans())
def test_the_streamed_cut_equals_truncate_log(case: tuple[bytes, int, list[int]], restart: bool) -> None:
    data, keep, chunks = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "job.log"
        with CappedLog(path, keep, "MAX_JOB_LOG_BYTES") as sink:
            if restart:  # a broken first attempt leaves bytes behind; the retry starts over
                _feed(sink, data[: len(data) // 2] + b"garbage\n" * 100, chunks[::-1])
                sink.restart()
            _feed(sink, data, chunks)
            truncated = sink.finish()
        source, expected = folder / "source.log", folder / "expected.log"
        source.write_bytes(data)
        assert truncated == truncate_log(source, expected, keep, "MAX_JOB_LOG_BYTES")
        assert path.read_bytes() == (expected.read_bytes() if truncated else data)
        assert sorted(p.name for p in folder.iterdir()) == sorted(["job.log", "source.log", *(["expected.log"] * truncated)])


def test_a_log_over_the_cap_whose_masked_form_fits_ships_whole(tmp_path: Path, world: World,
                                                               gitlab_sim: GitLabSimulator) -> None:
    """The cap applies to the masked log. Before, a raw log just over MAX_JOB_LOG_BYTES whose masked form
    fitted failed its pipeline on every cycle (the cut file that truncate_log did not write was renamed)."""
    secret_line = "token glpat-" + "Z" * 30 + "\n"  # 43 bytes, 15 once masked
    filler = "".join(f"step {i:05d} ok\n" for i in range(4000))  # 56,000 bytes
    raw = (secret_line * 300 + filler).encode()[: 64 * 1024 + 1000]
    assert len(raw) > 64 * 1024
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("job", "test", "success", log=raw)])
    config = _config(tmp_path, gitlab_sim, MAX_JOB_LOG_BYTES="64K", LOG_REDACT_PATTERNS="default")
    shipper = Shipper(config)
    try:
        report = shipper.run_cycle()
    finally:
        shipper.close()
    assert [(r.outcome, r.log_bytes) for r in report.results] == [(SHIPPED, len(raw))], report.results
    [log_file] = config.log_output_dir.glob(f"*/pipeline_{pipeline.id}/job_*_job.log")
    masked, _ = Redactor(parse_patterns("default")).redact_bytes(raw)
    assert len(masked) < 64 * 1024 and log_file.read_bytes() == masked
