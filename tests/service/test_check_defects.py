"""Issue 14, defects 3, 7 and 9: `check` fails what `run` would fail on, errors name a project once, an unknown
dead letter is an error, a full outbox is not a GitLab error, and an unreachable GitLab says what is retried.
Everything over the real CLI against the GitLab simulator and the receiver on loopback."""

from __future__ import annotations

import os
import random
import re
import socket
import stat
import string
import subprocess
import sys
import time
from pathlib import Path

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver, Reply
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import make_env, within
from test_check import lines


def test_receiver_answering_404_fails_the_check_and_405_passes(tmp_path: Path, world: World,
                                                                gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    """A 404 means a wrong path: every POST would be rejected for good (dead-lettered). A 405 to the GET is what
    a POST-only endpoint answers: the path exists."""
    world.add_project("app")
    env = make_env(tmp_path, gitlab_sim, receiver)
    wrong_path = receiver.url.rsplit("/", 1)[0] + "/no-such-route"  # the receiver answers 404 off its path
    result = env.invoke("check", API_POST_URL=wrong_path)
    assert result.exit_code == 1, result.output
    line = lines(result.output)["receiver"]
    assert line.startswith("✗ ") and "HTTP 404 to a GET" in line and "dead-lettered" in line, line
    result = env.invoke("check")
    assert result.exit_code == 0, result.output
    line = lines(result.output)["receiver"]
    assert line.startswith("✓ ") and "HTTP 405 to a GET" in line and "405 is fine" in line, line


def test_redeliver_of_an_unknown_pipeline_is_an_error(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                      receiver: Receiver) -> None:
    env = make_env(tmp_path, gitlab_sim, receiver)
    result = env.invoke("redeliver", "--pipeline-id", "424242")
    assert result.exit_code == 1, result.output
    assert "no dead letter of pipeline 424242" in result.output
    assert env.invoke("redeliver").exit_code == 0  # all of none: nothing failed


def _big_log(size: int) -> str:
    """Text that gzip cannot shrink much, so that one document fills a 1 MiB outbox."""
    rng = random.Random(14)
    return "".join(rng.choices(string.ascii_letters + string.digits, k=size)) + "\n"


def test_a_full_outbox_is_its_own_count_not_a_project_error(tmp_path: Path, world: World,
                                                           gitlab_sim: GitLabSimulator) -> None:
    """The receiver is down and the outbox has reached OUTBOX_MAX_BYTES: the cycle takes no new pipelines. That is
    shown as outbox_full (summary, status, the gitlab_log_shipper_outbox_full gauge), not as a project error, which
    would page whoever looks after GitLab."""
    project = world.add_project("app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log=_big_log(1_200_000))])
    metrics = tmp_path / "shipper.prom"
    with Receiver(script=lambda request: Reply(503, body="down")) as down:
        env = make_env(tmp_path, gitlab_sim, down, OUTBOX_MAX_BYTES="1M", METRICS_TEXTFILE=str(metrics))
        first = env.invoke("run", "--once")
        assert "queued=1" in first.output, first.output
        second = env.invoke("run", "--once")
    assert "outbox_full=1" in second.output, second.output
    assert "project error" not in second.output and "project_errors" not in second.output, second.output
    text = metrics.read_text("utf-8")
    assert "\ngitlab_log_shipper_outbox_full 1\n" in text and "\ngitlab_log_shipper_last_cycle_project_errors 0\n" in text
    shown = env.invoke("status").output
    assert "outbox full:" in shown and "project error" not in shown, shown


def _doubled(line: str) -> list[str]:
    """The project or pipeline ids a line names more than once (``project 12: listing pipelines of project 12``)."""
    named = re.findall(r"\b(project|pipeline)[ =](\d+)\b", line) + [("project", n) for n in
                                                                   re.findall(r"^project error: (\d+):", line)]
    return sorted({f"{kind} {n}" for kind, n in named if named.count((kind, n)) > 1})


def test_a_failing_cycle_names_each_project_and_pipeline_once(tmp_path: Path, world: World,
                                                             gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    """Every line of failing cycles (the listing, the pipeline, its jobs; refused, and gone), the repeated-failure
    warning, the CLI's error lines and `status`: none names the same project or pipeline twice."""
    project = world.add_project("app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    seen: list[str] = []
    for endpoint, status in (("pipelines", 403), ("pipeline", 403), ("pipeline_jobs", 403), ("pipeline", 404)):
        env = make_env(tmp_path / f"{endpoint}-{status}", gitlab_sim, receiver)
        for _ in range(3):  # the third failure of a pipeline adds the "failed 3 times" warning
            gitlab_sim.inject(endpoint, status)  # one request per cycle: the 404 (gone) is asked for once
            result = env.invoke("run", "--once")
            seen += result.output.splitlines()
        seen += env.invoke("status").output.splitlines()
    assert any("listing pipelines: forbidden (403)" in line for line in seen), "\n".join(seen)
    assert any("failed 3 times" in line for line in seen) and any("deleted in GitLab" in line for line in seen)
    doubled = [line for line in seen if _doubled(line)]
    assert doubled == [], "\n".join(doubled)


def _in_a_deleted_folder(tmp_path: Path, env: dict[str, str], *args: str) -> "subprocess.CompletedProcess[str]":
    """The CLI as a process whose working folder was deleted after it entered it: every relative path (STATE_DIR=state)
    then fails to resolve, as when the folder is unreadable to the service user (tests run as root, whom mode 000
    does not stop)."""
    folder = tmp_path / "gone"
    folder.mkdir()

    def enter_and_delete() -> None:
        os.chdir(folder)
        os.rmdir(folder)

    (tmp_path / "empty.env").touch()
    return subprocess.run([sys.executable, "-m", "gitlab_log_shipper", "--env-file", str(tmp_path / "empty.env"), *args],
                          env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(sys.path)}, preexec_fn=enter_and_delete,
                          capture_output=True, text=True, timeout=60)


def test_relative_state_dir_in_an_unreadable_working_folder_is_a_clear_error(tmp_path: Path, world: World,
                                                                             gitlab_sim: GitLabSimulator) -> None:
    world.add_project("app")
    env = make_env(tmp_path, gitlab_sim, None, STATE_DIR="state", LOG_DIR="logs", LOG_OUTPUT_DIR="out").values
    shown = _in_a_deleted_folder(tmp_path, env, "status")
    assert shown.returncode == 1, shown.stdout + shown.stderr
    assert "Traceback" not in shown.stderr and "STATE_DIR is relative to the working folder" in shown.stderr, shown.stderr
    checked = _in_a_deleted_folder(tmp_path, env, "check")
    assert checked.returncode == 1 and "Traceback" not in checked.stderr, checked.stdout + checked.stderr
    found = lines(checked.stdout)
    assert found["folders"].startswith("✗ ") and "STATE_DIR, LOG_DIR, LOG_OUTPUT_DIR are relative" in found["folders"]
    assert found["GitLab"].startswith("✓ ")  # the rest is still checked


def test_metrics_folder_that_does_not_exist_is_created_by_run_as_check_says(tmp_path: Path, world: World,
                                                                           gitlab_sim: GitLabSimulator) -> None:
    """`check` used to say the folder would be created while `run` failed every cycle to write the file."""
    world.add_project("app")
    folder = tmp_path / "textfile_collector" / "shipper"
    env = make_env(tmp_path, gitlab_sim, None, METRICS_TEXTFILE=str(folder / "gitlab_log_shipper.prom"))
    line = lines(env.invoke("check").output)["METRICS_TEXTFILE folder"]
    assert line.startswith("✓ ") and "it will be created by the first cycle, mode 0755" in line, line
    result = env.invoke("run", "--once")
    assert result.exit_code == 0 and "METRICS_TEXTFILE" not in result.output, result.output
    assert "gitlab_log_shipper_cycles_total 1" in (folder / "gitlab_log_shipper.prom").read_text("utf-8")
    assert [stat.S_IMODE(p.stat().st_mode) for p in (folder.parent, folder)] == [0o755, 0o755]


def test_unreachable_gitlab_says_what_is_retried_at_once_and_gives_up_within_the_budget(
        tmp_path: Path, gitlab_sim: GitLabSimulator, receiver: Receiver) -> None:
    """python-gitlab retries a refused connection 10 times with 0.1 × 2**n s of backoff: 103 s without a word. Now
    one WARNING at the first failure says what is retried, and the cycle reports the error within the budget
    (2 × GITLAB_TIMEOUT, at least 10 s: ~6.3 s of backoff for refused connections)."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{unused.getsockname()[1]}"
    env = make_env(tmp_path, gitlab_sim, receiver, GITLAB_URL=dead, GITLAB_TIMEOUT="3")
    started = time.monotonic()
    result = within(40, lambda: env.invoke("run", "--once"), "run --once against a GitLab that refuses connections")
    took = time.monotonic() - started
    assert result.exit_code == 1 and took < 10 + 3, (took, result.output)
    warnings = [line for line in result.output.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, result.output
    assert re.search(r"GitLab unreachable \(ConnectionError: connection refused\); retrying up to 6 times over ~6\.3 s \(GITLAB_TIMEOUT=3s per attempt, at most ~13 s in all\)",
                     warnings[0]), warnings[0]
    assert "urllib3" not in result.output and "Traceback" not in result.output
    assert "project error: projects of the token's user: GitLab unreachable (ConnectionError: connection refused); " \
           "gave up after retrying for 10s (2 × GITLAB_TIMEOUT, at least 10s)" in result.output, result.output


def test_receiver_retries_are_one_line_of_ours_not_a_urllib3_warning_each(tmp_path: Path, world: World,
                                                                         gitlab_sim: GitLabSimulator,
                                                                         receiver: Receiver) -> None:
    """urllib3 logged ``Retrying (Retry(total=…)) after connection broken …`` at every retry of a POST (three
    here); the shipper's own "receiver unavailable" line says it once."""
    project = world.add_project("app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{unused.getsockname()[1]}/logs"
    env = make_env(tmp_path, gitlab_sim, receiver, API_POST_URL=dead, RETRY_ATTEMPTS="3")
    result = env.invoke("run", "--once")
    assert "queued=1" in result.output, result.output
    assert "Retrying (" not in result.output and "urllib3" not in result.output, result.output
    assert len([line for line in result.output.splitlines() if "receiver unavailable" in line]) == 1, result.output
    debug = env.invoke("run", "--once", LOG_LEVEL="DEBUG")  # debugging: urllib3's own lines are let through
    assert "Retrying (" in debug.output, debug.output
