"""Finish → delivered latency (issue 12): GitLab's finished_at to the receiver's 2xx, as a histogram in the metrics
textfile and as p50 / p95 / max in `status`, over real HTTP against the GitLab simulator and the receiver.

Most tests run the Shipper and the daemon's Supervision (which write the textfile after each cycle) on a
ManualClock that GitLab's simulated world shares (or runs ahead of, for skew), so latencies are exact; the
restart, file-mode and backfill tests run the real CLI.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from gitlab_log_shipper.config.settings import load_config
from gitlab_log_shipper.service.notify import Notifier
from gitlab_log_shipper.service.status import collect, render
from gitlab_log_shipper.service.supervision import Supervision
from gitlab_log_shipper.shipper import OUTBOX_SENT, QUEUED_OUTCOME, SHIPPED, CycleReport, Shipper
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver, Reply
from gitlab_log_shipper.sim.world import JobSpec, World
from gitlab_log_shipper.state import latency, store as state_module
from gitlab_log_shipper.timeutil import utcnow

from shipper_helpers import ManualClock, make_env
from test_metrics import parse

HISTOGRAM = "gitlab_log_shipper_delivery_latency_seconds"
CLAMPED = "gitlab_log_shipper_delivery_latency_clamped_total"
JOBS = [JobSpec("test", "test", "success", log="ok\n")]


def bucket(samples: dict[str, float], le: str) -> float:
    return samples[f'{HISTOGRAM}_bucket{{le="{le}"}}']


class Rig:
    """One STATE_DIR shipped by a Shipper on a ManualClock, with the daemon's per-cycle bookkeeping (statistics and
    the metrics textfile); GitLab's world runs on the same clock, ``gitlab_ahead`` seconds ahead of it."""

    def __init__(self, tmp: Path, receiver: Receiver, *, start: datetime | None = None, gitlab_ahead: float = 0.0,
                 **env: str) -> None:
        self.clock = ManualClock(start or datetime(2026, 5, 4, 9, 0, tzinfo=timezone.utc))
        ahead = timedelta(seconds=gitlab_ahead)
        self.world = World(clock=lambda: self.clock() + ahead)
        self.sim = GitLabSimulator(self.world).start()
        self.receiver = receiver
        self.textfile = tmp / "collector" / "gitlab_log_shipper.prom"
        self.textfile.parent.mkdir(parents=True)
        self.env = make_env(tmp, self.sim, receiver, METRICS_TEXTFILE=str(self.textfile), RETRY_ATTEMPTS="0", **env)
        self.config = load_config(None, self.env.values)
        self.project = self.world.add_project("team/app")
        self.shipper = Shipper(self.config, clock=self.clock)
        self.ops = Supervision(self.config, self.shipper, Notifier(), clock=self.clock)

    def finished(self, seconds_ago: float, status: str = "success") -> int:
        """A pipeline that came to rest ``seconds_ago`` before now by GitLab's clock."""
        pipeline = self.world.add_pipeline(self.project.id, status=status, jobs=JOBS,
                                           finished_at=self.world.now() - timedelta(seconds=seconds_ago))
        return pipeline.id

    def cycle(self) -> CycleReport:
        self.ops.cycle_started()
        report = self.shipper.run_cycle()
        self.ops.cycle_finished(report)
        return report

    def metrics(self) -> dict[str, float]:
        return parse(self.textfile.read_text("utf-8"))

    def snapshot(self) -> dict[str, Any]:
        return collect(self.config, self.shipper.state, self.clock())

    def close(self) -> None:
        self.shipper.close()
        self.sim.stop()


@contextmanager
def rig(tmp: Path, script: Callable[[Any], Reply] | None = None, **options: Any) -> Iterator[Rig]:
    with Receiver(script=script) as receiver:
        shipping = Rig(tmp, receiver, **options)
        try:
            yield shipping
        finally:
            shipping.close()


