"""Adversarial review of issue 11 (``git diff ea99c49..``): defects found in the new design, each proven by a
test that fails on the code as reviewed. Everything runs over real HTTP on loopback (the GitLab simulator and
the receiver); interleavings inside a cycle use the simulator's request hook (``GitLabSimulator.on_request``).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest

from gitlab_log_shipper.config import load_config
from gitlab_log_shipper.errors import GitLabSourceError
from gitlab_log_shipper.shipper import Shipper
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World
from gitlab_log_shipper.source import GitLabSource

from shipper_helpers import ManualClock, by_pipeline, documents, make_env, within

T0 = datetime(2026, 11, 2, 9, 0, 0, tzinfo=timezone.utc)


Clock = ManualClock


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def world(clock: Clock) -> World:
    return World(clock=clock)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as rec:
        yield rec


# -- 2. JOB_LOG_TIMEOUT does not cover the answer's head ------------------------------------------------


class HeadTrickleSimulator(GitLabSimulator):
    """The simulator, but the logs of the jobs in :attr:`slow` answer with a status line and then trickle a header
    line, a byte every 0.2 s (well within GITLAB_TIMEOUT=1), until :attr:`release` is set: a proxy that stalls
    the same way as the body trickles test_trace_limits covers, only one step earlier."""

    def __init__(self, world: World, **kwargs: Any) -> None:
        super().__init__(world, **kwargs)
        self.slow: set[int] = set()
        self.release = threading.Event()

    def _serve_trace(self, handler: Any, args: list[str], rate_headers: dict[str, str]) -> None:
        if int(args[1]) not in self.slow or self.release.is_set():
            super()._serve_trace(handler, args, rate_headers)
            return
        handler.close_connection = True
        try:
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Slow: ")
            handler.wfile.flush()
            while not self.release.wait(0.2):
                handler.wfile.write(b"x")
                handler.wfile.flush()
        except OSError:
            pass  # the client gave up: what the test wants


def test_job_log_timeout_bounds_a_log_whose_headers_trickle(tmp_path: Path, world: World) -> None:
    """``fetch_trace`` promises that JOB_LOG_TIMEOUT "bounds the whole download", but the deadline is only checked
    before the request and the watchdog is armed after ``http_get`` returned, i.e. after the status line and the
    headers came. A GitLab or proxy that trickles its headers holds the trace worker (and, through
    ``_all_results``, the project's poll and the whole cycle) for ever: GITLAB_TIMEOUT is per read."""
    project = world.add_project("team/slow")
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("slow", "test", "success", log="slow log\n")])
    with HeadTrickleSimulator(world) as sim:
        sim.slow.add(pipeline.job_ids[0])
        try:
            config = load_config(None, {**make_env(tmp_path, sim, None).values, "GITLAB_TIMEOUT": "1",
                                        "JOB_LOG_TIMEOUT": "2s"})
            source = GitLabSource(config)
            out = tmp_path / "trace.log"
            try:
                with open(out, "wb") as sink:
                    started = time.monotonic()
                    outcome = within(8, lambda: source.fetch_trace(project.id, pipeline.job_ids[0], sink,
                                                                     timeout=config.job_log_timeout))
                    elapsed = time.monotonic() - started
            finally:
                source.close()
            assert isinstance(outcome, GitLabSourceError), outcome
            assert "JOB_LOG_TIMEOUT" in str(outcome)
            assert elapsed <= 2.0 + config.gitlab_timeout + 1.0, elapsed
        finally:
            sim.release.set()


# -- 3. dual mode: a file-output failure is never made good ---------------------------------------------


def test_dual_mode_writes_the_files_once_the_output_folder_works_again(tmp_path: Path, world: World, clock: Clock,
                                                                       receiver: Receiver) -> None:
    """Issue 11 case 13 made dual mode POST when the files cannot be written; but the pipeline is then recorded
    as shipped (``Shipper._deliver``: ``delivery.send`` → SHIPPED, the finish recorded, the retry entry cleared),
    so its files are never written: once the folder works again the row is UNCHANGED and skipped. In dual mode
    the files are an output the operator asked for (OPERATIONS.md calls them the backup): one full disk or
    wrong owner for one cycle loses them for good, silently (the cycle even counts as complete, exit 0)."""
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, jobs=[JobSpec("build", log="ok\n")])
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the output folder should be")
    output = blocked / "out"
    with GitLabSimulator(world) as sim:
        values = make_env(tmp_path, sim, receiver, INITIAL_LOOKBACK="1h", POLL_OVERLAP="5m", POLL_INTERVAL="60",
                          API_POST_SAVE_TO_FILE="true", LOG_OUTPUT_DIR=str(output)).values
        shipper = Shipper(load_config(None, values), clock=clock)
        try:
            first = shipper.run_cycle()
            assert pipeline.id in by_pipeline(documents(receiver))  # the API got it (case 13)
            blocked.unlink()  # the operator fixes the folder
            for _ in range(3):
                clock.advance(minutes=1)
                shipper.run_cycle()
        finally:
            shipper.close()
    written = sorted(p.name for p in output.glob("*/pipeline_*")) if output.exists() else []
    assert written == [f"pipeline_{pipeline.id}"], (
        f"files of pipeline {pipeline.id} never written (first cycle complete={first.complete}, "
        f"counts={dict(first.counts)})")
