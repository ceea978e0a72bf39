"""The documented exit codes, per command: 0 ok, 1 runtime failure, 2 usage or configuration error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import make_env


def dead_url() -> str:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{unused.getsockname()[1]}/logs"


def test_every_command_has_its_codes(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                     receiver: Receiver) -> None:
    project = world.add_project("team/app")
    pipeline = world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    ok = make_env(tmp_path / "ok", gitlab_sim, receiver)
    down = make_env(tmp_path / "down", gitlab_sim, None, API_POST_ENABLED="true", API_POST_URL=dead_url(),
                    RETRY_ATTEMPTS="0")
    bad = {"POLL_INTERVAL": "soon"}
    cases = [
        # (env, args, overrides, expected code)
        (ok, ["run", "--once"], {}, 0),
        (down, ["run", "--once"], {}, 1),  # not delivered: waits in the outbox
        (ok, ["run", "--once"], bad, 2),
        (ok, ["run", "--show-document"], {}, 2),
        (ok, ["run", "--dry-run"], {}, 0),
        (ok, ["backfill", "--since", "1d"], {}, 0),
        (ok, ["backfill", "--since", "1d", "--project", "nobody/missing"], {}, 1),
        (ok, ["backfill", "--since", "whenever"], {}, 2),
        (ok, ["post", "--pipeline-id", str(pipeline.id)], {}, 0),
        (ok, ["post", "--pipeline-id", "99"], {}, 1),
        (down, ["post", "--pipeline-id", str(pipeline.id)], {}, 1),
        (ok, ["post"], {}, 2),
        (ok, ["redeliver"], {}, 0),  # nothing dead-lettered
        (make_env(tmp_path / "file", gitlab_sim, None), ["redeliver"], {}, 2),  # file mode: nothing to redeliver to
        (ok, ["check"], {}, 0),
        (down, ["check"], {}, 1),
        (ok, ["check"], bad, 2),
        (ok, ["status"], {}, 0),
        (ok, ["status", "--json"], bad, 2),
        (ok, ["no-such-command"], {}, 2),
    ]
    for env, args, overrides, expected in cases:
        result = env.invoke(*args, **overrides)
        assert result.exit_code == expected, (args, overrides, result.output)
        assert "Traceback" not in result.output


def test_corrupt_state_is_exit_3_everywhere(tmp_path: Path, gitlab_sim: GitLabSimulator) -> None:
    """3: a store that cannot be used, which the systemd unit does not restart on (`check` just fails a check)."""
    env = make_env(tmp_path, gitlab_sim, None)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.sqlite3").write_bytes(b"\x00garbage" * 512)
    for args, code in ((["run", "--once"], 3), (["backfill", "--since", "1d"], 3), (["status"], 3), (["check"], 1)):
        assert env.invoke(*args).exit_code == code, args


def test_a_real_process_exits_with_them(tmp_path: Path, gitlab_sim: GitLabSimulator) -> None:
    env = make_env(tmp_path, gitlab_sim, None)
    (tmp_path / "empty.env").touch()

    def run(*args: str, **overrides: str) -> int:
        return subprocess.run([sys.executable, "-m", "gitlab_log_shipper", "--env-file", str(tmp_path / "empty.env"),
                               *args], env={**os.environ, **env.values, **overrides}, capture_output=True,
                              timeout=60).returncode

    assert run("run", "--once") == 0
    assert run("run", GITLAB_TOKEN="short") == 2  # the daemon refuses to start: systemd does not restart on 2
    assert run("status") == 0