def test_a_pipeline_finished_42_s_before_its_2xx_lands_in_the_60_s_bucket(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.finished(42)
        r.finished(7, status="manual")  # no finished_at in GitLab: measured from its updated_at
        report = r.cycle()
        assert report.counts[SHIPPED] == 2 and len(r.receiver.accepted()) == 2
        samples = r.metrics()
    assert bucket(samples, "5.0") == 0 and bucket(samples, "10.0") == 1  # the manual one: 7 s
    assert bucket(samples, "30.0") == 1 and bucket(samples, "60.0") == 2 and bucket(samples, "+Inf") == 2
    assert samples[f"{HISTOGRAM}_sum"] == 49.0 and samples[f"{HISTOGRAM}_count"] == 2
    assert samples[CLAMPED] == 0


def test_outbox_drained_after_an_outage_measures_the_wait(tmp_path: Path) -> None:
    down = {"on": True}
    with rig(tmp_path, lambda request: Reply(503) if down["on"] else Reply()) as r:
        r.finished(5)
        assert r.cycle().counts[QUEUED_OUTCOME] == 1
        assert r.metrics()[f"{HISTOGRAM}_count"] == 0  # nothing delivered yet, nothing measured
        down["on"] = False
        r.clock.advance(minutes=20)  # the receiver comes back 20 minutes later
        assert r.cycle().counts[OUTBOX_SENT] == 1
        samples, snapshot = r.metrics(), r.snapshot()
        rest_rows = sqlite3.connect(r.config.state_dir / "state.sqlite3").execute(
            "SELECT COUNT(*) FROM outbox_rest").fetchone()[0]
    assert bucket(samples, "600.0") == 0 and bucket(samples, "1800.0") == 1
    assert samples[f"{HISTOGRAM}_sum"] == 1205.0
    assert snapshot["latency"]["by_path"] == {"direct": 0, "outbox": 1, "redelivered": 0}
    assert snapshot["latency"]["max_seconds"] == 1205.0
    assert rest_rows == 0  # the delivered document's rest time went with it


def test_a_redelivered_dead_letter_counts_what_users_waited(tmp_path: Path) -> None:
    rejecting = {"on": True}
    with rig(tmp_path, lambda request: Reply(422) if rejecting["on"] else Reply()) as r:
        r.finished(3)
        r.cycle()
        assert r.metrics()[f"{HISTOGRAM}_count"] == 0
        rejecting["on"] = False
        r.clock.advance(hours=2)  # someone fixed the receiver and ran `redeliver`
        assert r.shipper.delivery is not None
        assert [post.ok for _, post in r.shipper.delivery.redeliver()] == [True]
        r.ops.write_metrics()
        samples, snapshot = r.metrics(), r.snapshot()
    assert bucket(samples, "3600.0") == 0 and bucket(samples, "+Inf") == 1
    assert samples[f"{HISTOGRAM}_sum"] == 7203.0
    assert snapshot["latency"]["by_path"]["redelivered"] == 1


def test_clock_skew_is_clamped_to_zero_counted_and_logged_once_per_cycle(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gitlab_log_shipper.state.latency")
    with rig(tmp_path, gitlab_ahead=30.0) as r:  # GitLab's clock runs 30 s ahead of this machine's
        r.finished(2)
        r.finished(10)
        assert r.cycle().counts[SHIPPED] == 2
        first = [rec for rec in caplog.records if "disagree" in rec.getMessage()]
        r.finished(5)
        r.clock.advance(1)
        assert r.cycle().counts[SHIPPED] == 1
        samples, snapshot = r.metrics(), r.snapshot()
    warnings = [rec for rec in caplog.records if "disagree" in rec.getMessage()]
    assert len(first) == 1 and len(warnings) == 2  # once per cycle, not once per delivery
    assert "check NTP" in warnings[0].getMessage()
    assert samples[CLAMPED] == 3 and bucket(samples, "1.0") == 3 and samples[f"{HISTOGRAM}_sum"] == 0.0
    assert snapshot["latency"]["max_seconds"] == 0.0


def test_status_shows_p50_p95_and_max_of_the_last_hour(tmp_path: Path) -> None:
    start = utcnow().replace(microsecond=0)  # `status` looks back an hour from the real clock
    with rig(tmp_path, start=start) as r:
        for seconds in range(1, 21):
            r.finished(seconds)
        assert r.cycle().counts[SHIPPED] == 20
        text = r.env.invoke("status")
        snapshot = json.loads(r.env.invoke("status", "--json").output)
    assert text.exit_code == 0
    line = next(line for line in text.output.splitlines() if line.startswith("latency:"))
    assert "last hour: 20 delivered (20 direct)" in line
    assert "p50 10 s, p95 19 s, max 20 s" in line and "20 since the state store was created" in line
    timed = snapshot["latency"]
    assert (timed["count"], timed["p50_seconds"], timed["p95_seconds"], timed["max_seconds"]) == (20, 10.0, 19.0, 20.0)
    assert timed["total"]["count"] == 20 and timed["total"]["buckets"]["10.0"] == 10


def test_latency_storage_is_a_fixed_size_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_module, "RECENT_CAPACITY", 5)
    monkeypatch.setattr(latency, "RECENT_CAPACITY", 5)
    with rig(tmp_path) as r:
        for seconds in range(1, 9):
            r.finished(seconds * 10)
        r.cycle()
        snapshot = r.snapshot()
        rows = sqlite3.connect(r.config.state_dir / "state.sqlite3").execute(
            "SELECT COUNT(*) FROM latency_recent").fetchone()[0]
        lines = render(snapshot, r.clock())
    assert rows == 5  # the newest 5 of 8: the table does not grow with uptime
    assert snapshot["latency"]["count"] == 5 and snapshot["latency"]["only_latest"] == 5
    assert snapshot["latency"]["total"]["count"] == 8  # the histogram still counts every one
    assert any(line.startswith("latency:       last hour, the latest 5: 5 delivered") for line in lines)


def test_the_histogram_survives_a_restart_and_parses(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                     receiver: Receiver) -> None:
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=JOBS)
    textfile = tmp_path / "collector" / "gitlab_log_shipper.prom"
    textfile.parent.mkdir()
    env = make_env(tmp_path, gitlab_sim, receiver, METRICS_TEXTFILE=str(textfile))
    assert env.invoke("run", "--once").exit_code == 0
    first = parse(textfile.read_text("utf-8"))
    world.add_pipeline(project.id, status="failed", jobs=[JobSpec("b", "test", "failed", log="b\n")])
    assert env.invoke("run", "--once").exit_code == 0  # a new process: a new StateStore on the same STATE_DIR
    second = parse(textfile.read_text("utf-8"))
    assert first[f"{HISTOGRAM}_count"] == 1 and second[f"{HISTOGRAM}_count"] == 2
    assert second[f"{HISTOGRAM}_sum"] >= first[f"{HISTOGRAM}_sum"] > 0
    for le in [latency.bucket_label(bound) for bound in latency.BUCKETS] + ["+Inf"]:
        assert bucket(second, le) >= bucket(first, le)  # counters never go back: rate() sees no reset
    assert bucket(second, "+Inf") == 2
    text = textfile.read_text("utf-8")
    assert f"# TYPE {HISTOGRAM} histogram" in text and f'{HISTOGRAM}_bucket{{le="1.0"}}' in text


