"""Benchmark: what finding new pipelines costs, REST against GraphQL detection, in one run, on the bundled simulator.

    python bench/detection.py                      # 1,000 projects; daemon rounds of 90 s each
    python bench/detection.py --projects 300 --daemon-seconds 60 --skip-rest-daemon

Printed, REST and GraphQL side by side (GITLAB_API=rest / graphql, everything else equal):

1. **idle cycle**: GitLab requests of one poll cycle over ``--projects`` projects where nothing happened (the
   second cycle: discovery and first windows are behind);
2. **per shipped pipeline**: requests per pipeline of ``--jobs`` jobs (the user has no public e-mail, so REST
   looks the commit up), over ``--pipelines`` pipelines spread over random projects, minus the idle cycle's cost;
3. **daemon**: ``gitlab-log-shipper run`` for ``--daemon-seconds`` against a GitLab that allows 2,000 requests a
   minute (GitLab.com's limit, enforced by the simulator), while pipelines finish at random (``--rate`` a second,
   random projects). Printed: finish -> delivered latency (``finished_at`` to the receiver's 2xx; p50, p95, max),
   GitLab requests a minute spent on detection (everything but the requests of shipping), 429 answers, and the
   pipelines not delivered by the end.

Each GitLab request is delayed by ``--latency`` (a WAN). This is a measurement, not a test: nothing passes or fails.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gitlab_log_shipper.config.settings import load_config, prepare_directories  # noqa: E402
from gitlab_log_shipper.shipper import Shipper  # noqa: E402
from gitlab_log_shipper.sim.gitlab import GitLabSimulator  # noqa: E402
from gitlab_log_shipper.sim.logs import LogSpec  # noqa: E402
from gitlab_log_shipper.sim.receiver import Receiver  # noqa: E402
from gitlab_log_shipper.sim.world import JobSpec, World  # noqa: E402

SHIPPING = ("pipeline", "pipeline_jobs", "trace", "commit", "job", "pipeline_bridges", "project")


def build_world(projects: int) -> tuple[World, list[int]]:
    world = World()
    group = world.add_group("fleet")
    ids = [world.add_project(f"app{k}", group_id=group.id).id for k in range(projects)]
    world.bench_user = world.add_user("builder", name="Builder", public_email="")  # type: ignore[attr-defined]
    return world, ids


def add_pipeline(world: World, project_id: int, jobs: int, seed: int) -> int:
    stages = ["build", "test", "deploy"]
    pipeline = world.add_pipeline(project_id, status="success", user=world.bench_user,  # type: ignore[attr-defined]
                                  author_email="builder@example.com", jobs=[
        JobSpec(f"job-{j}", stages[j * len(stages) // jobs], "success", log=LogSpec(4096, seed=seed * 100 + j))
        for j in range(jobs)])
    return pipeline.id


def env_for(api: str, sim: GitLabSimulator, receiver: Receiver, state: Path, **extra: str) -> dict[str, str]:
    return {"GITLAB_URL": sim.url, "GITLAB_TOKEN": sim.world.token, "GITLAB_GROUPS": "fleet", "GITLAB_API": api,
            "API_POST_ENABLED": "true", "API_POST_URL": receiver.url, "STATE_DIR": str(state),
            "LOG_DIR": str(state / "logs"), "INITIAL_LOOKBACK": "10m", "LOG_LEVEL": "WARNING", **extra}


def requests_of(sim: GitLabSimulator, fn) -> dict[str, int]:  # type: ignore[no-untyped-def]
    sim.reset_counters()
    fn()
    return dict(sim.counters)


def cycles(args: argparse.Namespace, api: str, tmp: Path) -> tuple[int, float, dict[str, int]]:
    """(idle-cycle requests, requests per shipped pipeline, the per-pipeline counters)."""
    world, ids = build_world(args.projects)
    rng = random.Random(1)
    with GitLabSimulator(world) as sim, Receiver(store_bodies=False) as receiver:
        sim.faults.latency = args.latency
        state = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{api}-"))
        (tmp / "empty.env").touch()
        config = load_config(tmp / "empty.env", env_for(api, sim, receiver, state, CONCURRENCY="8"))
        prepare_directories(config)
        shipper = Shipper(config)
        try:
            shipper.run_cycle()  # discovery, first windows
            idle = requests_of(sim, shipper.run_cycle)
            for i in range(args.pipelines):
                add_pipeline(world, rng.choice(ids), args.jobs, i)
            busy = requests_of(sim, shipper.run_cycle)
        finally:
            shipper.close()
        delivered = len({r.headers.get("Idempotency-Key") for r in receiver.accepted()})
        assert delivered == args.pipelines, f"{api}: {delivered} of {args.pipelines} delivered"
    per_pipeline = (sum(busy.values()) - sum(idle.values())) / args.pipelines
    return sum(idle.values()), per_pipeline, busy


def daemon(args: argparse.Namespace, api: str, tmp: Path) -> dict[str, float]:
    world, ids = build_world(args.projects)
    rng = random.Random(2)
    finished: dict[int, float] = {}
    with GitLabSimulator(world) as sim, Receiver(store_bodies=True) as receiver:
        sim.faults.latency = args.latency
        sim.faults.rate_limit = 2000  # GitLab.com: 2,000 authenticated requests a minute
        state = Path(tempfile.mkdtemp(dir=tmp, prefix=f"daemon-{api}-"))
        (tmp / "empty.env").touch()
        env = env_for(api, sim, receiver, state, LOG_LEVEL="WARNING")
        proc = subprocess.Popen([sys.executable, "-m", "gitlab_log_shipper", "--env-file", str(tmp / "empty.env"), "run"],
                                env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stderr: list[str] = []
        threading.Thread(target=lambda: stderr.extend(proc.stderr or []), daemon=True).start()
        try:
            time.sleep(args.warmup)  # discovery and the first windows
            sim.reset_counters()
            served_before = sim.faults_served.get("rate_limited", 0)
            started = time.monotonic()
            deadline = started + args.daemon_seconds
            seed = 0
            while time.monotonic() < deadline:
                time.sleep(rng.expovariate(args.rate))
                seed += 1
                pipeline_id = add_pipeline(world, rng.choice(ids), args.jobs, seed)
                finished[pipeline_id] = world.pipelines[pipeline_id].finished_at.timestamp()  # type: ignore[union-attr]
            elapsed = time.monotonic() - started
            counters = dict(sim.counters)
            end = time.monotonic() + 60
            while time.monotonic() < end and len(_delivered(receiver)) < len(finished):
                time.sleep(0.5)
        finally:
            proc.terminate()
            proc.wait(30)
        delivered = _delivered(receiver)
        latencies = sorted(delivered[p] - finished[p] for p in finished if p in delivered)
        detection = sum(n for key, n in counters.items() if key not in SHIPPING)
        rate_limited = sim.faults_served.get("rate_limited", 0) - served_before
    if not latencies:
        print(f"  {api}: nothing delivered; stderr: {''.join(stderr)[-1500:]}", file=sys.stderr)
        return {}
    return {"p50": statistics.median(latencies), "p95": latencies[int(0.95 * (len(latencies) - 1))],
            "max": latencies[-1], "detection_per_min": detection * 60 / elapsed, "429": rate_limited,
            "finished": len(finished), "missing": len(finished) - len(latencies)}


def _delivered(receiver: Receiver) -> dict[int, float]:
    """pipeline id -> when the receiver took its first accepted document."""
    import json

    seen: dict[int, float] = {}
    for request in receiver.accepted():
        try:
            pipeline_id = int(json.loads(request.body)["pipeline_id"])
        except (ValueError, KeyError, TypeError):
            continue
        seen.setdefault(pipeline_id, request.received_at)
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--projects", type=int, default=1000)
    parser.add_argument("--pipelines", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--daemon-seconds", type=float, default=90.0)
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds the daemon runs before measuring")
    parser.add_argument("--rate", type=float, default=0.5, help="pipelines finishing per second in the daemon round")
    parser.add_argument("--skip-rest-daemon", action="store_true", help="the REST daemon round takes long at 1,000 projects")
    args = parser.parse_args()
    print(f"{args.projects} projects, {args.latency * 1000:.0f} ms per GitLab request; pipelines of {args.jobs} jobs")
    with tempfile.TemporaryDirectory(prefix="gls-detection-") as tmp_name:
        tmp = Path(tmp_name)
        rows = {}
        for api in ("rest", "graphql"):
            idle, per_pipeline, busy = cycles(args, api, tmp)
            rows[api] = (idle, per_pipeline)
            print(f"  ({api}: busy cycle requests by endpoint {dict(sorted(busy.items()))})")
        print(f"{'':28} {'REST':>12} {'GraphQL':>12}   target (GraphQL)")
        print(f"{'idle cycle, requests':28} {rows['rest'][0]:12d} {rows['graphql'][0]:12d}   <= 12")
        print(f"{'requests per pipeline':28} {rows['rest'][1]:12.2f} {rows['graphql'][1]:12.2f}   <= J + 2 = {args.jobs + 2}")
        results = {}
        for api in ("rest", "graphql"):
            if api == "rest" and args.skip_rest_daemon:
                continue
            results[api] = daemon(args, api, tmp)
        print(f"daemon, {args.daemon_seconds:.0f} s, {args.rate:g} pipelines/s finishing, GitLab limit 2,000 requests/min:")
        for key, label, target in (("p50", "finish -> delivered p50, s", "<= 10"), ("p95", "finish -> delivered p95, s", "<= 20"),
                                   ("max", "finish -> delivered max, s", ""),
                                   ("detection_per_min", "detection requests/min", "<= 200"), ("429", "429 answers", "0"),
                                   ("missing", "not delivered at the end", "0")):
            cells = [f"{results[api][key]:12.1f}" if api in results and results[api] else f"{'-':>12}" for api in ("rest", "graphql")]
            print(f"  {label:26} {cells[0]} {cells[1]}   {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
