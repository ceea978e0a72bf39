"""LogScanner: job sections and failure details from a streamed job log.

Logs used (formats and where they come from):
- ``/work/shared/gitlab-samples/trace_runner11.9_success.log``: a real GitLab.com trace, runner 11.9,
  no timestamps, markers glued several per line (``build_script`` era, before ``step_script``).
- ``tests/logs/runner17.4_failed.log``: a failed runner 17.4 job, rebuilt byte-exact in the runner's
  syntax (``\\r\\e[0K`` after each marker, colour resets at line starts) from the real mesa log quoted
  in freedesktop mesa ``bin/ci/test/test_pipeline_message.py`` (the copy there lost its ``\\r`` and ESC
  bytes): nested user sections in ``step_script``, after_script failing with the runner's WARNING,
  ``upload_artifacts_on_failure``, ``cleanup_file_variables``, then ``ERROR: Job failed: exit code 1``.
- ``tests/logs/runner17.5_timestamps_failed.log``: the same job with ``FF_TIMESTAMPS`` prefixes as
  gitlab-runner's ``common/buildlogger/internal/timestamper/timestamper.go`` writes them: 32-byte
  ``<RFC 3339 µs>Z <2 hex stream id><O|E><' '|'+'>`` header, stderr lines ``00E``, and writes holding
  ``\\r`` without ``\\n`` flushed as their own line, followed by ``+`` continuation lines (progress
  redraws, a ``section_end`` marker glued to the next ``section_start``).
- Simulator logs (``gitlab_log_shipper/sim/logs.py``): runner 17.5 style, with and without timestamps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gitlab_log_shipper.document.sections import LogScanner, ScanResult
from gitlab_log_shipper.sim.logs import LogSpec

from repo_paths import TESTS_DIR

SAMPLE = Path("/work/shared/gitlab-samples/trace_runner11.9_success.log")
LOGS = TESTS_DIR / "logs"
FAILED = LOGS / "runner17.4_failed.log"
FAILED_TS = LOGS / "runner17.5_timestamps_failed.log"
K = "\x1b[0K"


def scan(data: bytes, chunk: int | None = None, **kwargs: int) -> ScanResult:
    scanner = LogScanner(**kwargs)
    if chunk is None:
        scanner.feed(data)
    else:
        for i in range(0, len(data), chunk):
            scanner.feed(data[i : i + chunk])
    return scanner.finish()


def start(ts: int, name: str, opts: str = "") -> str:
    return f"section_start:{ts}:{name}{opts}\r{K}"


def end(ts: int, name: str) -> str:
    return f"section_end:{ts}:{name}\r{K}"


# -- real logs ------------------------------------------------------------------------------------


def test_real_gitlab_com_trace_runner_11_9() -> None:
    result = scan(SAMPLE.read_bytes())
    got = [(s["name"], s["duration"], s["parent"]) for s in result.sections]
    # Times read off the markers in the sample (e.g. prepare_script 1554309375 -> 1554309377).
    assert got == [
        ("prepare_script", 2, None),
        ("get_sources", 7, None),
        ("restore_cache", 4, None),
        ("download_artifacts", 3, None),
        ("build_script", 3, None),
        ("after_script", 2, None),
        ("archive_cache", 2, None),
        ("upload_artifacts_on_success", 10, None),
    ]
    first = result.sections[0]
    assert first["started_at"] == "2019-04-03T16:36:15Z" and first["finished_at"] == "2019-04-03T16:36:17Z"
    assert first["header"].startswith("Running on runner-8a6210b8-project-13083-concurrent-0 via")
    assert result.sections[1]["header"] == "Reinitialized existing Git repository in /builds/gitlab-org/gitlab-ce/.git/"
    assert result.sections[2]["header"] == ""  # restore_cache: its end follows on the same line
    assert result.sections[4]["header"] == "$ source scripts/utils.sh"  # colour codes removed
    assert all("unterminated" not in s for s in result.sections)
    assert result.exit_code is None and result.excerpt is None  # a succeeded job


@pytest.mark.parametrize("path", [FAILED, FAILED_TS], ids=["plain", "timestamps"])
def test_failed_runner_17_job(path: Path) -> None:
    result = scan(path.read_bytes())
    got = [(s["name"], s["parent"], s["duration"]) for s in result.sections]
    assert got == [
        ("prepare_executor", None, 14),
        ("prepare_script", None, 1),
        ("get_sources", None, 6),
        ("step_script", None, 652),
        ("lava_submit", "step_script", 640),
        ("job_data", "lava_submit", 629),
        ("after_script", None, 242),
        ("upload_artifacts_on_failure", None, 2),
        ("cleanup_file_variables", None, 0),
    ]
    assert result.sections[4]["header"] == "Submitting LAVA job"  # [collapsed=true] stripped from the name
    assert result.sections[5]["header"] == "Job data ✔"
    assert result.exit_code == 1
    excerpt = result.excerpt
    assert excerpt is not None
    # The failing section is step_script (after_script's failure is only a warning), its last lines
    # before the runner's bookkeeping; no ANSI code, marker or timestamp prefix left.
    assert excerpt.splitlines()[-1] == "[01:54] ERROR: unknown-section: ret code: 1"
    assert "error_msg: something useful" in excerpt
    assert excerpt.splitlines()[0] == 'Executing "step_script" stage of the job script'
    for absent in ("after_script", "Uploading artifacts", "zstd", "Job failed", "\x1b", "section_", "\r", "2024-12-20T"):
        assert absent not in excerpt


def test_timestamped_log_gives_the_same_as_plain() -> None:
    plain, stamped = scan(FAILED.read_bytes()), scan(FAILED_TS.read_bytes())
    assert plain == stamped


def test_timestamp_continuations_join_progress_redraws() -> None:
    # get_sources' progress line is three '+'-joined physical lines; the job dies there (ERROR line
    # with its own prefix). The excerpt shows that line once, in its last state, no prefix.
    data = FAILED_TS.read_bytes()
    cut = data.index(b"\n", data.index(b"00O+Receiving objects: 100%")) + 1
    log = data[:cut] + b"2024-12-20T23:08:31.300000Z 00E \x1b[31;1mERROR: Job failed: exit code 128\n"
    result = scan(log)
    assert result.exit_code == 128
    assert result.excerpt == (
        "Getting source from Git repository\nFetching changes with git depth set to 20...\n"
        "Receiving objects: 100% (12/12), done."
    )
    assert result.sections[-1]["name"] == "get_sources" and result.sections[-1]["unterminated"] is True


@pytest.mark.parametrize("timestamps", [False, True])
def test_simulator_logs_both_formats(timestamps: bool) -> None:
    spec = LogSpec(300_000, seed=11, timestamps=timestamps, invalid_utf8=True)
    result = scan(spec.read_all(), chunk=8191)
    names = [s["name"] for s in result.sections]
    assert names[:4] == ["prepare_executor", "prepare_script", "get_sources", "step_script"]
    assert names[-1] == "cleanup_file_variables"
    assert all(s["parent"] == "step_script" for s in result.sections if s["name"].startswith("step_") and s["name"] != "step_script")
    assert all("unterminated" not in s for s in result.sections)
    step = result.sections[3]
    assert step["header"] == 'Executing "step_script" stage of the job script' and step["duration"] == 7197
    assert result.exit_code is None


def test_log_cut_by_size_limit_leaves_sections_unterminated() -> None:
    spec = LogSpec(300_000, seed=2)
    data = spec.read_all()[:150_000]  # as MAX_JOB_LOG_BYTES cuts it
    result = scan(data, chunk=4096)
    open_ = [s for s in result.sections if s.get("unterminated")]
    assert [s["name"] for s in open_][0] == "step_script"
    assert all(s["finished_at"] is None and s["duration"] is None for s in open_)


# -- marker semantics -----------------------------------------------------------------------------


def test_nested_sections_and_an_enclosing_end_closing_inner_ones() -> None:
    log = (
        f"{start(100, 'step_script')}{K}Executing\n"
        f"{start(101, 'outer', '[collapsed=true]')}outer header\n"
        f"{start(102, 'inner')}inner header\n"
        "work\n"
        f"{end(110, 'outer')}\n"  # inner was never ended: the outer end closes it too
        f"{end(120, 'step_script')}\n"
    )
    result = scan(log.encode())
    assert [(s["name"], s["parent"], s["finished_at"], s["duration"]) for s in result.sections] == [
        ("step_script", None, "1970-01-01T00:02:00Z", 20),
        ("outer", "step_script", "1970-01-01T00:01:50Z", 9),
        ("inner", "outer", "1970-01-01T00:01:50Z", 8),
    ]


def test_malformed_markers_are_ignored() -> None:
    log = (
        f"{start(100, 'good')}header\n"
        "section_start:abc:bad_number\r\x1b[0K\n"
        "section_start:100:\r\x1b[0Kempty name\n"
        "section_start:100:no_suffix text\n"  # without \r\e[0K it is text (GitLab's regex)
        "section_start:100:bad opts[collapsed]\r\x1b[0K\n"
        f"{start(99999999999999, 'far_future')}\n"  # beyond any date: ignored
        f"{end(105, 'never_started')}\n"
        f"section_end:1x:good\r{K}\n"
        f"{end(107, 'good')}\n"
        f"{end(108, 'good')}\n"  # a second end: nothing open by that name any more
    )
    result = scan(log.encode())
    assert result.sections == [{
        "name": "good", "started_at": "1970-01-01T00:01:40Z", "finished_at": "1970-01-01T00:01:47Z",
        "duration": 7, "header": "header", "parent": None,
    }]


def test_max_sections_counts_the_rest() -> None:
    log = "".join(f"{start(i, f's{i}')}{end(i + 1, f's{i}')}\n" for i in range(50))
    result = scan(log.encode(), max_sections=10)
    assert [s["name"] for s in result.sections] == [f"s{i}" for i in range(10)]
    assert result.sections_dropped == 40


def test_header_is_bounded_and_valid_utf8() -> None:
    log = f"{start(1, 'a')}".encode() + b"\x1b[32;1m" + b"\xff\xfe caf\xc3\xa9 " + b"x" * 5000 + b"\n"
    header = scan(log).sections[0]["header"]
    assert header.startswith("\ufffd\ufffd café x")
    assert len(header) == 500


# -- failure details ------------------------------------------------------------------------------


def failed_log(script_lines: list[bytes], error: bytes = b"ERROR: Job failed: exit code 1") -> bytes:
    return b"".join([
        f"{start(10, 'prepare_script')}{K}Preparing environment\n".encode(),
        b"Running on runner-1\n",
        f"{end(11, 'prepare_script')}{start(11, 'step_script')}{K}Executing\n".encode(),
        *[line + b"\n" for line in script_lines],
        f"{end(20, 'step_script')}{start(20, 'cleanup_file_variables')}{K}Cleaning up\n".encode(),
        f"{end(21, 'cleanup_file_variables')}{K}\x1b[31;1m".encode() + error + b"\n\x1b[0;m\n",
    ])


def test_excerpt_is_bounded_in_lines_and_bytes() -> None:
    lines = [f"line {i:04d} ".encode() + b"y" * 90 for i in range(500)]
    result = scan(failed_log(lines), excerpt_lines=40, excerpt_bytes=8192)
    got = result.excerpt.splitlines()  # type: ignore[union-attr]
    assert len(got) == 40 and got[-1].startswith("line 0499") and got[0].startswith("line 0460")
    small = scan(failed_log(lines), excerpt_lines=40, excerpt_bytes=1000).excerpt
    assert small is not None and len(small.encode()) <= 1000
    assert small.splitlines()[0].startswith("line 04")  # cut at a line start
    assert small.splitlines()[-1].startswith("line 0499")


def test_excerpt_cleans_ansi_progress_and_invalid_utf8() -> None:
    lines = [
        b"\x1b[32;1m$ make\x1b[0;m",
        b"Downloading  0%\rDownloading 50%\rDownloading 100%",
        b"binary \xff\xfe output \xe2\x82",
        b"  indented \xc3\xa9rror",
    ]
    excerpt = scan(failed_log(lines)).excerpt
    assert excerpt == "Executing\n$ make\nDownloading 100%\nbinary \ufffd\ufffd output \ufffd\n  indented érror"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (b"ERROR: Job failed: exit code 1", 1),
        (b"ERROR: Job failed: command terminated with exit code 137", 137),  # Kubernetes executor
        (b"ERROR: Job failed (system failure): prepare environment: exit status 1", None),
        (b"ERROR: Job failed: execution took longer than 1h0m0s seconds", None),
    ],
)
def test_exit_code_from_the_closing_line(error: bytes, code: int | None) -> None:
    result = scan(failed_log([b"$ false"], error))
    assert result.exit_code == code
    assert result.excerpt == "Executing\n$ false"


def test_job_failed_text_inside_output_is_not_the_runners_line() -> None:
    result = scan(failed_log([b"echo ERROR: Job failed: exit code 3"], b"Job succeeded"))
    assert result.exit_code is None and result.excerpt is None


def test_failure_in_unterminated_script_section() -> None:
    # A timeout cut: the runner writes its ERROR line while step_script is still open.
    log = f"{start(1, 'step_script')}{K}Executing\n$ sleep 9999\n\x1b[31;1mERROR: Job failed: execution took longer than 1h0m0s seconds\n"
    result = scan(log.encode())
    assert result.excerpt == "Executing\n$ sleep 9999" and result.exit_code is None
    assert result.sections[0]["unterminated"] is True


def test_log_without_sections_takes_the_last_lines() -> None:
    log = b"Running with gitlab-runner 10.0\n$ false\nERROR: Job failed: exit code 2\n"
    result = scan(log)
    assert result.exit_code == 2 and result.excerpt == "Running with gitlab-runner 10.0\n$ false"


# -- streaming ------------------------------------------------------------------------------------


_CORPUS = [
    SAMPLE.read_bytes(),
    FAILED.read_bytes(),
    FAILED_TS.read_bytes(),
    LogSpec(40_000, seed=4, timestamps=True, invalid_utf8=True).read_all(),
]
_EXPECTED = [scan(data) for data in _CORPUS]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(_CORPUS) - 1), data=st.data())
def test_any_chunking_gives_the_same_result(which: int, data: st.DataObject) -> None:
    log = _CORPUS[which]
    cuts = sorted(data.draw(st.sets(st.integers(1, len(log) - 1), max_size=200)))
    scanner = LogScanner()
    prev = 0
    for cut in [*cuts, len(log)]:
        scanner.feed(log[prev:cut])
        prev = cut
    assert scanner.finish() == _EXPECTED[which]


@pytest.mark.parametrize("which", range(len(_CORPUS)))
def test_one_byte_chunks(which: int) -> None:
    assert scan(_CORPUS[which], chunk=1) == _EXPECTED[which]


def test_splits_inside_marker_prefix_and_utf8() -> None:
    log = FAILED_TS.read_bytes()
    for needle in (b"section_st", b"\r\x1b[0K", b"00O+", b"2024-12-20T23:08:3", "✔".encode()[:2]):
        at = log.index(needle) + len(needle)
        scanner = LogScanner()
        scanner.feed(log[:at])
        scanner.feed(log[at:])
        assert scanner.finish() == _EXPECTED[2], needle


def test_restart_after_partial_feed_equals_fresh_scanner() -> None:
    log = FAILED_TS.read_bytes()
    scanner = LogScanner()
    scanner.feed(log[: len(log) // 2])
    scanner.restart()
    for i in range(0, len(log), 333):
        scanner.feed(log[i : i + 333])
    assert scanner.finish() == _EXPECTED[2]


def test_long_line_without_newline_is_bounded_and_chunking_independent() -> None:
    body = (b"x" * 999 + b"\r") * 300  # one 300 KB progress "line"
    log = (
        f"{start(1, 'step_script')}{K}Executing\n".encode() + body
        + f"{start(2, 'inner')}inner header".encode() + body + f"{end(3, 'inner')}".encode() + body
        + b"\nlast\n" + f"{end(4, 'step_script')}\x1b[31;1mERROR: Job failed: exit code 5\n".encode()
    )
    expected = scan(log)
    assert [s["name"] for s in expected.sections] == ["step_script", "inner"]
    # The header is what a terminal shows of its line: the last \r redraw in the bounded window.
    assert expected.sections[1]["duration"] == 1 and expected.sections[1]["header"] == "x" * 500
    assert expected.exit_code == 5 and expected.excerpt is not None and expected.excerpt.endswith("last")
    for chunk in (1000, 4096, 65536):
        scanner = LogScanner()
        for i in range(0, len(log), chunk):
            scanner.feed(log[i : i + chunk])
            assert len(scanner._s.carry) < 80 * 1024 + chunk  # bounded, not the whole line
            assert len(scanner._s.tail) <= scanner._tail_max
        assert scanner.finish() == expected


@pytest.mark.parametrize("which", range(len(_CORPUS)))
def test_a_job_that_did_not_fail_gets_the_same_sections_and_no_failure_details(which: int) -> None:
    # failure=False is what the shipper asks for a job whose status is not "failed": nothing is recorded
    # for an excerpt and no "Job failed" line is looked for, but the sections are the same.
    result = scan(_CORPUS[which], chunk=977, failure=False)
    assert result.sections == _EXPECTED[which].sections
    assert result.sections_dropped == _EXPECTED[which].sections_dropped
    assert (result.exit_code, result.excerpt) == (None, None)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"section_", b"section_start:1:a\r\x1b[0K", b"section_end:2:a\r\x1b[0K", b"x",
                                 b"\n", b"ERROR: Job failed: exit code 3", b"section_start:9:b[collapsed=true]\r\x1b[0K",
                                 b"\r", b"\x1b[0K", b"section_start:"]), max_size=40),
       st.integers(0, 30), st.integers(0, 30))
def test_find_all_finds_what_finditer_finds(pieces: list[bytes], start: int, shorten: int) -> None:
    # The scanner searches markers with bytes.find + match (faster than the regex's own scan): same matches.
    from gitlab_log_shipper.document.sections import _FAILED_RE, _MARKER_RE, _find_all

    block = b"".join(pieces)
    start = min(start, len(block))
    end = max(start, len(block) - shorten)
    for literal, pattern in ((b"section_", _MARKER_RE), (b"ERROR: Job failed", _FAILED_RE)):
        got = [(at, m.group(0)) for at, m, _ in _find_all(block, literal, start, end, pattern, True)]
        assert got == [(m.start(), m.group(0)) for m in pattern.finditer(block, start, end)]
