"""Never hung, never silently stopped (issue 11, cases 8 and 15): real processes, real signals, a real
second SQLite connection, the GitLab simulator with latency so that work is in flight."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World
from gitlab_log_shipper.state.lock import InstanceLock

from shipper_helpers import Env, make_env, wait_until

# The shipper with two of its timings shortened, so that the tests take seconds: how long a write waits
# for another process's lock, and how long the work in flight gets after a signal.
LAUNCHER = (
    "import runpy, sys\n"
    "import gitlab_log_shipper.service.daemon as daemon, gitlab_log_shipper.state.store as state\n"
    "state.BUSY_TIMEOUT = float(sys.argv.pop(1))\n"
    "daemon.SHUTDOWN_GRACE = float(sys.argv.pop(1))\n"
    "runpy.run_module('gitlab_log_shipper', run_name='__main__', alter_sys=True)\n"
)
BUSY_TIMEOUT = 0.5
GRACE = 2.0


def start(env: Env, *args: str, grace: float = GRACE, **extra_env: str) -> "subprocess.Popen[str]":
    (env.tmp / "empty.env").touch()
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(BUSY_TIMEOUT), str(grace), "--env-file", str(env.tmp / "empty.env"), *args],
        env={**os.environ, **env.values, **extra_env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finish(proc: "subprocess.Popen[str]", timeout: float) -> tuple[int, str, float]:
    """Exit code, output and how long it took to end; a process still running after ``timeout`` fails."""
    started = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"still running {timeout} s later; it printed:\n{output}")
    return proc.returncode, output, time.monotonic() - started


def assert_lock_free(env: Env) -> None:
    InstanceLock(Path(env.values["STATE_DIR"])).acquire().release()  # raises InstanceLocked if still held


def pipelines(world: World, count: int, jobs: int = 2) -> int:
    project = world.add_project("team/app")
    for n in range(count):
        world.add_pipeline(project.id, status="success",
                           jobs=[JobSpec(f"job{j}", "test", "success", log=f"line {n}.{j}\n" * 50) for j in range(jobs)])
    return project.id


def hold_write_lock(env: Env) -> sqlite3.Connection:
    holder = sqlite3.connect(Path(env.values["STATE_DIR"]) / "state.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


# -- case 8: a busy state store -----------------------------------------------------------------------


def test_run_once_on_a_busy_store_exits_with_a_clear_message_and_frees_the_lock(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver
) -> None:
    pipelines(world, 1)
    env = make_env(tmp_path, gitlab_sim, receiver)
    assert env.invoke("run", "--once").exit_code == 0  # the store exists
    world.add_pipeline(next(iter(world.projects)), status="failed", jobs=[JobSpec("b", "test", "failed", log="b\n")])
    holder = hold_write_lock(env)
    try:
        code, output, _ = finish(start(env, "run", "--once"), timeout=30)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert code == 1, output
    assert "is busy" in output and str(Path(env.values["STATE_DIR"]) / "state.sqlite3") in output
    assert "aside" not in output and "Traceback" not in output
    assert_lock_free(env)
    # and the next run, with the lock gone, records what the busy one could not
    assert env.invoke("run", "--once").exit_code == 0


def test_the_daemon_keeps_cycling_on_a_busy_store_and_sigterm_stops_it(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver
) -> None:
    project_id = pipelines(world, 1)
    env = make_env(tmp_path, gitlab_sim, receiver, POLL_INTERVAL="1")
    assert env.invoke("run", "--once").exit_code == 0
    holder = hold_write_lock(env)
    proc = start(env, "run")
    try:
        world.add_pipeline(project_id, status="failed", jobs=[JobSpec("b", "test", "failed", log="b\n")])
        receiver.wait_for(2, timeout=20)  # shipped, but its record cannot be written while the lock is held
        time.sleep(3 * (1 + BUSY_TIMEOUT))  # a few cycles, each failing on the busy store
        assert proc.poll() is None, "the daemon ended on a busy store"
        proc.send_signal(signal.SIGTERM)  # while the store is still busy
        code, output, took = finish(proc, timeout=GRACE + 10)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert code == 0, output
    assert took < GRACE + 3, output
    assert output.count("is busy") >= 2, output  # retried on schedule, each failure logged with its reason
    assert "received SIGTERM" in output and "Traceback" not in output
    assert_lock_free(env)

    # once the lock is gone, the next run records what the busy cycles could not; nothing was lost
    assert env.invoke("run", "--once").exit_code == 0
    sent = len(receiver.accepted())
    assert env.invoke("run", "--once").exit_code == 0 and len(receiver.accepted()) == sent  # recorded now
    keys = {}
    for request in receiver.accepted():
        keys.setdefault(request.json()["pipeline_id"], set()).add(request.headers["Idempotency-Key"])
    assert set(keys) == set(world.pipelines) and all(len(k) == 1 for k in keys.values())  # resent, same key


# -- case 15: signals ------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "signum", "code"), [
    (["run", "--once"], signal.SIGINT, 130),
    (["run", "--once"], signal.SIGTERM, 143),
    (["backfill", "--since", "1d"], signal.SIGINT, 130),
    (["post", "--pipeline-id", "{pipeline}"], signal.SIGINT, 130),
])
def test_a_signal_stops_a_command_promptly_and_cleans_up(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver,
    command: list[str], signum: signal.Signals, code: int,
) -> None:
    pipelines(world, 12, jobs=3)
    first = min(world.pipelines)
    env = make_env(tmp_path, gitlab_sim, receiver, CONCURRENCY="2")
    gitlab_sim.faults.latency = 0.3  # every GitLab answer takes a while: a signal lands mid-work
    proc = start(env, *[part.format(pipeline=first) for part in command])
    spool = Path(env.values["STATE_DIR"]) / "spool" / str(proc.pid)
    wait_until(lambda: gitlab_sim.counters["trace"] > 0, 30, "the first log download")
    assert spool.is_dir()
    proc.send_signal(signum)
    status, output, took = finish(proc, timeout=GRACE + 10)
    assert status == code, output
    assert took < GRACE + 3, output  # within the shutdown grace (plus the interpreter's start and end)
    name = signal.Signals(signum).name
    assert f"received {name}" in output and f"stopped by {name}" in output
    assert "Aborted!" not in output and "Traceback" not in output
    assert not spool.exists()
    assert_lock_free(env)


def test_sighup_stops_the_daemon_with_a_log_line_and_removes_its_spool(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver
) -> None:
    pipelines(world, 12, jobs=3)
    env = make_env(tmp_path, gitlab_sim, receiver, CONCURRENCY="2")
    gitlab_sim.faults.latency = 0.3
    proc = start(env, "run")
    spool = Path(env.values["STATE_DIR"]) / "spool" / str(proc.pid)
    wait_until(lambda: gitlab_sim.counters["trace"] > 0, 30, "the first log download")
    proc.send_signal(signal.SIGHUP)
    status, output, took = finish(proc, timeout=GRACE + 10)
    # 129: under systemd, Restart=on-failure starts it again, which is the only way it re-reads its settings
    assert status == 129, output
    assert took < GRACE + 3, output
    assert "received SIGHUP" in output and "no reload" in output
    assert "Traceback" not in output
    assert not spool.exists()
    assert_lock_free(env)


def test_ctrl_c_twice_stops_at_once(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                    receiver: Receiver) -> None:
    pipelines(world, 12, jobs=3)
    env = make_env(tmp_path, gitlab_sim, receiver, CONCURRENCY="2")
    gitlab_sim.faults.latency = 0.3
    gitlab_sim.faults.trace_trickle = (1, 0.5)  # a log download in flight when the first SIGINT comes takes long
    proc = start(env, "run", "--once", grace=60)  # the work in flight would get a minute
    spool = Path(env.values["STATE_DIR"]) / "spool" / str(proc.pid)
    wait_until(lambda: gitlab_sim.counters["trace"] > 0, 30, "the first log download")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    status, output, took = finish(proc, timeout=30)
    assert status == 130, output
    assert took < 10, output
    assert "received SIGINT again; stopping now" in output and "stopped by SIGINT" in output
    assert "Traceback" not in output and not spool.exists()
    assert_lock_free(env)


def test_nohup_keeps_the_daemon_running_through_a_hangup(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                          receiver: Receiver) -> None:
    pipelines(world, 1, jobs=1)
    env = make_env(tmp_path, gitlab_sim, receiver)
    (env.tmp / "empty.env").touch()
    proc = subprocess.Popen(  # as `nohup gitlab-log-shipper run &` starts it: SIGHUP ignored
        [sys.executable, "-m", "gitlab_log_shipper", "--env-file", str(env.tmp / "empty.env"), "run"],
        env={**os.environ, **env.values}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    receiver.wait_for(1, timeout=20)
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    running = proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    status, output, _ = finish(proc, timeout=GRACE + 10)
    assert running, output
    assert status == 0 and "received SIGHUP" not in output, output