def test_backfill_and_post_are_not_measured(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                            receiver: Receiver) -> None:
    project = world.add_project("team/app")
    old = world.add_pipeline(project.id, status="success", jobs=JOBS,
                             finished_at=utcnow() - timedelta(days=3))
    env = make_env(tmp_path, gitlab_sim, receiver, INITIAL_LOOKBACK="1h")
    assert env.invoke("backfill", "--since", "5d").exit_code == 0
    assert env.invoke("post", "--pipeline-id", str(old.id)).exit_code == 0
    assert len(receiver.accepted()) == 2
    timed = json.loads(env.invoke("status", "--json").output)["latency"]
    assert timed["count"] == 0 and timed["total"]["count"] == 0  # three days of history is not a delay
    world.add_pipeline(project.id, status="success", jobs=JOBS)
    assert env.invoke("run", "--once").exit_code == 0
    assert json.loads(env.invoke("status", "--json").output)["latency"]["count"] == 1


def test_file_mode_measures_nothing(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=JOBS)
    textfile = tmp_path / "collector" / "gitlab_log_shipper.prom"
    textfile.parent.mkdir()
    env = make_env(tmp_path, gitlab_sim, None, METRICS_TEXTFILE=str(textfile))
    assert env.invoke("run", "--once").exit_code == 0
    samples = parse(textfile.read_text("utf-8"))
    assert samples['gitlab_log_shipper_pipelines_total{outcome="shipped"}'] == 1
    assert not any(name.startswith("gitlab_log_shipper_delivery_latency") for name in samples)  # absent, not 0
    assert json.loads(env.invoke("status", "--json").output)["latency"] is None
    assert "latency:       not measured in file mode" in env.invoke("status").output


@pytest.mark.parametrize("broken", [
    [('le="1.0"', 2), ('le="2.0"', 1), ('le="+Inf"', 2)],  # not cumulative
    [('le="1.0"', 1), ('le="2.0"', 2)],  # no +Inf bucket
    [('le="2.0"', 1), ('le="1.0"', 1), ('le="+Inf"', 1)],  # out of order
    [('le="1.0"', 1), ('le="+Inf"', 3)],  # +Inf differs from _count (2)
])
def test_the_textfile_check_rejects_a_broken_histogram(broken: list[tuple[str, int]]) -> None:
    """The check the textfile tests rely on can fail: each rule of a Prometheus histogram is enforced."""
    lines = [f"# HELP {HISTOGRAM} latency", f"# TYPE {HISTOGRAM} histogram"]
    lines += [f"{HISTOGRAM}_bucket{{{le}}} {n}" for le, n in broken]
    lines += [f"{HISTOGRAM}_sum 3.0", f"{HISTOGRAM}_count 2"]
    with pytest.raises(AssertionError):
        parse("\n".join(lines) + "\n")
    parse("\n".join([f"# HELP {HISTOGRAM} latency", f"# TYPE {HISTOGRAM} histogram", f'{HISTOGRAM}_bucket{{le="1.0"}} 1',
                     f'{HISTOGRAM}_bucket{{le="+Inf"}} 2', f"{HISTOGRAM}_sum 3.0", f"{HISTOGRAM}_count 2"]) + "\n")
