"""Benchmark: gitlab-log-shipper against the naive sequential way, in one run, on the bundled simulator.

    python bench/run.py                       # defaults: 60 pipelines x 8 jobs x 50 KB logs, 20 ms latency
    python bench/run.py --pipelines 80 --jobs 8 --log-size 100000 --latency 0.02 --big-jobs 10 --big-size 50M
    python bench/run.py --skip-big --shards 2 --concurrency 12   # two shipper processes, SHARD=0/2 and 1/2

The same work is also shipped by ``backfill --since`` (a fresh state folder: nothing shipped before), which lists
and ships at once with the same pools as ``run`` (issue 12: it used to find and ship one pipeline after another);
its row and ratio are printed next to ``run --once``'s.
With one shard, the shipper then runs ``--field-runs`` times with each ``DOCUMENT_FIELDS`` setting, and the CPU
the enriched document's sections, failure excerpts and links cost is printed (least CPU of each).

Both contestants run as separate processes against the same simulated GitLab (every request delayed by
``--latency`` seconds, as a WAN would) and the same receiver (which only counts and hashes bodies). For
each it prints wall time, pipelines/s, MB/s of logs, GitLab requests per pipeline and peak RSS
(``ru_maxrss`` of the process, from wait4 in a small launcher), then the ratios. A second round ships ONE pipeline of
``--big-jobs`` x ``--big-size`` logs (500 MB by default) and compares peak memory.
With ``--shards N`` the pipelines are spread over N projects and the shipper runs as N processes at once
(``SHARD=i/N``, a state folder each), as OPERATIONS.md describes scaling out; the time is until the last
one ends. The package is byte-compiled first, as pip does on installation. ``bench/cpu_profile.py`` shows
where the shipper's CPU goes. This is a measurement, not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import compileall
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.logs import LogSpec
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World
from gitlab_log_shipper.timeutil import format_ts

HERE = Path(__file__).resolve().parent


@dataclass
class Run:
    name: str
    seconds: float
    peak_rss_mb: float
    requests: int
    delivered: int
    exit_code: int
    cpu: float = 0.0


def size_arg(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def build_world(pipelines: int, jobs: int, log_size: int, projects: int = 1) -> tuple[World, list[int], str]:
    """``pipelines`` finished pipelines, spread round-robin over ``projects`` projects."""
    world = World()
    user = world.add_user("bench", name="Bench User", public_email="bench@example.com")
    ids = [world.add_project(f"bench/app{k}", name=f"bench-app{k}").id for k in range(projects)]
    since = world.now() - timedelta(minutes=30)
    stages = ["build", "test", "deploy"]
    for i in range(pipelines):
        # Every fourth pipeline has a last job that failed (allowed to): its document gets a failure excerpt.
        failed = [i % 4 == 3 and j == jobs - 1 for j in range(jobs)]
        world.add_pipeline(ids[i % projects], status="success", user=user, jobs=[
            JobSpec(f"job-{j}", stages[j * len(stages) // jobs], "failed" if failed[j] else "success",
                    log=LogSpec(log_size, seed=i * 100 + j, failed=failed[j]), allow_failure=True if failed[j] else None)
            for j in range(jobs)
        ])
    return world, ids, format_ts(since)


def warm_up(world: World) -> None:
    """Generate every log once before timing, so neither contestant pays for the simulator's first
    rendering of a log's text (it caches it) and the order of the runs does not matter."""
    for job in world.jobs.values():
        if isinstance(job.log, LogSpec):
            job.log.sha256()


