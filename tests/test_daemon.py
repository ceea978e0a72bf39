"""The daemon as operators run it: a real process, polling on its schedule, stopped by SIGTERM."""

from __future__ import annotations

import time
from pathlib import Path

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import documents, make_env, start_daemon, stop_daemon


def test_run_polls_on_schedule_and_stops_cleanly_on_sigterm(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver
) -> None:
    project = world.add_project("team/app")
    first = world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    env = make_env(tmp_path, gitlab_sim, receiver, POLL_INTERVAL="1")
    proc = start_daemon(env)
    try:
        receiver.wait_for(1, timeout=20)
        second = world.add_pipeline(project.id, status="failed", jobs=[JobSpec("b", "test", "failed", log="b\n")])
        receiver.wait_for(2, timeout=20)  # picked up by a later scheduled cycle, no restart
        assert [d["pipeline_id"] for d in documents(receiver)] == [first.id, second.id]
        time.sleep(0.2)
    finally:
        code, output = stop_daemon(proc)
    assert code == 0, output
    assert "received SIGTERM" in output and "stopped" in output
    assert "Traceback" not in output
