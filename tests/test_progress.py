"""Backfill progress: done/total with an ETA, a live line on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from gitlab_log_shipper.progress import BackfillProgress, eta_text
from gitlab_log_shipper.shipper import FAILED, SHIPPED, ShipResult
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
    assert out[0] == "4 pipeline(s) to ship"
    assert [line.split(" ")[0] for line in out[1:5]] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert all("ETA" in line for line in out[1:4]) and "ETA" not in out[4]  # nothing left after the last
    assert all(": shipped, 1 job(s)" in line for line in out[1:5])
    assert out[5] == "summary: shipped=4"
    assert len(out) == 6  # each pipeline once (no repeat in the summary)
    assert "\r" not in result.output and "\x1b" not in result.output
    assert sorted(r.json()["pipeline_id"] for r in receiver.accepted()) == sorted(ids)


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
    assert "\r\x1b[K[" in screen and "0/3   0%  ETA …" in screen
    assert "3/3 100%  ETA 0 s" in screen and "ETA" in screen
    assert screen.endswith("\r\x1b[K")  # the line is cleared at the end
    assert " INFO " not in screen[screen.index("\r\x1b[K["):]  # the live line is not torn apart by the log (which still goes to LOG_DIR)
    assert stdout.splitlines() == ["summary: shipped=3"]  # shipped pipelines need no line of their own


def test_eta_and_problem_lines() -> None:
    now = [0.0]
    out, err = io.StringIO(), io.StringIO()
    progress = BackfillProgress(out, err, describe=lambda r: f"pipeline {r.pipeline_id}: {r.outcome}",
                                interactive=True, monotonic=lambda: now[0])
    progress.planned(4)
    assert progress.eta() is None
    now[0] = 10.0
    progress(ShipResult(SHIPPED, 1, 100))
    assert progress.eta() == 30.0  # 10 s per pipeline, 3 to go
    now[0] = 20.0
    progress(ShipResult(FAILED, 1, 101, reason="GitLab 502"))
    assert out.getvalue() == "[2/4] pipeline 101: failed\n"  # problems get a line of their own
    assert "2/4  50%  ETA 20 s" in err.getvalue()
    progress.finish()
    assert err.getvalue().endswith("\r\x1b[K")
    assert [eta_text(s) for s in (None, 5, 125, 7300)] == ["ETA …", "ETA 5 s", "ETA 2 min 05 s", "ETA 2 h 01 min"]
