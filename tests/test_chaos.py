"""Chaos: the real daemon, SIGKILLed at random moments and restarted, against a flaky receiver and a
flaky, rate-limited GitLab, while pipelines keep finishing (some retried after shipping). At the end
every pipeline finish must have reached the receiver at least once, and duplicates must be recognisable."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.logs import LogSpec
from gitlab_log_shipper.sim.receiver import RecordedRequest, Receiver, Reply
from gitlab_log_shipper.sim.world import JobSpec, World
from gitlab_log_shipper.timeutil import format_ts

from shipper_helpers import VALIDATOR, make_env

CHAOS_SECONDS = 45  # pipelines keep coming and kills keep happening for this long
DRAIN_SECONDS = 60  # then the daemon gets this long to deliver the rest


class FlakyReceiver:
    """~30 % 503, ~10 % 429 with Retry-After: 1, else 200; seeded so a failure can be replayed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.faults = 0

    def __call__(self, request: RecordedRequest) -> Reply:
        with self.lock:
            roll = self.rng.random()
            if roll < 0.30:
                self.faults += 1
                return Reply(503, body="upstream unavailable")
            if roll < 0.40:
                self.faults += 1
                return Reply(429, body="slow down", headers={"Retry-After": "1"})
        return Reply()


@pytest.mark.parametrize(("mode", "chaos_seconds"), [("api", CHAOS_SECONDS), ("dual", 25)])
def test_nothing_is_lost_under_chaos(mode: str, chaos_seconds: float, tmp_path: Path, world: World,
                                     gitlab_sim: GitLabSimulator) -> None:
    rng = random.Random(20261126)
    projects = [world.add_project(f"chaos/p{i}") for i in range(3)]
    # (pipeline id, status, finished_at) that must arrive; finished_at is None for manual pipelines (GitLab stamps
    # it only on success/failed/canceled), which this test never plays, so each has one finish.
    finishes: set[tuple[int, str, str | None]] = set()
    finishes_lock = threading.Lock()

    def record(pipeline_id: int) -> None:
        p = world.pipelines[pipeline_id]
        with finishes_lock:
            finishes.add((p.id, p.status, format_ts(p.finished_at) if p.finished_at is not None else None))

    gitlab_sim.faults.update(error_rate=0.05, error_statuses=(502,), rate_limit=150, rate_limit_window=1.0, seed=7)
    flaky = FlakyReceiver(seed=11)
    with Receiver(script=flaky) as receiver:
        env = make_env(tmp_path, gitlab_sim, receiver, API_POST_SAVE_TO_FILE="true" if mode == "dual" else "false",
                       POLL_INTERVAL="1", RETRY_ATTEMPTS="1", RETRY_DELAY="0.05",
                       OUTBOX_RETRY_MAX="2", GITLAB_TIMEOUT="5", API_POST_TIMEOUT="5")
        (tmp_path / "empty.env").touch()
        command = [sys.executable, "-m", "gitlab_log_shipper", "--env-file", str(tmp_path / "empty.env"), "run"]
        log_file = open(tmp_path / "daemon-output.log", "w")
        stop_mutations = threading.Event()
        running: list[int] = []
        pipelines_created = 0
        retried = 0

        mutator_errors: list[BaseException] = []

        def current_finish(pipeline_id: int) -> tuple[str, str] | None:
            p = world.pipelines[pipeline_id]
            return (p.status, format_ts(p.finished_at)) if p.finished_at is not None else None

        def mutate() -> None:
            try:
                mutations()
            except BaseException as exc:  # a dead mutator would quietly turn the chaos off: fail the test instead
                mutator_errors.append(exc)
                raise

        def mutations() -> None:
            nonlocal pipelines_created, retried
            while not stop_mutations.is_set():
                project = rng.choice(projects)
                roll = rng.random()
                with world.lock:
                    if roll < 0.55:
                        status = rng.choice(["success", "success", "failed", "canceled", "manual"])
                        jobs = [JobSpec(f"job-{j}", rng.choice(["build", "test", "deploy"]),
                                        "failed" if status == "failed" and j == 0 else "success",
                                        log=LogSpec(rng.randint(0, 40_000), seed=rng.randint(0, 99)))
                                for j in range(rng.randint(1, 4))]
                        pipeline = world.add_pipeline(project.id, status=status, jobs=jobs)
                        pipelines_created += 1
                        record(pipeline.id)
                        if rng.random() < 0.15:
                            child = world.add_child_pipeline(pipeline.id, jobs=[JobSpec("c", "test", "success", log="c\n")])
                            pipelines_created += 1
                            record(child.id)
                    elif roll < 0.75:
                        pipeline = world.add_pipeline(project.id, status="running",
                                                      jobs=[JobSpec("slow", "test", "running", log="...\n")])
                        pipelines_created += 1
                        running.append(pipeline.id)
                    elif roll < 0.90 and running:
                        pipeline_id = running.pop(rng.randrange(len(running)))
                        world.finish_pipeline(pipeline_id, rng.choice(["success", "failed"]))
                        record(pipeline_id)
                    else:
                        # retry a pipeline whose current finish has already arrived; it finishes again later.
                        # (Not merely "an earlier finish arrived": a finish retried away before any poll could
                        # see it never existed for a poller, and would be counted as lost.)
                        delivered = {(d["pipeline_id"], d["status"], d["finished_at"])
                                     for d in (r.json() for r in receiver.accepted())}
                        candidates = sorted({pid for pid, status, finished_at in delivered
                                             if status in ("failed", "canceled") and current_finish(pid) == (status, finished_at)})
                        if candidates:
                            pipeline_id = rng.choice(candidates)
                            world.retry_pipeline(pipeline_id)
                            running.append(pipeline_id)
                            retried += 1
                stop_mutations.wait(rng.uniform(0.05, 0.3))

        mutator = threading.Thread(target=mutate, daemon=True)
        mutator.start()
        kills = 0
        proc = subprocess.Popen(command, env={**os.environ, **env.values}, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            chaos_end = time.monotonic() + chaos_seconds
            while time.monotonic() < chaos_end:
                time.sleep(rng.uniform(1.0, 6.0))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                proc = subprocess.Popen(command, env={**os.environ, **env.values}, stdout=log_file,
                                        stderr=subprocess.STDOUT)
            stop_mutations.set()
            mutator.join()
            assert not mutator_errors, f"the mutator died: {mutator_errors[0]!r}"
            with world.lock:
                for pipeline_id in running:  # let everything finish so every pipeline has a final finish
                    world.finish_pipeline(pipeline_id, "success")
                    record(pipeline_id)
            gitlab_sim.faults.update(error_rate=0.0, rate_limit=None)

            def missing() -> set[tuple[int, str, str | None]]:
                got = {(d["pipeline_id"], d["status"], d["finished_at"]) for d in (r.json() for r in receiver.accepted())}
                with finishes_lock:
                    return finishes - got

            deadline = time.monotonic() + DRAIN_SECONDS
            while missing() and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            stop_mutations.set()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log_file.close()

        lost = missing()
        accepted = receiver.accepted()
        by_finish: dict[tuple[int, str], set[str | None]] = defaultdict(set)
        copies: dict[tuple[int, str], int] = defaultdict(int)
        for request in accepted:
            doc = request.json()
            VALIDATOR.validate(doc)
            by_finish[(doc["pipeline_id"], doc["finished_at"])].add(request.idempotency_key)
            copies[(doc["pipeline_id"], doc["finished_at"])] += 1
        duplicates = sum(n - 1 for n in copies.values())
        print(f"\nchaos ({mode}): pipelines={pipelines_created} finishes={len(finishes)} retried_after_shipping={retried} "
              f"kills={kills} receiver_faults={flaky.faults} gitlab_faults={sum(gitlab_sim.faults_served.values())} "
              f"posts={len(receiver.requests)} accepted={len(accepted)} lost={len(lost)} duplicates={duplicates}")
        output = (tmp_path / "daemon-output.log").read_text("utf-8", "replace")
        assert kills >= 5
        assert not lost, f"lost finishes: {sorted(lost)[:10]}\n{output[-3000:]}"
        # a finish delivered more than once always carries the same Idempotency-Key
        assert all(len(keys) == 1 for keys in by_finish.values())
        if mode == "dual":
            # the file output never shows half a file: every metadata.json parses, every job file it lists
            # exists, and the only leftovers of killed writes are hidden .tmp files
            for meta_path in env.output.glob("*/pipeline_*/metadata.json"):
                meta = json.loads(meta_path.read_text("utf-8"))
                for job in meta["jobs"].values():
                    assert (meta_path.parent / job["log_file"]).is_file()
            visible = [p for p in env.output.rglob("*") if p.is_file() and not p.name.startswith(".")]
            assert all(p.suffix in (".json", ".log") for p in visible)
            written = {int(p.parent.name.split("_")[1]) for p in env.output.glob("*/pipeline_*/metadata.json")}
            assert {pid for pid, _, _ in finishes} <= written
        at = output.find("Traceback")
        assert at < 0, output[max(0, at - 1500):at + 3000]
