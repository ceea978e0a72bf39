"""The quick-start demo: the real ``gitlab-log-shipper check``, ``run --once`` and ``status`` against the
bundled GitLab simulator and a local receiver, then what the receiver got and what ``api-requests.log`` says.

Run through ``scripts/demo.sh`` (which installs the project first). Everything lives under ``./demo``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.logs import LogSpec
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
API_TOKEN = "demo-receiver-token-123"


def build_world() -> World:
    world = World()
    alice = world.add_user("alice", name="Alice Example", public_email="alice@example.com")
    group = world.add_group("acme", name="ACME")
    app = world.add_project("app", name="Web App", group_id=group.id)
    lib = world.add_project("lib", name="Core Lib", group_id=group.id)
    ago = world.now() - timedelta(minutes=20)
    world.add_pipeline(app.id, status="success", source="push", user=alice, created_at=ago, jobs=[
        JobSpec("build:production", "build", "success", log=LogSpec(6_000, seed=1)),
        JobSpec("test:unit", "test", "success", log=LogSpec(9_000, seed=2, timestamps=True)),
        JobSpec("deploy", "deploy", "manual"),
    ])
    mr = world.add_pipeline(lib.id, status="failed", source="merge_request_event", user=alice, jobs=[
        JobSpec("compile", "build", "success", log=LogSpec(4_000, seed=3)),
        JobSpec("test", "test", "failed", log=LogSpec(5_000, seed=4, invalid_utf8=True)),
    ])
    world.add_child_pipeline(mr.id, jobs=[JobSpec("child-job", "test", "success", log=LogSpec(2_000, seed=5))])
    world.add_pipeline(app.id, status="running", jobs=[JobSpec("slow", "test", "running")])
    return world


def shorten(doc: dict) -> dict:
    """The document as received, with each log cut for the screen."""
    shown = json.loads(json.dumps(doc))
    for job in shown["jobs"]:
        log = job["log_content"]
        if len(log) > 160:
            job["log_content"] = log[:160] + f"... [{len(log)} characters in all]"
    return shown


def main() -> int:
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir()
    world = build_world()
    with GitLabSimulator(world) as gitlab, Receiver(token=API_TOKEN, dump_dir=DEMO / "received") as receiver:
        env_file = DEMO / ".env"
        env_file.write_text(
            f"GITLAB_URL={gitlab.url}\nGITLAB_TOKEN={world.token}\nGITLAB_GROUPS=acme\n"
            f"API_POST_ENABLED=true\nAPI_POST_URL={receiver.url}\nAPI_POST_AUTH_TOKEN={API_TOKEN}\n"
            f"API_POST_SAVE_TO_FILE=true\nSTATE_DIR={DEMO / 'state'}\nLOG_DIR={DEMO / 'logs'}\n"
            f"LOG_OUTPUT_DIR={DEMO / 'logs' / 'pipeline-logs'}\n"
        )
        shipper = [str(Path(sys.executable).parent / "gitlab-log-shipper"), "--env-file", str(env_file)]
        print("$ gitlab-log-shipper --env-file demo/.env check", flush=True)
        subprocess.call([*shipper, "check"], cwd=DEMO)
        print("\n$ gitlab-log-shipper --env-file demo/.env run --once", flush=True)
        code = subprocess.call([*shipper, "run", "--once"], cwd=DEMO)
        print(f"(exit code {code})\n")
        docs = sorted((r.json() for r in receiver.accepted()), key=lambda d: d["pipeline_id"])
        print("$ gitlab-log-shipper --env-file demo/.env status", flush=True)
        subprocess.call([*shipper, "status"], cwd=DEMO)
        print()
    print(f"The receiver accepted {len(docs)} document(s), one per finished pipeline "
          f"(the running pipeline waits for a later cycle). The first one:")
    if docs:
        print(json.dumps(shorten(docs[0]), indent=2))
    print("\n$ cat demo/logs/api-requests.log")
    print((DEMO / "logs" / "api-requests.log").read_text("utf-8"), end="")
    print("\nFiles (dual mode): demo/logs/pipeline-logs/ —")
    for path in sorted((DEMO / "logs" / "pipeline-logs").rglob("*")):
        if path.is_file():
            print("  " + str(path.relative_to(DEMO)))
    return code


if __name__ == "__main__":
    sys.exit(main())
