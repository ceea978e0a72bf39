"""`status` through the CLI: what the state store says after real cycles, as lines and as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.logs import LogSpec
from gitlab_log_shipper.sim.receiver import Receiver, Reply
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import make_env


def test_status_after_cycles_with_outbox_and_dead_letter(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    app = world.add_project("team/app")
    lib = world.add_project("team/lib")
    world.add_pipeline(app.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    big = world.add_pipeline(lib.id, status="failed", jobs=[JobSpec("b", "test", "failed", log=LogSpec(30_000))])
    world.add_pipeline(lib.id, status="canceled", jobs=[JobSpec("c", "test", "canceled", log="c\n")])
    with Receiver(max_bytes=20_000) as rec:
        env = make_env(tmp_path, gitlab_sim, rec, API_POST_SAVE_TO_FILE="true", LOG_SAVE_PIPELINE_STATUS="success,failed")
        assert env.invoke("run", "--once").exit_code == 1  # the big one was rejected (413): dead letter
        rec.set_script(lambda req: Reply(503))
        late = world.add_pipeline(app.id, status="success", jobs=[JobSpec("d", "test", "success", log="d\n")])
        assert env.invoke("run", "--once", RETRY_ATTEMPTS="0").exit_code == 1  # receiver down: outbox

    result = env.invoke("status")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "mode dual" in out and "daemon:        not running" in out
    assert "last cycle:" in out and "queued=1" in out
    assert "last success:  never" in out
    assert "outbox:        1 document(s)" in out
    assert "dead letters:  1, oldest" in out and "redeliver" in out
    assert ("totals:        shipped=1 filtered=1 deduplicated=0 failed=0 fell_back_to_file=2 queued=1 "
            "dead_lettered=1") in out
    assert "(2 cycle(s), 2 incomplete)" in out
    assert f"  {app.id} {app.path_with_namespace}" in out and f"last: pipeline {late.id} queued" in out
    assert f"  {lib.id} {lib.path_with_namespace}" in out and f"last: pipeline {big.id} dead_letter" in out
    assert "GitLab API:    " in out  # the simulator sends RateLimit-Remaining like GitLab.com

    snapshot = json.loads(env.invoke("status", "--json").output)
    assert snapshot["outbox"]["documents"] == 1 and snapshot["outbox"]["oldest_age_seconds"] >= 0
    assert snapshot["dead_letters"]["count"] == 1
    assert snapshot["totals"]["shipped"] == 1 and snapshot["totals"]["fell_back_to_file"] == 2
    assert snapshot["last_cycle"]["complete"] is False and snapshot["last_cycle"]["duration_seconds"] > 0
    assert snapshot["last_success_at"] is None
    assert snapshot["daemon"] == {"running": False, "pid": None}
    by_id = {p["project_id"]: p for p in snapshot["projects"]}
    assert by_id[app.id]["path"] == app.path_with_namespace and by_id[app.id]["cursor"].endswith("Z")
    assert by_id[lib.id]["last_shipped"]["pipeline_id"] == big.id
    assert isinstance(snapshot["gitlab_rate_limit_remaining"], int)


def test_status_counts_a_clean_cycle_as_success(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                receiver: Receiver) -> None:
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    env = make_env(tmp_path, gitlab_sim, receiver)
    assert env.invoke("run", "--once").exit_code == 0
    assert env.invoke("run", "--once").exit_code == 0
    snapshot = json.loads(env.invoke("status", "--json").output)
    assert snapshot["last_success_at"] == snapshot["last_cycle"]["finished_at"]
    assert snapshot["last_cycle"]["summary"] == "unchanged=1"
    assert snapshot["totals"]["cycles"] == 2 and snapshot["totals"]["shipped"] == 1
    assert snapshot["totals"]["fell_back_to_file"] == 0  # api mode: there is no file to fall back to
    # backfill and post count in the totals too
    pipeline = world.add_pipeline(project.id, status="failed", jobs=[JobSpec("b", "test", "failed", log="b\n")])
    assert env.invoke("post", "--pipeline-id", str(pipeline.id)).exit_code == 0
    snapshot = json.loads(env.invoke("status", "--json").output)
    assert snapshot["totals"]["shipped"] == 2 and snapshot["totals"]["cycles"] == 2


def test_status_before_any_run_and_on_a_corrupt_store(tmp_path: Path, gitlab_sim: GitLabSimulator) -> None:
    env = make_env(tmp_path, gitlab_sim, None)
    result = env.invoke("status")
    assert result.exit_code == 0
    assert "state:         none yet" in result.output
    assert not (tmp_path / "state").exists()  # status created nothing
    assert json.loads(env.invoke("status", "--json").output)["state"] is None

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.sqlite3").write_bytes(b"\x00garbage" * 512)
    broken = env.invoke("status")
    assert broken.exit_code == 3 and "corrupt" in broken.output and "Traceback" not in broken.output
    assert env.invoke("status", GITLAB_URL="ftp://x").exit_code == 2
