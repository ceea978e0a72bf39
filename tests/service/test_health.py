"""``gitlab-log-shipper health`` over the real CLI, against a state store written by a real ``run --once`` and by a
daemon in the middle of a cycle; and the self-watchdog ending a daemon whose cycle is wedged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from gitlab_log_shipper.config.settings import load_config
from gitlab_log_shipper.service.health import check, evaluate, wedged_after
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World
from gitlab_log_shipper.timeutil import format_ts, utcnow

from shipper_helpers import Env, make_env, start_daemon, stop_daemon


def health(env: Env, **overrides: str) -> tuple[int, str, float]:
    """``gitlab-log-shipper health`` as a real process: exit code, what it printed, seconds it took."""
    (env.tmp / "empty.env").touch()
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "gitlab_log_shipper", "--env-file", str(env.tmp / "empty.env"), "health"],
                          env={**os.environ, **env.values, **overrides}, capture_output=True, text=True, timeout=30)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - began


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folder`` with its size and mtime (ns): what 'writes nothing' is checked against."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_health_after_run_once_is_healthy_then_stale_and_writes_nothing(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver
) -> None:
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    env = make_env(tmp_path, gitlab_sim, receiver)
    assert env.invoke("run", "--once").exit_code == 0
    state = Path(env.values["STATE_DIR"])
    before = snapshot(state)

    code, output, took = health(env)
    assert code == 0, output
    assert output.startswith("healthy: the last poll cycle finished 0 s ago (HEALTH_MAX_AGE 5 s)")  # 5 x POLL_INTERVAL=1
    print(f"health took {took:.3f} s as a process")

    time.sleep(1.1)
    code, output, _ = health(env, HEALTH_MAX_AGE="1s")
    assert code == 1
    assert re.fullmatch(r"unhealthy: the last poll cycle finished \d+ s ago, more than HEALTH_MAX_AGE 1 s", output.strip()), output
    assert "Traceback" not in output
    assert snapshot(state) == before  # no -wal, -shm, lock or log file appeared, nothing changed

    config = load_config(tmp_path / "empty.env", environ=env.values)
    began = time.monotonic()
    assert check(config, utcnow()).ok
    assert time.monotonic() - began < 0.5


def test_health_without_a_state_store_fails_and_creates_nothing(tmp_path: Path, gitlab_sim: GitLabSimulator) -> None:
    env = make_env(tmp_path, gitlab_sim, None)
    code, output, _ = health(env)
    assert code == 1
    assert output.strip() == f"unhealthy: no state store in STATE_DIR={env.values['STATE_DIR']} (no poll cycle has run here)"
    assert not Path(env.values["STATE_DIR"]).exists() and not Path(env.values["LOG_DIR"]).exists()


def test_health_max_age_defaults_to_five_poll_intervals_of_the_detection_in_use(tmp_path: Path) -> None:
    """POLL_INTERVAL's default is 60 s with REST and 10 s with GraphQL detection: the daemon's recorded choice decides."""
    (tmp_path / "none.env").touch()
    base = {"GITLAB_URL": "https://gitlab.example.com", "GITLAB_TOKEN": "glpat-0123456789abcdef", "STATE_DIR": str(tmp_path)}
    now = utcnow()
    finished = {"last_cycle.finished_at": format_ts(now - timedelta(seconds=100))}
    auto = load_config(tmp_path / "none.env", environ=base)
    assert evaluate(auto, {**finished, "gitlab.detection": "rest"}, now).ok  # 100 s < 300 s
    graphql = evaluate(auto, {**finished, "gitlab.detection": "graphql"}, now)
    assert not graphql.ok and "more than HEALTH_MAX_AGE 50 s" in graphql.line
    forced = load_config(tmp_path / "none.env", environ={**base, "GITLAB_API": "graphql"})
    assert not evaluate(forced, finished, now).ok  # no detection recorded yet: GITLAB_API=graphql means 10 s
    set_interval = load_config(tmp_path / "none.env", environ={**base, "POLL_INTERVAL": "30"})
    assert evaluate(set_interval, {**finished, "gitlab.detection": "graphql"}, now).ok  # 5 x the POLL_INTERVAL given
    stretched = {**finished, "gitlab.detection": "graphql", "heartbeat.poll_interval_seconds": "40"}
    assert evaluate(auto, stretched, now).ok  # the pause the daemon recorded (GraphQL budget stretched it)
    assert wedged_after(auto, 60.0) == 600.0  # 2 x 5 x 60 s
    assert wedged_after(auto, 10.0) == 11 * 30 + 102.3  # not 100 s: python-gitlab retries silently for longer
    explicit = load_config(tmp_path / "none.env", environ={**base, "HEALTH_MAX_AGE": "2s", "POLL_INTERVAL": "1"})
    assert wedged_after(explicit, 1.0) == 4.0


def test_a_cycle_in_progress_is_healthy_while_it_makes_progress(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator
) -> None:
    """One job log trickles in for ~12 s (1 KiB every 0.2 s): longer than HEALTH_MAX_AGE and than the self-watchdog's
    limit, with no new answer after its headers. Its chunks are progress: health stays 0 while the daemon holds the
    lock, and the daemon is not killed."""
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="x" * 60_000 + "\n")])
    gitlab_sim.faults.update(trace_trickle=(1024, 0.2))
    env = make_env(tmp_path, gitlab_sim, None, HEALTH_MAX_AGE="2s", JOB_LOG_TIMEOUT="1h")
    proc = start_daemon(env)
    try:
        deadline = time.monotonic() + 20
        while "running since" not in health(env)[1]:
            assert time.monotonic() < deadline and proc.poll() is None, "the daemon never started its cycle"
            time.sleep(0.2)
        seen = []
        began = time.monotonic()
        while time.monotonic() - began < 7:  # > 2 x HEALTH_MAX_AGE, > the self-watchdog's 4 s
            code, output, _ = health(env)
            seen.append((code, output.strip()))
            time.sleep(0.3)
        assert proc.poll() is None, "the self-watchdog killed a cycle that was making progress"
        assert all(code == 0 and "showed progress" in line for code, line in seen), seen
    finally:
        gitlab_sim.faults.update(trace_trickle=None)
        code, output = stop_daemon(proc)
    assert "Traceback" not in output


def test_a_wedged_cycle_is_unhealthy_and_the_daemon_exits_by_itself(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator
) -> None:
    """One byte of a job log every 30 s: no read times out (GITLAB_TIMEOUT 60 s), JOB_LOG_TIMEOUT is 1 h — the
    cycle is wedged. Without systemd, the daemon must end itself after 2 x HEALTH_MAX_AGE (4 s), exit 1, logged."""
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="stuck\n" * 10)])
    gitlab_sim.faults.update(trace_trickle=(1, 30.0))
    env = make_env(tmp_path, gitlab_sim, None, HEALTH_MAX_AGE="2s", JOB_LOG_TIMEOUT="1h", GITLAB_TIMEOUT="60")
    began = time.monotonic()
    proc = start_daemon(env)
    verdicts = []
    try:
        while proc.poll() is None and time.monotonic() - began < 25:
            verdicts.append(health(env)[:2])
            time.sleep(0.2)
        assert proc.poll() is not None, "a wedged daemon kept running"
        took = time.monotonic() - began
    finally:
        code, output = stop_daemon(proc)
    print(f"the wedged daemon exited after {took:.1f} s")
    assert code == 1, output
    assert "the poll cycle has shown no progress" in output and "self-watchdog" in output and "ERROR" in output
    assert "Traceback" not in output
    assert any(code == 0 and "running since" in line for code, line in verdicts), verdicts  # before 2 s of silence
    assert any(code == 1 and "has shown no progress for" in line for code, line in verdicts), verdicts
    assert not list(Path(env.values["STATE_DIR"]).glob("spool/*")), "the spool was left behind"


def test_backing_off_while_gitlab_refuses_the_token_is_not_unhealthy(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator
) -> None:
    """GitLab rejects the token: each cycle ends at once and the pause doubles (2, 4, 8 s with POLL_INTERVAL=1).
    The last cycle soon finished longer ago than HEALTH_MAX_AGE (3 s), but the daemon is waiting, not wedged.
    (3 s, not 1 s: on a loaded 2-core CI machine a cycle that fails at once can still take a second to record.)"""
    world.add_project("team/app")
    env = make_env(tmp_path, gitlab_sim, None, GITLAB_TOKEN="glpat-not-the-right-token", GITLAB_PROJECTS="team/app",
                   HEALTH_MAX_AGE="3s")
    proc = start_daemon(env)
    verdicts = []
    try:
        began = time.monotonic()
        while time.monotonic() - began < 24:  # long enough for the 2, 4 and 8 s pauses even on a loaded machine
            verdicts.append(health(env)[:2])
            time.sleep(0.3)
    finally:
        code, output = stop_daemon(proc)
    assert "next attempt in 8 s" in output, output  # it did back off beyond HEALTH_MAX_AGE + POLL_INTERVAL
    # (not "finished" alone: a probe before the first cycle ended says "no poll cycle has finished", unhealthy)
    after_first = verdicts[next(i for i, (_, line) in enumerate(verdicts) if "the last poll cycle finished" in line):]
    assert all(code == 0 for code, _ in after_first), after_first
    assert any("backing off" in line for _, line in after_first), after_first