# Each command runs under this small launcher, which reports its child's rusage on its last stderr line. Started
# straight from this process, a child's ru_maxrss would be at least this process's own size (Linux keeps the
# high-water mark across exec), and this process holds the simulated world.
LAUNCHER = ("import os, subprocess, sys\n"
            "proc = subprocess.Popen(sys.argv[1:])\n"
            "_, status, u = os.wait4(proc.pid, 0)\n"
            "print(f'RUSAGE {u.ru_maxrss} {u.ru_utime} {u.ru_stime} {u.ru_nivcsw}', file=sys.stderr)\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_process(name: str, commands: list[tuple[list[str], dict[str, str]]], sim: GitLabSimulator, receiver: Receiver) -> Run:
    """Start the commands at once and wait for all; the time is until the last one ends. Peak RSS is the
    sum of each process's peak (an upper bound of what they held together)."""
    sim.reset_counters()
    # Each run is a scenario of its own: one must not start with GitLab.com's budget (2,000 a minute, which the
    # shipper respects by pausing until the window resets) spent by the runs before it.
    sim.reset_rate_window()
    receiver.clear()
    own = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", LAUNCHER, *command], env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for command, env in commands]
    cpu = system = peak = 0.0
    switches = code = 0
    for proc in procs:
        stderr = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
        _, status, _ = os.wait4(proc.pid, 0)
        proc.stderr.close() if proc.stderr else None
        if os.waitstatus_to_exitcode(status) != 0:
            code = os.waitstatus_to_exitcode(status)
            print(f"{name} exited {code}:\n{stderr[-2000:]}", file=sys.stderr)
        maxrss, utime, stime, nivcsw = stderr.rstrip().rsplit("\n", 1)[-1].split()[1:]  # the launcher's line
        cpu += float(utime) + float(stime)
        system += float(stime)
        switches += int(nivcsw)
        peak += int(maxrss) / 1024
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    servers = after.ru_utime + after.ru_stime - own.ru_utime - own.ru_stime
    print(f"  ({name}: {cpu:.2f} s CPU ({system:.2f} system, {switches} involuntary switches) in {seconds:.2f} s; simulated GitLab and "
          f"receiver: {servers:.2f} s CPU)")
    return Run(name, seconds, peak, sum(sim.counters.values()), len(receiver.accepted()), code, cpu)


def shipper_command(tmp: Path, sim: GitLabSimulator, receiver: Receiver, project_ids: list[int], extra: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    state = Path(tempfile.mkdtemp(dir=tmp, prefix="state-"))
    (tmp / "empty.env").touch()
    env = {
        "GITLAB_URL": sim.url, "GITLAB_TOKEN": sim.world.token, "GITLAB_PROJECTS": ",".join(map(str, project_ids)),
        "API_POST_ENABLED": "true", "API_POST_URL": receiver.url, "STATE_DIR": str(state),
        "LOG_DIR": str(state / "logs"), "INITIAL_LOOKBACK": "2h", "LOG_LEVEL": "WARNING", **extra,
    }
    return [sys.executable, "-m", "gitlab_log_shipper", "--env-file", str(tmp / "empty.env"), "run", "--once"], env


def backfill_command(tmp: Path, sim: GitLabSimulator, receiver: Receiver, project_ids: list[int], since: str,
                     extra: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """``backfill --since`` over the same projects, from a state folder of its own (so it ships everything)."""
    command, env = shipper_command(tmp, sim, receiver, project_ids, extra)
    return [*command[:-2], "backfill", "--since", since], env


def naive_command(sim: GitLabSimulator, receiver: Receiver, project_ids: list[int], since: str) -> tuple[list[str], dict[str, str]]:
    return [sys.executable, str(HERE / "naive.py"), sim.url, sim.world.token, ",".join(map(str, project_ids)), since,
            receiver.url], {}


def report(runs: list[Run], pipelines: int, log_bytes: int, minimum: float) -> None:
    print(f"{'':10} {'seconds':>8} {'pipel/s':>8} {'MB/s':>8} {'req/pipel':>10} {'peak RSS':>10} {'delivered':>9}")
    for run in runs:
        print(f"{run.name:10} {run.seconds:8.2f} {pipelines / run.seconds:8.2f} {log_bytes / 1e6 / run.seconds:8.1f} "
              f"{run.requests / pipelines:10.2f} {run.peak_rss_mb:8.0f}MB {run.delivered:9d}")
    print(f"minimum GitLab requests per pipeline: {minimum:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipelines", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--log-size", type=size_arg, default=50_000)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--concurrency", type=int, default=None, help="CONCURRENCY for the shipper (default: its own)")
    parser.add_argument("--big-jobs", type=int, default=10)
    parser.add_argument("--big-size", type=size_arg, default=50 * 1024**2)
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--field-runs", type=int, default=5,
                        help="runs of each DOCUMENT_FIELDS setting for the enriched document's CPU cost (0: skip)")
    parser.add_argument("--shards", type=int, default=1, help="run the shipper as N processes (SHARD=i/N) over N "
                        "projects; the pipelines are spread over the projects, the baseline ships them all")
    args = parser.parse_args()
    # Byte-compile the package as pip does when it installs it: a development checkout with
    # PYTHONDONTWRITEBYTECODE set would otherwise compile every module from source at each start.
    compileall.compile_dir(HERE.parent / "gitlab_log_shipper", quiet=1)
    extra = {"CONCURRENCY": str(args.concurrency)} if args.concurrency else {}

    with tempfile.TemporaryDirectory(prefix="gls-bench-") as tmp_name:
        tmp = Path(tmp_name)
        world, project_ids, since = build_world(args.pipelines, args.jobs, args.log_size, args.shards)
        warm_up(world)
        with GitLabSimulator(world) as sim, Receiver(store_bodies=False) as receiver:
            sim.faults.latency = args.latency
            log_bytes = args.pipelines * args.jobs * args.log_size
            print(f"throughput: {args.pipelines} pipelines x {args.jobs} jobs x {args.log_size} B logs "
                  f"({log_bytes / 1e6:.0f} MB), {args.latency * 1000:.0f} ms per GitLab request")
            shards = [shipper_command(tmp, sim, receiver, project_ids, {**extra, "SHARD": f"{i}/{args.shards}"})
                      for i in range(args.shards)]
            shipper = run_process("shipper" if args.shards == 1 else f"shipper×{args.shards}", shards, sim, receiver)
            backfills = [backfill_command(tmp, sim, receiver, project_ids, since, {**extra, "SHARD": f"{i}/{args.shards}"})
                         for i in range(args.shards)]
            backfill = run_process("backfill" if args.shards == 1 else f"backfill×{args.shards}", backfills, sim,
                                   receiver)
            naive = run_process("naive", [naive_command(sim, receiver, project_ids, since)], sim, receiver)
            # per pipeline: its detail, its jobs pages, one trace per job; per project and cycle: the list
            # pages, twice (GitLab lists child pipelines only when asked with source=parent_pipeline)
            list_pages = 2 * args.shards * max(1, math.ceil(args.pipelines / args.shards / 100))
            minimum = 1 + math.ceil(args.jobs / 100) + args.jobs + list_pages / args.pipelines
            report([shipper, backfill, naive], args.pipelines, log_bytes, minimum)
            print(f"ratio: shipper is {naive.seconds / shipper.seconds:.1f}x the baseline's throughput")
            print(f"ratio: backfill is {naive.seconds / backfill.seconds:.1f}x the baseline's throughput "
                  f"({backfill.seconds / shipper.seconds:.2f}x the time of run --once; peak RSS "
                  f"{backfill.peak_rss_mb:.0f} MB vs {naive.peak_rss_mb:.0f} MB)")
            if args.shards == 1 and args.field_runs:
                # The same shipper with DOCUMENT_FIELDS=design against the default (enriched): what the sections,
                # failure excerpts and links (issue 13) cost. On one thread and without latency (CPU that threads
                # taking turns at the GIL add varies by ±15 % from run to run and would drown a 5 % difference),
                # alternated, several times each; the medians and the least CPU of each are compared.
                cpu: dict[str, list[float]] = {"enriched": [], "design": []}
                requests: dict[str, int] = {}
                sim.faults.latency = 0.0
                for _ in range(args.field_runs):
                    for fields in ("enriched", "design"):
                        run = run_process(fields, [shipper_command(tmp, sim, receiver, project_ids,
                                                                   {**extra, "CONCURRENCY": "1",
                                                                    "DOCUMENT_FIELDS": fields})], sim, receiver)
                        cpu[fields].append(run.cpu)
                        requests[fields] = run.requests
                best = {fields: min(values) for fields, values in cpu.items()}
                middle = {fields: sorted(values)[len(values) // 2] for fields, values in cpu.items()}
                print(f"document fields ({args.field_runs} runs each, one thread, no latency; whole process, imports "
                      f"included): median CPU enriched {middle['enriched']:.2f} s, design {middle['design']:.2f} s: "
                      f"enriched costs {100 * (middle['enriched'] / middle['design'] - 1):+.1f} %; least "
                      f"{best['enriched']:.2f} s / {best['design']:.2f} s: {100 * (best['enriched'] / best['design'] - 1):+.1f} %; "
                      f"GitLab requests {requests['enriched']} vs {requests['design']}")

        if args.skip_big:
            return 0
        big = World()
        project = big.add_project("bench/big", name="big")
        user = big.add_user("bench", name="Bench User", public_email="bench@example.com")
        since = format_ts(big.now() - timedelta(minutes=30))
        big.add_pipeline(project.id, status="success", user=user, jobs=[
            JobSpec(f"huge-{j}", "test", "success", log=LogSpec(args.big_size, seed=j)) for j in range(args.big_jobs)
        ])
        total = args.big_jobs * args.big_size
        warm_up(big)
        with GitLabSimulator(big) as sim, Receiver(store_bodies=False) as receiver:
            print(f"\nmemory: one pipeline of {args.big_jobs} x {args.big_size / 1024**2:.0f} MiB logs "
                  f"({total / 1024**2:.0f} MiB), no latency")
            shipper = run_process("shipper", [shipper_command(tmp, sim, receiver, [project.id], extra)], sim, receiver)
            naive = run_process("naive", [naive_command(sim, receiver, [project.id], since)], sim, receiver)
            report([shipper, naive], 1, total, 1 + 1 + args.big_jobs + 2)
            print(f"ratio: shipper peak RSS is {shipper.peak_rss_mb / naive.peak_rss_mb:.2f}x the baseline's "
                  f"({shipper.peak_rss_mb:.0f} MB vs {naive.peak_rss_mb:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
