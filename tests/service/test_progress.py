"""Backfill progress: done/found with an ETA, a live line on a terminal, plain lines elsewhere, a closing count."""

from __future__ import annotations

import io
import os
import re
import pty
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from gitlab_log_shipper.service.progress import BackfillProgress, eta_text
from gitlab_log_shipper.shipper import DUPLICATE, FAILED, SHIPPED, WOULD_SHIP, ShipResult
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import make_env


def old_pipelines(world: World, n: int) -> list[int]:
    project = world.add_project("team/app")
    now = world.now()
    return [world.add_pipeline(project.id, status="success", created_at=now - timedelta(days=3, minutes=i),
                               jobs=[JobSpec("a", "test", "success", log=f"{i}\n")]).id for i in range(n)]


def test_plain_lines_when_not_a_terminal(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                         receiver: Receiver) -> None:
    ids = old_pipelines(world, 4)
    env = make_env(tmp_path, gitlab_sim, receiver)
    result = env.invoke("backfill", "--since", "5d")
    assert result.exit_code == 0, result.output
    out = result.stdout.splitlines()
    # shipped concurrently, so in any order; the counter counts on, "+" while rows are still being listed
    assert [re.fullmatch(r"\[(\d)/4\+?\]", line.split(" ")[0]).group(1) for line in out[:4]] == ["1", "2", "3", "4"]
    assert all(re.search(r"\((ETA .*|still listing)\)$", line) for line in out[:3])
    assert "ETA" not in out[3]  # nothing left after the last
    assert all(": shipped, 1 job(s)" in line for line in out[:4])
    assert out[4] == "backfill: 4 pipeline(s) in the window: 4 shipped, 0 skipped, 0 failed"
    assert out[5] == "summary: shipped=4"
    assert len(out) == 6  # each pipeline once (no repeat in the summary)
    assert "\r" not in result.output and "\x1b" not in result.output
    assert sorted(r.json()["pipeline_id"] for r in receiver.accepted()) == sorted(ids)

    again = env.invoke("backfill", "--since", "5d")  # shipped before: no line per pipeline, counted as skipped
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines() == ["backfill: 4 pipeline(s) in the window: 0 shipped, 4 skipped, 0 failed",
                                         "summary: deduplicated=4"]


def test_live_line_on_a_terminal(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    old_pipelines(world, 3)
    env = make_env(tmp_path, gitlab_sim, receiver)
    (tmp_path / "empty.env").touch()
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gitlab_log_shipper", "--env-file", str(tmp_path / "empty.env"), "backfill", "--since", "5d"],
        env={**os.environ, **env.values}, stdout=subprocess.PIPE, stderr=slave, text=True,
    )
    os.close(slave)
    terminal = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        terminal += chunk
    stdout, _ = proc.communicate(timeout=30)
    os.close(master)
    assert proc.returncode == 0, stdout + terminal.decode()
    screen = terminal.decode("utf-8", "replace")
    assert "\r\x1b[K[" in screen and "0/3+   0%  ETA …" in screen  # found, still listing
    assert "3/3 100%  ETA 0 s" in screen and "ETA" in screen
    assert screen.endswith("\r\x1b[K")  # the line is cleared at the end
    assert " INFO " not in screen[screen.index("\r\x1b[K["):]  # the live line is not torn apart by the log (which still goes to LOG_DIR)
    # shipped pipelines need no line of their own; the closing count does
    assert stdout.splitlines() == ["backfill: 3 pipeline(s) in the window: 3 shipped, 0 skipped, 0 failed",
                                   "summary: shipped=3"]


def test_eta_and_problem_lines() -> None:
    now = [0.0]
    out, err = io.StringIO(), io.StringIO()
    progress = BackfillProgress(out, err, describe=lambda r: f"pipeline {r.pipeline_id}: {r.outcome}",
                                interactive=True, monotonic=lambda: now[0])
    progress.found(5)
    assert "0/5+   0%  ETA …" in err.getvalue()
    now[0] = 10.0
    progress.handled(ShipResult(SHIPPED, 1, 100))
    assert progress.eta() is None  # still listing: the total may grow
    progress.outside()  # listed, but came to rest before --since: not a pipeline of the window
    progress.listed_all()
    assert progress.total == 4 and progress.done == 1
    assert progress.eta() == 15.0  # 5 s per handled row (the one outside cost its GET too), 3 to go
    assert "1/4  25%  ETA 15 s" in err.getvalue()
    now[0] = 20.0
    progress.handled(ShipResult(FAILED, 1, 101, reason="GitLab 502"))
    assert out.getvalue() == "[2/4] pipeline 101: failed\n"  # problems get a line of their own
    progress.handled(ShipResult(DUPLICATE, 1, 102))  # shipped before: counted, no line
    assert out.getvalue() == "[2/4] pipeline 101: failed\n"
    progress.finish(stopped=True)
    assert err.getvalue().endswith("\r\x1b[K")
    assert out.getvalue().splitlines()[-1] == ("backfill: 4 pipeline(s) in the window: 1 shipped, 1 skipped, 1 failed "
                                               "(1 not done, stopped: a rerun does them; 1 more listed came to rest outside it)")
    assert [eta_text(s) for s in (None, 5, 125, 7300)] == ["ETA …", "ETA 5 s", "ETA 2 min 05 s", "ETA 2 h 01 min"]


def test_plain_lines_while_listing_and_a_dry_run() -> None:
    out, err = io.StringIO(), io.StringIO()
    progress = BackfillProgress(out, err, describe=lambda r: f"pipeline {r.pipeline_id}: {r.outcome}",
                                interactive=False, monotonic=lambda: 0.0)
    progress.found(2)
    progress.handled(ShipResult(WOULD_SHIP, 1, 100))
    progress.listed_all()
    progress.handled(ShipResult(WOULD_SHIP, 1, 101))
    progress.finish()
    assert out.getvalue().splitlines() == [
        "[1/2+] pipeline 100: would_ship (still listing)",
        "[2/2] pipeline 101: would_ship",
        "backfill: 2 pipeline(s) in the window: 2 would ship, 0 skipped, 0 failed",
    ]
    assert err.getvalue() == ""  # not a terminal: no control characters anywhere
